//! Publishes no queue takes, against the real broker. Every publish, jobs and events, is
//! `mandatory` with a publisher confirm: a message the broker returns (`basic.return`, no
//! queue bound) is reported as not delivered, for the caller to keep and retry, and a publish
//! succeeds again once a binding exists.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use futures_util::future::join_all;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use stitch_common::id::UploadId;
use stitch_common::queue::{AmqpBroker, Family, MergeJob, NOW, QueueError, WorkQueue};
use stitch_testkit::TestEnv;
use stitch_testkit::events::{bind, unbind};

/// A broker for `env` with its topology declared and its publisher connected (it declares the
/// topology as it connects, so the surgery below must come after).
async fn connected_broker(env: &TestEnv) -> Arc<AmqpBroker> {
    let broker = Arc::new(AmqpBroker::new(&env.settings()));
    broker.declare_topology().await.unwrap();
    broker.ping().await.unwrap();
    broker
}

/// A private queue (gone with its connection) bound to the events exchange under `key`.
async fn private_queue(broker: &AmqpBroker, key: &str) -> (Connection, Channel, String) {
    let connection =
        Connection::connect(&stitch_testkit::amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = queue.name().to_string();
    // On its own connection: an exclusive queue is bound by the connection that owns it.
    channel
        .queue_bind(
            name.as_str().into(),
            broker.topology().events_exchange().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (connection, channel, name)
}

/// The `message_id`s waiting in `queue`, taken.
async fn take_ids(channel: &Channel, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let id = message.delivery.properties.message_id().clone();
        ids.push(id.map(|s| s.to_string()).unwrap_or_default());
    }
    ids.sort();
    ids
}

fn refused(result: Result<(), QueueError>) -> bool {
    matches!(result, Err(QueueError::Refused(_)))
}

#[tokio::test]
async fn an_event_no_queue_is_bound_for_is_not_delivered_until_one_is() {
    let env = TestEnv::new();
    let broker = connected_broker(&env).await;
    let topology = broker.topology();
    let events = topology.events_exchange();
    let feed = topology.work_queue(Family::WebhookFeed);

    // The topology binds the webhook dispatcher's feed to every event.
    broker
        .publish_event("upload.completed", "evt_1", b"{}")
        .await
        .unwrap();

    // Nobody listening: the event comes back and is an error, not a success.
    unbind(&feed, &events, "#").await;
    let result = broker
        .publish_event("upload.completed", "evt_2", b"{}")
        .await;
    assert!(
        refused(result),
        "an unroutable event was reported delivered"
    );

    // A queue for completed events: those are delivered again, the others still are not.
    let (_connection, channel, queue) = private_queue(&broker, "upload.completed").await;
    broker
        .publish_event("upload.completed", "evt_3", b"{}")
        .await
        .unwrap();
    assert!(refused(
        broker.publish_event("upload.failed", "evt_4", b"{}").await
    ));
    assert_eq!(take_ids(&channel, &queue).await, ["evt_3"]);

    // The migration's binding back: everything is routed again.
    bind(&feed, &events, "#").await;
    broker
        .publish_event("upload.failed", "evt_5", b"{}")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_job_no_queue_is_bound_for_is_not_delivered_until_one_is() {
    let env = TestEnv::new();
    let broker = connected_broker(&env).await;
    let merges = broker.queue(Family::Merge);
    let topology = broker.topology();
    let (exchange, queue) = (topology.exchange(Family::Merge), topology.merge_queue());
    let job = MergeJob::new(UploadId::parse("u1").unwrap()).to_json();

    unbind(&queue, &exchange, "work").await;
    let result = merges.enqueue(job.as_bytes(), NOW).await;
    assert!(refused(result), "an unroutable job was reported delivered");

    bind(&queue, &exchange, "work").await;
    merges.enqueue(job.as_bytes(), NOW).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_each_learn_whether_a_queue_took_them() {
    let env = TestEnv::new();
    let broker = connected_broker(&env).await;
    let topology = broker.topology();
    unbind(
        &topology.work_queue(Family::WebhookFeed),
        &topology.events_exchange(),
        "#",
    )
    .await;
    let (_connection, channel, queue) = private_queue(&broker, "upload.completed").await;

    // Half of them routable, half not, all at once through one broker (one publisher channel).
    let publishes = (0..200).map(|i| {
        let broker = broker.clone();
        tokio::spawn(async move {
            let kind = if i % 2 == 0 {
                "upload.completed"
            } else {
                "upload.failed"
            };
            let id = format!("evt_{i:03}");
            let result = broker.publish_event(kind, &id, b"{}").await;
            (kind, id, result)
        })
    });
    let mut delivered = Vec::new();
    let mut wrong = Vec::new();
    for outcome in join_all(publishes).await {
        let (kind, id, result) = outcome.unwrap();
        match (kind, &result) {
            ("upload.completed", Ok(())) => delivered.push(id),
            ("upload.failed", Err(QueueError::Refused(_))) => {}
            _ => wrong.push(format!("{id} ({kind}): {result:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} publishes were told the wrong outcome: {wrong:?}",
        wrong.len()
    );
    delivered.sort();
    assert_eq!(take_ids(&channel, &queue).await, delivered);
}
