//! The janitor: removes what no upload needs any more, and announces uploads that expired.
//!
//! Each pass walks `uploads/` on shared storage and, for every upload directory, asks the
//! state store what it knows (storage is the truth for what was received, the state store the
//! index of what counts):
//!
//! | the state store says | the janitor |
//! |---|---|
//! | nothing (the upload's keys expired, or it was never recorded) | publishes `upload.expired` (an id derived from the manifest, stable across passes), then removes the directory |
//! | receiving or merging | removes chunk copies nothing counts: `.part` files of writes that died, surplus copies |
//! | completed | removes the chunks and every attempt file but the committed one |
//! | aborted | removes the directory (the abort could not) |
//! | failed | keeps everything until the upload expires, for diagnosis |
//!
//! Nothing younger than `janitor.grace` is touched: a copy being written, or between its
//! rename and its record, is in use. Several janitors may run; each removal is idempotent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stitch_common::events::Event;
use stitch_common::id::UploadId;
use stitch_common::lock::MergeLock;
use stitch_common::queue::EventSink;
use stitch_common::state::StateStore;
use stitch_common::storage::FsChunkStore;
use stitch_common::upload::UploadState;
use tokio::sync::watch;

pub struct Janitor {
    pub state: Arc<dyn StateStore>,
    pub storage: FsChunkStore,
    pub events: Arc<dyn EventSink>,
    /// Taken for each pass, so that one janitor of the fleet walks the storage at a time.
    pub lock: Arc<dyn MergeLock>,
    pub namespace: String,
    pub interval: Duration,
    pub grace: Duration,
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired: Vec<String>,
    pub files_removed: usize,
}

impl Janitor {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.pass().await {
                Ok(None) => tracing::debug!("another janitor is sweeping"),
                Ok(Some(swept)) if swept != Swept::default() => {
                    tracing::info!(
                        expired = swept.expired.len(),
                        files = swept.files_removed,
                        "janitor pass"
                    );
                }
                Ok(Some(_)) => {}
                Err(e) => tracing::warn!(error = %e, "janitor pass incomplete"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass under the janitor lock (`<namespace>:janitor:lock`); `None` when another
    /// janitor holds it. The lease is not renewed: a pass that outlives it may overlap the
    /// next holder's, which only repeats idempotent work.
    pub async fn pass(&self) -> anyhow::Result<Option<Swept>> {
        let key = format!("{}:janitor:lock", self.namespace);
        let Some(lease) = self.lock.try_acquire(&key).await? else {
            return Ok(None);
        };
        let swept = self.sweep_once().await;
        if let Err(e) = self.lock.release(&lease).await {
            tracing::debug!(error = %e, "janitor lock not released; it expires");
        }
        swept.map(Some)
    }

    pub async fn sweep_once(&self) -> anyhow::Result<Swept> {
        let mut swept = Swept::default();
        let uploads = self.storage.root().join("uploads");
        let dirs = blocking(move || list_dir(&uploads)).await?;
        for dir in dirs {
            let Some(id) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| UploadId::parse(n).ok())
            else {
                continue; // Not ours: never touch what we did not create.
            };
            if let Err(e) = self.tend(&id, &dir, &mut swept).await {
                tracing::warn!(upload_id = %id, error = %e, "janitor skipped an upload");
            }
        }
        Ok(swept)
    }

    async fn tend(&self, id: &UploadId, dir: &Path, swept: &mut Swept) -> anyhow::Result<()> {
        let grace = self.grace;
        let Some(header) = self.state.upload_header(id).await? else {
            // Unknown to the state store: expired, or its first record never happened.
            let manifest = self.storage.read_manifest(id).await?;
            let dir_owned = dir.to_owned();
            if !blocking(move || all_older_than(&dir_owned, grace)).await? {
                return Ok(());
            }
            if let Some(manifest) = manifest {
                self.events
                    .publish_event(&Event::expired(&manifest))
                    .await?;
                swept.expired.push(id.to_string());
                stitch_common::metrics::transition("expired");
            }
            self.storage.remove_upload(id).await?;
            swept.files_removed += 1;
            metrics::counter!(stitch_common::metrics::JANITOR_FILES_REMOVED).increment(1);
            return Ok(());
        };
        let dir = dir.to_owned();
        let removed = match header.state {
            UploadState::Receiving | UploadState::Merging => {
                let counted: Vec<String> = self
                    .state
                    .counted_chunks(id)
                    .await?
                    .into_iter()
                    .map(|c| format!("{}.{}", c.index, c.token))
                    .collect();
                blocking(move || {
                    remove_old_files(&dir.join("chunks"), grace, |name| {
                        !counted.iter().any(|c| c == name)
                    })
                })
                .await?
            }
            UploadState::Completed => {
                let keep = self
                    .state
                    .upload_status(id)
                    .await?
                    .and_then(|s| s.completion)
                    .and_then(|c| c.location.rsplit('/').next().map(str::to_owned));
                blocking(move || {
                    let mut n = remove_old_files(&dir.join("chunks"), grace, |_| true)?;
                    n += remove_old_files(&dir, grace, |name| {
                        let attempt = name.starts_with("file.") || name.starts_with(".file.");
                        attempt && Some(name) != keep.as_deref()
                    })?;
                    Ok(n)
                })
                .await?
            }
            UploadState::Aborted => {
                self.storage.remove_upload(id).await?;
                1
            }
            UploadState::Failed => 0,
        };
        swept.files_removed += removed;
        metrics::counter!(stitch_common::metrics::JANITOR_FILES_REMOVED).increment(removed as u64);
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn older_than(path: &Path, grace: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age >= grace)
}

/// Whether nothing under `dir` (the directory itself included) changed within `grace`.
fn all_older_than(dir: &Path, grace: Duration) -> std::io::Result<bool> {
    if !older_than(dir, grace) {
        return Ok(false);
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let old = if path.is_dir() {
            all_older_than(&path, grace)?
        } else {
            older_than(&path, grace)
        };
        if !old {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes the files of `dir` that `doomed` selects and that are older than `grace`.
fn remove_old_files(
    dir: &Path,
    grace: Duration,
    doomed: impl Fn(&str) -> bool,
) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_file() && name != "manifest.json" && doomed(&name) && older_than(&path, grace) {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}
