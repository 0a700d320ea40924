//! The quota ledger's contract, run against every implementation: Redis (distributed) and
//! SQLite (single-node).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use stitch_common::backends::Backends;
use stitch_common::config::{ByteSize, Quotas};
use stitch_common::id::{Tenant, UploadId};
use stitch_common::quota::{QuotaError, QuotaLedger, Reservation, Usage};
use stitch_testkit::TestEnv;

fn id(tenant: &str, name: &str) -> UploadId {
    UploadId::new(&Tenant::parse(tenant).unwrap(), name).unwrap()
}

fn limits(active: Option<u64>, stored: Option<u64>) -> Quotas {
    Quotas {
        max_active_uploads: active,
        max_stored_bytes: stored.map(ByteSize),
        max_upload_bytes: None,
    }
}

async fn usage(ledger: &dyn QuotaLedger, tenant: &str) -> Usage {
    ledger.usage(&Tenant::parse(tenant).unwrap()).await.unwrap()
}

async fn reservations_stop_at_the_active_limit_and_completion_frees_a_slot(
    ledger: &dyn QuotaLedger,
) {
    let two = limits(Some(2), None);
    assert_eq!(
        ledger.reserve(&id("acme", "a"), 10, &two).await.unwrap(),
        Reservation::New
    );
    assert_eq!(
        ledger.reserve(&id("acme", "b"), 10, &two).await.unwrap(),
        Reservation::New
    );
    let third = ledger.reserve(&id("acme", "c"), 10, &two).await;
    assert!(
        matches!(
            third,
            Err(QuotaError::ActiveUploads {
                active: 2,
                limit: 2
            })
        ),
        "{third:?}"
    );
    // Reserving again for an upload that holds a reservation changes nothing.
    assert_eq!(
        ledger.reserve(&id("acme", "a"), 10, &two).await.unwrap(),
        Reservation::Held
    );
    // Another tenant is not affected, and the same name there is another upload.
    assert_eq!(
        ledger.reserve(&id("globex", "a"), 10, &two).await.unwrap(),
        Reservation::New
    );
    ledger.settle(&id("acme", "a"), 8).await.unwrap();
    assert_eq!(
        usage(ledger, "acme").await,
        Usage {
            active_uploads: 1,
            stored_bytes: 18
        }
    );
    assert_eq!(
        ledger.reserve(&id("acme", "c"), 10, &two).await.unwrap(),
        Reservation::New
    );
    // A settled upload still holds its reservation (its file is kept).
    assert_eq!(
        ledger.reserve(&id("acme", "a"), 10, &two).await.unwrap(),
        Reservation::Held
    );
}

async fn stored_bytes_are_bounded_and_released_when_an_upload_goes(ledger: &dyn QuotaLedger) {
    let hundred = limits(None, Some(100));
    ledger.reserve(&id("t2", "a"), 60, &hundred).await.unwrap();
    let over = ledger.reserve(&id("t2", "b"), 41, &hundred).await;
    assert!(
        matches!(
            over,
            Err(QuotaError::StoredBytes {
                stored: 60,
                requested: 41,
                limit: 100
            })
        ),
        "{over:?}"
    );
    assert_eq!(
        usage(ledger, "t2").await.stored_bytes,
        60,
        "a refusal holds nothing"
    );
    ledger.reserve(&id("t2", "b"), 40, &hundred).await.unwrap();
    ledger.release(&id("t2", "a")).await.unwrap();
    ledger.release(&id("t2", "a")).await.unwrap();
    assert_eq!(
        usage(ledger, "t2").await,
        Usage {
            active_uploads: 1,
            stored_bytes: 40
        },
        "a release is idempotent"
    );
    ledger.reserve(&id("t2", "c"), 60, &hundred).await.unwrap();
    // Settling or releasing an upload that holds nothing changes nothing.
    ledger.settle(&id("t2", "nobody"), 5).await.unwrap();
    ledger.release(&id("t2", "nobody")).await.unwrap();
    assert_eq!(usage(ledger, "t2").await.stored_bytes, 100);
}

