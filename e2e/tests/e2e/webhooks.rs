//! Webhooks across processes: a dispatcher killed in the middle of a delivery.

use std::time::Duration;

use stitch_testkit::sink::WebhookSink;

use crate::harness::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8G";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_delivery_delivers_the_event_after_restart() {
    let env = TestEnv::new();
    // The first request hangs (the dispatcher is killed while it waits); later ones succeed.
    let sink = WebhookSink::start(&[SECRET], "hang,200", &["--hang-seconds", "120"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stitch.toml");
    std::fs::write(
        &config,
        format!(
            "[[webhooks.endpoints]]\nid = \"e2e\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
            sink.url("/hooks")
        ),
    )
    .unwrap();
    let dispatcher = || {
        let mut cmd = worker_command(&env);
        cmd.env("STITCH_CONFIG", &config)
            .env("STITCH__WEBHOOKS__TIMEOUT", "300s");
        ServiceProcess::start(cmd, "stitch-worker listening")
    };
    let api = start_api(&env);
    let mut first = dispatcher();
    let client = ApiClient::new(api.addr);
    let source = Source::random(1000, 1000, 41);
    let id = new_id();
    let (code, body) = client.put_chunk(&id, &source, 0).await;
    assert_eq!(code, 200, "{body}");

    let hung = sink.wait_for(1, Duration::from_secs(60)).await;
    let hung_id = hung[0]["headers"]["webhook-id"]
        .as_str()
        .unwrap()
        .to_owned();
    first.kill();

    let _second = dispatcher();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let redelivered = sink.requests().into_iter().skip(1).any(|r| {
            r["headers"]["webhook-id"] == hung_id.as_str()
                && r["answer"] == "200"
                && r["verified_with"] == serde_json::json!([SECRET])
        });
        if redelivered {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not redelivered: {:?}",
            sink.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both of the upload's events (created and completed) arrive, verified.
    let delivered_kinds = || -> std::collections::BTreeSet<String> {
        sink.requests()
            .iter()
            .filter(|r| r["answer"] == "200" && r["verified_with"] == serde_json::json!([SECRET]))
            .filter_map(|r| {
                let body: serde_json::Value = serde_json::from_str(r["body"].as_str()?).ok()?;
                Some(body["type"].as_str()?.to_owned())
            })
            .collect()
    };
    let expected: std::collections::BTreeSet<String> = ["upload.created", "upload.completed"]
        .map(String::from)
        .into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while delivered_kinds() != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {:?}",
            delivered_kinds()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
