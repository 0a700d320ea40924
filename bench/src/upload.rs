//! The chunk-protocol client of the benchmarks: sends one upload over N parallel HTTP/1.1
//! connections (one `reqwest::Client`, hence one connection, per parallel client), each
//! taking the next unsent chunk of the job's order, and checks every answer: status 200, the
//! chunk it asked about, the digests of the bytes it sent, and `upload_complete` exactly once
//! in a run that completes the upload (never in one that does not). A run may send only some
//! of the chunks, so that a benchmark can hold back the one that completes the upload, and in
//! any order (index order, or a shuffle of it).
//! [`crate::verify`] then checks the upload's status and what is on storage.
//!
//! The requests are the test kit's ([`ApiClient::chunk_request`]). The client must not be the
//! bottleneck it measures: the payload is one shared buffer whose chunks are sent without
//! being copied, their digests are computed before timing starts ([`Payload::new`]), and the
//! benchmarks run it on a current-thread runtime, so that it uses at most one core.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use md5::Digest as _;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use stitch_testkit::{ApiClient, Source};
use tokio::task::JoinSet;

/// Bound on one chunk request (a 64 MiB chunk on a busy 2-core machine takes well under a
/// second; a stall of this long is a failure, not a slow result).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The bytes of an upload, and what the server must answer about each of its chunks.
#[derive(Clone)]
pub struct Payload {
    pub source: Source<Bytes>,
    digests: Arc<[ChunkDigests]>,
}

/// The digests of one chunk, as a client may send them and the server reports them.
#[derive(Clone, Debug)]
struct ChunkDigests {
    /// As the server reports it (`chunk_crc32c`, 8 hex digits).
    crc32c: String,
    /// For `Content-MD5` (RFC 1864: base64 of the 16 bytes).
    md5_base64: String,
    /// As the server reports it (`chunk_md5` in the chunk response).
    md5_hex: String,
}

impl Payload {
    /// `source` with the digests of every chunk, computed here so that a timed run never pays
    /// for them.
    pub fn new(source: Source<Bytes>) -> Self {
        let digests = (0..source.total_chunks())
            .map(|index| {
                let (_, data) = source.chunk(index);
                let md5: [u8; 16] = md5::Md5::digest(data).into();
                ChunkDigests {
                    crc32c: format!("{:08x}", crc32c::crc32c(data)),
                    md5_base64: BASE64.encode(md5),
                    md5_hex: hex::encode(md5),
                }
            })
            .collect();
        Self { source, digests }
    }

    /// The number of chunks.
    pub fn chunks(&self) -> usize {
        self.digests.len()
    }

    /// Bytes in the chunks `chunks` (by index).
    pub fn bytes_in(&self, chunks: impl IntoIterator<Item = usize>) -> u64 {
        chunks
            .into_iter()
            .map(|i| self.source.chunk(i as u64).1.len() as u64)
            .sum()
    }
}

