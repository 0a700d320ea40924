//! Sharing a chunk's blocks with the merged file instead of copying them (`FICLONERANGE`,
//! "reflink"), where the file system supports it: XFS made with `reflink=1` (the default of
//! current xfsprogs), Btrfs, bcachefs, and NFS 4.2 servers that implement `CLONE`. The bytes
//! were written once, when the chunk was stored; the merge then writes only metadata, so it
//! costs what reading the chunks back for the MD5 costs (from the page cache, when they
//! were written moments ago).
//!
//! ext4, tmpfs and most network file systems refuse the call; the merge then copies (direct
//! or buffered, as before). The call also refuses ranges that do not start on a file-system
//! block, so the clone path is taken only where every chunk of a run but its last is a
//! whole number of [`super::DIRECT_ALIGN`]-byte blocks and the run starts on one.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;

/// Makes `len` bytes of `dest` from `dest_offset` on share the first `len` bytes of `src`
/// (its whole length: a chunk file). Durable only after `dest` is synced.
#[allow(unsafe_code)]
pub(super) fn clone_range(
    src: &File,
    dest: &File,
    len: u64,
    dest_offset: u64,
) -> std::io::Result<()> {
    // A length of 0 means "to the end of the source" to the kernel: nothing to share.
    if len == 0 {
        return Ok(());
    }
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: 0,
        src_length: len,
        dest_offset,
    };
    // SAFETY: FICLONERANGE reads one `file_clone_range` through the pointer, which is valid
    // for the call; both descriptors are valid for the borrows of `src` and `dest`.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONERANGE, &range) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `e` says "not here" (the file system, the pair of files or the range cannot be
/// cloned) rather than that storage failed: the bytes are then copied instead.
pub(super) fn refused(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
        )
}
