//! Assembling a file while its chunks arrive (`merge.incremental`), so that the verified
//! file is there moments after the last byte instead of one whole MD5 later.
//!
//! The API that counts a chunk calls [`Assembler::chunk_counted`]. In the background, one
//! API of the fleet at a time (lock [`LockName::Assemble`], tried, never waited for) carries
//! the upload's *prefix* on: the counted chunks that follow each other from byte 0 without a
//! gap. Each is read once (with direct I/O, as it was written: `storage.direct_io`; from the
//! page cache otherwise), on threads at nice `merge.assembly_nice` so that requests come
//! first, checked against its record
//! (CRC32C, MD5 when recorded), appended to the upload's assembly file and fed to the MD5 (and
//! SHA-256) — the merge's own loop, [`super::concatenate`], resumed. After each step the
//! assembly is synced and a [`Checkpoint`] saved on storage: how many bytes and chunks the
//! assembly holds, which copies they came from, and the hashes' serialized state. A crash
//! (of the API, or of the merge that finishes the job) loses at most the step in flight:
//! the next run carries on from the last checkpoint, never from byte 0.
//!
//! The merge reads the newest checkpoint that [`Checkpoint::fits`] what it counts, and only
//! appends and hashes what the prefix has not covered, into the same file; chunks that
//! arrive out of order wait for the gap before them to fill, then the prefix catches up
//! (an upload sent in reverse is assembled entirely by the merge, as without this).
//!
//! Why this cannot publish a wrong digest, whoever is paused or killed where:
//! - a checkpoint names the exact copies it covers (a digest of their tokens, which are
//!   unique per copy); a checkpoint that does not fit the counted chunks — a chunk storage
//!   lost and the client sent again, an upload aborted and created anew — is ignored;
//! - checkpoints are named by the offset they reach and only written after the assembly's
//!   bytes up to it are synced, so a stale writer can add an older checkpoint (never used: the
//!   newest is) or one identical to a newer writer's, never a wrong one;
//! - any writer of an assembly file writes the bytes of the same counted copies at the same
//!   offsets, so two writers of one file (an API whose lease lapsed, and the merge) write
//!   the same bytes, and nothing ever truncates an assembly file;
//! - a merge that cannot use the prefix (no checkpoint, or none that fits) merges from byte
//!   0 into a file of its own, as without this.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::hashing::FileHasher;
use super::lanes::{HashLanes, Tap};
use super::{ChunkSource, Concat, ConcatError, Control, HashState, clone_run, concatenate};
use crate::config::Settings;
use crate::id::UploadId;
use crate::lock::{LockName, MergeLock};
use crate::metrics as m;
use crate::state::{StateError, StateStore};
use crate::storage::{CheckpointFile, FsChunkStore, Piece, SavedPrefix, StorageError};
use crate::upload::{Assembly, ChunkRecord, UploadState};

/// How far one step carries the prefix before it saves a checkpoint (and the lease is
/// renewed before the next, once half its length is gone).
const STEP_BYTES: u64 = 256 << 20;

/// How many counted parts after the prefix a step reads at most (it stops at
/// [`STEP_BYTES`] anyway; the next step reads on), and how many it asks for first.
const RUN_PARTS: usize = 256;
const RUN_FIRST: usize = 4;

/// How many uploads' prefixes one process carries on at most (see
/// [`Inner::prefix_and_next`]); past it, the one carried on longest ago is read again from
/// storage when its upload comes back.
const CARRIED_MAX: usize = 1024;

/// What is known of an assembly file: its first `hashes.offset` bytes are the file's, made
/// of the first `chunks` counted parts, whose copies' tokens digest to `tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The assembly file's name in the upload's directory (storage's to build and read).
    pub(crate) assembly: String,
    pub chunks: u64,
    /// SHA-256 (hex) of the covered copies' tokens, one per line, in order.
    pub tokens: String,
    pub hashes: HashState,
}

impl Checkpoint {
    /// Whether this checkpoint covers exactly the first [`Checkpoint::chunks`] of `records`
    /// (the counted parts in order): the same copies, from byte 0 without a gap, up to its
    /// offset — and computes the SHA-256 exactly when `sha256` is asked for.
    pub fn fits(&self, records: &[ChunkRecord], sha256: bool) -> bool {
        let Ok(n) = usize::try_from(self.chunks) else {
            return false;
        };
        let Some(covered) = records.get(..n) else {
            return false;
        };
        self.hashes.has_sha256() == sha256
            && contiguous_len(covered) == Some(self.hashes.offset)
            && tokens_digest(covered) == self.tokens
    }
}

