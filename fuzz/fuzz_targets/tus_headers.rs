//! tus's request headers: `Upload-Metadata`, `Upload-Checksum` and `Upload-Concat` as
//! `tus::headers` parses them.
//!
//! Input: a header block, one `name: value` per line, as a client could send it. Properties:
//! nothing panics; accepted metadata is written back by `encode_metadata` into a header that
//! parses to the same map; an accepted concatenation names only valid upload ids, at least
//! one; an accepted checksum's digest has its algorithm's length (the type says so).

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use stitch_api::tus::headers::{
    Concat, UPLOAD_METADATA, encode_metadata, upload_checksum, upload_concat, upload_metadata,
};
use stitch_common::id::UploadId;

fuzz_target!(|data: &[u8]| {
    let headers = header_block(data);
    if let Ok(Some(metadata)) = upload_metadata(&headers) {
        // Keys as tus allows them come back; the rest is not written out.
        let shown: serde_json::Map<_, _> = metadata
            .iter()
            .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic() && b != b','))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(encoded) = encode_metadata(&metadata) {
            let mut again = HeaderMap::new();
            again.insert(UPLOAD_METADATA, HeaderValue::from_str(&encoded).unwrap());
            let reread = upload_metadata(&again).unwrap().unwrap();
            assert_eq!(reread, shown, "metadata written back reads differently");
        } else {
            assert!(shown.is_empty(), "metadata with keys was not written back");
        }
    }
    let _ = upload_checksum(&headers);
    if let Ok(Some(Concat::Final(names))) = upload_concat(&headers) {
        assert!(!names.is_empty());
        for name in names {
            assert!(UploadId::parse(name.as_str()).is_ok(), "{name:?}");
        }
    }
});

/// `name: value` lines into a header map (repeated names are appended, as on the wire).
fn header_block(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim_ascii()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    headers
}
