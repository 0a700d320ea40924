//! Events nobody can receive: with no queue bound to the events exchange an event is not
//! delivered, so it stays in its upload's outbox, and the sweeper delivers it once a queue is
//! bound.

use std::time::Duration;

use stitch_common::queue::Family;
use stitch_testkit::events::unbind;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

/// The entries of the upload's outbox: its merge triggers, then its events.
fn outbox(env: &TestEnv, id: &str) -> Vec<String> {
    let mut conn = redis_connection().unwrap();
    let mut entries = Vec::new();
    for kind in ["merge", "events"] {
        let list: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("{}:{{{id}}}:outbox:{kind}", env.namespace))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .unwrap();
        entries.extend(list);
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_no_queue_takes_stays_in_the_outbox_until_a_queue_is_bound() {
    let env = TestEnv::new();
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let _worker = start_worker(&env);

    // A first upload, merged and cleaned up: both programs' publishers are connected (each
    // declares the topology as it connects, which would undo the unbinding below).
    let first = new_id();
    let source = Source::random(2 << 20, 1 << 20, 51);
    upload(
        std::slice::from_ref(&client),
        &first,
        &source,
        &md5_hex(&source.bytes),
    )
    .await;
    client.wait_for_state(&first, "completed", MINUTE).await;
    until(MINUTE, "the first upload's cleanup", async || {
        !upload_dir(&env, &first).join("chunks").exists()
    })
    .await;

    // Nobody listening: the webhook feed, the only queue the topology binds, is unbound.
    let settings = env.settings();
    let topology = stitch_common::queue::Topology::from_settings(&settings);
    unbind(
        &topology.work_queue(Family::WebhookFeed),
        &topology.events_exchange(),
        "#",
    )
    .await;

    // The first chunk of an upload creates it: `upload.created` cannot be routed.
    let id = new_id();
    let (code, body) = client.put_chunk(&id, &source, 0).await;
    assert_eq!(code, 200, "{body}");
    // The API's publish and several sweeps (every 500 ms past a 1 s horizon) were refused.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let waiting = outbox(&env, &id);
    assert!(
        waiting.iter().any(|e| e.contains("upload.created")),
        "the unroutable event left the outbox: {waiting:?}"
    );

    // A queue bound to the exchange (and only it): the sweeper's next try is delivered and
    // cleared.
    let tap = EventTap::attach(&env).await;
    let created = tap.wait_for(&id, "upload.created", MINUTE).await;
    assert_eq!(created["upload"]["id"], id.as_str());
    until(MINUTE, "the outbox to empty", async || {
        outbox(&env, &id).is_empty()
    })
    .await;
    assert_eq!(distinct_event_ids(&tap, &id, "upload.created").len(), 1);
}
