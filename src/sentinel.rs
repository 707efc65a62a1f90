//! The Sentinel threat-intelligence upload APIs: Entra tokens, request bodies, answers.
//!
//! The only module that writes Sentinel's JSON. One call uploads one batch (at most 100
//! objects), passing through the process-wide limiter before every HTTP request, retries
//! included. Invariant: a batch is either answered (each object accepted or refused by
//! Sentinel) or the call fails; nothing is dropped on a retry path.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId,
};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::config::{SentinelAuth, SentinelConfig, UploadApi};
use crate::mati::{ClientStats, excerpt};
use crate::rate_limit::SlidingWindow;
use crate::retry::{Deadline, OutOfTime, Outcome, RetryPolicy, classify};

/// Sentinel takes at most 100 objects a request.
pub const MAX_BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error("could not get an Entra token for Sentinel ({who}): {reason}")]
    Credential { who: String, reason: String },
    #[error(
        "Sentinel refused the token twice (HTTP 401): check that {who} belongs to the workspace's tenant and that AZURE_CLOUD matches it"
    )]
    Unauthorized { who: String },
    #[error(
        "Sentinel denied access (HTTP 403): grant {who} the Microsoft Sentinel Contributor role on the workspace {workspace} (AZURE_WORKSPACE_ID); new role assignments can take a few minutes to apply. Sentinel said: {excerpt}"
    )]
    Forbidden {
        who: String,
        workspace: String,
        excerpt: String,
    },
    #[error(
        "Sentinel does not know the workspace {workspace} (HTTP 404): AZURE_WORKSPACE_ID must be the Log Analytics workspace ID (a GUID on the workspace's Overview page) of a workspace with Microsoft Sentinel, in the cloud AZURE_CLOUD names. Sentinel said: {excerpt}"
    )]
    WorkspaceNotFound { workspace: String, excerpt: String },
    #[error(
        "Sentinel rejected the request (HTTP {status}): {excerpt}. Check AZURE_WORKSPACE_ID and SENTINEL_UPLOAD_API"
    )]
    Rejected { status: u16, excerpt: String },
    #[error(transparent)]
    OutOfTime(#[from] OutOfTime),
    #[error("Sentinel upload failed after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// Builds the Entra credential the settings ask for. Both credentials go through our HTTP
/// client, so they trust the same roots (the OS store, `SSL_CERT_FILE`).
pub fn build_credential(
    c: &SentinelConfig,
    http: &reqwest::Client,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = c.authority_host.as_str().trim_end_matches('/').to_string();
    let client_options = ClientOptions {
        transport: Some(Transport::new(Arc::new(http.clone()))),
        cloud: Some(Arc::new(cloud.into())),
        // The SDK's default keeps asking a failing token endpoint for a minute, outside the
        // cycle's deadline; a few quick retries cover a blip, and a longer outage fails the
        // cycle (nothing recorded, so the next tick sends everything).
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(500),
            max_retries: 3,
            max_total_elapsed: azure_core::time::Duration::seconds(15),
            max_delay: azure_core::time::Duration::seconds(4),
        }),
        ..Default::default()
    };
    match &c.auth {
        SentinelAuth::ClientSecret {
            tenant_id,
            client_id,
            secret,
        } => Ok(ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            azure_core::credentials::Secret::new(secret.expose().to_string()),
            Some(ClientSecretCredentialOptions { client_options }),
        )?),
        SentinelAuth::ManagedIdentity { client_id } => Ok(ManagedIdentityCredential::new(Some(
            ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                client_options,
            },
        ))?),
    }
}

/// Who asks for tokens, for messages: never the secret.
fn identity_name(c: &SentinelConfig) -> String {
    match &c.auth {
        SentinelAuth::ClientSecret {
            tenant_id,
            client_id,
            ..
        } => format!(
            "the app registration AZURE_CLIENT_ID={client_id} in AZURE_TENANT_ID={tenant_id} (check AZURE_CLIENT_SECRET)"
        ),
        SentinelAuth::ManagedIdentity { client_id: Some(id) } => {
            format!("the user-assigned managed identity MANAGED_IDENTITY_CLIENT_ID={id}")
        }
        SentinelAuth::ManagedIdentity { client_id: None } => {
            "the system-assigned managed identity (set AZURE_CLIENT_SECRET to use an app registration)".to_string()
        }
    }
}

