//! Every kind of bad chunk request gets a 4xx JSON error with a stable code, stores nothing
//! and changes no state (Redis keys and files compared before and after).

use md5::Digest;

use crate::helpers::*;

/// The upload every case is about: 2500 bytes in chunks of 1000 (chunks 0, 1 and 2).
const TOTAL: u64 = 2500;
const CHUNK: u64 = 1000;

#[derive(Clone, Copy, Debug)]
enum Setup {
    /// Nothing exists yet.
    Fresh,
    /// Chunk 0 is stored, declared with `X-File-MD5: FILE_MD5`.
    OneChunk,
    /// All chunks are stored: the upload is merging.
    Merging,
    /// The merge committed (state written as the worker's commit would).
    Completed,
    Aborted,
}

const FILE_MD5: &str = "9e107d9d372bb6826bd81d3542a419d6";

enum Body {
    /// A body with Content-Length.
    Sized(Vec<u8>),
    /// A chunked (streamed) body, so its length is only known by reading it.
    Streamed(Vec<u8>),
    Multipart(reqwest::multipart::Form),
}

struct Case {
    name: &'static str,
    setup: Setup,
    /// Header overrides: `Some(value)` replaces or adds, `None` removes. A name listed twice
    /// with values is sent twice.
    headers: Vec<(&'static str, Option<String>)>,
    body: Body,
    status: u16,
    code: &'static str,
}

fn bytes(n: usize, fill: u8) -> Vec<u8> {
    vec![fill; n]
}

fn md5_b64(data: &[u8]) -> String {
    base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        md5::Md5::digest(data),
    )
}

fn set(name: &'static str, value: impl Into<String>) -> (&'static str, Option<String>) {
    (name, Some(value.into()))
}

fn unset(name: &'static str) -> (&'static str, Option<String>) {
    (name, None)
}

/// Chunk 0's default headers.
fn base_headers(id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("X-File-ID", id.to_owned()),
        ("X-Chunk-Index", "0".into()),
        ("X-Total-Chunks", "3".into()),
        ("Content-Range", format!("bytes 0-{}/{TOTAL}", CHUNK - 1)),
    ]
}

