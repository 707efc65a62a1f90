//! The Mandiant Threat Intelligence API v4: its wire types and the client.
//!
//! This is the only module that knows Mandiant's JSON. Indicators are decoded one by one from
//! a page, so one malformed indicator is counted and skipped instead of failing the page.
//! Invariant: a failed fetch is an error, never "no more data"; the end of data is a page
//! without `next`, an empty list, or a 204.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::config::{MatiConfig, Secret};
use crate::retry::{Deadline, OutOfTime, Outcome, RetryPolicy, classify};

/// Sent on every request; Mandiant asks integrations to identify themselves.
pub const APP_NAME: &str = concat!("mati-sentinel-v", env!("CARGO_PKG_VERSION"));

// ---------------------------------------------------------------------------------------------
// Wire types

/// One indicator as Mandiant sends it. Everything but `id`, `type` and `value` is optional;
/// unknown fields are ignored.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MatiIndicator {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    #[serde(default, deserialize_with = "lenient_score")]
    pub mscore: Option<u8>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub sources: Vec<MatiSource>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub category: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub associated_hashes: Vec<MatiHash>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub attributed_associations: Vec<MatiAssociation>,
    #[serde(default)]
    pub threat_rating: Option<MatiThreatRating>,
    #[serde(default)]
    pub first_seen: Option<String>,
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub last_updated: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MatiSource {
    #[serde(default)]
    pub osint: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub category: Vec<String>,
    #[serde(default)]
    pub source_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MatiHash {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MatiAssociation {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MatiThreatRating {
    #[serde(default, deserialize_with = "lenient_score")]
    pub threat_score: Option<u8>,
    #[serde(default)]
    pub severity_level: Option<String>,
}

/// A score is an integer 0–100; anything else (null, a string, a float, out of range) counts
/// as missing, which the policy treats as 0.
fn lenient_score<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| v.as_u64())
        .filter(|n| *n <= 100)
        .map(|n| n as u8))
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A page. The indicators stay undecoded text inside the page's own buffer (one allocation
/// per page, not one per indicator), so each can fail to decode on its own.
#[derive(Debug)]
pub struct MatiPage {
    text: String,
    spans: Vec<std::ops::Range<usize>>,
    pub next: Option<String>,
}

impl MatiPage {
    pub fn empty() -> Self {
        MatiPage {
            text: String::new(),
            spans: Vec::new(),
            next: None,
        }
    }

    /// Parses a page body: `{"indicators": [...], "next": "..."}`.
    pub fn parse(body: Vec<u8>) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Borrowed<'a> {
            #[serde(borrow, default)]
            indicators: Vec<&'a RawValue>,
            #[serde(default)]
            next: Option<String>,
        }
        let text = String::from_utf8(body).map_err(|e| {
            <serde_json::Error as serde::de::Error>::custom(format!("the page is not UTF-8: {e}"))
        })?;
        let (spans, next) = {
            let page: Borrowed<'_> = serde_json::from_str(&text)?;
            let base = text.as_ptr() as usize;
            let spans = page
                .indicators
                .iter()
                .map(|r| {
                    let start = r.get().as_ptr() as usize - base;
                    start..start + r.get().len()
                })
                .collect();
            (spans, page.next)
        };
        Ok(MatiPage { text, spans, next })
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The raw JSON of each indicator.
    pub fn indicators(&self) -> impl ExactSizeIterator<Item = &str> {
        self.spans.iter().map(|r| &self.text[r.clone()])
    }

    /// The cursor of the following page, if there is one.
    pub fn next_cursor(&self) -> Option<&str> {
        if self.is_empty() {
            return None;
        }
        self.next.as_deref().filter(|n| !n.trim().is_empty())
    }
}

/// Decodes one raw indicator; `None` when it is malformed.
pub fn decode_indicator(raw: &str) -> Option<MatiIndicator> {
    serde_json::from_str(raw).ok()
}

/// Reads a saved `/v4/indicator` response, or a JSON array of them, one page at a time, so
/// a large file is never held whole: only the page being read is in memory.
pub struct PageReader<R> {
    input: std::io::BufReader<R>,
    /// Bytes consumed so far, for error messages.
    offset: u64,
    state: ReaderState,
    buf: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReaderState {
    Start,
    InArray,
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum PageReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a /v4/indicator response or an array of them (at byte {offset}): {reason}")]
    Format { offset: u64, reason: String },
}

impl<R: std::io::Read> PageReader<R> {
    pub fn new(input: R) -> Self {
        PageReader {
            input: std::io::BufReader::with_capacity(1 << 20, input),
            offset: 0,
            state: ReaderState::Start,
            buf: Vec::new(),
        }
    }

