//! One merge attempt, end to end: lock, plan, concatenate + MD5, verify, rename, commit
//! (fenced), publish the event. The consumer acks after this returns and then calls
//! [`Finish::run`] to delete the chunks and release the lock — the order of invariant 5.
//!
//! Correctness under crashes and pauses rests on three things:
//! - every attempt writes its own file (`file.<fence>`), so a stale attempt never touches the
//!   file another attempt committed;
//! - the commit is a fenced script: only the newest attempt of a still-merging upload wins;
//! - an attempt stops before renaming or committing when its lease may have lapsed.
//!
//! Storage is the truth, so a failed attempt is classified by what storage says: a merged
//! file whose MD5 differs from the declared one is the only permanent failure; counted chunks
//! that storage no longer holds as recorded put the upload back to `receiving` for the client
//! to re-send them; every I/O error (disk full, EIO, ESTALE, EMFILE, …) is retried.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stitch_common::auth::DownloadLinks;
use stitch_common::config::Settings;
use stitch_common::events::{Event, new_event_id};
use stitch_common::geometry::ChunkIndex;
use stitch_common::id::UploadId;
use stitch_common::lock::{Lease, LockName, MergeLock};
use stitch_common::metrics as m;
use stitch_common::queue::{EventSink, OutboxMessage};
use stitch_common::quota::QuotaLedger;
use stitch_common::recovery::Recovery;
use stitch_common::state::{
    Aborted, Committed, Conflict, Failed, MergePlan, MergeStart, OutboxEntry, Reopened, StateError,
    StateStore,
};
use stitch_common::storage::{CompletionRecord, FsChunkStore, Piece};
use stitch_common::upload::{Assembly, ChunkRecord, Completion, UploadState, UploadStatus};
use tokio::sync::Mutex;

use stitch_common::concat::{ChunkSource, Concat, ConcatError, Control, LostChunk, concatenate};

/// How a merge attempt ended, when it did not need a retry.
#[derive(Debug)]
pub enum MergeOutcome {
    /// This attempt committed the file and published `upload.completed`.
    Committed(Finish),
    /// The upload was merged before (a redelivered or duplicate job); the completion event
    /// was published again with its original id.
    AlreadyCompleted(Finish),
    /// Nothing to do: the upload is aborted, failed, expired or not complete, or a newer
    /// attempt fenced this one out.
    Skipped(String),
    /// Another worker holds the upload's lock.
    LockBusy,
    /// The merged file's MD5 differs from the one the client declared: the upload was marked
    /// `failed` and `upload.failed` published. The only permanent failure of a merge.
    Failed(String),
    /// Storage lost counted chunks (missing, short, or changed since they were recorded):
    /// the upload is `receiving` again with these chunks uncounted, `upload.chunks_lost` is
    /// in its outbox (and published), and the client's next resume re-sends them.
    Reopened(Vec<u64>),
}

/// Why an attempt must be tried again.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Redis, storage or the broker failed: retry with backoff.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Reading, writing or syncing the merge's files failed (disk full, I/O error, too many
    /// open files) while the chunks are intact as far as anyone can tell: retry with backoff
    /// for as long as it takes.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The lease lapsed or could not be renewed; another worker may be merging.
    #[error("the lock lease was lost")]
    LeaseLost,
    /// Shutdown asked the attempt to stop.
    #[error("cancelled")]
    Cancelled,
}

fn transient(e: impl std::fmt::Display) -> MergeError {
    MergeError::Transient(e.to_string())
}

/// A storage failure (a full disk, an I/O error) of the merge's own files.
fn storage_failure(e: impl std::fmt::Display) -> MergeError {
    MergeError::Storage(e.to_string())
}

/// Cleanup that follows the ack: delete the chunks and stray attempt files, release the lock.
#[derive(Debug)]
pub struct Finish {
    id: UploadId,
    lease: Option<Lease>,
    keep: Option<String>,
}

/// How long a merge waits for an early-assembly step in flight (a step is 256 MiB: well under
/// a second on a local disk) before it carries on beside it.
const ASSEMBLY_STEP_WAIT: Duration = Duration::from_secs(5);
/// How often it looks whether that step has ended.
const ASSEMBLY_POLL: Duration = Duration::from_millis(10);

