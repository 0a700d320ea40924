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

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use md5::Digest;
use stitch_common::digest::Md5;

/// Blocks in flight between the copy thread and the hashing thread.
const DEPTH: usize = 16;
/// Bytes written between two early writeback requests.
const SYNC_EVERY: u64 = 64 << 20;

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concatenated {
    pub size: u64,
    pub md5: Md5,
}

#[derive(Debug, thiserror::Error)]
pub enum ConcatError {
    /// A counted chunk has no readable file: the upload cannot be merged.
    #[error("chunk {index} is missing: {detail}")]
    MissingChunk { index: u64, detail: String },
    /// A chunk's file does not hold what was recorded for it.
    #[error("chunk {index} is corrupt: {what}")]
    CorruptChunk { index: u64, what: String },
    #[error("merge cancelled")]
    Cancelled,
    /// Writing the output failed (disk full, I/O error): worth retrying later.
    #[error("storage error: {0}")]
    Storage(String),
}

/// Progress and cancellation shared with the async side.
#[derive(Default)]
pub struct Control {
    pub cancel: AtomicBool,
    pub bytes_done: AtomicU64,
}

/// Runs the concatenation on the calling (blocking) thread plus two helpers. On any error
/// the output file is removed.
pub fn concatenate(job: &Concat, control: &Control) -> Result<Concatenated, ConcatError> {
    // Every chunk must be there, at its recorded size, before anything is written.
    for chunk in &job.chunks {
        match std::fs::metadata(&chunk.path) {
            Ok(m) if m.len() == chunk.len => {}
            Ok(m) => {
                return Err(ConcatError::CorruptChunk {
                    index: chunk.index,
                    what: format!("{} bytes on storage, {} recorded", m.len(), chunk.len),
                });
            }
            Err(e) => {
                return Err(ConcatError::MissingChunk {
                    index: chunk.index,
                    detail: e.to_string(),
                });
            }
        }
    }
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&job.output)
        .map_err(|e| storage_error("creating the merged file", e))?;
    let result = run(job, control, out);
    if result.is_err() {
        let _ = std::fs::remove_file(&job.output);
    }
    result
}

fn storage_error(context: &str, e: std::io::Error) -> ConcatError {
    ConcatError::Storage(format!("{context}: {e}"))
}

fn run(job: &Concat, control: &Control, mut out: File) -> Result<Concatenated, ConcatError> {
    let syncer_file = out
        .try_clone()
        .map_err(|e| storage_error("cloning the output handle", e))?;
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(DEPTH);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(DEPTH + 2);
        for _ in 0..DEPTH + 2 {
            let _ = empty_tx.send(vec![0u8; job.block_bytes]);
        }
        let hasher = scope.spawn(move || hash_blocks(full_rx, empty_tx));
        let (sync_tx, sync_rx) = sync_channel::<()>(1);
        let fsync = job.fsync;
        let syncer = scope.spawn(move || {
            for () in sync_rx {
                if fsync {
                    let _ = syncer_file.sync_data();
                }
            }
        });

        let copied = copy_chunks(job, control, &mut out, &full_tx, &empty_rx, &sync_tx);
        drop(full_tx);
        drop(sync_tx);
        let md5 = hasher
            .join()
            .map_err(|_| ConcatError::Storage("hash thread panicked".into()))?;
        let _ = syncer.join();
        let size = copied?;
        if job.fsync {
            out.sync_data()
                .map_err(|e| storage_error("syncing the merged file", e))?;
        }
        Ok(Concatenated { size, md5 })
    })
}

fn hash_blocks(full: Receiver<(Vec<u8>, usize)>, empty: SyncSender<Vec<u8>>) -> Md5 {
    let mut md5 = md5::Md5::new();
    for (block, len) in full {
        md5.update(&block[..len]);
        // The copier may have stopped early; a closed return path is fine.
        let _ = empty.send(block);
    }
    Md5::from_bytes(md5.finalize().into())
}

