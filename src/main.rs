//! The `mati-sentinel` command: parse arguments, read settings, build the parts, run.
//!
//! Exit codes: 0 the cycle finished or stopped cleanly at its time budget, 1 it failed,
//! 2 the settings or arguments are wrong. The human summary goes to stdout, logs to stderr.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use time::OffsetDateTime;

use mati_sentinel::config::{Config, ConfigError, Needs, Problem, StateConfig};
use mati_sentinel::mati::{APP_NAME, MatiClient, pages_from_json};
use mati_sentinel::rate_limit::SlidingWindow;
use mati_sentinel::retry::RetryPolicy;
use mati_sentinel::sentinel::SentinelUploader;
use mati_sentinel::state::file::FileStore;
use mati_sentinel::state::{Precondition, StateStore};
use mati_sentinel::stix::bundle;
use mati_sentinel::sync::{CycleReport, Pipeline, Sink, Source, StopReason, run_cycle};

#[derive(Parser)]
#[command(name = "mati-sentinel", version, about = "Mandiant Threat Intelligence indicators into Microsoft Sentinel", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one sync cycle now.
    Sync {
        /// Upload nothing and change no state; with --output, write the STIX objects.
        #[arg(long)]
        dry_run: bool,
        /// Where a dry run writes its STIX bundle.
        #[arg(long, value_name = "FILE", requires = "dry_run")]
        output: Option<PathBuf>,
        /// Read indicators from a saved /v4/indicator response (or a JSON array of them).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Print the cycle report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the settings and each connection, without uploading.
    Check,
}

const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime starts");
    let code = runtime.block_on(async {
        match cli.command {
            Command::Sync {
                dry_run,
                output,
                from_file,
                json,
            } => sync(dry_run, output, from_file, json).await,
            Command::Check => check().await,
        }
    });
    ExitCode::from(code)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,azure_core=warn,azure_identity=warn,hyper=warn,reqwest=warn")
    });
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
        || !std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn config_error(e: &ConfigError) -> u8 {
    eprintln!("mati-sentinel: {e}");
    EXIT_CONFIG
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(APP_NAME)
        .connect_timeout(Duration::from_secs(15))
        .build()
        .expect("the HTTP client builds")
}

fn build_store(state: &StateConfig) -> Result<Box<dyn StateStore>, ConfigError> {
    let unsupported = |setting: &'static str| {
        ConfigError {
        problems: vec![Problem {
            setting,
            message: "selects Blob Storage state, which this build does not support yet; unset it to keep state in STATE_DIR".into(),
        }],
    }
    };
    match state {
        StateConfig::Folder(dir) => Ok(Box::new(FileStore::new(dir))),
        StateConfig::BlobManagedIdentity(_) => Err(unsupported("STATE_CONTAINER_URL")),
        StateConfig::BlobSas(_) => Err(unsupported("STATE_CONTAINER_SAS_URL")),
        StateConfig::DevelopmentStorage => Err(unsupported("AzureWebJobsStorage")),
    }
}

async fn sync(
    dry_run: bool,
    output: Option<PathBuf>,
    from_file: Option<PathBuf>,
    json: bool,
) -> u8 {
    let needs = Needs {
        mati: from_file.is_none(),
        sentinel: !dry_run,
    };
    let config = match Config::from_env(needs) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let store = match build_store(&config.state) {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    let http = http_client();

    let mati;
    let source = match &from_file {
        Some(path) => {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!(
                        "mati-sentinel: cannot read --from-file {}: {e}",
                        path.display()
                    );
                    return EXIT_CONFIG;
                }
            };
            match pages_from_json(&bytes) {
                Ok(pages) => Source::Pages(pages),
                Err(e) => {
                    eprintln!(
                        "mati-sentinel: --from-file {} is not a /v4/indicator response or an array of them: {e}",
                        path.display()
                    );
                    return EXIT_CONFIG;
                }
            }
        }
        None => {
            let mc = config
                .mati
                .clone()
                .expect("Mandiant settings were required");
            mati = MatiClient::new(http.clone(), mc, RetryPolicy::DEFAULT);
            Source::Mandiant(&mati)
        }
    };

    let uploader;
    let sink = if dry_run {
        Sink::DryRun
    } else {
        let sc = config
            .sentinel
            .as_ref()
            .expect("Sentinel settings were required");
        let limiter = Arc::new(SlidingWindow::sentinel());
        uploader = match SentinelUploader::new(http.clone(), sc, limiter, RetryPolicy::DEFAULT) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("mati-sentinel: {e}");
                return EXIT_FAILED;
            }
        };
        Sink::Sentinel(&uploader)
    };
    if config.sync.enable_deduplication {
        tracing::warn!(
            "ENABLE_DEDUPLICATION is set, but workspace reconciliation is not in this build yet; the local dedupe cache still applies"
        );
    }

    let pipeline = Pipeline {
        policy: &config.policy,
        stix: &config.stix,
        sync: &config.sync,
        store: store.as_ref(),
        source,
        sink,
    };
    let now = OffsetDateTime::now_utc();
    let deadline = tokio::time::Instant::now() + config.sync.time_budget;
    let result = run_cycle(&pipeline, now, deadline).await;

    if let Some(path) = &output {
        let text = serde_json::to_string_pretty(&bundle(&result.dry_run_objects, now))
            .expect("a bundle serialises");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!(
                "mati-sentinel: cannot write --output {}: {e}",
                path.display()
            );
            return EXIT_FAILED;
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result.report).expect("a report serialises")
        );
    } else {
        print_summary(&result.report, output.as_deref());
    }
    match &result.error {
        Some(e) => {
            tracing::error!(error = %format!("{e:#}"), "cycle failed");
            eprintln!("mati-sentinel: cycle failed: {e:#}");
            EXIT_FAILED
        }
        None => 0,
    }
}

