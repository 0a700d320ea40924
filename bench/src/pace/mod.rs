//! `stitch-bench pace`: whether verification keeps pace with the upload. How soon after an
//! upload's first byte its file is merged and verified (the `upload.completed` event), with
//! `merge.incremental` off ("before": the whole copy and MD5 start after the last chunk) and
//! on ("after": the API assembles and hashes the upload's contiguous in-order prefix while
//! the chunks arrive, and the merge finishes only what the prefix has not covered), against
//! what this machine needs just to take the same bytes (a bare sink) and just to hash them
//! (MD5 on one core).
//!
//! For each size of `--sizes`, the payload is generated (seeded) and (b) its MD5 is timed in
//! memory on one core. Then, `--repeats` times, for each client count of `--clients` and each
//! order (in order; shuffled: a seeded shuffle of the chunk indexes, the same every run):
//! 1. (a) the bare sink ([`crate::sink`]): the same chunk requests, bodies and headers, from
//!    the same client with the same connections in the same order, to a server in this
//!    process that only streams each body to a file of its own (Stitch's chunk file
//!    writer: `O_DIRECT` where the file system allows it) and fsyncs it before
//!    answering; timed from the first byte to the last answer;
//! 2. the upload through a fresh `stitch-api` and `stitch-worker` (own namespace and storage
//!    directory, removed afterwards) in each mode, the mode that goes first alternating from
//!    one repeat to the next: an event tap is bound to `<ns>.events` before the first chunk,
//!    the chunks are sent with `X-File-MD5` (so the worker verifies the file), and from the
//!    first byte the benchmark notes the last answer, the answer that completed the upload,
//!    and the `upload.completed` event, with the CPU the API and the worker used meanwhile.
//!
//! Every upload is checked before its numbers count: every answer (the chunk, its CRC32C,
//! `upload_complete` exactly once), the event (completed, the payload's size and MD5), the
//! status, and the merged file on storage, read back and hashed; for the bare sink, every
//! answer's CRC32C and one file per chunk of the chunk's length.

mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use stitch_common::metrics as metric;
use stitch_testkit::events::EventTap;
use stitch_testkit::prometheus::Scrape;
use stitch_testkit::{Services, Source, TestEnv};

use crate::baseline::{self, Throughput};
use crate::deployment::{BUILD_ALL, Deployment, Role, check_binaries, wait_for_broker};
use crate::machine::Machine;
use crate::options::{RunArgs, parse_size};
use crate::sink::BareSink;
use crate::upload::{Payload, UploadJob, http_client, send_upload};
use crate::usage::{CpuSnapshot, CpuUsage, DISTURBED_CORES, Watched, wait_for_idle};
use crate::verify::{
    get_status, status_client, verify_completed, verify_completed_event, verify_merged_file,
};
use crate::workdir::WorkDir;

pub use self::report::{PACE_TARGET, SHUFFLED_ALLOWANCE, pace_ratio, shuffled_no_slower};

/// What `stitch-bench pace --help` says about it.
pub const LONG_ABOUT: &str = "Whether verification keeps pace with the upload: first byte → verified file, with merge.incremental off (before) and on (after), against a bare sink and MD5.\n\n\
        For each of --sizes, --repeats times, for each of --clients and each order (in order, \
        and a seeded shuffle of the chunk indexes): the upload's chunk requests to a bare sink \
        in this process (each body streamed to a file of its own as Stitch writes a chunk, O_DIRECT where the file system allows it, and fsynced; nothing else), \
        then through a fresh stitch-api and stitch-worker with STITCH__MERGE__INCREMENTAL=false \
        and =true on both. Times the first byte to the upload.completed event, and the merge \
        tail from the completing chunk's answer to the event, with the API's and the worker's \
        CPU per GiB; the MD5 of the payload in memory on one core is timed once per size, and \
        one unmeasured upload to the bare sink precedes the first measurement of each size. \
        Targets: in order, after: first byte → event ≤ 1.2 × max(bare sink, MD5); shuffled: \
        after ≤ 1.05 × before. Every upload is verified (answers, event, status, the merged \
        file's bytes).";

