//! Test harness: in-process fakes of Mandiant, Entra ID, Sentinel and the management API,
//! served over TLS on loopback with a test CA, and a runner for the real `mati-sentinel` binary.
//!
//! The fakes follow the documented payloads (`shared/reference/`): Mandiant's `/token` with
//! HTTP Basic and `next`-only paging, Entra's v2.0 token endpoint and its AADSTS errors (and
//! token lifetimes the other fakes enforce), Sentinel's two upload APIs with `errors[]`, 429
//! bodies and the 100-object limit, and the management API's `/query` over what the fake
//! Sentinel holds, paged by `nextLink`. Faults are queued per fake and served in order.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

pub const WORKSPACE: &str = "5f2a9c1e-7b3d-4e8f-9a0b-1c2d3e4f5a6b";
pub const TENANT: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
pub const CLIENT_ID: &str = "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e";
pub const MATI_KEY: &str = "mati-key-id-7f3e";
pub const MATI_SECRET: &str = "mati-secret-Zq9-do-not-print";
pub const CLIENT_SECRET: &str = "entra-secret-Xy7-do-not-print";

// ---------------------------------------------------------------------------------------------
// TLS

pub struct Tls {
    pub ca_file: PathBuf,
    pub ca_pem: String,
    server: axum_server::tls_rustls::RustlsConfig,
    _dir: tempfile::TempDir,
}

impl Tls {
    pub async fn new() -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mati-sentinel test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("test-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let server = axum_server::tls_rustls::RustlsConfig::from_pem(
            cert.pem().into_bytes(),
            key.serialize_pem().into_bytes(),
        )
        .await
        .unwrap();
        Tls {
            ca_file,
            ca_pem: ca.pem(),
            server,
            _dir: dir,
        }
    }

    /// Serves a router over TLS on a free loopback port; returns `https://127.0.0.1:port`.
    pub async fn serve(&self, router: Router) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = axum_server::from_tcp_rustls(listener, self.server.clone());
        tokio::spawn(async move {
            server.serve(router.into_make_service()).await.unwrap();
        });
        format!("https://{addr}")
    }

    /// An HTTP client that trusts the test CA (for in-process tests).
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }
}

/// A scripted failure, served instead of the normal answer.
#[derive(Clone, Debug)]
pub enum Fault {
    Status {
        status: u16,
        retry_after: Option<String>,
        content_type: &'static str,
        body: String,
    },
    /// Wait this long before answering normally (a hung response, for client timeouts).
    Delay(Duration),
}

impl Fault {
    pub fn status(status: u16, body: &str) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
            content_type: "application/json",
            body: body.to_string(),
        }
    }
    pub fn html(status: u16) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
            content_type: "text/html",
            body: "<html><head><title>502 Bad Gateway</title></head><body>cloudflare</body></html>"
                .into(),
        }
    }
    pub fn throttle(retry_after: Option<&str>, body: &str) -> Fault {
        Fault::Status {
            status: 429,
            retry_after: retry_after.map(str::to_string),
            content_type: "application/json",
            body: body.to_string(),
        }
    }
}

