//! `stitch-bench`: runs one benchmark (a subcommand) and prints its Markdown report.

use std::process::ExitCode;

use clap::Parser;
use stitch_bench::cli::{Cli, Command};

fn main() -> ExitCode {
    // Before any client exists.
    stitch_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ingest(args) => stitch_bench::ingest::run(&args),
        Command::Merge(args) => stitch_bench::merge::run(&args),
        Command::SingleNode(args) => stitch_bench::single_node::run(&args),
        Command::Tus(args) => stitch_bench::tus::run(&args),
        Command::Pace(args) => stitch_bench::pace::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stitch-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
