//! The Sentinel uploader against a TLS fake of Entra ID and wiremock standing in for the
//! upload API: request shape for both APIs, retries of the same batch, token refresh, and
//! the errors that must fail a cycle with a fix.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mati_sentinel::config::{SentinelAuth, SentinelConfig, UploadApi};
use mati_sentinel::rate_limit::SlidingWindow;
use mati_sentinel::retry::RetryPolicy;
use mati_sentinel::sentinel::{SentinelError, SentinelUploader};
use serde_json::{Value, json};
use support::*;
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 6,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(40),
        max_retry_after: Duration::from_secs(2),
        request_timeout: Duration::from_millis(500),
    }
}

struct Setup {
    _tls: Tls,
    entra: Shared<Entra>,
    server: MockServer,
    uploader: SentinelUploader,
}

async fn setup(api: UploadApi, limiter: SlidingWindow) -> Setup {
    let tls = Tls::new().await;
    let entra = Arc::new(Mutex::new(Entra::default()));
    let entra_url = tls.serve(entra_router(entra.clone())).await;
    let server = MockServer::start().await;
    let config = SentinelConfig {
        workspace_id: WORKSPACE.into(),
        auth: SentinelAuth::ClientSecret {
            tenant_id: TENANT.into(),
            client_id: CLIENT_ID.into(),
            secret: mati_sentinel::config::Secret::new(CLIENT_SECRET),
        },
        api,
        endpoint: server.uri().parse().unwrap(),
        source_system: "Mandiant".into(),
        authority_host: entra_url.parse().unwrap(),
        token_scope: "https://management.azure.com/.default".into(),
    };
    let uploader =
        SentinelUploader::new(tls.client(), &config, Arc::new(limiter), policy()).unwrap();
    Setup {
        _tls: tls,
        entra,
        server,
        uploader,
    }
}

fn objects(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            json!({"type": "indicator", "id": format!("indicator--{i}"), "name": format!("o{i}")})
                .to_string()
        })
        .collect()
}

fn stix_path() -> String {
    format!("/workspaces/{WORKSPACE}/threat-intelligence-stix-objects:upload")
}