async fn apply(fault: Option<Fault>) -> Option<Response> {
    match fault? {
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Fault::Status {
            status,
            retry_after,
            content_type,
            body,
        } => {
            let mut r = (StatusCode::from_u16(status).unwrap(), body).into_response();
            r.headers_mut()
                .insert("content-type", content_type.parse().unwrap());
            if let Some(ra) = retry_after {
                r.headers_mut().insert("retry-after", ra.parse().unwrap());
            }
            Some(r)
        }
    }
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Mandiant

#[derive(Default)]
pub struct Mandiant {
    /// The feed; each indicator needs `last_updated`.
    pub indicators: Vec<Value>,
    pub page_size: usize,
    pub token_requests: usize,
    pub tokens_issued: usize,
    /// Query strings of `/v4/indicator` requests, in order.
    pub data_requests: Vec<String>,
    /// `next` requests that carried other parameters (Mandiant wants `next` alone).
    pub next_with_extras: usize,
    pub missing_app_name: usize,
    pub faults: VecDeque<Fault>,
    /// Served only to requests that carry `next` (an expired cursor, for one).
    pub next_faults: VecDeque<Fault>,
    pub token_faults: VecDeque<Fault>,
    /// Refuse the current token once on the request with this index (token expired mid-paging).
    pub expire_token_at_request: Option<usize>,
    /// Every `/v4/indicator` answer waits this long (a slow feed, for the time budget).
    pub page_delay: Duration,
}

pub type Shared<T> = Arc<Mutex<T>>;

fn last_updated(i: &Value) -> i64 {
    let s = i["last_updated"].as_str().expect("last_updated");
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

pub fn mandiant_router(state: Shared<Mandiant>) -> Router {
    async fn token(
        State(s): State<Shared<Mandiant>>,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        let fault = {
            let mut m = s.lock().unwrap();
            m.token_requests += 1;
            m.token_faults.pop_front()
        };
        if let Some(r) = apply(fault).await {
            return r;
        }
        if header(&headers, "authorization") != basic(MATI_KEY, MATI_SECRET) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_basic_auth", "errorMessage": "invalid credentials"})),
            )
                .into_response();
        }
        assert_eq!(body, "grant_type=client_credentials");
        let mut m = s.lock().unwrap();
        m.tokens_issued += 1;
        Json(json!({"access_token": format!("mati-token-{}", m.tokens_issued), "token_type": "Bearer", "expires_in": 22920}))
            .into_response()
    }

    async fn indicators(
        State(s): State<Shared<Mandiant>>,
        headers: HeaderMap,
        uri: Uri,
        Query(q): Query<BTreeMap<String, String>>,
    ) -> Response {
        let delay = s.lock().unwrap().page_delay;
        tokio::time::sleep(delay).await;
        let (fault, idx) = {
            let mut m = s.lock().unwrap();
            m.data_requests.push(uri.query().unwrap_or("").to_string());
            if header(&headers, "x-app-name").is_empty() {
                m.missing_app_name += 1;
            }
            let fault = if q.contains_key("next") {
                m.next_faults.pop_front().or_else(|| m.faults.pop_front())
            } else {
                m.faults.pop_front()
            };
            (fault, m.data_requests.len() - 1)
        };
        if let Some(r) = apply(fault).await {
            return r;
        }
        let mut m = s.lock().unwrap();
        if m.expire_token_at_request == Some(idx) {
            m.expire_token_at_request = None;
            // Everything issued so far is now expired.
            m.tokens_issued += 1;
        }
        let current = format!("Bearer mati-token-{}", m.tokens_issued);
        if header(&headers, "authorization") != current {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "token expired"})),
            )
                .into_response();
        }
        let (start, end, offset) = match q.get("next") {
            Some(next) => {
                if q.len() > 1 {
                    m.next_with_extras += 1;
                }
                let parts: Vec<i64> = next.split('.').map(|p| p.parse().unwrap()).collect();
                (parts[0], parts[1], parts[2] as usize)
            }
            None => (
                q["start_epoch"].parse::<i64>().unwrap(),
                q["end_epoch"].parse::<i64>().unwrap(),
                0,
            ),
        };
        let mut matching: Vec<&Value> = m
            .indicators
            .iter()
            .filter(|i| {
                let t = last_updated(i);
                t >= start && t <= end
            })
            .collect();
        matching.sort_by_key(|i| last_updated(i));
        let size = if m.page_size == 0 { 1000 } else { m.page_size };
        let page: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(size)
            .map(|v| (*v).clone())
            .collect();
        if page.is_empty() && offset == 0 {
            return StatusCode::NO_CONTENT.into_response();
        }
        let mut body = json!({ "indicators": page });
        if offset + size < matching.len() {
            body["next"] = json!(format!("{start}.{end}.{}", offset + size));
        }
        Json(body).into_response()
    }

    async fn entitlements() -> Json<Value> {
        Json(json!({"entitlements": ["indicators"]}))
    }

    Router::new()
        .route("/token", post(token))
        .route("/v4/indicator", get(indicators))
        .route("/v4/entitlements", get(entitlements))
        .with_state(state)
}

use axum::Json;

// ---------------------------------------------------------------------------------------------
// Entra ID

#[derive(Default)]
pub struct Entra {
    pub requests: usize,
    pub scopes: Vec<String>,
    pub faults: VecDeque<Fault>,
    /// `expires_in` of the tokens issued (3599 when unset).
    pub lifetime_secs: Option<u64>,
    /// When each issued token expires; Sentinel refuses a token past it.
    pub expiry: TokenExpiry,
}

