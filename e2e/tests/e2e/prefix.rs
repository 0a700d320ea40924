//! Verification that keeps pace (`merge.incremental`): the API assembles and hashes an
//! upload's in-order prefix while the chunks arrive and saves the hashes' state with it; a
//! crash carries on from the saved state, and the merge hashes only what the prefix did not
//! cover. Each test removes the chunk files the saved prefix covers before going on, so the
//! upload can only complete with the right MD5 if the saved state was used.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use stitch_common::failpoints::PREFIX_SAVED;
use stitch_common::id::UploadId;
use stitch_common::storage::{FsChunkStore, SavedPrefix};
use stitch_testkit::tus::{Tus, id_of};

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

/// Eight 1 MiB chunks, and the file's MD5.
fn file(seed: u64) -> (Source, String) {
    let source = Source::random(8 << 20, 1 << 20, seed);
    let md5 = md5_hex(&source.bytes);
    (source, md5)
}

async fn send(client: &ApiClient, id: &str, source: &Source, md5: &str, index: u64) {
    let (code, body) = json_response(
        client
            .chunk_request(id, source, index)
            .header("X-File-MD5", md5)
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 200, "chunk {index}: {body}");
}

/// Waits until the upload's saved prefix covers at least `chunks` chunks, and returns it.
async fn wait_for_prefix(storage: &FsChunkStore, id: &UploadId, chunks: u64) -> SavedPrefix {
    until(MINUTE, "the saved prefix", async || {
        storage
            .saved_prefix(id)
            .await
            .unwrap()
            .is_some_and(|p| p.checkpoint.chunks >= chunks)
    })
    .await;
    storage.saved_prefix(id).await.unwrap().unwrap()
}

/// Removes the chunk files a saved prefix covers: from now on, only its saved hash state
/// and assembly file can account for those bytes.
fn remove_covered_chunks(storage: &FsChunkStore, id: &UploadId, prefix: &SavedPrefix) {
    let covered: Vec<_> = storage
        .copy_files_blocking(id)
        .unwrap()
        .into_iter()
        .filter(|c| {
            matches!(c.piece, Some(stitch_common::storage::Piece::Chunk(i)) if i.0 < prefix.checkpoint.chunks)
        })
        .collect();
    assert_eq!(
        covered.len() as u64,
        prefix.checkpoint.chunks,
        "{covered:?}"
    );
    for copy in covered {
        std::fs::remove_file(&copy.path).unwrap();
    }
}

