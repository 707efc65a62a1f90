//! Builds the long-lived parts from a `Config` and runs one cycle with them.
//!
//! Shared by every way in (`sync`, `serve`, `daemon`): one HTTP client, one state store, one
//! Sentinel rate limiter for the whole process, and the two clients. Nothing here parses a
//! wire format; it only wires the pieces of `sync` together.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use time::OffsetDateTime;

use crate::config::{Config, ConfigError, Problem, StateConfig};
use crate::mati::MatiClient;
use crate::rate_limit::SlidingWindow;
use crate::sentinel::{SentinelError, SentinelUploader};
use crate::state::blob::BlobStore;
use crate::state::file::FileStore;
use crate::state::{CHECKPOINT, Checkpoint, StateError, StateStore};
use crate::sync::{CycleResult, Pipeline, Progress, Sink, Source, run_cycle};
use crate::workspace::WorkspaceReader;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Sentinel(#[from] SentinelError),
    #[error("{0}")]
    State(#[from] StateError),
}

pub use crate::http_client;

pub fn build_store(
    state: &StateConfig,
    managed_identity_client_id: Option<&str>,
    timeout: Duration,
) -> Result<Arc<dyn StateStore>, BuildError> {
    Ok(match state {
        StateConfig::Folder(dir) => Arc::new(FileStore::new(dir)),
        StateConfig::BlobManagedIdentity(url) => Arc::new(BlobStore::with_managed_identity(
            url,
            managed_identity_client_id,
            timeout,
        )?),
        StateConfig::BlobSas(url) => Arc::new(BlobStore::with_sas_url(url.expose(), timeout)?),
        StateConfig::DevelopmentStorage => Arc::new(BlobStore::development_storage(timeout)?),
    })
}

fn setting_problem(setting: &'static str, message: String) -> BuildError {
    BuildError::Config(ConfigError {
        problems: vec![Problem { setting, message }],
    })
}

/// The workspace reader, when the settings turn reconciliation on.
pub fn workspace_reader(config: &Config, http: &reqwest::Client) -> Option<WorkspaceReader> {
    if !config.sync.enable_deduplication {
        return None;
    }
    let resource = config.workspace.as_ref()?;
    Some(WorkspaceReader::new(
        http.clone(),
        resource,
        config.sync.retry_policy(),
    ))
}

/// Everything a cycle needs, built once.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn StateStore>,
    pub mati: MatiClient,
    pub uploader: SentinelUploader,
    pub workspace: Option<WorkspaceReader>,
}

impl App {
    /// Builds the parts for real cycles; `config` must have been read with `Needs::ALL`.
    pub fn build(config: Config) -> Result<App, BuildError> {
        let http = http_client(config.sync.http_timeout);
        let mati_config = config
            .mati
            .clone()
            .ok_or_else(|| setting_problem("MATI_API_KEY", "is required but not set".into()))?;
        let sentinel_config = config.sentinel.clone().ok_or_else(|| {
            setting_problem("AZURE_WORKSPACE_ID", "is required but not set".into())
        })?;
        let store = build_store(
            &config.state,
            config.managed_identity_client_id.as_deref(),
            config.sync.http_timeout,
        )?;
        let uploader = SentinelUploader::new(
            http.clone(),
            &sentinel_config,
            // One limiter for the whole process: Sentinel counts requests per identity.
            Arc::new(SlidingWindow::sentinel()),
            config.sync.retry_policy(),
        )?;
        let workspace = workspace_reader(&config, &http);
        let mati = MatiClient::new(http, mati_config, config.sync.retry_policy());
        Ok(App {
            config,
            store,
            mati,
            uploader,
            workspace,
        })
    }

    /// Whether a cycle is due (DESIGN §4), from the stored checkpoint.
    pub async fn is_due(&self, now: OffsetDateTime) -> Result<bool, StateError> {
        let checkpoint = match self.store.read(CHECKPOINT).await? {
            Some(v) => Some(Checkpoint::decode(&v.bytes)?),
            None => None,
        };
        Ok(Checkpoint::is_due(
            checkpoint.as_ref(),
            self.config.sync.schedule_hours,
            now.unix_timestamp(),
        ))
    }

    /// One cycle from Mandiant to Sentinel, within the configured time budget; `stop`
    /// ends it early at the next batch boundary.
    pub async fn cycle(
        &self,
        now: OffsetDateTime,
        stop: Option<Arc<AtomicBool>>,
        progress: Option<Arc<Progress>>,
    ) -> CycleResult {
        let pipeline = Pipeline {
            policy: &self.config.policy,
            stix: &self.config.stix,
            sync: &self.config.sync,
            store: self.store.as_ref(),
            source: Source::Mandiant(&self.mati),
            sink: Sink::Sentinel(&self.uploader),
            workspace: self.workspace.as_ref(),
            stop,
            progress,
        };
        let deadline = tokio::time::Instant::now() + self.config.sync.time_budget;
        run_cycle(&pipeline, now, deadline).await
    }
}
