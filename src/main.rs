//! The `mati-sentinel` command: parse arguments, read settings, build the parts, run.
//!
//! Exit codes: 0 the cycle finished or stopped cleanly at its time budget, 1 it failed,
//! 2 the settings or arguments are wrong. The human summary goes to stdout, logs to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use time::OffsetDateTime;

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use mati_sentinel::app::{App, BuildError, build_store, http_client};
use mati_sentinel::config::{Config, ConfigError, Needs};
use mati_sentinel::handler::{HandlerState, router, summary_line};
use mati_sentinel::mati::{MatiClient, PageReader};
use mati_sentinel::rate_limit::SlidingWindow;
use mati_sentinel::retry::RetryPolicy;
use mati_sentinel::sentinel::SentinelUploader;
use mati_sentinel::state::Precondition;
use mati_sentinel::stix::{BUNDLE_END, bundle_start};
use mati_sentinel::sync::{CycleReport, Pipeline, Progress, Sink, Source, StopReason, run_cycle};
use mati_sentinel::telemetry::{self, Telemetry};

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
    /// Azure Functions custom handler: serve the host on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT.
    Serve,
    /// Run a cycle whenever one is due (every SYNC_SCHEDULE hours) until SIGTERM or SIGINT.
    Daemon,
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime starts");
    let code = runtime.block_on(async {
        // Read here, before the settings are validated, so that even a settings error is
        // logged; `Config` reports an unusable value by name.
        let connection_string = std::env::var("APPLICATIONINSIGHTS_CONNECTION_STRING")
            .ok()
            .filter(|v| {
                !v.trim().is_empty() && !v.trim_start().starts_with("@Microsoft.KeyVault(")
            });
        // `sync` on a terminal shows progress and a summary; info logs would only interleave.
        let quiet = matches!(cli.command, Command::Sync { json: false, .. })
            && std::io::stderr().is_terminal();
        let telemetry = Arc::new(telemetry::init(
            connection_string.as_deref(),
            http_client(std::time::Duration::from_secs(
                mati_sentinel::config::defaults::HTTP_TIMEOUT_SECONDS,
            )),
            quiet,
        ));
        let code = match cli.command {
            Command::Sync {
                dry_run,
                output,
                from_file,
                json,
            } => sync(dry_run, output, from_file, json).await,
            Command::Check => check().await,
            Command::Serve => serve(telemetry.clone()).await,
            Command::Daemon => daemon(telemetry.clone()).await,
        };
        if let Ok(t) = Arc::try_unwrap(telemetry) {
            t.shutdown().await;
        }
        code
    });
    ExitCode::from(code)
}

fn config_error(e: &ConfigError) -> u8 {
    eprintln!("mati-sentinel: {e}");
    EXIT_CONFIG
}

