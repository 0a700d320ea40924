//! `stitch-bench ingest`: how fast `stitch-api` takes an upload compared with what the
//! machine can do, and how much memory it needs while doing it.
//!
//! One run measures, in this order:
//! 1. (b) MD5 of the payload in memory on one core;
//! 2. (a) a sequential write of the same bytes in chunk-sized writes to the work directory
//!    (the disk the API stores on), with one fsync at the end: once to start, then again
//!    after every configuration below, so that each configuration is compared with the disk
//!    as it was just before and just after it. (A virtual disk's speed depends on its recent
//!    history: on the reference VM the same 1 GiB write takes 1 to 8 seconds.)
//! 3. (c) the payload uploaded through a fresh API process per configuration: 1, 4 and 16
//!    parallel clients, each without and with `Content-MD5` on every chunk;
//! 4. (d) the same payload in 64 MiB chunks, 16 at once, without and with `Content-MD5`,
//!    three times each, for the API's peak RSS.
//!
//! Every configuration has its own API process, storage directory, Redis namespace and
//! upload id; each is checked (every answer, the final status, the stored files) and then
//! cleaned up. The report goes to stdout and, with `--write-docs`, into
//! `docs/benchmarks.md`.

mod report;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use stitch_testkit::process::ServiceProcess;
use stitch_testkit::{Services, Source, TestEnv};

use crate::baseline::{self, Throughput};
use crate::deployment::{BUILD_API, Deployment, Role, check_binaries};
use crate::machine::Machine;
use crate::options::{RunArgs, parse_size};
use crate::procfs::{self, CpuTime, MachineCores, MachineCpu};
use crate::upload::{Payload, UploadJob, UploadOutcome, send_upload};
use crate::usage::{IDLE_CORES, redis_cpu_time};
use crate::verify::{verify_status, verify_stored};
use crate::workdir::WorkDir;

/// "Other CPU" (neither API, client nor Redis) from which a run counts as disturbed.
pub use crate::usage::DISTURBED_CORES;

/// Seed of the payload: fixed, so that every run sends the same bytes.
const SEED: u64 = 0x5717_c4e5_b3a1_0001;

#[derive(clap::Args, Debug, Clone)]
pub struct IngestArgs {
    /// Bytes per upload, and for the disk and MD5 baselines.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size of the throughput runs, and the write size of the disk baseline.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Parallel clients of the throughput runs (one HTTP/1.1 connection each).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub clients: Vec<usize>,
    /// Which throughput runs send `Content-MD5`: both kinds (the default, which the targets
    /// need), or only one, e.g. to profile one kind.
    #[arg(long, value_enum, default_value_t = Md5Runs::Both)]
    pub md5: Md5Runs,
    /// Chunk size of the memory runs.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub rss_chunk_size: u64,
    /// Parallel clients of the memory runs: this many chunks stream in at once.
    #[arg(long, default_value_t = 16)]
    pub rss_clients: usize,
    /// Memory runs per kind (without and with `Content-MD5`), each with a fresh API: a peak
    /// varies from run to run, and the memory target is judged on the worst.
    #[arg(long, default_value_t = 3)]
    pub rss_repeats: usize,
    /// The `stitch-api` binary (build it with `cargo build --release -p stitch-api`).
    #[arg(long, default_value = "target/release/stitch-api")]
    pub api_bin: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Which runs send `Content-MD5`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Md5Runs {
    Both,
    Off,
    On,
}

impl std::fmt::Display for Md5Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => Ok(()),
        }
    }
}

impl Md5Runs {
    fn modes(self) -> &'static [bool] {
        match self {
            Self::Both => &[false, true],
            Self::Off => &[false],
            Self::On => &[true],
        }
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct IngestResults {
    pub args: IngestArgs,
    pub machine: Machine,
    /// (a), the first time: a write to blocks the disk may not have seen for a while.
    pub disk_first: Throughput,
    /// (b) MD5 on one core.
    pub md5: Throughput,
    /// (c) the throughput runs, in the order run.
    pub runs: Vec<RunResult>,
    /// (d) the memory runs (without, then with `Content-MD5`; `--rss-repeats` of each).
    pub rss_runs: Vec<RunResult>,
    /// Peak RSS of an API process that has just started and served nothing.
    pub idle_rss: u64,
    /// Times the machine was still busy when `--wait-idle` ran out.
    pub busy_waits: usize,
}

impl IngestResults {
    /// Every configuration, throughput runs first.
    pub fn all_runs(&self) -> impl Iterator<Item = &RunResult> {
        self.runs.iter().chain(&self.rss_runs)
    }

