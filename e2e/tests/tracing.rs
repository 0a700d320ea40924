//! One trace follows an upload: the API request that completed it, the merge, the event's
//! fan-out and its webhook delivery, across RabbitMQ. Spans are captured in memory (this test
//! binary owns its process's tracing subscriber).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use stitch_common::config::{Secret, WebhookEndpoint};
use stitch_testkit::sink::WebhookSink;
use stitch_testkit::{ApiClient, Source, TestEnv, new_id};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8G";

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_merge_and_the_webhook_belong_to_the_trace_of_the_completing_request() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let env = TestEnv::new();
    let sink = WebhookSink::start(&[SECRET], "200", &[]);
    let mut settings = env.settings();
    settings.log.level = "warn".into();
    settings.webhooks.endpoints = vec![WebhookEndpoint {
        id: Some("traced".into()),
        url: sink.url("/"),
        secret: Secret::new(SECRET),
        previous_secrets: vec![],
        events: vec!["upload.completed".into()],
    }];
    let _telemetry =
        stitch_common::telemetry::init_with_provider(&settings.log, Some(provider.clone()));

    let api = stitch_api::Application::build(&settings).await.unwrap();
    let client = ApiClient::new(api.local_addr());
    tokio::spawn(api.run_until_stopped(std::future::pending()));
    let worker = stitch_worker::Worker::build(&settings).await.unwrap();
    tokio::spawn(worker.run_until_stopped(std::future::pending()));

    // A one-chunk upload: its only PUT is the request that completes it.
    let id = new_id();
    let source = Source::random(5000, 5000, 51);
    let (code, body) = client.put_chunk(&id, &source, 0).await;
    assert_eq!(code, 200, "{body}");
    client
        .wait_for_state(&id, "completed", Duration::from_secs(60))
        .await;
    sink.wait_for(1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().unwrap();
    let put = spans
        .iter()
        .find(|s| s.name == "request" && attribute(s, "method").as_deref() == Some("PUT"))
        .unwrap_or_else(|| {
            panic!(
                "no PUT request span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    let trace: TraceId = put.span_context.trace_id();
    let merge = spans
        .iter()
        .find(|s| s.name == "merge" && attribute(s, "upload_id").as_deref() == Some(id.as_str()))
        .expect("a merge span for the upload");
    assert_eq!(
        merge.span_context.trace_id(),
        trace,
        "the merge continues the request's trace"
    );
    assert_ne!(merge.parent_span_id, SpanId::INVALID);
    let deliver = spans
        .iter()
        .find(|s| s.name == "webhook.deliver" && s.span_context.trace_id() == trace);
    assert!(
        deliver.is_some(),
        "the webhook delivery is in the same trace"
    );
    let fan_out = spans
        .iter()
        .find(|s| s.name == "webhook.fan_out" && s.span_context.trace_id() == trace);
    assert!(fan_out.is_some(), "the fan-out is in the same trace");
}
