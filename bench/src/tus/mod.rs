//! `stitch-bench tus`: how fast `stitch-api` takes an upload over tus compared with the chunk
//! protocol and with the disk, and whether its memory depends on how long a `PATCH` is.
//!
//! One run measures, in this order:
//! 1. (a) a sequential write of the payload in `--chunk-size` writes to the work directory,
//!    one fsync at the end (the ingest benchmark's disk baseline): once to start, then after
//!    every upload, so that each upload is compared with the disk as it was around it;
//! 2. the same `--size` payload uploaded `--repeats` times in each of three ways, in rotating
//!    order (A B C, B C A, C A B, …) so that a drift of the machine weighs on all alike:
//!    - the chunk protocol, one client sending `--chunk-size` chunks in order, no MD5 (the
//!      single-stream rate tus is held to);
//!    - tus, the whole payload in one `PATCH` whose body streams, which the server cuts into
//!      durable segments of `tus.segment_size`;
//!    - tus, one `PATCH` of `--chunk-size` after the other;
//! 3. one more upload in one `PATCH` of `--large-size`, for the API's peak RSS.
//!
//! Each upload has a fresh API process (so that its `VmHWM` is that upload's), namespace and
//! storage directory. CPU is read from `/proc` around the upload (the API, this client, Redis,
//! RabbitMQ, kernel threads, the machine). Each upload is checked: every answer; for tus the
//! `HEAD` offset and length, and the status (`bytes_received` = the size, one segment per
//! `tus.segment_size` of each `PATCH` body); the pieces on storage; then a `stitch-worker`
//! started after the measurement merges the upload, and its status (`completed`, size, MD5)
//! and the merged file, read back and hashed, are checked (`--no-merge` checks the stored
//! bytes instead, without a worker or RabbitMQ).

mod client;
mod report;

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use stitch_testkit::{Services, Source, TestEnv};

use crate::baseline::{self, Throughput};
use crate::deployment::{BUILD_ALL, Deployment, Role, check_binaries, wait_for_broker};
use crate::machine::Machine;
use crate::options::{RunArgs, parse_size};
use crate::upload::{Payload, UploadJob, send_upload};
use crate::usage::{CpuSnapshot, CpuUsage, DISTURBED_CORES, Watched, wait_for_idle};
use crate::verify::{
    get_status, status_client, stored_segment_files, verify_completed, verify_merged_file,
    verify_merged_status, verify_status, verify_stored, verify_tus_status, wait_until_completed,
};
use crate::workdir::WorkDir;

pub use self::client::{Repeated, TusJob, TusOutcome, send_tus};

/// What `stitch-bench tus --help` says about it.
pub const LONG_ABOUT: &str = "tus ingest against the chunk protocol and the disk, and the API's memory per PATCH size.\n\n\
        Uploads --size through fresh stitch-api processes, --repeats times each and in rotating \
        order: with the chunk protocol (one client, --chunk-size chunks in order, no MD5), with \
        tus in one PATCH (one streaming body), and with tus in PATCHes of --chunk-size; then \
        once more in one PATCH of --large-size. Measures each against a sequential write of \
        the same bytes with one fsync (before the first upload and after each), with the \
        API's CPU per GiB and peak RSS. Judges the issue's targets: one PATCH at least 0.9 × \
        the chunk protocol's single-stream rate, and the API's peak RSS the same for one \
        PATCH as for small ones, at any size. Every upload is verified (answers, HEAD, status, \
        storage) and, unless --no-merge, merged by a stitch-worker and its MD5 checked.";

/// Seed of the payload: fixed, so that every run sends the same bytes.
const SEED: u64 = 0x5717_c4e5_b3a1_0004;
/// How long to wait for RabbitMQ to accept connections before the first upload.
const BROKER_WAIT: Duration = Duration::from_secs(300);
/// Interval of the status requests while a merge runs.
const POLL: Duration = Duration::from_millis(20);

