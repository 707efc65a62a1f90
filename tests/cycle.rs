//! Whole cycles through the real binary against TLS fakes of Mandiant, Entra ID and Sentinel.
//!
//! The feed below is labelled by hand with what each policy must keep, so the assertions do
//! not reuse the code under test to compute what is expected.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use support::*;
use time::{Duration, OffsetDateTime};

struct Labelled {
    indicator: Value,
    keep_default: bool,
    keep_custom: bool,
}

fn ts(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn src(osint: bool, cats: &[&str]) -> Value {
    json!({"first_seen": "2026-11-01T00:00:00.000+0000", "last_seen": "2026-11-02T00:00:00.000+0000",
           "osint": osint, "category": cats, "source_name": if osint { "urlhaus" } else { "Mandiant" }})
}

#[allow(clippy::too_many_arguments)]
fn ind(
    n: u32,
    kind: &str,
    value: &str,
    mscore: u8,
    threat: Option<u8>,
    sources: Vec<Value>,
    age: Duration,
    keep_default: bool,
    keep_custom: bool,
) -> Labelled {
    let mut i = json!({
        "id": format!("{kind}--00000000-0000-5000-8000-{n:012}"),
        "type": kind, "value": value, "mscore": mscore, "is_publishable": true,
        "sources": sources,
        "first_seen": "2026-10-01T00:00:00.000Z",
        "last_seen": "2026-11-30T00:00:00.000Z",
        // Seven minutes off whole hours, so no indicator sits on a window boundary (where
        // Mandiant's inclusive bounds would serve it in two windows).
        "last_updated": ts(OffsetDateTime::now_utc() - age - Duration::minutes(7)),
    });
    if let Some(t) = threat {
        i["threat_rating"] = json!({"confidence_level": "high", "confidence_score": 90,
            "severity_level": "high", "severity_reason": ["attributed"], "threat_score": t});
    }
    Labelled {
        indicator: i,
        keep_default,
        keep_custom,
    }
}

const MD5_A: &str = "fe09cf6d3a358305f8c2f687b6f6da02";
const SHA256_A: &str = "af95c55f3d09ee6c691afc248e8d4a9c07d4f304449c6f609bf9c4e4c202b070";

/// The feed. Custom settings: HASH_TYPE=sha256, INCLUDE_UNCATEGORIZED=false, INCLUDE_URL=false,
/// MINIMUM_CONFIDENCE=50, MINIMUM_THREAT_SCORE=60, EXCLUDE_OSINT=false.
fn feed() -> Vec<Labelled> {
    let d = Duration::days;
    let h = Duration::hours;
    let mut v = vec![
        ind(
            1,
            "ipv4",
            "198.51.100.1",
            90,
            Some(90),
            vec![src(false, &["malware"])],
            d(20),
            true,
            true,
        ),
        ind(
            2,
            "fqdn",
            "uncategorised.example",
            85,
            Some(85),
            vec![src(false, &[])],
            d(12) + h(3),
            true,
            false,
        ),
        ind(
            3,
            "url",
            "https://u.example/login",
            95,
            Some(95),
            vec![src(false, &["phishing"])],
            d(5),
            true,
            false,
        ),
        ind(
            4,
            "md5",
            MD5_A,
            100,
            Some(100),
            vec![src(false, &["malware"])],
            d(3),
            true,
            true,
        ),
        ind(
            5,
            "md5",
            "d41d8cd98f00b204e9800998ecf8427e",
            90,
            Some(90),
            vec![src(false, &["malware"])],
            d(3) + h(1),
            true,
            false,
        ),
        ind(
            6,
            "ipv4",
            "198.51.100.6",
            70,
            Some(90),
            vec![src(false, &["botnet"])],
            d(2),
            false,
            true,
        ),
        ind(
            7,
            "ipv4",
            "198.51.100.7",
            90,
            Some(70),
            vec![src(false, &["botnet"])],
            d(2) + h(5),
            false,
            true,
        ),
        ind(
            8,
            "fqdn",
            "osint-only.example",
            90,
            Some(90),
            vec![src(true, &["phishing"]), src(true, &[])],
            d(1),
            false,
            true,
        ),
        ind(
            9,
            "ipv4",
            "198.51.100.9",
            40,
            Some(90),
            vec![src(false, &["malware"])],
            h(20),
            false,
            false,
        ),
        ind(
            10,
            "ipv6",
            "2001:db8::10",
            90,
            Some(90),
            vec![src(false, &["malware"])],
            h(15),
            false,
            false,
        ),
        ind(
            11,
            "fqdn",
            "top-level-category.example",
            90,
            Some(90),
            vec![src(false, &[])],
            h(10),
            true,
            true,
        ),
        ind(
            12,
            "ipv4",
            "198.51.100",
            90,
            Some(90),
            vec![src(false, &["malware"])],
            h(8),
            false,
            false,
        ),
        ind(
            13,
            "url",
            "https://q.example/it's\\here",
            90,
            Some(90),
            vec![src(false, &["malware"])],
            h(6),
            true,
            false,
        ),
        ind(
            14,
            "ipv4",
            "198.51.100.14",
            90,
            None,
            vec![src(false, &["malware"])],
            h(4),
            false,
            false,
        ),
        // Updated two minutes ago: inside the next cycle's five-minute overlap.
        ind(
            15,
            "ipv4",
            "198.51.100.15",
            99,
            Some(99),
            vec![src(false, &["control-server"])],
            Duration::minutes(-5),
            true,
            true,
        ),
    ];
    v[3].indicator["associated_hashes"] = json!([
        {"id": "md5--x", "type": "md5", "value": MD5_A},
        {"id": "sha256--x", "type": "sha256", "value": SHA256_A}
    ]);
    v[3].indicator["attributed_associations"] =
        json!([{"id": "malware--1", "name": "OXEEYE", "type": "malware"}]);
    v[10].indicator["category"] = json!(["control-server"]);
    v
}

fn custom_env(w: &World) -> BTreeMap<String, String> {
    let mut env = w.env();
    for (k, v) in [
        ("HASH_TYPE", "sha256"),
        ("INCLUDE_UNCATEGORIZED", "false"),
        ("INCLUDE_URL", "false"),
        ("MINIMUM_CONFIDENCE", "50"),
        ("MINIMUM_THREAT_SCORE", "60"),
        ("EXCLUDE_OSINT", "false"),
        ("IP_INDICATOR_EXPIRATION", "3"),
        ("DEFAULT_ACTION", "block"),
        ("PASSIVE_ONLY", "true"),
    ] {
        env.insert(k.into(), v.into());
    }
    env
}

async fn world(feed: &[Labelled]) -> World {
    World::new(feed.iter().map(|l| l.indicator.clone()).collect()).await
}

fn expected(feed: &[Labelled], custom: bool) -> BTreeSet<String> {
    feed.iter()
        .filter(|l| {
            if custom {
                l.keep_custom
            } else {
                l.keep_default
            }
        })
        .map(|l| l.indicator["id"].as_str().unwrap().to_string())
        .collect()
}

fn parse(s: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(
        s.as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// Checks one uploaded object against the Mandiant indicator it came from.
fn check_object(
    o: &Value,
    source: &Value,
    hash_field: &str,
    days: &BTreeMap<&str, i64>,
    action: &str,
) {
    let kind = source["type"].as_str().unwrap();
    let value = source["value"].as_str().unwrap();
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    let want_pattern = match kind {
        "ipv4" => format!("[ipv4-addr:value = '{escaped}']"),
        "fqdn" => format!("[domain-name:value = '{escaped}']"),
        "url" => format!("[url:value = '{escaped}']"),
        _ => {
            let v = if hash_field == "MD5" {
                value.to_string()
            } else {
                SHA256_A.to_string()
            };
            format!("[file:hashes.'{hash_field}' = '{v}']")
        }
    };
    assert_eq!(o["pattern"], want_pattern);
    assert_eq!(o["type"], "indicator");
    assert_eq!(o["spec_version"], "2.1");
    assert_eq!(o["pattern_type"], "stix");
    let id = o["id"].as_str().unwrap();
    let uuid = id.strip_prefix("indicator--").expect("indicator id");
    assert_eq!(uuid.len(), 36);
    assert_eq!(&uuid[14..15], "4", "version-4 shaped id {id}");
    let lifetime = parse(&o["valid_until"]) - parse(&o["valid_from"]);
    let key = if kind == "md5" { "hash" } else { kind };
    assert_eq!(lifetime, Duration::days(days[key]), "lifetime of {kind}");
    assert_eq!(o["confidence"], source["mscore"]);
    assert_eq!(o["indicator_types"], json!(["malicious-activity"]));
    let labels: Vec<&str> = o["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        labels.contains(&format!("action:{action}").as_str()),
        "labels {labels:?}"
    );
    for s in source["sources"].as_array().unwrap() {
        for c in s["category"].as_array().unwrap() {
            assert!(
                labels.contains(&c.as_str().unwrap()),
                "category {c} in {labels:?}"
            );
        }
    }
    let mid = source["id"].as_str().unwrap();
    assert_eq!(
        o["external_references"],
        json!([{"source_name": "Mandiant", "external_id": mid, "url": format!("https://advantage.mandiant.com/indicator/{mid}")}])
    );
    assert!(o["created"].as_str().unwrap() <= o["modified"].as_str().unwrap());
}

fn sources_by_id(feed: &[Labelled]) -> BTreeMap<String, Value> {
    feed.iter()
        .map(|l| {
            (
                l.indicator["id"].as_str().unwrap().to_string(),
                l.indicator.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn first_run_uploads_exactly_what_the_default_policy_keeps() {
    let feed = feed();
    let w = world(&feed).await;
    let out = run(&["sync", "--json"], &w.env()).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_no_secrets(&out);
    let ids = w.received_ids();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, expected(&feed, false));
    assert_eq!(ids.len(), unique.len(), "one object per indicator");
    let s = w.sentinel.lock().unwrap();
    assert!(s.max_batch <= 100);
    assert!(s.source_systems.iter().all(|x| x == "Mandiant"));
    let identities: Vec<&Value> = s
        .received
        .iter()
        .filter(|o| o["type"] == "identity")
        .collect();
    assert_eq!(identities.len(), 1, "the identity goes once per cycle");
    let days = BTreeMap::from([("ipv4", 7), ("fqdn", 7), ("url", 7), ("hash", 90)]);
    let src = sources_by_id(&feed);
    for o in s.received.iter().filter(|o| o["type"] == "indicator") {
        let mid = o["external_references"][0]["external_id"].as_str().unwrap();
        check_object(o, &src[mid], "MD5", &days, "alert");
        assert_eq!(o["created_by_ref"], identities[0]["id"]);
    }
    drop(s);
    // Mandiant saw the documented parameters, then `next` alone.
    let m = w.mandiant.lock().unwrap();
    let first = &m.data_requests[0];
    for p in [
        "start_epoch=",
        "end_epoch=",
        "limit=1000",
        "gte_mscore=80",
        "exclude_osint=true",
        "include_threat_rating=true",
        "include_category=true",
        "include_misp=false",
    ] {
        assert!(first.contains(p), "{p} missing from {first}");
    }
    assert!(
        m.data_requests.iter().any(|q| q.starts_with("next=")),
        "paging was exercised"
    );
    assert_eq!(m.next_with_extras, 0);
    assert_eq!(m.missing_app_name, 0);
    assert_eq!(
        m.tokens_issued, 1,
        "the token is cached across pages and windows"
    );
    drop(m);
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["stop_reason"], "completed");
    assert_eq!(report["uploaded"], expected(&feed, false).len());
    assert_eq!(report["rejected"]["low_confidence"], 2);
    assert_eq!(report["rejected"]["unsupported_type"], 1);
    assert!(report["windows_completed"].as_u64().unwrap() >= 30);
    assert!(w.state_dir.path().join("checkpoint.json").exists());
    w.export_stix("default-settings");
}

#[tokio::test(flavor = "multi_thread")]
async fn non_default_settings_change_the_uploaded_set() {
    let feed = feed();
    let w = world(&feed).await;
    let out = run(&["sync"], &custom_env(&w)).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_no_secrets(&out);
    let ids: BTreeSet<String> = w.received_ids().into_iter().collect();
    assert_eq!(ids, expected(&feed, true));
    let days = BTreeMap::from([("ipv4", 3), ("fqdn", 7), ("url", 7), ("hash", 90)]);
    let src = sources_by_id(&feed);
    let s = w.sentinel.lock().unwrap();
    for o in s.received.iter().filter(|o| o["type"] == "indicator") {
        let mid = o["external_references"][0]["external_id"].as_str().unwrap();
        check_object(o, &src[mid], "SHA-256", &days, "block");
        assert!(
            o["labels"]
                .as_array()
                .unwrap()
                .contains(&json!("passive-only"))
        );
    }
    drop(s);
    let first = w.mandiant.lock().unwrap().data_requests[0].clone();
    assert!(
        first.contains("gte_mscore=50") && first.contains("exclude_osint=false"),
        "{first}"
    );
    w.export_stix("custom-settings");
}

#[tokio::test(flavor = "multi_thread")]
async fn reruns_upload_nothing_unchanged_and_changes_keep_their_id() {
    let mut feed = feed();
    let w = world(&feed).await;
    let env = w.env();
    assert_eq!(run(&["sync"], &env).await.code, 0);
    let first: BTreeMap<String, Value> = w.sentinel.lock().unwrap().by_id.clone();
    let requests_after_first = w.sentinel.lock().unwrap().requests;

    // Indicator 15 is fetched again (it sits in the overlap) and skipped as unchanged.
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(report["fetched"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["unchanged"], 1);
    assert_eq!(report["uploaded"], 0);
    assert_eq!(w.sentinel.lock().unwrap().requests, requests_after_first);

    // Mandiant raises indicator 1's confidence: it is uploaded again under the same id.
    let changed_id = feed[0].indicator["id"].as_str().unwrap().to_string();
    feed[0].indicator["mscore"] = json!(97);
    feed[0].indicator["last_updated"] =
        json!(ts(OffsetDateTime::now_utc() - Duration::seconds(30)));
    w.mandiant.lock().unwrap().indicators = feed.iter().map(|l| l.indicator.clone()).collect();
    let received_before = w.sentinel.lock().unwrap().received.len();
    let out = run(&["sync"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    {
        let s = w.sentinel.lock().unwrap();
        let new: Vec<&Value> = s.received[received_before..]
            .iter()
            .filter(|o| o["type"] == "indicator")
            .collect();
        assert_eq!(new.len(), 1, "only the changed indicator: {new:?}");
        assert_eq!(
            new[0]["external_references"][0]["external_id"],
            changed_id.as_str()
        );
        assert_eq!(new[0]["confidence"], 97);
        let old = first
            .values()
            .find(|o| o["external_references"][0]["external_id"] == changed_id.as_str())
            .unwrap();
        assert_eq!(new[0]["id"], old["id"]);
    }

    // Without any state, everything is sent again under the same ids.
    std::fs::remove_dir_all(w.state_dir.path()).unwrap();
    w.sentinel.lock().unwrap().by_id.clear();
    assert_eq!(run(&["sync"], &env).await.code, 0);
    let again: BTreeSet<String> = w.sentinel.lock().unwrap().by_id.keys().cloned().collect();
    let before: BTreeSet<String> = first.keys().cloned().collect();
    assert_eq!(again, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_legacy_upload_indicators_api_works_end_to_end() {
    let feed = feed();
    let w = world(&feed).await;
    let mut env = w.env();
    env.insert("SENTINEL_UPLOAD_API".into(), "upload-indicators".into());
    let out = run(&["sync"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let ids: BTreeSet<String> = w.received_ids().into_iter().collect();
    assert_eq!(ids, expected(&feed, false));
    let s = w.sentinel.lock().unwrap();
    assert!(s.paths.iter().all(|p| p.starts_with(&format!(
        "/{WORKSPACE}/threatintelligence:upload-indicators?api-version=2022-07-01"
    ))));
    assert!(
        s.received.iter().all(|o| o["type"] == "indicator"),
        "no identity on the legacy API"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_exit_2_naming_each_one() {
    let w = world(&feed()).await;
    let mut env = w.env();
    env.insert("MINIMUM_CONFIDENCE".into(), "high".into());
    env.insert("HASH_TYPE".into(), "sha512".into());
    env.insert("AZURE_WORKSPACE_ID".into(), "my-workspace".into());
    env.remove("MATI_API_KEY");
    env.insert(
        "AZURE_CLIENT_SECRET".into(),
        "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/sentinel/)".into(),
    );
    env.insert("MATI_BASE_URL".into(), "http://mandiant.example".into());
    let out = run(&["sync"], &env).await;
    assert_eq!(out.code, 2, "{}", out.all());
    for name in [
        "MINIMUM_CONFIDENCE",
        "HASH_TYPE",
        "AZURE_WORKSPACE_ID",
        "MATI_API_KEY",
        "AZURE_CLIENT_SECRET",
        "MATI_BASE_URL",
    ] {
        assert!(
            out.stderr.contains(name),
            "{name} not named in:\n{}",
            out.stderr
        );
    }
    assert!(out.stderr.contains("unresolved Key Vault reference"));
    assert_no_secrets(&out);
    assert_eq!(
        w.mandiant.lock().unwrap().token_requests,
        0,
        "nothing was called"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_client_secret_exits_1_with_a_credential_message() {
    let w = world(&feed()).await;
    let mut env = w.env();
    env.insert("AZURE_CLIENT_SECRET".into(), "wrong-secret-Q4".into());
    let out = run(&["sync"], &env).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("Entra token"), "{}", out.stderr);
    assert!(out.stderr.contains("AADSTS7000215"), "{}", out.stderr);
    assert!(out.stderr.contains("AZURE_CLIENT_SECRET"), "{}", out.stderr);
    assert!(!out.all().contains("wrong-secret-Q4"));
    assert_no_secrets(&out);
    assert!(w.received_ids().is_empty());
    // Nothing was lost: with the right secret, the next run sends everything.
    assert_eq!(run(&["sync"], &w.env()).await.code, 0);
    let got: BTreeSet<String> = w.received_ids().into_iter().collect();
    assert_eq!(got, expected(&feed(), false));
}

#[tokio::test(flavor = "multi_thread")]
async fn forbidden_and_unknown_workspace_fail_with_what_to_fix() {
    let w = world(&feed()).await;
    w.sentinel.lock().unwrap().faults.push_back(Fault::status(
        403,
        r#"{"error":{"code":"UnauthorizedAccess","message":"The Object ID [x] does not have required permission to perform this action on the workspace"}}"#,
    ));
    let out = run(&["sync"], &w.env()).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains("Microsoft Sentinel Contributor"),
        "{}",
        out.stderr
    );
    let checkpoint: Value = w.checkpoint();
    let oldest_kept = feed()[0].indicator["last_updated"].clone();
    assert!(
        checkpoint["window_start"].as_i64().unwrap() <= parse(&oldest_kept).unix_timestamp(),
        "the checkpoint stays before what was not uploaded"
    );

    let mut env = w.env();
    env.insert(
        "AZURE_WORKSPACE_ID".into(),
        "00000000-0000-4000-8000-000000000000".into(),
    );
    let out = run(&["sync"], &env).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("AZURE_WORKSPACE_ID"), "{}", out.stderr);
    assert!(out.stderr.contains("404"), "{}", out.stderr);
    assert_no_secrets(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_objects_are_counted_and_the_rest_recorded() {
    let feed = feed();
    let w = world(&feed).await;
    w.sentinel
        .lock()
        .unwrap()
        .refuse_names
        .push("198.51.100.1".into());
    let out = run(&["sync", "--json"], &w.env()).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["refused"], 1);
    assert!(
        report["refusals"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not allowed")
    );
    let mut want = expected(&feed, false);
    want.remove(feed[0].indicator["id"].as_str().unwrap());
    let got: BTreeSet<String> = w.received_ids().into_iter().collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_on_both_sides_end_with_everything_uploaded_once() {
    let feed = feed();
    let w = world(&feed).await;
    {
        let mut m = w.mandiant.lock().unwrap();
        m.faults
            .push_back(Fault::throttle(Some("1"), r#"{"error":"slow down"}"#));
        m.faults.push_back(Fault::html(502));
        m.expire_token_at_request = Some(6);
    }
    {
        let mut s = w.sentinel.lock().unwrap();
        s.faults.push_back(Fault::throttle(
            None,
            r#"{"statusCode":429,"message":"Rate limit is exceeded. Try again in 1 seconds."}"#,
        ));
        s.faults.push_back(Fault::status(
            500,
            r#"{"statusCode":500,"message":"Internal server error"}"#,
        ));
    }
    let out = run(&["sync", "--json"], &w.env()).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let ids = w.received_ids();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, expected(&feed, false));
    assert_eq!(ids.len(), unique.len());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["throttled"], 2, "{report}");
    assert!(report["retries"].as_u64().unwrap() >= 4, "{report}");
    assert_eq!(
        w.mandiant.lock().unwrap().tokens_issued,
        3,
        "refreshed once after the 401"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_dry_run_needs_no_settings() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("stix.json");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mati-indicators.json");
    let env = BTreeMap::from([(
        "STATE_DIR".to_string(),
        dir.path().join("state").display().to_string(),
    )]);
    let out = run(
        &[
            "sync",
            "--dry-run",
            "--from-file",
            example,
            "--output",
            output.to_str().unwrap(),
        ],
        &env,
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.all());
    let bundle: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(bundle["type"], "bundle");
    let ids: BTreeSet<String> = mandiant_ids(bundle["objects"].as_array().unwrap())
        .into_iter()
        .collect();
    // Hand-labelled: of the example's 16 records, these 8 pass the default policy.
    let want: BTreeSet<String> = [1, 2, 3, 4, 8, 9, 12, 14]
        .iter()
        .map(|n| {
            let kind = match n {
                1 | 8 => "ipv4",
                2 | 14 => "fqdn",
                3 | 12 => "url",
                _ => "md5",
            };
            format!("{kind}--5a11e000-0000-5000-8000-{:012x}", n)
        })
        .collect();
    assert_eq!(ids, want);
    assert!(
        !dir.path().join("state").join("checkpoint.json").exists(),
        "a dry run changes no state"
    );
    if let Some(d) = std::env::var_os("STIX_OUT_DIR") {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            &output,
            std::path::Path::new(&d).join("readme-dry-run.json"),
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_tests_each_connection_and_names_the_fix() {
    let w = world(&feed()).await;
    let out = run(&["check"], &w.env()).await;
    assert_eq!(out.code, 0, "{}", out.all());
    for what in ["settings", "Mandiant", "Sentinel", "state"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(what)),
            "{what}:\n{}",
            out.stdout
        );
    }
    let mut env = w.env();
    env.insert("MATI_API_SECRET".into(), "not-the-secret-P2".into());
    let out = run(&["check"], &env).await;
    assert_eq!(out.code, 1, "{}", out.all());
    let line = out.stdout.lines().find(|l| l.contains("Mandiant")).unwrap();
    assert!(
        line.starts_with("FAIL") && line.contains("MATI_API_SECRET"),
        "{line}"
    );
    assert!(!out.all().contains("not-the-secret-P2"));
    assert_eq!(
        w.sentinel.lock().unwrap().requests,
        0,
        "check uploads nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_time_budget_stops_cleanly_and_the_next_run_finishes_the_backfill() {
    let feed = feed();
    let w = world(&feed).await;
    // 31 windows at 0.5 s a page do not fit in a 10-second budget.
    w.mandiant.lock().unwrap().page_delay = std::time::Duration::from_millis(500);
    let mut env = w.env();
    env.insert("SYNC_TIME_BUDGET_SECONDS".into(), "10".into());
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "a budget stop is not a failure: {}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["stop_reason"], "time_budget", "{report}");
    let checkpoint: Value = w.checkpoint();
    assert_eq!(checkpoint["backfill_in_progress"], true);
    assert!(checkpoint["last_finished"].is_null());
    let partial = w.received_ids().len();
    assert!(
        partial < expected(&feed, false).len(),
        "stopped before the end"
    );

    w.mandiant.lock().unwrap().page_delay = std::time::Duration::ZERO;
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["stop_reason"], "completed");
    let ids = w.received_ids();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        unique,
        expected(&feed, false),
        "nothing lost across the stop"
    );
    assert_eq!(ids.len(), unique.len(), "nothing sent twice");
    let checkpoint: Value = w.checkpoint();
    assert_eq!(checkpoint["backfill_in_progress"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_cycle_never_runs_while_one_holds_the_lock() {
    let w = world(&feed()).await;
    let lock = w.hold_state_lock();
    let out = run(&["sync", "--json"], &w.env()).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["stop_reason"], "already_running");
    assert_eq!(
        w.mandiant.lock().unwrap().token_requests,
        0,
        "no Mandiant call"
    );
    drop(lock);
    assert_eq!(run(&["sync"], &w.env()).await.code, 0);
    assert!(!w.received_ids().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_client_secret_the_managed_identity_gets_the_token() {
    let feed = feed();
    let w = world(&feed).await;
    let mi = std::sync::Arc::new(std::sync::Mutex::new(ManagedIdentity::default()));
    let endpoint = serve_managed_identity(mi.clone()).await;
    let mut env = w.env();
    env.remove("AZURE_CLIENT_SECRET");
    env.insert("MANAGED_IDENTITY_CLIENT_ID".into(), CLIENT_ID.into());
    env.insert("IDENTITY_ENDPOINT".into(), endpoint);
    env.insert("IDENTITY_HEADER".into(), IDENTITY_HEADER.into());
    let out = run(&["sync"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(!out.all().contains(IDENTITY_HEADER));
    assert!(!out.all().contains("entra-token-mi"));
    let got: BTreeSet<String> = w.received_ids().into_iter().collect();
    assert_eq!(got, expected(&feed, false));
    let mi = mi.lock().unwrap();
    assert_eq!(mi.bad_header, 0);
    assert_eq!(mi.queries[0]["resource"], "https://management.azure.com");
    assert_eq!(mi.queries[0]["client_id"], CLIENT_ID);
    assert_eq!(
        w.entra.lock().unwrap().requests,
        0,
        "no app registration was used"
    );
    let s = w.sentinel.lock().unwrap();
    assert!(
        s.tokens_seen
            .iter()
            .all(|t| t.starts_with("Bearer entra-token-mi-"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_retry_wait_ends_the_cycle_at_its_budget_not_past_it() {
    let feed = feed();
    let w = world(&feed).await;
    let mut env = w.env();
    env.insert("SYNC_TIME_BUDGET_SECONDS".into(), "10".into());
    // Sentinel asks for 100 seconds, twice as long as the budget.
    w.sentinel.lock().unwrap().faults.push_back(Fault::throttle(
        Some("100"),
        r#"{"statusCode":429,"message":"Rate limit is exceeded. Try again in 100 seconds."}"#,
    ));
    let t0 = std::time::Instant::now();
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(60),
        "did not wait out the 429"
    );
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["stop_reason"], "time_budget", "{report}");
    assert_eq!(w.checkpoint()["backfill_in_progress"], true);
    // The next run sends what the throttled batch held.
    assert_eq!(run(&["sync"], &env).await.code, 0);
    let ids = w.received_ids();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, expected(&feed, false));
    assert_eq!(ids.len(), unique.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_indicator_that_stops_qualifying_is_expired_and_can_come_back() {
    let mut feed = feed();
    let w = world(&feed).await;
    let env = w.env();
    assert_eq!(run(&["sync"], &env).await.code, 0);
    let stix_id = w
        .sentinel
        .lock()
        .unwrap()
        .by_id
        .values()
        .find(|o| o["external_references"][0]["external_id"] == feed[0].indicator["id"])
        .unwrap()["id"]
        .clone();

    // Mandiant lowers its threat score: Sentinel gets the same id, valid until now.
    let set = |feed: &mut Vec<Labelled>, score: u8| {
        feed[0].indicator["threat_rating"]["threat_score"] = json!(score);
        feed[0].indicator["last_updated"] =
            json!(ts(OffsetDateTime::now_utc() - Duration::seconds(20)));
        w.mandiant.lock().unwrap().indicators = feed.iter().map(|l| l.indicator.clone()).collect();
    };
    set(&mut feed, 30);
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["expired"], 1, "{report}");
    assert_eq!(report["uploaded"], 0, "{report}");
    let expired = w.sentinel.lock().unwrap().by_id[stix_id.as_str().unwrap()].clone();
    let until = parse(&expired["valid_until"]);
    assert!(
        (OffsetDateTime::now_utc() - until).abs() < Duration::minutes(2),
        "valid until now: {expired}"
    );
    assert!(parse(&expired["valid_from"]) < until);
    assert_eq!(
        expired["revoked"],
        Value::Null,
        "not revoked: it may come back"
    );
    w.export_stix("expired");

    // A rerun does not expire it again.
    let out = run(&["sync", "--json"], &env).await;
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["expired"], 0, "{report}");

    // It qualifies again: uploaded under the same id with a future valid_until.
    set(&mut feed, 95);
    let out = run(&["sync", "--json"], &env).await;
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["uploaded"], 1, "{report}");
    let back = w.sentinel.lock().unwrap().by_id[stix_id.as_str().unwrap()].clone();
    assert!(parse(&back["valid_until"]) > OffsetDateTime::now_utc() + Duration::days(6));
    w.export_stix("expired-and-back");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_indicator_mandiant_keeps_updating_never_lapses() {
    use mati_sentinel::dedupe::{DedupeCache, Entry};
    let (w, keep) = spread_world().await;
    let env = quick_env(&w);
    completes(&env).await;
    w.assert_holds_exactly(&keep);

    // Two days pass: the cache now says Sentinel accepted each lifetime two days ago.
    let path = w.state_dir.path().join("dedupe-cache.bin");
    let mut cache = DedupeCache::decode(&std::fs::read(&path).unwrap()).unwrap();
    for id in &keep {
        let e = *cache.get(id).unwrap();
        cache.record(
            id,
            Entry {
                valid_until: e.valid_until - 2 * 86_400,
                ..e
            },
        );
    }
    std::fs::write(&path, cache.encode()).unwrap();
    let id = "ipv4--00000000-0000-5000-8000-000000000000";
    let until_before = {
        let s = w.sentinel.lock().unwrap();
        let o = s
            .by_id
            .values()
            .find(|o| o["external_references"][0]["external_id"] == id);
        parse(&o.unwrap()["valid_until"])
    };

    // Mandiant touches one indicator without changing what we upload.
    {
        let mut m = w.mandiant.lock().unwrap();
        let i = m.indicators.iter_mut().find(|i| i["id"] == id).unwrap();
        i["last_updated"] = json!(ts(OffsetDateTime::now_utc() - Duration::minutes(2)));
    }
    let r = completes(&env).await;
    assert_eq!(
        (r["extended"].as_u64(), r["uploaded"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    let last = w.sentinel.lock().unwrap().received.last().unwrap().clone();
    assert_eq!(last["external_references"][0]["external_id"], id);
    assert!(
        parse(&last["valid_until"]) > until_before,
        "the lifetime moves forward"
    );
    w.assert_holds_exactly(&keep);

    // Without the two days, the same touch sends nothing.
    let r = completes(&env).await;
    assert_eq!(r["uploaded"], 0, "{r}");
}
