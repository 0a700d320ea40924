//! An event tap: a private queue bound to the namespace's events exchange, collecting every
//! event published while it runs, with when (on this process's clock) it arrived (start it
//! before what publishes, so that no event can be missed); and the broker surgery tests do
//! around it (bindings removed and restored, as an operator or a missing migration would
//! leave them).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::TestEnv;

/// A bound, consuming private queue (exclusive, auto-delete: it goes with the connection).
pub struct EventTap {
    arrivals: watch::Receiver<Vec<Arrival>>,
    connection: Connection,
    consumer: AbortHandle,
}

/// An event as it arrived.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// When the tap received it.
    pub at: Instant,
    pub routing_key: String,
    pub event: serde_json::Value,
}

impl Arrival {
    /// Whether the event is about `upload_id` and of one of `kinds`.
    fn is(&self, upload_id: &str, kinds: &[&str]) -> bool {
        self.event["upload"]["id"] == upload_id
            && kinds.iter().any(|kind| self.event["type"] == *kind)
    }
}

impl EventTap {
    /// Declares the namespace's topology (idempotent) and starts collecting; panics when
    /// RabbitMQ cannot be reached.
    pub async fn start(env: &TestEnv) -> Self {
        Self::connect(env).await.unwrap_or_else(|e| {
            panic!(
                "the tests need RabbitMQ at {}: {e:#}",
                env.settings().amqp.url.expose()
            )
        })
    }

    /// [`EventTap::start`], failing with an error instead. The topology is declared with the
    /// project's own code, so that the exchange exists even before any Stitch process
    /// declared it.
    pub async fn connect(env: &TestEnv) -> anyhow::Result<Self> {
        let settings = env.settings();
        let broker = stitch_common::queue::AmqpBroker::new(&settings);
        broker
            .ping()
            .await
            .with_context(|| format!("declaring the RabbitMQ topology of {}", env.namespace))?;
        Self::bind_tap(env).await
    }

    /// Starts collecting from an events exchange that exists already, declaring nothing else
    /// (declaring the topology would bind the webhook feed again, which a test may have
    /// unbound on purpose).
    pub async fn attach(env: &TestEnv) -> Self {
        Self::bind_tap(env)
            .await
            .unwrap_or_else(|e| panic!("attaching an event tap: {e:#}"))
    }

    async fn bind_tap(env: &TestEnv) -> anyhow::Result<Self> {
        let settings = env.settings();
        let broker = stitch_common::queue::AmqpBroker::new(&settings);
        let connection =
            Connection::connect(settings.amqp.url.expose(), ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ")?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
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
            .context("declaring the tap queue")?;
        channel
            .queue_bind(
                queue.name().clone(),
                broker.topology().events_exchange().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding the tap queue")?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("consuming the tap queue")?;
        let (sink, arrivals) = watch::channel(Vec::new());
        let consumer = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                if let Ok(event) = serde_json::from_slice(&delivery.data) {
                    let routing_key = delivery.routing_key.to_string();
                    sink.send_modify(|all| {
                        all.push(Arrival {
                            at,
                            routing_key,
                            event,
                        })
                    });
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        })
        .abort_handle();
        Ok(Self {
            arrivals,
            connection,
            consumer,
        })
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.arrivals
            .borrow()
            .iter()
            .map(|a| a.event.clone())
            .collect()
    }

    /// The events about one upload.
    pub fn events_of(&self, upload_id: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["upload"]["id"] == upload_id)
            .collect()
    }

    /// Waits until an event of `kind` about `upload_id` arrived; panics after `limit`.
    pub async fn wait_for(
        &self,
        upload_id: &str,
        kind: &str,
        limit: Duration,
    ) -> serde_json::Value {
        match self.arrival(upload_id, &[kind], limit).await {
            Ok(arrival) => arrival.event,
            Err(e) => panic!("{e:#}; saw {:?}", self.events_of(upload_id)),
        }
    }

