//! tus 1.0 on `/files`: the protocol's request/response table against the real server and
//! Redis (the merge itself is the worker's, tested end to end in e2e), each refusal shown to
//! store nothing and leave the offset where it was.

use std::time::Duration;

use base64::Engine as _;
use md5::Digest as _;
use stitch_common::auth::key_sha256;
use stitch_common::config::ApiKeyEntry;
use stitch_testkit::events::take_merge_jobs;
use stitch_testkit::tus::{Tus, id_of};

use crate::helpers::*;

fn tus(app: &TestApp) -> Tus {
    Tus::new(app.client.clone(), &app.base)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    Source::random(len, len as u64, seed).bytes
}

/// The upload's outbox merge triggers, as stored.
/// The creation of a partial upload of `len` bytes (`Upload-Concat: partial`).
fn partial(t: &Tus, app: &TestApp, len: u64) -> reqwest::RequestBuilder {
    t.request(reqwest::Method::POST, &app.url("/files/"))
        .header("Upload-Length", len.to_string())
        .header("Upload-Concat", "partial")
}

fn merge_triggers(env: &TestEnv, id: &str) -> usize {
    let mut conn = redis_connection().expect("Redis");
    redis::cmd("LLEN")
        .arg(format!("{}:{{{id}}}:outbox:merge", env.namespace))
        .query(&mut conn)
        .unwrap()
}

#[tokio::test]
async fn options_advertises_exactly_what_works_without_asking_for_a_version() {
    let app = spawn_app_with(|s| s.limits.max_upload_bytes.0 = 1 << 30).await;
    let response = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/files/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let h = response.headers();
    assert_eq!(h["tus-version"], "1.0.0");
    assert_eq!(h["tus-resumable"], "1.0.0");
    assert_eq!(
        h["tus-extension"],
        "creation,creation-with-upload,creation-defer-length,termination,checksum,expiration,concatenation"
    );
    assert_eq!(h["tus-max-size"], (1u64 << 30).to_string().as_str());
    assert_eq!(h["tus-checksum-algorithm"], "md5,sha1,sha256,crc32c");
}

