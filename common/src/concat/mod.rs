//! The merge's inner loop: concatenate chunk files in order into one file while computing
//! the file's MD5 over the same bytes, in one pass.
//!
//! MD5 is the bottleneck (one core, ~600 MB/s here) and cannot be split across cores, so the
//! copy is moved off its thread: this thread reads each chunk in small blocks, checks the
//! chunk's CRC32C (and MD5 when recorded) and writes the block out, then hands the block to
//! the hashing thread, which does nothing but MD5. A third thread starts writeback early
//! (`fdatasync` every [`SYNC_EVERY`] bytes) so the final fsync finds little left to do. The
//! merge then costs about what the MD5 alone costs. Small blocks (64 KiB) stay in cache
//! between the read, the copy and the hash; 1 MiB blocks measured slower.
//!
//! With direct I/O (the default, `merge.direct_io`) the output skips the page cache: the copy
//! thread fills 1 MiB aligned blocks from the chunk files (checking each chunk as it goes),
//! the hashing thread hashes each block and passes it on, and a writer thread writes it with
//! `O_DIRECT` at its offset. No page-cache memory has to be found for the output and no
//! writeback has to be waited for (both cost the buffered merge 10–30% on this VM), and
//! the disk takes 1 MiB direct writes at about twice the MD5's rate, so the writes hide
//! behind the hash. The unaligned tail of the last block goes through an ordinary handle.
//! Where the file system refuses `O_DIRECT` (some FUSE and network file systems; tmpfs
//! before Linux 6.6) the merge falls back to buffered writes (every local file system of the
//! test machine accepts it, so that fallback is not exercised by the tests).
//!
//! Where the file system can share blocks between files (`merge.reflink`; XFS, Btrfs), the
//! chunks are not copied at all: each is cloned into place ([`clone`]) and only read back,
//! on this thread, for its checks and for the hashing thread. Every byte is then written to
//! disk once, when its chunk was stored.
//!
//! Chunks written with direct I/O (`storage.direct_io`, [`crate::direct_io`]) are read back
//! the same way (`read_direct`), in 1 MiB blocks, since the page cache does not hold them; a
//! read that cannot be direct (a buffer or offset off the 4 KiB grid, as odd chunk lengths
//! make in the direct merge's blocks) goes through an ordinary handle. A chunk read through
//! the page cache has its pages dropped once read: nobody reads it again.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use crate::digest::{Md5, Md5Hasher, Sha256};
use crate::direct_io::{self, ALIGN as DIRECT_ALIGN, AlignedBlock, BLOCK as DIRECT_BLOCK};

mod clone;
mod hashing;
pub mod lanes;
pub mod prefix;

use hashing::FileHasher;
pub use hashing::HashState;

/// Blocks in flight between the copy thread and the hashing thread.
const DEPTH: usize = 16;
/// Bytes written between two early writeback requests.
const SYNC_EVERY: u64 = 64 << 20;
/// Direct I/O: blocks in the pool (copy → hash → write → copy).
const DIRECT_DEPTH: usize = 8;

/// One chunk file to append.
#[derive(Clone, Debug)]
pub struct ChunkSource {
    pub index: u64,
    pub path: PathBuf,
    pub len: u64,
    pub crc32c: u32,
    pub md5: Option<Md5>,
}

/// What to concatenate, and where.
#[derive(Debug)]
pub struct Concat {
    pub chunks: Vec<ChunkSource>,
    /// A new file (created exclusively; it must not exist).
    pub output: PathBuf,
    pub block_bytes: usize,
    pub fsync: bool,
    /// Write the output with `O_DIRECT` where the file system allows it.
    pub direct_io: bool,
    /// Share the chunks' blocks with the output (`FICLONERANGE`) where the file system
    /// allows it, instead of writing them again; `direct_io` then does not apply.
    pub reflink: bool,
    /// Read the chunks with `O_DIRECT` where the file system allows it (they were written
    /// that way, `storage.direct_io`, so the page cache does not hold them): in
    /// [`direct_io::BLOCK`]s, whatever `block_bytes` says.
    pub read_direct: bool,
    /// Compute the SHA-256 of the file beside its MD5, in the same hashing stage.
    pub sha256: bool,
    /// Carry on a file assembled earlier instead of starting one: `output` exists and its
    /// first `offset` bytes are the file's, and the hashes carry on from this state (which
    /// decides whether a SHA-256 is computed). The chunks are the ones that follow.
    pub resume: Option<HashState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Concatenated {
    pub size: u64,
    pub md5: Md5,
    /// The file's SHA-256, when [`Concat::sha256`] asked for it.
    pub sha256: Option<Sha256>,
    /// Whether the output was written with direct I/O.
    pub direct_io: bool,
    /// Bytes of this run shared with their chunk files rather than written (reflink).
    pub cloned_bytes: u64,
    /// The hashes' state at the end, for a later run to carry on from.
    pub state: HashState,
}

/// A counted chunk whose file is gone, short, or no longer holds the bytes that were
/// recorded for it: storage lost it, and only the client can send it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostChunk {
    pub index: u64,
    pub why: String,
}

impl std::fmt::Display for LostChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chunk {} {}", self.index, self.why)
    }
}

