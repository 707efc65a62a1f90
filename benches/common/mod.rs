//! Shared by the bench binaries: a generator of realistic Mandiant `/v4/indicator` pages, and
//! peak-memory measurement of a child process.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// A tiny deterministic generator (xorshift), so every run measures the same data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn hex(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len);
    while s.len() < len {
        let _ = write!(s, "{:016x}", rng.next());
    }
    s.truncate(len);
    s
}

fn uuid(rng: &mut Rng) -> String {
    let h = hex(rng, 32);
    format!(
        "{}-{}-5{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// One indicator with the shape of the reference examples (sources, categories, threat
/// rating, associated hashes, attributions), about 70% of them kept by the default policy.
pub fn indicator(rng: &mut Rng, i: u64, updated_unix: i64) -> String {
    let kind = ["ipv4", "fqdn", "url", "md5"][rng.below(4) as usize];
    let value = match kind {
        "ipv4" => format!(
            "{}.{}.{}.{}",
            rng.below(223) + 1,
            rng.below(256),
            rng.below(256),
            rng.below(256)
        ),
        "fqdn" => format!("{}-{}.example.com", hex(rng, 10), i),
        "url" => format!(
            "https://{}.example.net/{}/payload.php?id={i}&k='{}'",
            hex(rng, 8),
            hex(rng, 12),
            hex(rng, 4)
        ),
        _ => hex(rng, 32),
    };
    let mscore = if rng.below(10) < 8 {
        80 + rng.below(21)
    } else {
        rng.below(80)
    };
    let threat = if rng.below(10) < 9 {
        80 + rng.below(21)
    } else {
        rng.below(80)
    };
    let cats = [
        r#"[]"#,
        r#"["malware"]"#,
        r#"["control-server","malware"]"#,
        r#"["phishing"]"#,
    ][rng.below(4) as usize];
    let osint = rng.below(20) == 0;
    let ts = time::OffsetDateTime::from_unix_timestamp(updated_unix).unwrap();
    let stamp = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        ts.year(),
        u8::from(ts.month()),
        ts.day(),
        ts.hour(),
        ts.minute(),
        ts.second(),
        rng.below(1000)
    );
    let mut s = String::with_capacity(900);
    let _ = write!(
        s,
        r#"{{"id":"{kind}--{}","mscore":{mscore},"type":"{kind}","value":"{value}","is_publishable":true,"sources":[{{"first_seen":"2026-10-01T10:00:00.000+0000","last_seen":"2026-11-20T10:00:00.000+0000","osint":{osint},"category":[],"source_name":"Mandiant"}},{{"first_seen":"2026-10-02T10:00:00.000+0000","last_seen":"2026-11-21T10:00:00.000+0000","osint":{osint},"category":{cats},"source_name":"Mandiant"}}],"threat_rating":{{"confidence_level":"high","confidence_score":90,"severity_level":"high","severity_reason":["attributed"],"threat_score":{threat}}},"last_updated":"{stamp}","first_seen":"2026-10-01T10:00:00.000Z","last_seen":"2026-11-21T10:00:00.000Z""#,
        uuid(rng)
    );
    if kind == "md5" {
        let _ = write!(
            s,
            r#","associated_hashes":[{{"id":"md5--{}","type":"md5","value":"{value}"}},{{"id":"sha1--{}","type":"sha1","value":"{}"}},{{"id":"sha256--{}","type":"sha256","value":"{}"}}]"#,
            uuid(rng),
            uuid(rng),
            hex(rng, 40),
            uuid(rng),
            hex(rng, 64)
        );
    }
    if rng.below(3) == 0 {
        let _ = write!(
            s,
            r#","attributed_associations":[{{"id":"threat-actor--{}","name":"UNC{}","type":"threat-actor"}}]"#,
            uuid(rng),
            rng.below(5000)
        );
    }
    s.push('}');
    s
}

/// `total` indicators as pages of `page_size`, each page a `/v4/indicator` response; the
/// whole thing a JSON array of pages (what `--from-file` reads).
pub fn pages_file(total: u64, page_size: u64, seed: u64, updated_unix: i64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity((total * 900) as usize);
    out.push(b'[');
    let mut i = 0;
    while i < total {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"indicators\":[");
        let end = (i + page_size).min(total);
        for j in i..end {
            if j > i {
                out.push(b',');
            }
            out.extend_from_slice(indicator(&mut rng, j, updated_unix).as_bytes());
        }
        out.extend_from_slice(b"]");
        if end < total {
            out.extend_from_slice(format!(",\"next\":\"cursor-{end}\"").as_bytes());
        }
        out.push(b'}');
        i = end;
    }
    out.push(b']');
    out
}

/// Peak resident memory (VmHWM) of a running child, polled until it exits.
pub fn run_measured(mut cmd: std::process::Command) -> (std::process::ExitStatus, Duration, u64) {
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("the child starts");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_path)
            && let Some(kb) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status, t0.elapsed(), peak_kb);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}
