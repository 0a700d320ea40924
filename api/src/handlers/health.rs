//! Probes and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: Redis and storage answer; otherwise 503. The broker is listed but not
/// required: while it is down, chunks are still accepted and merges wait in the outbox.
pub async fn readyz(State(app): State<AppState>) -> Response {
    let checks = app.uploads.check_ready().await;
    let ready = checks.iter().all(|c| !c.required || c.result.is_ok());
    let detail: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|check| {
            let value = match check.result {
                Ok(()) => serde_json::json!("ok"),
                Err(e) => serde_json::json!(e),
            };
            (check.name.to_owned(), value)
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": detail,
    });
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}
