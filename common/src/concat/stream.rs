//! Hashing the prefix in the request that brings it: when a chunk arrives that starts where
//! this process's running hash of the upload ends (one client sending in order, the common
//! case), its body is fed to the whole file's MD5 (and SHA-256) as it is received, on a
//! thread beside the chunk's write. Once the chunk is counted, the hash state before and
//! after it is remembered ([`Chains`]); the background assembly then places the chunk (a
//! clone, where the file system clones) without reading it back or hashing it again.
//!
//! Nothing here is trusted blindly: the assembly uses a remembered chunk only if it is the
//! counted copy (same token) and its "before" state is exactly the state the assembly has
//! reached at that offset (from its own checkpoint), so the "after" state is the hash of the
//! file's bytes up to the chunk's end. Everything else (chunks that arrived at another API,
//! or in parallel, or before a restart) is read back as before. The memory is bounded: a
//! few hundred bytes per chunk not yet assembled, for at most [`MAX_UPLOADS`] uploads.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use super::HashState;
use super::hashing::FileHasher;
use crate::id::UploadId;
use crate::upload::ChunkRecord;

/// Blocks of a body queued for the hashing thread: the reader waits beyond this, so a
/// body is received no faster than it is hashed.
const DEPTH: usize = 32;
/// Uploads whose running hash one process remembers; past it, one is forgotten (its chunks
/// are then read back by the assembly, as without this).
pub const MAX_UPLOADS: usize = 4096;

/// The whole file's hashes, carried through one chunk's body as it is received.
pub struct StreamHash {
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
    done: tokio::sync::oneshot::Receiver<HashState>,
    before: HashState,
}

/// A chunk hashed in its request: the file's hash state before and after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hashed {
    pub before: HashState,
    pub after: HashState,
}

impl StreamHash {
    /// Starts hashing on from `before` (`None` if the state does not decode).
    pub fn start(before: HashState) -> Option<Self> {
        let mut hasher = FileHasher::resume(&before)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(DEPTH);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let mut offset = before.offset;
        tokio::task::spawn_blocking(move || {
            while let Some(block) = rx.blocking_recv() {
                hasher.update(&block);
                offset += block.len() as u64;
            }
            let (_, _, state) = hasher.finish(offset);
            let _ = done_tx.send(state);
        });
        Some(Self {
            tx: Some(tx),
            done,
            before,
        })
    }

    /// Feeds the next bytes of the body (waits while the hashing thread is behind).
    pub async fn feed(&mut self, bytes: &Bytes) {
        if let Some(tx) = &self.tx
            && tx.send(bytes.clone()).await.is_err()
        {
            self.tx = None;
        }
    }

    /// The states before and after the body; `None` if the hashing thread died.
    pub async fn finish(mut self) -> Option<Hashed> {
        self.tx = None;
        let after = self.done.await.ok()?;
        Some(Hashed {
            before: self.before,
            after,
        })
    }
}

/// One process's running hashes of the uploads whose chunks it received in order.
#[derive(Default)]
pub struct Chains {
    uploads: HashMap<UploadId, Chain>,
}

#[derive(Default)]
struct Chain {
    /// The state after the last chunk hashed here: where the next one can carry on.
    tip: Option<HashState>,
    /// Chunks hashed here and counted, by index: their copy's token and states.
    hashed: BTreeMap<u64, (String, Hashed)>,
}

