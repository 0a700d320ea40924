//! What a benchmark checks after a run, beyond the answers to each chunk: the upload's
//! status as the server reports it, and the chunk files on storage.

use std::path::Path;

use anyhow::{Context, ensure};
use serde::Deserialize;
use stitch_common::id::UploadId;
use stitch_common::storage::FsChunkStore;

use crate::source::Chunk;
use crate::upload::REQUEST_TIMEOUT;

/// The fields of `GET /upload/{id}/status` that the benchmark checks.
#[derive(Debug, Deserialize)]
struct StatusResponse {
    state: String,
    total_size: u64,
    total_chunks: u64,
    chunks_received: u64,
    bytes_received: u64,
    uploaded_chunks: Vec<u64>,
}

/// Checks that the upload is complete as the server sees it: state `merging` (no worker
/// runs in a benchmark, so the merge stays pending), every chunk listed, every byte counted.
pub async fn verify_status(
    base_url: &str,
    upload_id: &str,
    chunks: &[Chunk],
) -> anyhow::Result<()> {
    let url = format!("{base_url}/upload/{upload_id}/status");
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("reading GET {url}"))?;
    ensure!(
        status == reqwest::StatusCode::OK,
        "GET {url}: HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let s: StatusResponse =
        serde_json::from_slice(&body).with_context(|| format!("GET {url}: unexpected body"))?;
    let total: u64 = chunks.iter().map(Chunk::len).sum();
    let count = chunks.len() as u64;
    ensure!(
        s.state == "merging",
        "upload state is {:?}, expected \"merging\"",
        s.state
    );
    ensure!(
        s.total_size == total && s.bytes_received == total,
        "the server counts {} of {} bytes; the client sent {total}",
        s.bytes_received,
        s.total_size
    );
    ensure!(
        s.total_chunks == count && s.chunks_received == count,
        "the server counts {} of {} chunks; the client sent {count}",
        s.chunks_received,
        s.total_chunks
    );
    ensure!(
        s.uploaded_chunks.iter().copied().eq(0..count),
        "uploaded_chunks is not 0..{count}"
    );
    Ok(())
}

/// Checks that storage holds exactly one complete file per chunk (no `.part` left over, no
/// second copy) with the chunk's length. Layout from `stitch_common`'s own [`FsChunkStore`].
pub fn verify_stored(storage_root: &Path, upload_id: &str, chunks: &[Chunk]) -> anyhow::Result<()> {
    let id = UploadId::parse(upload_id).context("the benchmark's upload id is invalid")?;
    let dir = FsChunkStore::new(storage_root, true).chunks_dir(&id);
    let mut sizes = vec![None; chunks.len()];
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let index: usize = name
            .split('.')
            .next()
            .and_then(|i| i.parse().ok())
            .filter(|_| !name.ends_with(".part"))
            .with_context(|| format!("unexpected file {name} in {}", dir.display()))?;
        let slot = sizes
            .get_mut(index)
            .with_context(|| format!("file {name} is for a chunk the upload does not have"))?;
        ensure!(slot.is_none(), "chunk {index} is stored twice");
        let len = entry
            .metadata()
            .with_context(|| format!("stat {name}"))?
            .len();
        *slot = Some(len);
    }
    for (chunk, size) in chunks.iter().zip(&sizes) {
        ensure!(
            *size == Some(chunk.len()),
            "chunk {} is stored with {size:?} bytes, expected {}",
            chunk.index,
            chunk.len()
        );
    }
    Ok(())
}
