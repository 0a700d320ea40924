//! Access control (invariant 11): every route refuses what its credential does not allow and
//! changes nothing when it does; tenants never see, touch or block each other's uploads;
//! quotas hold across pods; the pre-create hook gates creation. An API and a worker run in
//! this process against the real Redis, RabbitMQ and files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stitch_common::auth::{Scope, Scopes, TokenClaims, TokenSigner, key_sha256};
use stitch_common::config::{
    ApiKeyEntry, ByteSize, Interval, PreCreateHook, Quotas, Secret, Settings,
};
use stitch_common::id::Tenant;
use stitch_testkit::sink::WebhookSink;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);
const ACME: &str = "sk_test_acme_all_0123456789";
const ACME_READ: &str = "sk_test_acme_read_0123456789";
const GLOBEX: &str = "sk_test_globex_0123456789";
const TOKEN_SECRET: &str = "token-secret-for-the-tests-0123456789abcdef";
const HOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8G";

fn key(id: &str, tenant: &str, key: &str, scopes: Option<&[&str]>) -> ApiKeyEntry {
    ApiKeyEntry {
        id: id.into(),
        tenant: tenant.into(),
        sha256: key_sha256(key),
        scopes: scopes.map(|s| s.iter().map(|s| s.to_string()).collect()),
    }
}

/// Three keys: acme with every upload scope, acme read-only, globex; tokens on.
fn keyed(env: &TestEnv) -> Settings {
    let mut settings = env.settings();
    settings.auth.keys = vec![
        key("acme-all", "acme", ACME, None),
        key("acme-read", "acme", ACME_READ, Some(&["read"])),
        key("globex", "globex", GLOBEX, None),
    ];
    settings.auth.token_secret = Some(Secret::new(TOKEN_SECRET));
    settings
}

async fn post_json(
    client: &ApiClient,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    json_response(client.client.post(client.url(path)).json(body).send().await).await
}

async fn get_json(client: &ApiClient, path: &str) -> (u16, serde_json::Value) {
    json_response(client.client.get(client.url(path)).send().await).await
}

async fn delete_json(client: &ApiClient, path: &str) -> (u16, serde_json::Value) {
    json_response(client.client.delete(client.url(path)).send().await).await
}

/// An API (and, with `worker`, a worker) in this process.
async fn spawn(settings: &Settings, worker: bool) -> std::net::SocketAddr {
    let api = stitch_api::Application::build(settings).await.unwrap();
    let addr = api.local_addr();
    tokio::spawn(api.run_until_stopped(std::future::pending()));
    if worker {
        let worker = stitch_worker::Worker::build(settings).await.unwrap();
        tokio::spawn(worker.run_until_stopped(std::future::pending()));
    }
    addr
}

fn token(upload: &str, scopes: &[Scope], expires_in: i64) -> String {
    let now = stitch_common::now_ms() as i64 / 1000;
    TokenSigner::new(&Secret::new(TOKEN_SECRET), &[]).sign(&TokenClaims {
        link: false,
        tenant: Tenant::parse("acme").unwrap(),
        upload: upload.into(),
        scopes: Scopes::of(scopes),
        expires_at: (now + expires_in) as u64,
        max_bytes: None,
        issuer: Some("acme-all".into()),
    })
}

/// What the namespace holds of tenant acme: its Redis keys and its files.
fn acme_state(env: &TestEnv) -> (BTreeMap<String, String>, BTreeMap<String, u64>) {
    let keys = env
        .redis_snapshot()
        .into_iter()
        .filter(|(k, _)| k.contains("{acme~") || k.contains("{quota:acme}"))
        .collect();
    let files = env
        .storage_snapshot()
        .into_iter()
        .filter(|(path, _)| path.starts_with("uploads/acme~"))
        .collect();
    (keys, files)
}

/// One route of the API, as a request about upload `upload`.
#[derive(Clone, Copy, Debug)]
enum Route {
    StatusByPath,
    StatusByHeader,
    Download,
    DownloadWithQueryToken,
    Delete,
    PutChunk,
    Create,
    IssueToken,
}

