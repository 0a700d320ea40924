//! The Stitch processes of one measurement — `stitch-api`, `stitch-worker` or `stitch serve`
//! — on a namespace of their own: the test kit's [`TestEnv::deployed`] (every setting at its
//! default, its storage in the work directory), with the benchmark's own settings on top, by
//! environment as an operator would. Ready once a process logs that it listens; stopped with
//! SIGTERM; the namespace's keys, queues and storage removed when the deployment drops. A
//! fresh process per measurement makes its peak RSS (`VmHWM`) that measurement's.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use stitch_testkit::TestEnv;
use stitch_testkit::process::{LogWatch, ServiceProcess, stitch_command};

/// `cargo build --release` arguments for the binaries of `ingest`, and of the others.
pub const BUILD_API: &str = "-p stitch-api -p stitch-bench";
pub const BUILD_ALL: &str = "-p stitch-api -p stitch-worker -p stitch-cli -p stitch-bench";

/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

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

    /// What a report calls the process in its tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Worker => "worker",
            Self::Serve => "serve",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Serve => &["serve"],
            Self::Api | Self::Worker => &[],
        }
    }

    /// The message of the log line that says the process is ready, with its address.
    fn listening(self) -> &'static str {
        match self {
            Self::Api | Self::Serve => "stitch-api listening",
            Self::Worker => "stitch-worker listening",
        }
    }
}

/// Fails unless every binary exists, saying how to build them.
pub fn check_binaries(binaries: &[(&PathBuf, &str)], build: &str) -> anyhow::Result<()> {
    for (binary, flag) in binaries {
        ensure!(
            binary.is_file(),
            "{} ({flag}) does not exist: build it first with `cargo build --release {build}`",
            binary.display()
        );
    }
    Ok(())
}

/// One measurement's namespace and the processes running on it. The processes are declared
/// first so that they are gone (killed, if not stopped) before the namespace is removed.
pub struct Deployment {
    processes: Vec<(Role, ServiceProcess)>,
    pub env: Arc<TestEnv>,
}

impl Deployment {
    pub fn new(env: Arc<TestEnv>) -> Self {
        Self {
            processes: Vec::new(),
            env,
        }
    }

    /// Starts `binary` as `role`, with `settings` (`STITCH__…` variables) on top of the
    /// defaults, keeping its log lines whose message is in `record`, and waits until it
    /// listens. The distributed processes find the namespace migrated first, as after a
    /// deploy's migration job (idempotent, so every process of a run may ask).
    pub fn start(
        &mut self,
        role: Role,
        binary: &Path,
        settings: &[(&str, String)],
        record: &[&'static str],
    ) -> anyhow::Result<&ServiceProcess> {
        if role != Role::Serve {
            self.env.migrate()?;
        }
        let mut cmd = stitch_command(binary, &self.env);
        cmd.args(role.args())
            .envs(settings.iter().map(|(k, v)| (k, v)));
        let watch = LogWatch {
            listening: role.listening(),
            record: record.to_vec(),
            echo: false,
        };
        let process = ServiceProcess::spawn(cmd, &watch)?;
        self.processes.push((role, process));
        Ok(&self.processes[self.processes.len() - 1].1)
    }

    /// The processes, in the order started.
    pub fn processes(&self) -> &[(Role, ServiceProcess)] {
        &self.processes
    }

    /// The process running as `role`.
    pub fn process(&self, role: Role) -> anyhow::Result<&ServiceProcess> {
        self.processes
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p)
            .with_context(|| format!("no {} runs", role.name()))
    }

    /// The last output of every process, for error messages.
    pub fn log_tails(&self) -> String {
        let logs: Vec<String> = self
            .processes
            .iter()
            .map(|(role, p)| format!("{}'s last output:\n{}", role.name(), p.log_tail()))
            .collect();
        logs.join("\n")
    }

    /// Stops every process with SIGTERM, the last started first, and removes the namespace.
    /// Returns how each exited; fails (after stopping all) if one had to be killed.
    pub fn stop(mut self) -> anyhow::Result<Vec<(Role, ExitStatus)>> {
        let mut exits = Vec::new();
        let mut failed = Ok(());
        while let Some((role, mut process)) = self.processes.pop() {
            match process.stop(STOP_TIMEOUT) {
                Ok(exit) => exits.push((role, exit)),
                Err(e) => failed = Err(e.context(format!("stopping {}", role.name()))),
            }
        }
        failed.map(|()| exits)
    }
}

/// Waits until RabbitMQ accepts a connection, trying every two seconds for at most `limit`,
/// so that a broker another user of the machine is restarting delays a measurement instead
/// of failing it halfway (a merge job published while the broker is down waits in the
/// outbox for the sweeper, which would time the sweeper, not the merge).
pub async fn wait_for_broker(amqp_url: &str, limit: Duration) -> anyhow::Result<()> {
    const ATTEMPT: Duration = Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let attempt = tokio::time::timeout(
            ATTEMPT,
            lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()),
        )
        .await;
        let error = match attempt {
            Ok(Ok(connection)) => {
                let _ = connection.close(200, "bye".into()).await;
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no connection within {ATTEMPT:?}"),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("RabbitMQ at {amqp_url} does not answer after {limit:?}: {error}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
