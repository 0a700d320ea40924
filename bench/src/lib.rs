//! Stitch's benchmarks: the real release binaries, driven over loopback, measured against
//! what the machine itself can do.
//!
//! A benchmark here is a subcommand of `stitch-bench` (see [`cli`]); today there is
//! [`ingest`], with merge and single-node benchmarks to come. Each one is built from the same
//! parts, so that the next one only adds its own scenario:
//!
//! - [`source`]: the bytes to send, pseudo-random, generated once, sliced without copying;
//! - [`baseline`]: the machine's limits (sequential disk write, MD5 on one core);
//! - [`api_process`]: a `stitch-api` process with its own storage directory and Redis
//!   namespace, its address read from its log, stopped with SIGTERM;
//! - [`namespace`]: Redis housekeeping (deleting a namespace's keys, Redis's CPU time);
//! - [`upload`]: the chunk-protocol client that sends an upload with N parallel connections
//!   and checks every answer, and [`verify`], which checks status and storage after it;
//! - [`procfs`]: peak RSS and CPU time of a process, and the machine's CPU split, from `/proc`;
//! - [`machine`]: what the report says about the machine;
//! - [`workdir`]: a fresh scratch directory on the disk under test;
//! - [`report`]: Markdown tables and the section of `docs/benchmarks.md` a benchmark owns.
//!
//! A benchmark that does not check its results measures nothing: every scenario verifies
//! what the server answered and what it stored before its numbers are reported.

pub mod api_process;
pub mod baseline;
pub mod cli;
pub mod ingest;
pub mod machine;
pub mod namespace;
pub mod procfs;
pub mod report;
pub mod source;
pub mod upload;
pub mod verify;
pub mod workdir;

/// Bytes per megabyte in every rate this crate reports (decimal, as disk vendors and `dd`
/// count: 1 MB/s = 10^6 bytes per second).
pub const MB: f64 = 1_000_000.0;

/// Bytes per mebibyte, for sizes (chunk sizes, RSS).
pub const MIB: u64 = 1 << 20;
