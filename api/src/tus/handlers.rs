//! tus's handlers: parse, call one service function, answer with tus's headers.

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use stitch_common::upload::{Assembly, UploadState, UploadStatus};

use super::headers::{self as h, Concat};
use super::{TusConfig, TusError, checksum_mismatch};
use crate::AppState;
use crate::body::ChunkBody;
use crate::error::ApiError;
use crate::extract::{Caller, UploadIdPath};
use crate::handlers::files;
use crate::service::{Append, NewStream, ServiceError, UploadName};
use stitch_common::auth::Principal;

/// The front end's settings; `/files` routes exist only when tus is on.
fn config(app: &AppState) -> Result<&TusConfig, TusError> {
    app.tus.as_deref().ok_or(TusError::Api(ApiError::NoRoute))
}

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `OPTIONS /files/` and `/files/{id}`: what this server supports, exactly.
pub async fn options(State(app): State<AppState>) -> Result<Response, TusError> {
    let tus = config(&app)?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(h::TUS_VERSION, HeaderValue::from_static(h::VERSION));
    headers.insert(h::TUS_EXTENSION, HeaderValue::from_static(h::EXTENSIONS));
    headers.insert(h::TUS_MAX_SIZE, value(&tus.max_size.to_string()));
    headers.insert(
        h::TUS_CHECKSUM_ALGORITHM,
        HeaderValue::from_static(h::CHECKSUM_ALGORITHMS),
    );
    Ok(response)
}

/// `POST /files/`: creates an upload (`Upload-Length`), a partial one (`Upload-Concat:
/// partial`) or a concatenation (`Upload-Concat: final;…`); with a body of upload bytes,
/// appends it at once (creation-with-upload).
pub async fn create(
    State(app): State<AppState>,
    Caller(caller): Caller,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, TusError> {
    let tus = config(&app)?;
    let metadata = h::upload_metadata(&request_headers)?;
    let filename = metadata.as_ref().and_then(h::filename_of);
    let concat = h::upload_concat(&request_headers)?;
    let has_body = h::content_length(&request_headers)?.is_some_and(|n| n > 0)
        || request_headers.contains_key(header::TRANSFER_ENCODING);
    let status = match concat {
        Some(Concat::Final(parts)) => {
            if has_body {
                return Err(ServiceError::InvalidRequest(
                    "a concatenation has no body of its own".into(),
                )
                .into());
            }
            app.uploads
                .create_concatenation(&caller, parts, filename, metadata)
                .await?
        }
        partial => {
            let length = creation_length(&request_headers)?;
            let req = NewStream {
                length,
                filename,
                metadata,
                partial: partial == Some(Concat::Partial),
            };
            app.uploads.create_stream(&caller, req).await?
        }
    };
    let name = UploadName::parse(status.id.name())?;
    let location = format!(
        "{}/files/{}",
        base_url(&app, tus, &request_headers),
        name.as_str()
    );
    let offset = match status.assembly {
        Assembly::Concat { .. } => None,
        _ if has_body => {
            Some(append_with_creation(&app, tus, &caller, name, &request_headers, body).await?)
        }
        _ => None,
    };
    let mut response = StatusCode::CREATED.into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, value(&location));
    if let Some(offset) = offset {
        headers.insert(h::UPLOAD_OFFSET, value(&offset.to_string()));
    }
    if let Some(at) = app.uploads.expires_at_ms(&status) {
        headers.insert(h::UPLOAD_EXPIRES, value(&h::http_date(at)));
    }
    Ok(response)
}

/// The length a `POST` declares: `Upload-Length`, or none with `Upload-Defer-Length: 1`.
fn creation_length(headers: &HeaderMap) -> Result<Option<u64>, TusError> {
    match (h::upload_length(headers)?, h::defers_length(headers)?) {
        (Some(_), true) => Err(ApiError::InvalidHeader {
            header: "Upload-Defer-Length",
            reason: "and Upload-Length cannot both be sent".into(),
        }
        .into()),
        (None, false) => Err(ApiError::MissingHeader("Upload-Length").into()),
        (length, _) => Ok(length),
    }
}

/// creation-with-upload: the body of the `POST` that created upload `name`, appended at 0.
/// Returns where the upload's bytes end. A body that breaks off still answers `201` with
/// the offset reached (the upload exists; the client resumes from there); a wrong checksum
/// is `460`.
async fn append_with_creation(
    app: &AppState,
    tus: &TusConfig,
    caller: &Principal,
    name: UploadName,
    request_headers: &HeaderMap,
    body: Body,
) -> Result<u64, TusError> {
    if !h::is_offset_stream(request_headers)? {
        return Err(wrong_content_type());
    }
    let append = Append {
        id: name.clone(),
        offset: 0,
        length: h::content_length(request_headers)?,
        digest: h::upload_checksum(request_headers)?,
        upload_length: None,
    };
    let body = ChunkBody::new(None, body, 0, tus.body_limits)?;
    match app.uploads.append(caller, append, body).await {
        Ok(appended) => Ok(appended.offset),
        Err(e @ ServiceError::ChecksumMismatch { .. }) => {
            Err(TusError::Status(checksum_mismatch(), ApiError::Service(e)))
        }
        Err(e) => {
            tracing::info!(error = %e, "the body of a creation-with-upload was not all stored");
            Ok(app
                .uploads
                .upload_status(caller, &name)
                .await?
                .bytes_received)
        }
    }
}

