//! Rebuilding an upload's state from storage (invariant 9: storage is the truth, the state
//! store is the index).
//!
//! When the state store does not know an id that storage does — Redis restarted without
//! persistence, a failover to an empty replica, keys deleted by hand — the API, the worker
//! and the janitor rebuild the record from the upload's manifest, its complete chunk copies
//! and its completion record, in one atomic state-store operation, and go on: status lists
//! exactly the chunks on storage, a half-sent upload resumes, a complete one merges, a
//! completed file downloads. Concurrent rebuilds agree (the first wins), and the fencing
//! counter starts past every attempt storage knows of.

use std::sync::Arc;

use crate::events::Event;
use crate::id::UploadId;
use crate::metrics as m;
use crate::queue::{EventSink, OutboxMessage};
use crate::state::{OutboxEntry, Restoration, Restored, StateError, StateStore};
use crate::storage::{FsChunkStore, StorageError};
use crate::upload::UploadState;

/// Why a rebuild could not be done (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Rebuilds lost upload records from storage. Cheap to clone.
#[derive(Clone)]
pub struct Recovery {
    state: Arc<dyn StateStore>,
    storage: FsChunkStore,
    /// Where the `upload.created` a rebuild records goes at once (the outbox covers a
    /// failure).
    events: Arc<dyn EventSink>,
    /// The TTL of a rebuilt upload that is not completed (`uploads.ttl`).
    ttl_ms: u64,
}

impl Recovery {
    pub fn new(
        state: Arc<dyn StateStore>,
        storage: FsChunkStore,
        events: Arc<dyn EventSink>,
        ttl_ms: u64,
    ) -> Self {
        Self {
            state,
            storage,
            events,
            ttl_ms,
        }
    }

    /// Makes sure the state store knows `id` if storage does: rebuilds its record when it is
    /// missing. Returns whether storage knows the upload (false: there is nothing to rebuild,
    /// the id is unknown everywhere).
    pub async fn rebuild(&self, id: &UploadId) -> Result<bool, RecoveryError> {
        let Some(inventory) = self.storage.inventory(id).await? else {
            return Ok(false);
        };
        let restoration = Restoration {
            completion: inventory
                .completion
                .map(crate::storage::CompletionRecord::into_completion),
            upload: inventory.upload,
            chunks: inventory.chunks,
            fence: inventory.highest_fence,
            last_activity_ms: inventory.last_activity_ms,
        };
        let job = OutboxMessage::merge(id.clone());
        let created_event = Event::created(&restoration.upload);
        let created = OutboxMessage::event(&created_event);
        match self
            .state
            .restore_upload(&restoration, &job, &created, self.ttl_ms)
            .await?
        {
            Restored::Now(state) => {
                metrics::counter!(m::STATE_REBUILDS, "outcome" => "restored").increment(1);
                tracing::warn!(
                    upload_id = %id,
                    %state,
                    chunks = restoration.chunks.len(),
                    "the state store had lost this upload; rebuilt it from storage"
                );
                if state != UploadState::Completed
                    && self.events.publish_event(&created_event).await.is_ok()
                {
                    let entry = OutboxEntry::new(id.clone(), created);
                    let _ = self.state.clear_outbox_entry(&entry).await;
                }
            }
            Restored::AlreadyKnown => {
                metrics::counter!(m::STATE_REBUILDS, "outcome" => "already_known").increment(1);
            }
        }
        Ok(true)
    }
}