pub struct Merger {
    state: Arc<dyn StateStore>,
    storage: FsChunkStore,
    lock: Arc<dyn MergeLock>,
    events: Arc<dyn EventSink>,
    /// Rebuilds an upload the state store lost, from storage.
    recovery: Recovery,
    ttl_ms: u64,
    block_bytes: usize,
    fsync: bool,
    direct_io: bool,
    /// Clone the chunks into the file where the file system can (`merge.reflink`).
    reflink: bool,
    read_direct: bool,
    /// Compute the file's SHA-256 beside its MD5 (`uploads.file_digest`).
    sha256: bool,
    /// Carry on from the file the API assembled while the chunks arrived
    /// (`merge.incremental`), when one fits.
    incremental: bool,
    public_url: Option<String>,
    /// Frees the tenant's active-upload slot when the upload completes or fails.
    quotas: Option<Arc<dyn QuotaLedger>>,
    /// Signs the download links of `upload.completed` (`auth.event_link_ttl`).
    links: Option<DownloadLinks>,
}

impl Merger {
    pub fn new(
        settings: &Settings,
        state: Arc<dyn StateStore>,
        storage: FsChunkStore,
        lock: Arc<dyn MergeLock>,
        events: Arc<dyn EventSink>,
    ) -> Self {
        let ttl_ms = settings.uploads.ttl.0.as_millis() as u64;
        Self {
            recovery: Recovery::new(state.clone(), storage.clone(), events.clone(), ttl_ms),
            state,
            storage,
            lock,
            events,
            ttl_ms: settings.uploads.ttl.0.as_millis() as u64,
            block_bytes: settings.merge.buffer_bytes.0 as usize,
            fsync: settings.storage.fsync,
            direct_io: settings.merge.direct_io,
            reflink: settings.merge.reflink,
            read_direct: settings.storage.direct_io,
            sha256: settings.uploads.file_digest.with_sha256(),
            incremental: settings.merge.incremental,
            public_url: settings.http.public_url.clone(),
            quotas: None,
            links: DownloadLinks::for_events(&settings.auth),
        }
    }

    /// `upload.completed` of a completed upload, its link signed when configured.
    fn completed_event(&self, status: &UploadStatus) -> Option<Event> {
        let mut event = Event::completed(status, self.public_url.as_deref())?;
        self.sign_link(&mut event, &status.id);
        Some(event)
    }

    fn sign_link(&self, event: &mut Event, id: &UploadId) {
        if let (Some(links), Some(url)) = (&self.links, &event.upload.download_url) {
            event.upload.download_url = Some(links.link(url, id, None));
        }
    }

    /// Settles quotas on the given ledger when uploads complete or fail.
    pub fn with_quotas(mut self, quotas: Arc<dyn QuotaLedger>) -> Self {
        self.quotas = Some(quotas);
        self
    }

    /// The upload is no longer active: its slot is freed, `bytes` stay counted. A failure
    /// is only logged: the janitor settles the ledger from storage on its next pass.
    async fn settle_quota(&self, id: &UploadId, bytes: u64) {
        if let Some(quotas) = &self.quotas
            && let Err(e) = quotas.settle(id, bytes).await
        {
            tracing::warn!(upload_id = %id, error = %e, "quota not settled; the janitor will");
        }
    }

    /// Runs one merge attempt. `control.cancel` stops it (shutdown); the lease watchdog sets
    /// it too when the lease is lost.
    pub async fn merge_upload(
        &self,
        id: &UploadId,
        control: Arc<Control>,
    ) -> Result<MergeOutcome, MergeError> {
        let lease = match self.lock.try_acquire(&LockName::Merge(id.clone())).await {
            Ok(Some(lease)) => {
                metrics::counter!(m::LOCK_ACQUISITIONS, "result" => "acquired").increment(1);
                lease
            }
            Ok(None) => {
                metrics::counter!(m::LOCK_ACQUISITIONS, "result" => "busy").increment(1);
                return Ok(MergeOutcome::LockBusy);
            }
            Err(e) => {
                metrics::counter!(m::LOCK_ACQUISITIONS, "result" => "error").increment(1);
                return Err(transient(e));
            }
        };
        let lease = Arc::new(Mutex::new(lease));
        let lost = Arc::new(AtomicBool::new(false));
        let watchdog = tokio::spawn(watch_lease(
            self.lock.clone(),
            lease.clone(),
            control.clone(),
            lost.clone(),
        ));
        let result = self.merge_locked(id, &lease, &control, &lost).await;
        watchdog.abort();
        let _ = watchdog.await;
        let lease = Arc::try_unwrap(lease)
            .map(Mutex::into_inner)
            .map_err(|_| MergeError::Transient("lease still shared".into()))?;
        match result {
            Ok(MergeOutcome::Committed(mut finish)) => {
                finish.lease = Some(lease);
                Ok(MergeOutcome::Committed(finish))
            }
            Ok(MergeOutcome::AlreadyCompleted(mut finish)) => {
                finish.lease = Some(lease);
                Ok(MergeOutcome::AlreadyCompleted(finish))
            }
            other => {
                if let Err(e) = self.lock.release(&lease).await {
                    tracing::warn!(upload_id = %id, error = %e, "could not release the merge lock; it will expire");
                }
                other
            }
        }
    }

