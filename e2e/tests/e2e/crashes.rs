//! Crashes at every boundary between two durable steps (invariants 1, 3, 5 and 9): a
//! failpoint armed through `FAILPOINTS` makes the real API or worker process SIGKILL itself
//! at the line, the process is started again without it, and the upload still completes
//! exactly once, with the right bytes, one completion event id and nothing left over once
//! the janitor passed. The failpoints and what Stitch guarantees at each are listed in
//! `docs/reliability.md`.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use stitch_common::failpoints::{
    CHUNK_DURABLE_BEFORE_RECORD, MERGE_COMMITTED_BEFORE_PUBLISH, MERGE_PUBLISHED_BEFORE_ACK,
    MERGE_RENAMED_BEFORE_COMMIT,
};
use stitch_common::id::UploadId;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);
/// SIGKILL's number: how a process that crashed at a failpoint ends.
const SIGKILL: i32 = 9;

/// `cmd` with `failpoint` armed to crash at its first pass.
fn armed(mut cmd: Command, failpoint: &str) -> Command {
    cmd.env("FAILPOINTS", format!("{failpoint}=return"));
    cmd
}

/// Waits for `process` to die at its failpoint, and checks that it died of SIGKILL.
fn wait_for_crash(process: &mut ServiceProcess) {
    let status = process.wait_exit(2 * MINUTE);
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "the process ended by {status}, not at its failpoint; its last output:\n{}",
        process.log_tail()
    );
}

/// A 3 MiB file in three 1 MiB chunks, and its MD5.
fn small_file(seed: u64) -> (Source, String) {
    let source = Source::random(3 << 20, 1 << 20, seed);
    let md5 = md5_hex(&source.bytes);
    (source, md5)
}

/// What every crash test checks once the crashed process was replaced: the upload completed
/// exactly once with the source's size, MD5 and bytes; every `upload.completed` the tap saw
/// carries the one event id the completion record holds; and after one janitor pass the
/// upload's directory holds the manifest, the merged file and its completion record, nothing
/// else (no `.part`, no temporary merge file, no chunk copy, no other attempt's file).
async fn assert_completed_once(
    env: &TestEnv,
    tap: &EventTap,
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
    tap.wait_for(id, "upload.completed", 2 * MINUTE).await;

    let settings = env.settings();
    let backends = stitch_common::backends::Backends::distributed(&settings).unwrap();
    let janitor = stitch_worker::janitor::Janitor {
        state: backends.state.clone(),
        quotas: backends.quotas.clone(),
        storage: backends.storage.clone(),
        events: backends.events.clone(),
        lock: backends.lock.clone(),
        recovery: stitch_common::recovery::Recovery::new(
            backends.state.clone(),
            backends.storage.clone(),
            backends.events.clone(),
            60_000,
        ),
        interval: Duration::from_secs(3600),
        // Everything left now is past any use: the upload is completed.
        grace: Duration::ZERO,
        ttl: Duration::from_secs(3600),
        completed_retention: None,
    };
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
    let event_ids = distinct_event_ids(tap, id, "upload.completed");
    assert_eq!(
        event_ids,
        vec![record.event_id.clone()],
        "one completion event id, the one the completion record holds"
    );
    assert!(distinct_event_ids(tap, id, "upload.failed").is_empty());

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
fn files_under(dir: &std::path::Path) -> BTreeSet<PathBuf> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_after_a_chunk_is_durable_and_before_it_is_recorded_loses_nothing_once_the_client_resends()
 {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    let mut api = ServiceProcess::start(
        armed(api_command(&env), CHUNK_DURABLE_BEFORE_RECORD),
        "stitch-api listening",
    );
    let (source, md5) = small_file(61);
    let id = new_id();

    // The upload's first chunk: the API dies after its copy and the manifest are durable,
    // before the state store counts the chunk, and the client gets no answer.
    let sent = ApiClient::new(api.addr)
        .chunk_request(&id, &source, 0)
        .header("X-File-MD5", &md5)
        .header("X-File-Name", "data.bin")
        .send()
        .await;
    assert!(sent.is_err(), "the chunk was answered: {sent:?}");
    wait_for_crash(&mut api);
    let storage = stitch_common::storage::FsChunkStore::new(env.storage_root.clone(), true);
    let uid = UploadId::parse(&id).unwrap();
    assert!(
        storage.manifest_path(&uid).is_file(),
        "the manifest was durable before the crash"
    );
    let copies = storage.copy_files_blocking(&uid).unwrap();
    assert!(
        copies.len() == 1 && copies[0].piece.is_some() && copies[0].len == source.chunk_size,
        "one complete copy of chunk 0 was durable before the crash: {copies:?}"
    );

    // The client resumes against a fresh API: it re-sends every chunk it has no answer for.
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_after_the_rename_and_before_the_commit_leaves_the_merge_to_a_redelivery() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let mut worker = ServiceProcess::start(
        armed(worker_command(&env), MERGE_RENAMED_BEFORE_COMMIT),
        "stitch-worker listening",
    );
    let (source, md5) = small_file(62);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_for_crash(&mut worker);

    // The merged file and its completion record are on storage, the state store never
    // heard of them: the upload is still merging and nothing was announced.
    let (_, status) = client.status(&id).await;
    assert_eq!(status["state"], "merging", "{status}");
    let storage = stitch_common::storage::FsChunkStore::new(env.storage_root.clone(), true);
    let uid = UploadId::parse(&id).unwrap();
    assert_eq!(storage.merged_files_blocking(&uid).unwrap().len(), 1);
    assert!(
        tap.events_of(&id)
            .iter()
            .all(|e| e["type"] != "upload.completed")
    );

    let _worker = start_worker(&env);
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    assert!(
        merge_attempts(&env, &id) >= 2,
        "the crashed attempt's commit never happened; a later attempt committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_after_the_commit_and_before_the_publish_still_announces_the_upload_once() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let mut worker = ServiceProcess::start(
        armed(worker_command(&env), MERGE_COMMITTED_BEFORE_PUBLISH),
        "stitch-worker listening",
    );
    let (source, md5) = small_file(63);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_for_crash(&mut worker);

    // Committed, not announced: the event waits in the upload's outbox.
    let (_, status) = client.status(&id).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert!(
        tap.events_of(&id)
            .iter()
            .all(|e| e["type"] != "upload.completed")
    );

    let _worker = start_worker(&env);
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    assert_eq!(merge_attempts(&env, &id), 1, "the upload was merged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_after_the_publish_and_before_the_ack_republishes_the_same_event_id_only() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let mut worker = ServiceProcess::start(
        armed(worker_command(&env), MERGE_PUBLISHED_BEFORE_ACK),
        "stitch-worker listening",
    );
    let (source, md5) = small_file(64);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_for_crash(&mut worker);
    tap.wait_for(&id, "upload.completed", MINUTE).await;

    // The unacked job comes back to the fresh worker, which finds the upload completed and
    // publishes its completion again, under the same id.
    let _worker = start_worker(&env);
    until(2 * MINUTE, "the redelivered job's event", async || {
        tap.events_of(&id)
            .iter()
            .filter(|e| e["type"] == "upload.completed")
            .count()
            >= 2
    })
    .await;
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    assert_eq!(merge_attempts(&env, &id), 1, "the upload was merged once");
}
