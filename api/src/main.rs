//! `stitch-api`: the HTTP API. Configuration: see the README (`--config` or `STITCH_CONFIG`,
//! overridden by `STITCH__<SECTION>__<KEY>`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stitch_common::config::Settings;

#[derive(Parser)]
#[command(name = "stitch-api", version, about = "Stitch HTTP API")]
struct Args {
    /// Configuration file (TOML or YAML); environment variables override it.
    #[arg(long, env = "STITCH_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load(args.config.as_deref(), &[]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stitch-api: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    stitch_common::telemetry::init(&settings.log);
    let run = async {
        let app = stitch_api::Application::build(&settings).await?;
        app.run_until_stopped(stitch_common::shutdown::signal())
            .await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("stitch-api failed: {e:#}");
            eprintln!("stitch-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}
