//! Storage is the truth (invariants 9 and 10): a completed file outlives the upload TTL, an
//! upload whose state Redis lost is rebuilt from storage and goes on, and the janitor deletes
//! nothing because Redis forgot it.

use std::collections::BTreeMap;
use std::time::Duration;

use stitch_common::config::{Interval, Settings};

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

/// An API and a worker in this process, over `settings` (tests here need settings the
/// configuration loader refuses, such as a TTL of seconds).
async fn spawn_app(settings: &Settings) -> ApiClient {
    let api = stitch_api::Application::build(settings).await.unwrap();
    let client = ApiClient::new(api.local_addr());
    tokio::spawn(api.run_until_stopped(std::future::pending()));
    let worker = stitch_worker::Worker::build(settings).await.unwrap();
    tokio::spawn(worker.run_until_stopped(std::future::pending()));
    client
}

/// Every file under the storage root but the janitor's own probe files.
fn stored(env: &TestEnv) -> BTreeMap<String, u64> {
    env.storage_snapshot()
        .into_iter()
        .filter(|(path, _)| path.starts_with("uploads/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completed_upload_outlives_the_upload_ttl_with_the_janitor_running() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let mut settings = env.settings();
    settings.uploads.ttl = Interval(Duration::from_secs(2));
    settings.janitor.interval = Interval(Duration::from_millis(200));
    settings.janitor.grace = Interval(Duration::from_millis(500));
    let client = spawn_app(&settings).await;
    let source = Source::random(30_000, 10_000, 71);
    let id = new_id();
    upload(
        std::slice::from_ref(&client),
        &id,
        &source,
        &md5_hex(&source.bytes),
    )
    .await;
    let done = client.wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(done["state"], "completed", "{done}");

    // Twice the TTL, with the janitor passing every 200 ms.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (code, status) = client.status(&id).await;
    assert_eq!(
        code, 200,
        "the status of a completed upload is kept: {status}"
    );
    assert_eq!(status["state"], "completed");
    assert_eq!(status["md5"], md5_hex(&source.bytes).as_str());
    assert_eq!(client.download(&id).await, source.bytes);
    assert!(
        tap.events_of(&id)
            .iter()
            .all(|e| e["type"] != "upload.expired"),
        "a completed upload was announced as expired: {:?}",
        tap.events_of(&id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completed_upload_past_its_retention_is_deleted_with_its_own_event() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let mut settings = env.settings();
    settings.uploads.completed_retention = Some(Interval(Duration::from_secs(1)));
    settings.janitor.interval = Interval(Duration::from_millis(200));
    let client = spawn_app(&settings).await;
    let source = Source::random(20_000, 10_000, 72);
    let id = new_id();
    upload(
        std::slice::from_ref(&client),
        &id,
        &source,
        &md5_hex(&source.bytes),
    )
    .await;
    client.wait_for_state(&id, "completed", MINUTE).await;

    let deleted = tap.wait_for(&id, "upload.deleted", MINUTE).await;
    assert_eq!(deleted["upload"]["md5"], md5_hex(&source.bytes).as_str());
    until(MINUTE, "the upload's directory to go", async || {
        !upload_dir(&env, &id).exists()
    })
    .await;
    let (code, _) = client.status(&id).await;
    assert_eq!(code, 404, "nothing rebuilds a deleted upload");
    assert!(
        tap.events_of(&id)
            .iter()
            .all(|e| e["type"] != "upload.expired"),
        "retention is not expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_every_redis_key_loses_no_byte_and_every_upload_goes_on() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let mut worker = worker_command(&env);
    worker
        .env("STITCH__JANITOR__INTERVAL", "300ms")
        .env("STITCH__JANITOR__GRACE", "1s");
    let _worker = ServiceProcess::start(worker, "stitch-worker listening");
    let client = ApiClient::new(api.addr);

    // One upload completed, one half sent.
    let done = Source::random(40_000, 10_000, 73);
    let done_id = new_id();
    upload(
        std::slice::from_ref(&client),
        &done_id,
        &done,
        &md5_hex(&done.bytes),
    )
    .await;
    client.wait_for_state(&done_id, "completed", MINUTE).await;
    let half = Source::random(40_000, 10_000, 74);
    let half_id = new_id();
    for index in [0, 2] {
        let (code, body) = client.put_chunk(&half_id, &half, index).await;
        assert_eq!(code, 200, "{body}");
    }
    // The merge's own cleanup (the completed upload's chunks) settles first.
    until(MINUTE, "the merge's cleanup", async || {
        !upload_dir(&env, &done_id).join("chunks").exists()
    })
    .await;
    let before = stored(&env);

    // Redis loses the namespace, the janitor keeps running; the operator migrates again.
    env.lose_redis_keys();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut migrate = worker_command(&env);
    migrate.arg("migrate");
    let status = migrate.status().unwrap();
    assert!(status.success(), "migrate after the loss: {status}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let after = stored(&env);
    for (path, size) in &before {
        assert_eq!(
            after.get(path),
            Some(size),
            "{path} was deleted or changed after Redis lost its keys"
        );
    }
    let (code, status) = client.status(&done_id).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["state"], "completed");
    assert_eq!(status["md5"], md5_hex(&done.bytes).as_str());
    assert_eq!(client.download(&done_id).await, done.bytes);

    let (code, status) = client.status(&half_id).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["state"], "receiving");
    assert_eq!(status["uploaded_chunks"], serde_json::json!([0, 2]));
    for index in [1, 3] {
        let (code, body) = client.put_chunk(&half_id, &half, index).await;
        assert_eq!(code, 200, "{body}");
    }
    client.wait_for_state(&half_id, "completed", MINUTE).await;
    assert_eq!(client.download(&half_id).await, half.bytes);
    for id in [&done_id, &half_id] {
        assert!(
            tap.events_of(id)
                .iter()
                .all(|e| e["type"] != "upload.expired"),
            "{id} was announced as expired: {:?}",
            tap.events_of(id)
        );
    }
    assert_eq!(
        distinct_event_ids(&tap, &half_id, "upload.completed").len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_janitor_expiring_uploads_during_their_resume_never_leaves_a_counted_chunk_without_its_file()
 {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.worker.janitor = false;
    let client = spawn_app(&settings).await;
    let backends = stitch_common::backends::Backends::distributed(&settings).unwrap();
    // Idle for 150 ms is abandoned: the janitor expires uploads while their chunks arrive.
    let mut janitor = stitch_worker::janitor::Janitor::new(&backends, &settings);
    janitor.grace = Duration::from_secs(30);
    janitor.ttl = Duration::from_millis(150);
    let (mut expired, mut completed) = (0, 0);
    for round in 0..20u64 {
        let id = new_id();
        let source = Source::random(8 * 1024, 1024, 100 + round);
        let sender = {
            let (client, id, source) = (client.clone(), id.clone(), source.clone());
            tokio::spawn(async move {
                for index in 0..source.total_chunks() {
                    let pause = rand::random::<u64>() % 200;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    let (code, _) = client.put_chunk(&id, &source, index).await;
                    if code != 200 {
                        return false; // Expired: refused from here on.
                    }
                }
                true
            })
        };
        while !sender.is_finished() {
            janitor.sweep_once().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if sender.await.unwrap() {
            completed += 1;
        } else {
            expired += 1;
        }
        // Invariant 9: every chunk the state store counts is backed by its complete file.
        let uid = stitch_common::id::UploadId::parse(&id).unwrap();
        for chunk in backends.state.counted_chunks(&uid).await.unwrap() {
            let path = backends.storage.copy_path(&uid, chunk.index, &chunk.token);
            let len = std::fs::metadata(&path).map(|m| m.len()).ok();
            assert_eq!(
                len,
                Some(chunk.len),
                "round {round}: chunk {} is counted but {} is missing or short",
                chunk.index,
                path.display()
            );
        }
    }
    eprintln!("{expired} uploads expired mid-resume, {completed} completed");
}