/// Shared by the fake Entra (which issues tokens) and the fakes that check them.
pub type TokenExpiry = Arc<Mutex<BTreeMap<String, Instant>>>;

fn token_expired(expiry: &TokenExpiry, token: &str) -> bool {
    expiry
        .lock()
        .unwrap()
        .get(token)
        .is_some_and(|t| Instant::now() >= *t)
}

pub fn entra_router(state: Shared<Entra>) -> Router {
    async fn token(State(s): State<Shared<Entra>>, uri: Uri, body: String) -> Response {
        let fault = {
            let mut e = s.lock().unwrap();
            e.requests += 1;
            e.faults.pop_front()
        };
        if let Some(r) = apply(fault).await {
            return r;
        }
        let form: BTreeMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(uri.path(), format!("/{TENANT}/oauth2/v2.0/token"));
        if form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
            || form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                    "error_codes": [7000215]
                })),
            )
                .into_response();
        }
        let mut e = s.lock().unwrap();
        e.scopes
            .push(form.get("scope").cloned().unwrap_or_default());
        let n = e.requests;
        let lifetime = e.lifetime_secs.unwrap_or(3599);
        let token = format!("entra-token-{n}");
        e.expiry.lock().unwrap().insert(
            token.clone(),
            Instant::now() + Duration::from_secs(lifetime),
        );
        Json(json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}))
            .into_response()
    }
    Router::new()
        .route(&format!("/{TENANT}/oauth2/v2.0/token"), post(token))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Sentinel

#[derive(Default)]
pub struct Sentinel {
    /// Every object of every accepted request, in order.
    pub received: Vec<Value>,
    /// The latest version of each object, by STIX id (what the workspace holds).
    pub by_id: BTreeMap<String, Value>,
    pub requests: usize,
    pub request_times: Vec<Instant>,
    pub max_batch: usize,
    pub source_systems: Vec<String>,
    pub paths: Vec<String>,
    pub faults: VecDeque<Fault>,
    /// Objects whose `name` is listed here are refused with an `errors[]` entry.
    pub refuse_names: Vec<String>,
    /// Refused like `refuse_names`, once each (a transient record error).
    pub refuse_once: Vec<String>,
    /// The `sourcesystem` each object was uploaded under, by STIX id.
    pub source_of: BTreeMap<String, String>,
    /// Requests refused because their token had expired.
    pub expired_tokens: usize,
    pub expiry: TokenExpiry,
    /// Tokens refused with 401 (for example a token that "expired").
    pub refuse_tokens: Vec<String>,
    pub tokens_seen: Vec<String>,
    /// Enforce Sentinel's limit: more than this many requests in any window answers 429.
    pub rate_limit: Option<(usize, Duration)>,
    pub throttled: usize,
}

