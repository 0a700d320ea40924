//! A benchmark's scratch directory: on the disk under test (never a memory file system by
//! accident), fresh per run, and removed afterwards.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where fresh work directories go by default: inside the workspace's `target/`, which is on
/// the project's disk, unlike `/tmp` on machines where that is a tmpfs.
pub const DEFAULT_PARENT: &str = "target/bench-work";

/// A fresh directory, removed by [`WorkDir::remove`].
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// A new directory `run-<random>` under `parent` (made if missing), so that a given
    /// `--dir` is used but never emptied.
    pub fn create(parent: &Path) -> anyhow::Result<Self> {
        let path = parent.join(format!("run-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let path = path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()))?;
        Ok(Self { path })
    }

    /// Runs `f` in a fresh directory under `parent`, removed afterwards whatever `f`
    /// returned.
    pub fn within<T>(
        parent: &Path,
        f: impl FnOnce(&WorkDir) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let work = Self::create(parent)?;
        let result = f(&work);
        let removed = work.remove();
        let result = result?;
        removed?;
        Ok(result)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Removes the directory and everything in it.
    pub fn remove(self) -> anyhow::Result<()> {
        remove_dir(&self.path)
    }
}

/// Removes a directory tree; one that does not exist is fine.
pub fn remove_dir(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_dir_is_fresh_and_removed_whole() {
        let parent = tempfile::tempdir().unwrap();
        let a = WorkDir::create(parent.path()).unwrap();
        let b = WorkDir::create(parent.path()).unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::create_dir_all(a.join("storage/x")).unwrap();
        let path = a.path().to_owned();
        a.remove().unwrap();
        assert!(!path.exists());
        assert!(parent.path().exists() && b.path().exists());
        remove_dir(&path).unwrap();
    }
}
