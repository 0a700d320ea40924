//! A file system that shares blocks between files, for the tests of the merge that clones
//! chunks instead of copying them (`merge.reflink`): `STITCH_TEST_REFLINK_DIR` when given,
//! otherwise a sparse 4 GiB XFS image under `target/xtask/`, made with `reflink=1` and
//! loop-mounted for the run (root only), then unmounted and removed. The machine's own file
//! systems are never touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, bail};

const IMAGE_BYTES: u64 = 4 << 30;

/// The mounts (mount point, image) of this run not undone yet, for the interrupt handler.
static MOUNTED: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

pub struct ReflinkDir {
    dir: PathBuf,
    /// The mount point and image this run made, to undo when it drops.
    mounted: Option<(PathBuf, PathBuf)>,
}

impl ReflinkDir {
    pub fn provide(work: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = std::env::var_os("STITCH_TEST_REFLINK_DIR") {
            return Ok(Self {
                dir: dir.into(),
                mounted: None,
            });
        }
        if !crate::tools::is_root() {
            bail!(
                "the merge's reflink tests need a directory on XFS (reflink=1) or Btrfs: set \
                 STITCH_TEST_REFLINK_DIR to one, or run cargo xtask test as root and it mounts one"
            );
        }
        let mount = work.join("reflink");
        let image = work.join("reflink.img");
        // A mount left by a run that was killed: start over.
        if is_mounted(&mount)? {
            run(Command::new("umount").arg(&mount))?;
        }
        std::fs::create_dir_all(&mount).with_context(|| format!("creating {}", mount.display()))?;
        let _ = std::fs::remove_file(&image);
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_BYTES))
            .with_context(|| format!("creating {}", image.display()))?;
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(&image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount))?;
        let dir = mount.join("tests");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        println!(
            "xtask: a reflink file system (XFS, loop) at {}",
            mount.display()
        );
        MOUNTED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((mount.clone(), image.clone()));
        Ok(Self {
            dir,
            mounted: Some((mount, image)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ReflinkDir {
    fn drop(&mut self) {
        if let Some((mount, image)) = self.mounted.take() {
            MOUNTED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(m, _)| *m != mount);
            if run(Command::new("umount").arg(&mount)).is_ok() {
                let _ = std::fs::remove_file(image);
            }
        }
    }
}

/// Unmounts every image of this run at once (the interrupt handler): lazily when a process
/// still uses it (`umount -l` detaches it now; the kernel lets it go when the last user
/// ends), then removes the image.
pub fn unmount_all_now() {
    let mounts = std::mem::take(&mut *MOUNTED.lock().unwrap_or_else(|e| e.into_inner()));
    for (mount, image) in mounts {
        if run(Command::new("umount").arg(&mount)).is_ok()
            || run(Command::new("umount").arg("-l").arg(&mount)).is_ok()
        {
            let _ = std::fs::remove_file(&image);
            eprintln!("xtask: unmounted {}", mount.display());
        }
    }
}

fn is_mounted(path: &Path) -> anyhow::Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let Ok(path) = path.canonicalize() else {
        return Ok(false);
    };
    Ok(mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| Path::new(m) == path))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
