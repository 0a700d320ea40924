//! What every subcommand takes on its command line besides its own scenario: where to work,
//! which services, how to keep other work out of the numbers, and where the report goes; and
//! how sizes are written.

use std::path::PathBuf;

use anyhow::Context as _;
use stitch_common::config::ByteSize;
use stitch_testkit::Services;

/// Options of every benchmark: where to work, which services, how to keep other work out of
/// the numbers, and where the report goes.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Work directory; a fresh `run-…` directory is made inside it and removed at the end.
    /// It must be on the disk to measure: the processes' storage and the disk baseline go
    /// there.
    #[arg(long, default_value = crate::workdir::DEFAULT_PARENT)]
    pub dir: PathBuf,
    /// Redis for the distributed processes (each run gets a random namespace `bench-<hex>`
    /// whose keys are deleted afterwards).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// RabbitMQ for the distributed processes (the namespace's exchanges and queues are
    /// deleted afterwards). `ingest` is measured all the same when it is down: the API's
    /// publish of the merge job fails, and the upload's outbox keeps the job.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Before each measurement, wait up to this many seconds for the machine to be idle
    /// (under 0.25 cores busy over a second), so that other work (a build, a test run) does
    /// not end up in the numbers; 0 to not wait.
    #[arg(long, default_value_t = 120)]
    pub wait_idle: u64,
    /// Repeat a measurement up to this many times when it was disturbed (other processes,
    /// and for `ingest` kernel threads too, used 0.35 cores or more while it ran); the report
    /// says how many were discarded, and flags one that never ran undisturbed.
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
    /// Replace this benchmark's section of the docs file with this run's report.
    #[arg(long)]
    pub write_docs: bool,
    /// The docs file that `--write-docs` updates.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub docs: PathBuf,
}

impl RunArgs {
    /// A connection to `--redis-url`: made before anything else, so that a missing Redis
    /// fails the run at once.
    pub fn redis(&self) -> anyhow::Result<redis::Connection> {
        self.services()
            .redis()
            .with_context(|| format!("connecting to Redis at {}", self.redis_url))
    }

    /// The Redis and RabbitMQ of `--redis-url` and `--amqp-url`.
    pub fn services(&self) -> Services {
        Services {
            redis_url: self.redis_url.clone(),
            amqp_url: self.amqp_url.clone(),
        }
    }
}

/// Parses a byte size the way Stitch's configuration does (`1GiB`, `8MiB`, `1048576`).
pub fn parse_size(raw: &str) -> Result<u64, String> {
    match ByteSize::parse(raw) {
        Some(ByteSize(0)) => Err("must be at least 1 byte".into()),
        Some(ByteSize(n)) => Ok(n),
        None => Err(format!(
            "{raw:?} is not a byte size (e.g. 1GiB, 8MiB, 1048576)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_the_configuration_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }
}
