//! Chunk geometry: how an upload of `total_size` bytes is cut into chunks.
//!
//! The chunk protocol fixes one chunk size for the whole upload: every chunk but the last is
//! exactly `chunk_size` bytes and chunk `i` starts at `i × chunk_size`. Whichever request comes
//! first (an explicit create or the first chunk) fixes the geometry; everything later is
//! checked against it. All arithmetic here is checked: every number comes from a client.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A chunk's 0-based position in its upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkIndex(pub u64);

impl fmt::Display for ChunkIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The fixed shape of an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub total_size: u64,
    pub chunk_size: u64,
    pub total_chunks: u64,
}

/// A client's request that does not describe a possible chunk or upload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("total size must be at least 1 byte")]
    EmptyUpload,
    #[error("chunk size must be at least 1 byte")]
    EmptyChunk,
    #[error("total chunks must be at least 1")]
    NoChunks,
    #[error("chunk index {index} is not below the total of {total_chunks} chunks")]
    IndexOutOfRange { index: u64, total_chunks: u64 },
    #[error("Content-Range end {end} is not below the total size {total_size}")]
    RangeBeyondTotal { end: u64, total_size: u64 },
    #[error(
        "Content-Range start {start} is not index × chunk size (index {index}, chunk size {chunk_size})"
    )]
    MisplacedChunk {
        start: u64,
        index: u64,
        chunk_size: u64,
    },
    #[error("chunk {index} must be {expected} bytes long, the Content-Range says {actual}")]
    WrongChunkLength {
        index: u64,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{total_size} bytes in chunks of {chunk_size} make {expected} chunks, not {total_chunks}"
    )]
    WrongChunkCount {
        total_size: u64,
        chunk_size: u64,
        total_chunks: u64,
        expected: u64,
    },
}

impl Geometry {
    /// The geometry of an upload of `total_size` bytes in chunks of `chunk_size`.
    pub fn new(total_size: u64, chunk_size: u64) -> Result<Self, GeometryError> {
        if total_size == 0 {
            return Err(GeometryError::EmptyUpload);
        }
        if chunk_size == 0 {
            return Err(GeometryError::EmptyChunk);
        }
        // A chunk larger than the upload is the same upload in one chunk.
        let chunk_size = chunk_size.min(total_size);
        Ok(Self {
            total_size,
            chunk_size,
            total_chunks: total_size.div_ceil(chunk_size),
        })
    }

    /// The geometry of an upload whose length is not known yet (tus `Upload-Defer-Length`):
    /// all zeros, until the length is declared and the geometry becomes
    /// `Geometry::new(length, length)`.
    pub fn deferred() -> Self {
        Self {
            total_size: 0,
            chunk_size: 0,
            total_chunks: 0,
        }
    }

    /// Whether the length is still to be declared.
    pub fn is_deferred(&self) -> bool {
        self.total_size == 0
    }

    /// Works out the upload's geometry from one chunk of the chunk protocol: its index, the
    /// declared chunk count and its `Content-Range`. Any chunk determines it (chunk 0 by its
    /// length, chunk `i > 0` by `start / i`), and the chunk must then be exactly where and as
    /// long as that geometry says.
    pub fn from_chunk(
        index: ChunkIndex,
        total_chunks: u64,
        range: ContentRange,
    ) -> Result<Self, GeometryError> {
        let ContentRange {
            start,
            end,
            total_size,
        } = range;
        if total_chunks == 0 {
            return Err(GeometryError::NoChunks);
        }
        if index.0 >= total_chunks {
            return Err(GeometryError::IndexOutOfRange {
                index: index.0,
                total_chunks,
            });
        }
        if total_size == 0 {
            return Err(GeometryError::EmptyUpload);
        }
        if end >= total_size {
            return Err(GeometryError::RangeBeyondTotal { end, total_size });
        }
        let len = range.len();
        let chunk_size = match start.checked_div(index.0) {
            // Chunk 0 is the chunk size long (or the whole upload, when it is the only one).
            None if start != 0 => {
                return Err(GeometryError::MisplacedChunk {
                    start,
                    index: 0,
                    chunk_size: len,
                });
            }
            None if total_chunks == 1 => total_size,
            None => len,
            // Chunk i > 0 starts at i × chunk size.
            Some(size) if size == 0 || size * index.0 != start => {
                return Err(GeometryError::MisplacedChunk {
                    start,
                    index: index.0,
                    chunk_size: size,
                });
            }
            Some(size) => size,
        };
        let geometry = Self::new(total_size, chunk_size)?;
        if geometry.total_chunks != total_chunks || geometry.chunk_size != chunk_size {
            return Err(GeometryError::WrongChunkCount {
                total_size,
                chunk_size,
                total_chunks,
                expected: total_size.div_ceil(chunk_size),
            });
        }
        let expected = geometry.chunk_len(index);
        if len != expected {
            return Err(GeometryError::WrongChunkLength {
                index: index.0,
                expected,
                actual: len,
            });
        }
        Ok(geometry)
    }

