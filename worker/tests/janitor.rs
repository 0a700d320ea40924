//! The janitor against real Redis, RabbitMQ and files: old leftovers go, anything young or
//! counted stays, expired uploads are announced once.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use stitch_common::backends::Backends;
use stitch_common::config::Interval;
use stitch_common::events::Event;
use stitch_common::geometry::{ChunkIndex, Geometry};
use stitch_common::id::UploadId;
use stitch_common::lock::LockName;
use stitch_common::queue::OutboxMessage;
use stitch_common::quota::Usage;
use stitch_common::upload::{Assembly, ChunkRecord, NewUpload};
use stitch_testkit::TestEnv;
use stitch_testkit::events::EventTap;
use stitch_worker::janitor::Janitor;

const HOUR: Duration = Duration::from_secs(3600);

fn age(path: &Path, by: Duration) {
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .unwrap();
    file.set_modified(SystemTime::now() - by).unwrap();
}

fn write(path: &Path, bytes: &[u8], old: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    if old {
        age(path, 2 * HOUR);
    }
}

fn upload(id: &str) -> NewUpload {
    NewUpload {
        id: UploadId::parse(id).unwrap(),
        geometry: Geometry::new(40, 10).unwrap(),
        filename: Some("f.bin".into()),
        file_md5: None,
        metadata: None,
        created_at_ms: 1234,
        assembly: Default::default(),
        callback_url: None,
        callback_secret: None,
    }
}

/// The test's backends and a janitor of them whose grace, ttl and interval are an hour,
/// keeping completed files for ever.
fn janitor_of(env: &TestEnv) -> (Backends, Janitor) {
    let mut settings = env.settings();
    settings.janitor.interval = Interval(HOUR);
    settings.janitor.grace = Interval(HOUR);
    settings.uploads.ttl = Interval(HOUR);
    settings.uploads.completed_retention = None;
    let backends = Backends::distributed(&settings).unwrap();
    let janitor = Janitor::new(&backends, &settings);
    (backends, janitor)
}

fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_collects_only_old_leftovers_and_announces_expired_uploads() {
    let env = TestEnv::new();
    let tap = EventTap::start(&env).await;
    let (backends, janitor) = janitor_of(&env);
    let storage = backends.storage.clone();

    // An upload the state store no longer knows (its keys expired), untouched for two hours.
    let expired = upload("gone");
    storage.ensure_manifest(&expired).await.unwrap();
    let gone_dir = storage.upload_dir(&expired.id);
    write(&gone_dir.join("chunks/0.aaaa"), b"0123456789", true);
    age(&gone_dir.join("manifest.json"), 2 * HOUR);
    age(&gone_dir.join("chunks"), 2 * HOUR);
    age(&gone_dir, 2 * HOUR);

    // The same, but touched a minute ago: in use, or about to be.
    let young = upload("young");
    storage.ensure_manifest(&young).await.unwrap();

    // A live upload: one counted copy, one surplus copy and two partial writes.
    let live = upload("live");
    storage.ensure_manifest(&live).await.unwrap();
    let counted = ChunkRecord {
        index: ChunkIndex(0),
        offset: 0,
        len: 10,
        crc32c: crc32c::crc32c(b"0123456789"),
        md5: None,
        token: "t1".into(),
    };
    backends
        .state
        .record_chunk(
            &live,
            &counted,
            &OutboxMessage::merge(live.id.clone()),
            &OutboxMessage::event(&Event::created(&live)),
            60_000,
        )
        .await
        .unwrap();
    let chunks = storage.chunks_dir(&live.id);
    write(&chunks.join("0.t1"), b"0123456789", true);
    write(&chunks.join("1.surplus"), b"0123456789", true);
    write(&chunks.join("2.dead.part"), b"01234", true);
    write(&chunks.join("3.writing.part"), b"01", false);

    // While another janitor of the fleet holds the janitor lock, this one does nothing.
    let other = backends
        .lock
        .try_acquire(&LockName::Janitor)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(janitor.pass().await.unwrap(), None);
    assert!(gone_dir.exists(), "a janitor swept without the lock");
    assert!(backends.lock.release(&other).await.unwrap());

    let swept = janitor.pass().await.unwrap().expect("the lock was free");
    assert_eq!(swept.expired, vec!["gone".to_owned()]);
    assert!(
        !backends.lock.is_held(&LockName::Janitor).await.unwrap(),
        "the pass released the janitor lock"
    );
    assert!(
        !gone_dir.exists(),
        "the expired upload's files were removed"
    );
    assert!(
        storage.upload_dir(&young.id).exists(),
        "a young directory was collected"
    );
    assert_eq!(
        names(&chunks),
        vec!["0.t1", "3.writing.part"],
        "only uncounted, old copies go"
    );
    assert!(storage.manifest_path(&live.id).exists());

    let event = tap
        .wait_for("gone", "upload.expired", Duration::from_secs(30))
        .await;
    assert_eq!(event["event_id"], "evt_expired_gone_1234");
    assert_eq!(event["upload"]["filename"], "f.bin");

    // A second pass finds nothing more to do.
    assert_eq!(
        janitor.sweep_once().await.unwrap().expired,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_counts_a_concatenation_being_merged_as_a_slot_whose_bytes_its_parts_hold() {
    let env = TestEnv::new();
    let (backends, janitor) = janitor_of(&env);
    let part = upload("part");
    let whole = NewUpload {
        assembly: Assembly::Concat {
            parts: vec![part.id.clone()],
        },
        ..upload("whole")
    };
    backends.storage.ensure_manifest(&whole).await.unwrap();
    backends
        .state
        .create_concatenation(
            &whole,
            &OutboxMessage::event(&Event::created(&whole)),
            &OutboxMessage::merge(whole.id.clone()),
            60_000,
        )
        .await
        .unwrap();
    janitor.sweep_once().await.unwrap();
    assert_eq!(
        backends.quotas.usage(&whole.id.tenant()).await.unwrap(),
        Usage {
            active_uploads: 1,
            stored_bytes: 0
        },
        "the ledger tracks the merging concatenation's slot, not its parts' bytes again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_keeps_the_reservation_of_an_upload_whose_length_is_open() {
    let env = TestEnv::new();
    let (backends, janitor) = janitor_of(&env);
    let open = NewUpload {
        geometry: Geometry::deferred(),
        assembly: Assembly::Segments { partial: false },
        ..upload("open")
    };
    backends.storage.ensure_manifest(&open).await.unwrap();
    backends
        .state
        .create_upload(&open, &OutboxMessage::event(&Event::created(&open)), 60_000)
        .await
        .unwrap();
    let limits = stitch_common::config::Quotas {
        max_active_uploads: None,
        max_stored_bytes: None,
        max_upload_bytes: None,
    };
    backends
        .quotas
        .reserve(&open.id, 600, &limits)
        .await
        .unwrap();
    janitor.sweep_once().await.unwrap();
    assert_eq!(
        backends.quotas.usage(&open.id.tenant()).await.unwrap(),
        Usage {
            active_uploads: 1,
            stored_bytes: 600
        },
        "the reservation of its largest size stays until the length is declared"
    );
}
