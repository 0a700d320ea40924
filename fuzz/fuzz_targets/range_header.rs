//! The `Range` header of downloads: `stitch_api::download::parse_range`.
//!
//! Input: text; the first line is the file's size (decimal; otherwise its length is used),
//! the rest the header's value. Properties: it never panics; a partial answer lies inside
//! the file (`start <= end < size`), so an empty file never gets one; and a plain
//! `bytes=A-B` inside the file is answered with exactly those bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_api::download::{RangeRequest, parse_range};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (size, header) = text.split_once('\n').unwrap_or(("", text));
    let size = size.parse::<u64>().unwrap_or(size.len() as u64);

    let answer = parse_range(Some(header), size);
    if let RangeRequest::Partial { start, end } = answer {
        assert!(
            start <= end && end < size,
            "{header:?} of {size}: {start}-{end}"
        );
    }
    if let Some((a, b)) = header
        .strip_prefix("bytes=")
        .and_then(|s| s.split_once('-'))
        && let (Some(a), Some(b)) = (digits(a), digits(b))
        && a <= b
        && b < size
    {
        assert_eq!(
            answer,
            RangeRequest::Partial { start: a, end: b },
            "{header:?}"
        );
    }
    assert_eq!(parse_range(None, size), RangeRequest::Full);
});

fn digits(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}