/// Seed of the payload: fixed, so that every run sends the same bytes.
const SEED: u64 = 0x5717_c4e5_b3a1_0005;
/// Seed of the shuffled order: fixed, so that every run sends the chunks in the same order.
pub const SHUFFLE_SEED: u64 = 0x5eed_5717_c4e5_0005;
/// Block of the MD5 baseline's updates (the merge's default read block).
const MD5_BLOCK: usize = 64 << 10;
/// How long to wait for RabbitMQ to accept connections before an upload.
const BROKER_WAIT: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug, Clone)]
pub struct PaceArgs {
    /// Upload sizes, each measured in every order, client count and mode.
    #[arg(long, value_delimiter = ',', default_value = "1GiB,10GiB", value_parser = parse_size)]
    pub sizes: Vec<u64>,
    /// Chunk size of the uploads.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Parallel clients (one HTTP/1.1 connection each) of the uploads.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub clients: Vec<usize>,
    /// Measurements of each size, order, client count and mode (and of the bare sink), each
    /// with a fresh deployment.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Only these orders (`in-order`, `shuffled`): for a quick look; a report of a subset
    /// cannot judge the targets, so it is refused with `--write-docs`.
    #[arg(long, value_delimiter = ',', value_parser = parse_order)]
    pub orders: Option<Vec<Order>>,
    /// Only these modes (`before`, `after`), as `--orders`.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    pub modes: Option<Vec<Mode>>,
    /// Skip the bare sink (its baseline is then missing from the report), as `--orders`.
    #[arg(long)]
    pub no_sink: bool,
    /// A setting for both the API and the worker of every upload, as a `STITCH__…`
    /// variable (`--set STITCH__MERGE__HASH_IN_LINE=false`; repeatable): to compare
    /// configurations. The processes inherit no `STITCH…` variable from the shell.
    #[arg(long = "set", value_parser = parse_setting)]
    pub settings: Vec<(String, String)>,
    /// The `stitch-api` binary.
    #[arg(long, default_value = "target/release/stitch-api")]
    pub api_bin: PathBuf,
    /// The `stitch-worker` binary.
    #[arg(long, default_value = "target/release/stitch-worker")]
    pub worker_bin: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The order the chunks are sent in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Index order: the prefix grows with every chunk (up to N in flight at once).
    InOrder,
    /// A seeded shuffle of the indexes ([`SHUFFLE_SEED`]): the prefix grows only as gaps fill.
    Shuffled,
}

impl Order {
    pub const ALL: [Order; 2] = [Order::InOrder, Order::Shuffled];

    /// What the report calls it.
    pub fn name(self) -> &'static str {
        match self {
            Self::InOrder => "in order",
            Self::Shuffled => "shuffled",
        }
    }

    /// The indexes of `chunks` chunks in this order.
    pub fn indexes(self, chunks: usize) -> Vec<usize> {
        match self {
            Self::InOrder => (0..chunks).collect(),
            Self::Shuffled => shuffled(chunks, SHUFFLE_SEED),
        }
    }
}

fn parse_order(raw: &str) -> Result<Order, String> {
    match raw {
        "in-order" => Ok(Order::InOrder),
        "shuffled" => Ok(Order::Shuffled),
        _ => Err("an order is in-order or shuffled".into()),
    }
}

fn parse_setting(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((key, value)) if key.starts_with("STITCH__") => Ok((key.into(), value.into())),
        _ => Err("a setting is STITCH__SECTION__KEY=value".into()),
    }
}

fn parse_mode(raw: &str) -> Result<Mode, String> {
    match raw {
        "before" => Ok(Mode::Before),
        "after" => Ok(Mode::After),
        _ => Err("a mode is before or after".into()),
    }
}

