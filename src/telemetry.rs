//! Logs, traces and the per-cycle summary event.
//!
//! `tracing` everywhere; the subscriber writes JSON lines when stderr is not a terminal (or
//! `LOG_FORMAT=json`) and readable text otherwise. With `APPLICATIONINSIGHTS_CONNECTION_STRING`
//! set, spans and events also go to Application Insights through OpenTelemetry, and each cycle
//! sends one custom event, `SyncCycleSummary`. Exports are flushed after a cycle's span closes
//! (a Flex instance may be frozen once the host has its answer) and shutdown is bounded.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::sync::{CycleReport, StopReason};

/// The custom event's name in Application Insights (`customEvents | where name == ...`).
pub const SUMMARY_EVENT: &str = "SyncCycleSummary";
/// The target of the summary event: it goes to Application Insights, not to the log lines
/// (those carry the same numbers in the cycle's summary line).
const SUMMARY_TARGET: &str = "mati_sentinel::summary";
const SERVICE_NAME: &str = "mati-sentinel";
/// Flushing and shutdown never hold up an invocation longer than this.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the exporter alive; flush it after each cycle, shut it down at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

fn default_filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},azure_core=warn,azure_identity=warn,azure_storage_blob=warn,hyper=warn,reqwest=warn,opentelemetry=warn"))
    })
}

/// Installs the global subscriber. An invalid connection string is reported and telemetry
/// continues without the exporter: logs must never depend on it. `quiet` lowers the default
/// level to warnings (for `sync` on a terminal, where the progress line and the summary say
/// the rest); `RUST_LOG` still wins.
pub fn init(connection_string: Option<&str>, http: reqwest::Client, quiet: bool) -> Telemetry {
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
        || !std::io::stderr().is_terminal();
    let not_summary = filter_fn(|m| m.target() != SUMMARY_TARGET);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(not_summary)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(not_summary)
            .boxed()
    };

    let mut problem = None;
    let provider = connection_string.and_then(|cs| {
        match opentelemetry_application_insights::Exporter::new_from_connection_string(cs, http) {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(SERVICE_NAME)
                            .build(),
                    )
                    .with_span_processor(
                        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
                            .build(),
                    )
                    .build(),
            ),
            // The error names the part that is wrong; the string itself holds a key.
            Err(e) => {
                problem = Some(e.to_string());
                None
            }
        }
    });
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing_opentelemetry::layer().with_tracer(p.tracer(SERVICE_NAME))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(default_filter(if quiet { "warn" } else { "info" }))
        .init();
    if let Some(p) = problem {
        tracing::warn!(error = %p, "APPLICATIONINSIGHTS_CONNECTION_STRING is not usable; continuing without Application Insights");
    }
    Telemetry { provider }
}

impl Telemetry {
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is buffered. Call after the cycle's span has closed: an open span is not
    /// exported yet.
    pub async fn flush(&self) {
        if let Some(p) = self.provider.clone() {
            let done = tokio::task::spawn_blocking(move || p.force_flush());
            match tokio::time::timeout(EXPORT_TIMEOUT, done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "telemetry flush failed"),
                _ => tracing::warn!("telemetry flush timed out"),
            }
        }
    }

    /// Flushes and stops the exporter, within a bound: an unreachable ingestion endpoint
    /// must not keep the process from exiting.
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            let done = tokio::task::spawn_blocking(move || p.shutdown());
            if tokio::time::timeout(EXPORT_TIMEOUT, done).await.is_err() {
                tracing::warn!("telemetry shutdown timed out");
            }
        }
    }
}

/// The outcome label of a cycle, as the summary event and the workbook use it.
pub fn outcome(r: &CycleReport) -> &'static str {
    match r.stop_reason {
        Some(StopReason::Completed) => "completed",
        Some(StopReason::TimeBudget) => "stopped_at_budget",
        Some(StopReason::Stopped) => "stopped",
        Some(StopReason::AlreadyRunning) => "busy",
        Some(StopReason::Failed) | None => "failed",
    }
}

/// Emits the cycle's summary as one Application Insights custom event. Must be called inside
/// the cycle's span: span events are what the exporter turns into custom events.
pub fn summary_event(r: &CycleReport, api: &str) {
    let rejected = |reason: &str| r.rejected.get(reason).copied().unwrap_or(0);
    tracing::info!(
        target: SUMMARY_TARGET,
        outcome = outcome(r),
        ai.customEvent.name = SUMMARY_EVENT,
        api,
        dry_run = r.dry_run,
        window_start = r.window_start.as_deref().unwrap_or(""),
        window_end = r.window_end.as_deref().unwrap_or(""),
        retrying_at_stop = r.retrying_at_stop.as_deref().unwrap_or(""),
        pages = r.pages,
        fetched = r.fetched,
        malformed = r.malformed,
        kept = r.kept,
        rejected_unsupported_type = rejected("unsupported_type"),
        rejected_type_disabled = rejected("type_disabled"),
        rejected_low_confidence = rejected("low_confidence"),
        rejected_low_threat_score = rejected("low_threat_score"),
        rejected_osint = rejected("osint"),
        rejected_uncategorized = rejected("uncategorized"),
        rejected_hash_unavailable = rejected("hash_unavailable"),
        rejected_invalid_value = rejected("invalid_value"),
        duplicates = r.duplicates,
        unchanged = r.unchanged,
        extended = r.extended,
        uploaded = r.uploaded,
        uploaded_ipv4 = r.uploaded_by_type.ipv4,
        uploaded_fqdn = r.uploaded_by_type.fqdn,
        uploaded_url = r.uploaded_by_type.url,
        uploaded_hash = r.uploaded_by_type.hash,
        expired = r.expired,
        refused = r.refused,
        abandoned = r.abandoned,
        reconciled = r.reconciled,
        upload_requests = r.upload_requests,
        retries = r.retries,
        throttled = r.throttled,
        duration_ms = r.duration_ms,
        "ai.custom"
    );
}