/// What Sentinel said about one batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Indexes into the batch of the objects Sentinel accepted.
    pub accepted: Vec<usize>,
    /// Indexes and Sentinel's messages for the objects it refused.
    pub refused: Vec<(usize, String)>,
}

#[derive(Deserialize)]
struct ErrorList {
    #[serde(default)]
    errors: Vec<RecordError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordError {
    record_index: usize,
    #[serde(default)]
    error_messages: Vec<String>,
}

/// Reads a 200 (or a 400 carrying `errors`): listed records are refused, the rest accepted.
/// A 200 with an empty or non-JSON body means every object was accepted.
fn read_answer(body: &[u8], len: usize) -> Option<BatchOutcome> {
    let list = serde_json::from_slice::<ErrorList>(body).ok()?;
    let mut refused: Vec<(usize, String)> = list
        .errors
        .into_iter()
        .filter(|e| e.record_index < len)
        .map(|e| (e.record_index, e.error_messages.join("; ")))
        .collect();
    refused.sort_by_key(|(i, _)| *i);
    refused.dedup_by_key(|(i, _)| *i);
    let accepted = (0..len)
        .filter(|i| refused.binary_search_by_key(i, |(j, _)| *j).is_err())
        .collect();
    Some(BatchOutcome { accepted, refused })
}

pub struct SentinelUploader {
    http: reqwest::Client,
    url: String,
    source_system: String,
    api: UploadApi,
    workspace: String,
    who: String,
    scope: String,
    /// Rebuilt after a 401: the credential's own cache would hand back the refused token.
    credential: Mutex<Arc<dyn TokenCredential>>,
    config: SentinelConfig,
    limiter: Arc<SlidingWindow>,
    retry: RetryPolicy,
    pub stats: Arc<ClientStats>,
    /// Retries never wait past the running cycle's deadline.
    pub deadline: Deadline,
}

impl SentinelUploader {
    pub fn new(
        http: reqwest::Client,
        config: &SentinelConfig,
        limiter: Arc<SlidingWindow>,
        retry: RetryPolicy,
    ) -> Result<Self, SentinelError> {
        let who = identity_name(config);
        let credential =
            build_credential(config, &http).map_err(|e| SentinelError::Credential {
                who: who.clone(),
                reason: e.to_string(),
            })?;
        let base = config.endpoint.as_str().trim_end_matches('/');
        let ws = &config.workspace_id;
        let url = match config.api {
            UploadApi::StixObjects => format!(
                "{base}/workspaces/{ws}/threat-intelligence-stix-objects:upload?api-version=2024-02-01-preview"
            ),
            UploadApi::UploadIndicators => {
                format!("{base}/{ws}/threatintelligence:upload-indicators?api-version=2022-07-01")
            }
        };
        Ok(SentinelUploader {
            http,
            url,
            source_system: config.source_system.clone(),
            api: config.api,
            workspace: config.workspace_id.clone(),
            who,
            scope: config.token_scope.clone(),
            credential: Mutex::new(credential),
            config: config.clone(),
            limiter,
            retry,
            stats: Arc::new(ClientStats::default()),
            deadline: Deadline::default(),
        })
    }

    pub fn api(&self) -> UploadApi {
        self.api
    }

    pub fn source_system(&self) -> &str {
        &self.source_system
    }

    /// Who asks for tokens, for messages (never a secret).
    pub fn who(&self) -> &str {
        &self.who
    }

    /// The process-wide limiter, for a progress display (is anyone waiting on it?).
    pub fn limiter(&self) -> Arc<SlidingWindow> {
        self.limiter.clone()
    }

    /// A bearer token; `fresh` rebuilds the credential so its cache cannot return the
    /// token Sentinel just refused.
    pub async fn token(&self, fresh: bool) -> Result<String, SentinelError> {
        let mut cred = self.credential.lock().await;
        if fresh {
            *cred = build_credential(&self.config, &self.http).map_err(|e| {
                SentinelError::Credential {
                    who: self.who.clone(),
                    reason: e.to_string(),
                }
            })?;
        }
        let token = cred
            .get_token(&[self.scope.as_str()], None)
            .await
            .map_err(|e| SentinelError::Credential {
                who: self.who.clone(),
                reason: credential_reason(&e),
            })?;
        Ok(token.token.secret().to_string())
    }