/// `0..count` shuffled (Fisher–Yates) by a generator of this crate's own (SplitMix64) seeded
/// with `seed`: the same order for the same seed on every machine and with every version of
/// the `rand` crate, so that runs compare.
pub fn shuffled(count: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..count).collect();
    for i in (1..count).rev() {
        // A number in 0..=i, by the high half of a 64 × 64-bit product (bias below 2^-40 for
        // any upload's chunk count).
        let j = ((u128::from(next()) * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

/// Whether the API assembles the file while its chunks arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `STITCH__MERGE__INCREMENTAL=false` on the API and the worker: the whole copy and MD5
    /// run after the last chunk.
    Before,
    /// `STITCH__MERGE__INCREMENTAL=true` on both (the default).
    After,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Before, Mode::After];

    pub fn incremental(self) -> bool {
        self == Self::After
    }

    /// What the report calls it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Before => "before",
            Self::After => "after",
        }
    }

    /// The modes of repeat `repeat` (from 0), in the order run: before first in even repeats,
    /// after first in odd ones, so that neither always finds the machine as the other left it.
    pub fn in_repeat(repeat: usize) -> [Mode; 2] {
        if repeat.is_multiple_of(2) {
            [Self::Before, Self::After]
        } else {
            [Self::After, Self::Before]
        }
    }
}

/// What one measurement uploads, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub size: u64,
    pub order: Order,
    pub clients: usize,
}

/// Everything one run measured.
#[derive(Debug)]
pub struct PaceResults {
    pub args: PaceArgs,
    pub machine: Machine,
    /// (b) per size: MD5 of the payload in memory, one core.
    pub md5: Vec<Throughput>,
    /// Per size: the same with the `md-5` crate (what (b) was before Stitch had its own MD5).
    pub md5_crate: Vec<Throughput>,
    /// (a) the bare sink, per case and repeat, in the order run.
    pub sinks: Vec<SinkRun>,
    /// The uploads through Stitch, in the order run.
    pub runs: Vec<PaceRun>,
    /// Times the machine was still busy when `--wait-idle` ran out.
    pub busy_waits: usize,
}

impl PaceResults {
    /// (b) of `size`.
    pub fn md5_of(&self, size: u64) -> Option<Duration> {
        self.md5.iter().find(|t| t.bytes == size).map(|t| t.elapsed)
    }

    /// (a) of `case` in repeat `repeat`.
    pub fn sink_of(&self, case: Case, repeat: usize) -> Option<Duration> {
        self.sinks
            .iter()
            .find(|s| s.case == case && s.repeat == repeat)
            .map(|s| s.elapsed)
    }

    /// The uploads of `case` in `mode`.
    pub fn runs_of(&self, case: Case, mode: Mode) -> impl Iterator<Item = &PaceRun> {
        self.runs
            .iter()
            .filter(move |r| r.case == case && r.mode == mode)
    }

    /// The target's ratio of one upload: first byte → event ÷ max((a), (b)) of its case,
    /// size and repeat; `None` when a baseline is missing.
    pub fn ratio(&self, run: &PaceRun) -> Option<f64> {
        let sink = self.sink_of(run.case, run.repeat)?;
        let md5 = self.md5_of(run.case.size)?;
        Some(pace_ratio(run.to_event, sink, md5))
    }

    /// Every case measured, in the order first measured.
    pub fn cases(&self) -> Vec<Case> {
        let mut cases: Vec<Case> = Vec::new();
        for run in &self.runs {
            if !cases.contains(&run.case) {
                cases.push(run.case);
            }
        }
        cases
    }
}

/// One upload to the bare sink.
#[derive(Clone, Debug)]
pub struct SinkRun {
    pub case: Case,
    /// From 0.
    pub repeat: usize,
    /// First byte → last answer.
    pub elapsed: Duration,
    /// CPU over the upload (this process holds client and sink).
    pub usage: CpuUsage,
    /// Earlier runs discarded as disturbed.
    pub discarded: usize,
}

