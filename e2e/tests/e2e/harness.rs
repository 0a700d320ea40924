//! Starting the programs, uploading, looking at storage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use md5::Digest;
pub use stitch_testkit::events::EventTap;
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

pub fn start_worker(env: &TestEnv) -> ServiceProcess {
    ServiceProcess::start(worker_command(env), "stitch-worker listening")
}

pub fn md5_hex(data: &[u8]) -> String {
    stitch_common::digest::Md5::from_bytes(md5::Md5::digest(data).into()).to_hex()
}

/// Sends every chunk of `source` in a random order, spread over `apis`, 4 at a time, with
/// the whole file's MD5 declared.
pub async fn upload(apis: &[ApiClient], id: &str, source: &Source, file_md5: &str) {
    use futures_util::StreamExt;
    use rand::seq::SliceRandom;
    let mut order: Vec<u64> = (0..source.total_chunks()).collect();
    order.shuffle(&mut rand::rng());
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
        .buffer_unordered(4)
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
    let mut ids: Vec<String> = tap
        .events_of(id)
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
    let mut conn = redis_connection().unwrap();
    let value: Option<u64> = redis::cmd("GET")
        .arg(format!("{}:{{{id}}}:fence", env.namespace))
        .query(&mut conn)
        .unwrap();
    value.unwrap_or(0)
}
