//! Write permits: at most `limits.max_concurrent_chunk_writes` chunk bodies are written at
//! once by this process, and at most `limits.max_chunk_writes_per_tenant` of them for any one
//! tenant, so that no tenant can take every slot and make the other tenants' chunks wait
//! (invariant 11). Past either a body is refused at once (503 `too_busy` with `Retry-After`),
//! never queued: the client retries, perhaps on another pod.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use stitch_common::config::Limits;
use stitch_common::id::Tenant;
use stitch_common::metrics as m;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies being written, per tenant; a tenant with none has no entry.
type Held = Arc<Mutex<HashMap<Tenant, usize>>>;

/// The process's write slots and each tenant's share of them.
pub struct WritePermits {
    process: Arc<Semaphore>,
    per_tenant: usize,
    held: Held,
}

/// One body's right to be written: its slots are given back when it is dropped.
pub struct WritePermit {
    _process: OwnedSemaphorePermit,
    tenant: Tenant,
    held: Held,
}

/// Which limit refused a body (the label of `stitch_write_refusals_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every slot of the process is taken.
    Process,
    /// The tenant holds its share of them.
    Tenant,
}

impl WritePermits {
    pub fn new(limits: &Limits) -> Self {
        Self {
            process: Arc::new(Semaphore::new(limits.max_concurrent_chunk_writes)),
            per_tenant: limits.chunk_writes_per_tenant(),
            held: Arc::default(),
        }
    }

    /// A slot for a body of `tenant`'s, unless the process or the tenant is at its limit.
    pub fn try_take(&self, tenant: &Tenant) -> Result<WritePermit, Refused> {
        let refused = |why: Refused| {
            let limit = match why {
                Refused::Process => "process",
                Refused::Tenant => "tenant",
            };
            metrics::counter!(m::WRITE_REFUSALS, "limit" => limit).increment(1);
            why
        };
        let process = self
            .process
            .clone()
            .try_acquire_owned()
            .map_err(|_| refused(Refused::Process))?;
        let mut held = lock(&self.held);
        let count = held.entry(tenant.clone()).or_insert(0);
        // `per_tenant` is at least 1, so a fresh entry is never refused (and never left at 0).
        if *count >= self.per_tenant {
            return Err(refused(Refused::Tenant));
        }
        *count += 1;
        Ok(WritePermit {
            _process: process,
            tenant: tenant.clone(),
            held: self.held.clone(),
        })
    }
}

impl Drop for WritePermit {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(count) = held.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

/// The counts stay right whatever panicked while holding the lock: each change is one
/// statement.
fn lock(held: &Held) -> MutexGuard<'_, HashMap<Tenant, usize>> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permits(process: usize, per_tenant: usize) -> WritePermits {
        WritePermits::new(&Limits {
            max_concurrent_chunk_writes: process,
            max_chunk_writes_per_tenant: Some(per_tenant),
            ..Limits::default()
        })
    }

    fn tenant(name: &str) -> Tenant {
        Tenant::parse(name).expect("a valid tenant")
    }

    #[test]
    fn a_tenant_at_its_share_is_refused_while_another_tenant_still_writes() {
        let permits = permits(3, 2);
        let (acme, globex) = (tenant("acme"), tenant("globex"));
        let first = permits.try_take(&acme).expect("a slot");
        let _second = permits.try_take(&acme).expect("a slot");
        assert_eq!(permits.try_take(&acme).err(), Some(Refused::Tenant));
        let _other = permits.try_take(&globex).expect("another tenant's slot");
        assert_eq!(permits.try_take(&globex).err(), Some(Refused::Process));
        drop(first);
        // The tenant's refusal gave its process slot back; the drop freed one more.
        let _again = permits
            .try_take(&acme)
            .expect("the slot the drop gave back");
    }

    #[test]
    fn slots_come_back_when_permits_are_dropped_and_no_entry_is_left() {
        let permits = permits(2, 1);
        let acme = tenant("acme");
        for _ in 0..3 {
            let held = permits.try_take(&acme).expect("a slot");
            assert_eq!(permits.try_take(&acme).err(), Some(Refused::Tenant));
            drop(held);
        }
        assert!(lock(&permits.held).is_empty());
        assert_eq!(permits.process.available_permits(), 2);
    }
}
