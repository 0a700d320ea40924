//! Uploads of segments: created with their length, then appended to in order, each request
//! starting where the bytes received so far end (tus's `POST` and `PATCH`), plus the
//! concatenation of complete partial uploads into one.
//!
//! An append streams its body to storage as segments of at most `tus.segment_size` bytes,
//! each durable (fsync, rename) and then counted (one atomic state-store operation that
//! checks the offset) before the next begins. A body that breaks off keeps what arrived: the
//! segment being written is ended where the bytes stop and counted like any other, so the
//! client resumes from there. An append that declares a checksum is one segment, counted
//! only if the checksum matches. One append runs per upload at a time across the fleet (a
//! lease of `tus.append_lease`, renewed while it runs); the offset check makes even two
//! leaseholders (a lease that lapsed under a paused process) unable to corrupt anything.

use std::sync::Arc;

use bytes::Bytes;
use sha1::Digest as _;
use stitch_common::auth::{Principal, Scope};
use stitch_common::digest::Md5;
use stitch_common::events::Event;
use stitch_common::geometry::{ChunkIndex, Geometry};
use stitch_common::id::UploadId;
use stitch_common::lock::{Lease, LockName, MergeLock};
use stitch_common::metrics as m;
use stitch_common::now_ms;
use stitch_common::queue::{MergeJob, OutboxMessage};
use stitch_common::state::{Conflict, Created, Progress};
use stitch_common::storage::{Block, Feed, ManifestCheck, Piece, StagedChunk, StorageError};
use stitch_common::upload::{Assembly, ChunkRecord, NewUpload, UploadState, UploadStatus};
use tokio::sync::mpsc;

use super::{FEED_DEPTH, InFlight, PartBody, ServiceError, UploadName, UploadService};
use stitch_common::quota::Reservation;

/// A new upload of segments (tus `POST`).
#[derive(Clone, Debug)]
pub struct NewStream {
    /// `None`: declared later, by an append (tus `Upload-Defer-Length`).
    pub length: Option<u64>,
    pub filename: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// A part of a later concatenation: complete when its bytes are there, never merged
    /// alone.
    pub partial: bool,
}

/// A digest the client declared for one append's bytes (tus `Upload-Checksum`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeclaredDigest {
    Md5(Md5),
    Sha1([u8; 20]),
    Sha256([u8; 32]),
    Crc32c(u32),
}

/// One append (tus `PATCH`): where the client believes the upload's bytes end, and
/// optionally how many it sends and their digest.
#[derive(Clone, Debug)]
pub struct Append {
    pub id: UploadName,
    pub offset: u64,
    /// The body's length when the request declared it (`Content-Length`).
    pub length: Option<u64>,
    pub digest: Option<DeclaredDigest>,
    /// The upload's length, for an upload created without one (tus `Upload-Length` on a
    /// `PATCH`); once declared it cannot change.
    pub upload_length: Option<u64>,
}

/// Where an append left the upload.
#[derive(Clone, Debug)]
pub struct Appended {
    pub id: UploadId,
    /// The bytes received so far (the next append's offset).
    pub offset: u64,
    pub progress: Option<Progress>,
    /// When the upload expires if nothing more happens (`Upload-Expires`); `None` once it
    /// stopped receiving.
    pub expires_at_ms: Option<u64>,
}

