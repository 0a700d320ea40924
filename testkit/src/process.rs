//! Real Stitch processes: started with a namespace's configuration, found by the address they
//! log, signalled, measured and stopped like an orchestrator would.
//!
//! The processes log JSON (`STITCH__LOG__FORMAT=json`). Besides the line that says a process
//! listens, a caller can keep the lines with given messages (e.g. the worker's `merging` and
//! `merge committed`), with the timestamps the process wrote, and the last lines it printed
//! stay at hand for error messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use rustix::process::{Pid, Signal, kill_process};
use stitch_common::config::Interval;

use crate::TestEnv;

/// How long a process may take to log that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines kept for error messages.
const LOG_TAIL: usize = 40;

/// A command for a Stitch binary configured for `env` through `STITCH__*` variables, with
/// JSON logs on stdout and any inherited configuration (`STITCH*`, `RUST_LOG`) removed, so
/// that the caller's shell cannot change what runs. The processes share with `env` where the
/// state lives and the retry delays, which name the broker's delay queues.
pub fn stitch_command(binary: &Path, env: &TestEnv) -> Command {
    let settings = env.settings();
    let mut cmd = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STITCH") {
            cmd.env_remove(key);
        }
    }
    cmd.env("STITCH__NAMESPACE", &env.namespace)
        .env("STITCH__STORAGE__ROOT", &env.storage_root)
        .env("STITCH__REDIS__URL", settings.redis.url.expose())
        .env("STITCH__AMQP__URL", settings.amqp.url.expose())
        .env("STITCH__HTTP__BIND", "127.0.0.1:0")
        .env("STITCH__LOG__FORMAT", "json")
        .env("STITCH__LOG__LEVEL", "info")
        .env(
            "STITCH__MERGE__RETRY_DELAYS",
            intervals(&settings.merge.retry_delays),
        )
        .env(
            "STITCH__WEBHOOKS__RETRY_DELAYS",
            intervals(&settings.webhooks.retry_delays),
        )
        .env_remove("RUST_LOG");
    cmd
}

/// Intervals as a configuration variable takes them (`500ms,2000ms`).
fn intervals(delays: &[Interval]) -> String {
    let ms: Vec<String> = delays
        .iter()
        .map(|d| format!("{}ms", d.0.as_millis()))
        .collect();
    ms.join(",")
}

/// What to read from a process's log.
#[derive(Clone, Debug)]
pub struct LogWatch {
    /// The message of the line that says the process is ready; its `addr` field is the
    /// address it listens on.
    pub listening: &'static str,
    /// Messages of further lines to keep (see [`ServiceProcess::log_records`]).
    pub record: Vec<&'static str>,
    /// Copy every line to this process's stderr, so that a failing test's output shows the
    /// process's log. A benchmark, whose stderr is its progress, keeps only the tail.
    pub echo: bool,
}

/// A JSON log line asked for by [`LogWatch::record`].
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// The line's own `timestamp` (the process's wall clock).
    pub at: SystemTime,
    pub line: serde_json::Value,
}

/// What the pipe readers keep of a process's output.
#[derive(Default)]
struct Log {
    tail: Mutex<VecDeque<String>>,
    records: Mutex<Vec<(String, LogRecord)>>,
}

/// A running process, killed on drop, so that a failed test or benchmark leaves nothing
/// running.
pub struct ServiceProcess {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Log>,
}