    /// Byte offset of chunk `index`. The caller guarantees `index < total_chunks`.
    pub fn chunk_start(&self, index: ChunkIndex) -> u64 {
        index.0 * self.chunk_size
    }

    /// Length in bytes of chunk `index` (the last one may be shorter).
    pub fn chunk_len(&self, index: ChunkIndex) -> u64 {
        let start = self.chunk_start(index);
        self.chunk_size.min(self.total_size - start)
    }
}

/// A parsed `Content-Range: bytes START-END/TOTAL` (inclusive end, known total).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    pub end: u64,
    pub total_size: u64,
}

/// Why a header is not a number or a range we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("is empty")]
    Empty,
    #[error("must be a plain decimal number (digits only)")]
    NotDecimal,
    #[error("is too large")]
    Overflow,
    #[error("must look like `bytes START-END/TOTAL`")]
    Malformed,
    #[error("has an end before its start")]
    Inverted,
    #[error("must state the total size (`*` is not accepted)")]
    UnknownTotal,
}

/// Parses a non-negative decimal header value: ASCII digits only, no sign, no spaces, no
/// `0x`, and it must fit in a `u64`.
pub fn parse_decimal(raw: &str) -> Result<u64, ParseError> {
    if raw.is_empty() {
        return Err(ParseError::Empty);
    }
    if !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::NotDecimal);
    }
    raw.parse::<u64>().map_err(|_| ParseError::Overflow)
}

