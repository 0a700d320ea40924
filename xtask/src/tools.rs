//! What the tests run besides cargo: Debian packages (installed when root), Python packages
//! (installed into a virtual environment under `target/xtask/venv`) and npm packages
//! (installed by `npm ci` from `e2e/clients/package-lock.json` into `target/xtask/node`, and
//! from the upload page's `api/ui/package-lock.json` into `target/xtask/node-ui`), the last two
//! being the third-party clients, reference libraries and browser driver the tests use.
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

/// An npm package tree, pinned whole by its lockfile; reinstalled when either file changes.
struct NodePackage {
    /// Where it comes from, for messages.
    source: &'static str,
    /// What is in it, for messages.
    what: &'static str,
    /// The directory under `target/xtask` that `npm ci` installs it into.
    dir: &'static str,
    package: &'static str,
    lock: &'static str,
}

/// The tus clients the end-to-end tests run under Node.js (tus-js-client).
const E2E_CLIENTS: NodePackage = NodePackage {
    source: "e2e/clients",
    what: "tus-js-client",
    dir: "node",
    package: include_str!("../../e2e/clients/package.json"),
    lock: include_str!("../../e2e/clients/package-lock.json"),
};

/// The upload page's packages: the tus-js-client whose browser build `api/ui/vendor/` holds
/// (a test compares the two) and playwright-core, which drives Chromium in the browser test.
const UPLOAD_PAGE: NodePackage = NodePackage {
    source: "api/ui",
    what: "tus-js-client, playwright-core",
    dir: "node-ui",
    package: include_str!("../../api/ui/package.json"),
    lock: include_str!("../../api/ui/package-lock.json"),
};

/// The oldest Node.js the npm packages support (tus-js-client's `engines`).
const NODE_MIN_MAJOR: u32 = 18;

/// Where RabbitMQ's own start script lives in Debian's package (the one on PATH, a wrapper,
/// switches to the system's `rabbitmq` user and its directories, which the tests must not use).
pub const RABBITMQ_SERVER: &str = crate::rabbitmq_node::RABBITMQ_SERVER;

/// Debian's Chromium, which playwright-core drives (it never downloads a browser of its own).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// What the tests found or installed.
pub struct Tools {
    venv: PathBuf,
    /// `npm ci`'s directory; the tests get its `node_modules` (`STITCH_TEST_NODE_MODULES`).
    node: PathBuf,
    /// The upload page's `npm ci` (`STITCH_TEST_UI_NODE_MODULES`).
    node_ui: PathBuf,
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
    if std::env::var_os("STITCH_TEST_REFLINK_DIR").is_none() {
        tools.push(DebianTool {
            present: || on_path("mkfs.xfs"),
            package: "xfsprogs",
            purpose: "mkfs.xfs, for the file system the reflink merge is tested on",
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
    tools.push(DebianTool {
        present: || on_path("node"),
        package: "nodejs",
        purpose: "Node.js, to run tus-js-client against the API",
    });
    tools.push(DebianTool {
        present: || on_path("npm"),
        package: "npm",
        purpose: "npm, to install tus-js-client and playwright-core",
    });
    tools.push(DebianTool {
        present: || Path::new(CHROMIUM).is_file(),
        package: "chromium",
        purpose: "Chromium, the browser the upload page's test drives",
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
    check_node_version()?;
    let node = work.join(E2E_CLIENTS.dir);
    ensure_node_modules(&E2E_CLIENTS, &node, install)?;
    let node_ui = work.join(UPLOAD_PAGE.dir);
    ensure_node_modules(&UPLOAD_PAGE, &node_ui, install)?;
    Ok(Tools {
        venv,
        node,
        node_ui,
    })
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

    /// The installed npm packages, for Node's module resolution.
    pub fn node_modules(&self) -> PathBuf {
        self.node.join("node_modules")
    }

    /// The upload page's installed npm packages.
    pub fn ui_node_modules(&self) -> PathBuf {
        self.node_ui.join("node_modules")
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

/// Installs the npm packages of `pkg` into `dir` with `npm ci` (exactly the lockfile's tree,
/// scripts off), unless the lockfile there is already the same.
fn ensure_node_modules(pkg: &NodePackage, dir: &Path, install: bool) -> anyhow::Result<()> {
    let stamp = dir.join("stitch-package-lock.json");
    let installed = std::fs::read_to_string(&stamp).ok().as_deref() == Some(pkg.lock)
        && std::fs::read_to_string(dir.join("package.json"))
            .ok()
            .as_deref()
            == Some(pkg.package)
        && dir.join("node_modules").is_dir();
    if installed {
        return Ok(());
    }
    if !install {
        bail!(
            "the npm packages of {}/package-lock.json ({}) are not installed in {}; run without \
             --no-install",
            pkg.source,
            pkg.what,
            dir.display()
        );
    }
    println!(
        "xtask: installing the npm packages of {} into {}",
        pkg.source,
        dir.display()
    );
    // The stamp goes first, so that an interrupted install is redone next time.
    if stamp.exists() {
        std::fs::remove_file(&stamp).with_context(|| format!("removing {}", stamp.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("package.json"), pkg.package)?;
    std::fs::write(dir.join("package-lock.json"), pkg.lock)?;
    let status = Command::new("npm")
        .args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--loglevel=error",
        ])
        .current_dir(dir)
        .status()
        .context("running npm")?;
    if !status.success() {
        bail!(
            "npm ci could not install {}/package-lock.json ({status})",
            pkg.source
        );
    }
    std::fs::write(&stamp, pkg.lock)?;
    Ok(())
}

/// Fails unless `node` is at least [`NODE_MIN_MAJOR`].
fn check_node_version() -> anyhow::Result<()> {
    let output = Command::new("node")
        .arg("--version")
        .output()
        .context("running `node --version`")?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let major = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major >= NODE_MIN_MAJOR => Ok(()),
        _ => bail!(
            "the tests need Node.js {NODE_MIN_MAJOR} or later for tus-js-client; `node --version` \
             says {version:?}"
        ),
    }
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

pub fn is_root() -> bool {
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