    fn format(&self, reason: impl Into<String>) -> PageReadError {
        PageReadError::Format {
            offset: self.offset,
            reason: reason.into(),
        }
    }

    fn peek(&mut self) -> Result<Option<u8>, PageReadError> {
        use std::io::BufRead;
        loop {
            let buf = self.input.fill_buf()?;
            let Some(pos) = buf.iter().position(|b| !b.is_ascii_whitespace()) else {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = buf.len();
                self.input.consume(n);
                self.offset += n as u64;
                continue;
            };
            let b = buf[pos];
            self.input.consume(pos);
            self.offset += pos as u64;
            return Ok(Some(b));
        }
    }

    fn bump(&mut self) {
        use std::io::BufRead;
        self.input.consume(1);
        self.offset += 1;
    }

    /// Copies one JSON object (from its `{` to the matching `}`) into `self.buf`, tracking
    /// strings and escapes so braces inside values do not count.
    fn read_object(&mut self) -> Result<(), PageReadError> {
        use std::io::BufRead;
        self.buf.clear();
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        loop {
            let chunk = self.input.fill_buf()?;
            if chunk.is_empty() {
                return Err(self.format("the file ends inside a page"));
            }
            let mut end = None;
            let mut i = 0;
            while i < chunk.len() {
                let b = chunk[i];
                if in_string {
                    if escaped {
                        escaped = false;
                    } else {
                        // Most bytes are inside strings: jump to the next quote or backslash.
                        match chunk[i..].iter().position(|&c| c == b'"' || c == b'\\') {
                            None => {
                                i = chunk.len();
                                continue;
                            }
                            Some(p) => {
                                i += p;
                                if chunk[i] == b'"' {
                                    in_string = false;
                                } else {
                                    escaped = true;
                                }
                            }
                        }
                    }
                    i += 1;
                    continue;
                }
                i += 1;
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let take = end.unwrap_or(chunk.len());
            self.buf.extend_from_slice(&chunk[..take]);
            self.input.consume(take);
            self.offset += take as u64;
            if end.is_some() {
                return Ok(());
            }
        }
    }

    /// The next page, or `None` at the end of the file.
    pub fn next_page(&mut self) -> Result<Option<MatiPage>, PageReadError> {
        loop {
            match (self.state, self.peek()?) {
                (ReaderState::Done, None) => return Ok(None),
                (ReaderState::Done, Some(_)) => {
                    return Err(self.format("unexpected data after the end"));
                }
                (ReaderState::Start, Some(b'[')) => {
                    self.bump();
                    self.state = ReaderState::InArray;
                }
                (ReaderState::Start, Some(b'{')) => {
                    self.state = ReaderState::Done;
                    break;
                }
                (ReaderState::InArray, Some(b',')) => self.bump(),
                (ReaderState::InArray, Some(b']')) => {
                    self.bump();
                    self.state = ReaderState::Done;
                }
                (ReaderState::InArray, Some(b'{')) => break,
                (_, None) => return Err(self.format("the file ends early")),
                (_, Some(b)) => {
                    return Err(
                        self.format(format!("expected a page object, found {:?}", b as char))
                    );
                }
            }
        }
        self.read_object()?;
        let page = MatiPage::parse(std::mem::take(&mut self.buf))
            .map_err(|e| self.format(format!("a page does not parse: {e}")))?;
        Ok(Some(page))
    }
}

/// All pages of a saved response held in memory (small inputs and tests).
pub fn pages_from_json(bytes: &[u8]) -> Result<Vec<MatiPage>, PageReadError> {
    let mut reader = PageReader::new(bytes);
    let mut pages = Vec::new();
    while let Some(p) = reader.next_page()? {
        pages.push(p);
    }
    Ok(pages)
}

/// Parses Mandiant's timestamps: `2023-01-26T01:34:25.607Z`, `2022-12-24T13:09:51.000+0000`
/// and `2014-09-01T21:39:23Z` (with or without a fraction, `Z`, `+HHMM` or `+HH:MM`).
pub fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    // Insert the colon into a `+HHMM` offset, then try again.
    let b = s.as_bytes();
    if b.len() > 5 {
        let (head, tail) = s.split_at(s.len() - 5);
        let t = tail.as_bytes();
        if (t[0] == b'+' || t[0] == b'-') && t[1..].iter().all(u8::is_ascii_digit) {
            let fixed = format!("{head}{}:{}", &tail[..3], &tail[3..]);
            return OffsetDateTime::parse(&fixed, &Rfc3339).ok();
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Client

#[derive(Debug, thiserror::Error)]
pub enum MatiError {
    #[error(
        "Mandiant refused the API key (HTTP {status}): check MATI_API_KEY and MATI_API_SECRET, and that the key is entitled to the indicator API"
    )]
    Auth { status: u16 },
    #[error("Mandiant answered HTTP {status} to {what}: {excerpt}")]
    Status {
        what: &'static str,
        status: u16,
        excerpt: String,
    },
    #[error(transparent)]
    OutOfTime(#[from] OutOfTime),
    #[error("Mandiant {what} failed after {attempts} attempts: {last}")]
    GaveUp {
        what: &'static str,
        attempts: u32,
        last: String,
    },
}

/// Counts that the cycle report shows.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
}

impl ClientStats {
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }
}

struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

/// What the first request of a window asks for.
#[derive(Clone, Copy, Debug)]
pub struct WindowQuery {
    pub start_epoch: i64,
    pub end_epoch: i64,
    pub min_confidence: u8,
    pub exclude_osint: bool,
}

pub struct MatiClient {
    http: reqwest::Client,
    config: MatiConfig,
    retry: RetryPolicy,
    token: Mutex<Option<CachedToken>>,
    pub stats: Arc<ClientStats>,
    /// Retries never wait past the running cycle's deadline.
    pub deadline: Deadline,
}

enum Answer {
    Body(Vec<u8>),
    NoContent,
}

impl MatiClient {
    pub fn new(http: reqwest::Client, config: MatiConfig, retry: RetryPolicy) -> Self {
        MatiClient {
            http,
            config,
            retry,
            token: Mutex::new(None),
            stats: Arc::new(ClientStats::default()),
            deadline: Deadline::default(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}{}",
            self.config.base_url.as_str().trim_end_matches('/'),
            path
        )
    }

