//! Traces reach a real OTLP/HTTP receiver from the real programs: spans arrive from
//! `stitch-api` and `stitch-worker`, and the trace of the request that completed an upload
//! runs through RabbitMQ into the worker's merge.

use std::time::Duration;

use stitch_testkit::otlp::OtlpReceiver;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upload_s_trace_runs_from_the_api_through_rabbitmq_into_the_worker() {
    let receiver = OtlpReceiver::start().await;
    let env = TestEnv::new();
    // The API is pointed at the receiver by Stitch's own key (the full traces URL); the
    // worker by OpenTelemetry's standard variables (a base URL and a service name).
    let mut api = api_command(&env);
    api.env("STITCH__TRACING__OTLP_ENDPOINT", receiver.traces_url())
        .env("OTEL_BSP_SCHEDULE_DELAY", "200");
    let api = ServiceProcess::start(api, "stitch-api listening");
    let mut worker = worker_command(&env);
    worker
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base_url())
        .env("OTEL_SERVICE_NAME", "stitch-worker-traced")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200");
    let _worker = ServiceProcess::start(worker, "stitch-worker listening");

    let client = ApiClient::new(api.addr);
    let source = Source::random(3000, 1000, 61);
    let id = new_id();
    // Chunks 1 and 2 first, then 0: the PUT of chunk 0 is the one that completes the upload.
    for index in [1, 2, 0] {
        let (code, body) = client.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["upload_complete"], index == 0, "{body}");
    }
    client.wait_for_state(&id, "completed", MINUTE).await;

    let merge = receiver
        .wait_for(MINUTE, "the worker's merge span", |spans| {
            spans
                .iter()
                .find(|s| s.name == "merge" && s.attribute("upload_id") == Some(id.as_str()))
                .cloned()
        })
        .await;
    assert_eq!(
        merge.service, "stitch-worker-traced",
        "OTEL_SERVICE_NAME names the worker's service"
    );
    assert!(
        !merge.parent_span_id.is_empty(),
        "the merge continues a trace from its message"
    );
    let requests = receiver
        .wait_for(MINUTE, "the API's PUT request spans", |spans| {
            let puts: Vec<_> = spans
                .iter()
                .filter(|s| {
                    s.service == "stitch-api"
                        && s.name == "request"
                        && s.attribute("method") == Some("PUT")
                })
                .cloned()
                .collect();
            (puts.len() >= 3).then_some(puts)
        })
        .await;
    let parents: Vec<_> = requests
        .iter()
        .filter(|put| put.trace_id == merge.trace_id)
        .collect();
    assert_eq!(
        parents.len(),
        1,
        "exactly one PUT (the completing one) shares the merge's trace: {requests:?} / {merge:?}"
    );
    assert_ne!(
        parents[0].span_id, merge.span_id,
        "the merge is a span of its own in the request's trace"
    );
    assert_eq!(receiver.rejected(), 0, "every export request decoded");
}
