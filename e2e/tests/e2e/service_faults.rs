//! Faults of the services Stitch depends on, made to services the tests own: a Redis with an
//! append-only file killed and restarted in the middle of a merge, a Redis restarted empty
//! in the middle of an upload (both protocols), a RabbitMQ killed and restarted in the middle
//! of a merge, the broker connection black-holed during a merge; and a worker told to stop
//! in the middle of a merge. Each checks, as the crash tests do, that the upload completes
//! exactly once with the right bytes, one completion event id, and nothing left on storage
//! after a janitor pass. `docs/reliability.md` lists them with what Stitch guarantees.

use std::time::Duration;

use stitch_testkit::proxy::TcpProxy;
use stitch_testkit::rabbit_server::RabbitServer;
use stitch_testkit::redis_server::RedisServer;
use stitch_testkit::tus::{Tus, id_of};

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// A worker whose merge reads and hashes 4 KiB at a time: slow enough to be caught in the
/// middle of a file of a few hundred MiB.
fn slow_worker(
    env: &TestEnv,
    configure: impl FnOnce(&mut std::process::Command),
) -> ServiceProcess {
    let mut cmd = worker_command(env);
    cmd.env("STITCH__MERGE__BUFFER_BYTES", "4KiB");
    configure(&mut cmd);
    ServiceProcess::start(cmd, "stitch-worker listening")
}

/// A file of `mib` MiB in 16 MiB chunks, and its MD5.
fn big_file(mib: usize, seed: u64) -> (Source, String) {
    let source = Source::random(mib * MIB, 16 << 20, seed);
    let md5 = md5_hex(&source.bytes);
    (source, md5)
}

/// Waits until the upload's merge is under way: the upload is `merging` and a merge's
/// temporary file exists.
async fn wait_mid_merge(env: &TestEnv, client: &ApiClient, id: &str) {
    until(MINUTE, "a merge in progress", async || {
        !temp_files(env, id).is_empty()
    })
    .await;
    let (_, status) = client.status(id).await;
    assert_eq!(
        status["state"], "merging",
        "the merge was caught in the middle: {status}"
    );
}

