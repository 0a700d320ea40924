//! How to run a private RabbitMQ node: the files it reads and the commands that start it
//! and its `epmd`. Shared by [`crate::rabbit_server`] (tests that kill and restart their own
//! broker) and `cargo xtask test` (the suite's broker), which includes this file by path so
//! that it stays free of the workspace's dependencies: only `std` here.
//!
//! The node is `stitch-test@localhost`, registered with its own `epmd` on its own port, with
//! its own configuration, environment file, plugins list (none), database, logs and Erlang
//! cookie (its own `HOME`), so nothing of the system's RabbitMQ — node, directories,
//! `/etc/rabbitmq` — is read or touched, and a system RabbitMQ can run beside it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where Debian's package puts the server's start script (it is not on `PATH`).
pub const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The loopback ports of one node.
#[derive(Clone, Copy, Debug)]
pub struct NodePorts {
    /// AMQP clients.
    pub amqp: u16,
    /// Erlang distribution (the CLI tools).
    pub dist: u16,
    /// The node's own `epmd`.
    pub epmd: u16,
}

impl NodePorts {
    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.amqp))
    }

    pub fn epmd_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.epmd))
    }

    /// The URL of the node's default virtual host, as the `guest` user.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp_addr())
    }
}

/// Writes the node's configuration under `dir` (which must exist) and makes its `home` and
/// `log` directories. The database (`mnesia`) is left as it is: a node started again over
/// the same directory keeps its durable queues and persistent messages.
pub fn write_node_files(dir: &Path, ports: NodePorts) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("home"))?;
    std::fs::create_dir_all(dir.join("log"))?;
    std::fs::write(
        dir.join("rabbitmq.conf"),
        format!(
            "listeners.tcp.default = 127.0.0.1:{}\n\
             loopback_users.guest = true\n",
            ports.amqp
        ),
    )?;
    std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
    std::fs::write(dir.join("enabled_plugins"), "[].\n")
}

/// `epmd` on the node's own port, on loopback only.
pub fn epmd_command(ports: NodePorts) -> Command {
    let mut cmd = Command::new("epmd");
    cmd.args(["-port", &ports.epmd.to_string(), "-address", "127.0.0.1"]);
    cmd
}

/// `rabbitmq-server` (the script at `server`) as the node of `dir` on `ports`, with an
/// environment of its own only.
pub fn rabbitmq_command(server: &Path, dir: &Path, ports: NodePorts) -> Command {
    let logs = dir.join("log");
    let mut cmd = Command::new(server);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.join("home"))
        .env("LANG", "C.UTF-8")
        .env("RABBITMQ_NODENAME", "stitch-test@localhost")
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", ports.amqp.to_string())
        .env("RABBITMQ_DIST_PORT", ports.dist.to_string())
        .env("ERL_EPMD_PORT", ports.epmd.to_string())
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", &logs)
        .env("RABBITMQ_LOGS", logs.join("rabbit.log"))
        .env("RABBITMQ_PID_FILE", dir.join("rabbit.pid"))
        .current_dir(dir);
    cmd
}

/// Whether an AMQP 0-9-1 server answers the protocol header with its `Connection.Start`.
pub fn amqp_answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut frame_type = [0u8; 1];
    stream.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && stream.read_exact(&mut frame_type).is_ok()
        && frame_type[0] == 1
}
