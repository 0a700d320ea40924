//! `stitch-bench merge`: how close `stitch-worker`'s merge (copy + MD5 + fsync + commit)
//! comes to the MD5 of the same chunk files alone, and how soon after the completing chunk's
//! response the `upload.completed` event arrives.
//!
//! One run measures:
//! 1. for context, (b) MD5 of the payload in memory on one core; (c) writing it into the
//!    page cache (no fsync), into memory idle for a while ("cold") and into memory just freed
//!    ("warm"), which on a VM with free page reporting differ tenfold; and (a) the disk alone
//!    (direct I/O, one fsync), before the first merge and after each;
//! 2. for each merge (`--repeats` as configured by default, `--nofsync-repeats` with
//!    `STITCH__STORAGE__FSYNC=false` on the worker, `--warm-repeats` with the merge's output
//!    memory warmed first; interleaved), a fresh `stitch-api`, `stitch-worker`, namespace,
//!    storage directory and upload:
//!    - every chunk but the last is uploaded (the worker runs, and waits);
//!    - (i) the limit: MD5 of those chunk files, read from storage in index order, then of the
//!      last chunk's bytes from memory, on one core, writing nothing;
//!    - an event tap is bound to `<ns>.events`, the last chunk is sent, and the merge runs;
//!    - (ii) the merge's own duration from the upload's Redis hash (`merge_started_at`, taken
//!      with the fencing token, to `completed_at`, at commit), and from outside;
//!    - (iii) from the completing chunk's response to the `upload.completed` event.
//!
//! Why hash the files before the last chunk is sent, rather than uploading everything with
//! no worker and starting it afterwards: the merge then runs exactly as in production (job
//! published by the completing chunk, worker already consuming), the event delay (iii) is
//! measured on the same merge, and both passes read the same chunk files from the page cache
//! (the chunks were just written, and are read through once more before the MD5-only pass in
//! case the wait for an idle machine let some be evicted; `fincore` checks before each pass
//! that they are resident).
//! The last chunk (1/64 of the bytes) is hashed from memory, because its file does not exist
//! yet; the merge reads it from the page cache, where the API has just written it.
//!
//! Every merge is checked: the MD5-only pass's digest is the payload's (so the chunk files
//! hold the bytes sent), the event and the final status say `completed` with the payload's
//! size and MD5, and the merged file on storage is read back and hashed.

mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, ensure};
use stitch_common::id::UploadId;
use stitch_common::state::keys;
use stitch_testkit::events::EventTap;
use stitch_testkit::{Services, Source, TestEnv};

use crate::baseline::{self, Throughput};
use crate::deployment::{BUILD_ALL, Deployment, Role, check_binaries, wait_for_broker};
use crate::machine::Machine;
use crate::options::{RunArgs, parse_size};
use crate::procfs::CpuTime;
use crate::upload::{Moment, Payload, UploadJob, send_upload};
use crate::usage::{CpuSnapshot, CpuUsage, DISTURBED_CORES, Watched, wait_for_idle};
use crate::verify::{
    get_status, status_client, stored_chunk_files, verify_completed, verify_completed_event,
    verify_merged_file,
};
use crate::workdir::WorkDir;

/// What `stitch-bench merge --help` says about it.
pub const LONG_ABOUT: &str = "The merge of one upload by stitch-worker, against the MD5 of its chunk files alone.\n\n\
        For each merge a fresh stitch-api and stitch-worker (own namespace and storage) take an \
        upload of --size in --chunk-size chunks. With every chunk but the last uploaded, the \
        benchmark hashes those chunk files on one core (the limit); then it sends the last chunk \
        and times the worker's merge (copy + MD5 + fsync + commit) from the upload's Redis \
        stamps and from outside, and the delay from that chunk's response to the \
        upload.completed event. Targets (judged on the default configuration): merge ≥ 0.85 × \
        the MD5-only rate (median), event ≤ merge + 100 ms (every merge). Secondary merges \
        without fsync and with the output's memory warmed show what the fsync and fresh memory \
        cost. Baselines: MD5 in memory, page-cache writes into cold and warm memory, the disk \
        alone (direct I/O). Every merge is verified (status, event, MD5, bytes on storage).";

