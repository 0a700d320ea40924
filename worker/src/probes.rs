//! The worker's own HTTP port: `/healthz`, `/readyz` (Redis and, when merging, the broker)
//! and `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use stitch_common::queue::WorkQueue;
use stitch_common::state::StateStore;

#[derive(Clone)]
pub struct Probes {
    pub state: Arc<dyn StateStore>,
    pub queue: Option<Arc<dyn WorkQueue>>,
    pub metrics: PrometheusHandle,
}

pub fn router(probes: Probes) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(probes): State<Probes>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    match probes.state.ping().await {
        Ok(()) => {
            checks.insert("state".into(), "ok".into());
        }
        Err(e) => {
            ready = false;
            checks.insert("state".into(), e.to_string().into());
        }
    }
    if let Some(queue) = &probes.queue {
        match queue.ping().await {
            Ok(()) => {
                checks.insert("queue".into(), "ok".into());
            }
            Err(e) => {
                ready = false;
                checks.insert("queue".into(), e.to_string().into());
            }
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": checks,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(probes): State<Probes>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        probes.metrics.render(),
    )
        .into_response()
}
