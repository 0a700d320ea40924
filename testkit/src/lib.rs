//! Stitch's test kit: what the API, worker and end-to-end tests share, and what the
//! benchmarks (`stitch-bench`) build on.
//!
//! Every test gets a [`TestEnv`]: a random namespace (Redis keys, RabbitMQ exchanges and
//! queues) and its own storage directory, all removed when it drops. The kit talks to real
//! Redis and RabbitMQ servers, there are no mocks here: the ones named by
//! `STITCH_TEST_REDIS_URL` and `STITCH_TEST_AMQP_URL` (what `cargo xtask test` starts), or the
//! machine's own on their standard loopback ports. Tests that need only files use
//! [`TestEnv::local`], which touches neither. A benchmark takes [`TestEnv::deployed`]
//! instead: the services it is given, and processes configured as Stitch ships.
//!
//! Tests that need Redis nodes of their own, to stop and restart them (the lock's Redlock
//! quorum, Redis killed with its append-only file), start them with
//! [`redis_server::RedisServer`]; a RabbitMQ of their own, to kill and restart, with
//! [`rabbit_server::RabbitServer`]; and put the namespace on them with [`TestEnv::on`].

pub mod events;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod rabbit_server;
pub mod rabbitmq_node;
pub mod redis_server;
pub mod reflink;
pub mod sink;
pub mod tus;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use stitch_common::config::{Interval, Secret, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on connecting to Redis and on each command, so that a Redis that does not answer
/// fails a test (or a benchmark) instead of hanging it.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// The Redis the tests use: `STITCH_TEST_REDIS_URL`, or the machine's on its standard port.
pub fn redis_url() -> String {
    std::env::var("STITCH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The RabbitMQ the tests use: `STITCH_TEST_AMQP_URL`, or the machine's on its standard port.
pub fn amqp_url() -> String {
    std::env::var("STITCH_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The host and port of [`amqp_url`], for tests that put a proxy in front of the broker.
pub fn amqp_addr() -> SocketAddr {
    let url = amqp_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let after_user = after_scheme
        .rsplit_once('@')
        .map_or(after_scheme, |(_, rest)| rest);
    let host_port = after_user.split('/').next().unwrap_or(after_user);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("the RabbitMQ address {host_port:?} does not resolve"))
}

/// The URL with the rest of an AMQP URL of [`amqp_url`] kept and the address replaced.
pub fn amqp_url_via(addr: SocketAddr) -> String {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url.as_str()));
    let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
    let vhost = rest.split_once('/').map_or("", |(_, v)| v);
    let user = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    format!("{scheme}://{user}{addr}/{vhost}")
}

/// The Redis and RabbitMQ a namespace lives on.
#[derive(Clone, Debug)]
pub struct Services {
    pub redis_url: String,
    pub amqp_url: String,
}

impl Services {
    /// The tests' services: [`redis_url`] and [`amqp_url`].
    pub fn from_env() -> Self {
        Self {
            redis_url: redis_url(),
            amqp_url: amqp_url(),
        }
    }

    /// A synchronous connection to the Redis, each command bounded in time.
    pub fn redis(&self) -> redis::RedisResult<redis::Connection> {
        let connection = redis::Client::open(self.redis_url.as_str())?
            .get_connection_with_timeout(REDIS_TIMEOUT)?;
        connection.set_read_timeout(Some(REDIS_TIMEOUT))?;
        connection.set_write_timeout(Some(REDIS_TIMEOUT))?;
        Ok(connection)
    }
}

/// A namespace and a storage directory shared by the processes and clients of one test (or
/// one benchmark measurement), and the settings they all start from.
pub struct TestEnv {
    pub namespace: String,
    pub storage_root: PathBuf,
    /// What every process and client of the namespace is configured with: the processes of
    /// [`process::stitch_command`] take from it what they must agree on, and the drop deletes
    /// the broker queues that it names.
    settings: Settings,
    /// The services the namespace lives on; `None` when it needs only files (and the drop
    /// cleans nothing there).
    services: Option<Services>,
    _dir: tempfile::TempDir,
}

impl TestEnv {
    /// A fresh namespace whose schema record says it is migrated (what `stitch-worker
    /// migrate` leaves; the broker topology is declared by the processes as they connect).
    pub fn new() -> Arc<Self> {
        Self::on(Services::from_env())
    }

    /// [`TestEnv::new`] on services of the test's own (a [`redis_server::RedisServer`] or a
    /// [`rabbit_server::RabbitServer`] it kills and restarts), whose URLs every process and
    /// client of the namespace (the event tap included) is then configured with.
    pub fn on(services: Services) -> Arc<Self> {
        let env = Self::for_tests_on(services, true);
        env.mark_migrated();
        env
    }

    /// Writes the schema record `stitch-worker migrate` leaves.
    fn mark_migrated(&self) {
        let mut conn = self.redis().unwrap_or_else(|e| {
            panic!(
                "the tests need Redis at {}: {e}",
                self.services.as_ref().map_or("", |s| s.redis_url.as_str())
            )
        });
        let version = stitch_common::migrate::SCHEMA_VERSION;
        let () = redis::cmd("HSET")
            .arg(stitch_common::migrate::schema_key(&self.namespace))
            .arg("version")
            .arg(version)
            .arg("compatible_from")
            .arg(version)
            .query(&mut conn)
            .expect("recording the test namespace's schema version");
    }

    /// [`TestEnv::new`] with its storage directory under `parent` (a file system the test
    /// needs, such as [`reflink::reflink_dir`]).
    pub fn new_in(parent: &Path) -> Arc<Self> {
        let env = Self::for_tests_in(Services::from_env(), true, parent);
        env.mark_migrated();
        env
    }

    /// A fresh namespace that no migration has touched.
    pub fn unmigrated() -> Arc<Self> {
        Self::for_tests(true)
    }

    /// A namespace and storage directory for a test that needs only files (the single-node
    /// mode, SQLite backends): nothing of it reaches Redis or RabbitMQ, not even the cleanup.
    pub fn local() -> Arc<Self> {
        Self::for_tests(false)
    }

    /// A namespace `<prefix>-<16 hex digits>` configured as deployed: every setting at its
    /// documented default but where the state lives, so that what runs on it is Stitch as it
    /// ships (what the benchmarks measure). Its storage directory is made under `parent` (for
    /// a benchmark, the disk to measure). It lives on `services`, or on none (the single-node
    /// mode); nothing reaches them until a process, or [`TestEnv::migrate`], writes there.
    pub fn deployed(
        prefix: &str,
        parent: &Path,
        services: Option<&Services>,
    ) -> std::io::Result<Arc<Self>> {
        let urls = services.cloned().unwrap_or_else(Services::from_env);
        Self::create(
            prefix,
            parent,
            urls,
            services.is_some(),
            Settings::default(),
        )
    }

    fn for_tests(on_services: bool) -> Arc<Self> {
        Self::for_tests_on(Services::from_env(), on_services)
    }

    fn for_tests_on(services: Services, on_services: bool) -> Arc<Self> {
        Self::for_tests_in(services, on_services, &std::env::temp_dir())
    }

    fn for_tests_in(services: Services, on_services: bool, parent: &Path) -> Arc<Self> {
        let mut settings = Settings::default();
        settings.limits.max_chunks = 10_000;
        // Every delay is a quorum queue on the shared broker: tests keep them few.
        settings.merge.retry_delays = vec![
            Interval(Duration::from_millis(500)),
            Interval(Duration::from_secs(2)),
        ];
        settings.webhooks.retry_delays = vec![
            Interval(Duration::from_millis(300)),
            Interval(Duration::from_secs(1)),
        ];
        Self::create("test", parent, services, on_services, settings)
            .expect("creating a test directory")
    }

    fn create(
        prefix: &str,
        parent: &Path,
        services: Services,
        on_services: bool,
        mut settings: Settings,
    ) -> std::io::Result<Arc<Self>> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("stitch-{prefix}-"))
            .tempdir_in(parent)?;
        let storage_root = dir.path().join("storage");
        std::fs::create_dir_all(&storage_root)?;
        let namespace = format!("{prefix}-{:016x}", rand::random::<u64>());
        settings.namespace = namespace.clone();
        settings.http.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.storage.root = storage_root.clone();
        settings.redis.url = Secret::new(&services.redis_url);
        settings.amqp.url = Secret::new(&services.amqp_url);
        Ok(Arc::new(Self {
            namespace,
            storage_root,
            settings,
            services: on_services.then_some(services),
            _dir: dir,
        }))
    }

    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }

    /// A connection to the namespace's Redis.
    pub fn redis(&self) -> redis::RedisResult<redis::Connection> {
        match &self.services {
            Some(services) => services.redis(),
            None => Services::from_env().redis(),
        }
    }

    /// Applies the migrations to the namespace, as a deployment's migration job does before
    /// its processes start (idempotent). On a thread of its own, so that it may be called from
    /// inside a runtime.
    pub fn migrate(&self) -> anyhow::Result<()> {
        let settings = self.settings();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(stitch_common::migrate::apply(
                &settings,
                Duration::from_secs(60),
            ))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the migration thread panicked"))?
        .with_context(|| format!("migrating namespace {}", self.namespace))?;
        Ok(())
    }

    /// Every key of the namespace with its content, for before/after comparisons.
    pub fn redis_snapshot(&self) -> BTreeMap<String, String> {
        snapshot(self.redis(), &self.namespace)
    }

    /// Deletes every Redis key of the namespace, the schema record included: what a Redis
    /// restarted without persistence, or a failover to an empty replica, leaves.
    pub fn lose_redis_keys(&self) {
        let mut conn = redis_connection()
            .unwrap_or_else(|e| panic!("the tests need Redis at {}: {e}", redis_url()));
        let keys = scan_keys(&mut conn, &self.namespace).expect("listing the namespace's keys");
        if !keys.is_empty() {
            let () = redis::cmd("DEL")
                .arg(&keys)
                .query(&mut conn)
                .expect("deleting the namespace's keys");
        }
    }

    /// Every file under the storage root (relative path → size), but early assembly's.
    pub fn storage_snapshot(&self) -> BTreeMap<String, u64> {
        storage_snapshot(&self.storage_root)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let Some(services) = &self.services else {
            return;
        };
        let deleted = services.redis().and_then(|mut conn| {
            let keys = scan_keys(&mut conn, &self.namespace)?;
            if !keys.is_empty() {
                let () = redis::cmd("DEL").arg(&keys).query(&mut conn)?;
            }
            Ok(())
        });
        if let Err(e) = deleted {
            eprintln!(
                "warning: the Redis keys of {} are left: {e}",
                self.namespace
            );
        }
        // The broker topology of the namespace, if anything declared it.
        let settings = self.settings();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let broker = stitch_common::queue::AmqpBroker::new(&settings);
            if let Err(e) = runtime.block_on(broker.delete_topology()) {
                eprintln!(
                    "warning: the RabbitMQ exchanges and queues of {} are left: {e}",
                    settings.namespace
                );
            }
        })
        .join();
    }
}

