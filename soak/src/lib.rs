//! The nemesis soak (`cargo xtask soak --minutes N --seed S`): Stitch as deployed — its own
//! Redis with an append-only file, its own RabbitMQ, 2 `stitch-api` and 2 `stitch-worker`
//! processes ([`cluster`]) — takes uploads of mixed sizes over both protocols from patient
//! clients ([`client`]) while a seeded [`nemesis`] kills, freezes and restarts the processes
//! and kills and restarts Redis and RabbitMQ. When the nemesis stops, the clients finish what
//! they were on, and the [`checker`] checks every promise; the resident memory of every
//! process is sampled throughout. The summary says what happened; the exit status is failure
//! on any violation.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod nemesis;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
pub use checker::md5_hex;
use clap::Parser;
use stitch_testkit::events::DurableTap;

use crate::cluster::{Cluster, Role};

#[derive(Parser, Debug)]
#[command(
    name = "stitch-soak",
    about = "Uploads through 2 APIs and 2 workers while a seeded nemesis kills, pauses and restarts them, Redis and RabbitMQ; then checks that nothing acknowledged was lost or duplicated"
)]
pub struct Options {
    /// How long the nemesis runs (the clients start uploads for as long).
    #[arg(long, default_value_t = 2.0)]
    pub minutes: f64,
    /// Seeds the nemesis and the uploads (sizes, protocols, orders).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Clients uploading at once.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// How long the clients may take to finish their uploads once the nemesis stopped.
    #[arg(long, default_value_t = 180)]
    pub drain_seconds: u64,
    /// The most a client waits between two uploads, in ms (a random share of it): what keeps
    /// a long soak's storage within a disk.
    #[arg(long, default_value_t = 1000)]
    pub think_ms: u64,
    /// The most resident memory any API or worker process may reach, in MiB.
    #[arg(long, default_value_t = 512)]
    pub max_rss_mib: u64,
    #[arg(long)]
    pub api_binary: PathBuf,
    #[arg(long)]
    pub worker_binary: PathBuf,
    /// Where the soak keeps its broker's files (its logs among them).
    #[arg(long)]
    pub work_dir: PathBuf,
}

