//! The upload: its lifecycle and what is known about it.
//!
//! ```text
//! receiving ──(last missing chunk recorded)──▶ merging ──▶ completed
//!     │                                          │    └──▶ failed
//!     └──────────────(DELETE)────────────────────┴──────▶ aborted
//! ```
//! Only the state store moves an upload between states, each move inside one atomic
//! operation, so two API pods can never both see themselves as the one that completed it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::{CompositeMd5, Md5, Sha256};
use crate::geometry::{ChunkIndex, Geometry};
use crate::id::UploadId;

/// Where an upload is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    Receiving,
    Merging,
    Completed,
    Failed,
    Aborted,
}

impl UploadState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Receiving => "receiving",
            Self::Merging => "merging",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }
}

impl fmt::Display for UploadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UploadState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "receiving" => Self::Receiving,
            "merging" => Self::Merging,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "aborted" => Self::Aborted,
            other => return Err(format!("unknown upload state {other:?}")),
        })
    }
}

/// How an upload's parts make its file: which pieces storage holds and how the merge puts
/// them together. Fixed at creation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Assembly {
    /// Fixed-size chunks by index (the chunk protocol): chunk `i` covers
    /// `i × chunk_size ..`, in any order, each sent whole.
    #[default]
    Chunks,
    /// Byte-range segments appended in order (tus): each starts where the bytes received so
    /// far end, and may have any length. The geometry is one part of the whole size.
    Segments {
        /// A part of a later concatenation (tus `Upload-Concat: partial`): complete when all
        /// its bytes are there, never merged alone.
        #[serde(default)]
        partial: bool,
    },
    /// The concatenation of other uploads' segments, in this order (tus
    /// `Upload-Concat: final`). It receives nothing itself; it is merged as it is created.
    Concat { parts: Vec<UploadId> },
}

impl Assembly {
    pub fn is_chunks(&self) -> bool {
        matches!(self, Self::Chunks)
    }

    /// Whether the upload merges once all its bytes are there (a partial upload waits for
    /// the concatenation that uses it).
    pub fn merges_when_complete(&self) -> bool {
        !matches!(self, Self::Segments { partial: true })
    }

    /// The form the state stores keep: a word (empty for chunks, as every record before tus
    /// holds) and, for a concatenation, its parts' ids joined by spaces.
    pub fn to_stored(&self) -> (&'static str, String) {
        match self {
            Self::Chunks => ("", String::new()),
            Self::Segments { partial: false } => ("segments", String::new()),
            Self::Segments { partial: true } => ("partial", String::new()),
            Self::Concat { parts } => (
                "concat",
                parts
                    .iter()
                    .map(UploadId::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        }
    }

    pub fn from_stored(kind: &str, parts: &str) -> Result<Self, String> {
        Ok(match kind {
            "" => Self::Chunks,
            "segments" => Self::Segments { partial: false },
            "partial" => Self::Segments { partial: true },
            "concat" => Self::Concat {
                parts: parts
                    .split(' ')
                    .filter(|p| !p.is_empty())
                    .map(|p| UploadId::from_key(p).map_err(|e| format!("concat part {p:?}: {e}")))
                    .collect::<Result<_, _>>()?,
            },
            other => return Err(format!("unknown assembly {other:?}")),
        })
    }
}

/// Everything fixed when an upload is created, by an explicit create or by its first chunk.
/// It is also the upload's immutable manifest on storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewUpload {
    pub id: UploadId,
    pub geometry: Geometry,
    /// The client's name for the file; never used to build a path.
    pub filename: Option<String>,
    /// The whole file's MD5, if the client declared it; the merge verifies against it.
    pub file_md5: Option<Md5>,
    /// Opaque client metadata (a JSON object), bounded in size by configuration.
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// How the upload's parts make its file; chunks unless it says otherwise (every manifest
    /// written before tus).
    #[serde(default, skip_serializing_if = "Assembly::is_chunks")]
    pub assembly: Assembly,
    /// Where the client asked for this upload's webhooks (checked against the operator's
    /// policy at creation and again, resolved, at every delivery).
    #[serde(default)]
    pub callback_url: Option<String>,
    /// The secret this upload's callbacks are signed with (`whsec_…`), made by the server
    /// and given to the client once, when it creates the upload.
    #[serde(default)]
    pub callback_secret: Option<String>,
}

impl NewUpload {
    /// What the upload holds of its tenant's stored bytes (quotas) until it completes: its
    /// size, except for a concatenation, whose bytes its parts hold until it completes and
    /// they are retired, so that a file sent in parallel parts is not counted twice. Once
    /// complete, every upload holds its file's size.
    pub fn quota_bytes_until_complete(&self) -> u64 {
        match self.assembly {
            Assembly::Concat { .. } => 0,
            _ => self.geometry.total_size,
        }
    }
}

/// One received chunk, as the state store records it. Storage holds its bytes at the
/// file named by `token` (see `storage`), which makes concurrent copies of one chunk distinct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub index: ChunkIndex,
    /// Byte offset of the chunk in the file. The chunk protocol fixes it by geometry; kept
    /// so that byte-range (tus) parts can share the same record.
    pub offset: u64,
    pub len: u64,
    pub crc32c: u32,
    pub md5: Option<Md5>,
    /// Unique name of the stored copy that this record counts.
    pub token: String,
}

