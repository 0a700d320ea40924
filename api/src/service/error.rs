//! The upload service's error: what can go wrong with an upload, whatever protocol asked.
//! Each wire protocol maps these to its own statuses and codes (the chunk protocol's table is
//! `crate::error`); nothing here knows HTTP.

use stitch_common::auth::{AuthError, ScopedIdError};
use stitch_common::geometry::GeometryError;
use stitch_common::id::InvalidId;
use stitch_common::quota::QuotaError;
use stitch_common::state::{Conflict, StateError};
use stitch_common::storage::StorageError;
use stitch_common::upload::UploadState;

/// Seconds a client should wait before retrying when it has too many uploads active.
pub const QUOTA_RETRY_AFTER_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
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
    /// The upload expired (or was deleted and its record kept for a while).
    #[error("the upload expired")]
    Expired,
    /// Another request is appending to the upload.
    #[error("another request is appending to this upload; retry once it ends")]
    Locked,
    #[error("the upload is {0}; only a completed upload can be downloaded")]
    NotCompleted(UploadState),
    #[error("too many chunks are being written; retry shortly")]
    Busy,
    #[error("a backend is unavailable; retry shortly")]
    Unavailable(String),
    #[error("storage is full")]
    StorageFull(String),
    #[error("internal error")]
    Internal(String),
    #[error("the request is not valid: {0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidLinkTtl(String),
}

impl From<Conflict> for ServiceError {
    fn from(c: Conflict) -> Self {
        Self::Conflict(c)
    }
}

impl From<AuthError> for ServiceError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized(m) => Self::Unauthorized(m.to_owned()),
            other => Self::Forbidden(other.to_string()),
        }
    }
}

impl From<ScopedIdError> for ServiceError {
    fn from(e: ScopedIdError) -> Self {
        match e {
            ScopedIdError::Invalid(e) => Self::InvalidId(e),
            ScopedIdError::Auth(e) => e.into(),
        }
    }
}

impl From<QuotaError> for ServiceError {
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

impl From<StateError> for ServiceError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::NotFound => Self::NotFound,
            StateError::Conflict(c) => Self::Conflict(c),
            StateError::Unavailable { detail, .. } => Self::Unavailable(detail),
            StateError::Corrupt(detail) => Self::Internal(detail),
        }
    }
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Full(detail) => Self::StorageFull(detail),
            StorageError::Unavailable(detail) => Self::Unavailable(detail),
            StorageError::Interrupted => Self::InvalidBody("the body ended early".into()),
            StorageError::Corrupt(detail) => Self::Internal(detail),
        }
    }
}
