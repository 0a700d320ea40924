//! Stitch's HTTP API: chunk ingest, resumable status and abort, over a shared state store
//! and shared storage. Any number of API processes can serve the same uploads.
//!
//! A request's path: [`routes`] → an extractor in [`extract`] (headers and ids checked for
//! form) → a handler in [`handlers`] → one call into [`service::UploadService`] (the rules)
//! → the state store and storage from `stitch_common`. Failures become [`error::ApiError`],
//! which knows its status code and stable JSON code. `stitch_common::server` runs the connections.
//!
//! [`Application`] assembles it from [`Settings`]; `main.rs` only loads settings and calls
//! [`Application::run_until_stopped`].

pub mod body;
pub mod cli;
pub mod cors;
pub mod download;
pub mod error;
pub mod extract;
pub mod handlers;
pub mod hook;
pub mod routes;
pub mod service;
pub mod tus;
pub mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use stitch_common::auth::Authenticator;
use stitch_common::backends::Backends;
use stitch_common::config::Settings;
use tokio::net::TcpListener;

use crate::service::UploadService;
use stitch_common::server::{self, ServerLimits};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub uploads: Arc<UploadService>,
    /// Turns each request's credentials into a tenant and scopes.
    pub auth: Authenticator,
    /// How slowly a chunk body may arrive.
    pub body_limits: body::BodyLimits,
    pub max_metadata_bytes: usize,
    pub metrics: PrometheusHandle,
    /// Base of absolute download links (`http.public_url`), if configured.
    pub public_url: Option<Arc<str>>,
    /// Browser origins allowed to call the API (`http.cors_origins`); `None`: CORS is off.
    pub cors: Option<Arc<cors::CorsPolicy>>,
    /// The tus front end's settings; `None`: tus is off (`tus.enabled = false`).
    pub tus: Option<Arc<tus::TusConfig>>,
    /// The upload page's settings; `None`: the page is off (`ui.disabled`).
    pub ui: Option<Arc<ui::UiConfig>>,
}

/// A bound, not yet running API server.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    limits: ServerLimits,
    /// Routes of other roles served on this port (the single-node mode's webhook admin).
    extra: axum::Router,
}

impl Application {
    /// Binds the listener and connects the backends (lazily: a backend that is down makes
    /// requests fail with 503 and `/readyz` report it, it does not stop the process).
    /// Refuses to build against a schema that does not fit this build (see
    /// `stitch_common::migrate`).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        stitch_common::migrate::ensure_compatible(settings).await?;
        Self::build_with(settings, &Backends::distributed(settings)?).await
    }

    /// An API on the given backends (the single-node mode passes embedded ones).
    pub async fn build_with(settings: &Settings, backends: &Backends) -> anyhow::Result<Self> {
        stitch_common::metrics::register(stitch_common::metrics::Role::Api);
        let storage = &backends.storage;
        if let Err(e) = storage.probe().await {
            tracing::warn!(error = %e, root = %settings.storage.root.display(), "storage is not writable yet");
        }
        let listener = TcpListener::bind(settings.http.bind)
            .await
            .with_context(|| format!("binding STITCH__HTTP__BIND={}", settings.http.bind))?;
        let auth = Authenticator::new(&settings.auth).context("loading the API keys")?;
        Ok(Self {
            listener,
            state: AppState {
                uploads: Arc::new(
                    UploadService::new(settings, backends, auth.clone())
                        .context("setting up the upload service")?,
                ),
                auth,
                body_limits: body::BodyLimits::from_settings(&settings.http),
                max_metadata_bytes: settings.limits.max_metadata_bytes,
                metrics: stitch_common::telemetry::metrics_handle(),
                public_url: settings.http.public_url.as_deref().map(Arc::from),
                cors: cors::CorsPolicy::new(&settings.http.cors_origins).map(Arc::new),
                tus: tus::TusConfig::from_settings(settings),
                ui: ui::UiConfig::from_settings(settings),
            },
            limits: ServerLimits {
                header_read_timeout: settings.http.header_read_timeout.0,
                shutdown_grace: settings.http.shutdown_grace.0,
            },
            extra: axum::Router::new(),
        })
    }

    /// Serves `routes` beside the API's (paths must not overlap).
    pub fn with_routes(mut self, routes: axum::Router) -> Self {
        self.extra = self.extra.merge(routes);
        self
    }

    /// The address actually bound (port 0 becomes a real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves until `shutdown` completes, then drains in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr(), "stitch-api listening");
        server::serve(
            self.listener,
            routes::router(self.state).merge(self.extra),
            self.limits,
            shutdown,
        )
        .await
        .context("serving HTTP")
    }
}