impl ContentRange {
    /// Parses `bytes START-END/TOTAL`. The unit is case-insensitive; nothing else is lenient.
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let (unit, spec) = raw.split_once(' ').ok_or(ParseError::Malformed)?;
        if !unit.eq_ignore_ascii_case("bytes") {
            return Err(ParseError::Malformed);
        }
        let (range, total) = spec.split_once('/').ok_or(ParseError::Malformed)?;
        if total == "*" {
            return Err(ParseError::UnknownTotal);
        }
        let (start, end) = range.split_once('-').ok_or(ParseError::Malformed)?;
        let number = |s: &str| match parse_decimal(s) {
            Err(ParseError::Overflow) => Err(ParseError::Overflow),
            Err(_) => Err(ParseError::Malformed),
            Ok(n) => Ok(n),
        };
        let (start, end, total_size) = (number(start)?, number(end)?, number(total)?);
        if end < start {
            return Err(ParseError::Inverted);
        }
        // `bytes 0-18446744073709551615/...` covers 2^64 bytes: one more than `len` counts.
        if (end - start).checked_add(1).is_none() {
            return Err(ParseError::Overflow);
        }
        Ok(Self {
            start,
            end,
            total_size,
        })
    }

    /// Number of bytes the range covers (at least 1: `end >= start`; at most `u64::MAX`:
    /// `parse` refuses longer ranges).
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a parsed range covers at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for ContentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bytes {}-{}/{}", self.start, self.end, self.total_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(start: u64, end: u64, total_size: u64) -> ContentRange {
        ContentRange {
            start,
            end,
            total_size,
        }
    }

    #[test]
    fn decimal_headers_are_strict() {
        assert_eq!(parse_decimal("0"), Ok(0));
        assert_eq!(parse_decimal("007"), Ok(7));
        assert_eq!(parse_decimal("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_decimal("18446744073709551616"),
            Err(ParseError::Overflow)
        );
        for bad in ["+1", "-1", " 1", "1 ", "0x10", "1e3", "1.0", "１"] {
            assert_eq!(parse_decimal(bad), Err(ParseError::NotDecimal), "{bad:?}");
        }
        assert_eq!(parse_decimal(""), Err(ParseError::Empty));
    }

    #[test]
    fn content_range_accepts_only_complete_byte_ranges() {
        assert_eq!(ContentRange::parse("bytes 0-9/10"), Ok(range(0, 9, 10)));
        assert_eq!(ContentRange::parse("BYTES 5-5/6"), Ok(range(5, 5, 6)));
        assert_eq!(
            ContentRange::parse("bytes 0-9/*"),
            Err(ParseError::UnknownTotal)
        );
        assert_eq!(
            ContentRange::parse("bytes 9-0/10"),
            Err(ParseError::Inverted)
        );
        for bad in [
            "",
            "bytes",
            "bytes 0-9",
            "items 0-9/10",
            "bytes 0-/10",
            "bytes -9/10",
            "bytes  0-9/10",
            "bytes 0-9/10 ",
            "bytes +0-9/10",
            "bytes */10",
        ] {
            assert_eq!(
                ContentRange::parse(bad),
                Err(ParseError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_range_longer_than_a_u64_counts_is_refused() {
        // Found by the `content_range` fuzz target: `len()` overflowed on this range, which
        // the chunk handler measures before the geometry refuses it.
        let max = u64::MAX;
        assert_eq!(
            ContentRange::parse(&format!("bytes 0-{max}/{max}")),
            Err(ParseError::Overflow)
        );
        let longest = ContentRange::parse(&format!("bytes 1-{max}/{max}")).unwrap();
        assert_eq!(longest.len(), max);
        let largest_chunk = ContentRange::parse(&format!("bytes 0-{}/{max}", max - 1)).unwrap();
        assert_eq!(largest_chunk.len(), max);
    }

    #[test]
    fn any_chunk_determines_the_geometry() {
        let g = Geometry::new(25, 10).unwrap();
        assert_eq!(g.total_chunks, 3);
        assert_eq!(
            Geometry::from_chunk(ChunkIndex(0), 3, range(0, 9, 25)),
            Ok(g)
        );
        assert_eq!(
            Geometry::from_chunk(ChunkIndex(1), 3, range(10, 19, 25)),
            Ok(g)
        );
        assert_eq!(
            Geometry::from_chunk(ChunkIndex(2), 3, range(20, 24, 25)),
            Ok(g)
        );
        let single = Geometry::new(7, 7).unwrap();
        assert_eq!(
            Geometry::from_chunk(ChunkIndex(0), 1, range(0, 6, 7)),
            Ok(single)
        );
    }

    #[test]
    fn inconsistent_chunks_are_refused() {
        use GeometryError::*;
        let chunk = |i, n, r| Geometry::from_chunk(ChunkIndex(i), n, r);
        assert!(matches!(
            chunk(3, 3, range(0, 9, 25)),
            Err(IndexOutOfRange { .. })
        ));
        assert!(matches!(chunk(0, 0, range(0, 9, 25)), Err(NoChunks)));
        assert!(matches!(
            chunk(0, 3, range(0, 25, 25)),
            Err(RangeBeyondTotal { .. })
        ));
        assert!(matches!(
            chunk(2, 3, range(21, 24, 25)),
            Err(MisplacedChunk { .. })
        ));
        assert!(matches!(
            chunk(1, 3, range(11, 20, 25)),
            Err(WrongChunkLength { .. })
        ));
        assert!(matches!(
            chunk(0, 3, range(1, 10, 25)),
            Err(MisplacedChunk { .. })
        ));
        assert!(matches!(
            chunk(1, 3, range(10, 18, 25)),
            Err(WrongChunkLength { .. })
        ));
        assert!(matches!(
            chunk(2, 3, range(20, 23, 25)),
            Err(WrongChunkLength { .. })
        ));
        assert!(matches!(
            chunk(0, 4, range(0, 9, 25)),
            Err(WrongChunkCount { .. })
        ));
        assert!(matches!(
            chunk(0, 1, range(0, 9, 25)),
            Err(WrongChunkLength { .. })
        ));
        assert!(matches!(chunk(0, 1, range(0, 0, 0)), Err(EmptyUpload)));
    }

    proptest! {
        #[test]
        fn content_range_round_trips(start in 0u64..u64::MAX / 2, len in 1u64..1 << 40, extra in 0u64..1 << 40) {
            let r = range(start, start + len - 1, start + len + extra);
            prop_assert_eq!(ContentRange::parse(&r.to_string()), Ok(r));
        }

        #[test]
        fn content_range_parsing_never_panics(s in "\\PC{0,64}") {
            let _ = ContentRange::parse(&s);
        }

        #[test]
        fn decimal_parsing_agrees_with_u64(n: u64) {
            prop_assert_eq!(parse_decimal(&n.to_string()), Ok(n));
        }

        #[test]
        fn every_chunk_of_a_geometry_reproduces_it(total in 1u64..1 << 50, chunk in 1u64..1 << 30, pick: u64) {
            let g = Geometry::new(total, chunk).unwrap();
            let index = ChunkIndex(pick % g.total_chunks);
            let start = g.chunk_start(index);
            let r = range(start, start + g.chunk_len(index) - 1, total);
            prop_assert_eq!(Geometry::from_chunk(index, g.total_chunks, r), Ok(g));
            // The chunks tile the upload exactly.
            let last = ChunkIndex(g.total_chunks - 1);
            prop_assert_eq!(g.chunk_start(last) + g.chunk_len(last), total);
            prop_assert!(g.chunk_len(last) >= 1);
        }

        #[test]
        fn a_shifted_or_resized_chunk_is_refused(total in 2u64..1 << 40, chunk in 1u64..1 << 20, pick: u64, shift in 1u64..1000, grow: bool) {
            let g = Geometry::new(total, chunk).unwrap();
            let index = ChunkIndex(pick % g.total_chunks);
            let start = g.chunk_start(index);
            let len = g.chunk_len(index);
            let r = if grow {
                range(start, start + len - 1 + shift, total.max(start + len + shift))
            } else {
                range(start + shift, start + shift + len - 1, total.max(start + shift + len))
            };
            // Either the chunk is refused, or it describes a different, self-consistent geometry
            // (a client may declare any geometry on its first chunk) — never `g` itself.
            if let Ok(other) = Geometry::from_chunk(index, g.total_chunks, r) {
                prop_assert_ne!(other, g);
                prop_assert_eq!(other.chunk_start(index), r.start);
                prop_assert_eq!(other.chunk_len(index), r.len());
            }
        }
    }
}
