//! Migrations: versioned, forward-only, idempotent steps that bring the broker topology and
//! the Redis keyspace to the shape this build expects (the step files live in `migrations/`,
//! whose README gives the rules), the schema record they leave in Redis, and the check every
//! distributed binary makes at start.

use std::time::Duration;

use anyhow::Context;
use redis::AsyncCommands;
use serde::Deserialize;

use crate::config::Settings;
use crate::queue::AmqpBroker;

/// One step, as embedded from `migrations/`.
pub struct Step {
    pub version: u32,
    pub file: &'static str,
    pub text: &'static str,
}

/// Every step, in order. A test checks that this is exactly the content of `migrations/`.
pub const STEPS: &[Step] = &[
    Step {
        version: 1,
        file: "0001_broker_topology.json",
        text: include_str!("../../migrations/0001_broker_topology.json"),
    },
    Step {
        version: 2,
        file: "0002_keyspace_layout.lua",
        text: include_str!("../../migrations/0002_keyspace_layout.lua"),
    },
    Step {
        version: 3,
        file: "0003_typed_outbox.lua",
        text: TYPED_OUTBOX_STEP,
    },
];

/// Step 0003, which the Redis state store also runs on a layout-1 outbox that an older
/// process wrote after the migration (see `state::redis`).
pub(crate) const TYPED_OUTBOX_STEP: &str = include_str!("../../migrations/0003_typed_outbox.lua");

/// The schema this build expects: its last step.
pub const SCHEMA_VERSION: u32 = STEPS[STEPS.len() - 1].version;

/// How long a migration run may hold the lock before another may take over.
const LOCK_TTL: Duration = Duration::from_secs(300);

pub fn schema_key(namespace: &str) -> String {
    format!("{namespace}:schema")
}

fn lock_key(namespace: &str) -> String {
    format!("{namespace}:schema:lock")
}

impl Step {
    pub fn name(&self) -> &'static str {
        let stem = self.file.rsplit_once('.').map_or(self.file, |(s, _)| s);
        stem.split_once('_').map_or(stem, |(_, name)| name)
    }

    /// For a per-upload Redis step (second line `-- per-upload: <suffix> <suffix>...`): the
    /// key suffixes it takes, the first naming the uploads it runs for.
    pub fn per_upload(&self) -> Option<Vec<&'static str>> {
        let line = self.text.lines().nth(1)?;
        let suffixes: Vec<&str> = line
            .strip_prefix("-- per-upload:")?
            .split_whitespace()
            .collect();
        (!suffixes.is_empty()).then_some(suffixes)
    }

    /// Whether binaries built before this step cannot run once it is applied.
    pub fn breaking(&self) -> bool {
        if self.file.ends_with(".json") {
            serde_json::from_str::<BrokerStep>(self.text).is_ok_and(|s| s.breaking)
        } else {
            self.text.lines().next() == Some("-- breaking: true")
        }
    }
}

#[derive(Deserialize)]
struct BrokerStep {
    breaking: bool,
    broker: BrokerAction,
}

#[derive(Deserialize)]
struct BrokerAction {
    /// What to declare: `events` and family names; declared with the configured shapes.
    declare: Vec<String>,
}

/// What the schema record says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchemaState {
    /// The last step applied (0: never migrated).
    pub version: u32,
    /// The oldest schema a binary may be built for and still run.
    pub compatible_from: u32,
}

impl SchemaState {
    /// Why a binary built for [`SCHEMA_VERSION`] may not run against this schema, if it may not.
    pub fn incompatibility(&self) -> Option<String> {
        if self.version < SCHEMA_VERSION {
            Some(format!(
                "the schema is at version {} and this build needs {SCHEMA_VERSION}: run `stitch-worker migrate` with the same configuration first",
                self.version
            ))
        } else if self.compatible_from > SCHEMA_VERSION {
            Some(format!(
                "the schema is at version {} and no longer works with binaries built for version {SCHEMA_VERSION} (it needs {} or later): deploy a newer build",
                self.version, self.compatible_from
            ))
        } else {
            None
        }
    }
}

async fn connection(settings: &Settings) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(settings.redis.url.expose())
        .map_err(|e| anyhow::anyhow!("STITCH__REDIS__URL is not a usable Redis URL: {e}"))?;
    let connect = client.get_multiplexed_async_connection();
    tokio::time::timeout(settings.redis.timeout.0, connect)
        .await
        .map_err(|_| anyhow::anyhow!("no Redis connection within {:?}", settings.redis.timeout.0))?
        .context("connecting to Redis")
}

