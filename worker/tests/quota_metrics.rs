//! The per-tenant quota gauges: configured tenants only, read from the real ledger.

#![allow(clippy::unwrap_used)]

use stitch_common::backends::Backends;
use stitch_common::config::Quotas;
use stitch_common::id::{Tenant, UploadId};
use stitch_testkit::TestEnv;
use stitch_worker::quota_metrics::TenantGauges;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_tenants_get_usage_gauges_and_no_other_tenant_does() {
    let env = TestEnv::new();
    stitch_common::metrics::register(stitch_common::metrics::Role::Worker);
    let backends = Backends::distributed(&env.settings()).unwrap();
    // Tenant names unique to this test: the metrics registry is the process's.
    let (watched, unwatched) = (
        Tenant::parse(&format!("w{}", &env.namespace[5..])).unwrap(),
        Tenant::parse(&format!("u{}", &env.namespace[5..])).unwrap(),
    );
    for (tenant, name, bytes) in [
        (&watched, "a", 700),
        (&watched, "b", 300),
        (&unwatched, "c", 5),
    ] {
        let id = UploadId::new(tenant, name).unwrap();
        backends
            .quotas
            .reserve(&id, bytes, &Quotas::default())
            .await
            .unwrap();
    }
    backends
        .quotas
        .settle(&UploadId::new(&watched, "b").unwrap(), 300)
        .await
        .unwrap();
    TenantGauges {
        quotas: backends.quotas.clone(),
        tenants: vec![watched.clone()],
        interval: std::time::Duration::from_secs(3600),
    }
    .poll_once()
    .await;
    let text = stitch_common::telemetry::metrics_handle().render();
    let line = |name: &str, tenant: &Tenant| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{tenant=\"{tenant}\"}}")))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(
        line("stitch_tenant_active_uploads", &watched).as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        line("stitch_tenant_stored_bytes", &watched).as_deref(),
        Some("1000")
    );
    assert_eq!(line("stitch_tenant_active_uploads", &unwatched), None);
}