/// Waits for the counter `name` on `process` to reach `value` (a step counts its bytes just
/// after saving its checkpoint), then checks that it stopped there.
async fn counter_settles_at(process: &ServiceProcess, name: &str, value: f64) {
    let mut last = 0.0;
    let reached = tokio::time::timeout(MINUTE, async {
        loop {
            last = counter(process, name).await;
            if last >= value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "{name} stayed at {last}, short of {value}");
    assert_eq!(counter(process, name).await, value, "{name}");
}

/// The worker's count of merged bytes it took from a saved prefix.
async fn prefix_bytes_merged(worker: &ServiceProcess) -> f64 {
    counter(worker, stitch_common::metrics::MERGE_PREFIX_BYTES).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_merge_of_an_upload_sent_in_order_hashes_only_what_the_prefix_did_not_cover() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let worker = start_worker(&env);
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let storage = FsChunkStore::new(env.storage_root.clone(), true);
    let (source, md5) = file(161);
    let id = new_id();
    let uid = UploadId::parse(&id).unwrap();
    for index in 0..6 {
        send(&client, &id, &source, &md5, index).await;
    }
    // The API stops short of the last chunk: that one completes the upload and the merge
    // finishes the file.
    let prefix = wait_for_prefix(&storage, &uid, 6).await;
    assert_eq!(prefix.checkpoint.hashes.offset, 6 << 20);
    remove_covered_chunks(&storage, &uid, &prefix);
    for index in 6..8 {
        send(&client, &id, &source, &md5, index).await;
    }
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    // At least the six chunks (the API may have assembled the seventh before the merge).
    assert!(prefix_bytes_merged(&worker).await >= (6 << 20) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_after_saving_the_prefix_carries_on_from_the_saved_hash_state() {
    killed_after_saving_the_prefix(TestEnv::new(), 0.0).await;
}

/// With hashing in line, the checkpoints the killed API saves hold the state its lane
/// computed from memory: the file only verifies if that state was right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_after_saving_a_prefix_hashed_in_line_carries_on_from_its_state() {
    let env = TestEnv::new_in(&stitch_testkit::reflink::reflink_dir());
    killed_after_saving_the_prefix(env, (1 << 20) as f64).await;
}

/// Sends chunk 0 to an API that dies right after saving its second checkpoint, checks that
/// `in_line` bytes of the first were hashed in line, then sends the rest (chunks 1 and 2
/// maybe twice) and has a fresh API and the merge finish from the saved state alone.
async fn killed_after_saving_the_prefix(env: std::sync::Arc<TestEnv>, in_line: f64) {
    use stitch_common::metrics::HASHED_IN_LINE_BYTES;
    let tap = EventTap::start(&env).await;
    let worker = start_worker(&env);
    // Pass the line once (the first checkpoint), crash at the second.
    let mut cmd = api_command(&env);
    cmd.env("FAILPOINTS", format!("{PREFIX_SAVED}=1*off->return"));
    let mut crashing = ServiceProcess::start(cmd, "stitch-api listening");
    let client = ApiClient::new(crashing.addr);
    let storage = FsChunkStore::new(env.storage_root.clone(), true);
    let (source, md5) = file(162);
    let id = new_id();
    let uid = UploadId::parse(&id).unwrap();

    send(&client, &id, &source, &md5, 0).await;
    let first = wait_for_prefix(&storage, &uid, 1).await;
    assert_eq!(first.checkpoint.chunks, 1);
    counter_settles_at(&crashing, HASHED_IN_LINE_BYTES, in_line).await;
    // Chunk 1 carries the prefix on: the API dies right after saving that checkpoint, maybe
    // before its answer went out, maybe after chunk 2 was counted too.
    for index in [1, 2] {
        let _ = client
            .chunk_request(&id, &source, index)
            .header("X-File-MD5", &md5)
            .send()
            .await;
    }
    let status = crashing.wait_exit(2 * MINUTE);
    assert_eq!(
        status.signal(),
        Some(9),
        "the API ended by {status}, not at its failpoint:\n{}",
        crashing.log_tail()
    );
    let saved = storage.saved_prefix(&uid).await.unwrap().unwrap();
    assert!(
        saved.checkpoint.chunks > 1,
        "the second checkpoint was saved before the crash: {saved:?}"
    );
    remove_covered_chunks(&storage, &uid, &saved);

    // A fresh API: the client resumes, the prefix goes on from the saved state, and the
    // merge from wherever the prefix got to.
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    resume(&client, &id, &source, &md5).await;
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    assert!(prefix_bytes_merged(&worker).await >= saved.checkpoint.hashes.offset as f64);
}

/// A step reads only the counted chunks after the prefix it saved last, so that it costs the
/// same at an upload's first chunk and at its ten-thousandth; when its checkpoint is not the
/// file it saved any more (another API's step replaced it) it reads them all again and
/// carries on from what storage holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_step_of_the_prefix_reads_only_the_chunks_after_it() {
    let all_read = series(stitch_common::metrics::ASSEMBLY_READS, "parts", "all");
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let storage = FsChunkStore::new(env.storage_root.clone(), true);
    let (source, md5) = file(167);
    let id = new_id();
    let uid = UploadId::parse(&id).unwrap();
    for index in 0..6 {
        send(&client, &id, &source, &md5, index).await;
        wait_for_prefix(&storage, &uid, index + 1).await;
    }
    assert_eq!(
        counter(&api, &all_read).await,
        1.0,
        "only the first step read every counted chunk"
    );

    // Another writer saves the same checkpoint again: a file of its own, in its place.
    let saved = storage.saved_prefix(&uid).await.unwrap().unwrap();
    let name = format!("prefix.{}.json", saved.checkpoint.hashes.offset);
    let path = upload_dir(&env, &id).join(&name);
    let again = upload_dir(&env, &id).join(format!(".{name}.again"));
    std::fs::copy(&path, &again).unwrap();
    std::fs::rename(&again, &path).unwrap();
    send(&client, &id, &source, &md5, 6).await;
    let prefix = wait_for_prefix(&storage, &uid, 7).await;
    assert_eq!(counter(&api, &all_read).await, 2.0);
    assert_eq!(
        prefix.path, saved.path,
        "carried on from the checkpoint on storage"
    );
    remove_covered_chunks(&storage, &uid, &prefix);
    send(&client, &id, &source, &md5, 7).await;
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_sent_out_of_order_are_assembled_once_the_gap_before_them_fills() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let storage = FsChunkStore::new(env.storage_root.clone(), true);
    let (source, md5) = file(163);
    let id = new_id();
    let uid = UploadId::parse(&id).unwrap();
    for index in [3, 1, 2, 5] {
        send(&client, &id, &source, &md5, index).await;
    }
    // Nothing from byte 0 yet: no prefix.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(storage.saved_prefix(&uid).await.unwrap().is_none());
    send(&client, &id, &source, &md5, 0).await;
    let prefix = wait_for_prefix(&storage, &uid, 4).await;
    assert_eq!(prefix.checkpoint.chunks, 4, "0 to 3, up to the gap at 4");
    for index in [7, 4, 6] {
        send(&client, &id, &source, &md5, index).await;
    }
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_killed_while_it_finishes_the_assembled_file_leaves_the_next_attempt_the_checkpoint()
 {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let storage = FsChunkStore::new(env.storage_root.clone(), true);
    // Three 128 MiB chunks: the API assembles two, the merge appends the third in 4 KiB
    // blocks, slow enough to be caught in the middle.
    let source = Source::random(384 << 20, 128 << 20, 164);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    let uid = UploadId::parse(&id).unwrap();
    for index in 0..2 {
        send(&client, &id, &source, &md5, index).await;
    }
    let prefix = wait_for_prefix(&storage, &uid, 2).await;
    assert_eq!(prefix.checkpoint.hashes.offset, 256 << 20);
    remove_covered_chunks(&storage, &uid, &prefix);

    let mut slow = worker_command(&env);
    slow.env("STITCH__MERGE__BUFFER_BYTES", "4KiB");
    let mut first = ServiceProcess::start(slow, "stitch-worker listening");
    send(&client, &id, &source, &md5, 2).await;
    until(MINUTE, "the merge to take its fence", async || {
        merge_attempts(&env, &id) >= 1
    })
    .await;
    first.signal("STOP");
    let (_, status) = client.status(&id).await;
    assert_eq!(
        status["state"], "merging",
        "the merge was caught in the middle: {status}"
    );
    first.kill();
    // The killed attempt wrote into the assembled file, maybe past the checkpoint; the
    // checkpoint and the file are still there for the next attempt.
    let saved = storage.saved_prefix(&uid).await.unwrap().unwrap();
    assert_eq!(saved.checkpoint, prefix.checkpoint);

    let second = start_worker(&env);
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    assert!(merge_attempts(&env, &id) >= 2);
    assert_eq!(prefix_bytes_merged(&second).await, (256 << 20) as f64);
}

/// An API paused in the middle of a step, whose lease lapses meanwhile, goes on writing into
/// the assembly file after the merge took it over, finished it and published it as the
/// upload's file: it writes the bytes of the same counted copies at the same offsets, so the
/// file it writes into stays the verified one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_paused_in_a_step_past_its_lease_leaves_the_merged_file_as_verified() {
    use stitch_common::metrics::ASSEMBLY_BYTES;
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _worker = start_worker(&env);
    // Steps in 4 KiB blocks (slow enough to be caught in the middle), under a 1 s lease.
    let mut slow = api_command(&env);
    slow.env("STITCH__MERGE__BUFFER_BYTES", "4KiB")
        .env("STITCH__LOCK__TTL", "1s");
    let stale = ServiceProcess::start(slow, "stitch-api listening");
    let client = ApiClient::new(stale.addr);
    let other = start_api(&env);
    let storage = FsChunkStore::new(env.storage_root.clone(), true);
    let source = Source::random(384 << 20, 128 << 20, 169);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    let uid = UploadId::parse(&id).unwrap();
    send(&client, &id, &source, &md5, 0).await;
    let first = wait_for_prefix(&storage, &uid, 1).await;

    // Chunk 1: stop the API once its step has written part of it into the assembly file.
    send(&client, &id, &source, &md5, 1).await;
    let past_chunk_0 =
        || std::fs::metadata(&first.path).is_ok_and(|m| m.len() > (128 << 20) + (4 << 20));
    until(
        MINUTE,
        "the step over chunk 1 to be under way",
        async || past_chunk_0(),
    )
    .await;
    stale.signal("STOP");
    let saved = storage.saved_prefix(&uid).await.unwrap().unwrap();
    assert_eq!(
        saved.checkpoint, first.checkpoint,
        "the API was stopped before its step over chunk 1 ended"
    );

    // The last chunk, through another API: the merge waits out the lapsed lease, takes the
    // assembly file over from the checkpoint of chunk 0, and publishes it.
    let other_client = ApiClient::new(other.addr);
    send(&other_client, &id, &source, &md5, 2).await;
    assert_completed_once(&env, &tap, &other_client, &id, &source, &md5).await;

    // The paused API wakes and finishes its step into the published file.
    stale.signal("CONT");
    counter_settles_at(&stale, ASSEMBLY_BYTES, (256 << 20) as f64).await;
    let (_, status) = other_client.status(&id).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert!(
        other_client.download(&id).await == source.bytes,
        "the merged file changed under the stale step"
    );
}

/// A tus upload whose segments may differ in size: a large first one whose step (reading
/// it back in 4 KiB blocks) is slow, then small ones counted while that step runs.
struct SlowStep {
    _worker: ServiceProcess,
    api: ServiceProcess,
    storage: FsChunkStore,
    tus: Tus,
    url: String,
    id: String,
    uid: UploadId,
    bytes: Vec<u8>,
    sent: usize,
}

impl SlowStep {
    const BIG: usize = 128 << 20;
    const SMALL: usize = 4 << 10;

    /// The API's lease lasts `lease_ttl`.
    async fn start(env: &TestEnv, lease_ttl: &str) -> Self {
        let worker = start_worker(env);
        let mut slow = api_command(env);
        slow.env("STITCH__MERGE__BUFFER_BYTES", "4KiB")
            .env("STITCH__MERGE__HASH_IN_LINE", "false")
            .env("STITCH__TUS__SEGMENT_SIZE", "128MiB")
            .env("STITCH__LOCK__TTL", lease_ttl);
        let api = ServiceProcess::start(slow, "stitch-api listening");
        let len = Self::BIG + 3 * Self::SMALL;
        let bytes = Source::random(len, len as u64, 171).bytes;
        let tus = Tus::new(http_client(), &format!("http://{}", api.addr));
        let url = tus.create(bytes.len() as u64, None).await.location();
        let id = id_of(&url).to_owned();
        Self {
            _worker: worker,
            storage: FsChunkStore::new(env.storage_root.clone(), true),
            uid: UploadId::parse(&id).unwrap(),
            api,
            tus,
            url,
            id,
            bytes,
            sent: 0,
        }
    }

    async fn patch(&mut self, len: usize) {
        let end = self.sent + len;
        let answer = self
            .tus
            .patch(
                &self.url,
                self.sent as u64,
                self.bytes[self.sent..end].to_vec(),
            )
            .await;
        assert_eq!(answer.status, 204, "{answer:?}");
        self.sent = end;
    }

    /// The big segment, then two small ones while its step still runs.
    async fn three_segments_during_one_step(&mut self) {
        self.patch(Self::BIG).await;
        self.patch(Self::SMALL).await;
        self.patch(Self::SMALL).await;
        assert!(
            self.storage
                .saved_prefix(&self.uid)
                .await
                .unwrap()
                .is_none(),
            "the two small segments were counted while the step over the first one ran"
        );
    }

    /// The prefix reaches the three segments; then the last one completes the upload.
    async fn completes(&mut self) {
        let prefix = wait_for_prefix(&self.storage, &self.uid, 3).await;
        assert_eq!(prefix.checkpoint.chunks, 3, "every segment counted so far");
        self.patch(self.bytes.len() - self.sent).await;
        let client = ApiClient::new(self.api.addr);
        let status = client.wait_for_state(&self.id, "completed", MINUTE).await;
        assert_eq!(status["md5"], md5_hex(&self.bytes), "{status}");
        assert!(
            client.download(&self.id).await == self.bytes,
            "the merged file differs"
        );
    }

    async fn leases_taken(&self) -> f64 {
        let taken = series(stitch_common::metrics::ASSEMBLY_LEASES, "result", "taken");
        counter(&self.api, &taken).await
    }
}

/// Parts counted while a step runs are carried on under the lease that step holds: one
/// lease for a run of parts, not one per part (each costs Redis a `SET NX` and a release).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_counted_while_a_step_runs_are_carried_on_under_its_lease() {
    let env = TestEnv::new();
    let mut upload = SlowStep::start(&env, "30s").await;
    upload.three_segments_during_one_step().await;
    upload.completes().await;
    assert_eq!(
        upload.leases_taken().await,
        1.0,
        "one lease for the three segments"
    );
}

/// A lease that lapsed while its holder was stopped is not held on to for the parts counted
/// meanwhile: they are carried on under a new one, not left to the merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_counted_while_the_lease_lapsed_are_carried_on_under_a_new_one() {
    let env = TestEnv::new();
    let mut upload = SlowStep::start(&env, "1s").await;
    upload.three_segments_during_one_step().await;
    // Past the lease, in the middle of the step.
    upload.api.signal("STOP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    upload.api.signal("CONT");
    upload.completes().await;
    assert_eq!(
        upload.leases_taken().await,
        2.0,
        "a new lease after the lapsed one"
    );
}

/// Hashing in line (`merge.hash_in_line`): chunks sent in order are hashed from memory as
/// they arrive; the prefix only clones them into the assembly file and saves the state their
/// lane reached. Removing the chunk files then leaves the merge nothing to read but the saved
/// state, so the file verifies only if that state was right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_sent_in_order_are_hashed_as_they_arrive_not_read_back() {
    use stitch_common::metrics::{ASSEMBLY_BYTES, HASHED_IN_LINE_BYTES};
    for (seed, in_line) in [(165, true), (166, false)] {
        let env = TestEnv::new_in(&stitch_testkit::reflink::reflink_dir());
        let tap = EventTap::start(&env).await;
        let _worker = start_worker(&env);
        let mut cmd = api_command(&env);
        cmd.env("STITCH__MERGE__HASH_IN_LINE", in_line.to_string());
        let api = ServiceProcess::start(cmd, "stitch-api listening");
        let client = ApiClient::new(api.addr);
        let storage = FsChunkStore::new(env.storage_root.clone(), true);
        let (source, md5) = file(seed);
        let id = new_id();
        let uid = UploadId::parse(&id).unwrap();
        for index in 0..6 {
            send(&client, &id, &source, &md5, index).await;
        }
        let prefix = wait_for_prefix(&storage, &uid, 6).await;
        let assembled = prefix.checkpoint.hashes.offset as f64;
        counter_settles_at(&api, ASSEMBLY_BYTES, assembled).await;
        let expected = if in_line { assembled } else { 0.0 };
        counter_settles_at(&api, HASHED_IN_LINE_BYTES, expected).await;
        remove_covered_chunks(&storage, &uid, &prefix);
        for index in 6..8 {
            send(&client, &id, &source, &md5, index).await;
        }
        assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_file_system_that_shares_blocks_every_byte_is_cloned_into_the_file_not_written_again()
{
    use stitch_common::metrics::CLONED_BYTES;
    let env = TestEnv::new_in(&stitch_testkit::reflink::reflink_dir());
    let tap = EventTap::start(&env).await;
    let worker = start_worker(&env);
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let storage = FsChunkStore::new(env.storage_root.clone(), true);
    let (source, md5) = file(164);
    let id = new_id();
    let uid = UploadId::parse(&id).unwrap();
    for index in 0..6 {
        send(&client, &id, &source, &md5, index).await;
    }
    // The API's prefix: cloned, not copied.
    wait_for_prefix(&storage, &uid, 6).await;
    counter_settles_at(&api, CLONED_BYTES, (6 << 20) as f64).await;
    for index in 6..8 {
        send(&client, &id, &source, &md5, index).await;
    }
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    // The merge cloned all that the prefix it carried on from did not cover.
    let from_prefix = prefix_bytes_merged(&worker).await;
    assert!(from_prefix >= (6 << 20) as f64);
    assert_eq!(
        from_prefix + counter(&worker, CLONED_BYTES).await,
        source.len() as f64
    );
}
