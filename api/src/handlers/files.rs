//! `/files/{id}`: the upload as a resource, whatever protocol created it.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::AppState;
use crate::download;
use crate::error::ApiError;
use crate::extract::UploadIdPath;

/// `GET /files/{id}` (and `HEAD`): the completed file, with Range support.
pub async fn download(
    State(app): State<AppState>,
    UploadIdPath(id): UploadIdPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let file = app.uploads.completed_file(&id).await?;
    download::respond(file, id.as_str(), &headers).await
}

/// `DELETE /files/{id}`: abort the upload and remove its chunks (and its file, if merged).
pub async fn abort_upload(
    State(app): State<AppState>,
    UploadIdPath(id): UploadIdPath,
) -> Result<StatusCode, ApiError> {
    app.uploads.abort_upload(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
