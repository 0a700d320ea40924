//! The per-upload merge lock: leases that expire, used together with a fencing token (see
//! `StateStore::begin_merge`).
//!
//! A lease is taken with a random token; renewal and release compare the token, so only the
//! holder can extend or drop it. A lease can still lapse while its holder is paused (GC,
//! SIGSTOP, a network partition): that is what the fencing token is for. The holder measures
//! its lease on the monotonic clock ([`Lease::is_valid`]) and stops acting when it may have
//! lapsed; the commit additionally checks the fence, so a holder that paused right after its
//! last check still cannot overwrite a newer result.
//!
//! A lease is taken on a [`LockName`], what it locks; each implementation builds its own
//! keys from it, so no caller knows how a lock is stored.
//!
//! [`RedisLock`] is Redlock-style over one or more independent Redis nodes.

mod redis;

use std::time::{Duration, Instant};

use crate::id::UploadId;

pub use self::redis::RedisLock;

/// What a lease locks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LockName {
    /// One upload's merge: one worker of the fleet merges it at a time.
    Merge(UploadId),
    /// The janitor's pass over storage: one janitor of the fleet sweeps at a time.
    Janitor,
    /// Appending to one upload of segments (a tus PATCH): one request of the fleet at a time.
    Append(UploadId),
    /// Assembling one upload's in-order prefix while its chunks arrive: one API of the fleet
    /// at a time (two would only do the same work twice).
    Assemble(UploadId),
}

impl std::fmt::Display for LockName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Merge(id) => write!(f, "merge of {id}"),
            Self::Janitor => f.write_str("janitor pass"),
            Self::Append(id) => write!(f, "append to {id}"),
            Self::Assemble(id) => write!(f, "assembly of {id}"),
        }
    }
}

/// A lock failure that is not "someone else holds it".
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock backend unavailable: {0}")]
    Unavailable(String),
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    name: LockName,
    token: String,
    valid_until: Instant,
}

impl Lease {
    /// A lease on `name` held with `token`, valid until `valid_until` on the monotonic clock.
    pub fn new(name: LockName, token: String, valid_until: Instant) -> Self {
        Self {
            name,
            token,
            valid_until,
        }
    }

    /// What the lease locks.
    pub fn name(&self) -> &LockName {
        &self.name
    }

    /// A fresh random token.
    pub fn new_token() -> String {
        format!("{:032x}", rand::random::<u128>())
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether the lease certainly has not lapsed yet (monotonic clock, drift allowed for).
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// Moves the lease's end after a successful renewal.
    pub fn extend_to(&mut self, valid_until: Instant) {
        self.valid_until = valid_until;
    }
}

/// Leases on [`LockName`]s. Implementations must make acquire, renew and release atomic per
/// name, and let only the token's holder renew or release.
#[async_trait::async_trait]
pub trait MergeLock: Send + Sync + 'static {
    /// The lease length.
    fn ttl(&self) -> Duration;

    /// Tries to take the lease on `name`; `None` when it is not granted: another holder has it,
    /// or (Redlock) too few nodes answered to form a quorum. Either way the caller waits and
    /// tries again; an unreachable lock is not a failure of the thing it protects. `Err`: the
    /// backend itself failed (the embedded lock's database).
    async fn try_acquire(&self, name: &LockName) -> Result<Option<Lease>, LockError>;

    /// Extends the lease by a full TTL if this holder still has it. `false` when the lease is
    /// lost (the caller must stop).
    async fn renew(&self, lease: &mut Lease) -> Result<bool, LockError>;

    /// Releases the lease if this holder still has it; a non-owner's release changes nothing
    /// and returns `false`.
    async fn release(&self, lease: &Lease) -> Result<bool, LockError>;

    /// Whether anyone holds a lease on `name` (the sweeper leaves held uploads alone). `Err`
    /// when the backend cannot say (Redlock: no majority answered): callers must not take
    /// that for "free".
    async fn is_held(&self, name: &LockName) -> Result<bool, LockError>;
}