    async fn merge_locked(
        &self,
        id: &UploadId,
        lease: &Mutex<Lease>,
        control: &Arc<Control>,
        lost: &AtomicBool,
    ) -> Result<MergeOutcome, MergeError> {
        let started = std::time::Instant::now();
        let plan = match self.state.begin_merge(id, self.ttl_ms).await {
            Ok(MergeStart::Ready(plan)) => plan,
            Ok(MergeStart::AlreadyCompleted) => {
                let status = self.state.upload_status(id).await.map_err(transient)?;
                let keep = status
                    .as_ref()
                    .and_then(|s| s.completion.as_ref())
                    .map(|c| c.location.clone());
                if let Some(event) = status.as_ref().and_then(|s| self.completed_event(s)) {
                    self.events.publish_event(&event).await.map_err(transient)?;
                }
                return Ok(MergeOutcome::AlreadyCompleted(Finish {
                    id: id.clone(),
                    lease: None,
                    keep,
                }));
            }
            Ok(MergeStart::NotMerging(UploadState::Failed)) => {
                // A failure whose event may not have gone out yet: publish it (same id).
                if let Some(event) = self
                    .state
                    .upload_status(id)
                    .await
                    .map_err(transient)?
                    .as_ref()
                    .and_then(Event::failed)
                {
                    self.events.publish_event(&event).await.map_err(transient)?;
                }
                return Ok(MergeOutcome::Skipped("the upload failed earlier".into()));
            }
            Ok(MergeStart::NotMerging(state)) => {
                return Ok(MergeOutcome::Skipped(format!("the upload is {state}")));
            }
            Err(StateError::NotFound) => {
                // Lost by the state store? Storage decides: rebuild, then try again.
                return match self.recovery.rebuild(id).await {
                    Ok(true) => Err(MergeError::Transient(
                        "the upload's state was rebuilt from storage; merging again".into(),
                    )),
                    Ok(false) => Ok(MergeOutcome::Skipped("no such upload (expired?)".into())),
                    Err(e) => Err(transient(e)),
                };
            }
            Err(e) => return Err(transient(e)),
        };
        let parts = match self.parts_of(&plan).await {
            Ok(parts) => parts,
            Err(Unusable::Lost(lost)) => return self.reopen(&plan, lost).await,
            Err(Unusable::Parts(reason)) => return self.fail(&plan, &reason).await,
            Err(Unusable::Unavailable(e)) => return Err(transient(e)),
        };
        tracing::info!(upload_id = %id, fence = plan.fence, chunks = parts.records.len(), "merging");

        // What the API assembled while the chunks arrived, when it fits what is counted:
        // this attempt appends the rest to that file and hashes only the rest.
        let prefix = self.saved_prefix(&plan, &parts.records).await;
        let (files, covered) = match &prefix {
            Some(p) => (
                self.storage.attempt_from(id, plan.fence, p),
                p.checkpoint.chunks as usize,
            ),
            None => (self.storage.attempt(id, plan.fence), 0),
        };
        let prefix_bytes = prefix.as_ref().map_or(0, |p| p.checkpoint.hashes.offset);
        if prefix.is_some() {
            tracing::debug!(upload_id = %id, prefix_bytes, chunks = covered, "carrying on from the assembled prefix");
        }
        let job = Concat {
            chunks: parts.sources[covered..].to_vec(),
            output: files.temp.clone(),
            block_bytes: self.block_bytes,
            fsync: self.fsync,
            direct_io: self.direct_io,
            reflink: self.reflink,
            read_direct: self.read_direct,
            sha256: self.sha256,
            resume: prefix.map(|p| p.checkpoint.hashes),
        };
        let reporter = tokio::spawn(report_progress(
            self.state.clone(),
            id.clone(),
            plan.fence,
            control.clone(),
        ));
        let worker_control = control.clone();
        let concatenated = tokio::task::spawn_blocking(move || concatenate(&job, &worker_control))
            .await
            .map_err(|e| MergeError::Transient(format!("merge thread failed: {e}")));
        reporter.abort();
        let done = match concatenated? {
            Ok(done) => done,
            Err(ConcatError::Cancelled) if lost.load(Ordering::Relaxed) => {
                return Err(MergeError::LeaseLost);
            }
            Err(ConcatError::Cancelled) => return Err(MergeError::Cancelled),
            Err(ConcatError::Storage(e)) => return Err(MergeError::Storage(e)),
            Err(ConcatError::LostChunks(lost)) => {
                return match &plan.upload.assembly {
                    Assembly::Chunks => self.reopen(&plan, lost).await,
                    Assembly::Segments { .. } => {
                        self.reopen(&plan, from_first_lost(&plan, &lost)).await
                    }
                    Assembly::Concat { .. } => {
                        let reason = format!(
                            "a concatenated upload lost data: {}",
                            ConcatError::LostChunks(lost)
                        );
                        self.fail(&plan, &reason).await
                    }
                };
            }
        };
        tracing::debug!(upload_id = %id, size = done.size, direct_io = done.direct_io, cloned_bytes = done.cloned_bytes, "chunks concatenated");
        if prefix_bytes > 0 {
            // Every writer of an assembly writes the same bytes at the same offsets, and
            // none past the file's end; a longer file is not this upload's: merge anew.
            let len = tokio::fs::metadata(&files.temp).await.map(|m| m.len());
            if len.as_ref().ok() != Some(&done.size) {
                self.storage.discard_temp(&files).await;
                return Err(MergeError::Storage(format!(
                    "the assembled file has {len:?} bytes, not {}",
                    done.size
                )));
            }
        }

        if let Some(expected) = plan.upload.file_md5
            && expected != done.md5
        {
            self.storage.discard_temp(&files).await;
            let reason = format!(
                "the merged file's MD5 is {}, the client declared {expected}",
                done.md5
            );
            return self.fail(&plan, &reason).await;
        }
        if lost.load(Ordering::Relaxed) || !lease.lock().await.is_valid() {
            self.storage.discard_temp(&files).await;
            return Err(MergeError::LeaseLost);
        }
        self.storage
            .publish_merged(&files)
            .await
            .map_err(storage_failure)?;

        let (crc32c, composite_md5) = Completion::part_digests(&parts.records);
        let completion = Completion {
            size: done.size,
            md5: done.md5,
            crc32c: Some(crc32c),
            sha256: done.sha256,
            composite_md5,
            location: files.location.clone(),
            completed_at_ms: stitch_common::now_ms(),
            event_id: new_event_id(),
        };
        // On storage before the commit: with the manifest, the record makes the completion
        // survive a state store that loses it (rebuilds read it).
        let record = CompletionRecord::new(plan.fence, &completion);
        if let Err(e) = self.storage.write_completion(id, &record).await {
            self.storage.discard_attempt(id, plan.fence).await;
            return Err(storage_failure(e));
        }
        #[cfg(feature = "failpoints")]
        stitch_common::failpoints::crash_here(
            stitch_common::failpoints::MERGE_RENAMED_BEFORE_COMMIT,
        );
        let mut event =
            Event::completed_from(&plan.upload, &completion, self.public_url.as_deref());
        self.sign_link(&mut event, id);
        let outboxed = OutboxMessage::event(&event);
        match self
            .state
            .commit_merge(id, plan.fence, &completion, &outboxed)
            .await
        {
            Ok(Committed::Now) => {
                tracing::info!(upload_id = %id, size = done.size, md5 = %done.md5, "merge committed");
                metrics::histogram!(m::MERGE_DURATION).record(started.elapsed().as_secs_f64());
                metrics::histogram!(m::MERGE_SIZE).record(done.size as f64);
                metrics::counter!(m::MERGE_PREFIX_BYTES).increment(prefix_bytes);
                metrics::counter!(m::CLONED_BYTES).increment(done.cloned_bytes);
                m::transition("completed");
                self.settle_quota(id, done.size).await;
                #[cfg(feature = "failpoints")]
                stitch_common::failpoints::crash_here(
                    stitch_common::failpoints::MERGE_COMMITTED_BEFORE_PUBLISH,
                );
                self.publish_outboxed(id, &event, outboxed).await;
                self.retire_parts(&plan).await;
                Ok(MergeOutcome::Committed(Finish {
                    id: id.clone(),
                    lease: None,
                    keep: Some(files.location),
                }))
            }
            Ok(Committed::Already { .. }) => {
                self.storage.discard_attempt(id, plan.fence).await;
                self.settle_quota(id, plan.upload.geometry.total_size).await;
                self.publish_completed(id).await?;
                self.retire_parts(&plan).await;
                let keep = self
                    .state
                    .upload_status(id)
                    .await
                    .map_err(transient)?
                    .and_then(|s| s.completion.map(|c| c.location));
                Ok(MergeOutcome::AlreadyCompleted(Finish {
                    id: id.clone(),
                    lease: None,
                    keep,
                }))
            }
            Err(StateError::Conflict(Conflict::Fenced | Conflict::NotMerging(_)))
            | Err(StateError::NotFound) => {
                tracing::warn!(upload_id = %id, fence = plan.fence, "fenced out: a newer attempt owns the upload");
                self.storage.discard_attempt(id, plan.fence).await;
                Ok(MergeOutcome::Skipped(
                    "fenced out by a newer attempt".into(),
                ))
            }
            Err(e @ StateError::Unavailable { .. }) => {
                // The commit may have happened: the file may be the committed one. Keep it;
                // the next attempt finds the upload completed (or cleans up after its own).
                Err(transient(e))
            }
            Err(e) => {
                self.storage.discard_attempt(id, plan.fence).await;
                Err(transient(e))
            }
        }
    }

