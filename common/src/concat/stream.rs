//! Hashing the prefix in the requests that bring it: when a chunk arrives that starts where
//! this process's running hash of the upload ends (one client sending in order, the common
//! case), its body is fed, as it is received, to a thread that carries the whole file's MD5
//! (and SHA-256) on from the state after the chunk before. The request does not wait for
//! that thread: it answers once its copy is durable and counted, and the hashing follows
//! behind, across chunks, as far as `limits.max_buffered_body_bytes` of bytes queued for it
//! allow (beyond, a body is received no faster than it is hashed). The states before and
//! after each chunk are remembered ([`Chains`]); the background assembly then places the
//! chunk (a clone, where the file system clones) and checks it, without hashing it again.
//!
//! Nothing here is trusted blindly: the assembly uses a remembered chunk only if it is the
//! counted copy (same token) and its "before" state is exactly the state the assembly has
//! reached at that offset (from its own checkpoint), so the "after" state is the hash of the
//! file's bytes up to the chunk's end. Everything else (chunks that arrived at another API,
//! or in parallel, or before a restart; a body that broke off) is read back as before.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::HashState;
use super::hashing::FileHasher;
use crate::id::UploadId;
use crate::upload::ChunkRecord;

/// Uploads whose running hash one process remembers; past it, one is forgotten (its chunks
/// are then read back by the assembly, as without this).
pub const MAX_UPLOADS: usize = 4096;

/// A hash state that may still be being computed: `None` once known never to come (the
/// hashing of a body that broke off, or of one after it).
#[derive(Clone, Debug)]
pub struct Pending(watch::Receiver<Option<HashState>>);

impl Pending {
    /// A state known now.
    pub fn ready(state: HashState) -> Self {
        Self(watch::channel(Some(state)).1)
    }

    /// The state, once computed.
    pub async fn get(&self) -> Option<HashState> {
        let mut rx = self.0.clone();
        let value = rx.wait_for(Option::is_some).await.ok()?;
        value.clone()
    }
}

/// A chunk hashed in its request: the file's hash state before and after it.
#[derive(Clone, Debug)]
pub struct Hashed {
    pub before: Pending,
    pub after: Pending,
}

enum Message {
    /// Bytes of the body, with the budget they hold until hashed.
    Data(Bytes, OwnedSemaphorePermit),
    /// The body is complete.
    End,
}

/// The whole file's hashes, carried through one chunk's body as it is received.
pub struct StreamHash {
    tx: Option<mpsc::UnboundedSender<Message>>,
    budget: Arc<Semaphore>,
    /// The budget's size in KiB (no one block may ask for more).
    budget_kib: u32,
    hashed: Hashed,
}

impl StreamHash {
    /// Hashes the body on from `before` (once that state is known), holding at most the
    /// `budget` (KiB of bytes queued) shared by every stream of the process.
    pub fn start(before: Pending, budget: Arc<Semaphore>, budget_kib: u32) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let (after_tx, after_rx) = watch::channel(None);
        let waited = before.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let Some(state) = runtime.block_on(waited.get()) else {
                return;
            };
            let Some(mut hasher) = FileHasher::resume(&state) else {
                return;
            };
            let mut offset = state.offset;
            while let Some(message) = rx.blocking_recv() {
                match message {
                    Message::Data(block, _held) => {
                        hasher.update(&block);
                        offset += block.len() as u64;
                    }
                    Message::End => {
                        let _ = after_tx.send(Some(hasher.finish(offset).2));
                        return;
                    }
                }
            }
            // The body broke off: no state after it (the sender drops, `after` is None).
        });
        Self {
            tx: Some(tx),
            budget,
            budget_kib,
            hashed: Hashed {
                before,
                after: Pending(after_rx),
            },
        }
    }

    /// Queues the next bytes of the body for hashing (waits while the queue is full).
    pub async fn feed(&mut self, bytes: &Bytes) {
        let Some(tx) = &self.tx else {
            return;
        };
        let kib = (bytes.len().div_ceil(1024) as u32).clamp(1, self.budget_kib);
        let Ok(held) = self.budget.clone().acquire_many_owned(kib).await else {
            self.tx = None;
            return;
        };
        if tx.send(Message::Data(bytes.clone(), held)).is_err() {
            // The hashing stopped (the state before never came): nothing to feed.
            self.tx = None;
        }
    }

    /// The body is complete: the states before and after it (the latter computed behind).
    pub fn finish(mut self) -> Hashed {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Message::End);
        }
        self.hashed.clone()
    }
}