/// A connection to the tests' Redis ([`redis_url`]).
pub fn redis_connection() -> redis::RedisResult<redis::Connection> {
    Services::from_env().redis()
}

fn scan_keys(conn: &mut redis::Connection, namespace: &str) -> redis::RedisResult<Vec<String>> {
    let iter: redis::Iter<String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg(format!("{namespace}:*"))
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(conn)?;
    let mut keys: Vec<String> = iter.filter_map(Result::ok).collect();
    keys.sort();
    Ok(keys)
}

pub fn redis_snapshot(namespace: &str) -> BTreeMap<String, String> {
    snapshot(redis_connection(), namespace)
}

fn snapshot(
    conn: redis::RedisResult<redis::Connection>,
    namespace: &str,
) -> BTreeMap<String, String> {
    let mut conn = conn.unwrap_or_else(|e| panic!("the tests need Redis: {e}"));
    let mut out = BTreeMap::new();
    // The schema record is the deployment's, not state an operation may change.
    let schema = stitch_common::migrate::schema_key(namespace);
    let keys = scan_keys(&mut conn, namespace).expect("SCAN");
    for key in keys {
        if key == schema || is_early_assembly_key(&key) {
            continue;
        }
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).expect("TYPE");
        let value = match kind.as_str() {
            "hash" => {
                let map: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query(&mut conn)
                    .expect("HGETALL");
                format!("{map:?}")
            }
            "string" => {
                let v: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).expect("GET");
                format!("{v:?}")
            }
            "list" => {
                let v: Vec<String> = redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query(&mut conn)
                    .expect("LRANGE");
                format!("{v:?}")
            }
            other => format!("<{other}>"),
        };
        out.insert(key, value);
    }
    out
}