/// How a concatenation failed. Only [`ConcatError::LostChunks`] says something about the
/// data; every I/O error is [`ConcatError::Storage`], whatever its errno (EMFILE, EIO, ESTALE,
/// ENOSPC, EDQUOT, …): the chunks may be intact, so the merge is worth trying again.
#[derive(Debug, thiserror::Error)]
pub enum ConcatError {
    /// Counted chunks that storage no longer holds as recorded (missing, short, or a
    /// CRC32C/MD5 that differs from the one recorded at upload), in index order.
    #[error("{}", describe_lost(.0))]
    LostChunks(Vec<LostChunk>),
    #[error("merge cancelled")]
    Cancelled,
    /// Reading, writing or syncing failed (disk full, I/O error, too many open files): worth
    /// retrying later.
    #[error("storage error: {0}")]
    Storage(String),
}

fn describe_lost(lost: &[LostChunk]) -> String {
    let parts: Vec<String> = lost.iter().map(LostChunk::to_string).collect();
    parts.join("; ")
}

fn lost(index: u64, why: impl Into<String>) -> ConcatError {
    ConcatError::LostChunks(vec![LostChunk {
        index,
        why: why.into(),
    }])
}

/// Progress and cancellation shared with the async side.
#[derive(Default)]
pub struct Control {
    pub cancel: AtomicBool,
    pub bytes_done: AtomicU64,
}

/// Runs the concatenation on the calling (blocking) thread plus two helpers. On any error
/// a new output file is removed; a resumed one keeps what it held (its first bytes are a
/// saved prefix that others may carry on from).
pub fn concatenate(job: &Concat, control: &Control) -> Result<Concatenated, ConcatError> {
    all_present(&job.chunks)?;
    let hasher = match &job.resume {
        Some(state) => FileHasher::resume(state)
            .ok_or_else(|| ConcatError::Storage("a saved hash state does not decode".into()))?,
        None => FileHasher::new(job.sha256),
    };
    let start = job.resume.as_ref().map_or(0, |s| s.offset);
    let new = job.resume.is_none();
    let cleanup = |result: Result<Concatenated, ConcatError>| {
        if result.is_err() && new {
            let _ = std::fs::remove_file(&job.output);
        }
        result
    };
    if job.reflink && clonable(&job.chunks, start) {
        let out = OpenOptions::new()
            .write(true)
            .create_new(new)
            .open(&job.output)
            .map_err(|e| storage_error("opening the merged file", e))?;
        // The first chunk tells whether this file system clones; nothing is hashed yet, so
        // a refusal leaves the copy paths below a clean start.
        match clone_first(&job.chunks[0], &out, start) {
            Ok(()) => return cleanup(run(job, control, out, hasher, start, true)),
            Err(Cloned::Refused(e)) => {
                drop(out);
                if new {
                    let _ = std::fs::remove_file(&job.output);
                }
                tracing::debug!(output = %job.output.display(), error = %e, "no reflink here; the merge copies");
            }
            Err(Cloned::Failed(e)) => return cleanup(Err(e)),
        }
    }
    // Direct writes need aligned offsets: a prefix that ends mid-block carries on buffered.
    if job.direct_io && start.is_multiple_of(DIRECT_ALIGN as u64) {
        match open_direct(&job.output, new) {
            Ok((direct, tail)) => {
                return cleanup(run_direct(job, control, direct, tail, hasher, start));
            }
            Err(e) if direct_io::refused(&e) => {
                // The file system refuses O_DIRECT (a new file may exist by now: the name is
                // this attempt's own, so it can go).
                if new {
                    let _ = std::fs::remove_file(&job.output);
                }
                tracing::debug!(output = %job.output.display(), "no direct I/O here; buffered merge");
            }
            Err(e) => return Err(storage_error("opening the merged file", e)),
        }
    }
    let out = OpenOptions::new()
        .write(true)
        .create_new(new)
        .open(&job.output)
        .map_err(|e| storage_error("opening the merged file", e))?;
    cleanup(run(job, control, out, hasher, start, false))
}

