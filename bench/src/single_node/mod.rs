//! `stitch-bench single-node`: the same upload ingested and merged by the single-node mode
//! (`stitch serve`: API and worker in one process over SQLite) and by the distributed mode
//! (`stitch-api` + `stitch-worker` over Redis and RabbitMQ), to compare what each costs.
//!
//! One run measures, for context, (b) MD5 of the payload in memory, (c) writing it into the
//! page cache into cold and warm memory (see the merge benchmark), and (a) the disk alone
//! (direct I/O; before the first upload and after each), then the upload through each mode in turn,
//! `--repeats` times each, in the order A B B A A B … so that a drift of the machine (the
//! disk's speed changes with its recent history) weighs on both modes alike. Each upload has
//! fresh processes, storage and namespace; `--clients` connections send it; then the status is
//! polled until `completed`. For each: ingest rate (first chunk sent to last response read),
//! merge time (the worker's own `merging` → `merge committed` log lines, the same code in both
//! modes), total time (first chunk sent to `completed` seen), peak RSS of every Stitch process
//! and the CPU of everything involved, Redis and RabbitMQ included.
//!
//! Every upload is checked: every chunk answer, the final status (`completed`, every chunk,
//! the payload's size and MD5; the upload carries `X-File-MD5`, so the merge verified it
//! too), and the merged file read back from storage.

mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, ensure};
use stitch_testkit::process::current_rss;
use stitch_testkit::{Services, Source, TestEnv};

use crate::baseline::{self, Throughput};
use crate::deployment::{BUILD_ALL, Deployment, Role, check_binaries, wait_for_broker};
use crate::machine::Machine;
use crate::options::{RunArgs, parse_size};
use crate::upload::{Payload, UploadJob, UploadOutcome, send_upload};
use crate::usage::{CpuSnapshot, CpuUsage, DISTURBED_CORES, Watched, wait_for_idle};
use crate::verify::{verify_completed, verify_merged_file, wait_until_completed};
use crate::workdir::WorkDir;

/// What `stitch-bench single-node --help` says about it.
pub const LONG_ABOUT: &str = "The same upload through the single-node mode and the distributed mode.\n\n\
        Alternating between `stitch serve` (API and worker in one process over SQLite) and \
        stitch-api + stitch-worker (over Redis and RabbitMQ), each run sends an upload of \
        --size in --chunk-size chunks over --clients connections to fresh processes, then \
        polls its status until `completed`. Reports ingest MB/s, merge time, total time from \
        the first chunk to `completed`, peak RSS and CPU per mode. No target: a comparison. \
        Every upload is verified (status, MD5, bytes on storage).";

/// Seed of the payload: fixed, so that every run sends the same bytes.
const SEED: u64 = 0x5717_c4e5_b3a1_0003;
/// Rest before the cold page-cache write (see [`baseline::page_cache_write_cold_and_warm`]).
const PAGE_CACHE_REST: Duration = Duration::from_secs(10);
/// How long the merge may take before the run fails (a 1 GiB merge takes seconds).
const MERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for RabbitMQ to accept connections before a distributed run.
const BROKER_WAIT: Duration = Duration::from_secs(300);
/// The worker's log messages at the start of a merge attempt and at its commit.
const MERGING: &str = "merging";
const COMMITTED: &str = "merge committed";

#[derive(clap::Args, Debug, Clone)]
pub struct SingleNodeArgs {
    /// Bytes per upload.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size of the upload.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Parallel clients (one HTTP/1.1 connection each).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Uploads per mode.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Interval of the status requests after the last chunk, in milliseconds: the total time
    /// is known to within this.
    #[arg(long, default_value_t = 10)]
    pub poll_ms: u64,
    /// The `stitch` binary (its `serve` subcommand is the single-node mode).
    #[arg(long, default_value = "target/release/stitch")]
    pub serve_bin: PathBuf,
    /// The `stitch-api` binary of the distributed mode.
    #[arg(long, default_value = "target/release/stitch-api")]
    pub api_bin: PathBuf,
    /// The `stitch-worker` binary of the distributed mode.
    #[arg(long, default_value = "target/release/stitch-worker")]
    pub worker_bin: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How Stitch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `stitch serve`.
    SingleNode,
    /// `stitch-api` + `stitch-worker`.
    Distributed,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::SingleNode => "single-node (`stitch serve`)",
            Self::Distributed => "distributed (`stitch-api` + `stitch-worker`)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Self::SingleNode => "single-node",
            Self::Distributed => "distributed",
        }
    }

    /// This mode's Stitch processes, in the order they start: the worker first, so that it
    /// consumes before the first job can exist.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Self::SingleNode => &[Role::Serve],
            Self::Distributed => &[Role::Worker, Role::Api],
        }
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct SingleNodeResults {
    pub args: SingleNodeArgs,
    pub machine: Machine,
    /// (b) MD5 of the payload in memory, one core.
    pub md5_memory: Throughput,
    /// (c) the payload written into the page cache, into cold and into warm memory.
    pub page_cache_cold: Throughput,
    pub page_cache_warm: Throughput,
    /// (a) the run's first disk write (not used).
    pub disk_first: Throughput,
    /// The uploads, in the order run.
    pub runs: Vec<ModeRun>,
    /// Times the machine was still busy when `--wait-idle` ran out.
    pub busy_waits: usize,
}