/// The length of `records` if they follow each other from byte 0 without a gap.
fn contiguous_len(records: &[ChunkRecord]) -> Option<u64> {
    records.iter().try_fold(0u64, |end, r| {
        (r.offset == end && r.len > 0).then(|| end + r.len)
    })
}

fn tokens_digest(records: &[ChunkRecord]) -> String {
    let mut sha = sha2::Sha256::new();
    digest_tokens(&mut sha, records);
    hex::encode(sha.finalize())
}

fn digest_tokens(sha: &mut sha2::Sha256, records: &[ChunkRecord]) {
    for r in records {
        sha.update(r.token.as_bytes());
        sha.update(b"\n");
    }
}

/// Where an upload's prefix stands: what its next step carries on from.
#[derive(Clone)]
struct Prefix {
    /// The assembly file's name (as its checkpoints record it) and path.
    assembly: String,
    path: PathBuf,
    /// How many counted parts it covers, from the first.
    chunks: u64,
    /// The hashes after them; `None` before the first step (byte 0, no file yet).
    hashes: Option<HashState>,
    /// The covered copies' tokens, digested so far: a checkpoint's `tokens` without
    /// reading them all again.
    tokens: sha2::Sha256,
    /// The checkpoint it stands at, when this process saved it (the next one replaces it).
    saved_here: Option<CheckpointFile>,
    /// When it was carried on last.
    at: std::time::Instant,
}

impl Prefix {
    /// Nothing assembled yet, into a new file.
    fn new(assembly: String, path: PathBuf) -> Self {
        Self {
            assembly,
            path,
            chunks: 0,
            hashes: None,
            tokens: sha2::Sha256::new(),
            saved_here: None,
            at: std::time::Instant::now(),
        }
    }

    /// The checkpoint `saved` on storage, which fits `records` (the counted parts in order).
    fn resumed(saved: SavedPrefix, records: &[ChunkRecord]) -> Self {
        let mut tokens = sha2::Sha256::new();
        digest_tokens(&mut tokens, &records[..saved.checkpoint.chunks as usize]);
        Self {
            assembly: saved.checkpoint.assembly,
            path: saved.path,
            chunks: saved.checkpoint.chunks,
            hashes: Some(saved.checkpoint.hashes),
            tokens,
            saved_here: None,
            at: std::time::Instant::now(),
        }
    }

    fn offset(&self) -> u64 {
        self.hashes.as_ref().map_or(0, |h| h.offset)
    }

    /// The prefix once `parts` (the next ones) are appended, with the hashes after them,
    /// and its checkpoint (which the caller saves, then notes with [`Prefix::saved`]).
    fn extended(mut self, parts: &[ChunkRecord], hashes: HashState) -> (Self, Checkpoint) {
        digest_tokens(&mut self.tokens, parts);
        self.chunks += parts.len() as u64;
        let checkpoint = Checkpoint {
            assembly: self.assembly.clone(),
            chunks: self.chunks,
            tokens: hex::encode(self.tokens.clone().finalize()),
            hashes: hashes.clone(),
        };
        self.hashes = Some(hashes);
        self.saved_here = None;
        self.at = std::time::Instant::now();
        (self, checkpoint)
    }

    fn saved(self, file: CheckpointFile) -> Self {
        Self {
            saved_here: Some(file),
            ..self
        }
    }
}

/// How many of `records` (counted parts in order) follow the first `from` without a gap,
/// up to about `max_bytes` (at least one).
fn next_run(records: &[ChunkRecord], from: usize, offset: u64, max_bytes: u64) -> usize {
    let mut end = offset;
    let mut n = 0;
    for r in records.iter().skip(from) {
        if r.offset != end || r.len == 0 || (n > 0 && end - offset >= max_bytes) {
            break;
        }
        end += r.len;
        n += 1;
    }
    n
}

/// A part's copy on storage, as the concatenation reads it.
pub fn source(
    storage: &FsChunkStore,
    id: &UploadId,
    assembly: &Assembly,
    record: &ChunkRecord,
) -> ChunkSource {
    ChunkSource {
        index: record.index.0,
        path: storage.copy_path(id, Piece::of(assembly, record), &record.token),
        len: record.len,
        crc32c: record.crc32c,
        md5: record.md5,
    }
}

