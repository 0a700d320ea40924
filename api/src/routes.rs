//! The routing table, built by a function so that tests can drive it directly.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::AppState;
use crate::cors;
use crate::error::ApiError;
use crate::handlers::{chunks, files, health, tokens, uploads};
use crate::tus;

pub fn router(state: AppState) -> Router {
    let mut routes = Router::new()
        .route("/upload", post(uploads::create_upload))
        .route("/upload/chunk", put(chunks::put_chunk))
        .route("/upload/tokens", post(tokens::issue_token))
        .route("/upload/status", get(uploads::status_by_header))
        .route("/upload/{id}/status", get(uploads::status_by_path))
        .merge(files_routes())
        .merge(crate::ui::routes())
        .route("/uploads", get(uploads::recent_uploads))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    // Inside the others: a preflight is answered here, before any handler (and its
    // authentication), and still gets a request id, a trace and its metrics.
    if let Some(policy) = state.cors.clone() {
        routes = routes.layer(middleware::from_fn_with_state(policy, cors::gate));
    }
    let routes = routes
        .layer(middleware::from_fn(track_requests))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state);
    tus::with_method_override(routes)
}

/// `/files`: every upload as a resource (download, delete) and tus's verbs on it.
fn files_routes() -> Router<AppState> {
    Router::new()
        .route("/files", post(tus::create).options(tus::options))
        .route("/files/", post(tus::create).options(tus::options))
        .route(
            "/files/{id}",
            get(files::download)
                .head(tus::head)
                .patch(tus::patch)
                .delete(files::abort_upload)
                .options(tus::options),
        )
        .route_layer(middleware::from_fn(tus::protocol_gate))
}

/// The span of one request: method and path, never the query (a `?token=` is a
/// credential) nor any header.
fn request_span(request: &Request) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        version = ?request.version(),
    )
}

/// Counts requests and their latency by route template and status (never by upload id).
async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = [
        ("route", route),
        ("method", method),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(stitch_common::metrics::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(stitch_common::metrics::HTTP_DURATION, &labels)
        .record(started.elapsed().as_secs_f64());
    response
}
