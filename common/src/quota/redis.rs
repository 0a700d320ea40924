//! [`QuotaLedger`] on Redis: per tenant, a hash of active uploads, a hash of kept uploads and
//! their bytes, the running total, and a hash of the unconfirmed reservations and when they
//! were made, all under the hash tag `{quota:<tenant>}` so that each operation is one script
//! on one slot.

use async_trait::async_trait;
use deadpool_redis::Pool;
use redis::Script;

use super::{QuotaError, QuotaLedger, Reservation, Usage};
use crate::config::Quotas;
use crate::id::{Tenant, UploadId};
use crate::state::StateError;

#[derive(Clone)]
pub struct RedisQuotaLedger {
    pool: Pool,
    namespace: String,
    scripts: &'static Scripts,
}

struct Scripts {
    reserve: Script,
    settle: Script,
    release: Script,
    track: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        reserve: Script::new(include_str!("lua/reserve.lua")),
        settle: Script::new(include_str!("lua/settle.lua")),
        release: Script::new(include_str!("lua/release.lua")),
        track: Script::new(include_str!("lua/track.lua")),
    })
}

/// Key layout: the ledger is the only code that knows it.
fn keys(ns: &str, tenant: &Tenant) -> [String; 4] {
    [
        format!("{ns}:{{quota:{tenant}}}:active"),
        format!("{ns}:{{quota:{tenant}}}:stored"),
        format!("{ns}:{{quota:{tenant}}}:total"),
        format!("{ns}:{{quota:{tenant}}}:{UNCONFIRMED}"),
    ]
}

/// The last part of the key of a tenant's unconfirmed reservations.
const UNCONFIRMED: &str = "unconfirmed";

fn limit(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| v.min(i64::MAX as u64) as i64)
}

impl RedisQuotaLedger {
    /// A ledger on the state store's pool and namespace.
    pub fn new(pool: Pool, namespace: &str) -> Self {
        Self {
            pool,
            namespace: namespace.to_owned(),
            scripts: scripts(),
        }
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, StateError> {
        crate::state::redis_connection(&self.pool).await
    }

    /// Runs one of the ledger's scripts on `upload`'s entry; `mode` is the track script's
    /// (`grow` or `set`), which the others ignore.
    async fn run(
        &self,
        script: &Script,
        upload: &UploadId,
        bytes: u64,
        active: bool,
        mode: &str,
    ) -> Result<(), StateError> {
        let mut conn = self.connection().await?;
        let [active_key, stored, total, unconfirmed] = keys(&self.namespace, &upload.tenant());
        let _: i64 = script
            .key(active_key)
            .key(stored)
            .key(total)
            .key(unconfirmed)
            .arg(upload.as_str())
            .arg(bytes)
            .arg(if active { "1" } else { "0" })
            .arg(mode)
            .invoke_async(&mut conn)
            .await
            .map_err(crate::state::redis_error)?;
        Ok(())
    }
}

#[async_trait]
impl QuotaLedger for RedisQuotaLedger {
    async fn reserve(
        &self,
        upload: &UploadId,
        bytes: u64,
        limits: &Quotas,
    ) -> Result<Reservation, QuotaError> {
        let mut conn = self.connection().await?;
        let [active, stored, total, unconfirmed] = keys(&self.namespace, &upload.tenant());
        let max_stored = limits.max_stored_bytes.map(|b| b.0);
        let reply: Vec<String> = self
            .scripts
            .reserve
            .key(active)
            .key(stored)
            .key(total)
            .key(unconfirmed)
            .arg(upload.as_str())
            .arg(bytes)
            .arg(limit(limits.max_active_uploads))
            .arg(limit(max_stored))
            .arg(crate::now_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(crate::state::redis_error)?;
        let number = |i: usize| {
            reply
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match reply.first().map(String::as_str) {
            Some("new") => Ok(Reservation::New),
            Some("held") => Ok(Reservation::Held),
            Some("active") => Err(QuotaError::ActiveUploads {
                active: number(1),
                limit: limits.max_active_uploads.unwrap_or(0),
            }),
            Some("stored") => Err(QuotaError::StoredBytes {
                stored: number(1),
                requested: bytes,
                limit: max_stored.unwrap_or(0),
            }),
            other => Err(StateError::Corrupt(format!("quota reserve answered {other:?}")).into()),
        }
    }

    async fn settle(&self, upload: &UploadId, bytes: u64) -> Result<(), StateError> {
        self.run(&self.scripts.settle, upload, bytes, false, "")
            .await
    }

    async fn release(&self, upload: &UploadId) -> Result<(), StateError> {
        self.run(&self.scripts.release, upload, 0, false, "").await
    }

    async fn track(&self, upload: &UploadId, bytes: u64, active: bool) -> Result<(), StateError> {
        self.run(&self.scripts.track, upload, bytes, active, "set")
            .await
    }

    async fn track_growing(
        &self,
        upload: &UploadId,
        received: u64,
        active: bool,
    ) -> Result<(), StateError> {
        self.run(&self.scripts.track, upload, received, active, "grow")
            .await
    }

    async fn usage(&self, tenant: &Tenant) -> Result<Usage, StateError> {
        let mut conn = self.connection().await?;
        let [active, _, total, _] = keys(&self.namespace, tenant);
        let (active, total): (u64, Option<i64>) = redis::pipe()
            .cmd("HLEN")
            .arg(active)
            .cmd("GET")
            .arg(total)
            .query_async(&mut conn)
            .await
            .map_err(crate::state::redis_error)?;
        Ok(Usage {
            active_uploads: active,
            stored_bytes: total.unwrap_or(0).max(0) as u64,
        })
    }

    async fn unconfirmed(&self, before_ms: u64) -> Result<Vec<UploadId>, StateError> {
        let mut conn = self.connection().await?;
        let pattern = format!("{}:{{quota:*}}:{UNCONFIRMED}", self.namespace);
        let mut out = Vec::new();
        for key in crate::state::scan_keys(&mut conn, &pattern).await? {
            let held: Vec<(String, u64)> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(crate::state::redis_error)?;
            for (upload, at) in held {
                if at >= before_ms {
                    continue;
                }
                match UploadId::from_key(&upload) {
                    Ok(id) => out.push(id),
                    Err(e) => {
                        tracing::warn!(key, upload, error = %e, "an unreadable quota reservation")
                    }
                }
            }
        }
        Ok(out)
    }
}
