//! Chunk geometry: `Geometry::from_chunk`, the geometry a chunk of the chunk protocol implies.
//!
//! Input: bytes, read as fixed fields (little-endian, zero-padded when short) so that the
//! fuzzer's integer mutations land on the numbers. Byte 0 chooses the form:
//! - even: five raw numbers, `u64` each: index, chunk count, start, end, total size;
//! - odd: a geometry (total size, chunk size: `u64`), one of its chunks (`u64`, modulo the
//!   chunk count) and small changes (`i8` each) to that chunk's start, its end and the chunk
//!   count, so that most inputs are near the valid ones, where the checks are.
//!
//! Properties: it never panics (every number is a client's); whatever it accepts is a
//! geometry `Geometry::new` would make, with the chunk inside the upload exactly where and as
//! long as the geometry says, and the declared chunk count; an unchanged chunk of a geometry
//! gives that geometry back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_common::geometry::{ChunkIndex, ContentRange, Geometry};

/// Fixed-width fields over the input, zeros past its end.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i8(&mut self) -> i8 {
        i8::from_le_bytes(self.take())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut f = Fields(data);
    if f.take::<1>()[0] % 2 == 0 {
        let (index, total_chunks, start, end, total_size) =
            (f.u64(), f.u64(), f.u64(), f.u64(), f.u64());
        // A parsed range always has `start <= end`.
        let (start, end) = (start.min(end), start.max(end));
        let range = ContentRange {
            start,
            end,
            total_size,
        };
        check(ChunkIndex(index), total_chunks, range, None);
    } else {
        let (total_size, chunk_size, pick) = (f.u64(), f.u64(), f.u64());
        let (shift, grow, more_chunks) = (f.i8(), f.i8(), f.i8());
        let Ok(g) = Geometry::new(total_size, chunk_size) else {
            return;
        };
        let index = ChunkIndex(pick % g.total_chunks);
        let first = g.chunk_start(index);
        let last = first + g.chunk_len(index) - 1;
        let (Some(start), Some(end), Some(total_chunks)) = (
            first.checked_add_signed(shift.into()),
            last.checked_add_signed(grow.into()),
            g.total_chunks.checked_add_signed(more_chunks.into()),
        ) else {
            return;
        };
        if start > end {
            return;
        }
        let range = ContentRange {
            start,
            end,
            total_size,
        };
        let unchanged = (shift, grow, more_chunks) == (0, 0, 0);
        check(index, total_chunks, range, unchanged.then_some(g));
    }
});

fn check(index: ChunkIndex, total_chunks: u64, range: ContentRange, expected: Option<Geometry>) {
    let result = Geometry::from_chunk(index, total_chunks, range);
    if let Some(g) = expected {
        assert_eq!(result, Ok(g), "chunk {index} of {g:?} refused: {range:?}");
    }
    let Ok(g) = result else {
        return;
    };
    assert_eq!(Geometry::new(g.total_size, g.chunk_size), Ok(g));
    assert_eq!(g.total_size, range.total_size);
    assert_eq!(g.total_chunks, total_chunks);
    assert!(index.0 < g.total_chunks);
    assert!(range.end < g.total_size);
    assert_eq!(g.chunk_start(index), range.start);
    assert_eq!(g.chunk_len(index), range.len());
    assert!(range.len() <= g.chunk_size);
    // The chunks tile the upload: all but the last are full, the last is not empty.
    let last = ChunkIndex(g.total_chunks - 1);
    assert_eq!(g.chunk_start(last) + g.chunk_len(last), g.total_size);
    assert!(g.chunk_len(last) >= 1);
    if index != last {
        assert_eq!(g.chunk_len(index), g.chunk_size);
    }
}
