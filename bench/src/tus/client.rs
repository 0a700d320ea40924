//! The tus client of the benchmarks: creates an upload (`POST /files/` with
//! `Upload-Length`), then appends its bytes in order with `PATCH` — all of them in one
//! request whose body streams, or in requests of a fixed size one after the other — and checks
//! every answer: 201 with a `Location`, then 204 with the `Upload-Offset` where the bytes sent
//! so far end.
//!
//! Like the chunk client ([`crate::upload`]) it must not be the bottleneck it measures: the
//! bytes are slices of one shared buffer, sent without being copied, and it runs on the
//! benchmark's current-thread runtime, so that it uses at most one core. Its requests are the
//! test kit's ([`Tus::request`]: `Tus-Resumable: 1.0.0` on each).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use md5::Digest as _;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use stitch_testkit::tus::{Tus, id_of};

use crate::upload::{REQUEST_TIMEOUT, http_client};

/// The content type of a `PATCH` body (tus core).
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

/// Slowest rate a long `PATCH` body may flow before the request counts as stalled: a
/// request may take [`REQUEST_TIMEOUT`] plus its bytes at this rate.
const SLOWEST_BYTES_PER_SECOND: u64 = 10_000_000;

/// The bytes of an upload: `len` bytes of `base` over and over, so that an upload larger than
/// the generated buffer costs the client no more memory (and no copies).
#[derive(Clone)]
pub struct Repeated {
    base: Bytes,
    len: u64,
}

impl Repeated {
    /// `len` bytes of `base` repeated; `base` must not be empty.
    pub fn new(base: Bytes, len: u64) -> anyhow::Result<Self> {
        ensure!(!base.is_empty(), "the payload's buffer is empty");
        Ok(Self { base, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes of `range`, in pieces of at most `max` bytes that are slices of the buffer
    /// (a piece ends where the buffer does).
    pub fn pieces(&self, range: Range<u64>, max: usize) -> Pieces {
        Pieces {
            base: self.base.clone(),
            at: range.start,
            end: range.end.min(self.len),
            max: max.max(1) as u64,
        }
    }

    /// MD5 of the whole payload (hex), fed in `block`-sized pieces.
    pub fn md5_hex(&self, block: usize) -> String {
        let mut hasher = md5::Md5::new();
        for piece in self.pieces(0..self.len, block) {
            hasher.update(&piece);
        }
        hex::encode(hasher.finalize())
    }
}

/// See [`Repeated::pieces`].
pub struct Pieces {
    base: Bytes,
    at: u64,
    end: u64,
    max: u64,
}

impl Iterator for Pieces {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.at >= self.end {
            return None;
        }
        let base_len = self.base.len() as u64;
        let start = self.at % base_len;
        let n = self.max.min(self.end - self.at).min(base_len - start);
        self.at += n;
        Some(self.base.slice(start as usize..(start + n) as usize))
    }
}

/// One tus upload to send.
#[derive(Clone)]
pub struct TusJob {
    pub addr: SocketAddr,
    pub payload: Repeated,
    /// Bytes per `PATCH`; `None`: the whole upload in one `PATCH`.
    pub patch_size: Option<u64>,
    /// Size of the pieces a streaming body is handed to the HTTP client in.
    pub piece: usize,
}

impl TusJob {
    /// The `(offset, length)` of each `PATCH`, in order.
    pub fn patches(&self) -> Vec<(u64, u64)> {
        let size = self.payload.len();
        let step = self.patch_size.unwrap_or(size).max(1);
        (0..size.div_ceil(step))
            .map(|i| (i * step, step.min(size - i * step)))
            .collect()
    }

    /// The `(offset, length)` of the segments the server makes of the `PATCH`es when it cuts
    /// every body into segments of at most `segment_size` bytes from the body's start.
    pub fn segments(&self, segment_size: u64) -> Vec<(u64, u64)> {
        let segment_size = segment_size.max(1);
        self.patches()
            .into_iter()
            .flat_map(|(offset, len)| {
                (0..len.div_ceil(segment_size)).map(move |i| {
                    let start = i * segment_size;
                    (offset + start, segment_size.min(len - start))
                })
            })
            .collect()
    }
}

/// What a tus upload took.
#[derive(Clone, Debug)]
pub struct TusOutcome {
    /// The upload's URL (`Location`) and its id (the URL's last segment).
    pub url: String,
    pub upload_id: String,
    /// From the `POST` sent to the last `PATCH`'s answer read.
    pub elapsed: Duration,
    pub bytes: u64,
    /// HTTP requests made: the `POST` and every `PATCH`.
    pub requests: usize,
}

/// How long a request that carries `bytes` may take.
fn timeout_for(bytes: u64) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(bytes / SLOWEST_BYTES_PER_SECOND)
}

/// A tus client of its own connection to `addr`.
pub fn tus_client(addr: SocketAddr) -> anyhow::Result<Tus> {
    Ok(Tus::new(http_client()?, &format!("http://{addr}")))
}

/// Creates the upload and sends every `PATCH` of `job` in order, checking each answer. Fails
/// on the first bad answer.
pub async fn send_tus(job: &TusJob) -> anyhow::Result<TusOutcome> {
    let size = job.payload.len();
    ensure!(size > 0, "a tus upload needs at least one byte");
    let tus = tus_client(job.addr)?;
    let patches = job.patches();
    let started = Instant::now();
    let response = tus
        .request(Method::POST, &format!("{}/files/", tus.base))
        .header("Upload-Length", size.to_string())
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .context("POST /files/")?;
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .bytes()
        .await
        .context("reading the POST's answer")?;
    let Some(url) = location.filter(|_| status == StatusCode::CREATED) else {
        bail!(
            "POST /files/: HTTP {status} without the 201 and Location expected: {}",
            String::from_utf8_lossy(&body)
        );
    };
    for &(offset, len) in &patches {
        patch(&tus, &url, job, offset, len).await?;
    }
    let elapsed = started.elapsed();
    Ok(TusOutcome {
        upload_id: id_of(&url).to_owned(),
        url,
        elapsed,
        bytes: size,
        requests: 1 + patches.len(),
    })
}

/// One `PATCH` of `len` bytes at `offset`; its answer must be 204 with the offset after them.
async fn patch(tus: &Tus, url: &str, job: &TusJob, offset: u64, len: u64) -> anyhow::Result<()> {
    let range = offset..offset + len;
    let mut pieces: Vec<Bytes> = job.payload.pieces(range, job.piece).collect();
    let body = if job.patch_size.is_none() || pieces.len() > 1 {
        // One request body handed over piece by piece, as a client streaming a file does.
        reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces.into_iter().map(Ok::<_, Infallible>),
        ))
    } else {
        reqwest::Body::from(pieces.pop().unwrap_or_default())
    };
    let response = tus
        .request(Method::PATCH, url)
        .header("Upload-Offset", offset.to_string())
        .header(CONTENT_TYPE, OFFSET_OCTET_STREAM)
        // Declared as tus clients do; a streaming body would otherwise go chunked.
        .header(CONTENT_LENGTH, len.to_string())
        .timeout(timeout_for(len))
        .body(body)
        .send()
        .await
        .with_context(|| format!("PATCH at offset {offset}"))?;
    let status = response.status();
    let answered = upload_offset(response.headers());
    let text = response
        .bytes()
        .await
        .with_context(|| format!("reading the answer to the PATCH at offset {offset}"))?;
    ensure!(
        status == StatusCode::NO_CONTENT,
        "PATCH at offset {offset}: HTTP {status}: {}",
        String::from_utf8_lossy(&text)
    );
    ensure!(
        answered == Some(offset + len),
        "PATCH of {len} bytes at offset {offset}: the answer says Upload-Offset {answered:?}, expected {}",
        offset + len
    );
    Ok(())
}

