//! A real `stitch-api` process for one measurement: started from the release binary with its
//! own storage directory and Redis namespace (configuration by environment, as an operator
//! would), its address taken from its `stitch-api listening` log line, and stopped with
//! SIGTERM. A fresh process per measurement makes its peak RSS (`VmHWM`) that measurement's.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

use crate::procfs::{self, CpuTime};

/// How long the API may take to log that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Log lines kept for error messages.
const LOG_TAIL: usize = 40;

/// How to start the API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub binary: PathBuf,
    pub storage_root: PathBuf,
    pub namespace: String,
    pub redis_url: String,
    pub amqp_url: String,
    /// Further `STITCH__…` settings, e.g. `("STITCH__LIMITS__MAX_CHUNK_BYTES", "67108864")`.
    pub settings: Vec<(String, String)>,
}

/// A running API process. Dropping it kills the process if [`ApiProcess::stop`] was not
/// called, so a failed benchmark leaves nothing running.
pub struct ApiProcess {
    child: Child,
    addr: SocketAddr,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl ApiProcess {
    /// Starts the binary and waits until it listens. Inherited `STITCH_*` and `RUST_LOG`
    /// variables are removed, so the caller's shell cannot change what is measured.
    pub fn spawn(config: &ApiConfig) -> anyhow::Result<Self> {
        let mut command = Command::new(&config.binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STITCH") {
                command.env_remove(&key);
            }
        }
        command
            .env_remove("RUST_LOG")
            .env("STITCH__HTTP__BIND", "127.0.0.1:0")
            .env("STITCH__STORAGE__ROOT", &config.storage_root)
            .env("STITCH__NAMESPACE", &config.namespace)
            .env("STITCH__REDIS__URL", &config.redis_url)
            .env("STITCH__AMQP__URL", &config.amqp_url)
            .env("STITCH__LOG__FORMAT", "json")
            .envs(config.settings.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", config.binary.display()))?;
        let log_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (found, listening) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            drain(stdout, log_tail.clone(), Some(found));
        }
        if let Some(stderr) = child.stderr.take() {
            drain(stderr, log_tail.clone(), None);
        }
        let mut process = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_tail,
        };
        match listening.recv_timeout(START_TIMEOUT) {
            Ok(addr) => {
                process.addr = addr;
                Ok(process)
            }
            Err(_) => {
                let exited = process.child.try_wait().ok().flatten();
                let why = match exited {
                    Some(status) => format!("it exited ({status})"),
                    None => {
                        format!("it did not log `stitch-api listening` within {START_TIMEOUT:?}")
                    }
                };
                bail!(
                    "{} did not start: {why}; its last output:\n{}",
                    config.binary.display(),
                    process.log_tail()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        procfs::peak_rss(self.pid()).context("reading the API's peak RSS")
    }

    /// CPU time used so far, all threads.
    pub fn cpu_time(&self) -> anyhow::Result<CpuTime> {
        procfs::cpu_time(self.pid()).context("reading the API's CPU time")
    }

    /// The last lines the process printed (stdout and stderr), for error messages.
    pub fn log_tail(&self) -> String {
        let lines = self.log_tail.lock().map(|l| l.clone()).unwrap_or_default();
        Vec::from(lines).join("\n")
    }

    /// Sends SIGTERM and waits for a graceful exit; kills it if that takes too long.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let pid = Pid::from_child(&self.child);
        kill_process(pid, Signal::TERM).context("sending SIGTERM to the API")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the API")? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the API did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads a pipe of the child line by line on its own thread (an unread pipe would block the
/// API once full), keeping the last lines; on stdout, reports the listening address.
fn drain(
    pipe: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    mut found: Option<mpsc::Sender<SocketAddr>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = found.as_ref().and_then(|_| listening_addr(&line))
                && let Some(tx) = found.take()
            {
                let _ = tx.send(addr);
            }
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
}

/// The address in a JSON log line `{"message":"stitch-api listening","addr":"…",…}`
/// (fields flattened, or nested under `fields`).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = if value.get("message").is_some() {
        &value
    } else {
        value.get("fields")?
    };
    if fields.get("message")?.as_str()? != "stitch-api listening" {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address() {
        let line = r#"{"timestamp":"2026-11-25T16:00:00Z","level":"INFO","message":"stitch-api listening","addr":"127.0.0.1:40123","target":"stitch_api"}"#;
        assert_eq!(
            listening_addr(line),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        let nested =
            r#"{"level":"INFO","fields":{"message":"stitch-api listening","addr":"127.0.0.1:9"}}"#;
        assert_eq!(listening_addr(nested), Some("127.0.0.1:9".parse().unwrap()));
    }

    #[test]
    fn other_lines_give_nothing() {
        assert_eq!(
            listening_addr(r#"{"message":"storage is not writable yet"}"#),
            None
        );
        assert_eq!(listening_addr("stitch-api listening on 127.0.0.1:1"), None);
        assert_eq!(listening_addr(""), None);
    }
}