pub fn main() -> ExitCode {
    let options = Options::parse();
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the soak; whether every check passed.
pub fn run(options: &Options) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&options.work_dir)
        .with_context(|| format!("creating {}", options.work_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    println!(
        "soak: seed {}, {} minutes, {} clients; starting Redis (append-only), RabbitMQ, 2 APIs and 2 workers",
        options.seed, options.minutes, options.clients
    );
    let cluster = Cluster::start(
        &options.work_dir,
        &options.api_binary,
        &options.worker_binary,
    )?;
    let env = cluster.env.clone();
    let apis = cluster.api_addrs();
    let tap = runtime.block_on(DurableTap::start(&env))?;
    let cluster = Arc::new(Mutex::new(cluster));

    let nemesis_time = Duration::from_secs_f64(options.minutes * 60.0);
    let began = std::time::Instant::now();
    let until = began + nemesis_time;
    let stop_new = tokio::time::Instant::now() + nemesis_time;
    let hard_stop = stop_new + Duration::from_secs(options.drain_seconds);
    let ctx = Arc::new(client::Ctx::new(
        apis.clone(),
        stop_new,
        hard_stop,
        Duration::from_millis(options.think_ms),
    ));

    // Resident memory, sampled every second from /proc, the highest per role.
    let peaks = Arc::new(Mutex::new([0u64; 2]));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (cluster, peaks, sampling) = (cluster.clone(), peaks.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                let now = cluster.lock().unwrap_or_else(|e| e.into_inner()).rss();
                let mut peaks = peaks.lock().unwrap_or_else(|e| e.into_inner());
                for (role, rss) in now {
                    let i = usize::from(role == Role::Worker);
                    peaks[i] = peaks[i].max(rss);
                }
                drop(peaks);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let clients: Vec<_> = (0..options.clients)
        .map(|i| {
            let seed = options.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1);
            runtime.spawn(client::run_client(ctx.clone(), seed))
        })
        .collect();
    let nemesis = {
        let cluster = cluster.clone();
        let seed = options.seed;
        std::thread::spawn(move || nemesis::run(cluster, seed, until))
    };
    let nemesis_log = nemesis
        .join()
        .map_err(|_| anyhow::anyhow!("the nemesis panicked"))??;
    println!(
        "soak: the nemesis stopped after {} faults; the clients finish their uploads",
        nemesis_log.actions.len()
    );
    runtime.block_on(async {
        for client in clients {
            let _ = client.await;
        }
    });
    let records = ctx.records();
    println!(
        "soak: {} uploads started; checking (the workers' sweepers get {:?} to rescue any stuck merge)",
        records.len(),
        cluster::STUCK_MERGE_HORIZON
    );
    let api = stitch_testkit::ApiClient::new(apis[0]);
    let checker = checker::Checker {
        env: &env,
        api,
        tap: &tap,
    };
    let mut findings = runtime.block_on(checker.check(&records))?;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let [api_peak, worker_peak] = *peaks.lock().unwrap_or_else(|e| e.into_inner());
    let bound = options.max_rss_mib << 20;
    for (role, peak) in [("API", api_peak), ("worker", worker_peak)] {
        if peak > bound {
            findings.violations.push(format!(
                "an {role} process reached {} MiB resident, above the bound of {} MiB",
                peak >> 20,
                options.max_rss_mib
            ));
        }
    }
    for problem in &nemesis_log.problems {
        findings.violations.push(format!("process: {problem}"));
    }

    summarize(
        options,
        began.elapsed(),
        &nemesis_log,
        &records,
        &findings,
        [api_peak, worker_peak],
        &cluster,
    );
    // The namespace's keys and queues go while Redis and RabbitMQ still run.
    drop(tap);
    drop(env);
    drop(cluster);
    Ok(findings.violations.is_empty())
}

fn summarize(
    options: &Options,
    elapsed: Duration,
    nemesis: &nemesis::Log,
    records: &[client::UploadRecord],
    findings: &checker::Findings,
    peaks: [u64; 2],
    cluster: &Mutex<Cluster>,
) {
    let count = |word: &str| nemesis.actions.iter().filter(|a| a.contains(word)).count();
    let by = |p: client::Protocol| records.iter().filter(|r| r.spec.protocol == p).count();
    let acked = records.iter().filter(|r| r.all_acked).count();
    let retries: u32 = records.iter().map(|r| r.retries).sum();
    let lost: u32 = records.iter().map(|r| r.lost_creations).sum();
    let starts: Vec<String> = cluster
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .slots
        .iter()
        .map(|s| format!("{} {}", s.label(), s.starts))
        .collect();
    println!("soak: ---- summary ----");
    println!(
        "soak: seed {}, nemesis {:.1} min, whole run {:.0?}",
        options.seed, options.minutes, elapsed
    );
    println!(
        "soak: faults {}: {} SIGKILL of a process, {} SIGSTOP/SIGCONT, {} SIGTERM + restart, {} Redis kill + restart, {} RabbitMQ kill + restart",
        nemesis.actions.len(),
        count("SIGKILL api") + count("SIGKILL worker"),
        count("SIGSTOP"),
        count("SIGTERM"),
        count("Redis"),
        count("RabbitMQ"),
    );
    println!("soak: process starts: {}", starts.join(", "));
    println!(
        "soak: uploads {} ({} chunk protocol, {} tus), {} fully acknowledged, {} completed and verified ({:.1} MiB), {} unfinished and resumable",
        records.len(),
        by(client::Protocol::Chunks),
        by(client::Protocol::Tus),
        acked,
        findings.completed,
        findings.completed_bytes as f64 / (1 << 20) as f64,
        findings.resumable,
    );
    println!(
        "soak: client retries {retries}, tus creations whose answer was lost {lost}; distinct completion event ids {}",
        findings.completion_events
    );
    println!(
        "soak: peak RSS: API {} MiB, worker {} MiB (bound {} MiB)",
        peaks[0] >> 20,
        peaks[1] >> 20,
        options.max_rss_mib
    );
    if findings.violations.is_empty() {
        println!("soak: PASSED: no violation");
    } else {
        println!("soak: FAILED: {} violations", findings.violations.len());
        for v in &findings.violations {
            println!("soak:   {v}");
        }
    }
}
