//! The janitor: removes what no upload needs any more, deciding from storage only.
//!
//! Storage is the truth for what was received, the state store the index (invariant 9), so
//! nothing is ever deleted because the state store does not know an id: an upload the state
//! store lost is rebuilt from storage first (see `stitch_common::recovery`). Each pass walks
//! `uploads/` on shared storage:
//!
//! | storage shows | the janitor |
//! |---|---|
//! | a completion record, retention not passed (or none configured) | keeps the file and its status; removes chunk copies and other attempts' files |
//! | a completion record past `uploads.completed_retention` | publishes `upload.deleted`, removes the manifest (no rebuild can bring it back), forgets the state, removes the directory |
//! | no completion, not every chunk, no activity on storage for `uploads.ttl` | expires it in the state store (a tombstone that refuses later chunks, atomically with any chunk being recorded), publishes `upload.expired`, removes the directory |
//! | active, or every chunk there (it merges) | removes copies nothing counts and temporary files |
//! | aborted in the state store | removes the directory (the abort could not) |
//! | failed in the state store | keeps everything until it was idle for `uploads.ttl`, for diagnosis |
//!
//! Nothing younger than `janitor.grace` is touched: a copy being written, or between its
//! rename and its record, is in use. Several janitors may run; each removal is idempotent.
//!
//! After the walk, the quota reservations older than the grace that no step confirmed are
//! looked at: one whose upload has no manifest belongs to a creation that died between its
//! reservation and its manifest (nothing on storage names it, so the walk cannot find it), and
//! is released. Should a creation have outlived the grace and write its manifest after all,
//! the next pass tracks the upload again.

use std::sync::Arc;
use std::time::Duration;

use stitch_common::backends::Backends;
use stitch_common::config::Settings;
use stitch_common::events::Event;
use stitch_common::id::UploadId;
use stitch_common::lock::{LockName, MergeLock};
use stitch_common::queue::{EventSink, OutboxMessage};
use stitch_common::quota::QuotaLedger;
use stitch_common::recovery::Recovery;
use stitch_common::state::{Expired, OutboxEntry, StateStore};
use stitch_common::storage::{FsChunkStore, Inventory, Keep};
use stitch_common::upload::UploadState;
use tokio::sync::watch;

pub struct Janitor {
    pub state: Arc<dyn StateStore>,
    /// The quota ledger, which every pass brings in line with storage.
    pub quotas: Arc<dyn QuotaLedger>,
    pub storage: FsChunkStore,
    pub events: Arc<dyn EventSink>,
    /// Taken for each pass, so that one janitor of the fleet walks the storage at a time.
    pub lock: Arc<dyn MergeLock>,
    /// Rebuilds the state of uploads the state store lost, before anything is decided.
    pub recovery: Recovery,
    pub interval: Duration,
    pub grace: Duration,
    /// `uploads.ttl`: an upload idle on storage this long, not completed, is abandoned.
    pub ttl: Duration,
    /// `uploads.completed_retention`; `None`: completed files are kept until deleted.
    pub completed_retention: Option<Duration>,
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired: Vec<String>,
    /// Completed uploads removed because their retention passed.
    pub deleted: Vec<String>,
    pub files_removed: usize,
    /// Quota reservations released because their upload never reached storage.
    pub reservations_released: usize,
}