/// Seed of the payload: fixed, so that every run sends the same bytes.
const SEED: u64 = 0x5717_c4e5_b3a1_0002;
/// Rest before the cold page-cache write, long enough for free memory to be reported to the
/// host (the kernel reports free pages about two seconds after they are freed).
const PAGE_CACHE_REST: Duration = Duration::from_secs(10);
/// Write size of the direct-I/O disk baseline.
const DIRECT_BLOCK: usize = 1 << 20;
/// How long a merge may take before the run fails (a 1 GiB merge takes seconds).
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for RabbitMQ to accept connections before a merge.
const BROKER_WAIT: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug, Clone)]
pub struct MergeArgs {
    /// Bytes per upload.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size of the upload.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Parallel clients that send the chunks before the last one (not measured).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Merges as configured by default (fsync on), each of a fresh upload; the targets are
    /// judged on these.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Merges with `STITCH__STORAGE__FSYNC=false` on the worker, interleaved with the others,
    /// to show what the fsync costs; 0 to skip them.
    #[arg(long, default_value_t = 3)]
    pub nofsync_repeats: usize,
    /// Merges (fsync on) whose output finds warm memory: just before the last chunk is sent,
    /// a scratch file of the upload's size is written and deleted, so that the merge's
    /// page-cache writes reuse memory freed a moment ago, as on a machine without free page
    /// reporting; to show what fresh memory costs the merge. 0 to skip them.
    #[arg(long, default_value_t = 3)]
    pub warm_repeats: usize,
    /// Block size of the merge (the worker's `STITCH__MERGE__BUFFER_BYTES`) and of the
    /// MD5-only pass's reads, so that both read the files the same way.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub buffer: u64,
    /// The `stitch-api` binary.
    #[arg(long, default_value = "target/release/stitch-api")]
    pub api_bin: PathBuf,
    /// The `stitch-worker` binary.
    #[arg(long, default_value = "target/release/stitch-worker")]
    pub worker_bin: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Everything one run measured.
#[derive(Debug)]
pub struct MergeResults {
    pub args: MergeArgs,
    pub machine: Machine,
    /// (b) MD5 of the payload in memory, one core.
    pub md5_memory: Throughput,
    /// (c) the payload written into the page cache, into cold and into warm memory.
    pub page_cache_cold: Throughput,
    pub page_cache_warm: Throughput,
    /// (a) the run's first disk write (not used: blocks the disk had not seen lately).
    pub disk_first: Throughput,
    /// The merges, in the order run.
    pub merges: Vec<MergeRun>,
    /// Times the machine was still busy when `--wait-idle` ran out.
    pub busy_waits: usize,
}

impl MergeResults {
    /// The merges of one kind.
    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &MergeRun> {
        self.merges.iter().filter(move |m| m.kind == kind)
    }

    /// Every (a) measurement between merges, in MB/s.
    pub fn disk_rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self
            .merges
            .iter()
            .map(|m| m.disk_before.mb_per_s())
            .collect();
        rates.extend(self.merges.last().map(|m| m.disk_after.mb_per_s()));
        rates
    }
}

/// How a merge is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The default configuration: what the targets are judged on.
    Standard,
    /// `STITCH__STORAGE__FSYNC=false` on the worker.
    NoFsync,
    /// Fsync on, with the output's memory warmed just before.
    WarmMemory,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Standard, Kind::NoFsync, Kind::WarmMemory];

    pub fn fsync(self) -> bool {
        self != Self::NoFsync
    }

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Standard => "default (fsync)",
            Self::NoFsync => "no fsync",
            Self::WarmMemory => "warm memory (fsync)",
        }
    }
}

