//! Admin endpoints of the webhook dispatcher, on the worker's own port, for API keys with the
//! `admin` scope (the same keys as the API's; loopback clients in protected mode; anyone with
//! `auth.mode = "none"`). They see every tenant's events: `admin` is the operator's scope.
//!
//! - `GET /admin/events/{event_id}`: the event and its delivery log;
//! - `POST /admin/events/{event_id}/replay`: deliver it again to every target (same
//!   `webhook-id`: receivers that already have it deduplicate);
//! - `POST /admin/webhooks/{endpoint}/enable`: enable an endpoint a 410 disabled.

use std::sync::Arc;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use stitch_common::auth::{AuthError, Authenticator, Presented, Scope};

use super::Dispatcher;

#[derive(Clone)]
struct Admin {
    dispatcher: Arc<Dispatcher>,
    auth: Authenticator,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// The admin routes.
pub fn router(dispatcher: Arc<Dispatcher>, auth: Authenticator) -> Router {
    let admin = Admin { dispatcher, auth };
    Router::new()
        .route("/admin/events/{event_id}", get(show_event))
        .route("/admin/events/{event_id}/replay", post(replay))
        .route("/admin/webhooks/{endpoint}/enable", post(enable))
        .layer(middleware::from_fn_with_state(admin.clone(), authorize))
        .with_state(admin)
}

async fn authorize(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let peer = request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let allowed = admin
        .auth
        .authenticate(Presented {
            authorization,
            query_token: None,
            peer,
        })
        .and_then(|caller| caller.require(Scope::Admin));
    match allowed {
        Ok(()) => next.run(request).await,
        Err(AuthError::Unauthorized(message)) => {
            let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
        Err(e) => error(StatusCode::FORBIDDEN, "forbidden", &e.to_string()),
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
