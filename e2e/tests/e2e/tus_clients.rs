//! Off-the-shelf tus clients against the real programs: tus-js-client (npm, under Node.js)
//! and tuspy (PyPI) create, upload, stop, resume and concatenate through `/files/` as their
//! users' programs would, and what they sent comes back from `GET /files/{id}` byte for byte,
//! with the MD5 the merge computed in the status.
//!
//! The clients run as processes of their own, driven by the scripts of `e2e/clients/`, which
//! print one JSON line at the end (what the client reported, and the requests it made).
//! `cargo xtask test` installs them: the npm packages where `STITCH_TEST_NODE_MODULES` says,
//! tuspy into the venv it puts first on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use stitch_common::auth::key_sha256;

use crate::harness::*;

const MIB: usize = 1024 * 1024;
/// How long one client run may take (the largest file here is 12 MiB, over loopback).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
const MERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// The third-party clients, each driven by its script in `e2e/clients/`.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// tus-js-client under Node.js (`tus_js.mjs`).
    Js,
    /// tuspy (`tuspy_upload.py`).
    Py,
}

/// What one run of a client printed: its final JSON line and the events before it.
#[derive(Debug)]
struct ClientRun {
    client: Client,
    code: Option<i32>,
    /// The final line: `ok`, `url`, `bytesUploaded`, and on failure `status` and `body`.
    result: Value,
    events: Vec<Value>,
    stderr: String,
}

impl ClientRun {
    /// The run's result, which must be a success.
    #[track_caller]
    fn expect_ok(&self) -> &Value {
        assert!(
            self.result["ok"] == true && self.code == Some(0),
            "{:?} failed (exit {:?}): {}\nstderr: {}",
            self.client,
            self.code,
            self.result,
            self.stderr
        );
        &self.result
    }

    /// The run's result, which must be a failure the client reported (not a crash).
    #[track_caller]
    fn expect_failure(&self) -> &Value {
        assert!(
            self.result["ok"] == false && self.code == Some(1),
            "{:?} was expected to fail (exit {:?}): {}\nstderr: {}",
            self.client,
            self.code,
            self.result,
            self.stderr
        );
        &self.result
    }

    /// The upload URL the client ended with.
    #[track_caller]
    fn url(&self) -> String {
        self.result["url"]
            .as_str()
            .unwrap_or_else(|| panic!("{:?} reported no upload URL: {}", self.client, self.result))
            .to_owned()
    }