/// One merge: one upload, its MD5-only pass, its merge and its event.
#[derive(Clone, Debug)]
pub struct MergeRun {
    pub kind: Kind,
    /// The upload's size.
    pub bytes: u64,
    /// (i) MD5 of the chunk files (and the last chunk's bytes), one core.
    pub md5_only: Throughput,
    /// CPU use during (i).
    pub md5_usage: CpuUsage,
    /// Page-cache residency of the chunk files (resident, total bytes) just before (i) and
    /// just before the last chunk was sent; `None` without `fincore`.
    pub resident_before_md5: Option<(u64, u64)>,
    pub resident_before_merge: Option<(u64, u64)>,
    /// [`Kind::WarmMemory`]: the scratch write that warmed the memory, itself a (c) into cold
    /// memory.
    pub warm_up: Option<Throughput>,
    /// When the completing chunk's response was read.
    pub completing: Moment,
    /// `merge_started_at` and `completed_at` of the upload's Redis hash (ms since the epoch,
    /// the worker's clock).
    pub merge_started_ms: u64,
    pub completed_ms: u64,
    /// When the `upload.completed` event arrived.
    pub event_at: Instant,
    /// The merge attempt's fencing token (1 when the first attempt committed).
    pub fence: u64,
    /// CPU use from just before the last chunk was sent until the event arrived.
    pub usage: CpuUsage,
    /// The worker's RSS when the merge window opened, and its peak (`VmHWM`) over it.
    pub worker_rss_before: u64,
    pub worker_peak_rss: u64,
    /// The processes that did not exit cleanly on SIGTERM, with their exit status.
    pub unclean_exits: Vec<String>,
    /// (a) just before and just after this merge (the same until the one after is measured).
    pub disk_before: Throughput,
    pub disk_after: Throughput,
    /// Earlier attempts of this merge discarded as disturbed.
    pub discarded: usize,
}

impl MergeRun {
    /// (ii) inside: `completed_at − merge_started_at`.
    pub fn merge_time(&self) -> Duration {
        Duration::from_millis(self.completed_ms.saturating_sub(self.merge_started_ms))
    }

    pub fn merge_mb_per_s(&self) -> f64 {
        Throughput {
            bytes: self.bytes,
            elapsed: self.merge_time(),
        }
        .mb_per_s()
    }

    /// The merge's rate over the MD5-only rate of the same files.
    pub fn ratio(&self) -> f64 {
        self.merge_mb_per_s() / self.md5_only.mb_per_s()
    }

    /// (iii) and (ii) from outside: from the completing chunk's response to the event.
    pub fn event_delay(&self) -> Duration {
        self.event_at.duration_since(self.completing.instant)
    }

    /// (iii) beyond the merge itself, in ms (the target allows 100).
    pub fn event_overhead_ms(&self) -> f64 {
        (self.event_delay().as_secs_f64() - self.merge_time().as_secs_f64()) * 1e3
    }

    /// When the merge started relative to the completing chunk's response, in ms (negative:
    /// before the client had read the response, as the API publishes the job first).
    pub fn start_after_response_ms(&self) -> f64 {
        wall_ms(self.completing.wall)
            .map_or(f64::NAN, |response| self.merge_started_ms as f64 - response)
    }

    /// (a) around this merge: the mean of the one before and the one after, MB/s.
    pub fn disk_around(&self) -> f64 {
        (self.disk_before.mb_per_s() + self.disk_after.mb_per_s()) / 2.0
    }

    /// The worker's CPU over the merge window.
    pub fn worker_cpu(&self) -> CpuTime {
        self.usage.cpu("worker")
    }

    /// The worker's CPU seconds per second of merge (inside time): cores it kept busy.
    pub fn worker_cores(&self) -> f64 {
        self.worker_cpu().total().as_secs_f64() / self.merge_time().as_secs_f64().max(1e-9)
    }

    pub fn disturbed(&self) -> bool {
        self.usage.other_cores() >= DISTURBED_CORES
            || self.md5_usage.other_cores() >= DISTURBED_CORES
    }
}

/// Milliseconds since the epoch, fractional.
fn wall_ms(t: SystemTime) -> Option<f64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64() * 1e3)
}

/// Runs the benchmark, prints the report, and writes it into the docs when asked.
pub fn run(args: &MergeArgs) -> anyhow::Result<()> {
    check_args(args)?;
    let mut redis = args.run.redis()?;
    let results = WorkDir::within(&args.run.dir, |work| measure(args, work, &mut redis))?;
    report::report(&results).publish(&args.run)
}

fn check_args(args: &MergeArgs) -> anyhow::Result<()> {
    check_binaries(
        &[
            (&args.api_bin, "--api-bin"),
            (&args.worker_bin, "--worker-bin"),
        ],
        BUILD_ALL,
    )?;
    ensure!(
        usize::try_from(args.size).is_ok() && usize::try_from(args.buffer).is_ok(),
        "--size and --buffer must fit in memory on this platform"
    );
    ensure!(
        args.size.div_ceil(args.chunk_size) >= 2,
        "the upload needs at least two chunks (--size / --chunk-size)"
    );
    ensure!(
        args.repeats >= 1 && args.clients >= 1,
        "--repeats and --clients must be at least 1"
    );
    ensure!(
        args.buffer <= args.chunk_size,
        "--buffer must not be larger than --chunk-size"
    );
    Ok(())
}

