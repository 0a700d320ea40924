//! The webhook dispatcher (a worker role): every upload event, signed, to every endpoint
//! that wants it and to the upload's client callback, retried until it is delivered or its
//! attempts run out.
//!
//! Two consumers:
//! - **fan-out** (the `webhooks.feed` queue, which receives every event): keeps the event for
//!   replay and queues one delivery per target (operator endpoints whose `events` match, and
//!   the upload's callback URL when the operator allows callbacks);
//! - **delivery** (the `webhooks` queue): POSTs one event to one target with Standard
//!   Webhooks headers. 2xx is delivered. Anything else — 3xx included, redirects are never
//!   followed — is a failure, retried through the delay queues (`webhooks.retry_delays`,
//!   backoff with jitter from the queue's own spacing) and dead-lettered after the last.
//!   410 Gone disables an operator endpoint (until enabled again through the admin API) and
//!   stops a callback. A callback's URL is checked against the SSRF policy at every attempt,
//!   and the callback client connects only to addresses that passed it when the connection
//!   was opened (its DNS resolver is the policy, see [`deliver`]); connections are reused.
//!
//! Every attempt is written to the delivery log. A delivery is acked only after its outcome
//! is recorded and any retry is queued, so a dispatcher killed mid-delivery leaves the
//! delivery to be redelivered: at least once, with the same `webhook-id`, which receivers
//! deduplicate on. Deliveries are bounded in time (`webhooks.timeout`) and in what is read
//! back (64 KiB), and run on their own consumer with their own concurrency, apart from merges.

pub mod admin;
pub mod deliver;
pub use stitch_common::webhooks::signing;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use stitch_common::backends::Backends;
use stitch_common::config::Settings;
use stitch_common::events::Event;
use stitch_common::id::UploadId;
use stitch_common::queue::{Delivery, NOW, WorkQueue};
use stitch_common::state::StateStore;
use stitch_common::storage::FsChunkStore;
use stitch_common::webhooks::callback::{CallbackPolicy, Refusal, Resolve, SystemResolver};
use stitch_common::webhooks::{DeliveryAttempt, Target, WebhookJob, WebhookStore};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;
use url::Url;

use self::deliver::{Receiver, Sender};
use self::signing::{SigningKey, signature_header};

/// An operator endpoint, ready to sign for.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub id: String,
    pub url: Url,
    pub keys: Vec<SigningKey>,
    /// Event types it wants; `None`: all.
    pub events: Option<HashSet<String>>,
}

pub struct Dispatcher {
    feed: Arc<dyn WorkQueue>,
    deliveries: Arc<dyn WorkQueue>,
    store: Arc<dyn WebhookStore>,
    state: Arc<dyn StateStore>,
    storage: FsChunkStore,
    endpoints: Vec<Endpoint>,
    /// `None` when client callbacks are not allowed.
    callbacks: Option<CallbackPolicy>,
    /// Long-lived clients (connections are reused across deliveries).
    sender: Sender,
    retry_delays: Vec<Duration>,
    concurrency: u16,
    shutdown_grace: Duration,
}

impl Dispatcher {
    /// Callback hosts are resolved by the system's resolver.
    pub fn new(settings: &Settings, backends: &Backends) -> anyhow::Result<Self> {
        Self::with_resolver(settings, backends, Arc::new(SystemResolver))
    }

