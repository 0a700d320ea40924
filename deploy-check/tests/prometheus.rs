//! The Prometheus side of the ops files through promtool: the alert rules load, their unit
//! tests (deploy/prometheus/alerts.test.yml) pass, the compose scrape config loads; and
//! promtool is shown rejecting a broken rule and a wrong expectation. (That every metric the
//! rules use is exported is checked against real processes in e2e/tests/e2e/metrics.rs.)

use std::path::Path;

use stitch_deploy_check::{Validator, read, run, temp_dir};

/// A copy of deploy/prometheus with `alerts.yml` (and optionally the test file) replaced.
fn prometheus_dir(alerts: &str, tests: &str) -> tempfile::TempDir {
    let dir = temp_dir();
    std::fs::write(dir.path().join("alerts.yml"), alerts).expect("writing a file of the copy");
    std::fs::write(dir.path().join("alerts.test.yml"), tests).expect("writing a file of the copy");
    dir
}

fn promtool(dir: &Path, args: &[&str]) -> stitch_deploy_check::Run {
    let mut command = Validator::Promtool.command();
    command.current_dir(dir).args(args);
    run(&mut command)
}

#[test]
fn the_alert_rules_load_and_their_unit_tests_pass() {
    let dir = prometheus_dir(
        &read("deploy/prometheus/alerts.yml"),
        &read("deploy/prometheus/alerts.test.yml"),
    );
    let checked = promtool(dir.path(), &["check", "rules", "alerts.yml"]);
    assert!(checked.succeeded(), "{}", checked.output());
    assert!(checked.stdout.contains("SUCCESS"), "{}", checked.output());
    let tested = promtool(dir.path(), &["test", "rules", "alerts.test.yml"]);
    assert!(tested.succeeded(), "{}", tested.output());
}

#[test]
fn promtool_rejects_a_rule_that_does_not_parse() {
    let original = read("deploy/prometheus/alerts.yml");
    let broken = original.replacen(
        "expr: max(stitch_stuck_merges) > 0",
        "expr: max(stitch_stuck_merges > 0",
        1,
    );
    assert_ne!(broken, original);
    let dir = prometheus_dir(&broken, "");
    let checked = promtool(dir.path(), &["check", "rules", "alerts.yml"]);
    assert!(!checked.succeeded(), "accepted: {}", checked.output());
    assert!(
        checked.output().contains("StitchStuckMerges"),
        "{}",
        checked.output()
    );
}

#[test]
fn promtool_test_rules_fails_when_an_alert_does_not_fire_as_expected() {
    // The rules with the dead-letter alert's hold time raised past the test's window: the
    // unit test that expects it to fire at 10 minutes must fail.
    let original = read("deploy/prometheus/alerts.yml");
    let slower = original.replacen(
        "expr: max by (family) (stitch_dead_letter_messages) > 0\n        for: 5m",
        "expr: max by (family) (stitch_dead_letter_messages) > 0\n        for: 30m",
        1,
    );
    assert_ne!(slower, original);
    let dir = prometheus_dir(&slower, &read("deploy/prometheus/alerts.test.yml"));
    let tested = promtool(dir.path(), &["test", "rules", "alerts.test.yml"]);
    assert!(!tested.succeeded(), "passed: {}", tested.output());
    assert!(
        tested.output().contains("StitchDeadLetterQueueNotEmpty"),
        "{}",
        tested.output()
    );
}

#[test]
fn the_compose_scrape_config_loads_with_its_rules() {
    // prometheus.yml loads the rules from where compose mounts them; the copy points there
    // at the test's directory instead.
    let alerts = read("deploy/prometheus/alerts.yml");
    let rules = alerts.matches("- alert:").count();
    let dir = prometheus_dir(&alerts, "");
    let config = read("deploy/prometheus/prometheus.yml");
    assert!(config.contains("/etc/prometheus/alerts.yml"));
    let config = config.replace(
        "/etc/prometheus/alerts.yml",
        &dir.path().join("alerts.yml").display().to_string(),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("writing a file of the copy");
    let checked = promtool(dir.path(), &["check", "config", "prometheus.yml"]);
    assert!(checked.succeeded(), "{}", checked.output());
    assert!(
        checked.output().contains(&format!("{rules} rules found")),
        "{}",
        checked.output()
    );
}