    /// The upload's early assembly, when `merge.incremental` is on and its newest checkpoint
    /// covers the first of the parts this merge counts (never for a concatenation, whose
    /// parts are other uploads'). Storage errors only cost the shortcut.
    async fn saved_prefix(
        &self,
        plan: &MergePlan,
        records: &[ChunkRecord],
    ) -> Option<stitch_common::storage::SavedPrefix> {
        if !self.incremental || matches!(plan.upload.assembly, Assembly::Concat { .. }) {
            return None;
        }
        self.await_assembly_step(&plan.upload.id).await;
        match self.storage.saved_prefix(&plan.upload.id).await {
            Ok(prefix) => prefix.filter(|p| p.checkpoint.fits(records, self.sha256)),
            Err(e) => {
                tracing::warn!(upload_id = %plan.upload.id, error = %e, "the assembled prefix could not be read; merging from byte 0");
                None
            }
        }
    }

    /// Waits, for at most [`ASSEMBLY_STEP_WAIT`], while an API still runs a step of the
    /// upload's early assembly: that step ends with a checkpoint this merge carries on from,
    /// where starting at once would hash the same bytes twice, on the same cores. The API
    /// takes no further step (the upload is merging). A lock left by an API that died is
    /// waited on only that long; carrying on beside a live step is safe anyway (both write
    /// the same bytes), only slower.
    async fn await_assembly_step(&self, id: &UploadId) {
        let name = LockName::Assemble(id.clone());
        let deadline = tokio::time::Instant::now() + ASSEMBLY_STEP_WAIT;
        while matches!(self.lock.is_held(&name).await, Ok(true))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(ASSEMBLY_POLL).await;
        }
    }

    /// Publishes an event its commit wrote to the outbox and clears it once confirmed; if the
    /// broker fails, the entry stays for the sweeper (the commit stands either way).
    async fn publish_outboxed(&self, id: &UploadId, event: &Event, outboxed: OutboxMessage) {
        match self.events.publish_event(event).await {
            Ok(()) => {
                let entry = OutboxEntry::new(id.clone(), outboxed);
                if let Err(e) = self.state.clear_outbox_entry(&entry).await {
                    tracing::warn!(upload_id = %id, error = %e, "event published but not cleared from the outbox; it may be published twice");
                }
            }
            Err(e) => {
                tracing::warn!(upload_id = %id, error = %e, "completion event not published; the sweeper will publish it from the outbox");
            }
        }
    }

    async fn publish_completed(&self, id: &UploadId) -> Result<(), MergeError> {
        let status = self.state.upload_status(id).await.map_err(transient)?;
        if let Some(event) = status.as_ref().and_then(|s| self.completed_event(s)) {
            self.events.publish_event(&event).await.map_err(transient)?;
        }
        Ok(())
    }

    /// Puts the upload back to `receiving` with the `lost` chunks uncounted (fenced by the
    /// plan's token), publishes `upload.chunks_lost` from the outbox it was written to, and
    /// removes the lost chunks' bad copies so that nothing can count them again.
    async fn reopen(
        &self,
        plan: &MergePlan,
        lost: Vec<LostChunk>,
    ) -> Result<MergeOutcome, MergeError> {
        let id = &plan.upload.id;
        let reason = lost
            .iter()
            .map(LostChunk::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let indices: Vec<ChunkIndex> = lost.iter().map(|l| ChunkIndex(l.index)).collect();
        let event = Event::chunks_lost(&plan.upload, &indices);
        let outboxed = OutboxMessage::event(&event);
        match self
            .state
            .reopen_for_lost_chunks(id, plan.fence, &indices, &outboxed, self.ttl_ms)
            .await
        {
            Ok(Reopened::Now { .. }) => {}
            Ok(Reopened::NotMerging(state)) => {
                return Ok(MergeOutcome::Skipped(format!("the upload is {state}")));
            }
            Err(StateError::Conflict(_)) | Err(StateError::NotFound) => {
                return Ok(MergeOutcome::Skipped(
                    "fenced out by a newer attempt".into(),
                ));
            }
            Err(e) => return Err(transient(e)),
        }
        tracing::warn!(upload_id = %id, %reason, "counted chunks lost on storage: the upload is receiving again until the client re-sends them");
        m::transition("reopened");
        let bad_copies: Vec<PathBuf> = plan
            .chunks
            .iter()
            .filter(|c| indices.contains(&c.index))
            .map(|c| {
                self.storage
                    .copy_path(id, Piece::of(&plan.upload.assembly, c), &c.token)
            })
            .collect();
        for copy in bad_copies {
            remove(&copy).await;
        }
        match self.events.publish_event(&event).await {
            Ok(()) => {
                let entry = OutboxEntry::new(id.clone(), outboxed);
                if let Err(e) = self.state.clear_outbox_entry(&entry).await {
                    tracing::warn!(upload_id = %id, error = %e, "event published but not cleared from the outbox; it may be published twice");
                }
            }
            Err(e) => {
                tracing::warn!(upload_id = %id, error = %e, "upload.chunks_lost not published; the sweeper will publish it from the outbox");
            }
        }
        Ok(MergeOutcome::Reopened(
            indices.into_iter().map(|i| i.0).collect(),
        ))
    }

    /// Marks the upload failed (fenced by the attempt's token) with `upload.failed` in the
    /// same atomic step's outbox, then publishes it (the sweeper does, if that fails).
    async fn fail(&self, plan: &MergePlan, reason: &str) -> Result<MergeOutcome, MergeError> {
        let id = &plan.upload.id;
        tracing::warn!(upload_id = %id, %reason, "merge failed for good");
        let event_id = new_event_id();
        let event = Event::failed_from(&plan.upload, reason, &event_id, stitch_common::now_ms());
        let outboxed = OutboxMessage::event(&event);
        match self
            .state
            .fail_merge(
                id,
                Some(plan.fence),
                reason,
                &event_id,
                &outboxed,
                self.ttl_ms,
            )
            .await
        {
            Ok(Failed::Now) => {
                m::transition("failed");
                self.settle_quota(id, plan.upload.quota_bytes_until_complete())
                    .await;
                self.publish_outboxed(id, &event, outboxed).await;
                Ok(MergeOutcome::Failed(reason.to_owned()))
            }
            Ok(Failed::NotMerging(state)) => {
                Ok(MergeOutcome::Skipped(format!("the upload is {state}")))
            }
            Err(StateError::Conflict(_)) | Err(StateError::NotFound) => Ok(MergeOutcome::Skipped(
                "fenced out by a newer attempt".into(),
            )),
            Err(e) => Err(transient(e)),
        }
    }

    /// The parts of `plan`, checked, with their files: the upload's own chunks or segments,
    /// or, for a concatenation, the segments of each concatenated upload in turn.
    async fn parts_of(&self, plan: &MergePlan) -> Result<Parts, Unusable> {
        let id = &plan.upload.id;
        let assembly = &plan.upload.assembly;
        let source = |record: &ChunkRecord, owner: &UploadId, piece: Piece| ChunkSource {
            index: record.index.0,
            path: self.storage.copy_path(owner, piece, &record.token),
            len: record.len,
            crc32c: record.crc32c,
            md5: record.md5,
        };
        let mut parts = Parts {
            records: Vec::new(),
            sources: Vec::new(),
        };
        match assembly {
            Assembly::Chunks | Assembly::Segments { .. } => {
                if assembly.is_chunks() {
                    check_chunks(plan).map_err(Unusable::Lost)?;
                } else {
                    check_segments(plan).map_err(Unusable::Lost)?;
                }
                for c in &plan.chunks {
                    parts.sources.push(source(c, id, Piece::of(assembly, c)));
                    parts.records.push(c.clone());
                }
            }
            Assembly::Concat { parts: uploads } => {
                // Each segment is named by its offset in its own upload; the records carry
                // offsets in the whole file.
                let mut start = 0;
                for part in uploads {
                    let segments = self.complete_part(part).await?;
                    for segment in &segments {
                        let record = ChunkRecord {
                            index: ChunkIndex(parts.records.len() as u64),
                            offset: start + segment.offset,
                            ..segment.clone()
                        };
                        parts
                            .sources
                            .push(source(&record, part, Piece::Segment(segment.offset)));
                        parts.records.push(record);
                    }
                    start += segments.iter().map(|s| s.len).sum::<u64>();
                }
                if start != plan.upload.geometry.total_size {
                    return Err(Unusable::Parts(format!(
                        "the concatenated uploads hold {start} bytes, not {}",
                        plan.upload.geometry.total_size
                    )));
                }
            }
        }
        Ok(parts)
    }

    /// The segments of a partial upload a concatenation names, if it is complete.
    async fn complete_part(&self, part: &UploadId) -> Result<Vec<ChunkRecord>, Unusable> {
        let mut header = self
            .state
            .upload_header(part)
            .await
            .map_err(Unusable::Unavailable)?;
        if header.is_none() {
            // Lost by the state store (Redis restarted empty)? Storage decides.
            let rebuilt = self.recovery.rebuild(part).await.map_err(|e| {
                Unusable::Unavailable(StateError::Unavailable {
                    detail: e.to_string(),
                    outcome_unknown: false,
                })
            })?;
            if rebuilt {
                header = self
                    .state
                    .upload_header(part)
                    .await
                    .map_err(Unusable::Unavailable)?;
            }
        }
        let complete = |segments: &[ChunkRecord], size: u64| {
            let mut end = 0;
            for s in segments {
                if s.offset != end {
                    return false;
                }
                end += s.len;
            }
            end == size
        };
        match header {
            Some(h)
                if h.state == UploadState::Receiving
                    && h.assembly == (Assembly::Segments { partial: true }) =>
            {
                let segments = self
                    .state
                    .counted_chunks(part)
                    .await
                    .map_err(Unusable::Unavailable)?;
                if complete(&segments, h.geometry.total_size) {
                    Ok(segments)
                } else {
                    Err(Unusable::Parts(format!("{} is not complete", part.name())))
                }
            }
            _ => Err(Unusable::Parts(format!(
                "{} is not a complete partial upload",
                part.name()
            ))),
        }
    }

    /// After a concatenation committed, the partial uploads it used are done with: their
    /// records, quota and files go (tus lets a server delete them). A failure leaves them for
    /// the janitor, which expires them as it does any idle upload.
    async fn retire_parts(&self, plan: &MergePlan) {
        let Assembly::Concat { parts } = &plan.upload.assembly else {
            return;
        };
        for part in parts {
            let retired = async {
                let Some(status) = self.state.upload_status(part).await? else {
                    return anyhow::Ok(());
                };
                let event = Event::aborted(&status);
                let outboxed = OutboxMessage::event(&event);
                if let Aborted::Now { .. } = self
                    .state
                    .abort_upload(part, &outboxed, self.ttl_ms)
                    .await?
                {
                    self.publish_outboxed(part, &event, outboxed).await;
                }
                if let Some(quotas) = &self.quotas {
                    quotas.release(part).await?;
                }
                self.storage.remove_upload(part).await?;
                Ok(())
            };
            if let Err(e) = retired.await {
                tracing::warn!(upload_id = %part, error = %e, "a concatenated partial upload was not removed; the janitor will expire it");
            }
        }
    }

    /// Deletes what a finished upload no longer needs and releases the lock.
    pub async fn finish(&self, finish: Finish) {
        let cleaned = self
            .storage
            .remove_merge_leftovers(&finish.id, finish.keep.as_deref())
            .await;
        if let Err(e) = cleaned {
            tracing::warn!(upload_id = %finish.id, error = %e, "cleanup after merge incomplete; the janitor will finish it");
        }
        if let Some(lease) = finish.lease
            && let Err(e) = self.lock.release(&lease).await
        {
            tracing::warn!(upload_id = %finish.id, error = %e, "could not release the merge lock; it will expire");
        }
    }
}