    /// Callback hosts are resolved by `resolver` (tests resolve from a table).
    pub fn with_resolver(
        settings: &Settings,
        backends: &Backends,
        resolver: Arc<dyn Resolve>,
    ) -> anyhow::Result<Self> {
        // reqwest is built with rustls and no default provider across the workspace.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let w = &settings.webhooks;
        let endpoints = w
            .endpoints
            .iter()
            .map(|e| {
                let keys = std::iter::once(&e.secret)
                    .chain(&e.previous_secrets)
                    .map(|s| SigningKey::parse(s.expose()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        anyhow::anyhow!("webhooks.endpoints: a secret is not whsec_<base64>")
                    })?;
                Ok(Endpoint {
                    id: settings.endpoint_id(e),
                    url: Url::parse(&e.url)?,
                    keys,
                    events: (!e.events.is_empty()).then(|| e.events.iter().cloned().collect()),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let callbacks = if w.allow_client_callbacks {
            Some(
                CallbackPolicy::new(&w.callback_allowlist, &w.callback_allow_networks)
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
        Ok(Self {
            feed: backends.webhook_feed.clone(),
            deliveries: backends.webhooks.clone(),
            store: backends.webhook_store.clone(),
            state: backends.state.clone(),
            storage: backends.storage.clone(),
            endpoints,
            sender: Sender::new(
                w.connect_timeout.0,
                w.timeout.0,
                callbacks.clone().map(|policy| (policy, resolver)),
            )?,
            callbacks,
            retry_delays: w.retry_delays.iter().map(|d| d.0).collect(),
            concurrency: w.concurrency,
            shutdown_grace: settings.http.shutdown_grace.0,
        })
    }

    pub fn store(&self) -> &Arc<dyn WebhookStore> {
        &self.store
    }

    /// Queues an event's fan-out again (admin replay).
    pub async fn replay(&self, event_id: &str) -> anyhow::Result<bool> {
        let Some(body) = self.store.event(event_id).await? else {
            return Ok(false);
        };
        self.feed.enqueue(body.as_bytes(), NOW).await?;
        Ok(true)
    }

    /// Runs both consumers until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let fan_out = {
            let me = self.clone();
            consume(
                self.feed.clone(),
                16,
                self.shutdown_grace,
                shutdown.clone(),
                move |d| {
                    let me = me.clone();
                    let span = tracing::info_span!("webhook.fan_out");
                    stitch_common::telemetry::continue_trace(&span, &d.trace);
                    async move { me.fan_out(d).await }.instrument(span)
                },
            )
        };
        let deliver = {
            let me = self.clone();
            consume(
                self.deliveries.clone(),
                self.concurrency,
                self.shutdown_grace,
                shutdown,
                move |d| {
                    let me = me.clone();
                    let span = tracing::info_span!("webhook.deliver");
                    stitch_common::telemetry::continue_trace(&span, &d.trace);
                    async move { me.deliver(d).await }.instrument(span)
                },
            )
        };
        tokio::join!(fan_out, deliver);
    }

    /// One event in: one delivery queued per target, then ack.
    async fn fan_out(&self, delivery: Delivery) {
        let event: Event = match serde_json::from_slice(&delivery.payload) {
            Ok(e) => e,
            Err(e) => {
                let _ = self
                    .feed
                    .dead_letter(&delivery.payload, &format!("not an event: {e}"))
                    .await;
                let _ = delivery.ack().await;
                return;
            }
        };
        let body = String::from_utf8_lossy(&delivery.payload).into_owned();
        let event_type = event.kind.routing_key().to_owned();
        let mut targets: Vec<Target> = self
            .endpoints
            .iter()
            .filter(|e| {
                e.events
                    .as_ref()
                    .is_none_or(|set| set.contains(&event_type))
            })
            .map(|e| Target::Endpoint { id: e.id.clone() })
            .collect();
        if self.callbacks.is_some() {
            match self.callback_url(&event).await {
                Ok(Some(url)) => targets.push(Target::Callback { url }),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(event_id = %event.event_id, error = %e, "cannot look up the callback; will retry");
                    let _ = delivery.requeue().await;
                    return;
                }
            }
        }
        let queued = async {
            self.store.keep_event(&event.event_id, &body).await?;
            for target in targets {
                let job = WebhookJob {
                    version: 1,
                    event_id: event.event_id.clone(),
                    event_type: event_type.clone(),
                    target,
                    attempt: 0,
                    body: body.clone(),
                };
                self.deliveries.enqueue(&job.to_json(), NOW).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match queued {
            Ok(()) => {
                let _ = delivery.ack().await;
            }
            Err(e) => {
                // Targets already queued get a duplicate on redelivery: same webhook-id.
                tracing::warn!(event_id = %event.event_id, error = %e, "fan-out failed; will retry");
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = delivery.requeue().await;
            }
        }
    }

    /// The upload's callback URL, from the state store or, once that expired, its manifest.
    async fn callback_url(&self, event: &Event) -> anyhow::Result<Option<String>> {
        let Some(id) = event.upload.upload_id() else {
            return Ok(None);
        };
        if let Some(status) = self.state.upload_status(&id).await? {
            return Ok(status.callback_url);
        }
        Ok(self
            .storage
            .read_manifest(&id)
            .await?
            .and_then(|m| m.callback_url))
    }

    async fn callback_secret(&self, id: Option<UploadId>) -> anyhow::Result<Option<String>> {
        let Some(id) = id else {
            return Ok(None);
        };
        if let Some(status) = self.state.upload_status(&id).await? {
            return Ok(status.callback_secret);
        }
        Ok(self
            .storage
            .read_manifest(&id)
            .await?
            .and_then(|m| m.callback_secret))
    }

    /// One event to one target.
    async fn deliver(&self, delivery: Delivery) {
        let job = match WebhookJob::from_json(&delivery.payload) {
            Ok(job) => job,
            Err(e) => {
                let _ = self
                    .deliveries
                    .dead_letter(&delivery.payload, &format!("not a delivery: {e}"))
                    .await;
                let _ = delivery.ack().await;
                return;
            }
        };
        let mut attempt = DeliveryAttempt {
            target: job.target.label(),
            attempt: job.attempt + 1,
            outcome: String::new(),
            status: None,
            latency_ms: 0,
            error: None,
            at_ms: stitch_common::now_ms(),
        };
        // Where, and with which keys.
        let (url, keys, receiver) = match &job.target {
            Target::Endpoint { id } => {
                let Some(endpoint) = self.endpoints.iter().find(|e| &e.id == id) else {
                    attempt.outcome = "unknown_endpoint".into();
                    self.settle(&delivery, &job, attempt).await;
                    return;
                };
                match self.store.is_disabled(id).await {
                    Ok(true) => {
                        attempt.outcome = "disabled".into();
                        self.settle(&delivery, &job, attempt).await;
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook store unavailable; will retry");
                        let _ = delivery.requeue().await;
                        return;
                    }
                }
                (
                    endpoint.url.clone(),
                    endpoint.keys.clone(),
                    Receiver::Endpoint,
                )
            }
            Target::Callback { url } => {
                let Some(policy) = &self.callbacks else {
                    attempt.outcome = "refused".into();
                    attempt.error = Some("client callbacks are not allowed".into());
                    self.settle(&delivery, &job, attempt).await;
                    return;
                };
                let upload_id = serde_json::from_str::<Event>(&job.body)
                    .ok()
                    .and_then(|e| e.upload.upload_id());
                let key = match self.callback_secret(upload_id).await {
                    Ok(secret) => secret.as_deref().and_then(SigningKey::parse),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the callback secret; will retry");
                        let _ = delivery.requeue().await;
                        return;
                    }
                };
                let Some(key) = key else {
                    attempt.outcome = "refused".into();
                    attempt.error = Some("the upload has no callback secret".into());
                    self.settle(&delivery, &job, attempt).await;
                    return;
                };
                // The URL is checked here, literal addresses included (reqwest connects to
                // those without resolving); a host name's addresses are checked by the
                // callback client's resolver when it connects.
                match policy.check_url(url) {
                    Ok(url) => (url, vec![key], Receiver::Callback),
                    Err(refusal) => {
                        self.refuse(&delivery, &job, attempt, refusal).await;
                        return;
                    }
                }
            }
        };
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let headers = vec![
            ("webhook-id", job.event_id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            (
                "webhook-signature",
                signature_header(&keys, &job.event_id, timestamp, job.body.as_bytes()),
            ),
        ];
        let response = self
            .sender
            .post(receiver, &url, headers, job.body.clone().into_bytes())
            .await;
        if let Some(refusal) = response.refusal {
            self.refuse(&delivery, &job, attempt, refusal).await;
            return;
        }
        attempt.status = response.status;
        attempt.latency_ms = response.latency.as_millis() as u64;
        attempt.error = response.error;
        attempt.outcome = match response.status {
            Some(s) if (200..300).contains(&s) => "delivered",
            Some(410) => "gone",
            _ => "failed",
        }
        .into();
        if attempt.outcome == "gone"
            && let Target::Endpoint { id } = &job.target
            && let Err(e) = self.store.disable_endpoint(id, "answered 410 Gone").await
        {
            tracing::warn!(error = %e, "could not disable the endpoint");
        }
        self.settle(&delivery, &job, attempt).await;
    }

    /// A callback the policy refused: logged with the reason, never retried.
    async fn refuse(
        &self,
        delivery: &Delivery,
        job: &WebhookJob,
        mut attempt: DeliveryAttempt,
        refusal: Refusal,
    ) {
        tracing::warn!(target = %attempt.target, %refusal, "callback refused");
        attempt.outcome = "refused".into();
        attempt.error = Some(refusal.to_string());
        self.settle(delivery, job, attempt).await;
    }

    /// Logs the attempt, queues a retry if there is one to make, then acks.
    async fn settle(&self, delivery: &Delivery, job: &WebhookJob, mut attempt: DeliveryAttempt) {
        if attempt.outcome == "failed" {
            match self.retry_delays.get(job.attempt as usize) {
                Some(delay) => {
                    let next = WebhookJob {
                        attempt: job.attempt + 1,
                        ..job.clone()
                    };
                    if let Err(e) = self.deliveries.enqueue(&next.to_json(), *delay).await {
                        tracing::warn!(error = %e, "could not queue the retry; requeueing");
                        let _ = delivery.requeue().await;
                        return;
                    }
                }
                None => {
                    attempt.outcome = "dead".into();
                    let reason = format!(
                        "{} attempts failed; last: {}",
                        job.attempt + 1,
                        attempt
                            .error
                            .clone()
                            .unwrap_or_else(|| format!("status {:?}", attempt.status))
                    );
                    if self
                        .deliveries
                        .dead_letter(&delivery.payload, &reason)
                        .await
                        .is_err()
                    {
                        let _ = delivery.requeue().await;
                        return;
                    }
                }
            }
        }
        let outcome = stitch_common::metrics::WEBHOOK_OUTCOMES
            .into_iter()
            .find(|o| *o == attempt.outcome)
            .unwrap_or("failed");
        metrics::counter!(stitch_common::metrics::WEBHOOK_DELIVERIES, "outcome" => outcome)
            .increment(1);
        if attempt.status.is_some() || attempt.latency_ms > 0 {
            metrics::histogram!(stitch_common::metrics::WEBHOOK_DURATION)
                .record(attempt.latency_ms as f64 / 1000.0);
        }
        tracing::info!(
            event_id = %job.event_id,
            target = %attempt.target,
            attempt = attempt.attempt,
            outcome = %attempt.outcome,
            status = ?attempt.status,
            latency_ms = attempt.latency_ms,
            "webhook attempt"
        );
        if let Err(e) = self.store.log_attempt(&job.event_id, &attempt).await {
            tracing::warn!(error = %e, "could not write the delivery log");
        }
        let _ = delivery.ack().await;
    }
}

/// Consumes `queue` until `shutdown`, reconnecting when it drops, at most `prefetch`
/// handlers at once; on shutdown, lets running handlers finish within `grace`.
async fn consume<F, Fut>(
    queue: Arc<dyn WorkQueue>,
    prefetch: u16,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Delivery) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut running = JoinSet::new();
    let mut backoff = Duration::from_millis(200);
    while !*shutdown.borrow() {
        let mut deliveries = match queue.consume(prefetch).await {
            Ok(d) => {
                backoff = Duration::from_millis(200);
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "webhook consumer cannot start; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        loop {
            while running.try_join_next().is_some() {}
            tokio::select! {
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        running.spawn(handle(delivery));
                    }
                    Some(Err(_)) | None => break,
                },
                _ = shutdown.changed() => {
                    let _ = tokio::time::timeout(grace, async {
                        while running.join_next().await.is_some() {}
                    })
                    .await;
                    running.abort_all();
                    deliveries.close().await;
                    return;
                }
            }
        }
    }
}