fn build_error(e: &BuildError) -> u8 {
    match e {
        BuildError::Config(c) => config_error(c),
        other => {
            eprintln!("mati-sentinel: {other}");
            EXIT_FAILED
        }
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
    if !dry_run && from_file.is_none() {
        // A real cycle: the same parts `serve` and `daemon` use.
        let app = match App::build(config) {
            Ok(a) => a,
            Err(e) => return build_error(&e),
        };
        let display = (!json && std::io::stderr().is_terminal())
            .then(|| ProgressDisplay::start(Some(app.uploader.limiter())));
        let result = app
            .cycle(
                OffsetDateTime::now_utc(),
                None,
                display.as_ref().map(|d| d.progress.clone()),
            )
            .await;
        if let Some(d) = display {
            d.finish().await;
        }
        return report_cycle(&result.report, result.error.as_ref(), json, None);
    }
    let store = match build_store(
        &config.state,
        config.managed_identity_client_id.as_deref(),
        config.sync.http_timeout,
    ) {
        Ok(s) => s,
        Err(e) => return build_error(&e),
    };
    let http = http_client(config.sync.http_timeout);

    let mati;
    let source = match &from_file {
        Some(path) => match std::fs::File::open(path) {
            Ok(file) => Source::File(std::sync::Mutex::new(PageReader::new(Box::new(file)))),
            Err(e) => {
                eprintln!(
                    "mati-sentinel: cannot read --from-file {}: {e}",
                    path.display()
                );
                return EXIT_CONFIG;
            }
        },
        None => {
            let mc = config
                .mati
                .clone()
                .expect("Mandiant settings were required");
            mati = MatiClient::new(http.clone(), mc, config.sync.retry_policy());
            Source::Mandiant(&mati)
        }
    };

    let now = OffsetDateTime::now_utc();
    // The bundle is written as the cycle goes: opened here, one object per accepted batch,
    // closed after the cycle.
    let writer: Option<std::sync::Mutex<std::io::BufWriter<std::fs::File>>> = match &output {
        None => None,
        Some(path) => {
            let opened = std::fs::File::create(path).and_then(|f| {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                w.write_all(bundle_start(now).as_bytes())?;
                Ok(w)
            });
            match opened {
                Ok(w) => Some(std::sync::Mutex::new(w)),
                Err(e) => {
                    eprintln!(
                        "mati-sentinel: cannot write --output {}: {e}",
                        path.display()
                    );
                    return EXIT_FAILED;
                }
            }
        }
    };
    let uploader;
    let sink = if dry_run {
        Sink::DryRun(
            writer
                .as_ref()
                .map(|w| w as &std::sync::Mutex<dyn std::io::Write + Send>),
        )
    } else {
        let sc = config
            .sentinel
            .as_ref()
            .expect("Sentinel settings were required");
        let limiter = Arc::new(SlidingWindow::sentinel());
        uploader =
            match SentinelUploader::new(http.clone(), sc, limiter, config.sync.retry_policy()) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("mati-sentinel: {e}");
                    return EXIT_FAILED;
                }
            };
        Sink::Sentinel(&uploader)
    };
    // Reconciliation reads the workspace Sentinel uploads go to; a dry run uploads nothing.
    let workspace = (!dry_run)
        .then(|| mati_sentinel::app::workspace_reader(&config, &http))
        .flatten();

    let pipeline = Pipeline {
        policy: &config.policy,
        stix: &config.stix,
        sync: &config.sync,
        store: store.as_ref(),
        source,
        sink,
        workspace: workspace.as_ref(),
        stop: None,
        progress: None,
    };
    let display = (!json && std::io::stderr().is_terminal()).then(|| {
        ProgressDisplay::start(match &pipeline.sink {
            Sink::Sentinel(u) => Some(u.limiter()),
            Sink::DryRun(_) => None,
        })
    });
    let pipeline = Pipeline {
        progress: display.as_ref().map(|d| d.progress.clone()),
        ..pipeline
    };
    let deadline = tokio::time::Instant::now() + config.sync.time_budget;
    let result = run_cycle(&pipeline, now, deadline).await;
    if let Some(d) = display {
        d.finish().await;
    }

    drop(pipeline);
    if let (Some(w), Some(path)) = (writer, &output) {
        let closed = w
            .into_inner()
            .expect("dry-run output")
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|mut f| {
                f.write_all(BUNDLE_END.as_bytes())?;
                f.sync_all()
            });
        if let Err(e) = closed {
            eprintln!(
                "mati-sentinel: cannot write --output {}: {e}",
                path.display()
            );
            return EXIT_FAILED;
        }
    }
    report_cycle(
        &result.report,
        result.error.as_ref(),
        json,
        output.as_deref(),
    )
}

