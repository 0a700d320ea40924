//! Slow bodies: a chunk body must keep up a minimum rate and end within a deadline, so that a
//! trickling client cannot hold one of the process's chunk write slots for ever.

use std::time::{Duration, Instant};

use stitch_common::config::{ByteSize, Interval};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// What became of a body sent in small pieces on a raw connection.
struct Sent {
    /// The response head and body, if one came.
    response: Option<String>,
    /// Whether the server closed the connection after it.
    closed: bool,
    took: Duration,
    bytes: usize,
}

impl Sent {
    fn status(&self) -> u16 {
        let response = self.response.as_deref().expect("a response");
        response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code")
    }
}

/// Sends `head`, then `piece` bytes every `every`, until the server answers (and closes) or
/// `limit` passes.
async fn send_slowly(
    addr: std::net::SocketAddr,
    head: &str,
    piece: usize,
    every: Duration,
    limit: Duration,
) -> Sent {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut bytes = 0;
    let mut writable = true;
    let mut closed = false;
    while started.elapsed() < limit {
        if writable {
            // The server may have answered and closed already: then the write fails.
            writable = stream.write_all(&vec![b'x'; piece]).await.is_ok();
            bytes += piece;
        }
        match tokio::time::timeout(every, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    Sent {
        response: (!received.is_empty()).then(|| String::from_utf8_lossy(&received).into_owned()),
        closed,
        took,
        bytes,
    }
}

fn uploaded_chunks(status: &serde_json::Value) -> Vec<u64> {
    serde_json::from_value(status["uploaded_chunks"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_is_cut_for_its_rate_while_other_clients_keep_uploading() {
    let app = spawn_app_with(|s| {
        s.http.min_body_rate = ByteSize(1 << 10);
        s.http.min_body_rate_window = Interval(Duration::from_secs(1));
        // The trickle never stalls long enough for the idle timeout.
        s.http.body_idle_timeout = Interval(Duration::from_secs(20));
    })
    .await;
    let id = new_id();
    let source = Source::random(4 * (64 << 10), 64 << 10, 41);
    for index in 0..3 {
        let (code, body) = app.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
    }

    // One byte every 300 ms: under the idle timeout, far under 1 KiB/s.
    let head = raw_chunk_head(&id, 3, 4, 3 * (64 << 10), 64 << 10, 4 * (64 << 10));
    let addr = app.addr;
    let trickle = tokio::spawn(async move {
        send_slowly(
            addr,
            &head,
            1,
            Duration::from_millis(300),
            Duration::from_secs(60),
        )
        .await
    });

    // Meanwhile, other clients upload whole files.
    let mut others = 0u64;
    while !trickle.is_finished() {
        let other = new_id();
        let small = Source::random(2 * (32 << 10), 32 << 10, others);
        for index in 0..2 {
            let (code, body) = app.put_chunk(&other, &small, index).await;
            assert_eq!(code, 200, "{body}");
        }
        others += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        others >= 2,
        "other clients uploaded {others} files meanwhile"
    );

    let sent = trickle.await.unwrap();
    let response = sent.response.clone().unwrap_or_else(|| {
        panic!(
            "no response to a trickle of {} bytes in {:?}",
            sent.bytes, sent.took
        )
    });
    assert_eq!(sent.status(), 408, "{response}");
    assert!(response.contains("body_too_slow"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert!(sent.closed, "the server kept the connection open");
    assert!(
        sent.took < Duration::from_secs(15),
        "cut only after {:?}",
        sent.took
    );

    // Nothing of the cut chunk was counted or kept.
    let (code, status) = app.status(&id).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(uploaded_chunks(&status), [0, 1, 2]);
    let files = chunk_files(&app.env, &id);
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with("3.") && !f.ends_with(".part")),
        "{files:?}"
    );

    // The slot is free again and the upload completes with the chunk sent at speed.
    let (code, body) = app.put_chunk(&id, &source, 3).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["upload_complete"], true);
    assert_eq!(reassemble_counted(&app.env, &id), source.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_keeps_its_rate_but_outlasts_the_chunk_deadline_is_cut() {
    let app = spawn_app_with(|s| {
        s.http.min_body_rate = ByteSize(1 << 10);
        s.http.min_body_rate_window = Interval(Duration::from_secs(1));
        s.http.chunk_deadline = Interval(Duration::from_secs(3));
    })
    .await;
    let id = new_id();
    // 1 KiB every 200 ms: five times the minimum rate, but 1 MiB takes over three minutes.
    let head = raw_chunk_head(&id, 0, 1, 0, 1 << 20, 1 << 20);
    let sent = send_slowly(
        app.addr,
        &head,
        1 << 10,
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .await;
    let response = sent
        .response
        .clone()
        .unwrap_or_else(|| panic!("no response to {} bytes in {:?}", sent.bytes, sent.took));
    assert_eq!(sent.status(), 408, "{response}");
    assert!(response.contains("body_deadline"), "{response}");
    assert!(sent.closed, "the server kept the connection open");
    assert!(
        sent.took >= Duration::from_millis(2900) && sent.took < Duration::from_secs(20),
        "cut after {:?}",
        sent.took
    );

    // The chunk created nothing: no upload, no file.
    let (code, body) = app.status(&id).await;
    assert_eq!(code, 404, "{body}");
    assert!(
        app.env.storage_snapshot().is_empty(),
        "{:?}",
        app.env.storage_snapshot()
    );
    assert!(chunk_files(&app.env, &id).is_empty());
}
