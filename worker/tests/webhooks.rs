//! The webhook dispatcher against real RabbitMQ and Redis, delivering to a real HTTP
//! receiver that verifies signatures with the Standard Webhooks reference library.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stitch_common::backends::Backends;
use stitch_common::config::{Interval, Secret, Settings, WebhookEndpoint};
use stitch_common::events::{Event, EventKind, EventUpload};
use stitch_common::geometry::Geometry;
use stitch_common::id::UploadId;
use stitch_common::queue::OutboxMessage;
use stitch_common::upload::NewUpload;
use stitch_common::webhooks::callback::Resolve;
use stitch_testkit::TestEnv;
use stitch_testkit::sink::{Canary, WebhookSink};
use stitch_worker::webhooks::Dispatcher;
use tokio::sync::watch;

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8G";
const SECRET_B: &str = "whsec_dGhpcyBpcyBhIHNlY29uZCBzZWNyZXQgb2YgMzIgYnl0ZXM=";
const PATIENCE: Duration = Duration::from_secs(30);

fn endpoint(id: &str, url: String, events: &[&str]) -> WebhookEndpoint {
    WebhookEndpoint {
        id: Some(id.into()),
        url,
        secret: Secret::new(SECRET_A),
        previous_secrets: vec![Secret::new(SECRET_B)],
        events: events.iter().map(|e| e.to_string()).collect(),
    }
}

struct Running {
    backends: Backends,
    dispatcher: Arc<Dispatcher>,
    _stop: watch::Sender<bool>,
}

async fn start(settings: &Settings, resolver: Option<Arc<dyn Resolve>>) -> Running {
    settings.validate().unwrap();
    let backends = Backends::distributed(settings).unwrap();
    let dispatcher = match resolver {
        Some(r) => Dispatcher::with_resolver(settings, &backends, r),
        None => Dispatcher::new(settings, &backends),
    };
    let dispatcher = Arc::new(dispatcher.unwrap());
    let (stop, rx) = watch::channel(false);
    tokio::spawn(dispatcher.clone().run(rx));
    Running {
        backends,
        dispatcher,
        _stop: stop,
    }
}

fn event(upload_id: &str, kind: EventKind) -> Event {
    Event {
        schema_version: 1,
        event_id: stitch_common::events::new_event_id(),
        kind,
        occurred_at: "2026-11-25T00:00:00.000Z".into(),
        upload: EventUpload {
            id: upload_id.into(),
            tenant: "default".into(),
            state: "completed".into(),
            filename: Some("f.bin".into()),
            size: 10,
            md5: Some("9e107d9d372bb6826bd81d3542a419d6".into()),
            metadata: None,
            download_url: Some(format!("/files/{upload_id}")),
            failure_reason: None,
            lost_chunks: None,
            crc32c: None,
            sha256: None,
            composite_md5: None,
        },
    }
}