#[tokio::test]
async fn a_request_without_tus_resumable_or_with_another_version_is_412_and_stores_nothing() {
    let app = spawn_app().await;
    let before = app.env.storage_snapshot();
    let bare = app
        .client
        .post(app.url("/files/"))
        .header("Upload-Length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 412);
    assert_eq!(bare.headers()["tus-version"], "1.0.0");
    let other = app
        .client
        .post(app.url("/files/"))
        .header("Tus-Resumable", "0.2.2")
        .header("Upload-Length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 412);
    assert_eq!(app.env.storage_snapshot(), before);
    assert!(app.env.redis_snapshot().is_empty(), "nothing in Redis");
}

#[tokio::test]
async fn an_upload_is_created_resumed_from_head_and_completes_with_one_merge_job() {
    let app = spawn_app().await;
    let t = tus(&app);
    let bytes = data(300_000, 1);
    let created = t
        .create(
            300_000,
            Some(&format!(
                "filename {},filetype {}",
                b64(b"a b.bin"),
                b64(b"x/y")
            )),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let url = created.location();
    assert!(url.starts_with(&format!("{}/files/", app.base)), "{url}");
    assert!(created.header("upload-expires").is_some());

    let head = t.head(&url).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.offset(), Some(0));
    assert_eq!(head.header("upload-length"), Some("300000"));
    assert_eq!(head.header("cache-control"), Some("no-store"));
    let metadata = head.header("upload-metadata").unwrap();
    assert!(
        metadata.contains(&format!("filename {}", b64(b"a b.bin"))),
        "{metadata}"
    );

    let first = t.patch(&url, 0, bytes[..100_000].to_vec()).await;
    assert_eq!(first.status, 204, "{first:?}");
    assert_eq!(first.offset(), Some(100_000));
    // A client that lost the answer resumes from HEAD.
    let offset = t.head(&url).await.offset().unwrap();
    assert_eq!(offset, 100_000);
    let id = id_of(&url).to_owned();
    assert_eq!(merge_triggers(&app.env, &id), 0);
    let last = t.patch(&url, offset, bytes[100_000..].to_vec()).await;
    assert_eq!(last.status, 204, "{last:?}");
    assert_eq!(last.offset(), Some(300_000));

    let (_, status) = app.status(&id).await;
    assert_eq!(status["state"], "merging");
    assert_eq!(status["filename"], "a b.bin");
    assert_eq!(status["bytes_received"], 300_000);
    assert_eq!(status["metadata"]["filetype"], "x/y");
    let jobs = take_merge_jobs(&app.env).await;
    assert_eq!(
        jobs.iter()
            .filter(|j| j["upload_id"] == id.as_str())
            .count(),
        1,
        "{jobs:?}"
    );
    // Both segments are on storage, named by their offsets.
    let files = chunk_files(&app.env, &id);
    assert!(
        files[0].starts_with("s0.") && files[1].starts_with("s100000."),
        "{files:?}"
    );
}

#[tokio::test]
async fn refused_patches_change_neither_the_offset_nor_storage() {
    let app = spawn_app().await;
    let t = tus(&app);
    let url = t.create(1000, None).await.location();
    assert_eq!(t.patch(&url, 0, vec![1; 400]).await.status, 204);
    let before = app.env.storage_snapshot();
    let redis_before = app.env.redis_snapshot();

    // Wrong content type: 415.
    let wrong_type = t
        .send(
            t.request(reqwest::Method::PATCH, &url)
                .header("Upload-Offset", "400")
                .header("Content-Type", "application/octet-stream")
                .body(vec![2; 10]),
        )
        .await;
    assert_eq!(wrong_type.status, 415, "{wrong_type:?}");
    // No Upload-Offset: 400.
    let no_offset = t
        .send(
            t.request(reqwest::Method::PATCH, &url)
                .header("Content-Type", "application/offset+octet-stream")
                .body(vec![2; 10]),
        )
        .await;
    assert_eq!(no_offset.status, 400);
    // A stale offset: 409, with the JSON code.
    let stale = t.patch(&url, 0, vec![2; 10]).await;
    assert_eq!(stale.status, 409);
    assert_eq!(stale.code().as_deref(), Some("offset_mismatch"));
    // Past the length: 413.
    let past = t.patch(&url, 400, vec![2; 601]).await;
    assert_eq!(past.status, 413, "{past:?}");
    // A wrong checksum: 460. An unknown algorithm: 400.
    let wrong_sum = t
        .send(
            t.patch_request(&url, 400, vec![3; 100])
                .header("Upload-Checksum", format!("sha1 {}", b64(&[0; 20]))),
        )
        .await;
    assert_eq!(wrong_sum.status, 460, "{wrong_sum:?}");
    let unknown = t
        .send(
            t.patch_request(&url, 400, vec![3; 100])
                .header("Upload-Checksum", format!("whirlpool {}", b64(&[0; 20]))),
        )
        .await;
    assert_eq!(unknown.status, 400);
    // The length is fixed once declared: another one is refused.
    let relength = t
        .send(
            t.patch_request(&url, 400, vec![3; 100])
                .header("Upload-Length", "999"),
        )
        .await;
    assert_eq!(relength.status, 400, "{relength:?}");
    assert_eq!(relength.code().as_deref(), Some("upload_length_conflict"));
    // An unknown upload: 404.
    let unknown_upload = t.patch(&app.url("/files/nope"), 0, vec![1]).await;
    assert_eq!(unknown_upload.status, 404);

    assert_eq!(t.head(&url).await.offset(), Some(400));
    assert_eq!(app.env.storage_snapshot(), before);
    let mut redis_after = app.env.redis_snapshot();
    let mut redis_before = redis_before;
    // Only activity times may move.
    for snapshot in [&mut redis_before, &mut redis_after] {
        snapshot.retain(|k, _| !k.ends_with(":meta"));
    }
    assert_eq!(redis_after, redis_before);
}

#[tokio::test]
async fn a_matching_checksum_counts_the_patch_with_every_algorithm() {
    let app = spawn_app().await;
    let t = tus(&app);
    let bytes = data(4000, 2);
    let url = t.create(4000, None).await.location();
    let parts: [(&str, Vec<u8>); 4] = [
        ("md5", md5::Md5::digest(&bytes[..1000]).to_vec()),
        ("sha1", sha1_of(&bytes[1000..2000])),
        ("sha256", sha256_of(&bytes[2000..3000])),
        (
            "crc32c",
            crc32c::crc32c(&bytes[3000..]).to_be_bytes().to_vec(),
        ),
    ];
    for (i, (algorithm, digest)) in parts.into_iter().enumerate() {
        let at = i * 1000;
        let answer = t
            .send(
                t.patch_request(&url, at as u64, bytes[at..at + 1000].to_vec())
                    .header("Upload-Checksum", format!("{algorithm} {}", b64(&digest))),
            )
            .await;
        assert_eq!(answer.status, 204, "{algorithm}: {answer:?}");
    }
    assert_eq!(t.head(&url).await.offset(), Some(4000));
}

fn sha1_of(bytes: &[u8]) -> Vec<u8> {
    use sha1::Digest as _;
    sha1::Sha1::digest(bytes).to_vec()
}

fn sha256_of(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).to_vec()
}

#[tokio::test]
async fn creation_with_upload_stores_the_body_and_says_where_it_ends() {
    let app = spawn_app().await;
    let t = tus(&app);
    let answer = t
        .send(
            t.request(reqwest::Method::POST, &app.url("/files/"))
                .header("Upload-Length", "5000")
                .header("Content-Type", "application/offset+octet-stream")
                .body(data(2000, 3)),
        )
        .await;
    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(answer.offset(), Some(2000));
    assert_eq!(t.head(&answer.location()).await.offset(), Some(2000));
}

#[tokio::test]
async fn a_long_patch_is_stored_in_segments_of_the_configured_size() {
    let app = spawn_app_with(|s| s.tus.segment_size.0 = 1 << 20).await;
    let t = tus(&app);
    let len = (3 << 20) + 12_345;
    let url = t.create(len as u64, None).await.location();
    let answer = t.patch(&url, 0, data(len, 4)).await;
    assert_eq!(answer.status, 204, "{answer:?}");
    let files = chunk_files(&app.env, id_of(&url));
    let offsets: Vec<&str> = files.iter().map(|f| f.split('.').next().unwrap()).collect();
    assert_eq!(offsets, ["s0", "s1048576", "s2097152", "s3145728"]);
}

#[tokio::test]
async fn a_body_that_breaks_off_keeps_what_arrived() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app().await;
    let t = tus(&app);
    let url = t.create(1 << 20, None).await.location();
    let path = url.trim_start_matches(&app.base).to_owned();
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        1 << 20
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&vec![7u8; 300_000]).await.unwrap();
    socket.flush().await.unwrap();
    drop(socket);
    let mut offset = 0;
    for _ in 0..100 {
        offset = t.head(&url).await.offset().unwrap();
        if offset == 300_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(offset, 300_000, "the bytes that arrived are counted");
    // And the client goes on from there.
    let rest = t.patch(&url, offset, vec![8u8; (1 << 20) - 300_000]).await;
    assert_eq!(rest.status, 204, "{rest:?}");
}

