//! mati-sentinel: Mandiant Threat Intelligence indicators into Microsoft Sentinel.
//!
//! A cycle pages through Mandiant's `/v4/indicator` feed from a checkpoint (`mati`), keeps
//! what the policy allows (`policy`), maps each indicator to STIX 2.1 (`stix`), skips what
//! Sentinel already has (`dedupe`), uploads the rest under Sentinel's rate limit (`sentinel`,
//! `rate_limit`, `retry`), and records what was accepted before moving the checkpoint
//! (`state`). `sync` sequences it; `config` reads the settings; `app` builds the parts.
//! See ARCHITECTURE.md for the map and the invariants.

pub mod app;
pub mod config;
pub mod dedupe;
pub mod failpoint;
pub mod handler;
pub mod mati;
pub mod policy;
pub mod rate_limit;
pub mod retry;
pub mod sentinel;
pub mod state;
pub mod stix;
pub mod sync;
pub mod telemetry;
pub mod workspace;

/// The process's HTTP client: rustls with the operating system's trust store (so
/// `SSL_CERT_FILE` adds a CA), gzip, and no proxy surprises. `timeout` bounds every request,
/// the SDK's Entra token and Blob Storage requests sent through it included (our own clients
/// set the same per request).
pub fn http_client(timeout: std::time::Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(mati::APP_NAME)
        .connect_timeout(std::time::Duration::from_secs(15))
        .timeout(timeout)
        .build()
        .expect("the HTTP client builds")
}
