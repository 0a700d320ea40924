//! RabbitMQ (lapin): topology, confirmed publishes, consumers.
//!
//! Every [`Family`] of work gets the same shape under the namespace `<ns>`, declared
//! idempotently on every new connection:
//!
//! | name | kind | role |
//! |---|---|---|
//! | `<ns>.<family>` | direct exchange | new work (`work`) and retries (`wait.<ms>ms`) |
//! | `<ns>.<family>` | quorum queue | the work queue; explicit delivery limit; dead-letters to `<ns>.<family>.dead` |
//! | `<ns>.<family>.wait.<ms>ms` | quorum queue | one per retry delay: messages wait out their TTL, then dead-letter back to the work queue |
//! | `<ns>.<family>.dead` | fanout exchange + quorum queue | poison messages, kept for operators |
//!
//! The families are `merge`, `webhooks` (one message per delivery of an event to an
//! endpoint) and `webhooks.feed` (the webhook dispatcher's copy of every event: its work queue
//! is also bound to the events exchange). `<ns>.events` is the topic exchange of upload
//! events (`upload.completed`, `upload.failed`, …).
//!
//! Every publish is `mandatory` and confirmed: `Ok` means the broker stored the message in
//! at least one queue. A message no queue takes comes back (`basic.return`) and is an error
//! the caller retries, like a broker that is down. For events that means the events exchange
//! needs at least one bound queue: the topology binds the webhook dispatcher's feed, so a
//! migrated namespace routes every event; an unroutable event is a namespace nobody listens on
//! (not migrated, or its bindings removed), reported as not delivered so that the caller keeps
//! it (docs/events.md says what each one does).
//!
//! Retries go through delay queues rather than `nack(requeue)`: a failing job waits its
//! backoff without spinning on a worker. Quorum queues dead-letter `at-least-once`, which
//! RabbitMQ allows only with `x-overflow: reject-publish` (a full queue then nacks publishes
//! instead of dropping messages).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::{
    Acknowledge, Deliveries, Delivery, Family, MergeJob, NOW, QueueError, QueueStats, WorkQueue,
};
use crate::config::Settings;

/// The shape of one family's queues.
#[derive(Clone, Debug)]
pub struct FamilyShape {
    pub family: Family,
    pub retry_delays: Vec<Duration>,
    pub delivery_limit: u32,
}

/// Names and shape of the namespace's exchanges and queues.
#[derive(Clone, Debug)]
pub struct Topology {
    pub namespace: String,
    pub families: Vec<FamilyShape>,
}

/// Routing key of new work on a family's exchange.
const WORK_KEY: &str = "work";

impl Topology {
    pub fn from_settings(settings: &Settings) -> Self {
        let delays = |d: &[crate::config::Interval]| d.iter().map(|d| d.0).collect::<Vec<_>>();
        Self {
            namespace: settings.namespace.clone(),
            families: vec![
                FamilyShape {
                    family: Family::Merge,
                    retry_delays: delays(&settings.merge.retry_delays),
                    delivery_limit: settings.merge.delivery_limit,
                },
                FamilyShape {
                    // Fanning an event out cannot fail for long (it only publishes): a
                    // failure hands the event back to the queue, no delay queues needed.
                    family: Family::WebhookFeed,
                    retry_delays: Vec::new(),
                    delivery_limit: settings.merge.delivery_limit,
                },
                FamilyShape {
                    family: Family::Webhooks,
                    retry_delays: delays(&settings.webhooks.retry_delays),
                    delivery_limit: settings.merge.delivery_limit,
                },
            ],
        }
    }

    fn shape(&self, family: Family) -> Option<&FamilyShape> {
        self.families.iter().find(|f| f.family == family)
    }

    /// A family's exchange (also its work queue's name).
    pub fn exchange(&self, family: Family) -> String {
        format!("{}.{}", self.namespace, family.name())
    }

    pub fn work_queue(&self, family: Family) -> String {
        self.exchange(family)
    }

