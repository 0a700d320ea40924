//! deploy/nginx/nginx.conf through `nginx -t`, offline.
//!
//! `nginx -t` resolves the host names of `proxy_pass` and `upstream` at load time, which
//! would need Docker's DNS. The config names the API in a variable and gives a `resolver`
//! (Docker's, 127.0.0.11), so nginx looks it up per request at run time and `-t` needs no
//! network (a config that regressed to a literal upstream host would fail here with "host not
//! found", or wait on DNS; no test shows that, since it would depend on this machine's
//! resolver). The copy under test differs from the file in one way only: its absolute /tmp
//! paths (temp directories, pid) point into the test's own directory.

use std::path::Path;

use stitch_deploy_check::{
    MULTIPART_OVERHEAD, Validator, nginx_size, read, run, stitch_size, temp_dir, yaml_file,
    yaml_str,
};

/// `nginx -t` on `config` (text) in a fresh prefix directory.
fn nginx_test(config: &str, dir: &Path) -> stitch_deploy_check::Run {
    let config = config.replace("/tmp/", &format!("{}/", dir.display()));
    let file = dir.join("nginx.conf");
    std::fs::write(&file, config).expect("writing the config under test");
    let mut command = Validator::Nginx.command();
    command
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-c")
        .arg(&file)
        .arg("-e")
        .arg(dir.join("error.log"));
    run(&mut command)
}

#[test]
fn the_nginx_config_passes_nginx_t_without_network() {
    let dir = temp_dir();
    let result = nginx_test(&read("deploy/nginx/nginx.conf"), dir.path());
    assert!(result.succeeded(), "{}", result.output());
    assert!(
        result.stderr.contains("test is successful"),
        "{}",
        result.output()
    );
}

#[test]
fn nginx_t_rejects_a_config_with_a_syntax_error() {
    let original = read("deploy/nginx/nginx.conf");
    let broken = original.replacen(
        "proxy_request_buffering off;",
        "proxy_request_buffering off",
        1,
    );
    assert_ne!(broken, original);
    let dir = temp_dir();
    let result = nginx_test(&broken, dir.path());
    assert!(!result.succeeded(), "accepted: {}", result.output());
    assert!(result.stderr.contains("emerg"), "{}", result.output());
}

/// The value of the first `directive value;` in the config.
fn directive<'a>(config: &'a str, name: &str) -> &'a str {
    config
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
        .map(|rest| rest.trim().trim_end_matches(';'))
        .unwrap_or_else(|| panic!("no {name} in nginx.conf"))
}

#[test]
fn nginx_admits_the_largest_chunk_and_streams_it_to_the_api() {
    let config = read("deploy/nginx/nginx.conf");
    let max_chunk = stitch_size(yaml_str(
        &yaml_file("k8s/base/configmap.yaml")[0]["data"]["STITCH__LIMITS__MAX_CHUNK_BYTES"],
        "STITCH__LIMITS__MAX_CHUNK_BYTES",
    ));
    let compose = read("docker-compose.yml");
    let compose_chunk = compose
        .lines()
        .find_map(|l| l.trim().strip_prefix("STITCH__LIMITS__MAX_CHUNK_BYTES:"))
        .map(stitch_size)
        .expect("docker-compose.yml states the chunk limit nginx is sized for");
    assert_eq!(
        compose_chunk, max_chunk,
        "k8s and compose state different chunk limits"
    );
    let body = nginx_size(directive(&config, "client_max_body_size"));
    assert!(
        body >= max_chunk + MULTIPART_OVERHEAD,
        "client_max_body_size {body}"
    );
    assert_eq!(directive(&config, "proxy_request_buffering"), "off");
    assert_eq!(directive(&config, "proxy_buffering"), "off");
    let ingress = &yaml_file("k8s/base/ingress.yaml")[0];
    let ingress_body = nginx_size(yaml_str(
        &ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"],
        "proxy-body-size",
    ));
    assert_eq!(
        body, ingress_body,
        "compose's nginx and the Ingress disagree"
    );
    assert_eq!(directive(&config, "set $stitch_api"), "http://api:8080");
}
