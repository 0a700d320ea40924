//! The `stitch` command end to end: `stitch serve` as a real process, the client as a real
//! process, both killed at awkward moments.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use stitch_testkit::process::{ServiceProcess, stitch_command};
use stitch_testkit::{ApiClient, Source, TestEnv};

const STITCH: &str = env!("CARGO_BIN_EXE_stitch");

fn serve(env: &TestEnv, extra: &[(&str, &str)]) -> ServiceProcess {
    let mut cmd = stitch_command(Path::new(STITCH), env);
    cmd.arg("serve");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    ServiceProcess::start(cmd, "stitch-api listening")
}

fn client(server: &ServiceProcess, args: &[&str]) -> Command {
    let mut cmd = Command::new(STITCH);
    cmd.args(args)
        .arg("--server")
        .arg(format!("http://{}", server.addr))
        .env_remove("STITCH_SERVER");
    cmd
}

fn run(mut cmd: Command) -> (i32, serde_json::Value, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn write_source(dir: &Path, name: &str, source: &Source) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, &source.bytes).unwrap();
    path
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    stitch_common::digest::Md5::from_bytes(md5::Md5::digest(bytes).into()).to_hex()
}

#[test]
fn a_file_uploaded_and_downloaded_with_the_cli_comes_back_identical() {
    let env = TestEnv::local();
    let server = serve(&env, &[]);
    let work = tempfile::tempdir().unwrap();
    let source = Source::random(20 << 20, 1 << 20, 31);
    let file = write_source(work.path(), "report final.bin", &source);

    let (code, result, stderr) = run({
        let mut c = client(&server, &["upload"]);
        c.arg(&file)
            .args(["--chunk-size", "3MiB", "--parallel", "3", "--json"]);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(result["state"], "completed");
    assert_eq!(result["md5"], md5_hex(&source.bytes));
    assert_eq!(result["chunks_total"], 7);
    assert_eq!(result["chunks_sent"], 7);
    let id = result["upload_id"].as_str().unwrap().to_owned();

    let (code, status, stderr) = run(client(&server, &["status", &id, "--json"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status["filename"], "report final.bin");

    let out = work.path().join("copy.bin");
    let (code, saved, stderr) = run({
        let mut c = client(&server, &["download", &id]);
        c.arg(&out).arg("--json");
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(saved["md5"], md5_hex(&source.bytes));
    assert_eq!(std::fs::read(&out).unwrap(), source.bytes);

    // Running the upload again finds it done and sends nothing.
    let (code, again, _) = run({
        let mut c = client(&server, &["upload"]);
        c.arg(&file).args(["--chunk-size", "3MiB", "--json"]);
        c
    });
    assert_eq!(code, 0);
    assert_eq!(again["upload_id"], id.as_str());
    assert_eq!(again["chunks_sent"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_upload_resumes_by_sending_only_the_missing_chunks() {
    let env = TestEnv::local();
    let server = serve(&env, &[("STITCH__STORAGE__FSYNC", "false")]);
    let api = ApiClient::new(server.addr);
    let work = tempfile::tempdir().unwrap();
    let source = Source::random(1200 * 8192, 8192, 32);
    let file = write_source(work.path(), "many.bin", &source);
    let upload = |extra: &[&str]| {
        let mut c = client(&server, &["upload"]);
        c.arg(&file)
            .args(["--chunk-size", "8KiB", "--parallel", "1", "--json", "-q"])
            .args(extra);
        c
    };
    let (code, plan, stderr) = run(upload(&["--dry-run"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(plan["chunks_missing"], 1200);
    let id = plan["upload_id"].as_str().unwrap().to_owned();

    let mut first = upload(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, status) = api.status(&id).await;
        if code == 200 && status["uploaded_chunks"].as_array().unwrap().len() >= 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never got going"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let (_, status) = api.status(&id).await;
    let have = status["uploaded_chunks"].as_array().unwrap().len() as u64;
    assert!(have < 1200, "the first run finished before it was killed");
    assert_eq!(status["state"], "receiving");

    let (code, plan, _) = run(upload(&["--dry-run"]));
    assert_eq!(code, 0);
    assert_eq!(
        plan["upload_id"],
        id.as_str(),
        "the same command finds the same upload"
    );
    assert_eq!(plan["chunks_missing"], 1200 - have);

    let (code, result, stderr) = run(upload(&[]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(result["state"], "completed");
    assert_eq!(
        result["chunks_sent"],
        1200 - have,
        "only the missing chunks were sent"
    );
    assert_eq!(result["chunks_skipped"], have);
    assert_eq!(result["md5"], md5_hex(&source.bytes));
    let out = work.path().join("back.bin");
    let (code, _, stderr) = run({
        let mut c = client(&server, &["download", &id]);
        c.arg(&out).arg("-q");
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), source.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_serve_mid_upload_and_mid_merge_loses_nothing() {
    let env = TestEnv::local();
    let work = tempfile::tempdir().unwrap();
    let source = Source::random(96 << 20, 4 << 20, 33);
    let md5 = md5_hex(&source.bytes);
    let id = "restart-me";
    // The merge uses small blocks so that the kill below finds it in progress.
    let slow_merge = [("STITCH__MERGE__BUFFER_BYTES", "4KiB")];

    // Half the chunks, then the server dies.
    let mut server = serve(&env, &slow_merge);
    let api = ApiClient::new(server.addr);
    for index in 0..12 {
        let (code, body) = api.put_chunk(id, &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    server.kill();
    let server = serve(&env, &slow_merge);
    let api = ApiClient::new(server.addr);
    let (code, status) = api.status(id).await;
    assert_eq!(code, 200);
    assert_eq!(
        status["uploaded_chunks"],
        serde_json::json!((0..12).collect::<Vec<_>>())
    );

    // The rest, then the server dies again while merging.
    for index in 12..24 {
        let request = api
            .chunk_request(id, &source, index)
            .header("X-File-MD5", &md5);
        let (code, body) = stitch_testkit::json_response(request.send().await).await;
        assert_eq!(code, 200, "{body}");
    }
    let mut server = server;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let upload_dir = env.storage_root.join("uploads").join(id);
    while !std::fs::read_dir(&upload_dir)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the merge never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill();

    let server = serve(&env, &[]);
    let api = ApiClient::new(server.addr);
    let status = api
        .wait_for_state(id, "completed", Duration::from_secs(120))
        .await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert_eq!(api.download(id).await, source.bytes);
    let leftovers: Vec<String> = std::fs::read_dir(&upload_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = work;
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let env = TestEnv::local();
    let server = serve(&env, &[]);
    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let (code, _, stderr) = run({
        let mut c = client(&server, &["upload"]);
        c.arg(&empty);
        c
    });
    assert_eq!(code, 2, "an empty file is a usage error: {stderr}");
    let (code, _, stderr) = run(client(&server, &["status", "no-such-upload"]));
    assert_eq!(code, 3, "{stderr}");
    let (code, _, _) = run({
        let mut c = Command::new(STITCH);
        c.args(["status", "x", "--server", "ftp://nowhere"]);
        c
    });
    assert_eq!(code, 2);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let file = write_source(work.path(), "f", &Source::random(1000, 1000, 34));
    let (code, _, stderr) = run({
        let mut c = Command::new(STITCH);
        c.arg("upload").arg(&file).args([
            "--retries",
            "2",
            "--server",
            &format!("http://{closed}"),
        ]);
        c
    });
    assert_eq!(code, 1, "an unreachable server, after retries: {stderr}");
    assert!(stderr.contains("gave up after 2 attempts"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_the_webhook_admin_api_on_its_own_port() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8G";
    let env = TestEnv::local();
    let sink = stitch_testkit::sink::WebhookSink::start(&[SECRET], "200", &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stitch.toml");
    std::fs::write(
        &config,
        format!(
            "[[webhooks.endpoints]]\nid = \"single\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\nevents = [\"upload.completed\"]\n\
             [[auth.keys]]\nid = \"ops\"\ntenant = \"ops\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n\
             [[auth.keys]]\nid = \"app\"\ntenant = \"app\"\nsha256 = \"{}\"\n",
            sink.url("/hooks"),
            stitch_common::auth::key_sha256("single-node-admin"),
            stitch_common::auth::key_sha256("single-node-app"),
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let server = serve(&env, &[("STITCH_CONFIG", config.as_str())]);
    let api = ApiClient::with_key(server.addr, "single-node-app");
    let source = Source::random(1000, 1000, 91);
    let id = stitch_testkit::new_id();
    let (code, body) = api.put_chunk(&id, &source, 0).await;
    assert_eq!(code, 200, "{body}");
    let delivered = sink.wait_for(1, Duration::from_secs(60)).await;
    let event_id = delivered[0]["headers"]["webhook-id"]
        .as_str()
        .unwrap()
        .to_owned();

    let http = stitch_testkit::http_client();
    let url = format!("http://{}/admin/events/{event_id}", server.addr);
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    // The delivery is logged once the dispatcher has recorded the attempt.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let shown: serde_json::Value = http
            .get(&url)
            .header("authorization", "Bearer single-node-admin")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(shown["event"]["type"], "upload.completed", "{shown}");
        if shown["deliveries"][0]["outcome"] == "delivered" {
            assert_eq!(shown["deliveries"][0]["status"], 200, "{shown}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{shown}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The API's own routes are unchanged beside them.
    let (code, status) = api.status(&id).await;
    assert_eq!(code, 200);
    assert_eq!(status["state"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sends_again_the_chunks_the_server_lost_and_the_upload_completes() {
    let env = TestEnv::local();
    let server = serve(&env, &[("STITCH__STORAGE__FSYNC", "false")]);
    let api = ApiClient::new(server.addr);
    let work = tempfile::tempdir().unwrap();
    let source = Source::random(8 * 8192, 8192, 33);
    let file = write_source(work.path(), "lost.bin", &source);
    let upload = |extra: &[&str]| {
        let mut c = client(&server, &["upload"]);
        c.arg(&file)
            .args(["--chunk-size", "8KiB", "--json", "-q"])
            .args(extra);
        c
    };
    let (code, plan, stderr) = run(upload(&["--dry-run"]));
    assert_eq!(code, 0, "{stderr}");
    let id = plan["upload_id"].as_str().unwrap().to_owned();
    // Every chunk but the last, then storage loses a counted one behind Stitch's back.
    for index in 0..7 {
        let (code, body) = api.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    let chunks = env.storage_root.join("uploads").join(&id).join("chunks");
    let lost = std::fs::read_dir(&chunks)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("3."))
        .expect("chunk 3's copy");
    std::fs::remove_file(lost.path()).unwrap();

    // The same command sends the last chunk; the merge finds chunk 3 gone and asks for it
    // again; the client sends it and the upload completes.
    let (code, result, stderr) = run(upload(&[]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(result["state"], "completed", "{result}");
    assert_eq!(result["md5"], md5_hex(&source.bytes));
    let out = work.path().join("back.bin");
    let (code, _, stderr) = run({
        let mut c = client(&server, &["download", &id]);
        c.arg(&out).arg("-q");
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), source.bytes);
}