/// One upload through a fresh `stitch-api` and `stitch-worker`.
#[derive(Clone, Debug)]
pub struct PaceRun {
    pub case: Case,
    pub mode: Mode,
    /// From 0.
    pub repeat: usize,
    /// First byte → last answer.
    pub upload: Duration,
    /// First byte → `upload.completed`.
    pub to_event: Duration,
    /// The completing chunk's answer → `upload.completed`.
    pub tail: Duration,
    /// Bytes the API appended to the upload's assembly file and hashed while the chunks
    /// arrived (its `stitch_assembly_bytes_total`), and its assembly steps that failed (whose
    /// part the merge then does).
    pub assembled_bytes: u64,
    pub assembly_errors: u64,
    /// Bytes of the file the merge took from the prefix the API had assembled and hashed
    /// (the worker's `stitch_merge_prefix_bytes_total`; 0 before, by construction).
    pub prefix_bytes: u64,
    /// CPU from just before the first byte until the event.
    pub usage: CpuUsage,
    /// The processes that did not exit cleanly on SIGTERM, with their exit status.
    pub unclean_exits: Vec<String>,
    /// Earlier runs discarded as disturbed.
    pub discarded: usize,
}

impl PaceRun {
    /// CPU seconds of the processes labelled `label` per GiB uploaded.
    pub fn cpu_per_gib(&self, label: &str) -> f64 {
        self.usage.cpu(label).total().as_secs_f64() / (self.case.size as f64 / (1u64 << 30) as f64)
    }
}

/// A measurement that other work may have disturbed, and that may then be repeated.
trait Disturbable {
    fn usage(&self) -> &CpuUsage;
    fn discarded(&mut self) -> &mut usize;
}

impl Disturbable for SinkRun {
    fn usage(&self) -> &CpuUsage {
        &self.usage
    }
    fn discarded(&mut self) -> &mut usize {
        &mut self.discarded
    }
}

impl Disturbable for PaceRun {
    fn usage(&self) -> &CpuUsage {
        &self.usage
    }
    fn discarded(&mut self) -> &mut usize {
        &mut self.discarded
    }
}

/// Runs the benchmark, prints the report, and writes it into the docs when asked.
pub fn run(args: &PaceArgs) -> anyhow::Result<()> {
    check_args(args)?;
    args.run.redis()?;
    let results = WorkDir::within(&args.run.dir, |work| measure(args, work))?;
    report::report(&results).publish(&args.run)
}

fn check_args(args: &PaceArgs) -> anyhow::Result<()> {
    check_binaries(
        &[
            (&args.api_bin, "--api-bin"),
            (&args.worker_bin, "--worker-bin"),
        ],
        BUILD_ALL,
    )?;
    ensure!(!args.sizes.is_empty(), "--sizes needs at least one size");
    ensure!(
        !args.clients.is_empty() && !args.clients.contains(&0),
        "--clients needs client counts of at least 1"
    );
    ensure!(args.repeats >= 1, "--repeats must be at least 1");
    ensure!(
        !(args.run.write_docs
            && (args.orders.is_some()
                || args.modes.is_some()
                || args.no_sink
                || !args.settings.is_empty())),
        "--orders, --modes, --no-sink and --set measure a subset or another configuration, which cannot be written to the docs"
    );
    for &size in &args.sizes {
        ensure!(
            usize::try_from(size).is_ok(),
            "{} does not fit in memory on this platform",
            crate::report::size(size)
        );
        ensure!(
            size.div_ceil(args.chunk_size) >= 2,
            "an upload of {} needs at least two chunks of --chunk-size",
            crate::report::size(size)
        );
    }
    Ok(())
}

fn progress(message: impl AsRef<str>) {
    eprintln!("stitch-bench pace: {}", message.as_ref());
}