/// Reads the schema record.
pub async fn read_state(settings: &Settings) -> anyhow::Result<SchemaState> {
    let mut conn = connection(settings).await?;
    read_with(&mut conn, &settings.namespace).await
}

async fn read_with(
    conn: &mut redis::aio::MultiplexedConnection,
    namespace: &str,
) -> anyhow::Result<SchemaState> {
    let (version, compatible_from): (Option<u32>, Option<u32>) = redis::cmd("HMGET")
        .arg(schema_key(namespace))
        .arg("version")
        .arg("compatible_from")
        .query_async(conn)
        .await
        .context("reading the schema version")?;
    Ok(SchemaState {
        version: version.unwrap_or(0),
        compatible_from: compatible_from.unwrap_or(0),
    })
}

/// The start-up check of `stitch-api` and `stitch-worker`: an error naming what to do when
/// the schema does not fit this build. When Redis cannot be reached, the process starts (it
/// reports not ready until Redis answers) and the check is logged as skipped.
pub async fn ensure_compatible(settings: &Settings) -> anyhow::Result<()> {
    match read_state(settings).await {
        Ok(state) => match state.incompatibility() {
            Some(why) => anyhow::bail!(
                "incompatible schema in namespace {:?}: {why}",
                settings.namespace
            ),
            None => Ok(()),
        },
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "schema version not checked: Redis unavailable");
            Ok(())
        }
    }
}

/// What a migration run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub from: u32,
    pub to: u32,
    pub steps: Vec<String>,
}

/// Applies the steps past the recorded version, in order, under the namespace's migration
/// lock (other runs wait for it, up to `wait`).
pub async fn apply(settings: &Settings, wait: Duration) -> anyhow::Result<Applied> {
    let mut conn = connection(settings).await?;
    let namespace = &settings.namespace;
    let token = uuid::Uuid::new_v4().to_string();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let taken: Option<String> = redis::cmd("SET")
            .arg(lock_key(namespace))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_TTL.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .context("taking the migration lock")?;
        if taken.is_some() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "another migration holds {} for longer than {wait:?}",
            lock_key(namespace)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let result = apply_locked(settings, &mut conn).await;
    let release = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    );
    let _: redis::RedisResult<i64> = release
        .key(lock_key(namespace))
        .arg(&token)
        .invoke_async(&mut conn)
        .await;
    result
}