fn progress(message: impl AsRef<str>) {
    eprintln!("stitch-bench merge: {}", message.as_ref());
}

fn measure(
    args: &MergeArgs,
    work: &WorkDir,
    redis: &mut redis::Connection,
) -> anyhow::Result<MergeResults> {
    let machine = Machine::describe(work.path())?;
    if machine.work_fs.is_memory() {
        progress(format!(
            "warning: {} is on {}: the merge's writes and fsync will not reach a disk (and direct I/O will fail)",
            work.path().display(),
            machine.work_fs.fs_type
        ));
    }
    let size = usize::try_from(args.size).context("--size does not fit in memory")?;
    let buffer = usize::try_from(args.buffer).context("--buffer does not fit in memory")?;
    progress(format!(
        "generating {} of pseudo-random bytes",
        crate::report::size(args.size)
    ));
    let source = Source::random(size, args.chunk_size, SEED).shared();
    progress("(b) MD5 in memory on one core");
    let (md5_memory, digest) = baseline::md5_one_core(&source.bytes, buffer);
    progress(format!("    {:.0} MB/s", md5_memory.mb_per_s()));
    progress("computing chunk digests (outside the timed runs)");
    let payload = Payload::new(source);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let services = args.run.services();
    let mut bench = Bench {
        args,
        work,
        services: &services,
        redis,
        runtime: &runtime,
        payload,
        md5_hex: hex::encode(digest),
        busy_waits: 0,
    };
    bench.wait_idle()?;
    progress(format!(
        "(c) page-cache writes, after {} s of rest and right after",
        PAGE_CACHE_REST.as_secs()
    ));
    let (page_cache_cold, page_cache_warm) = baseline::page_cache_write_cold_and_warm(
        &work.join("page-cache-baseline.bin"),
        &bench.payload.source.bytes,
        buffer,
        PAGE_CACHE_REST,
    )?;
    progress(format!(
        "    cold {:.0} MB/s, warm {:.0} MB/s",
        page_cache_cold.mb_per_s(),
        page_cache_warm.mb_per_s()
    ));
    let disk_first = bench.disk()?;
    let mut disk_before = bench.disk()?;
    let mut merges = Vec::new();
    let wanted = [args.repeats, args.nofsync_repeats, args.warm_repeats];
    for i in 0..wanted.iter().copied().max().unwrap_or(0) {
        for (kind, n) in Kind::ALL.into_iter().zip(wanted) {
            if i < n {
                let merge = bench.merge_undisturbed(kind, disk_before)?;
                disk_before = merge.disk_after;
                merges.push(merge);
            }
        }
    }
    Ok(MergeResults {
        args: args.clone(),
        machine,
        md5_memory,
        page_cache_cold,
        page_cache_warm,
        disk_first,
        merges,
        busy_waits: bench.busy_waits,
    })
}

