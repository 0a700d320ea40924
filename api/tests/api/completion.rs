//! The completion race: the chunk that completes an upload triggers the merge exactly once,
//! even when the last chunks arrive at once on two instances.

use std::sync::Arc;

use stitch_testkit::events::take_merge_jobs;
use tokio::sync::Semaphore;

use crate::helpers::*;

/// Runs `rounds` uploads of 32 chunks, sent 16 at a time across two instances, highest
/// index first; checks each completed exactly once and returns their ids.
async fn race(a: &Arc<TestApp>, b: &Arc<TestApp>, rounds: usize) -> Vec<String> {
    let source = Arc::new(Source::random(32 * 1024, 1024, 11));
    let mut ids = Vec::new();
    for round in 0..rounds {
        let id = Arc::new(new_id());
        ids.push(id.to_string());
        let permits = Arc::new(Semaphore::new(16));
        let mut tasks = Vec::new();
        for index in (0..32u64).rev() {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let app = if index % 2 == 0 { a.clone() } else { b.clone() };
            let (id, source) = (id.clone(), source.clone());
            tasks.push(tokio::spawn(async move {
                let result = app.put_chunk(&id, &source, index).await;
                drop(permit);
                result
            }));
        }
        let mut completions = 0;
        for task in tasks {
            let (code, body) = task.await.unwrap();
            assert_eq!(code, 200, "round {round}: {body}");
            if body["upload_complete"] == true {
                completions += 1;
                assert_eq!(body["state"], "merging");
            }
        }
        assert_eq!(
            completions, 1,
            "round {round}: exactly one chunk completed the upload"
        );
        let (_, status) = a.status(&id).await;
        assert_eq!(status["state"], "merging");
        assert_eq!(status["chunks_received"], 32);
    }
    ids
}

/// The upload's outbox entries of one kind (`merge` or `events`), as stored.
fn outbox_list(env: &TestEnv, id: &str, kind: &str) -> Vec<String> {
    let mut conn = redis_connection().expect("Redis");
    redis::cmd("LRANGE")
        .arg(format!("{}:{{{id}}}:outbox:{kind}", env.namespace))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap()
}

/// Every entry of the upload's outbox, merge triggers first.
fn outbox(env: &TestEnv, id: &str) -> Vec<String> {
    let mut entries = outbox_list(env, id, "merge");
    entries.extend(outbox_list(env, id, "events"));
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_completing_chunk_enqueues_exactly_one_merge_job_under_a_race() {
    let a = Arc::new(spawn_app().await);
    let b = Arc::new(a.sibling().await);
    let ids = race(&a, &b, 20).await;
    let jobs = take_merge_jobs(&a.env).await;
    for id in &ids {
        let for_id = jobs
            .iter()
            .filter(|j| j["upload_id"] == id.as_str())
            .count();
        assert_eq!(for_id, 1, "{id}: one merge job on the queue");
        assert!(
            outbox(&a.env, id).is_empty(),
            "{id}: the confirmed job left the outbox"
        );
    }
    assert_eq!(jobs.len(), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_unreachable_the_race_leaves_exactly_one_trigger_in_the_outbox() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = move |s: &mut stitch_common::config::Settings| {
        s.amqp.url =
            stitch_common::config::Secret::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
        s.amqp.timeout = stitch_common::config::Interval(std::time::Duration::from_secs(1));
    };
    let a = Arc::new(spawn_app_with(unreachable).await);
    let b = Arc::new(spawn_in(a.env.clone(), unreachable).await);
    for id in race(&a, &b, 10).await {
        let parse = |entries: Vec<String>| -> Vec<serde_json::Value> {
            entries
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect()
        };
        let jobs = parse(outbox_list(&a.env, &id, "merge"));
        assert_eq!(jobs.len(), 1, "{id}: one merge trigger in the outbox");
        assert_eq!(jobs[0]["upload_id"], id.as_str());
        // The upload.created event waits there too, published by the sweeper later.
        let events = parse(outbox_list(&a.env, &id, "events"));
        let created: Vec<_> = events
            .iter()
            .filter(|e| e["event"]["type"] == "upload.created")
            .collect();
        assert_eq!(
            created.len(),
            1,
            "{id}: one upload.created event in the outbox"
        );
        assert_eq!(events.len(), 1);
    }
}
