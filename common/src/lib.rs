//! Stitch's shared core: the model, configuration and backend boundaries used by the API
//! (`stitch-api`) and the merge worker (`stitch-worker`).
//!
//! A tour, following one chunk:
//! - [`id::UploadId`] and [`geometry`] turn untrusted headers into an upload id, a chunk
//!   index and the upload's fixed [`geometry::Geometry`] (total size, chunk size, count).
//! - [`storage::FsChunkStore`] streams the chunk's bytes to shared storage under a unique name,
//!   computing [`digest`]s on the way, and makes them durable before anything counts them.
//! - [`state::StateStore`] (Redis: [`state::RedisStateStore`]) records the chunk in one atomic
//!   operation that also detects completion and moves the upload from `receiving` to
//!   `merging` ([`upload::UploadState`]), leaving the merge trigger in the upload's outbox.
//! - The completing chunk's merge job goes through a [`queue::WorkQueue`] to a worker, which
//!   takes the upload's [`lock::MergeLock`] (fenced), merges, commits through the state store
//!   and publishes [`events::Event`]s to an [`queue::EventSink`].
//! - [`recovery::Recovery`] rebuilds an upload's state from storage when the state store
//!   lost it (storage is the truth, the state store the index).
//! - [`backends::Backends`] bundles one implementation of each trait: Redis + RabbitMQ
//!   (`state::RedisStateStore`, `queue::AmqpBroker`, `lock::RedisLock`) for the distributed
//!   mode, or the single-node set in one SQLite database ([`embedded`]).
//! - [`config::Settings`] holds every limit and address; [`server`], [`telemetry`], [`tls`]
//!   and [`shutdown`] are the process plumbing every binary shares.

pub mod auth;
pub mod backends;
pub mod concat;
pub mod config;
pub mod digest;
pub mod direct_io;
pub mod embedded;
pub mod events;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod geometry;
pub mod heap;
pub mod id;
pub mod lock;
pub mod metrics;
pub mod migrate;
pub mod queue;
pub mod quota;
pub mod recovery;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod upload;
pub mod webhooks;

/// Milliseconds since the Unix epoch, the time unit of stored timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