    /// A bearer token, from the cache while it has more than five minutes to live.
    async fn token(&self, force: bool) -> Result<Secret, MatiError> {
        let mut guard = self.token.lock().await;
        if !force
            && let Some(t) = guard.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let url = self.url("/token");
        let body = self
            .send_with_retries("token request", || {
                self.http
                    .post(&url)
                    .basic_auth(
                        self.config.api_key.expose(),
                        Some(self.config.api_secret.expose()),
                    )
                    .header("Accept", "application/json")
                    .header("X-App-Name", APP_NAME)
                    .form(&[("grant_type", "client_credentials")])
            })
            .await?;
        let Answer::Body(body) = body else {
            return Err(MatiError::Status {
                what: "token request",
                status: 204,
                excerpt: "no token in the answer".into(),
            });
        };
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| MatiError::Status {
                what: "token request",
                status: 200,
                excerpt: format!("answer is not a token: {e}"),
            })?;
        // `expires_in` is the token's remaining life in seconds (at most 12 hours); refresh
        // five minutes early so a page request never carries a token about to lapse.
        let life = parsed.expires_in.unwrap_or(3600).min(43_200);
        let margin = if life > 600 { 300 } else { life / 2 };
        let value = Secret::new(parsed.access_token);
        *guard = Some(CachedToken {
            value: value.clone(),
            refresh_at: Instant::now() + Duration::from_secs(life - margin),
        });
        Ok(value)
    }