/// The plan must cover every chunk exactly, as the geometry says. Otherwise the chunks that
/// are not recorded, or recorded inconsistently with the geometry, are lost: the client can
/// send them again.
fn check_chunks(plan: &MergePlan) -> Result<(), Vec<LostChunk>> {
    let g = plan.upload.geometry;
    let mut lost = Vec::new();
    let mut recorded = plan.chunks.iter().peekable();
    for i in 0..g.total_chunks {
        let index = ChunkIndex(i);
        while recorded.next_if(|c| c.index < index).is_some() {}
        match recorded.next_if(|c| c.index == index) {
            Some(c) if c.offset == g.chunk_start(index) && c.len == g.chunk_len(index) => {}
            Some(_) => lost.push(LostChunk {
                index: i,
                why: "is recorded inconsistently with the geometry".into(),
            }),
            None => lost.push(LostChunk {
                index: i,
                why: "is not recorded".into(),
            }),
        }
    }
    lost.extend(
        plan.chunks
            .iter()
            .filter(|c| c.index.0 >= g.total_chunks)
            .map(|c| LostChunk {
                index: c.index.0,
                why: "is recorded past the last chunk".into(),
            }),
    );
    if lost.is_empty() { Ok(()) } else { Err(lost) }
}

/// Segments must follow each other from offset 0 to the upload's size. From the first that
/// does not, every segment is lost: an upload of segments receives only at its end, so the
/// client resumes from the last good one.
fn check_segments(plan: &MergePlan) -> Result<(), Vec<LostChunk>> {
    let mut end = 0;
    for (n, segment) in plan.chunks.iter().enumerate() {
        if segment.offset != end || segment.index.0 != n as u64 {
            return Err(lost_from(
                &plan.chunks[n..],
                "does not follow the segment before it",
            ));
        }
        end += segment.len;
    }
    if end != plan.upload.geometry.total_size {
        return Err(vec![LostChunk {
            index: plan.chunks.len() as u64,
            why: format!("is missing: the segments end at byte {end}"),
        }]);
    }
    Ok(())
}

