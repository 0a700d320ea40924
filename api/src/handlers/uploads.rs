//! `POST /upload` (explicit create) and the status endpoints.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use stitch_common::state::Created;

use super::views::StatusView;
use crate::AppState;
use crate::error::ApiError;
use crate::extract::{UploadIdHeader, UploadIdPath};
use crate::service::CreateUpload;

/// Largest JSON body `POST /upload` reads, beyond the metadata limit.
const CREATE_BODY_SLACK: usize = 16 << 10;

pub async fn create_upload(State(app): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let limit = app.max_metadata_bytes + CREATE_BODY_SLACK;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::InvalidJson(format!("the body is larger than {limit} bytes")))?;
    let request: CreateUpload =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let (created, status) = app.uploads.create_upload(request).await?;
    let secret = status.callback_secret.clone();
    let view = StatusView::new(status, app.public_url.as_deref());
    let code = match created {
        Created::New => StatusCode::CREATED,
        Created::AlreadyExists => StatusCode::OK,
    };
    let location = view.status_url.clone();
    let mut body = serde_json::to_value(view).map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(secret) = secret {
        // The only place the callback secret ever appears: the create response.
        body["callback_secret"] = secret.into();
    }
    Ok((code, [(header::LOCATION, location)], Json(body)).into_response())
}

pub async fn status_by_header(
    State(app): State<AppState>,
    UploadIdHeader(id): UploadIdHeader,
) -> Result<Json<StatusView>, ApiError> {
    let status = app.uploads.upload_status(&id).await?;
    Ok(Json(StatusView::new(status, app.public_url.as_deref())))
}

pub async fn status_by_path(
    State(app): State<AppState>,
    UploadIdPath(id): UploadIdPath,
) -> Result<Json<StatusView>, ApiError> {
    let status = app.uploads.upload_status(&id).await?;
    Ok(Json(StatusView::new(status, app.public_url.as_deref())))
}
