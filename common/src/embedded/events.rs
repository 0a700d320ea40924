//! [`EventSink`] for the single-node mode: each event is appended to the database's `events`
//! table (for operators: `sqlite3 stitch.db 'SELECT body FROM events'`) and, in the same
//! transaction, queued for the webhook dispatcher, as the events exchange feeds its queue in
//! the distributed mode.

use async_trait::async_trait;
use rusqlite::params;

use std::sync::Arc;

use super::{Database, SqliteQueue};
use crate::events::Event;
use crate::now_ms;
use crate::queue::{EventSink, QueueError};

/// Events older than this are dropped when new ones arrive.
const RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;

pub struct SqliteEventLog {
    db: Database,
    feed: Arc<SqliteQueue>,
}

impl SqliteEventLog {
    pub fn new(db: Database, feed: Arc<SqliteQueue>) -> Self {
        Self { db, feed }
    }

    /// Every stored event, oldest first (tests, operators).
    pub async fn all(&self) -> Result<Vec<serde_json::Value>, QueueError> {
        self.db
            .run(|conn| {
                let mut stmt = conn.prepare("SELECT body FROM events ORDER BY seq")?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))?
                    .filter_map(Result::ok)
                    .filter_map(|b| serde_json::from_str(&b).ok())
                    .collect();
                Ok(rows)
            })
            .await
            .map_err(|e| QueueError::Unavailable(e.0))
    }
}

#[async_trait]
impl EventSink for SqliteEventLog {
    async fn publish_event(&self, event: &Event) -> Result<(), QueueError> {
        let body = String::from_utf8_lossy(&event.to_json()).into_owned();
        let (id, kind) = (event.event_id.clone(), event.kind.routing_key().to_owned());
        let family = self.feed.family();
        let trace = super::queue::trace_json();
        self.db
            .run(move |conn| {
                let now = now_ms() as i64;
                let tx = conn.transaction()?;
                tx.execute(
                    "INSERT INTO events (event_id, kind, body, published_at) VALUES (?1, ?2, ?3, ?4)",
                    params![id, kind, body, now],
                )?;
                tx.execute(
                    "INSERT INTO jobs (family, payload, available_at, trace) VALUES (?1, ?2, ?3, ?4)",
                    params![family, body.as_bytes(), now, trace],
                )?;
                tx.execute("DELETE FROM events WHERE published_at < ?1", [now - RETENTION_MS])?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| QueueError::Unavailable(e.0))?;
        self.feed.wake();
        Ok(())
    }
}
