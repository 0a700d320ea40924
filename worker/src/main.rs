//! `stitch-worker`: the merge worker (today: its probes and metrics; see `lib.rs`).

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

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let defaults = [("http.bind", stitch_worker::DEFAULT_BIND)];
    let settings = match Settings::load(args.config.as_deref(), &defaults) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stitch-worker: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    stitch_common::telemetry::init(&settings.log);
    let run = async {
        let worker = stitch_worker::Worker::build(&settings).await?;
        worker
            .run_until_stopped(stitch_common::shutdown::signal())
            .await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("stitch-worker failed: {e:#}");
            eprintln!("stitch-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
