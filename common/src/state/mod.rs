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

pub(crate) use self::redis::pool as redis_pool;
pub use self::redis::{RedisStateStore, keys};
pub(crate) use self::redis::{connection as redis_connection, redis_error, scan_keys};
use crate::digest::Md5;
use crate::geometry::{ChunkIndex, Geometry};
use crate::id::UploadId;
use crate::queue::{OutboxKind, OutboxMessage};
use crate::upload::{Assembly, ChunkRecord, Completion, NewUpload, UploadState, UploadStatus};

/// What a state store knows of an upload without its chunk list: enough to refuse a chunk
/// before reading its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadHeader {
    pub state: UploadState,
    pub geometry: Geometry,
    pub assembly: Assembly,
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
    /// True when this call created the upload (and put `upload.created` in the outbox).
    pub created_upload: bool,
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
    #[error("the upload is {0}, not merging")]
    NotMerging(UploadState),
    /// The upload is assembled otherwise than the request assumes (a chunk for an upload of
    /// segments, a segment for one of chunks or for a concatenation).
    #[error("the upload is not assembled from this kind of part")]
    Assembly,
    /// A segment must start where the bytes received so far end.
    #[error("the upload has {current} bytes; a segment must start there")]
    Offset { current: u64 },
    /// The length was declared already with another value, or is below the bytes received.
    #[error("the upload's length is {current} (0: open) with {received} bytes received")]
    Length { current: u64, received: u64 },
    /// A segment must end within the upload's size.
    #[error("the segment ends past the upload's {size} bytes")]
    PastEnd { size: u64 },
    /// A newer merge attempt took the upload's fencing token: this one must change nothing.
    #[error("a newer merge attempt holds the fencing token")]
    Fenced,
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

/// Everything a merge attempt needs, taken atomically with its fencing token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergePlan {
    /// The fencing token: higher than any earlier attempt's. The commit checks it.
    pub fence: u64,
    pub upload: NewUpload,
    /// The counted chunks, in index order.
    pub chunks: Vec<ChunkRecord>,
}

/// Result of [`StateStore::begin_merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergeStart {
    Ready(Box<MergePlan>),
    /// The upload was merged already (a redelivered job).
    AlreadyCompleted,
    /// The upload is in a state no merge applies to (aborted, failed, still receiving).
    NotMerging(UploadState),
}

/// Result of [`StateStore::commit_merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Committed {
    /// This attempt's result is now the upload's.
    Now,
    /// An earlier attempt committed; its event id is returned for re-publishing.
    Already { event_id: String },
}

/// Result of [`StateStore::fail_merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failed {
    Now,
    /// The upload was no longer merging; nothing changed.
    NotMerging(UploadState),
}

/// An upload as storage knows it, for [`StateStore::restore_upload`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restoration {
    pub upload: NewUpload,
    /// The complete copies on storage, one per index, ascending.
    pub chunks: Vec<ChunkRecord>,
    /// The completion storage recorded, if a merge got that far.
    pub completion: Option<Completion>,
    /// The highest fencing token any attempt left on storage: the restored counter starts
    /// past it, so tokens never go backwards across a rebuild.
    pub fence: u64,
    /// The upload's last activity on storage (ms since the epoch).
    pub last_activity_ms: u64,
}

/// Result of [`StateStore::restore_upload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restored {
    /// The state store did not know the upload; it does now, in this state.
    Now(UploadState),
    /// It knew the upload (another process restored it first, or it was never lost);
    /// nothing changed.
    AlreadyKnown,
}

/// Result of [`StateStore::expire_upload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// The upload is expired: its record is a tombstone that refuses every later chunk, so
    /// its files may go.
    Now,
    /// It was active after the cut-off, or is merging or completed: keep it.
    Kept(UploadState),
}

/// One entry of an upload's outbox: a typed message and the stored form that identifies
/// it. [`StateStore::pending_outbox`] returns what is stored; a caller that wrote a message
/// makes the same entry with [`OutboxEntry::new`]. Either way
/// [`StateStore::clear_outbox_entry`] removes exactly this entry, never another one of the
/// same kind.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    pub upload_id: UploadId,
    pub message: OutboxMessage,
    /// The entry as the store keeps it: removing it by this text removes this entry, even
    /// if it was written by an older build whose text a new serialization would not match.
    stored: String,
}

impl OutboxEntry {
    /// The entry a state-store operation writes when given `message` for `upload_id`.
    pub fn new(upload_id: UploadId, message: OutboxMessage) -> Self {
        let stored = message.to_stored();
        Self {
            upload_id,
            message,
            stored,
        }
    }

    /// An entry read back from a store, stored under `kind`.
    pub(crate) fn from_stored(
        upload_id: UploadId,
        kind: OutboxKind,
        stored: String,
    ) -> Result<Self, String> {
        Ok(Self {
            message: OutboxMessage::from_stored(kind, &stored)?,
            upload_id,
            stored,
        })
    }

