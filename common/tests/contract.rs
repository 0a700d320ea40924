//! Contract tests of the backend boundaries. Each check is written against a trait
//! (`StateStore`, `MergeLock`, `MergeQueue`) and runs against every implementation: Redis and
//! RabbitMQ for the distributed mode, SQLite for the single-node mode.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use stitch_common::backends::Backends;
use stitch_common::config::Interval;
use stitch_common::digest::{CompositeMd5, Md5, Sha256};
use stitch_common::events::{Event, EventKind};
use stitch_common::geometry::{ChunkIndex, Geometry};
use stitch_common::id::UploadId;
use stitch_common::lock::{Lease, LockName, MergeLock, RedisLock};
use stitch_common::queue::{
    AmqpBroker, Deliveries, Delivery, Family, MergeJob, NOW, OutboxKind, OutboxMessage, WorkQueue,
};
use stitch_common::state::{
    Aborted, Committed, Conflict, Created, Expired, Failed, MergeStart, OutboxEntry, Recorded,
    RedisStateStore, Reopened, Restoration, Restored, StateError, StateStore, keys,
};
use stitch_common::upload::{Assembly, ChunkRecord, Completion, NewUpload, UploadState};
use stitch_testkit::TestEnv;
use stitch_testkit::redis_server::RedisServer;

const TTL: u64 = 60_000;

/// An outbox event of `kind` about `id`, as a state change writes it.
fn event(id: &UploadId, kind: EventKind) -> OutboxMessage {
    let mut event = Event::created(&NewUpload {
        id: id.clone(),
        ..upload("any", 10, 10)
    });
    event.kind = kind;
    event.event_id = format!("evt-{}-{id}", kind.routing_key());
    OutboxMessage::event(&event)
}
fn created(id: &UploadId) -> OutboxMessage {
    event(id, EventKind::Created)
}
fn aborted(id: &UploadId) -> OutboxMessage {
    event(id, EventKind::Aborted)
}
fn completed(id: &UploadId) -> OutboxMessage {
    event(id, EventKind::Completed)
}
fn failed(id: &UploadId) -> OutboxMessage {
    event(id, EventKind::Failed)
}
fn expired(id: &UploadId) -> OutboxMessage {
    event(id, EventKind::Expired)
}
fn chunks_lost(id: &UploadId) -> OutboxMessage {
    event(id, EventKind::ChunksLost)
}
fn merge(id: &UploadId) -> OutboxMessage {
    OutboxMessage::merge(id.clone())
}

fn upload(id: &str, total: u64, chunk: u64) -> NewUpload {
    NewUpload {
        id: UploadId::parse(id).unwrap(),
        geometry: Geometry::new(total, chunk).unwrap(),
        filename: Some("f".into()),
        file_md5: None,
        metadata: None,
        created_at_ms: 1,
        assembly: Default::default(),
        callback_url: None,
        callback_secret: None,
    }
}

fn chunk(u: &NewUpload, index: u64, crc: u32) -> ChunkRecord {
    let i = ChunkIndex(index);
    ChunkRecord {
        index: i,
        offset: u.geometry.chunk_start(i),
        len: u.geometry.chunk_len(i),
        crc32c: crc,
        md5: None,
        token: format!("t{index}-{crc}"),
    }
}

fn redis_store(env: &TestEnv) -> Arc<dyn StateStore> {
    Arc::new(RedisStateStore::new(&env.settings().redis, &env.namespace).unwrap())
}

/// Records every chunk of `u`; returns how many calls reported completing it.
async fn record_all(store: &dyn StateStore, u: &NewUpload) -> usize {
    let mut completions = 0;
    for i in 0..u.geometry.total_chunks {
        match store
            .record_chunk(u, &chunk(u, i, 7), &merge(&u.id), &created(&u.id), TTL)
            .await
            .unwrap()
        {
            Recorded::New(p) if p.completed_upload => completions += 1,
            _ => {}
        }
    }
    completions
}

async fn chunks_are_counted_once_and_never_overwritten(store: &dyn StateStore) {
    let u = upload("c1", 25, 10);
    let first = store
        .record_chunk(&u, &chunk(&u, 1, 5), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    assert!(matches!(first, Recorded::New(p) if p.chunks_received == 1 && p.bytes_received == 10));
    let mut again = chunk(&u, 1, 5);
    again.token = "another-copy".into();
    match store
        .record_chunk(&u, &again, &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap()
    {
        Recorded::Duplicate {
            progress,
            counted_token,
        } => {
            assert_eq!(counted_token, "t1-5");
            assert_eq!(progress.chunks_received, 1);
        }
        other => panic!("{other:?}"),
    }
    let conflict = store
        .record_chunk(&u, &chunk(&u, 1, 6), &merge(&u.id), &created(&u.id), TTL)
        .await;
    assert!(matches!(
        conflict,
        Err(StateError::Conflict(Conflict::ChunkContent(ChunkIndex(1))))
    ));
    let other_shape = upload("c1", 30, 10);
    let conflict = store
        .record_chunk(
            &other_shape,
            &chunk(&other_shape, 0, 1),
            &merge(&other_shape.id),
            &created(&other_shape.id),
            TTL,
        )
        .await;
    assert!(matches!(
        conflict,
        Err(StateError::Conflict(Conflict::Geometry { .. }))
    ));
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.uploaded_chunks, vec![1]);
}

async fn completion_is_reported_exactly_once(store: &dyn StateStore) {
    let u = upload("c2", 95, 10);
    assert_eq!(record_all(store, &u).await, 1);
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.state, UploadState::Merging);
    assert_eq!(status.uploaded_chunks, (0..10).collect::<Vec<_>>());
    let late = store
        .record_chunk(&u, &chunk(&u, 0, 7), &merge(&u.id), &created(&u.id), TTL)
        .await;
    assert!(matches!(
        late,
        Err(StateError::Conflict(Conflict::NotReceiving(
            UploadState::Merging
        )))
    ));
}

async fn creation_is_idempotent_for_the_same_declaration(store: &dyn StateStore) {
    let u = upload("c3", 100, 10);
    assert_eq!(
        store.create_upload(&u, &created(&u.id), TTL).await.unwrap(),
        Created::New
    );
    assert_eq!(
        store.create_upload(&u, &created(&u.id), TTL).await.unwrap(),
        Created::AlreadyExists
    );
    let other = upload("c3", 100, 20);
    assert!(matches!(
        store.create_upload(&other, &created(&other.id), TTL).await,
        Err(StateError::Conflict(Conflict::Geometry { .. }))
    ));
}

