//! Chunk bodies, raw (`application/octet-stream`) or `multipart/form-data` with the bytes in
//! a field named `file`, read as a stream of byte blocks with an idle timeout: a body is
//! never held whole in memory, and a client that stops sending is cut off.

use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::ApiError;

/// Bytes allowed in a multipart body beyond the chunk itself: boundaries, part headers and
/// small extra fields that browser form clients add.
const MULTIPART_OVERHEAD: u64 = 64 << 10;
/// The name of the multipart field that carries the chunk.
const FILE_FIELD: &str = "file";

/// A chunk body being read.
pub struct ChunkBody {
    source: Source,
    idle_timeout: Duration,
}

enum Source {
    Raw(BodyDataStream),
    Multipart(Box<MultipartSource>),
}

struct MultipartSource {
    multipart: multer::Multipart<'static>,
    /// The field being read.
    field: Option<multer::Field<'static>>,
    seen_file: bool,
}

impl ChunkBody {
    /// Wraps a request body. `expected_len` bounds a multipart body as a whole.
    pub fn new(
        content_type: Option<&str>,
        body: Body,
        expected_len: u64,
        idle_timeout: Duration,
    ) -> Result<Self, ApiError> {
        let is_multipart = content_type
            .and_then(|ct| ct.parse::<mime::Mime>().ok())
            .is_some_and(|m| m.type_() == mime::MULTIPART && m.subtype() == mime::FORM_DATA);
        let source = if is_multipart {
            let boundary = multer::parse_boundary(content_type.unwrap_or_default())
                .map_err(|e| ApiError::InvalidBody(format!("bad multipart Content-Type: {e}")))?;
            let constraints = multer::Constraints::new().size_limit(
                multer::SizeLimit::new()
                    .whole_stream(expected_len.saturating_add(MULTIPART_OVERHEAD))
                    .per_field(expected_len.saturating_add(1).max(MULTIPART_OVERHEAD)),
            );
            Source::Multipart(Box::new(MultipartSource {
                multipart: multer::Multipart::with_constraints(
                    body.into_data_stream(),
                    boundary,
                    constraints,
                ),
                field: None,
                seen_file: false,
            }))
        } else {
            Source::Raw(body.into_data_stream())
        };
        Ok(Self {
            source,
            idle_timeout,
        })
    }

    /// Whether the body is multipart (its Content-Length then includes the framing).
    pub fn is_multipart(&self) -> bool {
        matches!(self.source, Source::Multipart(_))
    }

    /// The next block of chunk bytes, or `None` at the end of the chunk (for multipart: after
    /// the rest of the form was read and found to hold no second `file` field).
    pub async fn next(&mut self) -> Result<Option<Bytes>, ApiError> {
        let idle = self.idle_timeout;
        match &mut self.source {
            Source::Raw(stream) => match within(idle, stream.next()).await? {
                None => Ok(None),
                Some(Ok(bytes)) => Ok(Some(bytes)),
                Some(Err(e)) => Err(ApiError::InvalidBody(e.to_string())),
            },
            Source::Multipart(source) => loop {
                let MultipartSource {
                    multipart,
                    field,
                    seen_file,
                } = &mut **source;
                if let Some(current) = field {
                    let is_file = current.name() == Some(FILE_FIELD);
                    match within(idle, current.chunk())
                        .await?
                        .map_err(multipart_error)?
                    {
                        Some(bytes) if is_file => return Ok(Some(bytes)),
                        Some(_) => continue,
                        None => *field = None,
                    }
                }
                match within(idle, multipart.next_field())
                    .await?
                    .map_err(multipart_error)?
                {
                    Some(next) => {
                        if next.name() == Some(FILE_FIELD) {
                            if *seen_file {
                                return Err(ApiError::InvalidBody(
                                    "more than one field named `file`".into(),
                                ));
                            }
                            *seen_file = true;
                        }
                        *field = Some(next);
                    }
                    None if *seen_file => return Ok(None),
                    None => {
                        return Err(ApiError::InvalidBody(
                            "the multipart form has no field named `file`".into(),
                        ));
                    }
                }
            },
        }
    }
}

async fn within<F: std::future::Future>(idle: Duration, f: F) -> Result<F::Output, ApiError> {
    tokio::time::timeout(idle, f)
        .await
        .map_err(|_| ApiError::BodyTimeout)
}

fn multipart_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ApiError::InvalidBody("the multipart body is larger than the chunk allows".into())
        }
        other => ApiError::InvalidBody(other.to_string()),
    }
}
