//! Extractors: untrusted headers and paths in, validated values out. Parsing rules live in
//! `stitch_common::geometry` and `stitch_common::id`; this module only finds the headers,
//! refuses duplicates and names the offending header in its error.

use axum::extract::{ConnectInfo, FromRequestParts, Path};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use stitch_common::auth::{Presented, Principal};
use stitch_common::digest::Md5;
use stitch_common::geometry::{ChunkIndex, ContentRange, parse_decimal};

use crate::AppState;
use crate::error::{ApiError, ServiceError};
use crate::service::{ChunkPart, UploadName};

pub const FILE_ID: &str = "x-file-id";
pub const CHUNK_INDEX: &str = "x-chunk-index";
pub const TOTAL_CHUNKS: &str = "x-total-chunks";
pub const FILE_NAME: &str = "x-file-name";
pub const FILE_MD5: &str = "x-file-md5";
pub const CHUNK_MD5: &str = "x-chunk-md5";

/// Header names as clients usually write them, for error messages.
fn display_name(name: &'static str) -> &'static str {
    match name {
        FILE_ID => "X-File-ID",
        CHUNK_INDEX => "X-Chunk-Index",
        TOTAL_CHUNKS => "X-Total-Chunks",
        FILE_NAME => "X-File-Name",
        FILE_MD5 => "X-File-MD5",
        CHUNK_MD5 => "X-Chunk-MD5",
        "content-range" => "Content-Range",
        "content-md5" => "Content-MD5",
        "content-length" => "Content-Length",
        other => other,
    }
}

/// The one value of header `name`, as text; `None` when absent. Repeated headers and
/// values that are not visible ASCII are errors.
pub(crate) fn single<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::DuplicateHeader(display_name(name)));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| ApiError::InvalidHeader {
            header: display_name(name),
            reason: "must be visible ASCII".into(),
        })
}

pub(crate) fn required<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<&'a str, ApiError> {
    single(headers, name)?.ok_or(ApiError::MissingHeader(display_name(name)))
}

pub(crate) fn decimal(headers: &HeaderMap, name: &'static str) -> Result<u64, ApiError> {
    parse_decimal(required(headers, name)?).map_err(|e| ApiError::InvalidHeader {
        header: display_name(name),
        reason: e.to_string(),
    })
}

fn md5(headers: &HeaderMap, name: &'static str) -> Result<Option<Md5>, ApiError> {
    single(headers, name)?
        .map(|raw| {
            Md5::parse(raw).ok_or(ApiError::InvalidHeader {
                header: display_name(name),
                reason: "must be an MD5 digest: 32 hex digits or 24 characters of base64".into(),
            })
        })
        .transpose()
}

/// The upload id from `X-File-ID`.
pub fn upload_id_header(headers: &HeaderMap) -> Result<UploadName, ApiError> {
    Ok(UploadName::parse(required(headers, FILE_ID)?)?)
}

/// Decodes `X-File-Name`: percent-encoded UTF-8 (so that any name fits in a header), without
/// control characters.
pub fn decode_filename(raw: &str) -> Result<String, ApiError> {
    let invalid = |reason: &str| ApiError::InvalidHeader {
        header: "X-File-Name",
        reason: reason.into(),
    };
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| invalid("must be percent-encoded UTF-8"))?;
    if decoded.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if decoded.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters"));
    }
    Ok(decoded.into_owned())
}

/// The headers of `PUT /upload/chunk`, parsed and checked for form (not yet against limits
/// or the upload's geometry: that is the service's job).
#[derive(Clone, Debug)]
pub struct ChunkHeaders {
    pub id: UploadName,
    pub index: ChunkIndex,
    pub total_chunks: u64,
    pub range: ContentRange,
    pub filename: Option<String>,
    pub file_md5: Option<Md5>,
    /// From `Content-MD5` or `X-Chunk-MD5` (they must agree when both are sent).
    pub chunk_md5: Option<Md5>,
    pub content_length: Option<u64>,
}

