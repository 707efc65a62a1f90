//! The Azure Functions custom handler: the host's HTTP contract, and nothing else.
//!
//! The only module that knows the invocation JSON. `GET /` answers at once (the host polls it
//! until the handler is ready); `POST /SyncIndicators` is the timer function: it runs a cycle
//! when one is due and replies `{"Outputs":{},"Logs":[...],"ReturnValue":...}`, with 200, or
//! 500 when the cycle failed (the host then records a failed invocation).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Json;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::app::App;
use crate::sync::{CycleReport, StopReason};
use crate::telemetry::Telemetry;

/// The function's name: the folder holding its `function.json`, and the path the host posts to.
pub const FUNCTION: &str = "SyncIndicators";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InvokeRequest {
    #[serde(default)]
    data: HashMap<String, serde_json::Value>,
    #[serde(default)]
    metadata: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TimerInfo {
    #[serde(default)]
    is_past_due: bool,
    #[serde(default)]
    schedule_status: Option<ScheduleStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScheduleStatus {
    #[serde(default)]
    last: Option<String>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InvokeResponse {
    pub outputs: serde_json::Map<String, serde_json::Value>,
    pub logs: Vec<String>,
    pub return_value: serde_json::Value,
}

impl InvokeResponse {
    fn new(logs: Vec<String>, return_value: serde_json::Value) -> Self {
        InvokeResponse {
            outputs: serde_json::Map::new(),
            logs,
            return_value,
        }
    }
}

/// What the routes share.
#[derive(Clone)]
pub struct HandlerState {
    pub app: Arc<App>,
    pub telemetry: Arc<Telemetry>,
}

pub fn router(state: HandlerState) -> Router {
    Router::new()
        .route("/", get(ready))
        .route(&format!("/{FUNCTION}"), post(sync_indicators))
        .with_state(state)
}

async fn ready() -> &'static str {
    "mati-sentinel ready"
}

/// One line for the host's log (and Application Insights traces).
pub fn summary_line(r: &CycleReport) -> String {
    let reason = match r.stop_reason {
        Some(StopReason::Completed) => "completed",
        Some(StopReason::TimeBudget) => {
            "stopped at its time budget; the backfill continues next tick"
        }
        Some(StopReason::Stopped) => "stopped on request",
        Some(StopReason::AlreadyRunning) => "skipped: another cycle holds the lease",
        Some(StopReason::Failed) | None => "failed",
    };
    let rejected: u64 = r.rejected.values().sum();
    format!(
        "sync cycle {reason}: fetched {} on {} page(s), kept {}, rejected {rejected}, malformed {}, unchanged {}, uploaded {}, expired {}, refused {}, retries {}, throttled {}, {} ms",
        r.fetched,
        r.pages,
        r.kept,
        r.malformed,
        r.unchanged,
        r.uploaded,
        r.expired,
        r.refused,
        r.retries,
        r.throttled,
        r.duration_ms
    )
}

async fn sync_indicators(
    State(state): State<HandlerState>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Json<InvokeResponse>) {
    let invocation_id = headers
        .get("x-azure-functions-invocationid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!(
        "SyncIndicators",
        otel.kind = "server",
        function = FUNCTION,
        invocation_id = %invocation_id
    );
    // Correlate with the host's own invocation telemetry through its `traceparent`.
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(&headers))
    });
    let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
    let reply = invoke(state.app.clone(), body).instrument(span).await;
    // The span has closed: send it before the host gets its answer (the instance may be
    // frozen right after).
    state.telemetry.flush().await;
    reply
}

async fn invoke(app: Arc<App>, body: Bytes) -> (StatusCode, Json<InvokeResponse>) {
    // The host's payload only informs the log: whether a cycle runs is decided by our state.
    let request: InvokeRequest = serde_json::from_slice(&body).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the invocation payload is not the timer's JSON; running anyway");
        InvokeRequest::default()
    });
    let timer: TimerInfo = request
        .data
        .get("timer")
        .cloned()
        .and_then(|t| serde_json::from_value(t).ok())
        .unwrap_or_default();
    let utc_now = request
        .metadata
        .get("sys")
        .and_then(|s| s.get("UtcNow"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let (last, next) = timer
        .schedule_status
        .as_ref()
        .map(|s| {
            (
                s.last.clone().unwrap_or_default(),
                s.next.clone().unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    tracing::info!(is_past_due = timer.is_past_due, host_utc_now = utc_now, schedule_last = %last, schedule_next = %next, "timer tick");

    let now = OffsetDateTime::now_utc();
    match app.is_due(now).await {
        Ok(false) => {
            let line = format!(
                "sync not due: the last cycle finished less than SYNC_SCHEDULE={} hour(s) ago",
                app.config.sync.schedule_hours
            );
            tracing::info!("{line}");
            return (
                StatusCode::OK,
                Json(InvokeResponse::new(
                    vec![line],
                    serde_json::json!({"status": "not_due"}),
                )),
            );
        }
        Ok(true) => {}
        Err(e) => {
            let line = format!("sync failed: cannot read the checkpoint: {e}");
            tracing::error!("{line}");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(InvokeResponse::new(vec![line], serde_json::Value::Null)),
            );
        }
    }

    let result = app.cycle(now, None, None).await;
    let line = summary_line(&result.report);
    let report = serde_json::to_value(&result.report).unwrap_or_default();
    match &result.error {
        None => {
            tracing::info!(report = %report, "{line}");
            (
                StatusCode::OK,
                Json(InvokeResponse::new(vec![line], report)),
            )
        }
        Some(e) => {
            let error = format!("{e:#}");
            tracing::error!(error = %error, report = %report, "{line}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(InvokeResponse::new(
                    vec![line, format!("error: {error}")],
                    report,
                )),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_payload_parses_with_and_without_a_schedule_status() {
        let with = br#"{"Data":{"timer":{"Schedule":{"AdjustForDST":true},"ScheduleStatus":{"Last":"2026-09-24T13:08:00.0096035+00:00","Next":"2026-09-24T13:09:00+00:00","LastUpdated":"2026-09-24T13:08:00.0096035+00:00"},"IsPastDue":false}},"Metadata":{"sys":{"MethodName":"SyncIndicators","UtcNow":"2026-09-24T13:09:00.01Z","RandGuid":"35e6e68c-5583-436c-a277-5aec2b416ba8"}}}"#;
        let r: InvokeRequest = serde_json::from_slice(with).unwrap();
        let t: TimerInfo = serde_json::from_value(r.data["timer"].clone()).unwrap();
        assert_eq!(
            t.schedule_status.unwrap().next.as_deref(),
            Some("2026-09-24T13:09:00+00:00")
        );
        let without = br#"{"Data":{"timer":{"Schedule":{"AdjustForDST":true},"ScheduleStatus":null,"IsPastDue":true}},"Metadata":{"sys":{}}}"#;
        let r: InvokeRequest = serde_json::from_slice(without).unwrap();
        let t: TimerInfo = serde_json::from_value(r.data["timer"].clone()).unwrap();
        assert!(t.is_past_due && t.schedule_status.is_none());
    }

    #[test]
    fn the_reply_has_the_three_fields_the_host_reads() {
        let reply = InvokeResponse::new(vec!["x".into()], serde_json::Value::Null);
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"Outputs":{},"Logs":["x"],"ReturnValue":null}"#
        );
    }
}
