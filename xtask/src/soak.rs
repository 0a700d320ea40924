//! `cargo xtask soak`: builds `stitch-api`, `stitch-worker` (as shipped: no failpoints) and
//! the soak driver (`soak/`, package `stitch-soak`), then runs the driver, which starts its
//! own Redis and RabbitMQ and everything else (docs/reliability.md). `cargo xtask test`
//! ends with a short seeded run, skipped with `STITCH_SKIP_SOAK=1`.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

/// Set to skip the soak stage of `cargo xtask test`.
pub const SKIP_ENV: &str = "STITCH_SKIP_SOAK";
/// Overrides the minutes of the test command's soak.
pub const MINUTES_ENV: &str = "STITCH_SOAK_MINUTES";
/// The test command's soak: short, and always the same seed.
pub const TEST_MINUTES: f64 = 2.0;
pub const DEFAULT_SEED: u64 = 15;

pub struct Options {
    pub minutes: f64,
    pub seed: u64,
    pub release: bool,
    /// Passed on to the driver (`--clients 8`, `--max-rss-mib 256`...).
    pub driver_args: Vec<String>,
}

impl Options {
    /// The soak stage of `cargo xtask test`, or `None` when skipped.
    pub fn for_test_command() -> anyhow::Result<Option<Self>> {
        if std::env::var_os(SKIP_ENV).is_some_and(|v| v != "0") {
            println!("xtask: soak stage skipped ({SKIP_ENV} is set)");
            return Ok(None);
        }
        let minutes = match std::env::var(MINUTES_ENV) {
            Ok(m) => m
                .parse()
                .with_context(|| format!("{MINUTES_ENV}={m:?} is not a number of minutes"))?,
            Err(_) => TEST_MINUTES,
        };
        Ok(Some(Self {
            minutes,
            seed: DEFAULT_SEED,
            release: false,
            driver_args: Vec::new(),
        }))
    }
}

/// Builds and runs the soak; whether it passed.
pub fn run(root: &Path, target: &Path, work: &Path, options: &Options) -> anyhow::Result<bool> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build.args([
        "build",
        "-p",
        "stitch-api",
        "-p",
        "stitch-worker",
        "-p",
        "stitch-soak",
    ]);
    if options.release {
        build.arg("--release");
    }
    println!("xtask: building the soak's programs");
    let built = build
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(built.success(), "cargo build failed for the soak");
    let bin = target.join(if options.release { "release" } else { "debug" });
    println!(
        "xtask: soak for {} minutes, seed {}",
        options.minutes, options.seed
    );
    let status = Command::new(bin.join("stitch-soak"))
        .arg("--minutes")
        .arg(options.minutes.to_string())
        .arg("--seed")
        .arg(options.seed.to_string())
        .arg("--api-binary")
        .arg(bin.join("stitch-api"))
        .arg("--worker-binary")
        .arg(bin.join("stitch-worker"))
        .arg("--work-dir")
        .arg(work.join("soak"))
        .args(&options.driver_args)
        .current_dir(root)
        .status()
        .context("running stitch-soak")?;
    Ok(status.success())
}
