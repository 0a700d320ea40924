//! JSON shapes of responses. Field names are part of the public protocol.

use serde::Serialize;
use stitch_common::upload::UploadStatus;

/// The status of an upload, as `GET /upload/status` and friends return it.
#[derive(Serialize)]
pub struct StatusView {
    pub upload_id: String,
    pub state: &'static str,
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
}

impl From<UploadStatus> for StatusView {
    fn from(s: UploadStatus) -> Self {
        Self {
            status_url: format!("/upload/{}/status", s.id),
            upload_id: s.id.to_string(),
            state: s.state.as_str(),
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

pub fn rfc3339(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}