    /// Sends a request until it succeeds, retrying transient failures within the policy.
    /// 401 and 403 are returned as `Auth` for the caller to refresh the token.
    async fn send_with_retries<F>(&self, what: &'static str, build: F) -> Result<Answer, MatiError>
    where
        F: Fn() -> reqwest::RequestBuilder,
    {
        let mut last = String::new();
        for attempt in 1..=self.retry.max_attempts {
            if attempt > 1 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            let wait = match build().timeout(self.retry.request_timeout).send().await {
                Err(e) => {
                    last = transport_error(&e);
                    self.retry.backoff(attempt)
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let is_json = resp
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_none_or(|v| v.contains("json"));
                    let body = match resp.bytes().await {
                        Ok(b) => b,
                        Err(e) => {
                            last = transport_error(&e);
                            self.deadline
                                .sleep(self.retry.backoff(attempt), &last)
                                .await?;
                            continue;
                        }
                    };
                    let outcome = classify(
                        status,
                        retry_after.as_deref(),
                        &body,
                        OffsetDateTime::now_utc(),
                    );
                    match outcome {
                        Outcome::Success if status == 204 => return Ok(Answer::NoContent),
                        // A proxy's HTML page with a 200 is not an answer from the API.
                        Outcome::Success if is_json => return Ok(Answer::Body(body.to_vec())),
                        Outcome::Success => {
                            last =
                                format!("HTTP {status} with a non-JSON body: {}", excerpt(&body));
                            self.retry.backoff(attempt)
                        }
                        Outcome::Throttled(asked) => {
                            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                            last = format!("HTTP 429: {}", excerpt(&body));
                            self.retry.throttle_wait(asked, attempt)
                        }
                        Outcome::Transient => {
                            last = format!("HTTP {status}: {}", excerpt(&body));
                            self.retry.backoff(attempt)
                        }
                        Outcome::Unauthorized => return Err(MatiError::Auth { status }),
                        Outcome::Fatal if status == 403 => return Err(MatiError::Auth { status }),
                        Outcome::Fatal => {
                            return Err(MatiError::Status {
                                what,
                                status,
                                excerpt: excerpt(&body),
                            });
                        }
                    }
                }
            };
            if attempt < self.retry.max_attempts {
                tracing::warn!(what, attempt, wait_ms = wait.as_millis() as u64, error = %last, "Mandiant request failed; retrying");
                self.deadline.sleep(wait, &last).await?;
            }
        }
        Err(MatiError::GaveUp {
            what,
            attempts: self.retry.max_attempts,
            last,
        })
    }

    /// A GET with a bearer token; on 401/403 the token is refreshed once and the request
    /// resent. A body that is not a page is retried like a transient failure, since a
    /// truncated answer is the usual cause.
    async fn get_page(
        &self,
        what: &'static str,
        query: &[(&str, String)],
    ) -> Result<MatiPage, MatiError> {
        let url = self.url("/v4/indicator");
        let mut last = String::new();
        for attempt in 1..=self.retry.max_attempts {
            let mut refreshed = false;
            let answer = loop {
                let token = self.token(refreshed).await?;
                let result = self
                    .send_with_retries(what, || {
                        self.http
                            .get(&url)
                            .query(query)
                            .bearer_auth(token.expose())
                            .header("Accept", "application/json")
                            .header("X-App-Name", APP_NAME)
                    })
                    .await;
                match result {
                    Err(MatiError::Auth { .. }) if !refreshed => {
                        tracing::info!("Mandiant refused the token; getting a new one");
                        refreshed = true;
                    }
                    other => break other?,
                }
            };
            let body = match answer {
                Answer::NoContent => return Ok(MatiPage::empty()),
                Answer::Body(b) => b,
            };
            match MatiPage::parse(body) {
                Ok(page) => return Ok(page),
                Err(e) => {
                    last = format!("the answer is not a valid page ({e})");
                    if attempt < self.retry.max_attempts {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(what, attempt, error = %last, "Mandiant page unreadable; retrying");
                        self.deadline
                            .sleep(self.retry.backoff(attempt), &last)
                            .await?;
                    }
                }
            }
        }
        Err(MatiError::GaveUp {
            what,
            attempts: self.retry.max_attempts,
            last,
        })
    }

    /// The first page of a time window.
    pub async fn first_page(&self, q: &WindowQuery) -> Result<MatiPage, MatiError> {
        use tracing::Instrument;
        let query = [
            ("start_epoch", q.start_epoch.to_string()),
            ("end_epoch", q.end_epoch.to_string()),
            ("limit", "1000".to_string()),
            ("gte_mscore", q.min_confidence.to_string()),
            ("exclude_osint", q.exclude_osint.to_string()),
            ("include_threat_rating", "true".to_string()),
            ("include_category", "true".to_string()),
            ("include_misp", "false".to_string()),
        ];
        self.get_page("indicator page", &query)
            .instrument(tracing::info_span!("page_fetch", first = true))
            .await
    }

    /// A following page: Mandiant wants `next` as the only parameter.
    pub async fn next_page(&self, next: &str) -> Result<MatiPage, MatiError> {
        use tracing::Instrument;
        self.get_page("indicator page (next)", &[("next", next.to_string())])
            .instrument(tracing::info_span!("page_fetch", first = false))
            .await
    }

    /// For `check`: a token, and the key's entitlements.
    pub async fn check(&self) -> Result<usize, MatiError> {
        let token = self.token(true).await?;
        let url = self.url("/v4/entitlements");
        let answer = self
            .send_with_retries("entitlements request", || {
                self.http
                    .get(&url)
                    .bearer_auth(token.expose())
                    .header("Accept", "application/json")
                    .header("X-App-Name", APP_NAME)
            })
            .await?;
        #[derive(Deserialize)]
        struct Entitlements {
            #[serde(default)]
            entitlements: Vec<serde_json::Value>,
        }
        match answer {
            Answer::Body(b) => Ok(serde_json::from_slice::<Entitlements>(&b)
                .map(|e| e.entitlements.len())
                .unwrap_or(0)),
            Answer::NoContent => Ok(0),
        }
    }
}

/// A transport error without its URL: a `next` cursor in a URL is long and useless in a log.
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the answer was cut off"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// The start of a body, for error messages; never more than 200 characters.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    let mut out: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn the_three_timestamp_forms_parse() {
        assert_eq!(
            parse_timestamp("2023-01-26T01:34:25.607Z"),
            Some(datetime!(2023-01-26 01:34:25.607 UTC))
        );
        assert_eq!(
            parse_timestamp("2022-12-24T13:09:51.000+0000"),
            Some(datetime!(2022-12-24 13:09:51 UTC))
        );
        assert_eq!(
            parse_timestamp("2014-09-01T21:39:23Z"),
            Some(datetime!(2014-09-01 21:39:23 UTC))
        );
        assert_eq!(
            parse_timestamp("2022-12-24T15:09:51+0200"),
            Some(datetime!(2022-12-24 13:09:51 UTC))
        );
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp(""), None);
    }

    #[test]
    fn lenient_fields_decode() {
        let raw = r#"{"id":"ipv4--1","type":"ipv4","value":"1.2.3.4","mscore":"high",
            "sources":null,"threat_rating":{"threat_score":101,"severity_level":"high"},"extra":1}"#;
        let i: MatiIndicator = serde_json::from_str(raw).unwrap();
        assert_eq!(i.mscore, None);
        assert!(i.sources.is_empty());
        assert_eq!(i.threat_rating.unwrap().threat_score, None);
    }

    #[test]
    fn malformed_indicators_fail_alone() {
        let page = MatiPage::parse(
            r#"{"indicators":[{"id":"ipv4--1","type":"ipv4","value":"1.2.3.4"},{"id":5},"x"],"next":"abc"}"#
                .into(),
        )
        .unwrap();
        let decoded: Vec<bool> = page
            .indicators()
            .map(|r| decode_indicator(r).is_some())
            .collect();
        assert_eq!(decoded, vec![true, false, false]);
        assert_eq!(page.next_cursor(), Some("abc"));
    }

    #[test]
    fn the_end_of_data_is_no_next_or_an_empty_list() {
        let last = MatiPage::parse(r#"{"indicators":[{"a":1}]}"#.into()).unwrap();
        assert_eq!(last.next_cursor(), None);
        let empty = MatiPage::parse(r#"{"indicators":[],"next":"x"}"#.into()).unwrap();
        assert_eq!(empty.next_cursor(), None);
        let blank = MatiPage::parse(r#"{"indicators":[{"a":1}],"next":""}"#.into()).unwrap();
        assert_eq!(blank.next_cursor(), None);
    }

    #[test]
    fn saved_files_hold_one_page_or_many() {
        assert_eq!(pages_from_json(br#"{"indicators":[]}"#).unwrap().len(), 1);
        assert_eq!(
            pages_from_json(br#"[{"indicators":[]},{"indicators":[]}]"#)
                .unwrap()
                .len(),
            2
        );
        assert!(pages_from_json(b"[1,2]").is_err());
        assert!(
            pages_from_json(br#"[{"indicators":[]}"#).is_err(),
            "unterminated array"
        );
        assert!(
            pages_from_json(br#"{"indicators":[{"id":"a"#).is_err(),
            "truncated page"
        );
        assert!(
            pages_from_json(br#"{"indicators":[]} {}"#).is_err(),
            "trailing data"
        );
        // Braces and brackets inside strings do not end a page.
        let tricky =
            br#"[ {"indicators":[{"id":"u","type":"url","value":"http://x/{]}\"[{"}],"next":"n"} ,
            {"indicators":[]} ]"#;
        let pages = pages_from_json(tricky).unwrap();
        assert_eq!(pages.len(), 2);
        let i = decode_indicator(pages[0].indicators().next().unwrap()).unwrap();
        assert_eq!(i.value, "http://x/{]}\"[{");
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        let long = "x".repeat(500);
        assert_eq!(excerpt(long.as_bytes()).chars().count(), 201);
        assert_eq!(excerpt(b"a\nb"), "a b");
        assert_eq!(excerpt(b""), "(empty body)");
    }
}