impl ServiceProcess {
    /// Starts `cmd` and waits for the JSON log line whose `message` is `listening_message`,
    /// echoing the process's output; panics if it does not come.
    pub fn start(cmd: Command, listening_message: &'static str) -> Self {
        let watch = LogWatch {
            listening: listening_message,
            record: Vec::new(),
            echo: true,
        };
        Self::spawn(cmd, &watch).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `cmd` and waits until it logs [`LogWatch::listening`]. Its stdout and stderr
    /// keep being read (an unread pipe would block the process once full).
    pub fn spawn(mut cmd: Command, watch: &LogWatch) -> anyhow::Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let log = Arc::new(Log::default());
        let (found, listening) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let reader = Reader {
                watch: watch.clone(),
                found: Some(found),
                log: log.clone(),
            };
            reader.drain(stdout);
        }
        if let Some(stderr) = child.stderr.take() {
            let reader = Reader {
                watch: LogWatch {
                    record: Vec::new(),
                    ..watch.clone()
                },
                found: None,
                log: log.clone(),
            };
            reader.drain(stderr);
        }
        let mut process = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        match listening.recv_timeout(START_TIMEOUT) {
            Ok(addr) => {
                process.addr = addr;
                Ok(process)
            }
            Err(_) => {
                let why = match process.child.try_wait().ok().flatten() {
                    Some(status) => format!("it exited ({status})"),
                    None => format!(
                        "it did not log `{}` within {START_TIMEOUT:?}",
                        watch.listening
                    ),
                };
                bail!(
                    "{program} did not start: {why}; its last output:\n{}",
                    process.log_tail()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let signal = match name {
            "TERM" => Signal::TERM,
            "KILL" => Signal::KILL,
            "STOP" => Signal::STOP,
            "CONT" => Signal::CONT,
            other => panic!("no signal {other:?} here"),
        };
        self.send(signal)
            .unwrap_or_else(|e| panic!("kill -{name} failed: {e}"));
    }

    fn send(&self, signal: Signal) -> std::io::Result<()> {
        Ok(kill_process(Pid::from_child(&self.child), signal)?)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.exit_within(limit)
            .expect("try_wait")
            .unwrap_or_else(|| panic!("the process did not exit within {limit:?}"))
    }

    /// The exit status once the process has exited, waiting at most `limit`.
    fn exit_within(&mut self, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process as an orchestrator does: SIGTERM, then SIGKILL if it has not exited
    /// within `limit` (which is an error).
    pub fn stop(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        self.send(Signal::TERM).context("sending SIGTERM")?;
        match self.exit_within(limit).context("waiting for the exit")? {
            Some(status) => Ok(status),
            None => {
                self.kill();
                bail!("it did not exit within {limit:?} of SIGTERM; killed it")
            }
        }
    }

    /// The log lines so far whose message is `message` (one of [`LogWatch::record`]).
    pub fn log_records(&self, message: &str) -> Vec<LogRecord> {
        self.log
            .records
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
        let lines = self.log.tail.lock().map(|l| l.clone()).unwrap_or_default();
        Vec::from(lines).join("\n")
    }

    /// Peak resident memory so far, in bytes: see [`peak_rss`].
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        peak_rss(self.pid())
    }

    /// Starts a new peak: see [`reset_peak_rss`].
    pub fn reset_peak_rss(&self) -> anyhow::Result<()> {
        reset_peak_rss(self.pid())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // A stopped process cannot die of SIGKILL until it is continued.
            let _ = self.send(Signal::CONT);
            self.kill();
        }
    }
}

/// One pipe's reader: keeps the tail; on stdout, also reports the listening address and
/// keeps the lines asked for.
struct Reader {
    watch: LogWatch,
    found: Option<mpsc::Sender<SocketAddr>>,
    log: Arc<Log>,
}

impl Reader {
    /// Reads the pipe line by line on a thread of its own until it closes.
    fn drain(mut self, pipe: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if self.watch.echo {
                    eprintln!("{line}");
                }
                self.see(&line);
                if let Ok(mut tail) = self.log.tail.lock() {
                    if tail.len() == LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });
    }

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
        if message == self.watch.listening
            && let Some(addr) = fields.get("addr").and_then(|a| a.as_str()?.parse().ok())
            && let Some(tx) = self.found.take()
        {
            let _ = tx.send(addr);
        }
        if self.watch.record.contains(&message)
            && let Some(at) = log_timestamp(&value)
            && let Ok(mut records) = self.log.records.lock()
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

/// A process's memory high-water mark (`VmHWM`) in bytes: the most it was ever resident
/// (since it started, or since [`reset_peak_rss`]).
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:").map(|kib| kib * 1024)
}

