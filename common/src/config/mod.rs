//! Configuration: one [`Settings`], loaded once at start from an optional file
//! (`--config PATH` or `STITCH_CONFIG`) overridden by `STITCH__<SECTION>__<KEY>` environment
//! variables, then validated so that a bad value stops the process with the key's name.
//!
//! Unknown keys are errors too: a mistyped limit must not silently fall back to its default.

mod auth;
mod units;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use auth::{
    ApiKeyEntry, AuthMode, AuthSettings, HookSettings, PreCreateHook, Quotas, check_key_entry,
};
pub use units::{ByteSize, Interval};

/// Environment variable naming a configuration file, when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "STITCH_CONFIG";

/// All of Stitch's settings. Every binary reads the same structure; each uses its sections.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Prefix of every Redis key and every RabbitMQ exchange and queue, so that several
    /// deployments (or test runs) can share one Redis and one broker.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub http: HttpSettings,
    /// Who may call the API and what each tenant may use.
    #[serde(default)]
    pub auth: AuthSettings,
    /// Calls out to the operator's services (the pre-create hook).
    #[serde(default)]
    pub hooks: HookSettings,
    #[serde(default)]
    pub storage: StorageSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub amqp: AmqpSettings,
    #[serde(default)]
    pub lock: LockSettings,
    #[serde(default)]
    pub merge: MergeSettings,
    #[serde(default)]
    pub sweeper: SweeperSettings,
    #[serde(default)]
    pub worker: WorkerRoles,
    #[serde(default)]
    pub webhooks: WebhookSettings,
    #[serde(default)]
    pub janitor: JanitorSettings,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub uploads: UploadSettings,
    /// The tus 1.0 front end (`/files/`).
    #[serde(default)]
    pub tus: TusSettings,
    /// The upload page served at `/`.
    #[serde(default)]
    pub ui: UiSettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub tracing: TracingSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
}

/// Prometheus metrics (served on `/metrics` of every process).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// How often each worker reads the queues' depth and consumer counts from the broker.
    pub queue_poll_interval: Interval,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            queue_poll_interval: Interval(Duration::from_secs(15)),
        }
    }
}

/// Distributed tracing.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// OTLP/HTTP traces endpoint, e.g. `http://otel-collector:4318/v1/traces`. None: traces
    /// are not exported (the default).
    pub otlp_endpoint: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on. The worker serves its probes and metrics on its own bind.
    pub bind: SocketAddr,
    /// How long a client may take to send a request's headers (slowloris guard; axum's own
    /// `serve` has none).
    pub header_read_timeout: Interval,
    /// How long a request body may stall between two reads before the request fails.
    pub body_idle_timeout: Interval,
    /// The slowest a chunk body may arrive, in bytes per second, averaged over each
    /// `min_body_rate_window` of reading after the first: a body that trickles in just under
    /// the idle timeout would otherwise hold one of `limits.max_concurrent_chunk_writes` for
    /// as long as it likes. 0 disables the floor.
    pub min_body_rate: ByteSize,
    /// The window `min_body_rate` is measured over. Only time spent waiting for the client
    /// counts: a pause on the server's side (storage, the body buffer) is not the client's.
    pub min_body_rate_window: Interval,
    /// Bound on reading one chunk body, however fast it flows: no write slot is held longer.
    pub chunk_deadline: Interval,
    /// Browser origins allowed to call the API (`https://app.example.com`), or `*` for any.
    /// Empty (the default): no CORS headers at all, so browsers refuse cross-origin calls.
    /// In the environment: comma-separated.
    #[serde(deserialize_with = "units::list_or_csv")]
    pub cors_origins: Vec<String>,
    /// On SIGTERM, how long in-flight requests (and, in the worker, merges) may run before
    /// the process exits anyway.
    pub shutdown_grace: Interval,
    /// The externally visible base URL of the API (e.g. `https://uploads.example.com`), used
    /// to build download links in status responses and events. Without it links are
    /// relative (`/files/<id>`). tus `Location` headers are absolute: from this, else from
    /// the request (`Host`, or `Forwarded` / `X-Forwarded-*` when `trust_forwarded`).
    pub public_url: Option<String>,
    /// Believe `Forwarded` and `X-Forwarded-Host`/`-Proto` from clients: only behind a proxy
    /// that sets them (anyone else could point Location headers elsewhere).
    pub trust_forwarded: bool,
}

/// The upload page.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiSettings {
    /// Do not serve the page (`/` is then 404).
    pub disabled: bool,
    /// Where the page asks for a capability token per upload when API keys are on: the
    /// operator's or app's own backend (which calls `POST /upload/tokens` with its key).
    pub token_url: Option<String>,
}

/// The tus 1.0 front end.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TusSettings {
    /// Serve tus on `/files/`. The chunk protocol is always on.
    pub enabled: bool,
    /// A PATCH body is made durable and counted every this many bytes (and at its end,
    /// wherever the body stops): what a process killed mid-PATCH can lose at most.
    pub segment_size: ByteSize,
    /// How long a PATCH whose process died keeps others from appending to its upload (a
    /// lease, renewed while the PATCH runs; a PATCH that ends releases it at once).
    pub append_lease: Interval,
    /// Bound on reading one PATCH body, however fast it flows. What arrived is kept: the
    /// client resumes from there.
    pub patch_deadline: Interval,
}

