//! A real Stitch process for one measurement — `stitch-api`, `stitch-worker` or `stitch serve`
//! — started from a release binary with its own storage directory and namespace
//! (configuration by environment, as an operator would), ready once it logs that it listens,
//! and stopped with SIGTERM. A fresh process per measurement makes its peak RSS (`VmHWM`) that
//! measurement's.
//!
//! The processes log JSON (`STITCH__LOG__FORMAT=json`); besides the listening line, a
//! benchmark can ask for the lines with given messages (e.g. the worker's `merging` and
//! `merge committed`), whose timestamps are the process's own clock.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

use crate::procfs::{self, CpuTime};

/// How long a process may take to log that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Log lines kept for error messages.
const LOG_TAIL: usize = 40;

/// Which Stitch program to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `stitch-api`: the HTTP API over Redis and RabbitMQ.
    Api,
    /// `stitch-worker`: the merge worker (and sweeper) over Redis and RabbitMQ.
    Worker,
    /// `stitch serve`: API and worker in one process over SQLite (the single-node mode).
    Serve,
}

impl Role {
    /// What the process is called in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Api => "stitch-api",
            Self::Worker => "stitch-worker",
            Self::Serve => "stitch serve",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Serve => &["serve"],
            Self::Api | Self::Worker => &[],
        }
    }

    /// The message of the log line that says the process is ready, with its address.
    fn ready_message(self) -> &'static str {
        match self {
            Self::Api | Self::Serve => "stitch-api listening",
            Self::Worker => "stitch-worker listening",
        }
    }
}

/// How to start a process.
#[derive(Clone, Debug)]
pub struct ProcessConfig {
    pub role: Role,
    pub binary: PathBuf,
    pub storage_root: PathBuf,
    pub namespace: String,
    pub redis_url: String,
    pub amqp_url: String,
    /// Further `STITCH__…` settings, e.g. `("STITCH__LIMITS__MAX_CHUNK_BYTES", "67108864")`.
    pub settings: Vec<(String, String)>,
    /// Messages of log lines to keep (see [`StitchProcess::log_records`]).
    pub record: Vec<&'static str>,
}

/// A JSON log line the benchmark asked for.
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// The line's own `timestamp` (the process's wall clock).
    pub at: SystemTime,
    pub line: serde_json::Value,
}

/// A running process. Dropping it kills the process if [`StitchProcess::stop`] was not
/// called, so a failed benchmark leaves nothing running.
pub struct StitchProcess {
    child: Child,
    role: Role,
    addr: SocketAddr,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    records: Arc<Mutex<Vec<(String, LogRecord)>>>,
}

