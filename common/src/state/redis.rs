//! [`StateStore`] over Redis: one Lua script per operation.
//!
//! Key layout (all keys of one upload share the hash tag `{<id>}`, so each script touches one
//! Redis Cluster slot and nothing needs atomicity across uploads):
//!
//! | key                    | type   | holds                                               |
//! |------------------------|--------|-----------------------------------------------------|
//! | `<ns>:{<id>}:meta`     | hash   | state, geometry, filename, MD5, counters, times     |
//! | `<ns>:{<id>}:parts`    | hash   | chunk index → `offset:len:crc32c:md5hex:token`      |
//! | `<ns>:{<id>}:bits`     | string | bitmap of received indices (fast status)            |
//! | `<ns>:{<id>}:outbox:merge`  | list | pending merge triggers (the completing chunk's) |
//! | `<ns>:{<id>}:outbox:events` | list | pending events                                  |
//!
//! Every key carries the upload's TTL, refreshed on activity. The outbox keeps each kind of
//! entry in a list of its own, so a script that drops the merge triggers deletes one key and
//! never looks inside an entry. An outbox of keyspace layout 1 (`<ns>:{<id>}:outbox`, both
//! kinds in one list) is converted by migration 0003, and by [`StateStore::pending_outbox`]
//! for one that an older process wrote after the migration.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, RedisError, Script, Value};

use super::{
    Aborted, Committed, Conflict, Created, Expired, Failed, MergePlan, MergeStart, MergingUpload,
    OutboxEntry, Progress, Recorded, Reopened, Restoration, Restored, StateError, StateStore,
    UploadHeader,
};
use crate::config::RedisSettings;
use crate::digest::{CompositeMd5, Md5, Sha256, crc32c_hex};
use crate::geometry::{ChunkIndex, Geometry};
use crate::id::UploadId;
use crate::now_ms;
use crate::queue::{OutboxKind, OutboxMessage};
use crate::upload::{
    Assembly, ChunkRecord, Completion, Failure, NewUpload, UploadState, UploadStatus,
    bitmap_indices,
};

/// Names of an upload's keys.
pub mod keys {
    use crate::id::UploadId;
    use crate::queue::OutboxKind;

    pub fn meta(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:meta")
    }
    pub fn parts(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:parts")
    }
    pub fn bits(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:bits")
    }
    /// The upload's pending entries of one kind (a list).
    pub fn outbox(ns: &str, id: &UploadId, kind: OutboxKind) -> String {
        match kind {
            OutboxKind::Merge => format!("{ns}:{{{id}}}:outbox:merge"),
            OutboxKind::Event => format!("{ns}:{{{id}}}:outbox:events"),
        }
    }
    /// The outbox of keyspace layout 1, both kinds in one list (see migration 0003).
    pub fn legacy_outbox(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:outbox")
    }
    /// The fencing counter of the upload's merges.
    pub fn fence(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:fence")
    }

    /// The id inside a key of this layout, if it is one.
    pub fn id_of(ns: &str, key: &str) -> Option<UploadId> {
        let rest = key.strip_prefix(ns)?.strip_prefix(":{")?;
        let (id, _) = rest.split_once("}:")?;
        UploadId::from_key(id).ok()
    }
}

/// The Redis state store. Cheap to clone (a pool handle).
#[derive(Clone)]
pub struct RedisStateStore {
    pool: Pool,
    namespace: String,
    scripts: &'static Scripts,
}

struct Scripts {
    record_chunk: Script,
    append_segment: Script,
    declare_length: Script,
    create_upload: Script,
    abort_upload: Script,
    begin_merge: Script,
    commit_merge: Script,
    fail_merge: Script,
    merge_progress: Script,
    note_requeue: Script,
    restore_upload: Script,
    expire_upload: Script,
    reopen_for_lost_chunks: Script,
    convert_legacy_outbox: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        record_chunk: Script::new(include_str!("lua/record_chunk.lua")),
        append_segment: Script::new(include_str!("lua/append_segment.lua")),
        declare_length: Script::new(include_str!("lua/declare_length.lua")),
        create_upload: Script::new(include_str!("lua/create_upload.lua")),
        abort_upload: Script::new(include_str!("lua/abort_upload.lua")),
        begin_merge: Script::new(include_str!("lua/begin_merge.lua")),
        commit_merge: Script::new(include_str!("lua/commit_merge.lua")),
        fail_merge: Script::new(include_str!("lua/fail_merge.lua")),
        merge_progress: Script::new(include_str!("lua/merge_progress.lua")),
        note_requeue: Script::new(include_str!("lua/note_requeue.lua")),
        restore_upload: Script::new(include_str!("lua/restore_upload.lua")),
        expire_upload: Script::new(include_str!("lua/expire_upload.lua")),
        reopen_for_lost_chunks: Script::new(include_str!("lua/reopen_for_lost_chunks.lua")),
        convert_legacy_outbox: Script::new(crate::migrate::TYPED_OUTBOX_STEP),
    })
}