async fn abort_is_idempotent_and_refuses_later_chunks(store: &dyn StateStore) {
    let u = upload("c4", 20, 10);
    store
        .record_chunk(&u, &chunk(&u, 0, 1), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    assert_eq!(
        store
            .abort_upload(&u.id, &aborted(&u.id), TTL)
            .await
            .unwrap(),
        Aborted::Now {
            previous: UploadState::Receiving
        }
    );
    assert_eq!(
        store
            .abort_upload(&u.id, &aborted(&u.id), TTL)
            .await
            .unwrap(),
        Aborted::Already
    );
    let late = store
        .record_chunk(&u, &chunk(&u, 1, 1), &merge(&u.id), &created(&u.id), TTL)
        .await;
    assert!(matches!(
        late,
        Err(StateError::Conflict(Conflict::NotReceiving(
            UploadState::Aborted
        )))
    ));
    let missing = UploadId::parse("never").unwrap();
    assert!(matches!(
        store.abort_upload(&missing, &aborted(&missing), TTL).await,
        Err(StateError::NotFound)
    ));
}

fn completion(location: &str) -> Completion {
    Completion {
        size: 95,
        md5: Md5::parse("9e107d9d372bb6826bd81d3542a419d6").unwrap(),
        crc32c: Some(0x0a0b_0c0d),
        sha256: Sha256::parse(&"ab".repeat(32)),
        composite_md5: CompositeMd5::parse("0123456789abcdef0123456789abcdef-10"),
        location: location.into(),
        completed_at_ms: 5,
        event_id: format!("evt-{location}"),
    }
}

async fn the_commit_accepts_only_the_newest_fencing_token(store: &dyn StateStore) {
    let u = upload("c5", 95, 10);
    record_all(store, &u).await;
    let MergeStart::Ready(first) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    assert_eq!(first.chunks.len(), 10);
    assert_eq!(first.upload.geometry, u.geometry);
    let MergeStart::Ready(second) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    assert!(second.fence > first.fence);
    let stale = store
        .commit_merge(&u.id, first.fence, &completion("old"), &completed(&u.id))
        .await;
    assert!(
        matches!(stale, Err(StateError::Conflict(Conflict::Fenced))),
        "{stale:?}"
    );
    let stale_fail = store
        .fail_merge(&u.id, Some(first.fence), "x", "e", &failed(&u.id), TTL)
        .await;
    assert!(matches!(
        stale_fail,
        Err(StateError::Conflict(Conflict::Fenced))
    ));
    assert_eq!(
        store
            .commit_merge(&u.id, second.fence, &completion("new"), &completed(&u.id))
            .await
            .unwrap(),
        Committed::Now
    );
    assert_eq!(
        store
            .commit_merge(&u.id, second.fence, &completion("again"), &completed(&u.id))
            .await
            .unwrap(),
        Committed::Already {
            event_id: "evt-new".into()
        }
    );
    assert_eq!(
        store.begin_merge(&u.id, TTL).await.unwrap(),
        MergeStart::AlreadyCompleted
    );
    assert_eq!(
        store
            .fail_merge(&u.id, None, "late", "e2", &failed(&u.id), TTL)
            .await
            .unwrap(),
        Failed::NotMerging(UploadState::Completed)
    );
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.state, UploadState::Completed);
    assert_eq!(
        status.completion,
        Some(completion("new")),
        "the whole completion, digests included, reads back as committed"
    );
}

async fn a_completion_without_the_optional_digests_reads_with_them_absent(store: &dyn StateStore) {
    let u = upload("c5b", 20, 10);
    record_all(store, &u).await;
    let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    let bare = Completion {
        crc32c: None,
        sha256: None,
        composite_md5: None,
        ..completion("bare")
    };
    assert_eq!(
        store
            .commit_merge(&u.id, plan.fence, &bare, &completed(&u.id))
            .await
            .unwrap(),
        Committed::Now
    );
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.completion, Some(bare));
}

async fn a_failed_merge_is_final(store: &dyn StateStore) {
    let u = upload("c6", 20, 10);
    record_all(store, &u).await;
    let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    assert_eq!(
        store
            .fail_merge(
                &u.id,
                Some(plan.fence),
                "bad md5",
                "evt-f",
                &failed(&u.id),
                TTL
            )
            .await
            .unwrap(),
        Failed::Now
    );
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.state, UploadState::Failed);
    assert_eq!(status.failure.unwrap().event_id, "evt-f");
    assert!(
        outbox_of(store, &u.id)
            .await
            .contains(&"upload.failed".to_owned()),
        "upload.failed waits in the outbox with the failure"
    );
    let late = store
        .commit_merge(&u.id, plan.fence, &completion("x"), &completed(&u.id))
        .await;
    assert!(matches!(
        late,
        Err(StateError::Conflict(Conflict::NotMerging(
            UploadState::Failed
        )))
    ));
    assert_eq!(
        store.begin_merge(&u.id, TTL).await.unwrap(),
        MergeStart::NotMerging(UploadState::Failed)
    );
}

async fn the_outbox_holds_the_trigger_until_cleared(store: &dyn StateStore) {
    let u = upload("c7", 10, 10);
    let job = merge(&u.id);
    store
        .record_chunk(&u, &chunk(&u, 0, 1), &job, &created(&u.id), TTL)
        .await
        .unwrap();
    let triggers = |entries: Vec<OutboxEntry>| -> Vec<OutboxMessage> {
        entries
            .into_iter()
            .filter(|e| e.upload_id == u.id && e.kind() == OutboxKind::Merge)
            .map(|e| e.message)
            .collect()
    };
    let enqueued_at_ms = job.enqueued_at_ms();
    assert_eq!(
        triggers(store.pending_outbox(enqueued_at_ms + 1).await.unwrap()),
        vec![job.clone()]
    );
    assert!(
        triggers(store.pending_outbox(enqueued_at_ms).await.unwrap()).is_empty(),
        "not past the horizon yet"
    );
    store
        .clear_outbox_entry(&OutboxEntry::new(u.id.clone(), job))
        .await
        .unwrap();
    assert!(triggers(store.pending_outbox(u64::MAX).await.unwrap()).is_empty());
    let stuck = store.stuck_merges(u64::MAX).await.unwrap();
    let mine: Vec<_> = stuck.iter().filter(|s| s.upload_id == u.id).collect();
    assert_eq!(mine.len(), 1, "{stuck:?}");
    assert_eq!(mine[0].requeues, 0);
    assert!(
        store.stuck_merges(0).await.unwrap().is_empty(),
        "nothing is older than the epoch"
    );
    assert_eq!(store.note_requeue(&u.id).await.unwrap(), Some(1));
}

/// The upload's pending outbox entries, as the sweeper reads them.
async fn entries_of(store: &dyn StateStore, id: &UploadId) -> Vec<OutboxEntry> {
    store
        .pending_outbox(u64::MAX)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| &e.upload_id == id)
        .collect()
}

