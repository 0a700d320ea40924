//! The worker's probes answer on its own bind, and readiness follows Redis.

#![allow(clippy::unwrap_used)]

use stitch_common::config::{Secret, Settings};

async fn start(redis_url: &str) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut settings = Settings {
        namespace: format!("test-{:016x}", rand_u64()),
        ..Settings::default()
    };
    settings.http.bind = "127.0.0.1:0".parse().unwrap();
    settings.redis.url = Secret::new(redis_url);
    settings.redis.timeout = stitch_common::config::Interval(std::time::Duration::from_secs(1));
    let worker = stitch_worker::Worker::build(&settings).await.unwrap();
    let addr = worker.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(worker.run_until_stopped(async {
        let _ = rx.await;
    }));
    (addr, tx)
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test]
async fn the_worker_is_live_and_ready_when_redis_answers() {
    let (addr, _stop) = start("redis://127.0.0.1:6379").await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn the_worker_is_not_ready_without_redis() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (addr, _stop) = start(&format!("redis://127.0.0.1:{port}")).await;
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let live = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}