#[tokio::test]
async fn a_second_patch_while_one_runs_is_locked_out_and_corrupts_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let replica = app.sibling().await;
    let t = tus(&app);
    let url = t.create(200_000, None).await.location();
    // A PATCH whose body is on its way: it holds the upload.
    let path = url.trim_start_matches(&app.base).to_owned();
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: 100000\r\n\r\n",
        app.addr
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&[1u8; 50_000]).await.unwrap();
    // Once it holds the upload's append lease...
    let lease = format!("{}:{{{}}}:append", app.env.namespace, id_of(&url));
    let mut conn = redis_connection().unwrap();
    for _ in 0..200 {
        let held: bool = redis::cmd("EXISTS").arg(&lease).query(&mut conn).unwrap();
        if held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...the same offset on another replica is refused while it runs.
    let replica_url = url.replace(&app.base, &replica.base);
    let second = t.patch(&replica_url, 0, vec![2; 50_000]).await;
    assert_eq!(second.status, 423, "{second:?}");
    assert_eq!(second.code().as_deref(), Some("upload_locked"));
    socket.write_all(&[1u8; 50_000]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = socket.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 204"), "{answer}");
    assert!(answer.contains("upload-offset: 100000"), "{answer}");
    // Once it ended, the other replica appends at the new offset.
    let after = t.patch(&replica_url, 100_000, vec![2; 100_000]).await;
    assert_eq!(after.status, 204, "{after:?}");
    assert_eq!(take_merge_jobs(&app.env).await.len(), 1);
}

#[tokio::test]
async fn requests_alternating_between_two_replicas_complete_the_upload() {
    let a = spawn_app().await;
    let b = a.sibling().await;
    let (ta, tb) = (tus(&a), tus(&b));
    let url = ta.create(90_000, None).await.location();
    let on_b = url.replace(&a.base, &b.base);
    let bytes = data(90_000, 5);
    for (i, piece) in bytes.chunks(10_000).enumerate() {
        let (t, url) = if i % 2 == 0 {
            (&ta, &url)
        } else {
            (&tb, &on_b)
        };
        let offset = t.head(url).await.offset().unwrap();
        assert_eq!(offset, i as u64 * 10_000);
        assert_eq!(t.patch(url, offset, piece.to_vec()).await.status, 204);
    }
    let (_, status) = b.status(id_of(&url)).await;
    assert_eq!(status["state"], "merging");
    assert_eq!(status["chunks_received"], 9);
}

#[tokio::test]
async fn method_override_routes_a_post_as_the_patch_it_names() {
    let app = spawn_app().await;
    let t = tus(&app);
    let url = t.create(10, None).await.location();
    let answer = t
        .send(
            t.request(reqwest::Method::POST, &url)
                .header("X-HTTP-Method-Override", "PATCH")
                .header("Upload-Offset", "0")
                .header("Content-Type", "application/offset+octet-stream")
                .body(vec![1; 10]),
        )
        .await;
    assert_eq!(answer.status, 204, "{answer:?}");
    assert_eq!(answer.offset(), Some(10));
}

#[tokio::test]
async fn termination_removes_the_upload_and_later_requests_are_gone() {
    let app = spawn_app().await;
    let t = tus(&app);
    let url = t.create(1000, None).await.location();
    assert_eq!(t.patch(&url, 0, vec![1; 500]).await.status, 204);
    let deleted = t.send(t.request(reqwest::Method::DELETE, &url)).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(deleted.header("tus-resumable"), Some("1.0.0"));
    assert!(chunk_files(&app.env, id_of(&url)).is_empty());
    assert_eq!(t.head(&url).await.status, 410);
    assert_eq!(t.patch(&url, 500, vec![1; 500]).await.status, 410);
}

#[tokio::test]
async fn an_upload_past_its_expiry_is_gone() {
    let ttl = Duration::from_secs(3600);
    let app = spawn_app_with(|s| s.uploads.ttl.0 = ttl).await;
    let t = tus(&app);
    let created = t.create(1000, None).await;
    let url = created.location();
    let expires = httpdate::parse_http_date(created.header("upload-expires").unwrap()).unwrap();
    let from_now = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        from_now > ttl - Duration::from_secs(5) && from_now <= ttl,
        "{from_now:?}"
    );
    // The upload's last activity, moved back past its expiry (its Redis record's own
    // TTL is what Redis enforces; Stitch's clock is this field).
    let mut conn = redis_connection().unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{}:{{{}}}:meta", app.env.namespace, id_of(&url)))
        .arg("updated_at")
        .arg(stitch_common::now_ms() - ttl.as_millis() as u64 - 1000)
        .query(&mut conn)
        .unwrap();
    assert_eq!(t.head(&url).await.status, 410);
    let patch = t.patch(&url, 0, vec![1; 10]).await;
    assert_eq!(patch.status, 410);
    assert!(chunk_files(&app.env, id_of(&url)).is_empty());
}

