//! Work and events between processes: merge jobs (API → workers), upload events (workers →
//! whoever listens) and webhook deliveries.
//!
//! Messages are versioned, self-describing JSON (`"type"` tags the variant) so that old and
//! new processes can share a queue during a rolling deploy. [`AmqpBroker`] is the RabbitMQ
//! implementation: persistent messages, `mandatory` publishes and publisher confirms, so a
//! publish only counts once the broker has stored it somewhere.

mod amqp;

use serde::{Deserialize, Serialize};

pub use self::amqp::{AmqpBroker, AmqpQueue, Topology};
use crate::id::UploadId;

/// Zero delay: deliver now.
pub const NOW: std::time::Duration = std::time::Duration::ZERO;

/// A message on the merge queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Job {
    #[serde(rename = "merge")]
    Merge(MergeJob),
}

/// What an upload's outbox holds: merge triggers and events, written by a state-store
/// operation atomically with the state change they come from, published afterwards (by the
/// API at once, by the sweeper if that failed). Callers hand the state store these typed
/// values; the store keeps each one under its [`OutboxKind`], stored beside it (a Redis key
/// per kind, an SQLite column), never guessed from its text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OutboxMessage {
    #[serde(rename = "merge")]
    Merge(MergeJob),
    #[serde(rename = "event")]
    Event {
        enqueued_at_ms: u64,
        event: Box<crate::events::Event>,
    },
}

/// The two kinds of outbox entries. State changes that end a merge (abort, commit, failure,
/// expiry, lost chunks) drop the upload's pending merge triggers and keep its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutboxKind {
    /// A merge trigger: published to the merge queue.
    Merge,
    /// An upload event: published to the events exchange.
    Event,
}

impl OutboxKind {
    /// The stored name of the kind (an SQLite column value).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::Event => "event",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "merge" => Some(Self::Merge),
            "event" => Some(Self::Event),
            _ => None,
        }
    }
}

impl OutboxMessage {
    /// A merge trigger for `upload_id`, written now.
    pub fn merge(upload_id: UploadId) -> Self {
        Self::Merge(MergeJob::new(upload_id))
    }

    /// `event` as an outbox entry, written now.
    pub fn event(event: &crate::events::Event) -> Self {
        Self::Event {
            enqueued_at_ms: crate::now_ms(),
            event: Box::new(event.clone()),
        }
    }

    pub fn kind(&self) -> OutboxKind {
        match self {
            Self::Merge(_) => OutboxKind::Merge,
            Self::Event { .. } => OutboxKind::Event,
        }
    }

    pub fn enqueued_at_ms(&self) -> u64 {
        match self {
            Self::Merge(job) => job.enqueued_at_ms,
            Self::Event { enqueued_at_ms, .. } => *enqueued_at_ms,
        }
    }

    /// The stored form: the message's JSON (for a merge trigger, the exact job published).
    /// Only the state stores use it; the kind is stored beside it, not read from it.
    pub(crate) fn to_stored(&self) -> String {
        match self {
            Self::Merge(job) => job.to_json(),
            event => serde_json::to_string(event).unwrap_or_default(),
        }
    }

    /// Reads a stored entry of `kind`. Text that is not a message of that kind is an error.
    pub(crate) fn from_stored(kind: OutboxKind, text: &str) -> Result<Self, String> {
        let message = match kind {
            OutboxKind::Merge => MergeJob::from_json(text.as_bytes()).map(Self::Merge),
            OutboxKind::Event => serde_json::from_str(text),
        }
        .map_err(|e| format!("not a stored {} entry: {e}", kind.as_str()))?;
        if message.kind() != kind {
            return Err(format!("not a stored {} entry", kind.as_str()));
        }
        Ok(message)
    }
}

/// "Merge this upload." Idempotent: any number of copies lead to one committed file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeJob {
    pub version: u32,
    pub upload_id: UploadId,
    /// When the completing chunk wrote the trigger (ms since the epoch).
    pub enqueued_at_ms: u64,
    /// Transient failures so far; decides the next retry delay.
    #[serde(default)]
    pub attempt: u32,
}

impl MergeJob {
    pub fn new(upload_id: UploadId) -> Self {
        Self {
            version: 1,
            upload_id,
            enqueued_at_ms: crate::now_ms(),
            attempt: 0,
        }
    }

    /// The exact bytes written to the outbox and published.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Job::Merge(self.clone())).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<Job>(bytes).map(|Job::Merge(job)| job)
    }
}

/// The queues Stitch uses, each a [`WorkQueue`] with its own retry delays and dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Merge jobs: API (and sweeper) → merge workers.
    Merge,
    /// Events to fan out to webhook endpoints (fed by the events exchange).
    WebhookFeed,
    /// One webhook delivery (an event to one endpoint) per message.
    Webhooks,
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::WebhookFeed => "webhooks.feed",
            Self::Webhooks => "webhooks",
        }
    }
}

