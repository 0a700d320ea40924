//! The Dockerfile, without a Docker engine: every path it copies exists and is not
//! excluded from the build context; its dependency layer (manifests + stub sources) covers
//! every workspace member and every target a manifest declares, and loads as a workspace
//! with the locked dependencies; the real sources of every crate the image's programs are
//! made of are copied and rebuilt; the runtime stage gets each program.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use stitch_deploy_check::{read, repo_path, repo_root, run, temp_dir};

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

struct Copy {
    from_stage: bool,
    sources: Vec<String>,
    dest: String,
}

fn copies() -> Vec<(usize, Copy)> {
    instructions()
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let rest = line.strip_prefix("COPY ")?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let from_stage = words.iter().any(|w| w.starts_with("--from="));
            let args: Vec<String> = words
                .iter()
                .filter(|w| !w.starts_with("--"))
                .map(|w| (*w).to_owned())
                .collect();
            let (dest, sources) = args.split_last().expect("COPY has a destination");
            Some((
                i,
                Copy {
                    from_stage,
                    sources: sources.to_vec(),
                    dest: dest.clone(),
                },
            ))
        })
        .collect()
}

/// The files the stub `RUN` creates (`for f in … ; do`).
fn stubs() -> BTreeSet<String> {
    let line = instructions()
        .into_iter()
        .find(|l| l.starts_with("RUN ") && l.contains("for f in"))
        .expect("a RUN creating stub sources");
    let list = line
        .split("for f in")
        .nth(1)
        .and_then(|rest| rest.split("; do").next())
        .expect("for f in … ; do");
    list.split_whitespace().map(str::to_owned).collect()
}

/// Index of the first instruction that builds (`cargo build`), and the packages it builds.
fn first_build() -> (usize, Vec<String>) {
    let all = instructions();
    let (i, line) = all
        .iter()
        .enumerate()
        .find(|(_, l)| l.starts_with("RUN ") && l.contains("cargo build"))
        .expect("a RUN cargo build");
    let build = commands(line)
        .into_iter()
        .find(|c| c.starts_with("cargo build"))
        .expect("cargo build");
    (i, packages_after_p(build))
}

fn packages_after_p(line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1].to_owned())
        .collect()
}

/// `cargo metadata` of the workspace at `dir`.
fn metadata(dir: &Path, extra: &[&str]) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let result = run(Command::new(cargo)
        .current_dir(dir)
        .args(["metadata", "--format-version", "1"])
        .args(extra));
    assert!(
        result.succeeded(),
        "cargo metadata in {}: {}",
        dir.display(),
        result.output()
    );
    serde_json::from_str(&result.stdout).expect("metadata JSON")
}

/// The platform rustc builds for here.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let result = run(Command::new(rustc).arg("-vV"));
    assert!(result.succeeded(), "{}", result.output());
    result
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names its host")
        .to_owned()
}

/// The shell commands of an instruction (`a && b`).
fn commands(instruction: &str) -> Vec<&str> {
    instruction
        .trim_start_matches("RUN ")
        .split("&&")
        .map(str::trim)
        .collect()
}

/// Workspace members: name → (directory relative to the root, package JSON).
fn members() -> BTreeMap<String, (String, Value)> {
    let meta = metadata(&repo_root(), &["--no-deps", "--offline"]);
    let root = repo_root();
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().expect("manifest_path"));
            let dir = manifest
                .parent()
                .expect("manifest dir")
                .strip_prefix(&root)
                .expect("member inside the workspace")
                .to_string_lossy()
                .into_owned();
            (
                p["name"].as_str().expect("name").to_owned(),
                (dir, p.clone()),
            )
        })
        .collect()
}

