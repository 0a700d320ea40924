//! The upload page (`api/ui/`, served at `/`) in a real browser: Debian's Chromium, driven by
//! playwright-core through `e2e/browser/upload_page.mjs`, against the real API and worker.
//! The page uploads two files, one of them cut by a page reload part-way and resumed from
//! what the server kept; what it shows (state, MD5, links) is checked against the files and
//! against `GET /files/{id}`; a file over the server's limit shows the refusal's message.
//! An upload link (`/#token=…`) uploads with its capability token alone, and a forged one is
//! refused with the page's message. Screenshots land in `target/test-artifacts/browser/`.
//!
//! Beside it, two checks of the committed assets that need no browser: the vendored
//! tus-js-client is byte for byte the one `api/ui/package-lock.json` installs, and the page
//! holds nothing that its Content-Security-Policy would block or that loads from elsewhere.
//!
//! `cargo xtask test` installs Chromium (Debian's `chromium`, as root) and the page's npm
//! packages (`STITCH_TEST_UI_NODE_MODULES`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const MIB: usize = 1024 * 1024;
/// The server's largest upload in the browser test: the refused file is larger.
const MAX_UPLOAD_BYTES: usize = 8 * MIB;
/// How long the whole browser run may take (three small files over loopback, one of them
/// slowed to 1 MiB/s until the reload).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);

