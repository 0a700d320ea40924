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
//! [`RedisLock`] is Redlock-style over one or more independent Redis nodes.

mod redis;

use std::time::{Duration, Instant};

pub use self::redis::RedisLock;

/// A lock failure that is not "someone else holds it".
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock backend unavailable: {0}")]
    Unavailable(String),
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    pub key: String,
    token: String,
    valid_until: Instant,
}

impl Lease {
    /// A lease on `key` held with `token`, valid until `valid_until` on the monotonic clock.
    pub fn new(key: &str, token: String, valid_until: Instant) -> Self {
        Self {
            key: key.to_owned(),
            token,
            valid_until,
        }
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

/// Leases on keys. Implementations must make acquire, renew and release atomic per key, and
/// let only the token's holder renew or release.
#[async_trait::async_trait]
pub trait MergeLock: Send + Sync + 'static {
    /// The lease length.
    fn ttl(&self) -> Duration;

    /// Tries to take the lease on `key`; `None` when it is not granted: another holder has it,
    /// or (Redlock) too few nodes answered to form a quorum. Either way the caller waits and
    /// tries again; an unreachable lock is not a failure of the thing it protects. `Err`: the
    /// backend itself failed (the embedded lock's database).
    async fn try_acquire(&self, key: &str) -> Result<Option<Lease>, LockError>;

    /// Extends the lease by a full TTL if this holder still has it. `false` when the lease is
    /// lost (the caller must stop).
    async fn renew(&self, lease: &mut Lease) -> Result<bool, LockError>;

    /// Releases the lease if this holder still has it; a non-owner's release changes nothing
    /// and returns `false`.
    async fn release(&self, lease: &Lease) -> Result<bool, LockError>;

    /// Whether anyone holds a lease on `key` (the sweeper leaves held uploads alone). `Err`
    /// when the backend cannot say (Redlock: no majority answered): callers must not take
    /// that for "free".
    async fn is_held(&self, key: &str) -> Result<bool, LockError>;
}