/// Why a step of the assembly stopped. None of these matters to the upload: the merge does
/// whatever the prefix did not.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("state store: {0}")]
    State(#[from] StateError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("assembling: {0}")]
    Concat(#[from] ConcatError),
    #[error("lock: {0}")]
    Lock(String),
}

/// Carries uploads' prefixes on in the background of the API that counts their chunks.
#[derive(Clone)]
pub struct Assembler {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<dyn StateStore>,
    storage: FsChunkStore,
    lock: Arc<dyn MergeLock>,
    block_bytes: usize,
    fsync: bool,
    direct_io: bool,
    reflink: bool,
    read_direct: bool,
    nice: i32,
    sha256: bool,
    /// Hashing in line (`merge.hash_in_line`).
    lanes: Option<HashLanes>,
    /// Uploads this process is assembling now, and whether a chunk was counted for one
    /// meanwhile (the running task looks again before it stops).
    running: Mutex<HashMap<UploadId, bool>>,
    /// The prefixes this process saved last, carried on from step to step.
    carried: Mutex<HashMap<UploadId, Prefix>>,
}

impl Assembler {
    /// `None` when `merge.incremental` is off.
    pub fn new(
        settings: &Settings,
        state: Arc<dyn StateStore>,
        storage: FsChunkStore,
        lock: Arc<dyn MergeLock>,
    ) -> Option<Self> {
        if !settings.merge.incremental {
            return None;
        }
        let sha256 = settings.uploads.file_digest.with_sha256();
        let lanes = (settings.merge.hash_in_line && settings.merge.reflink).then(|| {
            HashLanes::new(
                sha256,
                settings.merge.hash_queue.0,
                settings.merge.hash_ahead.0,
            )
        });
        let assembler = Self {
            inner: Arc::new(Inner {
                state,
                storage,
                lock,
                block_bytes: settings.merge.buffer_bytes.0 as usize,
                fsync: settings.storage.fsync,
                direct_io: settings.merge.direct_io,
                reflink: settings.merge.reflink,
                read_direct: settings.storage.direct_io,
                nice: settings.merge.assembly_nice.into(),
                sha256,
                lanes,
                running: Mutex::new(Default::default()),
                carried: Mutex::new(Default::default()),
            }),
        };
        if let Some(lanes) = &assembler.inner.lanes {
            // A copy hashed in line may let the prefix go further.
            let inner = Arc::downgrade(&assembler.inner);
            lanes.on_hashed(move |id| {
                if let Some(inner) = inner.upgrade() {
                    Assembler { inner }.chunk_counted(id);
                }
            });
        }
        Some(assembler)
    }

    /// A way for the piece of `id` that starts at `start` into its upload's lane, when
    /// hashing it in line can be of use ([`HashLanes::tap`]).
    pub fn tap(&self, id: &UploadId, start: u64) -> Option<Tap> {
        self.inner.lanes.as_ref()?.tap(id, start)
    }

    /// A chunk of `id` was counted: carry its prefix on in the background. Returns at once;
    /// at most one task per upload runs in this process.
    pub fn chunk_counted(&self, id: &UploadId) {
        {
            let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = running.get_mut(id) {
                *again = true;
                return;
            }
            running.insert(id.clone(), false);
        }
        let inner = self.inner.clone();
        let id = id.clone();
        tokio::spawn(async move {
            loop {
                // Chunks counted while the lease is held are looked at under the same lease.
                if let Err(e) = inner.advance(&id, || inner.counted_again(&id)).await {
                    tracing::debug!(upload_id = %id, error = %e, "the prefix was not carried on; the merge will do it");
                    metrics::counter!(m::ASSEMBLY_STEPS, "result" => "error").increment(1);
                }
                // And one counted between the last look and the release, under a new one.
                let mut running = inner.running.lock().unwrap_or_else(|e| e.into_inner());
                match running.get_mut(&id) {
                    Some(again) if *again => *again = false,
                    _ => {
                        running.remove(&id);
                        break;
                    }
                }
            }
        });
    }

    /// Carries `id`'s prefix as far as its counted chunks go, now (the background task's
    /// work, for tests). Returns the bytes the prefix covers afterwards.
    pub async fn advance(&self, id: &UploadId) -> Result<u64, AssembleError> {
        self.inner.advance(id, || false).await
    }
}

impl Inner {
    /// Takes the upload's assembly lease and carries the prefix on, again while `again`
    /// says a chunk was counted meanwhile, then lets the lease go: one lease for a run of
    /// chunks arriving one after the other, not one per chunk.
    async fn advance(&self, id: &UploadId, again: impl Fn() -> bool) -> Result<u64, AssembleError> {
        let name = LockName::Assemble(id.clone());
        let Some(mut lease) = self
            .lock
            .try_acquire(&name)
            .await
            .map_err(|e| AssembleError::Lock(e.to_string()))?
        else {
            // Another API is at it; it looks again before it lets go.
            metrics::counter!(m::ASSEMBLY_LEASES, "result" => "busy").increment(1);
            return Ok(0);
        };
        metrics::counter!(m::ASSEMBLY_LEASES, "result" => "taken").increment(1);
        let result = loop {
            let result = self.advance_locked(id, &mut lease).await;
            if result.is_err() {
                break result;
            }
            // Looks that find a gap take no step, so nothing else renews the lease while
            // chunks keep coming (a shuffled upload): renewed here, or let go when lost,
            // leaving a chunk counted meanwhile to a look under a new lease.
            match self.renew(&mut lease).await {
                Ok(true) => {}
                Ok(false) => break result,
                Err(e) => break Err(e),
            }
            if !again() {
                break result;
            }
        };
        if let Err(e) = self.lock.release(&lease).await {
            tracing::debug!(upload_id = %id, error = %e, "assembly lock not released; it expires");
        }
        result
    }

    /// Whether a chunk of `id` was counted since the last look; clears the mark.
    fn counted_again(&self, id: &UploadId) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.get_mut(id).is_some_and(std::mem::take)
    }

    async fn advance_locked(
        &self,
        id: &UploadId,
        lease: &mut crate::lock::Lease,
    ) -> Result<u64, AssembleError> {
        let result = self.carry_on(id, lease).await;
        if result.is_err() {
            self.carried().remove(id);
        }
        result
    }

    /// The steps of [`Self::advance_locked`]: each carries the prefix over the counted parts
    /// that follow it, until none does.
    async fn carry_on(
        &self,
        id: &UploadId,
        lease: &mut crate::lock::Lease,
    ) -> Result<u64, AssembleError> {
        // The first step looks at the upload before anything else; later ones only once
        // they know there is something to do (the look that finds nothing costs one read).
        let Some(first) = self.assemblable(id).await? else {
            return Ok(0);
        };
        let mut header = Some(first);
        loop {
            let (prefix, mut next) = self.prefix_and_next(id).await?;
            let (from, offset) = (prefix.chunks as usize, prefix.offset());
            // What the prefix covers when this step goes no further.
            let covered = offset;
            if next.is_empty() {
                return Ok(covered);
            }
            let header = match header.take() {
                Some(header) => header,
                None => match self.assemblable(id).await? {
                    Some(header) => header,
                    None => return Ok(covered),
                },
            };
            // The last part is left to the merge: all counted means merging.
            if let Assembly::Chunks = header.assembly {
                let open = header.geometry.total_chunks.saturating_sub(1);
                next.retain(|r| r.index.0 < open);
            }
            let resume = prefix.hashes.clone();
            let start = std::time::Instant::now();
            let step = match self.hashed_in_line(id, &next, &resume) {
                InLine::Hashed(n, after) => {
                    if !self.renew(lease).await? {
                        return Ok(covered);
                    }
                    let chunks = self.sources(id, &header, &next[..n]);
                    let (output, new) = (prefix.path.clone(), resume.is_none());
                    let fsync = self.fsync;
                    let cloned =
                        background(0, move || clone_run(&chunks, &output, offset, new, fsync))
                            .await
                            .map_err(|e| {
                                ConcatError::Storage(format!("assembly thread failed: {e}"))
                            })??;
                    if cloned {
                        let bytes = after.offset - offset;
                        metrics::counter!(m::HASHED_IN_LINE_BYTES).increment(bytes);
                        Some((n, after, bytes))
                    } else {
                        // No reflink here after all: hashing in line only doubles the work.
                        if let Some(lanes) = &self.lanes {
                            lanes.disable();
                        }
                        tracing::warn!(upload_id = %id, offset, "the storage did not clone a chunk into an assembly file: hashing in line is off in this process (merge.hash_in_line needs a file system that clones: XFS with reflink=1, Btrfs)");
                        None
                    }
                }
                InLine::Pending => return Ok(covered),
                InLine::None => None,
            };
            let in_line = step.is_some();
            let (n, hashes, cloned_bytes) = match step {
                Some(done) => done,
                None => {
                    let n = next_run(&next, 0, offset, STEP_BYTES);
                    if n == 0 {
                        return Ok(covered);
                    }
                    if !self.renew(lease).await? {
                        return Ok(covered);
                    }
                    let job = Concat {
                        chunks: self.sources(id, &header, &next[..n]),
                        output: prefix.path.clone(),
                        block_bytes: self.block_bytes,
                        fsync: self.fsync,
                        direct_io: self.direct_io,
                        reflink: self.reflink,
                        read_direct: self.read_direct,
                        sha256: self.sha256,
                        resume,
                    };
                    let done =
                        background(self.nice, move || concatenate(&job, &Control::default()))
                            .await
                            .map_err(|e| {
                                ConcatError::Storage(format!("assembly thread failed: {e}"))
                            })??;
                    (n, done.state, done.cloned_bytes)
                }
            };
            let replaces = prefix.saved_here.map(|f| f.offset);
            let (prefix, checkpoint) = prefix.extended(&next[..n], hashes);
            let file = self.storage.save_prefix(id, &checkpoint, replaces).await?;
            let prefix = prefix.saved(file);
            #[cfg(feature = "failpoints")]
            crate::failpoints::crash_here(crate::failpoints::PREFIX_SAVED);
            if let Some(lanes) = &self.lanes {
                lanes.checkpoint_saved(id, &checkpoint.hashes);
            }
            let reached = checkpoint.hashes.offset;
            self.carry(id, prefix);
            metrics::counter!(m::ASSEMBLY_STEPS, "result" => "ok").increment(1);
            metrics::counter!(m::ASSEMBLY_BYTES).increment(reached - offset);
            metrics::counter!(m::CLONED_BYTES).increment(cloned_bytes);
            tracing::debug!(upload_id = %id, offset = reached, chunks = from + n, in_line, seconds = start.elapsed().as_secs_f64(), "prefix carried on");
        }
    }

    /// `id`'s header while its prefix is to be carried on: only while the upload is
    /// receiving, since once it is merging the merge finishes the file (two would hash the
    /// same last chunks at once). Never for a partial upload (tus): it is not merged alone,
    /// the concatenation that uses it reads its segments, and removes its directory as soon
    /// as the last one is counted. Otherwise its lane and carried prefix are forgotten.
    async fn assemblable(
        &self,
        id: &UploadId,
    ) -> Result<Option<crate::state::UploadHeader>, AssembleError> {
        match self.state.upload_header(id).await? {
            Some(h)
                if h.state == UploadState::Receiving
                    && h.assembly.merges_when_complete()
                    && !matches!(h.assembly, Assembly::Concat { .. }) =>
            {
                Ok(Some(h))
            }
            // Not counted yet: a lane may have hashed the upload's first chunk before its
            // count created the upload. Its lane stays.
            None => Ok(None),
            Some(_) => {
                if let Some(lanes) = &self.lanes {
                    lanes.forget(id);
                }
                self.carried().remove(id);
                Ok(None)
            }
        }
    }

    /// Where `id`'s prefix stands, and the counted parts that follow it without a gap
    /// (some of them, at least: a step takes at most [`STEP_BYTES`] anyway).
    ///
    /// The prefix this process saved last is carried on as long as its checkpoint is still
    /// the file it saved (one `stat`: another API's step replaces it), and only the parts
    /// after it are read: a step costs the same at an upload's first GiB and at its
    /// hundredth. The counted parts it covers cannot have changed meanwhile: a merge uncounts
    /// only lost chunks it needs, past the newest checkpoint that fits, and an abort removes
    /// the checkpoint with the upload's directory. Otherwise (this process's first step,
    /// another API's since) every counted part is read and the newest checkpoint checked
    /// against them; unless the first part is not counted, when no checkpoint can fit and
    /// there is nothing to assemble (an upload sent in reverse costs one read per chunk).
    async fn prefix_and_next(
        &self,
        id: &UploadId,
    ) -> Result<(Prefix, Vec<ChunkRecord>), AssembleError> {
        let carried = self.carried().get(id).cloned();
        if let Some(prefix) = carried {
            if let Some(file) = &prefix.saved_here
                && self.storage.checkpoint_kept(id, file).await
            {
                let next = self.run_after(id, prefix.chunks).await?;
                metrics::counter!(m::ASSEMBLY_READS, "parts" => "after").increment(1);
                return Ok((prefix, next));
            }
            self.carried().remove(id);
        }
        let first = self.state.counted_run(id, 0, 1).await?;
        if first.is_empty() {
            metrics::counter!(m::ASSEMBLY_READS, "parts" => "after").increment(1);
            let (assembly, path) = self.storage.new_assembly(id);
            return Ok((Prefix::new(assembly, path), first));
        }
        let records = self.state.counted_chunks(id).await?;
        metrics::counter!(m::ASSEMBLY_READS, "parts" => "all").increment(1);
        let saved = self
            .storage
            .saved_prefix(id)
            .await?
            .filter(|p| p.checkpoint.fits(&records, self.sha256));
        let prefix = match saved {
            Some(p) => Prefix::resumed(p, &records),
            None => {
                let (assembly, path) = self.storage.new_assembly(id);
                Prefix::new(assembly, path)
            }
        };
        let next = records[prefix.chunks as usize..].to_vec();
        Ok((prefix, next))
    }

    /// The counted parts from index `from` on, up to the first gap, [`STEP_BYTES`] or
    /// [`RUN_PARTS`]: read a few at a time, since a step usually finds one or two (a read
    /// costs Redis a lookup per index asked for, counted or not).
    async fn run_after(&self, id: &UploadId, from: u64) -> Result<Vec<ChunkRecord>, StateError> {
        let mut next: Vec<ChunkRecord> = Vec::new();
        let mut ask = RUN_FIRST;
        loop {
            let run = self
                .state
                .counted_run(id, from + next.len() as u64, ask)
                .await?;
            let short = run.len() < ask;
            next.extend(run);
            let bytes: u64 = next.iter().map(|r| r.len).sum();
            if short || bytes >= STEP_BYTES || next.len() >= RUN_PARTS {
                return Ok(next);
            }
            ask = (ask * 2).min(RUN_PARTS - next.len());
        }
    }

    /// The prefixes this process carries on (see [`Self::prefix_and_next`]).
    fn carried(&self) -> MutexGuard<'_, HashMap<UploadId, Prefix>> {
        self.carried.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn carry(&self, id: &UploadId, prefix: Prefix) {
        let mut carried = self.carried();
        if carried.len() >= CARRIED_MAX && !carried.contains_key(id) {
            // Uploads abandoned mid-way leave theirs behind: the oldest goes.
            if let Some(oldest) = carried
                .iter()
                .min_by_key(|(_, p)| p.at)
                .map(|(id, _)| id.clone())
            {
                carried.remove(&oldest);
            }
        }
        carried.insert(id.clone(), prefix);
    }

    /// What hashing in line did for the counted parts that follow the prefix (`resume`: its
    /// hashes; none: byte 0).
    fn hashed_in_line(
        &self,
        id: &UploadId,
        next: &[ChunkRecord],
        resume: &Option<HashState>,
    ) -> InLine {
        let Some(lanes) = &self.lanes else {
            return InLine::None;
        };
        let base = resume
            .clone()
            .unwrap_or_else(|| FileHasher::new(self.sha256).state(0));
        match lanes.chain(id, &base, next) {
            (0, _) if next.first().is_some_and(|r| lanes.pending(id, r.offset)) => InLine::Pending,
            (0, _) => InLine::None,
            (n, after) => InLine::Hashed(n, after),
        }
    }

    /// Makes sure the lease outlasts a step: renewed once less than half its length is
    /// left (a step takes far less; renewing before every step cost a Redis call per
    /// chunk). A lease already lapsed on this process's clock is renewed too, which fails
    /// if another holder took it meanwhile.
    async fn renew(&self, lease: &mut crate::lock::Lease) -> Result<bool, AssembleError> {
        let left = lease
            .valid_until()
            .saturating_duration_since(std::time::Instant::now());
        if left > self.lock.ttl() / 2 {
            return Ok(true);
        }
        self.lock
            .renew(lease)
            .await
            .map_err(|e| AssembleError::Lock(e.to_string()))
    }

    fn sources(
        &self,
        id: &UploadId,
        header: &crate::state::UploadHeader,
        records: &[ChunkRecord],
    ) -> Vec<ChunkSource> {
        records
            .iter()
            .map(|r| source(&self.storage, id, &header.assembly, r))
            .collect()
    }
}

