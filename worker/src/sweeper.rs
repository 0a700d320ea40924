//! The sweeper: no upload whose last chunk was accepted may stay unfinished.
//!
//! Every interval it (1) publishes merge triggers and events that are still in outboxes past
//! the horizon (the API's publish failed or the API died between the commit and the publish) and
//! (2) re-enqueues uploads whose merge attempt has not moved for the horizon and whose lock
//! nobody holds (a lost message, a job dead-lettered by the broker): "stuck" is judged from
//! the last merge attempt (`merge_started_at`, or entering `merging` when no attempt began),
//! never from time spent waiting in the queue. The sweeper never fails an upload: a backlog
//! only waits, and a re-enqueue only costs a duplicate job that the lock and the fencing
//! token absorb. Running several sweepers is safe for the same reason.

use std::sync::Arc;
use std::time::Duration;

use stitch_common::lock::{LockName, MergeLock};
use stitch_common::queue::{EventSink, MergeJob, NOW, OutboxMessage, WorkQueue};
use stitch_common::state::StateStore;
use tokio::sync::watch;

pub struct SweeperConfig {
    pub namespace: String,
    pub interval: Duration,
    pub outbox_horizon: Duration,
    pub stuck_merge_horizon: Duration,
}

pub struct Sweeper {
    pub state: Arc<dyn StateStore>,
    pub queue: Arc<dyn WorkQueue>,
    pub events: Arc<dyn EventSink>,
    pub lock: Arc<dyn MergeLock>,
    pub config: SweeperConfig,
}

impl Sweeper {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "sweep incomplete");
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass; returns how many jobs it published.
    pub async fn sweep_once(&self) -> anyhow::Result<usize> {
        let now = stitch_common::now_ms();
        let mut published = 0;
        let everything = self.state.pending_outbox(u64::MAX).await?;
        metrics::gauge!(stitch_common::metrics::OUTBOX_ENTRIES).set(everything.len() as f64);
        let horizon = now.saturating_sub(self.config.outbox_horizon.as_millis() as u64);
        for entry in everything
            .into_iter()
            .filter(|e| e.enqueued_at_ms() < horizon)
        {
            let sent = match &entry.message {
                OutboxMessage::Merge(job) => {
                    self.queue.enqueue(job.to_json().as_bytes(), NOW).await
                }
                OutboxMessage::Event { event, .. } => self.events.publish_event(event).await,
            };
            match sent {
                Ok(()) => {
                    self.state.clear_outbox_entry(&entry).await?;
                    tracing::info!(upload_id = %entry.upload_id, "published an outbox entry left behind");
                    published += 1;
                }
                Err(e) => {
                    tracing::warn!(upload_id = %entry.upload_id, error = %e, "outbox publish failed; next sweep retries");
                }
            }
        }

        let horizon = now.saturating_sub(self.config.stuck_merge_horizon.as_millis() as u64);
        let stuck_merges = self.state.stuck_merges(horizon).await?;
        metrics::gauge!(stitch_common::metrics::STUCK_MERGES).set(stuck_merges.len() as f64);
        for stuck in stuck_merges {
            let id = &stuck.upload_id;
            if self.lock.is_held(&LockName::Merge(id.clone())).await? {
                continue; // A merge is running.
            }
            if self.state.note_requeue(id).await?.is_some() {
                self.queue
                    .enqueue(MergeJob::new(id.clone()).to_json().as_bytes(), NOW)
                    .await?;
                tracing::warn!(upload_id = %id, requeues = stuck.requeues + 1, "re-enqueued a stuck merge");
                published += 1;
            }
        }
        Ok(published)
    }
}