impl RedisStateStore {
    /// Builds the pool. Connects lazily: a Redis that is down now makes requests fail with
    /// `Unavailable` (503) until it is back, instead of stopping the process.
    pub fn new(settings: &RedisSettings, namespace: &str) -> anyhow::Result<Self> {
        let pool = pool(
            settings.url.expose(),
            settings.pool_size,
            settings.timeout.0,
            "STITCH__REDIS__URL",
        )?;
        Ok(Self {
            pool,
            namespace: namespace.to_owned(),
            scripts: scripts(),
        })
    }

    /// The pool, for backends that share this Redis (the quota ledger).
    pub fn pool(&self) -> Pool {
        self.pool.clone()
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, StateError> {
        connection(&self.pool).await
    }

    /// Every key of the namespace of one kind (`meta`, `outbox`, …).
    async fn scan(
        &self,
        conn: &mut deadpool_redis::Connection,
        kind: &str,
    ) -> Result<Vec<String>, StateError> {
        scan_keys(conn, &format!("{}:{{*}}:{kind}", self.namespace)).await
    }

    /// The upload's record: meta, parts, bits and both outbox lists.
    fn all_keys(&self, id: &UploadId) -> [String; 5] {
        let ns = &self.namespace;
        [
            keys::meta(ns, id),
            keys::parts(ns, id),
            keys::bits(ns, id),
            keys::outbox(ns, id, OutboxKind::Merge),
            keys::outbox(ns, id, OutboxKind::Event),
        ]
    }

    /// The keys of a script that drops the merge triggers and writes `event`: meta, parts,
    /// bits, merge triggers, the list `event` goes to.
    fn keys_writing(&self, id: &UploadId, event: &OutboxMessage) -> [String; 5] {
        let ns = &self.namespace;
        [
            keys::meta(ns, id),
            keys::parts(ns, id),
            keys::bits(ns, id),
            keys::outbox(ns, id, OutboxKind::Merge),
            self.outbox_key(id, event),
        ]
    }

    /// `create_upload.lua`: an upload, or a concatenation (merging as it is created, with
    /// `merge_job` in its outbox).
    async fn create(
        &self,
        upload: &NewUpload,
        created_event: &OutboxMessage,
        merge_job: Option<&OutboxMessage>,
        ttl_ms: u64,
    ) -> Result<Created, StateError> {
        let mut conn = self.connection().await?;
        let g = upload.geometry;
        let (assembly, concat_parts) = upload.assembly.to_stored();
        let reply: Value = self
            .scripts
            .create_upload
            .key(keys::meta(&self.namespace, &upload.id))
            .key(self.outbox_key(&upload.id, created_event))
            .key(keys::outbox(&self.namespace, &upload.id, OutboxKind::Merge))
            .arg(g.total_size)
            .arg(g.chunk_size)
            .arg(g.total_chunks)
            .arg(upload.filename.as_deref().unwrap_or(""))
            .arg(md5_arg(upload.file_md5))
            .arg(metadata_arg(upload))
            .arg(upload.created_at_ms)
            .arg(ttl_ms)
            .arg(created_event.to_stored())
            .arg(upload.callback_url.as_deref().unwrap_or(""))
            .arg(upload.callback_secret.as_deref().unwrap_or(""))
            .arg(assembly)
            .arg(concat_parts)
            .arg(merge_job.map(OutboxMessage::to_stored).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "created" => Ok(Created::New),
            "exists" => Ok(Created::AlreadyExists),
            "conflict" => Err(reply.conflict()?.into()),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }

    /// Where `message` goes in `id`'s outbox: the list of its kind.
    fn outbox_key(&self, id: &UploadId, message: &OutboxMessage) -> String {
        keys::outbox(&self.namespace, id, message.kind())
    }

    /// Moves the entries of outboxes in the layout-1 form (written by a process older than
    /// migration 0003, after it ran) into the typed lists, with the migration's own script.
    async fn convert_legacy_outboxes(
        &self,
        conn: &mut deadpool_redis::Connection,
    ) -> Result<(), StateError> {
        for key in self.scan(conn, "outbox").await? {
            let Some(id) = keys::id_of(&self.namespace, &key) else {
                continue;
            };
            let ns = &self.namespace;
            let (merges, events, unreadable): (u64, u64, u64) = self
                .scripts
                .convert_legacy_outbox
                .key(&key)
                .key(keys::outbox(ns, &id, OutboxKind::Merge))
                .key(keys::outbox(ns, &id, OutboxKind::Event))
                .arg(ns)
                .invoke_async(conn)
                .await
                .map_err(redis_error)?;
            if merges + events > 0 {
                tracing::info!(upload_id = %id, merges, events, "converted an outbox written in the layout-1 form");
            }
            if unreadable > 0 {
                tracing::error!(upload_id = %id, unreadable, key, "outbox entries of unknown kind kept in the layout-1 list");
            }
        }
        Ok(())
    }
}

/// A connection from `pool`; none is `Unavailable` (nothing was sent).
pub(crate) async fn connection(pool: &Pool) -> Result<deadpool_redis::Connection, StateError> {
    pool.get().await.map_err(|e| {
        crate::metrics::backend_error("redis");
        StateError::Unavailable {
            detail: format!("no Redis connection: {e}"),
            outcome_unknown: false,
        }
    })
}

/// A connection pool with every wait bounded by `timeout`, so that an unreachable Redis
/// fails requests quickly instead of hanging them.
pub(crate) fn pool(url: &str, size: usize, timeout: Duration, key: &str) -> anyhow::Result<Pool> {
    let connection = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let manager = Manager::new_with_config(url, connection)
        .map_err(|e| anyhow::anyhow!("{key} is not a usable Redis URL: {e}"))?;
    Ok(Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(Runtime::Tokio1)
        .build()?)
}

/// Every key matching `pattern`, by SCAN: cheap per call and safe on a busy server. Under
/// Redis Cluster this runs per node.
pub(crate) async fn scan_keys(
    conn: &mut deadpool_redis::Connection,
    pattern: &str,
) -> Result<Vec<String>, StateError> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        out.extend(batch);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

pub(crate) fn redis_error(e: RedisError) -> StateError {
    crate::metrics::backend_error("redis");
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        StateError::Unavailable {
            outcome_unknown: !e.is_connection_refusal(),
            detail: e.to_string(),
        }
    } else {
        StateError::Corrupt(e.to_string())
    }
}

fn md5_arg(md5: Option<Md5>) -> String {
    md5.map(|m| m.to_hex()).unwrap_or_default()
}

fn metadata_arg(upload: &NewUpload) -> String {
    upload
        .metadata
        .as_ref()
        .map(|m| serde_json::Value::Object(m.clone()).to_string())
        .unwrap_or_default()
}

/// A script reply: a flat array of strings and integers.
struct Reply(Vec<Value>);

impl Reply {
    fn parse(value: Value) -> Result<Self, StateError> {
        match value {
            Value::Array(items) => Ok(Self(items)),
            other => Err(StateError::Corrupt(format!(
                "unexpected script reply {other:?}"
            ))),
        }
    }

