//! A private `rabbitmq-server`, for tests (and the soak) that kill the broker and bring it
//! back: its own node, `epmd`, free loopback ports and directories (the recipe of
//! [`crate::rabbitmq_node`], the one `cargo xtask test` uses), killed with SIGKILL and
//! started again on the same ports over the same database, so that durable queues and the
//! persistent messages they held come back as they would on a real node.
//!
//! A start takes seconds (the Erlang VM boots): keep the tests that need one few.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustix::process::{Pid, Signal, kill_process_group};

use crate::rabbitmq_node::{self, NodePorts};

/// How long a boot may take (a loaded 2-core machine boots in 5-20 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// One RabbitMQ node on 127.0.0.1 and its `epmd`, stopped when it drops.
pub struct RabbitServer {
    ports: NodePorts,
    dir: PathBuf,
    /// Kept for its removal at the drop, unless the node's files are the caller's.
    _temp: Option<tempfile::TempDir>,
    epmd: Option<Child>,
    node: Option<Child>,
}

impl RabbitServer {
    /// Starts a node in a fresh temporary directory and waits until it answers AMQP.
    pub fn start() -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("stitch-rabbitmq-")
            .tempdir()
            .context("creating the RabbitMQ directory")?;
        let dir = temp.path().to_owned();
        Self::start_in_dir(dir, Some(temp))
    }

    /// Starts a node whose files live in `dir` (emptied first), e.g. where a soak keeps its
    /// logs.
    pub fn start_in(dir: &Path) -> anyhow::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Self::start_in_dir(dir.to_owned(), None)
    }

    fn start_in_dir(dir: PathBuf, temp: Option<tempfile::TempDir>) -> anyhow::Result<Self> {
        let ports = NodePorts {
            amqp: free_port()?,
            dist: free_port()?,
            epmd: free_port()?,
        };
        rabbitmq_node::write_node_files(&dir, ports)
            .with_context(|| format!("writing the node's files in {}", dir.display()))?;
        let mut server = Self {
            ports,
            dir,
            _temp: temp,
            epmd: None,
            node: None,
        };
        server.start_epmd()?;
        server.start_node()?;
        Ok(server)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        self.ports.amqp_url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.ports.amqp_addr()
    }

    /// The node's directory: its configuration, database (`mnesia`) and logs (`log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_running(&self) -> bool {
        self.node.is_some()
    }

    /// Kills the node (SIGKILL to its process group: the Erlang VM and its helpers) and
    /// reaps it. Its `epmd` stays, as a host's would.
    pub fn kill(&mut self) {
        if let Some(mut node) = self.node.take() {
            kill_group(&node, Signal::KILL);
            let _ = node.wait();
        }
    }

    /// Kills the node if it runs and starts it again on the same ports over the same
    /// database; waits until it answers AMQP.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start_node()
    }

    /// Freezes the node (SIGSTOP to its group): its connections stay open and nothing
    /// answers, until [`RabbitServer::resume`].
    pub fn pause(&self) {
        if let Some(node) = &self.node {
            kill_group(node, Signal::STOP);
        }
    }

    pub fn resume(&self) {
        if let Some(node) = &self.node {
            kill_group(node, Signal::CONT);
        }
    }

    /// Stops the node and its `epmd` (SIGKILL: nothing is kept for later anyway).
    pub fn stop(&mut self) {
        self.resume();
        self.kill();
        if let Some(mut epmd) = self.epmd.take() {
            let _ = epmd.kill();
            let _ = epmd.wait();
        }
    }

    fn start_epmd(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("log").join("epmd.log");
        let mut epmd = spawn_in_group(rabbitmq_node::epmd_command(self.ports), &log)?;
        let addr = self.ports.epmd_addr();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err() {
            if let Some(status) = epmd.try_wait()? {
                bail!("epmd exited ({status}): {}", tail(&log, 20));
            }
            if Instant::now() > deadline {
                let _ = epmd.kill();
                let _ = epmd.wait();
                bail!("epmd did not listen on {addr} within 10s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.epmd = Some(epmd);
        Ok(())
    }

    fn start_node(&mut self) -> anyhow::Result<()> {
        let server = Path::new(rabbitmq_node::RABBITMQ_SERVER);
        anyhow::ensure!(
            server.exists(),
            "{} is missing (is rabbitmq-server installed?)",
            server.display()
        );
        let log = self.dir.join("log").join("startup.log");
        let cmd = rabbitmq_node::rabbitmq_command(server, &self.dir, self.ports);
        let mut node = spawn_in_group(cmd, &log)?;
        let addr = self.ports.amqp_addr();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !rabbitmq_node::amqp_answers(addr) {
            if let Some(status) = node.try_wait()? {
                bail!(
                    "rabbitmq-server exited ({status}) while starting; the end of {}:\n{}",
                    log.display(),
                    tail(&log, 30)
                );
            }
            if Instant::now() > deadline {
                kill_group(&node, Signal::KILL);
                let _ = node.wait();
                bail!(
                    "rabbitmq-server did not answer on {addr} within {BOOT_TIMEOUT:?}; the end of {}:\n{}",
                    log.display(),
                    tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.node = Some(node);
        Ok(())
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `cmd` as the leader of a new process group, its output appended to `log`.
fn spawn_in_group(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))
}

fn kill_group(child: &Child, signal: Signal) {
    let _ = kill_process_group(Pid::from_child(child), signal);
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
