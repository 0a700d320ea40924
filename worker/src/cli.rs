//! The `stitch-worker` command line: load settings (failing fast, exit code 2, naming the
//! bad key), set up logging, run the configured roles until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stitch_common::config::Settings;
use stitch_common::migrate;

#[derive(Parser)]
#[command(name = "stitch-worker", version, about = "Stitch merge worker")]
struct Args {
    /// Configuration file (TOML or YAML); environment variables override it.
    #[arg(long, env = "STITCH_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the migrations (broker topology, Redis schema) this build needs, then exit. Safe
    /// to run concurrently: one run applies, the others wait and find nothing to do.
    Migrate {
        /// Only check: exit 0 when the schema fits this build, 3 when it does not.
        #[arg(long)]
        check: bool,
        /// With --check, keep checking for this many seconds before giving up (an init
        /// container waiting for the deploy's migration Job); without, how long to wait for
        /// another run's lock.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
}

/// Exit code of `migrate --check` when the schema does not fit.
const NOT_MIGRATED: u8 = 3;

/// The whole `stitch-worker` program.
pub fn main() -> ExitCode {
    stitch_common::heap::keep_freed_memory();
    // Before any client exists: the OTLP exporter and the webhook clients need it.
    stitch_common::tls::install_crypto_provider();
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
    // Test builds: arm the failpoints named in FAILPOINTS for the life of the process.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if let Some(Command::Migrate { check, wait }) = args.command {
        return run_migrate(&settings, check, wait);
    }
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

/// `stitch-worker migrate`.
fn run_migrate(settings: &Settings, check: bool, wait: Option<u64>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stitch-worker migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let wait = std::time::Duration::from_secs(wait.unwrap_or(if check { 0 } else { 600 }));
    runtime.block_on(async {
        if check {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let problem = match migrate::read_state(settings).await {
                    Ok(state) => match state.incompatibility() {
                        None => {
                            println!(
                                "schema version {} fits this build (needs {})",
                                state.version,
                                migrate::SCHEMA_VERSION
                            );
                            return ExitCode::SUCCESS;
                        }
                        Some(why) => why,
                    },
                    Err(e) => format!("{e:#}"),
                };
                if tokio::time::Instant::now() >= deadline {
                    eprintln!("stitch-worker migrate --check: {problem}");
                    return ExitCode::from(NOT_MIGRATED);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        match migrate::apply(settings, wait).await {
            Ok(applied) if applied.steps.is_empty() => {
                println!(
                    "schema already at version {} (this build needs {}): nothing to do",
                    applied.from,
                    migrate::SCHEMA_VERSION
                );
                ExitCode::SUCCESS
            }
            Ok(applied) => {
                println!(
                    "schema migrated from version {} to {}: {}",
                    applied.from,
                    applied.to,
                    applied.steps.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("stitch-worker migrate: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