/// Every chunk must be there, at its recorded size, before anything is written; all the
/// missing and short ones are reported at once, so that the client re-sends them together.
fn all_present(chunks: &[ChunkSource]) -> Result<(), ConcatError> {
    let mut missing = Vec::new();
    for chunk in chunks {
        match std::fs::metadata(&chunk.path) {
            Ok(m) if m.len() == chunk.len => {}
            Ok(m) => missing.push(LostChunk {
                index: chunk.index,
                why: format!("has {} bytes on storage, {} recorded", m.len(), chunk.len),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => missing.push(LostChunk {
                index: chunk.index,
                why: "is missing on storage".into(),
            }),
            Err(e) => return Err(storage_error("looking up a chunk", e)),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ConcatError::LostChunks(missing))
    }
}

/// Appends `chunks` to `output` (new when `new`, else holding the file's first `start`
/// bytes) by sharing their blocks (reflink), reading none of them: their bytes were hashed
/// as they arrived ([`lanes`]). `Ok(false)` when the file system, or the run's alignment,
/// does not allow it: whatever was shared is what any writer of the file writes there, and
/// a new file is removed.
pub fn clone_run(
    chunks: &[ChunkSource],
    output: &Path,
    start: u64,
    new: bool,
    fsync: bool,
) -> Result<bool, ConcatError> {
    if !clonable(chunks, start) {
        return Ok(false);
    }
    all_present(chunks)?;
    let out = OpenOptions::new()
        .write(true)
        .create_new(new)
        .open(output)
        .map_err(|e| storage_error("opening the assembly file", e))?;
    let result = (|| {
        let mut offset = start;
        for chunk in chunks {
            let src = File::open(&chunk.path).map_err(|e| open_error(chunk, e))?;
            match clone::clone_range(&src, &out, chunk.len, offset) {
                Ok(()) => offset += chunk.len,
                Err(e) if clone::refused(&e) => return Ok(false),
                Err(e) => return Err(storage_error("cloning a chunk into the assembly", e)),
            }
        }
        if fsync {
            sync_data(&out).map_err(|e| storage_error("syncing the assembly file", e))?;
        }
        Ok(true)
    })();
    if new && !matches!(result, Ok(true)) {
        let _ = std::fs::remove_file(output);
    }
    result
}

/// A chunk that would not open: lost when it is gone, a storage failure otherwise.
fn open_error(chunk: &ChunkSource, e: std::io::Error) -> ConcatError {
    if e.kind() == ErrorKind::NotFound {
        lost(chunk.index, "is missing on storage")
    } else {
        storage_error("opening a chunk", e)
    }
}

fn storage_error(context: &str, e: std::io::Error) -> ConcatError {
    ConcatError::Storage(format!("{context}: {e}"))
}

/// `fdatasync` on `file`. Test builds with the `failpoints` feature can make it fail with
/// `EIO` (failpoint `merge-sync`), as a writeback error would.
fn sync_data(file: &File) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("merge-sync", |_| Err(std::io::Error::from_raw_os_error(
        libc::EIO
    )));
    file.sync_data()
}

/// The buffered merge, and the clone merge (`cloning`: the first chunk is cloned already,
/// each other one is cloned where the kernel allows it and written otherwise): this thread
/// reads the chunks, checks them and writes what is not cloned; a hashing thread hashes
/// every block read; a third syncs early what was written.
fn run(
    job: &Concat,
    control: &Control,
    out: File,
    file_hasher: FileHasher,
    start: u64,
    cloning: bool,
) -> Result<Concatenated, ConcatError> {
    let syncer_file = out
        .try_clone()
        .map_err(|e| storage_error("cloning the output handle", e))?;
    std::thread::scope(|scope| {
        // Direct reads want large blocks (the disk streams 1 MiB reads; 64 KiB ones would
        // wait on it per block); reads from the page cache want small ones, which stay in
        // the CPU's cache between the read and the hash.
        let (depth, block_bytes) = if job.read_direct {
            (DIRECT_DEPTH, DIRECT_BLOCK)
        } else {
            (DEPTH, job.block_bytes)
        };
        let (full_tx, full_rx) = sync_channel::<(AlignedBlock, usize)>(depth);
        let (empty_tx, empty_rx) = sync_channel::<AlignedBlock>(depth + 2);
        for _ in 0..depth + 2 {
            let _ = empty_tx.send(AlignedBlock::new(block_bytes));
        }
        let hasher = scope.spawn(move || hash_blocks(full_rx, empty_tx, file_hasher));
        let (sync_tx, sync_rx) = sync_channel::<()>(1);
        let fsync = job.fsync;
        // The early syncs go through a duplicate of the output's descriptor, which shares
        // its writeback error state: an error this thread sees is not reported again to the
        // final sync, so it must fail the merge from here.
        let syncer = scope.spawn(move || {
            for () in sync_rx {
                if fsync {
                    sync_data(&syncer_file)
                        .map_err(|e| storage_error("syncing the merged file", e))?;
                }
            }
            Ok::<(), ConcatError>(())
        });

        let copied = copy_chunks(
            job, control, &out, start, cloning, &full_tx, &empty_rx, &sync_tx,
        );
        drop(full_tx);
        drop(sync_tx);
        let hasher = hasher
            .join()
            .map_err(|_| ConcatError::Storage("hash thread panicked".into()))?;
        let synced = syncer
            .join()
            .map_err(|_| ConcatError::Storage("sync thread panicked".into()))?;
        // A lost chunk says more than the I/O error it may have caused; otherwise the sync
        // thread's error is the cause of a copy that stopped because it did.
        let (size, cloned_bytes) = match (copied, synced) {
            (Ok(done), Ok(())) => done,
            (Err(e @ (ConcatError::LostChunks(_) | ConcatError::Cancelled)), _) => return Err(e),
            (_, Err(e)) | (Err(e), Ok(())) => return Err(e),
        };
        if job.fsync {
            sync_data(&out).map_err(|e| storage_error("syncing the merged file", e))?;
        }
        let (md5, sha256, state) = hasher.finish(size);
        Ok(Concatenated {
            size,
            md5,
            sha256,
            direct_io: false,
            cloned_bytes,
            state,
        })
    })
}

/// Whether the run can be cloned: it starts on a block and every chunk but its last is whole
/// blocks (the kernel clones only block-aligned ranges, but for one that ends its source).
fn clonable(chunks: &[ChunkSource], start: u64) -> bool {
    let align = DIRECT_ALIGN as u64;
    let Some((_, init)) = chunks.split_last() else {
        return false;
    };
    chunks[0].len > 0
        && start.is_multiple_of(align)
        && init.iter().all(|c| c.len.is_multiple_of(align))
}

/// Why the first clone did not happen.
enum Cloned {
    /// The file system does not clone (or not this range): copy instead.
    Refused(std::io::Error),
    /// Storage failed, or the chunk is gone.
    Failed(ConcatError),
}

fn clone_first(chunk: &ChunkSource, out: &File, start: u64) -> Result<(), Cloned> {
    let src = File::open(&chunk.path).map_err(|e| Cloned::Failed(open_error(chunk, e)))?;
    clone::clone_range(&src, out, chunk.len, start).map_err(|e| {
        if clone::refused(&e) {
            Cloned::Refused(e)
        } else {
            Cloned::Failed(storage_error("cloning a chunk into the merged file", e))
        }
    })
}

fn hash_blocks(
    full: Receiver<(AlignedBlock, usize)>,
    empty: SyncSender<AlignedBlock>,
    mut hasher: FileHasher,
) -> FileHasher {
    for (block, len) in full {
        hasher.update(&block.bytes()[..len]);
        // The copier may have stopped early; a closed return path is fine.
        let _ = empty.send(block);
    }
    hasher
}

/// Reads, checks and hands on every chunk, writing each at its offset unless it is cloned
/// (`cloning`: the first is already; each other one is if the kernel allows). Returns the
/// file's end and how many bytes were cloned.
#[allow(clippy::too_many_arguments)]
fn copy_chunks(
    job: &Concat,
    control: &Control,
    out: &File,
    start: u64,
    cloning: bool,
    full: &SyncSender<(AlignedBlock, usize)>,
    empty: &Receiver<AlignedBlock>,
    sync: &SyncSender<()>,
) -> Result<(u64, u64), ConcatError> {
    let mut offset = start;
    let mut cloned_bytes = 0;
    // Bytes written since the last early sync (cloned ones need none).
    let mut unsynced = 0;
    // A block taken from the pool but not filled (end of a chunk) waits here for the next
    // read, so that the pool never shrinks.
    let mut spare: Option<AlignedBlock> = None;
    for (i, chunk) in job.chunks.iter().enumerate() {
        let mut reader = ChunkReader::open(chunk, job.read_direct)?;
        let cloned = cloning
            && (i == 0
                || match clone::clone_range(&reader.file, out, chunk.len, offset) {
                    Ok(()) => true,
                    Err(e) if clone::refused(&e) => false,
                    Err(e) => {
                        return Err(storage_error("cloning a chunk into the merged file", e));
                    }
                });
        loop {
            if control.cancel.load(Ordering::Relaxed) {
                return Err(ConcatError::Cancelled);
            }
            let mut block = match spare.take() {
                Some(block) => block,
                None => empty
                    .recv()
                    .map_err(|_| ConcatError::Storage("hash thread stopped".into()))?,
            };
            let n = reader.read(block.bytes_mut())?;
            if n == 0 {
                spare = Some(block);
                break;
            }
            if !cloned {
                out.write_all_at(&block.bytes()[..n], offset)
                    .map_err(|e| storage_error("writing the merged file", e))?;
                unsynced += n as u64;
            }
            offset += n as u64;
            full.send((block, n))
                .map_err(|_| ConcatError::Storage("hash thread stopped".into()))?;
            if unsynced >= SYNC_EVERY {
                unsynced = 0;
                if let Err(TrySendError::Disconnected(())) = sync.try_send(()) {
                    // The sync thread stopped on an error: it fails the merge.
                    return Err(ConcatError::Storage("the sync thread stopped".into()));
                }
                control.bytes_done.store(offset, Ordering::Relaxed);
            }
        }
        reader.finish()?;
        if cloned {
            cloned_bytes += chunk.len;
            control.bytes_done.store(offset, Ordering::Relaxed);
        }
    }
    control.bytes_done.store(offset, Ordering::Relaxed);
    Ok((offset, cloned_bytes))
}

/// Reads one chunk file, checking as it goes that it holds what was recorded for it.
struct ChunkReader<'a> {
    chunk: &'a ChunkSource,
    /// Opened with `O_DIRECT` when `direct`.
    file: File,
    direct: bool,
    /// An ordinary handle for a read that cannot be direct (an unaligned buffer or offset),
    /// opened when one is needed.
    plain: Option<File>,
    crc: u32,
    md5: Option<Md5Hasher>,
    read: u64,
}