impl SingleNodeResults {
    pub fn of(&self, mode: Mode) -> impl Iterator<Item = &ModeRun> {
        self.runs.iter().filter(move |r| r.mode == mode)
    }

    /// Every (a) measurement between uploads, in MB/s.
    pub fn disk_rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self.runs.iter().map(|r| r.disk_before.mb_per_s()).collect();
        rates.extend(self.runs.last().map(|r| r.disk_after.mb_per_s()));
        rates
    }
}

/// One upload through one mode.
#[derive(Clone, Debug)]
pub struct ModeRun {
    pub mode: Mode,
    pub upload: UploadOutcome,
    /// When the status first said `completed`.
    pub completed_seen: Instant,
    /// The worker's `merging` and `merge committed` log times (its own clock).
    pub merge_started: SystemTime,
    pub merge_committed: SystemTime,
    /// Merge attempts logged (1 unless an attempt was retried).
    pub attempts: usize,
    /// CPU use from just before the first chunk until `completed` was seen.
    pub usage: CpuUsage,
    /// Peak RSS (`VmHWM`) of each Stitch process, by label.
    pub peaks: Vec<(&'static str, u64)>,
    /// RSS of the services (Redis, RabbitMQ) at the end, by label.
    pub services_rss: Vec<(&'static str, u64)>,
    pub unclean_exits: Vec<String>,
    /// (a) just before and just after this upload (the same until the one after is measured).
    pub disk_before: Throughput,
    pub disk_after: Throughput,
    /// Earlier runs of this upload discarded as disturbed.
    pub discarded: usize,
}

impl ModeRun {
    pub fn ingest_mb_per_s(&self) -> f64 {
        Throughput {
            bytes: self.upload.bytes,
            elapsed: self.upload.elapsed,
        }
        .mb_per_s()
    }

    /// From the worker's `merging` to its `merge committed`.
    pub fn merge_time(&self) -> Duration {
        self.merge_committed
            .duration_since(self.merge_started)
            .unwrap_or_default()
    }

    /// From the completing chunk's response to `completed` seen: dispatch, merge, and up to
    /// one poll interval.
    pub fn after_upload(&self) -> Duration {
        let completing = self
            .upload
            .completing
            .map_or(self.upload.started + self.upload.elapsed, |c| c.instant);
        self.completed_seen.saturating_duration_since(completing)
    }

    /// From the first chunk sent to `completed` seen.
    pub fn total(&self) -> Duration {
        self.completed_seen.duration_since(self.upload.started)
    }

    /// The sum of the Stitch processes' peaks.
    pub fn peak_rss(&self) -> u64 {
        self.peaks.iter().map(|(_, p)| p).sum()
    }

    /// CPU seconds of this mode's Stitch processes.
    pub fn stitch_cpu(&self) -> f64 {
        self.mode
            .roles()
            .iter()
            .map(|role| self.usage.cpu(role.label()).total().as_secs_f64())
            .sum()
    }

    /// CPU seconds of Redis and RabbitMQ.
    pub fn services_cpu(&self) -> f64 {
        ["redis", "rabbitmq"]
            .iter()
            .map(|l| self.usage.cpu(l).total().as_secs_f64())
            .sum()
    }

    pub fn disturbed(&self) -> bool {
        self.usage.other_cores() >= DISTURBED_CORES
    }
}

/// Runs the benchmark, prints the report, and writes it into the docs when asked.
pub fn run(args: &SingleNodeArgs) -> anyhow::Result<()> {
    check_args(args)?;
    // Only the distributed mode needs Redis, but better to learn now that it is missing.
    args.run.redis()?;
    let results = WorkDir::within(&args.run.dir, |work| measure(args, work))?;
    report::report(&results).publish(&args.run)
}

fn check_args(args: &SingleNodeArgs) -> anyhow::Result<()> {
    check_binaries(
        &[
            (&args.serve_bin, "--serve-bin"),
            (&args.api_bin, "--api-bin"),
            (&args.worker_bin, "--worker-bin"),
        ],
        BUILD_ALL,
    )?;
    ensure!(
        usize::try_from(args.size).is_ok(),
        "--size does not fit in memory on this platform"
    );
    ensure!(
        args.repeats >= 1 && args.clients >= 1 && args.poll_ms >= 1,
        "--repeats, --clients and --poll-ms must be at least 1"
    );
    Ok(())
}

fn progress(message: impl AsRef<str>) {
    eprintln!("stitch-bench single-node: {}", message.as_ref());
}

fn measure(args: &SingleNodeArgs, work: &WorkDir) -> anyhow::Result<SingleNodeResults> {
    let machine = Machine::describe(work.path())?;
    if machine.work_fs.is_memory() {
        progress(format!(
            "warning: {} is on {}: nothing will reach a disk",
            work.path().display(),
            machine.work_fs.fs_type
        ));
    }
    let size = usize::try_from(args.size).context("--size does not fit in memory")?;
    progress(format!(
        "generating {} of pseudo-random bytes",
        crate::report::size(args.size)
    ));
    let source = Source::random(size, args.chunk_size, SEED).shared();
    progress("(b) MD5 in memory on one core");
    let (md5_memory, digest) = baseline::md5_one_core(&source.bytes, 64 << 10);
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
        64 << 10,
        PAGE_CACHE_REST,
    )?;
    progress(format!(
        "    cold {:.0} MB/s, warm {:.0} MB/s",
        page_cache_cold.mb_per_s(),
        page_cache_warm.mb_per_s()
    ));
    let disk_first = bench.disk()?;
    let mut disk_before = bench.disk()?;
    let mut runs = Vec::new();
    for i in 0..args.repeats {
        // A B, B A, A B, …: each mode runs first as often as it runs second.
        let order = if i % 2 == 0 {
            [Mode::SingleNode, Mode::Distributed]
        } else {
            [Mode::Distributed, Mode::SingleNode]
        };
        for mode in order {
            let run = bench.run_undisturbed(mode, disk_before)?;
            disk_before = run.disk_after;
            runs.push(run);
        }
    }
    Ok(SingleNodeResults {
        args: args.clone(),
        machine,
        md5_memory,
        page_cache_cold,
        page_cache_warm,
        disk_first,
        runs,
        busy_waits: bench.busy_waits,
    })
}

/// What every run needs.
struct Bench<'a> {
    args: &'a SingleNodeArgs,
    work: &'a WorkDir,
    services: &'a Services,
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
            1 << 20,
        )?;
        progress(format!(
            "(a) direct-I/O write + fsync: {:.0} MB/s",
            t.mb_per_s()
        ));
        Ok(t)
    }

    /// A fresh namespace (on the services only for the distributed mode) with the mode's
    /// processes on it.
    fn start(&self, mode: Mode) -> anyhow::Result<Deployment> {
        let services = (mode == Mode::Distributed).then_some(self.services);
        let env = TestEnv::deployed("bench", self.work.path(), services)
            .context("creating a storage directory")?;
        let mut deployment = Deployment::new(env);
        let settings = [
            ("STITCH__UPLOADS__TTL", "1h".to_owned()),
            (
                "STITCH__LIMITS__MAX_CHUNK_BYTES",
                self.args.chunk_size.max(128 << 20).to_string(),
            ),
        ];
        for &role in mode.roles() {
            let binary = match role {
                Role::Serve => &self.args.serve_bin,
                Role::Api => &self.args.api_bin,
                Role::Worker => &self.args.worker_bin,
            };
            deployment.start(role, binary, &settings, &[MERGING, COMMITTED])?;
        }
        Ok(deployment)
    }

    /// [`Self::run`], repeated (up to `--retries` times) while other work disturbed it.
    fn run_undisturbed(&mut self, mode: Mode, disk_before: Throughput) -> anyhow::Result<ModeRun> {
        let mut run = self.run(mode, disk_before)?;
        while run.disturbed() && run.discarded < self.args.run.retries {
            progress(format!(
                "    disturbed ({:.2} cores of other work): repeating",
                run.usage.other_cores()
            ));
            let discarded = run.discarded + 1;
            run = self.run(mode, run.disk_after)?;
            run.discarded = discarded;
        }
        Ok(run)
    }

    /// One upload through `mode`, start to finish, then clean-up (also when something
    /// failed), then (a).
    fn run(&mut self, mode: Mode, disk_before: Throughput) -> anyhow::Result<ModeRun> {
        progress(format!(
            "{}: {} in {} chunks of {}, {} clients",
            mode.name(),
            crate::report::size(self.args.size),
            self.payload.chunks(),
            crate::report::size(self.args.chunk_size),
            self.args.clients
        ));
        if mode == Mode::Distributed {
            self.runtime
                .block_on(wait_for_broker(&self.args.run.amqp_url, BROKER_WAIT))?;
        }
        self.wait_idle()?;
        let deployment = self.start(mode)?;
        let measured = self
            .measure_run(mode, &deployment, disk_before)
            .with_context(|| deployment.log_tails());
        let exits = deployment.stop();
        let mut run = measured?;
        let unclean = exits?
            .into_iter()
            .filter(|(_, exit)| !exit.success())
            .map(|(role, exit)| format!("{} ({exit})", role.label()))
            .collect();
        run.unclean_exits = unclean;
        progress(format!(
            "    ingest {:.0} MB/s, merge {:.2} s, total {:.2} s, peak RSS {}",
            run.ingest_mb_per_s(),
            run.merge_time().as_secs_f64(),
            run.total().as_secs_f64(),
            crate::report::mib(run.peak_rss())
        ));
        run.disk_after = self.disk()?;
        Ok(run)
    }

    fn measure_run(
        &mut self,
        mode: Mode,
        deployment: &Deployment,
        disk_before: Throughput,
    ) -> anyhow::Result<ModeRun> {
        let processes = deployment.processes();
        let api = processes
            .iter()
            .find(|(role, _)| *role != Role::Worker)
            .map(|(_, p)| p)
            .context("no process serves the API")?;
        let upload_id = format!("bench-{:016x}", rand::random::<u64>());
        let job = UploadJob {
            file_md5: Some(self.md5_hex.clone()),
            ..UploadJob::all(
                api.addr,
                upload_id.clone(),
                self.payload.clone(),
                self.args.clients,
            )
        };
        let mut watched: Vec<Watched> = processes
            .iter()
            .map(|(role, p)| Watched {
                label: role.label(),
                pid: p.pid(),
            })
            .collect();
        watched.push(Watched::this_process());
        // The single-node mode uses neither service: whatever they do meanwhile is other
        // work, not this upload's.
        let services = match mode {
            Mode::Distributed => Watched::services(),
            Mode::SingleNode => Vec::new(),
        };
        watched.extend(services.iter().cloned());
        let poll = Duration::from_millis(self.args.poll_ms);

        let before = CpuSnapshot::take(&watched)?;
        let (upload, (completed_seen, status)) = self.runtime.block_on(async {
            let upload = send_upload(&job).await?;
            let completed = wait_until_completed(job.addr, &upload_id, poll, MERGE_TIMEOUT).await?;
            anyhow::Ok((upload, completed))
        })?;
        let usage = CpuSnapshot::take(&watched)?.since(&before);
        let peaks = processes
            .iter()
            .map(|(role, p)| Ok((role.label(), p.peak_rss()?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let services_rss = services
            .iter()
            .filter_map(|w| Some((w.label, current_rss(w.pid).ok()?)))
            .collect();

        let source = &self.payload.source;
        verify_completed(&status, source, &self.md5_hex)?;
        verify_merged_file(
            &deployment.env.storage_root,
            &upload_id,
            source.len(),
            &self.md5_hex,
        )?;
        let of_upload = |message: &str| -> Vec<SystemTime> {
            processes
                .iter()
                .flat_map(|(_, p)| p.log_records(message))
                .filter(|r| r.line.get("upload_id").and_then(|v| v.as_str()) == Some(&upload_id))
                .map(|r| r.at)
                .collect()
        };
        let starts = of_upload(MERGING);
        let commits = of_upload(COMMITTED);
        let (Some(&merge_started), [merge_committed]) = (starts.last(), commits.as_slice()) else {
            anyhow::bail!(
                "expected the worker to log `{MERGING}` and `{COMMITTED}` once for the upload; it logged them {} and {} times",
                starts.len(),
                commits.len()
            );
        };
        Ok(ModeRun {
            mode,
            upload,
            completed_seen,
            merge_started,
            merge_committed: *merge_committed,
            attempts: starts.len(),
            usage,
            peaks,
            services_rss,
            unclean_exits: Vec::new(),
            disk_before,
            disk_after: disk_before,
            discarded: 0,
        })
    }
}
