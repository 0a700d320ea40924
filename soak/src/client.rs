//! The soak's clients: each runs one upload after another, of mixed sizes, over both
//! protocols, as a patient real client does — the chunk protocol in a shuffled order, every
//! chunk re-sent until it is answered; tus in PATCHes that resume from `HEAD` after any
//! error. Each upload's record says what the server acknowledged, for the checker.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{RngExt as _, SeedableRng as _};
use stitch_testkit::{ApiClient, Source};
use tokio::time::Instant;

use crate::md5_hex;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Chunks,
    Tus,
}

/// What to upload: the bytes are [`Source::random`] of `len` and `seed`.
#[derive(Clone, Debug)]
pub struct Spec {
    pub protocol: Protocol,
    pub seed: u64,
    pub len: usize,
    /// The chunk size (chunk protocol) or the PATCH size (tus).
    pub piece: u64,
}

impl Spec {
    /// A random upload: mostly small, some of several MiB, a few of tens of MiB (about
    /// 3 MiB on average: a long soak stores tens of GB, not hundreds).
    fn random(rng: &mut StdRng) -> Self {
        let protocol = if rng.random_bool(0.5) {
            Protocol::Chunks
        } else {
            Protocol::Tus
        };
        let len = match rng.random_range(0..20) {
            0..=1 => rng.random_range(1..=64 * KIB),
            2..=12 => rng.random_range(64 * KIB..2 * MIB),
            13..=18 => rng.random_range(2 * MIB..10 * MIB),
            _ => rng.random_range(10 * MIB..32 * MIB),
        };
        let piece = [256 * KIB, MIB, 4 * MIB][rng.random_range(0..3)] as u64;
        Self {
            protocol,
            seed: rng.random(),
            len,
            piece,
        }
    }

    pub fn source(&self) -> Source {
        Source::random(self.len, self.piece, self.seed)
    }
}

/// What the server acknowledged of one upload.
#[derive(Clone, Debug)]
pub enum Acked {
    /// Chunk indices answered 200 (or all, once the upload was seen merging or completed).
    Chunks(BTreeSet<u64>),
    /// The highest `Upload-Offset` a `PATCH` or `HEAD` answered.
    Offset(u64),
}

#[derive(Clone, Debug)]
pub struct UploadRecord {
    pub spec: Spec,
    pub md5: String,
    /// Known once the server gave it (tus) or chosen (chunks).
    pub id: Option<String>,
    pub acked: Acked,
    /// Every byte was acknowledged: the upload must complete.
    pub all_acked: bool,
    /// An answer no correct server gives (a conflict, a lost upload, an offset going back).
    pub violation: Option<String>,
    /// `POST /files/` requests whose answer was lost: uploads the client never learnt of.
    pub lost_creations: u32,
    pub retries: u32,
}

/// What every client shares.
pub struct Ctx {
    pub apis: Vec<SocketAddr>,
    pub http: reqwest::Client,
    /// No upload starts after this.
    pub stop_new: Instant,
    /// Every request stops after this, finished or not.
    pub hard_stop: Instant,
    pub records: Mutex<Vec<Arc<Mutex<UploadRecord>>>>,
    /// The most a client waits between two uploads (a random share of it).
    pub think: Duration,
}

impl Ctx {
    pub fn new(
        apis: Vec<SocketAddr>,
        stop_new: Instant,
        hard_stop: Instant,
        think: Duration,
    ) -> Self {
        stitch_testkit::install_tls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // A paused API holds a request for a few seconds; a dead path for longer.
            .timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(8)
            .build()
            .expect("an HTTP client");
        Self {
            apis,
            http,
            stop_new,
            hard_stop,
            records: Mutex::new(Vec::new()),
            think,
        }
    }

    fn api(&self, rng: &mut StdRng) -> ApiClient {
        let addr = self.apis[rng.random_range(0..self.apis.len())];
        ApiClient::with_client(addr, self.http.clone())
    }

    pub fn records(&self) -> Vec<UploadRecord> {
        self.records
            .lock()
            .expect("records")
            .iter()
            .map(|r| r.lock().expect("a record").clone())
            .collect()
    }
}