/// The workspace's target directory (where `cargo xtask test` installs things).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn workspace_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The upload page's npm packages as `cargo xtask test` installed them from
/// `api/ui/package-lock.json`: `STITCH_TEST_UI_NODE_MODULES`, else their place under the
/// target directory. Without either, the test fails saying so.
fn ui_node_modules() -> PathBuf {
    let dir = std::env::var_os("STITCH_TEST_UI_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("xtask/node-ui/node_modules"));
    assert!(
        dir.join("tus-js-client").is_dir() && dir.join("playwright-core").is_dir(),
        "the upload page's npm packages (api/ui/package-lock.json: tus-js-client, \
         playwright-core) are not installed in {}: `cargo xtask test` installs them (and \
         Debian's chromium); run `cargo xtask test -- -p stitch-e2e browser`, or set \
         STITCH_TEST_UI_NODE_MODULES to a node_modules with that lock installed",
        dir.display()
    );
    dir
}

#[test]
fn the_vendored_tus_client_is_byte_for_byte_the_browser_build_the_lock_installs() {
    let installed = ui_node_modules().join("tus-js-client");
    let package: Value =
        serde_json::from_slice(&std::fs::read(installed.join("package.json")).unwrap()).unwrap();
    let page_package: Value =
        serde_json::from_slice(&std::fs::read(workspace_file("api/ui/package.json")).unwrap())
            .unwrap();
    assert_eq!(
        page_package["dependencies"]["tus-js-client"], package["version"],
        "api/ui/package.json pins another tus-js-client than the one installed"
    );
    let vendored = std::fs::read(workspace_file("api/ui/vendor/tus.min.js")).unwrap();
    let built = std::fs::read(installed.join("dist/tus.min.js")).unwrap();
    assert!(
        vendored == built,
        "api/ui/vendor/tus.min.js ({} bytes, sha256 {}) is not tus-js-client {}'s \
         dist/tus.min.js ({} bytes, sha256 {}); copy it from the install of \
         api/ui/package-lock.json",
        vendored.len(),
        sha256_hex(&vendored),
        package["version"],
        built.len(),
        sha256_hex(&built),
    );
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() {
    let html = std::fs::read_to_string(workspace_file("api/ui/index.html")).unwrap();
    let lower = html.to_ascii_lowercase();
    for (at, _) in lower.match_indices("<script") {
        let tag = &lower[at..at + lower[at..].find('>').unwrap()];
        assert!(
            tag.contains(" src=\"/ui/"),
            "an inline or foreign script: {tag}"
        );
    }
    assert!(!lower.contains("<style"), "an inline <style> element");
    assert!(!lower.contains(" style="), "an inline style attribute");
    for tag in lower.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap_or_default();
        assert!(
            !tag.split_whitespace()
                .any(|attr| attr.starts_with("on") && attr.contains('=')),
            "an inline event handler: <{tag}>"
        );
    }
    for file in ["api/ui/index.html", "api/ui/app.js", "api/ui/app.css"] {
        let text = std::fs::read_to_string(workspace_file(file)).unwrap();
        for scheme in ["http://", "https://", "//cdn", "@import"] {
            assert!(!text.contains(scheme), "{file} refers to {scheme}…");
        }
        // Markup from strings would be one injection away from an XSS.
        assert!(!text.contains("innerHTML"), "{file} writes innerHTML");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_page_uploads_resumes_after_a_reload_verifies_and_shows_a_refusal() {
    let env = TestEnv::new();
    let mut api_cmd = api_command(&env);
    api_cmd.env(
        "STITCH__LIMITS__MAX_UPLOAD_BYTES",
        MAX_UPLOAD_BYTES.to_string(),
    );
    let api = ServiceProcess::start(api_cmd, "stitch-api listening");
    let _worker = start_worker(&env);
    let client = ApiClient::new(api.addr);

    // The page and its security headers.
    let response = client.client.get(client.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET /");
    let headers = response.headers().clone();
    let csp = headers
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "CSP {csp:?} lacks {directive:?}");
    }
    assert_eq!(headers["x-content-type-options"], "nosniff");

    let dir = tempfile::tempdir().unwrap();
    let plain = write_file(dir.path(), "plain-3MiB.bin", 3 * MIB, 1);
    let resumed = write_file(dir.path(), "resumed-6MiB.bin", 6 * MIB, 2);
    let refused = write_file(dir.path(), "too-big-9MiB.bin", 9 * MIB, 3);
    let artifacts = target_dir().join("test-artifacts/browser");
    let run = run_page(json!({
        "url": client.url("/"),
        "plain": plain,
        "resumed": resumed,
        "refused": refused,
        "artifacts": artifacts,
    }))
    .await;

    // Both files completed, and the page shows the MD5 of their bytes.
    let items = run["items"].as_array().unwrap();
    for (item, path) in items.iter().zip([&plain, &resumed]) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(item["state"], "completed", "{item}");
        assert_eq!(item["md5"], md5_hex(&bytes), "the MD5 shown for {item}");
        assert!(
            item["size"]
                .as_str()
                .unwrap()
                .contains(&format!("({} bytes)", bytes.len())),
            "{item}"
        );
        let id = item["uploadId"].as_str().unwrap();
        assert!(client.download(id).await == bytes, "GET /files/{id}");
        // The page's own download link serves the same bytes.
        let href = item["href"].as_str().unwrap();
        let linked = client.client.get(href).send().await.unwrap();
        assert_eq!(linked.status(), 200, "{href}");
        assert!(linked.bytes().await.unwrap() == bytes, "{href}");
        let (_, status) = client.status(id).await;
        assert_eq!(status["protocol"], "tus", "{status}");
        assert_eq!(status["md5"], item["md5"], "{status}");
    }

    // Pause stopped the upload and Resume went on from what the server had, not from 0.
    let pause = &run["pause"];
    let after_pause = pause["patchOffsetAfterResume"].as_u64().unwrap_or(0);
    assert!(
        after_pause > 0,
        "Resume did not go on from the server's offset: {pause}\nrequests: {}",
        run["requests"]
    );

    // The reload cut the upload part-way, and the page resumed it from what the server kept:
    // the server reported bytes already there, and the first PATCH after the reload started
    // there, not at 0.
    let resume = &run["resume"];
    eprintln!("paused and resumed: {pause}; reloaded and resumed: {resume}");
    let kept = resume["firstPatchOffset"].as_u64().unwrap_or(0);
    assert!(
        kept > after_pause && kept < (6 * MIB) as u64,
        "the upload did not resume from the middle: {resume}\nrequests: {}",
        run["requests"]
    );
    assert!(
        resume["headOffsets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o.as_u64() == Some(kept)),
        "no HEAD reported the offset the upload resumed at: {resume}"
    );

    // The refusal shows its message and the server's code.
    let refusal = &run["refusal"];
    assert_eq!(refusal["state"], "refused", "{refusal}");
    let message = refusal["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("larger than this server accepts")
            && message.contains("[upload_too_large]"),
        "{refusal}"
    );

    // The recent-uploads list shows both files, newest first, with their MD5s.
    let rows = run["recent"]["rows"].as_array().unwrap();
    for item in items {
        assert!(
            rows.iter().any(|row| row[0] == item["name"]
                && row[1] == "completed"
                && row[3] == item["md5"]),
            "{item} is not in the recent uploads: {}",
            run["recent"]
        );
    }

    assert!(
        run["consoleErrors"].as_array().unwrap().iter().all(|e| {
            let e = e.as_str().unwrap_or_default();
            !e.contains("Content Security Policy") && !e.contains("page error")
        }),
        "the page logged errors: {}",
        run["consoleErrors"]
    );
    for shot in ["uploading.png", "completed.png", "refused.png"] {
        assert!(artifacts.join(shot).is_file(), "no screenshot {shot}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_goes_up_as_parallel_parts_joined_on_the_server() {
    let env = TestEnv::new();
    let api = start_api(&env);
    let _worker = start_worker(&env);
    let client = ApiClient::new(api.addr);
    let dir = tempfile::tempdir().unwrap();
    // The page splits files of 64 MiB and more into three partial uploads.
    let large = write_file(dir.path(), "large-65MiB.bin", 65 * MIB + 3, 5);
    let bytes = std::fs::read(&large).unwrap();
    let run = run_page(json!({
        "scenario": "parallel",
        "url": client.url("/"),
        "plain": large,
        "artifacts": target_dir().join("test-artifacts/browser"),
    }))
    .await;

    let item = &run["items"][0];
    assert_eq!(item["state"], "completed", "{item}");
    assert_eq!(item["md5"], md5_hex(&bytes), "{item}");
    let concat: Vec<&str> = run["concat"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        concat.iter().filter(|c| **c == "partial").count(),
        3,
        "{concat:?}"
    );
    assert_eq!(
        concat.iter().filter(|c| c.starts_with("final;")).count(),
        1,
        "{concat:?}"
    );
    let id = item["uploadId"].as_str().unwrap();
    assert!(client.download(id).await == bytes, "GET /files/{id}");
}

const KEY: &str = "sk_test_upload_page_0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_here_link_uploads_with_its_token_alone_sees_only_its_uploads_and_a_forged_one_is_refused()
 {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nid = \"page\"\ntenant = \"acme\"\nsha256 = \"{}\"\n",
            stitch_common::auth::key_sha256(KEY)
        ),
    )
    .unwrap();
    let mut api_cmd = api_command(&env);
    api_cmd.env("STITCH__AUTH__KEYS_FILE", &keys).env(
        "STITCH__AUTH__TOKEN_SECRET",
        "upload-page-token-secret-0123456789abcdef",
    );
    let api = ServiceProcess::start(api_cmd, "stitch-api listening");
    let _worker = start_worker(&env);
    let anonymous = ApiClient::new(api.addr);
    let keyed = ApiClient::with_key(api.addr, KEY);

    // Another upload of the tenant, which the link must not show.
    let other = Source::random(1000, 1000, 5);
    assert_eq!(keyed.put_chunk("not-the-links", &other, 0).await.0, 200);
    // What an operator's `stitch link new` or an app's backend does: an "upload here" link.
    let (code, issued) = json_response(
        keyed
            .client
            .post(keyed.url("/upload/tokens"))
            .json(&json!({"link": true, "ttl": "10m", "max_bytes": 4 * MIB}))
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 201, "{issued}");
    let token = issued["token"].as_str().unwrap();
    let prefix = issued["upload_id"].as_str().unwrap();

    let plain = write_file(dir.path(), "via-link-2MiB.bin", 2 * MIB, 4);
    let bytes = std::fs::read(&plain).unwrap();
    let run = run_page(json!({
        "scenario": "link",
        "url": anonymous.url(&format!("/#token={token}")),
        "badUrl": anonymous.url("/#token=st1.forged.forged"),
        "plain": plain,
        "artifacts": target_dir().join("test-artifacts/browser"),
    }))
    .await;

    let item = &run["items"][0];
    assert_eq!(item["state"], "completed", "{item}");
    let id = item["uploadId"].as_str().unwrap().to_owned();
    assert!(
        id.starts_with(&format!("{prefix}-")),
        "an upload of the link, named by the server: {item}"
    );
    assert_eq!(item["md5"], md5_hex(&bytes), "{item}");
    // The upload is the key's tenant's: nobody without a credential reaches it...
    let (code, _) = json_response(
        anonymous
            .client
            .get(anonymous.url(&format!("/files/{id}")))
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 401);
    // ...but the page's link carries the token.
    let href = item["href"].as_str().unwrap();
    assert!(href.contains("token="), "{href}");
    let linked = anonymous.client.get(href).send().await.unwrap();
    assert_eq!(linked.status(), 200, "{href}");
    assert!(linked.bytes().await.unwrap() == bytes, "{href}");
    assert!(keyed.download(&id).await == bytes);
    let (_, status) = keyed.status(&id).await;
    assert_eq!(status["md5"], item["md5"], "{status}");

    // The link's holder sees its own upload in the list, and nothing else of the tenant's.
    let rows = run["recent"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{}", run["recent"]);
    assert_eq!(rows[0][0], "via-link-2MiB.bin", "{}", run["recent"]);
    assert!(
        run["authNote"]
            .as_str()
            .unwrap_or_default()
            .contains("upload link"),
        "{run}"
    );

    let refusal = &run["refusal"];
    assert_eq!(refusal["state"], "refused", "{refusal}");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap_or_default()
            .contains("[unauthorized]"),
        "{refusal}"
    );
}

/// A site's own token backend, as `ui.token_url` names it: on another origin, it answers the
/// page's CORS preflight and `POST {"filename", "size"}` (with the browser's cookies) with a
/// capability token for one upload, made with the site's API key. Counts what it made.
struct TokenBackend {
    addr: std::net::SocketAddr,
    issued: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TokenBackend {
    async fn start(
        key: &'static str,
    ) -> (Self, tokio::sync::oneshot::Sender<std::net::SocketAddr>) {
        use axum::http::{HeaderMap, HeaderValue, StatusCode};
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issued = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<std::net::SocketAddr>();
        let made = issued.clone();
        tokio::spawn(async move {
            let stitch = rx.await.unwrap();
            let cors = |headers: &HeaderMap| {
                let origin = headers
                    .get("origin")
                    .cloned()
                    .unwrap_or_else(|| HeaderValue::from_static("null"));
                [
                    ("access-control-allow-origin", origin),
                    (
                        "access-control-allow-credentials",
                        HeaderValue::from_static("true"),
                    ),
                    (
                        "access-control-allow-methods",
                        HeaderValue::from_static("POST"),
                    ),
                    (
                        "access-control-allow-headers",
                        HeaderValue::from_static("content-type"),
                    ),
                ]
            };
            let preflight = move |headers: HeaderMap| async move {
                (StatusCode::NO_CONTENT, cors(&headers)).into_response()
            };
            let token = move |headers: HeaderMap, body: axum::Json<Value>| {
                let made = made.clone();
                async move {
                    let client = ApiClient::with_key(stitch, key);
                    let mut request = json!({"ttl": "10m", "max_bytes": body["size"]});
                    if let Some(id) = body.get("upload_id") {
                        request["upload_id"] = id.clone();
                    }
                    let (code, answer) = json_response(
                        client
                            .client
                            .post(client.url("/upload/tokens"))
                            .json(&request)
                            .send()
                            .await,
                    )
                    .await;
                    assert_eq!(code, 201, "{answer}");
                    made.lock()
                        .unwrap()
                        .push(answer["upload_id"].as_str().unwrap().to_owned());
                    let reply = json!({"token": answer["token"]});
                    (cors(&headers), axum::Json(reply)).into_response()
                }
            };
            let app =
                axum::Router::new().route("/token", axum::routing::post(token).options(preflight));
            axum::serve(listener, app).await.unwrap();
        });
        (Self { addr, issued }, tx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_url_the_page_uploads_with_a_token_per_upload_from_the_sites_backend() {
    const SITE_KEY: &str = "sk_test_upload_page_site_0123456789";
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nid = \"site\"\ntenant = \"acme\"\nsha256 = \"{}\"\n",
            stitch_common::auth::key_sha256(SITE_KEY)
        ),
    )
    .unwrap();
    let (backend, stitch_addr) = TokenBackend::start(SITE_KEY).await;
    let mut api_cmd = api_command(&env);
    api_cmd
        .env("STITCH__AUTH__KEYS_FILE", &keys)
        .env(
            "STITCH__AUTH__TOKEN_SECRET",
            "upload-page-token-secret-0123456789abcdef",
        )
        .env(
            "STITCH__UI__TOKEN_URL",
            format!("http://{}/token", backend.addr),
        );
    let api = ServiceProcess::start(api_cmd, "stitch-api listening");
    stitch_addr.send(api.addr).unwrap();
    let _worker = start_worker(&env);
    let anonymous = ApiClient::new(api.addr);

    let plain = write_file(dir.path(), "via-backend-2MiB.bin", 2 * MIB, 7);
    let bytes = std::fs::read(&plain).unwrap();
    let run = run_page(json!({
        "scenario": "link",
        "url": anonymous.url("/"),
        "badUrl": anonymous.url("/#token=st1.forged.forged"),
        "plain": plain,
        "artifacts": target_dir().join("test-artifacts/browser/token-url"),
    }))
    .await;
    let item = &run["items"][0];
    assert_eq!(item["state"], "completed", "{item}");
    assert_eq!(item["md5"], md5_hex(&bytes), "{item}");
    let issued = backend.issued.lock().unwrap().clone();
    assert!(
        !issued.is_empty(),
        "the page asked the site's backend for a token"
    );
    assert_eq!(
        item["uploadId"],
        issued[issued.len() - 1],
        "the upload is the one the backend's token names: {item} {issued:?}"
    );
    let keyed = ApiClient::with_key(api.addr, SITE_KEY);
    assert!(keyed.download(item["uploadId"].as_str().unwrap()).await == bytes);
}

/// A file of `len` seeded random bytes named `name` in `dir`.
fn write_file(dir: &Path, name: &str, len: usize, seed: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, Source::random(len, len as u64, seed).bytes).unwrap();
    path
}

/// Runs the browser script with `options` and returns its report, which must say it went
/// through (the assertions on what it saw are the caller's).
async fn run_page(options: Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/upload_page.mjs");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(&script)
        .arg(options.to_string())
        .env("STITCH_TEST_UI_NODE_MODULES", ui_node_modules())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("starting node");
    let output = tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the browser run did not finish within {BROWSER_TIMEOUT:?}"))
        .expect("waiting for node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the browser script printed no report (exit {:?}); stdout: {stdout}\nstderr: \
                 {stderr}",
                output.status
            )
        });
    assert!(
        report["setup"] != true,
        "the browser script could not run: {}",
        report["error"]
    );
    assert!(
        report["ok"] == true && output.status.success(),
        "the browser run failed at {:?}: {}\nreport: {report}\nstderr: {stderr}",
        report["step"],
        report["error"]
    );
    report
}