    fn body(&self, objects: &[String]) -> String {
        let array = match self.api {
            UploadApi::StixObjects => "stixobjects",
            UploadApi::UploadIndicators => "value",
        };
        let mut body = String::with_capacity(64 + objects.iter().map(String::len).sum::<usize>());
        body.push_str("{\"sourcesystem\":");
        body.push_str(&serde_json::to_string(&self.source_system).expect("a string serialises"));
        body.push_str(",\"");
        body.push_str(array);
        body.push_str("\":[");
        for (i, o) in objects.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(o);
        }
        body.push_str("]}");
        body
    }

    /// Uploads one batch of serialised STIX objects (at most [`MAX_BATCH`]).
    pub async fn upload(&self, objects: &[String]) -> Result<BatchOutcome, SentinelError> {
        assert!(objects.len() <= MAX_BATCH, "batches are cut by the caller");
        if objects.is_empty() {
            return Ok(BatchOutcome::default());
        }
        let body = self.body(objects);
        let post = Post {
            http: &self.http,
            url: &self.url,
            body: &body,
            retry: &self.retry,
            deadline: &self.deadline,
            stats: &self.stats,
            limiter: Some(&self.limiter),
            what: "Sentinel upload failed; resending the same batch",
        };
        // A 200 with an empty or non-JSON body means every object was accepted.
        let posted = post
            .send(self, |b| {
                Some(read_answer(b, objects.len()).unwrap_or(BatchOutcome {
                    accepted: (0..objects.len()).collect(),
                    refused: Vec::new(),
                }))
            })
            .await?;
        match posted {
            Posted::Ok(outcome) => Ok(outcome),
            Posted::Unauthorized => Err(SentinelError::Unauthorized {
                who: self.who.clone(),
            }),
            Posted::GaveUp { last } => Err(SentinelError::GaveUp {
                attempts: self.retry.max_attempts,
                last,
            }),
            Posted::Fatal { status, body } => Err(match status {
                400 => match read_answer(&body, objects.len()) {
                    Some(o) if !o.refused.is_empty() => return Ok(o),
                    _ => SentinelError::Rejected {
                        status,
                        excerpt: excerpt(&body),
                    },
                },
                403 => SentinelError::Forbidden {
                    who: self.who.clone(),
                    workspace: self.workspace.clone(),
                    excerpt: excerpt(&body),
                },
                404 => SentinelError::WorkspaceNotFound {
                    workspace: self.workspace.clone(),
                    excerpt: excerpt(&body),
                },
                _ => SentinelError::Rejected {
                    status,
                    excerpt: excerpt(&body),
                },
            }),
        }
    }
}

/// What came of a POST to an Azure API after the retries.
pub(crate) enum Posted<T> {
    /// 2xx with a body `parse` took.
    Ok(T),
    /// An answer resending will not change (4xx other than 401 and 429, 501…).
    Fatal { status: u16, body: Vec<u8> },
    /// The token was refused twice.
    Unauthorized,
    /// Every attempt failed; `last` says how the last one did.
    GaveUp { last: String },
}

/// A JSON POST with a bearer token from the Sentinel credential, under the product's retry
/// rules: 429 waits what was asked, 5xx, timeouts, cut-off answers and bodies `parse`
/// refuses back off, a 401 gets a fresh token once, and no wait passes the deadline. Shared
/// by the upload APIs and the management API, which take the same token.
pub(crate) struct Post<'a> {
    pub http: &'a reqwest::Client,
    pub url: &'a str,
    pub body: &'a str,
    pub retry: &'a RetryPolicy,
    pub deadline: &'a Deadline,
    pub stats: &'a ClientStats,
    /// Sentinel's upload limit; every attempt passes it first.
    pub limiter: Option<&'a SlidingWindow>,
    /// The log line of a retry.
    pub what: &'static str,
}