/// The lock of an upload's early assembly (`<ns>:{<id>}:assemble`): held for a moment by the
/// API's background assembly, which an earlier accepted chunk started, whatever the request
/// under test does. Snapshots leave it out, as they leave out the assembly's files.
fn is_early_assembly_key(key: &str) -> bool {
    key.ends_with(":assemble")
}

/// Every file under the storage root (relative path → size), but those of early assembly
/// (written in the background after an accepted chunk, not by the request a before/after
/// comparison judges, and derived from the counted chunks: no upload state).
pub fn storage_snapshot(root: &Path) -> BTreeMap<String, u64> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, u64>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if !stitch_common::storage::is_early_assembly_file(
                &entry.file_name().to_string_lossy(),
            ) {
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                out.insert(rel, entry.metadata().map(|m| m.len()).unwrap_or(0));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// An HTTP client for tests. The workspace builds reqwest with rustls and no default crypto
/// provider (the `stitch` CLI chooses ring), so every client in a test comes from here.
pub fn http_client() -> reqwest::Client {
    install_tls_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("an HTTP client")
}

/// An HTTP client that sends `Authorization: Bearer <credential>` with every request.
pub fn http_client_with_key(credential: &str) -> reqwest::Client {
    install_tls_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {credential}"))
            .expect("a credential fits in a header"),
    );
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// Chooses ring as rustls's crypto provider, once per process.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client of one API base URL, speaking the chunk protocol.
#[derive(Clone)]
pub struct ApiClient {
    pub base: String,
    pub client: reqwest::Client,
}

impl ApiClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_client(addr, http_client())
    }

    /// A client of `addr` through `client`, e.g. one with a connection of its own.
    pub fn with_client(addr: SocketAddr, client: reqwest::Client) -> Self {
        Self {
            base: format!("http://{addr}"),
            client,
        }
    }

    /// A client of `addr` that authenticates every request with `credential` (an API key
    /// or a capability token).
    pub fn with_key(addr: SocketAddr, credential: &str) -> Self {
        Self::with_client(addr, http_client_with_key(credential))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A `PUT /upload/chunk` with the protocol's headers for `chunk` of `source`.
    pub fn chunk_request<B: SourceBytes>(
        &self,
        id: &str,
        source: &Source<B>,
        index: u64,
    ) -> reqwest::RequestBuilder {
        let range = source.chunk_range(index);
        self.client
            .put(self.url("/upload/chunk"))
            .header("X-File-ID", id)
            .header("X-Chunk-Index", index.to_string())
            .header("X-Total-Chunks", source.total_chunks().to_string())
            .header(
                "Content-Range",
                format!("bytes {}-{}/{}", range.start, range.end - 1, source.len()),
            )
            .body(source.bytes.body(range.start as usize..range.end as usize))
    }

    /// Sends one chunk and returns the status and the JSON body.
    pub async fn put_chunk<B: SourceBytes>(
        &self,
        id: &str,
        source: &Source<B>,
        index: u64,
    ) -> (u16, serde_json::Value) {
        json_response(self.chunk_request(id, source, index).send().await).await
    }

    /// A `GET /upload/{id}/status`.
    pub fn status_request(&self, id: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(&format!("/upload/{id}/status")))
    }

    pub async fn status(&self, id: &str) -> (u16, serde_json::Value) {
        json_response(self.status_request(id).send().await).await
    }

    /// Polls the status until `state` (or a final state), within `limit`.
    pub async fn wait_for_state(
        &self,
        id: &str,
        state: &str,
        limit: Duration,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (code, status) = self.status(id).await;
            let now = status["state"].as_str().unwrap_or_default().to_owned();
            if code == 200 && (now == state || (now != "receiving" && now != "merging")) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "upload {id} did not reach {state} within {limit:?}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Downloads the completed file.
    pub async fn download(&self, id: &str) -> Vec<u8> {
        let response = self
            .client
            .get(self.url(&format!("/files/{id}")))
            .send()
            .await
            .expect("a download response");
        assert_eq!(response.status(), 200, "download of {id}");
        response.bytes().await.expect("the file").to_vec()
    }
}