/// What every merge needs.
struct Bench<'a> {
    args: &'a MergeArgs,
    work: &'a WorkDir,
    services: &'a Services,
    /// For the upload's hash.
    redis: &'a mut redis::Connection,
    runtime: &'a tokio::runtime::Runtime,
    payload: Payload,
    /// MD5 of the payload, hex.
    md5_hex: String,
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

    /// (a): the payload written to the work directory with direct I/O and fsynced.
    fn disk(&mut self) -> anyhow::Result<Throughput> {
        self.wait_idle()?;
        let t = baseline::direct_write(
            &self.work.join("disk-baseline.bin"),
            &self.payload.source.bytes,
            DIRECT_BLOCK,
        )?;
        progress(format!(
            "(a) direct-I/O write + fsync: {:.0} MB/s",
            t.mb_per_s()
        ));
        Ok(t)
    }

    /// A fresh namespace with an API and a worker on it (with `fsync` or not).
    fn start(&self, fsync: bool) -> anyhow::Result<Deployment> {
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
        ];
        deployment.start(Role::Api, &self.args.api_bin, &settings, &[])?;
        settings.push(("STITCH__MERGE__BUFFER_BYTES", self.args.buffer.to_string()));
        if !fsync {
            settings.push(("STITCH__STORAGE__FSYNC", "false".to_owned()));
        }
        deployment.start(Role::Worker, &self.args.worker_bin, &settings, &[])?;
        Ok(deployment)
    }

    /// [`Self::merge`], repeated (up to `--retries` times) while other work disturbed it.
    fn merge_undisturbed(
        &mut self,
        kind: Kind,
        disk_before: Throughput,
    ) -> anyhow::Result<MergeRun> {
        let mut merge = self.merge(kind, disk_before)?;
        while merge.disturbed() && merge.discarded < self.args.run.retries {
            progress(format!(
                "    disturbed ({:.2} cores of other work during the merge, {:.2} during the MD5 pass): repeating",
                merge.usage.other_cores(),
                merge.md5_usage.other_cores()
            ));
            let discarded = merge.discarded + 1;
            merge = self.merge(kind, merge.disk_after)?;
            merge.discarded = discarded;
        }
        Ok(merge)
    }

    /// One merge, start to finish, then clean-up (also when something failed), then (a).
    fn merge(&mut self, kind: Kind, disk_before: Throughput) -> anyhow::Result<MergeRun> {
        progress(format!(
            "merge of {} in {} chunks, {}",
            crate::report::size(self.args.size),
            self.payload.chunks(),
            kind.name()
        ));
        self.runtime
            .block_on(wait_for_broker(&self.args.run.amqp_url, BROKER_WAIT))?;
        let deployment = self.start(kind.fsync())?;
        let measured = self
            .measure_merge(&deployment, kind, disk_before)
            .with_context(|| deployment.log_tails());
        let exits = deployment.stop();
        // No dirty page of this merge (written without fsync, or not yet written back) may
        // be written back during the next measurement.
        let synced = std::fs::File::open(self.work.path())
            .map_err(anyhow::Error::from)
            .and_then(|dir| rustix::fs::syncfs(&dir).map_err(anyhow::Error::from))
            .context("syncing the work directory's file system");
        let mut merge = measured?;
        for (role, exit) in exits? {
            if !exit.success() {
                merge
                    .unclean_exits
                    .push(format!("{} ({exit})", role.name()));
            }
        }
        synced?;
        progress(format!(
            "    MD5 only {:.0} MB/s; merge {:.3} s = {:.0} MB/s (ratio {:.2}); event {:.0} ms after the response ({:+.0} ms beyond the merge); worker {:.2} cores, peak RSS {}",
            merge.md5_only.mb_per_s(),
            merge.merge_time().as_secs_f64(),
            merge.merge_mb_per_s(),
            merge.ratio(),
            merge.event_delay().as_secs_f64() * 1e3,
            merge.event_overhead_ms(),
            merge.worker_cores(),
            crate::report::mib(merge.worker_peak_rss)
        ));
        merge.disk_after = self.disk()?;
        Ok(merge)
    }

    fn measure_merge(
        &mut self,
        deployment: &Deployment,
        kind: Kind,
        disk_before: Throughput,
    ) -> anyhow::Result<MergeRun> {
        let api = deployment.process(Role::Api)?;
        let worker = deployment.process(Role::Worker)?;
        let env = &deployment.env;
        let upload_id = format!("bench-{:016x}", rand::random::<u64>());
        let last = self.payload.chunks() - 1;
        let job = UploadJob {
            order: (0..last).collect(),
            completes: false,
            file_md5: Some(self.md5_hex.clone()),
            ..UploadJob::all(
                api.addr,
                upload_id.clone(),
                self.payload.clone(),
                self.args.clients,
            )
        };
        // A handle on the shared buffer, not a copy.
        let source = &self.payload.source.clone();
        self.runtime.block_on(send_upload(&job))?;
        let files = stored_chunk_files(&env.storage_root, &upload_id, source, last as u64)?;
        let tap = self.runtime.block_on(EventTap::connect(env))?;

        // (i) The limit, with the machine idle and the worker waiting.
        self.wait_idle()?;
        let mut watched = vec![
            Watched {
                label: "api",
                pid: api.pid(),
            },
            Watched {
                label: "worker",
                pid: worker.pid(),
            },
            Watched::this_process(),
        ];
        watched.extend(Watched::services());
        let buffer = usize::try_from(self.args.buffer).context("--buffer")?;
        // The wait may have let pages of the chunk files be evicted; both passes must find
        // them all in the page cache, as right after an upload.
        baseline::read_through(&files, 1 << 20)?;
        let resident_before_md5 = baseline::page_cache_residency(&files);
        let before = CpuSnapshot::take(&watched)?;
        let (_, last_chunk) = source.chunk(last as u64);
        let (md5_only, digest) = baseline::md5_files(&files, last_chunk, buffer)?;
        let md5_usage = CpuSnapshot::take(&watched)?.since(&before);
        ensure!(
            hex::encode(digest) == self.md5_hex,
            "the chunk files on storage (and the last chunk) hash to {}, the payload to {}",
            hex::encode(digest),
            self.md5_hex
        );

        // (ii) and (iii): the last chunk, the merge, the event.
        let warm_up = match kind {
            Kind::WarmMemory => Some(baseline::page_cache_write(
                &self.work.join("warm-up.bin"),
                &source.bytes,
                buffer,
            )?),
            Kind::Standard | Kind::NoFsync => None,
        };
        let resident_before_merge = baseline::page_cache_residency(&files);
        worker.reset_peak_rss()?;
        let worker_rss_before = worker.peak_rss()?;
        let last_job = UploadJob {
            order: Arc::from([last]),
            completes: true,
            clients: 1,
            ..job.clone()
        };
        let before = CpuSnapshot::take(&watched)?;
        let (outcome, arrival) = self.runtime.block_on(async {
            let outcome = send_upload(&last_job).await?;
            let arrival = tap
                .arrival(
                    &upload_id,
                    &["upload.completed", "upload.failed"],
                    EVENT_TIMEOUT,
                )
                .await?;
            anyhow::Ok((outcome, arrival))
        })?;
        let usage = CpuSnapshot::take(&watched)?.since(&before);
        let worker_peak_rss = worker.peak_rss()?;
        self.runtime.block_on(tap.close());
        let completing = outcome
            .completing
            .context("the last chunk's answer did not say upload_complete")?;

        // The checks.
        verify_completed_event(&arrival, &upload_id, source.len(), &self.md5_hex)?;
        let id = UploadId::parse(&upload_id).context("the benchmark's upload id")?;
        let key = keys::meta(&env.namespace, &id);
        let meta: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&[
                "state",
                "merge_started_at",
                "completed_at",
                "merge_fence",
                "md5",
            ])
            .query(self.redis)
            .with_context(|| format!("reading {key} from Redis"))?;
        let field = |i: usize, name: &str| -> anyhow::Result<String> {
            meta.get(i)
                .cloned()
                .flatten()
                .with_context(|| format!("the upload's Redis hash has no {name}"))
        };
        ensure!(
            field(0, "state")? == "completed" && field(4, "md5")? == self.md5_hex,
            "Redis says state {:?}, MD5 {:?}; expected completed, {}",
            meta[0],
            meta[4],
            self.md5_hex
        );
        let number = |i: usize, name: &str| -> anyhow::Result<u64> {
            let raw = field(i, name)?;
            raw.parse()
                .with_context(|| format!("{name} in Redis is {raw:?}, not a number"))
        };
        let merge_started_ms = number(1, "merge_started_at")?;
        let completed_ms = number(2, "completed_at")?;
        let fence = number(3, "merge_fence")?;
        ensure!(
            completed_ms >= merge_started_ms,
            "completed_at {completed_ms} is before merge_started_at {merge_started_ms}"
        );
        let status = self
            .runtime
            .block_on(async { get_status(&status_client(api.addr)?, &upload_id).await })?;
        verify_completed(&status, source, &self.md5_hex)?;
        verify_merged_file(&env.storage_root, &upload_id, source.len(), &self.md5_hex)?;

        Ok(MergeRun {
            kind,
            bytes: source.len(),
            md5_only,
            md5_usage,
            resident_before_md5,
            resident_before_merge,
            warm_up,
            completing,
            merge_started_ms,
            completed_ms,
            event_at: arrival.at,
            fence,
            usage,
            worker_rss_before,
            worker_peak_rss,
            unclean_exits: Vec::new(),
            disk_before,
            disk_after: disk_before,
            discarded: 0,
        })
    }
}
