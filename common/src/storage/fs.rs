//! [`FsChunkStore`]: chunks and manifests on a POSIX file system.
//!
//! All file I/O runs on blocking threads, never on the async executor; a chunk's digests are
//! computed on the same thread as it is written, so hashing never stalls request handling.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::StorageError;
use super::layout::{self, AttemptFile, CopyEntry, Piece, PrefixFile};
use crate::concat::lanes::Tap;
use crate::concat::prefix::Checkpoint;
use crate::digest::{ChunkDigests, ChunkHasher, CompositeMd5, Md5, Md5Hasher, Sha256};
use crate::direct_io;
use crate::geometry::ChunkIndex;
use crate::id::UploadId;
use crate::upload::{Assembly, ChunkRecord, NewUpload};

/// One message of a chunk body on its way to storage.
#[derive(Debug)]
pub enum Feed {
    Data(Block),
    /// The body is complete and valid as far as the sender can tell. Without it, a closed
    /// channel means the request failed, and the partial copy is deleted.
    End,
}

/// A block of body bytes, holding its share of the process's body-memory budget until it
/// is written and hashed (then dropped).
#[derive(Debug)]
pub struct Block {
    bytes: Bytes,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Block {
    pub fn new(bytes: Bytes, budget: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        Self {
            bytes,
            _budget: budget,
        }
    }

    /// The same bytes, holding no share of the budget.
    pub fn share(&self) -> Self {
        Self::new(self.bytes.clone(), None)
    }

    /// Gives the block's share of the budget back while it is kept for something else.
    pub fn release_budget(&mut self) {
        self._budget = None;
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A chunk copy under its final name: complete and durable, not yet counted.
#[derive(Clone, Debug)]
pub struct StagedChunk {
    pub path: PathBuf,
    pub token: String,
    pub digests: ChunkDigests,
}

/// What [`FsChunkStore::ensure_manifest`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ManifestCheck {
    /// This call wrote the manifest.
    Created,
    /// A manifest with the same geometry (and MD5, when both declare one) exists; it is the
    /// upload's (its creation time is the one to record).
    Matches(Box<NewUpload>),
    /// A manifest for a different upload shape exists.
    Conflicts(Box<NewUpload>),
}

/// The files of one merge attempt ([`FsChunkStore::attempt`]).
#[derive(Clone, Debug)]
pub struct AttemptFiles {
    /// A fresh temporary path to write the merged file to.
    pub temp: PathBuf,
    /// Where [`FsChunkStore::publish_merged`] renames it to.
    pub merged: PathBuf,
    /// The merged file relative to the root: what the completion records.
    pub location: String,
}

/// A file in an upload's chunk directory ([`FsChunkStore::copy_files_blocking`]).
#[derive(Clone, Debug)]
pub struct CopyFile {
    pub path: PathBuf,
    /// Its file name, for messages.
    pub name: String,
    /// The piece it is a complete copy of; `None` for a `.part` file or anything else.
    pub piece: Option<Piece>,
    pub len: u64,
}

/// An upload's assembly file and its newest usable checkpoint
/// ([`FsChunkStore::saved_prefix`]).
#[derive(Clone, Debug)]
pub struct SavedPrefix {
    pub path: PathBuf,
    pub checkpoint: Checkpoint,
}

/// A checkpoint [`FsChunkStore::save_prefix`] saved: the offset it names, and the file it
/// saved there ([`FsChunkStore::checkpoint_kept`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointFile {
    pub offset: u64,
    inode: u64,
}

/// What [`FsChunkStore::remove_surplus`] keeps of an upload's files.
#[derive(Clone, Copy, Debug)]
pub enum Keep<'a> {
    /// An upload receiving or merging, assembled as the first: the copies the state store
    /// counts (any other copy is surplus) and every merge attempt's files (a merge may be
    /// writing them).
    Counted(&'a Assembly, &'a [ChunkRecord]),
    /// A completed upload: the merged file and completion record of this completion. No
    /// copy is needed any more, nor any other attempt's files.
    Completed(&'a CompletionRecord),
}

/// Chunk files and manifests under one root directory. It alone knows the names of what it
/// stores (`storage/layout.rs`): callers speak of uploads, pieces and merge attempts.
#[derive(Clone, Debug)]
pub struct FsChunkStore {
    root: PathBuf,
    fsync: bool,
    direct_io: bool,
}

impl FsChunkStore {
    /// Chunk files are written with direct I/O where the file system allows it; see
    /// [`FsChunkStore::with_direct_io`].
    pub fn new(root: impl Into<PathBuf>, fsync: bool) -> Self {
        Self {
            root: root.into(),
            fsync,
            direct_io: true,
        }
    }

    /// Whether chunk files are written with `O_DIRECT` (`storage.direct_io`, see
    /// [`crate::direct_io`]) or through the page cache.
    pub fn with_direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of one upload. `id` is validated, so this is always a child of the root.
    pub fn upload_dir(&self, id: &UploadId) -> PathBuf {
        self.root.join(layout::upload_dir(id))
    }

    /// The directory of an upload's chunk copies.
    pub fn chunks_dir(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join(layout::CHUNKS)
    }

    /// The directory of an upload's copies of `piece`'s kind.
    fn pieces_dir(&self, id: &UploadId, piece: Piece) -> PathBuf {
        self.upload_dir(id).join(piece.dir())
    }

    pub fn manifest_path(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join(layout::MANIFEST)
    }

    /// The absolute path of a location relative to the root, as stored for completed files.
    /// `None` for anything that is not a plain relative path below the root.
    pub fn resolve(&self, location: &str) -> Option<PathBuf> {
        let relative = Path::new(location);
        let plain = relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        (plain && !location.is_empty()).then(|| self.root.join(relative))
    }

    /// Path of the copy of `piece` stored under `token` (a chunk: its index and the token
    /// its record holds).
    pub fn copy_path(&self, id: &UploadId, piece: impl Into<Piece>, token: &str) -> PathBuf {
        let piece = piece.into();
        self.pieces_dir(id, piece).join(piece.copy_name(token))
    }

