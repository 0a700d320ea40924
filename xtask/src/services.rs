//! The Redis and RabbitMQ the tests talk to: the ones named by `STITCH_TEST_REDIS_URL` and
//! `STITCH_TEST_AMQP_URL`, or our own child processes.
//!
//! Our own run on free loopback ports, each in its own process group (so a Ctrl-C in the
//! terminal reaches the test runner, and we stop the services in order), with everything
//! they write under `target/xtask/`: Redis with no persistence; RabbitMQ as the private node
//! of `testkit/src/rabbitmq_node.rs` (its own `epmd`, configuration, database, logs and
//! Erlang cookie), so nothing of the system's RabbitMQ is read or touched, and a system
//! RabbitMQ can run beside it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::rabbitmq_node::{self, NodePorts};
use crate::tools::RABBITMQ_SERVER;

/// The process groups we started and have not stopped, for the interrupt handler.
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// The services of one test run. Dropping it stops the ones it started.
pub struct Services {
    redis_url: String,
    amqp_url: String,
    /// Stopped in reverse order: RabbitMQ before its epmd.
    started: Vec<Service>,
}

impl Services {
    /// The services named in the environment, or our own, started and answering. On an
    /// error, what was started is stopped again.
    pub fn provide(work: &Path) -> anyhow::Result<Self> {
        let mut services = Self {
            redis_url: String::new(),
            amqp_url: String::new(),
            started: Vec::new(),
        };
        services.redis_url = match std::env::var("STITCH_TEST_REDIS_URL") {
            Ok(url) => url,
            Err(_) => start_redis(&work.join("redis"), &mut services.started)?,
        };
        services.amqp_url = match std::env::var("STITCH_TEST_AMQP_URL") {
            Ok(url) => url,
            Err(_) => start_rabbitmq(&work.join("rabbitmq"), &mut services.started)?,
        };
        Ok(services)
    }

    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    /// The AMQP URL without its password, for logs.
    pub fn amqp_url_redacted(&self) -> String {
        match (self.amqp_url.find("://"), self.amqp_url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let user_info = &self.amqp_url[scheme + 3..at];
                let user = user_info.split(':').next().unwrap_or_default();
                format!(
                    "{}{user}:***{}",
                    &self.amqp_url[..scheme + 3],
                    &self.amqp_url[at..]
                )
            }
            _ => self.amqp_url.clone(),
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        while let Some(mut service) = self.started.pop() {
            service.stop();
        }
    }
}

/// One child process in its own process group.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id() as i32);
        Ok(Self { name, child, log })
    }

    /// Fails with the end of the service's log if it has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}) while starting; the end of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// SIGTERM to the group, SIGKILL after a grace period; reaps the child.
    fn stop(&mut self) {
        let group = self.child.id() as i32;
        signal_group(group, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Anything left in the group (the child itself, or what it started).
        signal_group(group, "KILL");
        let _ = self.child.wait();
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|g| *g != group);
    }
}

fn signal_group(group: i32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{group}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Every service still running, stopped at once (the interrupt handler): SIGTERM to each
/// group, three seconds, then SIGKILL.
pub fn stop_all_now() {
    let groups = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for group in groups.iter().rev() {
        signal_group(*group, "TERM");
    }
    if !groups.is_empty() {
        std::thread::sleep(Duration::from_secs(3));
    }
    for group in groups.iter().rev() {
        signal_group(*group, "KILL");
    }
}

/// A port on 127.0.0.1 that nothing listens on now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .context("binding 127.0.0.1:0 (is the loopback interface up?)")?;
    Ok(listener.local_addr()?.port())
}

/// A fresh directory: what a previous run left (a crashed run's database) is removed.
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn start_redis(dir: &Path, started: &mut Vec<Service>) -> anyhow::Result<String> {
    fresh_dir(dir)?;
    let port = free_port()?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--dir")
        .arg(dir)
        .arg("--pidfile")
        .arg(dir.join("redis.pid"))
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        // What deployments run with (invariant 9): keys are never evicted.
        .args(["--maxmemory-policy", "noeviction"]);
    let mut redis = Service::spawn("redis-server", cmd, dir.join("redis.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let waited = wait_until(&mut redis, Duration::from_secs(30), || redis_answers(addr));
    started.push(redis);
    waited?;
    println!("xtask: started Redis on {addr}");
    Ok(format!("redis://{addr}"))
}

fn redis_answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

fn start_rabbitmq(dir: &Path, started: &mut Vec<Service>) -> anyhow::Result<String> {
    fresh_dir(dir)?;
    let ports = NodePorts {
        amqp: free_port()?,
        dist: free_port()?,
        epmd: free_port()?,
    };
    rabbitmq_node::write_node_files(dir, ports)
        .with_context(|| format!("writing the node's files in {}", dir.display()))?;
    let logs = dir.join("log");

    // Our own epmd, so the node name is ours alone whatever else runs on the machine.
    let epmd = rabbitmq_node::epmd_command(ports);
    let mut epmd = Service::spawn("epmd", epmd, logs.join("epmd.log"))?;
    let epmd_addr = ports.epmd_addr();
    let waited = wait_until(&mut epmd, Duration::from_secs(10), || {
        TcpStream::connect_timeout(&epmd_addr, Duration::from_millis(300)).is_ok()
    });
    started.push(epmd);
    waited?;

    let cmd = rabbitmq_node::rabbitmq_command(Path::new(RABBITMQ_SERVER), dir, ports);
    let mut rabbit = Service::spawn("rabbitmq-server", cmd, logs.join("startup.log"))?;
    let addr = ports.amqp_addr();
    let waited = wait_until(&mut rabbit, Duration::from_secs(180), || {
        rabbitmq_node::amqp_answers(addr)
    });
    started.push(rabbit);
    waited?;
    println!("xtask: started RabbitMQ on {addr}");
    Ok(ports.amqp_url())
}

fn wait_until(
    service: &mut Service,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !ready() {
        service.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{} did not answer within {limit:?}; the end of {}:\n{}",
                service.name,
                service.log.display(),
                tail(&service.log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
