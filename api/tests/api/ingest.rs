//! The chunk protocol's happy paths, resume and idempotency, across API instances.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_sent_in_random_order_through_two_instances_resumes_and_is_counted_exactly() {
    let a = spawn_app().await;
    let b = a.sibling().await;
    let id = new_id();
    let source = Source::random(40 * 4096 + 123, 4096, 1);
    let total = source.total_chunks();
    let mut order: Vec<u64> = (0..total).collect();
    order.shuffle(&mut rand::rng());

    // The client is interrupted after 17 chunks.
    let (sent, rest) = order.split_at(17);
    for (n, &index) in sent.iter().enumerate() {
        let app = if n % 2 == 0 { &a } else { &b };
        let (code, body) = app.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, status) = b.status(&id).await;
    assert_eq!(code, 200);
    let listed: Vec<u64> = serde_json::from_value(status["uploaded_chunks"].clone()).unwrap();
    let mut expected: Vec<u64> = sent.to_vec();
    expected.sort();
    assert_eq!(
        listed, expected,
        "status lists exactly the stored chunks, sorted"
    );
    assert_eq!(status["state"], "receiving");
    assert_eq!(status["total_chunks"], total);
    let bytes: u64 = sent.iter().map(|&i| source.chunk(i).1.len() as u64).sum();
    assert_eq!(status["bytes_received"], bytes);

    // It resumes by asking for what is missing and sending only that.
    let (_, status) = a.status(&id).await;
    let have: BTreeSet<u64> = serde_json::from_value(status["uploaded_chunks"].clone()).unwrap();
    let missing: Vec<u64> = (0..total).filter(|i| !have.contains(i)).collect();
    assert_eq!(missing.len(), rest.len());
    let mut completions = 0;
    for (n, &index) in missing.iter().enumerate() {
        let app = if n % 2 == 0 { &b } else { &a };
        let (code, body) = app.put_chunk(&id, &source, index).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["duplicate"], false);
        if body["upload_complete"] == true {
            completions += 1;
        }
    }
    assert_eq!(completions, 1);
    let (_, status) = a.status(&id).await;
    assert_eq!(status["state"], "merging");
    assert_eq!(status["chunks_received"], total);
    assert_eq!(status["bytes_received"], source.len());
    assert_eq!(reassemble_counted(&a.env, &id), source.bytes);
    assert_eq!(
        chunk_files(&a.env, &id).len() as u64,
        total,
        "no surplus copies"
    );
}

#[tokio::test]
async fn resending_a_stored_chunk_succeeds_without_counting_it_twice() {
    let app = spawn_app().await;
    let id = new_id();
    let source = Source::random(3000, 1000, 2);
    let (code, first) = app.put_chunk(&id, &source, 1).await;
    assert_eq!(
        (code, &first["duplicate"]),
        (200, &serde_json::json!(false))
    );
    let files = chunk_files(&app.env, &id);
    let redis = app.env.redis_snapshot();
    for _ in 0..3 {
        let (code, again) = app.put_chunk(&id, &source, 1).await;
        assert_eq!(code, 200, "{again}");
        assert_eq!(again["duplicate"], true);
        assert_eq!(again["chunks_received"], 1);
        assert_eq!(again["bytes_received"], 1000);
        assert_eq!(again["chunk_crc32c"], first["chunk_crc32c"]);
    }
    assert_eq!(
        chunk_files(&app.env, &id),
        files,
        "the re-sent copies were not kept"
    );
    // Only the activity time moved.
    let after = app.env.redis_snapshot();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        redis.keys().collect::<Vec<_>>()
    );
    let parts_key = format!("{}:{{{id}}}:parts", app.env.namespace);
    assert_eq!(after[&parts_key], redis[&parts_key]);
}