#[derive(clap::Args, Debug, Clone)]
pub struct TusArgs {
    /// Bytes per upload, and for the disk baseline.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size of the chunk-protocol uploads, length of the small PATCHes, size of the
    /// pieces the one-PATCH body streams in, and write size of the disk baseline.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Uploads of each kind (chunk protocol, one PATCH, small PATCHes).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Size of one more upload in one PATCH (its bytes are the payload's, repeated), to show
    /// that the API's memory does not grow with the PATCH; 0 to skip it.
    #[arg(long, default_value = "4GiB", value_parser = parse_size_or_zero)]
    pub large_size: u64,
    /// `STITCH__TUS__SEGMENT_SIZE` of the API processes; the API's default when not given.
    #[arg(long, value_parser = parse_size)]
    pub segment_size: Option<u64>,
    /// Do not merge the uploads: check the bytes stored instead. No worker runs and RabbitMQ
    /// is not needed (the merge job stays in the upload's outbox).
    #[arg(long)]
    pub no_merge: bool,
    /// The `stitch-api` binary.
    #[arg(long, default_value = "target/release/stitch-api")]
    pub api_bin: PathBuf,
    /// The `stitch-worker` binary that merges each upload after its measurement.
    #[arg(long, default_value = "target/release/stitch-worker")]
    pub worker_bin: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

fn parse_size_or_zero(raw: &str) -> Result<u64, String> {
    if raw.trim() == "0" {
        Ok(0)
    } else {
        parse_size(raw)
    }
}

/// How an upload sends its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The chunk protocol: one client, `--chunk-size` chunks in order, no MD5.
    Chunks,
    /// tus: the whole upload in one `PATCH`.
    OnePatch,
    /// tus: `PATCH`es of `--chunk-size`, one after the other.
    Patches,
}

impl Kind {
    /// The kinds every round uploads, in the first round's order.
    pub const ALL: [Kind; 3] = [Kind::Chunks, Kind::OnePatch, Kind::Patches];

    /// The order of round `round` (from 0): A B C, B C A, C A B, A B C, … so that each kind
    /// runs first, second and last equally often.
    pub fn in_round(round: usize) -> [Kind; 3] {
        let mut order = Self::ALL;
        order.rotate_left(round % Self::ALL.len());
        order
    }

    /// What the report calls it.
    pub fn name(self, chunk_size: u64) -> String {
        let chunk = crate::report::size(chunk_size);
        match self {
            Self::Chunks => format!("chunk protocol, 1 client × {chunk} chunks"),
            Self::OnePatch => "tus, one PATCH".to_owned(),
            Self::Patches => format!("tus, {chunk} PATCHes"),
        }
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct TusResults {
    pub args: TusArgs,
    pub machine: Machine,
    /// `tus.segment_size` of the API processes.
    pub segment_size: u64,
    /// (a), the first time: a write to blocks the disk may not have seen for a while.
    pub disk_first: Throughput,
    /// The uploads of `--size`, in the order run.
    pub runs: Vec<TusRun>,
    /// The upload of `--large-size` in one PATCH.
    pub large: Option<TusRun>,
    /// Peak RSS of an API process that has just started and served nothing.
    pub idle_rss: u64,
    /// Times the machine was still busy when `--wait-idle` ran out.
    pub busy_waits: usize,
}

impl TusResults {
    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &TusRun> {
        self.runs.iter().filter(move |r| r.kind == kind)
    }

    /// Every upload, the large one last.
    pub fn all_runs(&self) -> impl Iterator<Item = &TusRun> {
        self.runs.iter().chain(&self.large)
    }

    /// Every (a) measurement between uploads, in MB/s, in order.
    pub fn disk_rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self.all_runs().map(|r| r.disk_before.mb_per_s()).collect();
        rates.extend(self.all_runs().last().map(|r| r.disk_after.mb_per_s()));
        rates
    }
}

/// One upload through one fresh API process.
#[derive(Clone, Debug)]
pub struct TusRun {
    pub kind: Kind,
    pub size: u64,
    /// HTTP requests of the upload (chunks; or the `POST` and the `PATCH`es).
    pub requests: usize,
    /// Files the upload is stored as: chunks, or segments.
    pub pieces: usize,
    /// First request sent to last answer read.
    pub elapsed: Duration,
    /// CPU over the upload.
    pub usage: CpuUsage,
    /// `VmHWM` of the API process right after the upload.
    pub peak_rss: u64,
    /// Whether a worker merged the upload and its MD5 was checked.
    pub merged: bool,
    pub unclean_exits: Vec<String>,
    /// (a) just before and just after this upload.
    pub disk_before: Throughput,
    pub disk_after: Throughput,
    /// Earlier runs of this upload discarded as disturbed.
    pub discarded: usize,
}

impl TusRun {
    pub fn mb_per_s(&self) -> f64 {
        Throughput {
            bytes: self.size,
            elapsed: self.elapsed,
        }
        .mb_per_s()
    }

    /// The mean of (a) just before and just after, in MB/s.
    pub fn disk_limit(&self) -> f64 {
        (self.disk_before.mb_per_s() + self.disk_after.mb_per_s()) / 2.0
    }

