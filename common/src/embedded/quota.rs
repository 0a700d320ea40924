//! [`QuotaLedger`] in the single-node database: one row per upload holding a reservation
//! (`quota`), one per reservation not confirmed yet (`quota_unconfirmed`), each operation one
//! `BEGIN IMMEDIATE` transaction.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Database, DbError};
use crate::config::Quotas;
use crate::id::{Tenant, UploadId};
use crate::quota::{QuotaError, QuotaLedger, Reservation, Usage};
use crate::state::StateError;

pub struct SqliteQuotaLedger {
    db: Database,
}

impl SqliteQuotaLedger {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn run<T, F>(&self, op: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.db
            .run(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = op(&tx)?;
                tx.commit()?;
                Ok(out)
            })
            .await
            .map_err(|DbError(detail)| StateError::Unavailable {
                detail,
                outcome_unknown: false,
            })
    }
}

/// What [`SqliteQuotaLedger::upsert`] makes an existing entry hold.
enum Held {
    /// The bytes given.
    Set,
    /// The bytes given or what it holds, whichever is more.
    AtLeast,
}

impl SqliteQuotaLedger {
    /// `track` and `track_growing`: the upload's entry, made or changed, without a limit.
    async fn upsert(
        &self,
        upload: &UploadId,
        bytes: u64,
        active: bool,
        held: Held,
    ) -> Result<(), StateError> {
        let key = upload.as_str().to_owned();
        let tenant = upload.tenant().to_string();
        let sql = match held {
            Held::Set => {
                "INSERT INTO quota (upload_id, tenant, bytes, active) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (upload_id) DO UPDATE SET bytes = ?3, active = ?4"
            }
            Held::AtLeast => {
                "INSERT INTO quota (upload_id, tenant, bytes, active) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (upload_id) DO UPDATE SET bytes = max(bytes, ?3), active = ?4"
            }
        };
        self.run(move |tx| {
            confirm(tx, &key)?;
            tx.execute(sql, params![key, tenant, int(bytes), active as i64])
                .map(|_| ())
        })
        .await
    }
}

fn int(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// A step after the reservation: the upload leaves the unconfirmed ones.
fn confirm(tx: &rusqlite::Transaction<'_>, key: &str) -> Result<(), rusqlite::Error> {
    tx.execute("DELETE FROM quota_unconfirmed WHERE upload_id = ?1", [key])
        .map(|_| ())
}

enum Outcome {
    New,
    Held,
    Active(u64),
    Stored(u64),
}

#[async_trait]
impl QuotaLedger for SqliteQuotaLedger {
    async fn reserve(
        &self,
        upload: &UploadId,
        bytes: u64,
        limits: &Quotas,
    ) -> Result<Reservation, QuotaError> {
        let key = upload.as_str().to_owned();
        let tenant = upload.tenant().to_string();
        let (max_active, max_stored) = (limits.max_active_uploads, limits.max_stored_bytes);
        let now = crate::now_ms();
        let outcome = self
            .run(move |tx| {
                let held: Option<i64> = tx
                    .query_row("SELECT 1 FROM quota WHERE upload_id = ?1", [&key], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if held.is_some() {
                    return Ok(Outcome::Held);
                }
                let (active, stored): (i64, i64) = tx.query_row(
                    "SELECT COALESCE(SUM(active), 0), COALESCE(SUM(bytes), 0) FROM quota WHERE tenant = ?1",
                    [&tenant],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let (active, stored) = (active as u64, stored as u64);
                if max_active.is_some_and(|max| active >= max) {
                    return Ok(Outcome::Active(active));
                }
                if max_stored.is_some_and(|max| stored.saturating_add(bytes) > max.0) {
                    return Ok(Outcome::Stored(stored));
                }
                tx.execute(
                    "INSERT INTO quota (upload_id, tenant, bytes, active) VALUES (?1, ?2, ?3, 1)",
                    params![key, tenant, int(bytes)],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO quota_unconfirmed (upload_id, reserved_at) VALUES (?1, ?2)",
                    params![key, int(now)],
                )?;
                Ok(Outcome::New)
            })
            .await?;
        match outcome {
            Outcome::New => Ok(Reservation::New),
            Outcome::Held => Ok(Reservation::Held),
            Outcome::Active(active) => Err(QuotaError::ActiveUploads {
                active,
                limit: max_active.unwrap_or(0),
            }),
            Outcome::Stored(stored) => Err(QuotaError::StoredBytes {
                stored,
                requested: bytes,
                limit: max_stored.map_or(0, |b| b.0),
            }),
        }
    }

    async fn settle(&self, upload: &UploadId, bytes: u64) -> Result<(), StateError> {
        let key = upload.as_str().to_owned();
        self.run(move |tx| {
            confirm(tx, &key)?;
            tx.execute(
                "UPDATE quota SET active = 0, bytes = ?2 WHERE upload_id = ?1",
                params![key, int(bytes)],
            )
            .map(|_| ())
        })
        .await
    }

    async fn release(&self, upload: &UploadId) -> Result<(), StateError> {
        let key = upload.as_str().to_owned();
        self.run(move |tx| {
            confirm(tx, &key)?;
            tx.execute("DELETE FROM quota WHERE upload_id = ?1", [key])
                .map(|_| ())
        })
        .await
    }

    async fn track(&self, upload: &UploadId, bytes: u64, active: bool) -> Result<(), StateError> {
        self.upsert(upload, bytes, active, Held::Set).await
    }

    async fn track_growing(
        &self,
        upload: &UploadId,
        received: u64,
        active: bool,
    ) -> Result<(), StateError> {
        self.upsert(upload, received, active, Held::AtLeast).await
    }

    async fn usage(&self, tenant: &Tenant) -> Result<Usage, StateError> {
        let tenant = tenant.to_string();
        self.run(move |tx| {
            tx.query_row(
                "SELECT COALESCE(SUM(active), 0), COALESCE(SUM(bytes), 0) FROM quota WHERE tenant = ?1",
                [tenant],
                |r| {
                    Ok(Usage {
                        active_uploads: r.get::<_, i64>(0)? as u64,
                        stored_bytes: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
        })
        .await
    }

    async fn unconfirmed(&self, before_ms: u64) -> Result<Vec<UploadId>, StateError> {
        let keys = self
            .run(move |tx| {
                let mut stmt =
                    tx.prepare("SELECT upload_id FROM quota_unconfirmed WHERE reserved_at < ?1")?;
                stmt.query_map([int(before_ms)], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok(keys
            .into_iter()
            .filter_map(|key| {
                UploadId::from_key(&key)
                    .inspect_err(
                        |e| tracing::warn!(key, error = %e, "an unreadable quota reservation"),
                    )
                    .ok()
            })
            .collect())
    }
}