    /// Streams one copy of `piece` from `feed` to a new `.part` file, hashing it on the way
    /// (CRC32C always, MD5 when `with_md5`), then fsyncs it and renames it to its final,
    /// unique name. If the feed closes without [`Feed::End`], or anything fails, the partial
    /// file is removed.
    ///
    /// The copy's token is a random part followed by the chunk's CRC32C (8 hex digits), so
    /// that storage alone tells what each complete copy holds when the state store must be
    /// rebuilt ([`FsChunkStore::inventory`]).
    ///
    /// With a `tap`, each block goes on to it once written (hashing in line,
    /// [`crate::concat::lanes`]), and the tap hears of the copy's token once it is durable.
    pub async fn stage_chunk(
        &self,
        id: &UploadId,
        piece: impl Into<Piece>,
        with_md5: bool,
        feed: mpsc::Receiver<Feed>,
        tap: Option<Tap>,
    ) -> Result<StagedChunk, StorageError> {
        let piece = piece.into();
        let random = new_token();
        let dir = self.pieces_dir(id, piece);
        let part = dir.join(piece.part_name(&random));
        let store = self.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            let mut tap = tap;
            let digests = write_copy(&dir, &part, with_md5, &store, feed, tap.as_mut(), |crc| {
                store.copy_path(&id, piece, &layout::copy_token(&random, crc))
            })?;
            let token = layout::copy_token(&random, digests.crc32c);
            if let Some(tap) = tap {
                tap.finish(&token);
            }
            Ok(StagedChunk {
                path: store.copy_path(&id, piece, &token),
                token,
                digests,
            })
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("chunk writer failed: {e}")))?
    }

    /// Records the length of an upload created without one (tus `Upload-Defer-Length`),
    /// durably, before the state store hears of it: the first length written is the
    /// upload's; a different one later is refused ([`StorageError::Corrupt`] never: a
    /// conflict is `Ok(Some(existing))`). `Ok(None)`: this length is the one recorded.
    pub async fn record_length(
        &self,
        id: &UploadId,
        length: u64,
    ) -> Result<Option<u64>, StorageError> {
        let dir = self.upload_dir(id);
        let fsync = self.fsync;
        blocking(move || {
            let path = dir.join(layout::LENGTH);
            if let Some(existing) = read_length(&path)? {
                return Ok((existing != length).then_some(existing));
            }
            let tmp = dir.join(layout::manifest_temp_name(&new_token()));
            let result = (|| {
                let mut file =
                    File::create(&tmp).map_err(|e| StorageError::from_io("creating length", e))?;
                file.write_all(length.to_string().as_bytes())
                    .map_err(|e| StorageError::from_io("writing length", e))?;
                if fsync {
                    file.sync_all()
                        .map_err(|e| StorageError::from_io("syncing length", e))?;
                }
                match std::fs::hard_link(&tmp, &path) {
                    Ok(()) => {
                        if fsync {
                            sync_dir(&dir)?;
                        }
                        Ok(None)
                    }
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        let existing = read_length(&path)?.unwrap_or(length);
                        Ok((existing != length).then_some(existing))
                    }
                    Err(e) => Err(StorageError::from_io("publishing length", e)),
                }
            })();
            let _ = std::fs::remove_file(&tmp);
            result
        })
        .await
    }

    /// Removes a staged copy that did not get counted.
    pub async fn discard(&self, staged: &StagedChunk) {
        let path = staged.path.clone();
        let result = tokio::task::spawn_blocking(move || std::fs::remove_file(&path)).await;
        if let Ok(Err(e)) = result
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!(path = %staged.path.display(), error = %e, "could not remove a surplus chunk copy");
        }
    }

    /// Writes the upload's manifest unless one exists; the first writer wins (a hard link
    /// refuses to replace, also on NFS), later ones compare against it.
    pub async fn ensure_manifest(&self, upload: &NewUpload) -> Result<ManifestCheck, StorageError> {
        let dir = self.upload_dir(&upload.id);
        let path = self.manifest_path(&upload.id);
        let upload = upload.clone();
        let fsync = self.fsync;
        tokio::task::spawn_blocking(move || write_manifest(&dir, &path, &upload, fsync))
            .await
            .map_err(|e| StorageError::Unavailable(format!("manifest writer failed: {e}")))?
    }

    /// Reads an upload's manifest, if it has one.
    pub async fn read_manifest(&self, id: &UploadId) -> Result<Option<NewUpload>, StorageError> {
        let path = self.manifest_path(id);
        tokio::task::spawn_blocking(move || read_manifest(&path))
            .await
            .map_err(|e| StorageError::Unavailable(format!("manifest reader failed: {e}")))?
    }

    /// Removes everything stored for an upload. Missing is fine. The manifest goes first, so
    /// that a removal cut short leaves nothing a rebuild could bring back.
    pub async fn remove_upload(&self, id: &UploadId) -> Result<(), StorageError> {
        let dir = self.upload_dir(id);
        let manifest = self.manifest_path(id);
        blocking(move || {
            gone(std::fs::remove_file(&manifest))?;
            // A merge finishing at the same moment removes files of the same directory: a
            // removal that met such a race is tried again before it counts as a failure.
            let mut tries = 0;
            loop {
                match gone(std::fs::remove_dir_all(&dir)) {
                    Err(_) if tries < 3 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    done => return done,
                }
            }
        })
        .await
    }

    /// Removes an upload's manifest only, so that nothing can rebuild the upload while the
    /// rest of its removal follows. Missing is fine.
    pub async fn remove_manifest(&self, id: &UploadId) -> Result<(), StorageError> {
        let manifest = self.manifest_path(id);
        blocking(move || gone(std::fs::remove_file(&manifest))).await
    }

    /// Whether nothing in the upload's directory (the directory itself included) changed
    /// for `grace`: no request or merge is using it.
    pub async fn untouched_for(
        &self,
        id: &UploadId,
        grace: Duration,
    ) -> Result<bool, StorageError> {
        let dir = self.upload_dir(id);
        blocking(move || {
            all_older_than(&dir, grace)
                .map_err(|e| StorageError::from_io("reading an upload's directory", e))
        })
        .await
    }

    /// Removes what an upload no longer needs, as `keep` says, among the files older than
    /// `grace` (anything younger may be in use: a copy between its rename and its record, a
    /// merge being written). The manifest is never removed. Returns how many files went.
    pub async fn remove_surplus(
        &self,
        id: &UploadId,
        keep: Keep<'_>,
        grace: Duration,
    ) -> Result<usize, StorageError> {
        let chunks = self.chunks_dir(id);
        let dir = self.upload_dir(id);
        let removed = match keep {
            Keep::Counted(assembly, records) => {
                let counted: Vec<String> = records
                    .iter()
                    .map(|c| Piece::of(assembly, c).copy_name(&c.token))
                    .collect();
                blocking(move || {
                    remove_old_files(&chunks, grace, |name| !counted.iter().any(|c| c == name))
                })
                .await?
            }
            Keep::Completed(done) => {
                let merged = layout::location_name(&done.location).map(str::to_owned);
                let record = layout::completion_name(done.fence);
                blocking(move || {
                    let mut n = remove_old_files(&chunks, grace, |_| true)?;
                    n += remove_old_files(&dir, grace, |name| {
                        (AttemptFile::parse(name).is_some() || PrefixFile::parse(name).is_some())
                            && Some(name) != merged.as_deref()
                            && name != record
                    })?;
                    Ok(n)
                })
                .await?
            }
        };
        Ok(removed)
    }

    /// After a merge committed: removes every copy and every attempt's merged or temporary
    /// file but the one at `keep` (the committed file's location). Completion records stay
    /// for the janitor, which keeps the committed one. Only a failure to remove the copies is
    /// reported.
    pub async fn remove_merge_leftovers(
        &self,
        id: &UploadId,
        keep: Option<&str>,
    ) -> Result<(), StorageError> {
        let chunks = self.chunks_dir(id);
        let dir = self.upload_dir(id);
        let keep = keep.and_then(layout::location_name).map(str::to_owned);
        blocking(move || {
            std::fs::remove_dir_all(&chunks)
                .or_else(|e| not_found_is_fine(e, "removing chunk copies"))?;
            for entry in read_dir_or_empty(&dir)? {
                let name = entry.file_name().to_string_lossy().into_owned();
                let leftover = matches!(
                    AttemptFile::parse(&name),
                    Some(AttemptFile::Merged(_) | AttemptFile::MergeTemp(_))
                ) || PrefixFile::parse(&name).is_some();
                if leftover && Some(name.as_str()) != keep.as_deref() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            Ok(())
        })
        .await
    }

    /// The newest checkpoint of the upload's early assembly whose assembly file is there
    /// and holds at least the bytes it covers; `None` if there is none. Whether it fits the
    /// counted chunks is the caller's to check ([`Checkpoint::fits`]).
    pub async fn saved_prefix(&self, id: &UploadId) -> Result<Option<SavedPrefix>, StorageError> {
        let dir = self.upload_dir(id);
        blocking(move || {
            let mut offsets: Vec<u64> = read_dir_or_empty(&dir)?
                .iter()
                .filter_map(
                    |e| match PrefixFile::parse(&e.file_name().to_string_lossy()) {
                        Some(PrefixFile::Checkpoint(offset)) => Some(offset),
                        _ => None,
                    },
                )
                .collect();
            offsets.sort_unstable_by(|a, b| b.cmp(a));
            for offset in offsets {
                let Ok(body) = std::fs::read(dir.join(layout::checkpoint_name(offset))) else {
                    continue;
                };
                let Ok(checkpoint) = serde_json::from_slice::<Checkpoint>(&body) else {
                    continue;
                };
                if checkpoint.hashes.offset != offset
                    || PrefixFile::parse(&checkpoint.assembly) != Some(PrefixFile::Assembly)
                {
                    continue;
                }
                let path = dir.join(&checkpoint.assembly);
                if std::fs::metadata(&path).is_ok_and(|m| m.len() >= offset) {
                    return Ok(Some(SavedPrefix { path, checkpoint }));
                }
            }
            Ok(None)
        })
        .await
    }

    /// A fresh name for an upload's assembly file, and its path (not created).
    pub fn new_assembly(&self, id: &UploadId) -> (String, PathBuf) {
        let name = layout::assembly_name(&new_token());
        let path = self.upload_dir(id).join(&name);
        (name, path)
    }

    /// Whether the checkpoint an assembly step saved ([`Self::save_prefix`]) is still on
    /// storage, the very file: no step has replaced it since (another process's, at the
    /// same offset or past it), and nothing removed it. One `stat`, whatever the upload's
    /// size.
    pub async fn checkpoint_kept(&self, id: &UploadId, saved: &CheckpointFile) -> bool {
        let path = self
            .upload_dir(id)
            .join(layout::checkpoint_name(saved.offset));
        tokio::fs::metadata(path)
            .await
            .is_ok_and(|m| m.ino() == saved.inode)
    }

    /// Saves a checkpoint of the upload's early assembly durably (its assembly file must be
    /// synced up to it already), then removes the older ones: the one at `replaces` (the
    /// step's own start, one `unlink`), or, when the step did not start from one it saved
    /// itself (`None`), every older one in the upload's directory.
    pub async fn save_prefix(
        &self,
        id: &UploadId,
        checkpoint: &Checkpoint,
        replaces: Option<u64>,
    ) -> Result<CheckpointFile, StorageError> {
        let dir = self.upload_dir(id);
        let checkpoint = checkpoint.clone();
        let fsync = self.fsync;
        blocking(move || {
            let offset = checkpoint.hashes.offset;
            let body = serde_json::to_vec(&checkpoint)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            let tmp = dir.join(layout::checkpoint_temp_name(offset, &new_token()));
            let result = (|| {
                let mut file = File::create(&tmp)
                    .map_err(|e| StorageError::from_io("creating a checkpoint", e))?;
                let inode = file
                    .metadata()
                    .map_err(|e| StorageError::from_io("creating a checkpoint", e))?
                    .ino();
                file.write_all(&body)
                    .map_err(|e| StorageError::from_io("writing a checkpoint", e))?;
                if fsync {
                    file.sync_all()
                        .map_err(|e| StorageError::from_io("syncing a checkpoint", e))?;
                }
                std::fs::rename(&tmp, dir.join(layout::checkpoint_name(offset)))
                    .map_err(|e| StorageError::from_io("publishing a checkpoint", e))?;
                if fsync {
                    sync_dir(&dir)?;
                }
                Ok(CheckpointFile { offset, inode })
            })();
            let _ = std::fs::remove_file(&tmp);
            let saved = result?;
            if let Some(older) = replaces.filter(|&o| o < offset) {
                let _ = std::fs::remove_file(dir.join(layout::checkpoint_name(older)));
                return Ok(saved);
            }
            for entry in read_dir_or_empty(&dir)? {
                if let Some(PrefixFile::Checkpoint(older)) =
                    PrefixFile::parse(&entry.file_name().to_string_lossy())
                    && older < offset
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            Ok(saved)
        })
        .await
    }

    /// The file a merge attempt takes over from the early assembly, under the attempt's
    /// names: it writes the rest into `path` and publishes it as its merged file.
    pub fn attempt_from(&self, id: &UploadId, fence: u64, prefix: &SavedPrefix) -> AttemptFiles {
        AttemptFiles {
            temp: prefix.path.clone(),
            ..self.attempt(id, fence)
        }
    }

    /// Checks that the root accepts a write (readiness).
    pub async fn probe(&self) -> Result<(), StorageError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(root.join(layout::UPLOADS))
                .map_err(|e| StorageError::from_io("creating the storage root", e))?;
            let probe = root.join(format!(".probe-{}", new_token()));
            std::fs::write(&probe, b"ok").map_err(|e| StorageError::from_io("probe write", e))?;
            std::fs::remove_file(&probe).map_err(|e| StorageError::from_io("probe remove", e))
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("probe failed: {e}")))?
    }

    /// The files of merge attempt `fence`: a fresh temporary path to write the merged file
    /// to, the path it is published at, and that path as the completion's location. Every
    /// attempt has its own, so a stale attempt never touches another's file.
    pub fn attempt(&self, id: &UploadId, fence: u64) -> AttemptFiles {
        let dir = self.upload_dir(id);
        let merged = layout::merged_name(fence);
        AttemptFiles {
            temp: dir.join(layout::merge_temp_name(fence, &new_token())),
            merged: dir.join(&merged),
            location: layout::location(id, &merged),
        }
    }

    /// Where merge attempt `fence` writes its completion record
    /// ([`FsChunkStore::write_completion`]), for tools that inspect storage (tests).
    pub fn completion_path(&self, id: &UploadId, fence: u64) -> PathBuf {
        self.upload_dir(id).join(layout::completion_name(fence))
    }

    /// Publishes an attempt's merged file: renames its temporary file to its final name
    /// (atomically) and, with fsync on, makes the rename durable. On failure the temporary
    /// file is removed.
    pub async fn publish_merged(&self, files: &AttemptFiles) -> Result<(), StorageError> {
        let (temp, merged) = (files.temp.clone(), files.merged.clone());
        let fsync = self.fsync;
        blocking(move || {
            let published = std::fs::rename(&temp, &merged)
                .map_err(|e| StorageError::from_io("publishing the merged file", e))
                .and_then(|()| match merged.parent() {
                    Some(dir) if fsync => sync_dir(dir),
                    _ => Ok(()),
                });
            if published.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            published
        })
        .await
    }

    /// Removes an attempt's temporary file (an attempt that stops before publishing).
    pub async fn discard_temp(&self, files: &AttemptFiles) {
        let temp = files.temp.clone();
        let _ = blocking(move || gone(std::fs::remove_file(&temp))).await;
    }

    /// Writes a merge attempt's completion record (`completion.<fence>.json`) durably: the
    /// merged file is renamed into place first, this is written second, the state store's
    /// commit comes third. With the manifest, it is what a rebuild of a completed upload's
    /// state reads ([`FsChunkStore::inventory`]).
    pub async fn write_completion(
        &self,
        id: &UploadId,
        record: &CompletionRecord,
    ) -> Result<(), StorageError> {
        let dir = self.upload_dir(id);
        let record = record.clone();
        let fsync = self.fsync;
        blocking(move || {
            let body = serde_json::to_vec_pretty(&CompletionFile::V1(record.clone()))
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            let tmp = dir.join(layout::completion_temp_name(record.fence, &new_token()));
            let path = dir.join(layout::completion_name(record.fence));
            let result = (|| {
                let mut file = File::create(&tmp)
                    .map_err(|e| StorageError::from_io("creating completion record", e))?;
                file.write_all(&body)
                    .map_err(|e| StorageError::from_io("writing completion record", e))?;
                if fsync {
                    file.sync_all()
                        .map_err(|e| StorageError::from_io("syncing completion record", e))?;
                }
                std::fs::rename(&tmp, &path)
                    .map_err(|e| StorageError::from_io("publishing completion record", e))?;
                if fsync {
                    sync_dir(&dir)?;
                }
                Ok(())
            })();
            let _ = std::fs::remove_file(&tmp);
            result
        })
        .await
    }

    /// Removes a merge attempt's completion record and file (an attempt that was fenced out
    /// or found the upload completed by another). Missing is fine.
    pub async fn discard_attempt(&self, id: &UploadId, fence: u64) {
        let dir = self.upload_dir(id);
        let _ = blocking(move || {
            let _ = std::fs::remove_file(dir.join(layout::completion_name(fence)));
            let _ = std::fs::remove_file(dir.join(layout::merged_name(fence)));
            Ok(())
        })
        .await;
    }

    /// Everything storage knows of an upload, enough to rebuild its state (invariant 9):
    /// the manifest; one complete copy per chunk index (the oldest, when several exist) with
    /// the CRC32C its name carries; the newest completion record whose merged file is there
    /// with its size; the highest fencing token any attempt left; and the newest modification
    /// time in its directory (its last activity). `None` when there is no manifest.
    pub async fn inventory(&self, id: &UploadId) -> Result<Option<Inventory>, StorageError> {
        let store = self.clone();
        let id = id.clone();
        blocking(move || store.inventory_blocking(&id)).await
    }

    fn inventory_blocking(&self, id: &UploadId) -> Result<Option<Inventory>, StorageError> {
        let Some(upload) = read_manifest(&self.manifest_path(id))? else {
            return Ok(None);
        };
        let dir = self.upload_dir(id);
        let mut inventory = Inventory {
            upload,
            chunks: Vec::new(),
            completion: None,
            highest_fence: 0,
            last_activity_ms: modified_ms(&dir).unwrap_or(0),
        };
        let mut completions = Vec::new();
        for entry in read_dir_or_empty(&dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ms) = entry
                .metadata()
                .ok()
                .and_then(|m| system_ms(m.modified().ok()?))
            {
                inventory.last_activity_ms = inventory.last_activity_ms.max(ms);
            }
            let attempt = AttemptFile::parse(&name);
            if let Some(file) = attempt {
                inventory.highest_fence = inventory.highest_fence.max(file.fence());
            }
            if let Some(AttemptFile::Completion(fence)) = attempt {
                completions.push(fence);
            }
        }
        completions.sort_unstable_by(|a, b| b.cmp(a));
        for fence in completions {
            let record = match std::fs::read(dir.join(layout::completion_name(fence))) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(CompletionFile::V1(record)) => record,
                    Err(_) => continue,
                },
                Err(_) => continue,
            };
            let merged = self
                .resolve(&record.location)
                .and_then(|p| std::fs::metadata(p).ok());
            if merged.is_some_and(|m| m.len() == record.size) {
                inventory.completion = Some(record);
                break;
            }
        }
        if inventory.upload.geometry.is_deferred()
            && let Some(length) = read_length(&dir.join(layout::LENGTH))?
        {
            inventory.upload.geometry = crate::geometry::Geometry::new(length, length)
                .map_err(|e| StorageError::Corrupt(format!("{}: {e}", dir.display())))?;
        }
        let copies = self.complete_copies(id, &mut inventory.last_activity_ms)?;
        inventory.chunks = match &inventory.upload.assembly {
            Assembly::Chunks => chunks_of(&inventory.upload.geometry, copies),
            Assembly::Segments { .. } => {
                // A length still open bounds nothing.
                let g = inventory.upload.geometry;
                let size = if g.is_deferred() {
                    u64::MAX
                } else {
                    g.total_size
                };
                segment_chain(size, copies)
            }
            // A concatenation has no parts of its own.
            Assembly::Concat { .. } => Vec::new(),
        };
        Ok(Some(inventory))
    }

    /// Every complete copy in an upload's chunk directory, with its length, CRC32C and
    /// modification time; `last_activity_ms` moves to the newest file's time.
    fn complete_copies(
        &self,
        id: &UploadId,
        last_activity_ms: &mut u64,
    ) -> Result<Vec<StoredCopy>, StorageError> {
        let mut copies = Vec::new();
        for entry in read_dir_or_empty(&self.chunks_dir(id))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            let ms = meta.modified().ok().and_then(system_ms).unwrap_or(0);
            *last_activity_ms = (*last_activity_ms).max(ms);
            let CopyEntry::Copy { piece, token } = layout::copy_entry(&name) else {
                continue; // A `.part` file, or nothing of ours.
            };
            let crc32c = match layout::token_crc(token) {
                Some(crc) => crc,
                None => crc_of_file(&entry.path())?,
            };
            copies.push(StoredCopy {
                piece,
                token: token.to_owned(),
                len: meta.len(),
                crc32c,
                modified_ms: ms,
            });
        }
        Ok(copies)
    }

    /// Every file in an upload's chunk directory, with the piece it is a complete copy of
    /// (`None`: a `.part` file or anything else), for tools that inspect storage (benchmarks).
    /// Blocking.
    pub fn copy_files_blocking(&self, id: &UploadId) -> Result<Vec<CopyFile>, StorageError> {
        read_dir_or_empty(&self.chunks_dir(id))?
            .into_iter()
            .map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let len = entry
                    .metadata()
                    .map_err(|e| StorageError::from_io("reading a chunk copy", e))?
                    .len();
                let piece = match layout::copy_entry(&name) {
                    CopyEntry::Copy { piece, .. } => Some(piece),
                    CopyEntry::Other => None,
                };
                Ok(CopyFile {
                    path: entry.path(),
                    name,
                    piece,
                    len,
                })
            })
            .collect()
    }

    /// The merged files (`file.<fence>`) in an upload's directory, for tools that inspect
    /// storage (benchmarks). Blocking.
    pub fn merged_files_blocking(&self, id: &UploadId) -> Result<Vec<PathBuf>, StorageError> {
        Ok(read_dir_or_empty(&self.upload_dir(id))?
            .into_iter()
            .filter(|entry| {
                let name = entry.file_name();
                matches!(
                    AttemptFile::parse(&name.to_string_lossy()),
                    Some(AttemptFile::Merged(_))
                )
            })
            .map(|entry| entry.path())
            .collect())
    }

    /// `tenant`'s uploads that have a manifest, with their creation times, newest first (by
    /// creation time, then key). Reads every manifest of the tenant: for a page of recent
    /// uploads, not for an index of millions.
    pub async fn uploads_of(
        &self,
        tenant: &crate::id::Tenant,
    ) -> Result<Vec<(u64, UploadId)>, StorageError> {
        let store = self.clone();
        let tenant = tenant.clone();
        let ids = self.upload_ids().await?;
        blocking(move || {
            let mut found: Vec<(u64, UploadId)> = ids
                .into_iter()
                .filter(|id| id.tenant() == tenant)
                .filter_map(|id| {
                    let manifest = read_manifest(&store.manifest_path(&id)).ok()??;
                    Some((manifest.created_at_ms, id))
                })
                .collect();
            found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.as_str().cmp(a.1.as_str())));
            Ok(found)
        })
        .await
    }

    /// The ids of every upload directory under the root (anything else is not ours).
    pub async fn upload_ids(&self) -> Result<Vec<UploadId>, StorageError> {
        let uploads = self.root.join(layout::UPLOADS);
        blocking(move || {
            Ok(read_dir_or_empty(&uploads)?
                .into_iter()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| UploadId::from_key(&e.file_name().to_string_lossy()).ok())
                .collect())
        })
        .await
    }
}

