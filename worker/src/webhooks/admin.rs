//! Admin endpoints of the webhook dispatcher, on the worker's own port, behind a bearer token
//! (`webhooks.admin_token`; without one they do not exist):
//!
//! - `GET /admin/events/{event_id}`: the event and its delivery log;
//! - `POST /admin/events/{event_id}/replay`: deliver it again to every target (same
//!   `webhook-id`: receivers that already have it deduplicate);
//! - `POST /admin/webhooks/{endpoint}/enable`: enable an endpoint a 410 disabled.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use stitch_common::config::Secret;

use super::Dispatcher;

#[derive(Clone)]
struct Admin {
    dispatcher: Arc<Dispatcher>,
    token: Arc<Secret>,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// The admin routes; none when no token is configured.
pub fn router(dispatcher: Arc<Dispatcher>, token: Option<Secret>) -> Router {
    let Some(token) = token else {
        return Router::new();
    };
    let admin = Admin {
        dispatcher,
        token: Arc::new(token),
    };
    Router::new()
        .route("/admin/events/{event_id}", get(show_event))
        .route("/admin/events/{event_id}/replay", post(replay))
        .route("/admin/webhooks/{endpoint}/enable", post(enable))
        .layer(middleware::from_fn_with_state(admin.clone(), authorize))
        .with_state(admin)
}

/// Constant-time comparison, so that the token cannot be guessed byte by byte from timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if same(presented.as_bytes(), admin.token.expose().as_bytes()) {
        next.run(request).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid admin bearer token is required",
        )
    }
}

async fn show_event(State(admin): State<Admin>, Path(event_id): Path<String>) -> Response {
    let store = admin.dispatcher.store();
    match (store.event(&event_id).await, store.attempts(&event_id).await) {
        (Ok(Some(body)), Ok(attempts)) => axum::Json(serde_json::json!({
            "event_id": event_id,
            "event": serde_json::from_str::<serde_json::Value>(&body).unwrap_or(serde_json::Value::Null),
            "deliveries": attempts,
        }))
        .into_response(),
        (Ok(None), _) => error(StatusCode::NOT_FOUND, "event_not_found", "no such event (kept 7 days)"),
        (Err(e), _) | (_, Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.to_string()),
    }
}

async fn replay(State(admin): State<Admin>, Path(event_id): Path<String>) -> Response {
    match admin.dispatcher.replay(&event_id).await {
        Ok(true) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "replayed": event_id })),
        )
            .into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "event_not_found",
            "no such event (kept 7 days)",
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

async fn enable(State(admin): State<Admin>, Path(endpoint): Path<String>) -> Response {
    match admin.dispatcher.store().enable_endpoint(&endpoint).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_disabled",
            "that endpoint is not disabled",
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}