    pub fn dead_letters(&self, family: Family) -> String {
        format!("{}.{}.dead", self.namespace, family.name())
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    fn wait_key(delay: Duration) -> String {
        format!("wait.{}ms", delay.as_millis())
    }

    pub fn wait_queue(&self, family: Family, delay: Duration) -> String {
        format!("{}.{}", self.exchange(family), Self::wait_key(delay))
    }

    /// The merge work queue (tests and operators look at it).
    pub fn merge_queue(&self) -> String {
        self.work_queue(Family::Merge)
    }

    /// Every queue of the topology (for teardown and inspection).
    pub fn queues(&self) -> Vec<String> {
        let mut out = Vec::new();
        for shape in &self.families {
            out.push(self.work_queue(shape.family));
            out.push(self.dead_letters(shape.family));
            out.extend(
                shape
                    .retry_delays
                    .iter()
                    .map(|d| self.wait_queue(shape.family, *d)),
            );
        }
        out
    }

    /// Every exchange of the topology.
    pub fn exchanges(&self) -> Vec<String> {
        let mut out = vec![self.events_exchange()];
        for shape in &self.families {
            out.push(self.exchange(shape.family));
            out.push(self.dead_letters(shape.family));
        }
        out
    }

    /// Declares everything; safe to repeat (declarations are idempotent when unchanged).
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            self.events_exchange().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        for shape in &self.families {
            self.declare_family(ch, shape).await?;
        }
        // The webhook dispatcher's feed receives every event.
        ch.queue_bind(
            self.work_queue(Family::WebhookFeed).into(),
            self.events_exchange().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    async fn declare_family(&self, ch: &Channel, shape: &FamilyShape) -> lapin::Result<()> {
        let family = shape.family;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            self.exchange(family).into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.dead_letters(family).into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
        let mut work = quorum_args();
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(shape.delivery_limit.min(i32::MAX as u32) as i32),
        );
        work.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letters(family).into()),
        );
        ch.queue_declare(self.work_queue(family).into(), durable_queue, work)
            .await?;
        ch.queue_bind(
            self.work_queue(family).into(),
            self.exchange(family).into(),
            WORK_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            self.dead_letters(family).into(),
            durable_queue,
            quorum_args(),
        )
        .await?;
        ch.queue_bind(
            self.dead_letters(family).into(),
            self.dead_letters(family).into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for delay in &shape.retry_delays {
            let mut wait = quorum_args();
            wait.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            wait.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.exchange(family).into()),
            );
            wait.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(WORK_KEY.into()),
            );
            ch.queue_declare(self.wait_queue(family, *delay).into(), durable_queue, wait)
                .await?;
            ch.queue_bind(
                self.wait_queue(family, *delay).into(),
                self.exchange(family).into(),
                Self::wait_key(*delay).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(())
    }
}

/// The W3C trace headers of a received message.
fn trace_headers(properties: &BasicProperties) -> Vec<(String, String)> {
    let Some(headers) = properties.headers() else {
        return Vec::new();
    };
    headers
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() == "traceparent" || k.as_str() == "tracestate")
        .filter_map(|(k, v)| match v {
            AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
            _ => None,
        })
        .collect()
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

/// A connection to RabbitMQ for publishing (shared, reconnected on failure) and a factory
/// of consumers. Connects lazily: a broker that is down makes publishes fail, it does not
/// stop the process.
pub struct AmqpBroker {
    url: crate::config::Secret,
    timeout: Duration,
    topology: Topology,
    publisher: Mutex<Option<(Connection, Channel)>>,
    /// Held from a publish until its confirm is settled: one message in flight on the
    /// publisher channel. lapin hands a `basic.return` to whichever confirm it resolves next,
    /// and RabbitMQ acks several publishes at once (`multiple`), so with two in flight a
    /// returned message can be pinned on the other publish and the unroutable one be
    /// reported delivered. A process's publishes are thus one confirm apart (a few ms): at a
    /// job and a few events per upload and one message per webhook delivery, not a limit.
    in_flight: Mutex<()>,
}