fn measure(args: &PaceArgs, work: &WorkDir) -> anyhow::Result<PaceResults> {
    let machine = Machine::describe(work.path())?;
    if machine.work_fs.is_memory() {
        progress(format!(
            "warning: {} is on {}: the fsyncs will not reach a disk",
            work.path().display(),
            machine.work_fs.fs_type
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let services = args.run.services();
    let mut bench = Bench {
        args,
        work,
        services: &services,
        runtime: &runtime,
        busy_waits: 0,
    };
    let mut md5 = Vec::new();
    let mut md5_crate = Vec::new();
    let mut sinks = Vec::new();
    let mut runs = Vec::new();
    for &size in &args.sizes {
        // One payload in memory at a time: the previous size's is dropped by now.
        let (payload, md5_hex, hashed, crate_hashed) = bench.payload(size)?;
        md5.push(hashed);
        md5_crate.push(crate_hashed);
        if !args.no_sink {
            // The first upload of a size writes into memory the machine has not used lately
            // (on a VM whose host takes freed memory back, a fault on the host per page):
            // measured, it made the first bare sink of a size up to 2.5 × slower than the
            // same sink later, and the target was judged against that. One unmeasured
            // upload to the sink first, so that every measurement finds memory as the
            // one before it left it.
            let warm_up = Upload {
                case: Case {
                    size,
                    order: Order::InOrder,
                    clients: args.clients[0],
                },
                repeat: 0,
                payload: &payload,
                order: Order::InOrder.indexes(payload.chunks()).into(),
                md5_hex: &md5_hex,
            };
            progress("warm-up, not measured:");
            bench.sink(&warm_up)?;
        }
        for repeat in 0..args.repeats {
            for &clients in &args.clients {
                for order in Order::ALL {
                    if args.orders.as_ref().is_some_and(|o| !o.contains(&order)) {
                        continue;
                    }
                    let case = Case {
                        size,
                        order,
                        clients,
                    };
                    let upload = Upload {
                        case,
                        repeat,
                        payload: &payload,
                        order: order.indexes(payload.chunks()).into(),
                        md5_hex: &md5_hex,
                    };
                    if !args.no_sink {
                        sinks.push(bench.undisturbed(|b| b.sink(&upload))?);
                    }
                    for mode in Mode::in_repeat(repeat) {
                        if args.modes.as_ref().is_some_and(|m| !m.contains(&mode)) {
                            continue;
                        }
                        runs.push(bench.undisturbed(|b| b.upload(&upload, mode))?);
                    }
                }
            }
        }
    }
    Ok(PaceResults {
        args: args.clone(),
        machine,
        md5,
        md5_crate,
        sinks,
        runs,
        busy_waits: bench.busy_waits,
    })
}

/// What one measurement sends.
struct Upload<'a> {
    case: Case,
    repeat: usize,
    payload: &'a Payload,
    /// The chunk indexes in the order sent.
    order: Arc<[usize]>,
    /// MD5 of the payload, hex.
    md5_hex: &'a str,
}

impl Upload<'_> {
    fn describe(&self) -> String {
        format!(
            "{}, {}, {} client(s), repeat {}",
            crate::report::size(self.case.size),
            self.case.order.name(),
            self.case.clients,
            self.repeat + 1
        )
    }

    /// The job that sends it to `addr`, with `X-File-MD5` on every chunk.
    fn job(&self, addr: std::net::SocketAddr, upload_id: String, completes: bool) -> UploadJob {
        UploadJob {
            order: self.order.clone(),
            completes,
            file_md5: Some(self.md5_hex.to_owned()),
            ..UploadJob::all(addr, upload_id, self.payload.clone(), self.case.clients)
        }
    }
}

/// What every measurement needs.
struct Bench<'a> {
    args: &'a PaceArgs,
    work: &'a WorkDir,
    services: &'a Services,
    runtime: &'a tokio::runtime::Runtime,
    busy_waits: usize,
}