/// What the upload's outbox holds, sorted: `merge` for a merge trigger, the event's type for
/// an event.
async fn outbox_of(store: &dyn StateStore, id: &UploadId) -> Vec<String> {
    let mut entries: Vec<String> = entries_of(store, id)
        .await
        .into_iter()
        .map(|e| match e.message {
            OutboxMessage::Merge(_) => "merge".to_owned(),
            OutboxMessage::Event { event, .. } => event.kind.routing_key().to_owned(),
        })
        .collect();
    entries.sort();
    entries
}

async fn merge_triggers_and_events_are_kept_apart_and_cleared_exactly(store: &dyn StateStore) {
    let u = upload("k1", 20, 10);
    let trigger = |enqueued_at_ms| {
        OutboxMessage::Merge(MergeJob {
            enqueued_at_ms,
            ..MergeJob::new(u.id.clone())
        })
    };
    let (first, second) = (trigger(1), trigger(2));
    let made = created(&u.id);
    for i in 0..2 {
        store
            .record_chunk(&u, &chunk(&u, i, 1), &first, &made, TTL)
            .await
            .unwrap();
    }
    assert_eq!(outbox_of(store, &u.id).await, ["merge", "upload.created"]);

    // Storage lost a chunk: the trigger goes, the events stay and the loss joins them.
    let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    store
        .reopen_for_lost_chunks(
            &u.id,
            plan.fence,
            &[ChunkIndex(1)],
            &chunks_lost(&u.id),
            TTL,
        )
        .await
        .unwrap();
    assert_eq!(
        outbox_of(store, &u.id).await,
        ["upload.chunks_lost", "upload.created"]
    );

    // The chunk again: a new trigger. Clearing the first one (its publish confirmed late)
    // leaves the new one; clearing an event leaves the other.
    store
        .record_chunk(&u, &chunk(&u, 1, 1), &second, &made, TTL)
        .await
        .unwrap();
    store
        .clear_outbox_entry(&OutboxEntry::new(u.id.clone(), first))
        .await
        .unwrap();
    store
        .clear_outbox_entry(&OutboxEntry::new(u.id.clone(), made))
        .await
        .unwrap();
    let left: Vec<OutboxMessage> = entries_of(store, &u.id)
        .await
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&second), "{left:?}");
    assert_eq!(
        outbox_of(store, &u.id).await,
        ["merge", "upload.chunks_lost"]
    );

    // A failure drops the trigger and keeps the events.
    let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    store
        .fail_merge(&u.id, Some(plan.fence), "bad", "evt-f", &failed(&u.id), TTL)
        .await
        .unwrap();
    assert_eq!(
        outbox_of(store, &u.id).await,
        ["upload.chunks_lost", "upload.failed"]
    );

    // Entries as the sweeper reads them clear exactly.
    for entry in entries_of(store, &u.id).await {
        store.clear_outbox_entry(&entry).await.unwrap();
    }
    assert!(outbox_of(store, &u.id).await.is_empty());
}

