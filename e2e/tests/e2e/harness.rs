//! Starting the programs, uploading, looking at storage.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use md5::Digest;
use stitch_common::id::UploadId;
pub use stitch_testkit::events::{DurableTap, EventTap};
pub use stitch_testkit::process::ServiceProcess;
use stitch_testkit::process::stitch_command;
pub use stitch_testkit::*;

pub fn api_command(env: &TestEnv) -> Command {
    stitch_command(Path::new(env!("CARGO_BIN_EXE_e2e-stitch-api")), env)
}

pub fn worker_command(env: &TestEnv) -> Command {
    let mut cmd = stitch_command(Path::new(env!("CARGO_BIN_EXE_e2e-stitch-worker")), env);
    // Short leases and retries so that takeovers happen within a test's patience.
    cmd.env("STITCH__LOCK__TTL", "2s")
        .env("STITCH__SWEEPER__INTERVAL", "500ms")
        .env("STITCH__SWEEPER__OUTBOX_HORIZON", "1s");
    cmd
}

pub fn start_api(env: &TestEnv) -> ServiceProcess {
    ServiceProcess::start(api_command(env), "stitch-api listening")
}

/// An API that leaves the whole file to the merge (`merge.incremental` off): for tests of a
/// merge caught in the middle of copying a whole upload (early assembly has its own, in
/// `prefix.rs`).
pub fn start_api_without_early_assembly(env: &TestEnv) -> ServiceProcess {
    let mut cmd = api_command(env);
    cmd.env("STITCH__MERGE__INCREMENTAL", "false");
    ServiceProcess::start(cmd, "stitch-api listening")
}

pub fn start_worker(env: &TestEnv) -> ServiceProcess {
    ServiceProcess::start(worker_command(env), "stitch-worker listening")
}

pub fn md5_hex(data: &[u8]) -> String {
    stitch_common::digest::Md5::from_bytes(md5::Md5::digest(data).into()).to_hex()
}

/// Sends every chunk of `source` in a random order, spread over `apis`, 4 at a time, with
/// the whole file's MD5 declared.
pub async fn upload(apis: &[ApiClient], id: &str, source: &Source, file_md5: &str) {
    upload_with(apis, id, source, file_md5, 4).await;
}

/// [`upload`], one chunk after the other in index order: the first chunk creates the upload
/// before any other arrives (with chunks in parallel, a chunk that finds the first one's
/// manifest on storage but no record yet rebuilds the upload from storage, and it counts
/// as rebuilt rather than created).
pub async fn upload_in_order(apis: &[ApiClient], id: &str, source: &Source, file_md5: &str) {
    upload_with(apis, id, source, file_md5, 1).await;
}

