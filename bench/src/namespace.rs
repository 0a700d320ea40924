//! Housekeeping for benchmarks that share the machine's Redis and RabbitMQ: a random
//! namespace per API process, and afterwards its Redis keys and its RabbitMQ exchanges and
//! queues deleted, so that a benchmark leaves both as it found them. Also Redis's own CPU
//! time, since Redis shares the cores with what is measured.

use std::time::Duration;

use anyhow::Context;
use stitch_common::config::{Secret, Settings};
use stitch_common::queue::AmqpBroker;

/// Bound on connecting to Redis and on each command.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh namespace (`<prefix>-<16 hex digits>`), valid as `STITCH__NAMESPACE`.
pub fn random_namespace(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// A synchronous connection to the benchmark's Redis.
pub struct Redis {
    connection: redis::Connection,
}

impl Redis {
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(url).with_context(|| format!("parsing Redis URL {url}"))?;
        let connection = client
            .get_connection_with_timeout(TIMEOUT)
            .with_context(|| format!("connecting to Redis at {url}"))?;
        connection
            .set_read_timeout(Some(TIMEOUT))
            .context("setting the Redis read timeout")?;
        Ok(Self { connection })
    }

    /// Deletes every key of `namespace` (`<namespace>:*`); returns how many there were.
    pub fn delete_namespace(&mut self, namespace: &str) -> anyhow::Result<u64> {
        let pattern = format!("{namespace}:*");
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut self.connection)
                .with_context(|| format!("scanning Redis for {pattern}"))?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query(&mut self.connection)
                    .with_context(|| format!("deleting the keys of {namespace}"))?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The values of `fields` in the hash `key`, in order (`None` for a missing field).
    pub fn hash_fields(
        &mut self,
        key: &str,
        fields: &[&str],
    ) -> anyhow::Result<Vec<Option<String>>> {
        redis::cmd("HMGET")
            .arg(key)
            .arg(fields)
            .query(&mut self.connection)
            .with_context(|| format!("reading {key} from Redis"))
    }

    /// The CPU time the Redis server has used since it started (`INFO cpu`: user + system of
    /// the main process).
    pub fn cpu_time(&mut self) -> anyhow::Result<Duration> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query(&mut self.connection)
            .context("asking Redis for INFO cpu")?;
        parse_info_cpu(&info).context("INFO cpu has no used_cpu_sys / used_cpu_user")
    }
}

/// Deletes the RabbitMQ exchanges and queues of `namespace` (the API declares them when it
/// first publishes a merge job), using the project's own topology so that the names match.
/// Deleting what was never declared is fine.
pub async fn delete_broker_namespace(amqp_url: &str, namespace: &str) -> anyhow::Result<()> {
    let mut settings = Settings {
        namespace: namespace.to_owned(),
        ..Settings::default()
    };
    settings.amqp.url = Secret::new(amqp_url);
    AmqpBroker::new(&settings)
        .delete_topology()
        .await
        .with_context(|| format!("deleting the RabbitMQ exchanges and queues of {namespace}"))
}

/// Waits until RabbitMQ accepts a connection, trying every two seconds for at most `limit`,
/// so that a broker another user of the machine is restarting delays a measurement instead
/// of failing it halfway (a merge job published while the broker is down waits in the
/// outbox for the sweeper, which would time the sweeper, not the merge).
pub async fn wait_for_broker(amqp_url: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let attempt = tokio::time::timeout(
            TIMEOUT,
            lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()),
        )
        .await;
        let error = match attempt {
            Ok(Ok(connection)) => {
                let _ = connection.close(200, "bye".into()).await;
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no connection within {TIMEOUT:?}"),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("RabbitMQ at {amqp_url} does not answer after {limit:?}: {error}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn parse_info_cpu(info: &str) -> Option<Duration> {
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))?
            .parse()
            .ok()
    };
    let secs = field("used_cpu_sys")? + field("used_cpu_user")?;
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_valid_and_distinct() {
        let a = random_namespace("bench");
        let b = random_namespace("bench");
        assert_ne!(a, b);
        assert!(a.starts_with("bench-") && a.len() == "bench-".len() + 16);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
    }

    #[test]
    fn redis_cpu_time_adds_system_and_user() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9.0\r\n";
        assert_eq!(parse_info_cpu(info), Some(Duration::from_millis(3750)));
        assert_eq!(parse_info_cpu("# CPU\r\n"), None);
    }
}
