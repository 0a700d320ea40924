//! The bytes a benchmark sends: pseudo-random (so that nothing on the way can compress or
//! deduplicate them), generated once per run, and cut into chunks as zero-copy [`Bytes`]
//! slices of the one buffer, so that sending a chunk never copies it in user space.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use md5::Digest as _;

/// The whole payload of a benchmark run.
#[derive(Clone)]
pub struct Source {
    bytes: Bytes,
}

impl Source {
    /// `size` bytes from xorshift64* seeded with `seed`: fast enough (several GB/s) that
    /// generating 1 GiB takes well under a second, and never all zeros.
    pub fn generate(size: usize, seed: u64) -> Self {
        let mut state = seed | 1; // xorshift's state must never be zero.
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut buf = vec![0u8; size];
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
        Self { bytes: buf.into() }
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The chunks of an upload of this payload with `chunk_size`: every chunk but the last
    /// is `chunk_size` long, as the chunk protocol requires. Digests are computed here, so
    /// that a timed run never pays for them.
    pub fn chunks(&self, chunk_size: u64) -> Vec<Chunk> {
        let total = self.len();
        let count = total.div_ceil(chunk_size);
        (0..count)
            .map(|index| {
                let start = index * chunk_size;
                let end = (start + chunk_size).min(total);
                let data = self.bytes.slice(start as usize..end as usize);
                let md5: [u8; 16] = md5::Md5::digest(&data).into();
                Chunk {
                    index,
                    start,
                    crc32c: crc32c::crc32c(&data),
                    md5_base64: BASE64.encode(md5),
                    md5_hex: hex::encode(md5),
                    data,
                }
            })
            .collect()
    }
}

/// One chunk of an upload, with the digests a client may send and the server reports.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub index: u64,
    /// Offset of the first byte in the file.
    pub start: u64,
    /// A slice of the run's one buffer.
    pub data: Bytes,
    pub crc32c: u32,
    /// For `Content-MD5` (RFC 1864: base64 of the 16 bytes).
    pub md5_base64: String,
    /// As the server reports it (`chunk_md5` in the chunk response).
    pub md5_hex: String,
}

impl Chunk {
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The inclusive last byte offset, as `Content-Range` writes it.
    pub fn end_inclusive(&self) -> u64 {
        self.start + self.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_deterministic_and_not_constant() {
        let a = Source::generate(1001, 7);
        let b = Source::generate(1001, 7);
        assert_eq!(a.bytes(), b.bytes());
        assert_eq!(a.len(), 1001);
        assert!(a.bytes().iter().any(|&x| x != a.bytes()[0]));
        assert_ne!(
            Source::generate(64, 8).bytes(),
            Source::generate(64, 7).bytes()
        );
    }

    #[test]
    fn chunks_tile_the_source_with_a_short_last_chunk() {
        let source = Source::generate(25, 1);
        let chunks = source.chunks(10);
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            chunks
                .iter()
                .map(|c| (c.start, c.len()))
                .collect::<Vec<_>>(),
            vec![(0, 10), (10, 10), (20, 5)]
        );
        assert_eq!(chunks[2].end_inclusive(), 24);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(&joined[..], &source.bytes()[..]);
    }

    #[test]
    fn chunk_digests_are_those_of_their_bytes() {
        let source = Source::generate(100, 3);
        let chunk = &source.chunks(100)[0];
        let md5: [u8; 16] = md5::Md5::digest(&source.bytes()[..]).into();
        assert_eq!(chunk.md5_hex, hex::encode(md5));
        assert_eq!(BASE64.decode(&chunk.md5_base64).unwrap(), md5);
        assert_eq!(chunk.crc32c, crc32c::crc32c(&source.bytes()[..]));
    }
}