impl ChunkHeaders {
    pub fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
        let id = upload_id_header(headers)?;
        let index = ChunkIndex(decimal(headers, CHUNK_INDEX)?);
        let total_chunks = decimal(headers, TOTAL_CHUNKS)?;
        let range = ContentRange::parse(required(headers, "content-range")?).map_err(|e| {
            ApiError::InvalidHeader {
                header: "Content-Range",
                reason: e.to_string(),
            }
        })?;
        let filename = single(headers, FILE_NAME)?
            .map(decode_filename)
            .transpose()?;
        let file_md5 = md5(headers, FILE_MD5)?;
        let chunk_md5 = match (md5(headers, "content-md5")?, md5(headers, CHUNK_MD5)?) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::InvalidHeader {
                    header: "Content-MD5",
                    reason: "disagrees with X-Chunk-MD5".into(),
                });
            }
            (a, b) => a.or(b),
        };
        let content_length = single(headers, "content-length")?
            .map(|raw| {
                parse_decimal(raw).map_err(|e| ApiError::InvalidHeader {
                    header: "Content-Length",
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        Ok(Self {
            id,
            index,
            total_chunks,
            range,
            filename,
            file_md5,
            chunk_md5,
            content_length,
        })
    }
}

impl ChunkHeaders {
    /// The part these headers declare, for the upload service.
    pub fn part(&self) -> ChunkPart {
        ChunkPart {
            id: self.id.clone(),
            index: self.index,
            total_chunks: self.total_chunks,
            range: self.range,
            filename: self.filename.clone(),
            file_md5: self.file_md5,
            chunk_md5: self.chunk_md5,
        }
    }

    /// `Content-Length` against the range, for a raw body (a multipart body is longer than
    /// its part): HTTP's own framing, checked before the body is read.
    pub fn check_length(&self, multipart: bool) -> Result<(), ApiError> {
        let expected = self.range.len();
        match self.content_length {
            _ if multipart => Ok(()),
            Some(0) => Err(ServiceError::EmptyChunk.into()),
            Some(declared) if declared != expected => {
                Err(ServiceError::LengthMismatch { declared, expected }.into())
            }
            _ => Ok(()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ChunkHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Self::parse(&parts.headers)
    }
}

/// An upload id from the `{id}` path segment.
pub struct UploadIdPath(pub UploadName);

impl<S: Send + Sync> FromRequestParts<S> for UploadIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NoRoute)?;
        Ok(Self(UploadName::parse(&raw)?))
    }
}

/// An upload id from the `X-File-ID` header.
pub struct UploadIdHeader(pub UploadName);

impl<S: Send + Sync> FromRequestParts<S> for UploadIdHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        upload_id_header(&parts.headers).map(Self)
    }
}

/// The authenticated caller: `Authorization: Bearer` (an API key or a capability token), or
/// nobody where the auth mode lets nobody in. Refuses with 401 otherwise.
pub struct Caller(pub Principal);

/// As [`Caller`], also accepting a capability token in `?token=` (download links).
pub struct DownloadCaller(pub Principal);

fn authenticate(
    parts: &Parts,
    app: &AppState,
    query_token: Option<&str>,
) -> Result<Principal, ApiError> {
    let authorization = single(&parts.headers, "authorization").map_err(|_| {
        ApiError::from(ServiceError::Unauthorized(
            "send one Authorization header".into(),
        ))
    })?;
    let peer = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    Ok(app.auth.authenticate(Presented {
        authorization,
        query_token,
        peer,
    })?)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, app, None).map(Self)
    }
}