impl Post<'_> {
    pub async fn send<T>(
        &self,
        tokens: &SentinelUploader,
        parse: impl Fn(&[u8]) -> Option<T>,
    ) -> Result<Posted<T>, SentinelError> {
        let mut token = tokens.token(false).await?;
        let mut refreshed = false;
        let mut last = String::new();
        let mut attempt = 0;
        while attempt < self.retry.max_attempts {
            attempt += 1;
            if attempt > 1 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(l) = self.limiter {
                l.acquire().await;
            }
            let sent = self
                .http
                .post(self.url)
                .bearer_auth(&token)
                .header("Content-Type", "application/json")
                .timeout(self.retry.request_timeout)
                .body(self.body.to_string())
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = if e.is_timeout() {
                        "timed out".to_string()
                    } else {
                        format!("request failed: {}", root_cause(&e))
                    };
                    self.pause(attempt, self.retry.backoff(attempt), &last)
                        .await?;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    last = format!("the answer was cut off: {}", root_cause(&e));
                    self.pause(attempt, self.retry.backoff(attempt), &last)
                        .await?;
                    continue;
                }
            };
            match classify(
                status,
                retry_after.as_deref(),
                &bytes,
                OffsetDateTime::now_utc(),
            ) {
                Outcome::Success => match parse(&bytes) {
                    Some(t) => return Ok(Posted::Ok(t)),
                    None => {
                        last =
                            format!("HTTP {status} with an unreadable body: {}", excerpt(&bytes));
                        self.pause(attempt, self.retry.backoff(attempt), &last)
                            .await?;
                    }
                },
                Outcome::Throttled(asked) => {
                    self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    last = format!("HTTP 429: {}", excerpt(&bytes));
                    self.pause(attempt, self.retry.throttle_wait(asked, attempt), &last)
                        .await?;
                }
                Outcome::Transient => {
                    last = format!("HTTP {status}: {}", excerpt(&bytes));
                    self.pause(attempt, self.retry.backoff(attempt), &last)
                        .await?;
                }
                Outcome::Unauthorized if !refreshed => {
                    tracing::info!("the token was refused; getting a new one");
                    refreshed = true;
                    token = tokens.token(true).await?;
                    // The refusal was not the request's fault: it does not use up an attempt.
                    attempt -= 1;
                }
                Outcome::Unauthorized => return Ok(Posted::Unauthorized),
                Outcome::Fatal => {
                    return Ok(Posted::Fatal {
                        status,
                        body: bytes.to_vec(),
                    });
                }
            }
        }
        Ok(Posted::GaveUp { last })
    }

    async fn pause(
        &self,
        attempt: u32,
        wait: std::time::Duration,
        why: &str,
    ) -> Result<(), OutOfTime> {
        if attempt < self.retry.max_attempts {
            tracing::warn!(attempt, wait_ms = wait.as_millis() as u64, error = %why, "{}", self.what);
            self.deadline.sleep(wait, why).await?;
        }
        Ok(())
    }
}

/// Entra's answer without the request: `azure_core` errors carry Entra's description
/// (for example AADSTS7000215 for a wrong secret), never the secret sent.
fn credential_reason(e: &azure_core::Error) -> String {
    let mut s = e.to_string();
    if let Some(i) = s.find("\nTo troubleshoot") {
        s.truncate(i);
    }
    s.replace('\n', " ")
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_errors_split_accepted_and_refused() {
        let body = br#"{"errors":[{"recordIndex":3,"errorMessages":["Error for Property=id: Required property is missing."]},{"recordIndex":0,"errorMessages":["a","b"]},{"recordIndex":99,"errorMessages":["out of range"]}]}"#;
        let o = read_answer(body, 5).unwrap();
        assert_eq!(o.accepted, vec![1, 2, 4]);
        assert_eq!(
            o.refused,
            vec![
                (0, "a; b".to_string()),
                (
                    3,
                    "Error for Property=id: Required property is missing.".to_string()
                )
            ]
        );
    }

    #[test]
    fn an_empty_or_foreign_body_is_not_an_error_list() {
        assert!(read_answer(b"", 3).is_none());
        assert!(read_answer(b"<html>ok</html>", 3).is_none());
        let o = read_answer(b"{}", 2).unwrap();
        assert_eq!(o.accepted, vec![0, 1]);
    }
}
