//! [`MergeLock`] over SQLite: a `locks` table of (key, token, expiry). Expiry is wall-clock
//! milliseconds in the table (so a restarted process sees a dead holder's lease lapse) and
//! monotonic in the holder's [`Lease`]. The keys are those of the Redis lock
//! (`<ns>:{<id>}:lock`, `<ns>:janitor:lock`), so the rows an older release left keep their
//! meaning.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{TransactionBehavior, params};

use super::{Database, DbError};
use crate::lock::{Lease, LockError, LockName, MergeLock};
use crate::now_ms;

pub struct SqliteLock {
    db: Database,
    /// The prefix of every key (`namespace`).
    namespace: String,
    ttl: Duration,
}

impl SqliteLock {
    pub fn new(db: Database, namespace: &str, ttl: Duration) -> Self {
        Self {
            db,
            namespace: namespace.to_owned(),
            ttl,
        }
    }

    fn key(&self, name: &LockName) -> String {
        match name {
            LockName::Merge(id) => format!("{}:{{{id}}}:lock", self.namespace),
            LockName::Janitor => format!("{}:janitor:lock", self.namespace),
            LockName::Append(id) => format!("{}:{{{id}}}:append", self.namespace),
            LockName::Assemble(id) => format!("{}:{{{id}}}:assemble", self.namespace),
        }
    }

    fn drift(&self) -> Duration {
        self.ttl / 100 + Duration::from_millis(2)
    }
}

fn unavailable(e: DbError) -> LockError {
    LockError::Unavailable(e.0)
}

#[async_trait]
impl MergeLock for SqliteLock {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn try_acquire(&self, name: &LockName) -> Result<Option<Lease>, LockError> {
        let started = Instant::now();
        let token = Lease::new_token();
        let (k, t, ttl) = (self.key(name), token.clone(), self.ttl.as_millis() as i64);
        let taken = self
            .db
            .run(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_ms() as i64;
                tx.execute(
                    "DELETE FROM locks WHERE key = ?1 AND expires_at <= ?2",
                    params![k, now],
                )?;
                let inserted = tx.execute(
                    "INSERT OR IGNORE INTO locks (key, token, expires_at) VALUES (?1, ?2, ?3)",
                    params![k, t, now + ttl],
                )?;
                tx.commit()?;
                Ok(inserted == 1)
            })
            .await
            .map_err(unavailable)?;
        Ok(taken.then(|| {
            Lease::new(
                name.clone(),
                token,
                started + self.ttl.saturating_sub(self.drift()),
            )
        }))
    }

    async fn renew(&self, lease: &mut Lease) -> Result<bool, LockError> {
        let started = Instant::now();
        let (k, t, ttl) = (
            self.key(lease.name()),
            lease.token().to_owned(),
            self.ttl.as_millis() as i64,
        );
        let renewed = self
            .db
            .run(move |conn| {
                let now = now_ms() as i64;
                let n = conn.execute(
                    "UPDATE locks SET expires_at = ?3 WHERE key = ?1 AND token = ?2 AND expires_at > ?4",
                    params![k, t, now + ttl, now],
                )?;
                Ok(n == 1)
            })
            .await
            .map_err(unavailable)?;
        if renewed {
            lease.extend_to(started + self.ttl.saturating_sub(self.drift()));
        }
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        let (k, t) = (self.key(lease.name()), lease.token().to_owned());
        self.db
            .run(move |conn| {
                let n = conn.execute(
                    "DELETE FROM locks WHERE key = ?1 AND token = ?2 AND expires_at > ?3",
                    params![k, t, now_ms() as i64],
                )?;
                Ok(n == 1)
            })
            .await
            .map_err(unavailable)
    }

    async fn is_held(&self, name: &LockName) -> Result<bool, LockError> {
        let k = self.key(name);
        self.db
            .run(move |conn| {
                Ok(conn.query_row(
                    "SELECT EXISTS(SELECT 1 FROM locks WHERE key = ?1 AND expires_at > ?2)",
                    params![k, now_ms() as i64],
                    |r| r.get(0),
                )?)
            })
            .await
            .map_err(unavailable)
    }
}