/// Runs `fault` with the worker stopped (SIGSTOP), then lets it go on (SIGCONT): a merge of
/// a few hundred MiB takes well under a second here, and this keeps the fault in its middle.
fn with_worker_held(worker: &ServiceProcess, fault: impl FnOnce()) {
    worker.signal("STOP");
    fault();
    worker.signal("CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_with_its_append_only_file_mid_merge_loses_nothing() {
    let mut redis = RedisServer::start_persistent();
    let env = TestEnv::on(Services {
        redis_url: redis.url(),
        amqp_url: amqp_url(),
    });
    let tap = EventTap::start(&env).await;
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    let worker = slow_worker(&env, |_| {});
    let (source, md5) = big_file(256, 81);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_mid_merge(&env, &client, &id).await;

    // Down for a second while the merge goes on: its lease renewals and its commit meet a
    // Redis that is gone, then one that came back with every acknowledged write. (The
    // worker is held for the moment of the kill, so that the merge is still running.)
    with_worker_held(&worker, || redis.kill());
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();
    let (code, status) = client.status(&id).await;
    assert_eq!(code, 200, "{status}");
    assert!(
        status["state"] == "merging" || status["state"] == "completed",
        "the append-only file kept the upload's state: {status}"
    );
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_killed_and_restarted_mid_merge_loses_nothing() {
    let mut rabbit = RabbitServer::start().expect("a RabbitMQ of the test's own");
    let env = TestEnv::on(Services {
        redis_url: redis_url(),
        amqp_url: rabbit.url(),
    });
    // The tap's queue is durable: it keeps the events through the broker's crash.
    let tap = DurableTap::start(&env).await.unwrap();
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    let worker = slow_worker(&env, |_| {});
    let (source, md5) = big_file(256, 82);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_mid_merge(&env, &client, &id).await;

    // The merge job is unacked on a connection that dies with the broker; the merge goes on
    // (storage and Redis), but its event and ack have no broker for a while.
    with_worker_held(&worker, || rabbit.kill());
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.restart().expect("RabbitMQ back on its ports");
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_connection_black_holed_during_a_merge_commits_once_after_it_returns() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    // Only the worker reaches RabbitMQ through the proxy; heartbeats every 2 s, so that
    // both ends can tell the path is dead.
    let proxy = TcpProxy::start(amqp_addr()).await;
    let via_proxy = format!("{}?heartbeat=2", amqp_url_via(proxy.addr));
    let worker = slow_worker(&env, |cmd| {
        cmd.env("STITCH__AMQP__URL", &via_proxy)
            .env("STITCH__AMQP__TIMEOUT", "2s");
    });
    let (source, md5) = big_file(256, 83);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_mid_merge(&env, &client, &id).await;

    // Packets vanish: no reset, no end of stream, for well past the heartbeat timeout.
    with_worker_held(&worker, || proxy.freeze());
    let frozen_at = tokio::time::Instant::now();
    while frozen_at.elapsed() < Duration::from_secs(15) {
        let (_, status) = client.status(&id).await;
        assert!(
            status["state"] == "merging" || status["state"] == "completed",
            "{status}"
        );
        if status["state"] == "completed" {
            assert_eq!(status["md5"], md5.as_str(), "{status}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy.restore();
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_mid_merge_with_a_short_grace_hands_the_job_back_unmerged() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    let mut worker = slow_worker(&env, |cmd| {
        // No grace: a running merge is cancelled at once.
        cmd.env("STITCH__HTTP__SHUTDOWN_GRACE", "0s");
    });
    let (source, md5) = big_file(256, 84);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_mid_merge(&env, &client, &id).await;

    with_worker_held(&worker, || worker.signal("TERM"));
    let status = worker.wait_exit(MINUTE);
    assert!(status.success(), "the worker exited with {status}");
    let (_, status) = client.status(&id).await;
    assert_eq!(
        status["state"], "merging",
        "the cancelled merge committed nothing: {status}"
    );
    assert!(
        distinct_event_ids(&tap, &id, "upload.completed").is_empty(),
        "nothing was announced: {:?}",
        tap.events_of(&id)
    );

    // The job went back to the queue with the connection: the next worker merges it.
    let _next = start_worker(&env);
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_mid_merge_with_a_long_grace_finishes_the_merge_first() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api_without_early_assembly(&env);
    let client = ApiClient::new(api.addr);
    let mut worker = slow_worker(&env, |cmd| {
        cmd.env("STITCH__HTTP__SHUTDOWN_GRACE", "2m");
    });
    let (source, md5) = big_file(128, 85);
    let id = new_id();
    upload(std::slice::from_ref(&client), &id, &source, &md5).await;
    wait_mid_merge(&env, &client, &id).await;

    let status = worker
        .stop(3 * MINUTE)
        .expect("the worker exits on SIGTERM");
    assert!(status.success(), "the worker exited with {status}");
    let (_, status) = client.status(&id).await;
    assert_eq!(
        status["state"], "completed",
        "the merge finished before the worker exited: {status}"
    );
    // The janitor of `assert_completed_once` runs in the test; no worker is needed.
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
    assert_eq!(merge_attempts(&env, &id), 1, "merged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunked_upload_goes_on_after_redis_restarts_empty_mid_upload() {
    let mut redis = RedisServer::start();
    let env = TestEnv::on(Services {
        redis_url: redis.url(),
        amqp_url: amqp_url(),
    });
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let _worker = start_worker(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random(6 * MIB + 4321, MIB as u64, 86);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    let send = async |index: u64| {
        json_response(
            client
                .chunk_request(&id, &source, index)
                .header("X-File-MD5", &md5)
                .header("X-File-Name", "data.bin")
                .send()
                .await,
        )
        .await
    };
    for index in [0, 3, 5] {
        let (code, body) = send(index).await;
        assert_eq!(code, 200, "{body}");
    }

    // Everything Redis held is gone, the schema record included.
    redis.restart();
    let (code, status) = client.status(&id).await;
    assert_eq!(code, 200, "the upload is rebuilt from storage: {status}");
    assert_eq!(status["state"], "receiving", "{status}");
    assert_eq!(
        status["uploaded_chunks"],
        serde_json::json!([0, 3, 5]),
        "{status}"
    );
    let mut completing = 0;
    for index in [1, 2, 4, 6] {
        let (code, body) = send(index).await;
        assert_eq!(code, 200, "chunk {index}: {body}");
        completing += usize::from(body["upload_complete"] == true);
    }
    assert_eq!(completing, 1, "one chunk completed the upload");
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tus_upload_goes_on_after_redis_restarts_empty_mid_upload() {
    let mut redis = RedisServer::start();
    let env = TestEnv::on(Services {
        redis_url: redis.url(),
        amqp_url: amqp_url(),
    });
    let tap = EventTap::start(&env).await;
    let mut cmd = api_command(&env);
    cmd.env("STITCH__TUS__SEGMENT_SIZE", "1MiB");
    let api = ServiceProcess::start(cmd, "stitch-api listening");
    let _worker = start_worker(&env);
    let source = Source::random(5 * MIB + 777, (5 * MIB + 777) as u64, 87);
    let md5 = md5_hex(&source.bytes);
    let bytes = &source.bytes;
    let t = Tus::new(http_client(), &format!("http://{}", api.addr));
    let created = t.create(bytes.len() as u64, None).await;
    assert_eq!(created.status, 201, "{created:?}");
    let url = created.location();
    let id = id_of(&url).to_owned();
    let stored = 2 * MIB + 100;
    let answer = t.patch(&url, 0, bytes[..stored].to_vec()).await;
    assert_eq!(answer.status, 204, "{answer:?}");

    redis.restart();
    let head = t.head(&url).await;
    assert_eq!(
        head.status, 200,
        "the upload is rebuilt from storage: {head:?}"
    );
    assert_eq!(
        head.offset(),
        Some(stored as u64),
        "HEAD reports what storage holds"
    );
    let answer = t.patch(&url, stored as u64, bytes[stored..].to_vec()).await;
    assert_eq!(answer.status, 204, "{answer:?}");
    let client = ApiClient::new(api.addr);
    assert_completed_once(&env, &tap, &client, &id, &source, &md5).await;
}