    /// Every (a) measurement taken between configurations, in MB/s, in order.
    pub fn disk_rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self.all_runs().map(|r| r.disk_before.mb_per_s()).collect();
        rates.extend(self.all_runs().last().map(|r| r.disk_after.mb_per_s()));
        rates
    }

    /// (a): the median of [`Self::disk_rates`].
    pub fn disk_median(&self) -> f64 {
        let mut rates = self.disk_rates();
        rates.sort_by(f64::total_cmp);
        match rates.len() {
            0 => self.disk_first.mb_per_s(),
            n if n % 2 == 1 => rates[n / 2],
            n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
        }
    }
}

/// One configuration: one API process, one upload.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub clients: usize,
    pub chunk_size: u64,
    pub chunks: usize,
    pub content_md5: bool,
    pub outcome: UploadOutcome,
    /// CPU used during the upload, and the wall time it is spread over.
    pub api_cpu: CpuTime,
    pub client_cpu: CpuTime,
    pub redis_cpu: Duration,
    pub machine: MachineCores,
    pub window: Duration,
    /// `VmHWM` of the API process after the upload.
    pub peak_rss: u64,
    pub exit: ExitStatus,
    /// (a) measured just before this configuration and just after it.
    pub disk_before: Throughput,
    pub disk_after: Throughput,
    /// Earlier runs of this configuration discarded as disturbed.
    pub discarded: usize,
}

impl RunResult {
    pub fn mb_per_s(&self) -> f64 {
        Throughput {
            bytes: self.outcome.bytes,
            elapsed: self.outcome.elapsed,
        }
        .mb_per_s()
    }

    /// CPU time as average cores busy over the upload.
    pub fn cores(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9)
    }

    /// Cores busy with anything but the API, this client and Redis: kernel threads (disk
    /// writeback) and any other process. High values mean the run was disturbed.
    pub fn other_cores(&self) -> f64 {
        let ours = self.api_cpu.total() + self.client_cpu.total() + self.redis_cpu;
        (self.machine.busy - self.cores(ours)).max(0.0)
    }

    /// Whether other work competed for the cores while this ran.
    pub fn disturbed(&self) -> bool {
        self.other_cores() >= DISTURBED_CORES
    }

    /// The disk limit this configuration is compared with: the mean of (a) just before and
    /// just after it, in MB/s.
    pub fn disk_limit(&self) -> f64 {
        (self.disk_before.mb_per_s() + self.disk_after.mb_per_s()) / 2.0
    }
}

/// Runs the benchmark, prints the report, and writes it into the docs when asked.
pub fn run(args: &IngestArgs) -> anyhow::Result<()> {
    check_args(args)?;
    let mut redis = args.run.redis()?;
    let results = WorkDir::within(&args.run.dir, |work| measure(args, work, &mut redis))?;
    report::report(&results).publish(&args.run)
}

fn check_args(args: &IngestArgs) -> anyhow::Result<()> {
    check_binaries(&[(&args.api_bin, "--api-bin")], BUILD_API)?;
    ensure!(
        usize::try_from(args.size).is_ok(),
        "--size does not fit in memory on this platform"
    );
    ensure!(
        !args.clients.is_empty(),
        "--clients needs at least one count"
    );
    if args.clients.contains(&0) || args.rss_clients == 0 || args.rss_repeats == 0 {
        bail!("client counts and --rss-repeats must be at least 1");
    }
    Ok(())
}