pub async fn json_response(
    response: reqwest::Result<reqwest::Response>,
) -> (u16, serde_json::Value) {
    let response = response.expect("the request reached the server");
    let status = response.status().as_u16();
    let text = response.text().await.expect("a response body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("response {status} is not JSON: {text:?}"));
    (status, json)
}

/// The error code of an error response.
pub fn error_code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// A file to upload, in memory, cut into fixed-size chunks. Its bytes are a `Vec<u8>`, which
/// a test may change in place, or (see [`Source::shared`]) a [`Bytes`] buffer whose chunks
/// are sent without being copied, for clients that send gigabytes.
#[derive(Clone)]
pub struct Source<B = Vec<u8>> {
    pub bytes: B,
    pub chunk_size: u64,
}

impl Source {
    /// `len` pseudo-random bytes, seeded (a failing test can be replayed, a benchmark sends
    /// the same bytes every run): xorshift64*, never all zeros, and fast (several GB/s) so
    /// that even a benchmark's gigabyte takes well under a second.
    pub fn random(len: usize, chunk_size: u64, seed: u64) -> Self {
        let mut state = seed | 1; // xorshift's state must never be zero.
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut bytes = vec![0u8; len];
        let mut words = bytes.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
        Self { bytes, chunk_size }
    }

    /// The same file in a shared buffer (moved, not copied).
    pub fn shared(self) -> Source<Bytes> {
        Source {
            bytes: self.bytes.into(),
            chunk_size: self.chunk_size,
        }
    }
}

impl Source<Bytes> {
    /// The same bytes cut into chunks of `chunk_size` (the buffer is shared, not copied).
    pub fn with_chunk_size(&self, chunk_size: u64) -> Self {
        Self {
            bytes: self.bytes.clone(),
            chunk_size,
        }
    }
}

impl<B: AsRef<[u8]>> Source<B> {
    pub fn len(&self) -> u64 {
        self.bytes.as_ref().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.as_ref().is_empty()
    }

    pub fn total_chunks(&self) -> u64 {
        self.len().div_ceil(self.chunk_size)
    }

    /// The byte offsets of chunk `index` in the file.
    pub fn chunk_range(&self, index: u64) -> Range<u64> {
        let start = index * self.chunk_size;
        start..(start + self.chunk_size).min(self.len())
    }

    /// Start offset and bytes of chunk `index`.
    pub fn chunk(&self, index: u64) -> (u64, &[u8]) {
        let range = self.chunk_range(index);
        (
            range.start,
            &self.bytes.as_ref()[range.start as usize..range.end as usize],
        )
    }
}

/// How a [`Source`] hands a chunk to a request body: a `Vec<u8>` copies it, a [`Bytes`]
/// buffer shares it.
pub trait SourceBytes: AsRef<[u8]> {
    fn body(&self, range: Range<usize>) -> Bytes;
}

impl SourceBytes for Vec<u8> {
    fn body(&self, range: Range<usize>) -> Bytes {
        Bytes::copy_from_slice(&self[range])
    }
}

impl SourceBytes for Bytes {
    fn body(&self, range: Range<usize>) -> Bytes {
        self.slice(range)
    }
}

/// A fresh upload id.
pub fn new_id() -> String {
    format!("up-{:016x}", rand::random::<u64>())
}

/// Files under an upload's chunk directory (names only), sorted.
pub fn chunk_files(env: &TestEnv, id: &str) -> Vec<String> {
    let dir = env.storage_root.join("uploads").join(id).join("chunks");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Reassembles an upload from what Redis counts and the files it points at: proves that
/// every counted chunk is backed by a complete file with the right bytes.
pub fn reassemble_counted(env: &TestEnv, id: &str) -> Vec<u8> {
    let mut conn = env.redis().expect("Redis");
    let parts: BTreeMap<u64, String> = redis::cmd("HGETALL")
        .arg(format!("{}:{{{id}}}:parts", env.namespace))
        .query(&mut conn)
        .expect("HGETALL parts");
    let mut out = Vec::new();
    for (index, entry) in parts {
        let token = entry.rsplit(':').next().expect("an entry with a token");
        let path = env
            .storage_root
            .join("uploads")
            .join(id)
            .join("chunks")
            .join(format!("{index}.{token}"));
        out.extend(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }
    out
}

/// A raw HTTP/1.1 connection, for requests that reqwest cannot shape (stalled bodies,
/// partial headers).
pub struct RawConnection {
    pub stream: TcpStream,
}

impl RawConnection {
    pub async fn open(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connecting"),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("writing");
        self.stream.flush().await.expect("flushing");
    }

    /// Reads until the server closes or `limit` passes; returns what arrived.
    pub async fn read_until_close(&mut self, limit: Duration) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => return (out, false),
            }
        }
    }

    /// Reads one response head and body (Content-Length framed).
    pub async fn read_response(&mut self, limit: Duration) -> (u16, String) {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(head_end) = find(&out, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..head_end]).to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if out.len() >= head_end + 4 + len {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .expect("a status code");
                    let body = String::from_utf8_lossy(&out[head_end + 4..head_end + 4 + len]);
                    return (status, format!("{head}\r\n\r\n{body}"));
                }
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) => panic!("connection closed before a full response: {out:?}"),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("read failed: {e}"),
                Err(_) => panic!(
                    "no response within {limit:?}: {:?}",
                    String::from_utf8_lossy(&out)
                ),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The head of a chunk request with the given declared length, for raw connections.
