//! The API's error: every failure a request can meet, each with its HTTP status and a
//! stable machine-readable code, rendered as `{"error": {"code": "...", "message": "..."}}`.
//!
//! Client faults (4xx) say exactly what was wrong. Server-side failures say only what the
//! client can act on (retry later, storage full); their detail goes to the log.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use stitch_common::auth::{AuthError, ScopedIdError};
use stitch_common::geometry::GeometryError;
use stitch_common::id::InvalidId;
use stitch_common::quota::QuotaError;
use stitch_common::state::{Conflict, StateError};
use stitch_common::storage::StorageError;
use stitch_common::upload::UploadState;

/// Seconds a client should wait before retrying when it has too many uploads active.
const QUOTA_RETRY_AFTER_SECS: u64 = 60;

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
    #[error("{0}")]
    InvalidId(#[from] InvalidId),
    #[error("{0}")]
    InvalidChunk(#[from] GeometryError),
    #[error("the upload has {count} chunks; at most {max} are allowed")]
    TooManyChunks { count: u64, max: u64 },
    #[error("chunks of {size} bytes are larger than the limit of {max} bytes")]
    ChunkTooLarge { size: u64, max: u64 },
    #[error("an upload of {size} bytes is larger than the limit of {max} bytes")]
    UploadTooLarge { size: u64, max: u64 },
    #[error("a chunk must contain at least one byte")]
    EmptyChunk,
    #[error("Content-Length is {declared} but the Content-Range covers {expected} bytes")]
    LengthMismatch { declared: u64, expected: u64 },
    #[error("the body ended after {received} bytes; {expected} were declared")]
    BodyTooShort { expected: u64, received: u64 },
    #[error("the body is longer than the {expected} bytes declared")]
    BodyTooLong { expected: u64 },
    #[error("the body could not be read: {0}")]
    InvalidBody(String),
    #[error("the file name {0}")]
    InvalidFilename(String),
    #[error("the callback URL {0}")]
    InvalidCallback(String),
    #[error("this server does not send webhooks to client callback URLs")]
    CallbacksDisabled,
    #[error("the request body is not valid: {0}")]
    InvalidJson(String),
    #[error("the query is not valid: {0}")]
    InvalidQuery(String),
    #[error("the {what} does not match the data received")]
    ChecksumMismatch { what: &'static str },
    #[error("the body stalled for longer than the idle timeout")]
    BodyTimeout,
    #[error(
        "the body arrived at less than {min_rate} bytes per second over {}s",
        window.as_secs_f64()
    )]
    BodyTooSlow {
        min_rate: u64,
        window: std::time::Duration,
    },
    #[error("the body took longer than {}s to arrive", deadline.as_secs_f64())]
    BodyDeadline { deadline: std::time::Duration },
    #[error("{0}")]
    Conflict(Conflict),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("this server issues no capability tokens: auth.token_secret is not set")]
    TokensDisabled,
    #[error("the upload was refused: {0}")]
    RejectedByHook(String),
    #[error("{message}")]
    QuotaExceeded {
        message: String,
        /// Seconds after which trying again may succeed, when waiting helps.
        retry_after: Option<u64>,
    },
    #[error("an upload of {size} bytes is larger than this tenant's limit of {max} bytes")]
    QuotaUploadTooLarge { size: u64, max: u64 },
    #[error("the pre-create hook did not answer; retry shortly")]
    HookUnavailable,
    #[error("no upload with this id")]
    NotFound,
    #[error("the upload is {0}; only a completed upload can be downloaded")]
    NotCompleted(UploadState),
    #[error("the requested range is outside the file")]
    RangeNotSatisfiable,
    #[error("no such resource")]
    NoRoute,
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("too many chunks are being written; retry shortly")]
    Busy,
    #[error("a backend is unavailable; retry shortly")]
    Unavailable(String),
    #[error("storage is full")]
    StorageFull(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidCallback(_) | CallbacksDisabled => StatusCode::BAD_REQUEST,
            MissingHeader(_)
            | DuplicateHeader(_)
            | InvalidHeader { .. }
            | InvalidId(_)
            | InvalidChunk(_)
            | TooManyChunks { .. }
            | EmptyChunk
            | LengthMismatch { .. }
            | BodyTooShort { .. }
            | BodyTooLong { .. }
            | InvalidBody(_)
            | InvalidFilename(_)
            | InvalidJson(_)
            | InvalidQuery(_)
            | ChecksumMismatch { .. } => StatusCode::BAD_REQUEST,
            ChunkTooLarge { .. } | UploadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout | BodyTooSlow { .. } | BodyDeadline { .. } => StatusCode::REQUEST_TIMEOUT,
            Conflict(_) | NotCompleted(_) => StatusCode::CONFLICT,
            RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Forbidden(_) => StatusCode::FORBIDDEN,
            TokensDisabled => StatusCode::NOT_IMPLEMENTED,
            RejectedByHook(_) => StatusCode::FORBIDDEN,
            QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            QuotaUploadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HookUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            NotFound | NoRoute => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Busy | Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients branch on. Changing one is a breaking change.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingHeader(_) => "missing_header",
            DuplicateHeader(_) => "duplicate_header",
            InvalidHeader { .. } => "invalid_header",
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
            InvalidJson(_) => "invalid_json",
            InvalidQuery(_) => "invalid_query",
            InvalidCallback(_) => "invalid_callback",
            CallbacksDisabled => "callbacks_disabled",
            ChecksumMismatch { .. } => "checksum_mismatch",
            BodyTimeout => "body_timeout",
            BodyTooSlow { .. } => "body_too_slow",
            BodyDeadline { .. } => "body_deadline",
            Conflict(c) => match c {
                stitch_common::state::Conflict::Geometry { .. } => "geometry_mismatch",
                stitch_common::state::Conflict::FileMd5 => "file_md5_mismatch",
                stitch_common::state::Conflict::ChunkContent(_) => "chunk_conflict",
                stitch_common::state::Conflict::NotReceiving(state) => match state {
                    UploadState::Merging => "upload_merging",
                    UploadState::Completed => "upload_completed",
                    UploadState::Failed => "upload_failed",
                    UploadState::Aborted => "upload_aborted",
                    UploadState::Receiving => "upload_receiving",
                },
                stitch_common::state::Conflict::NotMerging(_) => "upload_not_merging",
                stitch_common::state::Conflict::Fenced => "fenced",
            },
            Unauthorized(_) => "unauthorized",
            Forbidden(_) => "forbidden",
            TokensDisabled => "tokens_disabled",
            RejectedByHook(_) => "rejected_by_hook",
            QuotaExceeded { .. } | QuotaUploadTooLarge { .. } => "quota_exceeded",
            HookUnavailable => "hook_unavailable",
            NotFound => "upload_not_found",
            NotCompleted(_) => "upload_not_completed",
            RangeNotSatisfiable => "range_not_satisfiable",
            NoRoute => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Busy => "too_busy",
            Unavailable(_) => "unavailable",
            StorageFull(_) => "insufficient_storage",
            Internal(_) => "internal",
        }
    }
}