async fn racing_reservations_for_the_last_slot_let_exactly_one_through(
    ledger: Arc<dyn QuotaLedger>,
) {
    let limit = limits(Some(3), None);
    for name in ["x", "y"] {
        ledger.reserve(&id("race", name), 1, &limit).await.unwrap();
    }
    let attempts = (0..16).map(|i| {
        let ledger = ledger.clone();
        let limit = limit.clone();
        tokio::spawn(async move {
            ledger
                .reserve(&id("race", &format!("r{i}")), 1, &limit)
                .await
        })
    });
    let mut won = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(Reservation::New) => won += 1,
            Err(QuotaError::ActiveUploads { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(won, 1, "exactly one racer takes the last slot");
    assert_eq!(usage(ledger.as_ref(), "race").await.active_uploads, 3);
}

async fn tracking_makes_an_entry_what_storage_says_whatever_it_was(ledger: &dyn QuotaLedger) {
    let one = limits(Some(1), Some(100));
    ledger.track(&id("t3", "a"), 70, true).await.unwrap();
    ledger.track(&id("t3", "a"), 70, true).await.unwrap();
    ledger.track(&id("t3", "b"), 50, false).await.unwrap();
    assert_eq!(
        usage(ledger, "t3").await,
        Usage {
            active_uploads: 1,
            stored_bytes: 120
        },
        "tracking ignores limits and is idempotent"
    );
    assert!(ledger.reserve(&id("t3", "c"), 1, &one).await.is_err());
    ledger.track(&id("t3", "a"), 60, false).await.unwrap();
    assert_eq!(
        usage(ledger, "t3").await,
        Usage {
            active_uploads: 0,
            stored_bytes: 110
        }
    );
}

/// The names of `tenant`'s uploads reserved before `before_ms` and not confirmed since, sorted.
async fn unconfirmed(ledger: &dyn QuotaLedger, tenant: &str, before_ms: u64) -> Vec<String> {
    let tenant = Tenant::parse(tenant).unwrap();
    let mut names: Vec<String> = ledger
        .unconfirmed(before_ms)
        .await
        .unwrap()
        .into_iter()
        .filter(|id| id.tenant() == tenant)
        .map(|id| id.name().to_owned())
        .collect();
    names.sort();
    names
}

async fn reservations_stay_unconfirmed_until_a_later_step_names_their_upload(
    ledger: &dyn QuotaLedger,
) {
    let none = limits(None, None);
    let before = stitch_common::now_ms();
    for name in ["a", "b", "c", "d"] {
        ledger.reserve(&id("t4", name), 5, &none).await.unwrap();
    }
    assert_eq!(
        ledger.reserve(&id("t4", "a"), 5, &none).await.unwrap(),
        Reservation::Held
    );
    let after = stitch_common::now_ms() + 1;
    assert_eq!(unconfirmed(ledger, "t4", after).await, ["a", "b", "c", "d"]);
    assert!(
        unconfirmed(ledger, "t4", before).await.is_empty(),
        "only reservations made before the time asked are listed"
    );
    ledger.settle(&id("t4", "b"), 5).await.unwrap();
    ledger.release(&id("t4", "c")).await.unwrap();
    ledger.track(&id("t4", "d"), 5, true).await.unwrap();
    assert_eq!(
        unconfirmed(ledger, "t4", after).await,
        ["a"],
        "settling, releasing and tracking each confirm"
    );
    // An entry made by tracking alone was never a reservation.
    ledger.track(&id("t4", "e"), 5, true).await.unwrap();
    ledger.release(&id("t4", "a")).await.unwrap();
    assert!(unconfirmed(ledger, "t4", u64::MAX).await.is_empty());
}

async fn tracking_an_open_length_keeps_a_larger_reservation_and_grows_a_smaller_entry(
    ledger: &dyn QuotaLedger,
) {
    ledger
        .reserve(&id("t5", "open"), 100, &limits(None, None))
        .await
        .unwrap();
    ledger
        .track_growing(&id("t5", "open"), 40, true)
        .await
        .unwrap();
    assert_eq!(
        usage(ledger, "t5").await,
        Usage {
            active_uploads: 1,
            stored_bytes: 100
        },
        "a reservation of the largest size stays"
    );
    ledger
        .track_growing(&id("t5", "open"), 130, true)
        .await
        .unwrap();
    ledger
        .track_growing(&id("t5", "lost"), 30, true)
        .await
        .unwrap();
    ledger
        .track_growing(&id("t5", "lost"), 30, true)
        .await
        .unwrap();
    assert_eq!(
        usage(ledger, "t5").await,
        Usage {
            active_uploads: 2,
            stored_bytes: 160
        },
        "what was received is held at least, once"
    );
    ledger
        .track_growing(&id("t5", "lost"), 10, false)
        .await
        .unwrap();
    assert_eq!(
        usage(ledger, "t5").await,
        Usage {
            active_uploads: 1,
            stored_bytes: 160
        }
    );
}

async fn run_quota_contract(ledger: Arc<dyn QuotaLedger>) {
    tracking_an_open_length_keeps_a_larger_reservation_and_grows_a_smaller_entry(ledger.as_ref())
        .await;
    reservations_stay_unconfirmed_until_a_later_step_names_their_upload(ledger.as_ref()).await;
    tracking_makes_an_entry_what_storage_says_whatever_it_was(ledger.as_ref()).await;
    reservations_stop_at_the_active_limit_and_completion_frees_a_slot(ledger.as_ref()).await;
    stored_bytes_are_bounded_and_released_when_an_upload_goes(ledger.as_ref()).await;
    racing_reservations_for_the_last_slot_let_exactly_one_through(ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_quota_ledger_keeps_the_quota_contract() {
    let env = TestEnv::new();
    let backends = Backends::distributed(&env.settings()).unwrap();
    run_quota_contract(backends.quotas.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_quota_ledger_keeps_the_quota_contract() {
    let env = TestEnv::local();
    let backends =
        Backends::embedded(&env.settings(), &env.storage_root.join("stitch.db")).unwrap();
    run_quota_contract(backends.quotas.clone()).await;
}
