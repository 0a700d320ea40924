//! `stitch-bench`: runs one benchmark (a subcommand) and prints its Markdown report.

use std::process::ExitCode;

use clap::Parser;
use stitch_bench::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ingest(args) => stitch_bench::ingest::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stitch-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
