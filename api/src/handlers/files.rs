//! `/files/{id}`: the upload as a resource, whatever protocol created it.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::AppState;
use crate::download;
use crate::error::ApiError;
use crate::extract::{Caller, DownloadCaller, UploadIdPath};

/// `GET /files/{id}` (and `HEAD`): the completed file, with Range support.
pub async fn download(
    State(app): State<AppState>,
    DownloadCaller(caller): DownloadCaller,
    UploadIdPath(name): UploadIdPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let file = app.uploads.completed_file(&caller, &name).await?;
    download::respond(file, name.as_str(), &headers).await
}

/// `DELETE /files/{id}`: abort the upload and remove its chunks (and its file, if merged).
pub async fn abort_upload(
    State(app): State<AppState>,
    Caller(caller): Caller,
    UploadIdPath(name): UploadIdPath,
) -> Result<StatusCode, ApiError> {
    app.uploads.abort_upload(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