    /// The first event about `upload_id` whose type is one of `kinds` (e.g.
    /// `upload.completed` and `upload.failed`), waiting for it at most `limit`.
    pub async fn arrival(
        &self,
        upload_id: &str,
        kinds: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Arrival> {
        let mut arrivals = self.arrivals.clone();
        let waited = tokio::time::timeout(
            limit,
            arrivals.wait_for(|all| all.iter().any(|a| a.is(upload_id, kinds))),
        )
        .await;
        match waited {
            Err(_) => bail!("no {kinds:?} event about {upload_id} within {limit:?}"),
            Ok(Err(_)) => bail!("the tap's RabbitMQ consumer closed"),
            Ok(Ok(all)) => all
                .iter()
                .find(|a| a.is(upload_id, kinds))
                .cloned()
                .context("the event went missing"),
        }
    }

    /// Closes the connection, and so the queue.
    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

impl Drop for EventTap {
    fn drop(&mut self) {
        self.consumer.abort();
    }
}

/// Takes every message now waiting in the namespace's merge queue (the jobs no worker has
/// consumed), acking them.
pub async fn take_merge_jobs(env: &TestEnv) -> Vec<serde_json::Value> {
    let settings = env.settings();
    let amqp_url = settings.amqp.url.expose();
    let broker = stitch_common::queue::AmqpBroker::new(&settings);
    broker
        .ping()
        .await
        .unwrap_or_else(|e| panic!("the tests need RabbitMQ at {amqp_url}: {e}"));
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
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

/// A tap that outlives the broker: a durable queue bound to the namespace's events exchange,
/// which keeps every (persistent) event through a broker's crash and restart, read with
/// `basic.get` on a fresh connection whenever the test asks. For tests that kill the broker
/// itself, whose [`EventTap`] (an exclusive queue) would go with its connection.
pub struct DurableTap {
    settings: stitch_common::config::Settings,
    queue: String,
    /// Everything taken from the queue so far (taking acks it).
    seen: std::sync::Mutex<Vec<serde_json::Value>>,
}

impl DurableTap {
    /// Declares the namespace's topology and the tap's queue, bound to every event.
    pub async fn start(env: &TestEnv) -> anyhow::Result<Self> {
        let settings = env.settings();
        let broker = stitch_common::queue::AmqpBroker::new(&settings);
        broker
            .ping()
            .await
            .with_context(|| format!("declaring the RabbitMQ topology of {}", env.namespace))?;
        let queue = format!("{}.test-durable-tap", env.namespace);
        let connection =
            Connection::connect(settings.amqp.url.expose(), ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ")?;
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the durable tap queue")?;
        channel
            .queue_bind(
                queue.as_str().into(),
                broker.topology().events_exchange().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding the durable tap queue")?;
        let _ = connection.close(200, "declared".into()).await;
        Ok(Self {
            settings,
            queue,
            seen: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Takes what the queue holds now into what was seen; an error while the broker is away.
    pub async fn collect(&self) -> anyhow::Result<()> {
        let connection = Connection::connect(
            self.settings.amqp.url.expose(),
            ConnectionProperties::default(),
        )
        .await
        .context("connecting to RabbitMQ")?;
        let channel = connection.create_channel().await?;
        while let Some(message) = channel
            .basic_get(
                self.queue.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await?
        {
            if let Ok(event) = serde_json::from_slice(&message.delivery.data) {
                self.seen.lock().expect("the tap's events").push(event);
            }
            message.delivery.ack(BasicAckOptions::default()).await?;
        }
        let _ = connection.close(200, "collected".into()).await;
        Ok(())
    }

    /// The events about one upload seen so far, after taking what the queue holds (if the
    /// broker answers).
    pub async fn events_of(&self, upload_id: &str) -> Vec<serde_json::Value> {
        let _ = self.collect().await;
        self.seen_of(upload_id)
    }

    /// The events about one upload taken so far, without asking the broker.
    pub fn seen_of(&self, upload_id: &str) -> Vec<serde_json::Value> {
        self.seen
            .lock()
            .expect("the tap's events")
            .iter()
            .filter(|e| e["upload"]["id"] == upload_id)
            .cloned()
            .collect()
    }
}