#[tokio::test]
async fn partial_uploads_concatenate_into_one_merging_upload() {
    let app = spawn_app().await;
    let t = tus(&app);
    let a = t.send(partial(&t, &app, 3000)).await.location();
    let b = t.send(partial(&t, &app, 2000)).await.location();
    assert_eq!(t.head(&a).await.header("upload-concat"), Some("partial"));
    assert_eq!(t.patch(&a, 0, vec![1; 3000]).await.status, 204);
    // A complete partial upload does not merge alone, and takes no byte more.
    assert_eq!(merge_triggers(&app.env, id_of(&a)), 0);
    assert_eq!(t.patch(&a, 3000, vec![1]).await.status, 413);
    assert_eq!(t.patch(&a, 3000, vec![]).await.status, 204);
    let final_of = |list: String| {
        t.request(reqwest::Method::POST, &app.url("/files/"))
            .header("Upload-Concat", format!("final;{list}"))
    };
    // b is not complete yet: refused.
    let early = t.send(final_of(format!("{a} {b}"))).await;
    assert_eq!(early.status, 400, "{early:?}");
    assert_eq!(t.patch(&b, 0, vec![2; 2000]).await.status, 204);
    let done = t.send(final_of(format!("{a} /files/{}", id_of(&b)))).await;
    assert_eq!(done.status, 201, "{done:?}");
    let whole = done.location();
    let head = t.head(&whole).await;
    assert_eq!(head.header("upload-length"), Some("5000"));
    assert!(head.header("upload-concat").unwrap().starts_with("final;"));
    assert_eq!(
        head.offset(),
        None,
        "no offset before the concatenation is done"
    );
    // Nothing can be appended to a concatenation.
    assert_eq!(t.patch(&whole, 0, vec![1]).await.status, 403);
    let (_, status) = app.status(id_of(&whole)).await;
    assert_eq!(status["state"], "merging");
    assert_eq!(
        merge_triggers(&app.env, id_of(&whole)) + take_merge_jobs(&app.env).await.len(),
        1
    );
}

