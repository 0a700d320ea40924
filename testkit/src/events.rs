//! An event tap: a private queue bound to the namespace's events exchange, collecting every
//! event published while it runs; and the broker surgery tests do around it (bindings
//! removed and restored, as an operator or a missing migration would leave them).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use crate::TestEnv;

pub struct EventTap {
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    _connection: Connection,
}

impl EventTap {
    /// Declares the namespace's topology (idempotent) and starts collecting.
    pub async fn start(env: &TestEnv) -> Self {
        let settings = env.settings();
        let broker = stitch_common::queue::AmqpBroker::new(&settings);
        broker
            .ping()
            .await
            .unwrap_or_else(|e| panic!("the tests need RabbitMQ at {}: {e}", crate::amqp_url()));
        Self::attach(env).await
    }

    /// Starts collecting from an events exchange that exists already, declaring nothing else
    /// (declaring the topology would bind the webhook feed again, which a test may have
    /// unbound on purpose).
    pub async fn attach(env: &TestEnv) -> Self {
        let settings = env.settings();
        let broker = stitch_common::queue::AmqpBroker::new(&settings);
        let connection = Connection::connect(&crate::amqp_url(), ConnectionProperties::default())
            .await
            .expect("connecting to RabbitMQ");
        let channel = connection.create_channel().await.expect("a channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declaring the tap queue");
        channel
            .queue_bind(
                queue.name().clone(),
                broker.topology().events_exchange().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("binding the tap queue");
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consuming the tap queue");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if let Ok(json) = serde_json::from_slice(&delivery.data) {
                    sink.lock().expect("tap").push(json);
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Self {
            events,
            _connection: connection,
        }
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().expect("tap").clone()
    }

    /// The events about one upload.
    pub fn events_of(&self, upload_id: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["upload"]["id"] == upload_id)
            .collect()
    }

    /// Waits until an event of `kind` about `upload_id` arrived.
    pub async fn wait_for(
        &self,
        upload_id: &str,
        kind: &str,
        limit: Duration,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(e) = self
                .events_of(upload_id)
                .into_iter()
                .find(|e| e["type"] == kind)
            {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {kind} event for {upload_id} within {limit:?}; saw {:?}",
                self.events_of(upload_id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Takes every message now waiting in the namespace's merge queue (the jobs no worker has
/// consumed), acking them.
pub async fn take_merge_jobs(env: &TestEnv) -> Vec<serde_json::Value> {
    let settings = env.settings();
    let broker = stitch_common::queue::AmqpBroker::new(&settings);
    broker
        .ping()
        .await
        .unwrap_or_else(|e| panic!("the tests need RabbitMQ at {}: {e}", crate::amqp_url()));
    let connection = Connection::connect(&crate::amqp_url(), ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    let mut jobs = Vec::new();
    while let Some(message) = channel
        .basic_get(
            broker.topology().merge_queue().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .expect("basic.get")
    {
        jobs.push(serde_json::from_slice(&message.delivery.data).expect("a JSON job"));
        let _ = message.delivery.ack(BasicAckOptions::default()).await;
    }
    let _ = connection.close(200, "done".into()).await;
    jobs
}

/// Whether the broker has a queue of this name (a passive declare on a connection of its own,
/// so that asking cannot create it).
pub async fn queue_exists(name: &str) -> bool {
    let connection = Connection::connect(&crate::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("the tests need RabbitMQ at {}: {e}", crate::amqp_url()));
    let channel = connection.create_channel().await.expect("a channel");
    let found = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = connection.close(200, "bye".into()).await;
    found
}

/// Binds `queue` to `exchange` under `routing_key` (on a connection of its own).
pub async fn bind(queue: &str, exchange: &str, routing_key: &str) {
    let connection = Connection::connect(&crate::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("the tests need RabbitMQ at {}: {e}", crate::amqp_url()));
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("binding {queue} to {exchange} ({routing_key}): {e}"));
    let _ = connection.close(200, "bound".into()).await;
}

/// Removes the binding of `queue` to `exchange` under `routing_key`.
pub async fn unbind(queue: &str, exchange: &str, routing_key: &str) {
    let connection = Connection::connect(&crate::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("the tests need RabbitMQ at {}: {e}", crate::amqp_url()));
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .queue_unbind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("unbinding {queue} from {exchange} ({routing_key}): {e}"));
    let _ = connection.close(200, "unbound".into()).await;
}
