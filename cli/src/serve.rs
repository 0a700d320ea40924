//! `stitch serve`: the single-node server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use stitch_common::backends::Backends;
use stitch_common::config::Settings;
use tokio::sync::watch;

use crate::Failure;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML or YAML); `STITCH__*` environment variables override it.
    #[arg(long, env = "STITCH_CONFIG")]
    config: Option<PathBuf>,
    /// The embedded database [default: <storage root>/stitch.db].
    #[arg(long)]
    db: Option<PathBuf>,
}

pub async fn run(args: ServeArgs) -> Result<(), Failure> {
    let settings = Settings::load(args.config.as_deref(), &[])
        .map_err(|e| Failure::Usage(format!("invalid configuration: {e}")))?;
    let _telemetry = stitch_common::telemetry::init(&settings.log, &settings.tracing, "stitch");
    let db = args
        .db
        .unwrap_or_else(|| stitch_common::embedded::default_path(&settings));
    let backends = Backends::embedded(&settings, &db)
        .with_context(|| format!("opening the embedded database {}", db.display()))?;
    tracing::info!(db = %db.display(), storage = %settings.storage.root.display(), "single-node mode");
    let worker = stitch_worker::Worker::without_probes(&settings, backends.clone())?;
    let api = stitch_api::Application::build_with(&settings, &backends)
        .await?
        .with_routes(worker.admin_routes()?);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        stitch_common::shutdown::signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let (api_result, worker_result) = tokio::join!(
        api.run_until_stopped(stopped(stop_rx.clone())),
        worker.run_until_stopped(stopped(stop_rx)),
    );
    api_result?;
    worker_result?;
    Ok(())
}