async fn attempts(
    run: &Running,
    event_id: &str,
    n: usize,
) -> Vec<stitch_common::webhooks::DeliveryAttempt> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let log = run.dispatcher.store().attempts(event_id).await.unwrap();
        if log.len() >= n {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} attempts logged, not {n}: {log:?}",
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_signed_verifiable_by_the_reference_library_and_filtered() {
    let env = TestEnv::new();
    let all = WebhookSink::start(&[SECRET_A, SECRET_B], "200", &[]);
    let failures_only = WebhookSink::start(&[SECRET_A], "200", &[]);
    let mut settings = env.settings();
    settings.webhooks.endpoints = vec![
        endpoint("all", all.url("/hooks"), &[]),
        endpoint("failures", failures_only.url("/hooks"), &["upload.failed"]),
    ];
    let run = start(&settings, None).await;
    let completed = event("u1", EventKind::Completed);
    run.backends.events.publish_event(&completed).await.unwrap();

    let got = all.wait_for(1, PATIENCE).await;
    let request = &got[0];
    assert_eq!(
        request["headers"]["webhook-id"],
        completed.event_id.as_str()
    );
    assert_eq!(request["headers"]["content-type"], "application/json");
    assert_eq!(
        request["verified_with"],
        serde_json::json!([SECRET_A, SECRET_B]),
        "both the current and the previous secret verify (rotation)"
    );
    let body: Event = serde_json::from_str(request["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, completed);
    let log = attempts(&run, &completed.event_id, 1).await;
    assert_eq!(log[0].outcome, "delivered");
    assert_eq!(log[0].status, Some(200));

    let failed = event("u2", EventKind::Failed);
    run.backends.events.publish_event(&failed).await.unwrap();
    let got = failures_only.wait_for(1, PATIENCE).await;
    assert_eq!(got.len(), 1, "the filtered endpoint got only upload.failed");
    assert_eq!(got[0]["headers"]["webhook-id"], failed.event_id.as_str());
    assert_eq!(got[0]["verified_with"], serde_json::json!([SECRET_A]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_with_backoff_and_the_same_webhook_id() {
    let env = TestEnv::new();
    let sink = WebhookSink::start(&[SECRET_A], "500,503,200", &[]);
    let mut settings = env.settings();
    settings.webhooks.endpoints = vec![endpoint("flaky", sink.url("/"), &[])];
    let run = start(&settings, None).await;
    let e = event("u3", EventKind::Completed);
    run.backends.events.publish_event(&e).await.unwrap();

    let got = sink.wait_for(3, PATIENCE).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|r| r["headers"]["webhook-id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![e.event_id.as_str(); 3]);
    assert!(
        got.iter()
            .all(|r| r["verified_with"] == serde_json::json!([SECRET_A]))
    );
    let at: Vec<f64> = got
        .iter()
        .map(|r| r["received_at"].as_f64().unwrap())
        .collect();
    // The test environment's delays: 300 ms, then 1 s.
    assert!(
        at[1] - at[0] >= 0.3,
        "first retry after {:.3}s",
        at[1] - at[0]
    );
    assert!(
        at[2] - at[1] >= 1.0,
        "second retry after {:.3}s",
        at[2] - at[1]
    );
    let log = attempts(&run, &e.event_id, 3).await;
    let outcomes: Vec<&str> = log.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["failed", "failed", "delivered"]);
    assert_eq!(
        log.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failure_that_is_never_followed() {
    let env = TestEnv::new();
    let canary = Canary::start().await;
    let target = format!("http://127.0.0.1:{}/", canary.port);
    let sink = WebhookSink::start(&[SECRET_A], "redirect", &["--redirect-to", &target]);
    let mut settings = env.settings();
    settings.webhooks.endpoints = vec![endpoint("moved", sink.url("/"), &[])];
    let run = start(&settings, None).await;
    let e = event("u4", EventKind::Completed);
    run.backends.events.publish_event(&e).await.unwrap();

    let log = attempts(&run, &e.event_id, 3).await;
    let outcomes: Vec<&str> = log.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        vec!["failed", "failed", "dead"],
        "3 attempts, then the dead-letter queue"
    );
    assert!(log.iter().all(|a| a.status == Some(302)));
    assert_eq!(sink.requests().len(), 3);
    assert_eq!(canary.hits(), 0, "the redirect was followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_an_endpoint_until_an_admin_enables_it() {
    let env = TestEnv::new();
    let sink = WebhookSink::start(&[SECRET_A], "410,200", &[]);
    let mut settings = env.settings();
    settings.webhooks.endpoints = vec![endpoint("leaving", sink.url("/"), &[])];
    let key = |id: &str, secret: &str, scopes: &[&str]| stitch_common::config::ApiKeyEntry {
        id: id.into(),
        tenant: "ops".into(),
        sha256: stitch_common::auth::key_sha256(secret),
        scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
    };
    settings.auth.keys = vec![
        key("operator", "admin-key-for-tests", &["admin"]),
        key(
            "uploader",
            "upload-key-for-tests",
            &["upload", "read", "delete"],
        ),
    ];
    let run = start(&settings, None).await;
    let first = event("u5", EventKind::Completed);
    run.backends.events.publish_event(&first).await.unwrap();
    assert_eq!(attempts(&run, &first.event_id, 1).await[0].outcome, "gone");
    assert!(run.dispatcher.store().is_disabled("leaving").await.unwrap());

    let second = event("u6", EventKind::Completed);
    run.backends.events.publish_event(&second).await.unwrap();
    assert_eq!(
        attempts(&run, &second.event_id, 1).await[0].outcome,
        "disabled"
    );
    assert_eq!(
        sink.requests().len(),
        1,
        "nothing is sent to a disabled endpoint"
    );

    // The admin API: the log, enabling, replaying.
    let admin = stitch_worker::webhooks::admin::router(
        run.dispatcher.clone(),
        stitch_common::auth::Authenticator::new(&settings.auth).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, admin).await });
    let http = stitch_testkit::http_client();
    let unauthorized = http
        .get(format!("{base}/admin/events/{}", second.event_id))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let without_scope = http
        .get(format!("{base}/admin/events/{}", second.event_id))
        .header("authorization", "Bearer upload-key-for-tests")
        .send()
        .await
        .unwrap();
    assert_eq!(
        without_scope.status(),
        403,
        "a key without `admin` is refused"
    );
    let auth = "Bearer admin-key-for-tests";
    let shown: serde_json::Value = http
        .get(format!("{base}/admin/events/{}", first.event_id))
        .header("authorization", auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["event"]["event_id"], first.event_id.as_str());
    assert_eq!(shown["deliveries"][0]["outcome"], "gone");
    let enabled = http
        .post(format!("{base}/admin/webhooks/leaving/enable"))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    assert_eq!(enabled.status(), 204);
    let replayed = http
        .post(format!("{base}/admin/events/{}/replay", second.event_id))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 202);
    let got = sink.wait_for(2, PATIENCE).await;
    assert_eq!(got[1]["headers"]["webhook-id"], second.event_id.as_str());
    assert_eq!(got[1]["answer"], "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_is_cut_off_by_the_timeout() {
    let env = TestEnv::new();
    let sink = WebhookSink::start(&[SECRET_A], "hang", &["--hang-seconds", "60"]);
    let mut settings = env.settings();
    settings.webhooks.endpoints = vec![endpoint("silent", sink.url("/"), &[])];
    settings.webhooks.timeout = Interval(Duration::from_secs(1));
    let run = start(&settings, None).await;
    let e = event("u7", EventKind::Completed);
    run.backends.events.publish_event(&e).await.unwrap();
    let log = attempts(&run, &e.event_id, 1).await;
    assert_eq!(log[0].outcome, "failed");
    assert_eq!(log[0].error.as_deref(), Some("timed out"));
    assert!(log[0].latency_ms < 10_000, "{log:?}");
}

/// Resolves from a table, which a test may change (nothing leaves the machine), and counts
/// the lookups.
struct Table {
    answers: Mutex<HashMap<String, IpAddr>>,
    lookups: AtomicUsize,
}

impl Table {
    fn new(entries: &[(&str, &str)]) -> Arc<Self> {
        let answers = entries
            .iter()
            .map(|(host, ip)| (host.to_string(), ip.parse().unwrap()))
            .collect();
        Arc::new(Self {
            answers: Mutex::new(answers),
            lookups: AtomicUsize::new(0),
        })
    }

    fn answer(&self, host: &str, ip: &str) {
        let mut answers = self.answers.lock().unwrap();
        answers.insert(host.to_owned(), ip.parse().unwrap());
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Resolve for Table {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let answers = self.answers.lock().unwrap();
        answers
            .get(host)
            .map(|ip| vec![SocketAddr::new(*ip, port)])
            .ok_or_else(|| std::io::Error::other("unknown host"))
    }
}

/// An upload with a client callback to `url`, signed with `secret`.
async fn upload_with_callback(run: &Running, id: &str, url: String, secret: &str) {
    let upload = NewUpload {
        id: UploadId::parse(id).unwrap(),
        geometry: Geometry::new(10, 10).unwrap(),
        filename: None,
        file_md5: None,
        metadata: None,
        created_at_ms: 1,
        assembly: Default::default(),
        callback_url: Some(url),
        callback_secret: Some(secret.into()),
    };
    run.backends
        .state
        .create_upload(
            &upload,
            &OutboxMessage::event(&Event::created(&upload)),
            60_000,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_callbacks_are_checked_resolved_and_pinned() {
    let env = TestEnv::new();
    let canary = Canary::start().await;
    let secret = "whsec_Y2FsbGJhY2sgc2VjcmV0IG9mIHRoaXMgdXBsb2Fk";
    let sink = WebhookSink::start(&[secret], "200", &[]);
    let resolver: Arc<dyn Resolve> =
        Table::new(&[("canary.test", "127.0.0.1"), ("partner.test", "127.0.0.1")]);
    let mut settings = env.settings();
    settings.webhooks.allow_client_callbacks = true;
    let run = start(&settings, Some(resolver.clone())).await;

    // An upload whose callback resolves to loopback: refused, and the canary never sees it.
    let url = format!("http://canary.test:{}/hook", canary.port);
    upload_with_callback(&run, "cb1", url, secret).await;
    let e = event("cb1", EventKind::Completed);
    run.backends.events.publish_event(&e).await.unwrap();
    let log = attempts(&run, &e.event_id, 1).await;
    assert_eq!(log[0].outcome, "refused");
    assert!(
        log[0].error.as_deref().unwrap().contains("loopback"),
        "{log:?}"
    );
    assert_eq!(canary.hits(), 0);

    // The operator allows that network: the callback goes to the checked address, signed
    // with the upload's own secret.
    drop(run);
    settings.webhooks.callback_allow_networks = vec!["127.0.0.1/32".into()];
    let run = start(&settings, Some(resolver)).await;
    let url = format!("http://partner.test:{}/hook", sink.port);
    upload_with_callback(&run, "cb2", url, secret).await;
    let e = event("cb2", EventKind::Completed);
    run.backends.events.publish_event(&e).await.unwrap();
    let got = sink.wait_for(1, PATIENCE).await;
    assert_eq!(got[0]["verified_with"], serde_json::json!([secret]));
    assert_eq!(
        got[0]["headers"]["host"],
        format!("partner.test:{}", sink.port)
    );
    assert_eq!(got[0]["path"], "/hook");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_to_one_host_share_one_connection_and_one_lookup() {
    let env = TestEnv::new();
    let secret = "whsec_Y2FsbGJhY2sgc2VjcmV0IG9mIHRoaXMgdXBsb2Fk";
    let sink = WebhookSink::start(&[secret], "200", &["--keep-alive"]);
    let table = Table::new(&[("partner.test", "127.0.0.1")]);
    let mut settings = env.settings();
    settings.webhooks.allow_client_callbacks = true;
    settings.webhooks.callback_allow_networks = vec!["127.0.0.1/32".into()];
    let run = start(&settings, Some(table.clone())).await;
    let url = format!("http://partner.test:{}/hook", sink.port);
    upload_with_callback(&run, "cb3", url, secret).await;

    for _ in 0..2 {
        let e = event("cb3", EventKind::Completed);
        run.backends.events.publish_event(&e).await.unwrap();
        assert_eq!(attempts(&run, &e.event_id, 1).await[0].outcome, "delivered");
    }
    let got = sink.wait_for(2, PATIENCE).await;
    assert_eq!(
        got[0]["peer_port"], got[1]["peer_port"],
        "the second delivery came over the first one's connection"
    );
    assert_eq!(table.lookups(), 1, "one connection, one lookup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_host_that_rebinds_to_a_refused_address_is_refused_when_connecting() {
    let env = TestEnv::new();
    let secret = "whsec_Y2FsbGJhY2sgc2VjcmV0IG9mIHRoaXMgdXBsb2Fk";
    // HTTP/1.0: the sink closes each connection, so each delivery connects (and resolves)
    // anew.
    let sink = WebhookSink::start(&[secret], "200", &[]);
    let table = Table::new(&[("rebind.test", "127.0.0.1")]);
    let mut settings = env.settings();
    settings.webhooks.allow_client_callbacks = true;
    settings.webhooks.callback_allow_networks = vec!["127.0.0.1/32".into()];
    let run = start(&settings, Some(table.clone())).await;
    let url = format!("http://rebind.test:{}/hook", sink.port);
    let policy = stitch_common::webhooks::callback::CallbackPolicy::new(
        &settings.webhooks.callback_allowlist,
        &settings.webhooks.callback_allow_networks,
    )
    .unwrap();
    assert!(policy.check_url(&url).is_ok(), "the URL passes at creation");
    upload_with_callback(&run, "cb4", url, secret).await;

    let first = event("cb4", EventKind::Completed);
    run.backends.events.publish_event(&first).await.unwrap();
    assert_eq!(
        attempts(&run, &first.event_id, 1).await[0].outcome,
        "delivered"
    );

    // The name now points at a loopback address the operator did not allow.
    table.answer("rebind.test", "127.0.0.2");
    let second = event("cb4", EventKind::Completed);
    run.backends.events.publish_event(&second).await.unwrap();
    let log = attempts(&run, &second.event_id, 1).await;
    assert_eq!(log[0].outcome, "refused", "{log:?}");
    assert_eq!(
        log[0].error.as_deref(),
        Some("address 127.0.0.2 is loopback"),
        "{log:?}"
    );
    assert_eq!(table.lookups(), 2, "each delivery looked the name up");
    assert_eq!(sink.requests().len(), 1);
}
