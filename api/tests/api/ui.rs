//! The upload page's server side: its configuration and security headers, and the listing
//! of a tenant's recent uploads.

use stitch_common::auth::key_sha256;
use stitch_common::config::ApiKeyEntry;
use stitch_testkit::tus::{Tus, id_of};

use crate::helpers::*;

#[tokio::test]
async fn the_page_config_says_how_to_upload_with_a_strict_security_policy() {
    let app =
        spawn_app_with(|s| s.ui.token_url = Some("https://app.example.com/token".into())).await;
    let response = app
        .client
        .get(app.url("/ui/config.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self' https://app.example.com",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let config: serde_json::Value = response.json().await.unwrap();
    assert_eq!(config["tus_endpoint"], "/files/");
    assert_eq!(config["auth"], "keys");
    assert_eq!(config["token_url"], "https://app.example.com/token");
    // No path reaches outside the embedded files.
    for path in ["/ui/../Cargo.toml", "/ui/%2e%2e/build.rs", "/ui/nope.js"] {
        let status = app.client.get(app.url(path)).send().await.unwrap().status();
        assert_eq!(status, 404, "{path}");
    }
    let off = spawn_app_with(|s| s.ui.disabled = true).await;
    let status = off
        .client
        .get(off.url("/ui/config.json"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_tenant_lists_its_own_uploads_newest_first_page_by_page() {
    let keys = [
        ("acme", "sk_test_ui_acme_0123456789"),
        ("globex", "sk_test_ui_globex_0123456789"),
    ];
    let app = spawn_app_with(|s| {
        s.auth.keys = keys
            .iter()
            .map(|(tenant, key)| ApiKeyEntry {
                id: format!("{tenant}-key"),
                tenant: (*tenant).into(),
                sha256: key_sha256(key),
                scopes: None,
            })
            .collect();
    })
    .await;
    let acme = http_client_with_key(keys[0].1);
    let globex = http_client_with_key(keys[1].1);
    let t = Tus::new(acme.clone(), &app.base);
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(id_of(&t.create(100, None).await.location()).to_owned());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Tus::new(globex.clone(), &app.base).create(100, None).await;

    let list = |client: reqwest::Client, query: String| {
        let url = app.url(&format!("/uploads{query}"));
        async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["uploads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["upload_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = list(acme.clone(), "?limit=2".into()).await;
    assert_eq!(ids(&first), [made[2].clone(), made[1].clone()]);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let second = list(acme.clone(), format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(ids(&second), [made[0].clone()]);
    assert!(second["next_cursor"].is_null());
    assert_eq!(ids(&list(globex, String::new()).await).len(), 1);
    let bad = acme
        .get(app.url("/uploads?limit=1000"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}
