//! The single-node backends: state store, merge queue, lock and event log in one SQLite
//! database on local disk, so that `stitch serve` needs no other service and a restart loses
//! no upload and no pending merge.
//!
//! Why SQLite (bundled, via rusqlite) rather than a key-value store such as redb: each of the
//! state store's operations is a multi-row read-check-write that must be atomic, which is one
//! `BEGIN IMMEDIATE` transaction in SQL, the same guarantee the Redis Lua scripts give; WAL
//! mode with `synchronous = FULL` makes every committed transaction durable; the database is
//! one file an operator can open with `sqlite3`; and its crash safety is among the most
//! tested there is. The queue and the lock live in the same file and the same transactions
//! discipline. One connection serves the process (single-node means one writer anyway);
//! operations run on blocking threads.

mod events;
mod lock;
mod queue;
mod quota;
mod state;
mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rusqlite::Connection;

pub use self::events::SqliteEventLog;
pub use self::lock::SqliteLock;
pub use self::queue::SqliteQueue;
pub use self::quota::SqliteQuotaLedger;
pub use self::state::SqliteStateStore;
pub use self::webhooks::SqliteWebhookStore;
use crate::backends::Backends;
use crate::config::Settings;
use crate::queue::Family;
use crate::storage::FsChunkStore;

/// The schema version this code writes (SQLite `user_version`). Version 2 stores the kind
/// of each outbox entry in a column of its own; version 3 adds the whole-file digests beyond
/// MD5 to `uploads`; version 4 how an upload's parts make its file (tus).
/// [`Database::open`] upgrades any earlier version.
pub const SCHEMA_VERSION: i64 = 4;

/// The shared database handle.
#[derive(Clone)]
pub struct Database {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

/// A database failure, as the backends report it.
#[derive(Debug, thiserror::Error)]
#[error("embedded database: {0}")]
pub struct DbError(pub String);

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        crate::metrics::backend_error("sqlite");
        Self(e.to_string())
    }
}

impl Database {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    /// Refuses a database written by a newer Stitch.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut conn =
            Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "{} was written by a newer Stitch (schema {version}, this one knows {SCHEMA_VERSION})",
                path.display()
            );
        }
        if version == 1 {
            upgrade_from_1(&mut conn)
                .with_context(|| format!("upgrading {} from schema 1", path.display()))?;
        }
        if (1..=2).contains(&version) {
            upgrade_from_2(&mut conn)
                .with_context(|| format!("upgrading {} from schema 2", path.display()))?;
        }
        if (1..=3).contains(&version) {
            add_upload_columns(
                &mut conn,
                4,
                &[
                    ("assembly", "TEXT NOT NULL DEFAULT ''"),
                    ("concat_parts", "TEXT NOT NULL DEFAULT ''"),
                ],
            )
            .with_context(|| format!("upgrading {} from schema 3", path.display()))?;
        }
        conn.execute_batch(include_str!("schema.sql"))?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `op` with the connection on a blocking thread.
    pub async fn run<T, F>(&self, op: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| DbError("the database lock is poisoned".into()))?;
            op(&mut guard)
        })
        .await
        .map_err(|e| DbError(format!("database task failed: {e}")))?
    }
}

/// Schema 1 → 2: the outbox gets its `kind` column, filled in from each entry's message (the
/// type tag version 1 wrote), in one transaction with the version bump, so a crash leaves
/// version 1 untouched. An entry of no known kind keeps an empty kind: it stays in the table
/// (nothing in an outbox is dropped) and the sweeper reports it unreadable.
fn upgrade_from_1(conn: &mut Connection) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let has_outbox: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox')",
        [],
        |r| r.get(0),
    )?;
    if has_outbox {
        tx.execute_batch("ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT ''")?;
        let rows = {
            let mut stmt = tx.prepare("SELECT id, raw FROM outbox")?;
            stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?
        };
        for (id, raw) in rows {
            if let Ok(message) = serde_json::from_str::<crate::queue::OutboxMessage>(&raw) {
                tx.execute(
                    "UPDATE outbox SET kind = ?2 WHERE id = ?1",
                    rusqlite::params![id, message.kind().as_str()],
                )?;
            }
        }
    }
    tx.pragma_update(None, "user_version", 2)?;
    tx.commit()?;
    Ok(())
}

/// Schema 2 → 3: `uploads` gets the whole-file digest columns (`crc32c`, `sha256`,
/// `composite_md5`), all nullable: an upload completed before reads with them absent.
fn upgrade_from_2(conn: &mut Connection) -> anyhow::Result<()> {
    add_upload_columns(
        conn,
        3,
        &[
            ("crc32c", "INTEGER"),
            ("sha256", "TEXT"),
            ("composite_md5", "TEXT"),
        ],
    )
}

/// Adds `columns` to `uploads` and sets the schema `version`, in one transaction, so a crash
/// leaves the earlier version untouched. A column already there is kept: the upgrade is safe
/// to meet half-done by hand. (Schema 3 → 4 adds `assembly` and `concat_parts`, whose
/// defaults read as the chunk protocol's uploads every earlier version holds.)
fn add_upload_columns(
    conn: &mut Connection,
    version: i64,
    columns: &[(&str, &str)],
) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // The columns `uploads` has (none: no table yet, schema.sql creates it whole).
    let existing = {
        let mut stmt = tx.prepare("SELECT name FROM pragma_table_info('uploads')")?;
        stmt.query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
    };
    if !existing.is_empty() {
        for (name, kind) in columns {
            if !existing.iter().any(|c| c == name) {
                tx.execute_batch(&format!("ALTER TABLE uploads ADD COLUMN {name} {kind}"))?;
            }
        }
    }
    tx.pragma_update(None, "user_version", version)?;
    tx.commit()?;
    Ok(())
}

/// Where the single-node database lives by default: beside the data it indexes.
pub fn default_path(settings: &Settings) -> PathBuf {
    settings.storage.root.join("stitch.db")
}

impl Backends {
    /// The single-node set: everything in one SQLite database at `db_path`.
    pub fn embedded(settings: &Settings, db_path: &Path) -> anyhow::Result<Self> {
        let db = Database::open(db_path)?;
        let limit = settings.merge.delivery_limit;
        let queue = |family| SqliteQueue::new(db.clone(), family, limit).map(Arc::new);
        let webhook_feed = queue(Family::WebhookFeed)?;
        Ok(Self {
            state: Arc::new(SqliteStateStore::new(db.clone())),
            quotas: Arc::new(SqliteQuotaLedger::new(db.clone())),
            merges: queue(Family::Merge)?,
            webhooks: queue(Family::Webhooks)?,
            events: Arc::new(SqliteEventLog::new(db.clone(), webhook_feed.clone())),
            webhook_feed,
            lock: Arc::new(SqliteLock::new(
                db.clone(),
                &settings.namespace,
                settings.lock.ttl.0,
            )),
            append_lock: Arc::new(SqliteLock::new(
                db.clone(),
                &settings.namespace,
                settings.tus.append_lease.0,
            )),
            webhook_store: Arc::new(SqliteWebhookStore::new(db)),
            storage: FsChunkStore::new(&settings.storage.root, settings.storage.fsync)
                .with_direct_io(settings.storage.direct_io),
        })
    }
}
