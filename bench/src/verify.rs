//! What a benchmark checks after a run, beyond the answers to each request: the upload's
//! status as the server reports it, the chunk (or tus segment) files on storage, and, once
//! merged, the `upload.completed` event and the file itself.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use md5::Digest as _;
use serde::Deserialize;
use stitch_common::id::UploadId;
use stitch_common::storage::{FsChunkStore, Piece};
use stitch_testkit::events::Arrival;
use stitch_testkit::{ApiClient, Source};

use crate::upload::http_client;

/// The fields of `GET /upload/{id}/status` that the benchmarks check.
#[derive(Clone, Debug, Deserialize)]
pub struct StatusResponse {
    pub state: String,
    /// `chunks` or `tus` (absent from the status of APIs older than tus).
    #[serde(default)]
    pub protocol: String,
    pub total_size: u64,
    pub total_chunks: u64,
    pub chunks_received: u64,
    pub bytes_received: u64,
    pub uploaded_chunks: Vec<u64>,
    /// Once completed: the merged file's size and MD5 (hex).
    pub size: Option<u64>,
    pub md5: Option<String>,
    /// Once failed: why.
    pub failure_reason: Option<String>,
}

/// A client for status requests to the API at `addr`.
pub fn status_client(addr: SocketAddr) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::with_client(addr, http_client()?))
}

/// `GET /upload/{id}/status`.
pub async fn get_status(api: &ApiClient, upload_id: &str) -> anyhow::Result<StatusResponse> {
    let url = api.url(&format!("/upload/{upload_id}/status"));
    let response = api
        .status_request(upload_id)
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
    serde_json::from_slice(&body).with_context(|| format!("GET {url}: unexpected body"))
}

/// Asks for the status every `every` until the upload is `completed` (or `failed`, which is
/// an error), for at most `limit`. Returns when the answer saying `completed` was read, and
/// that answer.
pub async fn wait_until_completed(
    addr: SocketAddr,
    upload_id: &str,
    every: Duration,
    limit: Duration,
) -> anyhow::Result<(Instant, StatusResponse)> {
    let api = status_client(addr)?;
    let deadline = Instant::now() + limit;
    loop {
        let status = get_status(&api, upload_id).await?;
        let seen = Instant::now();
        match status.state.as_str() {
            "completed" => return Ok((seen, status)),
            "failed" => bail!(
                "the upload failed: {}",
                status
                    .failure_reason
                    .as_deref()
                    .unwrap_or("no reason given")
            ),
            _ if seen >= deadline => {
                bail!("the upload is still {:?} after {limit:?}", status.state)
            }
            _ => tokio::time::sleep(every).await,
        }
    }
}

/// Checks that the upload is complete as the server sees it: state `merging` (no worker
/// runs in a benchmark, so the merge stays pending), every chunk listed, every byte counted.
pub async fn verify_status(
    addr: SocketAddr,
    upload_id: &str,
    source: &Source<Bytes>,
) -> anyhow::Result<()> {
    let s = get_status(&status_client(addr)?, upload_id).await?;
    ensure!(
        s.state == "merging",
        "upload state is {:?}, expected \"merging\"",
        s.state
    );
    verify_counts(&s, source)
}

/// Checks that the upload is merged as the server sees it: state `completed`, every chunk
/// and byte counted, and the file's size and MD5 those of the bytes sent.
pub fn verify_completed(
    s: &StatusResponse,
    source: &Source<Bytes>,
    md5_hex: &str,
) -> anyhow::Result<()> {
    ensure!(
        s.state == "completed",
        "upload state is {:?}, expected \"completed\"",
        s.state
    );
    verify_counts(s, source)?;
    let total = source.len();
    ensure!(
        s.size == Some(total),
        "the merged file has {:?} bytes, the client sent {total}",
        s.size
    );
    ensure!(
        s.md5.as_deref() == Some(md5_hex),
        "the server's MD5 of the merged file is {:?}, the client's {md5_hex}",
        s.md5
    );
    Ok(())
}