/// What hashing in line did for the parts after the prefix.
enum InLine {
    /// The next `n` were hashed; the hashes' state after them.
    Hashed(usize, HashState),
    /// The next one is being hashed now: its lane carries the prefix on when it is done.
    Pending,
    /// Nothing: the next part is read back from storage.
    None,
}

/// Runs `work` on a thread of its own (and the threads it starts, which inherit it) at nice
/// level `nice`, so that it takes only the CPU that requests leave idle: the assembly is
/// work the merge would otherwise do, never something a client waits on, while every
/// request is. A thread's nice level cannot be lowered again without privileges, hence a
/// thread of its own rather than one of the runtime's pool.
async fn background<T: Send + 'static>(
    nice: i32,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stitch-assembly".into())
        .spawn(move || {
            set_nice(nice);
            let _ = tx.send(work());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the assembly thread panicked"))
}

/// Sets the calling thread's nice level (Linux keeps one per thread). A failure leaves it
/// as it was: the work still runs, at the priority it had.
#[allow(unsafe_code)]
fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid(2) and setpriority(2) only take and return integers.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::ChunkIndex;

    fn record(index: u64, len: u64, token: &str) -> ChunkRecord {
        ChunkRecord {
            index: ChunkIndex(index),
            offset: index * 10,
            len,
            crc32c: 0,
            md5: None,
            token: token.into(),
        }
    }

    fn checkpoint(records: &[ChunkRecord], sha256: bool) -> Checkpoint {
        let mut hasher = super::super::hashing::FileHasher::new(sha256);
        hasher.update(b"x");
        let (_, _, mut hashes) = hasher.finish(0);
        hashes.offset = contiguous_len(records).unwrap();
        Checkpoint {
            assembly: ".assembly.r".into(),
            chunks: records.len() as u64,
            tokens: tokens_digest(records),
            hashes,
        }
    }

    #[test]
    fn a_checkpoint_fits_only_the_copies_it_covers_from_byte_zero() {
        let records: Vec<_> = (0..4).map(|i| record(i, 10, &format!("t{i}"))).collect();
        let saved = checkpoint(&records[..2], false);
        assert!(saved.fits(&records, false));
        assert!(saved.fits(&records[..2], false));
        assert!(!saved.fits(&records[..1], false), "fewer chunks counted");
        assert!(!saved.fits(&records, true), "a SHA-256 is asked for now");
        let mut resent = records.clone();
        resent[1].token = "other".into();
        assert!(!saved.fits(&resent, false), "chunk 1 is another copy now");
        let mut gap = records.clone();
        gap.remove(0);
        assert!(!saved.fits(&gap, false), "chunk 0 is not counted");
    }

    #[allow(unsafe_code)]
    fn nice_of_this_thread() -> i32 {
        // SAFETY: gettid(2) and getpriority(2) only take and return integers.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[tokio::test]
    async fn the_assembly_runs_at_its_nice_level_and_leaves_the_callers_alone() {
        let before = nice_of_this_thread();
        let (own, spawned) = background(7 + before, || {
            let own = nice_of_this_thread();
            // The concatenation's hashing and sync threads are started from it.
            let spawned = std::thread::spawn(nice_of_this_thread).join().unwrap();
            (own, spawned)
        })
        .await
        .unwrap();
        assert_eq!((own, spawned), (7 + before, 7 + before));
        assert_eq!(nice_of_this_thread(), before);
        assert_eq!(background(0, nice_of_this_thread).await.unwrap(), before);
    }

    #[test]
    fn a_run_stops_at_the_first_gap_and_after_about_its_byte_budget() {
        let mut records: Vec<_> = (0..6).map(|i| record(i, 10, "t")).collect();
        assert_eq!(next_run(&records, 0, 0, 1 << 20), 6);
        assert_eq!(
            next_run(&records, 2, 20, 25),
            3,
            "the run that passes 25 bytes ends it"
        );
        assert_eq!(next_run(&records, 2, 20, 1), 1, "at least one");
        records.remove(3);
        assert_eq!(next_run(&records, 0, 0, 1 << 20), 3, "chunk 3 is missing");
        assert_eq!(next_run(&records, 3, 30, 1 << 20), 0);
        assert_eq!(contiguous_len(&records), None);
    }
}
