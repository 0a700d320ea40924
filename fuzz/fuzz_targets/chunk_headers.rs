//! `PUT /upload/chunk`'s headers: `ChunkHeaders::parse`, then the geometry the service
//! derives from them (`Geometry::from_chunk`).
//!
//! Input: a header block, one `name: value` per line, as a client could send it (names and
//! values that `http` refuses are left out). Properties, when the headers are accepted:
//! each header the parse reads was sent exactly once (required) or at most once (optional);
//! every value is taken as sent (the id is the `X-File-ID` value and a valid id, the numbers
//! are the decimal values, the range is the `Content-Range` value re-read); the range is
//! `start <= end` with a length that fits in a `u64`; and when the geometry accepts the
//! chunk, the chunk lies inside the upload exactly where the geometry puts it.

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use stitch_api::extract::{
    CHUNK_INDEX, CHUNK_MD5, ChunkHeaders, FILE_ID, FILE_MD5, FILE_NAME, TOTAL_CHUNKS,
};
use stitch_common::digest::Md5;
use stitch_common::geometry::{ContentRange, Geometry};
use stitch_common::id::UploadId;

const REQUIRED: [&str; 4] = [FILE_ID, CHUNK_INDEX, TOTAL_CHUNKS, "content-range"];
const OPTIONAL: [&str; 5] = [
    FILE_NAME,
    FILE_MD5,
    CHUNK_MD5,
    "content-md5",
    "content-length",
];

fuzz_target!(|data: &[u8]| {
    let headers = header_block(data);
    let Ok(parsed) = ChunkHeaders::parse(&headers) else {
        return;
    };
    check_accepted(&headers, &parsed);
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
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim_ascii()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    headers
}

fn check_accepted(headers: &HeaderMap, parsed: &ChunkHeaders) {
    for name in REQUIRED {
        assert_eq!(
            headers.get_all(name).iter().count(),
            1,
            "{name} not sent once"
        );
    }
    for name in OPTIONAL {
        assert!(
            headers.get_all(name).iter().count() <= 1,
            "{name} sent twice"
        );
    }
    let value = |name: &str| {
        headers.get(name).map(|v| {
            v.to_str()
                .unwrap_or_else(|_| panic!("{name} accepted with a non-ASCII value"))
        })
    };
    let required = |name: &str| value(name).expect("a required header was checked above");

    // The id: the header's value, and a valid upload id.
    let id = parsed.id.as_str();
    assert_eq!(id, required(FILE_ID));
    let scoped = UploadId::parse(id).expect("an accepted id is an upload id");
    assert_eq!(scoped.name(), id);
    assert!(
        !id.contains(['/', '.', '{', '}', '*', ':', '\\', '~']),
        "{id:?}"
    );

    // The numbers: exactly the decimal values.
    assert_eq!(Some(parsed.index.0), decimal(required(CHUNK_INDEX)));
    assert_eq!(Some(parsed.total_chunks), decimal(required(TOTAL_CHUNKS)));
    assert_eq!(
        parsed.content_length,
        value("content-length").map(|v| decimal(v).expect("an accepted Content-Length"))
    );

    // The range: ordered, with a length that fits, and the header's value.
    let range = parsed.range;
    assert!(range.start <= range.end, "{range:?}");
    let len = (range.end - range.start)
        .checked_add(1)
        .unwrap_or_else(|| panic!("{range:?} covers more bytes than a u64 counts"));
    assert_eq!(range.len(), len);
    assert_eq!(ContentRange::parse(required("content-range")), Ok(range));
    assert_eq!(ContentRange::parse(&range.to_string()), Ok(range));

    // The name has no control characters; the digests are the headers' (and agree).
    if let Some(name) = &parsed.filename {
        assert!(
            !name.is_empty() && !name.chars().any(char::is_control),
            "{name:?}"
        );
    }
    let md5 = |name: &str| value(name).map(|v| Md5::parse(v).expect("an accepted MD5"));
    assert_eq!(parsed.file_md5, md5(FILE_MD5));
    match (md5("content-md5"), md5(CHUNK_MD5)) {
        (Some(a), Some(b)) => {
            assert_eq!(a, b, "disagreeing chunk digests accepted");
            assert_eq!(parsed.chunk_md5, Some(a));
        }
        (a, b) => assert_eq!(parsed.chunk_md5, a.or(b)),
    }

    // What the service does next: the geometry this chunk implies, if any.
    if let Ok(g) = Geometry::from_chunk(parsed.index, parsed.total_chunks, range) {
        assert!(
            range.end < g.total_size && len <= g.total_size,
            "{range:?} {g:?}"
        );
        assert!(parsed.index.0 < g.total_chunks);
        assert_eq!(g.total_chunks, parsed.total_chunks);
        assert_eq!(g.chunk_start(parsed.index), range.start);
        assert_eq!(g.chunk_len(parsed.index), len);
    }
}

fn decimal(raw: &str) -> Option<u64> {
    raw.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| raw.parse().ok())
        .flatten()
}
