//! Migrations as a deploy runs them: the real `stitch-worker migrate`, several at once, and
//! the real binaries refusing a schema that does not fit them.

use std::process::{Command, Output};
use std::time::Duration;

use stitch_common::migrate::{SCHEMA_VERSION, schema_key};
use stitch_testkit::events::queue_exists;

use crate::harness::*;

/// Runs `cmd` to its end (it must end within a minute).
fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the process");
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.expect("the process's output"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("the process did not exit within a minute")
        }
    }
}

fn migrate_command(env: &TestEnv, args: &[&str]) -> Command {
    let mut cmd = worker_command(env);
    cmd.arg("migrate").args(args);
    cmd
}

fn schema(env: &TestEnv) -> std::collections::BTreeMap<String, String> {
    let mut conn = redis_connection().unwrap();
    redis::cmd("HGETALL")
        .arg(schema_key(&env.namespace))
        .query(&mut conn)
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_refuse_an_unmigrated_namespace_until_concurrent_migrations_apply_it_once() {
    let env = TestEnv::unmigrated();
    let merge_queue = format!("{}.merge", env.namespace);

    // Before any migration: both binaries refuse, naming the command to run.
    for (name, cmd) in [("api", api_command(&env)), ("worker", worker_command(&env))] {
        let out = run(cmd);
        assert!(
            !out.status.success(),
            "{name} started against an unmigrated namespace"
        );
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("schema is at version 0") && stderr.contains("stitch-worker migrate"),
            "{name}: {stderr}"
        );
    }
    let out = run(migrate_command(&env, &["--check"]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        !queue_exists(&merge_queue).await,
        "refused starts declared nothing"
    );

    // Four migrations at once (replicas of a deploy racing): one applies every step, the
    // others wait for its lock and find nothing to do.
    let children: Vec<_> = (0..4)
        .map(|_| {
            migrate_command(&env, &[])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for out in &outputs {
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let stdout: Vec<String> = outputs.iter().map(|o| text(&o.stdout)).collect();
    let applied = format!("schema migrated from version 0 to {SCHEMA_VERSION}");
    assert_eq!(
        stdout.iter().filter(|s| s.contains(&applied)).count(),
        1,
        "{stdout:#?}"
    );
    assert_eq!(
        stdout
            .iter()
            .filter(|s| s.contains("nothing to do"))
            .count(),
        3,
        "{stdout:#?}"
    );

    let record = schema(&env);
    assert_eq!(record["version"], SCHEMA_VERSION.to_string());
    assert_eq!(record["compatible_from"], SCHEMA_VERSION.to_string());
    assert_eq!(record["keyspace_layout"], "1");
    for step in stitch_common::migrate::STEPS {
        assert!(
            record.contains_key(&format!("step:{:04}", step.version)),
            "{record:?}"
        );
    }
    let lock_left: bool = redis::cmd("EXISTS")
        .arg(format!("{}:schema:lock", env.namespace))
        .query(&mut redis_connection().unwrap())
        .unwrap();
    assert!(!lock_left, "the migration lock was released");
    for queue in [
        merge_queue.clone(),
        format!("{}.merge.dead", env.namespace),
        format!("{}.webhooks", env.namespace),
        format!("{}.webhooks.feed", env.namespace),
    ] {
        assert!(queue_exists(&queue).await, "{queue} was not declared");
    }

    // Now the check passes and the binaries run.
    let out = run(migrate_command(&env, &["--check"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let api = start_api(&env);
    let _worker = start_worker(&env);
    let client = ApiClient::new(api.addr);
    let source = Source::random(3000, 1000, 71);
    let id = new_id();
    upload(
        std::slice::from_ref(&client),
        &id,
        &source,
        &md5_hex(&source.bytes),
    )
    .await;
    let status = client
        .wait_for_state(&id, "completed", Duration::from_secs(60))
        .await;
    assert_eq!(status["state"], "completed", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_build_is_refused_by_the_binaries_and_by_migrate() {
    let env = TestEnv::new();
    let mut conn = redis_connection().unwrap();
    let newer = SCHEMA_VERSION + 1;
    let () = redis::cmd("HSET")
        .arg(schema_key(&env.namespace))
        .arg("version")
        .arg(newer)
        .arg("compatible_from")
        .arg(newer)
        .query(&mut conn)
        .unwrap();
    for (name, cmd) in [
        ("api", api_command(&env)),
        ("worker", worker_command(&env)),
        ("migrate", migrate_command(&env, &[])),
    ] {
        let out = run(cmd);
        assert!(!out.status.success(), "{name} ran against a newer schema");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("version {newer}")),
            "{name}: {stderr}"
        );
    }
    // A newer schema whose new steps are not breaking still runs this build (a rolling
    // deploy's old pods).
    let () = redis::cmd("HSET")
        .arg(schema_key(&env.namespace))
        .arg("compatible_from")
        .arg(SCHEMA_VERSION)
        .query(&mut conn)
        .unwrap();
    let out = run(migrate_command(&env, &["--check"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _api = start_api(&env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_wait_succeeds_once_another_process_migrates() {
    let env = TestEnv::unmigrated();
    let waiting = migrate_command(&env, &["--check", "--wait", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = run(migrate_command(&env, &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let waited = waiting.wait_with_output().unwrap();
    assert!(waited.status.success(), "{}", text(&waited.stderr));
    assert!(text(&waited.stdout).contains("fits this build"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaking_migration_makes_running_processes_unready() {
    let env = TestEnv::new();
    let api = start_api(&env);
    let worker = start_worker(&env);
    let http = http_client();
    let readyz = |addr: std::net::SocketAddr| {
        let http = http.clone();
        async move {
            let response = http
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .unwrap();
            let code = response.status().as_u16();
            (code, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    for addr in [api.addr, worker.addr] {
        let (code, body) = readyz(addr).await;
        assert_eq!(code, 200, "{body}");
    }
    // A newer build's breaking step lands while these processes run.
    let newer = SCHEMA_VERSION + 1;
    let () = redis::cmd("HSET")
        .arg(schema_key(&env.namespace))
        .arg("version")
        .arg(newer)
        .arg("compatible_from")
        .arg(newer)
        .query(&mut redis_connection().unwrap())
        .unwrap();
    for addr in [api.addr, worker.addr] {
        let (code, body) = readyz(addr).await;
        assert_eq!(code, 503, "{body}");
        let state = body["checks"]["state"].as_str().unwrap_or_default();
        assert!(state.contains("incompatible schema"), "{body}");
        assert!(state.contains("deploy a newer build"), "{body}");
    }
}