fn lost_from(segments: &[ChunkRecord], why: &str) -> Vec<LostChunk> {
    segments
        .iter()
        .map(|s| LostChunk {
            index: s.index.0,
            why: why.into(),
        })
        .collect()
}

/// For an upload of segments, what the concatenation found lost and every segment after it.
fn from_first_lost(plan: &MergePlan, lost: &[LostChunk]) -> Vec<LostChunk> {
    let first = lost.iter().map(|l| l.index).min().unwrap_or(0);
    let mut all = lost.to_vec();
    all.extend(lost_from(
        &plan
            .chunks
            .iter()
            .filter(|c| c.index.0 > first && !lost.iter().any(|l| l.index == c.index.0))
            .cloned()
            .collect::<Vec<_>>(),
        "follows a lost segment",
    ));
    all.sort_by_key(|l| l.index);
    all
}

/// The counted parts a merge concatenates, in order, and where each is on storage.
struct Parts {
    records: Vec<ChunkRecord>,
    sources: Vec<ChunkSource>,
}

/// Why a plan cannot be merged as it stands.
enum Unusable {
    /// Parts of the upload itself are lost: the client sends them again.
    Lost(Vec<LostChunk>),
    /// A concatenation's parts are not complete uploads (any more): the merge fails.
    Parts(String),
    Unavailable(StateError),
}