/// One client: uploads until [`Ctx::stop_new`], then finishes the one it is on.
pub async fn run_client(ctx: Arc<Ctx>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while Instant::now() < ctx.stop_new {
        let spec = Spec::random(&mut rng);
        let source = spec.source();
        let record = Arc::new(Mutex::new(UploadRecord {
            md5: md5_hex(&source.bytes),
            id: None,
            acked: match spec.protocol {
                Protocol::Chunks => Acked::Chunks(BTreeSet::new()),
                Protocol::Tus => Acked::Offset(0),
            },
            all_acked: false,
            violation: None,
            lost_creations: 0,
            retries: 0,
            spec: spec.clone(),
        }));
        ctx.records.lock().expect("records").push(record.clone());
        match spec.protocol {
            Protocol::Chunks => upload_chunks(&ctx, &record, &source, &mut rng).await,
            Protocol::Tus => upload_tus(&ctx, &record, &source, &mut rng).await,
        }
        let think = rng.random_range(0..=ctx.think.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
}

/// Waits a little before a retry (and counts it); false once past the hard stop.
async fn backoff(ctx: &Ctx, record: &Mutex<UploadRecord>, rng: &mut StdRng) -> bool {
    record.lock().expect("a record").retries += 1;
    tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
    Instant::now() < ctx.hard_stop
}

/// Whether a status is worth the same request again: the server or a dependency was away.
fn transient(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504 | 507)
}

fn violation(record: &Mutex<UploadRecord>, what: String) {
    let mut r = record.lock().expect("a record");
    if r.violation.is_none() {
        r.violation = Some(what);
    }
}

async fn upload_chunks(ctx: &Ctx, record: &Mutex<UploadRecord>, source: &Source, rng: &mut StdRng) {
    let id = stitch_testkit::new_id();
    let md5 = record.lock().expect("a record").md5.clone();
    record.lock().expect("a record").id = Some(id.clone());
    let mut order: Vec<u64> = (0..source.total_chunks()).collect();
    order.shuffle(rng);
    'chunks: for index in order {
        loop {
            let request = ctx
                .api(rng)
                .chunk_request(&id, source, index)
                .header("X-File-MD5", &md5)
                .header("X-File-Name", "soak.bin");
            let answer = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    Some((status, body))
                }
                Err(_) => None,
            };
            match answer {
                Some((200, _)) => {
                    if let Acked::Chunks(done) = &mut record.lock().expect("a record").acked {
                        done.insert(index);
                    }
                    break;
                }
                Some((409, body))
                    if body.contains("upload_merging") || body.contains("upload_completed") =>
                {
                    // Only a complete upload merges: every chunk was recorded (an answer
                    // lost to a kill said so first).
                    let mut r = record.lock().expect("a record");
                    r.acked = Acked::Chunks((0..source.total_chunks()).collect());
                    break 'chunks;
                }
                Some((status, _)) if transient(status) => {}
                None => {}
                Some((status, body)) => {
                    violation(record, format!("chunk {index} of {id}: {status} {body}"));
                    return;
                }
            }
            if !backoff(ctx, record, rng).await {
                return;
            }
        }
    }
    record.lock().expect("a record").all_acked = true;
}

async fn upload_tus(ctx: &Ctx, record: &Mutex<UploadRecord>, source: &Source, rng: &mut StdRng) {
    let len = source.len();
    let url = loop {
        let api = ctx.api(rng);
        let created = ctx
            .http
            .post(api.url("/files/"))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", len.to_string())
            .send()
            .await;
        match created {
            Ok(response) if response.status() == 201 => {
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .map(str::to_owned);
                match location {
                    Some(location) => break location,
                    None => {
                        violation(record, "a 201 without Location".into());
                        return;
                    }
                }
            }
            Ok(response) if transient(response.status().as_u16()) => {}
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                violation(record, format!("POST /files/: {status} {body}"));
                return;
            }
            Err(_) => record.lock().expect("a record").lost_creations += 1,
        }
        if !backoff(ctx, record, rng).await {
            return;
        }
    };
    // Relative or absolute: the id is its last segment, and any API serves it.
    let id = url.rsplit('/').next().unwrap_or_default().to_owned();
    record.lock().expect("a record").id = Some(id.clone());
    let path = format!("/files/{id}");
    let mut offset = 0u64;
    while offset < len {
        let end = (offset + record.lock().expect("a record").spec.piece).min(len);
        let api = ctx.api(rng);
        let patched = ctx
            .http
            .patch(api.url(&path))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(source.bytes[offset as usize..end as usize].to_vec())
            .send()
            .await;
        match patched {
            Ok(response) if response.status() == 204 => {
                let Some(new) = upload_offset(&response) else {
                    violation(record, format!("PATCH {path}: a 204 without Upload-Offset"));
                    return;
                };
                if !acknowledge(record, &path, new) {
                    return;
                }
                offset = new;
                continue;
            }
            Ok(response) => {
                let status = response.status().as_u16();
                if !(transient(status) || status == 409 || status == 423) {
                    let body = response.text().await.unwrap_or_default();
                    violation(record, format!("PATCH {path} at {offset}: {status} {body}"));
                    return;
                }
            }
            Err(_) => {}
        }
        // Something went wrong: ask where the upload stands, then go on from there.
        if !backoff(ctx, record, rng).await {
            return;
        }
        match resync(ctx, record, &path, rng).await {
            Some(at) => offset = at,
            None => return,
        }
    }
    record.lock().expect("a record").all_acked = true;
}

fn upload_offset(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get("upload-offset")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Records `offset` as acknowledged; false (and a violation) if it is below what was.
fn acknowledge(record: &Mutex<UploadRecord>, path: &str, offset: u64) -> bool {
    let mut r = record.lock().expect("a record");
    if let Acked::Offset(acked) = &mut r.acked {
        if offset < *acked {
            let what = format!("{path}: the offset went back from {acked} to {offset}");
            drop(r);
            violation(record, what);
            return false;
        }
        *acked = offset;
    }
    true
}

/// `HEAD` until an API answers; the offset it reports.
async fn resync(
    ctx: &Ctx,
    record: &Mutex<UploadRecord>,
    path: &str,
    rng: &mut StdRng,
) -> Option<u64> {
    loop {
        let api = ctx.api(rng);
        let head = ctx
            .http
            .head(api.url(path))
            .header("Tus-Resumable", "1.0.0")
            .send()
            .await;
        match head {
            Ok(response) if response.status() == 200 => {
                let Some(offset) = upload_offset(&response) else {
                    violation(record, format!("HEAD {path}: no Upload-Offset"));
                    return None;
                };
                return acknowledge(record, path, offset).then_some(offset);
            }
            Ok(response) if !transient(response.status().as_u16()) => {
                violation(record, format!("HEAD {path}: {}", response.status()));
                return None;
            }
            _ => {}
        }
        if !backoff(ctx, record, rng).await {
            return None;
        }
    }
}
