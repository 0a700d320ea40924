//! Per-tenant quotas: how many uploads a tenant has active and how many bytes it keeps.
//!
//! The [`QuotaLedger`] holds one entry per upload of a tenant, in the tenant's own slot (under
//! Redis Cluster: one hash tag per tenant), apart from the upload's keys. A reservation is the
//! consuming step: it checks the tenant's limits and records the upload in one atomic
//! operation, so two pods racing for a tenant's last slot cannot both pass. It is made before
//! the upload exists (before its manifest and its first chunk), so a refused upload stores
//! nothing.
//!
//! Entries are per upload and every operation is idempotent, so repeating one (a retried
//! request, a rebuild from storage, a janitor pass) never counts an upload twice:
//! - [`QuotaLedger::reserve`]: the upload is created — a slot and its declared bytes;
//! - [`QuotaLedger::settle`]: it completed or failed — the slot is freed, its bytes stay;
//! - [`QuotaLedger::release`]: it is gone (aborted, expired, deleted) — everything is freed;
//! - [`QuotaLedger::track`]: the janitor's repair — the entry becomes what storage says
//!   (after a lost Redis, or a crash between a state change and its ledger step);
//!   [`QuotaLedger::track_growing`] the same for an upload whose length is still open, which
//!   holds the largest size it may reach until it declares one.
//!
//! A reservation stays *unconfirmed*, with the time it was made, until one of the later
//! steps names its upload. The API's creation writes the upload's manifest right after its
//! reservation; should the API die in between, nothing on storage names the upload, so no
//! walk of storage could find it: the janitor asks [`QuotaLedger::unconfirmed`] for the
//! reservations older than `janitor.grace` and releases each whose upload has no manifest.

mod redis;

use async_trait::async_trait;

pub use self::redis::RedisQuotaLedger;
use crate::config::Quotas;
use crate::id::{Tenant, UploadId};
use crate::state::StateError;

/// Result of a successful [`QuotaLedger::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// This call made the reservation.
    New,
    /// The upload already held one; nothing changed.
    Held,
}

/// Why a reservation was refused (nothing changed), or that the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("the tenant has {active} active uploads; its limit is {limit}")]
    ActiveUploads { active: u64, limit: u64 },
    #[error("the tenant keeps {stored} bytes; {requested} more would pass its limit of {limit}")]
    StoredBytes {
        stored: u64,
        requested: u64,
        limit: u64,
    },
    #[error(transparent)]
    Backend(#[from] StateError),
}

/// What a tenant uses now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub active_uploads: u64,
    pub stored_bytes: u64,
}

/// The ledger of what each tenant's uploads hold. Implementations: Redis (one Lua script per
/// operation, all of a tenant's keys in one slot) and SQLite (one transaction).
#[async_trait]
pub trait QuotaLedger: Send + Sync {
    /// Reserves an active slot and `bytes` for `upload` in its tenant, if `limits` allow
    /// both — atomically against every other reservation of the tenant. Reserving for an
    /// upload that holds a reservation (active or settled) changes nothing and succeeds.
    async fn reserve(
        &self,
        upload: &UploadId,
        bytes: u64,
        limits: &Quotas,
    ) -> Result<Reservation, QuotaError>;

    /// The upload stopped being active (completed or failed): its slot is freed; its bytes,
    /// still kept on storage, become `bytes`. No effect on an upload without a reservation.
    async fn settle(&self, upload: &UploadId, bytes: u64) -> Result<(), StateError>;

    /// The upload is gone: its slot and its bytes are freed. Idempotent.
    async fn release(&self, upload: &UploadId) -> Result<(), StateError>;

    /// Makes the ledger hold `bytes` for `upload`, active or not, whatever it held before
    /// and whatever the limits: the upload exists on storage. Idempotent.
    async fn track(&self, upload: &UploadId, bytes: u64, active: bool) -> Result<(), StateError>;

    /// [`track`](Self::track) for an upload whose length is still open (tus
    /// `Upload-Defer-Length`): makes its entry hold at least the `received` bytes, keeping one
    /// that holds more (its reservation of the largest size it may reach). Idempotent.
    async fn track_growing(
        &self,
        upload: &UploadId,
        received: u64,
        active: bool,
    ) -> Result<(), StateError>;

    /// What `tenant` uses now.
    async fn usage(&self, tenant: &Tenant) -> Result<Usage, StateError>;

    /// The uploads, of every tenant, whose reservation was made before `before_ms` (ms since
    /// the epoch) and no later step ([`settle`](Self::settle), [`release`](Self::release),
    /// [`track`](Self::track)) has named since: creations still under way, or interrupted
    /// between the reservation and the manifest. Read without a lock: a step may confirm one
    /// meanwhile.
    async fn unconfirmed(&self, before_ms: u64) -> Result<Vec<UploadId>, StateError>;
}
