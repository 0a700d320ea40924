//! Backend failures: an unreachable Redis, unwritable storage and a full disk each get their
//! status (503 with Retry-After, 507) and leave nothing half-recorded.

use std::process::Command;

use crate::helpers::*;

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn an_unreachable_redis_means_503_with_retry_after_and_nothing_stored() {
    let port = closed_port();
    let app = spawn_app_with(|s| {
        s.redis.url = stitch_common::config::Secret::new(format!("redis://127.0.0.1:{port}"));
        s.redis.timeout = stitch_common::config::Interval(std::time::Duration::from_secs(1));
    })
    .await;
    let id = new_id();
    let source = Source::random(2000, 1000, 12);
    let response = app.chunk_request(&id, &source, 0).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "unavailable");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&port.to_string()),
        "internal detail leaked: {body}"
    );
    assert!(app.env.storage_snapshot().is_empty());
    assert_eq!(app.status(&id).await.0, 503);
    let (code, ready) = json_response(app.client.get(app.url("/readyz")).send().await).await;
    assert_eq!(code, 503);
    assert_ne!(ready["checks"]["state"], "ok");
    assert_eq!(ready["checks"]["storage"], "ok");
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "liveness does not depend on backends");
}

#[tokio::test]
async fn unwritable_storage_means_503_and_nothing_recorded() {
    let env = TestEnv::new();
    let not_a_dir = env.storage_root.join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let app = spawn_in(env.clone(), |s| s.storage.root = not_a_dir.clone()).await;
    let id = new_id();
    let source = Source::random(2000, 1000, 13);
    let (code, body) = app.put_chunk(&id, &source, 0).await;
    assert_eq!((code, error_code(&body)), (503, "unavailable"), "{body}");
    assert!(env.redis_snapshot().is_empty());
    let (code, ready) = json_response(app.client.get(app.url("/readyz")).send().await).await;
    assert_eq!(code, 503);
    assert_ne!(ready["checks"]["storage"], "ok");
}

/// A tmpfs of a few KiB mounted over the storage root, unmounted on drop.
struct TinyDisk {
    path: std::path::PathBuf,
}

impl TinyDisk {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill a disk for real and needs root (CAP_SYS_ADMIN)"
        );
        Self {
            path: path.to_owned(),
        }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[tokio::test]
async fn a_full_disk_means_507_and_no_partial_file() {
    let env = TestEnv::new();
    let _disk = TinyDisk::mount(&env.storage_root, "128k");
    let app = spawn_in(env.clone(), |_| {}).await;
    let id = new_id();
    let source = Source::random(1 << 20, 512 << 10, 14);
    let (code, body) = app.put_chunk(&id, &source, 0).await;
    assert_eq!(
        (code, error_code(&body)),
        (507, "insufficient_storage"),
        "{body}"
    );
    assert!(
        env.storage_snapshot().is_empty(),
        "{:?}",
        env.storage_snapshot()
    );
    assert!(env.redis_snapshot().is_empty());
    // A chunk that fits still goes through afterwards: the space was given back.
    let small = Source::random(40 << 10, 20 << 10, 15);
    let (code, body) = app.put_chunk(&id, &small, 0).await;
    assert_eq!(code, 200, "{body}");
    app.stop().await;
}
