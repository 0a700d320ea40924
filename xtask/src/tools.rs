//! What the tests run besides cargo: Debian packages (installed when root) and Python
//! packages (installed into a virtual environment under `target/xtask/venv`).
//!
//! Each install is skipped when what it installs is already there, so a second run needs no
//! network at all (`CARGO_NET_OFFLINE=true cargo xtask test` in a network namespace works
//! after one ordinary run).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The Python packages, pinned; the venv is rebuilt when this list changes.
const REQUIREMENTS: &str = include_str!("../requirements.txt");

/// Where RabbitMQ's own start script lives in Debian's package (the one on PATH, a wrapper,
/// switches to the system's `rabbitmq` user and its directories, which the tests must not use).
pub const RABBITMQ_SERVER: &str = crate::rabbitmq_node::RABBITMQ_SERVER;

/// What the tests found or installed.
pub struct Tools {
    venv: PathBuf,
}

/// A program the tests need and the Debian package that ships it.
struct DebianTool {
    /// How to tell it is there.
    present: fn() -> bool,
    package: &'static str,
    /// What the tests use it for, for messages.
    purpose: &'static str,
}

fn debian_tools() -> Vec<DebianTool> {
    let mut tools = Vec::new();
    if std::env::var_os("STITCH_TEST_REDIS_URL").is_none() {
        tools.push(DebianTool {
            present: || on_path("redis-server"),
            package: "redis-server",
            purpose: "the tests' own Redis",
        });
    }
    if std::env::var_os("STITCH_TEST_AMQP_URL").is_none() {
        tools.push(DebianTool {
            present: || Path::new(RABBITMQ_SERVER).exists() && on_path("epmd"),
            package: "rabbitmq-server",
            purpose: "the tests' own RabbitMQ",
        });
    }
    tools.push(DebianTool {
        present: || on_path("nginx") || Path::new("/usr/sbin/nginx").exists(),
        package: "nginx",
        purpose: "`nginx -t` of the compose file's load balancer",
    });
    tools.push(DebianTool {
        present: || on_path("promtool"),
        package: "prometheus",
        purpose: "promtool, for the alert rules and their unit tests",
    });
    tools
}

/// Installs whatever is missing (when `install`), or fails naming it.
pub fn prepare(work: &Path, install: bool) -> anyhow::Result<Tools> {
    let missing: Vec<DebianTool> = debian_tools()
        .into_iter()
        .filter(|t| !(t.present)())
        .collect();
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        let why: Vec<String> = missing
            .iter()
            .map(|t| format!("{} ({})", t.package, t.purpose))
            .collect();
        if !install || !is_root() {
            bail!(
                "missing Debian packages: {}; install them with `apt-get install \
                 --no-install-recommends {}` (cargo xtask test does that itself when run as root)",
                why.join(", "),
                packages.join(" ")
            );
        }
        println!("xtask: installing {}", why.join(", "));
        apt_install(&packages)?;
        if let Some(still) = debian_tools().into_iter().find(|t| !(t.present)()) {
            bail!("{} was installed but is still not usable", still.package);
        }
    }
    let venv = work.join("venv");
    ensure_venv(&venv, install)?;
    Ok(Tools { venv })
}

impl Tools {
    /// `PATH` for the tests: the venv's programs first (its `python3` has the packages), and
    /// the sbin directories where Debian puts nginx.
    pub fn path_with_tools(&self) -> anyhow::Result<OsString> {
        let mut dirs = vec![self.venv.join("bin")];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        for sbin in ["/usr/sbin", "/sbin"] {
            if !dirs.iter().any(|d| d == Path::new(sbin)) {
                dirs.push(sbin.into());
            }
        }
        std::env::join_paths(dirs).context("building PATH")
    }
}

fn ensure_venv(venv: &Path, install: bool) -> anyhow::Result<()> {
    let stamp = venv.join("stitch-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(REQUIREMENTS) {
        return Ok(());
    }
    if !install {
        bail!(
            "the Python packages of xtask/requirements.txt are not installed in {}; run without \
             --no-install",
            venv.display()
        );
    }
    println!(
        "xtask: installing the Python packages into {}",
        venv.display()
    );
    if venv.exists() {
        std::fs::remove_dir_all(venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    if !run_quiet(Command::new("python3").args(["-m", "venv"]).arg(venv))? {
        // Debian and Ubuntu ship venv separately from python3.
        if is_root() {
            apt_install(&["python3-venv"])?;
        }
        if !run_quiet(Command::new("python3").args(["-m", "venv"]).arg(venv))? {
            bail!("`python3 -m venv` failed (on Debian: apt-get install python3-venv)");
        }
    }
    let requirements = venv.join("requirements.txt");
    std::fs::write(&requirements, REQUIREMENTS)?;
    let pip = venv.join("bin").join("pip");
    let status = Command::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status()
        .with_context(|| format!("running {}", pip.display()))?;
    if !status.success() {
        bail!("pip could not install xtask/requirements.txt ({status})");
    }
    std::fs::write(&stamp, REQUIREMENTS)?;
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend_from_slice(packages);
    apt(&install)
}

/// Runs `cmd` with its output discarded; whether it succeeded.
fn run_quiet(cmd: &mut Command) -> anyhow::Result<bool> {
    Ok(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false))
}

pub fn on_path(program: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(program).is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether `cargo nextest` is installed.
pub fn has_nextest() -> bool {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
