//! The real `stitch-api` binary: killed mid-chunk, stopped with SIGTERM, misconfigured.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::helpers::*;
use stitch_testkit::process::{ServiceProcess, stitch_command};

fn api_command(env: &TestEnv) -> Command {
    stitch_command(std::path::Path::new(env!("CARGO_BIN_EXE_stitch-api")), env)
}

fn start_api(env: &TestEnv) -> ServiceProcess {
    ServiceProcess::start(api_command(env), "stitch-api listening")
}

fn client() -> reqwest::Client {
    stitch_testkit::http_client()
}

async fn status_of(addr: SocketAddr, id: &str) -> (u16, serde_json::Value) {
    json_response(
        client()
            .get(format!("http://{addr}/upload/{id}/status"))
            .send()
            .await,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_killed_while_a_chunk_streams_in_never_counts_that_chunk() {
    let env = TestEnv::new();
    let id = new_id();
    let source = Source::random(8 << 20, 4 << 20, 17);
    let mut api = start_api(&env);

    // Chunk 0 arrives whole; chunk 1 is half sent when the process dies.
    let mut whole = RawConnection::open(api.addr).await;
    whole
        .send(raw_chunk_head(&id, 0, 2, 0, 4 << 20, 8 << 20).as_bytes())
        .await;
    whole.send(source.chunk(0).1).await;
    let (status, text) = whole.read_response(Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{text}");

    let mut partial = RawConnection::open(api.addr).await;
    partial
        .send(raw_chunk_head(&id, 1, 2, 4 << 20, 4 << 20, 8 << 20).as_bytes())
        .await;
    partial.send(&source.chunk(1).1[..2 << 20]).await;
    let env2 = env.clone();
    eventually(
        Duration::from_secs(30),
        "the partial chunk on disk",
        move || {
            env2.storage_snapshot()
                .iter()
                .any(|(k, &len)| k.ends_with(".part") && len > 0)
        },
    )
    .await;
    api.signal("KILL");
    api.wait_exit(Duration::from_secs(30));

    // Nothing counts chunk 1: not Redis, and no file under a final name.
    let restarted = start_api(&env);
    let (code, status) = status_of(restarted.addr, &id).await;
    assert_eq!(code, 200);
    assert_eq!(status["uploaded_chunks"], serde_json::json!([0]));
    assert_eq!(status["state"], "receiving");
    let finals: Vec<String> = chunk_files(&env, &id)
        .into_iter()
        .filter(|n| !n.ends_with(".part"))
        .collect();
    assert_eq!(
        finals.len(),
        1,
        "only chunk 0 has a complete copy: {finals:?}"
    );
    assert!(finals[0].starts_with("0."));

    // The client resumes: chunk 1 again, whole, completes the upload.
    let mut resend = RawConnection::open(restarted.addr).await;
    resend
        .send(raw_chunk_head(&id, 1, 2, 4 << 20, 4 << 20, 8 << 20).as_bytes())
        .await;
    resend.send(source.chunk(1).1).await;
    let (status, text) = resend.read_response(Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"upload_complete\":true"), "{text}");
    assert_eq!(reassemble_counted(&env, &id), source.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_chunk_finish_then_exits_cleanly() {
    let env = TestEnv::new();
    let id = new_id();
    let source = Source::random(2 << 20, 1 << 20, 18);
    let mut api = start_api(&env);
    let addr = api.addr;
    let mut conn = RawConnection::open(addr).await;
    conn.send(raw_chunk_head(&id, 0, 2, 0, 1 << 20, 2 << 20).as_bytes())
        .await;
    conn.send(&source.chunk(0).1[..1000]).await;
    let env2: Arc<TestEnv> = env.clone();
    eventually(Duration::from_secs(30), "the chunk to start", move || {
        env2.storage_snapshot().keys().any(|k| k.ends_with(".part"))
    })
    .await;

    api.signal("TERM");
    // New connections are refused once the listener is closed...
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    // ...while the request in flight completes.
    conn.send(&source.chunk(0).1[1000..]).await;
    let (status, text) = conn.read_response(Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{text}");
    drop(conn);
    let exit = api.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}");
    assert_eq!(reassemble_counted(&env, &id), source.chunk(0).1);
}

#[test]
fn invalid_configuration_stops_the_binary_with_a_message_naming_the_key() {
    let env = TestEnv::new();
    for (key, value, expected) in [
        (
            "STITCH__LIMITS__MAX_CHUNKS",
            "0",
            "STITCH__LIMITS__MAX_CHUNKS",
        ),
        ("STITCH__LIMITS__MAX_CHUNK_BYTES", "lots", "max_chunk_bytes"),
        ("STITCH__LIMITS__MAX_CHUNK_BYTE", "5", "max_chunk_byte"),
        ("STITCH__HTTP__BIND", "nowhere", "bind"),
        ("STITCH__NAMESPACE", "a:b", "STITCH__NAMESPACE"),
        ("STITCH__LOG__FORMAT", "xml", "format"),
    ] {
        let output = api_command(&env)
            .env(key, value)
            .output()
            .expect("running stitch-api");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key}={value}: {stderr}");
        assert!(stderr.contains(expected), "{key}={value}: {stderr}");
    }
}

#[tokio::test]
async fn environment_variables_override_the_configuration_file() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stitch.toml");
    std::fs::write(
        &file,
        "[limits]\nmax_chunks = 5\nmax_chunk_bytes = \"1KiB\"\n",
    )
    .unwrap();
    let mut cmd = api_command(&env);
    cmd.env("STITCH_CONFIG", &file)
        .env("STITCH__LIMITS__MAX_CHUNKS", "7");
    let api = ServiceProcess::start(cmd, "stitch-api listening");
    let source = Source::random(8 * 100, 100, 19);
    // 8 chunks: above the environment's 7.
    let url = format!("http://{}/upload/chunk", api.addr);
    let send = |total: u64| {
        let (start, bytes) = source.chunk(0);
        client()
            .put(&url)
            .header("X-File-ID", new_id())
            .header("X-Chunk-Index", "0")
            .header("X-Total-Chunks", total.to_string())
            .header("Content-Range", format!("bytes {start}-99/{}", total * 100))
            .body(bytes.to_vec())
            .send()
    };
    let (code, body) = json_response(send(8).await).await;
    assert_eq!(
        (code, error_code(&body)),
        (400, "too_many_chunks"),
        "{body}"
    );
    let (code, body) = json_response(send(7).await).await;
    assert_eq!(code, 200, "the file's 5 was overridden: {body}");
}