fn cases() -> Vec<Case> {
    use Setup::*;
    let ok = || Body::Sized(bytes(1000, 1));
    let case = |name, setup, headers, body, status, code| Case {
        name,
        setup,
        headers,
        body,
        status,
        code,
    };
    vec![
        case(
            "id with a path",
            Fresh,
            vec![set("X-File-ID", "../etc")],
            ok(),
            400,
            "invalid_upload_id",
        ),
        case(
            "id with a space",
            Fresh,
            vec![set("X-File-ID", "a b")],
            ok(),
            400,
            "invalid_upload_id",
        ),
        case(
            "id with a brace",
            Fresh,
            vec![set("X-File-ID", "a{b}")],
            ok(),
            400,
            "invalid_upload_id",
        ),
        case(
            "empty id",
            Fresh,
            vec![set("X-File-ID", "")],
            ok(),
            400,
            "invalid_upload_id",
        ),
        case(
            "id of 129 characters",
            Fresh,
            vec![set("X-File-ID", "a".repeat(129))],
            ok(),
            400,
            "invalid_upload_id",
        ),
        case(
            "no id",
            Fresh,
            vec![unset("X-File-ID")],
            ok(),
            400,
            "missing_header",
        ),
        case(
            "no index",
            Fresh,
            vec![unset("X-Chunk-Index")],
            ok(),
            400,
            "missing_header",
        ),
        case(
            "no total",
            Fresh,
            vec![unset("X-Total-Chunks")],
            ok(),
            400,
            "missing_header",
        ),
        case(
            "no range",
            Fresh,
            vec![unset("Content-Range")],
            ok(),
            400,
            "missing_header",
        ),
        case(
            "index twice",
            Fresh,
            vec![set("X-Chunk-Index", "0"), set("X-Chunk-Index", "0")],
            ok(),
            400,
            "duplicate_header",
        ),
        case(
            "id twice",
            Fresh,
            vec![set("X-File-ID", "a"), set("X-File-ID", "a")],
            ok(),
            400,
            "duplicate_header",
        ),
        case(
            "non-decimal index",
            Fresh,
            vec![set("X-Chunk-Index", "1a")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "hex index",
            Fresh,
            vec![set("X-Chunk-Index", "0x0")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "negative index",
            Fresh,
            vec![set("X-Chunk-Index", "-1")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "signed index",
            Fresh,
            vec![set("X-Chunk-Index", "+0")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "overflowing index",
            Fresh,
            vec![set("X-Chunk-Index", "99999999999999999999999")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "overflowing total",
            Fresh,
            vec![set("X-Total-Chunks", "18446744073709551616")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "index equal to total",
            Fresh,
            vec![
                set("X-Chunk-Index", "3"),
                set("Content-Range", "bytes 3000-3999/4000"),
            ],
            ok(),
            400,
            "invalid_chunk",
        ),
        case(
            "huge index",
            Fresh,
            vec![
                set("X-Chunk-Index", "18446744073709551615"),
                set("X-Total-Chunks", "9000"),
            ],
            ok(),
            400,
            "invalid_chunk",
        ),
        case(
            "total of zero",
            Fresh,
            vec![set("X-Total-Chunks", "0")],
            ok(),
            400,
            "invalid_chunk",
        ),
        case(
            "more chunks than allowed",
            Fresh,
            vec![set("X-Total-Chunks", "10001")],
            ok(),
            400,
            "too_many_chunks",
        ),
        case(
            "range without total",
            Fresh,
            vec![set("Content-Range", "bytes 0-999")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "range without unit",
            Fresh,
            vec![set("Content-Range", "0-999/2500")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "range with unknown total",
            Fresh,
            vec![set("Content-Range", "bytes 0-999/*")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "inverted range",
            Fresh,
            vec![set("Content-Range", "bytes 999-0/2500")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "start not index times chunk size",
            Fresh,
            vec![
                set("X-Chunk-Index", "2"),
                set("Content-Range", "bytes 2001-2499/2500"),
            ],
            Body::Sized(bytes(499, 1)),
            400,
            "invalid_chunk",
        ),
        case(
            "end beyond total",
            Fresh,
            vec![set("Content-Range", "bytes 0-2500/2500")],
            Body::Sized(bytes(2501, 1)),
            400,
            "invalid_chunk",
        ),
        case(
            "chunk count inconsistent with sizes",
            Fresh,
            vec![set("X-Total-Chunks", "4")],
            ok(),
            400,
            "invalid_chunk",
        ),
        case(
            "content length not the range length",
            Fresh,
            vec![],
            Body::Sized(bytes(999, 1)),
            400,
            "length_mismatch",
        ),
        case(
            "zero-length chunk",
            Fresh,
            vec![],
            Body::Sized(vec![]),
            400,
            "empty_chunk",
        ),
        case(
            "zero-length streamed chunk",
            Fresh,
            vec![],
            Body::Streamed(vec![]),
            400,
            "empty_chunk",
        ),
        case(
            "body shorter than declared",
            Fresh,
            vec![],
            Body::Streamed(bytes(999, 1)),
            400,
            "body_too_short",
        ),
        case(
            "body longer than declared",
            Fresh,
            vec![],
            Body::Streamed(bytes(1001, 1)),
            400,
            "body_too_long",
        ),
        case(
            "chunk MD5 mismatch",
            Fresh,
            vec![set("Content-MD5", md5_b64(b"other"))],
            ok(),
            400,
            "checksum_mismatch",
        ),
        case(
            "chunk MD5 not a digest",
            Fresh,
            vec![set("Content-MD5", "abc")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "two chunk MD5s disagree",
            Fresh,
            vec![
                set("Content-MD5", md5_b64(&bytes(1000, 1))),
                set("X-Chunk-MD5", FILE_MD5),
            ],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "file MD5 not a digest",
            Fresh,
            vec![set("X-File-MD5", "xyz")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "file name not UTF-8",
            Fresh,
            vec![set("X-File-Name", "%ff")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "file name with a newline",
            Fresh,
            vec![set("X-File-Name", "a%0Ab")],
            ok(),
            400,
            "invalid_header",
        ),
        case(
            "chunk larger than allowed",
            Fresh,
            vec![
                set("X-Total-Chunks", "1"),
                set("Content-Range", "bytes 0-99999/100000"),
            ],
            Body::Sized(bytes(100_000, 1)),
            413,
            "chunk_too_large",
        ),
        case(
            "upload larger than allowed",
            Fresh,
            vec![
                set("X-Total-Chunks", "3000"),
                set("Content-Range", "bytes 0-999/3000000"),
            ],
            ok(),
            413,
            "upload_too_large",
        ),
        case(
            "multipart without a file field",
            Fresh,
            vec![],
            Body::Multipart(reqwest::multipart::Form::new().text("other", "x")),
            400,
            "invalid_body",
        ),
        case(
            "multipart with two file fields",
            Fresh,
            vec![],
            Body::Multipart(
                reqwest::multipart::Form::new()
                    .part("file", reqwest::multipart::Part::bytes(bytes(1000, 1)))
                    .part("file", reqwest::multipart::Part::bytes(bytes(1000, 1))),
            ),
            400,
            "invalid_body",
        ),
        case(
            "multipart file field too short",
            Fresh,
            vec![],
            Body::Multipart(
                reqwest::multipart::Form::new()
                    .part("file", reqwest::multipart::Part::bytes(bytes(10, 1))),
            ),
            400,
            "body_too_short",
        ),
        case(
            "geometry changed",
            OneChunk,
            vec![
                set("X-Chunk-Index", "1"),
                set("Content-Range", "bytes 1000-1999/3000"),
            ],
            ok(),
            409,
            "geometry_mismatch",
        ),
        case(
            "chunk size changed",
            OneChunk,
            vec![
                set("X-Chunk-Index", "1"),
                set("X-Total-Chunks", "5"),
                set("Content-Range", "bytes 500-999/2500"),
            ],
            Body::Sized(bytes(500, 1)),
            409,
            "geometry_mismatch",
        ),
        case(
            "file MD5 changed",
            OneChunk,
            vec![
                set("X-Chunk-Index", "1"),
                set("Content-Range", "bytes 1000-1999/2500"),
                set("X-File-MD5", "00000000000000000000000000000000"),
            ],
            ok(),
            409,
            "file_md5_mismatch",
        ),
        case(
            "stored chunk with other bytes",
            OneChunk,
            vec![],
            Body::Sized(bytes(1000, 2)),
            409,
            "chunk_conflict",
        ),
        case(
            "chunk for a merging upload",
            Merging,
            vec![],
            ok(),
            409,
            "upload_merging",
        ),
        case(
            "chunk for a completed upload",
            Completed,
            vec![],
            ok(),
            409,
            "upload_completed",
        ),
        case(
            "chunk for an aborted upload",
            Aborted,
            vec![],
            ok(),
            409,
            "upload_aborted",
        ),
    ]
}

async fn prepare(app: &TestApp, id: &str, setup: Setup) {
    let source = Source {
        bytes: bytes(TOTAL as usize, 1),
        chunk_size: CHUNK,
    };
    let source = &source;
    let send = |index| async move {
        let response = app
            .chunk_request(id, source, index)
            .header("X-File-MD5", FILE_MD5)
            .send()
            .await;
        let (code, body) = json_response(response).await;
        assert_eq!(code, 200, "setup chunk {index}: {body}");
    };
    match setup {
        Setup::Fresh => {}
        Setup::OneChunk => send(0).await,
        Setup::Merging | Setup::Completed => {
            for i in 0..3 {
                send(i).await;
            }
            if let Setup::Completed = setup {
                let mut conn = redis_connection().unwrap();
                let _: () = redis::cmd("HSET")
                    .arg(format!("{}:{{{id}}}:meta", app.env.namespace))
                    .arg("state")
                    .arg("completed")
                    .query(&mut conn)
                    .unwrap();
            }
        }
        Setup::Aborted => {
            send(0).await;
            let response = app
                .client
                .delete(app.url(&format!("/files/{id}")))
                .send()
                .await;
            assert_eq!(response.unwrap().status(), 204);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_chunk_request_is_refused_with_its_code_and_changes_nothing() {
    let app = spawn_app_with(|s| {
        s.limits.max_chunks = 10_000;
        s.limits.max_chunk_bytes = stitch_common::config::ByteSize(64 << 10);
        s.limits.max_upload_bytes = stitch_common::config::ByteSize(1 << 20);
    })
    .await;
    let mut failures = Vec::new();
    for case in cases() {
        let id = new_id();
        prepare(&app, &id, case.setup).await;
        let redis_before = app.env.redis_snapshot();
        let files_before = app.env.storage_snapshot();

        let mut headers: Vec<(&str, String)> = base_headers(&id);
        let mut replaced = std::collections::HashSet::new();
        for (name, value) in &case.headers {
            if replaced.insert(*name) {
                headers.retain(|(n, _)| n != name);
            }
            if let Some(v) = value {
                headers.push((name, v.clone()));
            }
        }
        let mut request = app.client.put(app.url("/upload/chunk"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request = match case.body {
            Body::Sized(b) => request.body(b),
            Body::Streamed(b) => request.body(reqwest::Body::wrap_stream(
                futures_util::stream::iter(vec![Ok::<_, std::io::Error>(b)]),
            )),
            Body::Multipart(form) => request.multipart(form),
        };
        let (status, body) = json_response(request.send().await).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        if status != case.status || error_code(&body) != case.code || message.is_empty() {
            failures.push(format!(
                "{}: expected {} {}, got {status} {body}",
                case.name, case.status, case.code
            ));
        }
        if app.env.redis_snapshot() != redis_before {
            failures.push(format!("{}: Redis changed", case.name));
        }
        if app.env.storage_snapshot() != files_before {
            failures.push(format!(
                "{}: storage changed: {:?} -> {:?}",
                case.name,
                files_before,
                app.env.storage_snapshot()
            ));
        }
        if matches!(case.setup, Setup::Fresh) && !files_before.is_empty() {
            failures.push(format!("{}: files left by earlier cases", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn bad_create_requests_are_refused_and_store_nothing() {
    let app = spawn_app_with(|s| {
        s.limits.max_chunk_bytes = stitch_common::config::ByteSize(64 << 10);
        s.limits.max_upload_bytes = stitch_common::config::ByteSize(1 << 20);
        s.limits.max_metadata_bytes = 100;
    })
    .await;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("not JSON", "{".into(), 400, "invalid_json"),
        (
            "unknown field",
            r#"{"total_size":10,"chunk_size":5,"colour":"red"}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "missing size",
            r#"{"chunk_size":5}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "negative size",
            r#"{"total_size":-1,"chunk_size":5}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "empty upload",
            r#"{"total_size":0,"chunk_size":5}"#.into(),
            400,
            "invalid_chunk",
        ),
        (
            "zero chunk size",
            r#"{"total_size":10,"chunk_size":0}"#.into(),
            400,
            "invalid_chunk",
        ),
        (
            "bad id",
            r#"{"upload_id":"../x","total_size":10,"chunk_size":5}"#.into(),
            400,
            "invalid_upload_id",
        ),
        (
            "bad md5",
            r#"{"total_size":10,"chunk_size":5,"md5":"zz"}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "too large",
            r#"{"total_size":2000000,"chunk_size":65536}"#.into(),
            413,
            "upload_too_large",
        ),
        (
            "chunk too large",
            r#"{"total_size":200000,"chunk_size":100000}"#.into(),
            413,
            "chunk_too_large",
        ),
        (
            "too many chunks",
            r#"{"total_size":1000000,"chunk_size":1}"#.into(),
            400,
            "too_many_chunks",
        ),
        (
            "metadata too large",
            format!(
                r#"{{"total_size":10,"chunk_size":5,"metadata":{{"k":"{}"}}}}"#,
                "v".repeat(200)
            ),
            400,
            "invalid_json",
        ),
        (
            "control character in name",
            r#"{"total_size":10,"chunk_size":5,"filename":"a\nb"}"#.into(),
            400,
            "invalid_filename",
        ),
    ];
    for (name, body, status, code) in cases {
        let response = app
            .client
            .post(app.url("/upload"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let (got, json) = json_response(response).await;
        assert_eq!((got, error_code(&json)), (status, code), "{name}: {json}");
        assert!(app.env.redis_snapshot().is_empty(), "{name}: Redis changed");
        assert!(
            app.env.storage_snapshot().is_empty(),
            "{name}: storage changed"
        );
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_json() {
    let app = spawn_app().await;
    let (code, body) = json_response(app.client.get(app.url("/nope")).send().await).await;
    assert_eq!((code, error_code(&body)), (404, "not_found"));
    let (code, body) = json_response(app.client.get(app.url("/upload/chunk")).send().await).await;
    assert_eq!((code, error_code(&body)), (405, "method_not_allowed"));
    let (code, body) = json_response(
        app.client
            .get(app.url("/upload/..%2Fx/status"))
            .send()
            .await,
    )
    .await;
    assert_eq!((code, error_code(&body)), (400, "invalid_upload_id"));
}