impl From<Conflict> for ApiError {
    fn from(c: Conflict) -> Self {
        Self::Conflict(c)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized(m) => Self::Unauthorized(m.to_owned()),
            other => Self::Forbidden(other.to_string()),
        }
    }
}

impl From<ScopedIdError> for ApiError {
    fn from(e: ScopedIdError) -> Self {
        match e {
            ScopedIdError::Invalid(e) => Self::InvalidId(e),
            ScopedIdError::Auth(e) => e.into(),
        }
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        match e {
            // Active uploads finish: waiting helps.
            QuotaError::ActiveUploads { .. } => Self::QuotaExceeded {
                message: e.to_string(),
                retry_after: Some(QUOTA_RETRY_AFTER_SECS),
            },
            // Stored bytes are freed only by deleting files: waiting alone does not help.
            QuotaError::StoredBytes { .. } => Self::QuotaExceeded {
                message: e.to_string(),
                retry_after: None,
            },
            QuotaError::Backend(e) => e.into(),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::NotFound => Self::NotFound,
            StateError::Conflict(c) => Self::Conflict(c),
            StateError::Unavailable { detail, .. } => Self::Unavailable(detail),
            StateError::Corrupt(detail) => Self::Internal(detail),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Full(detail) => Self::StorageFull(detail),
            StorageError::Unavailable(detail) => Self::Unavailable(detail),
            StorageError::Interrupted => Self::InvalidBody("the body ended early".into()),
            StorageError::Corrupt(detail) => Self::Internal(detail),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Unavailable(detail) | Self::StorageFull(detail) | Self::Internal(detail) => {
                tracing::error!(code = self.code(), %detail, "request failed");
            }
            _ => tracing::debug!(code = self.code(), message = %self, "request refused"),
        }
        let body = Json(serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        }));
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if let Self::QuotaExceeded {
            retry_after: Some(secs),
            ..
        } = &self
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(
            self,
            Self::BodyTimeout
                | Self::BodyTooSlow { .. }
                | Self::BodyDeadline { .. }
                | Self::BodyTooLong { .. }
                | Self::Busy
        ) {
            // The rest of the body is not worth reading: close the connection.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
