//! MD5 digests in headers (`Content-MD5`, `X-Chunk-MD5`, `X-File-MD5`): `Md5::parse`.
//!
//! Input: the header value, as text. Properties, when it is accepted: it was 32 hex digits
//! (any case) or 24 characters of base64, and it is the canonical writing of the digest: the
//! hex form is the lowercased input, the base64 form is the input itself (no second spelling
//! of one digest in base64); both forms parse back to the same digest.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_common::digest::Md5;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Some(md5) = Md5::parse(raw) else {
        return;
    };
    match raw.len() {
        32 => assert_eq!(md5.to_hex(), raw.to_ascii_lowercase(), "{raw:?}"),
        24 => assert_eq!(md5.to_base64(), raw, "{raw:?}"),
        n => panic!("accepted a digest of {n} characters: {raw:?}"),
    }
    assert_eq!(Md5::parse(&md5.to_hex()), Some(md5));
    assert_eq!(Md5::parse(&md5.to_base64()), Some(md5));
});