    fn str(&self, i: usize) -> Result<String, StateError> {
        match self.0.get(i) {
            Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(Value::SimpleString(s)) => Ok(s.clone()),
            Some(Value::Int(n)) => Ok(n.to_string()),
            other => Err(StateError::Corrupt(format!("reply item {i} is {other:?}"))),
        }
    }

    fn u64(&self, i: usize) -> Result<u64, StateError> {
        let s = self.str(i)?;
        s.parse()
            .map_err(|_| StateError::Corrupt(format!("reply item {i} is not a number: {s:?}")))
    }

    fn state(&self, i: usize) -> Result<UploadState, StateError> {
        self.str(i)?.parse().map_err(StateError::Corrupt)
    }

    /// Decodes the conflict replies shared by the scripts.
    /// The reply of `append_segment.lua` and `declare_length.lua`: `{"recorded", state,
    /// chunks_received, bytes_received, completed}`, `{"missing"}` or a conflict.
    fn segment_progress(&self) -> Result<Progress, StateError> {
        match self.str(0)?.as_str() {
            "recorded" => Ok(Progress {
                state: self.state(1)?,
                chunks_received: self.u64(2)?,
                bytes_received: self.u64(3)?,
                completed_upload: self.u64(4)? == 1,
                created_upload: false,
            }),
            "missing" => Err(StateError::NotFound),
            "conflict" => Err(self.conflict()?.into()),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }

    fn conflict(&self) -> Result<Conflict, StateError> {
        Ok(match self.str(1)?.as_str() {
            "geometry" => Conflict::Geometry {
                existing: Geometry {
                    total_size: self.u64(2)?,
                    chunk_size: self.u64(3)?,
                    total_chunks: self.u64(4)?,
                },
            },
            "file_md5" => Conflict::FileMd5,
            "fenced" => Conflict::Fenced,
            "state" => Conflict::NotReceiving(self.state(2)?),
            "assembly" => Conflict::Assembly,
            "offset" => Conflict::Offset {
                current: self.u64(2)?,
            },
            "past_end" => Conflict::PastEnd { size: self.u64(2)? },
            "length" => Conflict::Length {
                current: self.u64(2)?,
                received: self.u64(3)?,
            },
            other => return Err(StateError::Corrupt(format!("unknown conflict {other:?}"))),
        })
    }
}

/// Encodes a parts entry `offset:len:crc32c:md5hex:token`.
fn part_entry(chunk: &ChunkRecord) -> String {
    format!(
        "{}:{}:{}:{}:{}",
        chunk.offset,
        chunk.len,
        chunk.crc32c,
        md5_arg(chunk.md5),
        chunk.token
    )
}

/// Decodes a parts entry `offset:len:crc32c:md5hex:token`.
fn parse_part(index: u64, entry: &str) -> Result<ChunkRecord, StateError> {
    let corrupt = || StateError::Corrupt(format!("chunk entry {index} is malformed: {entry:?}"));
    let mut fields = entry.splitn(5, ':');
    let mut next = || fields.next().ok_or_else(corrupt);
    let offset = next()?.parse().map_err(|_| corrupt())?;
    let len = next()?.parse().map_err(|_| corrupt())?;
    let crc32c = next()?.parse().map_err(|_| corrupt())?;
    let md5 = match next()? {
        "" => None,
        hex => Some(Md5::parse(hex).ok_or_else(corrupt)?),
    };
    let token = next()?.to_owned();
    Ok(ChunkRecord {
        index: ChunkIndex(index),
        offset,
        len,
        crc32c,
        md5,
        token,
    })
}

fn parse_u64_field(
    map: &std::collections::HashMap<String, String>,
    field: &str,
) -> Result<u64, StateError> {
    map.get(field).and_then(|v| v.parse().ok()).ok_or_else(|| {
        StateError::Corrupt(format!("meta field {field} is missing or not a number"))
    })
}

fn optional(map: &std::collections::HashMap<String, String>, field: &str) -> Option<String> {
    map.get(field).filter(|v| !v.is_empty()).cloned()
}

#[async_trait]
impl StateStore for RedisStateStore {
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
        let mut conn = self.connection().await?;
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys::meta(&self.namespace, id))
            .arg(&[
                "state",
                "total_size",
                "chunk_size",
                "total_chunks",
                "file_md5",
                "assembly",
                "concat_parts",
            ])
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let [
            state,
            total_size,
            chunk_size,
            total_chunks,
            file_md5,
            assembly,
            concat_parts,
        ] = <[Option<String>; 7]>::try_from(fields)
            .map_err(|_| StateError::Corrupt("HMGET returned the wrong arity".into()))?;
        let Some(state) = state else {
            return Ok(None);
        };
        let number = |v: Option<String>, name: &str| {
            v.and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| StateError::Corrupt(format!("meta field {name} is not a number")))
        };
        Ok(Some(UploadHeader {
            state: state.parse().map_err(StateError::Corrupt)?,
            geometry: Geometry {
                total_size: number(total_size, "total_size")?,
                chunk_size: number(chunk_size, "chunk_size")?,
                total_chunks: number(total_chunks, "total_chunks")?,
            },
            assembly: Assembly::from_stored(
                assembly.as_deref().unwrap_or(""),
                concat_parts.as_deref().unwrap_or(""),
            )
            .map_err(StateError::Corrupt)?,
            file_md5: file_md5.as_deref().and_then(Md5::parse),
        }))
    }

    async fn record_chunk(
        &self,
        upload: &NewUpload,
        chunk: &ChunkRecord,
        merge_job: &OutboxMessage,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Recorded, StateError> {
        let mut conn = self.connection().await?;
        let g = upload.geometry;
        let md5 = md5_arg(chunk.md5);
        let entry = part_entry(chunk);
        let ns = &self.namespace;
        let mut invocation = self.scripts.record_chunk.prepare_invoke();
        invocation
            .key(keys::meta(ns, &upload.id))
            .key(keys::parts(ns, &upload.id))
            .key(keys::bits(ns, &upload.id))
            .key(self.outbox_key(&upload.id, merge_job))
            .key(self.outbox_key(&upload.id, created_event));
        let reply: Value = invocation
            .arg(chunk.index.0)
            .arg(entry)
            .arg(chunk.offset)
            .arg(chunk.len)
            .arg(chunk.crc32c)
            .arg(md5)
            .arg(g.total_size)
            .arg(g.chunk_size)
            .arg(g.total_chunks)
            .arg(upload.filename.as_deref().unwrap_or(""))
            .arg(md5_arg(upload.file_md5))
            .arg(metadata_arg(upload))
            .arg(now_ms())
            .arg(ttl_ms)
            .arg(merge_job.to_stored())
            .arg(created_event.to_stored())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "recorded" => Ok(Recorded::New(Progress {
                state: reply.state(1)?,
                chunks_received: reply.u64(2)?,
                bytes_received: reply.u64(3)?,
                completed_upload: reply.u64(4)? == 1,
                created_upload: reply.u64(5)? == 1,
            })),
            "duplicate" => Ok(Recorded::Duplicate {
                progress: Progress {
                    state: reply.state(1)?,
                    chunks_received: reply.u64(2)?,
                    bytes_received: reply.u64(3)?,
                    completed_upload: false,
                    created_upload: false,
                },
                counted_token: reply.str(4)?,
            }),
            "conflict" if reply.str(1)? == "chunk" => {
                Err(Conflict::ChunkContent(chunk.index).into())
            }
            "conflict" => Err(reply.conflict()?.into()),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }

    async fn append_segment(
        &self,
        id: &UploadId,
        segment: &ChunkRecord,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Progress, StateError> {
        let mut conn = self.connection().await?;
        let ns = &self.namespace;
        let reply: Value = self
            .scripts
            .append_segment
            .key(keys::meta(ns, id))
            .key(keys::parts(ns, id))
            .key(self.outbox_key(id, merge_job))
            .arg(part_entry(segment))
            .arg(segment.offset)
            .arg(segment.len)
            .arg(now_ms())
            .arg(ttl_ms)
            .arg(merge_job.to_stored())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Reply::parse(reply)?.segment_progress()
    }

    async fn declare_length(
        &self,
        id: &UploadId,
        length: u64,
        merge_job: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Progress, StateError> {
        let mut conn = self.connection().await?;
        let reply: Value = self
            .scripts
            .declare_length
            .key(keys::meta(&self.namespace, id))
            .key(self.outbox_key(id, merge_job))
            .arg(length)
            .arg(now_ms())
            .arg(ttl_ms)
            .arg(merge_job.to_stored())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Reply::parse(reply)?.segment_progress()
    }

    async fn upload_status(&self, id: &UploadId) -> Result<Option<UploadStatus>, StateError> {
        let mut conn = self.connection().await?;
        let (meta, bits): (std::collections::HashMap<String, String>, Option<Vec<u8>>) =
            redis::pipe()
                .atomic()
                .hgetall(keys::meta(&self.namespace, id))
                .get(keys::bits(&self.namespace, id))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
        let Some(state) = meta.get("state") else {
            return Ok(None);
        };
        let geometry = Geometry {
            total_size: parse_u64_field(&meta, "total_size")?,
            chunk_size: parse_u64_field(&meta, "chunk_size")?,
            total_chunks: parse_u64_field(&meta, "total_chunks")?,
        };
        let metadata = match optional(&meta, "metadata") {
            None => None,
            Some(json) => match serde_json::from_str(&json) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                _ => return Err(StateError::Corrupt("metadata is not a JSON object".into())),
            },
        };
        let assembly = Assembly::from_stored(
            meta.get("assembly").map_or("", String::as_str),
            meta.get("concat_parts").map_or("", String::as_str),
        )
        .map_err(StateError::Corrupt)?;
        // Only chunks have indices a client resumes by.
        let uploaded_chunks = match assembly {
            Assembly::Chunks => {
                bitmap_indices(bits.as_deref().unwrap_or(&[]), geometry.total_chunks)
            }
            _ => Vec::new(),
        };
        Ok(Some(UploadStatus {
            id: id.clone(),
            state: state.parse().map_err(StateError::Corrupt)?,
            geometry,
            assembly,
            filename: optional(&meta, "filename"),
            file_md5: optional(&meta, "file_md5").as_deref().and_then(Md5::parse),
            metadata,
            callback_url: optional(&meta, "callback_url"),
            callback_secret: optional(&meta, "callback_secret"),
            created_at_ms: parse_u64_field(&meta, "created_at")?,
            updated_at_ms: parse_u64_field(&meta, "updated_at")?,
            bytes_received: parse_u64_field(&meta, "bytes_received")?,
            chunks_received: parse_u64_field(&meta, "chunks_received")?,
            uploaded_chunks,
            merge_bytes_done: optional(&meta, "merge_bytes_done").and_then(|v| v.parse().ok()),
            completion: match optional(&meta, "md5") {
                Some(md5) => Some(Completion {
                    size: parse_u64_field(&meta, "size")?,
                    md5: Md5::parse(&md5)
                        .ok_or_else(|| StateError::Corrupt("md5 is not a digest".into()))?,
                    crc32c: optional(&meta, "crc32c")
                        .and_then(|v| u32::from_str_radix(&v, 16).ok()),
                    sha256: optional(&meta, "sha256").as_deref().and_then(Sha256::parse),
                    composite_md5: optional(&meta, "composite_md5")
                        .as_deref()
                        .and_then(CompositeMd5::parse),
                    location: optional(&meta, "location").unwrap_or_default(),
                    completed_at_ms: parse_u64_field(&meta, "completed_at")?,
                    event_id: optional(&meta, "completed_event_id").unwrap_or_default(),
                }),
                None => None,
            },
            failure: match optional(&meta, "failure_reason") {
                Some(reason) => Some(Failure {
                    reason,
                    failed_at_ms: parse_u64_field(&meta, "failed_at")?,
                    event_id: optional(&meta, "failed_event_id").unwrap_or_default(),
                }),
                None => None,
            },
        }))
    }

    async fn abort_upload(
        &self,
        id: &UploadId,
        aborted_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Aborted, StateError> {
        let mut conn = self.connection().await?;
        let mut invocation = self.scripts.abort_upload.prepare_invoke();
        for key in self.keys_writing(id, aborted_event) {
            invocation.key(key);
        }
        let reply: Value = invocation
            .arg(now_ms())
            .arg(ttl_ms)
            .arg(aborted_event.to_stored())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "missing" => Err(StateError::NotFound),
            "already" => Ok(Aborted::Already),
            "aborted" => Ok(Aborted::Now {
                previous: reply.state(1)?,
            }),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }

    async fn clear_outbox_entry(&self, entry: &OutboxEntry) -> Result<(), StateError> {
        let mut conn = self.connection().await?;
        let _: i64 = redis::cmd("LREM")
            .arg(keys::outbox(
                &self.namespace,
                &entry.upload_id,
                entry.kind(),
            ))
            .arg(1)
            .arg(entry.stored())
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn pending_outbox(&self, older_than_ms: u64) -> Result<Vec<OutboxEntry>, StateError> {
        let mut conn = self.connection().await?;
        self.convert_legacy_outboxes(&mut conn).await?;
        let mut out = Vec::new();
        for (kind, suffix) in [
            (OutboxKind::Merge, "outbox:merge"),
            (OutboxKind::Event, "outbox:events"),
        ] {
            for key in self.scan(&mut conn, suffix).await? {
                let Some(upload_id) = keys::id_of(&self.namespace, &key) else {
                    continue;
                };
                let entries: Vec<String> = redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                for stored in entries {
                    match OutboxEntry::from_stored(upload_id.clone(), kind, stored) {
                        Ok(entry) if entry.enqueued_at_ms() < older_than_ms => out.push(entry),
                        Ok(_) => {}
                        // Nothing can publish it; keep it visible rather than dropping it.
                        Err(e) => {
                            tracing::error!(upload_id = %upload_id, key, error = %e, "unreadable outbox entry")
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    async fn stuck_merges(&self, older_than_ms: u64) -> Result<Vec<MergingUpload>, StateError> {
        let mut conn = self.connection().await?;
        let metas = self.scan(&mut conn, "meta").await?;
        let mut out = Vec::new();
        for batch in metas.chunks(500) {
            let mut pipe = redis::pipe();
            for key in batch {
                pipe.cmd("HMGET").arg(key).arg(&[
                    "state",
                    "merging_at",
                    "requeued_at",
                    "requeues",
                    "merge_started_at",
                ]);
            }
            let rows: Vec<Vec<Option<String>>> =
                pipe.query_async(&mut conn).await.map_err(redis_error)?;
            for (key, row) in batch.iter().zip(rows) {
                if row.first().and_then(|s| s.as_deref()) != Some("merging") {
                    continue;
                }
                let number = |i: usize| {
                    row.get(i)
                        .and_then(|v| v.as_deref())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                // The last sign of life: entering merging, the last attempt, the last requeue.
                let since_ms = number(1).max(number(2)).max(number(4));
                if since_ms < older_than_ms
                    && let Some(upload_id) = keys::id_of(&self.namespace, key)
                {
                    out.push(MergingUpload {
                        upload_id,
                        since_ms,
                        requeues: number(3).min(u32::MAX as u64) as u32,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn note_requeue(&self, id: &UploadId) -> Result<Option<u32>, StateError> {
        let mut conn = self.connection().await?;
        let count: i64 = self
            .scripts
            .note_requeue
            .key(keys::meta(&self.namespace, id))
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok((count >= 0).then(|| count.min(u32::MAX as i64) as u32))
    }

    async fn begin_merge(&self, id: &UploadId, ttl_ms: u64) -> Result<MergeStart, StateError> {
        let mut conn = self.connection().await?;
        let ns = &self.namespace;
        let reply: Value = self
            .scripts
            .begin_merge
            .key(keys::meta(ns, id))
            .key(keys::parts(ns, id))
            .key(keys::fence(ns, id))
            .arg(now_ms())
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "missing" => return Err(StateError::NotFound),
            "completed" => return Ok(MergeStart::AlreadyCompleted),
            "state" => return Ok(MergeStart::NotMerging(reply.state(1)?)),
            "merging" => {}
            other => return Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
        let geometry = Geometry {
            total_size: reply.u64(2)?,
            chunk_size: reply.u64(3)?,
            total_chunks: reply.u64(4)?,
        };
        let metadata = match reply.str(7)? {
            json if json.is_empty() => None,
            json => match serde_json::from_str(&json) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                _ => return Err(StateError::Corrupt("metadata is not a JSON object".into())),
            },
        };
        let upload = NewUpload {
            id: id.clone(),
            geometry,
            filename: Some(reply.str(5)?).filter(|s| !s.is_empty()),
            file_md5: Md5::parse(&reply.str(6)?),
            metadata,
            created_at_ms: reply.u64(8)?,
            assembly: Assembly::from_stored(&reply.str(9)?, &reply.str(10)?)
                .map_err(StateError::Corrupt)?,
            callback_url: None,
            callback_secret: None,
        };
        let mut chunks = Vec::with_capacity((reply.0.len() - 11) / 2);
        let mut i = 11;
        while i + 1 < reply.0.len() {
            chunks.push(parse_part(reply.u64(i)?, &reply.str(i + 1)?)?);
            i += 2;
        }
        chunks.sort_by_key(|c| c.index);
        Ok(MergeStart::Ready(Box::new(MergePlan {
            fence: reply.u64(1)?,
            upload,
            chunks,
        })))
    }

    async fn report_merge_progress(
        &self,
        id: &UploadId,
        fence: u64,
        bytes_done: u64,
    ) -> Result<(), StateError> {
        let mut conn = self.connection().await?;
        let _: i64 = self
            .scripts
            .merge_progress
            .key(keys::meta(&self.namespace, id))
            .key(keys::fence(&self.namespace, id))
            .arg(fence)
            .arg(bytes_done)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn commit_merge(
        &self,
        id: &UploadId,
        fence: u64,
        result: &Completion,
        completed_event: &OutboxMessage,
    ) -> Result<Committed, StateError> {
        let mut conn = self.connection().await?;
        let ns = &self.namespace;
        let reply: Value = self
            .scripts
            .commit_merge
            .key(keys::meta(ns, id))
            .key(keys::fence(ns, id))
            .key(keys::parts(ns, id))
            .key(keys::outbox(ns, id, OutboxKind::Merge))
            .key(self.outbox_key(id, completed_event))
            .key(keys::bits(ns, id))
            .arg(fence)
            .arg(result.size)
            .arg(result.md5.to_hex())
            .arg(&result.location)
            .arg(&result.event_id)
            .arg(result.completed_at_ms)
            .arg(completed_event.to_stored())
            .arg(digest_args(Some(result)).as_slice())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "committed" => Ok(Committed::Now),
            "completed" => Ok(Committed::Already {
                event_id: reply.str(1)?,
            }),
            "missing" => Err(StateError::NotFound),
            "fenced" => Err(Conflict::Fenced.into()),
            "state" => Err(Conflict::NotMerging(reply.state(1)?).into()),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
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
        let mut conn = self.connection().await?;
        let ns = &self.namespace;
        let reply: Value = self
            .scripts
            .fail_merge
            .key(keys::meta(ns, id))
            .key(keys::fence(ns, id))
            .key(keys::outbox(ns, id, OutboxKind::Merge))
            .key(self.outbox_key(id, failed_event))
            .arg(fence.map(|f| f.to_string()).unwrap_or_default())
            .arg(reason)
            .arg(event_id)
            .arg(now_ms())
            .arg(ttl_ms)
            .arg(failed_event.to_stored())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "failed" => Ok(Failed::Now),
            "state" => Ok(Failed::NotMerging(reply.state(1)?)),
            "missing" => Err(StateError::NotFound),
            "fenced" => Err(Conflict::Fenced.into()),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }

    async fn counted_chunks(&self, id: &UploadId) -> Result<Vec<ChunkRecord>, StateError> {
        let mut conn = self.connection().await?;
        let parts: std::collections::HashMap<u64, String> = redis::cmd("HGETALL")
            .arg(keys::parts(&self.namespace, id))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut out = parts
            .into_iter()
            .map(|(index, entry)| parse_part(index, &entry))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|c| c.index);
        Ok(out)
    }

    async fn counted_run(
        &self,
        id: &UploadId,
        from: u64,
        max: usize,
    ) -> Result<Vec<ChunkRecord>, StateError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.connection().await?;
        let entries: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys::parts(&self.namespace, id))
            .arg((from..=u64::MAX).take(max).collect::<Vec<u64>>())
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        entries
            .iter()
            .zip(from..=u64::MAX)
            .map_while(|(entry, index)| entry.as_deref().map(|e| parse_part(index, e)))
            .collect()
    }

    /// Redis answers, and the namespace's schema still fits this build: a pod whose schema a
    /// breaking migration has moved past stops being ready (and gets no traffic) instead of
    /// touching data it no longer understands.
    async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.connection().await?;
        let (version, compatible_from): (Option<u32>, Option<u32>) = redis::cmd("HMGET")
            .arg(crate::migrate::schema_key(&self.namespace))
            .arg("version")
            .arg("compatible_from")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let schema = crate::migrate::SchemaState {
            version: version.unwrap_or(0),
            compatible_from: compatible_from.unwrap_or(0),
        };
        match schema.incompatibility() {
            None => Ok(()),
            Some(why) => Err(StateError::Unavailable {
                detail: format!("incompatible schema: {why}"),
                outcome_unknown: false,
            }),
        }
    }

    async fn restore_upload(
        &self,
        r: &Restoration,
        merge_job: &OutboxMessage,
        created_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Restored, StateError> {
        let mut conn = self.connection().await?;
        let (u, g) = (&r.upload, r.upload.geometry);
        let ns = &self.namespace;
        let mut invocation = self.scripts.restore_upload.prepare_invoke();
        invocation
            .key(keys::meta(ns, &u.id))
            .key(keys::parts(ns, &u.id))
            .key(keys::bits(ns, &u.id))
            .key(self.outbox_key(&u.id, merge_job))
            .key(self.outbox_key(&u.id, created_event))
            .key(keys::fence(ns, &u.id))
            .arg(g.total_size)
            .arg(g.chunk_size)
            .arg(g.total_chunks)
            .arg(u.filename.as_deref().unwrap_or(""))
            .arg(md5_arg(u.file_md5))
            .arg(metadata_arg(u))
            .arg(u.created_at_ms)
            .arg(u.callback_url.as_deref().unwrap_or(""))
            .arg(u.callback_secret.as_deref().unwrap_or(""))
            .arg(now_ms())
            .arg(ttl_ms)
            .arg(r.fence)
            .arg(r.last_activity_ms)
            .arg(merge_job.to_stored());
        match &r.completion {
            Some(c) => invocation
                .arg(1)
                .arg(c.size)
                .arg(c.md5.to_hex())
                .arg(&c.location)
                .arg(c.completed_at_ms)
                .arg(&c.event_id),
            None => invocation.arg(0).arg(0).arg("").arg("").arg(0).arg(""),
        };
        invocation.arg(created_event.to_stored());
        invocation.arg(digest_args(r.completion.as_ref()).as_slice());
        let (assembly, concat_parts) = u.assembly.to_stored();
        invocation
            .arg(assembly)
            .arg(concat_parts)
            .arg(u8::from(u.assembly.merges_when_complete()));
        for chunk in &r.chunks {
            invocation
                .arg(chunk.index.0)
                .arg(part_entry(chunk))
                .arg(chunk.len);
        }
        let reply: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "restored" => Ok(Restored::Now(reply.state(1)?)),
            "exists" => Ok(Restored::AlreadyKnown),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }

    async fn expire_upload(
        &self,
        id: &UploadId,
        idle_before_ms: u64,
        expired_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Expired, StateError> {
        let mut conn = self.connection().await?;
        let mut invocation = self.scripts.expire_upload.prepare_invoke();
        for key in self.keys_writing(id, expired_event) {
            invocation.key(key);
        }
        let reply: Value = invocation
            .arg(idle_before_ms)
            .arg(now_ms())
            .arg(ttl_ms)
            .arg(expired_event.to_stored())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "expired" => Ok(Expired::Now),
            "kept" => Ok(Expired::Kept(reply.state(1)?)),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }

    async fn forget_upload(&self, id: &UploadId) -> Result<(), StateError> {
        let mut conn = self.connection().await?;
        let mut keys = self.all_keys(id).to_vec();
        keys.push(keys::fence(&self.namespace, id));
        keys.push(keys::legacy_outbox(&self.namespace, id));
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn reopen_for_lost_chunks(
        &self,
        id: &UploadId,
        fence: u64,
        lost: &[ChunkIndex],
        lost_event: &OutboxMessage,
        ttl_ms: u64,
    ) -> Result<Reopened, StateError> {
        let mut conn = self.connection().await?;
        let ns = &self.namespace;
        let mut invocation = self.scripts.reopen_for_lost_chunks.prepare_invoke();
        invocation
            .key(keys::meta(ns, id))
            .key(keys::fence(ns, id))
            .key(keys::parts(ns, id))
            .key(keys::bits(ns, id))
            .key(keys::outbox(ns, id, OutboxKind::Merge))
            .key(self.outbox_key(id, lost_event))
            .arg(fence)
            .arg(lost_event.to_stored())
            .arg(now_ms())
            .arg(ttl_ms);
        for index in lost {
            invocation.arg(index.0);
        }
        let reply: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let reply = Reply::parse(reply)?;
        match reply.str(0)?.as_str() {
            "reopened" => Ok(Reopened::Now {
                chunks_received: reply.u64(1)?,
                bytes_received: reply.u64(2)?,
            }),
            "state" => Ok(Reopened::NotMerging(reply.state(1)?)),
            "missing" => Err(StateError::NotFound),
            "fenced" => Err(Conflict::Fenced.into()),
            other => Err(StateError::Corrupt(format!("unknown reply {other:?}"))),
        }
    }
}

/// The whole-file digests beyond MD5 as script arguments (crc32c, sha256, composite MD5), each
/// `""` when absent: the scripts store only the ones present, so an older hash simply lacks
/// them.
fn digest_args(completion: Option<&Completion>) -> [String; 3] {
    let c = completion;
    [
        c.and_then(|c| c.crc32c).map(crc32c_hex).unwrap_or_default(),
        c.and_then(|c| c.sha256)
            .map(|d| d.to_hex())
            .unwrap_or_default(),
        c.and_then(|c| c.composite_md5)
            .map(|d| d.to_string())
            .unwrap_or_default(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_recovered_from_keys_of_the_namespace_only() {
        let id = UploadId::parse("a-b_c").unwrap();
        for kind in [OutboxKind::Merge, OutboxKind::Event] {
            assert_eq!(
                keys::id_of("ns", &keys::outbox("ns", &id, kind)),
                Some(id.clone())
            );
            assert_eq!(keys::id_of("other", &keys::outbox("ns", &id, kind)), None);
        }
        assert_eq!(
            keys::id_of("ns", &keys::legacy_outbox("ns", &id)),
            Some(id.clone())
        );
        assert_eq!(keys::id_of("ns", "ns:{../x}:meta"), None);
    }

    #[test]
    fn part_entries_parse_with_and_without_md5() {
        let p = parse_part(3, "3000:1000:12345::abcdef").unwrap();
        assert_eq!(
            (p.offset, p.len, p.crc32c, p.md5, p.token.as_str()),
            (3000, 1000, 12345, None, "abcdef")
        );
        let p = parse_part(0, "0:5:1:9e107d9d372bb6826bd81d3542a419d6:t").unwrap();
        assert!(p.md5.is_some());
        assert!(parse_part(0, "0:5").is_err());
        assert!(parse_part(0, "x:5:1::t").is_err());
    }

    #[test]
    fn every_key_of_an_upload_shares_one_hash_tag() {
        let id = UploadId::parse("abc").unwrap();
        for key in [
            keys::meta("ns", &id),
            keys::parts("ns", &id),
            keys::bits("ns", &id),
            keys::outbox("ns", &id, OutboxKind::Merge),
            keys::outbox("ns", &id, OutboxKind::Event),
            keys::legacy_outbox("ns", &id),
            keys::fence("ns", &id),
        ] {
            assert!(key.starts_with("ns:{abc}:"), "{key}");
        }
    }
}
