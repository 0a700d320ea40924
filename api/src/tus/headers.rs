//! tus's request headers parsed into service values, and the values of its response
//! headers. Every header is untrusted: each is found once, bounded, and named in the error.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use stitch_common::digest::Md5;

use crate::error::ApiError;
use crate::extract::{decimal, single};
use crate::service::{DeclaredDigest, UploadName};

pub const TUS_RESUMABLE: &str = "tus-resumable";
pub const TUS_VERSION: &str = "tus-version";
pub const TUS_EXTENSION: &str = "tus-extension";
pub const TUS_MAX_SIZE: &str = "tus-max-size";
pub const TUS_CHECKSUM_ALGORITHM: &str = "tus-checksum-algorithm";
pub const UPLOAD_LENGTH: &str = "upload-length";
pub const UPLOAD_OFFSET: &str = "upload-offset";
pub const UPLOAD_METADATA: &str = "upload-metadata";
pub const UPLOAD_DEFER_LENGTH: &str = "upload-defer-length";
pub const UPLOAD_CONCAT: &str = "upload-concat";
pub const UPLOAD_CHECKSUM: &str = "upload-checksum";
pub const UPLOAD_EXPIRES: &str = "upload-expires";
pub const METHOD_OVERRIDE: &str = "x-http-method-override";

/// The protocol version this server speaks.
pub const VERSION: &str = "1.0.0";
/// The extensions that work, exactly (`OPTIONS` advertises them).
pub const EXTENSIONS: &str = "creation,creation-with-upload,creation-defer-length,termination,checksum,expiration,concatenation";
/// The `Upload-Checksum` algorithms accepted.
pub const CHECKSUM_ALGORITHMS: &str = "md5,sha1,sha256,crc32c";
/// The content type of a body of upload bytes.
pub const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

/// Bound on `Upload-Metadata` as sent: the decoded metadata is bounded again by
/// `limits.max_metadata_bytes`.
const MAX_METADATA_HEADER: usize = 16 << 10;

fn invalid(header: &'static str, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidHeader {
        header,
        reason: reason.into(),
    }
}

/// `Upload-Length`, when present.
pub fn upload_length(headers: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    match single(headers, UPLOAD_LENGTH)? {
        None => Ok(None),
        Some(_) => decimal(headers, UPLOAD_LENGTH).map(Some),
    }
}

/// `Upload-Defer-Length: 1` (any other value is refused).
pub fn defers_length(headers: &axum::http::HeaderMap) -> Result<bool, ApiError> {
    match single(headers, UPLOAD_DEFER_LENGTH)? {
        None => Ok(false),
        Some("1") => Ok(true),
        Some(_) => Err(invalid("Upload-Defer-Length", "must be 1")),
    }
}

/// `Upload-Offset`, required on `PATCH`.
pub fn upload_offset(headers: &axum::http::HeaderMap) -> Result<u64, ApiError> {
    decimal(headers, UPLOAD_OFFSET)
}

/// Whether the body is upload bytes (`Content-Type: application/offset+octet-stream`).
pub fn is_offset_stream(headers: &axum::http::HeaderMap) -> Result<bool, ApiError> {
    Ok(single(headers, "content-type")?.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(OFFSET_OCTET_STREAM))
    }))
}

/// `Content-Length`, when declared.
pub fn content_length(headers: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    match single(headers, "content-length")? {
        None => Ok(None),
        Some(_) => decimal(headers, "content-length").map(Some),
    }
}

/// `Upload-Metadata`: comma-separated `key base64value` pairs (the value may be absent).
/// Keys are ASCII without spaces or commas, unique; values decode to UTF-8 text (a value that
/// is not text is refused: it could not be shown back as the client sent it).
pub fn upload_metadata(
    headers: &axum::http::HeaderMap,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, ApiError> {
    let Some(raw) = single(headers, UPLOAD_METADATA)? else {
        return Ok(None);
    };
    if raw.len() > MAX_METADATA_HEADER {
        return Err(invalid(
            "Upload-Metadata",
            format!("is longer than {MAX_METADATA_HEADER} bytes"),
        ));
    }
    let mut map = serde_json::Map::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut words = pair.split(' ').filter(|w| !w.is_empty());
        let key = words.next().unwrap_or_default();
        let value = words.next();
        if words.next().is_some() {
            return Err(invalid(
                "Upload-Metadata",
                format!("pair {key:?} has more than a key and a value"),
            ));
        }
        let value = match value {
            None => String::new(),
            Some(encoded) => STANDARD
                .decode(encoded)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    invalid(
                        "Upload-Metadata",
                        format!("the value of {key:?} is not base64 of UTF-8 text"),
                    )
                })?,
        };
        if map.insert(key.to_owned(), value.into()).is_some() {
            return Err(invalid(
                "Upload-Metadata",
                format!("key {key:?} appears twice"),
            ));
        }
    }
    Ok(Some(map))
}

/// The file name tus clients put in their metadata (`filename`, or `name` as some send).
pub fn filename_of(metadata: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    ["filename", "name"]
        .iter()
        .find_map(|k| metadata.get(*k).and_then(|v| v.as_str()))
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
}

/// `Upload-Metadata` for a response: the text values of the upload's metadata.
pub fn encode_metadata(metadata: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let pairs: Vec<String> = metadata
        .iter()
        .filter(|(key, _)| {
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic() && b != b',')
        })
        .filter_map(|(key, value)| match value.as_str()? {
            "" => Some(key.clone()),
            text => Some(format!("{key} {}", STANDARD.encode(text))),
        })
        .collect();
    (!pairs.is_empty()).then(|| pairs.join(","))
}

