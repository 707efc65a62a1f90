//! Target: a full cycle with a 1,000,000-entry dedupe cache and 100,000 fetched indicators
//! stays under 512 MB peak memory (the smallest Flex instance). The release binary runs
//! `sync` against the in-process fakes; the fetched indicators are already in the cache,
//! as on a steady-state day, so the run measures fetch, plan and state, not Sentinel's limit.
//! `cargo bench --bench full_cycle`

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;

use mati_sentinel::config::{Config, Needs};
use mati_sentinel::dedupe::{DedupeCache, Entry};
use mati_sentinel::mati::MatiPage;
use mati_sentinel::state::Checkpoint;
use mati_sentinel::stix::Clock;
use mati_sentinel::sync::{CycleReport, plan_page};

#[tokio::main]
async fn main() {
    let fetched = 100_000u64;
    let cached = 1_000_000u64;
    let now = time::OffsetDateTime::now_utc();
    let mut rng = common::Rng::new(5);
    let indicators: Vec<String> = (0..fetched)
        .map(|i| common::indicator(&mut rng, i, now.unix_timestamp() - 1800 - (i as i64 % 1800)))
        .collect();

    // The cache: what a previous cycle recorded for these indicators, plus 900,000 others.
    // The product's defaults, as a deployment without settings gets them.
    let config = Config::from_map(&Default::default(), Needs::NOTHING).unwrap();
    let (policy, stix) = (config.policy, config.stix);
    let page =
        MatiPage::parse(format!("{{\"indicators\":[{}]}}", indicators.join(",")).into_bytes())
            .unwrap();
    let mut cache = DedupeCache::new();
    let planned = plan_page(
        page.indicators(),
        &policy,
        &stix,
        &cache,
        &mut HashMap::new(),
        &Clock::new(now, &stix),
        &mut CycleReport::default(),
    );
    for p in &planned {
        cache.record(&p.mandiant_id, p.cache_entry());
    }
    let mut i = 0u64;
    while (cache.len() as u64) < cached {
        let h = format!("{:016x}{:016x}", rng.next(), rng.next());
        let id = format!(
            "fqdn--{}-{}-5{}-8{}-{}",
            &h[0..8],
            &h[8..12],
            &h[13..16],
            &h[17..20],
            &h[20..32]
        );
        cache.record(
            &id,
            Entry {
                stix_uuid: None,
                fingerprint: i,
                valid_until: now.unix_timestamp() + 86_400 * 30,
            },
        );
        i += 1;
    }
    drop(page);

    let values: Vec<serde_json::Value> = indicators
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    drop(indicators);
    let w = support::World::new(values).await;
    w.mandiant.lock().unwrap().page_size = 1000;
    std::fs::write(w.state_dir.path().join("dedupe-cache.bin"), cache.encode()).unwrap();
    let checkpoint = Checkpoint {
        format: Checkpoint::FORMAT,
        window_start: now.unix_timestamp() - 3600,
        last_finished: Some(now.unix_timestamp() - 5 * 3600),
        backfill_in_progress: false,
    };
    std::fs::write(
        w.state_dir.path().join("checkpoint.json"),
        checkpoint.encode(),
    )
    .unwrap();
    drop(cache);

    let mut cmd = support::command(&["sync", "--json"], &w.env());
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let out_path = w.state_dir.path().join("report.json");
    cmd.stdout(std::fs::File::create(&out_path).unwrap());
    let (status, elapsed, peak_kb) = tokio::task::spawn_blocking(move || common::run_measured(cmd))
        .await
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();
    println!("machine: {}", common::machine());
    println!(
        "full_cycle: {} fetched on {} pages, {} unchanged, {} uploaded, cache {} entries: {:.1} s, peak RSS {:.0} MB (target < 512 MB)",
        report["fetched"],
        report["pages"],
        report["unchanged"],
        report["uploaded"],
        report["cache_entries"],
        elapsed.as_secs_f64(),
        peak_kb as f64 / 1024.0
    );
}