#[tokio::test]
async fn a_concatenation_takes_no_stored_bytes_its_parts_already_hold() {
    let app = spawn_app_with(|s| {
        s.auth.quotas.max_stored_bytes = Some(stitch_common::config::ByteSize(6000));
    })
    .await;
    let t = tus(&app);
    let a = t.send(partial(&t, &app, 3000)).await.location();
    let b = t.send(partial(&t, &app, 2000)).await.location();
    assert_eq!(t.patch(&a, 0, vec![1; 3000]).await.status, 204);
    assert_eq!(t.patch(&b, 0, vec![2; 2000]).await.status, 204);
    // 5000 of 6000 are held by the parts; their concatenation is those bytes, not 5000 more.
    let whole = t
        .send(
            t.request(reqwest::Method::POST, &app.url("/files/"))
                .header("Upload-Concat", format!("final;{a} {b}")),
        )
        .await;
    assert_eq!(whole.status, 201, "{whole:?}");
    let over = t.create(1001, None).await;
    assert_eq!(over.status, 429, "{over:?}");
    assert_eq!(t.create(1000, None).await.status, 201);
}

#[tokio::test]
async fn the_two_protocols_refuse_each_others_uploads() {
    let app = spawn_app().await;
    let t = tus(&app);
    let url = t.create(2048, None).await.location();
    let source = Source::random(2048, 1024, 6);
    let (code, body) = app.put_chunk(id_of(&url), &source, 0).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "protocol_mismatch");
    let id = new_id();
    assert_eq!(app.put_chunk(&id, &source, 0).await.0, 200);
    let patch = t
        .patch(&app.url(&format!("/files/{id}")), 1024, vec![1; 10])
        .await;
    assert_eq!(patch.status, 403, "{patch:?}");
    assert!(chunk_files(&app.env, id_of(&url)).is_empty());
}

