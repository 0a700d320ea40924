//! [`WorkQueue`] over SQLite: a `jobs` table (one `family` column per queue) with availability times (delays) and claims.
//!
//! A delivery is a claimed row; ack deletes it, requeue releases it. Claims belong to the
//! process, which is the only writer of a single-node database: on open, every claim left by
//! a previous run (the process died with merges in flight) is released, which is the broker's
//! "redeliver what was unacked" for this backend. A job claimed more than the delivery limit
//! more often than the first delivery plus the delivery limit moves to `dead_jobs`, as
//! RabbitMQ's `x-delivery-limit` does.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{Database, DbError};
use crate::now_ms;
use crate::queue::{Acknowledge, Deliveries, Delivery, Family, QueueError, QueueStats, WorkQueue};

/// The current span's trace context, as stored with a job.
pub(super) fn trace_json() -> String {
    serde_json::to_string(&crate::telemetry::inject_current()).unwrap_or_else(|_| "[]".into())
}

/// How long an idle consumer sleeps before looking for delayed jobs that became due.
const POLL: Duration = Duration::from_millis(250);

pub struct SqliteQueue {
    db: Database,
    family: &'static str,
    delivery_limit: u32,
    wake: Arc<Notify>,
}

fn unavailable(e: DbError) -> QueueError {
    QueueError::Unavailable(e.0)
}

impl SqliteQueue {
    /// Opens `family`'s queue, releasing claims a previous run left behind.
    pub fn new(db: Database, family: Family, delivery_limit: u32) -> anyhow::Result<Self> {
        {
            let conn = db
                .conn
                .lock()
                .map_err(|_| anyhow::anyhow!("the database lock is poisoned"))?;
            conn.execute(
                "UPDATE jobs SET claimed_by = NULL WHERE family = ?1 AND claimed_by IS NOT NULL",
                [family.name()],
            )?;
        }
        Ok(Self {
            db,
            family: family.name(),
            delivery_limit,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Wakes idle consumers (after a job was inserted by another table's transaction).
    pub(super) fn wake(&self) {
        self.wake.notify_waiters();
    }

    pub(super) fn family(&self) -> &'static str {
        self.family
    }

    async fn insert(&self, payload: Vec<u8>, delay: Duration) -> Result<(), QueueError> {
        let available_at = now_ms() as i64 + delay.as_millis() as i64;
        let family = self.family;
        let trace = trace_json();
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT INTO jobs (family, payload, available_at, trace) VALUES (?1, ?2, ?3, ?4)",
                    params![family, payload, available_at, trace],
                )?;
                Ok(())
            })
            .await
            .map_err(unavailable)?;
        self.wake.notify_waiters();
        Ok(())
    }

    /// Jobs waiting or claimed, and dead ones (for tests and operators).
    pub async fn counts(&self) -> Result<(u64, u64), QueueError> {
        self.db
            .run(|conn| {
                let live: i64 = conn.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))?;
                let dead: i64 =
                    conn.query_row("SELECT COUNT(*) FROM dead_jobs", [], |r| r.get(0))?;
                Ok((live as u64, dead as u64))
            })
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl WorkQueue for SqliteQueue {
    async fn enqueue(&self, payload: &[u8], delay: Duration) -> Result<(), QueueError> {
        self.insert(payload.to_vec(), delay).await
    }

    async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), QueueError> {
        let (payload, reason, family) = (payload.to_vec(), reason.to_owned(), self.family);
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT INTO dead_jobs (family, payload, reason, dead_at) VALUES (?1, ?2, ?3, ?4)",
                    params![family, payload, reason, now_ms() as i64],
                )?;
                Ok(())
            })
            .await
            .map_err(unavailable)
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn Deliveries>, QueueError> {
        Ok(Box::new(SqliteDeliveries {
            db: self.db.clone(),
            family: self.family,
            consumer: format!("consumer-{:016x}", rand::random::<u64>()),
            delivery_limit: self.delivery_limit,
            slots: Arc::new(Semaphore::new(prefetch.max(1) as usize)),
            wake: self.wake.clone(),
        }))
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let family = self.family;
        self.db
            .run(move |conn| {
                let ready: i64 = conn.query_row(
                    "SELECT COUNT(*) FROM jobs WHERE family = ?1 AND claimed_by IS NULL",
                    [family],
                    |r| r.get(0),
                )?;
                let consumers: i64 = conn.query_row(
                    "SELECT COUNT(DISTINCT claimed_by) FROM jobs WHERE family = ?1",
                    [family],
                    |r| r.get(0),
                )?;
                let dead: i64 = conn.query_row(
                    "SELECT COUNT(*) FROM dead_jobs WHERE family = ?1",
                    [family],
                    |r| r.get(0),
                )?;
                Ok(QueueStats {
                    ready: ready as u64,
                    consumers: consumers as u64,
                    dead: dead as u64,
                })
            })
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.db
            .run(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
            .map_err(unavailable)
    }
}

