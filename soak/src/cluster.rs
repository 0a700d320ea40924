//! The deployment under test: its own Redis (append-only file, synced at every write) and
//! RabbitMQ, a namespace on them, and 2 `stitch-api` + 2 `stitch-worker` processes that the
//! nemesis kills, pauses and restarts. The APIs keep their ports across restarts (the
//! clients' view of a service address); the workers listen wherever they like.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use stitch_testkit::process::{LogWatch, ServiceProcess, current_rss, stitch_command};
use stitch_testkit::rabbit_server::RabbitServer;
use stitch_testkit::redis_server::RedisServer;
use stitch_testkit::{Services, TestEnv};

/// The sweeper's stuck-merge horizon the workers run with: an upload `merging` this long
/// without a lock holder is enqueued again. The checker allows this (and more) after the
/// nemesis stops before it calls an upload stuck.
pub const STUCK_MERGE_HORIZON: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Api,
    Worker,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Worker => "worker",
        }
    }
}

/// One process slot: the process (when running) and how to start it again.
pub struct Slot {
    pub role: Role,
    pub index: usize,
    /// The API's fixed address; a worker listens on any port.
    pub bind: Option<SocketAddr>,
    pub process: Option<ServiceProcess>,
    /// Starts, including restarts.
    pub starts: u32,
}

impl Slot {
    pub fn label(&self) -> String {
        format!("{}-{}", self.role.name(), self.index)
    }
}

/// Dropped in field order: the processes, the namespace (its keys and queues), then the
/// services.
pub struct Cluster {
    pub slots: Vec<Slot>,
    pub env: Arc<TestEnv>,
    pub rabbit: RabbitServer,
    pub redis: RedisServer,
    api_binary: PathBuf,
    worker_binary: PathBuf,
}

impl Cluster {
    /// Starts the services, then 2 APIs and 2 workers.
    pub fn start(work: &Path, api_binary: &Path, worker_binary: &Path) -> anyhow::Result<Self> {
        for binary in [api_binary, worker_binary] {
            anyhow::ensure!(binary.is_file(), "{} does not exist", binary.display());
        }
        let redis = RedisServer::start_persistent();
        let rabbit = RabbitServer::start_in(&work.join("rabbitmq"))?;
        let env = TestEnv::on(Services {
            redis_url: redis.url(),
            amqp_url: rabbit.url(),
        });
        let mut slots = Vec::new();
        for index in 0..2 {
            slots.push(Slot {
                role: Role::Api,
                index,
                bind: Some(free_addr()?),
                process: None,
                starts: 0,
            });
        }
        for index in 0..2 {
            slots.push(Slot {
                role: Role::Worker,
                index,
                bind: None,
                process: None,
                starts: 0,
            });
        }
        let mut cluster = Self {
            slots,
            env,
            rabbit,
            redis,
            api_binary: api_binary.to_owned(),
            worker_binary: worker_binary.to_owned(),
        };
        for slot in 0..cluster.slots.len() {
            cluster.start_slot(slot)?;
        }
        Ok(cluster)
    }

    /// The APIs' addresses (fixed across restarts).
    pub fn api_addrs(&self) -> Vec<SocketAddr> {
        self.slots.iter().filter_map(|s| s.bind).collect()
    }

    fn command(&self, slot: &Slot) -> Command {
        match slot.role {
            Role::Api => {
                let mut cmd = stitch_command(&self.api_binary, &self.env);
                let bind = slot.bind.expect("an API has a fixed address");
                cmd.env("STITCH__HTTP__BIND", bind.to_string())
                    .env("STITCH__AMQP__TIMEOUT", "3s")
                    // A PATCH is made durable every MiB; a dead request's lease lapses soon.
                    .env("STITCH__TUS__SEGMENT_SIZE", "1MiB")
                    .env("STITCH__TUS__APPEND_LEASE", "2s")
                    .env("STITCH__HTTP__SHUTDOWN_GRACE", "5s");
                cmd
            }
            Role::Worker => {
                let mut cmd = stitch_command(&self.worker_binary, &self.env);
                // Heartbeats every 5 s: a paused broker or a dead path is noticed soon.
                let amqp = format!("{}?heartbeat=5", self.rabbit.url());
                cmd.env("STITCH__AMQP__URL", amqp)
                    .env("STITCH__AMQP__TIMEOUT", "3s")
                    .env("STITCH__LOCK__TTL", "2s")
                    .env("STITCH__SWEEPER__INTERVAL", "500ms")
                    .env("STITCH__SWEEPER__OUTBOX_HORIZON", "1s")
                    .env(
                        "STITCH__SWEEPER__STUCK_MERGE_HORIZON",
                        format!("{}s", STUCK_MERGE_HORIZON.as_secs()),
                    )
                    .env("STITCH__HTTP__SHUTDOWN_GRACE", "5s");
                cmd
            }
        }
    }

    /// Starts the slot's process (it must not be running); retries a few times, as an
    /// orchestrator would (a restarted API's port may take a moment to be free).
    pub fn start_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        let listening = match self.slots[slot].role {
            Role::Api => "stitch-api listening",
            Role::Worker => "stitch-worker listening",
        };
        let watch = LogWatch {
            listening,
            record: Vec::new(),
            echo: false,
        };
        let mut last = None;
        for _ in 0..10 {
            match ServiceProcess::spawn(self.command(&self.slots[slot]), &watch) {
                Ok(process) => {
                    let s = &mut self.slots[slot];
                    s.process = Some(process);
                    s.starts += 1;
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Err(last.expect("an error"))
            .with_context(|| format!("starting {}", self.slots[slot].label()))
    }

    /// SIGKILLs the slot's process and reaps it.
    pub fn kill_slot(&mut self, slot: usize) {
        if let Some(mut process) = self.slots[slot].process.take() {
            process.signal("CONT");
            process.kill();
        }
    }

    /// SIGTERM, as an orchestrator's rolling restart does; SIGKILL past 30 s.
    pub fn terminate_slot(&mut self, slot: usize) -> Option<String> {
        let mut process = self.slots[slot].process.take()?;
        match process.stop(Duration::from_secs(30)) {
            Ok(status) if status.success() => None,
            Ok(status) => Some(format!(
                "{} exited with {status} on SIGTERM; its last output:\n{}",
                self.slots[slot].label(),
                process.log_tail()
            )),
            Err(e) => Some(format!("{}: {e:#}", self.slots[slot].label())),
        }
    }

    pub fn signal_slot(&self, slot: usize, signal: &str) {
        if let Some(process) = &self.slots[slot].process {
            process.signal(signal);
        }
    }

    /// Restarts every slot whose process is not running (or exited on its own, which is
    /// reported).
    pub fn ensure_running(&mut self) -> anyhow::Result<Vec<String>> {
        let mut exited = Vec::new();
        for slot in 0..self.slots.len() {
            let label = self.slots[slot].label();
            if let Some(process) = &mut self.slots[slot].process
                && let Ok(Some(status)) = process.child.try_wait()
            {
                exited.push(format!(
                    "{label} exited on its own ({status}); its last output:\n{}",
                    process.log_tail()
                ));
                self.slots[slot].process = None;
            }
            if self.slots[slot].process.is_none() {
                self.start_slot(slot)?;
            }
        }
        Ok(exited)
    }

    /// The resident memory of every running process, by role.
    pub fn rss(&self) -> Vec<(Role, u64)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let process = s.process.as_ref()?;
                Some((s.role, current_rss(process.pid()).ok()?))
            })
            .collect()
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