/// One process's running hashes of the uploads whose chunks it received in order.
#[derive(Default)]
pub struct Chains {
    uploads: HashMap<UploadId, Chain>,
}

#[derive(Default)]
struct Chain {
    /// Where the last counted chunk hashed here ends, and the state after it.
    tip: Option<(u64, Pending)>,
    /// Chunks hashed here, by index: their copy's token and states.
    hashed: BTreeMap<u64, (String, Hashed)>,
}

/// Chunks of a run hashed in their requests, in order, to check against the assembly's
/// own state ([`resolve_run`]).
pub type Candidates = Vec<(u64, Hashed)>;

impl Chains {
    /// The state a part of `id` starting at `offset` carries on from: a fresh one at 0, the
    /// tip when the part starts where the tip ends, otherwise none.
    pub fn state_at(&self, id: &UploadId, offset: u64, sha256: bool) -> Option<Pending> {
        if offset == 0 {
            return Some(Pending::ready(FileHasher::new(sha256).finish(0).2));
        }
        let (end, state) = self.uploads.get(id)?.tip.as_ref()?;
        (*end == offset).then(|| state.clone())
    }

    /// The copy `token` of part `index` was hashed in its request: remembered before it is
    /// counted, so that an assembly step that sees it counted finds it. A copy that is never
    /// counted is never used (its token matches no record) and goes as the prefix passes it.
    pub fn hashed(&mut self, id: &UploadId, index: u64, token: &str, hashed: Hashed) {
        if !self.uploads.contains_key(id)
            && self.uploads.len() >= MAX_UPLOADS
            && let Some(old) = self.uploads.keys().next().cloned()
        {
            self.uploads.remove(&old);
        }
        let chain = self.uploads.entry(id.clone()).or_default();
        chain.hashed.insert(index, (token.to_owned(), hashed));
    }

    /// The copy hashed in its request, ending at byte `end`, was counted: the next part can
    /// carry on from it.
    pub fn counted(&mut self, id: &UploadId, end: u64, after: Pending) {
        if let Some(chain) = self.uploads.get_mut(id) {
            chain.tip = Some((end, after));
        }
    }

    /// The chunks at the start of `run` (counted parts in order) that were hashed here from
    /// the same copies, to be checked by [`resolve_run`]. Forgets what lies before the run:
    /// the assembly has it.
    pub fn candidates(&mut self, id: &UploadId, run: &[ChunkRecord]) -> Candidates {
        let Some(chain) = self.uploads.get_mut(id) else {
            return Vec::new();
        };
        let Some(first) = run.first() else {
            return Vec::new();
        };
        chain.hashed = chain.hashed.split_off(&first.index.0);
        run.iter()
            .map_while(|record| match chain.hashed.get(&record.index.0) {
                Some((token, h)) if *token == record.token => Some((record.index.0, h.clone())),
                _ => None,
            })
            .collect()
    }

    /// Forgets `id` (its upload stopped receiving).
    pub fn forget(&mut self, id: &UploadId) {
        self.uploads.remove(id);
    }
}