impl Default for TusSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            segment_size: ByteSize(64 << 20),
            append_lease: Interval(Duration::from_secs(10)),
            patch_deadline: Interval(Duration::from_secs(6 * 3600)),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// The shared directory (a ReadWriteMany volume when distributed).
    pub root: PathBuf,
    /// fsync chunk files and directories before counting a chunk. Turning this off trades
    /// invariant 1 (durability across a power loss) for speed; only for throwaway setups.
    pub fsync: bool,
    /// Write chunk files with direct I/O (`O_DIRECT`, 1 MiB aligned writes), and read them
    /// back for the merge the same way: past the page cache, which an upload's bytes gain
    /// nothing from (each is read once more, soon) and which costs a fresh page of memory
    /// per 4 KiB written. Falls back to ordinary I/O where the file system refuses it.
    pub direct_io: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    pub url: Secret,
    /// Connections per process. deadpool's default (4 × CPUs) is too small for a busy pod.
    pub pool_size: usize,
    /// Bound on connecting and on each command; past it the request fails with 503.
    pub timeout: Interval,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    pub url: Secret,
    /// Bound on connecting and on each publisher confirm.
    pub timeout: Interval,
}

/// The per-upload merge lock (Redlock-style, fenced).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockSettings {
    /// Independent Redis nodes for a Redlock quorum. Empty: the state store's Redis alone.
    /// In the environment: comma-separated.
    #[serde(deserialize_with = "units::list_or_csv")]
    pub redis_urls: Vec<Secret>,
    /// Lease length; a watchdog renews it every third of this while a merge runs.
    pub ttl: Interval,
}

/// How merges run and retry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MergeSettings {
    /// Merges one worker runs at once (its RabbitMQ prefetch).
    pub concurrency: u16,
    /// Delays before the 2nd, 3rd, … attempt after a transient failure (storage or a
    /// backend). Past the last, every further retry waits the last delay: a transient
    /// failure is retried for as long as it lasts, never turned into a failed upload. At
    /// least one. In the environment: comma-separated (`5s,30s,2m`).
    #[serde(deserialize_with = "units::list_or_csv")]
    pub retry_delays: Vec<Interval>,
    /// Redeliveries of one message (after its first delivery) before the queue dead-letters
    /// it: a worker that crashes on it every time. RabbitMQ 3.10 has no default; 4.x
    /// defaults to 20.
    pub delivery_limit: u32,
    /// Read/hash block size. 64 KiB stays in cache; 1 MiB was measurably slower here.
    pub buffer_bytes: ByteSize,
    /// Write the merged file with direct I/O (`O_DIRECT`, 1 MiB aligned writes), past the
    /// page cache: no fresh memory to fault in, no writeback to wait for, so the copy hides
    /// behind the MD5. Falls back to buffered writes where the file system refuses it.
    pub direct_io: bool,
    /// Share the chunks' blocks with the merged file (`FICLONERANGE`, "reflink") instead of
    /// copying them, where the storage's file system can (XFS with reflink, Btrfs, NFS 4.2
    /// with server-side clone): each byte is then written once, when its chunk is stored,
    /// and assembling costs what reading it back for the MD5 costs. Elsewhere (ext4, tmpfs,
    /// CephFS) the merge copies, as with it off.
    pub reflink: bool,
    /// Assemble the file while its chunks arrive: the API that counts a chunk appends the
    /// contiguous in-order prefix to the upload's assembly file and advances its MD5 (and
    /// SHA-256), saving the hash state with it, so that the merge only finishes what the
    /// prefix has not covered. Off, the whole merge runs after the last chunk.
    pub incremental: bool,
    /// The nice level (0–19) of the API's assembly threads: they take the CPU that requests
    /// leave idle, so that receiving chunks never waits on hashing them (the merge finishes
    /// whatever the assembly has not reached). 0: the same priority as requests.
    pub assembly_nice: u8,
    /// Hash in line (with `incremental`, where the storage clones: `reflink`): the API
    /// advances the file's hashes over each chunk's bytes while it receives them, from
    /// memory, in order, and the assembly then only clones the chunk into place. A client
    /// sending in order is paced by the hashes (they are never more than a few MiB behind),
    /// so the verified file is there moments after the last byte. Off, the assembly reads
    /// each chunk back from storage, at `assembly_nice`.
    pub hash_in_line: bool,
    /// How far (bytes) the hashes may be behind the writing of an upload's next in-order
    /// chunk before its writer waits for them; a writer held back waits until they are
    /// half as far behind. The bytes queued stay part of `limits.max_buffered_body_bytes`.
    /// Enough to keep the hashes busy while one chunk is made durable and the next one
    /// begins.
    pub hash_queue: ByteSize,
    /// Memory the API may hold, in all uploads, of chunks received ahead of their upload's
    /// hashes (other connections of the same upload) until the hashes reach them. A chunk
    /// that would go past it is read back from storage instead.
    pub hash_ahead: ByteSize,
}