struct SqliteDeliveries {
    db: Database,
    family: &'static str,
    consumer: String,
    delivery_limit: u32,
    /// At most `prefetch` unsettled deliveries, like a broker's prefetch.
    slots: Arc<Semaphore>,
    wake: Arc<Notify>,
}

/// What claiming found.
enum Claim {
    Job {
        id: i64,
        payload: Vec<u8>,
        deliveries: i64,
        trace: Vec<(String, String)>,
    },
    Nothing,
}

impl SqliteDeliveries {
    async fn claim(&self) -> Result<Claim, DbError> {
        let (consumer, limit, family) = (
            self.consumer.clone(),
            self.delivery_limit as i64,
            self.family,
        );
        self.db
            .run(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                loop {
                    let row = tx
                        .query_row(
                            "SELECT id, payload, deliveries, trace FROM jobs WHERE family = ?2 \
                             AND claimed_by IS NULL AND available_at <= ?1 \
                             ORDER BY available_at, id LIMIT 1",
                            params![now_ms() as i64, family],
                            |r| {
                                Ok((
                                    r.get::<_, i64>(0)?,
                                    r.get::<_, Vec<u8>>(1)?,
                                    r.get::<_, i64>(2)?,
                                    r.get::<_, String>(3)?,
                                ))
                            },
                        )
                        .optional()?;
                    let Some((id, payload, deliveries, trace)) = row else {
                        tx.commit()?;
                        return Ok(Claim::Nothing);
                    };
                    // Like RabbitMQ's x-delivery-limit: the first delivery plus `limit`
                    // redeliveries.
                    if deliveries > limit {
                        tx.execute(
                            "INSERT INTO dead_jobs (family, payload, reason, dead_at) VALUES (?1, ?2, ?3, ?4)",
                            params![family, payload, format!("delivered {deliveries} times without being settled"), now_ms() as i64],
                        )?;
                        tx.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
                        continue;
                    }
                    tx.execute(
                        "UPDATE jobs SET claimed_by = ?2, deliveries = deliveries + 1 WHERE id = ?1",
                        params![id, consumer],
                    )?;
                    tx.commit()?;
                    let trace = serde_json::from_str(&trace).unwrap_or_default();
                    return Ok(Claim::Job { id, payload, deliveries: deliveries + 1, trace });
                }
            })
            .await
    }
}

#[async_trait]
impl Deliveries for SqliteDeliveries {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        loop {
            let notified = self.wake.notified();
            match self.claim().await {
                Err(e) => return Some(Err(unavailable(e))),
                Ok(Claim::Job {
                    id,
                    payload,
                    deliveries,
                    trace,
                }) => {
                    let acker = SqliteAcker {
                        db: self.db.clone(),
                        job: id,
                        wake: self.wake.clone(),
                        slot: std::sync::Mutex::new(Some(permit)),
                    };
                    return Some(Ok(
                        Delivery::new(payload, deliveries > 1, Box::new(acker)).with_trace(trace)
                    ));
                }
                Ok(Claim::Nothing) => {
                    let _ = tokio::time::timeout(POLL, notified).await;
                }
            }
        }
    }

    async fn close(self: Box<Self>) {
        let consumer = self.consumer.clone();
        let _ = self
            .db
            .run(move |conn| {
                conn.execute(
                    "UPDATE jobs SET claimed_by = NULL WHERE claimed_by = ?1",
                    [consumer],
                )?;
                Ok(())
            })
            .await;
        self.wake.notify_waiters();
    }
}

struct SqliteAcker {
    db: Database,
    job: i64,
    wake: Arc<Notify>,
    /// Held until the delivery is settled (or dropped), like an unacked broker delivery.
    slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl SqliteAcker {
    fn free_slot(&self) {
        if let Ok(mut slot) = self.slot.lock() {
            slot.take();
        }
    }
}

#[async_trait]
impl Acknowledge for SqliteAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        let job = self.job;
        self.db
            .run(move |conn| {
                conn.execute("DELETE FROM jobs WHERE id = ?1", [job])?;
                Ok(())
            })
            .await
            .map_err(unavailable)?;
        self.free_slot();
        Ok(())
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        let job = self.job;
        self.db
            .run(move |conn| {
                conn.execute("UPDATE jobs SET claimed_by = NULL WHERE id = ?1", [job])?;
                Ok(())
            })
            .await
            .map_err(unavailable)?;
        self.free_slot();
        self.wake.notify_waiters();
        Ok(())
    }
}
