//! The machine's limits that ingest is measured against: how fast this disk takes a
//! sequential write of the same bytes, and how fast one core computes their MD5. Both run
//! with nothing else of the benchmark going on.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use md5::Digest as _;

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

/// MD5 of `data` on the calling thread, fed in `block`-sized updates as a chunk writer
/// would. Returns the rate and the digest (which also keeps the work from being optimised
/// away).
pub fn md5_one_core(data: &[u8], block: usize) -> (Throughput, [u8; 16]) {
    let started = Instant::now();
    let mut hasher = md5::Md5::new();
    for piece in data.chunks(block.max(1)) {
        hasher.update(piece);
    }
    let digest: [u8; 16] = hasher.finalize().into();
    let throughput = Throughput {
        bytes: data.len() as u64,
        elapsed: started.elapsed(),
    };
    (throughput, std::hint::black_box(digest))
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
    fn the_disk_baseline_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baseline.bin");
        let t = disk_write(&path, &[7u8; 10_000], 4096).unwrap();
        assert_eq!(t.bytes, 10_000);
        assert!(!path.exists());
    }
}