impl Route {
    const ALL: [Route; 8] = [
        Route::StatusByPath,
        Route::StatusByHeader,
        Route::Download,
        Route::DownloadWithQueryToken,
        Route::Delete,
        Route::PutChunk,
        Route::Create,
        Route::IssueToken,
    ];

    /// The upload each route is tried on: the completed one for reads and deletes, the one
    /// still receiving for writes (an allowed write would change it).
    fn upload(self) -> &'static str {
        match self {
            Route::PutChunk | Route::Create => "receiving",
            _ => "victim",
        }
    }

    /// The scopes that would allow it.
    fn needs(self) -> &'static [Scope] {
        match self {
            Route::StatusByPath | Route::StatusByHeader => &[Scope::Read, Scope::Upload],
            Route::Download | Route::DownloadWithQueryToken => &[Scope::Read],
            Route::Delete => &[Scope::Delete],
            Route::PutChunk | Route::Create | Route::IssueToken => &[Scope::Upload],
        }
    }

    fn request(
        self,
        http: &reqwest::Client,
        base: &str,
        credential: Option<&str>,
        source: &Source,
    ) -> reqwest::RequestBuilder {
        let id = self.upload();
        let request = match self {
            Route::StatusByPath => http.get(format!("{base}/upload/{id}/status")),
            Route::StatusByHeader => http
                .get(format!("{base}/upload/status"))
                .header("X-File-ID", id),
            Route::Download => http.get(format!("{base}/files/{id}")),
            Route::DownloadWithQueryToken => {
                let query = credential
                    .map(|c| format!("?token={c}"))
                    .unwrap_or_default();
                return http.get(format!("{base}/files/{id}{query}"));
            }
            Route::Delete => http.delete(format!("{base}/files/{id}")),
            Route::PutChunk => {
                let range = source.chunk_range(1);
                http.put(format!("{base}/upload/chunk"))
                    .header("X-File-ID", id)
                    .header("X-Chunk-Index", "1")
                    .header("X-Total-Chunks", source.total_chunks().to_string())
                    .header(
                        "Content-Range",
                        format!("bytes {}-{}/{}", range.start, range.end - 1, source.len()),
                    )
                    .body(source.bytes[range.start as usize..range.end as usize].to_vec())
            }
            Route::Create => http
                .post(format!("{base}/upload"))
                .json(&serde_json::json!({
                    "upload_id": id,
                    "total_size": source.len(),
                    "chunk_size": source.chunk_size,
                })),
            Route::IssueToken => http
                .post(format!("{base}/upload/tokens"))
                .json(&serde_json::json!({ "upload_id": id })),
        };
        match credential {
            Some(c) => request.header("authorization", format!("Bearer {c}")),
            None => request,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_refuses_what_its_credential_does_not_allow_and_changes_nothing() {
    let env = TestEnv::new();
    let settings = keyed(&env);
    let addr = spawn(&settings, true).await;
    let base = format!("http://{addr}");
    let owner = ApiClient::with_key(addr, ACME);
    let source = Source::random(2000, 1000, 5);
    for index in 0..2 {
        let (code, body) = owner.put_chunk("victim", &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, body) = owner.put_chunk("receiving", &source, 0).await;
    assert_eq!(code, 200, "{body}");
    owner.wait_for_state("victim", "completed", MINUTE).await;
    // The worker finishes after the status says completed (lock, outbox, chunks): wait until
    // nothing moves any more.
    let mut before = acme_state(&env);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = acme_state(&env);
        if now == before && !now.0.keys().any(|k| k.ends_with(":lock")) {
            break;
        }
        before = now;
    }
    let http = stitch_testkit::http_client();

    // The same request for an upload that does not exist, by its owner: what "another
    // tenant's upload" must look like, byte for byte.
    let missing = |route: Route| {
        let url = match route {
            Route::StatusByPath => format!("{base}/upload/nothing-here/status"),
            Route::Download | Route::DownloadWithQueryToken => format!("{base}/files/nothing-here"),
            _ => format!("{base}/files/nothing-here"),
        };
        let request = match route {
            Route::Delete => http.delete(url),
            Route::StatusByHeader => http
                .get(format!("{base}/upload/status"))
                .header("X-File-ID", "nothing-here"),
            _ => http.get(url),
        };
        request.header("authorization", format!("Bearer {ACME}"))
    };

    let mut checked = 0;
    for route in Route::ALL {
        let upload = route.upload();
        let lacking: Vec<Scope> = Scope::ALL
            .into_iter()
            .filter(|s| !route.needs().contains(s) && *s != Scope::Admin)
            .collect();
        let tampered = {
            let mut t = token(upload, &[Scope::Upload, Scope::Read, Scope::Delete], 600);
            let last = t.pop().unwrap();
            t.push(if last == 'A' { 'B' } else { 'A' });
            t
        };
        let forged = TokenSigner::new(&Secret::new("x".repeat(40)), &[]).sign(&TokenClaims {
            link: false,
            tenant: Tenant::parse("acme").unwrap(),
            upload: upload.into(),
            scopes: Scopes::all(),
            expires_at: u64::MAX / 2,
            max_bytes: None,
            issuer: None,
        });
        let mut cases: Vec<(String, Option<String>, u16, &str)> = vec![
            ("no credential".into(), None, 401, "unauthorized"),
            (
                "unknown key".into(),
                Some("sk_not_a_key".into()),
                401,
                "unauthorized",
            ),
            ("tampered token".into(), Some(tampered), 401, "unauthorized"),
            ("forged token".into(), Some(forged), 401, "unauthorized"),
            (
                "expired token".into(),
                Some(token(
                    upload,
                    &[Scope::Upload, Scope::Read, Scope::Delete],
                    -1,
                )),
                401,
                "unauthorized",
            ),
            (
                "token for another upload".into(),
                Some(token(
                    "elsewhere",
                    &[Scope::Upload, Scope::Read, Scope::Delete],
                    600,
                )),
                403,
                "forbidden",
            ),
            (
                "token without the scope".into(),
                Some(token(upload, &lacking, 600)),
                403,
                "forbidden",
            ),
        ];
        if !route.needs().contains(&Scope::Read) {
            cases.push((
                "key without the scope".into(),
                Some(ACME_READ.into()),
                403,
                "forbidden",
            ));
        }
        if matches!(
            route,
            Route::StatusByPath | Route::StatusByHeader | Route::Download | Route::Delete
        ) {
            cases.push((
                "another tenant's key".into(),
                Some(GLOBEX.into()),
                404,
                "upload_not_found",
            ));
        }
        for (label, credential, status, code) in cases {
            let response = route
                .request(&http, &base, credential.as_deref(), &source)
                .send()
                .await
                .unwrap();
            let got = response.status().as_u16();
            let www = response.headers().get("www-authenticate").cloned();
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(
                (got, error_code(&body)),
                (status, code),
                "{route:?} with {label}: {body}"
            );
            if status == 401 {
                assert_eq!(www.unwrap(), "Bearer", "{route:?} with {label}");
            }
            if label == "another tenant's key" {
                let (_, nothing) = json_response(missing(route).send().await).await;
                assert_eq!(
                    body, nothing,
                    "{route:?}: another tenant's upload shows as absent"
                );
            }
            assert_eq!(
                acme_state(&env),
                before,
                "{route:?} with {label} changed the owner's state"
            );
            checked += 1;
        }
    }
    assert!(checked >= 60, "{checked} cells checked");
    // And the owner still has everything.
    assert_eq!(owner.download("victim").await, source.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tenants_requests_for_the_owners_id_change_nothing_of_the_owners_upload() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let mut settings = keyed(&env);
    settings.webhooks.allow_client_callbacks = true;
    settings.webhooks.callback_allow_networks = vec!["127.0.0.0/8".into()];
    let addr = spawn(&settings, true).await;
    let owner = ApiClient::with_key(addr, ACME);
    let attacker = ApiClient::with_key(addr, GLOBEX);
    let source = Source::random(3000, 1000, 8);
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&source.bytes));

    // The owner declares the upload, with a callback whose secret only it may learn.
    let declaration = serde_json::json!({
        "upload_id": "report", "total_size": 3000, "chunk_size": 1000, "md5": md5,
        "filename": "report.pdf", "callback_url": "http://127.0.0.1:9/hook",
    });
    let (code, created) = post_json(&owner, "/upload", &declaration).await;
    assert_eq!(code, 201, "{created}");
    assert!(created["callback_secret"].as_str().is_some());

    // The attacker, knowing the id and the geometry: the same declaration is a new upload
    // of its own (no 409, no secret of the owner's), garbage for a missing index, a bogus
    // file MD5, another file name, another geometry, a delete.
    let (code, theirs) = post_json(&attacker, "/upload", &declaration).await;
    assert_eq!(
        code, 201,
        "the same id in another tenant is another upload: {theirs}"
    );
    assert_ne!(theirs["callback_secret"], created["callback_secret"]);
    let garbage = Source::random(3000, 1000, 99);
    let (code, body) = json_response(
        attacker
            .chunk_request("report", &garbage, 1)
            .header("X-File-MD5", "00000000000000000000000000000000")
            .header("X-File-Name", "evil.exe")
            .send()
            .await,
    )
    .await;
    assert_eq!(
        code, 409,
        "the attacker's own upload has its own MD5: {body}"
    );
    let (code, body) = attacker.put_chunk("report", &garbage, 1).await;
    assert_eq!(code, 200, "{body}");
    let other_geometry = Source::random(5000, 500, 3);
    let (code, body) = attacker.put_chunk("fresh-id", &other_geometry, 0).await;
    assert_eq!(code, 200, "{body}");
    let deleted = attacker
        .client
        .delete(attacker.url("/files/report"))
        .send()
        .await;
    assert_eq!(
        deleted.unwrap().status(),
        204,
        "the attacker deletes its own upload"
    );

    // The owner's upload is untouched: its chunks, its name, its MD5; and an id the
    // attacker took first is still free for the owner, with the owner's geometry.
    let (_, status) = owner.status("report").await;
    assert_eq!(status["chunks_received"], 0, "{status}");
    assert_eq!(status["filename"], "report.pdf");
    assert_eq!(status["file_md5"], md5.as_str());
    for index in 0..3 {
        let (code, body) = owner.put_chunk("report", &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    let done = owner.wait_for_state("report", "completed", MINUTE).await;
    assert_eq!(done["md5"], md5.as_str());
    assert_eq!(owner.download("report").await, source.bytes);
    let fresh = Source::random(4000, 1000, 4);
    for index in 0..4 {
        let (code, body) = owner.put_chunk("fresh-id", &fresh, index).await;
        assert_eq!(code, 200, "the attacker's upload blocks nothing: {body}");
    }

    // Events name the tenant; the id is the one the client knows.
    let completed = tap.wait_for("report", "upload.completed", MINUTE).await;
    assert_eq!(completed["upload"]["tenant"], "acme", "{completed}");
    assert_eq!(completed["upload"]["download_url"], "/files/report");
    let theirs: Vec<_> = tap
        .events_of("report")
        .into_iter()
        .filter(|e| e["upload"]["tenant"] == "globex")
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(theirs.contains(&"upload.aborted".to_owned()), "{theirs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capability_tokens_work_as_bearer_and_in_download_links_and_only_for_their_upload() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let mut settings = keyed(&env);
    settings.auth.event_link_ttl = Some(Interval(Duration::from_secs(600)));
    let addr = spawn(&settings, true).await;
    let owner = ApiClient::with_key(addr, ACME);
    let source = Source::random(2500, 1000, 12);
    let (code, issued) = post_json(
        &owner,
        "/upload/tokens",
        &serde_json::json!({ "ttl": "10m", "max_bytes": 2500 }),
    )
    .await;
    assert_eq!(code, 201, "{issued}");
    let id = issued["upload_id"].as_str().unwrap().to_owned();
    let token = issued["token"].as_str().unwrap().to_owned();
    assert!(issued["expires_at"].as_str().is_some());

    // A browser with the token: uploads its one upload, nothing bigger, nothing else.
    let browser = ApiClient::with_key(addr, &token);
    let too_big = Source::random(2501, 1000, 1);
    let (code, body) = browser.put_chunk(&id, &too_big, 0).await;
    assert_eq!((code, error_code(&body)), (403, "forbidden"), "{body}");
    let (code, body) = browser.put_chunk("another", &source, 0).await;
    assert_eq!((code, error_code(&body)), (403, "forbidden"), "{body}");
    for index in 0..3 {
        let (code, body) = browser.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    browser.wait_for_state(&id, "completed", MINUTE).await;
    let (code, body) = delete_json(&browser, &format!("/files/{id}")).await;
    assert_eq!(
        (code, error_code(&body)),
        (403, "forbidden"),
        "upload+read cannot delete"
    );
    let (code, body) = post_json(&browser, "/upload/tokens", &serde_json::json!({})).await;
    assert_eq!(
        (code, error_code(&body)),
        (403, "forbidden"),
        "tokens make no tokens: {body}"
    );

    // A read-only download link.
    let (code, link) = post_json(
        &owner,
        "/upload/tokens",
        &serde_json::json!({ "upload_id": id, "scopes": ["read"], "ttl": 60 }),
    )
    .await;
    assert_eq!(code, 201, "{link}");
    let url = owner.url(&format!(
        "/files/{id}?token={}",
        link["token"].as_str().unwrap()
    ));
    let plain = stitch_testkit::http_client();
    let file = plain.get(&url).send().await.unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(file.bytes().await.unwrap().to_vec(), source.bytes);
    let (code, _) = json_response(plain.delete(&url).send().await).await;
    assert_eq!(code, 401, "the query token is for downloads only");

    // Links that carry a read-only token: in the status when asked, in upload.completed
    // when the operator configured it; either downloads without a key, and nothing else.
    let (code, status) = get_json(&owner, &format!("/upload/{id}/status?link_ttl=5m")).await;
    assert_eq!(code, 200, "{status}");
    let event = tap.wait_for(&id, "upload.completed", MINUTE).await;
    for link in [&status["download_url"], &event["upload"]["download_url"]] {
        let link = link.as_str().unwrap();
        assert!(
            link.starts_with(&format!("/files/{id}?token=st1.")),
            "{link}"
        );
        let file = plain.get(owner.url(link)).send().await.unwrap();
        assert_eq!(file.status(), 200, "{link}");
        assert_eq!(file.bytes().await.unwrap().to_vec(), source.bytes);
        let status_with_it = link.replace(&format!("/files/{id}"), &format!("/upload/{id}/status"));
        let (code, _) = json_response(plain.get(owner.url(&status_with_it)).send().await).await;
        assert_eq!(code, 401, "a link's token opens the download only");
    }
    let (code, body) = get_json(&browser, &format!("/upload/{id}/status?link_ttl=30d")).await;
    assert_eq!(
        (code, error_code(&body)),
        (403, "forbidden"),
        "a token makes no links: {body}"
    );

    // A key cannot hand out more than it has, nor admin, nor for longer than allowed.
    let reader = ApiClient::with_key(addr, ACME_READ);
    for (body, status) in [
        (serde_json::json!({ "scopes": ["read", "upload"] }), 403),
        (serde_json::json!({ "scopes": ["admin"] }), 400),
        (serde_json::json!({ "scopes": ["read"], "ttl": "30d" }), 400),
        (serde_json::json!({ "scopes": ["root"] }), 400),
    ] {
        let (code, answer) = post_json(&reader, "/upload/tokens", &body).await;
        assert_eq!(code, status, "{body}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_refuse_with_the_right_status_store_nothing_and_free_up_on_completion_and_abort() {
    let env = TestEnv::new();
    let mut settings = keyed(&env);
    settings.auth.quotas = Quotas {
        max_active_uploads: Some(1),
        max_stored_bytes: Some(ByteSize(5000)),
        max_upload_bytes: Some(ByteSize(4000)),
    };
    // globex has no limits but its own.
    settings.auth.tenants.insert(
        "globex".into(),
        Quotas {
            max_active_uploads: Some(100),
            max_stored_bytes: Some(ByteSize(1 << 30)),
            max_upload_bytes: Some(ByteSize(1 << 30)),
        },
    );
    let addr = spawn(&settings, true).await;
    let acme = ApiClient::with_key(addr, ACME);
    let globex = ApiClient::with_key(addr, GLOBEX);
    let big = Source::random(4001, 1000, 1);
    let (code, body) = acme.put_chunk("big", &big, 0).await;
    assert_eq!((code, error_code(&body)), (413, "quota_exceeded"), "{body}");

    let first = Source::random(3000, 1000, 2);
    let (code, body) = acme.put_chunk("first", &first, 0).await;
    assert_eq!(code, 200, "{body}");
    let before = acme_state(&env);
    let second = Source::random(1000, 1000, 3);
    let response = acme
        .chunk_request("second", &second, 0)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "60");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "quota_exceeded", "{body}");
    assert_eq!(acme_state(&env), before, "a refused upload stores nothing");
    let (code, body) = globex.put_chunk("second", &second, 0).await;
    assert_eq!(
        code, 200,
        "another tenant is not limited by acme's quota: {body}"
    );

    // Completion frees the slot; the bytes stay counted.
    for index in 1..3 {
        let (code, body) = acme.put_chunk("first", &first, index).await;
        assert_eq!(code, 200, "{body}");
    }
    acme.wait_for_state("first", "completed", MINUTE).await;
    let (code, body) = acme.put_chunk("second", &second, 0).await;
    assert_eq!(code, 200, "a completed upload frees its slot: {body}");
    acme.wait_for_state("second", "completed", MINUTE).await;
    // 3000 + 1000 kept: 1001 more would pass 5000, and waiting does not help.
    let third = Source::random(1001, 1001, 4);
    let response = acme.chunk_request("third", &third, 0).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_none());
    // Deleting a file frees its bytes.
    let deleted = acme.client.delete(acme.url("/files/first")).send().await;
    assert_eq!(deleted.unwrap().status(), 204);
    let (code, body) = acme.put_chunk("third", &third, 0).await;
    assert_eq!(code, 200, "{body}");
    // "third" is active and holds the one slot; aborting it frees the slot and its bytes.
    let fourth = Source::random(1000, 1000, 5);
    let (code, body) = acme.put_chunk("fourth", &fourth, 0).await;
    assert_eq!((code, error_code(&body)), (429, "quota_exceeded"), "{body}");
    let deleted = acme.client.delete(acme.url("/files/third")).send().await;
    assert_eq!(deleted.unwrap().status(), 204);
    let (code, body) = acme.put_chunk("fourth", &fourth, 0).await;
    assert_eq!(code, 200, "an aborted upload frees its slot: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pods_racing_for_a_tenants_last_slot_let_exactly_one_upload_in() {
    let env = TestEnv::new();
    let mut settings = keyed(&env);
    settings.auth.quotas.max_active_uploads = Some(3);
    let a = spawn(&settings, false).await;
    let b = spawn(&settings, false).await;
    let (a, b) = (ApiClient::with_key(a, ACME), ApiClient::with_key(b, ACME));
    let source = Arc::new(Source::random(2000, 1000, 6));
    for id in ["one", "two"] {
        let (code, body) = a.put_chunk(id, &source, 0).await;
        assert_eq!(code, 200, "{body}");
    }
    let racers: Vec<_> = (0..12)
        .map(|i| {
            let pod = if i % 2 == 0 { a.clone() } else { b.clone() };
            let source = source.clone();
            tokio::spawn(async move { pod.put_chunk(&format!("racer-{i}"), &source, 0).await })
        })
        .collect();
    let mut codes = Vec::new();
    for racer in racers {
        codes.push(racer.await.unwrap().0);
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 11, "{codes:?}");
}

fn hooked(env: &TestEnv, sink: &WebhookSink, timeout: Duration) -> Settings {
    let mut settings = keyed(env);
    settings.hooks.pre_create = Some(PreCreateHook {
        url: sink.url("/pre-create"),
        secret: Secret::new(HOOK_SECRET),
        timeout: Interval(timeout),
    });
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pre_create_hook_that_refuses_stops_the_upload_with_its_message() {
    let env = TestEnv::new();
    let sink = WebhookSink::start(
        &[HOOK_SECRET],
        "403",
        &["--reply-body", r#"{"message":"no .exe files here"}"#],
    );
    let addr = spawn(&hooked(&env, &sink, Duration::from_secs(10)), false).await;
    let acme = ApiClient::with_key(addr, ACME);
    let source = Source::random(1500, 1000, 7);
    let (code, body) = json_response(
        acme.chunk_request("setup", &source, 1)
            .header("X-File-Name", "setup.exe")
            .send()
            .await,
    )
    .await;
    assert_eq!(
        (code, error_code(&body)),
        (403, "rejected_by_hook"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no .exe files here")
    );
    assert_eq!(
        acme_state(&env),
        Default::default(),
        "nothing stored, nothing reserved"
    );
    let asked = sink.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        asked[0]["verified_with"][0], HOOK_SECRET,
        "signed per Standard Webhooks"
    );
    let declared: serde_json::Value =
        serde_json::from_str(asked[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(declared["tenant"], "acme");
    assert_eq!(declared["upload"]["id"], "setup");
    assert_eq!(declared["upload"]["filename"], "setup.exe");
    assert_eq!(declared["upload"]["size"], 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pre_create_hook_that_does_not_answer_in_time_is_a_503() {
    let env = TestEnv::new();
    let sink = WebhookSink::start(&[HOOK_SECRET], "hang", &["--hang-seconds", "30"]);
    let addr = spawn(&hooked(&env, &sink, Duration::from_millis(500)), false).await;
    let acme = ApiClient::with_key(addr, ACME);
    let (code, body) = post_json(
        &acme,
        "/upload",
        &serde_json::json!({ "upload_id": "slow", "total_size": 10, "chunk_size": 10 }),
    )
    .await;
    assert_eq!(
        (code, error_code(&body)),
        (503, "hook_unavailable"),
        "{body}"
    );
    assert_eq!(acme_state(&env), Default::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pre_create_hook_can_attach_metadata_and_is_asked_once_per_upload() {
    let env = TestEnv::new();
    let sink = WebhookSink::start(
        &[HOOK_SECRET],
        "200",
        &[
            "--reply-body",
            r#"{"metadata":{"project":"apollo","client":"hook"}}"#,
        ],
    );
    let addr = spawn(&hooked(&env, &sink, Duration::from_secs(10)), false).await;
    let acme = ApiClient::with_key(addr, ACME);
    let (code, created) = post_json(
        &acme,
        "/upload",
        &serde_json::json!({
            "upload_id": "tagged", "total_size": 2000, "chunk_size": 1000,
            "metadata": { "client": "mine", "kept": true },
        }),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created["metadata"],
        serde_json::json!({ "client": "hook", "kept": true, "project": "apollo" })
    );
    let source = Source::random(2000, 1000, 9);
    for index in 0..2 {
        let (code, body) = acme.put_chunk("tagged", &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(
        sink.requests().len(),
        1,
        "chunks of an existing upload ask no hook"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_janitor_frees_what_expired_and_retained_uploads_held() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let mut settings = keyed(&env);
    settings.auth.quotas = Quotas {
        max_active_uploads: Some(1),
        max_stored_bytes: Some(ByteSize(2500)),
        max_upload_bytes: None,
    };
    settings.uploads.ttl = Interval(Duration::from_secs(1));
    settings.uploads.completed_retention = Some(Interval(Duration::from_secs(2)));
    settings.janitor.interval = Interval(Duration::from_millis(200));
    settings.janitor.grace = Interval(Duration::from_millis(300));
    let addr = spawn(&settings, true).await;
    let acme = ApiClient::with_key(addr, ACME);

    // An abandoned upload holds the one slot until it expires.
    let abandoned = Source::random(2000, 1000, 21);
    let (code, body) = acme.put_chunk("abandoned", &abandoned, 0).await;
    assert_eq!(code, 200, "{body}");
    let next = Source::random(2000, 1000, 22);
    let (code, body) = acme.put_chunk("next", &next, 0).await;
    assert_eq!((code, error_code(&body)), (429, "quota_exceeded"), "{body}");
    tap.wait_for("abandoned", "upload.expired", MINUTE).await;
    // The janitor frees the slot right after the event.
    put_until_admitted(&acme, "next", &next).await;
    let (code, body) = acme.put_chunk("next", &next, 1).await;
    assert_eq!(code, 200, "{body}");
    acme.wait_for_state("next", "completed", MINUTE).await;

    // A completed file holds its bytes until its retention passes.
    let later = Source::random(1000, 1000, 23);
    let (code, body) = acme.put_chunk("later", &later, 0).await;
    assert_eq!((code, error_code(&body)), (429, "quota_exceeded"), "{body}");
    tap.wait_for("next", "upload.deleted", MINUTE).await;
    put_until_admitted(&acme, "later", &later).await;
}

/// Sends chunk 0 until the quota lets it in (a refusal stores nothing), within a minute.
async fn put_until_admitted(client: &ApiClient, id: &str, source: &Source) {
    let deadline = tokio::time::Instant::now() + MINUTE;
    loop {
        let (code, body) = client.put_chunk(id, source, 0).await;
        if code == 200 {
            return;
        }
        assert_eq!((code, error_code(&body)), (429, "quota_exceeded"), "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} was never admitted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_janitor_brings_a_lost_quota_ledger_back_from_storage() {
    let env = TestEnv::new();
    let mut settings = keyed(&env);
    settings.auth.quotas.max_active_uploads = Some(1);
    settings.janitor.interval = Interval(Duration::from_millis(200));
    let addr = spawn(&settings, true).await;
    let acme = ApiClient::with_key(addr, ACME);
    let source = Source::random(2000, 1000, 31);
    let (code, body) = acme.put_chunk("kept", &source, 0).await;
    assert_eq!(code, 200, "{body}");
    // Redis loses the ledger (a failover to an empty replica, say).
    let ledger = |kind: &str| format!("{}:{{quota:acme}}:{kind}", env.namespace);
    let active = ledger("active");
    let mut redis = env.redis().unwrap();
    let () = redis::cmd("DEL")
        .arg(&active)
        .arg(ledger("stored"))
        .arg(ledger("total"))
        .query(&mut redis)
        .unwrap();
    let deadline = tokio::time::Instant::now() + MINUTE;
    loop {
        let held: u64 = redis::cmd("HLEN").arg(&active).query(&mut redis).unwrap();
        if held == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the janitor did not restore the ledger"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total: u64 = redis::cmd("GET")
        .arg(ledger("total"))
        .query(&mut redis)
        .unwrap();
    assert_eq!(total, 2000);
    let (code, body) = acme.put_chunk("another", &source, 0).await;
    assert_eq!((code, error_code(&body)), (429, "quota_exceeded"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_auth_mode_none_every_request_is_the_default_tenant() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.auth.mode = stitch_common::config::AuthMode::None;
    let addr = spawn(&settings, false).await;
    let anyone = ApiClient::new(addr);
    let source = Source::random(1000, 1000, 41);
    let (code, body) = anyone.put_chunk("open", &source, 0).await;
    assert_eq!(code, 200, "{body}");
    let with_junk = ApiClient::with_key(addr, "whatever");
    let (code, status) = with_junk.status("open").await;
    assert_eq!(code, 200, "a credential is ignored, not refused: {status}");
    assert!(
        env.storage_snapshot()
            .keys()
            .any(|p| p.starts_with("uploads/open/")),
        "the default tenant's keys are bare names"
    );
}
