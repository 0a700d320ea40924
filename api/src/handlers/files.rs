//! `/files/{id}`: the upload as a resource, whatever protocol created it.

use axum::extract::State;
use axum::http::StatusCode;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::UploadIdPath;

/// `DELETE /files/{id}`: abort the upload and remove its chunks.
pub async fn abort_upload(
    State(app): State<AppState>,
    UploadIdPath(id): UploadIdPath,
) -> Result<StatusCode, ApiError> {
    app.uploads.abort_upload(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
