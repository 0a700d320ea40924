//! The state store: the index of uploads and their received chunks.
//!
//! Storage is the truth for what was received; the state store is the index that every API
//! pod and worker shares. Each method is one atomic operation that the caller needs ("record
//! this chunk and tell me whether that completed the upload"), never a get/set pair, so that
//! any number of API pods can serve one upload without a lock.
//!
//! [`RedisStateStore`] is the distributed implementation: one Lua script per operation, all
//! keys of an upload under one Redis Cluster hash tag.

mod redis;

use async_trait::async_trait;

pub use self::redis::{RedisStateStore, keys};
use crate::digest::Md5;
use crate::geometry::{ChunkIndex, Geometry};
use crate::id::UploadId;
use crate::upload::{ChunkRecord, NewUpload, UploadState, UploadStatus};

/// What a state store knows of an upload without its chunk list: enough to refuse a chunk
/// before reading its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadHeader {
    pub state: UploadState,
    pub geometry: Geometry,
    pub file_md5: Option<Md5>,
}

/// Result of [`StateStore::create_upload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The upload did not exist and now does.
    New,
    /// An upload with this id and the same geometry already exists; nothing changed.
    AlreadyExists,
}

/// Result of [`StateStore::record_chunk`] when the chunk is (now) counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// This request's copy is the one counted.
    New(Progress),
    /// The same chunk (same length and digests) was already counted from another copy;
    /// `counted_token` names it. The caller's copy is surplus.
    Duplicate {
        progress: Progress,
        counted_token: String,
    },
}

/// Where the upload stands after recording a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub state: UploadState,
    pub chunks_received: u64,
    pub bytes_received: u64,
    /// True for exactly one call per upload: the one whose chunk completed the set. That
    /// call moved the upload to `merging` and put the merge trigger in the outbox.
    pub completed_upload: bool,
}

/// Why the state store refused a change. The refusal changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("the upload exists with a different geometry ({existing:?})")]
    Geometry { existing: Geometry },
    #[error("the upload was declared with a different whole-file MD5")]
    FileMd5,
    #[error("chunk {0} was already received with different content")]
    ChunkContent(ChunkIndex),
    #[error("the upload is {0}, not receiving")]
    NotReceiving(UploadState),
}

/// A state store failure. Callers branch on the variant.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no such upload")]
    NotFound,
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The store could not be reached or did not answer in time. When `outcome_unknown` the
    /// operation may have been applied (the command was sent, the answer was lost), so the
    /// caller must not undo anything the operation could have made reachable.
    #[error("state store unavailable: {detail}")]
    Unavailable {
        detail: String,
        outcome_unknown: bool,
    },
    /// The stored data is not what this version of Stitch writes.
    #[error("state store data is corrupt: {0}")]
    Corrupt(String),
}

/// Result of [`StateStore::abort_upload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aborted {
    /// The upload moved from `previous` to `aborted`.
    Now { previous: UploadState },
    /// It was aborted before; nothing changed.
    Already,
}

/// The shared index of uploads. Implementations must make every method atomic with respect
/// to every other call on the same upload, from any process.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Creates `upload` in state `receiving`, or confirms that an upload with the same id,
    /// geometry and whole-file MD5 exists (idempotent retries). A different one is a
    /// [`Conflict`].
    async fn create_upload(&self, upload: &NewUpload, ttl_ms: u64) -> Result<Created, StateError>;

    /// The upload's geometry and state, or `None`. Read-only; used to refuse a chunk early.
    async fn upload_header(&self, id: &UploadId) -> Result<Option<UploadHeader>, StateError>;

    /// Records one received chunk, atomically:
    /// creates the upload from `upload` if it does not exist; checks the chunk against the
    /// upload's geometry, MD5 and state; counts the chunk unless it already is (same content:
    /// [`Recorded::Duplicate`], different content: [`Conflict::ChunkContent`]); and when this
    /// chunk completes the set, moves the upload to `merging` and writes the merge trigger
    /// to the upload's outbox. Refreshes the upload's TTL. A refusal changes nothing.
    async fn record_chunk(
        &self,
        upload: &NewUpload,
        chunk: &ChunkRecord,
        ttl_ms: u64,
    ) -> Result<Recorded, StateError>;

    /// A snapshot of the upload for clients.
    async fn upload_status(&self, id: &UploadId) -> Result<Option<UploadStatus>, StateError>;

    /// Moves the upload to `aborted` and forgets its chunks (their files are the caller's to
    /// remove). Idempotent.
    async fn abort_upload(&self, id: &UploadId, ttl_ms: u64) -> Result<Aborted, StateError>;

    /// Checks that the store answers (readiness).
    async fn ping(&self) -> Result<(), StateError>;
}