impl Chains {
    /// The state a part of `id` starting at `offset` carries on from: a fresh one at 0, the
    /// tip when the part starts where the tip ends, otherwise none.
    pub fn state_at(&self, id: &UploadId, offset: u64, sha256: bool) -> Option<HashState> {
        if offset == 0 {
            return Some(FileHasher::new(sha256).finish(0).2);
        }
        let tip = self.uploads.get(id)?.tip.as_ref()?;
        (tip.offset == offset).then(|| tip.clone())
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

    /// The copy hashed in its request was counted: the next part can carry on from it.
    pub fn counted(&mut self, id: &UploadId, after: &HashState) {
        if let Some(chain) = self.uploads.get_mut(id) {
            chain.tip = Some(after.clone());
        }
    }

    /// How many of `run` (counted parts in order, the first starting at `from.offset`) were
    /// hashed here in a chain that starts exactly at `from`, and the state after them.
    /// Forgets what lies before the run: the assembly has it.
    pub fn take_run(
        &mut self,
        id: &UploadId,
        run: &[ChunkRecord],
        from: &HashState,
    ) -> Option<(usize, HashState)> {
        let chain = self.uploads.get_mut(id)?;
        let first = run.first()?.index.0;
        chain.hashed = chain.hashed.split_off(&first);
        let mut state = from;
        let mut n = 0;
        for record in run {
            match chain.hashed.get(&record.index.0) {
                Some((token, h)) if *token == record.token && h.before == *state => {
                    state = &h.after;
                    n += 1;
                }
                _ => break,
            }
        }
        (n > 0).then(|| (n, state.clone()))
    }

    /// Forgets `id` (its upload stopped receiving).
    pub fn forget(&mut self, id: &UploadId) {
        self.uploads.remove(id);
    }
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

    #[tokio::test]
    async fn a_body_hashed_as_it_streams_ends_where_hashing_it_whole_does() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let before = state_after(&bytes[..30_000]);
        let mut stream = StreamHash::start(before.clone()).unwrap();
        for block in bytes[30_000..].chunks(7_000) {
            stream.feed(&Bytes::copy_from_slice(block)).await;
        }
        let hashed = stream.finish().await.unwrap();
        assert_eq!(hashed.before, before);
        assert_eq!(hashed.after, state_after(&bytes));
    }

    #[test]
    fn a_run_is_taken_only_from_the_counted_copies_that_chain_from_the_assemblys_state() {
        let id = UploadId::parse("a").unwrap();
        let data: Vec<u8> = (0..40u8).collect();
        let states: Vec<HashState> = (0..=4).map(|i| state_after(&data[..i * 10])).collect();
        let hashed = |i: usize| Hashed {
            before: states[i].clone(),
            after: states[i + 1].clone(),
        };
        let records: Vec<_> = (0..4).map(|i| record(i, 10, &format!("t{i}"))).collect();
        let mut chains = Chains::default();
        assert_eq!(chains.state_at(&id, 0, false), Some(states[0].clone()));
        assert_eq!(
            chains.state_at(&id, 10, false),
            None,
            "nothing hashed here yet"
        );
        for i in 0..3 {
            chains.hashed(&id, i as u64, &format!("t{i}"), hashed(i));
        }
        assert_eq!(chains.state_at(&id, 30, false), None, "none counted yet");
        chains.counted(&id, &states[3]);
        assert_eq!(chains.state_at(&id, 30, false), Some(states[3].clone()));
        assert_eq!(
            chains.state_at(&id, 20, false),
            None,
            "not where the tip ends"
        );

        // From byte 0: the three hashed here, then chunk 3 (not hashed here) stops it.
        assert_eq!(
            chains.take_run(&id, &records, &states[0]),
            Some((3, states[3].clone()))
        );
        // A state the chain does not start from (another copy before) takes nothing.
        assert_eq!(chains.take_run(&id, &records[1..], &states[0]), None);
        // Another copy of chunk 2 counted (re-sent after storage lost it): stops before it.
        let mut resent = records.clone();
        resent[2].token = "other".into();
        assert_eq!(
            chains.take_run(&id, &resent[1..], &states[1]),
            Some((1, states[2].clone()))
        );
        // Taking a run forgets what lies before it.
        assert_eq!(chains.take_run(&id, &records, &states[0]), None);
        chains.forget(&id);
        assert_eq!(chains.state_at(&id, 30, false), None);
    }
}
