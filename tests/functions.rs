//! The Functions side: the custom handler driven the way the host drives it, Blob state on
//! Azurite, two processes at once, and the daemon's clean stop.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use time::OffsetDateTime;

fn feed() -> Vec<Value> {
    let now = OffsetDateTime::now_utc();
    (1..=12u32)
        .map(|n| {
            json!({
                "id": format!("ipv4--00000000-0000-5000-8000-{n:012}"),
                "type": "ipv4", "value": format!("203.0.113.{n}"), "mscore": 90,
                "sources": [{"osint": false, "category": ["malware"], "source_name": "Mandiant"}],
                "threat_rating": {"threat_score": 90, "severity_level": "high"},
                "last_updated": (now - time::Duration::hours(i64::from(n) * 50 + 1) + time::Duration::minutes(13))
                    .format(&time::format_description::well_known::Rfc3339).unwrap(),
            })
        })
        .collect()
}

fn all_ids() -> BTreeSet<String> {
    feed()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

fn timer_payload() -> Value {
    json!({
        "Data": {"timer": {"Schedule": {"AdjustForDST": true}, "ScheduleStatus": {
            "Last": "2026-12-03T13:00:00.0096035+00:00", "Next": "2026-12-03T13:15:00+00:00",
            "LastUpdated": "2026-12-03T13:00:00.0096035+00:00"}, "IsPastDue": false}},
        "Metadata": {"sys": {"MethodName": "SyncIndicators", "UtcNow": "2026-12-03T13:15:00.01Z",
            "RandGuid": "35e6e68c-5583-436c-a277-5aec2b416ba8"}}
    })
}

struct Handler {
    child: std::process::Child,
    url: String,
    stderr_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Handler {
    /// Starts `serve` as the host would and waits for `GET /`; returns how long that took.
    async fn start(env: &BTreeMap<String, String>) -> (Handler, Duration) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let mut cmd = command(&["serve"], env);
        cmd.env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let t0 = Instant::now();
        let child = cmd.spawn().unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(format!("{url}/")).send().await {
                assert!(r.status().is_success());
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the handler never answered GET /"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ready = t0.elapsed();
        (
            Handler {
                child,
                url,
                stderr_path,
                _dir: dir,
            },
            ready,
        )
    }

    async fn tick(&self, invocation: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/SyncIndicators", self.url))
            .header("X-Azure-Functions-InvocationId", invocation)
            .header("User-Agent", "Azure-Functions-Host/4.1041.200")
            .json(&timer_payload())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Stops it like the host does (SIGTERM) and returns its exit code and log.
    fn stop(mut self) -> (i32, String) {
        terminate(&self.child);
        let status = self.child.wait().unwrap();
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(&self.stderr_path).unwrap(),
        )
    }
}

fn terminate(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_handler_answers_readiness_runs_due_cycles_and_skips_ticks_that_are_not_due() {
    let w = World::new(feed()).await;
    let (handler, ready) = Handler::start(&w.env()).await;
    assert!(ready < Duration::from_secs(1), "GET / took {ready:?}");

    let (status, body) = handler.tick("11111111-aaaa-4bbb-8ccc-000000000001").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["Logs", "Outputs", "ReturnValue"]
    );
    assert_eq!(body["Outputs"], json!({}));
    assert!(
        body["Logs"][0]
            .as_str()
            .unwrap()
            .starts_with("sync cycle completed"),
        "{body}"
    );
    assert_eq!(body["ReturnValue"]["stop_reason"], "completed");
    assert_eq!(body["ReturnValue"]["uploaded"], 12);
    let got: BTreeSet<String> = w.received_ids().into_iter().collect();
    assert_eq!(got, all_ids());

    // The next tick comes before SYNC_SCHEDULE hours have passed: no Mandiant call at all.
    let calls_before = {
        let m = w.mandiant.lock().unwrap();
        (m.token_requests, m.data_requests.len())
    };
    let (status, body) = handler.tick("11111111-aaaa-4bbb-8ccc-000000000002").await;
    assert_eq!(status, 200);
    assert_eq!(body["ReturnValue"]["status"], "not_due");
    assert!(body["Logs"][0].as_str().unwrap().contains("not due"));
    let m = w.mandiant.lock().unwrap();
    assert_eq!((m.token_requests, m.data_requests.len()), calls_before);
    drop(m);

    let (code, log) = handler.stop();
    assert_eq!(code, 0, "a clean stop on SIGTERM");
    assert!(
        log.contains("11111111-aaaa-4bbb-8ccc-000000000001"),
        "the invocation id is logged"
    );
    for secret in [MATI_SECRET, CLIENT_SECRET, "entra-token-", "mati-token-"] {
        assert!(!log.contains(secret), "{secret} in the handler's log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_cycle_answers_500_and_a_tick_during_a_running_cycle_answers_200() {
    let w = World::new(feed()).await;
    let mut env = w.env();
    env.insert(
        "AZURE_WORKSPACE_ID".into(),
        "00000000-0000-4000-8000-000000000000".into(),
    );
    let (handler, _) = Handler::start(&env).await;
    let (status, body) = handler.tick("fail-1").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["Logs"].to_string().contains("AZURE_WORKSPACE_ID"),
        "{body}"
    );
    assert_eq!(body["ReturnValue"]["stop_reason"], "failed");
    handler.stop();

    // Another instance holds the state lock: the tick succeeds and says so.
    let (handler, _) = Handler::start(&w.env()).await;
    let _lock = w.hold_state_lock();
    let tokens_before = w.mandiant.lock().unwrap().token_requests;
    let (status, body) = handler.tick("busy-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ReturnValue"]["stop_reason"], "already_running");
    assert!(
        body["Logs"][0]
            .as_str()
            .unwrap()
            .contains("another cycle holds the lease")
    );
    assert_eq!(
        w.mandiant.lock().unwrap().token_requests,
        tokens_before,
        "no Mandiant call"
    );
    handler.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_development_storage_state_lives_only_in_azurite() {
    // The documented local setup: Azurite's well-known account on 127.0.0.1:10000.
    let _azurite = Azurite::start(10000);
    let w = World::new(feed()).await;
    let mut env = w.env();
    env.remove("STATE_DIR");
    env.insert(
        "AzureWebJobsStorage".into(),
        "UseDevelopmentStorage=true".into(),
    );
    let cwd = tempfile::tempdir().unwrap();
    let out = run_in(Some(cwd.path()), &["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "no local state folder"
    );
    let store = mati_sentinel::state::blob::BlobStore::development_storage(
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    use mati_sentinel::state::StateStore;
    assert!(store.read("checkpoint.json").await.unwrap().is_some());
    assert!(store.read("dedupe-cache.bin").await.unwrap().is_some());

    // The next run finds its state there: the overlapping indicator is skipped as unchanged.
    w.mandiant.lock().unwrap().indicators.push(json!({
        "id": "fqdn--00000000-0000-5000-8000-000000000099", "type": "fqdn", "value": "recent.example",
        "mscore": 90, "threat_rating": {"threat_score": 90},
        "last_updated": OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap()
    }));
    let before = w.received_ids().len();
    let out = run_in(Some(cwd.path()), &["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["uploaded"], 1, "only the new indicator: {report}");
    let out = run_in(Some(cwd.path()), &["sync", "--json"], &env).await;
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["uploaded"], 0, "{report}");
    assert_eq!(report["unchanged"], 1, "{report}");
    assert_eq!(w.received_ids().len(), before + 1);
}

/// Starts two `sync` processes at the same moment against the same state.
async fn race(w: &World, env: &BTreeMap<String, String>) {
    w.mandiant.lock().unwrap().page_delay = Duration::from_millis(300);
    let spawn = || {
        command(&["sync", "--json"], env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = tokio::task::spawn_blocking(move || {
        (a.wait_with_output().unwrap(), b.wait_with_output().unwrap())
    })
    .await
    .unwrap();
    assert!(a.status.success() && b.status.success());
    let reasons: BTreeSet<String> = [a, b]
        .iter()
        .map(|o| {
            serde_json::from_slice::<Value>(&o.stdout).unwrap()["stop_reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["already_running".to_string(), "completed".to_string()])
    );
    let ids = w.received_ids();
    assert_eq!(ids.len(), 12, "each indicator uploaded once");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), all_ids());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_never_both_run_a_cycle_on_the_folder_store() {
    let w = World::new(feed()).await;
    race(&w, &w.env()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_never_both_run_a_cycle_on_the_blob_store() {
    let azurite = Azurite::start(0);
    let w = World::new(feed()).await;
    let mut env = w.env();
    env.remove("STATE_DIR");
    env.insert(
        "STATE_CONTAINER_SAS_URL".into(),
        mati_sentinel::state::blob::development_sas_url(&azurite.endpoint, "race").unwrap(),
    );
    race(&w, &env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_stops_at_a_batch_boundary_on_sigterm_with_state_saved() {
    let w = World::new(feed()).await;
    w.mandiant.lock().unwrap().page_delay = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let mut child = command(&["daemon"], &w.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while w.mandiant.lock().unwrap().data_requests.len() < 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the daemon never fetched"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminate(&child);
    let stopped_at = Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "it stopped at the next boundary"
    );
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(log.contains("stopped on request"), "{log}");
    let checkpoint = w.checkpoint();
    assert_eq!(checkpoint["backfill_in_progress"], true);

    // What it did not reach, the next run does; nothing twice.
    w.mandiant.lock().unwrap().page_delay = Duration::ZERO;
    assert_eq!(run(&["sync"], &w.env()).await.code, 0);
    let ids = w.received_ids();
    assert_eq!(ids.len(), 12);
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), all_ids());
}
