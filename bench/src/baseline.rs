//! The machine's limits that Stitch is measured against: how fast this disk takes a
//! sequential write of the same bytes (through the page cache, or with direct I/O, which
//! measures the disk alone), how fast new bytes go into the page cache, how fast one core
//! computes their MD5 in memory, and how fast one core computes the MD5 of files on storage
//! (reading them, writing nothing) — the floor under a merge. Each runs with nothing else of
//! the benchmark going on.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use stitch_common::digest::Md5Hasher;

use crate::MB;

/// Bytes processed in a wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Throughput {
    /// Decimal megabytes per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / MB / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Writes `data` to a new file `path` in `block`-sized writes, fsyncs it once at the end
/// (the time includes the fsync), then removes the file.
pub fn disk_write(path: &Path, data: &[u8], block: usize) -> anyhow::Result<Throughput> {
    let started = Instant::now();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    for piece in data.chunks(block.max(1)) {
        file.write_all(piece)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(Throughput {
        bytes: data.len() as u64,
        elapsed,
    })
}

/// Writes `data` to a new file `path` with direct I/O (`O_DIRECT`: no page cache) in
/// `block`-sized writes from one aligned buffer, fsyncs it once at the end (the time
/// includes the fsync), then removes the file: the disk's own sequential write rate at one
/// request in flight, whatever the state of the page cache. `block` is rounded up to a
/// multiple of 4 KiB; the last, partial block is padded and the file truncated afterwards.
pub fn direct_write(path: &Path, data: &[u8], block: usize) -> anyhow::Result<Throughput> {
    use std::os::unix::fs::OpenOptionsExt as _;
    const ALIGN: usize = 4096;
    let block = block.max(ALIGN).div_ceil(ALIGN) * ALIGN;
    // An aligned window into a slightly larger buffer: direct I/O needs the memory, the
    // offset and the length aligned, and this needs no `unsafe`.
    let mut raw = vec![0u8; block + ALIGN];
    let skip = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
    let buf = &mut raw[skip..skip + block];
    let started = Instant::now();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
        .with_context(|| format!("creating {} for direct I/O", path.display()))?;
    for piece in data.chunks(block) {
        buf[..piece.len()].copy_from_slice(piece);
        let len = piece.len().div_ceil(ALIGN) * ALIGN;
        buf[piece.len()..len].fill(0);
        file.write_all(&buf[..len])
            .with_context(|| format!("writing {} with direct I/O", path.display()))?;
    }
    file.set_len(data.len() as u64)
        .with_context(|| format!("truncating {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(Throughput {
        bytes: data.len() as u64,
        elapsed,
    })
}

/// Writes `data` to a new file `path` in `block`-sized writes and removes it, with no fsync:
/// the time to put new bytes into the page cache, disk not included (the file is removed
/// before writeback would start). On a VM that reports free memory to its host (virtio
/// balloon free page reporting), that is much slower for memory idle long enough to have
/// been reported than for memory freed a moment ago; see [`page_cache_write_cold_and_warm`].
pub fn page_cache_write(path: &Path, data: &[u8], block: usize) -> anyhow::Result<Throughput> {
    let started = Instant::now();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    for piece in data.chunks(block.max(1)) {
        file.write_all(piece)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(Throughput {
        bytes: data.len() as u64,
        elapsed,
    })
}

/// [`page_cache_write`] twice: "cold", after `rest` with nothing freed (so that the free
/// memory it takes has sat idle, as before a merge), then "warm", at once, into the memory
/// the first write has just freed.
pub fn page_cache_write_cold_and_warm(
    path: &Path,
    data: &[u8],
    block: usize,
    rest: Duration,
) -> anyhow::Result<(Throughput, Throughput)> {
    std::thread::sleep(rest);
    let cold = page_cache_write(path, data, block)?;
    let warm = page_cache_write(path, data, block)?;
    Ok((cold, warm))
}

/// MD5 of `data` on the calling thread, fed in `block`-sized updates as a chunk writer
/// would, with Stitch's own MD5 ([`Md5Hasher`]). Returns the rate and the digest (which also
/// keeps the work from being optimised away).
pub fn md5_one_core(data: &[u8], block: usize) -> (Throughput, [u8; 16]) {
    md5_timed(data, block, |pieces| {
        let mut hasher = Md5Hasher::new();
        pieces.for_each(|piece| hasher.update(piece));
        *hasher.finalize().as_bytes()
    })
}

/// [`md5_one_core`] with the `md-5` crate's MD5, which Stitch used before its own: the
/// same-run measure of what [`Md5Hasher`] gains.
pub fn md5_crate_one_core(data: &[u8], block: usize) -> (Throughput, [u8; 16]) {
    use md5::Digest as _;
    md5_timed(data, block, |pieces| {
        let mut hasher = md5::Md5::new();
        pieces.for_each(|piece| hasher.update(piece));
        hasher.finalize().into()
    })
}

/// Times `hash` over `data` in `block`-sized pieces.
fn md5_timed(
    data: &[u8],
    block: usize,
    hash: impl FnOnce(std::slice::Chunks<'_, u8>) -> [u8; 16],
) -> (Throughput, [u8; 16]) {
    let started = Instant::now();
    let digest = hash(data.chunks(block.max(1)));
    let throughput = Throughput {
        bytes: data.len() as u64,
        elapsed: started.elapsed(),
    };
    (throughput, std::hint::black_box(digest))
}

/// MD5 of the files `paths` read in order in `block`-sized reads, then of `tail`, on the
/// calling thread: what hashing an upload's chunks costs without copying them anywhere.
/// Returns the rate over all bytes (files and `tail`) and the digest.
pub fn md5_files(
    paths: &[PathBuf],
    tail: &[u8],
    block: usize,
) -> anyhow::Result<(Throughput, [u8; 16])> {
    let mut buf = vec![0u8; block.max(1)];
    let started = Instant::now();
    let mut hasher = Md5Hasher::new();
    let mut bytes = 0u64;
    for path in paths {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
    }
    hasher.update(tail);
    let digest: [u8; 16] = *hasher.finalize().as_bytes();
    let throughput = Throughput {
        bytes: bytes + tail.len() as u64,
        elapsed: started.elapsed(),
    };
    Ok((throughput, std::hint::black_box(digest)))
}

/// Reads `paths` through once and discards the bytes, so that they are in the page cache
/// (files not read for a while may have been evicted, e.g. by a proactive reclaimer such as
/// DAMON's `pageout`, which this VM runs).
pub fn read_through(paths: &[PathBuf], block: usize) -> anyhow::Result<()> {
    let mut buf = vec![0u8; block.max(1)];
    for path in paths {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
    }
    Ok(())
}

/// How much of `paths` is in the page cache: (resident bytes, total bytes), from util-linux
/// `fincore`. `None` when `fincore` is not installed or fails, so that a report can say
/// "unknown" rather than guess.
pub fn page_cache_residency(paths: &[PathBuf]) -> Option<(u64, u64)> {
    if paths.is_empty() {
        return Some((0, 0));
    }
    let output = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES,SIZE"])
        .args(paths)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let parsed = parse_fincore(&String::from_utf8_lossy(&output.stdout)).ok()?;
    (parsed.0 == paths.len()).then_some((parsed.1, parsed.2))
}

/// `fincore --bytes --raw --output RES,SIZE` lines → (files, resident bytes, bytes). A file's
/// resident bytes are counted in whole pages, so they are capped at its size.
fn parse_fincore(out: &str) -> anyhow::Result<(usize, u64, u64)> {
    let mut files = 0;
    let (mut resident, mut total) = (0u64, 0u64);
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let numbers: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("fincore printed {line:?}"))?;
        ensure!(numbers.len() == 2, "fincore printed {line:?}");
        resident += numbers[0].min(numbers[1]);
        total += numbers[1];
        files += 1;
    }
    Ok((files, resident, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_decimal_megabytes_per_second() {
        let t = Throughput {
            bytes: 3_000_000,
            elapsed: Duration::from_millis(1500),
        };
        assert!((t.mb_per_s() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn md5_in_blocks_is_md5_of_the_whole() {
        let (t, digest) = md5_one_core(b"The quick brown fox jumps over the lazy dog", 5);
        assert_eq!(hex::encode(digest), "9e107d9d372bb6826bd81d3542a419d6");
        assert_eq!(t.bytes, 43);
    }

    #[test]
    fn md5_of_files_and_a_tail_is_md5_of_them_joined() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("0.a");
        let b = dir.path().join("1.b");
        std::fs::write(&a, b"The quick brown ").unwrap();
        std::fs::write(&b, b"fox jumps over ").unwrap();
        let (t, digest) = md5_files(&[a, b], b"the lazy dog", 3).unwrap();
        assert_eq!(hex::encode(digest), "9e107d9d372bb6826bd81d3542a419d6");
        assert_eq!(t.bytes, 43);
    }

    #[test]
    fn fincore_output_is_summed_with_pages_capped_at_the_size() {
        assert_eq!(
            parse_fincore("5001216 5000000\n4096 2491\n0 100\n").unwrap(),
            (3, 5_002_491, 5_002_591)
        );
        assert!(parse_fincore("RES SIZE\n").is_err());
    }

    #[test]
    fn the_direct_and_page_cache_baselines_leave_no_file() {
        // Direct I/O needs a file system that has it (tmpfs has not): the crate's own
        // directory is on the project's disk.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("direct.bin");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let t = direct_write(&path, &data, 4096).unwrap();
        assert_eq!(t.bytes, 10_000);
        assert!(!path.exists());
        let (cold, warm) =
            page_cache_write_cold_and_warm(&path, &data, 4096, Duration::ZERO).unwrap();
        assert_eq!((cold.bytes, warm.bytes), (10_000, 10_000));
        assert!(!path.exists());
    }

    #[test]
    fn the_disk_baseline_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baseline.bin");
        let t = disk_write(&path, &[7u8; 10_000], 4096).unwrap();
        assert_eq!(t.bytes, 10_000);
        assert!(!path.exists());
    }
}
