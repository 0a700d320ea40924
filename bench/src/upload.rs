//! The chunk-protocol client of the benchmarks: sends one upload over N parallel HTTP/1.1
//! connections (one `reqwest::Client`, hence one connection, per parallel client), each
//! taking the next unsent chunk, and checks every answer: status 200, the chunk it asked
//! about, the digests of the bytes it sent, and exactly one `upload_complete` in the run.
//! [`crate::verify`] then checks the upload's status and what is on storage.
//!
//! The client must not be the bottleneck it measures: chunks are zero-copy slices of one
//! buffer, their digests are computed before timing starts, and the benchmarks run it on a
//! current-thread runtime, so that it uses at most one core.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE};
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::source::Chunk;

/// Bound on one chunk request (a 64 MiB chunk on a busy 2-core machine takes well under a
/// second; a stall of this long is a failure, not a slow result).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// One upload to send.
#[derive(Clone)]
pub struct UploadJob {
    pub base_url: String,
    pub upload_id: String,
    pub total_size: u64,
    pub chunks: Arc<[Chunk]>,
    /// Parallel clients (connections).
    pub clients: usize,
    /// Send `Content-MD5` with every chunk.
    pub content_md5: bool,
}

/// What a run took.
#[derive(Clone, Copy, Debug)]
pub struct UploadOutcome {
    /// From the first request sent to the last response read.
    pub elapsed: Duration,
    pub bytes: u64,
}

/// The fields of the chunk response that the benchmark checks.
#[derive(Debug, Deserialize)]
struct ChunkResponse {
    chunk_index: u64,
    duplicate: bool,
    upload_complete: bool,
    chunk_crc32c: String,
    chunk_md5: Option<String>,
}

/// Sends every chunk of `job` and checks each answer. Fails on the first bad answer.
pub async fn send_upload(job: &UploadJob) -> anyhow::Result<UploadOutcome> {
    ensure!(job.clients > 0, "at least one client is needed");
    // Clients are built before the clock starts; each opens its connection on first use.
    let clients = (0..job.clients)
        .map(|_| {
            reqwest::Client::builder()
                .http1_only()
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .no_proxy()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .context("building the HTTP client")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for client in clients {
        workers.spawn(send_chunks(client, job.clone(), next.clone()));
    }
    let mut completions = 0;
    while let Some(joined) = workers.join_next().await {
        completions += joined.context("a client task panicked")??;
    }
    let elapsed = started.elapsed();
    ensure!(
        completions == 1,
        "{completions} chunk responses said upload_complete: true; exactly one must"
    );
    Ok(UploadOutcome {
        elapsed,
        bytes: job.chunks.iter().map(Chunk::len).sum(),
    })
}

/// One client: sends the next unsent chunk until none is left; returns how many of its
/// responses said the upload completed.
async fn send_chunks(
    client: reqwest::Client,
    job: UploadJob,
    next: Arc<AtomicUsize>,
) -> anyhow::Result<usize> {
    let url = format!("{}/upload/chunk", job.base_url);
    let total_chunks = job.chunks.len().to_string();
    let mut completions = 0;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(chunk) = job.chunks.get(i) else {
            return Ok(completions);
        };
        let mut request = client
            .put(&url)
            .header("X-File-ID", &job.upload_id)
            .header("X-Chunk-Index", chunk.index)
            .header("X-Total-Chunks", &total_chunks)
            .header(
                CONTENT_RANGE,
                format!(
                    "bytes {}-{}/{}",
                    chunk.start,
                    chunk.end_inclusive(),
                    job.total_size
                ),
            )
            .header(CONTENT_TYPE, "application/octet-stream")
            // A reference-counted slice: no copy of the chunk is made to send it.
            .body(chunk.data.clone());
        if job.content_md5 {
            request = request.header("Content-MD5", &chunk.md5_base64);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("sending chunk {}", chunk.index))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("reading the response to chunk {}", chunk.index))?;
        if status != reqwest::StatusCode::OK {
            bail!(
                "chunk {}: HTTP {status}: {}",
                chunk.index,
                String::from_utf8_lossy(&body)
            );
        }
        let answer: ChunkResponse = serde_json::from_slice(&body)
            .with_context(|| format!("chunk {}: unexpected response body", chunk.index))?;
        check_answer(chunk, job.content_md5, &answer)?;
        completions += usize::from(answer.upload_complete);
    }
}

fn check_answer(chunk: &Chunk, content_md5: bool, answer: &ChunkResponse) -> anyhow::Result<()> {
    let i = chunk.index;
    ensure!(
        answer.chunk_index == i,
        "chunk {i}: the response is for chunk {}",
        answer.chunk_index
    );
    ensure!(
        !answer.duplicate,
        "chunk {i}: counted as a duplicate in a fresh upload"
    );
    let crc = format!("{:08x}", chunk.crc32c);
    ensure!(
        answer.chunk_crc32c == crc,
        "chunk {i}: the server stored bytes with CRC32C {}, the client sent {crc}",
        answer.chunk_crc32c
    );
    if content_md5 {
        ensure!(
            answer.chunk_md5.as_deref() == Some(chunk.md5_hex.as_str()),
            "chunk {i}: the server reports MD5 {:?}, the client sent {}",
            answer.chunk_md5,
            chunk.md5_hex
        );
    }
    Ok(())
}