impl Bench<'_> {
    fn wait_idle(&mut self) -> anyhow::Result<()> {
        if !wait_for_idle(self.args.run.wait_idle)? {
            progress(format!(
                "warning: the machine is still busy after {} s",
                self.args.run.wait_idle
            ));
            self.busy_waits += 1;
        }
        Ok(())
    }

    /// The payload of `size` with its chunk digests, its MD5 (hex), (b): its MD5 timed on one
    /// core, and the same with the `md-5` crate.
    fn payload(&mut self, size: u64) -> anyhow::Result<(Payload, String, Throughput, Throughput)> {
        progress(format!(
            "generating {} of pseudo-random bytes",
            crate::report::size(size)
        ));
        let len = usize::try_from(size).context("the size does not fit in memory")?;
        let source = Source::random(len, self.args.chunk_size, SEED).shared();
        progress("computing chunk digests (outside the timed runs)");
        let payload = Payload::new(source);
        self.wait_idle()?;
        progress("(b) MD5 in memory on one core");
        let (hashed, digest) = baseline::md5_one_core(&payload.source.bytes, MD5_BLOCK);
        progress(format!(
            "    {:.2} s, {:.0} MB/s",
            hashed.elapsed.as_secs_f64(),
            hashed.mb_per_s()
        ));
        let (crate_hashed, crate_digest) =
            baseline::md5_crate_one_core(&payload.source.bytes, MD5_BLOCK);
        progress(format!(
            "    the md-5 crate: {:.2} s, {:.0} MB/s",
            crate_hashed.elapsed.as_secs_f64(),
            crate_hashed.mb_per_s()
        ));
        ensure!(
            crate_digest == digest,
            "Stitch's MD5 and the md-5 crate's differ on the payload"
        );
        Ok((payload, hex::encode(digest), hashed, crate_hashed))
    }

    /// `measure`, repeated (up to `--retries` times) while other work disturbed it.
    fn undisturbed<T: Disturbable>(
        &mut self,
        mut measure: impl FnMut(&mut Self) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut run = measure(self)?;
        let mut discarded = 0;
        while run.usage().other_cores() >= DISTURBED_CORES && discarded < self.args.run.retries {
            progress(format!(
                "    disturbed ({:.2} cores of other work): repeating",
                run.usage().other_cores()
            ));
            discarded += 1;
            run = measure(self)?;
        }
        *run.discarded() = discarded;
        Ok(run)
    }

    /// The processes whose CPU is read, besides Stitch's.
    fn watched(&self) -> Vec<Watched> {
        let mut watched = vec![Watched::this_process()];
        watched.extend(Watched::services());
        watched
    }

    /// (a): the upload's requests to a bare sink, and its files checked.
    fn sink(&mut self, upload: &Upload<'_>) -> anyhow::Result<SinkRun> {
        progress(format!("(a) bare sink: {}", upload.describe()));
        self.wait_idle()?;
        let dir = self
            .work
            .join(&format!("sink-{:016x}", rand::random::<u64>()));
        let sink = BareSink::start(&dir)?;
        let upload_id = format!("bench-{:016x}", rand::random::<u64>());
        let job = upload.job(sink.addr, upload_id.clone(), false);
        let watched = self.watched();
        let measured = CpuSnapshot::take(&watched).and_then(|before| {
            let outcome = self.runtime.block_on(send_upload(&job))?;
            let usage = CpuSnapshot::take(&watched)?.since(&before);
            Ok((outcome, usage))
        });
        let checked = measured.and_then(|measured| {
            let expected: Vec<(u64, u64)> = (0..upload.payload.chunks() as u64)
                .map(|i| (i, upload.payload.source.chunk(i).1.len() as u64))
                .collect();
            let stored = sink.stored(&upload_id)?;
            ensure!(
                stored == expected,
                "the bare sink stored {} files, not one per chunk of its length",
                stored.len()
            );
            Ok(measured)
        });
        let stopped = sink.stop();
        let (outcome, usage) = checked?;
        stopped?;
        progress(format!(
            "    {:.2} s, {:.0} MB/s",
            outcome.elapsed.as_secs_f64(),
            Throughput {
                bytes: outcome.bytes,
                elapsed: outcome.elapsed
            }
            .mb_per_s()
        ));
        Ok(SinkRun {
            case: upload.case,
            repeat: upload.repeat,
            elapsed: outcome.elapsed,
            usage,
            discarded: 0,
        })
    }

    /// A fresh namespace with an API and a worker on it, both in `mode`.
    fn start(&self, mode: Mode) -> anyhow::Result<Deployment> {
        let env = TestEnv::deployed("bench", self.work.path(), Some(self.services))
            .context("creating a storage directory")?;
        let mut deployment = Deployment::new(env);
        let mut settings = vec![
            // Keys a crashed run leaves behind expire soon.
            ("STITCH__UPLOADS__TTL", "1h".to_owned()),
            (
                "STITCH__LIMITS__MAX_CHUNK_BYTES",
                self.args.chunk_size.max(128 << 20).to_string(),
            ),
            // Both sides: the API assembles the prefix, the worker carries on from it.
            ("STITCH__MERGE__INCREMENTAL", mode.incremental().to_string()),
        ];
        settings.extend(
            self.args
                .settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone())),
        );
        deployment.start(Role::Api, &self.args.api_bin, &settings, &[])?;
        deployment.start(Role::Worker, &self.args.worker_bin, &settings, &[])?;
        Ok(deployment)
    }

    /// One upload through Stitch in `mode`, start to finish, then clean-up (also when
    /// something failed): the processes stopped, the namespace and storage removed.
    fn upload(&mut self, upload: &Upload<'_>, mode: Mode) -> anyhow::Result<PaceRun> {
        progress(format!("{}: {}", mode.name(), upload.describe()));
        self.runtime
            .block_on(wait_for_broker(&self.args.run.amqp_url, BROKER_WAIT))?;
        self.wait_idle()?;
        let deployment = self.start(mode)?;
        let measured = self
            .measure_upload(&deployment, upload, mode)
            .with_context(|| deployment.log_tails());
        let exits = deployment.stop();
        // No dirty page of this upload may be written back during the next measurement.
        let synced = std::fs::File::open(self.work.path())
            .map_err(anyhow::Error::from)
            .and_then(|dir| rustix::fs::syncfs(&dir).map_err(anyhow::Error::from))
            .context("syncing the work directory's file system");
        let mut run = measured?;
        run.unclean_exits = exits?
            .into_iter()
            .filter(|(_, exit)| !exit.success())
            .map(|(role, exit)| format!("{} ({exit})", role.label()))
            .collect();
        synced?;
        progress(format!(
            "    upload {:.2} s, first byte → event {:.2} s, tail {:.3} s; API {:.2}, worker {:.2} CPU s/GiB",
            run.upload.as_secs_f64(),
            run.to_event.as_secs_f64(),
            run.tail.as_secs_f64(),
            run.cpu_per_gib(Role::Api.label()),
            run.cpu_per_gib(Role::Worker.label())
        ));
        Ok(run)
    }

    fn measure_upload(
        &mut self,
        deployment: &Deployment,
        upload: &Upload<'_>,
        mode: Mode,
    ) -> anyhow::Result<PaceRun> {
        let api = deployment.process(Role::Api)?;
        let worker = deployment.process(Role::Worker)?;
        let env = &deployment.env;
        let upload_id = format!("bench-{:016x}", rand::random::<u64>());
        let job = upload.job(api.addr, upload_id.clone(), true);
        let mut watched = vec![
            Watched {
                label: Role::Api.label(),
                pid: api.pid(),
            },
            Watched {
                label: Role::Worker.label(),
                pid: worker.pid(),
            },
        ];
        watched.extend(self.watched());
        let source = &upload.payload.source;
        // Merges run at hundreds of MB/s; one at 10 MB/s has stalled.
        let limit = Duration::from_secs(120 + source.len() / 10_000_000);
        let (outcome, arrival, usage) = self.runtime.block_on(async {
            let tap = EventTap::connect(env).await?;
            let before = CpuSnapshot::take(&watched)?;
            let outcome = send_upload(&job).await?;
            let arrival = tap
                .arrival(&upload_id, &["upload.completed", "upload.failed"], limit)
                .await?;
            let usage = CpuSnapshot::take(&watched)?.since(&before);
            tap.close().await;
            anyhow::Ok((outcome, arrival, usage))
        })?;
        let completing = outcome
            .completing
            .context("no answer said upload_complete")?;

        verify_completed_event(&arrival, &upload_id, source.len(), upload.md5_hex)?;
        let status = self
            .runtime
            .block_on(async { get_status(&status_client(api.addr)?, &upload_id).await })?;
        verify_completed(&status, source, upload.md5_hex)?;
        verify_merged_file(&env.storage_root, &upload_id, source.len(), upload.md5_hex)?;
        let (api_metrics, worker_metrics) = self.runtime.block_on(async {
            anyhow::Ok((scrape(api.addr).await?, scrape(worker.addr).await?))
        })?;
        let assembled_bytes = api_metrics.value(metric::ASSEMBLY_BYTES, &[]) as u64;
        let assembly_errors =
            api_metrics.value(metric::ASSEMBLY_STEPS, &[("result", "error")]) as u64;
        let prefix_bytes = worker_metrics.value(metric::MERGE_PREFIX_BYTES, &[]) as u64;
        ensure!(
            mode.incremental() || (prefix_bytes == 0 && assembled_bytes == 0),
            "with merge.incremental off, the API assembled {assembled_bytes} bytes and the merge took {prefix_bytes} bytes from a prefix"
        );

        Ok(PaceRun {
            case: upload.case,
            mode,
            repeat: upload.repeat,
            upload: outcome.elapsed,
            to_event: arrival.at.saturating_duration_since(outcome.started),
            tail: arrival.at.saturating_duration_since(completing.instant),
            assembled_bytes,
            assembly_errors,
            prefix_bytes,
            usage,
            unclean_exits: Vec::new(),
            discarded: 0,
        })
    }
}

