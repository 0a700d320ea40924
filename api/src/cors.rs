//! CORS, for browser clients on other origins: which origins may call the API, and which
//! methods and headers their calls may use and read. The lists are the protocol's, kept here
//! once for every front end served on the router (the chunk protocol, tus).
//!
//! Off unless `http.cors_origins` names origins (or `*`). Then a request whose `Origin` is
//! allowed goes through tower-http's CORS layer: a preflight (`OPTIONS`) is answered there,
//! before any handler and so before authentication (a preflight carries no credentials);
//! any other request gets the CORS headers on its response, errors included, so that a page
//! can read why it was refused. A request from another origin, or with none, passes untouched:
//! no CORS header, so a browser keeps its response from the page. Every response then says
//! that it varies with `Origin`, for caches.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::extract;

/// Methods a cross-origin call may use.
pub const ALLOWED_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Request headers a cross-origin call may send: the chunk protocol's, then tus's.
pub const ALLOWED_REQUEST_HEADERS: [HeaderName; 19] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::CONTENT_RANGE,
    HeaderName::from_static("content-md5"),
    HeaderName::from_static(extract::FILE_ID),
    HeaderName::from_static(extract::CHUNK_INDEX),
    HeaderName::from_static(extract::TOTAL_CHUNKS),
    HeaderName::from_static(extract::FILE_NAME),
    HeaderName::from_static(extract::FILE_MD5),
    HeaderName::from_static(extract::CHUNK_MD5),
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("tus-resumable"),
    HeaderName::from_static("upload-length"),
    HeaderName::from_static("upload-offset"),
    HeaderName::from_static("upload-metadata"),
    HeaderName::from_static("upload-defer-length"),
    HeaderName::from_static("upload-concat"),
    HeaderName::from_static("upload-checksum"),
    HeaderName::from_static("x-http-method-override"),
];

/// Response headers a page may read, beyond the ones every browser exposes: the chunk
/// protocol's and downloads', then tus's.
pub const EXPOSED_RESPONSE_HEADERS: [HeaderName; 17] = [
    header::LOCATION,
    header::RETRY_AFTER,
    HeaderName::from_static("x-request-id"),
    header::CONTENT_RANGE,
    header::ACCEPT_RANGES,
    header::CONTENT_DISPOSITION,
    header::ETAG,
    HeaderName::from_static("tus-resumable"),
    HeaderName::from_static("tus-version"),
    HeaderName::from_static("tus-extension"),
    HeaderName::from_static("tus-max-size"),
    HeaderName::from_static("tus-checksum-algorithm"),
    HeaderName::from_static("upload-offset"),
    HeaderName::from_static("upload-length"),
    HeaderName::from_static("upload-expires"),
    HeaderName::from_static("upload-metadata"),
    HeaderName::from_static("upload-concat"),
];

/// How long a browser may keep a preflight's answer: short, so that a change of
/// `http.cors_origins` reaches browsers soon.
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The configured CORS policy.
#[derive(Clone)]
pub struct CorsPolicy {
    /// `None`: any origin (`*`).
    origins: Option<Arc<[String]>>,
    layer: CorsLayer,
}

impl CorsPolicy {
    /// The policy for `http.cors_origins` (validated at load); `None` when it is empty.
    pub fn new(configured: &[String]) -> Option<Self> {
        if configured.is_empty() {
            return None;
        }
        let origins: Option<Arc<[String]>> = if configured.iter().any(|o| o == "*") {
            None
        } else {
            Some(configured.iter().map(|o| o.to_ascii_lowercase()).collect())
        };
        let allow_origin = match &origins {
            None => AllowOrigin::any(),
            Some(list) => {
                let list = list.clone();
                AllowOrigin::predicate(move |origin, _| is_listed(&list, origin))
            }
        };
        let layer = CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods(ALLOWED_METHODS)
            .allow_headers(ALLOWED_REQUEST_HEADERS)
            .expose_headers(EXPOSED_RESPONSE_HEADERS)
            .max_age(PREFLIGHT_MAX_AGE)
            // Whether a response has CORS headers at all depends on the Origin, even for `*`
            // (a request without one gets none).
            .vary([header::ORIGIN]);
        Some(Self { origins, layer })
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        match &self.origins {
            None => true,
            Some(list) => is_listed(list, origin),
        }
    }
}

/// Origins compare without regard to case (browsers send them in lower case).
fn is_listed(list: &[String], origin: &HeaderValue) -> bool {
    origin
        .to_str()
        .is_ok_and(|origin| list.iter().any(|o| o.eq_ignore_ascii_case(origin)))
}

/// Middleware: requests from an allowed origin through the CORS layer, the rest untouched.
pub async fn gate(State(policy): State<Arc<CorsPolicy>>, request: Request, next: Next) -> Response {
    let allowed = request
        .headers()
        .get(header::ORIGIN)
        .is_some_and(|origin| policy.allows(origin));
    if allowed {
        return match policy.layer.layer(next).oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
    }
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .append(header::VARY, HeaderValue::from_static("origin"));
    response
}
