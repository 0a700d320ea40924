//! [`StateStore`] over SQLite: each operation is one `BEGIN IMMEDIATE` transaction that makes
//! the same checks, in the same order, as the Redis Lua scripts (see `state/lua/`). Upload
//! expiry is a per-row `expires_at`: an expired upload reads as absent and is purged by the
//! next operation that touches it.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Database, DbError};
use crate::digest::{CompositeMd5, Md5, Sha256};
use crate::geometry::{ChunkIndex, Geometry};
use crate::id::UploadId;
use crate::now_ms;
use crate::queue::{OutboxKind, OutboxMessage};
use crate::state::{
    Aborted, Committed, Conflict, Created, Expired, Failed, MergePlan, MergeStart, MergingUpload,
    OutboxEntry, Progress, Recorded, Reopened, Restoration, Restored, StateError, StateStore,
    UploadHeader,
};
use crate::upload::{
    Assembly, ChunkRecord, Completion, Failure, NewUpload, UploadState, UploadStatus,
};

pub struct SqliteStateStore {
    db: Database,
}

impl SqliteStateStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// An upload, or a concatenation (merging as it is created, with `merge_job` in its
    /// outbox): the checks of `create_upload.lua`.
    async fn create(
        &self,
        upload: &NewUpload,
        created_event: &OutboxMessage,
        merge_job: Option<&OutboxMessage>,
        ttl_ms: u64,
    ) -> Result<Created, StateError> {
        let (u, created_event) = (upload.clone(), created_event.clone());
        let merge_job = merge_job.cloned();
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = u.id.as_str();
            purge_expired(tx, key, now)?;
            if let Some(head) = read_head(tx, key)? {
                if head.assembly != u.assembly {
                    return Err(Conflict::Assembly.into());
                }
                if head.geometry != u.geometry {
                    return Err(Conflict::Geometry {
                        existing: head.geometry,
                    }
                    .into());
                }
                let md5 = md5_text(u.file_md5);
                if !md5.is_empty() && head.file_md5 != md5 {
                    return Err(Conflict::FileMd5.into());
                }
                if matches!(head.state, UploadState::Aborted | UploadState::Failed) {
                    return Err(Conflict::NotReceiving(head.state).into());
                }
                return Ok(Created::AlreadyExists);
            }
            insert_upload(tx, &u, u.created_at_ms as i64, now, int(ttl_ms))?;
            push_outbox(tx, key, &created_event)?;
            if let Some(job) = &merge_job {
                tx.execute(
                    "UPDATE uploads SET state = 'merging', merging_at = ?2 WHERE id = ?1",
                    params![key, u.created_at_ms as i64],
                )
                .map_err(db_error)?;
                push_outbox(tx, key, job)?;
            }
            Ok(Created::New)
        })
        .await
    }

    async fn run<T, F>(&self, op: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StateError> + Send + 'static,
    {
        let result = self
            .db
            .run(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = op(&tx);
                match out {
                    Ok(value) => {
                        tx.commit()?;
                        Ok(Ok(value))
                    }
                    // Dropping the transaction rolls it back: a refusal writes nothing.
                    Err(e) => Ok(Err(e)),
                }
            })
            .await;
        match result {
            Ok(inner) => inner,
            Err(DbError(detail)) => Err(StateError::Unavailable {
                detail,
                outcome_unknown: false,
            }),
        }
    }
}

fn db_error(e: rusqlite::Error) -> StateError {
    StateError::Corrupt(format!("embedded database: {e}"))
}

fn int(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Drops the upload's rows if it expired, so that it reads as absent.
fn purge_expired(tx: &Transaction<'_>, id: &str, now: i64) -> Result<(), StateError> {
    let expired: bool = tx
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM uploads WHERE id = ?1 AND expires_at <= ?2)",
            params![id, now],
            |r| r.get(0),
        )
        .map_err(db_error)?;
    if expired {
        tx.execute("DELETE FROM parts WHERE upload_id = ?1", [id])
            .map_err(db_error)?;
        tx.execute("DELETE FROM outbox WHERE upload_id = ?1", [id])
            .map_err(db_error)?;
        tx.execute("DELETE FROM uploads WHERE id = ?1", [id])
            .map_err(db_error)?;
    }
    Ok(())
}

/// The columns every check needs.
struct Head {
    state: UploadState,
    geometry: Geometry,
    assembly: Assembly,
    file_md5: String,
    filename: String,
}

fn read_head(tx: &Transaction<'_>, id: &str) -> Result<Option<Head>, StateError> {
    tx.query_row(
        "SELECT state, total_size, chunk_size, total_chunks, file_md5, filename, assembly, \
         concat_parts FROM uploads WHERE id = ?1",
        [id],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                (
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ),
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                (r.get::<_, String>(6)?, r.get::<_, String>(7)?),
            ))
        },
    )
    .optional()
    .map_err(db_error)?
    .map(
        |(state, (ts, cs, tc), file_md5, filename, (assembly, parts))| {
            Ok(Head {
                state: state.parse().map_err(StateError::Corrupt)?,
                geometry: Geometry {
                    total_size: ts as u64,
                    chunk_size: cs as u64,
                    total_chunks: tc as u64,
                },
                assembly: Assembly::from_stored(&assembly, &parts).map_err(StateError::Corrupt)?,
                file_md5,
                filename,
            })
        },
    )
    .transpose()
}

