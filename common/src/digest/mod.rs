//! Content digests: CRC32C on every chunk (nearly free with SSE4.2; it makes idempotent
//! re-sends and integrity checks cheap) and MD5 where a client or the operator asks for it.
//! Whole-file digests beyond MD5: a CRC32C combined from the chunks' (no re-read), an
//! optional SHA-256, and the S3-style composite MD5 of the parts.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

mod md5_hasher;

pub use md5_hasher::Md5Hasher;

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

/// A SHA-256 digest, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hex digits.
    pub fn parse(raw: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(raw, &mut out).ok()?;
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_hex())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw)
            .ok_or_else(|| serde::de::Error::custom("a SHA-256 digest is 64 hex digits"))
    }
}

/// The S3-style composite checksum of a file's parts (as S3's multipart ETag): the MD5 of the
/// concatenated binary MD5s of the parts, in order, and the number of parts. Written
/// `<32 hex digits>-<parts>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompositeMd5 {
    pub md5: Md5,
    pub parts: u64,
}

impl CompositeMd5 {
    /// The composite of `parts` (each part's MD5, in order), or `None` when a part has no
    /// MD5 (it was received without one) or there are no parts.
    pub fn of_parts(parts: impl IntoIterator<Item = Option<Md5>>) -> Option<Self> {
        let mut outer = Md5Hasher::new();
        let mut count = 0u64;
        for part in parts {
            outer.update(part?.as_bytes());
            count += 1;
        }
        (count > 0).then(|| Self {
            md5: outer.finalize(),
            parts: count,
        })
    }

    /// Parses `<32 hex digits>-<parts>`.
    pub fn parse(raw: &str) -> Option<Self> {
        let (hex, parts) = raw.split_once('-')?;
        if hex.len() != 32 {
            return None;
        }
        Some(Self {
            md5: Md5::parse(hex)?,
            parts: parts.parse().ok().filter(|&n| n > 0)?,
        })
    }
}

impl fmt::Debug for CompositeMd5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompositeMd5({self})")
    }
}

impl fmt::Display for CompositeMd5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.md5.to_hex(), self.parts)
    }
}

impl Serialize for CompositeMd5 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CompositeMd5 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).ok_or_else(|| {
            serde::de::Error::custom("a composite MD5 is 32 hex digits, '-', and a part count")
        })
    }
}

/// The CRC32C of `a ‖ b` from `crc32c(a)`, `crc32c(b)` and the length of `b`, without the
/// bytes (the GF(2) combine of zlib's `crc32_combine`, for the Castagnoli polynomial, as the
/// `crc32c` crate implements it).
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    // A part longer than the address space cannot have been hashed on this machine.
    crc32c::crc32c_combine(crc_a, crc_b, usize::try_from(len_b).unwrap_or(usize::MAX))
}

/// The CRC32C of a whole file from its parts' `(crc32c, len)`, in order.
pub fn crc32c_of_parts(parts: impl IntoIterator<Item = (u32, u64)>) -> u32 {
    parts
        .into_iter()
        .fold(0, |whole, (crc, len)| crc32c_combine(whole, crc, len))
}

/// Formats a CRC32C as status views and events show it: 8 hex digits, most significant first.
pub fn crc32c_hex(crc: u32) -> String {
    format!("{crc:08x}")
}

/// Digests computed while a chunk streams to storage.
pub struct ChunkHasher {
    crc32c: u32,
    md5: Option<Md5Hasher>,
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
            md5: with_md5.then(Md5Hasher::new),
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
            md5: self.md5.map(Md5Hasher::finalize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::Digest as _;

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

    #[test]
    fn combining_two_crcs_gives_the_crc_of_the_concatenation() {
        let (a, b) = (b"12345".as_slice(), b"6789".as_slice());
        let combined = crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len() as u64);
        assert_eq!(combined, 0xE306_9283);
        assert_eq!(crc32c_hex(combined), "e3069283");
        // An empty part changes nothing, on either side.
        assert_eq!(crc32c_combine(combined, 0, 0), combined);
        assert_eq!(crc32c_combine(0, combined, 9), combined);
    }

    #[test]
    fn the_composite_md5_is_the_md5_of_the_part_md5s_and_their_count() {
        let parts = [b"hello ".as_slice(), b"world".as_slice()];
        let md5s: Vec<Md5> = parts
            .iter()
            .map(|p| Md5(md5::Md5::digest(p).into()))
            .collect();
        let mut joined = Vec::new();
        for m in &md5s {
            joined.extend_from_slice(m.as_bytes());
        }
        let composite = CompositeMd5::of_parts(md5s.iter().copied().map(Some)).unwrap();
        assert_eq!(composite.md5, Md5(md5::Md5::digest(&joined).into()));
        assert_eq!(composite.parts, 2);
        let written = composite.to_string();
        assert!(written.ends_with("-2"), "{written}");
        assert_eq!(CompositeMd5::parse(&written), Some(composite));
        // One part without an MD5: no composite.
        assert_eq!(CompositeMd5::of_parts([Some(md5s[0]), None]), None);
        assert_eq!(CompositeMd5::of_parts([]), None);
        for bad in [
            "",
            "-2",
            "9e107d9d372bb6826bd81d3542a419d6",
            "9e107d9d372bb6826bd81d3542a419d6-0",
        ] {
            assert!(CompositeMd5::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn sha256_round_trips_through_hex() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d = Sha256::parse(hex).unwrap();
        assert_eq!(d.to_hex(), hex);
        assert!(Sha256::parse(&hex[1..]).is_none());
    }

    proptest::proptest! {
        #[test]
        fn combine_of_two_parts_is_the_crc_of_both(
            a in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            b in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
        ) {
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            proptest::prop_assert_eq!(
                crc32c_combine(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len() as u64),
                crc32c::crc32c(&whole)
            );
        }

        #[test]
        fn the_crc_of_many_parts_is_the_crc_of_the_file(
            parts in proptest::collection::vec(
                proptest::collection::vec(proptest::num::u8::ANY, 0..700), 0..12),
        ) {
            let whole: Vec<u8> = parts.concat();
            let combined = crc32c_of_parts(
                parts.iter().map(|p| (crc32c::crc32c(p), p.len() as u64)));
            proptest::prop_assert_eq!(combined, crc32c::crc32c(&whole));
        }
    }
}
