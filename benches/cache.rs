//! Target: a dedupe cache of 1,000,000 entries saves and loads in under 1 s together and
//! takes at most 40 MB stored. Measures encode + write to the folder store, and read + decode.
//! `cargo bench --bench cache`

mod common;

use std::time::Instant;

use mati_sentinel::dedupe::{DedupeCache, Entry};
use mati_sentinel::state::file::FileStore;
use mati_sentinel::state::{Precondition, StateStore};

#[tokio::main]
async fn main() {
    let n = 1_000_000u64;
    let mut rng = common::Rng::new(99);
    let mut cache = DedupeCache::new();
    let kinds = ["ipv4", "fqdn", "url", "md5"];
    for i in 0..n {
        let h = format!("{:016x}{:016x}", rng.next(), rng.next());
        let id = format!(
            "{}--{}-{}-5{}-8{}-{}",
            kinds[(i % 4) as usize],
            &h[0..8],
            &h[8..12],
            &h[13..16],
            &h[17..20],
            &h[20..32]
        );
        let e = Entry {
            stix_uuid: None,
            fingerprint: rng.next(),
            valid_until: 1_800_000_000 + (i as i64),
        };
        cache.record(&id, e);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    let mut best = (f64::MAX, f64::MAX);
    let mut size = 0;
    for round in 0..3 {
        let t0 = Instant::now();
        let bytes = cache.encode();
        let current = store.read("dedupe-cache.bin").await.unwrap();
        store
            .write(
                "dedupe-cache.bin",
                &bytes,
                Precondition::from_read(current.as_ref()),
            )
            .await
            .unwrap();
        let save = t0.elapsed().as_secs_f64();
        size = bytes.len();
        let t0 = Instant::now();
        let read = store.read("dedupe-cache.bin").await.unwrap().unwrap();
        let loaded = DedupeCache::decode(&read.bytes).unwrap();
        let load = t0.elapsed().as_secs_f64();
        assert_eq!(loaded.len(), cache.len());
        if round > 0 || best.0 == f64::MAX {
            best = (best.0.min(save), best.1.min(load));
        }
    }
    let t0 = Instant::now();
    let bytes = cache.encode();
    let encode = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let decoded = DedupeCache::decode(&bytes).unwrap();
    let decode = t0.elapsed().as_secs_f64();
    std::hint::black_box(decoded);
    println!(
        "phases: encode {encode:.3} s, decode {decode:.3} s (the rest is the folder store: hashing for versions, write, fsync, read)"
    );
    println!("machine: {}", common::machine());
    println!(
        "cache: {} entries, {:.1} MB stored ({:.1} bytes/entry); save {:.3} s + load {:.3} s = {:.3} s (targets: < 1 s, <= 40 MB)",
        cache.len(),
        size as f64 / 1e6,
        size as f64 / cache.len() as f64,
        best.0,
        best.1,
        best.0 + best.1
    );
}