#[tokio::test]
async fn with_keys_a_tenant_cannot_see_or_append_to_another_tenants_upload() {
    let keys = [
        ("acme", "sk_test_tus_acme_0123456789"),
        ("globex", "sk_test_tus_globex_0123456789"),
    ];
    let app = spawn_app_with(|s| {
        s.auth.keys = keys
            .iter()
            .map(|(tenant, key)| ApiKeyEntry {
                id: format!("{tenant}-key"),
                tenant: (*tenant).into(),
                sha256: key_sha256(key),
                scopes: None,
            })
            .collect();
    })
    .await;
    let acme = Tus::new(http_client_with_key(keys[0].1), &app.base);
    let globex = Tus::new(http_client_with_key(keys[1].1), &app.base);
    let nobody = tus(&app);
    assert_eq!(nobody.create(10, None).await.status, 401);
    let url = acme.create(10, None).await.location();
    assert_eq!(globex.head(&url).await.status, 404);
    assert_eq!(globex.patch(&url, 0, vec![1; 10]).await.status, 404);
    assert_eq!(acme.head(&url).await.offset(), Some(0));
    assert_eq!(acme.patch(&url, 0, vec![1; 10]).await.status, 204);
}

#[tokio::test]
async fn tus_creations_answer_to_the_tenants_quotas_and_store_nothing_when_refused() {
    let app = spawn_app_with(|s| {
        s.auth.quotas.max_active_uploads = Some(1);
        s.auth.quotas.max_upload_bytes = Some(stitch_common::config::ByteSize(1000));
    })
    .await;
    let t = tus(&app);
    let too_big = t.create(1001, None).await;
    assert_eq!(too_big.status, 413, "{too_big:?}");
    assert_eq!(too_big.code().as_deref(), Some("quota_exceeded"));
    let first = t.create(1000, None).await;
    assert_eq!(first.status, 201);
    let before = app.env.storage_snapshot();
    let second = t.create(10, None).await;
    assert_eq!(second.status, 429, "{second:?}");
    assert!(second.header("retry-after").is_some());
    assert_eq!(app.env.storage_snapshot(), before);
    // The upload admitted still takes its bytes.
    assert_eq!(
        t.patch(&first.location(), 0, vec![1; 1000]).await.status,
        204
    );
}