/// The outbox sweeper: no upload whose last chunk was accepted stays unfinished.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweeperSettings {
    pub interval: Interval,
    /// A merge trigger still in an outbox this long after it was written is published again.
    pub outbox_horizon: Interval,
    /// An upload `merging` this long without a commit (and without a lock holder) is
    /// enqueued again. The sweeper never fails an upload: a backlog only waits.
    pub stuck_merge_horizon: Interval,
}

/// Which roles a `stitch-worker` process runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerRoles {
    pub merge: bool,
    pub sweeper: bool,
    /// The webhook dispatcher.
    pub webhooks: bool,
    /// The janitor: expires abandoned uploads' files and removes orphans.
    pub janitor: bool,
}

/// The janitor: storage that nothing needs any more.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JanitorSettings {
    pub interval: Interval,
    /// Files younger than this are never collected: a copy being written or between its
    /// rename and its record is in use.
    pub grace: Interval,
}

impl Default for JanitorSettings {
    fn default() -> Self {
        Self {
            interval: Interval(Duration::from_secs(600)),
            grace: Interval(Duration::from_secs(3600)),
        }
    }
}

/// Webhooks: signed POSTs of upload events.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Endpoints the operator trusts (`[[webhooks.endpoints]]` in the file).
    pub endpoints: Vec<WebhookEndpoint>,
    /// Delays before the 2nd, 3rd, … delivery attempt; past the last, the delivery is
    /// dead-lettered. In the environment: comma-separated.
    #[serde(deserialize_with = "units::list_or_csv")]
    pub retry_delays: Vec<Interval>,
    pub connect_timeout: Interval,
    /// Bound on a whole delivery: connect, send, response headers and (at most 64 KiB of)
    /// body.
    pub timeout: Interval,
    /// Deliveries one dispatcher makes at once.
    pub concurrency: u16,
    /// Let clients give a `callback_url` when they create an upload.
    pub allow_client_callbacks: bool,
    /// Host names client callbacks may use (`hooks.example.com`, `*.example.org`); empty:
    /// any host whose addresses are public. In the environment: comma-separated.
    #[serde(deserialize_with = "units::list_or_csv")]
    pub callback_allowlist: Vec<String>,
    /// Networks (CIDR) client callbacks may reach even though they are not public, e.g. an
    /// internal partner network. Empty by default. In the environment: comma-separated.
    #[serde(deserialize_with = "units::list_or_csv")]
    pub callback_allow_networks: Vec<String>,
}

/// An operator-configured webhook endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// A stable name for logs, the delivery log and enabling it again after a 410. Default:
    /// derived from the URL.
    pub id: Option<String>,
    pub url: String,
    /// `whsec_<base64>`, as Standard Webhooks writes secrets.
    pub secret: Secret,
    /// Secrets still accepted by receivers during a rotation: every delivery is signed with
    /// the current secret and each of these.
    #[serde(default)]
    pub previous_secrets: Vec<Secret>,
    /// Event types to send (`upload.completed`, …); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
}

/// Limits on what clients may send. Every one is enforced before anything is stored.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_chunk_bytes: ByteSize,
    pub max_upload_bytes: ByteSize,
    pub max_chunks: u64,
    /// Chunk bodies being written at once by one API process; more get 503 + Retry-After.
    pub max_concurrent_chunk_writes: usize,
    /// Of those, how many one tenant may have at once, so that no tenant can take every slot
    /// and make the others' chunks wait; more get 503 + Retry-After too. Unset: half of
    /// `max_concurrent_chunk_writes` (at least 1). Per process, like the slots it shares.
    pub max_chunk_writes_per_tenant: Option<usize>,
    /// Body bytes one API process holds in memory at once, across all chunks in flight
    /// (between the socket and the disk and hash). Past it, reading waits: memory stays
    /// bounded however many clients send at once.
    pub max_buffered_body_bytes: ByteSize,
    pub max_filename_bytes: usize,
    pub max_metadata_bytes: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadSettings {
    /// An upload that is not completed and saw no activity on storage for this long is
    /// abandoned: the janitor removes it (its Redis keys carry the same TTL, refreshed on
    /// activity). Completed uploads never expire by it.
    pub ttl: Interval,
    /// How long a completed file and its status are kept after completion. `None` (the
    /// default): until it is deleted (`DELETE /files/{id}`).
    pub completed_retention: Option<Interval>,
    /// Compute MD5 of every chunk even when the client sends no `Content-MD5` (costs about
    /// one core per 600 MB/s).
    pub chunk_md5: bool,
    /// Which whole-file digests the merge computes over the bytes it copies: `md5` (the
    /// default) or `md5+sha256`. The CRC32C of the file is always there (combined from the
    /// chunks', no extra pass).
    pub file_digest: FileDigest,
}

/// The whole-file hashes a merge computes in its hashing stage (`uploads.file_digest`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum FileDigest {
    /// MD5 only.
    #[default]
    #[serde(rename = "md5")]
    Md5,
    /// MD5 and SHA-256, in the same pass (SHA-256 costs about as much as MD5 again, unless
    /// the CPU has SHA extensions).
    #[serde(rename = "md5+sha256")]
    Md5Sha256,
}

