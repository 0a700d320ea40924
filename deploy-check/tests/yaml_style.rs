//! yamllint (rules: deploy-check/yamllint.yml, warnings are failures) over the YAML
//! deployment files of this crate's scope. The alert rules (deploy/prometheus/alerts.yml)
//! are checked by promtool with their own tests and left to their own style.

use stitch_deploy_check::{Validator, read, repo_path, run, temp_dir};

const FILES: [&str; 4] = [
    "docker-compose.yml",
    "k8s",
    "deploy/prometheus/prometheus.yml",
    "deploy/grafana/provisioning",
];

fn yamllint(paths: &[std::path::PathBuf]) -> stitch_deploy_check::Run {
    let mut command = Validator::Yamllint.command();
    command
        .arg("--strict")
        .arg("--format")
        .arg("parsable")
        .arg("-c")
        .arg(repo_path("deploy-check/yamllint.yml"))
        .args(paths);
    run(&mut command)
}

#[test]
fn the_deployment_yaml_passes_yamllint() {
    let paths: Vec<_> = FILES.iter().map(|f| repo_path(f)).collect();
    let result = yamllint(&paths);
    assert!(result.succeeded(), "{}", result.output());
}

#[test]
fn yamllint_rejects_a_duplicated_key_and_bad_indentation() {
    let original = read("k8s/base/api-service.yaml");
    let dir = temp_dir();
    let duplicated = original.replacen(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  type: NodePort\n",
        1,
    );
    assert_ne!(duplicated, original);
    let file = dir.path().join("duplicated.yaml");
    std::fs::write(&file, duplicated).unwrap();
    let result = yamllint(std::slice::from_ref(&file));
    assert!(!result.succeeded(), "accepted: {}", result.output());
    assert!(
        result.stdout.contains("key-duplicates"),
        "{}",
        result.output()
    );

    let misindented = original.replacen("    - name: http\n", "    -   name: http\n", 1);
    assert_ne!(misindented, original);
    let file = dir.path().join("misindented.yaml");
    std::fs::write(&file, misindented).unwrap();
    let result = yamllint(std::slice::from_ref(&file));
    assert!(!result.succeeded(), "accepted: {}", result.output());
}
