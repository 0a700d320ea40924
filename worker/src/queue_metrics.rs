//! The queue gauges: how many messages wait in each work queue, how many consumers it has and
//! how many messages lie in its dead-letter queue, read from the broker (or the embedded
//! queue) every `metrics.queue_poll_interval`. The dashboard's merge backlog, the
//! dead-letter alert and the autoscaler's view of the merge queue come from here.

use std::sync::Arc;
use std::time::Duration;

use stitch_common::metrics as m;
use stitch_common::queue::WorkQueue;
use tokio::sync::watch;

/// The queues to watch, by family label (`merge`, `webhooks`, `webhooks.feed`).
pub struct QueueGauges {
    pub queues: Vec<(&'static str, Arc<dyn WorkQueue>)>,
    pub interval: Duration,
}

impl QueueGauges {
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        every(self.interval, shutdown, || self.poll_once()).await;
    }

    /// Reads every queue's load once and sets the gauges; a queue that cannot be read keeps
    /// its last value (the broker's own errors are counted where they happen).
    pub async fn poll_once(&self) {
        for (family, queue) in &self.queues {
            match queue.stats().await {
                Ok(stats) => {
                    metrics::gauge!(m::QUEUE_MESSAGES, "family" => *family).set(stats.ready as f64);
                    metrics::gauge!(m::QUEUE_CONSUMERS, "family" => *family)
                        .set(stats.consumers as f64);
                    metrics::gauge!(m::DEAD_LETTERS, "family" => *family).set(stats.dead as f64);
                }
                Err(e) => tracing::debug!(family, error = %e, "queue stats unavailable"),
            }
        }
    }
}

/// Runs `poll` now and then every `interval`, until shutdown: the loop of every gauge poller.
pub async fn every<F, Fut>(interval: Duration, mut shutdown: watch::Receiver<bool>, mut poll: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        poll().await;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