impl FileDigest {
    pub fn with_sha256(self) -> bool {
        self == Self::Md5Sha256
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A `tracing` filter directive, e.g. `info` or `stitch_api=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for development.
    Pretty,
    /// One JSON object per line, for production log pipelines.
    Json,
}

/// A configuration value that must not appear in logs (URLs with passwords, keys).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Default for Settings {
    /// The documented defaults, as an empty configuration file gives them.
    fn default() -> Self {
        Self {
            namespace: default_namespace(),
            http: HttpSettings::default(),
            auth: AuthSettings::default(),
            hooks: HookSettings::default(),
            storage: StorageSettings::default(),
            redis: RedisSettings::default(),
            amqp: AmqpSettings::default(),
            lock: LockSettings::default(),
            merge: MergeSettings::default(),
            sweeper: SweeperSettings::default(),
            worker: WorkerRoles::default(),
            webhooks: WebhookSettings::default(),
            janitor: JanitorSettings::default(),
            limits: Limits::default(),
            uploads: UploadSettings::default(),
            tus: TusSettings::default(),
            ui: UiSettings::default(),
            log: LogSettings::default(),
            tracing: TracingSettings::default(),
            metrics: MetricsSettings::default(),
        }
    }
}

fn default_namespace() -> String {
    "stitch".into()
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            header_read_timeout: Interval(Duration::from_secs(30)),
            body_idle_timeout: Interval(Duration::from_secs(60)),
            min_body_rate: ByteSize(16 << 10),
            min_body_rate_window: Interval(Duration::from_secs(30)),
            chunk_deadline: Interval(Duration::from_secs(3600)),
            cors_origins: Vec::new(),
            shutdown_grace: Interval(Duration::from_secs(30)),
            public_url: None,
            trust_forwarded: false,
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            root: PathBuf::from("./stitch-data"),
            fsync: true,
            direct_io: true,
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("redis://127.0.0.1:6379"),
            pool_size: 32,
            timeout: Interval(Duration::from_secs(5)),
        }
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            timeout: Interval(Duration::from_secs(5)),
        }
    }
}

impl Default for LockSettings {
    fn default() -> Self {
        Self {
            redis_urls: Vec::new(),
            ttl: Interval(Duration::from_secs(30)),
        }
    }
}

impl Default for MergeSettings {
    fn default() -> Self {
        Self {
            concurrency: 2,
            retry_delays: [5, 30, 120, 600]
                .map(|s| Interval(Duration::from_secs(s)))
                .to_vec(),
            delivery_limit: 10,
            buffer_bytes: ByteSize(64 << 10),
            direct_io: true,
            reflink: true,
            incremental: true,
            assembly_nice: 10,
            hash_in_line: true,
            hash_queue: ByteSize(8 << 20),
            hash_ahead: ByteSize(64 << 20),
        }
    }
}

impl Default for SweeperSettings {
    fn default() -> Self {
        Self {
            interval: Interval(Duration::from_secs(15)),
            outbox_horizon: Interval(Duration::from_secs(30)),
            stuck_merge_horizon: Interval(Duration::from_secs(900)),
        }
    }
}

impl Default for WorkerRoles {
    fn default() -> Self {
        Self {
            merge: true,
            sweeper: true,
            webhooks: true,
            janitor: true,
        }
    }
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            retry_delays: [10, 60, 300, 1800, 7200, 21600]
                .map(|s| Interval(Duration::from_secs(s)))
                .to_vec(),
            connect_timeout: Interval(Duration::from_secs(5)),
            timeout: Interval(Duration::from_secs(15)),
            concurrency: 8,
            allow_client_callbacks: false,
            callback_allowlist: Vec::new(),
            callback_allow_networks: Vec::new(),
        }
    }
}

impl Limits {
    /// How many chunk bodies one tenant may write at once in one process.
    pub fn chunk_writes_per_tenant(&self) -> usize {
        self.max_chunk_writes_per_tenant
            .unwrap_or((self.max_concurrent_chunk_writes / 2).max(1))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chunk_bytes: ByteSize(128 << 20),
            max_upload_bytes: ByteSize(16 << 40),
            max_chunks: 100_000,
            max_concurrent_chunk_writes: 64,
            max_chunk_writes_per_tenant: None,
            max_buffered_body_bytes: ByteSize(16 << 20),
            max_filename_bytes: 1024,
            max_metadata_bytes: 8 << 10,
        }
    }
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            ttl: Interval(Duration::from_secs(7 * 86_400)),
            completed_retention: None,
            chunk_md5: false,
            file_digest: FileDigest::Md5,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

/// The largest chunk count any deployment may configure: the received-chunk bitmap of one
/// upload stays at most 1.25 MB.
pub const MAX_CHUNKS_CEILING: u64 = 10_000_000;

/// A configuration problem, naming the key (in its environment-variable spelling).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("{key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

impl Settings {
    /// Loads settings from `file` (or the file named by `STITCH_CONFIG`), then the
    /// environment, then validates them. `defaults` are per-binary defaults given as
    /// `("section.key", value)`, below the file and the environment.
    pub fn load(file: Option<&Path>, defaults: &[(&str, &str)]) -> Result<Self, SettingsError> {
        let env_file = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut builder = config::Config::builder();
        for (key, value) in defaults {
            builder = builder.set_default(*key, *value)?;
        }
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("STITCH")
                .prefix_separator("__")
                .separator("__"),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, problem: &str| {
            Err(SettingsError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return invalid(
                "STITCH__NAMESPACE",
                "must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'",
            );
        }
        let l = &self.limits;
        if l.max_chunk_bytes.0 == 0 {
            return invalid("STITCH__LIMITS__MAX_CHUNK_BYTES", "must be at least 1");
        }
        // Redis scripts count bytes in Lua numbers (doubles): exact up to 2^53 (8 PiB).
        if l.max_upload_bytes.0 == 0 || l.max_upload_bytes.0 > 1 << 53 {
            return invalid(
                "STITCH__LIMITS__MAX_UPLOAD_BYTES",
                "must be between 1 and 2^53 bytes (8 PiB)",
            );
        }
        if l.max_chunks == 0 || l.max_chunks > MAX_CHUNKS_CEILING {
            return invalid(
                "STITCH__LIMITS__MAX_CHUNKS",
                &format!("must be between 1 and {MAX_CHUNKS_CEILING}"),
            );
        }
        if l.max_concurrent_chunk_writes == 0 {
            return invalid(
                "STITCH__LIMITS__MAX_CONCURRENT_CHUNK_WRITES",
                "must be at least 1",
            );
        }
        if let Some(per_tenant) = l.max_chunk_writes_per_tenant
            && !(1..=l.max_concurrent_chunk_writes).contains(&per_tenant)
        {
            return invalid(
                "STITCH__LIMITS__MAX_CHUNK_WRITES_PER_TENANT",
                &format!(
                    "must be between 1 and limits.max_concurrent_chunk_writes ({})",
                    l.max_concurrent_chunk_writes
                ),
            );
        }
        if self.limits.max_buffered_body_bytes.0 < 64 << 10 {
            return invalid(
                "STITCH__LIMITS__MAX_BUFFERED_BODY_BYTES",
                "must be at least 64KiB",
            );
        }
        if self.redis.pool_size == 0 {
            return invalid("STITCH__REDIS__POOL_SIZE", "must be at least 1");
        }
        for (key, value) in [
            (
                "STITCH__HTTP__HEADER_READ_TIMEOUT",
                self.http.header_read_timeout,
            ),
            (
                "STITCH__HTTP__BODY_IDLE_TIMEOUT",
                self.http.body_idle_timeout,
            ),
            ("STITCH__REDIS__TIMEOUT", self.redis.timeout),
            ("STITCH__UPLOADS__TTL", self.uploads.ttl),
            ("STITCH__AMQP__TIMEOUT", self.amqp.timeout),
            ("STITCH__LOCK__TTL", self.lock.ttl),
            ("STITCH__SWEEPER__INTERVAL", self.sweeper.interval),
            (
                "STITCH__METRICS__QUEUE_POLL_INTERVAL",
                self.metrics.queue_poll_interval,
            ),
        ] {
            if value.0.is_zero() {
                return invalid(key, "must be longer than zero");
            }
        }
        if self.uploads.ttl.0 < Duration::from_secs(60) {
            return invalid("STITCH__UPLOADS__TTL", "must be at least 60s");
        }
        if self.lock.ttl.0 < Duration::from_millis(300) {
            return invalid("STITCH__LOCK__TTL", "must be at least 300ms");
        }
        if self.merge.concurrency == 0 {
            return invalid("STITCH__MERGE__CONCURRENCY", "must be at least 1");
        }
        if self.merge.retry_delays.is_empty() {
            return invalid(
                "STITCH__MERGE__RETRY_DELAYS",
                "must list at least one delay (the last one spaces every later retry)",
            );
        }
        if self
            .merge
            .retry_delays
            .iter()
            .any(|d| d.0 < Duration::from_millis(100))
        {
            return invalid(
                "STITCH__MERGE__RETRY_DELAYS",
                "each delay must be at least 100ms",
            );
        }
        if self.merge.delivery_limit == 0 {
            return invalid("STITCH__MERGE__DELIVERY_LIMIT", "must be at least 1");
        }
        if self.merge.hash_queue.0 < 1 << 20 {
            return invalid("STITCH__MERGE__HASH_QUEUE", "must be at least 1MiB");
        }
        if self.merge.assembly_nice > 19 {
            return invalid("STITCH__MERGE__ASSEMBLY_NICE", "must be between 0 and 19");
        }
        if !(4 << 10..=16 << 20).contains(&self.merge.buffer_bytes.0) {
            return invalid(
                "STITCH__MERGE__BUFFER_BYTES",
                "must be between 4KiB and 16MiB",
            );
        }
        self.validate_http()?;
        if let Some(url) = &self.http.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid(
                "STITCH__HTTP__PUBLIC_URL",
                "must start with http:// or https://",
            );
        }
        self.validate_webhooks()?;
        self.auth.validate()?;
        if let Some(hook) = &self.hooks.pre_create {
            if !(hook.url.starts_with("http://") || hook.url.starts_with("https://")) {
                return invalid(
                    "hooks.pre_create.url",
                    "must start with http:// or https://",
                );
            }
            if crate::webhooks::signing::SigningKey::parse(hook.secret.expose()).is_none() {
                return invalid("hooks.pre_create.secret", "must be whsec_<base64>");
            }
        }
        if self.storage.root.as_os_str().is_empty() {
            return invalid("STITCH__STORAGE__ROOT", "must not be empty");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid("STITCH__LOG__LEVEL", "is not a valid filter such as `info`");
        }
        Ok(())
    }
}

/// The fastest `http.min_body_rate` may demand: a floor above it would refuse healthy clients.
pub const MAX_MIN_BODY_RATE: u64 = 1 << 30;

impl Settings {
    /// The body-rate, deadline and CORS settings, and tus's.
    fn validate_http(&self) -> Result<(), SettingsError> {
        let h = &self.http;
        let invalid =
            |key: &'static str, problem: String| Err(SettingsError::Invalid { key, problem });
        let t = &self.tus;
        if t.segment_size.0 < 1 << 20 || t.segment_size.0 > 4 << 30 {
            return invalid(
                "STITCH__TUS__SEGMENT_SIZE",
                "must be between 1MiB and 4GiB".into(),
            );
        }
        if t.append_lease.0 < Duration::from_secs(1) || t.append_lease.0 > Duration::from_secs(600)
        {
            return invalid(
                "STITCH__TUS__APPEND_LEASE",
                "must be between 1s and 10m".into(),
            );
        }
        if t.patch_deadline.0 < Duration::from_secs(1) {
            return invalid("STITCH__TUS__PATCH_DEADLINE", "must be at least 1s".into());
        }
        if let Some(url) = &self.ui.token_url
            && !(url.starts_with("https://") || url.starts_with("http://") || url.starts_with('/'))
        {
            return invalid(
                "STITCH__UI__TOKEN_URL",
                "must be an http(s) URL or a path on this server".into(),
            );
        }
        if h.min_body_rate.0 > MAX_MIN_BODY_RATE {
            return invalid(
                "STITCH__HTTP__MIN_BODY_RATE",
                "must be at most 1GiB (per second); 0 disables it".into(),
            );
        }
        let window = h.min_body_rate_window.0;
        if window < Duration::from_secs(1) || window > Duration::from_secs(3600) {
            return invalid(
                "STITCH__HTTP__MIN_BODY_RATE_WINDOW",
                "must be between 1s and 1h".into(),
            );
        }
        let deadline = h.chunk_deadline.0;
        if deadline < Duration::from_secs(1) || deadline > Duration::from_secs(7 * 86_400) {
            return invalid(
                "STITCH__HTTP__CHUNK_DEADLINE",
                "must be between 1s and 7d".into(),
            );
        }
        let wildcard = h.cors_origins.iter().any(|o| o == "*");
        if wildcard && h.cors_origins.len() > 1 {
            return invalid(
                "STITCH__HTTP__CORS_ORIGINS",
                "`*` allows every origin and must be the only entry".into(),
            );
        }
        if !wildcard {
            for origin in &h.cors_origins {
                if let Err(problem) = check_origin(origin) {
                    return invalid(
                        "STITCH__HTTP__CORS_ORIGINS",
                        format!("{origin:?} {problem}"),
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_webhooks(&self) -> Result<(), SettingsError> {
        let w = &self.webhooks;
        let invalid =
            |key: &'static str, problem: String| Err(SettingsError::Invalid { key, problem });
        let mut ids = std::collections::HashSet::new();
        for (n, endpoint) in w.endpoints.iter().enumerate() {
            if !(endpoint.url.starts_with("http://") || endpoint.url.starts_with("https://")) {
                return invalid(
                    "webhooks.endpoints.url",
                    format!("endpoint {n}: must be an http:// or https:// URL"),
                );
            }
            for secret in std::iter::once(&endpoint.secret).chain(&endpoint.previous_secrets) {
                if !is_webhook_secret(secret.expose()) {
                    return invalid(
                        "webhooks.endpoints.secret",
                        format!(
                            "endpoint {n}: must be whsec_ followed by base64 (at least 24 bytes)"
                        ),
                    );
                }
            }
            for event in &endpoint.events {
                if crate::events::EventKind::parse(event).is_none() {
                    return invalid(
                        "webhooks.endpoints.events",
                        format!("endpoint {n}: unknown event type {event:?}"),
                    );
                }
            }
            if !ids.insert(self.endpoint_id(endpoint)) {
                return invalid(
                    "webhooks.endpoints.id",
                    format!("endpoint {n}: id used twice"),
                );
            }
        }
        if let Err(problem) = crate::webhooks::callback::CallbackPolicy::new(
            &w.callback_allowlist,
            &w.callback_allow_networks,
        ) {
            return invalid("STITCH__WEBHOOKS__CALLBACK_ALLOW_NETWORKS", problem);
        }
        if w.concurrency == 0 {
            return invalid("STITCH__WEBHOOKS__CONCURRENCY", "must be at least 1".into());
        }
        for (key, value) in [
            ("STITCH__WEBHOOKS__TIMEOUT", w.timeout),
            ("STITCH__WEBHOOKS__CONNECT_TIMEOUT", w.connect_timeout),
        ] {
            if value.0.is_zero() {
                return invalid(key, "must be longer than zero".into());
            }
        }
        Ok(())
    }

    /// An endpoint's id: the configured one, or derived from its URL.
    pub fn endpoint_id(&self, endpoint: &WebhookEndpoint) -> String {
        endpoint.id.clone().unwrap_or_else(|| {
            use md5::Digest as _;
            let digest = md5::Md5::digest(endpoint.url.as_bytes());
            format!("endpoint-{}", &hex::encode(digest)[..12])
        })
    }
}

/// An origin as browsers send it in `Origin`: `scheme://host` or `scheme://host:port`, with
/// no path, query or trailing slash (compared without regard to case).
fn check_origin(origin: &str) -> Result<(), &'static str> {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Err("is not an origin such as https://app.example.com");
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err("is not an origin such as https://app.example.com");
    }
    if authority.is_empty() {
        return Err("has no host");
    }
    if authority.contains(['/', '?', '#']) {
        return Err("must be scheme://host[:port] only, without a path or a trailing slash");
    }
    if !authority
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'@' | b'\\' | b'"' | b','))
    {
        return Err("holds characters no origin has");
    }
    Ok(())
}

