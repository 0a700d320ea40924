//! Direct I/O (`O_DIRECT`) for the bytes of uploads: chunk files are written and read back
//! past the page cache (`storage.direct_io`), as the merged file is written
//! (`merge.direct_io`).
//!
//! Why: a byte written through the page cache first needs a page of memory to land in, and
//! on a virtual machine whose host takes back freed memory (free page reporting, as on the
//! reference VM) that fresh page is a fault on the host. Measured there: writing 1 GiB of new
//! data buffered cost 1.3–3.2 CPU s (1.6–14 s of system time for 4 GiB), with `O_DIRECT` in
//! 1 MiB writes 0.18 CPU s; reading it back cold took 1.27 CPU s buffered, 0.08 direct. An
//! upload service writes new data all day, so the page cache is all cost to it: the bytes
//! are read once more (by the merge, soon after) and then never again from that copy.
//!
//! The rules of `O_DIRECT` (Linux, XFS and ext4): buffer, file offset and length aligned to
//! the logical block size, [`ALIGN`] covering every one in use. [`AlignedBlock`] is such a
//! buffer. A file system that refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE and
//! network file systems) fails the `open` with `EINVAL`: callers then fall back to ordinary
//! I/O ([`open_read`], [`refused`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Alignment of buffers, offsets and lengths (the largest logical block size in use).
pub const ALIGN: usize = 4096;
/// The size of a direct write or read: large enough that the disk streams (1 MiB direct
/// writes ran at 1.3 GB/s on the reference VM, 256 KiB ones at 0.77), small enough to pool.
pub const BLOCK: usize = 1 << 20;