fn unlimited() -> SlidingWindow {
    SlidingWindow::new(1000, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stix_objects_api_gets_its_body_token_and_path() {
    let s = setup(UploadApi::StixObjects, unlimited()).await;
    Mock::given(method("POST"))
        .and(path(stix_path()))
        .and(query_param("api-version", "2024-02-01-preview"))
        .and(header("authorization", "Bearer entra-token-1"))
        .and(header("content-type", "application/json"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&s.server)
        .await;
    let out = s.uploader.upload(&objects(3)).await.unwrap();
    assert_eq!(out.accepted, vec![0, 1, 2]);
    let body: Value =
        serde_json::from_slice(&s.server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(body["sourcesystem"], "Mandiant");
    assert_eq!(body["stixobjects"].as_array().unwrap().len(), 3);
    assert_eq!(
        s.entra.lock().unwrap().scopes,
        vec!["https://management.azure.com/.default"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_legacy_api_gets_value_and_its_own_path() {
    let s = setup(UploadApi::UploadIndicators, unlimited()).await;
    Mock::given(method("POST"))
        .and(path(format!(
            "/{WORKSPACE}/threatintelligence:upload-indicators"
        )))
        .and(query_param("api-version", "2022-07-01"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&s.server)
        .await;
    s.uploader.upload(&objects(2)).await.unwrap();
    let body: Value =
        serde_json::from_slice(&s.server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(body["value"].as_array().unwrap().len(), 2);
    assert!(body.get("stixobjects").is_none());
}

/// Answers with the scripted responses first, then 200.
async fn scripted(server: &MockServer, answers: Vec<ResponseTemplate>) {
    let n = answers.len() as u64;
    let answers = Mutex::new(answers.into_iter());
    Mock::given(method("POST"))
        .respond_with(move |_: &Request| {
            answers
                .lock()
                .unwrap()
                .next()
                .unwrap_or_else(|| ResponseTemplate::new(200))
        })
        .expect(n + 1)
        .mount(server)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_and_server_errors_resend_the_same_batch() {
    let s = setup(UploadApi::StixObjects, unlimited()).await;
    scripted(
        &s.server,
        vec![
            ResponseTemplate::new(429).insert_header("retry-after", "1"),
            ResponseTemplate::new(429).set_body_json(json!({"statusCode": 429, "message": "Rate limit is exceeded. Try again in 1 seconds."})),
            ResponseTemplate::new(500).set_body_json(json!({"statusCode": 500, "message": "Internal server error"})),
            ResponseTemplate::new(200).set_delay(Duration::from_secs(2)),
        ],
    )
    .await;
    let out = s.uploader.upload(&objects(100)).await.unwrap();
    assert_eq!(out.accepted.len(), 100);
    let bodies: Vec<Vec<u8>> = s
        .server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.body)
        .collect();
    assert_eq!(bodies.len(), 5);
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "the same batch every time"
    );
    assert_eq!(s.uploader.stats.throttled(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_gets_a_fresh_token_once() {
    let s = setup(UploadApi::StixObjects, unlimited()).await;
    scripted(&s.server, vec![ResponseTemplate::new(401)]).await;
    s.uploader.upload(&objects(1)).await.unwrap();
    let reqs = s.server.received_requests().await.unwrap();
    let auth: Vec<&str> = reqs
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap())
        .collect();
    assert_eq!(auth, vec!["Bearer entra-token-1", "Bearer entra-token-2"]);

    let s = setup(UploadApi::StixObjects, unlimited()).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401))
        .expect(2)
        .mount(&s.server)
        .await;
    let err = s.uploader.upload(&objects(1)).await.unwrap_err();
    assert!(matches!(err, SentinelError::Unauthorized { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn record_errors_split_the_batch() {
    let s = setup(UploadApi::StixObjects, unlimited()).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errors": [
            {"recordIndex": 1, "errorMessages": ["Error for Property=pattern: bad"]}
        ]})))
        .mount(&s.server)
        .await;
    let out = s.uploader.upload(&objects(3)).await.unwrap();
    assert_eq!(out.accepted, vec![0, 2]);
    assert_eq!(
        out.refused,
        vec![(1, "Error for Property=pattern: bad".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_errors_fail_with_what_to_fix_and_are_not_retried() {
    let cases = [
        (
            400,
            "Workspace Id must be a valid GUID",
            "AZURE_WORKSPACE_ID",
        ),
        (
            403,
            "does not have required permission",
            "Microsoft Sentinel Contributor",
        ),
        (404, "not found", "AZURE_WORKSPACE_ID"),
    ];
    for (status, body, hint) in cases {
        let s = setup(UploadApi::StixObjects, unlimited()).await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .expect(1)
            .mount(&s.server)
            .await;
        let err = s
            .uploader
            .upload(&objects(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(hint), "{status}: {err}");
        assert!(
            err.contains(body),
            "{status}: Sentinel's words are kept: {err}"
        );
        s.server.verify().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_server_errors_give_up_after_the_bound() {
    let s = setup(UploadApi::StixObjects, unlimited()).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .expect(6)
        .mount(&s.server)
        .await;
    let err = s.uploader.upload(&objects(1)).await.unwrap_err();
    assert!(
        matches!(err, SentinelError::GaveUp { attempts: 6, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_retries_included_passes_the_limiter() {
    // Two requests per 400 ms: a first upload that needs a retry and a second upload make
    // three requests, so the third must wait for the first to age out of the window.
    let s = setup(
        UploadApi::StixObjects,
        SlidingWindow::new(2, Duration::from_millis(400)),
    )
    .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&s.server)
        .await;
    let t0 = std::time::Instant::now();
    s.uploader.upload(&objects(1)).await.unwrap();
    s.uploader.upload(&objects(1)).await.unwrap();
    assert_eq!(s.server.received_requests().await.unwrap().len(), 3);
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
}