/// `whsec_` followed by base64 of at least 24 bytes.
fn is_webhook_secret(raw: &str) -> bool {
    use base64::Engine as _;
    raw.strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .is_some_and(|key| key.len() >= 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(toml: &str) -> Result<Settings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stitch.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path), &[])
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let s = load_toml("").unwrap();
        assert_eq!(s.namespace, "stitch");
        assert_eq!(s.http.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(s.storage.root, PathBuf::from("./stitch-data"));
        assert_eq!(s.limits.max_chunk_bytes, ByteSize(128 << 20));
        assert!(s.storage.fsync);
    }

    #[test]
    fn units_are_accepted_in_the_file() {
        let s = load_toml(
            "[limits]\nmax_chunk_bytes = \"8MiB\"\n[http]\nbody_idle_timeout = \"1500ms\"\n",
        )
        .unwrap();
        assert_eq!(s.limits.max_chunk_bytes, ByteSize(8 << 20));
        assert_eq!(
            s.http.body_idle_timeout,
            Interval(Duration::from_millis(1500))
        );
    }

    #[test]
    fn a_mistyped_key_is_an_error_not_a_default() {
        let err = load_toml("[limits]\nmax_chunk_byte = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_chunk_byte"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = load_toml("namespace = \"a:b\"\n").unwrap_err();
        assert!(err.to_string().contains("STITCH__NAMESPACE"), "{err}");
        let err = load_toml("[limits]\nmax_chunks = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("STITCH__LIMITS__MAX_CHUNKS"),
            "{err}"
        );
        let err = load_toml("[http]\nbind = \"nonsense\"\n").unwrap_err();
        assert!(err.to_string().contains("bind"), "{err}");
        let err = load_toml("[limits]\nmax_chunk_bytes = \"lots\"\n").unwrap_err();
        assert!(err.to_string().contains("byte size"), "{err}");
        let err = load_toml("[merge]\nassembly_nice = 20\n").unwrap_err();
        assert!(
            err.to_string().contains("STITCH__MERGE__ASSEMBLY_NICE"),
            "{err}"
        );
        assert_eq!(
            load_toml("[merge]\nassembly_nice = 19\n")
                .unwrap()
                .merge
                .assembly_nice,
            19
        );
        for share in ["0", "65"] {
            let err = load_toml(&format!(
                "[limits]\nmax_chunk_writes_per_tenant = {share}\n"
            ))
            .unwrap_err();
            assert!(
                err.to_string()
                    .contains("STITCH__LIMITS__MAX_CHUNK_WRITES_PER_TENANT"),
                "{err}"
            );
        }
        let limits = load_toml("[limits]\nmax_concurrent_chunk_writes = 9\n")
            .unwrap()
            .limits;
        assert_eq!(limits.chunk_writes_per_tenant(), 4, "half, by default");
        let limits = load_toml("[limits]\nmax_chunk_writes_per_tenant = 64\n")
            .unwrap()
            .limits;
        assert_eq!(limits.chunk_writes_per_tenant(), 64);
        let err = load_toml("[merge]\nretry_delays = []\n").unwrap_err();
        assert!(
            err.to_string().contains("STITCH__MERGE__RETRY_DELAYS"),
            "{err}"
        );
    }

    #[test]
    fn the_file_digest_is_md5_unless_sha256_is_asked_for() {
        assert_eq!(load_toml("").unwrap().uploads.file_digest, FileDigest::Md5);
        let s = load_toml("[uploads]\nfile_digest = \"md5+sha256\"\n").unwrap();
        assert!(s.uploads.file_digest.with_sha256());
        let err = load_toml("[uploads]\nfile_digest = \"sha1\"\n").unwrap_err();
        assert!(err.to_string().contains("file_digest"), "{err}");
    }

    #[test]
    fn a_bad_duration_names_its_key() {
        let err = load_toml("[http]\nbody_idle_timeout = \"soon\"\n").unwrap_err();
        let err = err.to_string();
        assert!(err.contains("http.body_idle_timeout"), "{err}");
        assert!(err.contains("not a duration"), "{err}");
        let err = load_toml("[merge]\nretry_delays = \"1s,soon\"\n").unwrap_err();
        let err = err.to_string();
        assert!(err.contains("merge.retry_delays"), "{err}");
        assert!(err.contains("\"soon\""), "{err}");
    }

    #[test]
    fn durations_take_several_units() {
        let s = load_toml("[uploads]\nttl = \"1h 30m\"\n[janitor]\ngrace = \"2w\"\n").unwrap();
        assert_eq!(s.uploads.ttl, Interval(Duration::from_secs(5400)));
        assert_eq!(s.janitor.grace, Interval(Duration::from_secs(14 * 86_400)));
        let s = load_toml("[uploads]\nttl = 90\n").unwrap();
        assert_eq!(s.uploads.ttl, Interval(Duration::from_secs(90)));
    }

    #[test]
    fn lists_come_as_arrays_or_comma_separated_text() {
        let s = load_toml("[merge]\nretry_delays = [\"1s\", \"2m\"]\n").unwrap();
        assert_eq!(
            s.merge.retry_delays,
            vec![
                Interval(Duration::from_secs(1)),
                Interval(Duration::from_secs(120))
            ]
        );
        let s = load_toml("[merge]\nretry_delays = \"500ms, 1s,2s\"\n").unwrap();
        assert_eq!(s.merge.retry_delays.len(), 3);
        assert_eq!(
            s.merge.retry_delays[0],
            Interval(Duration::from_millis(500))
        );
        let s = load_toml("[webhooks]\nretry_delays = \"500ms,2s, 1m 30s\"\n").unwrap();
        assert_eq!(
            s.webhooks.retry_delays,
            vec![
                Interval(Duration::from_millis(500)),
                Interval(Duration::from_secs(2)),
                Interval(Duration::from_secs(90))
            ]
        );
        let s = load_toml("[lock]\nredis_urls = \"redis://a,redis://b,redis://c\"\n").unwrap();
        assert_eq!(s.lock.redis_urls.len(), 3);
        assert!(load_toml("[merge]\nretry_delays = \"1s,soon\"\n").is_err());
    }

    #[test]
    fn body_pace_and_cors_have_documented_defaults() {
        let s = load_toml("").unwrap();
        assert_eq!(s.http.min_body_rate, ByteSize(16 << 10));
        assert_eq!(
            s.http.min_body_rate_window,
            Interval(Duration::from_secs(30))
        );
        assert_eq!(s.http.chunk_deadline, Interval(Duration::from_secs(3600)));
        assert!(s.http.cors_origins.is_empty());
        let s = load_toml("[http]\nmin_body_rate = 0\n").unwrap();
        assert_eq!(s.http.min_body_rate, ByteSize(0));
    }

    #[test]
    fn body_pace_values_out_of_range_name_their_key() {
        for (toml, key) in [
            ("min_body_rate = \"2GiB\"", "STITCH__HTTP__MIN_BODY_RATE"),
            (
                "min_body_rate_window = 0",
                "STITCH__HTTP__MIN_BODY_RATE_WINDOW",
            ),
            (
                "min_body_rate_window = \"500ms\"",
                "STITCH__HTTP__MIN_BODY_RATE_WINDOW",
            ),
            (
                "min_body_rate_window = \"2h\"",
                "STITCH__HTTP__MIN_BODY_RATE_WINDOW",
            ),
            ("chunk_deadline = 0", "STITCH__HTTP__CHUNK_DEADLINE"),
            ("chunk_deadline = \"8d\"", "STITCH__HTTP__CHUNK_DEADLINE"),
        ] {
            let err = load_toml(&format!("[http]\n{toml}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn cors_origins_must_be_origins_or_a_lone_wildcard() {
        let s = load_toml(
            "[http]\ncors_origins = \"https://app.example.com, http://localhost:3000\"\n",
        )
        .unwrap();
        assert_eq!(
            s.http.cors_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        let s = load_toml("[http]\ncors_origins = [\"*\"]\n").unwrap();
        assert_eq!(s.http.cors_origins, ["*"]);
        for bad in [
            "*, https://a.example",
            "https://app.example.com/",
            "https://app.example.com/upload",
            "app.example.com",
            "null",
            "https://",
            "://x",
            "https://a b",
            "https://user@host",
        ] {
            let err = load_toml(&format!("[http]\ncors_origins = {bad:?}\n")).unwrap_err();
            assert!(
                err.to_string().contains("STITCH__HTTP__CORS_ORIGINS"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = load_toml("[redis]\nurl = \"redis://:hunter2@host\"\n").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
