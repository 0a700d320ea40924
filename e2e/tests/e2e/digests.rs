//! Whole-file digests beyond MD5 (CRC32C, SHA-256, the composite MD5 of the parts), checked
//! against digests computed here from the source bytes, in the status view and the
//! `upload.completed` event, and after a rebuild from storage.

use std::time::Duration;

use md5::Digest;

use crate::harness::*;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_reports_the_files_crc32c_sha256_and_composite_md5_in_status_and_event() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let mut worker = worker_command(&env);
    worker.env("STITCH__UPLOADS__FILE_DIGEST", "md5+sha256");
    let _worker = ServiceProcess::start(worker, "stitch-worker listening");
    let client = ApiClient::new(api.addr);
    // Five chunks, the last one short.
    let source = Source::random((4 << 20) + 12_345, 1 << 20, 77);
    let id = new_id();

    // What the test expects, from the bytes alone.
    let md5 = md5_hex(&source.bytes);
    let sha256 = hex::encode(sha2::Sha256::digest(&source.bytes));
    let crc32c = format!("{:08x}", crc32c::crc32c(&source.bytes));
    let mut part_md5s = Vec::new();
    for index in 0..source.total_chunks() {
        let (_, bytes) = source.chunk(index);
        part_md5s.extend_from_slice(&md5::Md5::digest(bytes));
    }
    let composite = format!(
        "{}-{}",
        hex::encode(md5::Md5::digest(&part_md5s)),
        source.total_chunks()
    );

    for index in 0..source.total_chunks() {
        let (_, bytes) = source.chunk(index);
        let content_md5 = stitch_common::digest::Md5::from_bytes(md5::Md5::digest(bytes).into());
        let (code, body) = json_response(
            client
                .chunk_request(&id, &source, index)
                .header("Content-MD5", content_md5.to_base64())
                .send()
                .await,
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }

    let status = client.wait_for_state(&id, "completed", MINUTE).await;
    assert_eq!(status["md5"], md5.as_str(), "{status}");
    assert_eq!(status["crc32c"], crc32c.as_str(), "{status}");
    assert_eq!(status["sha256"], sha256.as_str(), "{status}");
    assert_eq!(status["composite_md5"], composite.as_str(), "{status}");

    let event = tap.wait_for(&id, "upload.completed", MINUTE).await;
    let upload = &event["upload"];
    assert_eq!(upload["md5"], md5.as_str(), "{event}");
    assert_eq!(upload["crc32c"], crc32c.as_str(), "{event}");
    assert_eq!(upload["sha256"], sha256.as_str(), "{event}");
    assert_eq!(upload["composite_md5"], composite.as_str(), "{event}");
    assert_eq!(event["schema_version"], 1);

    // Redis loses everything: the completion record on storage brings the digests back.
    env.lose_redis_keys();
    let mut migrate = worker_command(&env);
    migrate.arg("migrate");
    assert!(migrate.status().unwrap().success());
    let (code, rebuilt) = client.status(&id).await;
    assert_eq!(code, 200, "{rebuilt}");
    assert_eq!(rebuilt["state"], "completed", "{rebuilt}");
    for field in ["md5", "crc32c", "sha256", "composite_md5"] {
        assert_eq!(
            rebuilt[field], status[field],
            "{field} after a rebuild: {rebuilt}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_part_md5s_or_sha256_only_the_crc32c_joins_the_md5() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let api = start_api(&env);
    let _worker = start_worker(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random((2 << 20) + 7, 1 << 20, 78);
    let id = new_id();
    for index in 0..source.total_chunks() {
        let (code, body) = client.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    let status = client.wait_for_state(&id, "completed", MINUTE).await;
    let crc32c = format!("{:08x}", crc32c::crc32c(&source.bytes));
    assert_eq!(status["crc32c"], crc32c.as_str(), "{status}");
    assert!(status.get("sha256").is_none(), "{status}");
    assert!(status.get("composite_md5").is_none(), "{status}");
    let event = tap.wait_for(&id, "upload.completed", MINUTE).await;
    assert_eq!(event["upload"]["crc32c"], crc32c.as_str(), "{event}");
    assert!(event["upload"].get("sha256").is_none(), "{event}");
    assert!(event["upload"].get("composite_md5").is_none(), "{event}");
}