/// The head of an upload of segments that is receiving, and whether it is partial: the
/// checks `append_segment` and `declare_length` share (those of their Lua scripts).
fn receiving_segments(tx: &Transaction<'_>, id: &str) -> Result<(Head, bool), StateError> {
    let Some(head) = read_head(tx, id)? else {
        return Err(StateError::NotFound);
    };
    let Assembly::Segments { partial } = head.assembly else {
        return Err(Conflict::Assembly.into());
    };
    if head.state != UploadState::Receiving {
        return Err(Conflict::NotReceiving(head.state).into());
    }
    Ok((head, partial))
}

fn md5_text(md5: Option<Md5>) -> String {
    md5.map(|m| m.to_hex()).unwrap_or_default()
}

fn metadata_text(upload: &NewUpload) -> String {
    upload
        .metadata
        .as_ref()
        .map(|m| serde_json::Value::Object(m.clone()).to_string())
        .unwrap_or_default()
}

fn insert_upload(
    tx: &Transaction<'_>,
    u: &NewUpload,
    created_at: i64,
    now: i64,
    ttl: i64,
) -> Result<(), StateError> {
    let g = u.geometry;
    let (assembly, concat_parts) = u.assembly.to_stored();
    tx.execute(
        "INSERT INTO uploads (id, state, total_size, chunk_size, total_chunks, filename, file_md5, \
         metadata, created_at, updated_at, expires_at, callback_url, callback_secret, assembly, \
         concat_parts) \
         VALUES (?1, 'receiving', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            u.id.as_str(),
            int(g.total_size),
            int(g.chunk_size),
            int(g.total_chunks),
            u.filename.as_deref().unwrap_or(""),
            md5_text(u.file_md5),
            metadata_text(u),
            created_at,
            now,
            now + ttl,
            u.callback_url.as_deref().unwrap_or(""),
            u.callback_secret.as_deref().unwrap_or(""),
            assembly,
            concat_parts
        ],
    )
    .map_err(db_error)?;
    Ok(())
}

/// Appends an entry (merge trigger or event) to the upload's outbox, under its kind.
fn push_outbox(tx: &Transaction<'_>, id: &str, message: &OutboxMessage) -> Result<(), StateError> {
    tx.execute(
        "INSERT INTO outbox (upload_id, kind, raw, enqueued_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            id,
            message.kind().as_str(),
            message.to_stored(),
            int(message.enqueued_at_ms())
        ],
    )
    .map_err(db_error)?;
    Ok(())
}

/// Removes the upload's pending merge triggers; its pending events stay to be published.
fn drop_merge_triggers(tx: &Transaction<'_>, id: &str) -> Result<(), StateError> {
    tx.execute(
        "DELETE FROM outbox WHERE upload_id = ?1 AND kind = ?2",
        params![id, OutboxKind::Merge.as_str()],
    )
    .map_err(db_error)?;
    Ok(())
}

/// Makes the upload an `aborted` tombstone (an abort or an expiry): its chunks forgotten, its
/// merge triggers dropped, `event` (an outbox entry) added, kept for `ttl_ms`.
fn entomb(
    tx: &Transaction<'_>,
    id: &str,
    now: i64,
    ttl_ms: u64,
    event: &OutboxMessage,
) -> Result<(), StateError> {
    tx.execute(
        "UPDATE uploads SET state = 'aborted', updated_at = ?2, chunks_received = 0, \
         bytes_received = 0, expires_at = ?3 WHERE id = ?1",
        params![id, now, now + int(ttl_ms)],
    )
    .map_err(db_error)?;
    tx.execute("DELETE FROM parts WHERE upload_id = ?1", [id])
        .map_err(db_error)?;
    drop_merge_triggers(tx, id)?;
    push_outbox(tx, id, event)
}

fn insert_part(tx: &Transaction<'_>, id: &str, c: &ChunkRecord) -> Result<(), StateError> {
    tx.execute(
        "INSERT INTO parts (upload_id, idx, offset, len, crc32c, md5, token) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            int(c.index.0),
            int(c.offset),
            int(c.len),
            c.crc32c as i64,
            md5_text(c.md5),
            c.token
        ],
    )
    .map_err(db_error)?;
    Ok(())
}

fn counts(tx: &Transaction<'_>, id: &str) -> Result<(u64, u64), StateError> {
    tx.query_row(
        "SELECT chunks_received, bytes_received FROM uploads WHERE id = ?1",
        [id],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .map_err(db_error)
}

fn part_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, i64, i64, i64, String, String)> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn to_record(row: (i64, i64, i64, i64, String, String)) -> ChunkRecord {
    let (idx, offset, len, crc, md5, token) = row;
    ChunkRecord {
        index: ChunkIndex(idx as u64),
        offset: offset as u64,
        len: len as u64,
        crc32c: crc as u32,
        md5: Md5::parse(&md5),
        token,
    }
}