/// What a merge attempt left on storage before its commit: the completion as the state store
/// records it, and the attempt's fencing token.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompletionRecord {
    pub fence: u64,
    pub size: u64,
    pub md5: Md5,
    /// Whole-file CRC32C; absent from records written before Stitch computed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Sha256>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composite_md5: Option<CompositeMd5>,
    /// The merged file, relative to the storage root.
    pub location: String,
    pub completed_at_ms: u64,
    /// The `upload.completed` event's id.
    pub event_id: String,
}

impl CompletionRecord {
    /// The record of `completion`, committed under `fence`.
    pub fn new(fence: u64, completion: &crate::upload::Completion) -> Self {
        Self {
            fence,
            size: completion.size,
            md5: completion.md5,
            crc32c: completion.crc32c,
            sha256: completion.sha256,
            composite_md5: completion.composite_md5,
            location: completion.location.clone(),
            completed_at_ms: completion.completed_at_ms,
            event_id: completion.event_id.clone(),
        }
    }

    /// The completion as the state store records it (what a rebuild restores).
    pub fn into_completion(self) -> crate::upload::Completion {
        crate::upload::Completion {
            size: self.size,
            md5: self.md5,
            crc32c: self.crc32c,
            sha256: self.sha256,
            composite_md5: self.composite_md5,
            location: self.location,
            completed_at_ms: self.completed_at_ms,
            event_id: self.event_id,
        }
    }
}