async fn events_ride_the_outbox_with_their_state_changes(store: &dyn StateStore) {
    let u = upload("c8", 20, 10);
    let first = store
        .record_chunk(&u, &chunk(&u, 0, 1), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    assert!(matches!(first, Recorded::New(p) if p.created_upload && !p.completed_upload));
    let second = store
        .record_chunk(&u, &chunk(&u, 1, 1), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    assert!(matches!(second, Recorded::New(p) if !p.created_upload && p.completed_upload));
    let expected = ["merge", "upload.created"];
    assert_eq!(
        outbox_of(store, &u.id).await,
        expected,
        "one created event, one merge trigger"
    );
    // Aborting drops the merge trigger, keeps the unpublished event and adds its own.
    store
        .abort_upload(&u.id, &aborted(&u.id), TTL)
        .await
        .unwrap();
    let expected = ["upload.aborted", "upload.created"];
    assert_eq!(outbox_of(store, &u.id).await, expected);

    // A commit drops the merge trigger and writes its completion event.
    let v = upload("c9", 10, 10);
    store
        .record_chunk(&v, &chunk(&v, 0, 1), &merge(&v.id), &created(&v.id), TTL)
        .await
        .unwrap();
    let MergeStart::Ready(plan) = store.begin_merge(&v.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    store
        .commit_merge(&v.id, plan.fence, &completion("f"), &completed(&v.id))
        .await
        .unwrap();
    let expected = ["upload.completed", "upload.created"];
    assert_eq!(outbox_of(store, &v.id).await, expected);

    // An explicit create writes its event; confirming it again does not.
    let w = upload("c10", 10, 10);
    store.create_upload(&w, &created(&w.id), TTL).await.unwrap();
    store.create_upload(&w, &created(&w.id), TTL).await.unwrap();
    assert_eq!(outbox_of(store, &w.id).await, ["upload.created"]);
}

fn restoration(u: &NewUpload, indices: &[u64], fence: u64) -> Restoration {
    Restoration {
        upload: u.clone(),
        chunks: indices.iter().map(|i| chunk(u, *i, 7)).collect(),
        completion: None,
        fence,
        last_activity_ms: stitch_common::now_ms(),
    }
}

async fn a_lost_upload_is_restored_once_from_storage(store: &dyn StateStore) {
    let u = upload("r1", 30, 10);
    let r = restoration(&u, &[0, 2], 7);
    assert_eq!(
        store
            .restore_upload(&r, &merge(&u.id), &created(&u.id), TTL)
            .await
            .unwrap(),
        Restored::Now(UploadState::Receiving)
    );
    assert_eq!(
        store
            .restore_upload(&r, &merge(&u.id), &created(&u.id), TTL)
            .await
            .unwrap(),
        Restored::AlreadyKnown,
        "a second rebuild changes nothing"
    );
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.uploaded_chunks, vec![0, 2]);
    assert_eq!(status.bytes_received, 20);
    // The upload goes on: the missing chunk completes it, and the fence is past storage's.
    let done = store
        .record_chunk(&u, &chunk(&u, 1, 7), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    assert!(matches!(done, Recorded::New(p) if p.completed_upload));
    let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    assert!(plan.fence > 7, "fence {} went backwards", plan.fence);
    assert_eq!(plan.chunks.len(), 3);

    // Every chunk on storage: it merges (the trigger is in the outbox).
    let v = upload("r2", 20, 10);
    assert_eq!(
        store
            .restore_upload(
                &restoration(&v, &[0, 1], 0),
                &merge(&v.id),
                &created(&v.id),
                TTL,
            )
            .await
            .unwrap(),
        Restored::Now(UploadState::Merging)
    );
    let expected = ["merge", "upload.created"];
    assert_eq!(
        outbox_of(store, &v.id).await,
        expected,
        "the merge trigger, and the creation the store may never have recorded"
    );

    // A completion on storage: completed, with its result.
    let w = upload("r3", 95, 50);
    let mut r = restoration(&w, &[], 3);
    r.completion = Some(completion("uploads/r3/file.3"));
    assert_eq!(
        store
            .restore_upload(&r, &merge(&w.id), &created(&w.id), TTL)
            .await
            .unwrap(),
        Restored::Now(UploadState::Completed)
    );
    let status = store.upload_status(&w.id).await.unwrap().unwrap();
    assert_eq!(status.completion, Some(completion("uploads/r3/file.3")));
    assert_eq!(status.uploaded_chunks, vec![0, 1]);
}

async fn expiring_excludes_recording_and_spares_live_uploads(store: &dyn StateStore) {
    let u = upload("x1", 20, 10);
    store
        .record_chunk(&u, &chunk(&u, 0, 1), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    let now = stitch_common::now_ms();
    assert_eq!(
        store
            .expire_upload(&u.id, now - 60_000, &expired(&u.id), TTL)
            .await
            .unwrap(),
        Expired::Kept(UploadState::Receiving),
        "active since the cut-off"
    );
    assert_eq!(
        store
            .expire_upload(&u.id, now + 60_000, &expired(&u.id), TTL)
            .await
            .unwrap(),
        Expired::Now
    );
    assert!(
        outbox_of(store, &u.id)
            .await
            .contains(&"upload.expired".to_owned()),
        "upload.expired waits in the tombstone's outbox"
    );
    let late = store
        .record_chunk(&u, &chunk(&u, 1, 1), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap_err();
    assert!(
        matches!(
            late,
            StateError::Conflict(Conflict::NotReceiving(UploadState::Aborted))
        ),
        "a chunk after the expiry is refused: {late:?}"
    );
    // An id the store does not know gets a tombstone too.
    let v = upload("x2", 20, 10);
    assert_eq!(
        store
            .expire_upload(&v.id, now, &expired(&v.id), TTL)
            .await
            .unwrap(),
        Expired::Now
    );
    assert!(
        store
            .record_chunk(&v, &chunk(&v, 0, 1), &merge(&v.id), &created(&v.id), TTL)
            .await
            .is_err()
    );
    // Merging uploads are never expired.
    let w = upload("x3", 10, 10);
    store
        .record_chunk(&w, &chunk(&w, 0, 1), &merge(&w.id), &created(&w.id), TTL)
        .await
        .unwrap();
    assert_eq!(
        store
            .expire_upload(&w.id, now + 60_000, &expired(&w.id), TTL)
            .await
            .unwrap(),
        Expired::Kept(UploadState::Merging)
    );
    store.forget_upload(&w.id).await.unwrap();
    assert_eq!(store.upload_status(&w.id).await.unwrap(), None);
}

async fn lost_chunks_reopen_the_upload_fenced_and_count_again_when_sent_again(
    store: &dyn StateStore,
) {
    let u = upload("c11", 45, 10);
    for i in 0..5 {
        store
            .record_chunk(&u, &chunk(&u, i, 3), &merge(&u.id), &created(&u.id), TTL)
            .await
            .unwrap();
    }
    let MergeStart::Ready(stale) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    let lost = [ChunkIndex(1), ChunkIndex(4)];

    // Only the newest attempt may reopen; a refusal changes nothing.
    let before = store.upload_status(&u.id).await.unwrap().unwrap();
    let refused = store
        .reopen_for_lost_chunks(&u.id, stale.fence, &lost, &chunks_lost(&u.id), TTL)
        .await;
    assert!(
        matches!(refused, Err(StateError::Conflict(Conflict::Fenced))),
        "{refused:?}"
    );
    assert_eq!(store.upload_status(&u.id).await.unwrap().unwrap(), before);
    let expected = ["merge", "upload.created"];
    assert_eq!(outbox_of(store, &u.id).await, expected);

    // The newest one does: receiving, without the lost chunks, the event in the outbox and
    // the merge trigger out of it.
    assert_eq!(
        store
            .reopen_for_lost_chunks(&u.id, plan.fence, &lost, &chunks_lost(&u.id), TTL)
            .await
            .unwrap(),
        Reopened::Now {
            chunks_received: 3,
            bytes_received: 30
        }
    );
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.state, UploadState::Receiving);
    assert_eq!(status.uploaded_chunks, vec![0, 2, 3]);
    assert_eq!((status.chunks_received, status.bytes_received), (3, 30));
    let expected = ["upload.chunks_lost", "upload.created"];
    assert_eq!(outbox_of(store, &u.id).await, expected);
    let counted: Vec<u64> = store
        .counted_chunks(&u.id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.index.0)
        .collect();
    assert_eq!(counted, [0, 2, 3]);
    // A run of counted parts stops at the first that is not counted, and at its bound.
    let id = &u.id;
    let run = |from, max| async move {
        store
            .counted_run(id, from, max)
            .await
            .unwrap()
            .iter()
            .map(|c| (c.index.0, c.offset, c.token.clone()))
            .collect::<Vec<_>>()
    };
    let token = |i: u64| chunk(&u, i, 3).token;
    assert_eq!(run(0, 10).await, [(0, 0, token(0))]);
    assert_eq!(
        run(2, 10).await,
        [(2, 20, token(2)), (3, 30, token(3))],
        "records as counted_chunks reads them"
    );
    assert_eq!(run(2, 1).await, [(2, 20, token(2))]);
    assert_eq!(run(1, 10).await, [], "chunk 1 is not counted");
    assert_eq!(run(2, 0).await, []);
    assert_eq!(run(u64::MAX - 1, 5).await, []);
    assert!(
        !store
            .stuck_merges(u64::MAX)
            .await
            .unwrap()
            .iter()
            .any(|s| s.upload_id == u.id),
        "a receiving upload is no stuck merge"
    );
    // Not merging any more: the stale attempt can neither commit nor reopen again.
    let late = store
        .commit_merge(&u.id, plan.fence, &completion("x"), &completed(&u.id))
        .await;
    assert!(
        matches!(
            late,
            Err(StateError::Conflict(Conflict::NotMerging(
                UploadState::Receiving
            )))
        ),
        "{late:?}"
    );
    assert_eq!(
        store
            .reopen_for_lost_chunks(&u.id, plan.fence, &lost, &chunks_lost(&u.id), TTL)
            .await
            .unwrap(),
        Reopened::NotMerging(UploadState::Receiving)
    );

    // A chunk still counted is a duplicate; a lost one, sent again (even the very same
    // copy), counts as new, and the last one completes the upload again with a new trigger.
    assert!(matches!(
        store
            .record_chunk(&u, &chunk(&u, 2, 3), &merge(&u.id), &created(&u.id), TTL)
            .await
            .unwrap(),
        Recorded::Duplicate { .. }
    ));
    let first = store
        .record_chunk(&u, &chunk(&u, 4, 3), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    assert!(
        matches!(first, Recorded::New(p) if p.chunks_received == 4 && !p.completed_upload),
        "{first:?}"
    );
    let last = store
        .record_chunk(&u, &chunk(&u, 1, 9), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    assert!(
        matches!(last, Recorded::New(p) if p.completed_upload && p.bytes_received == 45),
        "{last:?}"
    );
    let expected = ["merge", "upload.chunks_lost", "upload.created"];
    assert_eq!(outbox_of(store, &u.id).await, expected);
    let MergeStart::Ready(again) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    assert!(again.fence > plan.fence, "fences keep growing");
    assert_eq!(again.chunks.len(), 5);
    assert_eq!(
        again.chunks[1].crc32c, 9,
        "the re-sent copy is the one counted"
    );
    assert_eq!(
        store
            .commit_merge(&u.id, again.fence, &completion("f"), &completed(&u.id))
            .await
            .unwrap(),
        Committed::Now
    );

    let nobody = UploadId::parse("nobody").unwrap();
    assert!(matches!(
        store
            .reopen_for_lost_chunks(&nobody, 1, &lost, &chunks_lost(&nobody), TTL)
            .await,
        Err(StateError::NotFound)
    ));
}

fn stream(id: &str, total: u64, assembly: Assembly) -> NewUpload {
    NewUpload {
        assembly,
        ..upload(id, total, total)
    }
}

/// The uploads among `entries` with a merge trigger pending.
fn triggers(entries: Vec<OutboxEntry>) -> Vec<UploadId> {
    entries
        .into_iter()
        .filter(|e| e.kind() == OutboxKind::Merge)
        .map(|e| e.upload_id)
        .collect()
}

fn segment(offset: u64, len: u64) -> ChunkRecord {
    ChunkRecord {
        index: ChunkIndex(0),
        offset,
        len,
        crc32c: 9,
        md5: None,
        token: format!("s{offset}"),
    }
}

async fn segments_append_only_at_the_end_and_complete_once(store: &dyn StateStore) {
    let u = stream("seg1", 100, Assembly::Segments { partial: false });
    let append = |s: ChunkRecord| {
        let id = u.id.clone();
        async move { store.append_segment(&id, &s, &merge(&id), TTL).await }
    };
    assert!(matches!(
        append(segment(0, 10)).await,
        Err(StateError::NotFound)
    ));
    store.create_upload(&u, &created(&u.id), TTL).await.unwrap();
    assert!(matches!(
        append(segment(10, 10)).await,
        Err(StateError::Conflict(Conflict::Offset { current: 0 }))
    ));
    let p = append(segment(0, 40)).await.unwrap();
    assert_eq!(
        (p.bytes_received, p.chunks_received, p.completed_upload),
        (40, 1, false)
    );
    assert!(matches!(
        append(segment(40, 70)).await,
        Err(StateError::Conflict(Conflict::PastEnd { size: 100 }))
    ));
    assert!(matches!(
        append(segment(0, 10)).await,
        Err(StateError::Conflict(Conflict::Offset { current: 40 }))
    ));
    let p = append(segment(40, 60)).await.unwrap();
    assert!(p.completed_upload);
    assert_eq!(p.state, UploadState::Merging);
    assert!(matches!(
        append(segment(100, 0)).await,
        Err(StateError::Conflict(Conflict::NotReceiving(
            UploadState::Merging
        )))
    ));
    // A chunk of the chunk protocol does not join an upload of segments.
    let as_chunks = upload("seg1", 100, 100);
    assert!(matches!(
        store
            .record_chunk(
                &as_chunks,
                &chunk(&as_chunks, 0, 9),
                &merge(&u.id),
                &created(&u.id),
                TTL
            )
            .await,
        Err(StateError::Conflict(Conflict::Assembly))
    ));
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.assembly, u.assembly);
    assert!(status.uploaded_chunks.is_empty());
    assert_eq!(status.bytes_received, 100);
    assert_eq!(
        triggers(store.pending_outbox(u64::MAX).await.unwrap())
            .iter()
            .filter(|id| *id == &u.id)
            .count(),
        1
    );
    let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not merging");
    };
    assert_eq!(plan.upload.assembly, u.assembly);
    let places: Vec<(u64, u64, u64)> = plan
        .chunks
        .iter()
        .map(|c| (c.index.0, c.offset, c.len))
        .collect();
    assert_eq!(places, [(0, 0, 40), (1, 40, 60)]);
    // Segments do not go to an upload of chunks either.
    let chunked = upload("seg2", 100, 50);
    store
        .create_upload(&chunked, &created(&chunked.id), TTL)
        .await
        .unwrap();
    assert!(matches!(
        store
            .append_segment(&chunked.id, &segment(0, 10), &merge(&chunked.id), TTL)
            .await,
        Err(StateError::Conflict(Conflict::Assembly))
    ));
}

async fn a_deferred_length_is_declared_once_and_may_complete_the_upload(store: &dyn StateStore) {
    let u = NewUpload {
        geometry: Geometry::deferred(),
        ..stream("defer1", 1, Assembly::Segments { partial: false })
    };
    store.create_upload(&u, &created(&u.id), TTL).await.unwrap();
    // Open: any segment fits.
    let p = store
        .append_segment(&u.id, &segment(0, 1 << 40), &merge(&u.id), TTL)
        .await
        .unwrap();
    assert!(!p.completed_upload);
    let declare = |length| {
        let id = u.id.clone();
        async move { store.declare_length(&id, length, &merge(&id), TTL).await }
    };
    assert!(matches!(
        declare((1 << 40) - 1).await,
        Err(StateError::Conflict(Conflict::Length { current: 0, .. }))
    ));
    let p = declare((1 << 40) + 10).await.unwrap();
    assert!(!p.completed_upload);
    // The same again changes nothing; another one is refused.
    assert!(!declare((1 << 40) + 10).await.unwrap().completed_upload);
    assert!(matches!(
        declare((1 << 40) + 11).await,
        Err(StateError::Conflict(Conflict::Length { .. }))
    ));
    assert!(matches!(
        store
            .append_segment(&u.id, &segment(1 << 40, 11), &merge(&u.id), TTL)
            .await,
        Err(StateError::Conflict(Conflict::PastEnd { .. }))
    ));
    let done = store
        .append_segment(&u.id, &segment(1 << 40, 10), &merge(&u.id), TTL)
        .await
        .unwrap();
    assert!(done.completed_upload);
    // Declared when every byte is there already: the declaration completes it.
    let v = NewUpload {
        geometry: Geometry::deferred(),
        ..stream("defer2", 1, Assembly::Segments { partial: false })
    };
    store.create_upload(&v, &created(&v.id), TTL).await.unwrap();
    store
        .append_segment(&v.id, &segment(0, 5), &merge(&v.id), TTL)
        .await
        .unwrap();
    let p = store
        .declare_length(&v.id, 5, &merge(&v.id), TTL)
        .await
        .unwrap();
    assert!(p.completed_upload);
    assert_eq!(p.state, UploadState::Merging);
    let status = store.upload_status(&v.id).await.unwrap().unwrap();
    assert_eq!(status.geometry, Geometry::new(5, 5).unwrap());
}

async fn a_complete_partial_upload_waits_and_a_concatenation_merges_as_created(
    store: &dyn StateStore,
) {
    let a = stream("part-a", 30, Assembly::Segments { partial: true });
    let b = stream("part-b", 20, Assembly::Segments { partial: true });
    for p in [&a, &b] {
        store.create_upload(p, &created(&p.id), TTL).await.unwrap();
        let done = store
            .append_segment(
                &p.id,
                &segment(0, p.geometry.total_size),
                &merge(&p.id),
                TTL,
            )
            .await
            .unwrap();
        assert!(
            !done.completed_upload,
            "a partial upload never merges alone"
        );
        assert_eq!(done.state, UploadState::Receiving);
        assert_eq!(done.bytes_received, p.geometry.total_size);
    }
    let whole = stream(
        "whole",
        50,
        Assembly::Concat {
            parts: vec![a.id.clone(), b.id.clone()],
        },
    );
    assert_eq!(
        store
            .create_concatenation(&whole, &created(&whole.id), &merge(&whole.id), TTL)
            .await
            .unwrap(),
        Created::New
    );
    assert_eq!(
        store
            .create_concatenation(&whole, &created(&whole.id), &merge(&whole.id), TTL)
            .await
            .unwrap(),
        Created::AlreadyExists
    );
    let pending = triggers(store.pending_outbox(u64::MAX).await.unwrap());
    assert!(pending.contains(&whole.id), "{pending:?}");
    assert!(!pending.contains(&a.id) && !pending.contains(&b.id));
    assert!(matches!(
        store
            .append_segment(&whole.id, &segment(0, 1), &merge(&whole.id), TTL)
            .await,
        Err(StateError::Conflict(Conflict::Assembly))
    ));
    let MergeStart::Ready(plan) = store.begin_merge(&whole.id, TTL).await.unwrap() else {
        panic!("a concatenation merges as it is created");
    };
    assert_eq!(plan.upload.assembly, whole.assembly);
    assert!(plan.chunks.is_empty());
    // Restored from storage, a complete partial upload still waits; a complete upload of
    // segments merges.
    let lost_partial = stream("part-c", 10, Assembly::Segments { partial: true });
    let lost_whole = stream("seg-c", 10, Assembly::Segments { partial: false });
    for (u, expected) in [
        (&lost_partial, UploadState::Receiving),
        (&lost_whole, UploadState::Merging),
    ] {
        let r = Restoration {
            upload: u.clone(),
            chunks: vec![segment(0, 10)],
            completion: None,
            fence: 1,
            last_activity_ms: stitch_common::now_ms(),
        };
        assert_eq!(
            store
                .restore_upload(&r, &merge(&u.id), &created(&u.id), TTL)
                .await
                .unwrap(),
            Restored::Now(expected)
        );
        assert_eq!(
            store.upload_status(&u.id).await.unwrap().unwrap().assembly,
            u.assembly
        );
    }
}

/// Every state store check, run against one implementation.
async fn run_state_contract(store: &dyn StateStore) {
    chunks_are_counted_once_and_never_overwritten(store).await;
    completion_is_reported_exactly_once(store).await;
    creation_is_idempotent_for_the_same_declaration(store).await;
    abort_is_idempotent_and_refuses_later_chunks(store).await;
    the_commit_accepts_only_the_newest_fencing_token(store).await;
    a_completion_without_the_optional_digests_reads_with_them_absent(store).await;
    a_failed_merge_is_final(store).await;
    the_outbox_holds_the_trigger_until_cleared(store).await;
    merge_triggers_and_events_are_kept_apart_and_cleared_exactly(store).await;
    events_ride_the_outbox_with_their_state_changes(store).await;
    a_lost_upload_is_restored_once_from_storage(store).await;
    expiring_excludes_recording_and_spares_live_uploads(store).await;
    lost_chunks_reopen_the_upload_fenced_and_count_again_when_sent_again(store).await;
    segments_append_only_at_the_end_and_complete_once(store).await;
    a_complete_partial_upload_waits_and_a_concatenation_merges_as_created(store).await;
    a_deferred_length_is_declared_once_and_may_complete_the_upload(store).await;
}

#[tokio::test]
async fn a_redis_fencing_counter_that_expired_never_restarts_below_a_token_handed_out() {
    let env = TestEnv::new();
    let store = redis_store(&env);
    let u = upload("f1", 10, 10);
    store
        .record_chunk(&u, &chunk(&u, 0, 1), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    let MergeStart::Ready(first) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    let MergeStart::Ready(second) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    // The counter's TTL passes (an upload back to receiving for longer than uploads.ttl).
    let mut conn = stitch_testkit::redis_connection().unwrap();
    let () = redis::cmd("DEL")
        .arg(keys::fence(&env.namespace, &u.id))
        .query(&mut conn)
        .unwrap();
    let MergeStart::Ready(third) = store.begin_merge(&u.id, TTL).await.unwrap() else {
        panic!("not ready");
    };
    assert!(
        third.fence > second.fence && second.fence > first.fence,
        "tokens {} {} {}",
        first.fence,
        second.fence,
        third.fence
    );
    let stale = store
        .commit_merge(&u.id, second.fence, &completion("stale"), &completed(&u.id))
        .await;
    assert!(
        matches!(stale, Err(StateError::Conflict(Conflict::Fenced))),
        "{stale:?}"
    );
}

#[tokio::test]
async fn the_redis_state_store_keeps_the_state_store_contract() {
    let env = TestEnv::new();
    let store = redis_store(&env);
    run_state_contract(store.as_ref()).await;
}

fn redis_lock(env: &TestEnv, ttl: Duration) -> Arc<dyn MergeLock> {
    let mut settings = env.settings();
    settings.lock.ttl = Interval(ttl);
    Arc::new(RedisLock::new(&settings).unwrap())
}

async fn only_the_lease_holder_can_renew_or_release_the_lock(lock: &dyn MergeLock) {
    let key = LockName::Merge(UploadId::parse("l1").unwrap());
    let mut held = lock.try_acquire(&key).await.unwrap().expect("free lock");
    assert!(held.is_valid());
    assert!(
        lock.try_acquire(&key).await.unwrap().is_none(),
        "held twice"
    );
    let janitor = lock
        .try_acquire(&LockName::Janitor)
        .await
        .unwrap()
        .expect("the janitor's lock is not an upload's");
    assert!(lock.release(&janitor).await.unwrap());
    let forged = Lease::new(
        key.clone(),
        "not-the-token".into(),
        std::time::Instant::now(),
    );
    assert!(
        !lock.release(&forged).await.unwrap(),
        "a non-owner released the lock"
    );
    assert!(lock.is_held(&key).await.unwrap());
    assert!(lock.try_acquire(&key).await.unwrap().is_none());
    assert!(lock.renew(&mut held).await.unwrap());
    assert!(lock.release(&held).await.unwrap());
    assert!(!lock.is_held(&key).await.unwrap());
    assert!(lock.try_acquire(&key).await.unwrap().is_some());
}

async fn a_lapsed_lease_is_lost_to_the_next_holder(lock: &dyn MergeLock) {
    let key = LockName::Merge(UploadId::parse("l2").unwrap());
    let mut old = lock.try_acquire(&key).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !old.is_valid(),
        "the holder's own clock says the lease lapsed"
    );
    let new = lock
        .try_acquire(&key)
        .await
        .unwrap()
        .expect("the lapsed lock is free");
    assert!(
        !lock.renew(&mut old).await.unwrap(),
        "the old holder renewed someone else's lease"
    );
    assert!(!lock.release(&old).await.unwrap());
    assert!(
        lock.is_held(&key).await.unwrap(),
        "the old holder's release removed the new lease"
    );
    assert!(lock.release(&new).await.unwrap());
}

#[tokio::test]
async fn the_redis_lock_keeps_the_lock_contract() {
    let env = TestEnv::new();
    only_the_lease_holder_can_renew_or_release_the_lock(
        redis_lock(&env, Duration::from_secs(5)).as_ref(),
    )
    .await;
    a_lapsed_lease_is_lost_to_the_next_holder(
        redis_lock(&env, Duration::from_millis(300)).as_ref(),
    )
    .await;
}

/// A Redlock over `nodes` (`lock.redis_urls`).
fn redlock(env: &TestEnv, nodes: &[RedisServer], ttl: Duration) -> Arc<dyn MergeLock> {
    let mut settings = env.settings();
    settings.lock.redis_urls = nodes
        .iter()
        .map(|n| stitch_common::config::Secret::new(n.url()))
        .collect();
    settings.lock.ttl = Interval(ttl);
    Arc::new(RedisLock::new(&settings).unwrap())
}

#[tokio::test]
async fn the_redis_lock_over_three_nodes_keeps_the_lock_contract_with_one_of_them_down() {
    let mut nodes = RedisServer::start_many(3);
    for round in 0..2 {
        if round == 1 {
            nodes[1].stop();
        }
        let env = TestEnv::local();
        only_the_lease_holder_can_renew_or_release_the_lock(
            redlock(&env, &nodes, Duration::from_secs(5)).as_ref(),
        )
        .await;
        a_lapsed_lease_is_lost_to_the_next_holder(
            redlock(&env, &nodes, Duration::from_millis(300)).as_ref(),
        )
        .await;
    }
}

// ----- The same contracts over the embedded (single-node) backends -----

fn sqlite_backends(
    env: &TestEnv,
    adjust: impl FnOnce(&mut stitch_common::config::Settings),
) -> Backends {
    let mut settings = env.settings();
    adjust(&mut settings);
    Backends::embedded(&settings, &env.storage_root.join("stitch.db")).unwrap()
}

#[tokio::test]
async fn the_sqlite_state_store_keeps_the_state_store_contract() {
    let env = TestEnv::local();
    let store = sqlite_backends(&env, |_| {}).state;
    run_state_contract(store.as_ref()).await;
}

#[tokio::test]
async fn the_sqlite_lock_keeps_the_lock_contract() {
    let env = TestEnv::local();
    let lock = |ttl| sqlite_backends(&env, |s| s.lock.ttl = Interval(ttl)).lock;
    only_the_lease_holder_can_renew_or_release_the_lock(lock(Duration::from_secs(5)).as_ref())
        .await;
    a_lapsed_lease_is_lost_to_the_next_holder(lock(Duration::from_millis(300)).as_ref()).await;
}

#[tokio::test]
async fn the_sqlite_state_survives_reopening_the_database() {
    let env = TestEnv::local();
    let u = upload("p1", 25, 10);
    {
        let store = sqlite_backends(&env, |_| {}).state;
        store
            .record_chunk(&u, &chunk(&u, 2, 9), &merge(&u.id), &created(&u.id), TTL)
            .await
            .unwrap();
    }
    let store = sqlite_backends(&env, |_| {}).state;
    let status = store.upload_status(&u.id).await.unwrap().unwrap();
    assert_eq!(status.uploaded_chunks, vec![2]);
    assert_eq!(status.bytes_received, 5);
}

#[tokio::test]
async fn a_version_1_sqlite_outbox_is_upgraded_with_each_entry_under_its_kind() {
    let env = TestEnv::local();
    let path = env.storage_root.join("stitch.db");
    let u = upload("v1", 20, 10);
    sqlite_backends(&env, |_| {})
        .state
        .record_chunk(&u, &chunk(&u, 0, 1), &merge(&u.id), &created(&u.id), TTL)
        .await
        .unwrap();
    // The outbox as schema 1 kept it: no kind, merge triggers and events told apart by text.
    let job = MergeJob::new(u.id.clone()).to_json();
    let made = serde_json::to_string(&created(&u.id)).unwrap();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE outbox; \
             CREATE TABLE outbox (id INTEGER PRIMARY KEY, upload_id TEXT NOT NULL, \
             raw TEXT NOT NULL, enqueued_at INTEGER NOT NULL); \
             PRAGMA user_version = 1;",
        )
        .unwrap();
        for raw in [job.as_str(), made.as_str(), "not an outbox message"] {
            conn.execute(
                "INSERT INTO outbox (upload_id, raw, enqueued_at) VALUES (?1, ?2, 1)",
                rusqlite::params![u.id.as_str(), raw],
            )
            .unwrap();
        }
    }
    let store = sqlite_backends(&env, |_| {}).state;
    assert_eq!(
        outbox_of(store.as_ref(), &u.id).await,
        ["merge", "upload.created"]
    );
    // The kinds are stored now: an abort drops the trigger and keeps the event.
    store
        .abort_upload(&u.id, &aborted(&u.id), TTL)
        .await
        .unwrap();
    assert_eq!(
        outbox_of(store.as_ref(), &u.id).await,
        ["upload.aborted", "upload.created"]
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, stitch_common::embedded::SCHEMA_VERSION);
    let kept: i64 = conn
        .query_row("SELECT COUNT(*) FROM outbox WHERE kind = ''", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(kept, 1, "an entry of no known kind is kept, not dropped");
}

#[tokio::test]
async fn a_version_2_sqlite_database_gains_the_digest_columns_and_keeps_its_completions() {
    let env = TestEnv::local();
    let path = env.storage_root.join("stitch.db");
    let u = upload("v2", 20, 10);
    {
        let store = sqlite_backends(&env, |_| {}).state;
        record_all(store.as_ref(), &u).await;
        let MergeStart::Ready(plan) = store.begin_merge(&u.id, TTL).await.unwrap() else {
            panic!("not ready");
        };
        store
            .commit_merge(&u.id, plan.fence, &completion("v2"), &completed(&u.id))
            .await
            .unwrap();
    }
    // The uploads table as schema 2 kept it: no digest columns.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "ALTER TABLE uploads DROP COLUMN crc32c; \
             ALTER TABLE uploads DROP COLUMN sha256; \
             ALTER TABLE uploads DROP COLUMN composite_md5; \
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let store = sqlite_backends(&env, |_| {}).state;
    let done = store
        .upload_status(&u.id)
        .await
        .unwrap()
        .unwrap()
        .completion;
    assert_eq!(
        done,
        Some(Completion {
            crc32c: None,
            sha256: None,
            composite_md5: None,
            ..completion("v2")
        })
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, stitch_common::embedded::SCHEMA_VERSION);
}

// ----- The merge queue contract -----

const SOON: Duration = Duration::from_millis(400);
const PATIENCE: Duration = Duration::from_secs(20);

fn job(id: &str) -> MergeJob {
    MergeJob::new(UploadId::parse(id).unwrap())
}

async fn next_job(d: &mut Box<dyn Deliveries>, within: Duration) -> Option<Delivery> {
    match tokio::time::timeout(within, d.next()).await {
        Ok(Some(Ok(delivery))) => Some(delivery),
        Ok(Some(Err(e))) => panic!("consumer failed: {e}"),
        Ok(None) | Err(_) => None,
    }
}

async fn an_acked_job_is_gone_and_an_unacked_one_comes_back(queue: &dyn WorkQueue) {
    queue
        .enqueue(job("q1").to_json().as_bytes(), NOW)
        .await
        .unwrap();
    queue
        .enqueue(job("q2").to_json().as_bytes(), NOW)
        .await
        .unwrap();
    let mut d = queue.consume(2).await.unwrap();
    let first = next_job(&mut d, PATIENCE).await.expect("first job");
    let second = next_job(&mut d, PATIENCE).await.expect("second job");
    let (acked, kept) = if MergeJob::from_json(&first.payload)
        .unwrap()
        .upload_id
        .as_str()
        == "q1"
    {
        (first, second)
    } else {
        (second, first)
    };
    assert!(!acked.redelivered);
    acked.ack().await.unwrap();
    drop(kept);
    d.close().await;
    let mut d = queue.consume(2).await.unwrap();
    let again = next_job(&mut d, PATIENCE)
        .await
        .expect("the unacked job is redelivered");
    assert_eq!(
        MergeJob::from_json(&again.payload)
            .unwrap()
            .upload_id
            .as_str(),
        "q2"
    );
    assert!(again.redelivered);
    again.ack().await.unwrap();
    assert!(
        next_job(&mut d, SOON).await.is_none(),
        "the acked job came back"
    );
    d.close().await;
}

async fn prefetch_bounds_unsettled_deliveries(queue: &dyn WorkQueue) {
    for id in ["p1", "p2"] {
        queue
            .enqueue(job(id).to_json().as_bytes(), NOW)
            .await
            .unwrap();
    }
    let mut d = queue.consume(1).await.unwrap();
    let first = next_job(&mut d, PATIENCE).await.expect("a job");
    assert!(
        next_job(&mut d, SOON).await.is_none(),
        "a second delivery beyond prefetch 1"
    );
    first.ack().await.unwrap();
    let second = next_job(&mut d, PATIENCE)
        .await
        .expect("the next job once the first is settled");
    second.ack().await.unwrap();
    d.close().await;
}

async fn a_retry_waits_its_delay(queue: &dyn WorkQueue, delay: Duration) {
    let mut d = queue.consume(1).await.unwrap();
    let retried = MergeJob {
        attempt: 1,
        ..job("r1")
    };
    let sent = std::time::Instant::now();
    queue
        .enqueue(retried.to_json().as_bytes(), delay)
        .await
        .unwrap();
    assert!(
        next_job(&mut d, delay / 2).await.is_none(),
        "delivered before its delay"
    );
    let back = next_job(&mut d, PATIENCE)
        .await
        .expect("the retry comes back");
    assert!(sent.elapsed() >= delay.mul_f32(0.9));
    assert_eq!(MergeJob::from_json(&back.payload).unwrap().attempt, 1);
    back.ack().await.unwrap();
    d.close().await;
}

async fn a_job_requeued_past_the_delivery_limit_is_dead_lettered(
    queue: &dyn WorkQueue,
    limit: u32,
) {
    queue
        .enqueue(job("d1").to_json().as_bytes(), NOW)
        .await
        .unwrap();
    let mut d = queue.consume(1).await.unwrap();
    // The first delivery plus `limit` redeliveries.
    for _ in 0..=limit {
        let delivery = next_job(&mut d, PATIENCE)
            .await
            .expect("a delivery within the limit");
        delivery.requeue().await.unwrap();
    }
    assert!(
        next_job(&mut d, Duration::from_secs(1)).await.is_none(),
        "delivered past the limit"
    );
    d.close().await;
}

async fn a_poison_message_is_delivered_as_such(queue: &dyn WorkQueue) {
    queue.enqueue(b"{not json", NOW).await.unwrap();
    let mut d = queue.consume(1).await.unwrap();
    let poison = next_job(&mut d, PATIENCE).await.expect("the message");
    assert!(MergeJob::from_json(&poison.payload).is_err());
    assert_eq!(poison.payload, b"{not json");
    queue
        .dead_letter(&poison.payload, "not a job")
        .await
        .unwrap();
    poison.ack().await.unwrap();
    d.close().await;
}

async fn run_queue_contract(make: impl Fn() -> Arc<dyn WorkQueue>, limit: u32) {
    an_acked_job_is_gone_and_an_unacked_one_comes_back(make().as_ref()).await;
    prefetch_bounds_unsettled_deliveries(make().as_ref()).await;
    a_poison_message_is_delivered_as_such(make().as_ref()).await;
    a_job_requeued_past_the_delivery_limit_is_dead_lettered(make().as_ref(), limit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rabbitmq_queue_keeps_the_queue_contract() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.merge.delivery_limit = 3;
    let make = || -> Arc<dyn WorkQueue> {
        Arc::new(Arc::new(AmqpBroker::new(&settings)).queue(Family::Merge))
    };
    run_queue_contract(make, 3).await;
    // One of the delays the test environment configures.
    a_retry_waits_its_delay(make().as_ref(), Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_queue_keeps_the_queue_contract() {
    let env = TestEnv::local();
    let make = || sqlite_backends(&env, |s| s.merge.delivery_limit = 3).merges;
    run_queue_contract(make, 3).await;
    a_retry_waits_its_delay(make().as_ref(), Duration::from_millis(1500)).await;
}
