//! The upload page: `GET /` and `GET /ui/{file}`, the files of `api/ui/` embedded in the
//! binary at build time (`build.rs`), and `GET /ui/config.json`, what the page needs to know
//! about this server. Every answer carries a strict Content-Security-Policy (no inline
//! script or style, nothing from elsewhere, no framing), `nosniff` and no referrer.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use stitch_common::config::{AuthMode, Settings};

use crate::AppState;
use crate::error::ApiError;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));
}

/// What the page is told about this server, and the policy its answers carry.
#[derive(Clone, Debug)]
pub struct UiConfig {
    /// `none` or `keys` (`auth.mode`): with keys, the page needs a token (from the URL or
    /// `token_url`) unless it is served in protected mode to this machine.
    auth: &'static str,
    token_url: Option<String>,
    max_upload_bytes: u64,
    /// The Content-Security-Policy of every answer.
    csp: HeaderValue,
}

impl UiConfig {
    /// `None` when the page is off (`ui.disabled`).
    pub fn from_settings(settings: &Settings) -> Option<Arc<Self>> {
        if settings.ui.disabled {
            return None;
        }
        let token_url = settings.ui.token_url.clone();
        // The page may call this server and, when it is elsewhere, the token backend.
        let mut connect = "'self'".to_owned();
        if let Some(origin) = token_url.as_deref().and_then(origin_of) {
            connect.push(' ');
            connect.push_str(&origin);
        }
        let csp = format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        );
        Some(Arc::new(Self {
            auth: match settings.auth.mode {
                AuthMode::None => "none",
                AuthMode::Keys => "keys",
            },
            token_url,
            max_upload_bytes: settings.limits.max_upload_bytes.0,
            csp: HeaderValue::from_str(&csp).ok()?,
        }))
    }
}

/// `scheme://host[:port]` of an absolute http(s) URL.
fn origin_of(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.origin().ascii_serialization())
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/ui/config.json", get(config))
        .route("/ui/{*file}", get(asset))
}

fn page(app: &AppState) -> Result<&UiConfig, ApiError> {
    app.ui.as_deref().ok_or(ApiError::NoRoute)
}

async fn index(State(app): State<AppState>) -> Result<Response, ApiError> {
    serve(page(&app)?, "index.html")
}

async fn asset(
    State(app): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    serve(page(&app)?, &file)
}

async fn config(State(app): State<AppState>) -> Result<Response, ApiError> {
    let ui = page(&app)?;
    let body = Json(serde_json::json!({
        "tus_endpoint": "/files/",
        "auth": ui.auth,
        "token_url": ui.token_url,
        "max_upload_bytes": ui.max_upload_bytes,
    }));
    Ok(secured(ui, body.into_response()))
}

/// One embedded file, looked up by its exact name (no path is ever built from `file`).
fn serve(ui: &UiConfig, file: &str) -> Result<Response, ApiError> {
    let (name, bytes) = assets::ASSETS
        .iter()
        .find(|(name, _)| *name == file)
        .ok_or(ApiError::NoRoute)?;
    let mut response = (StatusCode::OK, *bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    // Small files, and a new release must show at once: revalidate every time.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(secured(ui, response))
}

fn secured(ui: &UiConfig, mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, ui.csp.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_come_from_absolute_http_urls_only() {
        assert_eq!(
            origin_of("https://app.example.com:8443/tokens?x=1").as_deref(),
            Some("https://app.example.com:8443")
        );
        assert_eq!(origin_of("/tokens"), None);
        assert_eq!(origin_of("javascript:alert(1)"), None);
    }

    #[test]
    fn a_configured_token_backend_is_the_only_other_origin_the_page_may_call() {
        let mut settings = Settings::default();
        settings.ui.token_url = Some("https://app.example.com/stitch-token".into());
        let ui = UiConfig::from_settings(&settings).unwrap();
        let csp = ui.csp.to_str().unwrap();
        assert!(
            csp.contains("connect-src 'self' https://app.example.com;"),
            "{csp}"
        );
        assert!(csp.contains("script-src 'self';") && csp.contains("frame-ancestors 'none'"));
        settings.ui.disabled = true;
        assert!(UiConfig::from_settings(&settings).is_none());
    }
}