    pub fn kind(&self) -> OutboxKind {
        self.message.kind()
    }

    pub fn enqueued_at_ms(&self) -> u64 {
        self.message.enqueued_at_ms()
    }

    /// The stored form (for the stores only).
    pub(crate) fn stored(&self) -> &str {
        &self.stored
    }
}

/// An upload in `merging` as the sweeper sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergingUpload {
    pub upload_id: UploadId,
    /// When it last entered `merging` or was last re-enqueued.
    pub since_ms: u64,
    pub requeues: u32,
}

/// The shared index of uploads. Implementations must make every method atomic with respect
/// to every other call on the same upload, from any process.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Creates `upload` in state `receiving`, or confirms that an upload with the same id,
    /// geometry and whole-file MD5 exists (idempotent retries). A different one is a
    /// [`Conflict`].
    /// `created_event` is written to the upload's outbox when it is created.
    async fn create_upload(
        &self,
        upload: &NewUpload,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Created, StateError>;

    /// Creates a concatenation (an upload of [`Assembly::Concat`], whose parts the caller
    /// checked are complete) directly in state `merging`, with `created_event` and
    /// `merge_job` in its outbox; or confirms that the same one exists, as
    /// [`StateStore::create_upload`] does.
    async fn create_concatenation(
        &self,
        upload: &NewUpload,
        created_event: &OutboxMessage,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Created, StateError>;

    /// The upload's geometry and state, or `None`. Read-only; used to refuse a chunk early.
    async fn upload_header(&self, id: &UploadId) -> Result<Option<UploadHeader>, StateError>;

    /// Records one received chunk, atomically:
    /// creates the upload from `upload` if it does not exist; checks the chunk against the
    /// upload's geometry, MD5 and state; counts the chunk unless it already is (same content:
    /// [`Recorded::Duplicate`], different content: [`Conflict::ChunkContent`]); and when this
    /// chunk completes the set, moves the upload to `merging` and writes the merge trigger
    /// to the upload's outbox. Refreshes the upload's TTL. A refusal changes nothing.
    /// `merge_job` goes into the outbox when this chunk completes the upload,
    /// `created_event` when it creates it.
    async fn record_chunk(
        &self,
        upload: &NewUpload,
        chunk: &ChunkRecord,
        merge_job: &OutboxMessage,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Recorded, StateError>;

    /// Appends one segment to an upload of [`Assembly::Segments`], atomically: only if the
    /// upload is `receiving` and `segment.offset` is exactly its bytes received so far
    /// ([`Conflict::Offset`] otherwise, with that count) and the segment ends within its
    /// size. The segment counts as the upload's next part (`segment.index` is ignored: the
    /// store numbers parts in the order they arrive). When it completes an upload that merges
    /// when complete, moves it to `merging` with `merge_job` in its outbox; a complete partial
    /// upload stays `receiving`. Refreshes the TTL. A refusal changes nothing.
    async fn append_segment(
        &self,
        id: &UploadId,
        segment: &ChunkRecord,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Progress, StateError>;

    /// Fixes the length of an upload of segments created without one (tus
    /// `Upload-Defer-Length`), atomically: only if the upload is receiving and its length is
    /// still open, and `length` is at least its bytes received ([`Conflict::Length`]
    /// otherwise; declaring the length it has is a no-op). When the bytes received already
    /// are `length`, moves it to `merging` with `merge_job` in its outbox, as the segment
    /// that completes an upload does. A refusal changes nothing.
    async fn declare_length(
        &self,
        id: &UploadId,
        length: u64,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Progress, StateError>;

    /// A snapshot of the upload for clients.
    async fn upload_status(&self, id: &UploadId) -> Result<Option<UploadStatus>, StateError>;

    /// Moves the upload to `aborted` and forgets its chunks (their files are the caller's to
    /// remove). Idempotent.
    /// `aborted_event` is written to the outbox when this call aborts it; pending merge
    /// triggers are dropped from the outbox, pending events kept.
    async fn abort_upload(
        &self,
        id: &UploadId,
        aborted_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Aborted, StateError>;

    /// Removes `entry` (a merge trigger or an event) from its upload's outbox, once the
    /// broker confirmed it: that one entry, not another of the same kind written since.
    /// Nothing happens when it is gone already.
    async fn clear_outbox_entry(&self, entry: &OutboxEntry) -> Result<(), StateError>;

    /// Outbox entries (merge triggers and events) written before `older_than_ms`. An entry
    /// the store cannot read is logged and left where it is (never dropped).
    async fn pending_outbox(&self, older_than_ms: u64) -> Result<Vec<OutboxEntry>, StateError>;

    /// Uploads in `merging` since before `older_than_ms`.
    async fn stuck_merges(&self, older_than_ms: u64) -> Result<Vec<MergingUpload>, StateError>;

    /// Counts a re-enqueue of a stuck merge; `None` when the upload is no longer merging.
    async fn note_requeue(&self, id: &UploadId) -> Result<Option<u32>, StateError>;

    /// Starts a merge attempt (the caller holds the upload's lock): if the upload is
    /// `merging`, takes a new fencing token and returns the counted chunks.
    async fn begin_merge(&self, id: &UploadId, ttl_ms: u64) -> Result<MergeStart, StateError>;

    /// Records merge progress for status, if `fence` is still the newest attempt.
    async fn report_merge_progress(
        &self,
        id: &UploadId,
        fence: u64,
        bytes_done: u64,
    ) -> Result<(), StateError>;

    /// Commits a merge: only if the upload is `merging` and `fence` is the newest token
    /// ([`Conflict::Fenced`] otherwise), atomically moves it to `completed` with `result` and
    /// writes `completed_event` to its outbox (dropping its pending merge triggers). A completed upload has no
    /// TTL: it is kept until it is deleted or its retention passes (the janitor decides that
    /// from storage). Idempotent for an upload that is already completed.
    async fn commit_merge(
        &self,
        id: &UploadId,
        fence: u64,
        result: &Completion,
        completed_event: &OutboxMessage,
    ) -> Result<Committed, StateError>;

    /// Marks a merging upload `failed` for `reason`, fenced when `fence` is given, and
    /// writes `failed_event` (`upload.failed` with `event_id`) to its outbox in the same
    /// step, dropping its pending merge triggers.
    async fn fail_merge(
        &self,
        id: &UploadId,
        fence: Option<u64>,
        reason: &str,
        event_id: &str,
        failed_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Failed, StateError>;

    /// The counted chunks of an upload (index, length, digests, which copy), in index order;
    /// empty when the upload is unknown or its chunks were dropped (abort).
    async fn counted_chunks(&self, id: &UploadId) -> Result<Vec<ChunkRecord>, StateError>;

    /// The counted parts of an upload that follow each other from index `from`: `from`,
    /// `from + 1`, … up to the first that is not counted, at most `max` of them, in index
    /// order. Reads only those, whatever the upload's size (the early assembly asks for the
    /// parts after its prefix at every step).
    async fn counted_run(
        &self,
        id: &UploadId,
        from: u64,
        max: usize,
    ) -> Result<Vec<ChunkRecord>, StateError>;

    /// Checks that the store answers (readiness).
    async fn ping(&self) -> Result<(), StateError>;

    /// Rebuilds an upload the store has lost from what storage holds, atomically and only if
    /// the store does not know it (concurrent rebuilds agree: the first wins, the others get
    /// [`Restored::AlreadyKnown`]). The state follows from storage: `completed` with a
    /// completion, `merging` (with a merge trigger in the outbox, `merge_job`) when every
    /// chunk is there, `receiving` otherwise. The fencing counter is raised past
    /// `restoration.fence`, never lowered. An upload restored as not completed gets
    /// `created_event` in its outbox: the store may never have recorded its creation (a
    /// first chunk between its manifest and its record), and the event's id is stable, so a
    /// repeat is one consumers dedupe.
    async fn restore_upload(
        &self,
        restoration: &Restoration,
        merge_job: &OutboxMessage,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Restored, StateError>;

    /// Expires an abandoned upload, atomically with respect to [`StateStore::record_chunk`]:
    /// unless it was active since `idle_before_ms` or is merging or completed, its record
    /// becomes a tombstone (`aborted`, chunks forgotten, kept for `ttl_ms`) that refuses every
    /// later chunk, so its files can be removed without a chunk being counted in between. An
    /// unknown upload gets the tombstone too. `expired_event` is written to
    /// the tombstone's outbox, so it is published even if the caller dies right after.
    async fn expire_upload(
        &self,
        id: &UploadId,
        idle_before_ms: u64,
        expired_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Expired, StateError>;

    /// Forgets an upload entirely (a completed upload whose retention passed, after its
    /// files are gone). Idempotent.
    async fn forget_upload(&self, id: &UploadId) -> Result<(), StateError>;
    /// Puts a merging upload back to `receiving` because storage lost the counted chunks
    /// `lost` (missing, short, or changed since they were recorded), only if `fence` is the
    /// newest merge attempt's token ([`Conflict::Fenced`] otherwise; nothing changes).
    /// Atomically: the lost chunks' records go (so a re-send of one counts again, as a new
    /// chunk), the counters are recomputed from the chunks still recorded, pending merge
    /// triggers leave the outbox and `lost_event` joins it, and the TTL is
    /// refreshed. Completing the set again moves the upload to `merging` with a new trigger,
    /// as the first time. Indices that are not recorded are simply reported missing.
    async fn reopen_for_lost_chunks(
        &self,
        id: &UploadId,
        fence: u64,
        lost: &[ChunkIndex],
        lost_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Reopened, StateError>;
}

/// Result of [`StateStore::reopen_for_lost_chunks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reopened {
    /// The upload is `receiving` again; these are the chunks and bytes still counted.
    Now {
        chunks_received: u64,
        bytes_received: u64,
    },
    /// The upload was no longer merging; nothing changed.
    NotMerging(UploadState),
}