pub fn sentinel_router(state: Shared<Sentinel>) -> Router {
    async fn upload(
        State(s): State<Shared<Sentinel>>,
        headers: HeaderMap,
        uri: Uri,
        body: Bytes,
    ) -> Response {
        let fault = {
            let mut st = s.lock().unwrap();
            st.requests += 1;
            let now = Instant::now();
            if let Some((limit, window)) = st.rate_limit {
                let recent = st
                    .request_times
                    .iter()
                    .filter(|t| now.duration_since(**t) < window)
                    .count();
                if recent >= limit {
                    st.throttled += 1;
                    return (
                        StatusCode::TOO_MANY_REQUESTS,
                        Json(json!({"statusCode": 429, "message": "Rate limit is exceeded. Try again in 5 seconds."})),
                    )
                        .into_response();
                }
            }
            st.request_times.push(now);
            st.paths.push(
                uri.path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            );
            st.faults.pop_front()
        };
        if let Some(r) = apply(fault).await {
            return r;
        }
        let path = uri.path();
        let query = uri.query().unwrap_or("");
        let (ws, array) = if let Some(rest) = path.strip_prefix("/workspaces/") {
            let (ws, op) = rest.split_once('/').unwrap_or((rest, ""));
            if op != "threat-intelligence-stix-objects:upload"
                || query != "api-version=2024-02-01-preview"
            {
                return (StatusCode::NOT_FOUND, "no such operation").into_response();
            }
            (ws.to_string(), "stixobjects")
        } else {
            let rest = path.trim_start_matches('/');
            let (ws, op) = rest.split_once('/').unwrap_or((rest, ""));
            if op != "threatintelligence:upload-indicators" || query != "api-version=2022-07-01" {
                return (StatusCode::NOT_FOUND, "no such operation").into_response();
            }
            (ws.to_string(), "value")
        };
        let mut st = s.lock().unwrap();
        let auth = header(&headers, "authorization").to_string();
        st.tokens_seen.push(auth.clone());
        let token = auth.strip_prefix("Bearer ").unwrap_or("");
        if token_expired(&st.expiry, token) {
            st.expired_tokens += 1;
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": {"code": "ExpiredAuthenticationToken", "message": "The access token expiry UTC time is earlier than current UTC time."}})),
            )
                .into_response();
        }
        if !token.starts_with("entra-token-") || st.refuse_tokens.iter().any(|t| t == token) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": {"code": "InvalidAuthenticationToken"}})),
            )
                .into_response();
        }
        if ws != WORKSPACE {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": {"code": "WorkspaceNotFound", "message": format!("Workspace {ws} not found")}})),
            )
                .into_response();
        }
        let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
            return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
        };
        let objects = doc[array].as_array().cloned().unwrap_or_default();
        if objects.len() > 100 {
            return (StatusCode::BAD_REQUEST, "more than 100 objects").into_response();
        }
        st.max_batch = st.max_batch.max(objects.len());
        st.source_systems
            .push(doc["sourcesystem"].as_str().unwrap_or("").to_string());
        let mut errors = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            let name = o["name"].as_str().unwrap_or("");
            if st.refuse_names.iter().any(|n| n == name) {
                errors.push(json!({"recordIndex": i, "errorMessages": [format!("Error for Property=pattern: value {name} is not allowed")]}));
                continue;
            }
            if let Some(at) = st.refuse_once.iter().position(|n| n == name) {
                st.refuse_once.remove(at);
                errors.push(json!({"recordIndex": i, "errorMessages": ["Error for Property=id: the service is busy, try again later"]}));
                continue;
            }
            if array == "value" && o["type"] != "indicator" {
                errors.push(json!({"recordIndex": i, "errorMessages": ["Error for Property=type: must be indicator"]}));
                continue;
            }
            st.received.push(o.clone());
            let id = o["id"].as_str().unwrap().to_string();
            let source = doc["sourcesystem"].as_str().unwrap_or("").to_string();
            st.source_of.insert(id.clone(), source);
            st.by_id.insert(id, o.clone());
        }
        if errors.is_empty() {
            StatusCode::OK.into_response()
        } else {
            Json(json!({ "errors": errors })).into_response()
        }
    }
    Router::new().fallback(post(upload)).with_state(state)
}

// ---------------------------------------------------------------------------------------------
// The management API's clause-based `/query` (2025-07-01-preview), over what the fake
// Sentinel holds: what a reconciliation reads back.

pub const SUBSCRIPTION: &str = "1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
pub const RESOURCE_GROUP: &str = "rg-sentinel";
pub const WORKSPACE_NAME: &str = "law-sentinel";

#[derive(Default)]
pub struct Management {
    /// Objects per page; 0 follows the request's `maxPageSize`.
    pub page_size: usize,
    pub faults: VecDeque<Fault>,
    /// Path and query of every request, in order.
    pub requests: Vec<String>,
    pub bodies: Vec<Value>,
    pub refuse_tokens: Vec<String>,
    pub tokens_seen: Vec<String>,
    /// Answer with a `nextLink` on another host (a hostile or broken answer).
    pub foreign_next_link: bool,
}

fn query_path() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.OperationalInsights/workspaces/{WORKSPACE_NAME}/providers/Microsoft.SecurityInsights/threatIntelligence/main/query"
    )
}