fn measure(
    args: &IngestArgs,
    work: &WorkDir,
    redis: &mut redis::Connection,
) -> anyhow::Result<IngestResults> {
    let machine = Machine::describe(work.path())?;
    if machine.work_fs.is_memory() {
        eprintln!(
            "warning: {} is on {}: the disk baseline will measure memory, not a disk",
            work.path().display(),
            machine.work_fs.fs_type
        );
    }
    let size = usize::try_from(args.size).context("--size does not fit in memory")?;
    let block = usize::try_from(args.chunk_size).context("--chunk-size does not fit in memory")?;

    progress(format!(
        "generating {} of pseudo-random bytes",
        crate::report::size(args.size)
    ));
    let source = Source::random(size, args.chunk_size, SEED).shared();

    progress("(b) MD5 on one core");
    let (md5, _) = baseline::md5_one_core(&source.bytes, block);
    progress(format!("    {:.0} MB/s", md5.mb_per_s()));

    progress("computing chunk digests (outside the timed runs)");
    let payload = Payload::new(source.clone());
    let rss_payload = Payload::new(source.with_chunk_size(args.rss_chunk_size));

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
        bytes: &source.bytes,
        block,
        max_chunk: args.chunk_size.max(args.rss_chunk_size).max(64 << 20),
        busy_waits: 0,
    };
    let idle_rss = bench.idle_rss()?;
    let disk_first = bench.disk()?;
    let mut disk_before = bench.disk()?;
    let mut runs = Vec::new();
    for &clients in &args.clients {
        for &content_md5 in args.md5.modes() {
            let run = bench.run_undisturbed(&payload, clients, content_md5, disk_before)?;
            disk_before = run.disk_after;
            runs.push(run);
        }
    }
    let mut rss_runs = Vec::new();
    for &content_md5 in args.md5.modes() {
        for _ in 0..args.rss_repeats {
            let run =
                bench.run_undisturbed(&rss_payload, args.rss_clients, content_md5, disk_before)?;
            disk_before = run.disk_after;
            rss_runs.push(run);
        }
    }
    Ok(IngestResults {
        args: args.clone(),
        machine,
        disk_first,
        md5,
        runs,
        rss_runs,
        idle_rss,
        busy_waits: bench.busy_waits,
    })
}

fn progress(message: impl AsRef<str>) {
    eprintln!("stitch-bench ingest: {}", message.as_ref());
}

/// What every configuration needs.
struct Bench<'a> {
    args: &'a IngestArgs,
    work: &'a WorkDir,
    services: &'a Services,
    /// For Redis's CPU time.
    redis: &'a mut redis::Connection,
    runtime: &'a tokio::runtime::Runtime,
    /// The payload, for (a).
    bytes: &'a [u8],
    /// Write size of (a).
    block: usize,
    /// `STITCH__LIMITS__MAX_CHUNK_BYTES` for the API processes.
    max_chunk: u64,
    /// Times `--wait-idle` ran out.
    busy_waits: usize,
}

