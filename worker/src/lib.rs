//! Stitch's merge worker: turns completed uploads into one verified file.
//!
//! Roles (each switchable in `[worker]`):
//! - **merge** ([`consumer`] → [`merge::Merger`] →
//!   [`stitch_common::concat`]): takes merge jobs from
//!   RabbitMQ, locks the upload (Redlock-style, fenced), concatenates its chunks while
//!   computing MD5, verifies, commits and publishes `upload.completed`.
//! - **sweeper** ([`sweeper`]): republishes merge triggers and events left in outboxes and
//!   re-enqueues merges that got stuck.
//! - **janitor** ([`janitor`]): removes files nothing needs and announces expired uploads.
//!
//! Every worker also reads the queues' depth into the metrics ([`queue_metrics`]).
//!
//! It always serves `/healthz`, `/readyz` and `/metrics` ([`probes`]) on its own bind. Like
//! the API it is a library with a thin `main.rs`: [`Worker::build`], then
//! [`Worker::run_until_stopped`], so tests and the single-node mode run it in-process.

pub mod cli;

pub mod consumer;
pub mod janitor;
pub mod merge;
pub mod probes;
pub mod queue_metrics;
pub mod quota_metrics;
pub mod sweeper;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use stitch_common::backends::Backends;
use stitch_common::config::Settings;
use stitch_common::server::{self, ServerLimits};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::merge::Merger;

/// The worker's default bind, beside the API's 8080, so both run on one machine unchanged.
pub const DEFAULT_BIND: &str = "127.0.0.1:8081";

/// A bound, not yet running worker.
pub struct Worker {
    /// The probes' listener; `None` when another server answers the probes (single-node).
    listener: Option<TcpListener>,
    settings: Settings,
    backends: Backends,
    merger: Arc<Merger>,
    /// The webhook dispatcher, when that role runs.
    dispatcher: Option<Arc<webhooks::Dispatcher>>,
    limits: ServerLimits,
}

impl Worker {
    /// A worker on Redis and RabbitMQ.
    /// Refuses to build against a schema that does not fit this build (see
    /// `stitch_common::migrate`).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        stitch_common::migrate::ensure_compatible(settings).await?;
        Self::build_with(settings, Backends::distributed(settings)?).await
    }

    /// A worker on the given backends.
    pub async fn build_with(settings: &Settings, backends: Backends) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.http.bind)
            .await
            .with_context(|| format!("binding STITCH__HTTP__BIND={}", settings.http.bind))?;
        let mut worker = Self::without_probes(settings, backends)?;
        worker.listener = Some(listener);
        Ok(worker)
    }

    /// A worker that serves no probes of its own: in the single-node mode the API's port
    /// answers them for the whole process.
    pub fn without_probes(settings: &Settings, backends: Backends) -> anyhow::Result<Self> {
        stitch_common::metrics::register(stitch_common::metrics::Role::Worker);
        let merger = Arc::new(
            Merger::new(
                settings,
                backends.state.clone(),
                backends.storage.clone(),
                backends.lock.clone(),
                backends.events.clone(),
            )
            .with_quotas(backends.quotas.clone()),
        );
        let dispatcher = if settings.worker.webhooks {
            Some(Arc::new(
                webhooks::Dispatcher::new(settings, &backends).context("setting up webhooks")?,
            ))
        } else {
            None
        };
        Ok(Self {
            listener: None,
            dispatcher,
            settings: settings.clone(),
            backends,
            merger,
            limits: ServerLimits {
                header_read_timeout: settings.http.header_read_timeout.0,
                shutdown_grace: settings.http.shutdown_grace.0,
            },
        })
    }

    /// The webhook admin endpoints (`/admin/...`, `admin` scope), when the dispatcher runs;
    /// empty otherwise. The worker serves them on its probes' port; the single-node mode on
    /// the API's.
    pub fn admin_routes(&self) -> anyhow::Result<axum::Router> {
        Ok(match &self.dispatcher {
            Some(d) => webhooks::admin::router(
                d.clone(),
                stitch_common::auth::Authenticator::new(&self.settings.auth)
                    .context("loading the API keys")?,
            ),
            None => axum::Router::new(),
        })
    }

    /// The probes' address, when it serves them.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs the configured roles until `shutdown` completes; then stops taking jobs, lets
    /// running merges finish within the grace period and hands the rest back to the broker.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let s = &self.settings;
        match self.local_addr() {
            Some(addr) => {
                tracing::info!(%addr, merge = s.worker.merge, sweeper = s.worker.sweeper, "stitch-worker listening")
            }
            None => tracing::info!(
                merge = s.worker.merge,
                sweeper = s.worker.sweeper,
                "stitch-worker running"
            ),
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut roles = tokio::task::JoinSet::new();
        if s.worker.merge {
            let config = consumer::ConsumerConfig {
                prefetch: s.merge.concurrency,
                retry_delays: s.merge.retry_delays.iter().map(|d| d.0).collect(),
                shutdown_grace: s.http.shutdown_grace.0,
            };
            roles.spawn(consumer::run(
                self.merger.clone(),
                self.backends.merges.clone(),
                config,
                stop_rx.clone(),
            ));
        }
        if s.worker.sweeper {
            let sweeper = sweeper::Sweeper {
                state: self.backends.state.clone(),
                queue: self.backends.merges.clone(),
                events: self.backends.events.clone(),
                lock: self.backends.lock.clone(),
                config: sweeper::SweeperConfig {
                    namespace: s.namespace.clone(),
                    interval: s.sweeper.interval.0,
                    outbox_horizon: s.sweeper.outbox_horizon.0,
                    stuck_merge_horizon: s.sweeper.stuck_merge_horizon.0,
                },
            };
            roles.spawn(sweeper.run(stop_rx.clone()));
        }
        if s.worker.janitor {
            let janitor = janitor::Janitor::new(&self.backends, s);
            roles.spawn(janitor.run(stop_rx.clone()));
        }
        if let Some(dispatcher) = &self.dispatcher {
            roles.spawn(dispatcher.clone().run(stop_rx.clone()));
        }
        let gauges = queue_metrics::QueueGauges {
            queues: vec![
                ("merge", self.backends.merges.clone()),
                ("webhooks", self.backends.webhooks.clone()),
                ("webhooks.feed", self.backends.webhook_feed.clone()),
            ],
            interval: s.metrics.queue_poll_interval.0,
        };
        roles.spawn(gauges.run(stop_rx.clone()));
        let tenants = quota_metrics::TenantGauges {
            quotas: self.backends.quotas.clone(),
            tenants: s
                .auth
                .tenants
                .keys()
                .filter_map(|t| stitch_common::id::Tenant::parse(t).ok())
                .collect(),
            interval: s.metrics.queue_poll_interval.0,
        };
        roles.spawn(tenants.run(stop_rx.clone()));
        let admin = self.admin_routes()?;
        let probes = probes::router(probes::Probes {
            state: self.backends.state.clone(),
            queue: s.worker.merge.then(|| self.backends.merges.clone()),
            metrics: stitch_common::telemetry::metrics_handle(),
        })
        .merge(admin);
        let (probes_stop_tx, probes_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let probe_server = self.listener.map(|listener| {
            tokio::spawn(server::serve(listener, probes, self.limits, async {
                let _ = probes_stop_rx.await;
            }))
        });

        shutdown.await;
        let _ = stop_tx.send(true);
        while roles.join_next().await.is_some() {}
        let _ = probes_stop_tx.send(());
        if let Some(server) = probe_server {
            let _ = server.await;
        }
        tracing::info!("stitch-worker stopped");
        Ok(())
    }
}
