//! Webhooks: the delivery message, the policy for client callbacks and the store the
//! dispatcher keeps (events for replay, the delivery log, endpoints disabled by a 410).
//! The dispatcher itself is a worker role (`stitch_worker::webhooks`).

pub mod callback;
mod redis;
pub mod signing;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use self::redis::RedisWebhookStore;

/// Where one delivery goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// An operator-configured endpoint, by its id.
    Endpoint { id: String },
    /// A client's callback URL (checked at every attempt).
    Callback { url: String },
}

impl Target {
    /// A short name for logs and the delivery log.
    pub fn label(&self) -> String {
        match self {
            Self::Endpoint { id } => id.clone(),
            Self::Callback { url } => format!("callback {url}"),
        }
    }
}

/// One event to one target; a message of the `webhooks` queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookJob {
    pub version: u32,
    pub event_id: String,
    pub event_type: String,
    pub target: Target,
    /// Failed attempts so far.
    #[serde(default)]
    pub attempt: u32,
    /// The exact body to send (and sign): the event's JSON.
    pub body: String,
}

impl WebhookJob {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// One attempt, as the delivery log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    pub target: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// `delivered`, `failed`, `refused` (SSRF policy), `gone` (410: disabled), `disabled`,
    /// `dead` (no attempts left), `unknown_endpoint`.
    pub outcome: String,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
    pub at_ms: u64,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[error("webhook store unavailable: {0}")]
pub struct StoreError(pub String);

/// What the dispatcher remembers. Entries expire after the retention the implementation is
/// given (events and logs) or last until enabled again (disabled endpoints).
#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Keeps an event's body for replay.
    async fn keep_event(&self, event_id: &str, body: &str) -> Result<(), StoreError>;
    async fn event(&self, event_id: &str) -> Result<Option<String>, StoreError>;
    async fn log_attempt(
        &self,
        event_id: &str,
        attempt: &DeliveryAttempt,
    ) -> Result<(), StoreError>;
    /// The attempts for an event, oldest first.
    async fn attempts(&self, event_id: &str) -> Result<Vec<DeliveryAttempt>, StoreError>;
    async fn disable_endpoint(&self, endpoint: &str, reason: &str) -> Result<(), StoreError>;
    /// Enables an endpoint again; `false` if it was not disabled.
    async fn enable_endpoint(&self, endpoint: &str) -> Result<bool, StoreError>;
    async fn is_disabled(&self, endpoint: &str) -> Result<bool, StoreError>;
}

/// How long events and delivery logs are kept.
pub const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
