//! The merge consumer: takes jobs from the merge queue (prefetch = merge slots), runs each with
//! [`Merger`], and settles the delivery by what happened:
//!
//! | outcome | delivery |
//! |---|---|
//! | committed / already completed / skipped / failed for good (MD5 mismatch) / reopened (chunks lost) | ack (after the event is confirmed) |
//! | lock busy, lease lost | re-published to the first delay queue (attempt unchanged), ack |
//! | transient failure (storage or a backend) | re-published to the next delay queue (attempt + 1), ack; past the last delay, to the last one again, for as long as it fails |
//! | not a job | dead-lettered, ack |
//! | shutdown mid-merge | left unacked: the broker redelivers it |
//!
//! A transient failure never fails the upload: a full disk, an I/O error or an unreachable
//! Redis says nothing about the chunks, which stay intact on storage, so the merge is tried
//! again, at most one (last) delay apart, until it goes through. Each such retry counts in
//! `stitch_merge_transient_failures_total`, which an alert watches.
//!
//! A delivery is acked only after its effect is committed, so a worker dying at any point
//! leaves the job to be redelivered and re-run idempotently.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use stitch_common::queue::{Delivery, MergeJob, WorkQueue};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::merge::{MergeError, MergeOutcome, Merger};
use stitch_common::concat::Control;

pub struct ConsumerConfig {
    pub prefetch: u16,
    pub retry_delays: Vec<Duration>,
    /// How long in-flight merges may run after shutdown begins before they are cancelled.
    pub shutdown_grace: Duration,
}

/// Consumes until `shutdown` turns true, reconnecting with backoff when the broker drops.
pub async fn run(
    merger: Arc<Merger>,
    queue: Arc<dyn WorkQueue>,
    config: ConsumerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    let mut in_flight: JoinSet<()> = JoinSet::new();
    let mut controls: Vec<std::sync::Weak<Control>> = Vec::new();
    let mut backoff = Duration::from_millis(200);
    'connect: while !*shutdown.borrow() {
        let mut deliveries = match queue.consume(config.prefetch).await {
            Ok(d) => {
                tracing::info!("consuming merge jobs");
                backoff = Duration::from_millis(200);
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "cannot consume merge jobs; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue 'connect;
            }
        };
        loop {
            while in_flight.try_join_next().is_some() {}
            tokio::select! {
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let control = Arc::new(Control::default());
                        controls.retain(|c| c.strong_count() > 0);
                        controls.push(Arc::downgrade(&control));
                        let (merger, queue, config) = (merger.clone(), queue.clone(), config.clone());
                        in_flight.spawn(handle(merger, queue, config, delivery, control));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "merge consumer failed; reconnecting");
                        continue 'connect;
                    }
                    None => {
                        tracing::warn!("merge consumer closed; reconnecting");
                        continue 'connect;
                    }
                },
                _ = shutdown.changed() => {
                    // Stop taking jobs, let the running ones finish within the grace period,
                    // then cancel what is left; closing the connection hands every unacked
                    // job back to the broker.
                    tracing::info!(running = in_flight.len(), "stopping the merge consumer");
                    let drained = tokio::time::timeout(config.shutdown_grace, async {
                        while in_flight.join_next().await.is_some() {}
                    })
                    .await;
                    if drained.is_err() {
                        for control in controls.iter().filter_map(std::sync::Weak::upgrade) {
                            control.cancel.store(true, Ordering::SeqCst);
                        }
                        while in_flight.join_next().await.is_some() {}
                    }
                    deliveries.close().await;
                    return;
                }
            }
        }
    }
}

/// Handles one delivery inside a `merge` span that continues the publisher's trace.
async fn handle(
    merger: Arc<Merger>,
    queue: Arc<dyn WorkQueue>,
    config: Arc<ConsumerConfig>,
    delivery: Delivery,
    control: Arc<Control>,
) {
    let span = tracing::info_span!(
        "merge",
        upload_id = tracing::field::Empty,
        attempt = tracing::field::Empty
    );
    stitch_common::telemetry::continue_trace(&span, &delivery.trace);
    handle_in_span(merger, queue, config, delivery, control, span.clone())
        .instrument(span)
        .await
}