impl<'a> ChunkReader<'a> {
    /// `direct`: read with `O_DIRECT` where the file system allows it.
    fn open(chunk: &'a ChunkSource, direct: bool) -> Result<Self, ConcatError> {
        let opened = if direct {
            direct_io::open_read(&chunk.path)
        } else {
            Ok(None)
        };
        let (file, direct) = match opened {
            Ok(Some(file)) => Ok((file, true)),
            Ok(None) => File::open(&chunk.path).map(|f| (f, false)),
            Err(e) => Err(e),
        }
        .map_err(|e| open_error(chunk, e))?;
        Ok(Self {
            chunk,
            file,
            direct,
            plain: None,
            crc: 0,
            md5: chunk.md5.map(|_| Md5Hasher::new()),
            read: 0,
        })
    }

    /// Reads into `buf` (0 at the end of the file), folding the bytes into the checks.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ConcatError> {
        let file = if !self.direct || direct_io::aligned(buf, self.read) {
            &self.file
        } else {
            match &mut self.plain {
                Some(plain) => &*plain,
                slot => &*slot.insert(
                    File::open(&self.chunk.path)
                        .map_err(|e| storage_error("opening a chunk", e))?,
                ),
            }
        };
        let n = loop {
            match file.read_at(buf, self.read) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(storage_error("reading a chunk", e)),
            }
        };
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        if let Some(m) = &mut self.md5 {
            m.update(&buf[..n]);
        }
        self.read += n as u64;
        Ok(n)
    }

    /// Whether what was read is what was recorded: its length, CRC32C and MD5 (if any).
    fn finish(self) -> Result<(), ConcatError> {
        if !self.direct {
            // Each chunk is read once: its pages are of no more use to anyone.
            direct_io::forget_cached(&self.file);
        }
        let chunk = self.chunk;
        if self.read != chunk.len {
            return Err(lost(
                chunk.index,
                format!(
                    "read {} bytes on storage, {} recorded",
                    self.read, chunk.len
                ),
            ));
        }
        if self.crc != chunk.crc32c {
            return Err(lost(
                chunk.index,
                "has a CRC32C on storage that differs from the one recorded at upload",
            ));
        }
        if let (Some(expected), Some(m)) = (chunk.md5, self.md5)
            && m.finalize() != expected
        {
            return Err(lost(
                chunk.index,
                "has an MD5 on storage that differs from the one recorded at upload",
            ));
        }
        Ok(())
    }
}

