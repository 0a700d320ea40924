//! Upload events: what applications learn about uploads, published on the
//! `<namespace>.events` topic exchange with the event type as routing key.
//!
//! `event_id` is fixed when the event's fact is committed (stored with the upload), so every
//! re-publish of the same fact — after a redelivery, a crash, a retry — carries the same id
//! and consumers can deduplicate on it.

use serde::{Deserialize, Serialize};

use crate::geometry::ChunkIndex;
use crate::upload::{NewUpload, UploadStatus};

/// The schema version of event bodies. Additive changes keep it; others bump it.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "upload.created")]
    Created,
    #[serde(rename = "upload.completed")]
    Completed,
    #[serde(rename = "upload.failed")]
    Failed,
    #[serde(rename = "upload.aborted")]
    Aborted,
    #[serde(rename = "upload.expired")]
    Expired,
    /// A completed upload removed because its retention (`uploads.completed_retention`)
    /// passed.
    #[serde(rename = "upload.deleted")]
    Deleted,
    #[serde(rename = "upload.chunks_lost")]
    ChunksLost,
}

impl EventKind {
    /// The routing key on the events exchange.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Self::Created => "upload.created",
            Self::Completed => "upload.completed",
            Self::Failed => "upload.failed",
            Self::Aborted => "upload.aborted",
            Self::Expired => "upload.expired",
            Self::Deleted => "upload.deleted",
            Self::ChunksLost => "upload.chunks_lost",
        }
    }

    /// Every kind, for configuration checks and documentation.
    pub const ALL: [EventKind; 7] = [
        Self::Created,
        Self::Completed,
        Self::Failed,
        Self::Aborted,
        Self::Expired,
        Self::Deleted,
        Self::ChunksLost,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.routing_key() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub schema_version: u32,
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When the fact was committed (RFC 3339).
    pub occurred_at: String,
    pub upload: EventUpload,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventUpload {
    /// The upload's id as its client knows it (scoped to `tenant`).
    pub id: String,
    /// The upload's owner. Events written before tenants existed read as `default`.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub state: String,
    pub filename: Option<String>,
    pub size: u64,
    /// MD5 of the merged file (hex), for `upload.completed`.
    pub md5: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Where to fetch the file, for `upload.completed`.
    pub download_url: Option<String>,
    /// Why the upload failed, for `upload.failed`.
    pub failure_reason: Option<String>,
    /// The chunks storage lost, for `upload.chunks_lost`: no longer counted, to be sent
    /// again. Absent from the other events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_chunks: Option<Vec<u64>>,
    /// CRC32C of the merged file (8 hex digits), for `upload.completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<String>,
    /// SHA-256 of the merged file (hex), for `upload.completed` when `uploads.file_digest`
    /// includes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The S3-style composite MD5 of the parts (`<hex>-<parts>`), for `upload.completed` when
    /// every part was received with an MD5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composite_md5: Option<String>,
}

/// The whole-file digests beyond MD5 of a completion, as events and status views write them:
/// `(crc32c, sha256, composite_md5)`.
pub fn digest_fields(
    done: &crate::upload::Completion,
) -> (Option<String>, Option<String>, Option<String>) {
    (
        done.crc32c.map(crate::digest::crc32c_hex),
        done.sha256.map(|d| d.to_hex()),
        done.composite_md5.map(|d| d.to_string()),
    )
}

fn default_tenant() -> String {
    crate::id::Tenant::DEFAULT.to_owned()
}

impl EventUpload {
    /// The upload this event is about, as storage and the state store name it.
    pub fn upload_id(&self) -> Option<crate::id::UploadId> {
        let tenant = crate::id::Tenant::parse(&self.tenant).ok()?;
        crate::id::UploadId::new(&tenant, &self.id).ok()
    }
}

/// The download URL of an upload: absolute under `public_url` when configured.
pub fn download_url(public_url: Option<&str>, id: &str) -> String {
    match public_url {
        Some(base) => format!("{}/files/{id}", base.trim_end_matches('/')),
        None => format!("/files/{id}"),
    }
}

pub fn rfc3339(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

impl Event {
    /// The `upload.completed` event of a completed upload; `None` if it is not completed.
    pub fn completed(status: &UploadStatus, public_url: Option<&str>) -> Option<Self> {
        let done = status.completion.as_ref()?;
        let (crc32c, sha256, composite_md5) = digest_fields(done);
        Some(Self {
            schema_version: SCHEMA_VERSION,
            event_id: done.event_id.clone(),
            kind: EventKind::Completed,
            occurred_at: rfc3339(done.completed_at_ms),
            upload: EventUpload {
                id: status.id.name().to_owned(),
                tenant: status.id.tenant().to_string(),
                state: status.state.to_string(),
                filename: status.filename.clone(),
                size: done.size,
                md5: Some(done.md5.to_hex()),
                metadata: status.metadata.clone(),
                download_url: Some(download_url(public_url, status.id.name())),
                failure_reason: None,
                lost_chunks: None,
                crc32c,
                sha256,
                composite_md5,
            },
        })
    }

    /// The `upload.completed` event of a merge about to commit (it goes into the commit's
    /// outbox, so it is published even if the worker dies right after the commit).
    pub fn completed_from(
        upload: &NewUpload,
        done: &crate::upload::Completion,
        public_url: Option<&str>,
    ) -> Self {
        let (crc32c, sha256, composite_md5) = digest_fields(done);
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: done.event_id.clone(),
            kind: EventKind::Completed,
            occurred_at: rfc3339(done.completed_at_ms),
            upload: EventUpload {
                id: upload.id.name().to_owned(),
                tenant: upload.id.tenant().to_string(),
                state: "completed".into(),
                filename: upload.filename.clone(),
                size: done.size,
                md5: Some(done.md5.to_hex()),
                metadata: upload.metadata.clone(),
                download_url: Some(download_url(public_url, upload.id.name())),
                failure_reason: None,
                lost_chunks: None,
                crc32c,
                sha256,
                composite_md5,
            },
        }
    }

    /// The `upload.failed` event of a merge about to mark the upload failed (it goes into
    /// the same atomic step's outbox).
    pub fn failed_from(upload: &NewUpload, reason: &str, event_id: &str, at_ms: u64) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: event_id.to_owned(),
            kind: EventKind::Failed,
            occurred_at: rfc3339(at_ms),
            upload: EventUpload {
                id: upload.id.name().to_owned(),
                tenant: upload.id.tenant().to_string(),
                state: "failed".into(),
                filename: upload.filename.clone(),
                size: upload.geometry.total_size,
                md5: None,
                metadata: upload.metadata.clone(),
                download_url: None,
                failure_reason: Some(reason.to_owned()),
                lost_chunks: None,
                crc32c: None,
                sha256: None,
                composite_md5: None,
            },
        }
    }

    /// `upload.deleted`, for a completed upload removed when its retention passed. The id
    /// is derived from the upload, so a janitor repeating the removal gives the same id.
    pub fn deleted(upload: &NewUpload, size: u64, md5: &crate::digest::Md5) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: format!("evt_deleted_{}_{}", upload.id, upload.created_at_ms),
            kind: EventKind::Deleted,
            occurred_at: rfc3339(crate::now_ms()),
            upload: EventUpload {
                id: upload.id.name().to_owned(),
                tenant: upload.id.tenant().to_string(),
                state: "deleted".into(),
                filename: upload.filename.clone(),
                size,
                md5: Some(md5.to_hex()),
                metadata: upload.metadata.clone(),
                download_url: None,
                failure_reason: None,
                lost_chunks: None,
                crc32c: None,
                sha256: None,
                composite_md5: None,
            },
        }
    }

    /// The `upload.failed` event of a failed upload; `None` if it did not fail.
    pub fn failed(status: &UploadStatus) -> Option<Self> {
        let failure = status.failure.as_ref()?;
        Some(Self {
            schema_version: SCHEMA_VERSION,
            event_id: failure.event_id.clone(),
            kind: EventKind::Failed,
            occurred_at: rfc3339(failure.failed_at_ms),
            upload: EventUpload {
                id: status.id.name().to_owned(),
                tenant: status.id.tenant().to_string(),
                state: status.state.to_string(),
                filename: status.filename.clone(),
                size: status.geometry.total_size,
                md5: None,
                metadata: status.metadata.clone(),
                download_url: None,
                failure_reason: Some(failure.reason.clone()),
                lost_chunks: None,
                crc32c: None,
                sha256: None,
                composite_md5: None,
            },
        })
    }

    /// `upload.created`, for an upload just created (explicitly or by its first chunk). The
    /// id is derived from the upload (its manifest's creation time), so a rebuild from
    /// storage that records the creation again gives the same id, and consumers dedupe it.
    pub fn created(upload: &NewUpload) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: format!("evt_created_{}_{}", upload.id, upload.created_at_ms),
            kind: EventKind::Created,
            occurred_at: rfc3339(crate::now_ms()),
            upload: EventUpload {
                id: upload.id.name().to_owned(),
                tenant: upload.id.tenant().to_string(),
                state: "receiving".into(),
                filename: upload.filename.clone(),
                size: upload.geometry.total_size,
                md5: None,
                metadata: upload.metadata.clone(),
                download_url: None,
                failure_reason: None,
                lost_chunks: None,
                crc32c: None,
                sha256: None,
                composite_md5: None,
            },
        }
    }

    /// `upload.aborted`, from the upload's status just before the abort.
    pub fn aborted(status: &UploadStatus) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: new_event_id(),
            kind: EventKind::Aborted,
            occurred_at: rfc3339(crate::now_ms()),
            upload: EventUpload {
                id: status.id.name().to_owned(),
                tenant: status.id.tenant().to_string(),
                state: "aborted".into(),
                filename: status.filename.clone(),
                size: status.geometry.total_size,
                md5: None,
                metadata: status.metadata.clone(),
                download_url: None,
                failure_reason: None,
                lost_chunks: None,
                crc32c: None,
                sha256: None,
                composite_md5: None,
            },
        }
    }

    /// `upload.expired`, for an upload whose state expired (from its manifest). The id is
    /// derived from the upload, so the janitor re-publishing it gives the same id.
    pub fn expired(upload: &NewUpload) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: format!("evt_expired_{}_{}", upload.id, upload.created_at_ms),
            kind: EventKind::Expired,
            occurred_at: rfc3339(crate::now_ms()),
            upload: EventUpload {
                id: upload.id.name().to_owned(),
                tenant: upload.id.tenant().to_string(),
                state: "expired".into(),
                filename: upload.filename.clone(),
                size: upload.geometry.total_size,
                md5: None,
                metadata: upload.metadata.clone(),
                download_url: None,
                failure_reason: None,
                lost_chunks: None,
                crc32c: None,
                sha256: None,
                composite_md5: None,
            },
        }
    }

    /// `upload.chunks_lost`: a merge found that storage lost counted chunks of `upload` and
    /// put it back to `receiving` without them.
    pub fn chunks_lost(upload: &NewUpload, lost: &[ChunkIndex]) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: new_event_id(),
            kind: EventKind::ChunksLost,
            occurred_at: rfc3339(crate::now_ms()),
            upload: EventUpload {
                id: upload.id.name().to_owned(),
                tenant: upload.id.tenant().to_string(),
                state: "receiving".into(),
                filename: upload.filename.clone(),
                size: upload.geometry.total_size,
                md5: None,
                metadata: upload.metadata.clone(),
                download_url: None,
                failure_reason: None,
                lost_chunks: Some(lost.iter().map(|i| i.0).collect()),
                crc32c: None,
                sha256: None,
                composite_md5: None,
            },
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A fresh event id.
pub fn new_event_id() -> String {
    format!("evt_{}", uuid::Uuid::new_v4().simple())
}
