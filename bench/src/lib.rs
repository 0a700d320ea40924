//! Stitch's benchmarks: the real release binaries, driven over loopback, measured against
//! what the machine itself can do.
//!
//! A benchmark here is a subcommand of `stitch-bench` (see [`cli`]): [`ingest`], [`merge`],
//! [`single_node`], [`tus`] and [`pace`]. Each one is built from the same parts, so that the
//! next one only adds its own scenario; what the tests also need comes from the test kit
//! (`stitch-testkit`):
//!
//! - the bytes to send: the test kit's seeded `Source`, generated once, in one shared buffer
//!   that chunks are sliced from without copying;
//! - [`options`]: the command-line options every subcommand shares;
//! - [`baseline`]: the machine's limits (sequential disk write, MD5 on one core in memory and
//!   over files on storage), and [`sink`], the bare sink: an HTTP server in this process that
//!   only stores each chunk's body in a file of its own, fsynced;
//! - [`deployment`]: a `stitch-api`, `stitch-worker` or `stitch serve` process (the test kit's
//!   `ServiceProcess`) on a namespace and storage directory of its own (the test kit's
//!   `TestEnv`, configured as deployed, on the given Redis and RabbitMQ), its address (and any
//!   log line asked for) read from its JSON log, stopped with SIGTERM, and the namespace
//!   removed afterwards;
//! - [`upload`]: the chunk-protocol client (the test kit's `ApiClient` requests) that sends
//!   an upload (or part of one, in any order) with N parallel connections and checks every
//!   answer (the tus benchmark has a tus client of its own, on the test kit's `Tus`
//!   requests), and
//!   [`verify`], which checks status, storage (chunks or tus segments) and the merged file
//!   after it; the test kit's `EventTap` times and checks `upload.completed`;
//! - [`procfs`]: CPU time of a process, kernel threads' CPU, and the machine's CPU split, from
//!   `/proc` (peak RSS is the test kit's); [`usage`]: who used the cores during a measurement,
//!   and whether other work disturbed it;
//! - [`machine`]: what the report says about the machine;
//! - [`workdir`]: a fresh scratch directory on the disk under test;
//! - [`report`]: the skeleton every report has, Markdown tables, and the section of
//!   `docs/benchmarks.md` a benchmark owns.
//!
//! A benchmark that does not check its results measures nothing: every scenario verifies
//! what the server answered and what it stored before its numbers are reported.

pub mod baseline;
pub mod cli;
pub mod deployment;
pub mod ingest;
pub mod machine;
pub mod merge;
pub mod options;
pub mod pace;
pub mod procfs;
pub mod report;
pub mod single_node;
pub mod sink;
pub mod tus;
pub mod upload;
pub mod usage;
pub mod verify;
pub mod workdir;

/// Bytes per megabyte in every rate this crate reports (decimal, as disk vendors and `dd`
/// count: 1 MB/s = 10^6 bytes per second).
pub const MB: f64 = 1_000_000.0;

/// Bytes per mebibyte, for sizes (chunk sizes, RSS).
pub const MIB: u64 = 1 << 20;
