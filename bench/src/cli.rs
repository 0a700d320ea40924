//! The command line: one subcommand per benchmark. The options they share are in
//! [`crate::options`], which the subcommands use without knowing this file.

use clap::{Parser, Subcommand};

use crate::ingest::IngestArgs;
use crate::merge::MergeArgs;
use crate::pace::PaceArgs;
use crate::single_node::SingleNodeArgs;
use crate::tus::TusArgs;

#[derive(Parser, Debug)]
#[command(
    name = "stitch-bench",
    version,
    about = "Benchmarks of Stitch's release binaries on this machine",
    long_about = "Benchmarks of Stitch's release binaries on this machine.\n\n\
        Each subcommand starts the real binaries (build them first with `cargo build --release \
        -p stitch-api -p stitch-worker -p stitch-cli -p stitch-bench`), drives them over \
        loopback, checks every result, measures the machine's own limits in the same run, and \
        prints a Markdown report; with --write-docs it also rewrites its own section of \
        docs/benchmarks.md. Run from the workspace root, with Redis on 127.0.0.1:6379 and \
        RabbitMQ on 127.0.0.1:5672, on an otherwise idle machine."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Chunk ingest through `stitch-api` against the disk and MD5 limits, and its peak RSS.
    Ingest(IngestArgs),
    /// The merge of an upload by `stitch-worker` against the MD5 of its chunk files alone,
    /// and the delay to the `upload.completed` event.
    #[command(long_about = crate::merge::LONG_ABOUT)]
    Merge(MergeArgs),
    /// The same upload through `stitch serve` (single-node, SQLite) and through
    /// `stitch-api` + `stitch-worker` (Redis, RabbitMQ), alternating.
    #[command(long_about = crate::single_node::LONG_ABOUT)]
    SingleNode(SingleNodeArgs),
    /// tus ingest (one long `PATCH`, small `PATCH`es) against the chunk protocol from one
    /// client and the disk, and the API's peak RSS per `PATCH` size.
    #[command(long_about = crate::tus::LONG_ABOUT)]
    Tus(TusArgs),
    /// First byte → verified file with `merge.incremental` off and on, against a bare sink
    /// and MD5, in order and shuffled; and the merge tail after the last chunk.
    #[command(long_about = crate::pace::LONG_ABOUT)]
    Pace(PaceArgs),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_parses_with_its_defaults() {
        for name in ["ingest", "merge", "single-node", "tus", "pace"] {
            let cli = Cli::try_parse_from(["stitch-bench", name]).unwrap();
            let parsed = match cli.command {
                Command::Ingest(_) => "ingest",
                Command::Merge(_) => "merge",
                Command::SingleNode(_) => "single-node",
                Command::Tus(_) => "tus",
                Command::Pace(_) => "pace",
            };
            assert_eq!(parsed, name);
        }
    }

    #[test]
    fn pace_takes_lists_of_sizes_and_client_counts() {
        let cli = Cli::try_parse_from(["stitch-bench", "pace"]).unwrap();
        let Command::Pace(args) = cli.command else {
            panic!("not pace");
        };
        assert_eq!(args.sizes, [1 << 30, 10 << 30]);
        assert_eq!(args.clients, [1, 4]);
        assert_eq!((args.chunk_size, args.repeats), (8 << 20, 1));
        let cli =
            Cli::try_parse_from(["stitch-bench", "pace", "--sizes", "64MiB", "--clients", "4"])
                .unwrap();
        let Command::Pace(args) = cli.command else {
            panic!("not pace");
        };
        assert_eq!((args.sizes, args.clients), (vec![64 << 20], vec![4]));
    }
}
