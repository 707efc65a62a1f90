//! Workspace reconciliation (`ENABLE_DEDUPLICATION`) through the real binary: the fake
//! management API's `/query` serves what the fake Sentinel holds, paged by `nextLink`.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use support::*;

/// Loses the state folder (a new install, a migration, a deleted container).
fn wipe_state(w: &World) {
    for entry in std::fs::read_dir(w.state_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
}

fn dedupe_env(w: &World) -> BTreeMap<String, String> {
    let mut env = w.dedupe_env();
    env.insert("INITIAL_LOOKBACK".into(), "5".into());
    env.insert("HTTP_TIMEOUT_SECONDS".into(), "5".into());
    env
}

/// A world whose Sentinel already holds the kept set (uploaded by an earlier install whose
/// state is gone).
async fn populated() -> (World, BTreeSet<String>) {
    let (w, keep) = spread_world().await;
    completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
    wipe_state(&w);
    (w, keep)
}

/// Each pattern among the objects Sentinel still matches, with how many objects carry it.
fn live_patterns(w: &World) -> BTreeMap<String, usize> {
    let now = time::OffsetDateTime::now_utc();
    let mut out = BTreeMap::new();
    for o in w.sentinel.lock().unwrap().by_id.values() {
        if o["type"] != "indicator" {
            continue;
        }
        let until = time::OffsetDateTime::parse(
            o["valid_until"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        if until > now {
            *out.entry(o["pattern"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_state_is_rebuilt_from_the_workspace_across_pages_and_nothing_is_sent_again() {
    let (w, keep) = populated().await;
    let sent_before = w.received_ids().len();
    w.management.lock().unwrap().page_size = 5;

    let r = completes(&dedupe_env(&w)).await;
    assert_eq!(
        r["reconciled"].as_u64().unwrap() as usize,
        keep.len(),
        "{r}"
    );
    assert_eq!(r["uploaded"], 0, "everything was there already: {r}");
    assert_eq!(r["unchanged"].as_u64().unwrap() as usize, keep.len(), "{r}");
    assert_eq!(w.received_ids().len(), sent_before, "no upload at all");
    w.assert_holds_exactly(&keep);

    {
        let m = w.management.lock().unwrap();
        let pages = keep.len().div_ceil(5);
        assert_eq!(m.requests.len(), pages, "{:?}", m.requests);
        assert!(m.requests[0].ends_with("api-version=2025-07-01-preview"));
        for (i, r) in m.requests.iter().enumerate().skip(1) {
            assert!(r.contains(&format!("$skipToken={}", i * 5)), "{r}");
        }
        assert!(
            m.bodies.windows(2).all(|b| b[0] == b[1]),
            "the same query follows nextLink"
        );
        assert_eq!(
            m.bodies[0]["condition"]["clauses"][0],
            json!({"field": "source", "operator": "Equals", "values": ["Mandiant"]})
        );
    }

    // The cache learnt it all: the next cycle neither reads the workspace nor uploads.
    let r = completes(&dedupe_env(&w)).await;
    assert_eq!(r["reconciled"], 0, "{r}");
    assert_eq!(r["uploaded"], 0, "{r}");
    assert_eq!(
        w.management.lock().unwrap().requests.len(),
        keep.len().div_ceil(5)
    );
}

fn indicators(by_id: &BTreeMap<String, Value>) -> usize {
    by_id.values().filter(|o| o["type"] == "indicator").count()
}

/// An indicator object as another tool (the vendor's container or Logic App) left it: its
/// own id, the same pattern, no extension of ours.
fn vendor_object(uuid: &str, pattern: &str) -> Value {
    json!({
        "type": "indicator", "spec_version": "2.1", "id": format!("indicator--{uuid}"),
        "created": "2026-11-01T00:00:00.000Z", "modified": "2026-11-01T00:00:00.000Z",
        "name": "Mandiant indicator", "pattern": pattern, "pattern_type": "stix",
        "valid_from": "2026-11-01T00:00:00.000Z", "valid_until": "2027-06-01T00:00:00.000Z",
        "confidence": 80, "labels": ["mandiant"]
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_another_tool_left_for_the_same_pattern_is_updated_under_its_id() {
    let (w, keep) = spread_world().await;
    let vendor = [
        // Kept by the policy: updated under the vendor's id.
        (
            "6c1e1a52-7f0b-4c55-9d5e-0a1b2c3d4e5f",
            "[ipv4-addr:value = '198.51.100.0']",
        ),
        (
            "6c1e1a52-7f0b-4c55-9d5e-0a1b2c3d4e60",
            "[domain-name:value = 'host1.bad.example']",
        ),
        // Rejected by the policy (threat score 30): expired under the vendor's id.
        (
            "6c1e1a52-7f0b-4c55-9d5e-0a1b2c3d4e61",
            "[domain-name:value = 'host3.bad.example']",
        ),
    ];
    {
        let mut s = w.sentinel.lock().unwrap();
        for (uuid, pattern) in vendor {
            let id = format!("indicator--{uuid}");
            s.by_id.insert(id.clone(), vendor_object(uuid, pattern));
            s.source_of.insert(id, "Mandiant".into());
        }
    }

    let r = completes(&dedupe_env(&w)).await;
    assert_eq!(r["reconciled"], 3, "{r}");
    assert_eq!(r["expired"], 1, "{r}");
    w.assert_holds_exactly(&keep);
    // CI validates the adopted and expired objects with stix2-validator.
    w.export_stix("reconciled");
    let patterns = live_patterns(&w);
    assert!(
        patterns.values().all(|n| *n == 1),
        "one object per pattern: {patterns:?}"
    );
    {
        let s = w.sentinel.lock().unwrap();
        for (uuid, _) in vendor {
            let o = &s.by_id[&format!("indicator--{uuid}")];
            assert!(
                o["external_references"][0]["external_id"].is_string(),
                "now ours: {o}"
            );
        }
        assert_eq!(
            indicators(&s.by_id),
            keep.len() + 1,
            "the kept set, plus the expired vendor object; no second object for any pattern"
        );
    }

    // Mandiant updates an adopted indicator: it stays under the vendor's id.
    {
        let mut m = w.mandiant.lock().unwrap();
        let i = &mut m.indicators[0];
        i["mscore"] = json!(97);
        i["last_updated"] = json!(
            (time::OffsetDateTime::now_utc() - time::Duration::minutes(2))
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        );
    }
    let r = completes(&dedupe_env(&w)).await;
    assert_eq!(r["uploaded"], 1, "{r}");
    let s = w.sentinel.lock().unwrap();
    let o = &s.by_id[&format!("indicator--{}", vendor[0].0)];
    assert_eq!(o["confidence"], 97, "{o}");
    assert_eq!(indicators(&s.by_id), keep.len() + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_server_errors_and_broken_pages_are_retried() {
    let (w, keep) = populated().await;
    let sent_before = w.received_ids().len();
    {
        let mut m = w.management.lock().unwrap();
        m.page_size = 10;
        // Backoff doubles from 2 s; the throttle asks for 1 s.
        m.faults.push_back(Fault::status(
            503,
            r#"{"error":{"code":"ServiceUnavailable"}}"#,
        ));
        m.faults
            .push_back(Fault::status(200, r#"{"value": [{"properties": "#));
        m.faults.push_back(Fault::throttle(
            Some("1"),
            r#"{"error":{"code":"TooManyRequests"}}"#,
        ));
    }
    let r = completes(&dedupe_env(&w)).await;
    assert_eq!(r["uploaded"], 0, "{r}");
    assert!(r["retries"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(r["throttled"], 1, "{r}");
    assert_eq!(w.received_ids().len(), sent_before);
    w.assert_holds_exactly(&keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workspace_that_cannot_be_read_fails_the_cycle_before_any_upload() {
    let (w, keep) = populated().await;
    let sent_before = w.received_ids().len();
    let env = dedupe_env(&w);

    w.management.lock().unwrap().faults.push_back(Fault::status(
        403,
        r#"{"error":{"code":"AuthorizationFailed","message":"does not have authorization"}}"#,
    ));
    fails_with(&env, "Microsoft Sentinel Reader").await;

    let mut wrong = env.clone();
    wrong.insert("AZURE_WORKSPACE_NAME".into(), "law-typo".into());
    fails_with(&wrong, "AZURE_WORKSPACE_NAME=law-typo").await;

    // A nextLink to another host would take the token there: refused.
    {
        let mut m = w.management.lock().unwrap();
        m.page_size = 5;
        m.foreign_next_link = true;
    }
    fails_with(&env, "nextLink points away").await;

    // The token is refused twice.
    w.management.lock().unwrap().foreign_next_link = false;
    w.management.lock().unwrap().refuse_tokens =
        (1..=10).map(|n| format!("entra-token-{n}")).collect();
    fails_with(&env, "refused the token twice").await;

    assert_eq!(w.received_ids().len(), sent_before, "nothing was uploaded");
    assert!(
        !w.state_dir.path().join("checkpoint.json").exists(),
        "nothing moved"
    );

    w.management.lock().unwrap().refuse_tokens.clear();
    let r = completes(&env).await;
    assert_eq!(r["uploaded"], 0, "{r}");
    w.assert_holds_exactly(&keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reads_the_workspace_when_reconciliation_is_on() {
    let (w, _) = populated().await;
    let out = run(&["check"], &dedupe_env(&w)).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("workspace"))
        .unwrap();
    assert!(
        line.starts_with("ok") && line.contains("from Mandiant"),
        "{line}"
    );
    assert_eq!(
        w.management.lock().unwrap().requests.len(),
        1,
        "one page only"
    );

    w.management.lock().unwrap().faults.push_back(Fault::status(
        403,
        r#"{"error":{"code":"AuthorizationFailed"}}"#,
    ));
    let out = run(&["check"], &dedupe_env(&w)).await;
    assert_eq!(out.code, 1, "{}", out.all());
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("workspace"))
        .unwrap();
    assert!(
        line.starts_with("FAIL") && line.contains("Microsoft Sentinel Reader"),
        "{line}"
    );
    let out = run(&["check"], &quick_env(&w)).await;
    assert!(!out.stdout.contains("workspace"), "off unless asked for");
}

/// docs/RELIABILITY.md names every fault and reconciliation test, and every test it names
/// exists, so the document cannot drift from the suite.
#[test]
fn the_reliability_document_matches_the_tests() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/RELIABILITY.md")).unwrap();
    let mut sources = String::new();
    for dir in ["tests", "src", "src/state"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    // Every backticked snake_case name with three or more underscores is a test name.
    let named: BTreeSet<&str> = doc
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| {
            t.matches('_').count() >= 3
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        })
        .collect();
    for name in &named {
        assert!(
            sources.contains(&format!("fn {name}(")),
            "RELIABILITY.md names {name}, which no test defines"
        );
    }
    for file in ["tests/faults.rs", "tests/reconcile.rs"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for block in text
            .split("#[tokio::test(flavor = \"multi_thread\")]\nasync fn ")
            .skip(1)
        {
            let name = block.split('(').next().unwrap();
            assert!(
                named.contains(name),
                "{file} → {name} is not in RELIABILITY.md"
            );
        }
    }
    assert!(named.len() >= 35, "{} names found", named.len());
}