/// Creates the output for direct I/O: an `O_DIRECT` handle for the aligned blocks and an
/// ordinary one for the unaligned tail (and the final fsync).
/// `new`: create it (it must not exist); otherwise open the existing file.
fn open_direct(path: &Path, new: bool) -> std::io::Result<(File, File)> {
    let direct = OpenOptions::new()
        .write(true)
        .create_new(new)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let tail = OpenOptions::new().write(true).open(path)?;
    Ok((direct, tail))
}

/// The direct-I/O merge: copy (this thread) → hash → write, over a pool of aligned blocks.
fn run_direct(
    job: &Concat,
    control: &Control,
    direct: File,
    tail: File,
    mut file_hasher: FileHasher,
    start: u64,
) -> Result<Concatenated, ConcatError> {
    let tail = &tail;
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = sync_channel::<(AlignedBlock, usize)>(DIRECT_DEPTH);
        let (write_tx, write_rx) = sync_channel::<(AlignedBlock, usize)>(DIRECT_DEPTH);
        let (empty_tx, empty_rx) = sync_channel::<AlignedBlock>(DIRECT_DEPTH);
        for _ in 0..DIRECT_DEPTH {
            let _ = empty_tx.send(AlignedBlock::new(DIRECT_BLOCK));
        }
        let hasher = scope.spawn(move || {
            for (block, len) in full_rx {
                file_hasher.update(&block.bytes()[..len]);
                if write_tx.send((block, len)).is_err() {
                    break;
                }
            }
            file_hasher
        });
        let writer = scope.spawn(move || write_blocks(&direct, tail, start, write_rx, empty_tx));
        let copied = fill_blocks(job, control, start, &full_tx, &empty_rx);
        drop(full_tx);
        let hasher = hasher
            .join()
            .map_err(|_| ConcatError::Storage("hash thread panicked".into()))?;
        writer
            .join()
            .map_err(|_| ConcatError::Storage("write thread panicked".into()))??;
        let size = copied?;
        if job.fsync {
            sync_data(tail).map_err(|e| storage_error("syncing the merged file", e))?;
        }
        let (md5, sha256, state) = hasher.finish(size);
        Ok(Concatenated {
            size,
            md5,
            sha256,
            direct_io: true,
            cloned_bytes: 0,
            state,
        })
    })
}