impl ChunkRecord {
    /// Whether `other` carries the same bytes as far as the digests can tell: same length,
    /// same CRC32C, and the same MD5 when both have one.
    pub fn same_content(&self, other: &ChunkRecord) -> bool {
        self.offset == other.offset
            && self.len == other.len
            && self.crc32c == other.crc32c
            && match (self.md5, other.md5) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// A snapshot of an upload for the status endpoint: small even for 10,000+ chunks (the
/// received set travels as a bitmap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadStatus {
    pub id: UploadId,
    pub state: UploadState,
    pub geometry: Geometry,
    pub assembly: Assembly,
    pub filename: Option<String>,
    pub file_md5: Option<Md5>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub callback_url: Option<String>,
    /// Never shown in status views; the webhook dispatcher signs callbacks with it.
    pub callback_secret: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub bytes_received: u64,
    pub chunks_received: u64,
    /// Indices of the received chunks, ascending.
    pub uploaded_chunks: Vec<u64>,
    /// Bytes the current merge attempt has written (while `merging`).
    pub merge_bytes_done: Option<u64>,
    /// The merge result, once `completed`.
    pub completion: Option<Completion>,
    /// Why the upload failed, once `failed`.
    pub failure: Option<Failure>,
}

/// What a committed merge produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub size: u64,
    pub md5: Md5,
    /// CRC32C of the whole file, combined from the chunks' CRC32Cs. `None` only for a
    /// completion recorded before Stitch computed it.
    pub crc32c: Option<u32>,
    /// SHA-256 of the whole file, when `uploads.file_digest` asks for it.
    pub sha256: Option<Sha256>,
    /// The S3-style composite MD5 of the parts, when every part was received with an MD5.
    pub composite_md5: Option<CompositeMd5>,
    /// Path of the file relative to the storage root.
    pub location: String,
    pub completed_at_ms: u64,
    /// The `upload.completed` event's id, stable across re-publishes.
    pub event_id: String,
}

impl Completion {
    /// The whole-file digests a merge derives from its parts without reading them again:
    /// the CRC32C combined from the parts' CRC32Cs, and the composite MD5 when every part has
    /// an MD5. `chunks` in index order (as a merge plan holds them).
    pub fn part_digests(chunks: &[ChunkRecord]) -> (u32, Option<CompositeMd5>) {
        (
            crate::digest::crc32c_of_parts(chunks.iter().map(|c| (c.crc32c, c.len))),
            CompositeMd5::of_parts(chunks.iter().map(|c| c.md5)),
        )
    }
}

/// Why a merge failed for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub failed_at_ms: u64,
    /// The `upload.failed` event's id.
    pub event_id: String,
}

/// Decodes a Redis-style bitmap (bit 0 is the most significant bit of byte 0) into the
/// ascending list of set bit positions below `limit`.
pub fn bitmap_indices(bitmap: &[u8], limit: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (byte_index, &byte) in bitmap.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                let index = byte_index as u64 * 8 + bit;
                if index < limit {
                    out.push(index);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_decoding_follows_redis_bit_order() {
        // SETBIT k 0 1; SETBIT k 9 1; SETBIT k 15 1 gives 0x80 0x41.
        assert_eq!(bitmap_indices(&[0x80, 0x41], 100), vec![0, 9, 15]);
        assert_eq!(bitmap_indices(&[0xff], 3), vec![0, 1, 2]);
        assert!(bitmap_indices(&[], 10).is_empty());
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for s in [
            UploadState::Receiving,
            UploadState::Merging,
            UploadState::Completed,
            UploadState::Failed,
            UploadState::Aborted,
        ] {
            assert_eq!(s.as_str().parse::<UploadState>(), Ok(s));
        }
    }
}
