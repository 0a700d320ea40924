//! `cargo xtask`: the project's own tasks, in Rust so they run wherever cargo does.
//!
//! `cargo xtask test` is the one command that runs the whole test suite on a fresh machine:
//! 1. [`tools`]: installs what the tests run and the registries can give — Debian packages
//!    (Redis, RabbitMQ, nginx, promtool, Node.js, npm, Chromium and xfsprogs) when root, Python packages
//!    into a virtual environment under `target/xtask/venv` (never the system's Python), npm
//!    packages into `target/xtask/node` (the tus clients) and `target/xtask/node-ui` (the
//!    upload page's tus-js-client and playwright-core);
//! 2. [`services`]: uses the Redis and RabbitMQ named by `STITCH_TEST_REDIS_URL` and
//!    `STITCH_TEST_AMQP_URL`, or starts its own as child processes on free loopback ports,
//!    each with its own data, logs and configuration under `target/xtask/` (never the
//!    system's node, directories or services);
//! 3. runs the suite (nextest where installed, `cargo test` otherwise) with those URLs in the
//!    environment, the venv first on `PATH` and the npm packages in `STITCH_TEST_NODE_MODULES`
//!    and `STITCH_TEST_UI_NODE_MODULES`, and a directory on a file system that clones (an XFS
//!    image it loop-mounts, [`reflink`]) in `STITCH_TEST_REFLINK_DIR`,
//!    prints the runner's summary, and stops the services it started and unmounts the image —
//!    at the end, on failure and on Ctrl-C or SIGTERM ([`interrupt`]);
//! 4. [`fuzz`]: builds the fuzz targets of `fuzz/` and runs each for a short, seeded time
//!    (skipped with `STITCH_SKIP_FUZZ=1`);
//! 5. [`soak`]: a short seeded nemesis soak (skipped with `STITCH_SKIP_SOAK=1`), then exits
//!    with the runner's status, or failure if a fuzz target or the soak failed.
//!
//! `cargo xtask fuzz` runs step 4 alone, `cargo xtask soak` step 5 (for as long as asked).