fn copy_chunks(
    job: &Concat,
    control: &Control,
    out: &mut File,
    full: &SyncSender<(Vec<u8>, usize)>,
    empty: &Receiver<Vec<u8>>,
    sync: &SyncSender<()>,
) -> Result<u64, ConcatError> {
    let mut written = 0u64;
    let mut last_sync = 0u64;
    // A block taken from the pool but not filled (end of a chunk) waits here for the next
    // read, so that the pool never shrinks.
    let mut spare: Option<Vec<u8>> = None;
    for chunk in &job.chunks {
        let mut file = File::open(&chunk.path).map_err(|e| ConcatError::MissingChunk {
            index: chunk.index,
            detail: e.to_string(),
        })?;
        let mut crc = 0u32;
        let mut chunk_md5 = chunk.md5.map(|_| md5::Md5::new());
        let mut chunk_bytes = 0u64;
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
            let n = match file.read(&mut block) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    spare = Some(block);
                    continue;
                }
                Err(e) => {
                    return Err(ConcatError::MissingChunk {
                        index: chunk.index,
                        detail: e.to_string(),
                    });
                }
            };
            if n == 0 {
                spare = Some(block);
                break;
            }
            crc = crc32c::crc32c_append(crc, &block[..n]);
            if let Some(m) = &mut chunk_md5 {
                m.update(&block[..n]);
            }
            out.write_all(&block[..n])
                .map_err(|e| storage_error("writing the merged file", e))?;
            chunk_bytes += n as u64;
            written += n as u64;
            full.send((block, n))
                .map_err(|_| ConcatError::Storage("hash thread stopped".into()))?;
            if written - last_sync >= SYNC_EVERY {
                last_sync = written;
                let _ = sync.try_send(());
                control.bytes_done.store(written, Ordering::Relaxed);
            }
        }
        if chunk_bytes != chunk.len {
            return Err(ConcatError::CorruptChunk {
                index: chunk.index,
                what: format!("read {chunk_bytes} bytes, {} recorded", chunk.len),
            });
        }
        if crc != chunk.crc32c {
            return Err(ConcatError::CorruptChunk {
                index: chunk.index,
                what: "CRC32C differs from the one recorded at upload".into(),
            });
        }
        if let (Some(expected), Some(m)) = (chunk.md5, chunk_md5)
            && Md5::from_bytes(m.finalize().into()) != expected
        {
            return Err(ConcatError::CorruptChunk {
                index: chunk.index,
                what: "MD5 differs from the one recorded at upload".into(),
            });
        }
    }
    control.bytes_done.store(written, Ordering::Relaxed);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_output_is_the_chunks_in_order_with_their_md5() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(1_000_003);
        let mut chunks = write_chunks(dir.path(), &bytes, 100_000, true);
        chunks.sort_by_key(|c| c.index);
        let job = Concat {
            chunks,
            output: dir.path().join("out"),
            block_bytes: 4096,
            fsync: true,
        };
        let control = Control::default();
        let done = concatenate(&job, &control).unwrap();
        assert_eq!(std::fs::read(&job.output).unwrap(), bytes);
        assert_eq!(done.size, bytes.len() as u64);
        assert_eq!(done.md5, Md5::from_bytes(md5::Md5::digest(&bytes).into()));
        assert_eq!(
            control.bytes_done.load(Ordering::Relaxed),
            bytes.len() as u64
        );
    }

    #[test]
    fn more_chunks_than_pooled_blocks_do_not_exhaust_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(DEPTH * 5 * 1000 + 1);
        let chunks = write_chunks(dir.path(), &bytes, 1000, false);
        assert!(chunks.len() > 4 * (DEPTH + 2));
        let job = Concat {
            chunks,
            output: dir.path().join("out"),
            block_bytes: 4096,
            fsync: false,
        };
        let done = concatenate(&job, &Control::default()).unwrap();
        assert_eq!(done.size, bytes.len() as u64);
        assert_eq!(std::fs::read(&job.output).unwrap(), bytes);
    }

    #[test]
    fn a_chunk_that_changed_on_storage_fails_the_merge_and_leaves_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(50_000);
        let chunks = write_chunks(dir.path(), &bytes, 10_000, false);
        let mut flipped = std::fs::read(&chunks[3].path).unwrap();
        flipped[17] ^= 1;
        std::fs::write(&chunks[3].path, flipped).unwrap();
        let job = Concat {
            chunks,
            output: dir.path().join("out"),
            block_bytes: 4096,
            fsync: false,
        };
        let err = concatenate(&job, &Control::default()).unwrap_err();
        assert!(
            matches!(err, ConcatError::CorruptChunk { index: 3, .. }),
            "{err}"
        );
        assert!(!job.output.exists());
    }

    #[test]
    fn a_missing_or_short_chunk_is_found_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = write_chunks(dir.path(), &data(30_000), 10_000, false);
        std::fs::remove_file(&chunks[1].path).unwrap();
        let job = Concat {
            chunks: chunks.clone(),
            output: dir.path().join("out"),
            block_bytes: 4096,
            fsync: false,
        };
        assert!(matches!(
            concatenate(&job, &Control::default()),
            Err(ConcatError::MissingChunk { index: 1, .. })
        ));
        std::fs::write(&chunks[1].path, b"short").unwrap();
        assert!(matches!(
            concatenate(&job, &Control::default()),
            Err(ConcatError::CorruptChunk { index: 1, .. })
        ));
        assert!(!job.output.exists());
    }

    #[test]
    fn cancelling_stops_the_merge_and_removes_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = write_chunks(dir.path(), &data(100_000), 10_000, false);
        let job = Concat {
            chunks,
            output: dir.path().join("out"),
            block_bytes: 4096,
            fsync: false,
        };
        let control = Control::default();
        control.cancel.store(true, Ordering::Relaxed);
        assert!(matches!(
            concatenate(&job, &control),
            Err(ConcatError::Cancelled)
        ));
        assert!(!job.output.exists());
    }
}
