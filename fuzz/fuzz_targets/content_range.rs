//! `Content-Range` values: `ContentRange::parse`.
//!
//! Input: the header value, as text. Properties, when it is accepted: the range is
//! `start <= end` with a length that fits in a `u64`; it is written back (`Display`) as
//! `bytes START-END/TOTAL` and that reads as the same range; and what was accepted had that
//! form (a case-insensitive unit, then only digits, `-` and `/`), written no shorter than
//! the canonical form (the only freedom is leading zeros and the unit's case).

#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_common::geometry::ContentRange;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(range) = ContentRange::parse(raw) else {
        return;
    };
    assert!(range.start <= range.end, "{range:?}");
    let len = (range.end - range.start)
        .checked_add(1)
        .unwrap_or_else(|| panic!("{raw:?}: {range:?} covers more bytes than a u64 counts"));
    assert_eq!(range.len(), len);
    assert!(!range.is_empty());

    let canonical = range.to_string();
    assert_eq!(ContentRange::parse(&canonical), Ok(range), "{canonical:?}");
    let (unit, spec) = raw.split_once(' ').expect("an accepted range has a unit");
    assert!(unit.eq_ignore_ascii_case("bytes"), "{raw:?}");
    assert!(
        spec.bytes()
            .all(|b| b.is_ascii_digit() || b == b'-' || b == b'/'),
        "{raw:?}"
    );
    assert!(
        raw.len() >= canonical.len(),
        "{raw:?} shorter than {canonical:?}"
    );
    let unpadded = |s: &str| s.trim_start_matches('0').to_owned();
    let numbers = |s: &str| -> Vec<String> { s.split(['-', '/']).map(unpadded).collect() };
    assert_eq!(
        numbers(spec),
        numbers(&canonical["bytes ".len()..]),
        "{raw:?}"
    );
});
