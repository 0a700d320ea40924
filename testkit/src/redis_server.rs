//! Private `redis-server` processes, for tests that need several independent Redis nodes
//! (the lock's Redlock quorum) and need to take them down, freeze them and bring them back.
//!
//! Each server listens on its own free loopback port, keeps its files in its own directory
//! under a temporary directory and is killed when it drops. [`RedisServer::start`] persists
//! nothing (a restart comes back empty, as a node without persistence does);
//! [`RedisServer::start_persistent`] runs as deployments do (invariant 9): an append-only
//! file synced at every write (`appendfsync always`), so that a SIGKILL and a restart keep
//! every write the server acknowledged.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` on 127.0.0.1, stopped and restarted on the same port.
pub struct RedisServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    /// Whether the server keeps an append-only file (and a restart reloads it).
    persistent: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server without persistence on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts a server with an append-only file synced at every write (`appendonly yes`,
    /// `appendfsync always`) in its own directory: a [`RedisServer::kill`] and a
    /// [`RedisServer::restart`] keep every acknowledged write.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("stitch-redis-")
            .tempdir()
            .expect("creating the Redis directory");
        // Another process may take the port between choosing it and the server binding it.
        let mut last_error = String::new();
        for _ in 0..5 {
            let addr = free_port();
            match spawn(addr, dir.path(), persistent) {
                Ok(child) => {
                    return Self {
                        addr,
                        dir,
                        persistent,
                        child: Some(child),
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("no redis-server started on a free port after 5 tries: {last_error}");
    }

    /// `n` independent servers.
    pub fn start_many(n: usize) -> Vec<Self> {
        (0..n).map(|_| Self::start()).collect()
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connection to this server (for looking at what it holds).
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connecting to redis-server on {}: {e}", self.addr))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The directory the server keeps its files in (its append-only file, its log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL, which also ends a paused one) and reaps it: what it held
    /// in memory is gone; a persistent server's append-only file stays for a restart.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Kills the server (SIGKILL, which also ends a paused one) and reaps it: everything it
    /// held in memory is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): it keeps its connections and answers nothing, as a node
    /// behind a stalled network would, until [`Self::resume`].
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Kills the server if it runs, starts it again on the same port and waits until it
    /// answers: empty, or for a persistent server with what its append-only file holds.
    pub fn restart(&mut self) {
        self.stop();
        // The port was just released; the kernel may take a moment to let it go.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match spawn(self.addr, self.dir.path(), self.persistent) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("redis-server on {} not back yet: {e}", self.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("redis-server did not restart on {}: {e}", self.addr),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `redis-server` on `addr` and waits until it answers; on failure nothing is left
/// running.
fn spawn(addr: SocketAddr, dir: &Path, persistent: bool) -> Result<Child, String> {
    let mut child = redis_command(addr, dir, persistent)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting redis-server (is it installed?): {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            return Err(format!("redis-server exited with {status}: {log}"));
        }
        if answers_ping(addr) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("redis-server did not answer PING within 10s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn redis_command(addr: SocketAddr, dir: &Path, persistent: bool) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(["--save", "", "--daemonize", "no"])
        .args(["--maxmemory-policy", "noeviction"]);
    if persistent {
        // Every write is in the file before the client hears of it.
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    cmd
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

fn answers_ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}