impl Janitor {
    /// The janitor of `backends`, as `settings` configure it (`janitor.interval` and
    /// `janitor.grace`, `uploads.ttl`, `uploads.completed_retention`).
    pub fn new(backends: &Backends, settings: &Settings) -> Self {
        Self {
            state: backends.state.clone(),
            quotas: backends.quotas.clone(),
            storage: backends.storage.clone(),
            events: backends.events.clone(),
            lock: backends.lock.clone(),
            recovery: Recovery::new(
                backends.state.clone(),
                backends.storage.clone(),
                backends.events.clone(),
                settings.uploads.ttl.0.as_millis() as u64,
            ),
            interval: settings.janitor.interval.0,
            grace: settings.janitor.grace.0,
            ttl: settings.uploads.ttl.0,
            completed_retention: settings.uploads.completed_retention.map(|r| r.0),
        }
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.pass().await {
                Ok(None) => tracing::debug!("another janitor is sweeping"),
                Ok(Some(swept)) if swept != Swept::default() => {
                    tracing::info!(
                        expired = swept.expired.len(),
                        deleted = swept.deleted.len(),
                        files = swept.files_removed,
                        reservations = swept.reservations_released,
                        "janitor pass"
                    );
                }
                Ok(Some(_)) => {}
                Err(e) => tracing::warn!(error = %e, "janitor pass incomplete"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass under the janitor lock ([`LockName::Janitor`]); `None` when another janitor
    /// holds it. The lease is not renewed: a pass that outlives it may overlap the next
    /// holder's, which only repeats idempotent work.
    pub async fn pass(&self) -> anyhow::Result<Option<Swept>> {
        let Some(lease) = self.lock.try_acquire(&LockName::Janitor).await? else {
            return Ok(None);
        };
        let swept = self.sweep_once().await;
        if let Err(e) = self.lock.release(&lease).await {
            tracing::debug!(error = %e, "janitor lock not released; it expires");
        }
        swept.map(Some)
    }

    pub async fn sweep_once(&self) -> anyhow::Result<Swept> {
        let mut swept = Swept::default();
        // Only directories named by an upload id: never touch what we did not create.
        for id in self.storage.upload_ids().await? {
            if let Err(e) = self.tend(&id, &mut swept).await {
                tracing::warn!(upload_id = %id, error = %e, "janitor skipped an upload");
            }
        }
        self.release_stranded_reservations(&mut swept).await?;
        Ok(swept)
    }

    /// Releases the reservations older than the grace whose upload has no manifest: their
    /// creation died before writing it. Those with a manifest are left to the next walk,
    /// whose `track` confirms them.
    async fn release_stranded_reservations(&self, swept: &mut Swept) -> anyhow::Result<()> {
        let before = stitch_common::now_ms().saturating_sub(self.grace.as_millis() as u64);
        for id in self.quotas.unconfirmed(before).await? {
            if self.storage.read_manifest(&id).await?.is_none() {
                self.quotas.release(&id).await?;
                tracing::info!(upload_id = %id, "released a quota reservation whose upload never reached storage");
                swept.reservations_released += 1;
                metrics::counter!(stitch_common::metrics::QUOTA_RESERVATIONS_RELEASED).increment(1);
            }
        }
        Ok(())
    }

    async fn tend(&self, id: &UploadId, swept: &mut Swept) -> anyhow::Result<()> {
        let Some(inventory) = self.storage.inventory(id).await? else {
            // No manifest: a first chunk whose upload was never created (the manifest comes
            // before the state store's record), or the leftovers of a removal.
            if self.storage.untouched_for(id, self.grace).await? {
                self.quotas.release(id).await?;
                self.storage.remove_upload(id).await?;
                self.removed(swept, 1);
            }
            return Ok(());
        };
        if inventory.completion.is_some() {
            return self.tend_completed(id, &inventory, swept).await;
        }
        // Not completed on storage. The state store must know it before anything is decided
        // (it is rebuilt from storage if it was lost).
        self.recovery.rebuild(id).await?;
        let Some(header) = self.state.upload_header(id).await? else {
            anyhow::bail!("the state store does not know the upload even after a rebuild");
        };
        let now = stitch_common::now_ms();
        let ttl_ms = self.ttl.as_millis() as u64;
        let idle = now.saturating_sub(inventory.last_activity_ms) >= ttl_ms;
        let stored: u64 = inventory.chunks.iter().map(|c| c.len).sum();
        // A complete partial upload waits for its concatenation, for as long as any idle
        // upload is kept.
        let every_chunk = stored == inventory.upload.geometry.total_size
            && !inventory.upload.geometry.is_deferred()
            && inventory.upload.assembly.merges_when_complete();
        let abandoned = match header.state {
            UploadState::Receiving => idle && !every_chunk,
            UploadState::Failed => idle,
            UploadState::Aborted => {
                self.quotas.release(id).await?;
                self.storage.remove_upload(id).await?;
                self.removed(swept, 1);
                return Ok(());
            }
            UploadState::Merging | UploadState::Completed => false,
        };
        if abandoned {
            let idle_before = now.saturating_sub(ttl_ms);
            let event = Event::expired(&inventory.upload);
            let outboxed = OutboxMessage::event(&event);
            if let Expired::Now = self
                .state
                .expire_upload(id, idle_before, &outboxed, ttl_ms)
                .await?
            {
                // In the tombstone's outbox already: the sweeper publishes it if this fails.
                if self.events.publish_event(&event).await.is_ok() {
                    let entry = OutboxEntry::new(id.clone(), outboxed);
                    let _ = self.state.clear_outbox_entry(&entry).await;
                }
                self.quotas.release(id).await?;
                self.storage.remove_upload(id).await?;
                swept.expired.push(id.to_string());
                stitch_common::metrics::transition("expired");
                self.removed(swept, 1);
            }
            return Ok(());
        }
        // In use. The ledger holds what storage holds: a reservation the API's crash or a
        // lost Redis dropped is made again (never refused: the upload exists), a failed
        // upload's slot is freed.
        let active = header.state != UploadState::Failed;
        match inventory.upload.geometry.is_deferred() {
            // Its length still open, it keeps the reservation of its largest size, or at
            // least what it received.
            true => self.quotas.track_growing(id, stored, active).await?,
            false => {
                let size = inventory.upload.quota_bytes_until_complete();
                self.quotas.track(id, size, active).await?;
            }
        }
        self.unless_gone(id).await?;
        // Only copies nothing counts go, once past the grace.
        let counted = self.state.counted_chunks(id).await?;
        let removed = self
            .storage
            .remove_surplus(
                id,
                Keep::Counted(&inventory.upload.assembly, &counted),
                self.grace,
            )
            .await?;
        self.removed(swept, removed);
        Ok(())
    }

    /// Takes back an entry just made again for an upload that a concurrent DELETE
    /// removed meanwhile (its manifest is gone, or its state says aborted): otherwise
    /// nothing would ever release it.
    async fn unless_gone(&self, id: &UploadId) -> anyhow::Result<()> {
        let aborted = matches!(
            self.state.upload_header(id).await?,
            Some(h) if h.state == UploadState::Aborted
        );
        if aborted || self.storage.read_manifest(id).await?.is_none() {
            self.quotas.release(id).await?;
        }
        Ok(())
    }

    /// A completed upload: kept until its retention passes; its chunks and the files of
    /// other attempts go.
    async fn tend_completed(
        &self,
        id: &UploadId,
        inventory: &Inventory,
        swept: &mut Swept,
    ) -> anyhow::Result<()> {
        let Some(done) = &inventory.completion else {
            return Ok(());
        };
        let now = stitch_common::now_ms();
        if let Some(retention) = self.completed_retention
            && done
                .completed_at_ms
                .saturating_add(retention.as_millis() as u64)
                <= now
        {
            self.events
                .publish_event(&Event::deleted(&inventory.upload, done.size, &done.md5))
                .await?;
            // The manifest first, so that nothing can rebuild the upload; then its state;
            // then its files.
            self.storage.remove_manifest(id).await?;
            self.state.forget_upload(id).await?;
            self.quotas.release(id).await?;
            self.storage.remove_upload(id).await?;
            swept.deleted.push(id.to_string());
            stitch_common::metrics::transition("deleted");
            self.removed(swept, 1);
            return Ok(());
        }
        // Kept: the ledger counts its file, not a slot.
        self.quotas.track(id, done.size, false).await?;
        self.unless_gone(id).await?;
        let removed = self
            .storage
            .remove_surplus(id, Keep::Completed(done), self.grace)
            .await?;
        self.removed(swept, removed);
        Ok(())
    }

    fn removed(&self, swept: &mut Swept, n: usize) {
        swept.files_removed += n;
        metrics::counter!(stitch_common::metrics::JANITOR_FILES_REMOVED).increment(n as u64);
    }
}
