//! The tus 1.0 resumable-upload protocol (<https://tus.io/protocols/resumable-upload>), a
//! front end over the same upload service as the chunk protocol: core (`HEAD`, `PATCH`),
//! creation and creation-with-upload (`POST /files/`), termination (`DELETE`), checksum,
//! expiration and concatenation. Uploads are the resources `/files/{id}` that every upload
//! is, so a tus upload's status, download, events and webhooks are the chunk protocol's.
//!
//! This module knows tus's headers and status codes and nothing of storage or state: its
//! handlers parse, call one service function and answer. Its error table ([`TusError`])
//! differs from the chunk protocol's where tus prescribes a status (409 offset mismatch,
//! 412 no `Tus-Resumable`, 415 wrong content type, 460 checksum mismatch, 410 expired,
//! 423 another `PATCH` running); every body is the same JSON error.

mod handlers;
pub mod headers;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use stitch_common::state::Conflict;
use stitch_common::upload::UploadState;

pub use self::handlers::{create, head, options, patch};
use self::headers::{METHOD_OVERRIDE, TUS_RESUMABLE, TUS_VERSION, VERSION};
use crate::body::BodyLimits;
use crate::error::{ApiError, ServiceError};

/// What the tus front end needs beyond the upload service.
#[derive(Clone, Debug)]
pub struct TusConfig {
    /// How slowly a `PATCH` body may arrive (its deadline is `tus.patch_deadline`).
    pub body_limits: BodyLimits,
    /// Build `Location` from `Forwarded` / `X-Forwarded-*` (`http.trust_forwarded`).
    pub trust_forwarded: bool,
    /// `Tus-Max-Size`: `limits.max_upload_bytes`.
    pub max_size: u64,
}

impl TusConfig {
    pub fn from_settings(settings: &stitch_common::config::Settings) -> Option<Arc<Self>> {
        settings.tus.enabled.then(|| {
            let mut body_limits = BodyLimits::from_settings(&settings.http);
            body_limits.deadline = settings.tus.patch_deadline.0;
            Arc::new(Self {
                body_limits,
                trust_forwarded: settings.http.trust_forwarded,
                max_size: settings.limits.max_upload_bytes.0,
            })
        })
    }
}

/// A refusal, answered with tus's status for it.
#[derive(Debug)]
pub enum TusError {
    /// An error whose status is tus's own mapping of it ([`tus_status`]).
    Api(ApiError),
    /// An error with a status tus prescribes for it whatever the chunk protocol says.
    Status(StatusCode, ApiError),
}

impl<E: Into<ApiError>> From<E> for TusError {
    fn from(e: E) -> Self {
        Self::Api(e.into())
    }
}

/// tus's status for an error of the shared table, where it differs.
fn tus_status(e: &ApiError) -> StatusCode {
    let ApiError::Service(service) = e else {
        return e.status();
    };
    match service {
        ServiceError::Conflict(Conflict::Offset { .. }) => StatusCode::CONFLICT,
        ServiceError::Conflict(Conflict::Length { .. }) => StatusCode::BAD_REQUEST,
        ServiceError::Conflict(Conflict::PastEnd { .. }) | ServiceError::BodyTooLong { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        // A concatenation takes no bytes; nor does an upload that has all of its own.
        ServiceError::Conflict(Conflict::Assembly) => StatusCode::FORBIDDEN,
        ServiceError::Conflict(Conflict::NotReceiving(UploadState::Aborted))
        | ServiceError::Expired => StatusCode::GONE,
        ServiceError::Conflict(Conflict::NotReceiving(_)) => StatusCode::FORBIDDEN,
        ServiceError::ChecksumMismatch { .. } => checksum_mismatch(),
        ServiceError::Locked => StatusCode::LOCKED,
        _ => e.status(),
    }
}

/// 460 Checksum Mismatch, tus's own status.
fn checksum_mismatch() -> StatusCode {
    StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST)
}

impl IntoResponse for TusError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            Self::Api(e) => (tus_status(&e), e),
            Self::Status(status, e) => (status, e),
        };
        let mut response = error.into_response();
        *response.status_mut() = status;
        response
    }
}

/// Whether the request speaks tus (`Tus-Resumable` present).
pub fn speaks_tus(request: &axum::http::HeaderMap) -> bool {
    request.contains_key(TUS_RESUMABLE)
}

/// Around every `/files` route: a `POST`, `PATCH` or tus `HEAD` must say `Tus-Resumable:
/// 1.0.0` (412 with `Tus-Version` otherwise; `OPTIONS`, `GET` and `DELETE` serve clients of
/// either protocol), and every answer says `Tus-Resumable`.
pub async fn protocol_gate(request: Request, next: Next) -> Response {
    let needs_version = matches!(*request.method(), Method::POST | Method::PATCH);
    let version = request.headers().get(TUS_RESUMABLE).cloned();
    if (needs_version || version.is_some()) && version.as_ref().is_none_or(|v| v != VERSION) {
        let mut response = TusError::Status(
            StatusCode::PRECONDITION_FAILED,
            ApiError::InvalidHeader {
                header: "Tus-Resumable",
                reason: format!("must be {VERSION}"),
            },
        )
        .into_response();
        response
            .headers_mut()
            .insert(TUS_VERSION, HeaderValue::from_static(VERSION));
        return with_resumable(response);
    }
    with_resumable(next.run(request).await)
}

fn with_resumable(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(TUS_RESUMABLE, HeaderValue::from_static(VERSION));
    response
}

/// `X-HTTP-Method-Override` on a `POST` to `/files/…` (for clients behind proxies that pass
/// only `GET` and `POST`): the request is routed as the method it names, one of tus's.
/// Runs before routing.
pub async fn method_override(mut request: Request, next: Next) -> Response {
    if request.method() == Method::POST && request.uri().path().starts_with("/files/") {
        let named = request
            .headers()
            .get(METHOD_OVERRIDE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_uppercase);
        let method = match named.as_deref() {
            Some("PATCH") => Some(Method::PATCH),
            Some("DELETE") => Some(Method::DELETE),
            Some("HEAD") => Some(Method::HEAD),
            Some("GET") => Some(Method::GET),
            Some("OPTIONS") => Some(Method::OPTIONS),
            _ => None,
        };
        if let Some(method) = method {
            *request.method_mut() = method;
        }
    }
    next.run(request).await
}

/// Wraps `router` so that [`method_override`] sees requests before they are routed.
pub fn with_method_override(router: Router) -> Router {
    Router::new()
        .fallback_service(router)
        .layer(axum::middleware::from_fn(method_override))
}
