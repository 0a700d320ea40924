//! Storage failing under a merge, for real: a disk that fills up, a sync that reports a
//! writeback error, a counted chunk that disappears. Only a verified content error fails an
//! upload; I/O errors are retried until they pass, and lost chunks are asked for again.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use stitch_testkit::prometheus::scrape;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

/// A small tmpfs mounted over the storage root, unmounted on drop.
struct TinyDisk {
    path: std::path::PathBuf,
}

impl TinyDisk {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill a disk for real and needs root (CAP_SYS_ADMIN)"
        );
        Self {
            path: path.to_owned(),
        }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Fills the file system of `path` with one file, then gives `leave` bytes of it back.
fn fill_disk_but(path: &std::path::Path, leave: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0x5a_u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    file.set_len(written.saturating_sub(leave)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_that_fills_the_disk_is_retried_until_space_is_freed_and_then_completes() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let _disk = TinyDisk::mount(&env.storage_root, "16m");
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random(4 << 20, 1 << 20, 31);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    // The chunks fit; then the disk fills up with room for a quarter of the merged file.
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    let filler = env.storage_root.join("filler");
    fill_disk_but(&filler, 1 << 20);

    let worker = start_worker(&env);
    // The test's retry delays are 500ms, 2s: far more attempts than delays, all refused
    // with ENOSPC, and the upload is still merging.
    until(MINUTE, "six merge attempts", async || {
        merge_attempts(&env, &id) >= 6
    })
    .await;
    let (_, status) = client.status(&id).await;
    assert_eq!(status["state"], "merging", "{status}");
    let metrics = scrape(worker.addr).await;
    assert!(
        metrics.value(
            "stitch_merge_transient_failures_total",
            &[("cause", "storage")]
        ) >= 5.0,
        "every ENOSPC is counted as a transient storage failure"
    );
    assert!(distinct_event_ids(&tap, &id, "upload.failed").is_empty());

    // Space comes back: the next retry goes through.
    std::fs::remove_file(&filler).unwrap();
    let status = client.wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert!(client.download(&id).await == source.bytes);
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    assert!(distinct_event_ids(&tap, &id, "upload.failed").is_empty());
    until(MINUTE, "cleanup", async || temp_files(&env, &id).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_error_fails_the_attempt_and_only_a_retry_commits_the_file() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    // The buffered merge, past its first early sync (every 64 MiB), whose first sync (of
    // the process) reports EIO, as a writeback error would.
    let mut cmd = worker_command(&env);
    cmd.env("STITCH__MERGE__DIRECT_IO", "false")
        .env("STITCH__STORAGE__FSYNC", "true")
        .env("FAILPOINTS", "merge-sync=1*return");
    let source = Source::random(72 << 20, 8 << 20, 32);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    let _worker = ServiceProcess::start(cmd, "stitch-worker listening");

    let status = client.wait_for_state(&id, "completed", 2 * MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(
        merge_attempts(&env, &id),
        2,
        "the attempt whose sync failed did not commit; the retry did"
    );
    let (_, status) = client.status(&id).await;
    assert_eq!(status["md5"], md5.as_str());
    assert!(client.download(&id).await == source.bytes);
    until(MINUTE, "cleanup", async || {
        !upload_dir(&env, &id).join("chunks").exists()
    })
    .await;
    assert_eq!(
        upload_files(&env, &id),
        vec![
            "completion.2.json".to_owned(),
            "file.2".to_owned(),
            "manifest.json".to_owned()
        ],
        "the file is the second attempt's, and nothing of the first is left"
    );
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    assert!(distinct_event_ids(&tap, &id, "upload.failed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_counted_chunk_deleted_behind_stitchs_back_is_asked_for_again_and_the_upload_completes() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    // Early assembly off: with it, the API may have assembled chunk 3 into the upload's
    // prefix before the file goes, and the merge then needs no chunk file to finish.
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random(5 << 20, 1 << 20, 33);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    // Chunk 3 is counted; its file goes away before any worker merges.
    let lost: Vec<String> = chunk_files(&env, &id)
        .into_iter()
        .filter(|name| name.starts_with("3."))
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    std::fs::remove_file(upload_dir(&env, &id).join("chunks").join(&lost[0])).unwrap();

    let _worker = start_worker(&env);
    let status = client.wait_for_state(&id, "receiving", MINUTE).await;
    assert_eq!(status["state"], "receiving", "{status}");
    assert_eq!(status["uploaded_chunks"], serde_json::json!([0, 1, 2, 4]));
    let event = tap.wait_for(&id, "upload.chunks_lost", MINUTE).await;
    assert_eq!(event["upload"]["lost_chunks"], serde_json::json!([3]));
    assert_eq!(event["upload"]["state"], "receiving");
    assert!(distinct_event_ids(&tap, &id, "upload.failed").is_empty());

    // The client resumes: it sends what the status lists as missing, and that chunk counts
    // again (it is no duplicate) and completes the upload.
    let (code, body) = json_response(
        client
            .chunk_request(&id, &source, 3)
            .header("X-File-MD5", &md5)
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["duplicate"], false, "{body}");
    assert_eq!(body["upload_complete"], true, "{body}");
    let status = client.wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert!(client.download(&id).await == source.bytes);
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    assert_eq!(distinct_event_ids(&tap, &id, "upload.chunks_lost").len(), 1);
    assert!(distinct_event_ids(&tap, &id, "upload.failed").is_empty());
}