/// Hashes for a declared digest the storage writer does not compute (SHA-1, SHA-256).
enum BodyHasher {
    None,
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl BodyHasher {
    fn for_digest(digest: Option<&DeclaredDigest>) -> Self {
        match digest {
            Some(DeclaredDigest::Sha1(_)) => Self::Sha1(sha1::Sha1::new()),
            Some(DeclaredDigest::Sha256(_)) => Self::Sha256(sha2::Sha256::new()),
            _ => Self::None,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::None => {}
            Self::Sha1(h) => h.update(bytes),
            Self::Sha256(h) => h.update(bytes),
        }
    }

    /// Whether `staged` (with the MD5 and CRC32C the writer computed) is what `digest` says.
    fn matches(self, digest: &DeclaredDigest, staged: &StagedChunk) -> bool {
        match (self, digest) {
            (Self::Sha1(h), DeclaredDigest::Sha1(want)) => h.finalize().as_slice() == want,
            (Self::Sha256(h), DeclaredDigest::Sha256(want)) => h.finalize().as_slice() == want,
            (_, DeclaredDigest::Md5(want)) => staged.digests.md5 == Some(*want),
            (_, DeclaredDigest::Crc32c(want)) => staged.digests.crc32c == *want,
            _ => false,
        }
    }
}

/// How one segment's body ended.
enum SegmentEnd {
    /// It reached its size; the body goes on.
    Full,
    /// The body ended (cleanly).
    BodyDone,
    /// The body failed (the client went away, too slow, too long): the segment holds what
    /// arrived before.
    BodyFailed(ServiceError),
}

impl UploadService {
    /// Creates an upload of segments of `req.length` bytes in the caller's tenant, under a
    /// fresh id: manifest first, then the state store, as [`UploadService::create_upload`].
    pub async fn create_stream(
        &self,
        caller: &Principal,
        req: NewStream,
    ) -> Result<UploadStatus, ServiceError> {
        caller.require(Scope::Upload)?;
        let id = caller.new_upload_id()?;
        let geometry = match req.length {
            Some(0) => {
                return Err(ServiceError::InvalidRequest(
                    "an upload must have at least 1 byte".into(),
                ));
            }
            Some(length) => {
                self.check_size(length)?;
                caller.check_size(length)?;
                Geometry::new(length, length)?
            }
            None => Geometry::deferred(),
        };
        let filename = req.filename.map(|f| self.check_filename(f)).transpose()?;
        self.check_metadata(req.metadata.as_ref())?;
        let mut upload = NewUpload {
            id,
            geometry,
            filename,
            file_md5: None,
            metadata: req.metadata,
            created_at_ms: now_ms(),
            assembly: Assembly::Segments {
                partial: req.partial,
            },
            callback_url: None,
            callback_secret: None,
        };
        let reservation = match self.upload_header(&upload.id).await? {
            Some(_) => Reservation::Held,
            None => self.admit(caller, &mut upload).await?,
        };
        let id = upload.id.clone();
        let created = self.create_admitted(upload).await;
        if created.is_err() && reservation == Reservation::New {
            self.undo_reservation(&id).await;
        }
        created.map(|(_, status, _)| status)
    }

