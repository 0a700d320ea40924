//! The `stitch-worker` command line: load settings (failing fast, exit code 2, naming the
//! bad key), set up logging, run the configured roles until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stitch_common::config::Settings;

#[derive(Parser)]
#[command(name = "stitch-worker", version, about = "Stitch merge worker")]
struct Args {
    /// Configuration file (TOML or YAML); environment variables override it.
    #[arg(long, env = "STITCH_CONFIG")]
    config: Option<PathBuf>,
}

/// The whole `stitch-worker` program.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let defaults = [("http.bind", crate::DEFAULT_BIND)];
    let settings = match Settings::load(args.config.as_deref(), &defaults) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stitch-worker: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let _telemetry =
        stitch_common::telemetry::init(&settings.log, &settings.tracing, "stitch-worker");
    let run = async {
        let worker = crate::Worker::build(&settings).await?;
        worker
            .run_until_stopped(stitch_common::shutdown::signal())
            .await
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("stitch-worker failed: {e:#}");
            eprintln!("stitch-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
