//! Crashes at every boundary between two durable steps (invariants 1, 3, 5 and 9): a
//! failpoint armed through `FAILPOINTS` makes the real API or worker process SIGKILL itself
//! at the line, the process is started again without it, and the upload still completes
//! exactly once, with the right bytes, one completion event id and nothing left over once
//! the janitor passed. The failpoints and what Stitch guarantees at each are listed in
//! `docs/reliability.md`.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use stitch_common::failpoints::{
    CHUNK_DURABLE_BEFORE_RECORD, MERGE_COMMITTED_BEFORE_PUBLISH, MERGE_PUBLISHED_BEFORE_ACK,
    MERGE_RENAMED_BEFORE_COMMIT, QUOTA_RESERVED_BEFORE_MANIFEST, SEGMENT_DURABLE_BEFORE_RECORD,
};
use stitch_common::id::UploadId;
use stitch_testkit::tus::{Tus, id_of};

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

/// Waits until `worker` handled a merge job of an upload that was already completed (the
/// crashed worker's unacked job, redelivered): its `/metrics` count such an outcome. The
/// outcome is counted after the completion event was published again.
async fn wait_for_redelivered_job(worker: &ServiceProcess) {
    let url = format!("http://{}/metrics", worker.addr);
    let series = format!(
        "{}{{outcome=\"already_completed\"}} ",
        stitch_common::metrics::MERGES
    );
    until(2 * MINUTE, "the redelivered job", async || {
        let Ok(response) = http_client().get(&url).send().await else {
            return false;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines().any(|line| {
            line.strip_prefix(&series)
                .and_then(|value| value.trim().parse::<f64>().ok())
                .is_some_and(|n| n >= 1.0)
        })
    })
    .await;
}

/// Sends `index` of `source` with the upload's declarations.
fn chunk(
    client: &ApiClient,
    id: &str,
    source: &Source,
    md5: &str,
    index: u64,
) -> reqwest::RequestBuilder {
    client
        .chunk_request(id, source, index)
        .header("X-File-MD5", md5)
        .header("X-File-Name", "data.bin")
}

/// Starts an API whose failpoint `chunk-durable-before-record` crashes it at chunk
/// `crash_at` of a three-chunk upload sent in order; checks that the crash came after the
/// chunk's copy (and the manifest) were durable and that the client got no answer; starts a
/// fresh API and resumes. Returns the indices the resume sent.
async fn crash_api_at_chunk(env: &TestEnv, tap: &EventTap, crash_at: u64, seed: u64) -> Vec<u64> {
    // `<n>*off->return`: pass the line n times, crash at the next.
    let action = format!("{CHUNK_DURABLE_BEFORE_RECORD}={crash_at}*off->return");
    let mut cmd = api_command(env);
    cmd.env("FAILPOINTS", action);
    let mut api = ServiceProcess::start(cmd, "stitch-api listening");
    let (source, md5) = small_file(seed);
    let id = new_id();
    let crashed = ApiClient::new(api.addr);
    for index in 0..crash_at {
        let (code, body) =
            json_response(chunk(&crashed, &id, &source, &md5, index).send().await).await;
        assert_eq!(code, 200, "{body}");
    }
    let sent = chunk(&crashed, &id, &source, &md5, crash_at).send().await;
    assert!(sent.is_err(), "chunk {crash_at} was answered: {sent:?}");
    wait_for_crash(&mut api);

    let storage = stitch_common::storage::FsChunkStore::new(env.storage_root.clone(), true);
    let uid = UploadId::parse(&id).unwrap();
    assert!(
        storage.manifest_path(&uid).is_file(),
        "the manifest was durable before the crash"
    );
    let copies = storage.copy_files_blocking(&uid).unwrap();
    assert_eq!(
        copies
            .iter()
            .filter(|c| c.piece.is_some() && c.len == source.chunk_size)
            .count() as u64,
        crash_at + 1,
        "a complete copy of every chunk sent, the crashed one's too: {copies:?}"
    );

    let api = start_api(env);
    let client = ApiClient::new(api.addr);
    let sent = resume(&client, &id, &source, &md5).await;
    assert_completed_once(env, tap, &client, &id, &source, &md5).await;
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_between_a_first_chunks_durable_copy_and_its_record_resumes_from_storage() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    // The state store never heard of the upload: the status rebuilds it from storage (the
    // manifest and the crashed chunk's complete copy), so the chunk counts without a re-send.
    let sent = crash_api_at_chunk(&env, &tap, 0, 61).await;
    assert_eq!(sent, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_between_a_later_chunks_durable_copy_and_its_record_counts_the_resent_chunk_once()
 {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    // The state store knows the upload, without the crashed chunk: the client re-sends it,
    // and the uncounted copy is surplus for the merge's cleanup and the janitor.
    let sent = crash_api_at_chunk(&env, &tap, 1, 65).await;
    assert_eq!(sent, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_between_a_tus_segments_durable_copy_and_its_count_resumes_from_the_offset_before()
 {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    let mut api = ServiceProcess::start(
        armed(api_command(&env), SEGMENT_DURABLE_BEFORE_RECORD),
        "stitch-api listening",
    );
    let (source, md5) = small_file(66);
    let crashed = Tus::new(http_client(), &format!("http://{}", api.addr));
    let created = crashed.create(source.len(), None).await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = id_of(&created.location()).to_owned();
    let url = |addr| format!("http://{addr}/files/{id}");
    let sent = crashed
        .patch_request(&url(api.addr), 0, source.bytes.clone())
        .send()
        .await;
    assert!(sent.is_err(), "the PATCH was answered: {sent:?}");
    wait_for_crash(&mut api);
    let storage = stitch_common::storage::FsChunkStore::new(env.storage_root.clone(), true);
    let copies = storage
        .copy_files_blocking(&UploadId::parse(&id).unwrap())
        .unwrap();
    assert!(
        copies
            .iter()
            .any(|c| c.piece.is_some() && c.len == source.len()),
        "the segment was durable before the crash: {copies:?}"
    );

    let api = start_api(&env);
    let client = Tus::new(http_client(), &format!("http://{}", api.addr));
    let head = client.head(&url(api.addr)).await;
    assert_eq!(
        head.offset(),
        Some(0),
        "the segment was never counted: {head:?}"
    );
    // The lease of the killed request lapses (the worker's short lock TTL is not the API's:
    // the API's append lease is its default), then the client sends it all again.
    let resent = client
        .patch_when_free(
            &url(api.addr),
            0,
            &source.bytes,
            60,
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(resent.status, 204, "{resent:?}");
    assert_completed_once(&env, &tap, &ApiClient::new(api.addr), &id, &source, &md5).await;
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

    // The event is published from the outbox (the sweeper) and again when the unacked job
    // comes back and finds the upload completed: both under the committed id.
    let worker = start_worker(&env);
    wait_for_redelivered_job(&worker).await;
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
    let worker = start_worker(&env);
    wait_for_redelivered_job(&worker).await;
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    assert_eq!(merge_attempts(&env, &id), 1, "the upload was merged once");
}

/// `cmd` with one active upload allowed per tenant.
fn one_active_upload(mut cmd: Command) -> Command {
    cmd.env("STITCH__AUTH__QUOTAS__MAX_ACTIVE_UPLOADS", "1");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_between_a_quota_reservation_and_the_manifest_does_not_keep_the_slot() {
    let env = TestEnv::new();
    let (source, md5) = small_file(71);
    let stranded = new_id();
    let mut api = ServiceProcess::start(
        armed(
            one_active_upload(api_command(&env)),
            QUOTA_RESERVED_BEFORE_MANIFEST,
        ),
        "stitch-api listening",
    );
    let sent = chunk(&ApiClient::new(api.addr), &stranded, &source, &md5, 0)
        .send()
        .await;
    assert!(sent.is_err(), "the first chunk was answered: {sent:?}");
    wait_for_crash(&mut api);
    assert!(
        !upload_dir(&env, &stranded).exists(),
        "nothing on storage names the upload whose creation died"
    );

    // The dead creation's reservation holds the tenant's only slot.
    let api = ServiceProcess::start(one_active_upload(api_command(&env)), "stitch-api listening");
    let client = ApiClient::new(api.addr);
    let id = new_id();
    let (code, body) = json_response(chunk(&client, &id, &source, &md5, 0).send().await).await;
    assert_eq!((code, error_code(&body)), (429, "quota_exceeded"), "{body}");

    // The janitor gives it back once the grace has passed, and the tenant uploads again.
    let mut cmd = worker_command(&env);
    cmd.env("STITCH__JANITOR__GRACE", "1s")
        .env("STITCH__JANITOR__INTERVAL", "200ms");
    let worker = ServiceProcess::start(cmd, "stitch-worker listening");
    until(MINUTE, "the stranded reservation's release", async || {
        let (code, _) = json_response(chunk(&client, &id, &source, &md5, 0).send().await).await;
        code == 200
    })
    .await;
    assert_eq!(
        counter(&worker, stitch_common::metrics::QUOTA_RESERVATIONS_RELEASED).await,
        1.0,
        "exactly the stranded reservation was released"
    );
    for index in 1..source.total_chunks() {
        let (code, body) =
            json_response(chunk(&client, &id, &source, &md5, index).send().await).await;
        assert_eq!(code, 200, "chunk {index}: {body}");
    }
    until(MINUTE, "the upload's completion", async || {
        client.status(&id).await.1["state"] == "completed"
    })
    .await;
}
