//! `/files/{id}`: the upload as a resource, whatever protocol created it.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

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

/// [`download`] for a request routed elsewhere first (a `HEAD` that is not tus's).
pub async fn download_request(app: AppState, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let answered: Result<Response, ApiError> = async {
        let DownloadCaller(caller) = DownloadCaller::from_request_parts(&mut parts, &app).await?;
        let UploadIdPath(name) = UploadIdPath::from_request_parts(&mut parts, &app).await?;
        let file = app.uploads.completed_file(&caller, &name).await?;
        download::respond(file, name.as_str(), &parts.headers).await
    }
    .await;
    answered.into_response()
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
