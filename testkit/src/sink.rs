//! A webhook receiver that verifies signatures with the Standard Webhooks reference library
//! (Python `standardwebhooks`), independent of Stitch's own signing code: `webhook_sink.py`
//! beside this crate, run as a process.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct WebhookSink {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The Python with the tests' packages: `STITCH_TEST_PYTHON`, else the venv that `cargo
/// xtask test` makes under `target/xtask/venv` (so a plain `cargo test` after one xtask run
/// finds the packages too), else `python3` from `PATH`.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("STITCH_TEST_PYTHON") {
        return python.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    let venv = target
        .join("xtask")
        .join("venv")
        .join("bin")
        .join("python3");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

impl WebhookSink {
    /// Starts a sink that verifies with `secrets` and answers `responses` in turn (see the
    /// script: a status, `hang` or `redirect`).
    pub fn start(secrets: &[&str], responses: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the sink's log");
        let log = dir.path().join("requests.jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/webhook_sink.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg("--log")
            .arg(&log)
            .arg("--secrets")
            .arg(secrets.join(","))
            .arg("--responses")
            .arg(responses)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 must be installed (cargo xtask test makes a venv with the packages)");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the sink's first line");
        let port = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["port"].as_u64())
            .unwrap_or_else(|| {
                panic!("the webhook sink did not start (is `pip install standardwebhooks` done?): {line:?}")
            }) as u16;
        Self {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sink got {} requests, not {n}, within {limit:?}",
                requests.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback listener that must never be connected to: it counts whoever does.
pub struct Canary {
    pub port: u16,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Canary {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding");
        let port = listener.local_addr().expect("an address").port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((_stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Self { port, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}
