//! The chunk protocol's errors: its own request faults (headers, JSON, routes) and every
//! [`ServiceError`], each with its HTTP status and a stable machine-readable code, rendered as
//! `{"error": {"code": "...", "message": "..."}}`. This is the chunk protocol's table; another
//! wire protocol maps the same service errors its own way.
//!
//! Client faults (4xx) say exactly what was wrong. Server-side failures say only what the
//! client can act on (retry later, storage full); their detail goes to the log.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use stitch_common::auth::AuthError;
use stitch_common::id::InvalidId;
use stitch_common::state::Conflict;
use stitch_common::upload::UploadState;

pub use crate::service::ServiceError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the {0} header is required")]
    MissingHeader(&'static str),
    #[error("the {0} header must appear only once")]
    DuplicateHeader(&'static str),
    #[error("the {header} header {reason}")]
    InvalidHeader {
        header: &'static str,
        reason: String,
    },
    #[error("the request body is not valid: {0}")]
    InvalidJson(String),
    #[error("the query is not valid: {0}")]
    InvalidQuery(String),
    #[error("the requested range is outside the file")]
    RangeNotSatisfiable,
    #[error("no such resource")]
    NoRoute,
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<InvalidId> for ApiError {
    fn from(e: InvalidId) -> Self {
        Self::Service(e.into())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::Service(e.into())
    }
}

impl From<Conflict> for ApiError {
    fn from(c: Conflict) -> Self {
        Self::Service(c.into())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingHeader(_)
            | Self::DuplicateHeader(_)
            | Self::InvalidHeader { .. }
            | Self::InvalidJson(_)
            | Self::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            Self::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Service(e) => service_status(e),
        }
    }

    /// The stable code clients branch on. Changing one is a breaking change.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_header",
            Self::DuplicateHeader(_) => "duplicate_header",
            Self::InvalidHeader { .. } => "invalid_header",
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidQuery(_) => "invalid_query",
            Self::RangeNotSatisfiable => "range_not_satisfiable",
            Self::NoRoute => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Service(e) => service_code(e),
        }
    }
}

fn service_status(e: &ServiceError) -> StatusCode {
    use ServiceError::*;
    match e {
        InvalidId(_)
        | InvalidChunk(_)
        | TooManyChunks { .. }
        | EmptyChunk
        | LengthMismatch { .. }
        | BodyTooShort { .. }
        | BodyTooLong { .. }
        | InvalidBody(_)
        | InvalidFilename(_)
        | InvalidCallback(_)
        | CallbacksDisabled
        | InvalidRequest(_)
        | InvalidLinkTtl(_)
        | ChecksumMismatch { .. } => StatusCode::BAD_REQUEST,
        ChunkTooLarge { .. } | UploadTooLarge { .. } | QuotaUploadTooLarge { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        BodyTimeout | BodyTooSlow { .. } | BodyDeadline { .. } => StatusCode::REQUEST_TIMEOUT,
        Conflict(_) | NotCompleted(_) => StatusCode::CONFLICT,
        Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Forbidden(_) | RejectedByHook(_) => StatusCode::FORBIDDEN,
        TokensDisabled => StatusCode::NOT_IMPLEMENTED,
        QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
        NotFound => StatusCode::NOT_FOUND,
        Expired => StatusCode::GONE,
        Locked => StatusCode::LOCKED,
        Busy | Unavailable(_) | HookUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn service_code(e: &ServiceError) -> &'static str {
    use ServiceError::*;
    match e {
        InvalidId(_) => "invalid_upload_id",
        InvalidChunk(_) => "invalid_chunk",
        TooManyChunks { .. } => "too_many_chunks",
        ChunkTooLarge { .. } => "chunk_too_large",
        UploadTooLarge { .. } => "upload_too_large",
        EmptyChunk => "empty_chunk",
        LengthMismatch { .. } => "length_mismatch",
        BodyTooShort { .. } => "body_too_short",
        BodyTooLong { .. } => "body_too_long",
        InvalidBody(_) => "invalid_body",
        InvalidFilename(_) => "invalid_filename",
        InvalidRequest(_) => "invalid_json",
        InvalidLinkTtl(_) => "invalid_query",
        InvalidCallback(_) => "invalid_callback",
        CallbacksDisabled => "callbacks_disabled",
        ChecksumMismatch { .. } => "checksum_mismatch",
        BodyTimeout => "body_timeout",
        BodyTooSlow { .. } => "body_too_slow",
        BodyDeadline { .. } => "body_deadline",
        Conflict(c) => conflict_code(c),
        Unauthorized(_) => "unauthorized",
        Forbidden(_) => "forbidden",
        TokensDisabled => "tokens_disabled",
        RejectedByHook(_) => "rejected_by_hook",
        QuotaExceeded { .. } | QuotaUploadTooLarge { .. } => "quota_exceeded",
        HookUnavailable => "hook_unavailable",
        NotFound => "upload_not_found",
        Expired => "upload_expired",
        Locked => "upload_locked",
        NotCompleted(_) => "upload_not_completed",
        Busy => "too_busy",
        Unavailable(_) => "unavailable",
        StorageFull(_) => "insufficient_storage",
        Internal(_) => "internal",
    }
}

fn conflict_code(c: &Conflict) -> &'static str {
    match c {
        Conflict::Geometry { .. } => "geometry_mismatch",
        Conflict::FileMd5 => "file_md5_mismatch",
        Conflict::ChunkContent(_) => "chunk_conflict",
        Conflict::NotReceiving(state) => match state {
            UploadState::Merging => "upload_merging",
            UploadState::Completed => "upload_completed",
            UploadState::Failed => "upload_failed",
            UploadState::Aborted => "upload_aborted",
            UploadState::Receiving => "upload_receiving",
        },
        Conflict::NotMerging(_) => "upload_not_merging",
        Conflict::Assembly => "protocol_mismatch",
        Conflict::Offset { .. } => "offset_mismatch",
        Conflict::PastEnd { .. } => "past_end",
        Conflict::Length { .. } => "upload_length_conflict",
        Conflict::Fenced => "fenced",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Service(
                ServiceError::Unavailable(detail)
                | ServiceError::StorageFull(detail)
                | ServiceError::Internal(detail),
            ) => {
                tracing::error!(code = self.code(), %detail, "request failed");
            }
            _ => tracing::debug!(code = self.code(), message = %self, "request refused"),
        }
        let body = Json(serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        }));
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if let Self::Service(ServiceError::QuotaExceeded {
            retry_after: Some(secs),
            ..
        }) = &self
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(
            self,
            Self::Service(
                ServiceError::BodyTimeout
                    | ServiceError::BodyTooSlow { .. }
                    | ServiceError::BodyDeadline { .. }
                    | ServiceError::BodyTooLong { .. }
                    | ServiceError::Busy
            )
        ) {
            // The rest of the body is not worth reading: close the connection.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