/// Prints a cycle's report and turns its outcome into the exit code.
fn report_cycle(
    report: &CycleReport,
    error: Option<&anyhow::Error>,
    json: bool,
    output: Option<&std::path::Path>,
) -> u8 {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("a report serialises")
        );
    } else {
        print_summary(report, output);
    }
    match error {
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
        Some(StopReason::Stopped) => "stopped on request (state saved; the next run continues)",
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
    let detail = |parts: Vec<(&str, u64)>| -> String {
        let parts: Vec<String> = parts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!("  ({})", parts.join(", "))
        }
    };
    let rejected: u64 = r.rejected.values().sum();
    let t = &r.uploaded_by_type;
    let rows: Vec<(&str, String)> = vec![
        ("windows", r.windows_completed.to_string()),
        ("pages", r.pages.to_string()),
        (
            "fetched",
            format!("{}{}", r.fetched, detail(vec![("malformed", r.malformed)])),
        ),
        ("kept", r.kept.to_string()),
        (
            "rejected",
            format!(
                "{rejected}{}",
                detail(r.rejected.iter().map(|(k, v)| (*k, *v)).collect())
            ),
        ),
        ("unchanged", r.unchanged.to_string()),
        ("repeated", r.duplicates.to_string()),
        (
            if r.dry_run {
                "would upload"
            } else {
                "uploaded"
            },
            format!(
                "{}{}",
                r.uploaded,
                detail(vec![
                    ("ipv4", t.ipv4),
                    ("fqdn", t.fqdn),
                    ("url", t.url),
                    ("hash", t.hash),
                    ("extended only", r.extended)
                ])
            ),
        ),
        ("expired", r.expired.to_string()),
        (
            "refused",
            format!("{}{}", r.refused, detail(vec![("given up", r.abandoned)])),
        ),
        ("reconciled", r.reconciled.to_string()),
        ("requests", r.upload_requests.to_string()),
        (
            "retries",
            format!("{}{}", r.retries, detail(vec![("throttled", r.throttled)])),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<13} {v}");
    }
    for f in &r.refusals {
        println!(
            "    refused {} ({}): {}",
            f.mandiant_id, f.stix_id, f.message
        );
    }
    if let Some(c) = &r.checkpoint {
        println!("  {:<13} {c}", "checkpoint");
    }
    if let Some(path) = output {
        println!("  {:<13} {}", "wrote", path.display());
    }
    if let Some(e) = &r.error {
        println!("  {:<13} {e}", "error");
    }
    if let Some(e) = &r.retrying_at_stop {
        println!("  {:<13} {e}", "retrying");
    }
}

