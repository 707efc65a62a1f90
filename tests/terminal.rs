//! `sync` on a terminal: live progress and a summary table; none of it in a pipe or with
//! `--json`. The terminal is a real pseudo-terminal, from util-linux `script`.

use std::process::Command;

fn example() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mati-indicators.json")
}

/// Runs the binary under a pseudo-terminal and returns everything the terminal received.
fn on_a_terminal(args: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!(
        "{} {args} --from-file {} --dry-run --output {}/out.json",
        env!("CARGO_BIN_EXE_mati-sentinel"),
        example(),
        dir.path().display()
    );
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("STATE_DIR", dir.path().join("state"))
        .env("TERM", "xterm")
        .current_dir(dir.path())
        .output()
        .expect("util-linux script runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_terminal_gets_progress_and_a_summary_table() {
    let screen = on_a_terminal("sync");
    assert!(
        screen.contains("\r\x1b[2Kpages "),
        "no progress line: {screen:?}"
    );
    assert!(screen.contains("/min"), "no rate: {screen:?}");
    for row in [
        "pages",
        "fetched",
        "kept",
        "rejected",
        "unchanged",
        "would upload",
        "refused",
        "retries",
    ] {
        assert!(
            screen.lines().any(|l| l.trim_start().starts_with(row)),
            "summary row {row} missing: {screen}"
        );
    }
    assert!(
        !screen.contains(" INFO "),
        "info logs are quiet on a terminal: {screen}"
    );
}

#[test]
fn json_on_a_terminal_and_any_pipe_get_no_progress() {
    let screen = on_a_terminal("sync --json");
    assert!(!screen.contains("\x1b[2K"), "{screen:?}");
    // The pseudo-terminal merges stderr (logs) and stdout (the report): the report starts at
    // a line holding only `{`.
    let json_start = screen
        .find("\r\n{\r\n")
        .map(|i| i + 2)
        .or_else(|| screen.starts_with("{").then_some(0))
        .unwrap();
    let json = screen[json_start..].replace("\r\n", "\n");
    let end = json.find("\n}").unwrap() + 2;
    let report: serde_json::Value =
        serde_json::from_str(&json[..end]).unwrap_or_else(|e| panic!("{e}: {screen}"));
    assert_eq!(report["stop_reason"], "completed");

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mati-sentinel"))
        .args(["sync", "--dry-run", "--from-file", example()])
        .env_clear()
        .env("STATE_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("\x1b[2K") && !all.contains("/min"), "{all}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("would upload"));
}
