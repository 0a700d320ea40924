//! Real Stitch processes: started with a test's configuration, found by the address they
//! log, signalled and killed like an orchestrator would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::TestEnv;

/// A command for a Stitch binary configured for `env` through `STITCH__*` variables, with
/// JSON logs on stdout and any inherited configuration removed.
pub fn stitch_command(binary: &Path, env: &TestEnv) -> Command {
    let mut cmd = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STITCH") {
            cmd.env_remove(key);
        }
    }
    cmd.env("STITCH__NAMESPACE", &env.namespace)
        .env("STITCH__STORAGE__ROOT", &env.storage_root)
        .env("STITCH__REDIS__URL", crate::redis_url())
        .env("STITCH__AMQP__URL", crate::amqp_url())
        .env("STITCH__HTTP__BIND", "127.0.0.1:0")
        .env("STITCH__LOG__FORMAT", "json")
        .env("STITCH__LOG__LEVEL", "info")
        .env("STITCH__MERGE__RETRY_DELAYS", "500ms,2s")
        .env("STITCH__WEBHOOKS__RETRY_DELAYS", "300ms,1s")
        .env_remove("RUST_LOG");
    cmd
}

/// A running process, killed on drop.
pub struct ServiceProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServiceProcess {
    /// Starts `cmd` and waits for the JSON log line whose `message` is `listening_message`,
    /// taking the address from its `addr` field. The process's stdout keeps being drained.
    pub fn start(mut cmd: Command, listening_message: &'static str) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the process");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Echoed so that a failing test's captured output shows the process's log.
                eprintln!("{line}");
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                    && json["message"] == listening_message
                {
                    let _ = tx.send(json["addr"].as_str().unwrap_or_default().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {listening_message:?} log line"))
            .parse()
            .expect("a socket address");
        Self { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // A stopped process cannot die of SIGKILL until it is continued.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.pid().to_string())
            .status();
        self.kill();
    }
}
