//! Crash points for the reliability tests: with `MATI_SENTINEL_FAILPOINT=<name>` the process
//! announces on stderr that it reached that point and then waits there for ever, so a test
//! can SIGKILL it at exactly that moment. Unset (always, outside tests) it costs one
//! comparison. Not a setting: nothing an operator should turn on.

use std::sync::OnceLock;

pub const VARIABLE: &str = "MATI_SENTINEL_FAILPOINT";

/// Every point, in the order a cycle reaches them.
pub const POINTS: [&str; 3] = ["after_fetch", "mid_upload", "after_cache_write"];

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(VARIABLE).ok().filter(|p| !p.is_empty()))
        .as_deref()
}

/// Waits for ever when `name` is the armed point.
pub async fn reach(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unknown failpoint {name}");
    if armed() == Some(name) {
        eprintln!("mati-sentinel: failpoint {name} reached");
        std::future::pending::<()>().await;
    }
}