pub fn management_router(state: Shared<Management>, sentinel: Shared<Sentinel>) -> Router {
    async fn query(
        State((m, s)): State<(Shared<Management>, Shared<Sentinel>)>,
        headers: HeaderMap,
        uri: Uri,
        Query(q): Query<BTreeMap<String, String>>,
        body: Bytes,
    ) -> Response {
        let fault = {
            let mut st = m.lock().unwrap();
            st.requests.push(
                uri.path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            );
            st.faults.pop_front()
        };
        if let Some(r) = apply(fault).await {
            return r;
        }
        let auth = header(&headers, "authorization").to_string();
        let token = auth.strip_prefix("Bearer ").unwrap_or("").to_string();
        let expiry = s.lock().unwrap().expiry.clone();
        {
            let mut st = m.lock().unwrap();
            st.tokens_seen.push(token.clone());
            if !token.starts_with("entra-token-")
                || st.refuse_tokens.contains(&token)
                || token_expired(&expiry, &token)
            {
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": {"code": "InvalidAuthenticationToken", "message": "The access token is invalid."}})),
                )
                    .into_response();
            }
        }
        if uri.path() != query_path() {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": {"code": "ResourceNotFound", "message": format!("The Resource under {} was not found.", uri.path())}})),
            )
                .into_response();
        }
        if q.get("api-version").map(String::as_str) != Some("2025-07-01-preview") {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"code": "InvalidApiVersionParameter", "message": "The api-version is invalid."}})),
            )
                .into_response();
        }
        let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
            return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
        };
        let condition = &doc["condition"];
        assert_eq!(condition["stixObjectType"], "indicator", "{doc}");
        let clauses = condition["clauses"]
            .as_array()
            .expect("clauses are required");
        let source: Option<String> = clauses
            .iter()
            .find(|c| c["field"] == "source" && c["operator"] == "Equals")
            .map(|c| c["values"][0].as_str().unwrap().to_string());
        let offset: usize = q.get("$skipToken").map(|t| t.parse().unwrap()).unwrap_or(0);
        let mut st = m.lock().unwrap();
        st.bodies.push(doc.clone());
        let size = match st.page_size {
            0 => doc["maxPageSize"].as_u64().unwrap_or(100) as usize,
            n => n,
        };
        let sentinel = s.lock().unwrap();
        let matching: Vec<(&String, &Value)> = sentinel
            .by_id
            .iter()
            .filter(|(id, o)| {
                o["type"] == "indicator"
                    && source
                        .as_ref()
                        .is_none_or(|src| sentinel.source_of.get(*id) == Some(src))
            })
            .collect();
        let value: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(size)
            .map(|(id, o)| {
                use base64::Engine;
                let src = sentinel.source_of.get(*id).cloned().unwrap_or_default();
                let name = format!(
                    "{}---{id}",
                    base64::engine::general_purpose::STANDARD.encode(&src)
                );
                let mut data = (*o).clone();
                data["extensions"]["sentinel-ext"] = json!({"severity": null});
                json!({
                    "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.OperationalInsights/workspaces/{WORKSPACE_NAME}/providers/Microsoft.SecurityInsights/threatintelligence/{name}"),
                    "name": name,
                    "type": "Microsoft.SecurityInsights/threatintelligence",
                    "kind": "Indicator",
                    "properties": {
                        "data": data,
                        "source": src,
                        "lastUpdateMethod": "Upload API",
                        "lastUpdatedDateTimeUtc": "2026-12-03T12:00:00.0000000"
                    }
                })
            })
            .collect();
        let mut answer = json!({ "value": value });
        if offset + size < matching.len() {
            let host = if st.foreign_next_link {
                "attacker.example".to_string()
            } else {
                // HTTP/2 carries the host in the URI's authority, HTTP/1.1 in `Host`.
                uri.authority()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| header(&headers, "host").to_string())
            };
            answer["nextLink"] = json!(format!(
                "https://{host}{}?api-version=2025-07-01-preview&$skipToken={}",
                uri.path(),
                offset + size
            ));
        }
        Json(answer).into_response()
    }
    Router::new()
        .fallback(post(query))
        .with_state((state, sentinel))
}

// ---------------------------------------------------------------------------------------------
// The three fakes together, and the binary

pub struct World {
    pub tls: Tls,
    pub mandiant: Shared<Mandiant>,
    pub entra: Shared<Entra>,
    pub sentinel: Shared<Sentinel>,
    pub management: Shared<Management>,
    pub mandiant_url: String,
    pub entra_url: String,
    pub sentinel_url: String,
    pub management_url: String,
    pub state_dir: tempfile::TempDir,
}

