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
//! | `<ns>:{<id>}:outbox`   | list   | the merge trigger, written by the completing chunk  |
//!
//! Every key carries the upload's TTL, refreshed on activity.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, RedisError, Script, Value};

use super::{Aborted, Conflict, Created, Progress, Recorded, StateError, StateStore, UploadHeader};
use crate::config::RedisSettings;
use crate::digest::Md5;
use crate::geometry::Geometry;
use crate::id::UploadId;
use crate::now_ms;
use crate::upload::{ChunkRecord, NewUpload, UploadState, UploadStatus, bitmap_indices};

/// Names of an upload's keys.
pub mod keys {
    use crate::id::UploadId;

    pub fn meta(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:meta")
    }
    pub fn parts(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:parts")
    }
    pub fn bits(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:bits")
    }
    pub fn outbox(ns: &str, id: &UploadId) -> String {
        format!("{ns}:{{{id}}}:outbox")
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
    create_upload: Script,
    abort_upload: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        record_chunk: Script::new(include_str!("lua/record_chunk.lua")),
        create_upload: Script::new(include_str!("lua/create_upload.lua")),
        abort_upload: Script::new(include_str!("lua/abort_upload.lua")),
    })
}

impl RedisStateStore {
    /// Builds the pool. Connects lazily: a Redis that is down now makes requests fail with
    /// `Unavailable` (503) until it is back, instead of stopping the process.
    pub fn new(settings: &RedisSettings, namespace: &str) -> anyhow::Result<Self> {
        let timeout: Duration = settings.timeout.0;
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let manager = Manager::new_with_config(settings.url.expose(), connection)
            .map_err(|e| anyhow::anyhow!("STITCH__REDIS__URL is not a usable Redis URL: {e}"))?;
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()?;
        Ok(Self {
            pool,
            namespace: namespace.to_owned(),
            scripts: scripts(),
        })
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, StateError> {
        self.pool.get().await.map_err(|e| StateError::Unavailable {
            detail: format!("no Redis connection: {e}"),
            outcome_unknown: false,
        })
    }

    fn all_keys(&self, id: &UploadId) -> [String; 4] {
        let ns = &self.namespace;
        [
            keys::meta(ns, id),
            keys::parts(ns, id),
            keys::bits(ns, id),
            keys::outbox(ns, id),
        ]
    }
}

fn redis_error(e: RedisError) -> StateError {
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
            "state" => Conflict::NotReceiving(self.state(2)?),
            other => return Err(StateError::Corrupt(format!("unknown conflict {other:?}"))),
        })
    }
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
    async fn create_upload(&self, upload: &NewUpload, ttl_ms: u64) -> Result<Created, StateError> {
        let mut conn = self.connection().await?;
        let g = upload.geometry;
        let reply: Value = self
            .scripts
            .create_upload
            .key(keys::meta(&self.namespace, &upload.id))
            .arg(g.total_size)
            .arg(g.chunk_size)
            .arg(g.total_chunks)
            .arg(upload.filename.as_deref().unwrap_or(""))
            .arg(md5_arg(upload.file_md5))
            .arg(metadata_arg(upload))
            .arg(upload.created_at_ms)
            .arg(ttl_ms)
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
            ])
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let [state, total_size, chunk_size, total_chunks, file_md5] =
            <[Option<String>; 5]>::try_from(fields)
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
            file_md5: file_md5.as_deref().and_then(Md5::parse),
        }))
    }

    async fn record_chunk(
        &self,
        upload: &NewUpload,
        chunk: &ChunkRecord,
        ttl_ms: u64,
    ) -> Result<Recorded, StateError> {
        let mut conn = self.connection().await?;
        let g = upload.geometry;
        let md5 = md5_arg(chunk.md5);
        let entry = format!(
            "{}:{}:{}:{}:{}",
            chunk.offset, chunk.len, chunk.crc32c, md5, chunk.token
        );
        let job = serde_json::json!({
            "type": "merge",
            "version": 1,
            "upload_id": upload.id,
            "enqueued_at_ms": now_ms(),
        })
        .to_string();
        let mut invocation = self.scripts.record_chunk.prepare_invoke();
        for key in self.all_keys(&upload.id) {
            invocation.key(key);
        }
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
            .arg(job)
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
            })),
            "duplicate" => Ok(Recorded::Duplicate {
                progress: Progress {
                    state: reply.state(1)?,
                    chunks_received: reply.u64(2)?,
                    bytes_received: reply.u64(3)?,
                    completed_upload: false,
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
        Ok(Some(UploadStatus {
            id: id.clone(),
            state: state.parse().map_err(StateError::Corrupt)?,
            geometry,
            filename: optional(&meta, "filename"),
            file_md5: optional(&meta, "file_md5").as_deref().and_then(Md5::parse),
            metadata,
            created_at_ms: parse_u64_field(&meta, "created_at")?,
            updated_at_ms: parse_u64_field(&meta, "updated_at")?,
            bytes_received: parse_u64_field(&meta, "bytes_received")?,
            chunks_received: parse_u64_field(&meta, "chunks_received")?,
            uploaded_chunks: bitmap_indices(bits.as_deref().unwrap_or(&[]), geometry.total_chunks),
        }))
    }

    async fn abort_upload(&self, id: &UploadId, ttl_ms: u64) -> Result<Aborted, StateError> {
        let mut conn = self.connection().await?;
        let mut invocation = self.scripts.abort_upload.prepare_invoke();
        for key in self.all_keys(id) {
            invocation.key(key);
        }
        let reply: Value = invocation
            .arg(now_ms())
            .arg(ttl_ms)
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

    async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.connection().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_an_upload_shares_one_hash_tag() {
        let id = UploadId::parse("abc").unwrap();
        for key in [
            keys::meta("ns", &id),
            keys::parts("ns", &id),
            keys::bits("ns", &id),
            keys::outbox("ns", &id),
        ] {
            assert!(key.starts_with("ns:{abc}:"), "{key}");
        }
    }
}