#[async_trait]
impl StateStore for SqliteStateStore {
    async fn create_upload(
        &self,
        upload: &NewUpload,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Created, StateError> {
        self.create(upload, created_event, None, ttl_ms).await
    }

    async fn create_concatenation(
        &self,
        upload: &NewUpload,
        created_event: &OutboxMessage,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Created, StateError> {
        self.create(upload, created_event, Some(merge_job), ttl_ms)
            .await
    }

    async fn upload_header(&self, id: &UploadId) -> Result<Option<UploadHeader>, StateError> {
        let id = id.clone();
        self.run(move |tx| {
            purge_expired(tx, id.as_str(), now_ms() as i64)?;
            Ok(read_head(tx, id.as_str())?.map(|h| UploadHeader {
                state: h.state,
                geometry: h.geometry,
                assembly: h.assembly,
                file_md5: Md5::parse(&h.file_md5),
            }))
        })
        .await
    }

    async fn record_chunk(
        &self,
        upload: &NewUpload,
        chunk: &ChunkRecord,
        merge_job: &OutboxMessage,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Recorded, StateError> {
        let (u, c, job) = (upload.clone(), chunk.clone(), merge_job.clone());
        let created_event = created_event.clone();
        self.run(move |tx| {
            let now = now_ms() as i64;
            let ttl = int(ttl_ms);
            let id = u.id.as_str();
            purge_expired(tx, id, now)?;
            let mut set_md5 = None;
            let mut set_name = None;
            let mut created = false;
            match read_head(tx, id)? {
                None => {
                    insert_upload(tx, &u, now, now, ttl)?;
                    created = true;
                }
                Some(head) => {
                    if !head.assembly.is_chunks() {
                        return Err(Conflict::Assembly.into());
                    }
                    if head.geometry != u.geometry {
                        return Err(Conflict::Geometry { existing: head.geometry }.into());
                    }
                    let md5 = md5_text(u.file_md5);
                    if !md5.is_empty() && !head.file_md5.is_empty() && head.file_md5 != md5 {
                        return Err(Conflict::FileMd5.into());
                    }
                    if head.state != UploadState::Receiving {
                        return Err(Conflict::NotReceiving(head.state).into());
                    }
                    if !md5.is_empty() && head.file_md5.is_empty() {
                        set_md5 = Some(md5);
                    }
                    if head.filename.is_empty() {
                        set_name = u.filename.clone().filter(|n| !n.is_empty());
                    }
                }
            }
            let touch = |tx: &Transaction<'_>| -> Result<(), StateError> {
                tx.execute(
                    "UPDATE uploads SET updated_at = ?2, expires_at = ?3, \
                     file_md5 = COALESCE(?4, file_md5), filename = COALESCE(?5, filename) \
                     WHERE id = ?1",
                    params![id, now, now + ttl, set_md5, set_name],
                )
                .map_err(db_error)?;
                Ok(())
            };
            let existing = tx
                .query_row(
                    "SELECT idx, offset, len, crc32c, md5, token FROM parts WHERE upload_id = ?1 AND idx = ?2",
                    params![id, int(c.index.0)],
                    part_from_row,
                )
                .optional()
                .map_err(db_error)?
                .map(to_record);
            if let Some(existing) = existing {
                if !existing.same_content(&c) {
                    return Err(Conflict::ChunkContent(c.index).into());
                }
                touch(tx)?;
                let (chunks_received, bytes_received) = counts(tx, id)?;
                return Ok(Recorded::Duplicate {
                    progress: Progress {
                        state: UploadState::Receiving,
                        chunks_received,
                        bytes_received,
                        completed_upload: false,
                        created_upload: false,
                    },
                    counted_token: existing.token,
                });
            }
            insert_part(tx, id, &c)?;
            tx.execute(
                "UPDATE uploads SET chunks_received = chunks_received + 1, \
                 bytes_received = bytes_received + ?2 WHERE id = ?1",
                params![id, int(c.len)],
            )
            .map_err(db_error)?;
            touch(tx)?;
            let (chunks_received, bytes_received) = counts(tx, id)?;
            let completed = bytes_received == u.geometry.total_size;
            if completed {
                tx.execute(
                    "UPDATE uploads SET state = 'merging', merging_at = ?2 WHERE id = ?1",
                    params![id, now],
                )
                .map_err(db_error)?;
                push_outbox(tx, id, &job)?;
            }
            if created {
                push_outbox(tx, id, &created_event)?;
            }
            Ok(Recorded::New(Progress {
                state: if completed { UploadState::Merging } else { UploadState::Receiving },
                chunks_received,
                bytes_received,
                completed_upload: completed,
                created_upload: created,
            }))
        })
        .await
    }

    async fn append_segment(
        &self,
        id: &UploadId,
        segment: &ChunkRecord,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Progress, StateError> {
        let (id, segment, job) = (id.clone(), segment.clone(), merge_job.clone());
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = id.as_str();
            purge_expired(tx, key, now)?;
            let (head, partial) = receiving_segments(tx, key)?;
            let (chunks, bytes) = counts(tx, key)?;
            if segment.offset != bytes {
                return Err(Conflict::Offset { current: bytes }.into());
            }
            let size = head.geometry.total_size;
            // A length still open (tus Upload-Defer-Length) bounds nothing here.
            if size > 0 && segment.offset.saturating_add(segment.len) > size {
                return Err(Conflict::PastEnd { size }.into());
            }
            let numbered = ChunkRecord {
                index: ChunkIndex(chunks),
                ..segment
            };
            insert_part(tx, key, &numbered)?;
            let (chunks_received, bytes_received) = (chunks + 1, bytes + numbered.len);
            let completed = size > 0 && bytes_received == size && !partial;
            tx.execute(
                "UPDATE uploads SET chunks_received = ?2, bytes_received = ?3, updated_at = ?4, \
                 expires_at = ?5, state = ?6, \
                 merging_at = CASE WHEN ?6 = 'merging' THEN ?4 ELSE merging_at END WHERE id = ?1",
                params![
                    key,
                    int(chunks_received),
                    int(bytes_received),
                    now,
                    now + int(ttl_ms),
                    if completed { "merging" } else { "receiving" }
                ],
            )
            .map_err(db_error)?;
            if completed {
                push_outbox(tx, key, &job)?;
            }
            Ok(Progress {
                state: if completed {
                    UploadState::Merging
                } else {
                    UploadState::Receiving
                },
                chunks_received,
                bytes_received,
                completed_upload: completed,
                created_upload: false,
            })
        })
        .await
    }

    async fn declare_length(
        &self,
        id: &UploadId,
        length: u64,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Progress, StateError> {
        let (id, job) = (id.clone(), merge_job.clone());
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = id.as_str();
            purge_expired(tx, key, now)?;
            let (head, partial) = receiving_segments(tx, key)?;
            let (chunks_received, bytes_received) = counts(tx, key)?;
            let progress = |state, completed_upload| Progress {
                state,
                chunks_received,
                bytes_received,
                completed_upload,
                created_upload: false,
            };
            let current = head.geometry.total_size;
            if current == length {
                return Ok(progress(UploadState::Receiving, false));
            }
            if current != 0 || length < bytes_received || length == 0 {
                return Err(Conflict::Length {
                    current,
                    received: bytes_received,
                }
                .into());
            }
            let completed = bytes_received == length && !partial;
            tx.execute(
                "UPDATE uploads SET total_size = ?2, chunk_size = ?2, total_chunks = 1, \
                 updated_at = ?3, expires_at = ?4, state = ?5, \
                 merging_at = CASE WHEN ?5 = 'merging' THEN ?3 ELSE merging_at END WHERE id = ?1",
                params![
                    key,
                    int(length),
                    now,
                    now + int(ttl_ms),
                    if completed { "merging" } else { "receiving" }
                ],
            )
            .map_err(db_error)?;
            if completed {
                push_outbox(tx, key, &job)?;
                return Ok(progress(UploadState::Merging, true));
            }
            Ok(progress(UploadState::Receiving, false))
        })
        .await
    }