mod fuzz;
mod interrupt;
mod reflink;
// The private RabbitMQ node's recipe, shared with the test kit's `RabbitServer` (by path:
// the recipe is `std` only, and xtask stays free of the workspace's dependencies).
#[path = "../../testkit/src/rabbitmq_node.rs"]
#[allow(dead_code)]
mod rabbitmq_node;
mod services;
mod soak;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Stitch's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests need, start Redis and RabbitMQ unless given, run every test.
    Test {
        /// Never install anything: fail with the missing tool's name instead.
        #[arg(long)]
        no_install: bool,
        /// Run with `cargo test` even where cargo-nextest is installed.
        #[arg(long)]
        cargo_test: bool,
        /// Passed on to the test runner (a filter, `--no-fail-fast`, `-p CRATE`...).
        #[arg(last = true)]
        runner_args: Vec<String>,
    },
    /// Build the fuzz targets and run each for a short, seeded time (docs/fuzzing.md).
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// The fuzzer's random seed.
        #[arg(long, default_value_t = fuzz::DEFAULT_SEED)]
        seed: u64,
        /// Targets run at once (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Never install cargo-fuzz: fail if it is missing.
        #[arg(long)]
        no_install: bool,
        /// Only these targets (default: all; `cargo fuzz list` names them).
        targets: Vec<String>,
    },
    /// Uploads through 2 APIs and 2 workers while a seeded nemesis kills, pauses and
    /// restarts them, Redis and RabbitMQ; then checks every promise (docs/reliability.md).
    Soak {
        /// How long the nemesis runs.
        #[arg(long, default_value_t = soak::TEST_MINUTES)]
        minutes: f64,
        /// Seeds the nemesis and the uploads.
        #[arg(long, default_value_t = soak::DEFAULT_SEED)]
        seed: u64,
        /// Build and run the release binaries.
        #[arg(long)]
        release: bool,
        /// Passed on to the soak driver (`--clients N`, `--max-rss-mib N`, `--drain-seconds N`).
        #[arg(last = true)]
        driver_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.task {
        Task::Test {
            no_install,
            cargo_test,
            runner_args,
        } => test(no_install, cargo_test, &runner_args),
        Task::Fuzz {
            seconds,
            seed,
            jobs,
            no_install,
            targets,
        } => {
            let options = fuzz::Options {
                seconds,
                seed,
                jobs: jobs.unwrap_or_else(fuzz::default_jobs),
                install: !no_install,
                targets,
            };
            let passed = fuzz::run(&workspace_root(), &target_dir(), &work_dir(), &options)?;
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Task::Soak {
            minutes,
            seed,
            release,
            driver_args,
        } => {
            let options = soak::Options {
                minutes,
                seed,
                release,
                driver_args,
            };
            let passed = soak::run(&workspace_root(), &target_dir(), &work_dir(), &options)?;
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The workspace root (this crate lives in `xtask/` beneath it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// cargo's target directory: `target` (or `CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where the tasks keep their files: `target/xtask`.
fn work_dir() -> PathBuf {
    target_dir().join("xtask")
}

/// Whether the runner's arguments choose packages themselves.
fn names_packages(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "--package" || a.starts_with("--package=") || a.starts_with("-p"))
}

fn test(
    no_install: bool,
    force_cargo_test: bool,
    runner_args: &[String],
) -> anyhow::Result<ExitCode> {
    let work = work_dir();
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let started = std::time::Instant::now();

    let tools = tools::prepare(&work, !no_install)?;
    // From here on, Ctrl-C or SIGTERM stops what the run started ([`interrupt`]).
    interrupt::install();
    // Started after the tools, which may have installed their programs. Dropping them (at
    // the end or on an error) stops them; the interrupt handler stops them on a signal.
    let services = services::Services::provide(&work)?;
    let reflink = reflink::ReflinkDir::provide(&work)?;

    let nextest = !force_cargo_test && tools::has_nextest();
    let mut runner = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // The whole suite, every failure reported, not only the first; or, when the arguments
    // name packages (`-p X`), those only (cargo ignores `-p` beside `--workspace`).
    if nextest {
        runner.args(["nextest", "run"]);
    } else {
        runner.arg("test");
    }
    if !names_packages(runner_args) {
        runner.arg("--workspace");
    }
    runner.arg("--no-fail-fast");
    runner
        .args(runner_args)
        .current_dir(workspace_root())
        .env("STITCH_TEST_REDIS_URL", services.redis_url())
        .env("STITCH_TEST_AMQP_URL", services.amqp_url())
        .env("STITCH_TEST_NODE_MODULES", tools.node_modules())
        .env("STITCH_TEST_UI_NODE_MODULES", tools.ui_node_modules())
        .env("STITCH_TEST_REFLINK_DIR", reflink.dir())
        .env("PATH", tools.path_with_tools()?);
    println!(
        "xtask: running the suite with {} (Redis {}, RabbitMQ {})",
        if nextest {
            "cargo nextest"
        } else {
            "cargo test"
        },
        services.redis_url(),
        services.amqp_url_redacted(),
    );
    let mut child = runner.spawn().context("starting the test runner")?;
    interrupt::runner_is(Some(child.id()));
    let status = child.wait().context("waiting for the test runner")?;
    interrupt::hold_if_interrupted();
    interrupt::runner_is(None);
    drop(services);
    drop(reflink);
    println!(
        "xtask: the suite {} in {:.0?}",
        if status.success() { "passed" } else { "FAILED" },
        started.elapsed()
    );

    // After the suite, whatever its result: both are reported.
    let fuzz_passed = match fuzz::Options::for_test_command(!no_install)? {
        Some(options) => fuzz::run(&workspace_root(), &target_dir(), &work, &options)?,
        None => true,
    };
    // The soak starts its own Redis and RabbitMQ, whatever the suite used.
    let soak_passed = match soak::Options::for_test_command()? {
        Some(options) => soak::run(&workspace_root(), &target_dir(), &work, &options)?,
        None => true,
    };
    Ok(match status.code() {
        Some(0) if fuzz_passed && soak_passed => ExitCode::SUCCESS,
        Some(0) => ExitCode::FAILURE,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