impl StitchProcess {
    /// Starts the binary and waits until it listens. Inherited `STITCH_*` and `RUST_LOG`
    /// variables are removed, so the caller's shell cannot change what is measured.
    pub fn spawn(config: &ProcessConfig) -> anyhow::Result<Self> {
        if config.role != Role::Serve {
            migrate(config)?;
        }
        let mut command = Command::new(&config.binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STITCH") {
                command.env_remove(&key);
            }
        }
        command
            .args(config.role.args())
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
        let records = Arc::new(Mutex::new(Vec::new()));
        let (found, listening) = mpsc::channel();
        let ready = config.role.ready_message();
        if let Some(stdout) = child.stdout.take() {
            let watch = Watch {
                ready,
                found: Some(found),
                record: config.record.clone(),
                records: records.clone(),
            };
            drain(stdout, log_tail.clone(), Some(watch));
        }
        if let Some(stderr) = child.stderr.take() {
            drain(stderr, log_tail.clone(), None);
        }
        let mut process = Self {
            child,
            role: config.role,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_tail,
            records,
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
                    None => format!("it did not log `{ready}` within {START_TIMEOUT:?}"),
                };
                bail!(
                    "{} did not start: {why}; its last output:\n{}",
                    config.binary.display(),
                    process.log_tail()
                )
            }
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address it listens on (the API's, or the worker's probes).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        procfs::peak_rss(self.pid())
            .with_context(|| format!("reading the peak RSS of {}", self.role.name()))
    }

    /// Starts a new peak: `VmHWM` is reset to the current RSS, so that a later
    /// [`Self::peak_rss`] is the peak of what happened in between.
    pub fn reset_peak_rss(&self) -> anyhow::Result<()> {
        procfs::reset_peak_rss(self.pid())
            .with_context(|| format!("resetting the peak RSS of {}", self.role.name()))
    }

    /// CPU time used so far, all threads.
    pub fn cpu_time(&self) -> anyhow::Result<CpuTime> {
        procfs::cpu_time(self.pid())
            .with_context(|| format!("reading the CPU time of {}", self.role.name()))
    }

    /// The log lines so far whose message is `message` (one of [`ProcessConfig::record`]).
    pub fn log_records(&self, message: &str) -> Vec<LogRecord> {
        self.records
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(m, _)| m == message)
                    .map(|(_, record)| record.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last lines the process printed (stdout and stderr), for error messages.
    pub fn log_tail(&self) -> String {
        let lines = self.log_tail.lock().map(|l| l.clone()).unwrap_or_default();
        Vec::from(lines).join("\n")
    }

    /// Sends SIGTERM and waits for a graceful exit; kills it if that takes too long.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let name = self.role.name();
        let pid = Pid::from_child(&self.child);
        kill_process(pid, Signal::TERM).with_context(|| format!("sending SIGTERM to {name}"))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {name}"))?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{name} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StitchProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the stdout reader looks for.
struct Watch {
    ready: &'static str,
    found: Option<mpsc::Sender<SocketAddr>>,
    record: Vec<&'static str>,
    records: Arc<Mutex<Vec<(String, LogRecord)>>>,
}

/// Reads a pipe of the child line by line on its own thread (an unread pipe would block the
/// process once full), keeping the last lines; on stdout, reports the listening address and
/// keeps the lines asked for.
fn drain(
    pipe: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    mut watch: Option<Watch>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some(watch) = watch.as_mut() {
                watch.see(&line);
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

impl Watch {
    fn see(&mut self, line: &str) {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        let Some(fields) = log_fields(&value) else {
            return;
        };
        let Some(message) = fields.get("message").and_then(|m| m.as_str()) else {
            return;
        };
        if message == self.ready
            && let Some(addr) = fields.get("addr").and_then(|a| a.as_str()?.parse().ok())
            && let Some(tx) = self.found.take()
        {
            let _ = tx.send(addr);
        }
        if self.record.contains(&message)
            && let Some(at) = log_timestamp(&value)
            && let Ok(mut records) = self.records.lock()
        {
            records.push((message.to_owned(), LogRecord { at, line: value }));
        }
    }
}

/// The fields of a JSON log line: flattened, or nested under `fields`.
fn log_fields(value: &serde_json::Value) -> Option<&serde_json::Value> {
    if value.get("message").is_some() {
        Some(value)
    } else {
        value.get("fields")
    }
}

/// The `timestamp` of a JSON log line (RFC 3339, as `tracing-subscriber` writes it).
fn log_timestamp(value: &serde_json::Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(value.get("timestamp")?.as_str()?).ok()
}

/// Applies the migrations to the namespace (what a deploy's migration job does before the
/// distributed processes start; idempotent, so every process of a run may ask).
fn migrate(config: &ProcessConfig) -> anyhow::Result<()> {
    let mut settings = stitch_common::config::Settings {
        namespace: config.namespace.clone(),
        ..Default::default()
    };
    settings.redis.url = stitch_common::config::Secret::new(&config.redis_url);
    settings.amqp.url = stitch_common::config::Secret::new(&config.amqp_url);
    // On a thread of its own: the caller may be inside a runtime already.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(stitch_common::migrate::apply(
            &settings,
            Duration::from_secs(60),
        ))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the migration thread panicked"))?
    .with_context(|| format!("migrating namespace {}", config.namespace))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address a stdout reader reports for `line`.
    fn listening_addr(line: &str, ready: &'static str) -> Option<SocketAddr> {
        let (found, listening) = mpsc::channel();
        let mut watch = Watch {
            ready,
            found: Some(found),
            record: Vec::new(),
            records: Arc::default(),
        };
        watch.see(line);
        listening.try_recv().ok()
    }

    #[test]
    fn the_listening_line_gives_the_address() {
        let line = r#"{"timestamp":"2026-11-25T16:00:00Z","level":"INFO","message":"stitch-api listening","addr":"127.0.0.1:40123","target":"stitch_api"}"#;
        assert_eq!(
            listening_addr(line, Role::Api.ready_message()),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        let nested =
            r#"{"level":"INFO","fields":{"message":"stitch-api listening","addr":"127.0.0.1:9"}}"#;
        assert_eq!(
            listening_addr(nested, Role::Serve.ready_message()),
            Some("127.0.0.1:9".parse().unwrap())
        );
        let worker = r#"{"message":"stitch-worker listening","addr":"127.0.0.1:7","merge":true}"#;
        assert_eq!(
            listening_addr(worker, Role::Worker.ready_message()),
            Some("127.0.0.1:7".parse().unwrap())
        );
        assert_eq!(listening_addr(worker, Role::Api.ready_message()), None);
    }

    #[test]
    fn other_lines_give_nothing() {
        let ready = Role::Api.ready_message();
        assert_eq!(
            listening_addr(r#"{"message":"storage is not writable yet"}"#, ready),
            None
        );
        assert_eq!(
            listening_addr("stitch-api listening on 127.0.0.1:1", ready),
            None
        );
        assert_eq!(listening_addr("", ready), None);
    }

    #[test]
    fn recorded_lines_keep_their_own_timestamp() {
        let records = Arc::new(Mutex::new(Vec::new()));
        let mut watch = Watch {
            ready: Role::Worker.ready_message(),
            found: None,
            record: vec!["merging"],
            records: records.clone(),
        };
        watch.see(r#"{"timestamp":"2026-11-25T16:00:00.250000Z","level":"INFO","message":"merging","upload_id":"a"}"#);
        watch.see(r#"{"timestamp":"2026-11-25T16:00:01Z","message":"merge committed"}"#);
        watch.see("not json");
        let records = records.lock().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].0, "merging");
        assert_eq!(records[0].1.line["upload_id"], "a");
        let expected = humantime::parse_rfc3339("2026-11-25T16:00:00.25Z").unwrap();
        assert_eq!(records[0].1.at, expected);
    }
}
