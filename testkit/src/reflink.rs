//! A directory on a file system that shares blocks between files (`FICLONERANGE`), for the
//! tests of the merge that clones chunks instead of copying them.
//!
//! `STITCH_TEST_REFLINK_DIR` names it; `cargo xtask test` makes one (a loop-mounted XFS
//! image under `target/`, which needs root) and passes it on. A test that needs one and
//! finds none fails and says so, rather than passing without having looked.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The reflink-capable directory the tests were given.
pub fn reflink_dir() -> PathBuf {
    match std::env::var_os("STITCH_TEST_REFLINK_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "this test needs a directory on XFS (reflink=1) or Btrfs in STITCH_TEST_REFLINK_DIR; \
             `cargo xtask test` mounts one when run as root"
        ),
    }
}

/// A fresh temporary directory inside [`reflink_dir`].
pub fn reflink_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(reflink_dir()).expect("a temporary directory in STITCH_TEST_REFLINK_DIR")
}

/// Bytes in use on the file system holding `path` (`stat -f`: total minus free blocks). Call
/// it after syncing what was written: delayed allocation counts blocks only when they are
/// placed.
pub fn used_bytes(path: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%b %f %S"])
        .arg(path)
        .output()
        .expect("running stat -f");
    assert!(out.status.success(), "stat -f {}: {out:?}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let n: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().expect("stat -f prints numbers"))
        .collect();
    let [blocks, free, size] = n[..] else {
        panic!("stat -f printed {text:?}");
    };
    (blocks - free) * size
}

/// `sync -f`: flushes the whole file system holding `path`, so that [`used_bytes`] counts
/// every block written so far.
pub fn sync_fs(path: &Path) {
    let status = Command::new("sync")
        .arg("-f")
        .arg(path)
        .status()
        .expect("running sync -f");
    assert!(status.success(), "sync -f {}", path.display());
}
