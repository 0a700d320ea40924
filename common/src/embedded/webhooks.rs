//! [`WebhookStore`] over SQLite.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{Database, DbError};
use crate::now_ms;
use crate::webhooks::{DeliveryAttempt, RETENTION_MS, StoreError, WebhookStore};

pub struct SqliteWebhookStore {
    db: Database,
}

impl SqliteWebhookStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

fn err(e: DbError) -> StoreError {
    StoreError(e.0)
}

#[async_trait]
impl WebhookStore for SqliteWebhookStore {
    async fn keep_event(&self, event_id: &str, body: &str) -> Result<(), StoreError> {
        let (id, body) = (event_id.to_owned(), body.to_owned());
        self.db
            .run(move |conn| {
                let now = now_ms() as i64;
                conn.execute(
                    "INSERT OR REPLACE INTO webhook_events (event_id, body, expires_at) VALUES (?1, ?2, ?3)",
                    params![id, body, now + RETENTION_MS as i64],
                )?;
                conn.execute("DELETE FROM webhook_events WHERE expires_at <= ?1", [now])?;
                Ok(())
            })
            .await
            .map_err(err)
    }

    async fn event(&self, event_id: &str) -> Result<Option<String>, StoreError> {
        let id = event_id.to_owned();
        self.db
            .run(move |conn| {
                Ok(conn
                    .query_row(
                        "SELECT body FROM webhook_events WHERE event_id = ?1 AND expires_at > ?2",
                        params![id, now_ms() as i64],
                        |r| r.get(0),
                    )
                    .optional()?)
            })
            .await
            .map_err(err)
    }

    async fn log_attempt(
        &self,
        event_id: &str,
        attempt: &DeliveryAttempt,
    ) -> Result<(), StoreError> {
        let id = event_id.to_owned();
        let entry = serde_json::to_string(attempt).map_err(|e| StoreError(e.to_string()))?;
        self.db
            .run(move |conn| {
                let now = now_ms() as i64;
                conn.execute(
                    "INSERT INTO webhook_deliveries (event_id, entry, logged_at) VALUES (?1, ?2, ?3)",
                    params![id, entry, now],
                )?;
                conn.execute(
                    "DELETE FROM webhook_deliveries WHERE logged_at < ?1",
                    [now - RETENTION_MS as i64],
                )?;
                Ok(())
            })
            .await
            .map_err(err)
    }

    async fn attempts(&self, event_id: &str) -> Result<Vec<DeliveryAttempt>, StoreError> {
        let id = event_id.to_owned();
        self.db
            .run(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT entry FROM webhook_deliveries WHERE event_id = ?1 ORDER BY seq",
                )?;
                let rows = stmt
                    .query_map([id], |r| r.get::<_, String>(0))?
                    .filter_map(Result::ok)
                    .filter_map(|e| serde_json::from_str(&e).ok())
                    .collect();
                Ok(rows)
            })
            .await
            .map_err(err)
    }

    async fn disable_endpoint(&self, endpoint: &str, reason: &str) -> Result<(), StoreError> {
        let (endpoint, reason) = (endpoint.to_owned(), reason.to_owned());
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO webhook_disabled (endpoint, reason, disabled_at) VALUES (?1, ?2, ?3)",
                    params![endpoint, reason, now_ms() as i64],
                )?;
                Ok(())
            })
            .await
            .map_err(err)
    }

    async fn enable_endpoint(&self, endpoint: &str) -> Result<bool, StoreError> {
        let endpoint = endpoint.to_owned();
        self.db
            .run(move |conn| {
                Ok(conn.execute(
                    "DELETE FROM webhook_disabled WHERE endpoint = ?1",
                    [endpoint],
                )? == 1)
            })
            .await
            .map_err(err)
    }

    async fn is_disabled(&self, endpoint: &str) -> Result<bool, StoreError> {
        let endpoint = endpoint.to_owned();
        self.db
            .run(move |conn| {
                Ok(conn.query_row(
                    "SELECT EXISTS(SELECT 1 FROM webhook_disabled WHERE endpoint = ?1)",
                    [endpoint],
                    |r| r.get(0),
                )?)
            })
            .await
            .map_err(err)
    }
}
