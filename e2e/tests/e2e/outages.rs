//! Broker outages: the completing chunk arrives while RabbitMQ is unreachable.

use std::time::Duration;

use stitch_testkit::proxy::TcpProxy;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_completed_during_a_broker_outage_is_merged_once_the_broker_is_back() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    // The API and the worker reach RabbitMQ only through a proxy the test can cut.
    let proxy = TcpProxy::start(stitch_testkit::amqp_addr()).await;
    let via_proxy = stitch_testkit::amqp_url_via(proxy.addr);
    let mut api_cmd = api_command(&env);
    api_cmd
        .env("STITCH__AMQP__URL", &via_proxy)
        .env("STITCH__AMQP__TIMEOUT", "2s");
    let api = ServiceProcess::start(api_cmd, "stitch-api listening");
    let mut worker_cmd = worker_command(&env);
    worker_cmd
        .env("STITCH__AMQP__URL", &via_proxy)
        .env("STITCH__AMQP__TIMEOUT", "2s");
    let _worker = ServiceProcess::start(worker_cmd, "stitch-worker listening");
    let client = ApiClient::new(api.addr);
    let source = Source::random(4 << 20, 1 << 20, 26);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();

    // Everything but the last chunk, then the outage, then the completing chunk.
    for index in 0..source.total_chunks() - 1 {
        let (code, body) = client.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    proxy.cut();
    let last = source.total_chunks() - 1;
    let (code, body) = json_response(
        client
            .chunk_request(&id, &source, last)
            .header("X-File-MD5", &md5)
            .send()
            .await,
    )
    .await;
    assert_eq!(
        code, 200,
        "the chunk is accepted while the broker is down: {body}"
    );
    assert_eq!(body["upload_complete"], true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, status) = client.status(&id).await;
    assert_eq!(
        status["state"], "merging",
        "nothing can merge while the broker is away"
    );

    proxy.restore();
    let status = client.wait_for_state(&id, "completed", 2 * MINUTE).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["md5"], md5.as_str());
    assert_eq!(client.download(&id).await, source.bytes);
    tap.wait_for(&id, "upload.completed", MINUTE).await;
    assert_eq!(distinct_event_ids(&tap, &id, "upload.completed").len(), 1);
}