impl AmqpBroker {
    pub fn new(settings: &Settings) -> Self {
        Self {
            url: settings.amqp.url.clone(),
            timeout: settings.amqp.timeout.0,
            topology: Topology::from_settings(settings),
            publisher: Mutex::new(None),
            in_flight: Mutex::new(()),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A new connection with one channel, the topology declared on it.
    async fn connect(&self, role: &str) -> Result<(Connection, Channel), QueueError> {
        self.connect_with(role, true).await
    }

    /// A new connection with one channel; the topology declared on it when `declare`.
    async fn connect_with(
        &self,
        role: &str,
        declare: bool,
    ) -> Result<(Connection, Channel), QueueError> {
        let properties =
            ConnectionProperties::default().with_connection_name(format!("stitch-{role}").into());
        let setup = async {
            let conn = Connection::connect(self.url.expose(), properties).await?;
            let channel = conn.create_channel().await?;
            if declare {
                self.topology.declare(&channel).await?;
            }
            Ok::<_, lapin::Error>((conn, channel))
        };
        match tokio::time::timeout(self.timeout, setup).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(QueueError::Unavailable(e.to_string())),
            Err(_) => Err(QueueError::Unavailable(format!(
                "no connection within {:?}",
                self.timeout
            ))),
        }
    }

    async fn publish_channel(&self) -> Result<Channel, QueueError> {
        let mut guard = self.publisher.lock().await;
        if let Some((conn, channel)) = guard.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let (conn, channel) = self.connect("publisher").await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        *guard = Some((conn, channel.clone()));
        Ok(channel)
    }

    /// Publishes persistently and `mandatory`, and waits for the broker's confirm: a message
    /// no queue takes comes back and is an error ([`QueueError::Refused`]), never a success.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), QueueError> {
        // Until the confirm is settled or the channel dropped: a return that arrives after a
        // timed-out confirm must not reach the next publish.
        let _in_flight = self.in_flight.lock().await;
        let result = async {
            let channel = self.publish_channel().await?;
            // The trace context of whoever publishes travels in the message's headers.
            let mut headers = properties.headers().clone().unwrap_or_default();
            for (name, value) in crate::telemetry::inject_current() {
                headers.insert(name.into(), AMQPValue::LongString(value.into()));
            }
            let properties = properties
                .with_headers(headers)
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    payload,
                    properties,
                )
                .await
                .map_err(|e| QueueError::Unavailable(e.to_string()))?;
            match tokio::time::timeout(self.timeout, confirm).await {
                Err(_) => Err(QueueError::Unavailable(
                    "no publisher confirm in time".into(),
                )),
                Ok(Err(e)) => Err(QueueError::Unavailable(e.to_string())),
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::NotRequested)) => Err(QueueError::Unavailable(
                    "publisher confirms are off on the channel".into(),
                )),
                Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(QueueError::Refused(format!(
                    "no queue is bound for {exchange:?} {routing_key:?}: {} {}",
                    returned.reply_code, returned.reply_text
                ))),
                Ok(Ok(Confirmation::Nack(_))) => {
                    Err(QueueError::Refused("the broker nacked the message".into()))
                }
            }
        }
        .await;
        if let Err(QueueError::Unavailable(_)) = &result {
            crate::metrics::backend_error("rabbitmq");
            // Start from a fresh connection next time.
            *self.publisher.lock().await = None;
        }
        result
    }

    /// Publishes a merge job to the merge work queue.
    pub async fn publish_merge(&self, job: &MergeJob) -> Result<(), QueueError> {
        self.publish_work(Family::Merge, job.to_json().as_bytes(), NOW)
            .await
    }

    /// Publishes to `family`'s work queue now, or through its delay queue for `delay`.
    async fn publish_work(
        &self,
        family: Family,
        payload: &[u8],
        delay: Duration,
    ) -> Result<(), QueueError> {
        let key = if delay.is_zero() {
            WORK_KEY.to_owned()
        } else {
            let known = self
                .topology
                .shape(family)
                .is_some_and(|s| s.retry_delays.contains(&delay));
            if !known {
                return Err(QueueError::Refused(format!(
                    "{delay:?} is not a configured retry delay of {}",
                    family.name()
                )));
            }
            Topology::wait_key(delay)
        };
        let properties = BasicProperties::default().with_type(family.name().into());
        self.publish(&self.topology.exchange(family), &key, payload, properties)
            .await
    }

    /// Publishes a message to `family`'s dead-letter queue with the reason in a header.
    async fn publish_dead(
        &self,
        family: Family,
        payload: &[u8],
        reason: &str,
    ) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-stitch-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        self.publish(
            &self.topology.dead_letters(family),
            "",
            payload,
            BasicProperties::default().with_headers(headers),
        )
        .await
    }

    /// Publishes an event to the events exchange under `routing_key` (its type). `Ok` once a
    /// queue bound to the exchange stored it; with none bound, [`QueueError::Refused`] and the
    /// caller keeps the event (outbox, job retry) for later.
    pub async fn publish_event(
        &self,
        routing_key: &str,
        event_id: &str,
        body: &[u8],
    ) -> Result<(), QueueError> {
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(event_id))
            .with_type(ShortString::from(routing_key));
        self.publish(
            &self.topology.events_exchange(),
            routing_key,
            body,
            properties,
        )
        .await
    }

    /// Checks that the broker answers (readiness).
    pub async fn ping(&self) -> Result<(), QueueError> {
        self.publish_channel().await.map(|_| ())
    }

    /// Consumes `family`'s work queue on a dedicated connection, at most `prefetch` unacked.
    async fn consume_family(
        &self,
        family: Family,
        prefetch: u16,
    ) -> Result<AmqpDeliveries, QueueError> {
        let (conn, channel) = self.connect(&format!("{}-consumer", family.name())).await?;
        let unavailable = |e: lapin::Error| QueueError::Unavailable(e.to_string());
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(unavailable)?;
        let consumer = channel
            .basic_consume(
                self.topology.work_queue(family).into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        Ok(AmqpDeliveries {
            conn,
            channel,
            consumer,
        })
    }

    /// Declares the namespace's topology (idempotent; the broker migration step).
    pub async fn declare_topology(&self) -> Result<(), QueueError> {
        let (conn, _channel) = self.connect_with("migrate", true).await?;
        let _ = conn.close(200, "declared".into()).await;
        Ok(())
    }

    /// Deletes every exchange and queue of the namespace (tests, decommissioning).
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        let (conn, channel) = self.connect_with("teardown", false).await?;
        for queue in self.topology.queues() {
            let _ = channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in self.topology.exchanges() {
            let _ = channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
        Ok(())
    }
}

/// One family's queue on a shared broker connection.
#[derive(Clone)]
pub struct AmqpQueue {
    broker: Arc<AmqpBroker>,
    family: Family,
}

impl AmqpBroker {
    /// The work queue of `family`.
    pub fn queue(self: &Arc<Self>, family: Family) -> AmqpQueue {
        AmqpQueue {
            broker: self.clone(),
            family,
        }
    }
}

#[async_trait::async_trait]
impl WorkQueue for AmqpQueue {
    async fn enqueue(&self, payload: &[u8], delay: Duration) -> Result<(), QueueError> {
        self.broker.publish_work(self.family, payload, delay).await
    }

    async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), QueueError> {
        self.broker.publish_dead(self.family, payload, reason).await
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn Deliveries>, QueueError> {
        Ok(Box::new(
            self.broker.consume_family(self.family, prefetch).await?,
        ))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.broker.ping().await
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        // A channel of its own: a passive declare of a missing queue closes its channel,
        // which must not be the publishers'.
        self.broker.publish_channel().await?;
        let unavailable = |e: lapin::Error| QueueError::Unavailable(e.to_string());
        let channel = {
            let guard = self.broker.publisher.lock().await;
            let (connection, _) = guard
                .as_ref()
                .ok_or_else(|| QueueError::Unavailable("no broker connection".into()))?;
            connection.create_channel().await.map_err(unavailable)?
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let topology = &self.broker.topology;
        let work = channel
            .queue_declare(
                topology.work_queue(self.family).into(),
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let dead = channel
            .queue_declare(
                topology.dead_letters(self.family).into(),
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let stats = QueueStats {
            ready: u64::from(work.message_count()),
            consumers: u64::from(work.consumer_count()),
            dead: u64::from(dead.message_count()),
        };
        let _ = channel.close(200, "stats read".into()).await;
        Ok(stats)
    }
}

#[async_trait::async_trait]
impl super::EventSink for AmqpBroker {
    async fn publish_event(&self, event: &crate::events::Event) -> Result<(), QueueError> {
        AmqpBroker::publish_event(
            self,
            event.kind.routing_key(),
            &event.event_id,
            &event.to_json(),
        )
        .await
    }
}

/// A running consumer on its own connection.
pub struct AmqpDeliveries {
    conn: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
}

struct AmqpAcker(lapin::Acker);

#[async_trait::async_trait]
impl Acknowledge for AmqpAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        self.0
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }
}

#[async_trait::async_trait]
impl Deliveries for AmqpDeliveries {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let delivery = self.consumer.next().await?;
        Some(
            delivery
                .map(|d| {
                    let trace = trace_headers(&d.properties);
                    Delivery::new(
                        d.data.clone(),
                        d.redelivered,
                        Box::new(AmqpAcker(d.acker.clone())),
                    )
                    .with_trace(trace)
                })
                .map_err(|e| QueueError::Unavailable(e.to_string())),
        )
    }

    async fn close(self: Box<Self>) {
        let _ = self.channel.close(200, "shutting down".into()).await;
        let _ = self.conn.close(200, "shutting down".into()).await;
    }
}