async fn handle_in_span(
    merger: Arc<Merger>,
    queue: Arc<dyn WorkQueue>,
    config: Arc<ConsumerConfig>,
    delivery: Delivery,
    control: Arc<Control>,
    span: tracing::Span,
) {
    let job = match MergeJob::from_json(&delivery.payload) {
        Ok(job) => job,
        Err(reason) => {
            tracing::error!(%reason, "not a merge job; dead-lettering it");
            let reason = format!("not a merge job: {reason}");
            if queue.dead_letter(&delivery.payload, &reason).await.is_ok() {
                let _ = delivery.ack().await;
            }
            return;
        }
    };
    let id = job.upload_id.clone();
    span.record("upload_id", tracing::field::display(&id));
    span.record("attempt", job.attempt);
    let first_delay = config
        .retry_delays
        .first()
        .copied()
        .unwrap_or(Duration::from_secs(5));
    let outcome = merger.merge_upload(&id, control).await;
    let label = match &outcome {
        Ok(MergeOutcome::Committed(_)) => "committed",
        Ok(MergeOutcome::AlreadyCompleted(_)) => "already_completed",
        Ok(MergeOutcome::Skipped(_)) => "skipped",
        Ok(MergeOutcome::Failed(_)) => "failed",
        Ok(MergeOutcome::Reopened(_)) => "reopened",
        Ok(MergeOutcome::LockBusy) | Err(MergeError::LeaseLost) => "lock_busy",
        Err(MergeError::Cancelled) => "cancelled",
        Err(MergeError::Transient(_) | MergeError::Storage(_)) => "retried",
    };
    metrics::counter!(stitch_common::metrics::MERGES, "outcome" => label).increment(1);
    match outcome {
        Ok(MergeOutcome::Committed(finish)) | Ok(MergeOutcome::AlreadyCompleted(finish)) => {
            #[cfg(feature = "failpoints")]
            stitch_common::failpoints::crash_here(
                stitch_common::failpoints::MERGE_PUBLISHED_BEFORE_ACK,
            );
            if let Err(e) = delivery.ack().await {
                tracing::warn!(upload_id = %id, error = %e, "ack failed after commit; the job will be redelivered and find the upload completed");
            }
            merger.finish(finish).await;
        }
        Ok(MergeOutcome::Skipped(reason)) => {
            tracing::info!(upload_id = %id, %reason, "merge job skipped");
            let _ = delivery.ack().await;
        }
        Ok(MergeOutcome::Failed(_)) | Ok(MergeOutcome::Reopened(_)) => {
            let _ = delivery.ack().await;
        }
        Ok(MergeOutcome::LockBusy) | Err(MergeError::LeaseLost) => {
            // Someone else is (or may be) merging: check again later, without counting this
            // as a failed attempt.
            retry_later(queue.as_ref(), &delivery, &job, first_delay).await;
        }
        Err(MergeError::Cancelled) => {
            // Shutdown: leave it unacked; closing the connection returns it to the queue.
        }
        Err(error @ (MergeError::Transient(_) | MergeError::Storage(_))) => {
            let cause = match &error {
                MergeError::Storage(_) => "storage",
                _ => "backend",
            };
            metrics::counter!(stitch_common::metrics::MERGE_TRANSIENT_FAILURES, "cause" => cause)
                .increment(1);
            let delay = retry_delay(&config.retry_delays, job.attempt);
            tracing::warn!(upload_id = %id, %error, cause, attempt = job.attempt.saturating_add(1), ?delay, "merge failed transiently; will retry");
            let next = MergeJob {
                attempt: job.attempt.saturating_add(1),
                ..job.clone()
            };
            retry_later(queue.as_ref(), &delivery, &next, delay).await;
        }
    }
}

/// The wait before the retry that follows `attempt` transient failures: the configured
/// delays in turn, then the last one for every later retry (never giving up: the chunks are
/// intact, only the merge's I/O or a backend failed). Settings validation makes sure there is
/// at least one delay.
fn retry_delay(delays: &[Duration], attempt: u32) -> Duration {
    delays
        .get(attempt as usize)
        .or(delays.last())
        .copied()
        .unwrap_or(Duration::from_secs(5))
}

/// Sends `job` through the delay queue for `delay`, then acks the delivery. If the broker
/// refuses, the delivery goes back to the queue as it is.
async fn retry_later(queue: &dyn WorkQueue, delivery: &Delivery, job: &MergeJob, delay: Duration) {
    match queue.enqueue(job.to_json().as_bytes(), delay).await {
        Ok(()) => {
            let _ = delivery.ack().await;
        }
        Err(e) => {
            tracing::warn!(upload_id = %job.upload_id, error = %e, "could not schedule a retry; requeueing");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = delivery.requeue().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_follow_the_delays_then_stay_at_the_last_one_forever() {
        let delays = [1, 5, 30].map(Duration::from_secs);
        let waits: Vec<u64> = [0, 1, 2, 3, 10, u32::MAX]
            .into_iter()
            .map(|attempt| retry_delay(&delays, attempt).as_secs())
            .collect();
        assert_eq!(waits, [1, 5, 30, 30, 30, 30]);
    }
}