/// The source files of a package's lib and bin targets (what cargo needs to load it).
fn target_sources(package: &Value) -> Vec<String> {
    let root = repo_root();
    package["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| {
            t["kind"]
                .as_array()
                .expect("kind")
                .iter()
                .any(|k| matches!(k.as_str(), Some("lib" | "bin" | "proc-macro")))
        })
        .map(|t| {
            Path::new(t["src_path"].as_str().expect("src_path"))
                .strip_prefix(&root)
                .expect("target inside the workspace")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn every_path_the_dockerfile_copies_exists_in_the_build_context() {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let excluded = |source: &str| {
        ignored
            .iter()
            .any(|pattern| match pattern.strip_prefix("**/") {
                // `**/name`: that name anywhere (glob patterns like `**/*.tmp` name no source).
                Some(name) => source.split('/').any(|c| c == name),
                None => source == pattern || source.starts_with(&format!("{pattern}/")),
            })
    };
    let all = copies();
    assert!(
        all.len() > 10,
        "too few COPY instructions found: {}",
        all.len()
    );
    for (_, copy) in all.iter().filter(|(_, c)| !c.from_stage) {
        for source in &copy.sources {
            let source = source.trim_end_matches('/');
            assert!(
                repo_path(source).exists(),
                "the Dockerfile copies {source}, which does not exist"
            );
            assert!(
                !excluded(source),
                ".dockerignore excludes {source}, which the Dockerfile copies"
            );
        }
    }
}

#[test]
fn the_dependency_layer_covers_every_workspace_member_and_target() {
    let members = members();
    let (build_at, _) = first_build();
    let manifests: BTreeSet<String> = copies()
        .into_iter()
        .filter(|(i, c)| *i < build_at && !c.from_stage)
        .flat_map(|(_, c)| c.sources)
        .collect();
    assert!(manifests.contains("Cargo.toml") && manifests.contains("Cargo.lock"));
    let stubs = stubs();
    for (name, (dir, package)) in &members {
        let manifest = format!("{dir}/Cargo.toml");
        assert!(
            manifests.contains(&manifest),
            "the dependency layer does not copy {manifest} (member {name})"
        );
        for source in target_sources(package) {
            assert!(
                stubs.contains(&source),
                "the dependency layer has no stub for {source} (a target of {name})"
            );
        }
    }
}

#[test]
fn the_stub_layer_loads_as_a_workspace_with_the_locked_dependencies() {
    // Build what the dependency layer builds from: its copies and its stubs, nothing else.
    let dir = temp_dir();
    let (build_at, _) = first_build();
    for (_, copy) in copies()
        .into_iter()
        .filter(|(i, c)| *i < build_at && !c.from_stage)
    {
        for source in &copy.sources {
            let to = if copy.dest.ends_with('/') || copy.dest == "./" {
                dir.path().join(source)
            } else {
                dir.path().join(&copy.dest)
            };
            std::fs::create_dir_all(to.parent().expect("parent")).unwrap();
            std::fs::copy(repo_path(source), &to)
                .unwrap_or_else(|e| panic!("copying {source}: {e}"));
        }
    }
    for stub in stubs() {
        let path = dir.path().join(&stub);
        std::fs::create_dir_all(path.parent().expect("parent")).unwrap();
        std::fs::write(path, "fn main() {}\n").unwrap();
    }
    // --locked: the lock file needs no change, so `cargo build --locked` in the image works.
    // (Filtered to this platform: the lock's Windows-only crates need not be downloaded.)
    let host = host_triple();
    let meta = metadata(
        dir.path(),
        &["--locked", "--offline", "--filter-platform", &host],
    );
    let loaded: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .filter_map(|id| {
            let id = id.as_str()?;
            meta["packages"]
                .as_array()?
                .iter()
                .find(|p| p["id"].as_str() == Some(id))?["name"]
                .as_str()
        })
        .collect();
    let expected = members();
    let expected: BTreeSet<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(loaded, expected);
}

#[test]
fn the_real_sources_of_every_crate_in_the_programs_are_copied_and_rebuilt() {
    let members = members();
    let (build_at, built) = first_build();
    assert_eq!(built, ["stitch-api", "stitch-worker", "stitch-cli"]);
    // The workspace crates the programs are made of: path dependencies, transitively.
    let mut closure: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = built.clone();
    while let Some(name) = todo.pop() {
        if !closure.insert(name.clone()) {
            continue;
        }
        let (_, package) = &members[&name];
        for dep in package["dependencies"].as_array().expect("dependencies") {
            let normal = dep["kind"].is_null() || dep["kind"] == "build";
            let name = dep["name"].as_str().expect("dependency name");
            if normal && members.contains_key(name) {
                todo.push(name.to_owned());
            }
        }
    }
    let later: Vec<Copy> = copies()
        .into_iter()
        .filter(|(i, c)| *i > build_at && !c.from_stage)
        .map(|(_, c)| c)
        .collect();
    let all = instructions();
    let later_commands: Vec<&str> = all[build_at + 1..]
        .iter()
        .filter(|l| l.starts_with("RUN "))
        .flat_map(|l| commands(l))
        .collect();
    let clean = later_commands
        .iter()
        .position(|c| c.starts_with("cargo clean"))
        .expect("a cargo clean of the stubs' artifacts");
    let cleaned = packages_after_p(later_commands[clean]);
    for name in &closure {
        let dir = &members[name].0;
        assert!(
            later
                .iter()
                .any(|c| c.sources == [dir.clone()] && c.dest == *dir),
            "the image builds {name} but never copies its sources ({dir})"
        );
        assert!(
            cleaned.contains(name),
            "{name}'s stub build is not cleaned: cargo could keep the stub"
        );
    }
    // Files the sources embed at compile time (include_str!/include_bytes!) must be copied
    // too, wherever they live.
    let copied: Vec<String> = later.iter().flat_map(|c| c.sources.clone()).collect();
    for name in &closure {
        for embedded in embedded_files(&repo_path(&members[name].0)) {
            assert!(
                copied
                    .iter()
                    .any(|c| embedded == *c || embedded.starts_with(&format!("{c}/"))),
                "{name} embeds {embedded}, which the image never copies"
            );
        }
    }

    // After the clean, the same packages are built again, now from the real sources.
    let second = later_commands[clean..]
        .iter()
        .find(|c| c.starts_with("cargo build"))
        .expect("a cargo build after the clean");
    assert_eq!(packages_after_p(second), built);
}

/// Every file that the Rust sources under `dir` embed with `include_str!`/`include_bytes!`,
/// relative to the repository root.
fn embedded_files(dir: &Path) -> Vec<String> {
    let root = repo_root();
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("source directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    todo.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source file");
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for rest in text.split(macro_name).skip(1) {
                    let relative = rest.split('"').next().expect("a path");
                    let target = path.parent().expect("parent").join(relative);
                    let target = normalize(&target);
                    let target = target
                        .strip_prefix(&root)
                        .unwrap_or_else(|_| {
                            panic!("{} embeds a file outside the repository", path.display())
                        })
                        .to_string_lossy()
                        .into_owned();
                    found.push(target);
                }
            }
        }
    }
    found
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn the_runtime_image_gets_every_program_of_the_built_packages() {
    let members = members();
    let (_, built) = first_build();
    let from_builder: Vec<Copy> = copies()
        .into_iter()
        .filter(|(_, c)| c.from_stage)
        .map(|(_, c)| c)
        .collect();
    let mut programs = Vec::new();
    for name in &built {
        for target in members[name].1["targets"].as_array().expect("targets") {
            if target["kind"]
                .as_array()
                .expect("kind")
                .iter()
                .any(|k| k == "bin")
            {
                programs.push(target["name"].as_str().expect("bin name").to_owned());
            }
        }
    }
    programs.sort();
    assert_eq!(programs, ["stitch", "stitch-api", "stitch-worker"]);
    for program in &programs {
        assert!(
            from_builder
                .iter()
                .any(|c| c.sources == [format!("/src/target/release/{program}")]
                    && c.dest == format!("/usr/local/bin/{program}")),
            "the runtime stage does not get {program}"
        );
    }
    let all = instructions();
    assert!(
        all.iter().any(|l| l == "USER 10001:10001"),
        "the runtime runs as root"
    );
    assert!(all.iter().any(|l| l == "VOLUME /data"));
    assert!(all.iter().any(|l| l == "ENV STITCH__STORAGE__ROOT=/data"));
}