fn verify_counts(s: &StatusResponse, source: &Source<Bytes>) -> anyhow::Result<()> {
    let total = source.len();
    let count = source.total_chunks();
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

/// Checks the outcome event of a merge: `upload.completed` (by routing key and type) with an
/// event id, about a `completed` upload of `len` bytes whose MD5 is `md5_hex`.
pub fn verify_completed_event(
    arrival: &Arrival,
    upload_id: &str,
    len: u64,
    md5_hex: &str,
) -> anyhow::Result<()> {
    let e: EventBody = serde_json::from_value(arrival.event.clone())
        .with_context(|| format!("an event that is not the JSON expected: {}", arrival.event))?;
    if arrival.routing_key != "upload.completed" || e.kind != "upload.completed" {
        bail!(
            "the outcome event of {upload_id} is {} ({:?}), not upload.completed",
            arrival.routing_key,
            e
        );
    }
    ensure!(
        e.upload.state == "completed"
            && e.upload.size == len
            && e.upload.md5.as_deref() == Some(md5_hex)
            && !e.event_id.is_empty(),
        "the upload.completed event says state {}, size {}, MD5 {:?}; expected completed, {len}, {md5_hex}",
        e.upload.state,
        e.upload.size,
        e.upload.md5
    );
    Ok(())
}

/// The fields of an upload event the benchmarks check.
#[derive(Debug, Deserialize)]
struct EventBody {
    event_id: String,
    #[serde(rename = "type")]
    kind: String,
    upload: EventUpload,
}

#[derive(Debug, Deserialize)]
struct EventUpload {
    state: String,
    size: u64,
    md5: Option<String>,
}

/// Checks a tus upload as the server sees it: state `state` (`merging` once every byte is
/// counted and no worker runs yet, `completed` after the merge), protocol `tus`, `size`
/// bytes counted, stored as `segments` segments.
pub fn verify_tus_status(
    s: &StatusResponse,
    state: &str,
    size: u64,
    segments: u64,
) -> anyhow::Result<()> {
    ensure!(
        s.state == state,
        "upload state is {:?}, expected {state:?}",
        s.state
    );
    ensure!(
        s.protocol == "tus",
        "the status says protocol {:?}, expected \"tus\"",
        s.protocol
    );
    ensure!(
        s.total_size == size && s.bytes_received == size,
        "the server counts {} of {} bytes; the client sent {size}",
        s.bytes_received,
        s.total_size
    );
    ensure!(
        s.chunks_received == segments,
        "the server counts {} segments; the PATCHes make {segments}",
        s.chunks_received
    );
    Ok(())
}

/// Checks that a merged upload of `size` bytes is `completed` with MD5 `md5_hex`.
pub fn verify_merged_status(s: &StatusResponse, size: u64, md5_hex: &str) -> anyhow::Result<()> {
    ensure!(
        s.state == "completed",
        "upload state is {:?}, expected \"completed\"",
        s.state
    );
    ensure!(
        s.size == Some(size) && s.bytes_received == size,
        "the merged file has {:?} bytes ({} received), the client sent {size}",
        s.size,
        s.bytes_received
    );
    ensure!(
        s.md5.as_deref() == Some(md5_hex),
        "the server's MD5 of the merged file is {:?}, the client's {md5_hex}",
        s.md5
    );
    Ok(())
}

/// The segment files of a tus upload on storage (`uploads/<id>/chunks/s<offset>.<token>`),
/// in offset order, after checking that they are exactly the `(offset, length)` pieces of
/// `expected`: one complete copy of each, nothing else (no `.part` left over).
pub fn stored_segment_files(
    storage_root: &Path,
    upload_id: &str,
    expected: &[(u64, u64)],
) -> anyhow::Result<Vec<PathBuf>> {
    let id = UploadId::parse(upload_id).context("the upload id is invalid")?;
    let storage = FsChunkStore::new(storage_root, true);
    let dir = storage.chunks_dir(&id);
    let copies = storage
        .copy_files_blocking(&id)
        .with_context(|| format!("listing {}", dir.display()))?;
    let mut found = Vec::with_capacity(copies.len());
    for copy in copies {
        let Some(Piece::Segment(offset)) = copy.piece else {
            bail!("unexpected file {} in {}", copy.name, dir.display());
        };
        found.push((offset, copy.len, copy.path));
    }
    found.sort_by_key(|(offset, _, _)| *offset);
    let layout: Vec<(u64, u64)> = found.iter().map(|(o, l, _)| (*o, *l)).collect();
    ensure!(
        layout == expected,
        "{} holds segments (offset, length) {}, expected {}",
        dir.display(),
        describe_layout(&layout),
        describe_layout(expected)
    );
    Ok(found.into_iter().map(|(_, _, path)| path).collect())
}

/// A segment layout for a message, shortened when long.
fn describe_layout(layout: &[(u64, u64)]) -> String {
    const SHOWN: usize = 4;
    let mut parts: Vec<String> = layout
        .iter()
        .take(SHOWN)
        .map(|(o, l)| format!("({o}, {l})"))
        .collect();
    if layout.len() > SHOWN {
        parts.push(format!("… {} in all", layout.len()));
    }
    format!("[{}]", parts.join(", "))
}

/// Checks that storage holds exactly one complete file per chunk (no `.part` left over, no
/// second copy) with the chunk's length. Layout from `stitch_common`'s own [`FsChunkStore`].
pub fn verify_stored(
    storage_root: &Path,
    upload_id: &str,
    source: &Source<Bytes>,
) -> anyhow::Result<()> {
    stored_chunk_files(storage_root, upload_id, source, source.total_chunks()).map(|_| ())
}

/// The files of the first `count` chunks of `source` on storage
/// (`uploads/<id>/chunks/<index>.<token>`), in index order, after the checks of
/// [`verify_stored`]: all the chunks of the upload, or those sent so far.
pub fn stored_chunk_files(
    storage_root: &Path,
    upload_id: &str,
    source: &Source<Bytes>,
    count: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    let id = UploadId::parse(upload_id).context("the benchmark's upload id is invalid")?;
    let storage = FsChunkStore::new(storage_root, true);
    let dir = storage.chunks_dir(&id);
    let mut files: Vec<Option<(PathBuf, u64)>> = vec![None; count as usize];
    let copies = storage
        .copy_files_blocking(&id)
        .with_context(|| format!("listing {}", dir.display()))?;
    for copy in copies {
        let Some(Piece::Chunk(index)) = copy.piece else {
            bail!("unexpected file {} in {}", copy.name, dir.display());
        };
        let slot = files.get_mut(index.0 as usize).with_context(|| {
            format!("file {} is for a chunk the upload does not have", copy.name)
        })?;
        ensure!(slot.is_none(), "chunk {index} is stored twice");
        *slot = Some((copy.path, copy.len));
    }
    (0..count)
        .zip(files)
        .map(|(index, file)| {
            let size = file.as_ref().map(|(_, len)| *len);
            let expected = source.chunk(index).1.len() as u64;
            ensure!(
                size == Some(expected),
                "chunk {index} is stored with {size:?} bytes, expected {expected}"
            );
            Ok(file.map(|(path, _)| path).unwrap_or_default())
        })
        .collect()
}

/// Checks the merged file on storage: exactly one `uploads/<id>/file.<fence>`, `len` bytes
/// long, with MD5 `md5_hex` (read back whole, so this takes about as long as the MD5 of
/// `len` bytes).
pub fn verify_merged_file(
    storage_root: &Path,
    upload_id: &str,
    len: u64,
    md5_hex: &str,
) -> anyhow::Result<()> {
    let id = UploadId::parse(upload_id).context("the benchmark's upload id is invalid")?;
    let storage = FsChunkStore::new(storage_root, true);
    let dir = storage.upload_dir(&id);
    let merged = storage
        .merged_files_blocking(&id)
        .with_context(|| format!("listing {}", dir.display()))?;
    let [path] = merged.as_slice() else {
        bail!(
            "{} holds {} merged files (file.*), expected one",
            dir.display(),
            merged.len()
        );
    };
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut md5 = md5::Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        read += n as u64;
    }
    ensure!(
        read == len,
        "{} holds {read} bytes, expected {len}",
        path.display()
    );
    let digest = hex::encode(md5.finalize());
    ensure!(
        digest == md5_hex,
        "{} has MD5 {digest}, expected {md5_hex}",
        path.display()
    );
    Ok(())
}
