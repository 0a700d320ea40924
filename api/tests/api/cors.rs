//! CORS for browser clients: preflights answered before authentication, headers only for the
//! configured origins, none at all by default.

use reqwest::Method;
use reqwest::header::HeaderMap;
use stitch_common::config::{ApiKeyEntry, Settings};

use crate::helpers::*;

const APP: &str = "https://app.example.com";
/// The key the tests' API accepts, and its SHA-256 as configured.
const KEY: &str = "cors-test-key-0123456789";
const KEY_SHA256: &str = "c8fbdebdb4879179e6ad78318e2e351d7e69f5565b4f0bcbc6ccab2b1f7e2024";

/// An API that requires a key (so that anything needing authentication fails without one)
/// and allows `origins`.
async fn spawn_with_origins(origins: &[&str]) -> TestApp {
    let origins: Vec<String> = origins.iter().map(|o| o.to_string()).collect();
    spawn_app_with(move |s: &mut Settings| {
        s.auth.keys = vec![ApiKeyEntry {
            id: "browser".into(),
            tenant: "web".into(),
            sha256: KEY_SHA256.into(),
            scopes: None,
        }];
        s.http.cors_origins = origins;
    })
    .await
}

async fn preflight(app: &TestApp, path: &str, origin: &str, method: &str) -> reqwest::Response {
    app.client
        .request(Method::OPTIONS, app.url(path))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", method)
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-range,x-file-id,x-chunk-index,x-total-chunks",
        )
        .send()
        .await
        .unwrap()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
}

/// The header's comma-separated values, in lower case.
fn listed(headers: &HeaderMap, name: &str) -> Vec<String> {
    header(headers, name)
        .split(',')
        .map(|v| v.trim().to_ascii_lowercase())
        .collect()
}

fn cors_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_without_credentials() {
    let app = spawn_with_origins(&[APP, "http://localhost:3000"]).await;
    // Without a key, the request itself is refused: the preflight must not be.
    let refused = app
        .client
        .put(app.url("/upload/chunk"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    for (path, method) in [("/upload/chunk", "PUT"), ("/files/some-upload", "PATCH")] {
        let response = preflight(&app, path, APP, method).await;
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        let h = response.headers();
        assert_eq!(header(h, "access-control-allow-origin"), APP);
        let methods = listed(h, "access-control-allow-methods");
        for m in ["get", "head", "post", "put", "patch", "delete", "options"] {
            assert!(methods.iter().any(|x| x == m), "{m}: {methods:?}");
        }
        let allowed = listed(h, "access-control-allow-headers");
        for name in [
            "authorization",
            "content-type",
            "content-range",
            "content-md5",
            "x-file-id",
            "x-chunk-index",
            "x-total-chunks",
            "x-file-name",
            "x-file-md5",
            "x-chunk-md5",
            "x-request-id",
            "tus-resumable",
            "upload-length",
            "upload-offset",
            "upload-metadata",
            "upload-defer-length",
            "upload-concat",
            "upload-checksum",
            "x-http-method-override",
        ] {
            assert!(allowed.iter().any(|a| a == name), "{name}: {allowed:?}");
        }
        assert_eq!(header(h, "access-control-max-age"), "600");
        assert!(listed(h, "vary").iter().any(|v| v == "origin"));
        assert!(h.get("www-authenticate").is_none());
        assert!(h.get("access-control-allow-credentials").is_none());
    }

    // Origins compare without regard to case; the other configured origin works too.
    let response = preflight(&app, "/upload/chunk", "http://LOCALHOST:3000", "PUT").await;
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        "http://LOCALHOST:3000"
    );
}

#[tokio::test]
async fn an_origin_that_is_not_configured_gets_no_cors_headers() {
    let app = spawn_with_origins(&[APP]).await;
    for origin in [
        "https://evil.example.com",
        "https://app.example.com.evil.example",
        "http://app.example.com",
        "null",
    ] {
        let response = preflight(&app, "/upload/chunk", origin, "PUT").await;
        assert!(
            !response.status().is_success(),
            "{origin}: {}",
            response.status()
        );
        assert!(
            cors_headers(response.headers()).is_empty(),
            "{origin}: {:?}",
            response.headers()
        );
        assert!(
            listed(response.headers(), "vary")
                .iter()
                .any(|v| v == "origin")
        );

        let response = app
            .client
            .get(app.url("/healthz"))
            .header("Origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            cors_headers(response.headers()).is_empty(),
            "{origin}: {:?}",
            response.headers()
        );
    }
}

#[tokio::test]
async fn without_configured_origins_there_are_no_cors_headers_at_all() {
    let app = spawn_with_origins(&[]).await;
    let response = preflight(&app, "/upload/chunk", APP, "PUT").await;
    assert_eq!(response.status(), 405);
    assert!(
        cors_headers(response.headers()).is_empty(),
        "{:?}",
        response.headers()
    );
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("Origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        cors_headers(response.headers()).is_empty(),
        "{:?}",
        response.headers()
    );
    assert!(response.headers().get("vary").is_none());
}

#[tokio::test]
async fn a_cross_origin_request_exposes_the_protocol_headers_errors_included() {
    let app = spawn_with_origins(&[APP]).await;
    let api = ApiClient::with_key(app.addr, KEY);
    let id = new_id();
    let source = Source::random(1000, 1000, 3);
    let (code, body) = api.put_chunk(&id, &source, 0).await;
    assert_eq!(code, 200, "{body}");

    let response = api
        .status_request(&id)
        .header("Origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(header(h, "access-control-allow-origin"), APP);
    let exposed = listed(h, "access-control-expose-headers");
    for name in [
        "location",
        "retry-after",
        "x-request-id",
        "content-range",
        "accept-ranges",
        "content-disposition",
        "etag",
        "tus-resumable",
        "tus-version",
        "tus-extension",
        "tus-max-size",
        "tus-checksum-algorithm",
        "upload-offset",
        "upload-length",
        "upload-expires",
        "upload-metadata",
        "upload-concat",
    ] {
        assert!(exposed.iter().any(|e| e == name), "{name}: {exposed:?}");
    }
    assert!(h.get("x-request-id").is_some());

    // A refusal is readable by the page too: it learns why.
    let response = app
        .client
        .get(app.url(&format!("/upload/{id}/status")))
        .header("Origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        APP
    );
}

#[tokio::test]
async fn a_wildcard_allows_every_origin() {
    let app = spawn_with_origins(&["*"]).await;
    let response = preflight(&app, "/upload/chunk", "https://anyone.example", "PUT").await;
    assert!(response.status().is_success());
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        "*"
    );
    assert_eq!(header(response.headers(), "vary"), "origin");
    // A request without Origin is not a CORS request: no CORS headers, but caches learn
    // that the answer depends on it.
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert!(
        cors_headers(response.headers()).is_empty(),
        "{:?}",
        response.headers()
    );
    assert_eq!(header(response.headers(), "vary"), "origin");
}
