//! The merge lock over three independent Redis nodes (`STITCH__LOCK__REDIS_URLS`), each a
//! `redis-server` of the test's own: merges go on while a majority of them is up, and wait,
//! unharmed, while none is.

use std::time::Duration;

use stitch_testkit::redis_server::RedisServer;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);
/// Longer than every merge retry the harness configures (500 ms, 2 s) and several sweeper
/// intervals: an outage that used up the upload's attempts would have failed it by then.
const OUTAGE: Duration = Duration::from_secs(8);

fn start_worker_locking_on(
    env: &TestEnv,
    nodes: &[RedisServer],
    extra: &[(&str, &str)],
) -> ServiceProcess {
    let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
    let mut cmd = worker_command(env);
    cmd.env("STITCH__LOCK__REDIS_URLS", urls.join(","));
    for (key, value) in extra {
        cmd.env(key, value);
    }
    ServiceProcess::start(cmd, "stitch-worker listening")
}

/// Uploads `source` as `id` and waits until it is completed with the right bytes.
async fn upload_and_see_it_merged(client: &ApiClient, tap: &EventTap, id: &str, source: &Source) {
    let md5 = md5_hex(&source.bytes);
    upload(std::slice::from_ref(client), id, source, &md5).await;
    let status = client.wait_for_state(id, "completed", MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert_eq!(client.download(id).await, source.bytes);
    tap.wait_for(id, "upload.completed", MINUTE).await;
}

/// While the lock has no majority: the upload is still `merging` with its chunks intact, no
/// attempt began (the fence never moved), nothing was merged and nothing failed.
async fn assert_waiting_unharmed(
    env: &TestEnv,
    client: &ApiClient,
    tap: &EventTap,
    id: &str,
    source: &Source,
) {
    let (_, status) = client.status(id).await;
    assert_eq!(status["state"], "merging", "{status}");
    assert_eq!(
        merge_attempts(env, id),
        0,
        "a merge attempt began without a lease"
    );
    let files = upload_files(env, id);
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("file.") || f.ends_with(".tmp")),
        "merged output without a lease: {files:?}"
    );
    assert_eq!(reassemble_counted(env, id), source.bytes);
    assert!(
        tap.events_of(id)
            .iter()
            .all(|e| e["type"] != "upload.failed"),
        "{:?}",
        tap.events_of(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merges_go_on_with_a_majority_of_lock_nodes_and_wait_unharmed_without_one() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let mut nodes = RedisServer::start_many(3);
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let _worker = start_worker_locking_on(&env, &nodes, &[]);

    let all_up = new_id();
    upload_and_see_it_merged(
        &client,
        &tap,
        &all_up,
        &Source::random(3 << 20, 1 << 20, 41),
    )
    .await;

    nodes[0].stop();
    let one_down = new_id();
    upload_and_see_it_merged(
        &client,
        &tap,
        &one_down,
        &Source::random(3 << 20, 1 << 20, 42),
    )
    .await;

    nodes[1].stop();
    let id = new_id();
    let source = Source::random(3 << 20, 1 << 20, 43);
    let md5 = md5_hex(&source.bytes);
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    tokio::time::sleep(OUTAGE).await;
    assert_waiting_unharmed(&env, &client, &tap, &id, &source).await;

    // One node back, empty: a majority again.
    nodes[0].restart();
    let status = client.wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert_eq!(client.download(&id).await, source.bytes);
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    // Time for a duplicate to show up, if anything published one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = tap.events_of(&id);
    let completed = events
        .iter()
        .filter(|e| e["type"] == "upload.completed")
        .count();
    assert_eq!(completed, 1, "{events:?}");
    assert!(events.iter().all(|e| e["type"] != "upload.failed"));
    assert_eq!(merge_attempts(&env, &id), 1);
    for done in [&all_up, &one_down] {
        assert_eq!(distinct_event_ids(&tap, done, "upload.completed").len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweeper_leaves_a_merge_alone_while_no_majority_of_lock_nodes_answers() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let mut nodes = RedisServer::start_many(3);
    nodes[0].stop();
    nodes[1].stop();
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    // A sweeper that re-enqueues a merge stuck for a second with no lock holder: it must not
    // take "no answer" for "nobody holds it", and whatever it re-enqueues waits unharmed.
    let _worker = start_worker_locking_on(
        &env,
        &nodes,
        &[("STITCH__SWEEPER__STUCK_MERGE_HORIZON", "1s")],
    );

    let id = new_id();
    let source = Source::random(2 << 20, 1 << 20, 44);
    let md5 = md5_hex(&source.bytes);
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    tokio::time::sleep(OUTAGE).await;
    assert_waiting_unharmed(&env, &client, &tap, &id, &source).await;

    nodes[1].restart();
    let status = client.wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(client.download(&id).await, source.bytes);
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    assert_eq!(distinct_event_ids(&tap, &id, "upload.completed").len(), 1);
}