/// Fills aligned blocks from the chunk files in order, checking each chunk; a block goes on
/// only when full, except the last.
fn fill_blocks(
    job: &Concat,
    control: &Control,
    start: u64,
    full: &SyncSender<(AlignedBlock, usize)>,
    empty: &Receiver<AlignedBlock>,
) -> Result<u64, ConcatError> {
    let stopped = || ConcatError::Storage("the hash or write thread stopped".into());
    let mut written = start;
    let mut block = empty.recv().map_err(|_| stopped())?;
    let mut filled = 0usize;
    for chunk in &job.chunks {
        let mut reader = ChunkReader::open(chunk, job.read_direct)?;
        loop {
            if control.cancel.load(Ordering::Relaxed) {
                return Err(ConcatError::Cancelled);
            }
            if filled == DIRECT_BLOCK {
                full.send((block, filled)).map_err(|_| stopped())?;
                block = empty.recv().map_err(|_| stopped())?;
                filled = 0;
                control.bytes_done.store(written, Ordering::Relaxed);
            }
            let n = reader.read(&mut block.bytes_mut()[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
            written += n as u64;
        }
        reader.finish()?;
    }
    if filled > 0 {
        full.send((block, filled)).map_err(|_| stopped())?;
    }
    control.bytes_done.store(written, Ordering::Relaxed);
    Ok(written)
}

/// Writes each block at its offset: whole blocks with `O_DIRECT`; of the last, partial one,
/// the aligned part with `O_DIRECT` and the rest through the ordinary handle.
fn write_blocks(
    direct: &File,
    tail: &File,
    start: u64,
    blocks: Receiver<(AlignedBlock, usize)>,
    empty: SyncSender<AlignedBlock>,
) -> Result<(), ConcatError> {
    let mut offset = start;
    for (block, len) in blocks {
        let aligned = len & !(DIRECT_ALIGN - 1);
        if aligned > 0 {
            direct
                .write_all_at(&block.bytes()[..aligned], offset)
                .map_err(|e| storage_error("writing the merged file", e))?;
        }
        if aligned < len {
            tail.write_all_at(&block.bytes()[aligned..len], offset + aligned as u64)
                .map_err(|e| storage_error("writing the merged file", e))?;
        }
        offset += len as u64;
        // The copier may have stopped early; a closed return path is fine.
        let _ = empty.send(block);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::Digest as _;

    fn write_chunks(
        dir: &std::path::Path,
        data: &[u8],
        chunk: usize,
        with_md5: bool,
    ) -> Vec<ChunkSource> {
        data.chunks(chunk)
            .enumerate()
            .map(|(i, bytes)| {
                let path = dir.join(format!("{i}.t"));
                std::fs::write(&path, bytes).unwrap();
                ChunkSource {
                    index: i as u64,
                    path,
                    len: bytes.len() as u64,
                    crc32c: crc32c::crc32c(bytes),
                    md5: with_md5.then(|| Md5::from_bytes(md5::Md5::digest(bytes).into())),
                }
            })
            .collect()
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn job(chunks: Vec<ChunkSource>, output: PathBuf, fsync: bool, direct_io: bool) -> Concat {
        Concat {
            chunks,
            output,
            block_bytes: 4096,
            fsync,
            direct_io,
            reflink: false,
            read_direct: true,
            sha256: false,
            resume: None,
        }
    }

    /// Both ways of writing, each into its own output.
    const MODES: [bool; 2] = [false, true];

    #[test]
    fn the_output_is_the_chunks_in_order_with_their_md5() {
        // Smaller than one direct block, and several blocks whose edges fall inside chunks
        // (700,001-byte chunks against 1 MiB blocks), with an unaligned tail.
        for len in [1_000_003, 9 * DIRECT_BLOCK + 12_345] {
            let dir = tempfile::tempdir().unwrap();
            let bytes = data(len);
            let mut chunks = write_chunks(dir.path(), &bytes, 700_001, true);
            chunks.sort_by_key(|c| c.index);
            for direct_io in MODES {
                let mut job = job(
                    chunks.clone(),
                    dir.path().join(format!("out-{direct_io}")),
                    true,
                    direct_io,
                );
                // SHA-256 on the direct path, not on the buffered one: each path is seen
                // with it and without it across the two lengths.
                job.sha256 = direct_io == (len == 1_000_003);
                let control = Control::default();
                let done = concatenate(&job, &control).unwrap();
                assert_eq!(
                    done.direct_io, direct_io,
                    "the temp dir is on a disk file system"
                );
                assert!(
                    std::fs::read(&job.output).unwrap() == bytes,
                    "{len} {direct_io}"
                );
                assert_eq!(done.size, bytes.len() as u64);
                assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
                let sha256 = Sha256::from_bytes(sha2::Sha256::digest(&bytes).into());
                assert_eq!(done.sha256, job.sha256.then_some(sha256));
                assert_eq!(
                    control.bytes_done.load(Ordering::Relaxed),
                    bytes.len() as u64
                );
            }
        }
    }

    #[test]
    fn direct_reads_leave_the_page_cache_alone_and_buffered_ones_forget_what_they_read() {
        use crate::direct_io::{evict, resident_pages};
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let bytes = data(3 * DIRECT_BLOCK + 777);
        let chunks = write_chunks(dir.path(), &bytes, DIRECT_BLOCK, true);
        let cached = || -> usize { chunks.iter().map(|c| resident_pages(&c.path)).sum() };
        let all_pages: usize = chunks.iter().map(|c| c.len.div_ceil(4096) as usize).sum();
        // (chunks cached before the run, chunks read with O_DIRECT)
        for (warm, read_direct) in [(true, true), (false, true), (true, false)] {
            for output_direct in MODES {
                for chunk in &chunks {
                    if warm {
                        // Read in, as a chunk just written through the page cache is.
                        std::fs::read(&chunk.path).unwrap();
                    } else {
                        evict(&chunk.path);
                    }
                }
                let before = cached();
                assert_eq!(before, if warm { all_pages } else { 0 });
                let mut job = job(
                    chunks.clone(),
                    dir.path()
                        .join(format!("out-{warm}-{read_direct}-{output_direct}")),
                    true,
                    output_direct,
                );
                job.read_direct = read_direct;
                let done = concatenate(&job, &Control::default()).unwrap();
                assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
                let after = cached();
                let case = format!("warm {warm}, direct {read_direct}, out {output_direct}");
                if read_direct {
                    assert_eq!(after, before, "{case}: neither filled nor dropped");
                } else {
                    assert_eq!(after, 0, "{case}: dropped once read");
                }
                assert!(std::fs::read(&job.output).unwrap() == bytes, "{case}");
            }
        }
    }

    #[test]
    fn more_chunks_than_pooled_blocks_do_not_exhaust_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(DEPTH * 5 * 1000 + 1);
        let chunks = write_chunks(dir.path(), &bytes, 1000, false);
        assert!(chunks.len() > 4 * (DEPTH + 2));
        for direct_io in MODES {
            let job = job(
                chunks.clone(),
                dir.path().join(format!("out-{direct_io}")),
                false,
                direct_io,
            );
            let done = concatenate(&job, &Control::default()).unwrap();
            assert_eq!(done.size, bytes.len() as u64);
            assert!(std::fs::read(&job.output).unwrap() == bytes);
        }
        // Direct I/O: more blocks than its pool holds.
        let bytes = data(3 * DIRECT_DEPTH * DIRECT_BLOCK + 77);
        let chunks = write_chunks(dir.path(), &bytes, 3 << 20, false);
        let job = job(chunks, dir.path().join("out-big"), false, true);
        let done = concatenate(&job, &Control::default()).unwrap();
        assert!(done.direct_io);
        assert!(std::fs::read(&job.output).unwrap() == bytes);
    }

    #[test]
    fn a_resumed_concatenation_appends_the_rest_and_ends_with_the_digests_of_the_whole() {
        // 1 MiB chunks resume at an aligned offset (direct writes go on); 700,001-byte ones
        // at an unaligned one (the rest is written buffered).
        for chunk_len in [1 << 20, 700_001] {
            let bytes = data(6 * chunk_len + 12_345);
            for direct_io in MODES {
                let dir = tempfile::tempdir().unwrap();
                let chunks = write_chunks(dir.path(), &bytes, chunk_len, true);
                let output = dir.path().join("out");
                let mut first = job(chunks[..3].to_vec(), output.clone(), true, direct_io);
                first.sha256 = true;
                let before = concatenate(&first, &Control::default()).unwrap();
                assert_eq!(before.state.offset, 3 * chunk_len as u64);
                // The first chunks are gone: the rest can only come from the saved state.
                for c in &chunks[..3] {
                    std::fs::remove_file(&c.path).unwrap();
                }
                let mut rest = job(chunks[3..].to_vec(), output.clone(), true, direct_io);
                rest.resume = Some(before.state.clone());
                let control = Control::default();
                let done = concatenate(&rest, &control).unwrap();
                assert!(std::fs::read(&output).unwrap() == bytes, "{chunk_len}");
                assert_eq!(done.size, bytes.len() as u64);
                assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
                let sha256 = Sha256::from_bytes(sha2::Sha256::digest(&bytes).into());
                assert_eq!(done.sha256, Some(sha256), "the state decides on SHA-256");
                assert_eq!(done.direct_io, direct_io && chunk_len % DIRECT_ALIGN == 0);
                assert_eq!(control.bytes_done.load(Ordering::Relaxed), done.size);
            }
        }
    }

    #[test]
    fn a_resumed_concatenation_that_fails_keeps_the_file_it_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(4 << 20);
        let chunks = write_chunks(dir.path(), &bytes, 1 << 20, false);
        let output = dir.path().join("out");
        let before = concatenate(
            &job(chunks[..2].to_vec(), output.clone(), false, true),
            &Control::default(),
        )
        .unwrap();
        let mut flipped = std::fs::read(&chunks[3].path).unwrap();
        flipped[5] ^= 1;
        std::fs::write(&chunks[3].path, flipped).unwrap();
        let mut rest = job(chunks[2..].to_vec(), output.clone(), false, true);
        rest.resume = Some(before.state);
        let err = concatenate(&rest, &Control::default()).unwrap_err();
        assert!(matches!(err, ConcatError::LostChunks(_)), "{err}");
        let kept = std::fs::read(&output).unwrap();
        assert!(
            kept[..2 << 20] == bytes[..2 << 20],
            "the saved prefix is intact"
        );
    }

    #[test]
    fn a_chunk_that_changed_on_storage_fails_the_merge_and_leaves_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(5_000_000);
        let chunks = write_chunks(dir.path(), &bytes, 1_000_000, false);
        let mut flipped = std::fs::read(&chunks[3].path).unwrap();
        flipped[17] ^= 1;
        std::fs::write(&chunks[3].path, flipped).unwrap();
        for direct_io in MODES {
            let job = job(
                chunks.clone(),
                dir.path().join(format!("out-{direct_io}")),
                false,
                direct_io,
            );
            let err = concatenate(&job, &Control::default()).unwrap_err();
            assert!(
                matches!(&err, ConcatError::LostChunks(lost) if lost.len() == 1 && lost[0].index == 3 && lost[0].why.contains("CRC32C")),
                "{err}"
            );
            assert!(!job.output.exists());
        }
    }

    fn lost_indices(result: Result<Concatenated, ConcatError>) -> Vec<u64> {
        match result {
            Err(ConcatError::LostChunks(lost)) => lost.iter().map(|l| l.index).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_missing_or_short_chunk_is_found_before_writing() {
        for direct_io in MODES {
            let dir = tempfile::tempdir().unwrap();
            let chunks = write_chunks(dir.path(), &data(40_000), 10_000, false);
            std::fs::remove_file(&chunks[1].path).unwrap();
            let job = job(chunks.clone(), dir.path().join("out"), false, direct_io);
            assert_eq!(lost_indices(concatenate(&job, &Control::default())), [1]);
            std::fs::write(&chunks[3].path, b"short").unwrap();
            assert_eq!(lost_indices(concatenate(&job, &Control::default())), [1, 3]);
            std::fs::write(&chunks[1].path, b"short").unwrap();
            assert_eq!(lost_indices(concatenate(&job, &Control::default())), [1, 3]);
            assert!(!job.output.exists());
        }
    }

    #[test]
    fn a_chunk_that_cannot_be_read_is_a_storage_error_not_a_lost_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let mut chunks = write_chunks(dir.path(), &data(30_000), 10_000, false);
        // A directory of the recorded size cannot be read: EISDIR, an I/O error that says
        // nothing about the chunk's bytes (as EIO, EMFILE or ESTALE would not).
        let not_a_file = dir.path().join("dir");
        std::fs::create_dir(&not_a_file).unwrap();
        chunks[1].len = std::fs::metadata(&not_a_file).unwrap().len();
        chunks[1].path = not_a_file;
        for direct_io in MODES {
            let job = job(chunks.clone(), dir.path().join("out"), false, direct_io);
            let err = concatenate(&job, &Control::default()).unwrap_err();
            assert!(matches!(err, ConcatError::Storage(_)), "{err:?}");
            assert!(!job.output.exists());
        }
    }

    #[test]
    fn cancelling_stops_the_merge_and_removes_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = write_chunks(dir.path(), &data(100_000), 10_000, false);
        for direct_io in MODES {
            let job = job(chunks.clone(), dir.path().join("out"), false, direct_io);
            let control = Control::default();
            control.cancel.store(true, Ordering::Relaxed);
            assert!(matches!(
                concatenate(&job, &control),
                Err(ConcatError::Cancelled)
            ));
            assert!(!job.output.exists());
        }
    }

    /// Chunks of whole blocks and an unaligned last one, written and synced in `dir`.
    fn cloneable_chunks(dir: &std::path::Path, bytes: &[u8], chunk: usize) -> Vec<ChunkSource> {
        let chunks = write_chunks(dir, bytes, chunk, true);
        for c in &chunks {
            File::open(&c.path).unwrap().sync_all().unwrap();
        }
        chunks
    }

    #[test]
    fn on_a_file_system_that_shares_blocks_the_chunks_are_cloned_not_written_again() {
        use stitch_testkit::reflink::{reflink_tempdir, sync_fs, used_bytes};
        let dir = reflink_tempdir();
        let bytes = data(16 * (4 << 20) + 12_345);
        let chunks = cloneable_chunks(dir.path(), &bytes, 4 << 20);
        // The same run, copied and then cloned: the disk's use says which wrote the bytes.
        for reflink in [false, true] {
            let mut job = job(
                chunks.clone(),
                dir.path().join(format!("out-{reflink}")),
                true,
                true,
            );
            job.reflink = reflink;
            job.sha256 = true;
            sync_fs(dir.path());
            let before = used_bytes(dir.path());
            let control = Control::default();
            let done = concatenate(&job, &control).unwrap();
            sync_fs(dir.path());
            let grew = used_bytes(dir.path()) - before;
            assert!(std::fs::read(&job.output).unwrap() == bytes, "{reflink}");
            assert_eq!(done.size, bytes.len() as u64);
            assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
            let sha256 = Sha256::from_bytes(sha2::Sha256::digest(&bytes).into());
            assert_eq!(done.sha256, Some(sha256));
            assert_eq!(control.bytes_done.load(Ordering::Relaxed), done.size);
            if reflink {
                assert_eq!(done.cloned_bytes, done.size);
                assert!(!done.direct_io);
                assert!(
                    grew < 1 << 20,
                    "cloning {} bytes took {grew} bytes of disk",
                    done.size
                );
            } else {
                assert_eq!(done.cloned_bytes, 0);
                assert!(
                    grew >= done.size,
                    "copying {} bytes took {grew} bytes of disk",
                    done.size
                );
            }
        }
    }

    #[test]
    fn a_resumed_clone_shares_the_rest_and_a_tail_the_file_system_refuses_is_written() {
        use stitch_testkit::reflink::reflink_tempdir;
        let dir = reflink_tempdir();
        let bytes = data(6 * (1 << 20) + 5_000);
        let chunks = cloneable_chunks(dir.path(), &bytes, 1 << 20);
        let output = dir.path().join("out");
        let mut first = job(chunks[..3].to_vec(), output.clone(), true, true);
        first.reflink = true;
        let before = concatenate(&first, &Control::default()).unwrap();
        assert_eq!(before.cloned_bytes, 3 << 20);
        let mut rest = job(chunks[3..].to_vec(), output.clone(), true, true);
        rest.reflink = true;
        rest.resume = Some(before.state.clone());
        let done = concatenate(&rest, &Control::default()).unwrap();
        assert!(std::fs::read(&output).unwrap() == bytes);
        assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
        assert_eq!(done.cloned_bytes, bytes.len() as u64 - (3 << 20));

        // A file longer than the run (as a run retried over a longer file meets): the
        // kernel will not clone the unaligned last chunk inside it, so it is written.
        let longer = dir.path().join("longer");
        std::fs::write(&longer, vec![0xAA; bytes.len() + (1 << 20)]).unwrap();
        let mut over = job(chunks[3..].to_vec(), longer.clone(), true, true);
        over.reflink = true;
        over.resume = Some(before.state);
        let done = concatenate(&over, &Control::default()).unwrap();
        assert_eq!(
            done.cloned_bytes,
            3 << 20,
            "the whole-block chunks are cloned"
        );
        let file = std::fs::read(&longer).unwrap();
        assert!(file[3 << 20..bytes.len()] == bytes[3 << 20..]);
        assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
    }

    #[test]
    fn where_the_file_system_cannot_clone_the_merge_copies() {
        // tmpfs shares no blocks between files; 1 MiB chunks would be cloned elsewhere.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let bytes = data(4 * (1 << 20) + 77);
        let chunks = write_chunks(dir.path(), &bytes, 1 << 20, false);
        for direct_io in MODES {
            let mut job = job(
                chunks.clone(),
                dir.path().join(format!("out-{direct_io}")),
                false,
                direct_io,
            );
            job.reflink = true;
            let done = concatenate(&job, &Control::default()).unwrap();
            assert_eq!(done.cloned_bytes, 0);
            assert!(std::fs::read(&job.output).unwrap() == bytes);
            assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
        }
    }

    #[test]
    fn a_clone_of_a_chunk_that_changed_on_storage_fails_and_leaves_no_output() {
        use stitch_testkit::reflink::reflink_tempdir;
        let dir = reflink_tempdir();
        let bytes = data(4 << 20);
        let chunks = cloneable_chunks(dir.path(), &bytes, 1 << 20);
        let mut flipped = std::fs::read(&chunks[2].path).unwrap();
        flipped[17] ^= 1;
        std::fs::write(&chunks[2].path, flipped).unwrap();
        let mut job = job(chunks, dir.path().join("out"), false, true);
        job.reflink = true;
        assert_eq!(lost_indices(concatenate(&job, &Control::default())), [2]);
        assert!(!job.output.exists());
    }
}
