//! Target: 15,000 indicators uploaded against a fake that enforces 100 requests per 60
//! seconds (a sliding window, answering 429 beyond it): zero 429s, and within 10% of the
//! ideal (100 requests at once, the next 50 after the window: about 60 s).
//! `cargo bench --bench upload` (takes about a minute).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mati_sentinel::config::{Secret, SentinelAuth, SentinelConfig, UploadApi};
use mati_sentinel::rate_limit::SlidingWindow;
use mati_sentinel::retry::RetryPolicy;
use mati_sentinel::sentinel::SentinelUploader;

#[tokio::main]
async fn main() {
    let w = support::World::new(Vec::new()).await;
    w.sentinel.lock().unwrap().rate_limit = Some((100, Duration::from_secs(60)));
    let config = SentinelConfig {
        workspace_id: support::WORKSPACE.into(),
        auth: SentinelAuth::ClientSecret {
            tenant_id: support::TENANT.into(),
            client_id: support::CLIENT_ID.into(),
            secret: Secret::new(support::CLIENT_SECRET),
        },
        api: UploadApi::StixObjects,
        endpoint: w.sentinel_url.parse().unwrap(),
        source_system: "Mandiant".into(),
        authority_host: w.entra_url.parse().unwrap(),
        token_scope: "https://management.azure.com/.default".into(),
    };
    let uploader = SentinelUploader::new(
        w.tls.client(),
        &config,
        Arc::new(SlidingWindow::sentinel()),
        RetryPolicy::DEFAULT,
    )
    .unwrap();
    uploader.token(false).await.unwrap();
    let objects: Vec<String> = (0..15_000)
        .map(|i| {
            format!(
                r#"{{"type":"indicator","spec_version":"2.1","id":"indicator--00000000-0000-4000-8000-{i:012}","created":"2026-01-01T00:00:00.000Z","modified":"2026-01-01T00:00:00.000Z","pattern":"[ipv4-addr:value = '10.0.{}.{}']","pattern_type":"stix","valid_from":"2026-01-01T00:00:00.000Z","name":"o{i}"}}"#,
                i / 256,
                i % 256
            )
        })
        .collect();
    let t0 = Instant::now();
    let mut accepted = 0;
    for batch in objects.chunks(100) {
        accepted += uploader.upload(batch).await.unwrap().accepted.len();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let s = w.sentinel.lock().unwrap();
    let ideal = 60.0;
    println!("machine: {}", common::machine());
    println!(
        "upload: {accepted} objects in {} requests, {} answered 429, {elapsed:.1} s (ideal {ideal:.0} s; within 10%: {})",
        s.requests,
        s.throttled,
        elapsed <= ideal * 1.1
    );
}
