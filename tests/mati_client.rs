//! The Mandiant client against an in-process fake (wiremock on loopback): tokens, paging and
//! every failure the reference names. Retry delays are milliseconds here.

use std::time::Duration;

use mati_sentinel::config::{MatiConfig, Secret};
use mati_sentinel::mati::{MatiClient, MatiError, WindowQuery};
use mati_sentinel::retry::RetryPolicy;
use serde_json::json;
use wiremock::matchers::{header, header_exists, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const KEY: &str = "key-1";
const SECRET: &str = "secret-1";

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(40),
        max_retry_after: Duration::from_secs(2),
        request_timeout: Duration::from_millis(500),
    }
}

fn client(server: &MockServer, key: &str, secret: &str) -> MatiClient {
    MatiClient::new(
        reqwest::Client::new(),
        MatiConfig {
            api_key: Secret::new(key),
            api_secret: Secret::new(secret),
            base_url: server.uri().parse().unwrap(),
        },
        policy(),
    )
}

const QUERY: WindowQuery = WindowQuery {
    start_epoch: 1_700_000_000,
    end_epoch: 1_700_086_400,
    min_confidence: 80,
    exclude_osint: true,
};

async fn token_endpoint(server: &MockServer) {
    // "a2V5LTE6c2VjcmV0LTE=" is base64("key-1:secret-1").
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(header("authorization", "Basic a2V5LTE6c2VjcmV0LTE="))
        .and(header_exists("x-app-name"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "tok", "token_type": "Bearer", "expires_in": 22920}),
        ))
        .mount(server)
        .await;
}

fn page(n: usize, next: Option<&str>) -> serde_json::Value {
    let indicators: Vec<_> = (0..n)
        .map(|i| json!({"id": format!("ipv4--{i}"), "type": "ipv4", "value": "1.2.3.4"}))
        .collect();
    match next {
        Some(n) => json!({"indicators": indicators, "next": n}),
        None => json!({"indicators": indicators}),
    }
}

#[tokio::test]
async fn first_page_sends_the_documented_parameters_and_next_pages_send_only_next() {
    let server = MockServer::start().await;
    token_endpoint(&server).await;
    let cursor = "FGluY2x1ZGU+/abc==";
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .and(query_param("start_epoch", "1700000000"))
        .and(query_param("end_epoch", "1700086400"))
        .and(query_param("limit", "1000"))
        .and(query_param("gte_mscore", "80"))
        .and(query_param("exclude_osint", "true"))
        .and(query_param("include_threat_rating", "true"))
        .and(query_param("include_category", "true"))
        .and(query_param("include_misp", "false"))
        .and(header("authorization", "Bearer tok"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(2, Some(cursor))))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .and(query_param("next", cursor))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(1, None)))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(&server, KEY, SECRET);
    let first = c.first_page(&QUERY).await.unwrap();
    assert_eq!(first.len(), 2);
    let next = first.next_cursor().unwrap().to_string();
    let second = c.next_page(&next).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second.next_cursor(), None);
    let requests = server.received_requests().await.unwrap();
    let next_req = requests
        .iter()
        .find(|r| r.url.query().is_some_and(|q| q.starts_with("next=")))
        .unwrap();
    assert_eq!(next_req.url.query_pairs().count(), 1, "next goes alone");
    assert!(
        next_req.url.query().unwrap().contains("%2B"),
        "the cursor is URL-encoded"
    );
    let tokens = requests.iter().filter(|r| r.url.path() == "/token").count();
    assert_eq!(tokens, 1, "the token is cached");
}

#[tokio::test]
async fn a_401_refreshes_the_token_once() {
    let server = MockServer::start().await;
    token_endpoint(&server).await;
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .respond_with(ResponseTemplate::new(401))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(1, None)))
        .mount(&server)
        .await;
    let c = client(&server, KEY, SECRET);
    assert_eq!(c.first_page(&QUERY).await.unwrap().len(), 1);
    let tokens = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/token")
        .count();
    assert_eq!(tokens, 2);

    // Refused again after the refresh: an authentication error naming the settings.
    let server = MockServer::start().await;
    token_endpoint(&server).await;
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .respond_with(ResponseTemplate::new(401))
        .expect(2)
        .mount(&server)
        .await;
    let err = client(&server, KEY, SECRET)
        .first_page(&QUERY)
        .await
        .unwrap_err();
    assert!(matches!(err, MatiError::Auth { status: 401 }), "{err}");
    assert!(err.to_string().contains("MATI_API_SECRET"));
}

#[tokio::test]
async fn wrong_credentials_are_an_auth_error_without_the_secret() {
    let server = MockServer::start().await;
    token_endpoint(&server).await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"error": "invalid_basic_auth"})),
        )
        .mount(&server)
        .await;
    let err = client(&server, KEY, "wrong-secret-9")
        .first_page(&QUERY)
        .await
        .unwrap_err();
    assert!(matches!(err, MatiError::Auth { .. }), "{err}");
    assert!(!format!("{err} {err:?}").contains("wrong-secret-9"));
}

