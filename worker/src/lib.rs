//! Stitch's merge worker. The merge pipeline (RabbitMQ consumer, fenced lock, concatenate +
//! MD5, completion events) arrives with the merge issue; today the worker serves its probes
//! and metrics so that deployments can already run and watch it.
//!
//! Like the API, it is a library with a thin `main.rs`: [`Worker::build`] then
//! [`Worker::run_until_stopped`], so tests and the single-node mode can run it in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use stitch_common::config::Settings;
use stitch_common::server::{self, ServerLimits};
use stitch_common::state::{RedisStateStore, StateStore};
use tokio::net::TcpListener;

/// The worker's default bind, beside the API's 8080, so both run on one machine unchanged.
pub const DEFAULT_BIND: &str = "127.0.0.1:8081";

#[derive(Clone)]
struct ProbeState {
    state: Arc<dyn StateStore>,
    metrics: PrometheusHandle,
}

/// A bound, not yet running worker.
pub struct Worker {
    listener: TcpListener,
    probes: ProbeState,
    limits: ServerLimits,
}

impl Worker {
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let state: Arc<dyn StateStore> = Arc::new(
            RedisStateStore::new(&settings.redis, &settings.namespace)
                .context("setting up the Redis state store")?,
        );
        let listener = TcpListener::bind(settings.http.bind)
            .await
            .with_context(|| format!("binding STITCH__HTTP__BIND={}", settings.http.bind))?;
        Ok(Self {
            listener,
            probes: ProbeState {
                state,
                metrics: stitch_common::telemetry::metrics_handle(),
            },
            limits: ServerLimits {
                header_read_timeout: settings.http.header_read_timeout.0,
                shutdown_grace: settings.http.shutdown_grace.0,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves the probes until `shutdown` completes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr(), "stitch-worker listening");
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.probes);
        server::serve(self.listener, router, self.limits, shutdown)
            .await
            .context("serving the worker's probes")
    }
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(probes): State<ProbeState>) -> Response {
    match probes.state.ping().await {
        Ok(()) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "unavailable", "checks": { "redis": e.to_string() } })),
        )
            .into_response(),
    }
}

async fn metrics(State(probes): State<ProbeState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        probes.metrics.render(),
    )
        .into_response()
}
