//! The whole-file hashes of a concatenation (MD5 always, SHA-256 when asked for), and their
//! state between two runs: a file assembled in several runs ([`super::prefix`]) saves the
//! hashes' internal state with the bytes it covers, so that the next run, in another process
//! perhaps, carries on from there instead of hashing from byte 0.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use sha2::digest::common::hazmat::SerializableState;

use crate::digest::{Md5, Md5Hasher, Sha256};

/// The hashes' state after the first `offset` bytes of a file: what to save to carry on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashState {
    /// How many bytes of the file the state has seen.
    pub offset: u64,
    /// MD5's serialized state (its chaining value, the bytes buffered and the length), base64.
    md5: String,
    /// SHA-256's, when the file's SHA-256 is computed.
    sha256: Option<String>,
}

impl HashState {
    /// Whether the state carries a SHA-256.
    pub fn has_sha256(&self) -> bool {
        self.sha256.is_some()
    }
}

/// The hashes a concatenation computes: each block is fed to both while it is in cache.
pub(super) struct FileHasher {
    md5: Md5Hasher,
    sha256: Option<sha2::Sha256>,
}

impl FileHasher {
    pub(super) fn new(with_sha256: bool) -> Self {
        Self {
            md5: Md5Hasher::new(),
            sha256: with_sha256.then(sha2::Sha256::new),
        }
    }

    /// The hashes as `state` left them; `None` when the state does not decode (a record
    /// written by another version, or damaged): the caller starts over.
    pub(super) fn resume(state: &HashState) -> Option<Self> {
        let md5 = Md5Hasher::deserialize(&BASE64.decode(&state.md5).ok()?)?;
        let sha256 = match &state.sha256 {
            Some(s) => Some(restore::<sha2::Sha256>(s)?),
            None => None,
        };
        Some(Self { md5, sha256 })
    }

    pub(super) fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        if let Some(sha) = &mut self.sha256 {
            sha.update(data);
        }
    }

    /// The state after `offset` bytes in all, to carry on from, without finishing.
    pub(super) fn state(&self, offset: u64) -> HashState {
        HashState {
            offset,
            md5: BASE64.encode(self.md5.serialize()),
            sha256: self.sha256.as_ref().map(|s| BASE64.encode(s.serialize())),
        }
    }

    /// The final digests, and the state that another run could carry on from (`offset`
    /// being the bytes seen in all).
    pub(super) fn finish(self, offset: u64) -> (Md5, Option<Sha256>, HashState) {
        let state = self.state(offset);
        (
            self.md5.finalize(),
            self.sha256.map(|s| Sha256::from_bytes(s.finalize().into())),
            state,
        )
    }
}

fn restore<H: SerializableState>(encoded: &str) -> Option<H> {
    let bytes = BASE64.decode(encoded).ok()?;
    let serialized = bytes.as_slice().try_into().ok()?;
    H::deserialize(serialized).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_resumed_from_a_saved_state_ends_where_one_pass_does() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 13 % 251) as u8).collect();
        // A split inside MD5's 64-byte block, so that buffered bytes are part of the state.
        let (first, rest) = data.split_at(70_001);
        let mut one_pass = FileHasher::new(true);
        one_pass.update(&data);
        let (md5, sha256, _) = one_pass.finish(data.len() as u64);

        let mut before = FileHasher::new(true);
        before.update(first);
        let (_, _, saved) = before.finish(first.len() as u64);
        let json = serde_json::to_string(&saved).unwrap();
        let saved: HashState = serde_json::from_str(&json).unwrap();
        assert_eq!(saved.offset, 70_001);
        let mut after = FileHasher::resume(&saved).unwrap();
        after.update(rest);
        let (md5_resumed, sha256_resumed, end) = after.finish(data.len() as u64);
        assert_eq!(md5_resumed, md5);
        assert_eq!(sha256_resumed, sha256);
        assert!(end.has_sha256());
    }

    #[test]
    fn a_damaged_state_is_refused_rather_than_trusted() {
        let mut hasher = FileHasher::new(false);
        hasher.update(b"abc");
        let (_, _, mut state) = hasher.finish(3);
        state.md5.truncate(8);
        assert!(FileHasher::resume(&state).is_none());
        state.md5 = "not base64!".into();
        assert!(FileHasher::resume(&state).is_none());
    }
}