/// Whether an `open` with `O_DIRECT` failed because the file system does not do direct I/O.
pub fn refused(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Opens `path` for direct reads, or `None` when its file system refuses `O_DIRECT`.
pub fn open_read(path: &Path) -> std::io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if refused(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Tells the kernel that `file`'s cached pages will not be read again
/// (`POSIX_FADV_DONTNEED`): clean ones are dropped at once, so their memory goes to the next
/// write while the host still backs it. A hint: failures are ignored.
#[allow(unsafe_code)]
pub fn forget_cached(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise(2) only reads its integer arguments; the descriptor is valid for
    // the borrow of `file`.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// A buffer of `len` bytes ([`ALIGN`]ed length) whose usable part starts at an [`ALIGN`]
/// boundary; the heap allocation does not move when the block is passed between threads.
///
/// Blocks are pooled per process (up to [`POOL_BYTES`] idle, the most recently used kept): a
/// dropped block is kept for the next one of its size, so that every chunk and every
/// assembly step reuses memory already faulted in rather than zeroing fresh pages (which
/// showed in profiles as page faults and `memset` at several percent of the API's CPU).
pub struct AlignedBlock {
    raw: Raw,
}

/// An allocation, where its aligned part starts, and that part's length.
struct Raw {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

/// Bytes of idle blocks a process keeps for reuse.
pub const POOL_BYTES: usize = 16 << 20;

/// Idle blocks, oldest first.
struct Pool {
    idle: Vec<Raw>,
    bytes: usize,
}

impl Pool {
    const fn new() -> Self {
        Self {
            idle: Vec::new(),
            bytes: 0,
        }
    }

    /// The most recently kept idle block of `len`.
    fn take(&mut self, len: usize) -> Option<Raw> {
        let i = self.idle.iter().rposition(|r| r.len == len)?;
        let raw = self.idle.remove(i);
        self.bytes -= raw.len;
        Some(raw)
    }

    /// Keeps `raw`, letting the oldest idle blocks go while more than `cap` bytes are kept.
    fn put(&mut self, raw: Raw, cap: usize) {
        self.bytes += raw.len;
        self.idle.push(raw);
        while self.bytes > cap {
            let oldest = self.idle.remove(0);
            self.bytes -= oldest.len;
        }
    }
}

static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool::new());

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

impl AlignedBlock {
    /// `len` rounded up to [`ALIGN`]; its bytes are whatever the last user left.
    pub fn new(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(ALIGN);
        let raw = pool().take(len).unwrap_or_else(|| {
            let buf = vec![0u8; len + ALIGN];
            let start = buf.as_ptr().align_offset(ALIGN);
            Raw { buf, start, len }
        });
        Self { raw }
    }

    pub fn len(&self) -> usize {
        self.raw.len
    }

    pub fn is_empty(&self) -> bool {
        self.raw.len == 0
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw.buf[self.raw.start..self.raw.start + self.raw.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw.buf[self.raw.start..self.raw.start + self.raw.len]
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        let raw = Raw {
            buf: std::mem::take(&mut self.raw.buf),
            start: self.raw.start,
            len: self.raw.len,
        };
        pool().put(raw, POOL_BYTES);
    }
}

/// Whether `buf` can be the buffer of a direct read or write at `offset`.
pub fn aligned(buf: &[u8], offset: u64) -> bool {
    buf.as_ptr().align_offset(ALIGN) == 0
        && buf.len().is_multiple_of(ALIGN)
        && offset.is_multiple_of(ALIGN as u64)
}

/// How many of `path`'s pages the page cache holds (`mincore` over a mapping of it, which
/// does not read them in): what tests look at to tell direct I/O from ordinary I/O.
#[cfg(test)]
#[allow(unsafe_code)]
pub(crate) fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    let page = 4096;
    let mut pages = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of a file open for reading, of its length; it is
    // never dereferenced, only passed to mincore(2) with a vector of one byte per page, and
    // unmapped before it goes out of scope.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap {}", path.display());
        let rc = libc::mincore(map, len, pages.as_mut_ptr());
        libc::munmap(map, len);
        assert_eq!(rc, 0, "mincore {}", path.display());
    }
    pages.iter().filter(|&&p| p & 1 == 1).count()
}

/// Drops `path`'s pages from the page cache (it must be synced), as if it was written long
/// ago: a test's starting point for reads that must not go through the cache.
#[cfg(test)]
pub(crate) fn evict(path: &Path) {
    let file = File::open(path).unwrap();
    file.sync_all().unwrap();
    forget_cached(&file);
    assert_eq!(
        resident_pages(path),
        0,
        "{} is still cached",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_aligned_and_its_length_rounded_up() {
        let mut block = AlignedBlock::new(5000);
        assert_eq!(block.len(), 8192);
        assert!(aligned(block.bytes(), 0));
        assert!(!aligned(&block.bytes()[1..], 0), "a shifted buffer");
        assert!(!aligned(&block.bytes()[..100], 0), "a short length");
        assert!(!aligned(block.bytes(), 512), "an unaligned offset");
        block.bytes_mut()[8191] = 7;
        assert_eq!(block.bytes()[8191], 7);
    }

    #[test]
    fn a_pool_gives_back_the_latest_block_of_a_size_and_keeps_at_most_its_cap() {
        let raw = |len: usize| Raw {
            buf: vec![0u8; len],
            start: 0,
            len,
        };
        let mut pool = Pool::new();
        let a = raw(ALIGN);
        let address = a.buf.as_ptr();
        pool.put(raw(2 * ALIGN), 10 * ALIGN);
        pool.put(a, 10 * ALIGN);
        assert!(pool.take(3 * ALIGN).is_none(), "no block of that size");
        assert_eq!(pool.take(ALIGN).unwrap().buf.as_ptr(), address);
        assert!(pool.take(ALIGN).is_none());
        for _ in 0..8 {
            pool.put(raw(ALIGN), 10 * ALIGN);
        }
        let latest = raw(3 * ALIGN);
        let address = latest.buf.as_ptr();
        pool.put(latest, 10 * ALIGN);
        assert!(pool.bytes <= 10 * ALIGN, "{}", pool.bytes);
        let kept: usize = pool.idle.iter().map(|r| r.len).sum();
        assert_eq!(kept, pool.bytes);
        assert!(pool.take(2 * ALIGN).is_none(), "the oldest went first");
        assert_eq!(pool.take(3 * ALIGN).unwrap().buf.as_ptr(), address);
    }

    #[test]
    fn a_dropped_block_comes_back_aligned() {
        let len = 1000 * ALIGN;
        drop(AlignedBlock::new(len));
        let again = AlignedBlock::new(len);
        assert!(aligned(again.bytes(), 0));
        assert_eq!(again.len(), len);
    }
}
