//! The `stitch-api` command line: load settings (failing fast, exit code 2, naming the bad
//! key), set up logging, serve until SIGTERM.

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

/// The whole `stitch-api` program.
pub fn main() -> ExitCode {
    stitch_common::heap::keep_freed_memory();
    // Before any client exists: the OTLP exporter and the webhook clients need it.
    stitch_common::tls::install_crypto_provider();
    let args = Args::parse();
    let settings = match Settings::load(args.config.as_deref(), &[]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stitch-api: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = stitch_common::telemetry::init(&settings.log, &settings.tracing, "stitch-api");
    // Test builds: arm the failpoints named in FAILPOINTS for the life of the process.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let run = async {
        let app = crate::Application::build(&settings).await?;
        app.run_until_stopped(stitch_common::shutdown::signal())
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
            tracing::error!("stitch-api failed: {e:#}");
            eprintln!("stitch-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}