/// Live progress on a terminal: one line on stderr, redrawn four times a second.
struct ProgressDisplay {
    progress: Arc<Progress>,
    done: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressDisplay {
    fn start(limiter: Option<Arc<SlidingWindow>>) -> Self {
        let progress = Arc::new(Progress::default());
        let done = Arc::new(tokio::sync::Notify::new());
        let (p, d) = (progress.clone(), done.clone());
        let task = tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            loop {
                let uploaded = p.uploaded.load(Ordering::Relaxed);
                let minutes = t0.elapsed().as_secs_f64() / 60.0;
                let rate = if minutes > 0.0 {
                    uploaded as f64 / minutes
                } else {
                    0.0
                };
                let waiting = if limiter.as_ref().is_some_and(|l| l.is_waiting()) {
                    " · waiting on the Sentinel rate limit"
                } else {
                    ""
                };
                eprint!(
                    "\r\x1b[2Kpages {} · fetched {} · kept {} · uploaded {} · {:.0}/min{waiting}",
                    p.pages.load(Ordering::Relaxed),
                    p.fetched.load(Ordering::Relaxed),
                    p.kept.load(Ordering::Relaxed),
                    uploaded,
                    rate
                );
                let _ = std::io::stderr().flush();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = d.notified() => break,
                }
            }
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        });
        ProgressDisplay {
            progress,
            done,
            task,
        }
    }

    async fn finish(self) {
        self.done.notify_one();
        let _ = self.task.await;
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
    let http = http_client(config.sync.http_timeout);
    let retry = RetryPolicy {
        max_attempts: 2,
        ..config.sync.retry_policy()
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
        Ok(u) => {
            match u.token(false).await {
                Ok(_) => line(
                    true,
                    "Sentinel",
                    format!(
                        "Entra token issued for {}; the upload permission is proven by the first upload",
                        sc.token_scope
                    ),
                ),
                Err(e) => line(false, "Sentinel", format!("{e}")),
            }
            if let Some(reader) = mati_sentinel::app::workspace_reader(&config, &http) {
                match reader.probe(u.source_system(), &u).await {
                    Ok(page) => line(
                        true,
                        "workspace",
                        format!(
                            "the management API lists {}{} indicator(s) from {}",
                            page.found.len(),
                            if page.next_link.is_some() { "+" } else { "" },
                            u.source_system()
                        ),
                    ),
                    Err(e) => line(false, "workspace", format!("{e}")),
                }
            }
        }
        Err(e) => line(false, "Sentinel", format!("{e}")),
    }

    match build_store(
        &config.state,
        config.managed_identity_client_id.as_deref(),
        config.sync.http_timeout,
    ) {
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

/// Resolves on SIGTERM (how the Functions host and container runtimes stop a process) or
/// SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The Functions custom handler.
async fn serve(telemetry: Arc<Telemetry>) -> u8 {
    let port = match std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT")
        .or_else(|_| std::env::var("FUNCTIONS_HTTPWORKER_PORT"))
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
    {
        Some(p) => p,
        None => {
            eprintln!(
                "mati-sentinel: FUNCTIONS_CUSTOMHANDLER_PORT: must be the port the Functions host chose (a number); `serve` runs under the host or `func start`"
            );
            return EXIT_CONFIG;
        }
    };
    let config = match Config::from_env(Needs::ALL) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let app = match App::build(config) {
        Ok(a) => Arc::new(a),
        Err(e) => return build_error(&e),
    };
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mati-sentinel: cannot listen on 127.0.0.1:{port}: {e}");
            return EXIT_FAILED;
        }
    };
    tracing::info!(port, "custom handler listening");
    match axum::serve(listener, router(HandlerState { app, telemetry }))
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mati-sentinel: the handler stopped: {e}");
            EXIT_FAILED
        }
    }
}

/// After a failed cycle the daemon waits this long before trying again, so a persistent
/// fault (a revoked secret, a missing role) does not hammer the services.
const DAEMON_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15 * 60);
/// How often the daemon looks at the checkpoint to see whether a cycle is due.
const DAEMON_POLL: Duration = Duration::from_secs(60);

/// A cycle every SYNC_SCHEDULE hours until SIGTERM or SIGINT, which stop a running cycle at
/// its next batch boundary with its state saved.
async fn daemon(telemetry: Arc<Telemetry>) -> u8 {
    let config = match Config::from_env(Needs::ALL) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let app = match App::build(config) {
        Ok(a) => a,
        Err(e) => return build_error(&e),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let notify = Arc::new(tokio::sync::Notify::new());
    {
        let (stop, notify) = (stop.clone(), notify.clone());
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("stop requested; finishing the current batch");
            stop.store(true, Ordering::Relaxed);
            notify.notify_waiters();
        });
    }
    tracing::info!(
        schedule_hours = app.config.sync.schedule_hours,
        "daemon started"
    );
    while !stop.load(Ordering::Relaxed) {
        let now = OffsetDateTime::now_utc();
        let wait = match app.is_due(now).await {
            Ok(true) => {
                let result = app.cycle(now, Some(stop.clone()), None).await;
                telemetry.flush().await;
                let line = summary_line(&result.report);
                match &result.error {
                    None => {
                        tracing::info!(report = %serde_json::to_value(&result.report).unwrap_or_default(), "{line}");
                        DAEMON_POLL
                    }
                    Some(e) => {
                        tracing::error!(error = %format!("{e:#}"), "{line}");
                        DAEMON_RETRY_AFTER_FAILURE
                    }
                }
            }
            Ok(false) => DAEMON_POLL,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the checkpoint");
                DAEMON_POLL
            }
        };
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = notify.notified() => {}
        }
    }
    tracing::info!("daemon stopped");
    0
}