    /// The requests tus-js-client made, in order (method, url, offset, status, ...).
    fn requests(&self) -> &[Value] {
        self.result["requests"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn events_named(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }
}

/// The npm packages `cargo xtask test` installed: `STITCH_TEST_NODE_MODULES`, else where
/// it installs them under the target directory (so that a plain `cargo test` after one
/// `cargo xtask test` finds them). Without either, the test fails saying so.
fn node_modules() -> PathBuf {
    if let Some(dir) = std::env::var_os("STITCH_TEST_NODE_MODULES") {
        return dir.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let installed = target.join("xtask/node/node_modules");
    assert!(
        installed.join("tus-js-client").is_dir(),
        "tus-js-client is not installed: these tests drive the real tus clients (tus-js-client \
         from npm, tuspy from PyPI), which `cargo xtask test` installs; run them with `cargo \
         xtask test -- tus_clients` (it sets STITCH_TEST_NODE_MODULES), or set \
         STITCH_TEST_NODE_MODULES to a node_modules with e2e/clients/package-lock.json installed"
    );
    installed
}

/// Runs `client` with `options` (its script's JSON) in `dir` and parses what it printed.
async fn run_client(client: Client, dir: &Path, options: Value) -> ClientRun {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    let mut cmd = match client {
        Client::Js => {
            let mut cmd = tokio::process::Command::new("node");
            cmd.arg(scripts.join("tus_js.mjs"))
                .env("STITCH_TEST_NODE_MODULES", node_modules());
            cmd
        }
        Client::Py => {
            let mut cmd = tokio::process::Command::new(stitch_testkit::sink::python());
            cmd.arg(scripts.join("tuspy_upload.py"));
            cmd
        }
    };
    cmd.arg(options.to_string())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {client:?} ({cmd:?}): {e}"));
    let output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{client:?} did not finish within {CLIENT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("waiting for {client:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let result = lines.pop().unwrap_or_else(|| {
        panic!(
            "{client:?} printed no JSON line (exit {:?}); stdout: {stdout}\nstderr: {stderr}",
            output.status
        )
    });
    // A client that could not run at all says why, e.g. that it is not installed.
    assert!(
        result["setup"] != true,
        "{client:?} could not run: {}",
        result["error"]
    );
    ClientRun {
        client,
        code: output.status.code(),
        result,
        events: lines,
        stderr,
    }
}

/// An API and a worker for one test, and a directory for its files and the clients' state.
struct Stack {
    _env: std::sync::Arc<TestEnv>,
    api: ServiceProcess,
    _worker: ServiceProcess,
    dir: tempfile::TempDir,
}

impl Stack {
    fn start() -> Self {
        let env = TestEnv::new();
        let api = start_api(&env);
        Self::with_api(env, api)
    }

    fn with_api(env: std::sync::Arc<TestEnv>, api: ServiceProcess) -> Self {
        let worker = start_worker(&env);
        Self {
            _env: env,
            api,
            _worker: worker,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The tus creation URL.
    fn endpoint(&self) -> String {
        format!("http://{}/files/", self.api.addr)
    }

    fn api_client(&self) -> ApiClient {
        ApiClient::new(self.api.addr)
    }

    /// Writes `len` random bytes (seeded) to `name` in the test's directory.
    fn file(&self, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let bytes = Source::random(len, MIB as u64, seed).bytes;
        let path = self.dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    async fn run(&self, client: Client, options: Value) -> ClientRun {
        run_client(client, self.dir.path(), options).await
    }

    /// tus-js-client sending `file` in three parallel partial uploads and their
    /// concatenation, with `metadata`; checked to have succeeded.
    async fn run_parallel(&self, file: &Path, metadata: Value) -> ClientRun {
        let run = self
            .run(
                Client::Js,
                json!({
                    "endpoint": self.endpoint(),
                    "file": path_str(file),
                    "parallelUploads": 3,
                    "metadata": metadata,
                }),
            )
            .await;
        run.expect_ok();
        run
    }

    /// `HEAD /files/{id}`: the status and the `Upload-Offset` the server answers.
    async fn head_offset(&self, url: &str, headers: &[(&str, &str)]) -> (u16, Option<u64>) {
        let mut request = http_client().head(url).header("Tus-Resumable", "1.0.0");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("a HEAD response");
        let offset = response
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        (response.status().as_u16(), offset)
    }
}

/// The upload id in an upload URL: its last path segment.
fn upload_id(url: &str) -> String {
    url.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("no upload id in {url:?}"))
        .to_owned()
}

/// Waits for the upload's merge and checks the status and the downloaded bytes.
async fn assert_completed_with(api: &ApiClient, url: &str, bytes: &[u8]) -> Value {
    let id = upload_id(url);
    let status = api.wait_for_state(&id, "completed", MERGE_TIMEOUT).await;
    assert_eq!(status["state"], "completed", "{status}");
    let md5 = md5_hex(bytes);
    assert_eq!(status["md5"], md5.as_str(), "{status}");
    assert_eq!(status["size"], bytes.len() as u64, "{status}");
    let downloaded = api.download(&id).await;
    assert_eq!(downloaded.len(), bytes.len(), "downloaded size of {url}");
    assert!(
        downloaded == bytes,
        "the bytes downloaded from {url} differ from the file (MD5 {} instead of {md5})",
        md5_hex(&downloaded)
    );
    status
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_uploads_a_file_in_one_patch_and_it_downloads_intact() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 12 * MIB, 301);
    let run = stack
        .run(
            Client::Js,
            json!({
                "endpoint": stack.endpoint(),
                "file": path_str(&file),
                "metadata": {"filename": "data.bin", "filetype": "application/octet-stream"},
            }),
        )
        .await;
    let result = run.expect_ok();
    assert_eq!(result["bytesUploaded"], bytes.len() as u64);
    let patches: Vec<&Value> = run
        .requests()
        .iter()
        .filter(|r| r["method"] == "PATCH")
        .collect();
    assert_eq!(patches.len(), 1, "one PATCH: {:?}", run.requests());
    let url = run.url();
    assert!(
        url.starts_with(&stack.endpoint()),
        "the upload URL {url} is under {}",
        stack.endpoint()
    );
    let status = assert_completed_with(&stack.api_client(), &url, &bytes).await;
    assert_eq!(status["filename"], "data.bin", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_stopped_halfway_resumes_from_the_server_offset_in_a_new_process() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 12 * MIB + 4321, 302);
    let storage = stack.dir.path().join("tus-urls.json");
    let options = |extra: Value| {
        let mut options = json!({
            "endpoint": stack.endpoint(),
            "file": path_str(&file),
            "chunkSize": MIB,
            "urlStorage": path_str(&storage),
            "metadata": {"filename": "data.bin"},
        });
        options
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        options
    };
    // Stopped between two PATCHes, once half the file is acknowledged.
    let first = stack
        .run(
            Client::Js,
            options(json!({"stopAfterBytes": 6 * MIB, "stopOn": "chunk"})),
        )
        .await;
    let stopped = first.expect_ok();
    assert_eq!(stopped["stopped"], true, "{stopped}");
    let acknowledged = stopped["bytesUploaded"].as_u64().unwrap();
    assert!(
        acknowledged >= 6 * MIB as u64 && acknowledged < bytes.len() as u64,
        "{stopped}"
    );
    let url = first.url();
    let (code, offset) = stack.head_offset(&url, &[]).await;
    assert_eq!(code, 200, "HEAD {url}");
    assert_eq!(
        offset,
        Some(acknowledged),
        "HEAD {url}: the acknowledged offset"
    );

    // A new process finds the upload in its URL storage and goes on from the server's offset.
    let second = stack
        .run(Client::Js, options(json!({"resume": true})))
        .await;
    second.expect_ok();
    let resuming = second.events_named("resuming");
    assert_eq!(resuming.len(), 1, "{:?}", second.events);
    assert_eq!(resuming[0]["url"], url.as_str());
    assert_eq!(second.url(), url);
    let requests = second.requests();
    assert_eq!(requests[0]["method"], "HEAD", "{requests:?}");
    assert_eq!(
        requests[0]["responseOffset"],
        acknowledged.to_string(),
        "{requests:?}"
    );
    let first_patch = requests
        .iter()
        .find(|r| r["method"] == "PATCH")
        .expect("a PATCH");
    assert_eq!(
        first_patch["offset"],
        acknowledged.to_string(),
        "the resumed run starts where the server is: {requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r["method"] == "POST"),
        "no new upload: {requests:?}"
    );
    assert_completed_with(&stack.api_client(), &url, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_cut_off_in_the_middle_of_a_patch_resumes_after_what_the_server_kept() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 8 * MIB, 303);
    // One PATCH for the whole file whose body stops after `cut` bytes, as when the client's
    // network goes away; the client gives up half a second later.
    let cut = 3 * MIB as u64 + 1234;
    let first = stack
        .run(
            Client::Js,
            json!({
                "endpoint": stack.endpoint(),
                "file": path_str(&file),
                "source": "stalling",
                "stallAfterBytes": cut,
                "stopDelayMs": 500,
            }),
        )
        .await;
    let stopped = first.expect_ok();
    assert_eq!(stopped["stopped"], true, "{stopped}");
    assert_eq!(stopped["bytesUploaded"], 0, "no PATCH answered: {stopped}");
    let url = first.url();
    // The broken PATCH keeps every byte that arrived, once the server has seen the
    // connection close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let head = stack.head_offset(&url, &[]).await;
        if head == (200, Some(cut)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "HEAD {url} answers {head:?}, not the {cut} bytes the broken PATCH sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // tus-js-client's own retries, as its users have them, for a server still settling.
    let second = stack
        .run(
            Client::Js,
            json!({
                "endpoint": stack.endpoint(),
                "file": path_str(&file),
                "uploadUrl": url,
                "retryDelays": [200, 500, 1000],
            }),
        )
        .await;
    second.expect_ok();
    let first_patch = second
        .requests()
        .iter()
        .find(|r| r["method"] == "PATCH")
        .cloned()
        .expect("a PATCH");
    assert_eq!(
        first_patch["offset"],
        cut.to_string(),
        "{:?}",
        second.requests()
    );
    assert_completed_with(&stack.api_client(), &url, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_parallel_uploads_are_concatenated_into_the_final_upload() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 10 * MIB + 7, 304);
    let run = stack
        .run_parallel(&file, json!({"filename": "parallel.bin"}))
        .await;
    let requests = run.requests();
    let partials = requests
        .iter()
        .filter(|r| r["method"] == "POST" && r["concat"] == "partial")
        .count();
    assert_eq!(partials, 3, "{requests:?}");
    let finals: Vec<&Value> = requests
        .iter()
        .filter(|r| {
            r["method"] == "POST"
                && r["concat"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("final;"))
        })
        .collect();
    assert_eq!(finals.len(), 1, "{requests:?}");
    let url = run.url();
    let status = assert_completed_with(&stack.api_client(), &url, &bytes).await;
    assert_eq!(status["filename"], "parallel.bin", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_parallel_uploads_of_more_than_half_the_quota_complete_and_count_once() {
    let env = TestEnv::new();
    let mut cmd = api_command(&env);
    cmd.env(
        "STITCH__AUTH__QUOTAS__MAX_STORED_BYTES",
        (16 * MIB).to_string(),
    );
    let stack = Stack::with_api(env, ServiceProcess::start(cmd, "stitch-api listening"));
    let size = 10 * MIB + 7;
    let (file, bytes) = stack.file("data.bin", size, 306);
    let run = stack.run_parallel(&file, json!({})).await;
    assert_completed_with(&stack.api_client(), &run.url(), &bytes).await;
    // Once the parts are retired the tenant keeps the file's bytes once: what is left of
    // the quota fits an upload, one byte more does not.
    let left = 16 * MIB - size;
    let create = async |len: usize| {
        http_client()
            .post(stack.endpoint())
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", len.to_string())
            .send()
            .await
            .expect("a POST response")
            .status()
            .as_u16()
    };
    until(
        Duration::from_secs(60),
        "the parts' retirement",
        async || create(left + 1).await == 429 && create(left).await == 201,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_creation_with_upload_sends_the_first_chunk_in_the_post() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 5 * MIB + 11, 305);
    let run = stack
        .run(
            Client::Js,
            json!({
                "endpoint": stack.endpoint(),
                "file": path_str(&file),
                "chunkSize": 2 * MIB,
                "uploadDataDuringCreation": true,
            }),
        )
        .await;
    run.expect_ok();
    let requests = run.requests();
    assert_eq!(requests[0]["method"], "POST", "{requests:?}");
    assert_eq!(
        requests[0]["responseOffset"],
        (2 * MIB).to_string(),
        "the POST's body counts: {requests:?}"
    );
    assert_completed_with(&stack.api_client(), &run.url(), &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_streams_with_a_deferred_length_declared_by_the_last_patch() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 3 * MIB + 5, 306);
    let run = stack
        .run(
            Client::Js,
            json!({
                "endpoint": stack.endpoint(),
                "file": path_str(&file),
                "source": "stream",
                "chunkSize": MIB,
                "uploadLengthDeferred": true,
            }),
        )
        .await;
    run.expect_ok();
    assert_completed_with(&stack.api_client(), &run.url(), &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_stopped_after_two_chunks_resumes_with_its_url_in_a_new_process() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 9 * MIB + 1234, 307);
    let options = |extra: Value| {
        let mut options = json!({
            "endpoint": stack.endpoint(),
            "file": path_str(&file),
            "chunkSize": 2 * MIB,
            "metadata": {"filename": "data.bin"},
        });
        options
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        options
    };
    let first = stack
        .run(Client::Py, options(json!({"stopAfterChunks": 2})))
        .await;
    let stopped = first.expect_ok();
    assert_eq!(stopped["stopped"], true, "{stopped}");
    assert_eq!(stopped["bytesUploaded"], 4 * MIB as u64, "{stopped}");
    let url = first.url();
    let (code, offset) = stack.head_offset(&url, &[]).await;
    assert_eq!((code, offset), (200, Some(4 * MIB as u64)), "HEAD {url}");

    let second = stack
        .run(Client::Py, options(json!({"uploadUrl": url})))
        .await;
    let done = second.expect_ok();
    assert_eq!(done["startOffset"], 4 * MIB as u64, "{done}");
    assert_eq!(done["chunks"], 3, "only the rest is sent: {done}");
    assert_eq!(done["bytesUploaded"], bytes.len() as u64, "{done}");
    assert_eq!(second.url(), url);
    assert_completed_with(&stack.api_client(), &url, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_with_sha1_checksums_on_every_patch_completes() {
    let stack = Stack::start();
    let (file, bytes) = stack.file("data.bin", 5 * MIB + 3, 308);
    let run = stack
        .run(
            Client::Py,
            json!({
                "endpoint": stack.endpoint(),
                "file": path_str(&file),
                "chunkSize": 2 * MIB,
                "uploadChecksum": true,
            }),
        )
        .await;
    run.expect_ok();
    assert_completed_with(&stack.api_client(), &run.url(), &bytes).await;
}

const KEY: &str = "sk_test_tus_clients_0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_on_the_clients_upload_with_a_bearer_key_and_report_401_without() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nid = \"tus-e2e\"\ntenant = \"acme\"\nsha256 = \"{}\"\n",
            key_sha256(KEY)
        ),
    )
    .unwrap();
    let mut api = api_command(&env);
    api.env("STITCH__AUTH__KEYS_FILE", &keys);
    let api = ServiceProcess::start(api, "stitch-api listening");
    let stack = Stack::with_api(env, api);
    let keyed = ApiClient::with_key(stack.api.addr, KEY);
    let bearer = format!("Bearer {KEY}");
    let (file, bytes) = stack.file("data.bin", 3 * MIB + 17, 309);

    for client in [Client::Js, Client::Py] {
        let without = stack
            .run(
                client,
                json!({"endpoint": stack.endpoint(), "file": path_str(&file)}),
            )
            .await;
        let failure = without.expect_failure();
        assert_eq!(
            failure["status"], 401,
            "{client:?} without a key: {failure}"
        );

        let with = stack
            .run(
                client,
                json!({
                    "endpoint": stack.endpoint(),
                    "file": path_str(&file),
                    "chunkSize": 2 * MIB,
                    "headers": {"Authorization": bearer},
                }),
            )
            .await;
        with.expect_ok();
        let url = with.url();
        // The upload is the key's tenant's: without the key it is not there to see.
        let (code, _) = stack.head_offset(&url, &[]).await;
        assert_eq!(code, 401, "HEAD {url} without a key");
        let (code, offset) = stack.head_offset(&url, &[("Authorization", &bearer)]).await;
        assert_eq!(
            (code, offset),
            (200, Some(bytes.len() as u64)),
            "HEAD {url} with the key"
        );
        assert_completed_with(&keyed, &url, &bytes).await;
    }
}
