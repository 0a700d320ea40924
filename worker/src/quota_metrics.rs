//! The quota gauges: what each tenant named in `[auth.tenants]` uses now (active uploads,
//! stored bytes), read from the quota ledger every `metrics.queue_poll_interval`. Only
//! configured tenants get a series, so the metric's cardinality is bounded by configuration,
//! never by clients.

use std::sync::Arc;
use std::time::Duration;

use stitch_common::id::Tenant;
use stitch_common::metrics as m;
use stitch_common::quota::QuotaLedger;
use tokio::sync::watch;

pub struct TenantGauges {
    pub quotas: Arc<dyn QuotaLedger>,
    /// The tenants of `[auth.tenants]`.
    pub tenants: Vec<Tenant>,
    pub interval: Duration,
}

impl TenantGauges {
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        if self.tenants.is_empty() {
            return;
        }
        crate::queue_metrics::every(self.interval, shutdown, || self.poll_once()).await;
    }

    /// Reads every configured tenant's usage once; one that cannot be read keeps its last
    /// value.
    pub async fn poll_once(&self) {
        for tenant in &self.tenants {
            match self.quotas.usage(tenant).await {
                Ok(usage) => {
                    let label = tenant.to_string();
                    metrics::gauge!(m::TENANT_ACTIVE_UPLOADS, "tenant" => label.clone())
                        .set(usage.active_uploads as f64);
                    metrics::gauge!(m::TENANT_STORED_BYTES, "tenant" => label)
                        .set(usage.stored_bytes as f64);
                }
                Err(e) => tracing::debug!(%tenant, error = %e, "tenant usage unavailable"),
            }
        }
    }
}
