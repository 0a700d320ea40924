//! [`WebhookStore`] over Redis.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<ns>:webhooks:event:{<event id>}` | string | the event's body (7 days) |
//! | `<ns>:webhooks:log:{<event id>}` | list | one JSON [`DeliveryAttempt`] per attempt (7 days) |
//! | `<ns>:webhooks:disabled` | hash | endpoint id → why it was disabled |

use async_trait::async_trait;
use deadpool_redis::Pool;

use super::{DeliveryAttempt, RETENTION_MS, StoreError, WebhookStore};
use crate::config::Settings;

#[derive(Clone)]
pub struct RedisWebhookStore {
    pool: Pool,
    namespace: String,
}

impl RedisWebhookStore {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            pool: crate::state::redis_pool(
                settings.redis.url.expose(),
                4,
                settings.redis.timeout.0,
                "STITCH__REDIS__URL",
            )?,
            namespace: settings.namespace.clone(),
        })
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool.get().await.map_err(|e| StoreError(e.to_string()))
    }

    fn event_key(&self, id: &str) -> String {
        format!("{}:webhooks:event:{{{id}}}", self.namespace)
    }

    fn log_key(&self, id: &str) -> String {
        format!("{}:webhooks:log:{{{id}}}", self.namespace)
    }

    fn disabled_key(&self) -> String {
        format!("{}:webhooks:disabled", self.namespace)
    }
}

fn err(e: redis::RedisError) -> StoreError {
    StoreError(e.to_string())
}

#[async_trait]
impl WebhookStore for RedisWebhookStore {
    async fn keep_event(&self, event_id: &str, body: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.event_key(event_id))
            .arg(body)
            .arg("PX")
            .arg(RETENTION_MS)
            .query_async::<()>(&mut conn)
            .await
            .map_err(err)
    }

    async fn event(&self, event_id: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.event_key(event_id))
            .query_async(&mut conn)
            .await
            .map_err(err)
    }

    async fn log_attempt(
        &self,
        event_id: &str,
        attempt: &DeliveryAttempt,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let key = self.log_key(event_id);
        let entry = serde_json::to_string(attempt).map_err(|e| StoreError(e.to_string()))?;
        redis::pipe()
            .atomic()
            .rpush(&key, entry)
            .ignore()
            .pexpire(&key, RETENTION_MS as i64)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(err)
    }

    async fn attempts(&self, event_id: &str) -> Result<Vec<DeliveryAttempt>, StoreError> {
        let mut conn = self.conn().await?;
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(self.log_key(event_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(entries
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect())
    }

    async fn disable_endpoint(&self, endpoint: &str, reason: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("HSET")
            .arg(self.disabled_key())
            .arg(endpoint)
            .arg(reason)
            .query_async::<()>(&mut conn)
            .await
            .map_err(err)
    }

    async fn enable_endpoint(&self, endpoint: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let removed: i64 = redis::cmd("HDEL")
            .arg(self.disabled_key())
            .arg(endpoint)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(removed == 1)
    }

    async fn is_disabled(&self, endpoint: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let exists: bool = redis::cmd("HEXISTS")
            .arg(self.disabled_key())
            .arg(endpoint)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(exists)
    }
}
