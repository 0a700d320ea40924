//! tus uploads under faults, with the real processes: an API killed in the middle of a
//! PATCH body keeps every segment it made durable, and the client resumes from `HEAD`'s
//! offset to the right file; an upload whose Redis state was lost is rebuilt from its
//! segments on storage.

use std::time::Duration;

use stitch_testkit::tus::{Tus, id_of};
use tokio::io::AsyncWriteExt;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// An API that makes a PATCH durable every MiB and gives a dead request's lease back soon.
fn api_with_small_segments(env: &TestEnv) -> ServiceProcess {
    let mut cmd = api_command(env);
    cmd.env("STITCH__TUS__SEGMENT_SIZE", "1MiB")
        .env("STITCH__TUS__APPEND_LEASE", "2s");
    ServiceProcess::start(cmd, "stitch-api listening")
}

/// PATCHes `bytes` at `offset`, again while another request's lease lapses (423).
async fn patch_when_free(t: &Tus, url: &str, offset: u64, bytes: &[u8]) {
    let answer = t
        .patch_when_free(url, offset, bytes, 40, Duration::from_millis(250))
        .await;
    assert_eq!(answer.status, 204, "PATCH at {offset}: {answer:?}");
}

async fn assert_merged(client: &ApiClient, id: &str, bytes: &[u8]) {
    let status = client.wait_for_state(id, "completed", 2 * MINUTE).await;
    assert_eq!(status["md5"], md5_hex(bytes), "{status}");
    assert!(
        client.download(id).await == bytes,
        "the downloaded bytes differ from the source"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patch_killed_mid_body_resumes_from_heads_offset_and_merges_the_right_bytes() {
    let env = TestEnv::new();
    let _worker = start_worker(&env);
    let mut api = api_with_small_segments(&env);
    let bytes = Source::random(8 * MIB, 8 * MIB as u64, 71).bytes;
    let t = Tus::new(http_client(), &format!("http://{}", api.addr));
    let id = id_of(&t.create(bytes.len() as u64, None).await.location()).to_owned();

    // One PATCH of the whole file, of which 5.5 MiB arrive before the API is killed.
    let mut socket = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    let head = format!(
        "PATCH /files/{id} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
        api.addr,
        bytes.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&bytes[..11 * MIB / 2]).await.unwrap();
    let url = format!("http://{}/files/{id}", api.addr);
    until(MINUTE, "five segments counted", async || {
        t.head(&url).await.offset() == Some(5 * MIB as u64)
    })
    .await;
    api.kill();
    drop(socket);

    let api = api_with_small_segments(&env);
    let t = Tus::new(http_client(), &format!("http://{}", api.addr));
    let url = format!("http://{}/files/{id}", api.addr);
    let offset = t.head(&url).await.offset().unwrap();
    assert_eq!(
        offset,
        5 * MIB as u64,
        "every durable segment kept, the one being written lost"
    );
    patch_when_free(&t, &url, offset, &bytes[offset as usize..]).await;
    assert_merged(&ApiClient::new(api.addr), &id, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tus_upload_whose_redis_state_was_lost_resumes_from_its_segments() {
    let env = TestEnv::new();
    let _worker = start_worker(&env);
    let api = api_with_small_segments(&env);
    let bytes = Source::random(6 * MIB, 6 * MIB as u64, 72).bytes;
    let t = Tus::new(http_client(), &format!("http://{}", api.addr));
    let url = t.create(bytes.len() as u64, None).await.location();
    let id = id_of(&url).to_owned();
    patch_when_free(&t, &url, 0, &bytes[..MIB + 1000]).await;
    patch_when_free(&t, &url, (MIB + 1000) as u64, &bytes[MIB + 1000..3 * MIB]).await;

    env.lose_redis_keys();
    let head = t.head(&url).await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(
        head.offset(),
        Some(3 * MIB as u64),
        "rebuilt from the segments"
    );
    patch_when_free(&t, &url, 3 * MIB as u64, &bytes[3 * MIB..]).await;
    assert_merged(&ApiClient::new(api.addr), &id, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_uploads_sent_to_two_apis_concatenate_into_the_right_file() {
    let env = TestEnv::new();
    let _worker = start_worker(&env);
    let (a, b) = (start_api(&env), start_api(&env));
    let bytes = Source::random(5 * MIB + 123, MIB as u64, 73).bytes;
    let (ta, tb) = (
        Tus::new(http_client(), &format!("http://{}", a.addr)),
        Tus::new(http_client(), &format!("http://{}", b.addr)),
    );
    let mut parts = Vec::new();
    for (i, piece) in bytes.chunks(2 * MIB).enumerate() {
        let t = if i % 2 == 0 { &ta } else { &tb };
        let created = t
            .send(
                t.request(reqwest::Method::POST, &format!("{}/files/", t.base))
                    .header("Upload-Length", piece.len().to_string())
                    .header("Upload-Concat", "partial"),
            )
            .await;
        let url = created.location();
        patch_when_free(t, &url, 0, piece).await;
        parts.push(url);
    }
    let whole = tb
        .send(
            tb.request(reqwest::Method::POST, &format!("{}/files/", tb.base))
                .header("Upload-Concat", format!("final;{}", parts.join(" "))),
        )
        .await;
    assert_eq!(whole.status, 201, "{whole:?}");
    let id = id_of(&whole.location()).to_owned();
    let client = ApiClient::new(a.addr);
    assert_merged(&client, &id, &bytes).await;
    // Partial uploads are not assembled early: the concatenation reads their segments, and
    // removes their directories while such a step could still be writing into them.
    for api in [&a, &b] {
        for result in ["ok", "error"] {
            let steps = series(stitch_common::metrics::ASSEMBLY_STEPS, "result", result);
            assert_eq!(counter(api, &steps).await, 0.0, "{steps}");
        }
    }
    // The partial uploads were used up: gone, their files too.
    for part in &parts {
        let (code, _) = client.status(id_of(part)).await;
        assert!(code == 404 || code == 200, "{code}");
        let dir = upload_dir(&env, id_of(part));
        assert!(!dir.exists(), "{} is still on storage", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concatenation_whose_redis_state_was_lost_merges_from_storage() {
    let env = TestEnv::new();
    let api = start_api(&env);
    let bytes = Source::random(3 * MIB, MIB as u64, 74).bytes;
    let t = Tus::new(http_client(), &format!("http://{}", api.addr));
    let mut parts = Vec::new();
    for piece in bytes.chunks(MIB + 17) {
        let url = t
            .send(
                t.request(reqwest::Method::POST, &format!("{}/files/", t.base))
                    .header("Upload-Length", piece.len().to_string())
                    .header("Upload-Concat", "partial"),
            )
            .await
            .location();
        patch_when_free(&t, &url, 0, piece).await;
        parts.push(url);
    }
    let whole = t
        .send(
            t.request(reqwest::Method::POST, &format!("{}/files/", t.base))
                .header("Upload-Concat", format!("final;{}", parts.join(" "))),
        )
        .await;
    assert_eq!(whole.status, 201, "{whole:?}");
    // Redis forgets the concatenation and its parts before any worker ran its merge job.
    env.lose_redis_keys();
    env.migrate().unwrap();
    let _worker = start_worker(&env);
    assert_merged(&ApiClient::new(api.addr), id_of(&whole.location()), &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tus_upload_is_announced_and_downloadable_like_any_other() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    let api = start_api(&env);
    let bytes = Source::random(MIB + 5, MIB as u64, 75).bytes;
    let t = Tus::new(http_client(), &format!("http://{}", api.addr));
    let url = t
        .create(bytes.len() as u64, Some("filename ZGF0YS5iaW4="))
        .await
        .location();
    patch_when_free(&t, &url, 0, &bytes).await;
    let id = id_of(&url);
    let created = tap.wait_for(id, "upload.created", MINUTE).await;
    assert_eq!(created["upload"]["tenant"], "default", "{created}");
    let completed = tap.wait_for(id, "upload.completed", MINUTE).await;
    assert_eq!(
        completed["upload"]["size"],
        bytes.len() as u64,
        "{completed}"
    );
    assert_eq!(completed["upload"]["md5"], md5_hex(&bytes), "{completed}");
    assert_eq!(distinct_event_ids(&tap, id, "upload.completed").len(), 1);
    let client = ApiClient::new(api.addr);
    let (_, status) = client.status(id).await;
    assert_eq!(status["protocol"], "tus");
    assert_eq!(status["filename"], "data.bin");
    assert!(client.download(id).await == bytes);
}