impl Bench<'_> {
    /// (a): the payload written to the work directory and fsynced, then removed.
    fn disk(&mut self) -> anyhow::Result<Throughput> {
        if self.args.run.wait_idle > 0 {
            let timeout = Duration::from_secs(self.args.run.wait_idle);
            if !procfs::wait_until_idle(IDLE_CORES, timeout)? {
                progress(format!(
                    "warning: the machine is still busy after {timeout:?}"
                ));
                self.busy_waits += 1;
            }
        }
        let t = baseline::disk_write(&self.work.join("disk-baseline.bin"), self.bytes, self.block)?;
        progress(format!(
            "(a) sequential write + fsync: {:.0} MB/s",
            t.mb_per_s()
        ));
        Ok(t)
    }

    /// A fresh namespace with an API process on it.
    fn start_api(&self) -> anyhow::Result<Deployment> {
        let env = TestEnv::deployed("bench", self.work.path(), Some(self.services))
            .context("creating a storage directory")?;
        let mut deployment = Deployment::new(env);
        let settings = [
            (
                "STITCH__LIMITS__MAX_CHUNK_BYTES",
                self.max_chunk.to_string(),
            ),
            // Keys a crashed run leaves behind expire soon (the minimum TTL is 60 s).
            ("STITCH__UPLOADS__TTL", "1h".to_owned()),
        ];
        deployment.start(Role::Api, &self.args.api_bin, &settings, &[])?;
        Ok(deployment)
    }

    /// Peak RSS of an API process that started and served nothing.
    fn idle_rss(&mut self) -> anyhow::Result<u64> {
        let deployment = self.start_api()?;
        let rss = deployment.process(Role::Api)?.peak_rss();
        let stopped = deployment.stop();
        let rss = rss?;
        stopped?;
        Ok(rss)
    }

    /// [`Self::run`], repeated (up to `--retries` times) while other work disturbed it.
    fn run_undisturbed(
        &mut self,
        payload: &Payload,
        clients: usize,
        content_md5: bool,
        disk_before: Throughput,
    ) -> anyhow::Result<RunResult> {
        let mut run = self.run(payload, clients, content_md5, disk_before)?;
        while run.disturbed() && run.discarded < self.args.run.retries {
            progress(format!(
                "    disturbed ({:.2} cores of other work): repeating",
                run.other_cores()
            ));
            let discarded = run.discarded + 1;
            run = self.run(payload, clients, content_md5, run.disk_after)?;
            run.discarded = discarded;
        }
        Ok(run)
    }

    /// One configuration, start to finish: a fresh API, the upload, the checks, the peak
    /// RSS, then SIGTERM and clean-up (also when something failed), then (a) again.
    fn run(
        &mut self,
        payload: &Payload,
        clients: usize,
        content_md5: bool,
        disk_before: Throughput,
    ) -> anyhow::Result<RunResult> {
        let chunk_size = payload.source.chunk_size;
        progress(format!(
            "(c) {clients} client(s), {} chunks, Content-MD5 {}",
            crate::report::size(chunk_size),
            if content_md5 { "on" } else { "off" }
        ));
        let deployment = self.start_api()?;
        let api = deployment.process(Role::Api)?;
        let job = UploadJob {
            content_md5,
            ..UploadJob::all(
                api.addr,
                format!("bench-{:016x}", rand::random::<u64>()),
                payload.clone(),
                clients,
            )
        };
        let measured = self.upload_and_check(api, &deployment.env, &job);
        let peak_rss = api.peak_rss();
        let log = api.log_tail();
        let exits = deployment.stop();
        let (outcome, usage) =
            measured.with_context(|| format!("the API's last output:\n{log}"))?;
        let exit = exits?
            .first()
            .map(|(_, exit)| *exit)
            .context("the API's exit status")?;
        let mut result = RunResult {
            clients,
            chunk_size,
            chunks: payload.chunks(),
            content_md5,
            outcome,
            api_cpu: usage.api,
            client_cpu: usage.client,
            redis_cpu: usage.redis,
            machine: usage.machine,
            window: usage.window,
            peak_rss: peak_rss?,
            exit,
            disk_before,
            disk_after: disk_before,
            discarded: 0,
        };
        progress(format!(
            "    {:.0} MB/s, API {:.2} cores, client {:.2} cores, API peak RSS {}",
            result.mb_per_s(),
            result.cores(result.api_cpu.total()),
            result.cores(result.client_cpu.total()),
            crate::report::mib(result.peak_rss)
        ));
        result.disk_after = self.disk()?;
        Ok(result)
    }

    fn upload_and_check(
        &mut self,
        api: &ServiceProcess,
        env: &TestEnv,
        job: &UploadJob,
    ) -> anyhow::Result<(UploadOutcome, Usage)> {
        let before = Snapshot::take(api, self.redis)?;
        let outcome = self.runtime.block_on(send_upload(job))?;
        let after = Snapshot::take(api, self.redis)?;
        let usage = after.since(&before);
        let source = &job.payload.source;
        self.runtime
            .block_on(verify_status(job.addr, &job.upload_id, source))?;
        verify_stored(&env.storage_root, &job.upload_id, source)?;
        Ok((outcome, usage))
    }
}

/// CPU counters at one moment.
struct Snapshot {
    at: Instant,
    api: CpuTime,
    client: CpuTime,
    redis: Duration,
    machine: MachineCpu,
}

/// CPU used between two snapshots.
struct Usage {
    window: Duration,
    api: CpuTime,
    client: CpuTime,
    redis: Duration,
    machine: MachineCores,
}

impl Snapshot {
    fn take(api: &ServiceProcess, redis: &mut redis::Connection) -> anyhow::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            api: procfs::cpu_time(api.pid()).context("reading the CPU time of stitch-api")?,
            client: procfs::own_cpu_time()?,
            redis: redis_cpu_time(redis)?,
            machine: MachineCpu::read()?,
        })
    }

    fn since(&self, before: &Snapshot) -> Usage {
        let window = self.at.duration_since(before.at);
        Usage {
            window,
            api: self.api.since(&before.api),
            client: self.client.since(&before.client),
            redis: self.redis.saturating_sub(before.redis),
            machine: self.machine.cores_since(&before.machine, window),
        }
    }
}
