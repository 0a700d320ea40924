//! Metrics as an operator sees them: scraped from real API and worker processes while an
//! upload completes, another fails, and their events go out as webhooks; and every metric
//! the dashboard and the alert rules under `deploy/` use is one the binaries export.

use std::collections::BTreeSet;
use std::time::Duration;

use stitch_testkit::prometheus::Scrape;
use stitch_testkit::sink::WebhookSink;

use crate::harness::*;

/// A series (name, labels) and the value it should have.
type Expected = (&'static str, Vec<(&'static str, &'static str)>, f64);

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8G";

async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    let response = http_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("a /metrics response");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    Scrape::parse(&response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_uploads_merges_and_webhooks() {
    let env = TestEnv::new();
    let sink = WebhookSink::start(&[SECRET], "200", &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stitch.toml");
    std::fs::write(
        &config,
        format!(
            "[[webhooks.endpoints]]\nid = \"metrics\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
            sink.url("/hooks")
        ),
    )
    .unwrap();
    let api = start_api(&env);
    let mut cmd = worker_command(&env);
    // No sweeper republishing during the test (the harness's 1 s horizon could fire on a
    // loaded machine and add a redelivery): the counts below are then exact.
    cmd.env("STITCH_CONFIG", &config)
        .env("STITCH__METRICS__QUEUE_POLL_INTERVAL", "200ms")
        .env("STITCH__SWEEPER__OUTBOX_HORIZON", "10m");
    let worker = ServiceProcess::start(cmd, "stitch-worker listening");
    let client = ApiClient::new(api.addr);

    // Before anything happens, the series exist at zero (so `increase()` and alerts work
    // from a process's first scrape).
    let api_before = scrape(api.addr).await;
    let worker_before = scrape(worker.addr).await;
    for (scrape, name, labels) in [
        (
            &api_before,
            "stitch_chunks_received_total",
            vec![("result", "new")],
        ),
        (
            &api_before,
            "stitch_chunks_refused_total",
            vec![("class", "4xx")],
        ),
        (
            &api_before,
            "stitch_upload_transitions_total",
            vec![("transition", "created")],
        ),
        (
            &api_before,
            "stitch_backend_errors_total",
            vec![("backend", "redis")],
        ),
        (
            &worker_before,
            "stitch_merges_total",
            vec![("outcome", "committed")],
        ),
        (&worker_before, "stitch_lock_leases_lost_total", vec![]),
        (
            &worker_before,
            "stitch_dead_letter_messages",
            vec![("family", "merge")],
        ),
        (
            &worker_before,
            "stitch_webhook_deliveries_total",
            vec![("outcome", "delivered")],
        ),
    ] {
        assert!(
            scrape.has(name, &labels),
            "{name} {labels:?} missing before any event"
        );
        assert_eq!(scrape.value(name, &labels), 0.0, "{name} {labels:?}");
    }

    // One upload that completes, one whose declared MD5 is wrong, one refused chunk. Each
    // sent in order, so that each is created by its first chunk (exactly two "created").
    let good = Source::random(3 * 64 * 1024 + 5, 64 * 1024, 61);
    let good_id = new_id();
    upload_in_order(
        std::slice::from_ref(&client),
        &good_id,
        &good,
        &md5_hex(&good.bytes),
    )
    .await;
    let bad = Source::random(2 * 64 * 1024, 64 * 1024, 62);
    let bad_id = new_id();
    upload_in_order(
        std::slice::from_ref(&client),
        &bad_id,
        &bad,
        &md5_hex(b"something else"),
    )
    .await;
    let (code, _) = client
        .put_chunk(&good_id, &Source::random(10, 10, 63), 0)
        .await;
    assert_eq!(code / 100, 4, "a chunk of another geometry is refused");
    let status = client
        .wait_for_state(&good_id, "completed", Duration::from_secs(60))
        .await;
    assert_eq!(status["state"], "completed", "{status}");
    let status = client
        .wait_for_state(&bad_id, "failed", Duration::from_secs(60))
        .await;
    assert_eq!(status["state"], "failed", "{status}");
    // created ×2, completed, failed.
    sink.wait_for(4, Duration::from_secs(60)).await;

    let api_after = scrape(api.addr).await;
    let chunks = (good.total_chunks() + bad.total_chunks()) as f64;
    let bytes = (good.len() + bad.len()) as f64;
    let put = [
        ("method", "PUT"),
        ("route", "/upload/chunk"),
        ("status", "200"),
    ];
    for (name, labels, expected) in [
        (
            "stitch_chunks_received_total",
            vec![("result", "new")],
            chunks,
        ),
        (
            "stitch_chunks_received_total",
            vec![("result", "duplicate")],
            0.0,
        ),
        ("stitch_chunk_bytes_received_total", vec![], bytes),
        ("stitch_chunks_refused_total", vec![("class", "4xx")], 1.0),
        ("stitch_chunks_refused_total", vec![("class", "5xx")], 0.0),
        ("stitch_chunk_writes_in_flight", vec![], 0.0),
        (
            "stitch_upload_transitions_total",
            vec![("transition", "created")],
            2.0,
        ),
        ("stitch_http_requests_total", put.to_vec(), chunks),
        (
            "stitch_http_request_duration_seconds_count",
            put.to_vec(),
            chunks,
        ),
        (
            "stitch_backend_errors_total",
            vec![("backend", "redis")],
            0.0,
        ),
    ] {
        assert_eq!(
            api_after.value(name, &labels),
            expected,
            "API {name} {labels:?}"
        );
    }
    assert!(
        api_after.sum(
            "stitch_http_requests_total",
            &[("route", "/upload/{id}/status")]
        ) >= 2.0,
        "status requests are counted by route template, not by upload id"
    );

    // The worker's counters move as the deliveries are recorded: poll until they settle.
    let expected_worker: Vec<Expected> = vec![
        ("stitch_merges_total", vec![("outcome", "committed")], 1.0),
        ("stitch_merges_total", vec![("outcome", "failed")], 1.0),
        (
            "stitch_upload_transitions_total",
            vec![("transition", "completed")],
            1.0,
        ),
        (
            "stitch_upload_transitions_total",
            vec![("transition", "failed")],
            1.0,
        ),
        (
            "stitch_lock_acquisitions_total",
            vec![("result", "acquired")],
            2.0,
        ),
        ("stitch_lock_leases_lost_total", vec![], 0.0),
        ("stitch_merge_duration_seconds_count", vec![], 1.0),
        ("stitch_merge_size_bytes_sum", vec![], good.len() as f64),
        (
            "stitch_webhook_deliveries_total",
            vec![("outcome", "delivered")],
            4.0,
        ),
        (
            "stitch_webhook_delivery_duration_seconds_count",
            vec![],
            4.0,
        ),
        ("stitch_queue_consumers", vec![("family", "merge")], 1.0),
        ("stitch_queue_messages", vec![("family", "merge")], 0.0),
        (
            "stitch_dead_letter_messages",
            vec![("family", "merge")],
            0.0,
        ),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let worker_after = loop {
        let now = scrape(worker.addr).await;
        let wrong: Vec<String> = expected_worker
            .iter()
            .filter(|(name, labels, want)| now.value(name, labels) != *want)
            .map(|(name, labels, want)| {
                format!(
                    "{name} {labels:?}: {} (want {want})",
                    now.value(name, labels)
                )
            })
            .collect();
        if wrong.is_empty() {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker metrics: {wrong:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(worker_after.value("stitch_merge_duration_seconds_sum", &[]) > 0.0);

    // Every metric the dashboard and the alerts use is exported by one of the binaries.
    let exported: BTreeSet<String> = api_after
        .declared
        .iter()
        .chain(worker_after.declared.iter())
        .cloned()
        .collect();
    let used = metrics_used_by_operations_files();
    assert!(used.len() >= 15, "found only {used:?}");
    let missing: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "used in deploy/ but not exported: {missing:?}; exported: {exported:?}"
    );
}

/// The `stitch_*` metric names in the dashboard and the alert rules, histogram series
/// (`_bucket`, `_sum`, `_count`) folded into their histogram's name.
fn metrics_used_by_operations_files() -> BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = [
        "deploy/grafana/dashboards/stitch.json",
        "deploy/prometheus/alerts.yml",
    ];
    let mut used = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"));
        let mut rest = text.as_str();
        while let Some(at) = rest.find("stitch_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            used.insert(base.to_owned());
        }
    }
    used
}