#[tokio::test]
async fn the_same_index_with_different_bytes_is_a_conflict_that_changes_nothing() {
    let app = spawn_app().await;
    let id = new_id();
    let source = Source::random(3000, 1000, 3);
    assert_eq!(app.put_chunk(&id, &source, 0).await.0, 200);
    let before = (app.env.redis_snapshot(), app.env.storage_snapshot());
    let mut other = source.clone();
    other.bytes[10] ^= 0xff;
    let (code, body) = app.put_chunk(&id, &other, 0).await;
    assert_eq!((code, error_code(&body)), (409, "chunk_conflict"), "{body}");
    assert_eq!(
        (app.env.redis_snapshot(), app.env.storage_snapshot()),
        before
    );
    assert_eq!(reassemble_counted(&app.env, &id), source.chunk(0).1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_receiving_one_chunk_at_once_keep_exactly_one_copy() {
    let a = spawn_app().await;
    let b = a.sibling().await;
    let source = Source::random(4 * 65536, 65536, 4);
    for round in 0..20 {
        let id = new_id();
        let (ra, rb) = tokio::join!(a.put_chunk(&id, &source, 2), b.put_chunk(&id, &source, 2));
        assert_eq!((ra.0, rb.0), (200, 200), "round {round}: {ra:?} {rb:?}");
        let duplicates = [&ra.1, &rb.1]
            .iter()
            .filter(|r| r["duplicate"] == true)
            .count();
        assert_eq!(duplicates, 1, "round {round}: exactly one copy counted");
        assert_eq!(
            chunk_files(&a.env, &id).len(),
            1,
            "round {round}: one copy on storage"
        );
        assert_eq!(reassemble_counted(&a.env, &id), source.chunk(2).1);
        let (_, status) = a.status(&id).await;
        assert_eq!(status["chunks_received"], 1);
    }
}

#[tokio::test]
async fn a_multipart_chunk_counts_like_a_raw_one() {
    let app = spawn_app().await;
    let id = new_id();
    let source = Source::random(2500, 1000, 5);
    let (start, bytes) = source.chunk(2);
    let form = reqwest::multipart::Form::new()
        .text("resumableChunkNumber", "3")
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes.to_vec()).file_name("blob"),
        )
        .text("trailing", "ignored");
    let response = app
        .client
        .put(app.url("/upload/chunk"))
        .header("X-File-ID", &id)
        .header("X-Chunk-Index", "2")
        .header("X-Total-Chunks", "3")
        .header("Content-Range", format!("bytes {start}-2499/2500"))
        .multipart(form)
        .send()
        .await;
    let (code, body) = json_response(response).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["bytes_received"], 500);
    assert_eq!(reassemble_counted(&app.env, &id), bytes);
    // The raw re-send of the same bytes is recognised as the same chunk.
    let (code, again) = app.put_chunk(&id, &source, 2).await;
    assert_eq!((code, &again["duplicate"]), (200, &serde_json::json!(true)));
}

#[tokio::test]
async fn a_chunk_md5_is_verified_and_reported() {
    let app = spawn_app().await;
    let id = new_id();
    let source = Source::random(2000, 1000, 6);
    let digest = {
        use md5::Digest;
        md5::Md5::digest(source.chunk(0).1)
    };
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest);
    let response = app
        .chunk_request(&id, &source, 0)
        .header("Content-MD5", b64)
        .send()
        .await;
    let (code, body) = json_response(response).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["chunk_md5"], hex::encode(digest));
}

#[tokio::test]
async fn an_explicit_create_fixes_the_geometry_that_chunks_must_follow() {
    let app = spawn_app().await;
    let create = serde_json::json!({
        "total_size": 2500, "chunk_size": 1000, "filename": "report.pdf",
        "md5": "9e107d9d372bb6826bd81d3542a419d6", "metadata": {"project": "x"}
    });
    let (code, created) = json_response(
        app.client
            .post(app.url("/upload"))
            .json(&create)
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let id = created["upload_id"].as_str().unwrap().to_owned();
    assert_eq!(created["total_chunks"], 3);
    assert_eq!(created["state"], "receiving");
    assert_eq!(created["metadata"]["project"], "x");
    assert!(
        app.env
            .storage_root
            .join("uploads")
            .join(&id)
            .join("manifest.json")
            .exists()
    );

    // Creating again with the same declaration is an idempotent success.
    let mut again = create.clone();
    again["upload_id"] = id.clone().into();
    let (code, _) = json_response(
        app.client
            .post(app.url("/upload"))
            .json(&again)
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 200);
    // A different geometry under the same id is a conflict.
    again["chunk_size"] = 500.into();
    let (code, body) = json_response(
        app.client
            .post(app.url("/upload"))
            .json(&again)
            .send()
            .await,
    )
    .await;
    assert_eq!((code, error_code(&body)), (409, "geometry_mismatch"));

    // Chunks must follow the declared geometry.
    let wrong = Source::random(2500, 500, 7);
    let (code, body) = app.put_chunk(&id, &wrong, 1).await;
    assert_eq!(
        (code, error_code(&body)),
        (409, "geometry_mismatch"),
        "{body}"
    );
    let right = Source::random(2500, 1000, 7);
    let (code, body) = app.put_chunk(&id, &right, 1).await;
    assert_eq!(code, 200, "{body}");
    let (_, status) = app.status(&id).await;
    assert_eq!(status["filename"], "report.pdf");
    assert_eq!(status["uploaded_chunks"], serde_json::json!([1]));
}

#[tokio::test]
async fn abort_removes_the_chunks_and_refuses_later_ones() {
    let app = spawn_app().await;
    let tap = stitch_testkit::events::EventTap::start(&app.env).await;
    let id = new_id();
    let source = Source::random(3000, 1000, 8);
    for i in 0..2 {
        assert_eq!(app.put_chunk(&id, &source, i).await.0, 200);
    }
    let delete = || app.client.delete(app.url(&format!("/files/{id}"))).send();
    assert_eq!(delete().await.unwrap().status(), 204);
    assert!(!app.env.storage_root.join("uploads").join(&id).exists());
    let (_, status) = app.status(&id).await;
    assert_eq!(status["state"], "aborted");
    assert_eq!(status["uploaded_chunks"], serde_json::json!([]));
    let (code, body) = app.put_chunk(&id, &source, 2).await;
    assert_eq!((code, error_code(&body)), (409, "upload_aborted"));
    assert!(!app.env.storage_root.join("uploads").join(&id).exists());
    // Aborting again is fine; an unknown upload is not.
    assert_eq!(delete().await.unwrap().status(), 204);
    let (code, body) = json_response(app.client.delete(app.url("/files/nope")).send().await).await;
    assert_eq!((code, error_code(&body)), (404, "upload_not_found"));
    // The first chunk announced the upload, the abort its end: once each.
    let patience = std::time::Duration::from_secs(30);
    let created = tap.wait_for(&id, "upload.created", patience).await;
    assert_eq!(created["upload"]["size"], 3000);
    let aborted = tap.wait_for(&id, "upload.aborted", patience).await;
    assert_eq!(aborted["upload"]["state"], "aborted");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let kinds: Vec<String> = tap
        .events_of(&id)
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, vec!["upload.created", "upload.aborted"]);
}