    async fn upload_status(&self, id: &UploadId) -> Result<Option<UploadStatus>, StateError> {
        let id = id.clone();
        self.run(move |tx| {
            let now = now_ms() as i64;
            purge_expired(tx, id.as_str(), now)?;
            let row = tx
                .query_row(
                    "SELECT state, total_size, chunk_size, total_chunks, filename, file_md5, metadata, \
                     created_at, updated_at, bytes_received, chunks_received, merge_bytes_done, \
                     size, md5, location, completed_at, completed_event_id, \
                     failure_reason, failed_at, failed_event_id, callback_url, callback_secret, \
                     crc32c, sha256, composite_md5, assembly, concat_parts \
                     FROM uploads WHERE id = ?1",
                    [id.as_str()],
                    |r| {
                        Ok((
                            (r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?),
                            (r.get::<_, String>(4)?, r.get::<_, String>(5)?, r.get::<_, String>(6)?),
                            (r.get::<_, i64>(7)?, r.get::<_, i64>(8)?, r.get::<_, i64>(9)?, r.get::<_, i64>(10)?, r.get::<_, Option<i64>>(11)?),
                            (r.get::<_, Option<i64>>(12)?, r.get::<_, Option<String>>(13)?, r.get::<_, Option<String>>(14)?, r.get::<_, Option<i64>>(15)?, r.get::<_, Option<String>>(16)?),
                            (r.get::<_, Option<String>>(17)?, r.get::<_, Option<i64>>(18)?, r.get::<_, Option<String>>(19)?),
                            (r.get::<_, String>(20)?, r.get::<_, String>(21)?),
                            (r.get::<_, Option<i64>>(22)?, r.get::<_, Option<String>>(23)?, r.get::<_, Option<String>>(24)?),
                            (r.get::<_, String>(25)?, r.get::<_, String>(26)?),
                        ))
                    },
                )
                .optional()
                .map_err(db_error)?;
            let Some((head, names, times, done, failed, callback_url, digests, assembly)) = row
            else {
                return Ok(None);
            };
            let assembly =
                Assembly::from_stored(&assembly.0, &assembly.1).map_err(StateError::Corrupt)?;
            let geometry = Geometry {
                total_size: head.1 as u64,
                chunk_size: head.2 as u64,
                total_chunks: head.3 as u64,
            };
            let metadata = match names.2.as_str() {
                "" => None,
                json => match serde_json::from_str(json) {
                    Ok(serde_json::Value::Object(map)) => Some(map),
                    _ => return Err(StateError::Corrupt("metadata is not a JSON object".into())),
                },
            };
            let mut stmt = tx
                .prepare_cached("SELECT idx FROM parts WHERE upload_id = ?1 ORDER BY idx")
                .map_err(db_error)?;
            let uploaded_chunks = stmt
                .query_map([id.as_str()], |r| r.get::<_, i64>(0).map(|v| v as u64))
                .map_err(db_error)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_error)?;
            let completion = match (done.0, done.1.as_deref().and_then(Md5::parse)) {
                (Some(size), Some(md5)) => Some(Completion {
                    size: size as u64,
                    md5,
                    crc32c: digests.0.and_then(|v| u32::try_from(v).ok()),
                    sha256: digests.1.as_deref().and_then(Sha256::parse),
                    composite_md5: digests.2.as_deref().and_then(CompositeMd5::parse),
                    location: done.2.unwrap_or_default(),
                    completed_at_ms: done.3.unwrap_or(0) as u64,
                    event_id: done.4.unwrap_or_default(),
                }),
                _ => None,
            };
            let failure = failed.0.map(|reason| Failure {
                reason,
                failed_at_ms: failed.1.unwrap_or(0) as u64,
                event_id: failed.2.unwrap_or_default(),
            });
            Ok(Some(UploadStatus {
                id: id.clone(),
                state: head.0.parse().map_err(StateError::Corrupt)?,
                geometry,
                filename: Some(names.0).filter(|s| !s.is_empty()),
                file_md5: Md5::parse(&names.1),
                metadata,
                callback_url: Some(callback_url.0).filter(|s| !s.is_empty()),
                callback_secret: Some(callback_url.1).filter(|s| !s.is_empty()),
                created_at_ms: times.0 as u64,
                updated_at_ms: times.1 as u64,
                bytes_received: times.2 as u64,
                chunks_received: times.3 as u64,
                // A completed upload has every chunk, whether or not their rows remain (a
                // rebuild from storage has none).
                // Only chunks have indices a client resumes by.
                uploaded_chunks: if !assembly.is_chunks() {
                    Vec::new()
                } else if completion.is_some() {
                    (0..geometry.total_chunks).collect()
                } else {
                    uploaded_chunks
                },
                assembly,
                merge_bytes_done: times.4.map(|v| v as u64),
                completion,
                failure,
            }))
        })
        .await
    }

    async fn abort_upload(
        &self,
        id: &UploadId,
        aborted_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Aborted, StateError> {
        let (id, aborted_event) = (id.clone(), aborted_event.clone());
        self.run(move |tx| {
            let now = now_ms() as i64;
            let id = id.as_str();
            purge_expired(tx, id, now)?;
            let Some(head) = read_head(tx, id)? else {
                return Err(StateError::NotFound);
            };
            if head.state == UploadState::Aborted {
                return Ok(Aborted::Already);
            }
            entomb(tx, id, now, ttl_ms, &aborted_event)?;
            Ok(Aborted::Now {
                previous: head.state,
            })
        })
        .await
    }

    async fn clear_outbox_entry(&self, entry: &OutboxEntry) -> Result<(), StateError> {
        let (id, kind, stored) = (
            entry.upload_id.clone(),
            entry.kind(),
            entry.stored().to_owned(),
        );
        self.run(move |tx| {
            tx.execute(
                "DELETE FROM outbox WHERE id = (SELECT id FROM outbox \
                 WHERE upload_id = ?1 AND kind = ?2 AND raw = ?3 ORDER BY id LIMIT 1)",
                params![id.as_str(), kind.as_str(), stored],
            )
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn pending_outbox(&self, older_than_ms: u64) -> Result<Vec<OutboxEntry>, StateError> {
        self.run(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT o.upload_id, o.kind, o.raw FROM outbox o JOIN uploads u ON u.id = o.upload_id \
                     WHERE o.enqueued_at < ?1 AND u.expires_at > ?2 ORDER BY o.id",
                )
                .map_err(db_error)?;
            let rows = stmt
                .query_map(params![int(older_than_ms), now_ms() as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .map_err(db_error)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, kind, raw) = row.map_err(db_error)?;
                let Ok(upload_id) = UploadId::from_key(&id) else {
                    continue;
                };
                let entry = OutboxKind::parse(&kind)
                    .ok_or_else(|| format!("unknown outbox kind {kind:?}"))
                    .and_then(|kind| OutboxEntry::from_stored(upload_id, kind, raw));
                match entry {
                    Ok(entry) => out.push(entry),
                    // Nothing can publish it; keep it visible rather than dropping it.
                    Err(e) => tracing::error!(upload_id = %id, error = %e, "unreadable outbox entry"),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn stuck_merges(&self, older_than_ms: u64) -> Result<Vec<MergingUpload>, StateError> {
        self.run(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT id, MAX(COALESCE(merging_at, 0), COALESCE(requeued_at, 0)) AS since, requeues \
                     FROM uploads WHERE state = 'merging' AND expires_at > ?2 AND since < ?1",
                )
                .map_err(db_error)?;
            let rows = stmt
                .query_map(params![int(older_than_ms), now_ms() as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(db_error)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, since, requeues) = row.map_err(db_error)?;
                if let Ok(upload_id) = UploadId::from_key(&id) {
                    out.push(MergingUpload {
                        upload_id,
                        since_ms: since as u64,
                        requeues: requeues.clamp(0, u32::MAX as i64) as u32,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn note_requeue(&self, id: &UploadId) -> Result<Option<u32>, StateError> {
        let id = id.clone();
        self.run(move |tx| {
            let changed = tx
                .execute(
                    "UPDATE uploads SET requeues = requeues + 1, requeued_at = ?2 \
                     WHERE id = ?1 AND state = 'merging'",
                    params![id.as_str(), now_ms() as i64],
                )
                .map_err(db_error)?;
            if changed == 0 {
                return Ok(None);
            }
            let n: i64 = tx
                .query_row(
                    "SELECT requeues FROM uploads WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .map_err(db_error)?;
            Ok(Some(n.clamp(0, u32::MAX as i64) as u32))
        })
        .await
    }

    async fn begin_merge(&self, id: &UploadId, ttl_ms: u64) -> Result<MergeStart, StateError> {
        let id = id.clone();
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = id.as_str();
            purge_expired(tx, key, now)?;
            let Some(head) = read_head(tx, key)? else {
                return Err(StateError::NotFound);
            };
            match head.state {
                UploadState::Completed => return Ok(MergeStart::AlreadyCompleted),
                UploadState::Merging => {}
                other => return Ok(MergeStart::NotMerging(other)),
            }
            tx.execute(
                "UPDATE uploads SET fence = fence + 1, merge_bytes_done = 0, expires_at = MAX(expires_at, ?2) WHERE id = ?1",
                params![key, now + int(ttl_ms)],
            )
            .map_err(db_error)?;
            let (fence, metadata, created_at): (i64, String, i64) = tx
                .query_row(
                    "SELECT fence, metadata, created_at FROM uploads WHERE id = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(db_error)?;
            let mut stmt = tx
                .prepare_cached(
                    "SELECT idx, offset, len, crc32c, md5, token FROM parts WHERE upload_id = ?1 ORDER BY idx",
                )
                .map_err(db_error)?;
            let chunks = stmt
                .query_map([key], part_from_row)
                .map_err(db_error)?
                .map(|r| r.map(to_record))
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_error)?;
            let metadata = match metadata.as_str() {
                "" => None,
                json => match serde_json::from_str(json) {
                    Ok(serde_json::Value::Object(map)) => Some(map),
                    _ => return Err(StateError::Corrupt("metadata is not a JSON object".into())),
                },
            };
            Ok(MergeStart::Ready(Box::new(MergePlan {
                fence: fence as u64,
                upload: NewUpload {
                    id: id.clone(),
                    geometry: head.geometry,
                    filename: Some(head.filename).filter(|s| !s.is_empty()),
                    file_md5: Md5::parse(&head.file_md5),
                    metadata,
                    created_at_ms: created_at as u64,
                    assembly: head.assembly,
                    callback_url: None,
                    callback_secret: None,
                },
                chunks,
            })))
        })
        .await
    }

    async fn report_merge_progress(
        &self,
        id: &UploadId,
        fence: u64,
        bytes_done: u64,
    ) -> Result<(), StateError> {
        let id = id.clone();
        self.run(move |tx| {
            tx.execute(
                "UPDATE uploads SET merge_bytes_done = ?3 WHERE id = ?1 AND fence = ?2 AND state = 'merging'",
                params![id.as_str(), int(fence), int(bytes_done)],
            )
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn commit_merge(
        &self,
        id: &UploadId,
        fence: u64,
        result: &Completion,
        completed_event: &OutboxMessage,
    ) -> Result<Committed, StateError> {
        let (id, result, completed_event) = (id.clone(), result.clone(), completed_event.clone());
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = id.as_str();
            purge_expired(tx, key, now)?;
            let Some(head) = read_head(tx, key)? else {
                return Err(StateError::NotFound);
            };
            match head.state {
                UploadState::Completed => {
                    let event_id: Option<String> = tx
                        .query_row("SELECT completed_event_id FROM uploads WHERE id = ?1", [key], |r| r.get(0))
                        .map_err(db_error)?;
                    return Ok(Committed::Already { event_id: event_id.unwrap_or_default() });
                }
                UploadState::Merging => {}
                other => return Err(Conflict::NotMerging(other).into()),
            }
            let current: i64 = tx
                .query_row("SELECT fence FROM uploads WHERE id = ?1", [key], |r| r.get(0))
                .map_err(db_error)?;
            if current != int(fence) {
                return Err(Conflict::Fenced.into());
            }
            tx.execute(
                "UPDATE uploads SET state = 'completed', size = ?2, md5 = ?3, location = ?4, \
                 completed_event_id = ?5, completed_at = ?6, updated_at = ?6, merge_bytes_done = ?2, \
                 expires_at = ?7, crc32c = ?8, sha256 = ?9, composite_md5 = ?10 WHERE id = ?1",
                params![
                    key,
                    int(result.size),
                    result.md5.to_hex(),
                    result.location,
                    result.event_id,
                    result.completed_at_ms as i64,
                    // Kept until deleted or past its retention (the janitor's call).
                    i64::MAX,
                    result.crc32c.map(i64::from),
                    result.sha256.map(|d| d.to_hex()),
                    result.composite_md5.map(|d| d.to_string()),
                ],
            )
            .map_err(db_error)?;
            drop_merge_triggers(tx, key)?;
            push_outbox(tx, key, &completed_event)?;
            Ok(Committed::Now)
        })
        .await
    }

    async fn fail_merge(
        &self,
        id: &UploadId,
        fence: Option<u64>,
        reason: &str,
        event_id: &str,
        failed_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Failed, StateError> {
        let (id, reason, event_id, failed_event) = (
            id.clone(),
            reason.to_owned(),
            event_id.to_owned(),
            failed_event.clone(),
        );
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = id.as_str();
            purge_expired(tx, key, now)?;
            let Some(head) = read_head(tx, key)? else {
                return Err(StateError::NotFound);
            };
            if head.state != UploadState::Merging {
                return Ok(Failed::NotMerging(head.state));
            }
            if let Some(fence) = fence {
                let current: i64 = tx
                    .query_row("SELECT fence FROM uploads WHERE id = ?1", [key], |r| {
                        r.get(0)
                    })
                    .map_err(db_error)?;
                if current != int(fence) {
                    return Err(Conflict::Fenced.into());
                }
            }
            tx.execute(
                "UPDATE uploads SET state = 'failed', failure_reason = ?2, failed_event_id = ?3, \
                 failed_at = ?4, updated_at = ?4, expires_at = ?5 WHERE id = ?1",
                params![key, reason, event_id, now, now + int(ttl_ms)],
            )
            .map_err(db_error)?;
            drop_merge_triggers(tx, key)?;
            push_outbox(tx, key, &failed_event)?;
            Ok(Failed::Now)
        })
        .await
    }

    async fn counted_chunks(&self, id: &UploadId) -> Result<Vec<ChunkRecord>, StateError> {
        let id = id.clone();
        self.run(move |tx| {
            purge_expired(tx, id.as_str(), now_ms() as i64)?;
            let mut stmt = tx
                .prepare_cached(
                    "SELECT idx, offset, len, crc32c, md5, token FROM parts WHERE upload_id = ?1 ORDER BY idx",
                )
                .map_err(db_error)?;
            stmt.query_map([id.as_str()], part_from_row)
                .map_err(db_error)?
                .map(|r| r.map(to_record))
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_error)
        })
        .await
    }

    async fn counted_run(
        &self,
        id: &UploadId,
        from: u64,
        max: usize,
    ) -> Result<Vec<ChunkRecord>, StateError> {
        let id = id.clone();
        let (Ok(from), Ok(max)) = (i64::try_from(from), i64::try_from(max)) else {
            return Ok(Vec::new());
        };
        let parts = self
            .run(move |tx| {
                purge_expired(tx, id.as_str(), now_ms() as i64)?;
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT idx, offset, len, crc32c, md5, token FROM parts WHERE upload_id = ?1 AND idx >= ?2 ORDER BY idx LIMIT ?3",
                    )
                    .map_err(db_error)?;
                stmt.query_map(params![id.as_str(), from, max], part_from_row)
                    .map_err(db_error)?
                    .map(|r| r.map(to_record))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_error)
            })
            .await?;
        // Up to the first index that is not counted.
        Ok(parts
            .into_iter()
            .zip(from as u64..=u64::MAX)
            .map_while(|(part, index)| (part.index.0 == index).then_some(part))
            .collect())
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.run(|tx| tx.query_row("SELECT 1", [], |_| Ok(())).map_err(db_error))
            .await
    }

    async fn restore_upload(
        &self,
        r: &Restoration,
        merge_job: &OutboxMessage,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Restored, StateError> {
        let (r, merge_job, created_event) = (r.clone(), merge_job.clone(), created_event.clone());
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = r.upload.id.as_str();
            purge_expired(tx, key, now)?;
            if read_head(tx, key)?.is_some() {
                return Ok(Restored::AlreadyKnown);
            }
            let g = r.upload.geometry;
            insert_upload(
                tx,
                &r.upload,
                r.upload.created_at_ms as i64,
                r.last_activity_ms as i64,
                int(ttl_ms).saturating_add(now - r.last_activity_ms as i64),
            )?;
            tx.execute(
                "UPDATE uploads SET fence = ?2 WHERE id = ?1",
                params![key, int(r.fence)],
            )
            .map_err(db_error)?;
            if let Some(c) = &r.completion {
                tx.execute(
                    "UPDATE uploads SET state = 'completed', size = ?2, md5 = ?3, location = ?4, \
                     completed_event_id = ?5, completed_at = ?6, merge_bytes_done = ?2, \
                     chunks_received = ?7, bytes_received = ?8, expires_at = ?9, \
                     crc32c = ?10, sha256 = ?11, composite_md5 = ?12 WHERE id = ?1",
                    params![
                        key,
                        int(c.size),
                        c.md5.to_hex(),
                        c.location,
                        c.event_id,
                        c.completed_at_ms as i64,
                        int(g.total_chunks),
                        int(g.total_size),
                        i64::MAX,
                        c.crc32c.map(i64::from),
                        c.sha256.map(|d| d.to_hex()),
                        c.composite_md5.map(|d| d.to_string()),
                    ],
                )
                .map_err(db_error)?;
                return Ok(Restored::Now(UploadState::Completed));
            }
            let mut bytes = 0u64;
            for chunk in &r.chunks {
                insert_part(tx, key, chunk)?;
                bytes += chunk.len;
            }
            let complete = g.total_size > 0
                && bytes == g.total_size
                && r.upload.assembly.merges_when_complete();
            let state = if complete || matches!(r.upload.assembly, Assembly::Concat { .. }) {
                UploadState::Merging
            } else {
                UploadState::Receiving
            };
            tx.execute(
                "UPDATE uploads SET state = ?2, chunks_received = ?3, bytes_received = ?4, \
                 merging_at = CASE WHEN ?2 = 'merging' THEN ?5 END, expires_at = ?6 WHERE id = ?1",
                params![
                    key,
                    state.as_str(),
                    r.chunks.len() as i64,
                    int(bytes),
                    now,
                    now + int(ttl_ms)
                ],
            )
            .map_err(db_error)?;
            push_outbox(tx, key, &created_event)?;
            if state == UploadState::Merging {
                push_outbox(tx, key, &merge_job)?;
            }
            Ok(Restored::Now(state))
        })
        .await
    }

    async fn expire_upload(
        &self,
        id: &UploadId,
        idle_before_ms: u64,
        expired_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Expired, StateError> {
        let (id, expired_event) = (id.clone(), expired_event.clone());
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = id.as_str();
            purge_expired(tx, key, now)?;
            let row: Option<(String, i64)> = tx
                .query_row(
                    "SELECT state, updated_at FROM uploads WHERE id = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db_error)?;
            match &row {
                Some((state, updated)) => {
                    let state: UploadState = state.parse().map_err(StateError::Corrupt)?;
                    let active = *updated >= int(idle_before_ms);
                    if matches!(state, UploadState::Merging | UploadState::Completed)
                        || (state != UploadState::Aborted && active)
                    {
                        return Ok(Expired::Kept(state));
                    }
                }
                None => {
                    // A tombstone of its own, with a geometry no chunk matches.
                    tx.execute(
                        "INSERT INTO uploads (id, state, total_size, chunk_size, total_chunks, \
                         created_at, updated_at, expires_at) VALUES (?1, 'aborted', 0, 0, 0, ?2, ?2, ?3)",
                        params![key, now, now + int(ttl_ms)],
                    )
                    .map_err(db_error)?;
                }
            }
            entomb(tx, key, now, ttl_ms, &expired_event)?;
            Ok(Expired::Now)
        })
        .await
    }

    async fn forget_upload(&self, id: &UploadId) -> Result<(), StateError> {
        let id = id.clone();
        self.run(move |tx| {
            let key = id.as_str();
            for sql in [
                "DELETE FROM parts WHERE upload_id = ?1",
                "DELETE FROM outbox WHERE upload_id = ?1",
                "DELETE FROM uploads WHERE id = ?1",
            ] {
                tx.execute(sql, [key]).map_err(db_error)?;
            }
            Ok(())
        })
        .await
    }

    async fn reopen_for_lost_chunks(
        &self,
        id: &UploadId,
        fence: u64,
        lost: &[ChunkIndex],
        lost_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Reopened, StateError> {
        let (id, lost, lost_event) = (id.clone(), lost.to_vec(), lost_event.clone());
        self.run(move |tx| {
            let now = now_ms() as i64;
            let key = id.as_str();
            purge_expired(tx, key, now)?;
            let Some(head) = read_head(tx, key)? else {
                return Err(StateError::NotFound);
            };
            if head.state != UploadState::Merging {
                return Ok(Reopened::NotMerging(head.state));
            }
            let current: i64 = tx
                .query_row("SELECT fence FROM uploads WHERE id = ?1", [key], |r| r.get(0))
                .map_err(db_error)?;
            if current != int(fence) {
                return Err(Conflict::Fenced.into());
            }
            for index in &lost {
                tx.execute(
                    "DELETE FROM parts WHERE upload_id = ?1 AND idx = ?2",
                    params![key, int(index.0)],
                )
                .map_err(db_error)?;
            }
            // The counters follow the records that are left, whatever they said before.
            let (chunks, bytes): (i64, i64) = tx
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(len), 0) FROM parts WHERE upload_id = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(db_error)?;
            tx.execute(
                "UPDATE uploads SET state = 'receiving', chunks_received = ?2, bytes_received = ?3, \
                 requeues = 0, requeued_at = NULL, merging_at = NULL, merge_bytes_done = NULL, \
                 updated_at = ?4, expires_at = ?5 WHERE id = ?1",
                params![key, chunks, bytes, now, now + int(ttl_ms)],
            )
            .map_err(db_error)?;
            drop_merge_triggers(tx, key)?;
            push_outbox(tx, key, &lost_event)?;
            Ok(Reopened::Now {
                chunks_received: chunks as u64,
                bytes_received: bytes as u64,
            })
        })
        .await
    }
}
