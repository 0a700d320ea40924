//! [`EventSink`] for the single-node mode: events are appended to the database's `events`
//! table, durable like the broker's persistent messages, for the webhook dispatcher and for
//! operators (`sqlite3 stitch.db 'SELECT body FROM events'`).

use async_trait::async_trait;
use rusqlite::params;

use super::Database;
use crate::events::Event;
use crate::now_ms;
use crate::queue::{EventSink, QueueError};

/// Events older than this are dropped when new ones arrive.
const RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;

pub struct SqliteEventLog {
    db: Database,
}

impl SqliteEventLog {
    pub fn new(db: Database) -> Self {
        Self { db }
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
        self.db
            .run(move |conn| {
                let now = now_ms() as i64;
                conn.execute(
                    "INSERT INTO events (event_id, kind, body, published_at) VALUES (?1, ?2, ?3, ?4)",
                    params![id, kind, body, now],
                )?;
                conn.execute("DELETE FROM events WHERE published_at < ?1", [now - RETENTION_MS])?;
                Ok(())
            })
            .await
            .map_err(|e| QueueError::Unavailable(e.0))
    }
}