/// The record's on-disk form, versioned like the manifest. Version 1 gained the optional
/// whole-file digests (`crc32c`, `sha256`, `composite_md5`) additively: older records read
/// with them absent.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "completion_version")]
enum CompletionFile {
    #[serde(rename = "1")]
    V1(CompletionRecord),
}

/// An upload as storage knows it ([`FsChunkStore::inventory`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub upload: NewUpload,
    /// One complete copy per stored index, ascending.
    pub chunks: Vec<ChunkRecord>,
    pub completion: Option<CompletionRecord>,
    /// The highest fencing token of any attempt's file or record (0: none).
    pub highest_fence: u64,
    /// The newest modification time under the upload's directory (ms since the epoch).
    pub last_activity_ms: u64,
}

fn crc_of_file(path: &Path) -> Result<u32, StorageError> {
    let mut file = File::open(path).map_err(|e| StorageError::from_io("reading a chunk", e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0u32;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)
            .map_err(|e| StorageError::from_io("reading a chunk", e))?;
        if n == 0 {
            return Ok(crc);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}

/// Maps a removal's result: missing is fine.
fn gone(result: std::io::Result<()>) -> Result<(), StorageError> {
    result.or_else(|e| not_found_is_fine(e, "removing an upload's files"))
}

fn not_found_is_fine(e: std::io::Error, context: &str) -> Result<(), StorageError> {
    if e.kind() == ErrorKind::NotFound {
        Ok(())
    } else {
        Err(StorageError::from_io(context, e))
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

/// Removes the files of `dir` that `doomed` selects and that are older than `grace`; never
/// the manifest.
fn remove_old_files(
    dir: &Path,
    grace: Duration,
    doomed: impl Fn(&str) -> bool,
) -> Result<usize, StorageError> {
    let mut removed = 0;
    for entry in read_dir_or_empty(dir)? {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_file() && name != layout::MANIFEST && doomed(&name) && older_than(&path, grace) {
            std::fs::remove_file(&path)
                .map_err(|e| StorageError::from_io("removing a leftover file", e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A complete copy found on storage ([`FsChunkStore::inventory`]).
struct StoredCopy {
    piece: Piece,
    token: String,
    len: u64,
    crc32c: u32,
    modified_ms: u64,
}

/// The chunks of an upload of chunks: per index, the oldest copy of the length the geometry
/// gives it.
fn chunks_of(geometry: &crate::geometry::Geometry, copies: Vec<StoredCopy>) -> Vec<ChunkRecord> {
    let mut oldest: std::collections::BTreeMap<u64, StoredCopy> = Default::default();
    for copy in copies {
        let Piece::Chunk(index) = copy.piece else {
            continue;
        };
        if index.0 >= geometry.total_chunks || copy.len != geometry.chunk_len(index) {
            continue;
        }
        if oldest
            .get(&index.0)
            .is_none_or(|o| copy.modified_ms < o.modified_ms)
        {
            oldest.insert(index.0, copy);
        }
    }
    oldest
        .into_iter()
        .map(|(index, copy)| ChunkRecord {
            index: ChunkIndex(index),
            offset: geometry.chunk_start(ChunkIndex(index)),
            len: copy.len,
            crc32c: copy.crc32c,
            md5: None,
            token: copy.token,
        })
        .collect()
}

/// The segments of an upload of segments: the chain of copies from offset 0, each starting
/// where the one before ends, that reaches furthest into the upload's `size` bytes. Any
/// such chain holds the same bytes (a client sends the same file at the same offset), so
/// the longest one is everything storage received in order; a copy off the chain (left by
/// a request that died between its rename and its record and was resent differently cut)
/// is surplus.
fn segment_chain(size: u64, copies: Vec<StoredCopy>) -> Vec<ChunkRecord> {
    use std::collections::BTreeMap;
    let mut at: BTreeMap<u64, Vec<StoredCopy>> = BTreeMap::new();
    for copy in copies {
        if let Piece::Segment(offset) = copy.piece
            && copy.len > 0
            && offset.checked_add(copy.len).is_some_and(|end| end <= size)
        {
            at.entry(offset).or_default().push(copy);
        }
    }
    // For each reachable end: how it is reached (the copy's offset and its place there).
    let mut reached: BTreeMap<u64, Option<(u64, usize)>> = BTreeMap::from([(0, None)]);
    for (offset, copies) in at.iter_mut() {
        if !reached.contains_key(offset) {
            continue;
        }
        copies.sort_by_key(|c| c.modified_ms);
        for (i, copy) in copies.iter().enumerate() {
            reached
                .entry(offset + copy.len)
                .or_insert(Some((*offset, i)));
        }
    }
    let mut end = reached.keys().next_back().copied().unwrap_or(0);
    let mut chain = Vec::new();
    while let Some(Some((offset, i))) = reached.get(&end) {
        chain.push((*offset, *i));
        end = *offset;
    }
    chain.reverse();
    chain
        .into_iter()
        .enumerate()
        .map(|(index, (offset, i))| {
            let copy = &at[&offset][i];
            ChunkRecord {
                index: ChunkIndex(index as u64),
                offset,
                len: copy.len,
                crc32c: copy.crc32c,
                md5: None,
                token: copy.token.clone(),
            }
        })
        .collect()
}

fn read_dir_or_empty(dir: &Path) -> Result<Vec<std::fs::DirEntry>, StorageError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StorageError::from_io("listing a directory", e)),
    }
}

fn system_ms(time: std::time::SystemTime) -> Option<u64> {
    time.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

fn modified_ms(path: &Path) -> Option<u64> {
    system_ms(std::fs::metadata(path).ok()?.modified().ok()?)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Unavailable(format!("storage thread failed: {e}")))?
}

/// A random 64-bit token in hex: unique per copy, short enough to store per chunk.
fn new_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Writes the feed to `part`, then renames it to `final_path(crc32c)`.
fn write_copy(
    dir: &Path,
    part: &Path,
    with_md5: bool,
    store: &FsChunkStore,
    mut feed: mpsc::Receiver<Feed>,
    mut tap: Option<&mut Tap>,
    final_path: impl FnOnce(u32) -> PathBuf,
) -> Result<ChunkDigests, StorageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StorageError::from_io("creating chunk directory", e))?;
    let part = part.to_owned();
    let fsync = store.fsync;
    let mut file = ChunkFile::create(&part, store.direct_io, fsync)
        .map_err(|e| StorageError::from_io("creating chunk file", e))?;
    // MD5 (a full core at ~500 MB/s) runs on its own thread, fed the same blocks, so that one
    // stream's write and hash overlap instead of adding up; CRC32C is cheap enough to stay
    // beside the write.
    let result = std::thread::scope(|scope| {
        // The block goes on to the hash thread after it is written, so each block is
        // buffered once, wherever it is.
        let (md5_tx, md5_rx) = std::sync::mpsc::sync_channel::<Block>(1);
        let md5_thread = with_md5.then(|| {
            scope.spawn(move || {
                let mut md5 = Md5Hasher::new();
                for block in md5_rx {
                    md5.update(&block);
                }
                md5.finalize()
            })
        });
        let mut crc = ChunkHasher::new(false);
        let written = (|| {
            loop {
                match feed.blocking_recv() {
                    Some(Feed::Data(block)) => {
                        crc.update(&block);
                        file.write(&block)
                            .map_err(|e| StorageError::from_io("writing chunk", e))?;
                        match (with_md5, tap.as_deref_mut()) {
                            (true, tap) => {
                                if let Some(tap) = tap {
                                    tap.push(block.share());
                                }
                                // Only fails if the hash thread died, which join reports.
                                let _ = md5_tx.send(block);
                            }
                            (false, Some(tap)) => tap.push(block),
                            (false, None) => {}
                        }
                    }
                    Some(Feed::End) => {
                        if let Some(tap) = tap.as_deref_mut() {
                            tap.fed_all();
                        }
                        break;
                    }
                    None => return Err(StorageError::Interrupted),
                }
            }
            file.finish()?;
            Ok(())
        })();
        drop(md5_tx);
        let md5 = match md5_thread.map(|t| t.join()) {
            Some(Ok(digest)) => Some(digest),
            Some(Err(_)) => return Err(StorageError::Unavailable("the hash thread failed".into())),
            None => None,
        };
        written?;
        let digests = ChunkDigests {
            md5,
            ..crc.finish()
        };
        std::fs::rename(&part, final_path(digests.crc32c))
            .map_err(|e| StorageError::from_io("renaming chunk", e))?;
        if fsync {
            sync_dir(dir)?;
        }
        Ok(digests)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// A chunk file being written: through the page cache, or with `O_DIRECT` in whole
/// [`direct_io::BLOCK`]s from an aligned buffer, the last one padded to [`direct_io::ALIGN`]
/// and the file then cut back to its length. Public so that the benchmarks' bare sink
/// writes its files the way Stitch writes a chunk's copy.
pub struct ChunkFile {
    file: File,
    fsync: bool,
    direct: Option<DirectBuffer>,
    writeback: Writeback,
}

/// Direct I/O: the block being filled, how much of it is, and the file offset it goes to.
struct DirectBuffer {
    block: direct_io::AlignedBlock,
    filled: usize,
    offset: u64,
}

impl ChunkFile {
    /// Creates `part` (it must not exist), for direct I/O when `direct` and the file system
    /// allows it.
    pub fn create(part: &Path, direct: bool, fsync: bool) -> std::io::Result<Self> {
        let new = || OpenOptions::new().write(true).create_new(true).clone();
        let chunk_file = |file, direct| Self {
            file,
            fsync,
            direct,
            writeback: Writeback::default(),
        };
        if direct {
            match new().custom_flags(libc::O_DIRECT).open(part) {
                Ok(file) => {
                    let buffer = DirectBuffer {
                        block: direct_io::AlignedBlock::new(direct_io::BLOCK),
                        filled: 0,
                        offset: 0,
                    };
                    return Ok(chunk_file(file, Some(buffer)));
                }
                Err(e) if direct_io::refused(&e) => {
                    // The file may have been created before the flag was refused; the name
                    // is this copy's own.
                    let _ = std::fs::remove_file(part);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(chunk_file(new().open(part)?, None))
    }

    /// Appends `data`.
    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        let Some(DirectBuffer {
            block,
            filled,
            offset,
        }) = &mut self.direct
        else {
            self.file.write_all(data)?;
            if self.fsync {
                self.writeback.wrote(&self.file, data.len() as u64);
            }
            return Ok(());
        };
        while !data.is_empty() {
            let n = data.len().min(block.len() - *filled);
            block.bytes_mut()[*filled..*filled + n].copy_from_slice(&data[..n]);
            *filled += n;
            data = &data[n..];
            if *filled == block.len() {
                self.file.write_all_at(block.bytes(), *offset)?;
                *offset += block.len() as u64;
                *filled = 0;
            }
        }
        Ok(())
    }

    /// Writes what is buffered and makes the file durable (when `fsync`).
    pub fn finish(&mut self) -> Result<(), StorageError> {
        if let Some(DirectBuffer {
            block,
            filled,
            offset,
        }) = &mut self.direct
            && *filled > 0
        {
            let padded = filled.next_multiple_of(direct_io::ALIGN);
            block.bytes_mut()[*filled..padded].fill(0);
            self.file
                .write_all_at(&block.bytes()[..padded], *offset)
                .map_err(|e| StorageError::from_io("writing chunk", e))?;
            self.file
                .set_len(*offset + *filled as u64)
                .map_err(|e| StorageError::from_io("writing chunk", e))?;
        }
        if self.fsync {
            self.file
                .sync_data()
                .map_err(|e| StorageError::from_io("syncing chunk", e))?;
        }
        Ok(())
    }
}

/// Starts the disk writing a chunk's data while the rest of it still arrives, so that the
/// fsync at its end finds little left to do (measured: one client without MD5 went from about
/// 320 to 510 MB/s here, with less time in iowait). Linux only; elsewhere the final fsync does
/// all the work.
#[derive(Default)]
struct Writeback {
    written: u64,
    started: u64,
}

/// Bytes written between two writeback kicks.
const WRITEBACK_EVERY: u64 = 1 << 20;

impl Writeback {
    fn wrote(&mut self, file: &File, len: u64) {
        self.written += len;
        if self.written - self.started >= WRITEBACK_EVERY {
            start_writeback(file, self.started, self.written - self.started);
            self.started = self.written;
        }
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) only reads its integer arguments; the descriptor is valid for
    // the borrow of `file`. SYNC_FILE_RANGE_WRITE starts writeback without waiting for it.
    // A failure is harmless: the fsync that follows makes the data durable either way.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::from_io("syncing directory", e))
}

fn write_manifest(
    dir: &Path,
    path: &Path,
    upload: &NewUpload,
    fsync: bool,
) -> Result<ManifestCheck, StorageError> {
    if let Some(existing) = read_manifest(path)? {
        return Ok(compare_manifest(existing, upload));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StorageError::from_io("creating upload directory", e))?;
    let tmp = dir.join(layout::manifest_temp_name(&new_token()));
    let body = serde_json::to_vec_pretty(&ManifestFile::V1(upload.clone()))
        .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    let result = (|| {
        let mut file =
            File::create(&tmp).map_err(|e| StorageError::from_io("creating manifest", e))?;
        file.write_all(&body)
            .map_err(|e| StorageError::from_io("writing manifest", e))?;
        if fsync {
            file.sync_all()
                .map_err(|e| StorageError::from_io("syncing manifest", e))?;
        }
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {
                if fsync {
                    sync_dir(dir)?;
                }
                Ok(ManifestCheck::Created)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let existing = read_manifest(path)?
                    .ok_or_else(|| StorageError::Corrupt("manifest vanished".into()))?;
                Ok(compare_manifest(existing, upload))
            }
            Err(e) => Err(StorageError::from_io("publishing manifest", e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

fn compare_manifest(existing: NewUpload, upload: &NewUpload) -> ManifestCheck {
    let md5_agrees = match (existing.file_md5, upload.file_md5) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    if existing.geometry == upload.geometry && md5_agrees {
        ManifestCheck::Matches(Box::new(existing))
    } else {
        ManifestCheck::Conflicts(Box::new(existing))
    }
}

/// The manifest's on-disk form, versioned so that a later Stitch can read older ones.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "manifest_version")]
enum ManifestFile {
    #[serde(rename = "1")]
    V1(NewUpload),
}

/// A declared length (`layout::LENGTH`), if one was written.
fn read_length(path: &Path) -> Result<Option<u64>, StorageError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| StorageError::Corrupt(format!("{}: not a length", path.display()))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::from_io("reading a declared length", e)),
    }
}

fn read_manifest(path: &Path) -> Result<Option<NewUpload>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(ManifestFile::V1(upload)) => Ok(Some(upload)),
            Err(e) => Err(StorageError::Corrupt(format!("{}: {e}", path.display()))),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::from_io("reading manifest", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Geometry;

    fn upload(id: &str, total: u64, chunk: u64) -> NewUpload {
        NewUpload {
            id: UploadId::parse(id).unwrap(),
            geometry: Geometry::new(total, chunk).unwrap(),
            filename: Some("f.bin".into()),
            file_md5: None,
            metadata: None,
            created_at_ms: 1,
            assembly: Default::default(),
            callback_url: None,
            callback_secret: None,
        }
    }

    async fn stage(
        store: &FsChunkStore,
        id: &UploadId,
        parts: &[&[u8]],
        end: bool,
    ) -> Result<StagedChunk, StorageError> {
        let (tx, rx) = mpsc::channel(4);
        let task = store.stage_chunk(id, ChunkIndex(3), true, rx, None);
        let feed = async {
            for p in parts {
                tx.send(Feed::Data(Block::new(Bytes::copy_from_slice(p), None)))
                    .await
                    .unwrap();
            }
            if end {
                tx.send(Feed::End).await.unwrap();
            }
            drop(tx);
        };
        let (staged, ()) = tokio::join!(task, feed);
        staged
    }

    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn a_staged_chunk_is_complete_under_a_unique_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), true);
        let id = UploadId::parse("u1").unwrap();
        let a = stage(&store, &id, &[b"hello ", b"world"], true)
            .await
            .unwrap();
        let b = stage(&store, &id, &[b"hello world"], true).await.unwrap();
        assert_ne!(a.path, b.path);
        assert_eq!(std::fs::read(&a.path).unwrap(), b"hello world");
        assert_eq!(a.digests, b.digests);
        assert_eq!(
            a.digests.md5.unwrap().to_hex(),
            "5eb63bbbe01eeed093cb22bb8f5acdc3"
        );
        assert_eq!(files_under(&store.chunks_dir(&id)).len(), 2);
        store.discard(&b).await;
        assert_eq!(
            files_under(&store.chunks_dir(&id)),
            vec![format!("3.{}", a.token)]
        );
    }

    #[tokio::test]
    async fn a_chunk_written_directly_holds_exactly_its_bytes_and_stays_out_of_the_page_cache() {
        use crate::direct_io::{BLOCK, resident_pages};
        // On a disk (tmpfs may copy O_DIRECT writes into its memory, and /tmp can be one).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let id = UploadId::parse("u-direct").unwrap();
        let data: Vec<u8> = (0..3 * BLOCK + 5000)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        // A byte, one aligned page, one block, and blocks with a padded, cut-back tail; fed
        // in pieces that straddle the blocks.
        for (direct, len) in [
            (true, 1),
            (true, 4096),
            (true, BLOCK),
            (true, data.len()),
            (false, data.len()),
        ] {
            let store = FsChunkStore::new(dir.path(), true).with_direct_io(direct);
            let bytes = &data[..len];
            let parts: Vec<&[u8]> = bytes.chunks(70_001).collect();
            let staged = stage(&store, &id, &parts, true).await.unwrap();
            let resident = resident_pages(&staged.path);
            if direct {
                assert_eq!(resident, 0, "{len} bytes written directly are not cached");
            } else {
                assert!(resident > 0, "{len} bytes written buffered stay cached");
            }
            assert_eq!(
                std::fs::read(&staged.path).unwrap(),
                bytes,
                "{direct} {len}"
            );
            assert_eq!(staged.digests.crc32c, crc32c::crc32c(bytes));
            assert_eq!(
                staged.digests.md5.unwrap(),
                Md5::from_bytes(<md5::Md5 as md5::Digest>::digest(bytes).into())
            );
        }
    }

    #[tokio::test]
    async fn a_feed_that_ends_without_its_marker_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), true);
        let id = UploadId::parse("u2").unwrap();
        let err = stage(&store, &id, &[b"partial"], false).await.unwrap_err();
        assert!(matches!(err, StorageError::Interrupted), "{err:?}");
        assert!(files_under(&store.chunks_dir(&id)).is_empty());
    }

    #[tokio::test]
    async fn the_first_manifest_wins_and_later_ones_are_compared() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), true);
        let first = upload("u3", 100, 10);
        assert_eq!(
            store.ensure_manifest(&first).await.unwrap(),
            ManifestCheck::Created
        );
        assert_eq!(
            store.ensure_manifest(&first).await.unwrap(),
            ManifestCheck::Matches(Box::new(first.clone()))
        );
        let other = upload("u3", 100, 20);
        assert_eq!(
            store.ensure_manifest(&other).await.unwrap(),
            ManifestCheck::Conflicts(Box::new(first.clone()))
        );
        assert_eq!(store.read_manifest(&first.id).await.unwrap(), Some(first));
        // Only the manifest remains: no temporary files.
        assert_eq!(
            files_under(&store.upload_dir(&other.id)),
            vec!["manifest.json"]
        );
    }

    #[tokio::test]
    async fn concurrent_manifest_writers_agree_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), false);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .ensure_manifest(&upload("u4", 100, 10 + i))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            if t.await.unwrap() == ManifestCheck::Created {
                created += 1;
            }
        }
        assert_eq!(created, 1);
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Writes `name` under `dir`, last modified `age` ago.
    fn put(dir: &Path, name: &str, age: Duration) {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, b"0123456789").unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    fn record(index: u64, token: &str) -> ChunkRecord {
        ChunkRecord {
            index: ChunkIndex(index),
            offset: index * 10,
            len: 10,
            crc32c: 0,
            md5: None,
            token: token.into(),
        }
    }

    fn completion(store: &FsChunkStore, id: &UploadId, fence: u64) -> CompletionRecord {
        CompletionRecord {
            fence,
            size: 10,
            md5: Md5::from_bytes([0; 16]),
            crc32c: Some(0x0102_0304),
            sha256: Some(Sha256::from_bytes([7; 32])),
            composite_md5: CompositeMd5::of_parts([Some(Md5::from_bytes([1; 16]))]),
            location: store.attempt(id, fence).location,
            completed_at_ms: 1,
            event_id: "e".into(),
        }
    }

    #[test]
    fn a_completion_record_without_the_newer_digests_still_reads() {
        let old = r#"{"completion_version": "1", "fence": 3, "size": 10,
            "md5": "9e107d9d372bb6826bd81d3542a419d6", "location": "x/merged",
            "completed_at_ms": 5, "event_id": "e"}"#;
        let CompletionFile::V1(record) = serde_json::from_str(old).unwrap();
        assert_eq!(record.crc32c, None);
        assert_eq!(record.sha256, None);
        assert_eq!(record.composite_md5, None);
        assert_eq!(record.size, 10);
    }

    #[test]
    fn a_completion_record_round_trips_its_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), false);
        let record = completion(&store, &UploadId::parse("rt").unwrap(), 2);
        let body = serde_json::to_string(&CompletionFile::V1(record.clone())).unwrap();
        let CompletionFile::V1(back) = serde_json::from_str(&body).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.clone().into_completion().sha256, record.sha256);
    }

    /// A store in a fresh directory holding upload `name` (40 bytes in chunks of 10).
    async fn with_upload(name: &str, fsync: bool) -> (tempfile::TempDir, FsChunkStore, UploadId) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), fsync);
        let upload = upload(name, 40, 10);
        store.ensure_manifest(&upload).await.unwrap();
        (dir, store, upload.id)
    }

    #[tokio::test]
    async fn an_inventory_of_segments_is_the_chain_from_zero_that_reaches_furthest() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), false);
        let upload = NewUpload {
            assembly: Assembly::Segments { partial: false },
            ..upload("seg", 100, 100)
        };
        store.ensure_manifest(&upload).await.unwrap();
        let chunks = store.chunks_dir(&upload.id);
        let put_len = |name: &str, len: usize| {
            std::fs::create_dir_all(&chunks).unwrap();
            std::fs::write(chunks.join(name), vec![1u8; len]).unwrap();
        };
        // 0..30 twice (a resend after a copy was stored but not counted), 30..50 cut
        // differently from 30..40 + 40..60, a stray segment past a gap, and a `.part`.
        put_len("s0.aaaaaaaaaaaaaaaa00000001", 30);
        put_len("s0.bbbbbbbbbbbbbbbb00000002", 10);
        put_len("s30.cccccccccccccccc00000003", 20);
        put_len("s30.dddddddddddddddd00000004", 10);
        put_len("s40.eeeeeeeeeeeeeeee00000005", 20);
        put_len("s90.ffffffffffffffff00000006", 10);
        put_len("s60.x.part", 5);
        let inventory = store.inventory(&upload.id).await.unwrap().unwrap();
        let chain: Vec<(u64, u64, u64, u32)> = inventory
            .chunks
            .iter()
            .map(|c| (c.index.0, c.offset, c.len, c.crc32c))
            .collect();
        assert_eq!(chain, [(0, 0, 30, 1), (1, 30, 10, 4), (2, 40, 20, 5)]);
    }

    #[tokio::test]
    async fn surplus_removal_keeps_counted_copies_attempt_files_and_anything_young() {
        let (_dir, store, id) = with_upload("s1", false).await;
        let chunks = store.chunks_dir(&id);
        put(&chunks, "0.counted", 2 * HOUR);
        put(&chunks, "1.surplus", 2 * HOUR);
        put(&chunks, "2.dead.part", 2 * HOUR);
        put(&chunks, "3.writing.part", Duration::ZERO);
        put(&chunks, "3.young", Duration::ZERO);
        let upload_dir = store.upload_dir(&id);
        put(&upload_dir, "file.1", 2 * HOUR);
        put(&upload_dir, ".file.2.abc.tmp", 2 * HOUR);

        let mut seen: Vec<_> = store
            .copy_files_blocking(&id)
            .unwrap()
            .into_iter()
            .map(|f| (f.name, f.piece))
            .collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        let chunk = |i| Some(Piece::Chunk(ChunkIndex(i)));
        assert_eq!(
            seen,
            vec![
                ("0.counted".to_owned(), chunk(0)),
                ("1.surplus".to_owned(), chunk(1)),
                ("2.dead.part".to_owned(), None),
                ("3.writing.part".to_owned(), None),
                ("3.young".to_owned(), chunk(3)),
            ]
        );
        let counted = [record(0, "counted")];
        let removed = store
            .remove_surplus(&id, Keep::Counted(&Assembly::Chunks, &counted), HOUR)
            .await
            .unwrap();
        assert_eq!(removed, 2);
        assert_eq!(
            files_under(&chunks),
            vec!["0.counted", "3.writing.part", "3.young"]
        );
        assert_eq!(
            files_under(&upload_dir),
            vec![".file.2.abc.tmp", "chunks", "file.1", "manifest.json"],
            "a merge may be writing its files"
        );
    }

    #[tokio::test]
    async fn a_completed_upload_keeps_its_merged_file_and_record_and_nothing_else_old() {
        let (_dir, store, id) = with_upload("s2", false).await;
        let chunks = store.chunks_dir(&id);
        put(&chunks, "0.counted", 2 * HOUR);
        put(&chunks, "1.young", Duration::ZERO);
        let upload_dir = store.upload_dir(&id);
        for name in [
            "file.3",
            "completion.3.json",
            "file.2",
            "completion.2.json",
            ".file.4.abc.tmp",
            ".completion.4.abc.tmp",
            "notes.txt",
        ] {
            put(&upload_dir, name, 2 * HOUR);
        }
        put(&upload_dir, "file.5", Duration::ZERO);
        let done = completion(&store, &id, 3);
        store.write_completion(&id, &done).await.unwrap();

        let removed = store
            .remove_surplus(&id, Keep::Completed(&done), HOUR)
            .await
            .unwrap();
        assert_eq!(removed, 5);
        assert_eq!(files_under(&chunks), vec!["1.young"]);
        assert_eq!(
            files_under(&upload_dir),
            vec![
                "chunks",
                "completion.3.json",
                "file.3",
                "file.5",
                "manifest.json",
                "notes.txt"
            ]
        );
        let inventory = store.inventory(&id).await.unwrap().unwrap();
        assert_eq!(inventory.completion, Some(done));
    }

    #[tokio::test]
    async fn a_published_attempt_is_found_by_its_location_and_outlives_the_cleanup() {
        let (_dir, store, id) = with_upload("s3", true).await;
        let staged = stage(&store, &id, &[b"0123456789"], true).await.unwrap();
        let stale = store.attempt(&id, 1);
        std::fs::write(&stale.temp, b"stale").unwrap();
        store.publish_merged(&stale).await.unwrap();
        let files = store.attempt(&id, 2);
        assert_ne!(
            files.temp,
            store.attempt(&id, 2).temp,
            "temp names are fresh"
        );
        assert_eq!(files.location, "uploads/s3/file.2");
        std::fs::write(&files.temp, b"0123456789").unwrap();
        let leftover = store.attempt(&id, 3);
        std::fs::write(&leftover.temp, b"partial").unwrap();
        store.publish_merged(&files).await.unwrap();
        assert_eq!(store.resolve(&files.location), Some(files.merged.clone()));
        store
            .write_completion(&id, &completion(&store, &id, 2))
            .await
            .unwrap();

        store
            .remove_merge_leftovers(&id, Some(&files.location))
            .await
            .unwrap();
        assert!(!staged.path.exists());
        assert_eq!(
            files_under(&store.upload_dir(&id)),
            vec!["completion.2.json", "file.2", "manifest.json"]
        );
        assert_eq!(std::fs::read(&files.merged).unwrap(), b"0123456789");
        assert_eq!(
            store.merged_files_blocking(&id).unwrap(),
            vec![files.merged]
        );
    }

    #[tokio::test]
    async fn an_upload_is_untouched_only_when_nothing_in_it_changed_within_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsChunkStore::new(dir.path(), false);
        let id = UploadId::parse("s4").unwrap();
        let chunks = store.chunks_dir(&id);
        put(&chunks, "0.old", 2 * HOUR);
        let age_dir = |path: &Path| {
            File::open(path)
                .unwrap()
                .set_modified(SystemTime::now() - 2 * HOUR)
                .unwrap();
        };
        age_dir(&chunks);
        age_dir(&store.upload_dir(&id));
        assert!(store.untouched_for(&id, HOUR).await.unwrap());
        put(&chunks, "1.new", Duration::ZERO);
        age_dir(&chunks);
        assert!(!store.untouched_for(&id, HOUR).await.unwrap());
    }

    #[test]
    fn a_full_disk_is_reported_as_full() {
        // /dev/full answers every write with ENOSPC.
        let mut full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let err = StorageError::from_io("x", full.write_all(&[0u8; 1]).unwrap_err());
        assert!(matches!(err, StorageError::Full(_)), "{err:?}");
    }
}
