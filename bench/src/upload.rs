//! The chunk-protocol client of the benchmarks: sends one upload over N parallel HTTP/1.1
//! connections (one `reqwest::Client`, hence one connection, per parallel client), each
//! taking the next unsent chunk, and checks every answer: status 200, the chunk it asked
//! about, the digests of the bytes it sent, and `upload_complete` exactly once in a run that
//! completes the upload (never in one that does not). A run may send only some of the chunks,
//! so that a benchmark can hold back the one that completes the upload.
//! [`crate::verify`] then checks the upload's status and what is on storage.
//!
//! The client must not be the bottleneck it measures: chunks are zero-copy slices of one
//! buffer, their digests are computed before timing starts, and the benchmarks run it on a
//! current-thread runtime, so that it uses at most one core.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    /// Every chunk of the upload (their count is `X-Total-Chunks`).
    pub chunks: Arc<[Chunk]>,
    /// The chunks this run sends, by position in `chunks` (`0..chunks.len()` for all).
    pub send: Range<usize>,
    /// Whether the chunks sent complete the upload: then exactly one answer must say
    /// `upload_complete`, otherwise none may.
    pub completes: bool,
    /// Parallel clients (connections).
    pub clients: usize,
    /// Send `Content-MD5` with every chunk.
    pub content_md5: bool,
    /// MD5 of the whole file (hex) to send as `X-File-MD5` with every chunk, as a client does
    /// that wants the merge to verify the file end to end.
    pub file_md5: Option<String>,
}

impl UploadJob {
    /// Every chunk of `chunks`, completing the upload, without `Content-MD5` or
    /// `X-File-MD5`: change the fields for other runs.
    pub fn all(base_url: String, upload_id: String, chunks: Arc<[Chunk]>, clients: usize) -> Self {
        Self {
            base_url,
            upload_id,
            total_size: chunks.iter().map(Chunk::len).sum(),
            send: 0..chunks.len(),
            completes: true,
            chunks,
            clients,
            content_md5: false,
            file_md5: None,
        }
    }
}

/// What a run took.
#[derive(Clone, Copy, Debug)]
pub struct UploadOutcome {
    /// When the first request was about to be sent.
    pub started: Instant,
    /// From the first request sent to the last response read.
    pub elapsed: Duration,
    /// Bytes sent (of the chunks in `send`).
    pub bytes: u64,
    /// When the answer that said `upload_complete` was read, if one did.
    pub completing: Option<Moment>,
}

/// A moment on both clocks: the monotonic one for durations measured here, the wall clock
/// to compare with timestamps other processes wrote (Redis fields, log lines).
#[derive(Clone, Copy, Debug)]
pub struct Moment {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl Moment {
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }
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
    ensure!(
        job.send.end <= job.chunks.len() && !job.send.is_empty(),
        "the chunks to send are not a non-empty range of the upload's chunks"
    );
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
    let next = Arc::new(AtomicUsize::new(job.send.start));
    let completing = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for client in clients {
        workers.spawn(send_chunks(
            client,
            job.clone(),
            next.clone(),
            completing.clone(),
        ));
    }
    while let Some(joined) = workers.join_next().await {
        joined.context("a client task panicked")??;
    }
    let elapsed = started.elapsed();
    let completing = completing
        .lock()
        .map(|c| c.clone())
        .map_err(|_| anyhow::anyhow!("a client task panicked"))?;
    let expected = usize::from(job.completes);
    ensure!(
        completing.len() == expected,
        "{} chunk responses said upload_complete: true; {expected} should have",
        completing.len()
    );
    Ok(UploadOutcome {
        started,
        elapsed,
        bytes: job.chunks[job.send.clone()].iter().map(Chunk::len).sum(),
        completing: completing.first().copied(),
    })
}

/// One client: sends the next unsent chunk until none is left; notes in `completing` when
/// an answer said the upload completed.
async fn send_chunks(
    client: reqwest::Client,
    job: UploadJob,
    next: Arc<AtomicUsize>,
    completing: Arc<Mutex<Vec<Moment>>>,
) -> anyhow::Result<()> {
    let url = format!("{}/upload/chunk", job.base_url);
    let total_chunks = job.chunks.len().to_string();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(chunk) = job.chunks.get(i).filter(|_| i < job.send.end) else {
            return Ok(());
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
        if let Some(md5) = &job.file_md5 {
            request = request.header("X-File-MD5", md5);
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
        let answered = Moment::now();
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
        if answer.upload_complete
            && let Ok(mut completing) = completing.lock()
        {
            completing.push(answered);
        }
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
