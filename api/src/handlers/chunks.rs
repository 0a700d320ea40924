//! `PUT /upload/chunk`.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use serde::Serialize;

use crate::AppState;
use crate::body::ChunkBody;
use crate::error::ApiError;
use crate::extract::{Caller, ChunkHeaders};

#[derive(Serialize)]
pub struct ChunkView {
    upload_id: String,
    chunk_index: u64,
    /// True when this chunk had already been received with the same content.
    duplicate: bool,
    state: &'static str,
    /// True for exactly one chunk of an upload: the one that completed it.
    upload_complete: bool,
    chunks_received: u64,
    total_chunks: u64,
    bytes_received: u64,
    total_size: u64,
    chunk_crc32c: String,
    chunk_md5: Option<String>,
}

pub async fn put_chunk(
    State(app): State<AppState>,
    Caller(caller): Caller,
    request_headers: HeaderMap,
    chunk: ChunkHeaders,
    body: Body,
) -> Result<Json<ChunkView>, ApiError> {
    let content_type = request_headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let body = ChunkBody::new(content_type, body, chunk.range.len(), app.body_limits)?;
    chunk.check_length(body.is_multipart())?;
    let a = app
        .uploads
        .accept_chunk(&caller, chunk.part(), body)
        .await
        .map_err(ApiError::from)
        .inspect_err(|e| {
            let class = if e.status().is_server_error() {
                "5xx"
            } else {
                "4xx"
            };
            metrics::counter!(stitch_common::metrics::CHUNKS_REFUSED, "class" => class)
                .increment(1);
        })?;
    Ok(Json(ChunkView {
        upload_id: a.id.name().to_owned(),
        chunk_index: a.index.0,
        duplicate: a.duplicate,
        state: a.progress.state.as_str(),
        upload_complete: a.progress.completed_upload,
        chunks_received: a.progress.chunks_received,
        total_chunks: a.geometry.total_chunks,
        bytes_received: a.progress.bytes_received,
        total_size: a.geometry.total_size,
        chunk_crc32c: format!("{:08x}", a.digests.crc32c),
        chunk_md5: a.digests.md5.map(|m| m.to_hex()),
    }))
}