#[tokio::test]
async fn a_deferred_length_is_declared_once_by_a_patch_and_completes_the_upload() {
    let app = spawn_app().await;
    let t = tus(&app);
    let deferred = || {
        t.request(reqwest::Method::POST, &app.url("/files/"))
            .header("Upload-Defer-Length", "1")
    };
    let url = t.send(deferred()).await.location();
    let head = t.head(&url).await;
    assert_eq!(head.header("upload-defer-length"), Some("1"));
    assert_eq!(head.header("upload-length"), None);
    assert_eq!(t.patch(&url, 0, vec![1; 1000]).await.status, 204);
    // A length below what arrived is refused and changes nothing.
    let short = t
        .send(
            t.patch_request(&url, 1000, vec![])
                .header("Upload-Length", "999"),
        )
        .await;
    assert_eq!(short.status, 400, "{short:?}");
    assert_eq!(t.head(&url).await.header("upload-defer-length"), Some("1"));
    let last = t
        .send(
            t.patch_request(&url, 1000, vec![2; 500])
                .header("Upload-Length", "1500"),
        )
        .await;
    assert_eq!(last.status, 204, "{last:?}");
    assert_eq!(last.offset(), Some(1500));
    let head = t.head(&url).await;
    assert_eq!(head.header("upload-length"), Some("1500"));
    let id = id_of(&url);
    let (_, status) = app.status(id).await;
    assert_eq!(status["state"], "merging");
    assert_eq!(status["total_size"], 1500);
    assert_eq!(
        std::fs::read_to_string(app.env.storage_root.join("uploads").join(id).join("length"))
            .unwrap(),
        "1500"
    );

    // Declared by an empty PATCH once every byte is there: that completes it too.
    let url = t.send(deferred()).await.location();
    assert_eq!(t.patch(&url, 0, vec![3; 10]).await.status, 204);
    let declared = t
        .send(
            t.patch_request(&url, 10, vec![])
                .header("Upload-Length", "10"),
        )
        .await;
    assert_eq!(declared.status, 204, "{declared:?}");
    let (_, status) = app.status(id_of(&url)).await;
    assert_eq!(status["state"], "merging");
    let jobs = take_merge_jobs(&app.env).await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    // Both headers at once are refused.
    let both = t.send(deferred().header("Upload-Length", "10")).await;
    assert_eq!(both.status, 400);
}

#[tokio::test]
async fn an_upload_of_open_length_holds_the_largest_size_it_may_reach_until_it_declares_one() {
    let app = spawn_app_with(|s| {
        s.auth.quotas.max_stored_bytes = Some(stitch_common::config::ByteSize(1000));
        s.auth.quotas.max_upload_bytes = Some(stitch_common::config::ByteSize(600));
    })
    .await;
    let t = tus(&app);
    let deferred = || {
        t.request(reqwest::Method::POST, &app.url("/files/"))
            .header("Upload-Defer-Length", "1")
    };
    let url = t.send(deferred()).await.location();
    // 600 of 1000 are held by the first: a second could pass the limit unseen.
    let second = t.send(deferred()).await;
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.code().as_deref(), Some("quota_exceeded"));
    assert_eq!(t.patch(&url, 0, vec![1; 100]).await.status, 204);
    let declared = t
        .send(
            t.patch_request(&url, 100, vec![])
                .header("Upload-Length", "100"),
        )
        .await;
    assert_eq!(declared.status, 204, "{declared:?}");
    // Declared, it holds its 100 bytes: 600 more fit again.
    assert_eq!(t.send(deferred()).await.status, 201);
}

#[tokio::test]
async fn location_follows_forwarded_headers_only_when_trusted_else_the_host() {
    let forwarded = |t: &Tus| {
        t.request(reqwest::Method::POST, &format!("{}/files/", t.base))
            .header("Upload-Length", "10")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "uploads.example.com")
    };
    let trusting = spawn_app_with(|s| s.http.trust_forwarded = true).await;
    let t = tus(&trusting);
    let url = t.send(forwarded(&t)).await.location();
    assert!(
        url.starts_with("https://uploads.example.com/files/"),
        "{url}"
    );
    let std = t
        .send(
            t.request(reqwest::Method::POST, &trusting.url("/files/"))
                .header("Upload-Length", "10")
                .header("Forwarded", "for=1.2.3.4;proto=https;host=up.example.org"),
        )
        .await
        .location();
    assert!(std.starts_with("https://up.example.org/files/"), "{std}");

    let wary = spawn_app().await;
    let t = tus(&wary);
    let url = t.send(forwarded(&t)).await.location();
    assert!(url.starts_with(&format!("{}/files/", wary.base)), "{url}");
    let public =
        spawn_app_with(|s| s.http.public_url = Some("https://stitch.example.net/".into())).await;
    let t = tus(&public);
    let url = t.send(forwarded(&t)).await.location();
    assert!(
        url.starts_with("https://stitch.example.net/files/"),
        "{url}"
    );
}