/// One upload to send.
#[derive(Clone)]
pub struct UploadJob {
    pub addr: SocketAddr,
    pub upload_id: String,
    pub payload: Payload,
    /// The chunks this run sends, by index, in the order they are taken: each client takes
    /// the next one not yet taken, so with N clients up to N are in flight at once. Index
    /// order (`0..chunks`) for all of them, in order.
    pub order: Arc<[usize]>,
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
    /// Every chunk of `payload` to the API at `addr`, completing the upload, without
    /// `Content-MD5` or `X-File-MD5`: change the fields for other runs.
    pub fn all(addr: SocketAddr, upload_id: String, payload: Payload, clients: usize) -> Self {
        Self {
            addr,
            upload_id,
            order: (0..payload.chunks()).collect(),
            completes: true,
            payload,
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
    /// Bytes sent (of the chunks in `order`).
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

/// A client of its own connection, for chunks or status requests.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")
}

/// Sends every chunk of `job` and checks each answer. Fails on the first bad answer.
pub async fn send_upload(job: &UploadJob) -> anyhow::Result<UploadOutcome> {
    ensure!(job.clients > 0, "at least one client is needed");
    check_order(&job.order, job.payload.chunks())?;
    // Clients are built before the clock starts; each opens its connection on first use.
    let clients = (0..job.clients)
        .map(|_| Ok(ApiClient::with_client(job.addr, http_client()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The position in `order` of the next chunk to take.
    let next = Arc::new(AtomicUsize::new(0));
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
        bytes: job.payload.bytes_in(job.order.iter().copied()),
        completing: completing.first().copied(),
    })
}

/// One client: sends the next unsent chunk until none is left; notes in `completing` when
/// an answer said the upload completed.
async fn send_chunks(
    api: ApiClient,
    job: UploadJob,
    next: Arc<AtomicUsize>,
    completing: Arc<Mutex<Vec<Moment>>>,
) -> anyhow::Result<()> {
    loop {
        let position = next.fetch_add(1, Ordering::Relaxed);
        let Some(&i) = job.order.get(position) else {
            return Ok(());
        };
        let digests = job
            .payload
            .digests
            .get(i)
            .with_context(|| format!("chunk {i} is not a chunk of the upload"))?;
        let index = i as u64;
        let mut request = api
            // A slice of the shared buffer: no copy of the chunk is made to send it.
            .chunk_request(&job.upload_id, &job.payload.source, index)
            .header(CONTENT_TYPE, "application/octet-stream");
        if job.content_md5 {
            request = request.header("Content-MD5", &digests.md5_base64);
        }
        if let Some(md5) = &job.file_md5 {
            request = request.header("X-File-MD5", md5);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("sending chunk {index}"))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("reading the response to chunk {index}"))?;
        let answered = Moment::now();
        if status != reqwest::StatusCode::OK {
            bail!(
                "chunk {index}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let answer: ChunkResponse = serde_json::from_slice(&body)
            .with_context(|| format!("chunk {index}: unexpected response body"))?;
        check_answer(index, digests, job.content_md5, &answer)?;
        if answer.upload_complete
            && let Ok(mut completing) = completing.lock()
        {
            completing.push(answered);
        }
    }
}

/// Checks that `order` names each of some of the `chunks` chunks once.
fn check_order(order: &[usize], chunks: usize) -> anyhow::Result<()> {
    ensure!(!order.is_empty(), "there are no chunks to send");
    let mut seen = vec![false; chunks];
    for &i in order {
        let slot = seen
            .get_mut(i)
            .with_context(|| format!("chunk {i} is not one of the upload's {chunks} chunks"))?;
        ensure!(!*slot, "chunk {i} is to be sent twice");
        *slot = true;
    }
    Ok(())
}

fn check_answer(
    i: u64,
    sent: &ChunkDigests,
    content_md5: bool,
    answer: &ChunkResponse,
) -> anyhow::Result<()> {
    ensure!(
        answer.chunk_index == i,
        "chunk {i}: the response is for chunk {}",
        answer.chunk_index
    );
    ensure!(
        !answer.duplicate,
        "chunk {i}: counted as a duplicate in a fresh upload"
    );
    ensure!(
        answer.chunk_crc32c == sent.crc32c,
        "chunk {i}: the server stored bytes with CRC32C {}, the client sent {}",
        answer.chunk_crc32c,
        sent.crc32c
    );
    if content_md5 {
        ensure!(
            answer.chunk_md5.as_deref() == Some(sent.md5_hex.as_str()),
            "chunk {i}: the server reports MD5 {:?}, the client sent {}",
            answer.chunk_md5,
            sent.md5_hex
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_digests_are_those_of_their_bytes() {
        let payload = Payload::new(Source::random(150, 100, 3).shared());
        assert_eq!(payload.chunks(), 2);
        assert_eq!(payload.bytes_in(0..2), 150);
        assert_eq!(payload.bytes_in(1..2), 50);
        let data = &payload.source.bytes[..100];
        let md5: [u8; 16] = md5::Md5::digest(data).into();
        let first = &payload.digests[0];
        assert_eq!(first.md5_hex, hex::encode(md5));
        assert_eq!(BASE64.decode(&first.md5_base64).unwrap(), md5);
        assert_eq!(first.crc32c, format!("{:08x}", crc32c::crc32c(data)));
    }

    #[test]
    fn an_order_sends_each_chunk_of_the_upload_at_most_once() {
        assert!(check_order(&[2, 0, 1], 3).is_ok());
        assert!(check_order(&[1], 3).is_ok());
        assert!(check_order(&[], 3).is_err());
        assert!(check_order(&[0, 3], 3).is_err());
        assert!(check_order(&[1, 0, 1], 3).is_err());
    }
}