/// A process's resident memory now (`VmRSS`) in bytes.
pub fn current_rss(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:").map(|kib| kib * 1024)
}

/// Resets a process's `VmHWM` to its current RSS (`/proc/<pid>/clear_refs`, value 5), so
/// that a later [`peak_rss`] is the peak since now.
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing {path}"))
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&status, field).with_context(|| format!("no {field} in {path}"))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let mut words = line[field.len()..].split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(
        listening: &'static str,
        record: Vec<&'static str>,
    ) -> (Reader, mpsc::Receiver<SocketAddr>) {
        let (found, listening_addr) = mpsc::channel();
        let reader = Reader {
            watch: LogWatch {
                listening,
                record,
                echo: false,
            },
            found: Some(found),
            log: Arc::default(),
        };
        (reader, listening_addr)
    }

    /// The address a stdout reader reports for `line`.
    fn listening_addr(line: &str, listening: &'static str) -> Option<SocketAddr> {
        let (mut reader, addr) = reader(listening, Vec::new());
        reader.see(line);
        addr.try_recv().ok()
    }

    #[test]
    fn the_listening_line_gives_the_address() {
        let line = r#"{"timestamp":"2026-11-25T16:00:00Z","level":"INFO","message":"stitch-api listening","addr":"127.0.0.1:40123","target":"stitch_api"}"#;
        assert_eq!(
            listening_addr(line, "stitch-api listening"),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        let nested =
            r#"{"level":"INFO","fields":{"message":"stitch-api listening","addr":"127.0.0.1:9"}}"#;
        assert_eq!(
            listening_addr(nested, "stitch-api listening"),
            Some("127.0.0.1:9".parse().unwrap())
        );
        let worker = r#"{"message":"stitch-worker listening","addr":"127.0.0.1:7","merge":true}"#;
        assert_eq!(
            listening_addr(worker, "stitch-worker listening"),
            Some("127.0.0.1:7".parse().unwrap())
        );
        assert_eq!(listening_addr(worker, "stitch-api listening"), None);
    }

    #[test]
    fn other_lines_give_no_address() {
        let listening = "stitch-api listening";
        assert_eq!(
            listening_addr(r#"{"message":"storage is not writable yet"}"#, listening),
            None
        );
        assert_eq!(
            listening_addr("stitch-api listening on 127.0.0.1:1", listening),
            None
        );
        assert_eq!(listening_addr("", listening), None);
    }

    #[test]
    fn recorded_lines_keep_their_own_timestamp() {
        let (mut reader, _) = reader("stitch-worker listening", vec!["merging"]);
        reader.see(r#"{"timestamp":"2026-11-25T16:00:00.250000Z","level":"INFO","message":"merging","upload_id":"a"}"#);
        reader.see(r#"{"timestamp":"2026-11-25T16:00:01Z","message":"merge committed"}"#);
        reader.see("not json");
        let records = reader.log.records.lock().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].0, "merging");
        assert_eq!(records[0].1.line["upload_id"], "a");
        let expected = humantime::parse_rfc3339("2026-11-25T16:00:00.25Z").unwrap();
        assert_eq!(records[0].1.at, expected);
    }

    #[test]
    fn retry_delays_are_written_as_the_configuration_reads_them() {
        let delays = [
            Interval(Duration::from_millis(500)),
            Interval(Duration::from_secs(2)),
        ];
        assert_eq!(intervals(&delays), "500ms,2000ms");
        let parsed: Vec<Interval> = intervals(&delays)
            .split(',')
            .map(|d| Interval::parse(d).unwrap())
            .collect();
        assert_eq!(parsed, delays);
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let status =
            "Name:\tstitch-api\nVmPeak:\t  900 kB\nVmHWM:\t   51200 kB\nVmRSS:\t 2048 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(51200));
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(2048));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_peak_rss_can_be_read_and_reset() {
        let pid = std::process::id();
        reset_peak_rss(pid).unwrap();
        assert!(peak_rss(pid).unwrap() > 0);
        assert!(current_rss(pid).unwrap() > 0);
    }
}