#[tokio::test]
async fn status_by_header_and_by_path_agree_and_unknown_uploads_are_404() {
    let app = spawn_app().await;
    let id = new_id();
    let source = Source::random(100, 10, 9);
    assert_eq!(app.put_chunk(&id, &source, 4).await.0, 200);
    let (code, by_path) = app.status(&id).await;
    assert_eq!(code, 200);
    let by_header = app
        .client
        .get(app.url("/upload/status"))
        .header("X-File-ID", &id)
        .send()
        .await;
    let (code, by_header) = json_response(by_header).await;
    assert_eq!(code, 200);
    assert_eq!(by_path, by_header);
    let (code, body) = app.status("never-made").await;
    assert_eq!((code, error_code(&body)), (404, "upload_not_found"));
    let no_header = app.client.get(app.url("/upload/status")).send().await;
    let (code, body) = json_response(no_header).await;
    assert_eq!((code, error_code(&body)), (400, "missing_header"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_of_an_upload_with_thousands_of_chunks_is_exact_and_compact() {
    let app = spawn_app_with(|s| {
        s.storage.fsync = false; // many tiny chunks; durability is not what this test checks
        s.limits.max_chunks = 20_000;
    })
    .await;
    let id = new_id();
    let source = Source::random(12_000, 1, 10);
    let sent: Vec<u64> = (0..12_000).step_by(7).collect();
    use futures_util::StreamExt;
    let results: Vec<(u16, serde_json::Value)> = futures_util::stream::iter(&sent)
        .map(|&i| app.put_chunk(&id, &source, i))
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        results.iter().all(|(code, _)| *code == 200),
        "{:?}",
        results.iter().find(|r| r.0 != 200)
    );
    let response = app
        .client
        .get(app.url(&format!("/upload/{id}/status")))
        .send()
        .await
        .unwrap();
    let raw = response.bytes().await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let listed: Vec<u64> = serde_json::from_value(status["uploaded_chunks"].clone()).unwrap();
    assert_eq!(listed, sent);
    assert_eq!(status["total_chunks"], 12_000);
    // About six bytes per listed index and a fixed head: no per-chunk detail travels.
    assert!(raw.len() < sent.len() * 6 + 1024, "{} bytes", raw.len());
}

#[tokio::test]
async fn client_callbacks_are_refused_unless_allowed_and_checked_when_allowed() {
    let create = |callback: &str| serde_json::json!({"total_size": 10, "chunk_size": 10, "callback_url": callback});
    let off = spawn_app().await;
    let (code, body) = json_response(
        off.client
            .post(off.url("/upload"))
            .json(&create("https://hooks.example.com/x"))
            .send()
            .await,
    )
    .await;
    assert_eq!((code, error_code(&body)), (400, "callbacks_disabled"));
    assert!(off.env.redis_snapshot().is_empty());

    let on = spawn_app_with(|s| s.webhooks.allow_client_callbacks = true).await;
    for bad in [
        "http://127.0.0.1/x",
        "http://169.254.169.254/latest",
        "http://[::1]/",
        "http://2130706433/",
        "ftp://hooks.example.com/",
        "http://user:pw@hooks.example.com/",
    ] {
        let (code, body) = json_response(
            on.client
                .post(on.url("/upload"))
                .json(&create(bad))
                .send()
                .await,
        )
        .await;
        assert_eq!(
            (code, error_code(&body)),
            (400, "invalid_callback"),
            "{bad}: {body}"
        );
    }
    let mut request = create("https://hooks.example.com/stitch");
    request["upload_id"] = "with-callback".into();
    let (code, created) = json_response(
        on.client
            .post(on.url("/upload"))
            .json(&request)
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let secret = created["callback_secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let (_, status) = on.status("with-callback").await;
    assert!(
        status.get("callback_secret").is_none(),
        "the secret shows only at creation: {status}"
    );
    let (code, again) = json_response(
        on.client
            .post(on.url("/upload"))
            .json(&request)
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        again.get("callback_secret").is_none(),
        "the secret is returned once, to the call that created the upload: {again}"
    );
}