/// How many of `candidates` chain from `from` (each one's state before is exactly the state
/// after the one before, the first's is `from`), and the state after them; `None` for none.
/// Waits for states still being computed.
pub async fn resolve_run(candidates: &Candidates, from: &HashState) -> Option<(usize, HashState)> {
    let mut state = from.clone();
    let mut n = 0;
    for (_, hashed) in candidates {
        if hashed.before.get().await.as_ref() != Some(&state) {
            break;
        }
        let Some(after) = hashed.after.get().await else {
            break;
        };
        state = after;
        n += 1;
    }
    (n > 0).then_some((n, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::ChunkIndex;

    fn state_after(bytes: &[u8]) -> HashState {
        let mut h = FileHasher::new(false);
        h.update(bytes);
        h.finish(bytes.len() as u64).2
    }

    fn record(index: u64, len: u64, token: &str) -> ChunkRecord {
        ChunkRecord {
            index: ChunkIndex(index),
            offset: index * len,
            len,
            crc32c: 0,
            md5: None,
            token: token.into(),
        }
    }

    fn budget() -> (Arc<Semaphore>, u32) {
        (Arc::new(Semaphore::new(64)), 64)
    }

    #[tokio::test]
    async fn bodies_hashed_one_after_the_other_end_where_hashing_the_whole_does() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (budget, kib) = budget();
        // Three bodies; each starts before the one before is hashed, and the queue (64 KiB)
        // is smaller than a body, so feeding waits for the hashing.
        let mut before = Pending::ready(state_after(&bytes[..30_000]));
        let mut all = Vec::new();
        for part in bytes[30_000..].chunks(90_000) {
            let mut stream = StreamHash::start(before.clone(), budget.clone(), kib);
            for block in part.chunks(7_000) {
                stream.feed(&Bytes::copy_from_slice(block)).await;
            }
            let hashed = stream.finish();
            before = hashed.after.clone();
            all.push(hashed);
        }
        assert_eq!(
            all[0].before.get().await,
            Some(state_after(&bytes[..30_000]))
        );
        assert_eq!(all[1].before.get().await, all[0].after.get().await);
        assert_eq!(all[2].after.get().await, Some(state_after(&bytes)));
        assert_eq!(
            budget.available_permits(),
            64,
            "every byte hashed gave its budget back"
        );
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_has_no_state_after_it_nor_has_the_next() {
        let (budget, kib) = budget();
        let mut broken = StreamHash::start(Pending::ready(state_after(b"")), budget.clone(), kib);
        broken.feed(&Bytes::from_static(b"abc")).await;
        let hashed = broken.hashed.clone();
        drop(broken);
        assert_eq!(hashed.after.get().await, None);
        let mut next = StreamHash::start(hashed.after.clone(), budget, kib);
        next.feed(&Bytes::from_static(b"def")).await;
        assert_eq!(next.finish().after.get().await, None);
    }

    #[tokio::test]
    async fn a_run_is_taken_only_from_the_counted_copies_that_chain_from_the_assemblys_state() {
        let id = UploadId::parse("a").unwrap();
        let data: Vec<u8> = (0..40u8).collect();
        let states: Vec<HashState> = (0..=4).map(|i| state_after(&data[..i * 10])).collect();
        let hashed = |i: usize| Hashed {
            before: Pending::ready(states[i].clone()),
            after: Pending::ready(states[i + 1].clone()),
        };
        let records: Vec<_> = (0..4).map(|i| record(i, 10, &format!("t{i}"))).collect();
        let mut chains = Chains::default();
        assert!(chains.state_at(&id, 0, false).is_some());
        assert!(
            chains.state_at(&id, 10, false).is_none(),
            "nothing hashed here yet"
        );
        for i in 0..3 {
            chains.hashed(&id, i as u64, &format!("t{i}"), hashed(i));
        }
        assert!(
            chains.state_at(&id, 30, false).is_none(),
            "none counted yet"
        );
        chains.counted(&id, 30, Pending::ready(states[3].clone()));
        let tip = chains.state_at(&id, 30, false).unwrap();
        assert_eq!(tip.get().await, Some(states[3].clone()));
        assert!(
            chains.state_at(&id, 20, false).is_none(),
            "not where the tip ends"
        );

        // From byte 0: the three hashed here, then chunk 3 (not hashed here) stops it.
        let all = chains.candidates(&id, &records);
        assert_eq!(all.len(), 3);
        assert_eq!(
            resolve_run(&all, &states[0]).await,
            Some((3, states[3].clone()))
        );
        // A state the chain does not start from (another copy before) takes nothing.
        let later = chains.candidates(&id, &records[1..]);
        assert_eq!(resolve_run(&later, &states[0]).await, None);
        // Another copy of chunk 2 counted (re-sent after storage lost it): stops before it.
        let mut resent = records.clone();
        resent[2].token = "other".into();
        let cut = chains.candidates(&id, &resent[1..]);
        assert_eq!(
            resolve_run(&cut, &states[1]).await,
            Some((1, states[2].clone()))
        );
        // Taking a run forgets what lies before it.
        assert!(chains.candidates(&id, &records).is_empty());
        chains.forget(&id);
        assert!(chains.state_at(&id, 30, false).is_none());
    }
}
