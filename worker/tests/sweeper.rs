//! The sweeper against real Redis and RabbitMQ: a merge waiting in a backlog is re-enqueued,
//! never failed, however long it waits.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use stitch_common::backends::Backends;
use stitch_common::geometry::{ChunkIndex, Geometry};
use stitch_common::id::UploadId;
use stitch_common::queue::MergeJob;
use stitch_common::upload::{ChunkRecord, NewUpload, UploadState};
use stitch_testkit::TestEnv;
use stitch_testkit::events::take_merge_jobs;
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
    let job = MergeJob::new(upload.id.clone()).to_json();
    backends
        .state
        .record_chunk(&upload, &chunk, &job, "{}", 60_000)
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
