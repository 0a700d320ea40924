//! `POST /upload/tokens`: capability tokens for browsers and download links.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::views::rfc3339;
use crate::AppState;
use crate::error::ApiError;
use crate::extract::Caller;
use crate::service::TokenRequest;

/// Largest body read.
const MAX_BODY: usize = 4 << 10;

pub async fn issue_token(
    State(app): State<AppState>,
    Caller(caller): Caller,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::InvalidJson(format!("the body is larger than {MAX_BODY} bytes")))?;
    let request: TokenRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let issued = app.uploads.issue_token(&caller, request)?;
    let body = serde_json::json!({
        "token": issued.token,
        "upload_id": issued.upload_id.name(),
        "expires_at": rfc3339(issued.expires_at_ms),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