async fn upload_with(
    apis: &[ApiClient],
    id: &str,
    source: &Source,
    file_md5: &str,
    in_flight: usize,
) {
    use futures_util::StreamExt;
    use rand::seq::SliceRandom;
    let mut order: Vec<u64> = (0..source.total_chunks()).collect();
    if in_flight > 1 {
        order.shuffle(&mut rand::rng());
    }
    let results: Vec<(u16, serde_json::Value)> = futures_util::stream::iter(order)
        .map(|index| {
            let api = &apis[index as usize % apis.len()];
            async move {
                json_response(
                    api.chunk_request(id, source, index)
                        .header("X-File-MD5", file_md5)
                        .header("X-File-Name", "data.bin")
                        .send()
                        .await,
                )
                .await
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    for (code, body) in &results {
        assert_eq!(*code, 200, "{body}");
    }
    assert_eq!(
        results
            .iter()
            .filter(|(_, b)| b["upload_complete"] == true)
            .count(),
        1
    );
}

/// Files in the upload's directory (not the chunks), sorted.
pub fn upload_files(env: &TestEnv, id: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.storage_root.join("uploads").join(id))
        .map(|e| {
            e.flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub fn temp_files(env: &TestEnv, id: &str) -> Vec<String> {
    upload_files(env, id)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

pub fn upload_dir(env: &TestEnv, id: &str) -> PathBuf {
    env.storage_root.join("uploads").join(id)
}

/// Waits until `check` holds (async), polling.
pub async fn until(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The distinct event ids of `kind` events about `id`.
pub fn distinct_event_ids(tap: &EventTap, id: &str, kind: &str) -> Vec<String> {
    distinct_ids(&tap.events_of(id), kind)
}

/// The distinct event ids of the `kind` events among `events`.
pub fn distinct_ids(events: &[serde_json::Value], kind: &str) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The upload's fencing counter: how many merge attempts ever started.
pub fn merge_attempts(env: &TestEnv, id: &str) -> u64 {
    let mut conn = env.redis().unwrap();
    let value: Option<u64> = redis::cmd("GET")
        .arg(format!("{}:{{{id}}}:fence", env.namespace))
        .query(&mut conn)
        .unwrap();
    value.unwrap_or(0)
}

const MINUTE: Duration = Duration::from_secs(60);

/// Where a test sees the events published about an upload: a live [`EventTap`], or a
/// [`DurableTap`] for tests that kill the broker.
pub trait SeenEvents {
    async fn seen(&self, id: &str) -> Vec<serde_json::Value>;
}

impl SeenEvents for EventTap {
    async fn seen(&self, id: &str) -> Vec<serde_json::Value> {
        self.events_of(id)
    }
}

impl SeenEvents for DurableTap {
    async fn seen(&self, id: &str) -> Vec<serde_json::Value> {
        self.events_of(id).await
    }
}

/// Waits until an event of `kind` about `id` was seen.
pub async fn wait_for_event(tap: &impl SeenEvents, id: &str, kind: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let events = tap.seen(id).await;
        if events.iter().any(|e| e["type"] == kind) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} event about {id} within {limit:?}; saw {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What every crash and fault test checks once the fault is over: the upload completed
/// exactly once with the source's size, MD5 and bytes; every `upload.completed` the tap saw
/// carries the one event id the completion record holds; and after one janitor pass the
/// upload's directory holds the manifest, the merged file and its completion record, nothing
/// else (no `.part`, no temporary merge file, no chunk copy, no other attempt's file).
pub async fn assert_completed_once(
    env: &TestEnv,
    tap: &impl SeenEvents,
    client: &ApiClient,
    id: &str,
    source: &Source,
    md5: &str,
) {
    let status = client.wait_for_state(id, "completed", 3 * MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["size"], source.len());
    assert_eq!(status["md5"], md5);
    assert!(
        client.download(id).await == source.bytes,
        "the downloaded bytes differ from the source"
    );
    wait_for_event(tap, id, "upload.completed", 2 * MINUTE).await;

    let mut settings = env.settings();
    // Everything left now is past any use: the upload is completed.
    settings.janitor.grace = stitch_common::config::Interval(Duration::ZERO);
    let backends = stitch_common::backends::Backends::distributed(&settings).unwrap();
    let janitor = stitch_worker::janitor::Janitor::new(&backends, &settings);
    janitor.sweep_once().await.unwrap();

    let storage = &backends.storage;
    let uid = UploadId::parse(id).unwrap();
    let record = storage
        .inventory(&uid)
        .await
        .unwrap()
        .expect("the upload's manifest")
        .completion
        .expect("a completion record");
    let (_, after) = client.status(id).await;
    assert_eq!(
        after["completed_at"], status["completed_at"],
        "the completion changed after the upload completed"
    );
    let event_ids = distinct_ids(&tap.seen(id).await, "upload.completed");
    assert_eq!(
        event_ids,
        vec![record.event_id.clone()],
        "one completion event id, the one the completion record holds"
    );
    assert!(distinct_ids(&tap.seen(id).await, "upload.failed").is_empty());

    let expected: BTreeSet<PathBuf> = [
        storage.manifest_path(&uid),
        storage.attempt(&uid, record.fence).merged,
        storage.completion_path(&uid, record.fence),
    ]
    .into();
    assert_eq!(
        files_under(&storage.upload_dir(&uid)),
        expected,
        "what the upload's directory holds after a janitor pass"
    );
    assert_eq!(
        storage.resolve(&record.location),
        Some(storage.attempt(&uid, record.fence).merged)
    );
}

/// Every file (not directory) under `dir`, at any depth.
pub fn files_under(dir: &std::path::Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            } else {
                files.insert(entry.path());
            }
        }
    }
    files
}

/// Resumes as a client does: asks the status, then sends the chunks it lists as missing, in
/// order; exactly one of them completes the upload. Returns the indices it sent.
pub async fn resume(client: &ApiClient, id: &str, source: &Source, md5: &str) -> Vec<u64> {
    let (code, status) = client.status(id).await;
    assert_eq!(code, 200, "{status}");
    let uploaded: Vec<u64> = status["uploaded_chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect();
    let missing: Vec<u64> = (0..source.total_chunks())
        .filter(|i| !uploaded.contains(i))
        .collect();
    let mut completing = 0;
    for &index in &missing {
        let (code, body) = json_response(
            client
                .chunk_request(id, source, index)
                .header("X-File-MD5", md5)
                .header("X-File-Name", "data.bin")
                .send()
                .await,
        )
        .await;
        assert_eq!(code, 200, "chunk {index}: {body}");
        completing += usize::from(body["upload_complete"] == true);
    }
    assert_eq!(completing, 1, "one chunk completed the upload");
    missing
}

/// The series of metric `name` with `label` = `value`, as `/metrics` names it.
pub fn series(name: &str, label: &str, value: &str) -> String {
    format!("{name}{{{label}=\"{value}\"}}")
}

/// The value of the counter `name` on `process`'s `/metrics`.
pub async fn counter(process: &ServiceProcess, name: &str) -> f64 {
    let url = format!("http://{}/metrics", process.addr);
    let text = http_client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics of {url}:\n{text}"))
}