impl World {
    pub async fn new(indicators: Vec<Value>) -> World {
        let tls = Tls::new().await;
        let mandiant = Arc::new(Mutex::new(Mandiant {
            indicators,
            page_size: 4,
            ..Default::default()
        }));
        let expiry = TokenExpiry::default();
        let entra = Arc::new(Mutex::new(Entra {
            expiry: expiry.clone(),
            ..Default::default()
        }));
        let sentinel = Arc::new(Mutex::new(Sentinel {
            expiry,
            ..Default::default()
        }));
        let management = Arc::new(Mutex::new(Management::default()));
        let mandiant_url = tls.serve(mandiant_router(mandiant.clone())).await;
        let entra_url = tls.serve(entra_router(entra.clone())).await;
        let sentinel_url = tls.serve(sentinel_router(sentinel.clone())).await;
        let management_url = tls
            .serve(management_router(management.clone(), sentinel.clone()))
            .await;
        World {
            tls,
            mandiant,
            entra,
            sentinel,
            management,
            mandiant_url,
            entra_url,
            sentinel_url,
            management_url,
            state_dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Settings that point the binary at the fakes.
    pub fn env(&self) -> BTreeMap<String, String> {
        [
            ("MATI_API_KEY", MATI_KEY),
            ("MATI_API_SECRET", MATI_SECRET),
            ("AZURE_WORKSPACE_ID", WORKSPACE),
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_ID", CLIENT_ID),
            ("AZURE_CLIENT_SECRET", CLIENT_SECRET),
            ("MATI_BASE_URL", &self.mandiant_url),
            ("AZURE_AUTHORITY_HOST", &self.entra_url),
            ("SENTINEL_ENDPOINT", &self.sentinel_url),
            ("STATE_DIR", self.state_dir.path().to_str().unwrap()),
            ("SSL_CERT_FILE", self.tls.ca_file.to_str().unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// `env()` with workspace reconciliation on, pointed at the fake management API.
    pub fn dedupe_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env();
        for (k, v) in [
            ("ENABLE_DEDUPLICATION", "true"),
            ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
            ("AZURE_RESOURCE_GROUP_NAME", RESOURCE_GROUP),
            ("AZURE_WORKSPACE_NAME", WORKSPACE_NAME),
            ("AZURE_RESOURCE_MANAGER_ENDPOINT", &self.management_url),
        ] {
            env.insert(k.into(), v.into());
        }
        env
    }

    /// What the workspace holds and Sentinel still matches (`valid_until` in the future):
    /// the STIX ids of each Mandiant id.
    pub fn live(&self) -> BTreeMap<String, Vec<String>> {
        let now = time::OffsetDateTime::now_utc();
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, o) in &self.sentinel.lock().unwrap().by_id {
            if o["type"] != "indicator" {
                continue;
            }
            let until = o["valid_until"].as_str().map(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .unwrap()
            });
            if until.is_some_and(|t| t <= now) {
                continue;
            }
            let mandiant = o["external_references"][0]["external_id"]
                .as_str()
                .unwrap_or("(not ours)")
                .to_string();
            out.entry(mandiant).or_default().push(id.clone());
        }
        out
    }

    /// The end state every fault must reach: Sentinel matches exactly `want` (none missing,
    /// none extra), with one object per indicator.
    pub fn assert_holds_exactly(&self, want: &BTreeSet<String>) {
        let live = self.live();
        let got: BTreeSet<String> = live.keys().cloned().collect();
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {missing:?}, extra {extra:?}"
        );
        let doubled: Vec<_> = live.iter().filter(|(_, ids)| ids.len() > 1).collect();
        assert!(doubled.is_empty(), "more than one object for {doubled:?}");
    }

    /// The Mandiant ids of the indicators Sentinel received, in order, repeats included.
    pub fn received_ids(&self) -> Vec<String> {
        mandiant_ids(&self.sentinel.lock().unwrap().received)
    }

    /// Takes the state folder's lock as another process would; held until the file drops.
    pub fn hold_state_lock(&self) -> std::fs::File {
        std::fs::create_dir_all(self.state_dir.path()).unwrap();
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.state_dir.path().join("lock"))
            .unwrap();
        lock.try_lock().unwrap();
        lock
    }