/// The `/metrics` page of the Stitch process at `addr` (the API's address, or the worker's
/// probes).
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<Scrape> {
    let url = format!("http://{addr}/metrics");
    let response = http_client()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    ensure!(
        response.status() == reqwest::StatusCode::OK,
        "GET {url}: HTTP {}",
        response.status()
    );
    let text = response
        .text()
        .await
        .with_context(|| format!("reading GET {url}"))?;
    Ok(Scrape::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shuffle_is_a_permutation_and_the_same_for_the_same_seed() {
        let a = shuffled(1280, SHUFFLE_SEED);
        assert_eq!(a, shuffled(1280, SHUFFLE_SEED));
        assert_ne!(a, shuffled(1280, SHUFFLE_SEED + 1));
        assert_ne!(a, Order::InOrder.indexes(1280));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1280).collect::<Vec<_>>());
        assert!(shuffled(0, 1).is_empty());
        assert_eq!(shuffled(1, 1), [0]);
    }

    #[test]
    fn the_shuffle_never_changes_between_runs() {
        // Runs compare only if they send the chunks in the same order: a change of this
        // generator changes the benchmark.
        assert_eq!(shuffled(10, SHUFFLE_SEED), SHUFFLED_10);
        assert_eq!(Order::Shuffled.indexes(10), SHUFFLED_10);
    }

    /// `shuffled(10, SHUFFLE_SEED)`, as computed by an independent SplitMix64 and
    /// Fisher–Yates (whose first output from seed 0 is SplitMix64's published
    /// 0xe220a8397b1dcdaf).
    const SHUFFLED_10: [usize; 10] = [1, 2, 9, 6, 4, 0, 5, 7, 8, 3];

    #[test]
    fn the_mode_that_goes_first_alternates() {
        assert_eq!(Mode::in_repeat(0), [Mode::Before, Mode::After]);
        assert_eq!(Mode::in_repeat(1), [Mode::After, Mode::Before]);
        assert_eq!(Mode::in_repeat(2), Mode::in_repeat(0));
        assert!(Mode::After.incremental() && !Mode::Before.incremental());
    }
}
