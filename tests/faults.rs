//! The fault matrix (docs/RELIABILITY.md): one test per fault, each through the real binary
//! against the TLS fakes, each ending with Sentinel holding exactly the indicators the policy
//! keeps, one object per indicator (`World::assert_holds_exactly`).
//!
//! The feed is labelled by construction: threat score 95 passes the default policy (80),
//! 30 does not. Indicators sit three hours apart over four days, so a cycle walks several
//! windows of several pages (four indicators a page).

mod support;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

use support::*;
use time::OffsetDateTime;

/// Builds the world, lets `fault` script the fakes, runs one cycle that must complete, and
/// checks the end state; the world and the report are for the row's own assertions.
async fn survives(fault: impl FnOnce(&World)) -> (World, serde_json::Value) {
    let (w, keep) = spread_world().await;
    fault(&w);
    let r = completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
    (w, r)
}

// ---------------------------------------------------------------------------------------------
// Mandiant

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_401_in_the_middle_of_paging_refreshes_the_token() {
    let (w, _) = survives(|w| {
        w.mandiant.lock().unwrap().expire_token_at_request = Some(3);
    })
    .await;
    assert!(sent_once(&w));
    assert_eq!(w.mandiant.lock().unwrap().tokens_issued, 3, "one refresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_429_with_retry_after_is_waited_out() {
    let (w, r) = survives(|w| {
        w.mandiant
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::throttle(Some("1"), r#"{"error":"rate limited"}"#));
    })
    .await;
    assert!(sent_once(&w));
    assert_eq!(r["throttled"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_429_without_retry_after_backs_off() {
    let (_, r) = survives(|w| {
        w.mandiant
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::throttle(None, ""));
    })
    .await;
    assert_eq!(r["throttled"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_5xx_is_retried() {
    let (w, r) = survives(|w| {
        let mut m = w.mandiant.lock().unwrap();
        m.faults
            .push_back(Fault::status(500, r#"{"error":"internal"}"#));
        m.faults
            .push_back(Fault::status(503, r#"{"error":"unavailable"}"#));
    })
    .await;
    assert!(sent_once(&w));
    assert!(r["retries"].as_u64().unwrap() >= 2, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_html_502_page_is_retried() {
    let (_, r) = survives(|w| {
        w.mandiant
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::html(502));
    })
    .await;
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_malformed_json_is_retried_not_taken_as_the_end() {
    let (_, r) = survives(|w| {
        w.mandiant
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::status(200, r#"{"indicators": [}"#));
    })
    .await;
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_truncated_json_is_retried_not_taken_as_the_end() {
    let (_, r) = survives(|w| {
        // A page cut off mid-indicator, as a dropped connection leaves it.
        w.mandiant.lock().unwrap().faults.push_back(Fault::status(
            200,
            r#"{"indicators": [{"id": "ipv4--00000000-0000-5000-8000-000000000000", "type": "ipv4", "val"#,
        ));
    })
    .await;
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_expired_next_cursor_pages_the_window_again() {
    let (w, r) = survives(|w| {
        w.mandiant
            .lock()
            .unwrap()
            .next_faults
            .push_back(Fault::status(
                400,
                r#"{"error":"invalid next token: expired"}"#,
            ));
    })
    .await;
    assert!(
        sent_once(&w),
        "the window's first pages were not sent twice"
    );
    let m = w.mandiant.lock().unwrap();
    let firsts = m
        .data_requests
        .iter()
        .filter(|q| q.contains("start_epoch"))
        .count() as u64;
    assert_eq!(
        firsts,
        r["windows_completed"].as_u64().unwrap() + 1,
        "one window asked for twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_connection_refused_stops_the_cycle_and_the_next_run_completes() {
    let (w, keep) = spread_world().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut refused = quick_env(&w);
    refused.insert(
        "MATI_BASE_URL".into(),
        format!("https://127.0.0.1:{closed}"),
    );
    // Retries back off 2, 4, 8… seconds: a ten-second budget ends them early.
    refused.insert("SYNC_TIME_BUDGET_SECONDS".into(), "10".into());
    let out = run(&["sync", "--json"], &refused).await;
    let r = report(&out);
    assert_eq!(r["stop_reason"], "time_budget", "{}", out.all());
    assert!(
        r["retrying_at_stop"]
            .as_str()
            .is_some_and(|e| e.contains("onnection refused")),
        "the report names the cause: {r}"
    );
    assert!(w.received_ids().is_empty());
    assert!(
        !w.state_dir.path().join("checkpoint.json").exists()
            || w.checkpoint()["backfill_in_progress"] == true
    );

    completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w));
}

#[tokio::test(flavor = "multi_thread")]
async fn mandiant_hung_response_times_out_and_is_retried() {
    let (_, r) = survives(|w| {
        // HTTP_TIMEOUT_SECONDS is 5: this answer comes too late.
        w.mandiant
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::Delay(Duration::from_secs(8)));
    })
    .await;
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");
}

// ---------------------------------------------------------------------------------------------
// Entra ID

#[tokio::test(flavor = "multi_thread")]
async fn entra_token_endpoint_blip_is_retried_within_the_cycle() {
    let (w, _) = survives(|w| {
        w.entra
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::status(503, r#"{"error":"temporarily_unavailable"}"#));
    })
    .await;
    assert!(sent_once(&w));
    assert_eq!(w.entra.lock().unwrap().requests, 2, "asked again once");
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_token_endpoint_hung_times_out_and_is_asked_again() {
    let (w, _) = survives(|w| {
        // HTTP_TIMEOUT_SECONDS is 5: this token comes too late.
        w.entra
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::Delay(Duration::from_secs(8)));
    })
    .await;
    assert!(sent_once(&w));
    assert!(w.entra.lock().unwrap().requests >= 2, "asked again");
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_token_endpoint_failing_fails_the_cycle_and_the_next_run_completes() {
    let (w, keep) = spread_world().await;
    {
        let mut e = w.entra.lock().unwrap();
        for _ in 0..20 {
            e.faults.push_back(Fault::status(
                503,
                r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: The server is temporarily unavailable."}"#,
            ));
        }
    }
    let r = fails_with(&quick_env(&w), "could not get an Entra token").await;
    assert_eq!(r["uploaded"], 0, "{r}");
    assert!(w.received_ids().is_empty());

    w.entra.lock().unwrap().faults.clear();
    completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w));
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_token_expiring_during_a_long_cycle_is_renewed() {
    let (w, _) = survives(|w| {
        // Tokens live three seconds; the cycle takes longer (half a second a page).
        w.entra.lock().unwrap().lifetime_secs = Some(3);
        w.mandiant.lock().unwrap().page_delay = Duration::from_millis(500);
    })
    .await;
    assert!(sent_once(&w));
    let issued = w.entra.lock().unwrap().requests;
    assert!(issued >= 2, "a new token was fetched ({issued} issued)");
    let s = w.sentinel.lock().unwrap();
    assert!(
        s.expired_tokens <= 1,
        "an expired token is replaced at once, not resent ({} refusals)",
        s.expired_tokens
    );
}

// ---------------------------------------------------------------------------------------------
// Sentinel

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_429_with_try_again_in_n_seconds_is_waited_out() {
    let (w, r) = survives(|w| {
        w.sentinel.lock().unwrap().faults.push_back(Fault::throttle(
            None,
            r#"{"statusCode":429,"message":"Rate limit is exceeded. Try again in 1 seconds."}"#,
        ));
    })
    .await;
    assert!(sent_once(&w));
    assert_eq!(r["throttled"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_429_with_retry_after_is_waited_out() {
    let (w, r) = survives(|w| {
        w.sentinel
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::throttle(Some("1"), r#"{"statusCode":429}"#));
    })
    .await;
    assert!(sent_once(&w));
    assert_eq!(r["throttled"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_5xx_resends_the_same_batch() {
    let (w, r) = survives(|w| {
        let mut s = w.sentinel.lock().unwrap();
        s.faults
            .push_back(Fault::status(500, r#"{"statusCode":500}"#));
        s.faults
            .push_back(Fault::status(503, r#"{"statusCode":503}"#));
    })
    .await;
    assert!(sent_once(&w));
    assert!(r["retries"].as_u64().unwrap() >= 2, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_timeout_resends_the_same_batch_without_duplicates() {
    let (_, r) = survives(|w| {
        // Sentinel takes the batch, but answers after the client gave up: the resend is an
        // update of the same ids.
        w.sentinel
            .lock()
            .unwrap()
            .faults
            .push_back(Fault::Delay(Duration::from_secs(8)));
    })
    .await;
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_401_gets_a_new_token_once() {
    let (w, _) = survives(|w| {
        w.sentinel
            .lock()
            .unwrap()
            .refuse_tokens
            .push("entra-token-1".into());
    })
    .await;
    assert!(sent_once(&w));
    assert_eq!(w.entra.lock().unwrap().requests, 2, "exactly one refresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_200_with_record_errors_sends_the_refused_again_next_cycle() {
    let (w, keep) = spread_world().await;
    // Two objects refused once each, then taken.
    let names: Vec<String> = ["198.51.100.4", "host5.bad.example"]
        .map(String::from)
        .to_vec();
    w.sentinel.lock().unwrap().refuse_once = names.clone();
    let r = completes(&quick_env(&w)).await;
    assert_eq!(r["refused"], 2, "{r}");
    let live = w.live();
    assert_eq!(live.len(), keep.len() - 2, "the two are missing for now");

    let r = completes(&quick_env(&w)).await;
    assert_eq!(r["uploaded"], 2, "only the two are sent: {r}");
    assert_eq!(r["refused"], 0, "{r}");
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_sentinel_always_refuses_is_given_up_after_five_cycles() {
    let (w, mut keep) = spread_world().await;
    w.sentinel
        .lock()
        .unwrap()
        .refuse_names
        .push("198.51.100.4".into());
    let env = quick_env(&w);
    // Later cycles start from the checkpoint; the one indicator is only in the queue.
    for cycle in 1..=6 {
        let r = completes(&env).await;
        let (refused, abandoned) = match cycle {
            1..=4 => (1, 0),
            5 => (1, 1),
            _ => (0, 0),
        };
        assert_eq!(
            (
                r["refused"].as_u64().unwrap(),
                r["abandoned"].as_u64().unwrap()
            ),
            (refused, abandoned),
            "cycle {cycle}: {r}"
        );
    }
    keep.remove("ipv4--00000000-0000-5000-8000-000000000004");
    w.assert_holds_exactly(&keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_400_without_errors_fails_the_cycle_and_loses_nothing() {
    let (w, keep) = spread_world().await;
    w.sentinel.lock().unwrap().faults.push_back(Fault::status(
        400,
        r#"{"error":{"code":"BadRequest","message":"The request is invalid."}}"#,
    ));
    fails_with(&quick_env(&w), "HTTP 400").await;
    completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_403_names_the_contributor_role_and_loses_nothing() {
    let (w, keep) = spread_world().await;
    w.sentinel.lock().unwrap().faults.push_back(Fault::status(
        403,
        r#"{"error":{"code":"AuthorizationFailed","message":"The client does not have authorization to perform action."}}"#,
    ));
    fails_with(&quick_env(&w), "Microsoft Sentinel Contributor").await;
    assert!(w.received_ids().is_empty());
    completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w));
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_404_names_the_workspace_setting_and_loses_nothing() {
    let (w, keep) = spread_world().await;
    let mut wrong = quick_env(&w);
    wrong.insert(
        "AZURE_WORKSPACE_ID".into(),
        "00000000-0000-4000-8000-000000000000".into(),
    );
    fails_with(&wrong, "AZURE_WORKSPACE_ID").await;
    assert!(w.received_ids().is_empty());
    completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w));
}

// ---------------------------------------------------------------------------------------------
// State

fn blob_env(w: &World, azurite: &Azurite, container: &str) -> BTreeMap<String, String> {
    let mut env = quick_env(w);
    env.remove("STATE_DIR");
    env.insert(
        "STATE_CONTAINER_SAS_URL".into(),
        mati_sentinel::state::blob::development_sas_url(&azurite.endpoint, container).unwrap(),
    );
    env
}

/// Waits until the fake Mandiant was asked for a page: the cycle holds its lease by then.
async fn wait_for_paging(w: &World) {
    let t0 = std::time::Instant::now();
    while w.mandiant.lock().unwrap().data_requests.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the cycle never paged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn state_write_conflict_412_fails_the_cycle_and_the_next_run_completes() {
    use mati_sentinel::state::{Checkpoint, Precondition, StateStore};
    let azurite = Azurite::start(0);
    let (w, keep) = spread_world().await;
    let env = blob_env(&w, &azurite, "conflict");
    w.mandiant.lock().unwrap().page_delay = Duration::from_millis(300);
    let child = command(&["sync", "--json"], &env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_paging(&w).await;
    // Another writer (a second install on the same container, say) writes the checkpoint
    // behind the cycle's back: the cycle's next write must be refused, not overwrite it.
    let other = mati_sentinel::state::blob::BlobStore::development_storage_at(
        &azurite.endpoint,
        "conflict",
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    let start = OffsetDateTime::now_utc().unix_timestamp() - 5 * 86_400;
    let (theirs, their_version) = loop {
        let current = other.read("checkpoint.json").await.unwrap();
        // What it writes loses nothing: the position it found, or the cycle's own start.
        let bytes = match &current {
            Some(v) => v.bytes.clone(),
            None => Checkpoint {
                format: Checkpoint::FORMAT,
                window_start: start,
                last_finished: None,
                backfill_in_progress: true,
            }
            .encode(),
        };
        match other
            .write(
                "checkpoint.json",
                &bytes,
                Precondition::from_read(current.as_ref()),
            )
            .await
        {
            Ok(v) => break (bytes, v),
            // The cycle wrote in between: read again.
            Err(_) => continue,
        }
    };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("changed since it was read"), "{text}");
    let kept = other.read("checkpoint.json").await.unwrap().unwrap();
    assert_eq!(
        (kept.bytes, kept.version),
        (theirs, their_version),
        "the other writer's checkpoint was not overwritten"
    );

    w.mandiant.lock().unwrap().page_delay = Duration::ZERO;
    completes(&env).await;
    w.assert_holds_exactly(&keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_store_unavailable_fails_cleanly_and_the_next_run_completes() {
    let (w, keep) = spread_world().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut env = quick_env(&w);
    env.remove("STATE_DIR");
    env.insert(
        "STATE_CONTAINER_SAS_URL".into(),
        mati_sentinel::state::blob::development_sas_url(&endpoint, "down").unwrap(),
    );
    // Nothing listens yet: no lock, so no Mandiant call and no upload.
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.all().contains("state store unavailable"),
        "{}",
        out.all()
    );
    assert_eq!(w.mandiant.lock().unwrap().data_requests.len(), 0);
    assert!(w.received_ids().is_empty());

    // The store comes up, then goes away in the middle of a cycle.
    let azurite = Azurite::start(port);
    w.mandiant.lock().unwrap().page_delay = Duration::from_millis(300);
    let child = command(&["sync", "--json"], &env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_paging(&w).await;
    drop(azurite);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Back again (empty: everything it held is gone), the next run completes, and what the
    // broken cycle uploaded is sent again under the same ids.
    let _azurite = Azurite::start(port);
    w.mandiant.lock().unwrap().page_delay = Duration::ZERO;
    completes(&env).await;
    w.assert_holds_exactly(&keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_store_hung_fails_the_cycle_and_the_next_run_completes() {
    let (w, keep) = spread_world().await;
    // A store that takes connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let mut hung = quick_env(&w);
    hung.remove("STATE_DIR");
    hung.insert(
        "STATE_CONTAINER_SAS_URL".into(),
        mati_sentinel::state::blob::development_sas_url(&endpoint, "hung").unwrap(),
    );
    // HTTP_TIMEOUT_SECONDS is 5 and the store client retries three times: without the
    // timeout this run would never end (the guard turns that into a failure).
    let out = tokio::time::timeout(Duration::from_secs(120), run(&["sync", "--json"], &hung))
        .await
        .expect("a hung store does not hang the cycle");
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.all().contains("state store unavailable"),
        "{}",
        out.all()
    );
    assert!(w.received_ids().is_empty(), "no lock, no upload");

    completes(&quick_env(&w)).await;
    w.assert_holds_exactly(&keep);
}

// ---------------------------------------------------------------------------------------------
// Process: SIGKILL at the three points where a crash could lose or double something

/// Starts a cycle armed to stop at `point`, waits until it is there, and kills it.
async fn kill_at(w: &World, point: &str) {
    let mut env = quick_env(w);
    env.insert(mati_sentinel::failpoint::VARIABLE.into(), point.to_string());
    let mut child = command(&["sync", "--json"], &env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let marker = format!("failpoint {point} reached");
    let reached = tokio::task::spawn_blocking(move || {
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains(&marker) {
                return Ok(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        Err(log)
    });
    let reached = tokio::time::timeout(Duration::from_secs(60), reached)
        .await
        .expect("the failpoint is reached")
        .unwrap();
    if let Err(log) = reached {
        let _ = child.kill();
        panic!("the cycle ended before {point}:\n{log}");
    }
    child.kill().unwrap(); // SIGKILL: no handler, no cleanup
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_fetching_the_next_run_completes() {
    let (w, keep) = spread_world().await;
    // Killed with a window's indicators fetched and planned, none sent.
    kill_at(&w, "after_fetch").await;
    assert!(w.received_ids().is_empty(), "killed before any upload");
    let r = completes(&quick_env(&w)).await;
    assert_eq!(
        r["uploaded"].as_u64().unwrap() as usize,
        keep.len(),
        "nothing was recorded as sent: {r}"
    );
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w));
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_in_the_middle_of_uploading_the_next_run_completes() {
    let (w, keep) = spread_world().await;
    kill_at(&w, "mid_upload").await;
    let before = w.received_ids().len();
    assert!(before > 0, "Sentinel took a batch before the kill");
    assert!(!w.state_dir.path().join("dedupe-cache.bin").exists());
    completes(&quick_env(&w)).await;
    // The batch Sentinel took but the cache never recorded is sent again, as an update of
    // the same ids: one object each.
    w.assert_holds_exactly(&keep);
    assert_eq!(w.received_ids().len(), keep.len() + before);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_between_the_cache_write_and_the_checkpoint_write_the_next_run_completes() {
    let (w, keep) = spread_world().await;
    kill_at(&w, "after_cache_write").await;
    let before = w.received_ids().len();
    assert!(before > 0 && w.state_dir.path().join("dedupe-cache.bin").exists());
    let r = completes(&quick_env(&w)).await;
    // The window is fetched again, but the cache knows it is in Sentinel.
    assert_eq!(r["unchanged"].as_u64().unwrap() as usize, before, "{r}");
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w));
}

// ---------------------------------------------------------------------------------------------
// Time

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_ending_in_the_middle_of_a_window_later_cycles_finish() {
    let (w, keep) = spread_world().await;
    // Five windows of three or four pages at 1.2 s a page do not fit in ten seconds.
    w.mandiant.lock().unwrap().page_delay = Duration::from_millis(1200);
    let mut env = quick_env(&w);
    env.insert("SYNC_TIME_BUDGET_SECONDS".into(), "10".into());
    let out = run(&["sync", "--json"], &env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(report(&out)["stop_reason"], "time_budget");
    let partial = w.live().len();
    assert!(partial < keep.len(), "stopped before the end ({partial})");
    assert_eq!(w.checkpoint()["backfill_in_progress"], true);

    let mut cycles = 1;
    loop {
        let out = run(&["sync", "--json"], &env).await;
        assert_eq!(out.code, 0, "{}", out.all());
        cycles += 1;
        if report(&out)["stop_reason"] == "completed" {
            break;
        }
        assert!(cycles < 10, "the backfill never finished");
    }
    w.assert_holds_exactly(&keep);
    assert!(sent_once(&w), "nothing sent twice across the stops");
    assert_eq!(w.checkpoint()["backfill_in_progress"], false);
}
