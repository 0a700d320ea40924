//! The command line: one subcommand per benchmark, and the argument types they share.

use clap::{Parser, Subcommand};
use stitch_common::config::ByteSize;

use crate::ingest::IngestArgs;

#[derive(Parser, Debug)]
#[command(
    name = "stitch-bench",
    version,
    about = "Benchmarks of Stitch's release binaries on this machine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Chunk ingest through `stitch-api` against the disk and MD5 limits, and its peak RSS.
    Ingest(IngestArgs),
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

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