    /// The checkpoint the last run wrote.
    pub fn checkpoint(&self) -> Value {
        let bytes = std::fs::read(self.state_dir.path().join("checkpoint.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Writes what Sentinel received to `$STIX_OUT_DIR/<name>.json` for CI's stix2-validator.
    pub fn export_stix(&self, name: &str) {
        let Some(dir) = std::env::var_os("STIX_OUT_DIR") else {
            return;
        };
        std::fs::create_dir_all(&dir).unwrap();
        let objects: Vec<Value> = self
            .sentinel
            .lock()
            .unwrap()
            .by_id
            .values()
            .cloned()
            .collect();
        let bundle = json!({"type": "bundle", "id": "bundle--0b8f6a43-5c1e-4d2a-9f3b-7e6d5c4b3a21", "objects": objects});
        std::fs::write(
            Path::new(&dir).join(format!("{name}.json")),
            serde_json::to_string_pretty(&bundle).unwrap(),
        )
        .unwrap();
    }
}

/// The Mandiant ids (from the external reference) of the STIX indicators among `objects`.
pub fn mandiant_ids(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| o["type"] == "indicator")
        .map(|o| {
            o["external_references"][0]["external_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs the real binary with exactly these settings (the rest of the environment cleared,
/// so nothing from the machine leaks in).
pub async fn run(args: &[&str], env: &BTreeMap<String, String>) -> Output {
    run_in(None, args, env).await
}

/// The binary's command with exactly these settings (and `PATH`).
pub fn command(args: &[&str], env: &BTreeMap<String, String>) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mati-sentinel"));
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(env);
    cmd
}

/// `run` in a working directory of the caller's choice.
pub async fn run_in(cwd: Option<&Path>, args: &[&str], env: &BTreeMap<String, String>) -> Output {
    let mut cmd = command(args, env);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts no secret of the test world appears in a run's output.
pub fn assert_no_secrets(out: &Output) {
    for secret in [MATI_SECRET, CLIENT_SECRET, "mati-token-", "entra-token-"] {
        assert!(
            !out.all().contains(secret),
            "{secret} appeared in the output:\n{}",
            out.all()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The App Service / Functions managed-identity endpoint (plain http on loopback, as the
// Functions host serves it through IDENTITY_ENDPOINT and IDENTITY_HEADER)

pub const IDENTITY_HEADER: &str = "identity-header-H7-do-not-print";

#[derive(Default)]
pub struct ManagedIdentity {
    /// The query of each token request.
    pub queries: Vec<BTreeMap<String, String>>,
    pub bad_header: usize,
}

pub async fn serve_managed_identity(state: Shared<ManagedIdentity>) -> String {
    async fn token(
        State(s): State<Shared<ManagedIdentity>>,
        headers: HeaderMap,
        Query(q): Query<BTreeMap<String, String>>,
    ) -> Response {
        let mut mi = s.lock().unwrap();
        if header(&headers, "x-identity-header") != IDENTITY_HEADER {
            mi.bad_header += 1;
            return (StatusCode::UNAUTHORIZED, "bad identity header").into_response();
        }
        mi.queries.push(q.clone());
        let expires_on = (time::OffsetDateTime::now_utc().unix_timestamp() + 3600).to_string();
        Json(json!({
            "access_token": format!("entra-token-mi-{}", mi.queries.len()),
            "expires_on": expires_on,
            "resource": q.get("resource").cloned().unwrap_or_default(),
            "token_type": "Bearer",
            "client_id": q.get("client_id").cloned().unwrap_or_default(),
        }))
        .into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/msi/token", get(token))
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/msi/token")
}

// ---------------------------------------------------------------------------------------------
// Azurite, the official Blob Storage emulator (installed by `npm install` into node_modules)

pub struct Azurite {
    child: std::process::Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts Azurite's blob service on 127.0.0.1 at `port` (0 picks a free one).
    pub fn start(port: u16) -> Azurite {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("node_modules/.bin/azurite-blob");
        assert!(
            bin.exists(),
            "Azurite is not installed: run `npm install` in the project (bash .ci/run does)"
        );
        let port = if port == 0 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        } else {
            port
        };
        // Azurite writes its debug files to the working directory: keep them out of the tree.
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args([
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--silent",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("Azurite starts");
        let azurite = Azurite {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "Azurite did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        azurite
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Application Insights ingestion (what `opentelemetry-application-insights` posts to /v2/track)

#[derive(Default)]
pub struct Ingestion {
    /// Every envelope received, decoded.
    pub envelopes: Vec<Value>,
    /// Every body as text, for secret scans.
    pub raw: Vec<String>,
}

pub fn ingestion_router(state: Shared<Ingestion>) -> Router {
    async fn track(
        State(s): State<Shared<Ingestion>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let text = if header(&headers, "content-encoding") == "gzip" {
            use std::io::Read;
            let mut out = String::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_string(&mut out)
                .unwrap();
            out
        } else {
            String::from_utf8_lossy(&body).into_owned()
        };
        let mut st = s.lock().unwrap();
        st.raw.push(text.clone());
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let items = match parsed {
            Value::Array(a) => a,
            other => vec![other],
        };
        let n = items.len();
        st.envelopes.extend(items);
        Json(json!({"itemsReceived": n, "itemsAccepted": n, "errors": []})).into_response()
    }
    Router::new()
        .route("/v2/track", post(track))
        .route("/v2.1/track", post(track))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// A feed spread over days, labelled by construction, for the fault and reconciliation tests:
// threat score 95 passes the default policy (80), 30 does not. Indicators sit three hours
// apart over four days, so a cycle walks several windows of several pages.

pub const COUNT: u32 = 32;

pub fn spread_feed() -> (Vec<Value>, BTreeSet<String>) {
    let now = time::OffsetDateTime::now_utc();
    let mut indicators = Vec::new();
    let mut keep = BTreeSet::new();
    for n in 0..COUNT {
        let (kind, value) = if n % 2 == 0 {
            ("ipv4", format!("198.51.100.{n}"))
        } else {
            ("fqdn", format!("host{n}.bad.example"))
        };
        let id = format!("{kind}--00000000-0000-5000-8000-{n:012}");
        let kept = n % 4 != 3;
        let updated = now - time::Duration::hours(i64::from(n) * 3) - time::Duration::minutes(7);
        indicators.push(json!({
            "id": id, "type": kind, "value": value, "mscore": 95, "is_publishable": true,
            "sources": [{"first_seen": "2026-11-01T00:00:00.000+0000", "last_seen": "2026-11-02T00:00:00.000+0000",
                         "osint": false, "category": ["control-server"], "source_name": "Mandiant"}],
            "first_seen": "2026-10-01T00:00:00.000Z",
            "last_seen": "2026-11-30T00:00:00.000Z",
            "last_updated": updated.format(&time::format_description::well_known::Rfc3339).unwrap(),
            "threat_rating": {"confidence_level": "high", "confidence_score": 90, "severity_level": "high",
                              "severity_reason": ["attributed"], "threat_score": if kept { 95 } else { 30 }},
        }));
        if kept {
            keep.insert(id);
        }
    }
    (indicators, keep)
}

/// A world with the feed, and the ids the default policy keeps.
pub async fn spread_world() -> (World, BTreeSet<String>) {
    let (indicators, keep) = spread_feed();
    let w = World::new(indicators).await;
    (w, keep)
}

/// Settings for the fault tests: a five-day look-back (five windows) and short timeouts.
pub fn quick_env(w: &World) -> BTreeMap<String, String> {
    let mut env = w.env();
    env.insert("INITIAL_LOOKBACK".into(), "5".into());
    env.insert("HTTP_TIMEOUT_SECONDS".into(), "5".into());
    env
}

pub fn report(out: &Output) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}", out.all()))
}

/// Runs `sync --json` and expects a completed cycle.
pub async fn completes(env: &BTreeMap<String, String>) -> Value {
    let out = run(&["sync", "--json"], env).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_no_secrets(&out);
    let r = report(&out);
    assert_eq!(r["stop_reason"], "completed", "{r}");
    r
}

/// Runs `sync --json` and expects a failed cycle whose message contains `needle`.
pub async fn fails_with(env: &BTreeMap<String, String>, needle: &str) -> Value {
    let out = run(&["sync", "--json"], env).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert_no_secrets(&out);
    assert!(
        out.all().contains(needle),
        "no {needle:?} in:\n{}",
        out.all()
    );
    report(&out)
}

/// Every indicator Sentinel received was received once (no re-send beyond what a fault
/// forced is checked per test; this checks the end state only).
pub fn sent_once(w: &World) -> bool {
    let ids = w.received_ids();
    ids.len() == ids.iter().collect::<BTreeSet<_>>().len()
}
