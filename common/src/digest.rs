//! Content digests: CRC32C on every chunk (nearly free with SSE4.2; it makes idempotent
//! re-sends and integrity checks cheap) and MD5 where a client or the operator asks for it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use md5::Digest as _;
use serde::{Deserialize, Serialize};

/// An MD5 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Md5([u8; 16]);

impl Md5 {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Parses a digest written as 32 hex digits or as the 24-character base64 of
    /// `Content-MD5` (RFC 1864). Clients use both.
    pub fn parse(raw: &str) -> Option<Self> {
        let mut out = [0u8; 16];
        match raw.len() {
            32 => hex::decode_to_slice(raw, &mut out).ok()?,
            24 => {
                let bytes = BASE64.decode(raw).ok()?;
                out.copy_from_slice(bytes.get(..16).filter(|_| bytes.len() == 16)?);
            }
            _ => return None,
        }
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for Md5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Md5({})", self.to_hex())
    }
}

impl fmt::Display for Md5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Md5 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Md5 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw)
            .ok_or_else(|| serde::de::Error::custom("an MD5 digest is 32 hex digits or 24 base64"))
    }
}

/// Digests computed while a chunk streams to storage.
pub struct ChunkHasher {
    crc32c: u32,
    md5: Option<md5::Md5>,
    len: u64,
}

/// What [`ChunkHasher`] computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkDigests {
    pub len: u64,
    pub crc32c: u32,
    pub md5: Option<Md5>,
}

impl ChunkHasher {
    pub fn new(with_md5: bool) -> Self {
        Self {
            crc32c: 0,
            md5: with_md5.then(md5::Md5::new),
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.crc32c = crc32c::crc32c_append(self.crc32c, data);
        if let Some(md5) = &mut self.md5 {
            md5.update(data);
        }
        self.len += data.len() as u64;
    }

    pub fn finish(self) -> ChunkDigests {
        ChunkDigests {
            len: self.len,
            crc32c: self.crc32c,
            md5: self.md5.map(|m| Md5(m.finalize().into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_parses_hex_and_base64_alike() {
        let hex = Md5::parse("9e107d9d372bb6826bd81d3542a419d6").unwrap();
        let b64 = Md5::parse("nhB9nTcrtoJr2B01QqQZ1g==").unwrap();
        assert_eq!(hex, b64);
        assert_eq!(hex.to_base64(), "nhB9nTcrtoJr2B01QqQZ1g==");
        for bad in [
            "",
            "9e107d9d",
            "zz107d9d372bb6826bd81d3542a419d6",
            "nhB9nTcrtoJr2B01QqQZ1g!=",
        ] {
            assert!(Md5::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_hasher_matches_reference_digests() {
        let mut h = ChunkHasher::new(true);
        h.update(b"The quick brown fox ");
        h.update(b"jumps over the lazy dog");
        let d = h.finish();
        assert_eq!(d.len, 43);
        assert_eq!(d.md5.unwrap().to_hex(), "9e107d9d372bb6826bd81d3542a419d6");
        // CRC-32C check value of "123456789" (RFC 3720).
        let mut c = ChunkHasher::new(false);
        c.update(b"123456789");
        assert_eq!(c.finish().crc32c, 0xE306_9283);
    }
}
