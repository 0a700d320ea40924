//! The sweeper against real Redis and RabbitMQ: a merge waiting in a backlog is re-enqueued,
//! never failed, however long it waits.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use stitch_common::backends::Backends;
use stitch_common::events::Event;
use stitch_common::geometry::{ChunkIndex, Geometry};
use stitch_common::id::UploadId;
use stitch_common::migrate::{SCHEMA_VERSION, schema_key};
use stitch_common::queue::{MergeJob, OutboxKind, OutboxMessage};
use stitch_common::state::keys;
use stitch_common::upload::{ChunkRecord, NewUpload, UploadState};
use stitch_testkit::TestEnv;
use stitch_testkit::events::{EventTap, take_merge_jobs};
use stitch_worker::sweeper::{Sweeper, SweeperConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_waiting_in_a_backlog_is_never_failed() {
    let env = TestEnv::new();
    let backends = Backends::distributed(&env.settings()).unwrap();
    let upload = NewUpload {
        id: UploadId::parse("backlogged").unwrap(),
        geometry: Geometry::new(10, 10).unwrap(),
        filename: None,
        file_md5: None,
        metadata: None,
        created_at_ms: 1,
        assembly: Default::default(),
        callback_url: None,
        callback_secret: None,
    };
    let chunk = ChunkRecord {
        index: ChunkIndex(0),
        offset: 0,
        len: 10,
        crc32c: 1,
        md5: None,
        token: "t".into(),
    };
    backends
        .state
        .record_chunk(
            &upload,
            &chunk,
            &OutboxMessage::merge(upload.id.clone()),
            &OutboxMessage::event(&Event::created(&upload)),
            60_000,
        )
        .await
        .unwrap();
    // No worker consumes: the job waits. The horizon is a millisecond, so every pass finds
    // the upload stuck; far more passes than any bound on re-enqueues would allow.
    let sweeper = Sweeper {
        state: backends.state.clone(),
        queue: backends.merges.clone(),
        events: backends.events.clone(),
        lock: backends.lock.clone(),
        config: SweeperConfig {
            namespace: env.namespace.clone(),
            interval: Duration::from_secs(3600),
            outbox_horizon: Duration::from_secs(3600),
            stuck_merge_horizon: Duration::from_millis(1),
        },
    };
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        sweeper.sweep_once().await.unwrap();
    }
    let status = backends
        .state
        .upload_status(&upload.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.state, UploadState::Merging, "{status:?}");
    assert!(status.failure.is_none());
    let jobs = take_merge_jobs(&env).await;
    assert!(
        jobs.len() >= 12,
        "every pass re-enqueued the waiting merge: {} jobs",
        jobs.len()
    );
}

/// The upload `name` of 10 bytes in one chunk.
fn one_chunk_upload(name: &str) -> NewUpload {
    NewUpload {
        id: UploadId::parse(name).unwrap(),
        geometry: Geometry::new(10, 10).unwrap(),
        filename: None,
        file_md5: None,
        metadata: None,
        created_at_ms: 1,
        assembly: Default::default(),
        callback_url: None,
        callback_secret: None,
    }
}

/// Writes a merge trigger and `upload.created` into `upload`'s outbox the way keyspace
/// layout 1 did (one list, both kinds, told apart by their text), plus an entry of no known
/// kind; returns the two readable entries.
fn write_layout_1_outbox(env: &TestEnv, upload: &NewUpload) -> (String, String) {
    let job = MergeJob::new(upload.id.clone()).to_json();
    let created = serde_json::to_string(&OutboxMessage::event(&Event::created(upload))).unwrap();
    let mut conn = env.redis().unwrap();
    let () = redis::cmd("RPUSH")
        .arg(keys::legacy_outbox(&env.namespace, &upload.id))
        .arg(&job)
        .arg(&created)
        .arg("not an outbox message")
        .query(&mut conn)
        .unwrap();
    (job, created)
}

fn list(env: &TestEnv, key: &str) -> Vec<String> {
    let mut conn = env.redis().unwrap();
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_entries_of_the_old_layout_are_migrated_by_kind_and_published_by_the_sweeper() {
    // A namespace at schema 2 (before the typed outbox), with an old-form outbox.
    let env = TestEnv::unmigrated();
    let mut conn = env.redis().unwrap();
    let () = redis::cmd("HSET")
        .arg(schema_key(&env.namespace))
        .arg("version")
        .arg(2)
        .arg("compatible_from")
        .arg(2)
        .query(&mut conn)
        .unwrap();
    let before = one_chunk_upload("before-migration");
    let (job, created) = write_layout_1_outbox(&env, &before);

    env.migrate().unwrap();
    let ns = &env.namespace;
    let id = &before.id;
    assert_eq!(
        list(&env, &keys::outbox(ns, id, OutboxKind::Merge)),
        vec![job.clone()]
    );
    assert_eq!(
        list(&env, &keys::outbox(ns, id, OutboxKind::Event)),
        vec![created.clone()]
    );
    assert_eq!(
        list(&env, &keys::legacy_outbox(ns, id)),
        vec!["not an outbox message".to_owned()],
        "an entry of no known kind is kept, not dropped"
    );
    let version: u32 = redis::cmd("HGET")
        .arg(schema_key(ns))
        .arg("version")
        .query(&mut conn)
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);

    // An old process still running after the migration writes the old form: the sweeper
    // converts it too, so nothing waits where nobody reads.
    let after = one_chunk_upload("after-migration");
    write_layout_1_outbox(&env, &after);

    let tap = EventTap::start(&env).await;
    let backends = Backends::distributed(&env.settings()).unwrap();
    let sweeper = Sweeper {
        state: backends.state.clone(),
        queue: backends.merges.clone(),
        events: backends.events.clone(),
        lock: backends.lock.clone(),
        config: SweeperConfig {
            namespace: env.namespace.clone(),
            interval: Duration::from_secs(3600),
            outbox_horizon: Duration::ZERO,
            stuck_merge_horizon: Duration::from_secs(3600),
        },
    };
    assert_eq!(sweeper.sweep_once().await.unwrap(), 4);
    for upload in [&before, &after] {
        tap.wait_for(upload.id.name(), "upload.created", Duration::from_secs(30))
            .await;
    }
    let jobs = take_merge_jobs(&env).await;
    let mut merged: Vec<&str> = jobs
        .iter()
        .map(|j| j["upload_id"].as_str().unwrap())
        .collect();
    merged.sort();
    assert_eq!(merged, ["after-migration", "before-migration"]);
    let left = backends.state.pending_outbox(u64::MAX).await.unwrap();
    assert!(left.is_empty(), "published entries are cleared: {left:?}");
}
