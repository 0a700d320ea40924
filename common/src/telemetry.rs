//! Logs, traces and metrics.
//!
//! - Logs: readable lines in development, one JSON object per line in production
//!   (`log.format`), level from `log.level` or `RUST_LOG`.
//! - Traces: `tracing` spans exported over OTLP/HTTP when `tracing.otlp_endpoint` is set (off
//!   by default). The W3C trace context travels in message headers across the queues
//!   ([`inject_current`] when publishing, [`extract`] when consuming), so one trace follows an
//!   upload from the chunk that completed it through its merge to its events and webhooks.
//! - Metrics: one Prometheus recorder per process ([`metrics_handle`]); the names are listed
//!   in [`crate::metrics`].

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, TracingSettings};

/// Keeps the trace exporter alive; dropping it flushes the spans not yet exported.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber: logs, and traces when configured. `RUST_LOG`, when set,
/// overrides the configured level. A second call (tests running several apps in one
/// process) keeps the first subscriber.
///
/// Traces are exported when `tracing.otlp_endpoint` is set (the full traces URL), or when one
/// of OpenTelemetry's standard variables names a receiver: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/// (the full URL) or `OTEL_EXPORTER_OTLP_ENDPOINT` (the base URL; `/v1/traces` is added).
/// `OTEL_SERVICE_NAME` replaces `service` as the service name; the other `OTEL_*` variables
/// (headers, timeout, batch delays, resource attributes) work as the SDK defines them.
pub fn init(log: &LogSettings, tracing: &TracingSettings, service: &str) -> Telemetry {
    let from_env = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()));
    let configured = tracing.otlp_endpoint.as_deref();
    let endpoint = configured.map(str::to_owned).or(from_env);
    let provider = endpoint.and_then(|endpoint| {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        // The configured URL is used as it is; without one, the SDK reads the standard
        // variables itself (and adds `/v1/traces` to a base URL).
        if let Some(configured) = configured {
            exporter = exporter.with_endpoint(configured);
        }
        match exporter.build() {
            Ok(exporter) => {
                let mut resource = opentelemetry_sdk::Resource::builder();
                // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the
                // program's own name applies only when the operator named none.
                if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                    resource = resource.with_service_name(service.to_owned());
                }
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource.build())
                        .build(),
                )
            }
            Err(e) => {
                eprintln!("tracing disabled: cannot export to {endpoint}: {e}");
                None
            }
        }
    });
    init_with_provider(log, provider)
}

/// [`init`] with a ready trace provider (tests capture spans in memory this way).
pub fn init_with_provider(log: &LogSettings, provider: Option<SdkTracerProvider>) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&log.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("stitch")));
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Telemetry { provider }
}

/// The current span's trace context as W3C headers (`traceparent`, `tracestate`), to
/// publish with a message. Empty when no trace is recorded.
pub fn inject_current() -> Vec<(String, String)> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
    headers.sort();
    headers
}

/// A consumed message's trace context, to parent the span that handles it.
pub fn extract(headers: &[(String, String)]) -> opentelemetry::Context {
    let carrier: HashMap<String, String> = headers.iter().cloned().collect();
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` a child of the trace a consumed message carries.
pub fn continue_trace(span: &tracing::Span, headers: &[(String, String)]) {
    if !headers.is_empty() {
        let _ = span.set_parent(extract(headers));
    }
}

/// The process's Prometheus recorder, installed on first use. Several apps in one process
/// (tests, the single-node mode) share it.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Latency and duration histograms share one set of buckets, in seconds, from a
            // millisecond status read to an hour-long merge.
            let buckets = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0, 900.0, 3600.0,
            ];
            // Sizes: 1 MiB to 4 TiB, by fours.
            let sizes: Vec<f64> = (0..12).map(|i| (1u64 << (20 + 2 * i)) as f64).collect();
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_bytes".into()),
                    &sizes,
                )
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}