async fn apply_locked(
    settings: &Settings,
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<Applied> {
    let namespace = &settings.namespace;
    let start = read_with(conn, namespace).await?;
    if start.compatible_from > SCHEMA_VERSION {
        anyhow::bail!(
            "the schema is at version {} and needs builds for version {} or later; this one is for {SCHEMA_VERSION}",
            start.version,
            start.compatible_from
        );
    }
    let mut compatible_from = start.compatible_from;
    let mut applied = Applied {
        from: start.version,
        to: start.version,
        steps: Vec::new(),
    };
    for step in STEPS.iter().filter(|s| s.version > start.version) {
        tracing::info!(
            version = step.version,
            step = step.name(),
            "applying migration"
        );
        run_step(settings, conn, step)
            .await
            .with_context(|| format!("migration {} ({})", step.version, step.file))?;
        if step.breaking() {
            compatible_from = step.version;
        }
        let record = format!("{} {}", step.name(), crate::now_ms());
        let () = conn
            .hset_multiple(
                schema_key(namespace),
                &[
                    ("version", step.version.to_string()),
                    ("compatible_from", compatible_from.to_string()),
                    (&format!("step:{:04}", step.version), record),
                ],
            )
            .await
            .context("recording the schema version")?;
        applied.to = step.version;
        applied.steps.push(step.file.to_owned());
    }
    Ok(applied)
}

async fn run_step(
    settings: &Settings,
    conn: &mut redis::aio::MultiplexedConnection,
    step: &Step,
) -> anyhow::Result<()> {
    if step.file.ends_with(".json") {
        let parsed: BrokerStep = serde_json::from_str(step.text).context("parsing the step")?;
        let broker = AmqpBroker::new(settings);
        let topology = broker.topology();
        let mut known = vec!["events".to_owned()];
        known.extend(topology.families.iter().map(|f| f.family.name().to_owned()));
        for what in &parsed.broker.declare {
            anyhow::ensure!(known.contains(what), "unknown broker object {what:?}");
        }
        broker
            .declare_topology()
            .await
            .map_err(|e| anyhow::anyhow!("declaring the broker topology: {e}"))
    } else if let Some(suffixes) = step.per_upload() {
        run_per_upload(&settings.namespace, conn, step, &suffixes).await
    } else {
        let _: redis::Value = redis::Script::new(step.text)
            .key(schema_key(&settings.namespace))
            .arg(&settings.namespace)
            .invoke_async(conn)
            .await
            .context("running the Redis script")?;
        Ok(())
    }
}

/// Runs a per-upload step once for every upload that has a key `<ns>:{<id>}:<suffixes[0]>`,
/// with that upload's keys `<ns>:{<id>}:<suffix>` in order as `KEYS` (one hash tag, one
/// Redis Cluster slot per run) and the namespace as `ARGV[1]`. Uploads are found by SCAN.
async fn run_per_upload(
    namespace: &str,
    conn: &mut redis::aio::MultiplexedConnection,
    step: &Step,
    suffixes: &[&str],
) -> anyhow::Result<()> {
    let script = redis::Script::new(step.text);
    let pattern = format!("{namespace}:{{*}}:{}", suffixes[0]);
    let mut cursor: u64 = 0;
    let mut uploads = 0usize;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("listing the uploads to migrate")?;
        for key in batch {
            let Some(tag) = key.strip_suffix(suffixes[0]) else {
                continue;
            };
            let mut invocation = script.prepare_invoke();
            for suffix in suffixes {
                invocation.key(format!("{tag}{suffix}"));
            }
            let _: redis::Value = invocation
                .arg(namespace)
                .invoke_async(conn)
                .await
                .with_context(|| format!("running the step for {key}"))?;
            uploads += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    tracing::info!(step = step.name(), uploads, "per-upload step applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_migrations_is_a_listed_step_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f != "README.md")
            .collect();
        files.sort();
        let listed: Vec<String> = STEPS.iter().map(|s| s.file.to_owned()).collect();
        assert_eq!(files, listed);
        for (i, step) in STEPS.iter().enumerate() {
            assert_eq!(step.version as usize, i + 1, "{}", step.file);
            assert!(step.file.starts_with(&format!("{:04}_", step.version)));
            let on_disk = std::fs::read_to_string(dir.join(step.file)).unwrap();
            assert_eq!(on_disk, step.text);
        }
    }

    #[test]
    fn the_broker_step_declares_exactly_the_topology() {
        let step: BrokerStep = serde_json::from_str(STEPS[0].text).unwrap();
        let topology = crate::queue::Topology::from_settings(&Settings::default());
        let mut expected: Vec<String> = topology
            .families
            .iter()
            .map(|f| f.family.name().to_owned())
            .collect();
        expected.push("events".into());
        expected.sort();
        let mut declared = step.broker.declare.clone();
        declared.sort();
        assert_eq!(declared, expected);
        assert!(STEPS.iter().all(Step::breaking));
        assert_eq!(STEPS[1].per_upload(), None);
        assert_eq!(
            STEPS[2].per_upload(),
            Some(vec!["outbox", "outbox:merge", "outbox:events"])
        );
    }

    #[test]
    fn compatibility_is_decided_by_version_and_compatible_from() {
        let at = |version, compatible_from| SchemaState {
            version,
            compatible_from,
        };
        assert!(
            at(0, 0)
                .incompatibility()
                .unwrap()
                .contains("stitch-worker migrate")
        );
        assert!(at(SCHEMA_VERSION - 1, 1).incompatibility().is_some());
        assert_eq!(at(SCHEMA_VERSION, SCHEMA_VERSION).incompatibility(), None);
        // A newer schema whose new steps are not breaking still runs this build.
        assert_eq!(
            at(SCHEMA_VERSION + 3, SCHEMA_VERSION).incompatibility(),
            None
        );
        assert!(
            at(SCHEMA_VERSION + 1, SCHEMA_VERSION + 1)
                .incompatibility()
                .unwrap()
                .contains("deploy a newer build")
        );
    }
}
