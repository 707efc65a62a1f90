//! Telemetry as Application Insights receives it: a TLS endpoint stands in for the ingestion
//! service, and the test reads the envelopes the exporter sends.

mod support;

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use support::*;
use time::OffsetDateTime;

fn feed() -> Vec<Value> {
    let now = OffsetDateTime::now_utc();
    (1..=7u32)
        .map(|n| {
            json!({
                "id": format!("fqdn--00000000-0000-5000-8000-{n:012}"),
                "type": "fqdn", "value": format!("c2-{n}.example"), "mscore": 90,
                "sources": [{"osint": false, "category": ["control-server"], "source_name": "Mandiant"}],
                "threat_rating": {"threat_score": 90},
                "last_updated": (now - time::Duration::hours(i64::from(n) * 30) - time::Duration::minutes(7))
                    .format(&time::format_description::well_known::Rfc3339).unwrap(),
            })
        })
        .chain(std::iter::once(json!({
            "id": "ipv4--00000000-0000-5000-8000-000000000099", "type": "ipv4", "value": "198.51.100.99",
            "mscore": 10, "threat_rating": {"threat_score": 90},
            "last_updated": (now - time::Duration::hours(5)).format(&time::format_description::well_known::Rfc3339).unwrap(),
        })))
        .collect()
}

const IKEY: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";

async fn world_with_ingestion() -> (
    World,
    Shared<Ingestion>,
    std::collections::BTreeMap<String, String>,
) {
    let w = World::new(feed()).await;
    let ingestion = Arc::new(Mutex::new(Ingestion::default()));
    let url = w.tls.serve(ingestion_router(ingestion.clone())).await;
    let mut env = w.env();
    env.insert(
        "APPLICATIONINSIGHTS_CONNECTION_STRING".into(),
        format!("InstrumentationKey={IKEY};IngestionEndpoint={url}/"),
    );
    (w, ingestion, env)
}

fn base_type(e: &Value) -> &str {
    e["data"]["baseType"].as_str().unwrap_or("")
}

fn assert_nothing_secret(ingestion: &Shared<Ingestion>) {
    let raw = ingestion.lock().unwrap().raw.join("\n");
    assert!(!raw.is_empty(), "nothing was captured");
    for secret in [
        MATI_SECRET,
        CLIENT_SECRET,
        MATI_KEY,
        "mati-token-",
        "entra-token-",
        "Bearer",
        "Basic ",
    ] {
        assert!(
            !raw.contains(secret),
            "{secret} reached Application Insights"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cycle_sends_its_spans_and_one_summary_event_with_the_real_counts() {
    let (w, ingestion, env) = world_with_ingestion().await;
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();

    let envelopes = ingestion.lock().unwrap().envelopes.clone();
    assert!(envelopes.iter().all(|e| e["iKey"] == IKEY));
    let names: Vec<&str> = envelopes
        .iter()
        .filter(|e| matches!(base_type(e), "RequestData" | "RemoteDependencyData"))
        .map(|e| e["data"]["baseData"]["name"].as_str().unwrap())
        .collect();
    for span in ["sync_cycle", "window", "page_fetch", "upload_batch"] {
        assert!(names.contains(&span), "no {span} span in {names:?}");
    }
    let events: Vec<&Value> = envelopes
        .iter()
        .filter(|e| base_type(e) == "EventData")
        .collect();
    assert_eq!(events.len(), 1, "one summary event per cycle");
    let event = &events[0]["data"]["baseData"];
    assert_eq!(event["name"], mati_sentinel::telemetry::SUMMARY_EVENT);
    let props = &event["properties"];
    let received = w.received_ids().len();
    assert_eq!(received, 7);
    assert_eq!(props["uploaded"], received.to_string(), "{props}");
    assert_eq!(props["uploaded_fqdn"], "7");
    assert_eq!(props["fetched"], "8");
    assert_eq!(props["rejected_low_confidence"], "1");
    assert_eq!(props["outcome"], "completed");
    assert_eq!(props["api"], "stix-objects");
    assert_eq!(
        props["uploaded"],
        report["uploaded"].to_string(),
        "the same numbers as --json"
    );
    assert!(props["window_start"].as_str().unwrap() < props["window_end"].as_str().unwrap());
    assert_nothing_secret(&ingestion);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_handler_span_continues_the_hosts_trace_and_is_sent_before_the_reply() {
    let (_w, ingestion, env) = world_with_ingestion().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = command(&["serve"], &env)
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    while client.get(format!("{url}/")).send().await.is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let reply = client
        .post(format!("{url}/SyncIndicators"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .header("X-Azure-Functions-InvocationId", "9c2d1e0f-1111-4222-8333-944455556666")
        .json(&json!({"Data": {"timer": {"IsPastDue": false, "ScheduleStatus": null}}, "Metadata": {"sys": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    // Read at once: the flush happened before the reply, not at some later batch.
    let envelopes = ingestion.lock().unwrap().envelopes.clone();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let request = envelopes
        .iter()
        .find(|e| {
            base_type(e) == "RequestData" && e["data"]["baseData"]["name"] == "SyncIndicators"
        })
        .unwrap_or_else(|| panic!("no handler request in {envelopes:#?}"));
    assert_eq!(request["tags"]["ai.operation.id"], trace_id);
    assert_eq!(request["tags"]["ai.operation.parentId"], "b7ad6b7169203331");
    assert_eq!(request["tags"]["ai.cloud.role"], "mati-sentinel");
    assert!(
        envelopes.iter().any(|e| base_type(e) == "EventData"),
        "the summary event was flushed too"
    );
    assert_nothing_secret(&ingestion);
}
