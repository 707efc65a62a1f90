//! Target: the pure path (parse Mandiant pages, policy, STIX mapping, dedupe, serialise the
//! upload bodies) at 200,000 indicators a second or more on one core.
//! `cargo bench --bench pipeline`

mod common;

use std::collections::HashMap;
use std::time::Instant;

use mati_sentinel::config::{Config, Needs};
use mati_sentinel::dedupe::DedupeCache;
use mati_sentinel::mati::pages_from_json;
use mati_sentinel::stix::Clock;
use mati_sentinel::sync::{CycleReport, plan_page};

fn main() {
    let n: u64 = 200_000;
    let now = time::OffsetDateTime::now_utc();
    let bytes = common::pages_file(n, 1000, 7, now.unix_timestamp() - 3600);
    // The product's defaults, as a deployment without settings gets them.
    let config = Config::from_map(&Default::default(), Needs::NOTHING).unwrap();
    let (policy, stix) = (config.policy, config.stix);
    let cache = DedupeCache::new();
    let mut best = f64::MAX;
    let mut kept = 0;
    for _ in 0..3 {
        let t0 = Instant::now();
        let pages = pages_from_json(&bytes).unwrap();
        let mut seen = HashMap::new();
        let clock = Clock::new(now, &stix);
        let mut report = CycleReport::default();
        let mut body_bytes = 0usize;
        for page in &pages {
            let planned = plan_page(
                page.indicators(),
                &policy,
                &stix,
                &cache,
                &mut seen,
                &clock,
                &mut report,
            );
            for chunk in planned.chunks(100) {
                let mut body = String::from("{\"sourcesystem\":\"Mandiant\",\"stixobjects\":[");
                for (i, p) in chunk.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(&serde_json::to_string(&p.stix).unwrap());
                }
                body.push_str("]}");
                body_bytes += body.len();
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        best = best.min(secs);
        kept = report.kept;
        std::hint::black_box(body_bytes);
    }
    // Where the time goes, phase by phase (one pass each).
    let t0 = Instant::now();
    let pages = pages_from_json(&bytes).unwrap();
    let t_parse = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut decoded = 0;
    for page in &pages {
        for raw in page.indicators() {
            decoded += usize::from(mati_sentinel::mati::decode_indicator(raw).is_some());
        }
    }
    let t_decode = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut seen = HashMap::new();
    let mut report = CycleReport::default();
    let clock = Clock::new(now, &stix);
    let mut all = Vec::new();
    for page in &pages {
        all.extend(plan_page(
            page.indicators(),
            &policy,
            &stix,
            &cache,
            &mut seen,
            &clock,
            &mut report,
        ));
    }
    let t_plan = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut total = 0;
    for p in &all {
        total += serde_json::to_string(&p.stix).unwrap().len();
    }
    let t_ser = t0.elapsed().as_secs_f64();
    std::hint::black_box((decoded, total));
    println!(
        "phases: split pages {t_parse:.3} s, decode alone {t_decode:.3} s, decode+policy+STIX+dedupe {t_plan:.3} s, serialise {t_ser:.3} s"
    );
    println!("machine: {}", common::machine());
    println!(
        "pipeline: {n} indicators ({kept} kept) in {best:.3} s on one thread = {:.0} indicators/s (target >= 200,000)",
        n as f64 / best
    );
}
