//! docker-compose.yml through Compose v2's own loader, and what the loader cannot know: the
//! Stitch containers' configuration (with the keys file they would find mounted), the
//! migration order, health checks, the shared volume and the monitoring files it mounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use stitch_deploy_check::{
    Validator, check_config, read, repo_path, repo_root, run, temp_dir, yaml_docs, yaml_file,
    yaml_str,
};

const CHECKER: &str = env!("CARGO_BIN_EXE_stitch-config-check");

/// The services built from this repository's image.
const STITCH_SERVICES: [&str; 3] = ["migrate", "api", "worker"];

/// `docker-compose -f FILE config ARGS` in `dir`, with no inherited environment: the result
/// must not depend on the caller's shell (interpolated variables take their defaults).
fn compose_config(file: &Path, args: &[&str]) -> stitch_deploy_check::Run {
    let mut command = Validator::Compose.command();
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(file.parent().expect("file in a directory"))
        .arg("-f")
        .arg(file)
        .arg("config")
        .args(args);
    run(&mut command)
}

/// The fully resolved model (anchors merged, defaults filled in) as Compose sees it.
fn resolved() -> Value {
    let result = compose_config(&repo_path("docker-compose.yml"), &["--format", "json"]);
    assert!(result.succeeded(), "{}", result.output());
    serde_json::from_str(&result.stdout).expect("compose config prints JSON")
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_object()
        .map(|env| {
            env.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_is_valid_for_compose_v2() {
    let result = compose_config(&repo_path("docker-compose.yml"), &["-q"]);
    assert!(result.succeeded(), "{}", result.output());
}

#[test]
fn compose_rejects_a_copy_with_an_unknown_key_or_a_wrong_type() {
    let original = read("docker-compose.yml");
    let dir = temp_dir();

    // An unknown key under a service (a typo of `restart`).
    let typo = original.replacen(
        "    command: [\"stitch-api\"]\n",
        "    command: [\"stitch-api\"]\n    restrat: always\n",
        1,
    );
    assert_ne!(typo, original, "the api service's command line moved");
    let file = dir.path().join("unknown-key.yml");
    std::fs::write(&file, typo).unwrap();
    let result = compose_config(&file, &["-q"]);
    assert!(!result.succeeded(), "accepted: {}", result.output());
    assert!(result.stderr.contains("restrat"), "{}", result.output());

    // A number where Compose wants an integer.
    let wrong_type = original.replacen("      replicas: 2\n", "      replicas: two\n", 1);
    assert_ne!(wrong_type, original, "no `replicas: 2` to break");
    let file = dir.path().join("wrong-type.yml");
    std::fs::write(&file, wrong_type).unwrap();
    let result = compose_config(&file, &["-q"]);
    assert!(!result.succeeded(), "accepted: {}", result.output());
    assert!(result.stderr.contains("replicas"), "{}", result.output());
}

/// Where a container path is on the host, through the service's bind mounts, and whether
/// that mount is read-only.
fn on_host(service: &Value, path: &str) -> Option<(PathBuf, bool)> {
    service["volumes"]
        .as_array()?
        .iter()
        .filter(|v| v["type"] == "bind")
        .find_map(|v| {
            let target = v["target"].as_str()?.trim_end_matches('/');
            let rest = path.strip_prefix(target)?.strip_prefix('/')?;
            let source = Path::new(v["source"].as_str()?).join(rest);
            Some((source, v["read_only"] == true))
        })
}

#[test]
fn every_stitch_container_gets_a_configuration_that_stitch_accepts() {
    let model = resolved();
    for name in STITCH_SERVICES {
        let service = &model["services"][name];
        let mut env = environment(service);
        // The loader reads the keys file: the one the container would find mounted.
        if let Some(path) = env.get("STITCH__AUTH__KEYS_FILE").cloned() {
            let (host, _) = on_host(service, &path)
                .unwrap_or_else(|| panic!("{name}: nothing is mounted where {path} is"));
            env.insert(
                "STITCH__AUTH__KEYS_FILE".to_owned(),
                host.display().to_string(),
            );
        }
        assert!(
            env.keys().any(|k| k.starts_with("STITCH__")),
            "{name} has no STITCH__ settings"
        );
        if let Err(e) = check_config(Path::new(CHECKER), &env) {
            panic!("the {name} service's environment is not a valid configuration:\n{e}");
        }
        assert_eq!(
            env.get("STITCH__STORAGE__ROOT").map(String::as_str),
            Some("/data"),
            "{name}: storage root"
        );
    }
}

/// The development key of deploy/keys/keys.toml, published in docs/deploy.md.
const DEV_KEY: &str = "sk_dev_compose_only_not_a_secret";

#[test]
fn api_and_workers_read_the_keys_file_from_a_read_only_mount_of_its_directory() {
    let model = resolved();
    for name in ["api", "worker"] {
        let service = &model["services"][name];
        let env = environment(service);
        let path = env
            .get("STITCH__AUTH__KEYS_FILE")
            .unwrap_or_else(|| panic!("{name} has no STITCH__AUTH__KEYS_FILE"));
        let (host, read_only) = on_host(service, path)
            .unwrap_or_else(|| panic!("{name}: nothing is mounted where {path} is"));
        assert!(read_only, "{name}: the keys are mounted writable");
        assert_eq!(host, repo_path("deploy/keys/keys.toml"), "{name}");
        // The directory, so that a replaced file (`stitch keys new --append`) is seen.
        let mounts = service["volumes"].as_array().expect("volumes");
        assert!(
            mounts.iter().any(|v| v["type"] == "bind"
                && v["source"].as_str().map(Path::new) == Some(repo_path("deploy/keys").as_path())),
            "{name}: the keys directory is not mounted as a whole: {mounts:?}"
        );
    }
    let api = environment(&model["services"]["api"]);
    assert!(
        api.get("STITCH__AUTH__TOKEN_SECRET")
            .is_some_and(|s| s.len() >= 32),
        "the API has no usable STITCH__AUTH__TOKEN_SECRET"
    );
    // Interpolated: set STITCH_TOKEN_SECRET and it is used.
    let raw = read("docker-compose.yml");
    assert!(
        raw.contains("STITCH__AUTH__TOKEN_SECRET: ${STITCH_TOKEN_SECRET:-"),
        "the token secret does not come from STITCH_TOKEN_SECRET"
    );
}

#[test]
fn the_development_key_in_the_docs_is_the_one_the_compose_keys_file_accepts() {
    let docs = read("docs/deploy.md");
    assert!(
        docs.contains(DEV_KEY),
        "docs/deploy.md does not publish {DEV_KEY}"
    );
    let keys = stitch_common::auth::KeyRing::load(&[], Some(repo_path("deploy/keys/keys.toml")))
        .unwrap_or_else(|e| panic!("deploy/keys/keys.toml: {e:#}"));
    let principal = keys
        .principal(DEV_KEY)
        .expect("the development key is not in deploy/keys/keys.toml");
    assert_eq!(principal.tenant.as_str(), "dev");
    assert!(principal.scopes.contains(stitch_common::auth::Scope::Admin));
    assert!(keys.principal("sk_anything_else").is_none());
}

#[test]
fn the_configuration_checker_rejects_an_unknown_key_and_a_bad_value() {
    let mut env = BTreeMap::new();
    env.insert("STITCH__HTTP__BIND".to_owned(), "0.0.0.0:8080".to_owned());
    assert!(check_config(Path::new(CHECKER), &env).is_ok());

    let mut typo = env.clone();
    typo.insert("STITCH__HTTP__SHUTDOWN_GRAC".to_owned(), "60s".to_owned());
    let err = check_config(Path::new(CHECKER), &typo).unwrap_err();
    assert!(err.contains("shutdown_grac"), "{err}");

    let mut bad = env.clone();
    bad.insert("STITCH__MERGE__CONCURRENCY".to_owned(), "0".to_owned());
    let err = check_config(Path::new(CHECKER), &bad).unwrap_err();
    assert!(err.contains("STITCH__MERGE__CONCURRENCY"), "{err}");

    // It reads the keys file, as the programs do at start.
    let dir = temp_dir();
    let keys = dir.path().join("keys.toml");
    let mut keyed = env;
    keyed.insert(
        "STITCH__AUTH__KEYS_FILE".to_owned(),
        keys.display().to_string(),
    );
    let err = check_config(Path::new(CHECKER), &keyed).unwrap_err();
    assert!(
        err.contains("STITCH__AUTH__KEYS_FILE"),
        "a missing file: {err}"
    );
    std::fs::write(
        &keys,
        "[[keys]]\nid = \"a\"\ntenant = \"acme\"\nsha256 = \"sk_the_key\"\n",
    )
    .unwrap();
    let err = check_config(Path::new(CHECKER), &keyed).unwrap_err();
    assert!(err.contains("sha256"), "a key instead of its digest: {err}");
    std::fs::write(&keys, "").unwrap();
    assert!(check_config(Path::new(CHECKER), &keyed).is_ok());
}

#[test]
fn api_and_workers_start_after_a_successful_migration_in_two_replicas_each() {
    let model = resolved();
    let services = &model["services"];
    assert_eq!(
        services["migrate"]["command"],
        serde_json::json!(["stitch-worker", "migrate"])
    );
    for name in ["api", "worker"] {
        let service = &services[name];
        assert_eq!(service["deploy"]["replicas"], 2, "{name} replicas");
        assert_eq!(
            service["depends_on"]["migrate"]["condition"], "service_completed_successfully",
            "{name} must wait for the migration"
        );
        for dependency in ["redis", "rabbitmq"] {
            assert_eq!(
                service["depends_on"][dependency]["condition"], "service_healthy",
                "{name} waits for {dependency}"
            );
        }
    }
    assert_eq!(
        services["api"]["command"],
        serde_json::json!(["stitch-api"])
    );
    assert_eq!(
        services["worker"]["command"],
        serde_json::json!(["stitch-worker"])
    );
}

#[test]
fn every_long_running_service_has_a_health_check_so_up_wait_works() {
    let model = resolved();
    let services = model["services"].as_object().expect("services");
    for (name, service) in services {
        if name == "migrate" {
            continue;
        }
        let test = &service["healthcheck"]["test"];
        assert!(
            test.as_array().is_some_and(|t| !t.is_empty()),
            "{name} has no health check"
        );
    }
    // The Stitch probes ask the port each process binds.
    for (name, port) in [("api", "8080"), ("worker", "8081")] {
        let env = environment(&services[name]);
        assert_eq!(env["STITCH__HTTP__BIND"], format!("0.0.0.0:{port}"));
        let probe = services[name]["healthcheck"]["test"].to_string();
        assert!(
            probe.contains(&format!("127.0.0.1:{port}/readyz")),
            "{name}: {probe}"
        );
    }
}

#[test]
fn the_stop_grace_period_covers_each_process_s_drain() {
    let model = resolved();
    for name in ["api", "worker"] {
        let service = &model["services"][name];
        let drain = stitch_deploy_check::stitch_seconds(
            &environment(service)["STITCH__HTTP__SHUTDOWN_GRACE"],
        );
        let stop = compose_duration(
            service["stop_grace_period"]
                .as_str()
                .expect("stop_grace_period"),
        );
        assert!(
            stop >= drain + 10,
            "{name}: stop_grace_period {stop}s leaves no margin past the {drain}s drain"
        );
    }
}

/// Seconds of a Compose (Go) duration as `config` prints it: `1m15s`, `5m30s`, `75s`.
fn compose_duration(text: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        match c {
            '0'..='9' => number.push(c),
            'h' | 'm' | 's' => {
                let n: u64 = number.parse().expect("duration number");
                number.clear();
                total += n * match c {
                    'h' => 3600,
                    'm' => 60,
                    _ => 1,
                };
            }
            _ => panic!("duration {text:?}"),
        }
    }
    total
}

#[test]
fn one_shared_volume_holds_the_storage_of_api_and_workers() {
    let model = resolved();
    for name in ["api", "worker"] {
        let volumes = model["services"][name]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            volumes.iter().any(|v| v["type"] == "volume"
                && v["source"] == "stitch-data"
                && v["target"] == "/data"),
            "{name} does not mount stitch-data at /data: {volumes:?}"
        );
    }
}

#[test]
fn redis_keeps_every_key_and_rabbitmq_allows_long_merges() {
    let model = resolved();
    let redis = model["services"]["redis"]["command"].to_string();
    for flag in ["--appendonly", "noeviction"] {
        assert!(redis.contains(flag), "redis command lacks {flag}: {redis}");
    }
    let mounts = model["services"]["rabbitmq"]["volumes"].to_string();
    assert!(
        mounts.contains("rabbitmq.conf") && mounts.contains("/etc/rabbitmq/conf.d/"),
        "{mounts}"
    );
    let conf = read("deploy/rabbitmq/rabbitmq.conf");
    let timeout_ms: u64 = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("consumer_timeout"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .expect("consumer_timeout in rabbitmq.conf")
        .trim()
        .parse()
        .expect("consumer_timeout in milliseconds");
    // The longest merge: the largest upload (limits.max_upload_bytes, 16 TiB by default) at
    // ~450 MB/s, one core of MD5 (docs/benchmarks.md).
    let longest_merge_ms = (16u64 << 40) / 450_000_000 * 1000;
    assert!(
        timeout_ms > longest_merge_ms,
        "consumer_timeout {timeout_ms} ms is shorter than the longest merge, {longest_merge_ms} ms"
    );
}

#[test]
fn every_file_compose_mounts_exists() {
    let model = resolved();
    let root = repo_root();
    for (name, service) in model["services"].as_object().expect("services") {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            if volume["type"] != "bind" {
                continue;
            }
            let source = Path::new(volume["source"].as_str().expect("bind source"));
            assert!(
                source.starts_with(&root) && source.exists(),
                "{name} mounts {} which does not exist",
                source.display()
            );
        }
    }
}

#[test]
fn prometheus_scrapes_the_services_compose_runs_and_loads_the_alerts() {
    let model = resolved();
    let config = &yaml_file("deploy/prometheus/prometheus.yml")[0];
    // The rules file is mounted with its directory.
    let rules: Vec<&str> = config["rule_files"]
        .as_vec()
        .expect("rule_files")
        .iter()
        .map(|r| yaml_str(r, "rule_files[]"))
        .collect();
    assert_eq!(rules, ["/etc/prometheus/alerts.yml"]);
    assert!(
        repo_path("deploy/prometheus/alerts.yml").is_file(),
        "deploy/prometheus/alerts.yml (the alert rules) is missing"
    );
    yaml_file("deploy/prometheus/alerts.yml");
    let mounts = model["services"]["prometheus"]["volumes"].to_string();
    assert!(mounts.contains("/etc/prometheus"), "{mounts}");

    for (job, service, port) in [
        ("stitch-api", "api", 8080),
        ("stitch-worker", "worker", 8081),
    ] {
        let scrape = config["scrape_configs"]
            .as_vec()
            .expect("scrape_configs")
            .iter()
            .find(|s| s["job_name"].as_str() == Some(job))
            .unwrap_or_else(|| panic!("no scrape job {job}"));
        let sd = &scrape["dns_sd_configs"][0];
        assert_eq!(sd["names"][0].as_str(), Some(service), "{job}");
        assert_eq!(sd["port"].as_i64(), Some(port), "{job}");
        assert!(
            model["services"][service].is_object(),
            "{job} scrapes {service}, which compose does not run"
        );
    }
}

#[test]
fn grafana_provisions_the_prometheus_data_source_and_the_dashboard() {
    let model = resolved();
    let datasource = &yaml_file("deploy/grafana/provisioning/datasources/prometheus.yml")[0];
    let url = yaml_str(&datasource["datasources"][0]["url"], "datasource url");
    assert_eq!(url, "http://prometheus:9090");
    assert!(model["services"]["prometheus"].is_object());

    let provider = &yaml_file("deploy/grafana/provisioning/dashboards/stitch.yml")[0];
    let path = yaml_str(
        &provider["providers"][0]["options"]["path"],
        "dashboard provider path",
    );
    let mounts = model["services"]["grafana"]["volumes"]
        .as_array()
        .expect("grafana volumes");
    let dashboards = mounts
        .iter()
        .find(|m| m["target"] == path)
        .unwrap_or_else(|| panic!("nothing is mounted at the provider's path {path}"));
    assert!(
        dashboards["source"]
            .as_str()
            .is_some_and(|s| s.ends_with("deploy/grafana/dashboards")),
        "{dashboards}"
    );
    let dashboard = read("deploy/grafana/dashboards/stitch.json");
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(
        dashboard["panels"].is_array(),
        "the dashboard has no panels"
    );
}

#[test]
fn the_monitoring_provisioning_files_are_plain_yaml() {
    // Parsing is the check; the documents are used above.
    for file in [
        "deploy/prometheus/prometheus.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/stitch.yml",
    ] {
        let docs = yaml_docs(&read(file), file);
        assert_eq!(docs.len(), 1, "{file}");
    }
}
