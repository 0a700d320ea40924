//! The merge pipeline across processes: completion, crashes, pauses, duplicates, bad data.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_apis_and_two_workers_turn_random_order_chunks_into_the_file() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let apis = [start_api(&env), start_api(&env)];
    let _workers = [start_worker(&env), start_worker(&env)];
    let clients: Vec<ApiClient> = apis.iter().map(|p| ApiClient::new(p.addr)).collect();
    let source = Source::random(24 << 20, 1 << 20, 21);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    upload(&clients, &id, &source, &md5).await;

    let status = clients[1].wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert_eq!(status["size"], source.len());
    assert_eq!(status["download_url"], format!("/files/{id}"));
    for client in &clients {
        assert_eq!(client.download(&id).await, source.bytes);
    }
    let event = tap.wait_for(&id, "upload.completed", MINUTE).await;
    assert_eq!(event["upload"]["md5"], md5.as_str());
    assert_eq!(event["upload"]["size"], source.len());
    assert_eq!(event["upload"]["filename"], "data.bin");
    assert_eq!(event["schema_version"], 1);
    assert_eq!(distinct_event_ids(&tap, &id, "upload.completed").len(), 1);
    // The chunks are gone; the file, its completion record and the manifest remain.
    until(MINUTE, "chunk cleanup", async || {
        !upload_dir(&env, &id).join("chunks").exists()
    })
    .await;
    let files = upload_files(&env, &id);
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(
        files.contains(&"manifest.json".to_owned())
            && files.iter().any(|f| f.starts_with("file."))
            && files.iter().any(|f| f.starts_with("completion.")),
        "{files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_every_worker_mid_merge_loses_nothing_and_duplicates_nothing() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    // Small blocks make the merge slow enough to be caught in the middle.
    let slow = |mut cmd: std::process::Command| {
        cmd.env("STITCH__MERGE__BUFFER_BYTES", "4KiB");
        ServiceProcess::start(cmd, "stitch-worker listening")
    };
    let mut workers = vec![slow(worker_command(&env)), slow(worker_command(&env))];
    let source = Source::random(512 << 20, 16 << 20, 22);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;

    until(MINUTE, "a merge in progress", async || {
        !temp_files(&env, &id).is_empty()
    })
    .await;
    for w in &workers {
        w.signal("STOP");
    }
    let (_, status) = client.status(&id).await;
    assert_eq!(
        status["state"], "merging",
        "the merge was caught in the middle"
    );
    for w in &mut workers {
        w.kill();
    }
    assert!(
        !temp_files(&env, &id).is_empty(),
        "the killed merge left its temp file"
    );

    let _fresh = start_worker(&env);
    let status = client.wait_for_state(&id, "completed", 3 * MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    let downloaded = client.download(&id).await;
    assert!(
        downloaded == source.bytes,
        "downloaded bytes differ from the source"
    );
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    until(MINUTE, "cleanup", async || temp_files(&env, &id).is_empty()).await;
    assert_eq!(distinct_event_ids(&tap, &id, "upload.completed").len(), 1);
    assert!(distinct_event_ids(&tap, &id, "upload.failed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_paused_past_its_lease_changes_nothing_when_it_wakes() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    let mut stale_cmd = worker_command(&env);
    stale_cmd
        .env("STITCH__MERGE__BUFFER_BYTES", "4KiB")
        .env("STITCH__WORKER__SWEEPER", "false");
    let stale = ServiceProcess::start(stale_cmd, "stitch-worker listening");
    let source = Source::random(192 << 20, 8 << 20, 23);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;

    until(MINUTE, "the first merge to start", async || {
        !temp_files(&env, &id).is_empty()
    })
    .await;
    stale.signal("STOP");
    let (_, status) = client.status(&id).await;
    assert_eq!(status["state"], "merging");
    // Past the 2 s lease, a second worker's sweeper finds the upload stuck and unlocked and
    // enqueues it again; the second worker merges it under a newer fencing token.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rescuer_cmd = worker_command(&env);
    rescuer_cmd.env("STITCH__SWEEPER__STUCK_MERGE_HORIZON", "2s");
    let _rescuer = ServiceProcess::start(rescuer_cmd, "stitch-worker listening");
    let status = client.wait_for_state(&id, "completed", 2 * MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    let final_name = format!("file.{}", merge_attempts(&env, &id));
    let final_path = upload_dir(&env, &id).join(&final_name);
    let inode = std::fs::metadata(&final_path).unwrap().ino();
    let event_ids = distinct_event_ids(&tap, &id, "upload.completed");
    assert_eq!(event_ids.len(), 1);

    // The stale worker wakes up in the middle of its merge.
    stale.signal("CONT");
    until(MINUTE, "the stale attempt to give up", async || {
        temp_files(&env, &id).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // Let any retry it scheduled settle.
    assert_eq!(
        std::fs::metadata(&final_path).unwrap().ino(),
        inode,
        "the committed file was replaced"
    );
    assert_eq!(md5_hex(&std::fs::read(&final_path).unwrap()), md5);
    let (_, after) = client.status(&id).await;
    assert_eq!(
        after["completed_at"], status["completed_at"],
        "the commit was redone"
    );
    assert_eq!(after["md5"], md5.as_str());
    assert_eq!(
        distinct_event_ids(&tap, &id, "upload.completed"),
        event_ids,
        "a second completion event"
    );
    assert!(distinct_event_ids(&tap, &id, "upload.failed").is_empty());
    let record = format!("completion.{}.json", final_name.trim_start_matches("file."));
    assert_eq!(
        upload_files(&env, &id),
        vec![record, final_name, "manifest.json".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_job_five_times_on_three_workers_commits_once() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random(32 << 20, 1 << 20, 24);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    // The chunks arrive with no worker running: the API's job waits on the queue, and four
    // more copies join it before three workers start at once.
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    let broker = stitch_common::queue::AmqpBroker::new(&env.settings());
    let job = stitch_common::queue::MergeJob::new(stitch_common::id::UploadId::parse(&id).unwrap());
    for _ in 0..4 {
        broker.publish_merge(&job).await.unwrap();
    }
    let _workers = [start_worker(&env), start_worker(&env), start_worker(&env)];
    let status = client.wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(status["state"], "completed");
    // Let the duplicates drain.
    until(MINUTE, "the duplicates to drain", async || {
        stitch_testkit::events::take_merge_jobs(&env)
            .await
            .is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        merge_attempts(&env, &id),
        1,
        "exactly one merge attempt took a fencing token"
    );
    let (_, after) = client.status(&id).await;
    assert_eq!(after["completed_at"], status["completed_at"]);
    assert_eq!(client.download(&id).await, source.bytes);
    assert_eq!(distinct_event_ids(&tap, &id, "upload.completed").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_whose_md5_differs_from_the_declared_one_fails_once_with_an_event() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let _worker = start_worker(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random(3 << 20, 1 << 20, 25);
    let id = new_id();
    upload(
        std::slice::from_ref(&client),
        &id,
        &source,
        "00000000000000000000000000000000",
    )
    .await;
    let status = client.wait_for_state(&id, "failed", MINUTE).await;
    assert_eq!(status["state"], "failed", "{status}");
    let reason = status["failure_reason"].as_str().unwrap();
    assert!(reason.contains("MD5"), "{reason}");
    let event = tap.wait_for(&id, "upload.failed", MINUTE).await;
    assert_eq!(event["upload"]["failure_reason"], reason);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(merge_attempts(&env, &id), 1, "no retry storm");
    assert!(distinct_event_ids(&tap, &id, "upload.completed").is_empty());
    let response = client
        .client
        .get(client.url(&format!("/files/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert!(temp_files(&env, &id).is_empty());
}
