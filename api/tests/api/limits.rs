//! Connection and concurrency limits: slow headers, stalled bodies, too many writes.

use std::time::Duration;

use crate::helpers::*;

fn secs(n: u64) -> stitch_common::config::Interval {
    stitch_common::config::Interval(Duration::from_secs(n))
}

/// Sends a chunk's `head` and the `first` part of its body, and waits until its copy is being
/// written: the connection then holds a write slot until the rest is sent.
async fn start_slow_chunk(app: &TestApp, head: &str, first: &[u8]) -> RawConnection {
    let mut slow = RawConnection::open(app.addr).await;
    slow.send(head.as_bytes()).await;
    slow.send(first).await;
    let env = app.env.clone();
    eventually(
        Duration::from_secs(20),
        "the slow chunk to start writing",
        || env.storage_snapshot().keys().any(|k| k.ends_with(".part")),
    )
    .await;
    slow
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = spawn_app_with(|s| s.http.header_read_timeout = secs(1)).await;
    let mut slow = RawConnection::open(app.addr).await;
    slow.send(b"PUT /upload/chunk HTTP/1.1\r\nHost: test\r\nX-File-ID: a\r\n")
        .await;
    let (_, closed) = slow.read_until_close(Duration::from_secs(20)).await;
    assert!(
        closed,
        "the server kept a connection with unfinished headers open"
    );
    // Everyone else is still served.
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_body_that_stalls_gets_408_and_leaves_nothing() {
    let app = spawn_app_with(|s| s.http.body_idle_timeout = secs(1)).await;
    let id = new_id();
    let mut conn = RawConnection::open(app.addr).await;
    conn.send(raw_chunk_head(&id, 0, 2, 0, 1000, 2000).as_bytes())
        .await;
    conn.send(&[7u8; 500]).await;
    let (status, response) = conn.read_response(Duration::from_secs(20)).await;
    assert_eq!(status, 408, "{response}");
    assert!(response.contains("body_timeout"), "{response}");
    assert!(app.env.storage_snapshot().is_empty());
    assert!(app.env.redis_snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_writes_beyond_the_limit_get_503_until_one_finishes() {
    let app = spawn_app_with(|s| s.limits.max_concurrent_chunk_writes = 1).await;
    let id = new_id();
    let source = Source::random(2000, 1000, 16);

    // A slow client holds the only write slot.
    let head = raw_chunk_head(&id, 0, 2, 0, 1000, 2000);
    let mut slow = start_slow_chunk(&app, &head, &source.chunk(0).1[..500]).await;

    let response = app.chunk_request(&id, &source, 1).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "too_busy");

    slow.send(&source.chunk(0).1[500..]).await;
    let (status, text) = slow.read_response(Duration::from_secs(20)).await;
    assert_eq!(status, 200, "{text}");
    let (code, body) = app.put_chunk(&id, &source, 1).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["upload_complete"], true);
    assert_eq!(reassemble_counted(&app.env, &id), source.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_share_of_the_write_slots_gets_503_while_another_tenant_writes() {
    let keys = [
        ("acme", "sk_test_share_acme_0123456789"),
        ("globex", "sk_test_share_globex_0123456789"),
    ];
    let app = spawn_app_with(|s| {
        s.limits.max_concurrent_chunk_writes = 4;
        s.limits.max_chunk_writes_per_tenant = Some(1);
        s.auth.keys = keys
            .iter()
            .map(|(tenant, key)| stitch_common::config::ApiKeyEntry {
                id: format!("{tenant}-key"),
                tenant: (*tenant).into(),
                sha256: stitch_common::auth::key_sha256(key),
                scopes: None,
            })
            .collect();
    })
    .await;
    let source = Source::random(2000, 1000, 18);
    let id = new_id();

    // acme's slow chunk holds its one slot (three of the process's four are free).
    let head = raw_chunk_head(&id, 0, 2, 0, 1000, 2000).replace(
        "Host: test\r\n",
        &format!("Host: test\r\nAuthorization: Bearer {}\r\n", keys[0].1),
    );
    let mut slow = start_slow_chunk(&app, &head, &source.chunk(0).1[..500]).await;

    let send = |key: &str, id: &str, index: u64| {
        let (start, bytes) = source.chunk(index);
        http_client_with_key(key)
            .put(app.url("/upload/chunk"))
            .header("X-File-ID", id)
            .header("X-Chunk-Index", index.to_string())
            .header("X-Total-Chunks", "2")
            .header(
                "Content-Range",
                format!("bytes {start}-{}/2000", start + bytes.len() as u64 - 1),
            )
            .body(bytes.to_vec())
            .send()
    };
    let refused = send(keys[0].1, &id, 1).await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error_code(&body), "too_busy");
    let other = send(keys[1].1, &new_id(), 0).await.unwrap();
    assert_eq!(other.status(), 200, "another tenant still writes");

    slow.send(&source.chunk(0).1[500..]).await;
    let (status, text) = slow.read_response(Duration::from_secs(20)).await;
    assert_eq!(status, 200, "{text}");
    let done = send(keys[0].1, &id, 1).await.unwrap();
    assert_eq!(
        done.status(),
        200,
        "the slot is back once the slow chunk ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tiny_body_budget_slows_concurrent_chunks_but_never_stalls_them() {
    let app = spawn_app_with(|s| {
        s.limits.max_buffered_body_bytes = stitch_common::config::ByteSize(64 << 10);
        s.storage.fsync = false;
    })
    .await;
    let id = new_id();
    let source = Source::random(16 * (1 << 20), 1 << 20, 17);
    let sends = (0..16).map(|i| app.put_chunk(&id, &source, i));
    let results = futures_util::future::join_all(sends).await;
    for (code, body) in &results {
        assert_eq!(*code, 200, "{body}");
    }
    assert_eq!(
        results
            .iter()
            .filter(|(_, b)| b["upload_complete"] == true)
            .count(),
        1
    );
    assert_eq!(reassemble_counted(&app.env, &id), source.bytes);
}

/// The HTTP/2 connection preface, then an empty SETTINGS frame.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// A HEADERS frame on stream 1 that never ends its header block (no END_HEADERS flag): one
/// HPACK byte, `:method: GET`; the rest should follow in CONTINUATION frames.
const H2_UNFINISHED_HEADERS: &[u8] = b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stall_before_their_first_request_are_closed_whatever_the_protocol() {
    let app = spawn_app_with(|s| s.http.header_read_timeout = secs(1)).await;
    let stalls: [(&str, Vec<u8>); 3] = [
        ("sends nothing", Vec::new()),
        (
            "sends only the HTTP/2 preface",
            H2_PREFACE_AND_SETTINGS.to_vec(),
        ),
        (
            "leaves its first HTTP/2 header block unfinished",
            [H2_PREFACE_AND_SETTINGS, H2_UNFINISHED_HEADERS].concat(),
        ),
    ];
    let opened = tokio::time::Instant::now();
    let mut stalled = Vec::new();
    for (what, bytes) in stalls {
        let mut conn = RawConnection::open(app.addr).await;
        conn.send(&bytes).await;
        stalled.push((what, conn));
    }
    // Not refused outright: it is the timeout that closes them.
    for (what, conn) in &mut stalled {
        let (_, closed) = conn.read_until_close(Duration::from_millis(300)).await;
        assert!(!closed, "a connection that {what} was closed at once");
    }

    // Meanwhile an h2c client (prior knowledge) is served, and again after the timeout on
    // the connection it keeps.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..2 {
        let response = h2.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    // Well within HTTP/2's keep-alive ping and its timeout (20 s each), which close some of
    // these anyway, later.
    let limit = opened + Duration::from_secs(15);
    for (what, mut conn) in stalled {
        let left = limit.saturating_duration_since(tokio::time::Instant::now());
        let (_, closed) = conn.read_until_close(left).await;
        assert!(closed, "the server kept open a connection that {what}");
    }
}