    /// CPU seconds of the processes labelled `label` per GiB uploaded.
    pub fn cpu_per_gib(&self, label: &str) -> f64 {
        self.usage.cpu(label).total().as_secs_f64() / (self.size as f64 / (1u64 << 30) as f64)
    }

    pub fn disturbed(&self) -> bool {
        self.usage.other_cores() >= DISTURBED_CORES
    }
}

/// Runs the benchmark, prints the report, and writes it into the docs when asked.
pub fn run(args: &TusArgs) -> anyhow::Result<()> {
    check_args(args)?;
    args.run.redis()?;
    let results = WorkDir::within(&args.run.dir, |work| measure(args, work))?;
    report::report(&results).publish(&args.run)
}

fn check_args(args: &TusArgs) -> anyhow::Result<()> {
    let mut binaries = vec![(&args.api_bin, "--api-bin")];
    if !args.no_merge {
        binaries.push((&args.worker_bin, "--worker-bin"));
    }
    check_binaries(&binaries, BUILD_ALL)?;
    ensure!(
        usize::try_from(args.size).is_ok() && usize::try_from(args.chunk_size).is_ok(),
        "--size does not fit in memory on this platform"
    );
    ensure!(args.repeats >= 1, "--repeats must be at least 1");
    Ok(())
}

fn progress(message: impl AsRef<str>) {
    eprintln!("stitch-bench tus: {}", message.as_ref());
}

fn measure(args: &TusArgs, work: &WorkDir) -> anyhow::Result<TusResults> {
    let machine = Machine::describe(work.path())?;
    if machine.work_fs.is_memory() {
        progress(format!(
            "warning: {} is on {}: the disk baseline will measure memory, not a disk",
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
    progress("computing digests (outside the timed runs)");
    let chunks = Payload::new(source.clone());
    let stream = Repeated::new(source.bytes.clone(), args.size)?;
    let large = (args.large_size > 0)
        .then(|| Repeated::new(source.bytes.clone(), args.large_size))
        .transpose()?;
    let md5 = |payload: &Repeated| (!args.no_merge).then(|| payload.md5_hex(1 << 20));
    let stream_md5 = md5(&stream);
    let large_md5 = large.as_ref().and_then(md5);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    if !args.no_merge {
        runtime.block_on(wait_for_broker(&args.run.amqp_url, BROKER_WAIT))?;
    }
    let services = args.run.services();
    let segment_size = args
        .segment_size
        .unwrap_or(stitch_common::config::TusSettings::default().segment_size.0);
    let mut bench = Bench {
        args,
        work,
        services: &services,
        runtime: &runtime,
        chunks,
        segment_size,
        busy_waits: 0,
    };
    let idle_rss = bench.idle_rss()?;
    let disk_first = bench.disk()?;
    let mut disk_before = bench.disk()?;
    let mut runs = Vec::new();
    for round in 0..args.repeats {
        for kind in Kind::in_round(round) {
            let payload = Upload {
                kind,
                stream: &stream,
                md5: stream_md5.as_deref(),
            };
            let run = bench.run_undisturbed(&payload, disk_before)?;
            disk_before = run.disk_after;
            runs.push(run);
        }
    }
    let large = match &large {
        Some(payload) => {
            let upload = Upload {
                kind: Kind::OnePatch,
                stream: payload,
                md5: large_md5.as_deref(),
            };
            Some(bench.run_undisturbed(&upload, disk_before)?)
        }
        None => None,
    };
    Ok(TusResults {
        args: args.clone(),
        machine,
        segment_size,
        disk_first,
        runs,
        large,
        idle_rss,
        busy_waits: bench.busy_waits,
    })
}

/// What one upload sends.
struct Upload<'a> {
    kind: Kind,
    /// The bytes, for tus (the chunk protocol sends [`Bench::chunks`], the same bytes).
    stream: &'a Repeated,
    /// MD5 of the bytes (hex), to check the merge; `None` with `--no-merge`.
    md5: Option<&'a str>,
}

/// What every upload needs.
struct Bench<'a> {
    args: &'a TusArgs,
    work: &'a WorkDir,
    services: &'a Services,
    runtime: &'a tokio::runtime::Runtime,
    /// The payload as chunks, with their digests.
    chunks: Payload,
    /// `tus.segment_size` of the API processes.
    segment_size: u64,
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

    /// (a): the payload written to the work directory in `--chunk-size` writes and fsynced,
    /// then removed.
    fn disk(&mut self) -> anyhow::Result<Throughput> {
        self.wait_idle()?;
        let t = baseline::disk_write(
            &self.work.join("disk-baseline.bin"),
            &self.chunks.source.bytes,
            self.args.chunk_size as usize,
        )?;
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
        deployment.start(Role::Api, &self.args.api_bin, &self.settings(), &[])?;
        Ok(deployment)
    }

    /// The settings of the Stitch processes beyond their defaults.
    fn settings(&self) -> Vec<(&'static str, String)> {
        let mut settings = vec![
            // Keys a crashed run leaves behind expire soon (the minimum TTL is 60 s).
            ("STITCH__UPLOADS__TTL", "1h".to_owned()),
            (
                "STITCH__LIMITS__MAX_CHUNK_BYTES",
                self.args.chunk_size.max(128 << 20).to_string(),
            ),
        ];
        if let Some(segment_size) = self.args.segment_size {
            settings.push(("STITCH__TUS__SEGMENT_SIZE", segment_size.to_string()));
        }
        settings
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
        upload: &Upload<'_>,
        disk_before: Throughput,
    ) -> anyhow::Result<TusRun> {
        let mut run = self.run(upload, disk_before)?;
        while run.disturbed() && run.discarded < self.args.run.retries {
            progress(format!(
                "    disturbed ({:.2} cores of other work): repeating",
                run.usage.other_cores()
            ));
            let discarded = run.discarded + 1;
            run = self.run(upload, run.disk_after)?;
            run.discarded = discarded;
        }
        Ok(run)
    }

    /// One upload, start to finish: a fresh API, the upload, its peak RSS, the checks (and the
    /// merge), then SIGTERM and clean-up (also when something failed), then (a) again.
    fn run(&mut self, upload: &Upload<'_>, disk_before: Throughput) -> anyhow::Result<TusRun> {
        let size = upload.stream.len();
        progress(format!(
            "{}: {}",
            upload.kind.name(self.args.chunk_size),
            crate::report::size(size)
        ));
        self.wait_idle()?;
        let mut deployment = self.start_api()?;
        let measured = self
            .measure_upload(upload, &mut deployment, disk_before)
            .with_context(|| deployment.log_tails());
        let exits = deployment.stop();
        let mut run = measured?;
        run.unclean_exits = exits?
            .into_iter()
            .filter(|(_, exit)| !exit.success())
            .map(|(role, exit)| format!("{} ({exit})", role.label()))
            .collect();
        progress(format!(
            "    {:.0} MB/s, API {:.2} CPU s/GiB, API peak RSS {}",
            run.mb_per_s(),
            run.cpu_per_gib(Role::Api.label()),
            crate::report::mib(run.peak_rss)
        ));
        run.disk_after = self.disk()?;
        Ok(run)
    }

    fn measure_upload(
        &mut self,
        upload: &Upload<'_>,
        deployment: &mut Deployment,
        disk_before: Throughput,
    ) -> anyhow::Result<TusRun> {
        let api = deployment.process(Role::Api)?;
        let addr = api.addr;
        let mut watched = vec![
            Watched {
                label: Role::Api.label(),
                pid: api.pid(),
            },
            Watched::this_process(),
        ];
        watched.extend(Watched::services());
        let size = upload.stream.len();

        let before = CpuSnapshot::take(&watched)?;
        let sent = match upload.kind {
            Kind::Chunks => {
                let id = format!("bench-{:016x}", rand::random::<u64>());
                let job = UploadJob::all(addr, id.clone(), self.chunks.clone(), 1);
                let outcome = self.runtime.block_on(send_upload(&job))?;
                Sent {
                    upload_id: id,
                    elapsed: outcome.elapsed,
                    requests: self.chunks.chunks(),
                    tus: None,
                }
            }
            Kind::OnePatch | Kind::Patches => {
                let job = TusJob {
                    addr,
                    payload: upload.stream.clone(),
                    patch_size: (upload.kind == Kind::Patches).then_some(self.args.chunk_size),
                    piece: self.args.chunk_size as usize,
                };
                let outcome = self.runtime.block_on(send_tus(&job))?;
                Sent {
                    upload_id: outcome.upload_id.clone(),
                    elapsed: outcome.elapsed,
                    requests: outcome.requests,
                    tus: Some((job, outcome)),
                }
            }
        };
        let usage = CpuSnapshot::take(&watched)?.since(&before);
        let peak_rss = api.peak_rss()?;

        let root = deployment.env.storage_root.clone();
        let pieces = match &sent.tus {
            None => {
                let source = &self.chunks.source;
                self.runtime
                    .block_on(verify_status(addr, &sent.upload_id, source))?;
                verify_stored(&root, &sent.upload_id, source)?;
                self.chunks.chunks()
            }
            Some((job, outcome)) => {
                let segments = job.segments(self.segment_size);
                self.runtime.block_on(async {
                    let (offset, length) = client::head(addr, &outcome.url).await?;
                    ensure!(
                        offset == size && length == size,
                        "HEAD says Upload-Offset {offset}, Upload-Length {length}; expected {size} for both"
                    );
                    let status = get_status(&status_client(addr)?, &outcome.upload_id).await?;
                    verify_tus_status(&status, "merging", size, segments.len() as u64)
                })?;
                let files = stored_segment_files(&root, &outcome.upload_id, &segments)?;
                if upload.md5.is_none() {
                    verify_segment_bytes(&files, &segments, &job.payload)?;
                }
                segments.len()
            }
        };
        let merged = match upload.md5 {
            Some(md5) => {
                self.merge(deployment, addr, &sent, size, md5)?;
                true
            }
            None => false,
        };
        Ok(TusRun {
            kind: upload.kind,
            size,
            requests: sent.requests,
            pieces,
            elapsed: sent.elapsed,
            usage,
            peak_rss,
            merged,
            unclean_exits: Vec::new(),
            disk_before,
            disk_after: disk_before,
            discarded: 0,
        })
    }

    /// Starts a worker, which takes the merge job the API published when the last bytes were
    /// counted, waits for `completed`, and checks the status and the merged file.
    fn merge(
        &self,
        deployment: &mut Deployment,
        addr: std::net::SocketAddr,
        sent: &Sent,
        size: u64,
        md5: &str,
    ) -> anyhow::Result<()> {
        progress("    merging (not timed)");
        deployment.start(Role::Worker, &self.args.worker_bin, &self.settings(), &[])?;
        // Merges run at hundreds of MB/s; a merge at 10 MB/s has stalled.
        let limit = Duration::from_secs(120 + size / 10_000_000);
        let (_, status) =
            self.runtime
                .block_on(wait_until_completed(addr, &sent.upload_id, POLL, limit))?;
        match sent.tus {
            None => verify_completed(&status, &self.chunks.source, md5)?,
            Some(_) => verify_merged_status(&status, size, md5)?,
        }
        verify_merged_file(&deployment.env.storage_root, &sent.upload_id, size, md5)
    }
}

/// What the client did.
struct Sent {
    upload_id: String,
    elapsed: Duration,
    requests: usize,
    /// For tus: the job and what it took.
    tus: Option<(TusJob, TusOutcome)>,
}

/// Checks that the segment files hold the payload's bytes at their offsets (read back whole).
fn verify_segment_bytes(
    files: &[PathBuf],
    segments: &[(u64, u64)],
    payload: &Repeated,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    for (path, &(offset, len)) in files.iter().zip(segments) {
        buf.clear();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .with_context(|| format!("reading {}", path.display()))?;
        let mut at = 0;
        for piece in payload.pieces(offset..offset + len, usize::MAX) {
            ensure!(
                buf.get(at..at + piece.len()) == Some(&piece[..]),
                "{} does not hold the bytes sent at offset {}",
                path.display(),
                offset + at as u64
            );
            at += piece.len();
        }
        ensure!(at == buf.len(), "{} is too long", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_large_size_may_be_zero_but_sizes_not() {
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("4GiB"), Ok(4 << 30));
        assert!(parse_size_or_zero("none").is_err());
    }

    #[test]
    fn every_kind_runs_first_second_and_last_equally_often() {
        use Kind::{Chunks, OnePatch, Patches};
        assert_eq!(Kind::in_round(0), [Chunks, OnePatch, Patches]);
        assert_eq!(Kind::in_round(1), [OnePatch, Patches, Chunks]);
        assert_eq!(Kind::in_round(2), [Patches, Chunks, OnePatch]);
        assert_eq!(Kind::in_round(3), Kind::in_round(0));
    }

    #[test]
    fn stored_segments_must_hold_the_bytes_sent() {
        let dir = tempfile::tempdir().unwrap();
        let payload = Repeated::new(bytes::Bytes::from_static(b"abc"), 7).unwrap();
        let a = dir.path().join("s0");
        let b = dir.path().join("s4");
        std::fs::write(&a, b"abca").unwrap();
        std::fs::write(&b, b"bca").unwrap();
        let segments = [(0, 4), (4, 3)];
        verify_segment_bytes(&[a.clone(), b.clone()], &segments, &payload).unwrap();
        std::fs::write(&b, b"bcb").unwrap();
        assert!(verify_segment_bytes(&[a, b], &segments, &payload).is_err());
    }
}
