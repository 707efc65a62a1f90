//! The Blob Storage state store, on the official `azure_storage_blob` 1.x SDK.
//!
//! Three ways in: a container URL with the managed identity (production), a container URL
//! carrying a SAS token, or Azurite's well-known development account
//! (`AzureWebJobsStorage=UseDevelopmentStorage=true`), for which we sign an account SAS
//! locally because the 1.x SDK has no shared-key credential. Every write is conditional on
//! the ETag read (`If-Match`) or on absence (`If-None-Match: *`). The cross-instance lock is a
//! 60-second lease on the `cycle.lock` blob, renewed in the background while a cycle runs and
//! released at its end; after a crash it lapses on its own.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{
    ClientOptions, Etag, ExponentialRetryOptions, RequestContent, RetryOptions, StatusCode,
    Transport, Url,
};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientAcquireLeaseResultHeaders, BlobClientDownloadOptions,
    BlobClientUploadOptions, StorageErrorCode,
};
use azure_storage_blob::{
    BlobClient, BlobContainerClient, BlobContainerClientOptions, StorageError,
};
use tokio::sync::OnceCell;

use super::{Lock, Precondition, StateError, StateStore, Version, Versioned};

/// Azurite's published development account (not a secret: it is the same everywhere).
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The container used with the development account.
pub const DEV_CONTAINER: &str = "mati-sentinel-state";
/// The storage service version our locally signed SAS names; Azurite 3.35 knows it.
const DEV_SAS_VERSION: &str = "2025-11-05";
const LOCK_BLOB: &str = "cycle.lock";
const LEASE_SECONDS: i32 = 60;
/// Renewed well inside the lease, so one slow renewal does not lose it.
const RENEW_EVERY: Duration = Duration::from_secs(20);

pub struct BlobStore {
    container: BlobContainerClient,
    /// Where state lives, for messages: the URL without its query (a SAS is a credential).
    describe: String,
    created: OnceCell<()>,
    lease_seconds: i32,
    renew_every: Duration,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(format!("{what}: {e}"))
}

/// The status and storage error code of an SDK error.
fn code_of(e: &azure_core::Error) -> (Option<StatusCode>, Option<StorageErrorCode>) {
    let status = e.http_status();
    let code = match e.kind() {
        azure_core::error::ErrorKind::HttpResponse {
            error_code: Some(c),
            ..
        } => c.parse::<StorageErrorCode>().ok(),
        _ => None,
    };
    (status, code)
}

/// An SDK error as text without the request URL's query (which may hold a SAS signature).
fn describe_error(e: azure_core::Error) -> String {
    match StorageError::try_from(e) {
        Ok(se) => format!(
            "HTTP {} {}{}",
            u16::from(se.status_code),
            se.error_code.map(|c| c.to_string()).unwrap_or_default(),
            se.message
                .map(|m| format!(": {}", m.lines().next().unwrap_or_default()))
                .unwrap_or_default()
        ),
        Err(e) => {
            let text = e.to_string();
            match text.find('?') {
                Some(i) => format!("{}…", &text[..i]),
                None => text,
            }
        }
    }
}

/// The process's HTTP client (its trust roots, its timeout) as the SDK's transport.
fn transport(timeout: Duration) -> Transport {
    Transport::new(Arc::new(crate::http_client(timeout)))
}

