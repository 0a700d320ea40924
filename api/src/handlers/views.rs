//! JSON shapes of responses. Field names are part of the public protocol.

use serde::Serialize;
use stitch_common::upload::{Assembly, UploadState, UploadStatus};

/// The status of an upload, as `GET /upload/status` and friends return it.
#[derive(Serialize)]
pub struct StatusView {
    pub upload_id: String,
    pub state: &'static str,
    /// How the upload receives its bytes: `chunks` (the chunk protocol) or `tus`. A tus
    /// upload has one "chunk" of the whole size; `chunks_received` counts its stored
    /// segments and `uploaded_chunks` is empty: it resumes from `bytes_received`.
    pub protocol: &'static str,
    /// For tus concatenation: `partial` or `final`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concat: Option<&'static str>,
    pub filename: Option<String>,
    pub total_size: u64,
    pub chunk_size: u64,
    pub total_chunks: u64,
    pub chunks_received: u64,
    pub bytes_received: u64,
    /// Received chunk indices, ascending. A resuming client sends the others.
    pub uploaded_chunks: Vec<u64>,
    pub file_md5: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub created_at: String,
    pub updated_at: String,
    pub status_url: String,
    /// While merging: bytes of the file written so far.
    pub merge_bytes_done: Option<u64>,
    /// Once completed: the file's size, MD5 and where to fetch it.
    pub size: Option<u64>,
    pub md5: Option<String>,
    pub download_url: Option<String>,
    pub completed_at: Option<String>,
    /// Once completed: the file's CRC32C (8 hex digits), combined from the chunks'. Absent
    /// for uploads completed before Stitch recorded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<String>,
    /// Once completed, with `uploads.file_digest = "md5+sha256"`: the file's SHA-256 (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Once completed, when every part came with an MD5: the S3-style composite MD5 of the
    /// parts (`<hex>-<parts>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub composite_md5: Option<String>,
    /// Once failed: why.
    pub failure_reason: Option<String>,
}

impl StatusView {
    pub fn new(s: UploadStatus, public_url: Option<&str>) -> Self {
        let completion = s.completion.as_ref();
        let download_url =
            completion.map(|_| stitch_common::events::download_url(public_url, s.id.name()));
        let (crc32c, sha256, composite_md5) = completion
            .map(stitch_common::events::digest_fields)
            .unwrap_or_default();
        Self {
            crc32c,
            sha256,
            composite_md5,
            merge_bytes_done: s
                .merge_bytes_done
                .filter(|_| s.state == UploadState::Merging),
            size: completion.map(|c| c.size),
            md5: completion.map(|c| c.md5.to_hex()),
            download_url,
            completed_at: completion.map(|c| rfc3339(c.completed_at_ms)),
            failure_reason: s.failure.as_ref().map(|f| f.reason.clone()),
            status_url: format!("/upload/{}/status", s.id.name()),
            upload_id: s.id.name().to_owned(),
            state: s.state.as_str(),
            protocol: if s.assembly.is_chunks() {
                "chunks"
            } else {
                "tus"
            },
            concat: match s.assembly {
                Assembly::Segments { partial: true } => Some("partial"),
                Assembly::Concat { .. } => Some("final"),
                _ => None,
            },
            filename: s.filename,
            total_size: s.geometry.total_size,
            chunk_size: s.geometry.chunk_size,
            total_chunks: s.geometry.total_chunks,
            chunks_received: s.chunks_received,
            bytes_received: s.bytes_received,
            uploaded_chunks: s.uploaded_chunks,
            file_md5: s.file_md5.map(|m| m.to_hex()),
            metadata: s.metadata,
            created_at: rfc3339(s.created_at_ms),
            updated_at: rfc3339(s.updated_at_ms),
        }
    }
}

pub use stitch_common::events::rfc3339;