async fn remove(path: &std::path::Path) {
    let path: PathBuf = path.to_owned();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
}

/// Renews the lease every third of its TTL. If a renewal fails, or the lease may have lapsed
/// before a renewal succeeded, the merge is cancelled.
async fn watch_lease(
    lock: Arc<dyn MergeLock>,
    lease: Arc<Mutex<Lease>>,
    control: Arc<Control>,
    lost: Arc<AtomicBool>,
) {
    let period = lock.ttl() / 3;
    loop {
        tokio::time::sleep(period).await;
        let mut held = lease.lock().await;
        let renewed = if held.is_valid() {
            matches!(lock.renew(&mut held).await, Ok(true))
        } else {
            false
        };
        if !renewed {
            tracing::warn!(lock = %held.name(), "merge lease lost; stopping the merge");
            metrics::counter!(m::LOCK_LEASES_LOST).increment(1);
            lost.store(true, Ordering::SeqCst);
            control.cancel.store(true, Ordering::SeqCst);
            return;
        }
    }
}

/// Writes merge progress to the state store about once a second.
async fn report_progress(
    state: Arc<dyn StateStore>,
    id: UploadId,
    fence: u64,
    control: Arc<Control>,
) {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let done = control.bytes_done.load(Ordering::Relaxed);
        if done != last {
            last = done;
            let _ = state.report_merge_progress(&id, fence, done).await;
        }
    }
}
