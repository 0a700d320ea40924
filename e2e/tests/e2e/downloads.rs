//! Downloading a completed file: ranges, validators, the file's name.

use std::time::Duration;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_file_downloads_whole_or_by_range_with_its_validators() {
    let env = TestEnv::new();
    let api = start_api(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random(3_000_000, 1_000_000, 27);
    let md5 = md5_hex(&source.bytes);
    let id = new_id();
    let get = |headers: &[(&str, &str)]| {
        let mut request = client.client.get(client.url(&format!("/files/{id}")));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.send()
    };
    for index in 0..3 {
        let response = client
            .chunk_request(&id, &source, index)
            .header("X-File-Name", "r%C3%A9sum%C3%A9 \"final\".bin")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Not downloadable before the merge.
    let early = get(&[]).await.unwrap();
    assert_eq!(early.status(), 409);
    let body: serde_json::Value = early.json().await.unwrap();
    assert_eq!(error_code(&body), "upload_not_completed");

    let _worker = start_worker(&env);
    client
        .wait_for_state(&id, "completed", Duration::from_secs(60))
        .await;

    let whole = get(&[]).await.unwrap();
    assert_eq!(whole.status(), 200);
    let etag = format!("\"{md5}\"");
    assert_eq!(whole.headers()["etag"], etag.as_str());
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.headers()["content-length"], "3000000");
    assert_eq!(
        whole.headers()["content-disposition"],
        "attachment; filename=\"r_sum_ _final_.bin\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.bin"
    );
    assert_eq!(whole.bytes().await.unwrap(), source.bytes);

    let part = get(&[("Range", "bytes=999990-1000009")]).await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        "bytes 999990-1000009/3000000"
    );
    assert_eq!(
        part.bytes().await.unwrap(),
        source.bytes[999_990..1_000_010]
    );
    let tail = get(&[("Range", "bytes=-5")]).await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap(), source.bytes[2_999_995..]);

    let beyond = get(&[("Range", "bytes=3000000-")]).await.unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], "bytes */3000000");

    let unchanged = get(&[("If-None-Match", &etag)]).await.unwrap();
    assert_eq!(unchanged.status(), 304);
    // A range conditional on another version is answered with the whole file.
    let other = get(&[("Range", "bytes=0-9"), ("If-Range", "\"other\"")])
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    let head = client
        .client
        .head(client.url(&format!("/files/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "3000000");

    // Aborting a completed upload removes the file.
    let deleted = client
        .client
        .delete(client.url(&format!("/files/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(!upload_dir(&env, &id).exists());
    assert_eq!(get(&[]).await.unwrap().status(), 409);
}