/// `Upload-Checksum: <algorithm> <base64 digest>`.
pub fn upload_checksum(
    headers: &axum::http::HeaderMap,
) -> Result<Option<DeclaredDigest>, ApiError> {
    let Some(raw) = single(headers, UPLOAD_CHECKSUM)? else {
        return Ok(None);
    };
    let (algorithm, encoded) = raw
        .trim()
        .split_once(' ')
        .ok_or_else(|| invalid("Upload-Checksum", "must be `<algorithm> <base64 digest>`"))?;
    let bytes = STANDARD
        .decode(encoded.trim())
        .map_err(|_| invalid("Upload-Checksum", "the digest is not base64"))?;
    let wrong_length = || {
        invalid(
            "Upload-Checksum",
            format!("a {algorithm} digest has another length"),
        )
    };
    let digest = match algorithm.to_ascii_lowercase().as_str() {
        "md5" => DeclaredDigest::Md5(Md5::from_bytes(
            bytes.try_into().map_err(|_| wrong_length())?,
        )),
        "sha1" => DeclaredDigest::Sha1(bytes.try_into().map_err(|_| wrong_length())?),
        "sha256" => DeclaredDigest::Sha256(bytes.try_into().map_err(|_| wrong_length())?),
        "crc32c" => DeclaredDigest::Crc32c(u32::from_be_bytes(
            bytes.try_into().map_err(|_| wrong_length())?,
        )),
        _ => {
            return Err(invalid(
                "Upload-Checksum",
                format!("algorithm {algorithm:?} is not one of {CHECKSUM_ALGORITHMS}"),
            ));
        }
    };
    Ok(Some(digest))
}

/// What `Upload-Concat` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Concat {
    Partial,
    /// The uploads to concatenate, by the names in their URLs, in order.
    Final(Vec<UploadName>),
}

/// `Upload-Concat: partial` or `final;<url> <url> …` (absolute URLs or paths, each ending
/// in `/files/<id>`).
pub fn upload_concat(headers: &axum::http::HeaderMap) -> Result<Option<Concat>, ApiError> {
    let Some(raw) = single(headers, UPLOAD_CONCAT)? else {
        return Ok(None);
    };
    if raw.trim() == "partial" {
        return Ok(Some(Concat::Partial));
    }
    let Some(list) = raw.trim().strip_prefix("final;") else {
        return Err(invalid(
            "Upload-Concat",
            "must be `partial` or `final;<url> <url> …`",
        ));
    };
    let names = list
        .split(' ')
        .filter(|u| !u.is_empty())
        .map(|url| {
            let name = url
                .split_once("/files/")
                .map(|(_, rest)| rest.trim_end_matches('/'))
                .filter(|rest| !rest.is_empty() && !rest.contains(['/', '?', '#']))
                .ok_or_else(|| {
                    invalid(
                        "Upload-Concat",
                        format!("{url:?} is not the URL of an upload"),
                    )
                })?;
            UploadName::parse(name).map_err(|e| invalid("Upload-Concat", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if names.is_empty() {
        return Err(invalid("Upload-Concat", "names no upload"));
    }
    Ok(Some(Concat::Final(names)))
}

/// `Upload-Expires` (an HTTP date) for a time in ms since the epoch.
pub fn http_date(ms: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[test]
    fn metadata_decodes_pairs_and_keys_without_values() {
        let m = upload_metadata(&with(
            UPLOAD_METADATA,
            "filename d29ybGQudHh0,is_confidential",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(m["filename"], "world.txt");
        assert_eq!(m["is_confidential"], "");
        assert_eq!(filename_of(&m).as_deref(), Some("world.txt"));
        let back = encode_metadata(&m).unwrap();
        let again = upload_metadata(&with(UPLOAD_METADATA, &back))
            .unwrap()
            .unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn metadata_refuses_repeats_bad_base64_and_extra_words() {
        for bad in ["a YQ==,a Yg==", "a !!!", "a YQ== YQ==", "a /w=="] {
            assert!(
                upload_metadata(&with(UPLOAD_METADATA, bad)).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn checksums_parse_by_algorithm_and_length() {
        let sha1 = STANDARD.encode([7u8; 20]);
        assert_eq!(
            upload_checksum(&with(UPLOAD_CHECKSUM, &format!("sha1 {sha1}"))).unwrap(),
            Some(DeclaredDigest::Sha1([7; 20]))
        );
        assert_eq!(
            upload_checksum(&with(UPLOAD_CHECKSUM, "crc32c AAAAAQ==")).unwrap(),
            Some(DeclaredDigest::Crc32c(1))
        );
        for bad in ["sha1", "sha1 AAAA", "whirlpool AAAA", "md5 !!"] {
            assert!(
                upload_checksum(&with(UPLOAD_CHECKSUM, bad)).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn concat_names_the_uploads_in_order_from_urls_or_paths() {
        let Some(Concat::Final(names)) =
            upload_concat(&with(UPLOAD_CONCAT, "final;http://h:1/files/a1 /files/b2")).unwrap()
        else {
            panic!("not a final concatenation")
        };
        let names: Vec<&str> = names.iter().map(UploadName::as_str).collect();
        assert_eq!(names, ["a1", "b2"]);
        assert_eq!(
            upload_concat(&with(UPLOAD_CONCAT, "partial")).unwrap(),
            Some(Concat::Partial)
        );
        for bad in [
            "final;",
            "final;/other/a",
            "final;/files/../x",
            "whole",
            "final;/files/a/b",
        ] {
            assert!(
                upload_concat(&with(UPLOAD_CONCAT, bad)).is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}
