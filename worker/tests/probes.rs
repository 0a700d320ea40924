//! The worker's probes answer on its own bind, and readiness follows Redis and the broker.

#![allow(clippy::unwrap_used)]

use stitch_common::config::{Interval, Secret, Settings};
use stitch_testkit::TestEnv;

async fn start(settings: Settings) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let worker = stitch_worker::Worker::build(&settings).await.unwrap();
    let addr = worker.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(worker.run_until_stopped(async {
        let _ = rx.await;
    }));
    (addr, tx)
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_worker_is_live_and_ready_when_redis_and_the_broker_answer() {
    let env = TestEnv::new();
    let (addr, _stop) = start(env.settings()).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = stitch_testkit::http_client()
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn the_worker_is_not_ready_without_redis_or_without_the_broker() {
    let env = TestEnv::new();
    let mut no_redis = env.settings();
    no_redis.redis.url = Secret::new(format!("redis://127.0.0.1:{}", closed_port()));
    no_redis.redis.timeout = Interval(std::time::Duration::from_secs(1));
    let mut no_broker = env.settings();
    no_broker.amqp.url = Secret::new(format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        closed_port()
    ));
    no_broker.amqp.timeout = Interval(std::time::Duration::from_secs(1));
    for (name, settings) in [("state", no_redis), ("queue", no_broker)] {
        let (addr, _stop) = start(settings).await;
        let ready = stitch_testkit::http_client()
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503, "without {name}");
        let body: serde_json::Value = ready.json().await.unwrap();
        assert_ne!(body["checks"][name], "ok", "{body}");
        let live = stitch_testkit::http_client()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(live.status(), 200);
    }
}
