//! Shared storage for chunk files and upload manifests: a directory that every API pod and
//! worker mounts (a ReadWriteMany volume when distributed, a local directory single-node).
//!
//! Layout under the root:
//! ```text
//! uploads/<id>/manifest.json             immutable, written once at creation
//! uploads/<id>/chunks/<index>.<token>    a complete, fsynced copy of one chunk
//! uploads/<id>/chunks/<index>.<random>.part  a copy being written (never counted)
//! uploads/<id>/.file.<fence>.<random>.tmp    a merge attempt's file being written
//! uploads/<id>/file.<fence>                  a merge attempt's verified file
//! uploads/<id>/completion.<fence>.json       that attempt's completion record, written
//!                                            after the file, before the state store commit
//! uploads/<id>/.assembly.<random>            the file assembled while the chunks arrive
//!                                            (`merge.incremental`); a merge publishes it
//!                                            as its `file.<fence>`
//! uploads/<id>/prefix.<offset>.json          a checkpoint of it: its first <offset> bytes
//!                                            are the file's, with the hashes' state
//! ```
//! Only this module knows these names (`layout.rs` builds and parses them, and they never
//! change: existing deployments' files must stay readable). Callers address a copy by its
//! [`Piece`] and ask [`FsChunkStore`] typed questions: an attempt's files, what an upload no
//! longer needs ([`Keep`]), whether it is untouched.
//!
//! A copy's token is 16 random hex digits and the copy's CRC32C (8 more), so storage alone,
//! with the manifest and the completion records, is enough to rebuild an upload's state.
//! Every copy of a chunk gets a unique `token`, so two pods receiving the same chunk at once
//! never write the same file; the state store decides which copy counts and the other is
//! removed. A copy reaches its final name only after all its bytes are fsynced (invariant 1),
//! so a crash mid-chunk leaves at most a `.part` file that nothing counts.

mod fs;
mod layout;

pub use fs::{
    AttemptFiles, Block, CheckpointFile, ChunkFile, CompletionRecord, CopyFile, Feed, FsChunkStore,
    Inventory, Keep, ManifestCheck, SavedPrefix, StagedChunk,
};
pub use layout::Piece;

/// Whether `name`, in an upload's directory, is a file of its early assembly
/// ([`crate::concat::prefix`]): the assembly file, a checkpoint, or a checkpoint being written.
pub fn is_early_assembly_file(name: &str) -> bool {
    layout::PrefixFile::parse(name).is_some()
}

/// A storage failure. Callers branch on the variant.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No space (ENOSPC) or quota (EDQUOT) left. Maps to 507.
    #[error("storage is full: {0}")]
    Full(String),
    /// Storage could not be read or written. Maps to 503.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The body feed ended without its `End` marker: the request failed mid-body, and the
    /// partial copy was removed.
    #[error("chunk body ended early")]
    Interrupted,
    /// A stored manifest cannot be read as one.
    #[error("manifest is corrupt: {0}")]
    Corrupt(String),
}

impl StorageError {
    pub(crate) fn from_io(context: &str, e: std::io::Error) -> Self {
        crate::metrics::backend_error("storage");
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Self::Full(format!("{context}: {e}")),
            _ => Self::Unavailable(format!("{context}: {e}")),
        }
    }
}