fn print_summary(r: &CycleReport, output: Option<&std::path::Path>) {
    let how = match r.stop_reason {
        Some(StopReason::Completed) => "completed",
        Some(StopReason::TimeBudget) => {
            "stopped at its time budget (state saved; the next run continues)"
        }
        Some(StopReason::AlreadyRunning) => "skipped: another cycle holds the state lock",
        Some(StopReason::Failed) | None => "failed",
    };
    let mode = if r.dry_run { " (dry run)" } else { "" };
    println!(
        "mati-sentinel sync{mode}: {how} in {:.1}s",
        r.duration_ms as f64 / 1000.0
    );
    if r.stop_reason == Some(StopReason::AlreadyRunning) {
        return;
    }
    println!(
        "  fetched   {} indicator(s) on {} page(s), {} window(s) completed; {} malformed",
        r.fetched, r.pages, r.windows_completed, r.malformed
    );
    let rejected: Vec<String> = r.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "  kept      {}; rejected {}",
        r.kept,
        if rejected.is_empty() {
            "none".to_string()
        } else {
            rejected.join(", ")
        }
    );
    println!(
        "  skipped   {} unchanged in Sentinel, {} repeated in this cycle",
        r.unchanged, r.duplicates
    );
    let verb = if r.dry_run {
        "would upload"
    } else {
        "uploaded"
    };
    println!(
        "  {verb:<9} {} ({} extended only) in {} request(s); refused by Sentinel {}",
        r.uploaded, r.extended, r.upload_requests, r.refused
    );
    for f in &r.refusals {
        println!(
            "    refused {} ({}): {}",
            f.mandiant_id, f.stix_id, f.message
        );
    }
    println!("  retries   {} ({} throttled)", r.retries, r.throttled);
    if let Some(c) = &r.checkpoint {
        println!("  checkpoint {c}");
    }
    if let Some(path) = output {
        println!("  wrote     {}", path.display());
    }
    if let Some(e) = &r.error {
        println!("  error     {e}");
    }
}

/// One line per check, with a fix on failure.
async fn check() -> u8 {
    let config = match Config::from_env(Needs::ALL) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    println!("ok    settings");
    let mut failed = false;
    let mut line = |ok: bool, what: &str, detail: String| {
        failed |= !ok;
        println!("{}  {what}: {detail}", if ok { "ok  " } else { "FAIL" });
    };
    let http = http_client();
    let retry = RetryPolicy {
        max_attempts: 2,
        ..RetryPolicy::DEFAULT
    };

    let mati = MatiClient::new(http.clone(), config.mati.clone().expect("required"), retry);
    match mati.check().await {
        Ok(n) => line(
            true,
            "Mandiant",
            format!("token issued; {n} entitlement(s)"),
        ),
        Err(e) => line(false, "Mandiant", format!("{e}")),
    }

    let sc = config.sentinel.as_ref().expect("required");
    match SentinelUploader::new(http.clone(), sc, Arc::new(SlidingWindow::sentinel()), retry) {
        Ok(u) => match u.token(false).await {
            Ok(_) => line(
                true,
                "Sentinel",
                format!(
                    "Entra token issued for {}; the upload permission is proven by the first upload",
                    sc.token_scope
                ),
            ),
            Err(e) => line(false, "Sentinel", format!("{e}")),
        },
        Err(e) => line(false, "Sentinel", format!("{e}")),
    }

    match build_store(&config.state) {
        Err(e) => line(false, "state", e.to_string().trim().to_string()),
        Ok(store) => {
            let probe = "check-probe";
            let result = async {
                let current = store.read(probe).await?;
                let body = OffsetDateTime::now_utc().unix_timestamp().to_string();
                store
                    .write(
                        probe,
                        body.as_bytes(),
                        Precondition::from_read(current.as_ref()),
                    )
                    .await?;
                let back = store.read(probe).await?;
                Ok::<bool, mati_sentinel::state::StateError>(
                    back.is_some_and(|b| b.bytes == body.as_bytes()),
                )
            }
            .await;
            match result {
                Ok(true) => line(
                    true,
                    "state",
                    format!("{} is readable and writable", store.describe()),
                ),
                Ok(false) => line(
                    false,
                    "state",
                    format!("{} did not return what was written", store.describe()),
                ),
                Err(e) => line(
                    false,
                    "state",
                    format!("{e}; fix: check STATE_DIR (or the Blob settings) and permissions"),
                ),
            }
        }
    }
    if failed { EXIT_FAILED } else { 0 }
}