/// A durable work queue with delayed retries and a dead-letter queue. [`AmqpBroker::queue`]
/// is the RabbitMQ implementation, `embedded::SqliteQueue` the single-node one.
#[async_trait::async_trait]
pub trait WorkQueue: Send + Sync + 'static {
    /// Stores `payload` durably, to be delivered after `delay` (zero, or one of the family's
    /// configured retry delays). `Ok` only once it is stored where a consumer will take it.
    /// The current span's trace context travels with it.
    async fn enqueue(&self, payload: &[u8], delay: std::time::Duration) -> Result<(), QueueError>;

    /// Moves a message to the dead-letter queue, with the reason, for operators.
    async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), QueueError>;

    /// Starts consuming, at most `prefetch` unacknowledged deliveries at once.
    async fn consume(&self, prefetch: u16) -> Result<Box<dyn Deliveries>, QueueError>;

    /// Checks that the queue answers (readiness).
    async fn ping(&self) -> Result<(), QueueError>;

    /// How full the queue is (for metrics and autoscaling).
    async fn stats(&self) -> Result<QueueStats, QueueError>;
}

/// A queue's load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages waiting for a consumer.
    pub ready: u64,
    pub consumers: u64,
    /// Messages in the dead-letter queue.
    pub dead: u64,
}

/// A running consumer.
#[async_trait::async_trait]
pub trait Deliveries: Send {
    /// The next delivery; `None` when the consumer was closed or lost its connection.
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>>;

    /// Stops consuming: every unacknowledged delivery goes back to the queue.
    async fn close(self: Box<Self>);
}

/// Settles one delivery.
#[async_trait::async_trait]
pub trait Acknowledge: Send + Sync {
    async fn ack(&self) -> Result<(), QueueError>;
    async fn requeue(&self) -> Result<(), QueueError>;
}

/// One message delivered to this process; it stays unacknowledged (and is redelivered if
/// this process dies) until [`Delivery::ack`].
pub struct Delivery {
    pub payload: Vec<u8>,
    pub redelivered: bool,
    /// The W3C trace context the message was published with (`traceparent`, `tracestate`).
    pub trace: Vec<(String, String)>,
    acker: Box<dyn Acknowledge>,
}

impl Delivery {
    pub fn new(payload: Vec<u8>, redelivered: bool, acker: Box<dyn Acknowledge>) -> Self {
        Self {
            payload,
            redelivered,
            trace: Vec::new(),
            acker,
        }
    }

    pub fn with_trace(mut self, trace: Vec<(String, String)>) -> Self {
        self.trace = trace;
        self
    }

    pub async fn ack(&self) -> Result<(), QueueError> {
        self.acker.ack().await
    }

    /// Hands the message back to the queue now; counts toward the delivery limit.
    pub async fn requeue(&self) -> Result<(), QueueError> {
        self.acker.requeue().await
    }
}

/// Where workers publish upload events.
#[async_trait::async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Publishes durably: `Ok` once the broker confirmed it.
    async fn publish_event(&self, event: &crate::events::Event) -> Result<(), QueueError>;
}

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The broker could not be reached, or did not confirm in time.
    #[error("message broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the message (nack) or could not route it (`mandatory` return):
    /// the topology is missing or wrong.
    #[error("message broker refused the message: {0}")]
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_job_round_trips_and_names_its_type() {
        let job = MergeJob::new(UploadId::parse("abc").unwrap());
        let json = job.to_json();
        assert!(json.contains(r#""type":"merge""#), "{json}");
        assert_eq!(MergeJob::from_json(json.as_bytes()).unwrap(), job);
        // Jobs written before `attempt` existed still parse.
        let old = br#"{"type":"merge","version":1,"upload_id":"abc","enqueued_at_ms":5}"#;
        assert_eq!(MergeJob::from_json(old).unwrap().attempt, 0);
        assert!(MergeJob::from_json(br#"{"type":"other"}"#).is_err());
    }

    #[test]
    fn a_stored_entry_is_read_as_the_kind_it_was_stored_under_or_not_at_all() {
        let id = UploadId::parse("abc").unwrap();
        let job = OutboxMessage::merge(id.clone());
        let stored = job.to_stored();
        assert_eq!(
            OutboxMessage::from_stored(OutboxKind::Merge, &stored),
            Ok(job)
        );
        assert!(OutboxMessage::from_stored(OutboxKind::Event, &stored).is_err());
        let upload = crate::upload::NewUpload {
            id,
            geometry: crate::geometry::Geometry::new(10, 10).unwrap(),
            filename: None,
            file_md5: None,
            metadata: None,
            created_at_ms: 1,
            assembly: Default::default(),
            callback_url: None,
            callback_secret: None,
        };
        let event = OutboxMessage::event(&crate::events::Event::created(&upload));
        let stored = event.to_stored();
        assert_eq!(
            OutboxMessage::from_stored(OutboxKind::Event, &stored),
            Ok(event)
        );
        assert!(OutboxMessage::from_stored(OutboxKind::Merge, &stored).is_err());
        for kind in [OutboxKind::Merge, OutboxKind::Event] {
            assert_eq!(OutboxKind::parse(kind.as_str()), Some(kind));
        }
    }
}
