//! `POST /upload` (explicit create) and the status endpoints.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use stitch_common::auth::Principal;
use stitch_common::config::Interval;
use stitch_common::state::Created;

use super::views::StatusView;
use crate::AppState;
use crate::error::{ApiError, ServiceError};
use crate::extract::{Caller, UploadIdHeader, UploadIdPath};
use crate::service::CreateUpload;
use crate::service::UploadName;

/// Largest JSON body `POST /upload` reads, beyond the metadata limit.
const CREATE_BODY_SLACK: usize = 16 << 10;

pub async fn create_upload(
    State(app): State<AppState>,
    Caller(caller): Caller,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = app.max_metadata_bytes + CREATE_BODY_SLACK;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::InvalidJson(format!("the body is larger than {limit} bytes")))?;
    let request: CreateUpload =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let (created, status, secret) = app.uploads.create_upload(&caller, request).await?;
    let view = StatusView::new(status, app.public_url.as_deref());
    let code = match created {
        Created::New => StatusCode::CREATED,
        Created::AlreadyExists => StatusCode::OK,
    };
    let location = view.status_url.clone();
    let mut body = serde_json::to_value(view)
        .map_err(|e| ApiError::Service(ServiceError::Internal(e.to_string())))?;
    if let Some(secret) = secret {
        // The only place the callback secret ever appears: the response of the call that
        // created the upload.
        body["callback_secret"] = secret.into();
    }
    Ok((code, [(header::LOCATION, location)], Json(body)).into_response())
}

/// `?link_ttl=10m` on a status request: the download link carries a read-only token.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    link_ttl: Option<Interval>,
}

pub async fn status_by_header(
    State(app): State<AppState>,
    Caller(caller): Caller,
    UploadIdHeader(name): UploadIdHeader,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Json<StatusView>, ApiError> {
    status(app, caller, name, query).await
}

pub async fn status_by_path(
    State(app): State<AppState>,
    Caller(caller): Caller,
    UploadIdPath(name): UploadIdPath,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Json<StatusView>, ApiError> {
    status(app, caller, name, query).await
}

async fn status(
    app: AppState,
    caller: Principal,
    name: UploadName,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Json<StatusView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let status = app.uploads.upload_status(&caller, &name).await?;
    let mut view = StatusView::new(status.clone(), app.public_url.as_deref());
    if let (Some(ttl), Some(url)) = (query.link_ttl, &view.download_url) {
        view.download_url = Some(app.uploads.signed_link(&caller, &status, url, ttl)?);
    }
    Ok(Json(view))
}

/// `GET /uploads?limit=20&cursor=…`: the caller's uploads, newest first.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// The most uploads one page lists.
const MAX_PAGE: usize = 100;

pub async fn recent_uploads(
    State(app): State<AppState>,
    Caller(caller): Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let limit = query.limit.unwrap_or(20);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let (page, next) = app
        .uploads
        .recent_uploads(&caller, limit, query.cursor.as_deref())
        .await?;
    let views: Vec<StatusView> = page
        .into_iter()
        .map(|s| StatusView::new(s, app.public_url.as_deref()))
        .collect();
    Ok(Json(
        serde_json::json!({ "uploads": views, "next_cursor": next }),
    ))
}