impl BlobStore {
    /// `timeout` bounds each request (`HTTP_TIMEOUT_SECONDS`): a hung store fails the cycle
    /// after the few retries below instead of holding it until the Functions timeout.
    fn new(
        url: Url,
        credential: Option<Arc<dyn TokenCredential>>,
        timeout: Duration,
    ) -> Result<Self, StateError> {
        let mut shown = url.clone();
        shown.set_query(None);
        let mut options = BlobContainerClientOptions {
            // Azurite 3.35 refuses the SDK's newer default service version.
            version: DEV_SAS_VERSION.to_string(),
            ..Default::default()
        };
        // A few quick retries: an unreachable store should fail the cycle in seconds, not
        // minutes (the cycle keeps nothing it has not saved, and the next tick tries again).
        let retry = ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_delay: azure_core::time::Duration::seconds(2),
            max_retries: 3,
            max_total_elapsed: azure_core::time::Duration::seconds(20),
        };
        options.client_options.retry = RetryOptions::exponential(retry);
        options.client_options.transport = Some(transport(timeout));
        let container = BlobContainerClient::new(url, credential, Some(options))
            .map_err(|e| unavailable("building the Blob client", describe_error(e)))?;
        Ok(BlobStore {
            container,
            describe: format!("blob container {shown}"),
            created: OnceCell::new(),
            lease_seconds: LEASE_SECONDS,
            renew_every: RENEW_EVERY,
        })
    }

    /// Shorter lease timings, so a test can outlive a lease (Blob Storage allows 15–60 s).
    pub fn with_lease_timing(mut self, lease_seconds: i32, renew_every: Duration) -> Self {
        self.lease_seconds = lease_seconds;
        self.renew_every = renew_every;
        self
    }

    /// `STATE_CONTAINER_URL`, reached with the (user-assigned, when given) managed identity.
    pub fn with_managed_identity(
        url: &str,
        client_id: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, StateError> {
        let url = Url::parse(url).map_err(|e| unavailable("STATE_CONTAINER_URL", e))?;
        let credential = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
            user_assigned_id: client_id.map(|c| UserAssignedId::ClientId(c.to_string())),
            client_options: ClientOptions {
                transport: Some(transport(timeout)),
                ..Default::default()
            },
        }))
        .map_err(|e| unavailable("the managed identity", describe_error(e)))?;
        Self::new(url, Some(credential), timeout)
    }

    /// `STATE_CONTAINER_SAS_URL`: the SAS in the URL authorises every request.
    pub fn with_sas_url(url: &str, timeout: Duration) -> Result<Self, StateError> {
        let url =
            Url::parse(url).map_err(|_| unavailable("STATE_CONTAINER_SAS_URL", "not a URL"))?;
        Self::new(url, None, timeout)
    }

    /// Azurite's development account at `127.0.0.1:10000`.
    pub fn development_storage(timeout: Duration) -> Result<Self, StateError> {
        Self::development_storage_at("http://127.0.0.1:10000", DEV_CONTAINER, timeout)
    }

    /// Azurite's development account at another endpoint (tests start Azurite on a free port).
    pub fn development_storage_at(
        endpoint: &str,
        container: &str,
        timeout: Duration,
    ) -> Result<Self, StateError> {
        Self::with_sas_url(&development_sas_url(endpoint, container)?, timeout)
    }

    fn blob(&self, name: &str) -> BlobClient {
        self.container.blob_client(name)
    }

    /// Creates the container the first time it is needed.
    async fn ensure_container(&self) -> Result<(), StateError> {
        self.created
            .get_or_try_init(|| async {
                match self.container.create(None).await {
                    Ok(_) => Ok(()),
                    Err(e) if code_of(&e).1 == Some(StorageErrorCode::ContainerAlreadyExists) => {
                        Ok(())
                    }
                    Err(e) => Err(unavailable(
                        &format!("creating {}", self.describe),
                        describe_error(e),
                    )),
                }
            })
            .await
            .map(|_| ())
    }
}

/// A container URL with an account SAS for Azurite's development account at `endpoint`
/// (for `STATE_CONTAINER_SAS_URL` in local development and tests).
pub fn development_sas_url(endpoint: &str, container: &str) -> Result<String, StateError> {
    Ok(format!(
        "{}/{DEV_ACCOUNT}/{container}?{}",
        endpoint.trim_end_matches('/'),
        dev_account_sas()?
    ))
}

/// An account SAS for Azurite's development account, signed with its published key
/// (string-to-sign for service versions from 2020-12-06 on).
fn dev_account_sas() -> Result<String, StateError> {
    let expiry = (time::OffsetDateTime::now_utc() + time::Duration::days(7))
        .replace_nanosecond(0)
        .expect("zero nanoseconds")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a timestamp formats");
    let (sp, ss, srt, sv) = ("racwdl", "b", "sco", DEV_SAS_VERSION);
    let to_sign = format!("{DEV_ACCOUNT}\n{sp}\n{ss}\n{srt}\n\n{expiry}\n\n\n{sv}\n\n");
    let sig = azure_core::hmac::hmac_sha256(&to_sign, &Secret::new(DEV_KEY))
        .map_err(|e| unavailable("signing the Azurite SAS", e))?;
    let mut u = Url::parse("http://x/").expect("a fixed URL");
    u.query_pairs_mut()
        .append_pair("sv", sv)
        .append_pair("ss", ss)
        .append_pair("srt", srt)
        .append_pair("sp", sp)
        .append_pair("se", &expiry)
        .append_pair("sig", &sig);
    Ok(u.query().expect("a query").to_string())
}

struct BlobLease {
    blob: BlobClient,
    lease_id: String,
    renewer: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl Lock for BlobLease {
    async fn renew(&self) -> Result<(), StateError> {
        self.blob
            .renew_lease(self.lease_id.clone(), None)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("renewing the state lease", describe_error(e)))
    }

