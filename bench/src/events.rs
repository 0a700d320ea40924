//! An event tap: a private queue bound to a namespace's `<ns>.events` topic exchange, to see
//! when (on this process's clock) an upload's `upload.completed` event arrives, and what it
//! says. Bind it before the upload completes, so that the event cannot be missed.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer};
use serde::Deserialize;
use stitch_common::config::{Secret, Settings};
use stitch_common::queue::AmqpBroker;

/// Routing keys the tap binds: every upload event.
const BINDING: &str = "upload.*";

/// A bound, consuming private queue. Its connection closes when it is dropped, and the
/// queue (exclusive, auto-delete) goes with it.
pub struct EventTap {
    connection: Connection,
    consumer: Consumer,
}

/// An event as it arrived.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// When the tap received it.
    pub at: Instant,
    pub routing_key: String,
    pub event: EventBody,
}

/// The fields of an upload event the benchmarks check.
#[derive(Clone, Debug, Deserialize)]
pub struct EventBody {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub upload: EventUpload,
}

#[derive(Clone, Debug, Deserialize)]
pub struct EventUpload {
    pub id: String,
    pub state: String,
    pub size: u64,
    pub md5: Option<String>,
}

impl EventTap {
    /// Declares the namespace's topology (idempotently, with the project's own code, so that
    /// the exchange exists even before any Stitch process declared it), then binds and
    /// consumes a private queue.
    pub async fn bind(amqp_url: &str, namespace: &str) -> anyhow::Result<Self> {
        let mut settings = Settings {
            namespace: namespace.to_owned(),
            ..Settings::default()
        };
        settings.amqp.url = Secret::new(amqp_url);
        let broker = AmqpBroker::new(&settings);
        broker
            .ping()
            .await
            .with_context(|| format!("declaring the RabbitMQ topology of {namespace}"))?;
        let exchange = broker.topology().events_exchange();
        let connection = Connection::connect(
            amqp_url,
            ConnectionProperties::default().with_connection_name("stitch-bench-tap".into()),
        )
        .await
        .context("connecting to RabbitMQ")?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a RabbitMQ channel")?;
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
            .context("declaring the tap's queue")?;
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                BINDING.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding the tap's queue to {exchange}"))?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                // Nothing to redeliver: the tap only watches.
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consuming the tap's queue")?;
        Ok(Self {
            connection,
            consumer,
        })
    }

    /// The next event about `upload_id` whose type is one of `kinds` (e.g.
    /// `upload.completed` and `upload.failed`), waiting at most `limit`; events about other
    /// uploads, and of other types (such as `upload.created`), are skipped.
    pub async fn next_about(
        &mut self,
        upload_id: &str,
        kinds: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Arrival> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let delivery = match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Err(_) => bail!("no {kinds:?} event about {upload_id} within {limit:?}"),
                Ok(None) => bail!("the RabbitMQ consumer of the tap closed"),
                Ok(Some(delivery)) => delivery.context("receiving an event")?,
            };
            let at = Instant::now();
            let event: EventBody = serde_json::from_slice(&delivery.data).with_context(|| {
                format!(
                    "an event that is not the JSON expected: {}",
                    String::from_utf8_lossy(&delivery.data)
                )
            })?;
            if event.upload.id == upload_id && kinds.contains(&event.kind.as_str()) {
                return Ok(Arrival {
                    at,
                    routing_key: delivery.routing_key.to_string(),
                    event,
                });
            }
        }
    }

    /// Closes the connection (and so the queue).
    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}