pub fn raw_chunk_head(
    id: &str,
    index: u64,
    total_chunks: u64,
    start: u64,
    len: u64,
    total: u64,
) -> String {
    format!(
        "PUT /upload/chunk HTTP/1.1\r\nHost: test\r\nX-File-ID: {id}\r\nX-Chunk-Index: {index}\r\n\
         X-Total-Chunks: {total_chunks}\r\nContent-Range: bytes {start}-{}/{total}\r\n\
         Content-Length: {len}\r\nContent-Type: application/octet-stream\r\n\r\n",
        start + len - 1
    )
}

/// Waits until `check` holds, polling; panics with `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_random_source_is_deterministic_and_not_constant() {
        let a = Source::random(1001, 10, 7);
        let b = Source::random(1001, 10, 7);
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.len(), 1001);
        assert!(a.bytes.iter().any(|&x| x != a.bytes[0]));
        assert_ne!(Source::random(64, 8, 8).bytes, a.bytes[..64]);
    }

    #[test]
    fn chunks_tile_the_source_with_a_short_last_chunk() {
        let source = Source::random(25, 10, 1);
        assert_eq!(source.total_chunks(), 3);
        let ranges: Vec<Range<u64>> = (0..3).map(|i| source.chunk_range(i)).collect();
        assert_eq!(ranges, vec![0..10, 10..20, 20..25]);
        let joined: Vec<u8> = (0..3).flat_map(|i| source.chunk(i).1.to_vec()).collect();
        assert_eq!(joined, source.bytes);
    }

    #[test]
    fn a_shared_source_has_the_same_chunks_in_any_size() {
        let source = Source::random(25, 10, 1);
        let shared = source.clone().shared();
        assert_eq!(shared.chunk(2), source.chunk(2));
        assert_eq!(shared.bytes.body(20..25), source.bytes.body(20..25));
        let whole = shared.with_chunk_size(100);
        assert_eq!(whole.total_chunks(), 1);
        assert_eq!(whole.chunk(0).1, &source.bytes[..]);
    }
}