impl FromRequestParts<AppState> for DownloadCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let token = parts.uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        authenticate(parts, app, token.as_deref()).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            (FILE_ID, "abc"),
            (CHUNK_INDEX, "1"),
            (TOTAL_CHUNKS, "3"),
            ("content-range", "bytes 10-19/25"),
        ]
    }

    #[test]
    fn a_complete_set_of_headers_parses() {
        let mut h = base();
        h.push((FILE_NAME, "r%C3%A9sum%C3%A9%20final.pdf"));
        h.push(("content-md5", "nhB9nTcrtoJr2B01QqQZ1g=="));
        h.push((CHUNK_MD5, "9e107d9d372bb6826bd81d3542a419d6"));
        let parsed = ChunkHeaders::parse(&headers(&h)).unwrap();
        assert_eq!(parsed.index, ChunkIndex(1));
        assert_eq!(parsed.total_chunks, 3);
        assert_eq!(parsed.range.len(), 10);
        assert_eq!(parsed.filename.as_deref(), Some("résumé final.pdf"));
        assert!(parsed.chunk_md5.is_some());
    }

    #[test]
    fn each_required_header_is_named_when_missing() {
        for (name, display) in [
            (FILE_ID, "X-File-ID"),
            (CHUNK_INDEX, "X-Chunk-Index"),
            (TOTAL_CHUNKS, "X-Total-Chunks"),
            ("content-range", "Content-Range"),
        ] {
            let h: Vec<_> = base().into_iter().filter(|(k, _)| *k != name).collect();
            let err = ChunkHeaders::parse(&headers(&h)).unwrap_err();
            assert!(
                matches!(err, ApiError::MissingHeader(n) if n == display),
                "{err:?}"
            );
        }
    }

    #[test]
    fn repeated_and_malformed_headers_are_refused() {
        let mut h = base();
        h.push((CHUNK_INDEX, "2"));
        assert!(matches!(
            ChunkHeaders::parse(&headers(&h)),
            Err(ApiError::DuplicateHeader("X-Chunk-Index"))
        ));
        for (name, value) in [
            (CHUNK_INDEX, "-1"),
            (CHUNK_INDEX, "+1"),
            (CHUNK_INDEX, "0x1"),
            (TOTAL_CHUNKS, "99999999999999999999999"),
            ("content-range", "bytes 10-19/*"),
            (FILE_ID, "../etc"),
            ("content-md5", "nope"),
            (FILE_NAME, "%ff"),
            (FILE_NAME, "a%0Ab"),
        ] {
            let mut h: Vec<_> = base().into_iter().filter(|(k, _)| *k != name).collect();
            h.push((name, value));
            assert!(
                ChunkHeaders::parse(&headers(&h)).is_err(),
                "{name}: {value} was accepted"
            );
        }
    }

    #[test]
    fn disagreeing_chunk_digests_are_refused() {
        let mut h = base();
        h.push(("content-md5", "nhB9nTcrtoJr2B01QqQZ1g=="));
        h.push((CHUNK_MD5, "00000000000000000000000000000000"));
        assert!(ChunkHeaders::parse(&headers(&h)).is_err());
    }

    proptest! {
        #[test]
        fn header_parsing_never_panics(index in "\\PC{0,24}", total in "\\PC{0,24}", range in "\\PC{0,40}", id in "\\PC{0,20}") {
            let mut map = HeaderMap::new();
            for (k, v) in [(FILE_ID, id), (CHUNK_INDEX, index), (TOTAL_CHUNKS, total), ("content-range", range)] {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    map.append(k, v);
                }
            }
            let _ = ChunkHeaders::parse(&map);
        }

        #[test]
        fn valid_headers_parse_to_their_values(index: u64, total: u64, start in 0u64..1 << 60, len in 1u64..1 << 30) {
            let range = format!("bytes {}-{}/{}", start, start + len - 1, start + len);
            let map = headers(&[(FILE_ID, "x"), (CHUNK_INDEX, &index.to_string()), (TOTAL_CHUNKS, &total.to_string()), ("content-range", &range)]);
            let parsed = ChunkHeaders::parse(&map).unwrap();
            prop_assert_eq!(parsed.index, ChunkIndex(index));
            prop_assert_eq!(parsed.total_chunks, total);
            prop_assert_eq!(parsed.range.len(), len);
        }
    }
}