    /// Creates the concatenation of the caller's complete partial uploads `parts`, in order,
    /// merging as it is created. The parts are checked here; the merge checks them again
    /// (one may be deleted in between) and fails the concatenation if one is gone.
    pub async fn create_concatenation(
        &self,
        caller: &Principal,
        parts: Vec<UploadName>,
        filename: Option<String>,
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<UploadStatus, ServiceError> {
        caller.require(Scope::Upload)?;
        if parts.is_empty() || parts.len() as u64 > self.limits.max_chunks {
            return Err(ServiceError::InvalidRequest(format!(
                "a concatenation has 1 to {} parts",
                self.limits.max_chunks
            )));
        }
        let mut ids = Vec::with_capacity(parts.len());
        let mut length = 0u64;
        for name in &parts {
            let id = caller.upload_id(name.as_str())?;
            let status = self.status_of(&id).await?;
            let complete = status.state == UploadState::Receiving
                && status.assembly == (Assembly::Segments { partial: true })
                && status.bytes_received == status.geometry.total_size;
            if !complete {
                return Err(ServiceError::InvalidRequest(format!(
                    "{} is not a complete partial upload",
                    name.as_str()
                )));
            }
            length = length.saturating_add(status.geometry.total_size);
            ids.push(id);
        }
        self.check_size(length)?;
        caller.check_size(length)?;
        let filename = filename.map(|f| self.check_filename(f)).transpose()?;
        self.check_metadata(metadata.as_ref())?;
        let mut upload = NewUpload {
            id: caller.new_upload_id()?,
            geometry: Geometry::new(length, length)?,
            filename,
            file_md5: None,
            metadata,
            created_at_ms: now_ms(),
            assembly: Assembly::Concat { parts: ids },
            callback_url: None,
            callback_secret: None,
        };
        let reservation = self.admit(caller, &mut upload).await?;
        let id = upload.id.clone();
        let created = self.create_merging(upload).await;
        if created.is_err() && reservation == Reservation::New {
            self.undo_reservation(&id).await;
        }
        created
    }

    /// A concatenation's manifest, then its record (merging, with its merge job), then the
    /// job itself.
    async fn create_merging(&self, upload: NewUpload) -> Result<UploadStatus, ServiceError> {
        if let ManifestCheck::Conflicts(_) = self.storage.ensure_manifest(&upload).await? {
            return Err(Conflict::Assembly.into());
        }
        let event = Event::created(&upload);
        let outboxed = OutboxMessage::event(&event);
        let job = MergeJob::new(upload.id.clone());
        let created = self
            .state
            .create_concatenation(
                &upload,
                &outboxed,
                &OutboxMessage::Merge(job.clone()),
                self.ttl_ms,
            )
            .await?;
        if created == Created::New {
            m::transition("created");
            self.publish_event(&upload.id, &event, &outboxed).await;
            self.trigger_merge(&upload.id, job).await;
        }
        self.status_of(&upload.id).await
    }

    /// The status of an upload of segments for tus `HEAD`: refused, like any append, once the
    /// upload expired.
    pub async fn stream_status(
        &self,
        caller: &Principal,
        name: &UploadName,
    ) -> Result<UploadStatus, ServiceError> {
        let status = self.upload_status(caller, name).await?;
        self.check_not_expired(&status)?;
        Ok(status)
    }

    /// When an upload still receiving expires, if nothing happens to it before: its last
    /// activity plus `uploads.ttl`.
    pub fn expires_at_ms(&self, status: &UploadStatus) -> Option<u64> {
        (status.state == UploadState::Receiving)
            .then(|| status.updated_at_ms.saturating_add(self.ttl_ms))
    }

    fn check_not_expired(&self, status: &UploadStatus) -> Result<(), ServiceError> {
        match self.expires_at_ms(status) {
            Some(at) if at <= now_ms() => Err(ServiceError::Expired),
            _ if status.state == UploadState::Aborted => Err(ServiceError::Expired),
            _ => Ok(()),
        }
    }

    /// Appends the body to the caller's upload of segments at `append.offset` (see the
    /// module's documentation). Returns where the upload's bytes end now.
    pub async fn append<B: PartBody>(
        &self,
        caller: &Principal,
        append: Append,
        mut body: B,
    ) -> Result<Appended, ServiceError> {
        caller.require(Scope::Upload)?;
        let id = caller.upload_id(append.id.as_str())?;
        let mut status = self.status_of(&id).await?;
        self.check_not_expired(&status)?;
        if let Some(length) = append.upload_length {
            self.declare_length(caller, &mut status, length).await?;
            if status.bytes_received == length && append.offset == length {
                // The declaration completed the upload.
                return self.only_empty(id, length, &mut body).await;
            }
        }
        let room = self.room_for(caller, &status, &append)?;
        let _permit = self
            .write_permits
            .try_take(&id.tenant())
            .map_err(|_| ServiceError::Busy)?;
        let lease = self.take_append_lease(&id).await?;
        let renewer = tokio::spawn(renew_while_appending(
            self.append_lock.clone(),
            lease.clone(),
        ));
        let _in_flight = InFlight::start();
        let appended = self
            .append_segments(&id, append.offset, room, append.digest, &mut body)
            .await;
        renewer.abort();
        let lease = lease.lock().await;
        if let Err(e) = self.append_lock.release(&lease).await {
            tracing::warn!(upload_id = %id, error = %e, "could not release the append lease; it will lapse");
        }
        let appended = appended?;
        Ok(Appended {
            expires_at_ms: self.expiry_after(&status, appended.progress.as_ref()),
            ..appended
        })
    }

    /// When the upload expires after an append that left it at `progress` (`None`: nothing
    /// was counted, the upload is as `before`): a count is activity, so `uploads.ttl` from
    /// now; `None` once it is no longer receiving.
    fn expiry_after(&self, before: &UploadStatus, progress: Option<&Progress>) -> Option<u64> {
        match progress {
            Some(p) => (p.state == UploadState::Receiving).then(|| now_ms() + self.ttl_ms),
            None => self.expires_at_ms(before),
        }
    }

    /// How many bytes `append` may bring to the upload `status` describes, once it is checked
    /// to take them: an upload of segments, receiving, at the offset the client believes.
    fn room_for(
        &self,
        caller: &Principal,
        status: &UploadStatus,
        append: &Append,
    ) -> Result<u64, ServiceError> {
        if !matches!(status.assembly, Assembly::Segments { .. }) {
            return Err(Conflict::Assembly.into());
        }
        if status.state != UploadState::Receiving {
            return Err(Conflict::NotReceiving(status.state).into());
        }
        let received = status.bytes_received;
        if append.offset != received {
            return Err(Conflict::Offset { current: received }.into());
        }
        let size = status.geometry.total_size;
        let room = match status.geometry.is_deferred() {
            // Until its length is declared, an upload grows up to what its length could be.
            true => self.largest_upload(caller).saturating_sub(received),
            false => size - received,
        };
        if let Some(len) = append.length
            && len > room
        {
            return Err(Conflict::PastEnd { size }.into());
        }
        if status.chunks_received >= self.limits.max_chunks {
            return Err(ServiceError::TooManyChunks {
                count: status.chunks_received + 1,
                max: self.limits.max_chunks,
            });
        }
        Ok(room)
    }

    /// An append to an upload that has every byte: it may only be empty.
    async fn only_empty<B: PartBody>(
        &self,
        id: UploadId,
        offset: u64,
        body: &mut B,
    ) -> Result<Appended, ServiceError> {
        if self.body_has_more(&mut None, body).await {
            return Err(ServiceError::BodyTooLong { expected: 0 });
        }
        Ok(Appended {
            id,
            offset,
            progress: None,
            expires_at_ms: None,
        })
    }

    /// Fixes the length of an upload created without one: checked against the limits and
    /// quotas, written to storage (the truth), then to the state store, which may complete
    /// the upload (every byte was there already). Declaring the length the upload has is a
    /// no-op; another one is a conflict.
    async fn declare_length(
        &self,
        caller: &Principal,
        status: &mut UploadStatus,
        length: u64,
    ) -> Result<(), ServiceError> {
        let current = status.geometry.total_size;
        if !status.geometry.is_deferred() || length < status.bytes_received || length == 0 {
            return match current == length {
                true => Ok(()),
                false => Err(Conflict::Length {
                    current,
                    received: status.bytes_received,
                }
                .into()),
            };
        }
        self.check_size(length)?;
        caller.check_size(length)?;
        let quotas = self.auth_settings.quotas_of(caller.tenant.as_str());
        if let Some(max) = quotas.max_upload_bytes
            && length > max.0
        {
            return Err(ServiceError::QuotaUploadTooLarge {
                size: length,
                max: max.0,
            });
        }
        let id = status.id.clone();
        if let Some(existing) = self.storage.record_length(&id, length).await? {
            return Err(Conflict::Length {
                current: existing,
                received: status.bytes_received,
            }
            .into());
        }
        let job = MergeJob::new(id.clone());
        let progress = self
            .state
            .declare_length(&id, length, &OutboxMessage::Merge(job.clone()), self.ttl_ms)
            .await?;
        // The ledger holds the declared size from now on (it held nothing for this upload).
        if let Err(e) = self.quotas.track(&id, length, true).await {
            tracing::warn!(upload_id = %id, error = %e, "the declared length is not in the quota ledger yet; the janitor will put it there");
        }
        if progress.completed_upload {
            self.trigger_merge(&id, job).await;
        }
        status.geometry = Geometry::new(length, length)?;
        status.state = progress.state;
        Ok(())
    }

    async fn take_append_lease(
        &self,
        id: &UploadId,
    ) -> Result<Arc<tokio::sync::Mutex<Lease>>, ServiceError> {
        match self
            .append_lock
            .try_acquire(&LockName::Append(id.clone()))
            .await
        {
            Ok(Some(lease)) => Ok(Arc::new(tokio::sync::Mutex::new(lease))),
            Ok(None) => Err(ServiceError::Locked),
            Err(e) => Err(ServiceError::Unavailable(e.to_string())),
        }
    }

    /// Streams the body into segments from `offset`, at most `room` bytes, counting each.
    async fn append_segments<B: PartBody>(
        &self,
        id: &UploadId,
        mut offset: u64,
        room: u64,
        digest: Option<DeclaredDigest>,
        body: &mut B,
    ) -> Result<Appended, ServiceError> {
        // A declared digest covers the whole body: one segment, counted only if it matches.
        let segment_size = match digest {
            Some(_) => room,
            None => self.segment_size.min(room),
        };
        if room == 0 {
            return self.only_empty(id.clone(), offset, body).await;
        }
        let (limit, mut carry) = (offset + room, None);
        let mut progress = None;
        loop {
            let max = segment_size.min(limit - offset);
            let mut hasher = BodyHasher::for_digest(digest.as_ref());
            let (staged, end) = self
                .stage_segment(
                    id,
                    offset,
                    max,
                    &mut carry,
                    &mut hasher,
                    digest.is_some(),
                    body,
                )
                .await?;
            let (body_done, failure) = match end {
                SegmentEnd::Full => (false, None),
                SegmentEnd::BodyDone => (true, None),
                SegmentEnd::BodyFailed(e) => (true, Some(e)),
            };
            let Some(staged) = staged else {
                // Nothing arrived for this segment.
                return match failure {
                    Some(e) => Err(e),
                    None => Ok(Appended {
                        id: id.clone(),
                        offset,
                        progress,
                        expires_at_ms: None,
                    }),
                };
            };
            let failure = self
                .vouch(digest.as_ref(), hasher, &staged, failure)
                .await?;
            let counted = self.count_segment(id, offset, &staged).await?;
            offset = counted.bytes_received;
            progress = Some(counted);
            if let Some(e) = failure {
                return Err(e);
            }
            if body_done || offset >= limit {
                if offset >= limit && self.body_has_more(&mut carry, body).await {
                    return Err(ServiceError::BodyTooLong { expected: room });
                }
                return Ok(Appended {
                    id: id.clone(),
                    offset,
                    progress,
                    expires_at_ms: None,
                });
            }
        }
    }

    /// A staged segment with a declared digest counts only if the whole body arrived and
    /// matches it; otherwise its copy goes and the error is returned. Without a digest, the
    /// body's own failure (if any) is handed back, to report once the segment is counted.
    async fn vouch(
        &self,
        digest: Option<&DeclaredDigest>,
        hasher: BodyHasher,
        staged: &StagedChunk,
        failure: Option<ServiceError>,
    ) -> Result<Option<ServiceError>, ServiceError> {
        let Some(declared) = digest else {
            return Ok(failure);
        };
        // A body that broke off cannot match its digest: nothing of it counts.
        if failure.is_some() || !hasher.matches(declared, staged) {
            self.storage.discard(staged).await;
            return Err(failure.unwrap_or(ServiceError::ChecksumMismatch {
                what: "Upload-Checksum",
            }));
        }
        Ok(None)
    }

    /// Whether anything follows the bytes the upload had room for.
    async fn body_has_more<B: PartBody>(&self, carry: &mut Option<Bytes>, body: &mut B) -> bool {
        if carry.take().is_some_and(|b| !b.is_empty()) {
            return true;
        }
        matches!(body.next().await, Ok(Some(b)) if !b.is_empty())
    }

    /// Writes one segment at `offset` of at most `max` bytes from the body (starting with
    /// `carry`, what the segment before left over) to a durable copy. `None` when no byte
    /// arrived.
    #[allow(clippy::too_many_arguments)]
    async fn stage_segment<B: PartBody>(
        &self,
        id: &UploadId,
        offset: u64,
        max: u64,
        carry: &mut Option<Bytes>,
        hasher: &mut BodyHasher,
        with_md5: bool,
        body: &mut B,
    ) -> Result<(Option<StagedChunk>, SegmentEnd), ServiceError> {
        let (tx, rx) = mpsc::channel(FEED_DEPTH);
        let tap = self.assembler.as_ref().and_then(|a| a.tap(id, offset));
        let writer = self.storage.stage_chunk(
            id,
            Piece::Segment(offset),
            with_md5 || self.always_md5,
            rx,
            tap,
        );
        let reader = self.feed_segment(max, carry, hasher, body, tx);
        let (written, (taken, end)) = tokio::join!(writer, reader);
        match (written, end) {
            (Ok(staged), Some(end)) => Ok((Some(staged), end)),
            (Err(StorageError::Interrupted), Some(end)) if taken == 0 => Ok((None, end)),
            (Err(e), _) => Err(e.into()),
            (Ok(staged), None) => {
                self.storage.discard(&staged).await;
                Err(ServiceError::Internal("the segment writer stopped".into()))
            }
        }
    }

    /// Feeds at most `max` bytes of the body (`carry` first) to a segment's writer, ending
    /// the segment wherever the body stops. Returns how many bytes it fed and how the body
    /// ended; `None` when the writer went away (its error is the one to report).
    async fn feed_segment<B: PartBody>(
        &self,
        max: u64,
        carry: &mut Option<Bytes>,
        hasher: &mut BodyHasher,
        body: &mut B,
        tx: mpsc::Sender<Feed>,
    ) -> (u64, Option<SegmentEnd>) {
        let (budget, budget_kib) = (self.body_budget.clone(), self.body_budget_kib);
        let mut taken = 0u64;
        let end = loop {
            let mut bytes = match carry.take() {
                Some(bytes) => bytes,
                None => match body.next().await {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => break SegmentEnd::BodyDone,
                    Err(e) => break SegmentEnd::BodyFailed(e),
                },
            };
            let wanted = (max - taken) as usize;
            if bytes.len() > wanted {
                *carry = Some(bytes.split_off(wanted));
            }
            if bytes.is_empty() {
                break SegmentEnd::Full;
            }
            taken += bytes.len() as u64;
            hasher.update(&bytes);
            // Wait for memory before holding more: the budget is shared by every body.
            let kib = (bytes.len().div_ceil(1024) as u32).clamp(1, budget_kib);
            let Ok(permit) = budget.clone().acquire_many_owned(kib).await else {
                break SegmentEnd::BodyFailed(ServiceError::Internal(
                    "the body budget closed".into(),
                ));
            };
            if tx
                .send(Feed::Data(Block::new(bytes, Some(permit))))
                .await
                .is_err()
            {
                return (taken, None);
            }
            if taken == max {
                break SegmentEnd::Full;
            }
        };
        // Whatever arrived is a segment, however the body ended.
        if taken > 0 {
            let _ = tx.send(Feed::End).await;
        }
        (taken, Some(end))
    }

    /// Counts a durable segment at `offset`; a refusal removes its copy.
    async fn count_segment(
        &self,
        id: &UploadId,
        offset: u64,
        staged: &StagedChunk,
    ) -> Result<Progress, ServiceError> {
        #[cfg(feature = "failpoints")]
        stitch_common::failpoints::crash_here(
            stitch_common::failpoints::SEGMENT_DURABLE_BEFORE_RECORD,
        );
        let record = ChunkRecord {
            index: ChunkIndex(0),
            offset,
            len: staged.digests.len,
            crc32c: staged.digests.crc32c,
            md5: staged.digests.md5,
            token: staged.token.clone(),
        };
        let job = MergeJob::new(id.clone());
        match self
            .state
            .append_segment(id, &record, &OutboxMessage::Merge(job.clone()), self.ttl_ms)
            .await
        {
            Ok(progress) => {
                metrics::counter!(m::CHUNKS_RECEIVED, "result" => "segment").increment(1);
                metrics::counter!(m::CHUNK_BYTES_RECEIVED).increment(record.len);
                if progress.completed_upload {
                    self.trigger_merge(id, job).await;
                } else {
                    self.assemble(id);
                }
                Ok(progress)
            }
            Err(e) => Err(self.unrecorded(staged, e).await),
        }
    }
}

/// Renews an append's lease every third of its length until aborted.
async fn renew_while_appending(lock: Arc<dyn MergeLock>, lease: Arc<tokio::sync::Mutex<Lease>>) {
    let period = lock.ttl() / 3;
    loop {
        tokio::time::sleep(period).await;
        let mut held = lease.lock().await;
        if !matches!(lock.renew(&mut held).await, Ok(true)) {
            // The offset check still keeps the upload whole; another append may now start.
            tracing::warn!(lock = %held.name(), "append lease lost");
            return;
        }
    }
}