/// Serves the scripted answers in order, then a good page.
async fn scripted(answers: Vec<ResponseTemplate>) -> MockServer {
    let server = MockServer::start().await;
    token_endpoint(&server).await;
    let n = answers.len();
    let answers = std::sync::Mutex::new(answers.into_iter());
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .respond_with(move |_: &Request| {
            answers
                .lock()
                .unwrap()
                .next()
                .unwrap_or_else(|| ResponseTemplate::new(200).set_body_json(page(3, None)))
        })
        .expect(n as u64 + 1)
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn transient_failures_are_retried_until_a_page_comes() {
    let cases: Vec<(&str, Vec<ResponseTemplate>)> = vec![
        (
            "429 with Retry-After",
            vec![ResponseTemplate::new(429).insert_header("retry-after", "1")],
        ),
        ("429 without Retry-After", vec![ResponseTemplate::new(429)]),
        (
            "5xx",
            vec![ResponseTemplate::new(500), ResponseTemplate::new(503)],
        ),
        (
            "an HTML 502 page",
            vec![ResponseTemplate::new(502).set_body_raw("<html>Bad gateway</html>", "text/html")],
        ),
        (
            "an HTML page with 200",
            vec![ResponseTemplate::new(200).set_body_raw("<html>login</html>", "text/html")],
        ),
        (
            "malformed JSON",
            vec![ResponseTemplate::new(200).set_body_raw("{\"indicators\": [", "application/json")],
        ),
        (
            "a hung response",
            vec![
                ResponseTemplate::new(200)
                    .set_body_json(page(1, None))
                    .set_delay(Duration::from_secs(3)),
            ],
        ),
    ];
    for (name, answers) in cases {
        let server = scripted(answers).await;
        let c = client(&server, KEY, SECRET);
        let page = c
            .first_page(&QUERY)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(page.len(), 3, "{name}");
        assert!(c.stats.retries() >= 1, "{name}: retries counted");
        server.verify().await;
    }
}

#[tokio::test]
async fn persistent_failures_are_errors_never_the_end_of_data() {
    for (name, answer) in [
        ("5xx", ResponseTemplate::new(500)),
        (
            "truncated JSON",
            ResponseTemplate::new(200).set_body_raw("{\"indicators\":[{\"id\"", "application/json"),
        ),
        (
            "429",
            ResponseTemplate::new(429).insert_header("retry-after", "0"),
        ),
    ] {
        let server = MockServer::start().await;
        token_endpoint(&server).await;
        Mock::given(method("GET"))
            .and(path("/v4/indicator"))
            .respond_with(answer)
            .mount(&server)
            .await;
        let err = client(&server, KEY, SECRET)
            .first_page(&QUERY)
            .await
            .unwrap_err();
        assert!(matches!(err, MatiError::GaveUp { .. }), "{name}: {err}");
    }
}

#[tokio::test]
async fn an_expired_next_cursor_is_a_clear_error_and_not_retried() {
    let server = MockServer::start().await;
    token_endpoint(&server).await;
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"errors": [{"message": "invalid next token"}]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server, KEY, SECRET)
        .next_page("stale")
        .await
        .unwrap_err();
    assert!(
        matches!(err, MatiError::Status { status: 400, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("invalid next token"));
}

#[tokio::test]
async fn no_content_is_the_end_of_data() {
    let server = MockServer::start().await;
    token_endpoint(&server).await;
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let page = client(&server, KEY, SECRET)
        .first_page(&QUERY)
        .await
        .unwrap();
    assert!(page.is_empty() && page.next_cursor().is_none());
}

#[tokio::test]
async fn connection_refused_is_an_error_after_bounded_retries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let c = MatiClient::new(
        reqwest::Client::new(),
        MatiConfig {
            api_key: Secret::new(KEY),
            api_secret: Secret::new(SECRET),
            base_url: format!("http://{addr}").parse().unwrap(),
        },
        policy(),
    );
    let err = c.first_page(&QUERY).await.unwrap_err();
    assert!(
        matches!(err, MatiError::GaveUp { attempts: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("could not connect"), "{err}");
}

#[tokio::test]
async fn the_token_is_refreshed_before_it_expires() {
    let server = MockServer::start().await;
    // Two seconds to live: refreshed after one (half the life when it is that short).
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "short", "token_type": "Bearer", "expires_in": 2}),
        ))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v4/indicator"))
        .and(header("authorization", "Bearer short"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(1, None)))
        .expect(3)
        .mount(&server)
        .await;
    let c = client(&server, KEY, SECRET);
    c.first_page(&QUERY).await.unwrap();
    c.first_page(&QUERY).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.first_page(&QUERY).await.unwrap();
}