fn upload_offset(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers.get("upload-offset")?.to_str().ok()?.parse().ok()
}

/// `HEAD url` as a tus client asks where an upload stands: `(Upload-Offset, Upload-Length)`.
pub async fn head(addr: SocketAddr, url: &str) -> anyhow::Result<(u64, u64)> {
    let tus = tus_client(addr)?;
    let response = tus
        .request(Method::HEAD, url)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("HEAD {url}"))?;
    let status = response.status();
    ensure!(status == StatusCode::OK, "HEAD {url}: HTTP {status}");
    let number = |name: &str| -> anyhow::Result<u64> {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .with_context(|| format!("HEAD {url}: no {name} header"))
    };
    Ok((number("upload-offset")?, number("upload-length")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(len: u64, base: &'static [u8], patch_size: Option<u64>) -> TusJob {
        TusJob {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            payload: Repeated::new(Bytes::from_static(base), len).unwrap(),
            patch_size,
            piece: 4,
        }
    }

    #[test]
    fn a_repeated_payload_is_its_buffer_over_and_over_in_slices() {
        let payload = Repeated::new(Bytes::from_static(b"abcdefg"), 17).unwrap();
        let pieces: Vec<Bytes> = payload.pieces(0..17, 4).collect();
        assert_eq!(pieces.concat(), b"abcdefgabcdefgabc");
        // A piece never crosses the buffer's end.
        assert_eq!(pieces, [&b"abcd"[..], b"efg", b"abcd", b"efg", b"abc"]);
        let middle: Vec<Bytes> = payload.pieces(5..12, 100).collect();
        assert_eq!(middle.concat(), b"fgabcde");
        assert_eq!(payload.pieces(15..99, 100).count(), 1);
        let md5 = md5::Md5::digest(b"abcdefgabcdefgabc");
        assert_eq!(payload.md5_hex(3), hex::encode(md5));
        assert!(Repeated::new(Bytes::new(), 1).is_err());
    }

    #[test]
    fn patches_cover_the_upload_in_order() {
        assert_eq!(job(10, b"x", None).patches(), [(0, 10)]);
        assert_eq!(job(10, b"x", Some(4)).patches(), [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(job(8, b"x", Some(4)).patches(), [(0, 4), (4, 4)]);
    }

    #[test]
    fn segments_are_cut_from_each_patch_body() {
        // One body of 10 bytes in segments of 4: 4, 4, 2.
        assert_eq!(job(10, b"x", None).segments(4), [(0, 4), (4, 4), (8, 2)]);
        // Bodies of 6: each cut at 4 from its own start.
        assert_eq!(
            job(12, b"x", Some(6)).segments(4),
            [(0, 4), (4, 2), (6, 4), (10, 2)]
        );
        // Bodies smaller than a segment are one segment each.
        assert_eq!(job(5, b"x", Some(2)).segments(64), [(0, 2), (2, 2), (4, 1)]);
    }
}
