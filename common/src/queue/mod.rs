//! Work and events between processes: merge jobs (API → workers) and upload events
//! (workers → whoever listens).
//!
//! Messages are versioned, self-describing JSON (`"type"` tags the variant) so that old and
//! new processes can share a queue during a rolling deploy. [`AmqpBroker`] is the RabbitMQ
//! implementation: persistent messages, `mandatory` publishes and publisher confirms, so a
//! publish only counts once the broker has stored it somewhere.

mod amqp;

use serde::{Deserialize, Serialize};

pub use self::amqp::{AmqpBroker, MergeDeliveries, MergeDelivery, Topology};
use crate::id::UploadId;

/// A message on the merge queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Job {
    #[serde(rename = "merge")]
    Merge(MergeJob),
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

/// Where the API sends merge jobs. [`AmqpBroker`] is the RabbitMQ implementation.
#[async_trait::async_trait]
pub trait MergeQueue: Send + Sync + 'static {
    /// Publishes `raw` (a [`MergeJob`] as stored in the outbox) durably: `Ok` only once the
    /// broker confirmed it and it was routed to the work queue.
    async fn enqueue_merge(&self, upload_id: &UploadId, raw: &str) -> Result<(), QueueError>;

    /// Checks that the broker answers (readiness).
    async fn ping(&self) -> Result<(), QueueError>;
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
}