    async fn release(self: Box<Self>) -> Result<(), StateError> {
        self.renewer.abort();
        self.blob
            .release_lease(self.lease_id.clone(), None)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("releasing the state lease", describe_error(e)))
    }
}

impl Drop for BlobLease {
    fn drop(&mut self) {
        // A lock dropped without release stops renewing; the lease lapses within a minute.
        self.renewer.abort();
    }
}

#[async_trait]
impl StateStore for BlobStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn read(&self, name: &str) -> Result<Option<Versioned>, StateError> {
        self.ensure_container().await?;
        let blob = self.blob(name);
        let result = blob
            .download(Some(BlobClientDownloadOptions::default()))
            .await;
        let download = match result {
            Ok(d) => d,
            Err(e) => {
                let (status, code) = code_of(&e);
                if status == Some(StatusCode::NotFound)
                    || code == Some(StorageErrorCode::BlobNotFound)
                {
                    return Ok(None);
                }
                return Err(unavailable(&format!("reading {name}"), describe_error(e)));
            }
        };
        let etag =
            download.properties.etag.clone().ok_or_else(|| {
                unavailable(&format!("reading {name}"), "the answer carried no ETag")
            })?;
        let bytes = download
            .body
            .collect()
            .await
            .map_err(|e| unavailable(&format!("reading {name}"), describe_error(e)))?;
        Ok(Some(Versioned {
            bytes: bytes.to_vec(),
            version: Version(etag.to_string()),
        }))
    }

    async fn write(
        &self,
        name: &str,
        bytes: &[u8],
        condition: Precondition,
    ) -> Result<Version, StateError> {
        self.ensure_container().await?;
        let mut options = BlobClientUploadOptions::default();
        match condition {
            Precondition::Absent => options.if_none_match = Some(Etag::from("*")),
            Precondition::Matches(v) => options.if_match = Some(Etag::from(v.0)),
        }
        match self
            .blob(name)
            .upload(RequestContent::from(bytes.to_vec()), Some(options))
            .await
        {
            Ok(r) => {
                let etag = r.etag.ok_or_else(|| {
                    unavailable(&format!("writing {name}"), "the answer carried no ETag")
                })?;
                Ok(Version(etag.to_string()))
            }
            Err(e) => match code_of(&e) {
                (Some(StatusCode::PreconditionFailed), _)
                | (_, Some(StorageErrorCode::BlobAlreadyExists))
                | (Some(StatusCode::Conflict), _) => {
                    Err(StateError::Conflict { name: name.into() })
                }
                _ => Err(unavailable(&format!("writing {name}"), describe_error(e))),
            },
        }
    }

    async fn try_lock(&self) -> Result<Option<Box<dyn Lock>>, StateError> {
        self.ensure_container().await?;
        let blob = self.blob(LOCK_BLOB);
        // The lease needs a blob to hold; whoever creates it first is fine.
        if let Err(e) = blob
            .upload(
                RequestContent::from(b"mati-sentinel cycle lock".to_vec()),
                Some(BlobClientUploadOptions {
                    if_none_match: Some(Etag::from("*")),
                    ..Default::default()
                }),
            )
            .await
        {
            let (status, code) = code_of(&e);
            let exists = code == Some(StorageErrorCode::BlobAlreadyExists)
                || status == Some(StatusCode::Conflict)
                || status == Some(StatusCode::PreconditionFailed);
            if !exists {
                return Err(unavailable("creating the lock blob", describe_error(e)));
            }
        }
        let lease_id = match blob
            .acquire_lease(
                self.lease_seconds,
                Some(BlobClientAcquireLeaseOptions::default()),
            )
            .await
        {
            Ok(resp) => resp
                .lease_id()
                .map_err(|e| unavailable("acquiring the state lease", describe_error(e)))?
                .ok_or_else(|| unavailable("acquiring the state lease", "no lease id"))?,
            Err(e) => {
                let (status, code) = code_of(&e);
                if status == Some(StatusCode::Conflict)
                    || code == Some(StorageErrorCode::LeaseAlreadyPresent)
                {
                    return Ok(None);
                }
                return Err(unavailable("acquiring the state lease", describe_error(e)));
            }
        };
        let renew_blob = self.blob(LOCK_BLOB);
        let renew_id = lease_id.clone();
        let every = self.renew_every;
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = renew_blob.renew_lease(renew_id.clone(), None).await {
                    tracing::error!(error = %describe_error(e), "could not renew the state lease; another instance may start a cycle, and conditional writes will refuse any stale state");
                }
            }
        });
        Ok(Some(Box::new(BlobLease {
            blob,
            lease_id,
            renewer,
        })))
    }
}
