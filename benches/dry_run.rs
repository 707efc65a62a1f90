//! Target: `sync --dry-run --from-file` over a 200,000-indicator file in under 3 s and under
//! 300 MB peak memory. Runs the release binary as a user would.
//! `cargo bench --bench dry_run`

mod common;

fn main() {
    let n: u64 = std::env::var("BENCH_INDICATORS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mati.json");
    let output = dir.path().join("stix.json");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let bytes = common::pages_file(n, 1000, 42, now - 3600);
    std::fs::write(&input, &bytes).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mati-sentinel"));
    cmd.args(["sync", "--dry-run", "--json", "--from-file"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .env_clear()
        .env("STATE_DIR", dir.path().join("state"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let (status, elapsed, peak_kb) = common::run_measured(cmd);
    assert!(status.success());
    let out_len = std::fs::metadata(&output).unwrap().len();
    println!("machine: {}", common::machine());
    println!(
        "dry_run: {n} indicators, input {:.1} MB, output {:.1} MB: {:.2} s, peak RSS {:.0} MB (targets: < 3 s, < 300 MB)",
        bytes.len() as f64 / 1e6,
        out_len as f64 / 1e6,
        elapsed.as_secs_f64(),
        peak_kb as f64 / 1024.0
    );
}
