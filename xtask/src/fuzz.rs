//! The fuzz stage: the `cargo fuzz` targets of `fuzz/` (the parsers that face untrusted
//! input), each run for a short, seeded, bounded time. `cargo xtask fuzz` runs it alone;
//! `cargo xtask test` runs it after the suite. docs/fuzzing.md says how to run the targets
//! for hours and how to reproduce a crash.
//!
//! 1. cargo-fuzz is installed when missing: a debug build (it only drives cargo, and builds
//!    in half the time of a release one), pinned, `--locked`.
//! 2. Every target is built once, in `target/fuzz`, unoptimised (`--dev`) and without a
//!    sanitizer (`-s none`): on two cores that builds the whole dependency tree in about a
//!    quarter of the time of cargo-fuzz's default (optimised, AddressSanitizer), and the code
//!    under test has no `unsafe` for a sanitizer to watch; panics, failed assertions and
//!    arithmetic overflow (debug assertions stay on) are what the targets look for.
//!    cargo-fuzz passes nightly-only flags; `RUSTC_BOOTSTRAP=1` lets a stable toolchain take
//!    them.
//! 3. Each target runs from its committed seeds (`fuzz/corpus/<target>`, only read) and a
//!    working corpus under `target/xtask/fuzz/corpus/<target>` (what the fuzzer finds, kept
//!    between runs), with a fixed seed, for a fixed time, as many at once as there are cores.
//!    One line per target; a crash fails the stage, and its input stays in
//!    `fuzz/artifacts/<target>/` with the command that reproduces it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context as _, bail};

/// The cargo-fuzz installed when none is (the one these flags were checked with).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Skips the fuzz stage of `cargo xtask test` when set to anything but `0` (CI never sets it).
pub const SKIP_ENV: &str = "STITCH_SKIP_FUZZ";
/// Seconds per target in `cargo xtask test` (default [`DEFAULT_SECONDS`]).
pub const SECONDS_ENV: &str = "STITCH_FUZZ_SECONDS";
pub const DEFAULT_SECONDS: u64 = 10;
/// The fuzzer's seed unless one is given: a run is repeatable as far as a time bound allows.
pub const DEFAULT_SEED: u64 = 20_261_106;

/// Build flags, the same for `build` and `run` (so `run` finds the build up to date) and in
/// the reproduce command printed on a crash.
const BUILD_FLAGS: [&str; 3] = ["--dev", "--sanitizer", "none"];

pub struct Options {
    /// Seconds each target runs.
    pub seconds: u64,
    pub seed: u64,
    /// Targets run at once.
    pub jobs: usize,
    /// Install cargo-fuzz when missing (otherwise fail, naming it).
    pub install: bool,
    /// Only these targets (all of them when empty).
    pub targets: Vec<String>,
}

impl Options {
    /// The stage as `cargo xtask test` runs it: `None` when skipped.
    pub fn for_test_command(install: bool) -> anyhow::Result<Option<Self>> {
        if std::env::var_os(SKIP_ENV).is_some_and(|v| v != "0") {
            println!("xtask: fuzz stage skipped ({SKIP_ENV} is set)");
            return Ok(None);
        }
        let seconds = match std::env::var(SECONDS_ENV) {
            Ok(s) => s
                .parse()
                .with_context(|| format!("{SECONDS_ENV}={s:?} is not a number of seconds"))?,
            Err(_) => DEFAULT_SECONDS,
        };
        Ok(Some(Self {
            seconds,
            seed: DEFAULT_SEED,
            jobs: default_jobs(),
            install,
            targets: Vec::new(),
        }))
    }
}

