//! The `stitch` command end to end: `stitch serve` as a real process, the client as a real
//! process, both killed at awkward moments.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
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
    client_at(server.addr, args)
}

fn client_at(addr: SocketAddr, args: &[&str]) -> Command {
    let mut cmd = Command::new(STITCH);
    cmd.args(args)
        .arg("--server")
        .arg(format!("http://{addr}"))
        .env_remove("STITCH_SERVER")
        .env_remove("STITCH_KEY");
    cmd
}

/// Exit code, stdout and stderr.
fn run_text(mut cmd: Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Exit code, stdout as JSON (null if it is not) and stderr.
fn run(cmd: Command) -> (i32, serde_json::Value, String) {
    let (code, stdout, stderr) = run_text(cmd);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (code, json, stderr)
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

/// Waits until the server has no chunk body being written (`stitch_chunk_writes_in_flight`
/// at 0 on its `/metrics`).
async fn wait_until_no_chunk_is_written(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let scrape = stitch_testkit::prometheus::scrape(addr).await;
        assert!(
            scrape.has("stitch_chunk_writes_in_flight", &[]),
            "no stitch_chunk_writes_in_flight on /metrics"
        );
        if scrape.value("stitch_chunk_writes_in_flight", &[]) == 0.0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a chunk write never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    // A chunk the killed client had sent whole is still counted after the kill (the server
    // keeps what it received): wait until the server writes none.
    wait_until_no_chunk_is_written(server.addr).await;
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
    // One chunk (`--parallel 1`) whose request the server had not begun when it was asked
    // can still land after that wait.
    let missing = plan["chunks_missing"].as_u64().unwrap();
    assert!(
        missing == 1200 - have || missing + 1 == 1200 - have,
        "{missing} chunks missing after {have} were counted"
    );

    let (code, result, stderr) = run(upload(&[]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(result["state"], "completed");
    let sent = result["chunks_sent"].as_u64().unwrap();
    let skipped = result["chunks_skipped"].as_u64().unwrap();
    assert_eq!(sent + skipped, 1200);
    assert!(
        skipped >= have && sent <= missing,
        "only the missing chunks were sent: {sent} sent, {skipped} skipped, {missing} were missing"
    );
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
    // The merge uses small blocks so that the kill below finds it in progress, and does the
    // whole file (no early assembly, which would leave it only the last chunk).
    let slow_merge = [
        ("STITCH__MERGE__BUFFER_BYTES", "4KiB"),
        ("STITCH__MERGE__INCREMENTAL", "false"),
    ];

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

/// `stitch keys new ... --json`, parsed.
fn new_key(args: &[&str]) -> serde_json::Value {
    let (code, issued, stderr) = run({
        let mut c = Command::new(STITCH);
        c.args(["keys", "new", "--json"]).args(args);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    issued
}

fn key_of(issued: &serde_json::Value) -> String {
    issued["key"].as_str().unwrap().to_owned()
}

/// Fails the test if `secret` appears in any of `outputs`.
fn assert_not_shown(secret: &str, outputs: &[&str]) {
    for output in outputs {
        assert!(!output.contains(secret), "the key was shown:\n{output}");
    }
}

#[test]
fn keys_new_prints_a_key_once_and_tables_a_server_accepts() {
    let issued = new_key(&["--tenant", "acme", "--scopes", "upload,read"]);
    let key = key_of(&issued);
    assert!(key.starts_with("sk_"), "{issued}");
    assert_eq!(issued["sha256"], stitch_common::auth::key_sha256(&key));
    assert_eq!(issued["scopes"], serde_json::json!(["upload", "read"]));
    for table in ["auth_keys_table", "keys_file_table"] {
        let text = issued[table].as_str().unwrap();
        assert!(!text.contains(&key), "{table} holds the key itself");
    }
    assert!(
        issued["keys_file_table"]
            .as_str()
            .unwrap()
            .starts_with("[[keys]]\n")
    );
    // The human form shows the key and both tables.
    let (code, text, stderr) = run_text({
        let mut c = Command::new(STITCH);
        c.args(["keys", "new", "--tenant", "acme", "--id", "ci"]);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("[[auth.keys]]\nid = \"ci\""), "{text}");
    assert!(text.contains("[[keys]]\nid = \"ci\""), "{text}");
    assert!(text.contains("    sk_"), "{text}");

    // A server configured with the printed table takes the key, for this tenant only.
    let reader = new_key(&["--tenant", "acme", "--id", "reader", "--scopes", "read"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stitch.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n{}",
            issued["auth_keys_table"].as_str().unwrap(),
            reader["auth_keys_table"].as_str().unwrap()
        ),
    )
    .unwrap();
    let env = TestEnv::local();
    let config = config.display().to_string();
    let server = serve(&env, &[("STITCH_CONFIG", config.as_str())]);
    let work = tempfile::tempdir().unwrap();
    let source = Source::random(300_000, 100_000, 41);
    let file = write_source(work.path(), "keyed.bin", &source);
    let upload = |key: Option<&str>| {
        let mut c = client(&server, &["upload"]);
        c.arg(&file)
            .args(["--chunk-size", "100000", "--json", "-q"]);
        if let Some(key) = key {
            c.args(["--key", key]);
        }
        c
    };

    let (code, stdout, stderr) = run_text(upload(None));
    assert_eq!(code, 3, "no key: refused by the server\n{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        stderr.contains("an API key or token is required"),
        "{stderr}"
    );
    assert!(stderr.contains("--key or STITCH_KEY"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    let (code, stdout, stderr) = run_text(upload(Some("sk_not_a_key_of_this_server")));
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("the API key is not valid"), "{stderr}");
    assert_not_shown("sk_not_a_key_of_this_server", &[&stdout, &stderr]);

    let reader_key = key_of(&reader);
    let (code, stdout, stderr) = run_text(upload(Some(&reader_key)));
    assert_eq!(code, 3, "a read-only key cannot upload\n{stderr}");
    assert!(stderr.contains("403"), "{stderr}");
    assert!(stderr.contains("`upload` scope"), "{stderr}");
    assert_not_shown(&reader_key, &[&stdout, &stderr]);

    let (code, stdout, stderr) = run_text(upload(Some(&key)));
    assert_eq!(code, 0, "{stderr}");
    assert_not_shown(&key, &[&stdout, &stderr]);
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["state"], "completed");
    let id = result["upload_id"].as_str().unwrap().to_owned();

    // STITCH_KEY does what --key does, for status and download too; the reader reads.
    let (code, stdout, stderr) = run_text({
        let mut c = client(&server, &["status", &id, "--json"]);
        c.env("STITCH_KEY", &key);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_not_shown(&key, &[&stdout, &stderr]);
    let out = work.path().join("back.bin");
    let (code, stdout, stderr) = run_text({
        let mut c = client(&server, &["download", &id]);
        c.arg(&out).arg("-q").env("STITCH_KEY", &reader_key);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_not_shown(&reader_key, &[&stdout, &stderr]);
    assert_eq!(std::fs::read(&out).unwrap(), source.bytes);
    let (code, _, stderr) = run_text(client(&server, &["status", &id]));
    assert_eq!(code, 3, "status without a key is refused\n{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    // No log line of the server holds a key.
    assert_not_shown(&key, &[&server.log_tail()]);
    assert_not_shown(&reader_key, &[&server.log_tail()]);
}

#[test]
fn keys_new_refuses_a_bad_tenant_scope_or_id_as_a_usage_error() {
    for (args, says) in [
        (&["--tenant", "ac/me"][..], "--tenant \"ac/me\""),
        (&["--tenant", ""][..], "--tenant \"\""),
        (
            &["--tenant", "acme", "--scopes", "read,root"][..],
            "unknown scope \"root\"",
        ),
        (
            &["--tenant", "acme", "--id", &"x".repeat(65)][..],
            "1-64 printable",
        ),
    ] {
        let (code, stdout, stderr) = run_text({
            let mut c = Command::new(STITCH);
            c.args(["keys", "new"]).args(args);
            c
        });
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            !stdout.contains("sk_"),
            "{args:?}: a key was printed: {stdout}"
        );
    }
}

#[test]
fn a_key_appended_to_the_keys_file_works_on_the_running_server_without_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let append = |tenant: &str, id: &str| {
        let path = keys_file.display().to_string();
        let issued = new_key(&["--tenant", tenant, "--id", id, "--append", &path]);
        assert_eq!(issued["appended_to"], path.as_str());
        key_of(&issued)
    };
    let acme = append("acme", "acme-1");
    let mode = std::fs::metadata(&keys_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a new keys file is the owner's only");

    let env = TestEnv::local();
    let path = keys_file.display().to_string();
    let server = serve(&env, &[("STITCH__AUTH__KEYS_FILE", path.as_str())]);
    let work = tempfile::tempdir().unwrap();
    let file = write_source(work.path(), "a.bin", &Source::random(5000, 5000, 42));
    let upload = |key: &str, id: &str| {
        let mut c = client(&server, &["upload"]);
        c.arg(&file)
            .args(["--json", "-q", "--id", id])
            .env("STITCH_KEY", key);
        c
    };
    let (code, _, stderr) = run(upload(&acme, "acme-only"));
    assert_eq!(code, 0, "{stderr}");

    let globex = append("globex", "globex-1");
    let text = std::fs::read_to_string(&keys_file).unwrap();
    assert!(text.contains("id = \"acme-1\"") && text.contains("id = \"globex-1\""));
    // The server looks at the file again within a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, stderr) = run(upload(&globex, "globex-only"));
        if code == 0 {
            break;
        }
        assert_eq!(code, 3, "{stderr}");
        assert!(
            std::time::Instant::now() < deadline,
            "never accepted: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Upload ids are the tenant's: globex cannot see acme's.
    let (code, _, stderr) = run({
        let mut c = client(&server, &["status", "acme-only"]);
        c.env("STITCH_KEY", &globex);
        c
    });
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("no upload"), "{stderr}");

    // Appending an id the file already has changes nothing.
    let (code, _, stderr) = run_text({
        let mut c = Command::new(STITCH);
        c.args([
            "keys", "new", "--tenant", "acme", "--id", "acme-1", "--append", &path,
        ]);
        c
    });
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("already has a key with id \"acme-1\""),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&keys_file).unwrap(), text);
}

#[test]
fn serve_on_loopback_with_no_key_serves_this_machine_s_clients_without_one() {
    let env = TestEnv::local();
    let server = serve(&env, &[]);
    let work = tempfile::tempdir().unwrap();
    let source = Source::random(10_000, 10_000, 43);
    let file = write_source(work.path(), "local.bin", &source);
    let (code, result, stderr) = run({
        let mut c = client(&server, &["upload"]);
        c.arg(&file).args(["--json", "-q"]);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(result["state"], "completed");
    assert!(
        !env.storage_root.join("keys.toml").exists(),
        "a loopback server made a key"
    );
    assert!(
        server.log_tail().contains("protected mode"),
        "{}",
        server.log_tail()
    );
}

/// The key `stitch serve` printed at its first start, once it has.
fn printed_key(server: &ServiceProcess) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tail = server.log_tail();
        let found = tail
            .lines()
            .filter(|line| line.starts_with("    sk_"))
            .map(|line| line.trim().to_owned())
            .next();
        if let Some(key) = found {
            return key;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no key printed:\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_on_a_non_loopback_address_makes_a_key_at_first_start_and_requires_it() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::local();
    let everywhere = [("STITCH__HTTP__BIND", "0.0.0.0:0")];
    let mut server = serve(&env, &everywhere);
    assert!(server.addr.ip().is_unspecified(), "{}", server.addr);
    // Connected through 127.0.0.1: a loopback peer, which protected mode would let in.
    let mut local = server.addr;
    local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    let key = printed_key(&server);
    let tail = server.log_tail();
    assert!(
        tail.contains(&format!(
            "STITCH_KEY={key} stitch upload FILE --server http://"
        )),
        "{tail}"
    );
    for line in tail.lines().filter(|l| l.starts_with('{')) {
        assert!(!line.contains(&key), "a log line holds the key: {line}");
    }
    let keys_file = env.storage_root.join("keys.toml");
    let stored = std::fs::read_to_string(&keys_file).unwrap();
    assert!(!stored.contains(&key), "{stored}");
    assert!(
        stored.contains(&stitch_common::auth::key_sha256(&key)),
        "{stored}"
    );
    let mode = std::fs::metadata(&keys_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let work = tempfile::tempdir().unwrap();
    let source = Source::random(50_000, 50_000, 44);
    let file = write_source(work.path(), "remote.bin", &source);
    let (code, _, stderr) = run_text({
        let mut c = client_at(local, &["upload"]);
        c.arg(&file).arg("-q");
        c
    });
    assert_eq!(code, 3, "a request without the key is refused\n{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    let (code, result, stderr) = run({
        let mut c = client_at(local, &["upload"]);
        c.arg(&file).args(["--json", "-q"]).env("STITCH_KEY", &key);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(result["state"], "completed");
    let id = result["upload_id"].as_str().unwrap().to_owned();

    // A later start uses the same file, says where it is, and shows no key.
    server.kill();
    let server = serve(&env, &everywhere);
    let mut local_again = server.addr;
    local_again.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.log_tail().contains(&keys_file.display().to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the keys file is not named:\n{}",
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!server.log_tail().contains("sk_"), "{}", server.log_tail());
    assert_eq!(std::fs::read_to_string(&keys_file).unwrap(), stored);
    let (code, status, stderr) = run({
        let mut c = client_at(local_again, &["status", &id, "--json"]);
        c.env("STITCH_KEY", &key);
        c
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status["state"], "completed");
    let (code, _, stderr) = run_text(client_at(local_again, &["status", &id]));
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
}

#[test]
fn link_new_prints_a_page_url_whose_token_is_a_link_for_the_tenant() {
    const SECRET: &str = "the token secret of the link test, 0123456789";
    let out = Command::new(STITCH)
        .args([
            "link",
            "new",
            "--tenant",
            "acme",
            "--ttl",
            "2h",
            "--max-bytes",
            "5GiB",
        ])
        .env("STITCH__AUTH__TOKEN_SECRET", SECRET)
        .env("STITCH__HTTP__PUBLIC_URL", "https://up.example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap();
    let token = url
        .trim()
        .strip_prefix("https://up.example.com/#token=")
        .unwrap_or_else(|| panic!("{url}"));
    let signer =
        stitch_common::auth::TokenSigner::new(&stitch_common::config::Secret::new(SECRET), &[]);
    let claims = signer
        .verify(token, stitch_common::now_ms() / 1000)
        .unwrap();
    assert!(claims.link);
    assert_eq!(claims.tenant.as_str(), "acme");
    assert_eq!(claims.max_bytes, Some(5 << 30));
    assert!(claims.upload.starts_with("link_"));
    // Without a token secret there is no link.
    let refused = Command::new(STITCH)
        .args(["link", "new", "--tenant", "acme"])
        .env_remove("STITCH__AUTH__TOKEN_SECRET")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
}
