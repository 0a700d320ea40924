//! The set of backends a Stitch process runs on, behind their traits. The distributed set is
//! Redis (state, lock) and RabbitMQ (merge queue, events); the single-node set is embedded.
//! The API and the worker are built from a `Backends`, never from concrete types.

use std::sync::Arc;

use anyhow::Context;

use crate::config::Settings;
use crate::lock::{MergeLock, RedisLock};
use crate::queue::{AmqpBroker, EventSink, Family, WorkQueue};
use crate::quota::{QuotaLedger, RedisQuotaLedger};
use crate::state::{RedisStateStore, StateStore};
use crate::storage::FsChunkStore;
use crate::webhooks::{RedisWebhookStore, WebhookStore};

#[derive(Clone)]
pub struct Backends {
    pub state: Arc<dyn StateStore>,
    /// What each tenant's uploads hold, against its quotas.
    pub quotas: Arc<dyn QuotaLedger>,
    /// Merge jobs.
    pub merges: Arc<dyn WorkQueue>,
    /// Every event, for the webhook dispatcher to fan out.
    pub webhook_feed: Arc<dyn WorkQueue>,
    /// One message per webhook delivery.
    pub webhooks: Arc<dyn WorkQueue>,
    pub lock: Arc<dyn MergeLock>,
    /// Leases of `tus.append_lease` on appending to an upload (one PATCH at a time).
    pub append_lock: Arc<dyn MergeLock>,
    pub events: Arc<dyn EventSink>,
    pub storage: FsChunkStore,
    /// Events for replay, the delivery log, disabled endpoints.
    pub webhook_store: Arc<dyn WebhookStore>,
}

impl Backends {
    /// Redis and RabbitMQ from `settings`. Connects lazily: a service that is down makes
    /// requests fail (and readiness report it) rather than stopping the process.
    pub fn distributed(settings: &Settings) -> anyhow::Result<Self> {
        let state = Arc::new(
            RedisStateStore::new(&settings.redis, &settings.namespace)
                .context("setting up the Redis state store")?,
        );
        let broker = Arc::new(AmqpBroker::new(settings));
        Ok(Self {
            quotas: Arc::new(RedisQuotaLedger::new(state.pool(), &settings.namespace)),
            state,
            merges: Arc::new(broker.queue(Family::Merge)),
            webhook_feed: Arc::new(broker.queue(Family::WebhookFeed)),
            webhooks: Arc::new(broker.queue(Family::Webhooks)),
            lock: Arc::new(RedisLock::new(settings).context("setting up the merge lock")?),
            append_lock: Arc::new(
                RedisLock::with_ttl(settings, settings.tus.append_lease.0)
                    .context("setting up the append lock")?,
            ),
            events: broker,
            storage: FsChunkStore::new(&settings.storage.root, settings.storage.fsync)
                .with_direct_io(settings.storage.direct_io),
            webhook_store: Arc::new(
                RedisWebhookStore::new(settings).context("setting up the webhook store")?,
            ),
        })
    }
}