/// As many targets at once as there are cores.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Builds and runs the targets; whether every one passed.
pub fn run(root: &Path, target_dir: &Path, work: &Path, options: &Options) -> anyhow::Result<bool> {
    let started = Instant::now();
    ensure_cargo_fuzz(options.install)?;
    let fuzz = Fuzz {
        root: root.to_path_buf(),
        target_dir: target_dir.join("fuzz"),
        work: work.join("fuzz"),
    };
    let all = fuzz.list()?;
    let targets = if options.targets.is_empty() {
        all
    } else {
        if let Some(unknown) = options.targets.iter().find(|t| !all.contains(t)) {
            bail!("no fuzz target {unknown:?}; there are: {}", all.join(", "));
        }
        options.targets.clone()
    };

    println!(
        "xtask: building the fuzz targets in {}",
        fuzz.target_dir.display()
    );
    let build_started = Instant::now();
    fuzz.build()?;
    let jobs = options.jobs.clamp(1, targets.len().max(1));
    println!(
        "xtask: fuzz targets built in {:.0?}; running each for {} s (seed {}, {jobs} at once)",
        build_started.elapsed(),
        options.seconds,
        options.seed,
    );

    let queue = Mutex::new(targets.iter().cloned().collect::<VecDeque<_>>());
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some(target) = next else { break };
                    let outcome = fuzz.run_target(&target, options);
                    let passed = matches!(outcome, Ok(Outcome::Passed { .. }));
                    // One print per target, so lines of parallel runs never interleave.
                    println!("{}", fuzz.describe(&target, &outcome));
                    if !passed {
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(target);
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    println!(
        "xtask: the fuzz stage {} in {:.0?}{}",
        if failed.is_empty() {
            "passed"
        } else {
            "FAILED"
        },
        started.elapsed(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({})", failed.join(", "))
        }
    );
    Ok(failed.is_empty())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // cargo-fuzz's flags are nightly-only; this lets a stable toolchain take them.
    cmd.env("RUSTC_BOOTSTRAP", "1");
    cmd
}

fn has_cargo_fuzz() -> bool {
    cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_cargo_fuzz(install: bool) -> anyhow::Result<()> {
    if has_cargo_fuzz() {
        return Ok(());
    }
    let args = [
        "install",
        "--locked",
        "--debug",
        "--version",
        CARGO_FUZZ_VERSION,
        "cargo-fuzz",
    ];
    if !install {
        bail!(
            "cargo-fuzz is not installed; install it with `cargo {}` (or skip the fuzz stage \
             with {SKIP_ENV}=1)",
            args.join(" ")
        );
    }
    println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    let started = Instant::now();
    let status = cargo()
        .args(args)
        .status()
        .context("running cargo install")?;
    if !status.success() || !has_cargo_fuzz() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    println!("xtask: cargo-fuzz installed in {:.0?}", started.elapsed());
    Ok(())
}

struct Fuzz {
    /// The workspace root; the fuzz crate is `fuzz/` beneath it.
    root: PathBuf,
    /// cargo's target directory for the fuzz crate.
    target_dir: PathBuf,
    /// Working corpora and logs.
    work: PathBuf,
}

/// How one target's run ended.
enum Outcome {
    Passed {
        runs: String,
        seconds: String,
        coverage: String,
        corpus: String,
    },
    /// The target failed: a crash, a failed assertion, a timeout or running out of memory.
    Failed {
        log: PathBuf,
        /// What the log says went wrong.
        excerpt: Vec<String>,
        /// The input that did it, as libFuzzer saved it.
        artifact: Option<String>,
    },
}

impl Fuzz {
    /// `path` relative to the workspace root, where the reproduce command runs.
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// `cargo fuzz` with the fuzz crate and target directory of this project.
    fn cargo_fuzz(&self, subcommand: &str) -> Command {
        let mut cmd = cargo();
        cmd.current_dir(&self.root)
            .args(["fuzz", subcommand, "--fuzz-dir"])
            .arg(self.root.join("fuzz"));
        cmd
    }

    fn list(&self) -> anyhow::Result<Vec<String>> {
        let out = self
            .cargo_fuzz("list")
            .output()
            .context("running cargo fuzz list")?;
        if !out.status.success() {
            bail!(
                "cargo fuzz list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn build(&self) -> anyhow::Result<()> {
        let status = self
            .cargo_fuzz("build")
            .args(BUILD_FLAGS)
            .arg("--target-dir")
            .arg(&self.target_dir)
            .status()
            .context("running cargo fuzz build")?;
        if !status.success() {
            bail!("building the fuzz targets failed ({status})");
        }
        Ok(())
    }

    /// The line (and, for a failure, what follows it) printed for one target.
    fn describe(&self, target: &str, outcome: &anyhow::Result<Outcome>) -> String {
        match outcome {
            Ok(Outcome::Passed {
                runs,
                seconds,
                coverage,
                corpus,
            }) => format!(
                "xtask: fuzz {target}: ok, {runs} runs in {seconds} s, coverage {coverage}, \
                 corpus {corpus} inputs"
            ),
            Ok(Outcome::Failed {
                log,
                excerpt,
                artifact,
            }) => {
                let mut text = format!("xtask: fuzz {target}: FAILED (log: {})", log.display());
                for line in excerpt {
                    text.push_str(&format!("\n    {line}"));
                }
                if let Some(artifact) = artifact {
                    text.push_str(&format!(
                        "\n    input saved in {artifact}; reproduce with:\n    \
                          RUSTC_BOOTSTRAP=1 cargo fuzz run {} --target-dir {} {target} {artifact}",
                        BUILD_FLAGS.join(" "),
                        self.relative(&self.target_dir)
                    ));
                }
                text
            }
            Err(e) => format!("xtask: fuzz {target}: FAILED to run: {e:#}"),
        }
    }

    fn run_target(&self, target: &str, options: &Options) -> anyhow::Result<Outcome> {
        let corpus = self.work.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = self.root.join("fuzz").join("corpus").join(target);
        let log_path = self.work.join(format!("{target}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let status = self
            .cargo_fuzz("run")
            .args(BUILD_FLAGS)
            .arg("--target-dir")
            .arg(&self.target_dir)
            .arg(target)
            // New inputs go to the first directory only: the committed seeds stay as they are.
            .arg(&corpus)
            .args(seeds.is_dir().then_some(&seeds))
            .arg("--")
            .arg(format!("-seed={}", options.seed))
            .arg(format!("-max_total_time={}", options.seconds))
            // One input taking this long is a hang, and fails the run.
            .arg("-timeout=10")
            // Mutate at full length from the start: libFuzzer's default grows the length
            // limit slowly, which in a run of seconds keeps it below the seeds (a token).
            .arg("-len_control=0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if status.success() {
            return Ok(passed(&text));
        }
        Ok(Outcome::Failed {
            excerpt: failure_excerpt(&text),
            artifact: text
                .lines()
                .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
                .map(|p| self.relative(Path::new(p))),
            log: log_path,
        })
    }
}

/// The numbers of libFuzzer's last lines: `#N DONE cov: C ft: F corp: K/Sb ...` and
/// `Done N runs in T second(s)`.
fn passed(log: &str) -> Outcome {
    let after = |line: &str, key: &str| {
        line.split_once(key)
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| "?".into())
    };
    let done = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains("DONE"))
        .unwrap_or("");
    let summary = log
        .lines()
        .rev()
        .find(|l| l.starts_with("Done "))
        .unwrap_or("");
    Outcome::Passed {
        runs: after(summary, "Done "),
        seconds: after(summary, " in "),
        coverage: after(done, "cov: "),
        corpus: after(done, "corp: ")
            .split('/')
            .next()
            .unwrap_or("?")
            .to_owned(),
    }
}

/// The lines of a failed run's log that say what happened: the panic and its message,
/// libFuzzer's verdict, or the build error.
fn failure_excerpt(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let mut excerpt = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            // The panic and its message (an assertion's takes a few lines), not the backtrace.
            let message = lines[i + 1..]
                .iter()
                .take(8)
                .take_while(|l| !l.starts_with("stack backtrace") && !l.starts_with("note:"))
                .take_while(|l| !l.starts_with("==") && !l.is_empty());
            excerpt.push(line.to_string());
            excerpt.extend(message.map(|l| l.to_string()));
        } else if line.starts_with("==") && line.contains("ERROR: libFuzzer")
            || line.starts_with("SUMMARY: libFuzzer")
            || line.starts_with("error")
        {
            excerpt.push(line.to_string());
        }
    }
    if excerpt.is_empty() {
        let tail = lines.len().saturating_sub(15);
        excerpt.extend(lines[tail..].iter().map(|l| l.to_string()));
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passing_run_is_summed_up_from_libfuzzers_last_lines() {
        let log = "INFO: Seed: 20261106\n\
            #80\tINITED cov: 2058 ft: 3453 corp: 64/1791b exec/s: 0 rss: 92Mb\n\
            #106462\tDONE   cov: 436 ft: 1170 corp: 87/9088b lim: 4096 exec/s: 9678 rss: 93Mb\n\
            Done 106462 runs in 11 second(s)\n";
        let Outcome::Passed {
            runs,
            seconds,
            coverage,
            corpus,
        } = passed(log)
        else {
            panic!("not a pass");
        };
        assert_eq!(
            (
                runs.as_str(),
                seconds.as_str(),
                coverage.as_str(),
                corpus.as_str()
            ),
            ("106462", "11", "436", "87")
        );
    }

    #[test]
    fn a_failure_shows_the_panic_and_its_message_without_the_backtrace() {
        let log = "#1234\tNEW    cov: 1\n\
            thread '<unnamed>' (1) panicked at fuzz_targets/md5.rs:22:15:\n\
            assertion `left == right` failed: \"x\"\n  left: \"a\"\n right: \"b\"\n\
            stack backtrace:\n   0: __rustc::rust_begin_unwind\n\
            ==1== ERROR: libFuzzer: deadly signal\n\
            SUMMARY: libFuzzer: deadly signal\n\
            artifact_prefix='fuzz/artifacts/md5/'; Test unit written to fuzz/artifacts/md5/crash-1\n";
        assert_eq!(
            failure_excerpt(log),
            [
                "thread '<unnamed>' (1) panicked at fuzz_targets/md5.rs:22:15:",
                "assertion `left == right` failed: \"x\"",
                "  left: \"a\"",
                " right: \"b\"",
                "==1== ERROR: libFuzzer: deadly signal",
                "SUMMARY: libFuzzer: deadly signal",
            ]
        );
    }

    #[test]
    fn a_failure_without_a_panic_shows_the_end_of_the_log() {
        let log = (1..=20).map(|i| format!("line {i}\n")).collect::<String>();
        let excerpt = failure_excerpt(&log);
        assert_eq!(excerpt.len(), 15);
        assert_eq!(excerpt.last().map(String::as_str), Some("line 20"));
    }
}