/// `HEAD /files/{id}`: with `Tus-Resumable`, where the upload stands (`Upload-Offset`,
/// `Upload-Length`, never cached); without it, the download's headers.
pub async fn head(State(app): State<AppState>, request: Request) -> Response {
    if !super::speaks_tus(request.headers()) {
        return files::download_request(app, request).await;
    }
    let (mut parts, _) = request.into_parts();
    let answered: Result<Response, TusError> = async {
        config(&app)?;
        let Caller(caller) = Caller::from_request_parts(&mut parts, &app).await?;
        let UploadIdPath(name) = UploadIdPath::from_request_parts(&mut parts, &app).await?;
        let status = app.uploads.stream_status(&caller, &name).await?;
        Ok(upload_head(&app, &status))
    }
    .await;
    answered.unwrap_or_else(|e| {
        // HEAD answers carry no body.
        let mut response = e.into_response();
        *response.body_mut() = Body::empty();
        response
    })
}

fn upload_head(app: &AppState, status: &UploadStatus) -> Response {
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let size = status.geometry.total_size;
    if status.geometry.is_deferred() {
        headers.insert(h::UPLOAD_DEFER_LENGTH, HeaderValue::from_static("1"));
    } else {
        headers.insert(h::UPLOAD_LENGTH, value(&size.to_string()));
    }
    match &status.assembly {
        Assembly::Concat { parts } => {
            let urls: Vec<String> = parts
                .iter()
                .map(|p| format!("/files/{}", p.name()))
                .collect();
            headers.insert(
                h::UPLOAD_CONCAT,
                value(&format!("final;{}", urls.join(" "))),
            );
            // A concatenation has an offset only once it is done.
            if status.state == UploadState::Completed {
                headers.insert(h::UPLOAD_OFFSET, value(&size.to_string()));
            }
        }
        assembly => {
            if *assembly == (Assembly::Segments { partial: true }) {
                headers.insert(h::UPLOAD_CONCAT, HeaderValue::from_static("partial"));
            }
            let offset = match status.state {
                UploadState::Completed | UploadState::Merging => size,
                _ => status.bytes_received,
            };
            headers.insert(h::UPLOAD_OFFSET, value(&offset.to_string()));
        }
    }
    if let Some(encoded) = status.metadata.as_ref().and_then(h::encode_metadata) {
        headers.insert(h::UPLOAD_METADATA, value(&encoded));
    }
    if let Some(at) = app.uploads.expires_at_ms(status) {
        headers.insert(h::UPLOAD_EXPIRES, value(&h::http_date(at)));
    }
    response
}

/// `PATCH /files/{id}`: appends the body at `Upload-Offset`.
pub async fn patch(
    State(app): State<AppState>,
    Caller(caller): Caller,
    UploadIdPath(name): UploadIdPath,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, TusError> {
    let tus = config(&app)?;
    if !h::is_offset_stream(&request_headers)? {
        return Err(wrong_content_type());
    }
    let append = Append {
        id: name,
        offset: h::upload_offset(&request_headers)?,
        length: h::content_length(&request_headers)?,
        digest: h::upload_checksum(&request_headers)?,
        upload_length: h::upload_length(&request_headers)?,
    };
    let body = ChunkBody::new(None, body, 0, tus.body_limits)?;
    let appended = app
        .uploads
        .append(&caller, append, body)
        .await
        .map_err(|e| match e {
            ServiceError::ChecksumMismatch { .. } => {
                TusError::Status(checksum_mismatch(), ApiError::Service(e))
            }
            e => e.into(),
        })?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(h::UPLOAD_OFFSET, value(&appended.offset.to_string()));
    if let Some(at) = appended.expires_at_ms {
        headers.insert(h::UPLOAD_EXPIRES, value(&h::http_date(at)));
    }
    Ok(response)
}

fn wrong_content_type() -> TusError {
    TusError::Status(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ApiError::InvalidHeader {
            header: "Content-Type",
            reason: format!("must be {}", h::OFFSET_OCTET_STREAM),
        },
    )
}

/// The absolute base of `Location`: `http.public_url`, else the request's own address (from
/// `Forwarded` / `X-Forwarded-*` when trusted, else `Host`).
fn base_url(app: &AppState, tus: &TusConfig, headers: &HeaderMap) -> String {
    if let Some(url) = &app.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (mut proto, mut host) = (None, None);
    if tus.trust_forwarded {
        if let Some(forwarded) = text("forwarded") {
            // The first hop's `proto=` and `host=`.
            let first = forwarded.split(',').next().unwrap_or_default();
            for pair in first.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=') {
                    let v = v.trim_matches('"');
                    match k.trim().to_ascii_lowercase().as_str() {
                        "proto" => proto = Some(v.to_owned()),
                        "host" => host = Some(v.to_owned()),
                        _ => {}
                    }
                }
            }
        }
        proto = proto.or_else(|| {
            text("x-forwarded-proto").map(|p| p.split(',').next().unwrap_or(p).trim().to_owned())
        });
        host = host.or_else(|| {
            text("x-forwarded-host").map(|p| p.split(',').next().unwrap_or(p).trim().to_owned())
        });
    }
    let proto = proto
        .filter(|p| p == "http" || p == "https")
        .unwrap_or_else(|| "http".into());
    let host = host
        .or_else(|| text("host").map(str::to_owned))
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"/?#@\\".contains(&b))
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{proto}://{host}")
}
