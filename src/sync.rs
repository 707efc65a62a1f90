//! One sync cycle: Mandiant pages → policy → STIX → dedupe → Sentinel → state.
//!
//! `plan_page` is pure; `run_cycle` is the one function that awaits, and it knows no HTTP or
//! storage details. Invariants: only objects Sentinel accepted enter the dedupe cache; the
//! checkpoint moves to a window's end only after every object of that window was answered by
//! Sentinel and the cache was saved; a cycle stops between batches when its budget runs out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{PolicyConfig, StixConfig, SyncConfig, UploadApi};
use crate::dedupe::{Decision, DedupeCache, Entry, Held, judge};
use crate::mati::{MatiClient, MatiError, MatiPage, PageReader, WindowQuery, decode_indicator};
use crate::policy::evaluate;
use crate::retry::OutOfTime;
use crate::sentinel::{MAX_BATCH, SentinelError, SentinelUploader};
use crate::state::{
    CHECKPOINT, Checkpoint, DEDUPE_CACHE, Precondition, REFUSED, Refused, RefusedQueue, StateStore,
};
use crate::stix::{Clock, StixIndicator, expire, fingerprint, identity, to_stix, uuid_text};
use crate::workspace::{WorkspaceError, WorkspaceReader};

/// Consecutive windows overlap by this much, so an indicator updated at a window's edge is
/// never missed; the dedupe cache makes the overlap free.
pub const WINDOW_OVERLAP_SECS: i64 = 300;
/// A window spans at most a day, so a cycle that stops early loses at most a day of paging.
pub const WINDOW_SECS: i64 = 86_400;
/// Mandiant serves 90 days back; stay a day inside.
pub const MAX_LOOKBACK_DAYS: i64 = 89;
/// Refusals kept with their messages in the report (all are counted).
const REFUSALS_KEPT: usize = 50;

/// Why a cycle ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Reached the present.
    Completed,
    /// `SYNC_TIME_BUDGET_SECONDS` ran out; state was saved and the backfill continues next time.
    TimeBudget,
    /// Asked to stop (SIGTERM or SIGINT); state was saved.
    Stopped,
    /// Another cycle holds the lock.
    AlreadyRunning,
    /// The run failed; see the error.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub mandiant_id: String,
    pub stix_id: String,
    pub message: String,
}

/// What a cycle did; printed by the CLI and returned to the Functions host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CycleReport {
    pub stop_reason: Option<StopReason>,
    pub dry_run: bool,
    pub windows_completed: u64,
    pub pages: u64,
    pub fetched: u64,
    /// Indicators that could not be decoded (skipped, not fatal).
    pub malformed: u64,
    pub kept: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    /// The same Mandiant id again in this cycle, unchanged.
    pub duplicates: u64,
    /// Already in Sentinel unchanged (dedupe cache).
    pub unchanged: u64,
    /// Sent again only to extend `valid_until`.
    pub extended: u64,
    /// Objects Sentinel accepted (or, in a dry run, would be sent).
    pub uploaded: u64,
    pub upload_requests: u64,
    /// Objects Sentinel refused with an error message (queued to be sent again next cycle).
    pub refused: u64,
    /// Refused objects dropped from the queue after `MAX_REFUSED_ATTEMPTS` cycles.
    pub abandoned: u64,
    pub refusals: Vec<Refusal>,
    pub retries: u64,
    pub throttled: u64,
    pub pruned: u64,
    pub cache_entries: u64,
    /// Objects Sentinel accepted, by indicator type.
    pub uploaded_by_type: UploadedByType,
    /// Indicators re-sent with `valid_until` now because they no longer pass the policy.
    pub expired: u64,
    /// Indicator objects of our source read back from the workspace (`ENABLE_DEDUPLICATION`).
    pub reconciled: u64,
    /// The Mandiant time span this cycle covered (RFC 3339), from its first window's start to
    /// where it stopped.
    pub window_start: Option<String>,
    pub window_end: Option<String>,
    /// The checkpoint after the cycle (RFC 3339), when one was written.
    pub checkpoint: Option<String>,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// The budget ran out while a request was being retried: what failed (an unreachable
    /// or failing service shows here, not only in the log).
    pub retrying_at_stop: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UploadedByType {
    pub ipv4: u64,
    pub fqdn: u64,
    pub url: u64,
    pub hash: u64,
}

impl UploadedByType {
    /// Counts one accepted object by its pattern's observable.
    fn count(&mut self, pattern: &str) {
        if pattern.starts_with("[ipv4-addr:") {
            self.ipv4 += 1;
        } else if pattern.starts_with("[domain-name:") {
            self.fqdn += 1;
        } else if pattern.starts_with("[url:") {
            self.url += 1;
        } else {
            self.hash += 1;
        }
    }
}

/// Live counts of a running cycle, for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub pages: AtomicU64,
    pub fetched: AtomicU64,
    pub kept: AtomicU64,
    pub uploaded: AtomicU64,
}

impl Progress {
    fn update(&self, r: &CycleReport) {
        self.pages.store(r.pages, Ordering::Relaxed);
        self.fetched.store(r.fetched, Ordering::Relaxed);
        self.kept.store(r.kept, Ordering::Relaxed);
        self.uploaded.store(r.uploaded, Ordering::Relaxed);
    }
}

/// A kept indicator, mapped and judged against the cache.
#[derive(Clone, Debug)]
pub struct Planned {
    pub mandiant_id: String,
    pub stix: StixIndicator,
    /// The workspace's own id for it, when adopted rather than derived (see `Entry`).
    pub stix_uuid: Option<[u8; 16]>,
    pub fingerprint: u64,
    pub valid_until: i64,
    /// `Unchanged` only for an object a reconciliation found in the workspace as it is: it
    /// is recorded in the cache, not sent.
    pub decision: Decision,
}

impl Planned {
    /// What the dedupe cache records once Sentinel accepted (or already holds) this object.
    pub fn cache_entry(&self) -> Entry {
        Entry {
            stix_uuid: self.stix_uuid,
            fingerprint: self.fingerprint,
            valid_until: self.valid_until,
        }
    }
}

/// Gives the object the id Sentinel already knows it by, when that is not the derived one.
fn adopt(s: &mut StixIndicator, held: Option<&Held>) -> Option<[u8; 16]> {
    let uuid = held?.stix_uuid?;
    s.id = format!("indicator--{}", uuid_text(&uuid));
    Some(uuid)
}

/// Pure: decodes, filters, maps and judges one page. `seen` holds the fingerprint of each
/// Mandiant id already planned in this cycle, so the same indicator twice is sent once, while
/// a newer version of it is still sent.
pub fn plan_page<'a>(
    raw: impl IntoIterator<Item = &'a str>,
    policy: &PolicyConfig,
    stix: &StixConfig,
    cache: &DedupeCache,
    seen: &mut HashMap<String, u64>,
    clock: &Clock,
    report: &mut CycleReport,
) -> Vec<Planned> {
    let mut out = Vec::new();
    for r in raw {
        report.fetched += 1;
        let Some(ind) = decode_indicator(r) else {
            report.malformed += 1;
            continue;
        };
        let obs = match evaluate(&ind, policy) {
            Ok(o) => o,
            Err(reason) => {
                *report.rejected.entry(reason.as_str()).or_default() += 1;
                // In Sentinel and no longer wanted: expire it there.
                if (cache.get(&ind.id).is_some() || cache.seeded() > 0)
                    && let Ok(obs) = evaluate(&ind, &any_indicator(policy))
                {
                    let mut s = expire(to_stix(&ind, &obs, stix, clock), clock);
                    let Some(held) = cache.lookup(&ind.id, &s.pattern) else {
                        continue;
                    };
                    let stix_uuid = adopt(&mut s, Some(&held));
                    seen.insert(ind.id.clone(), fingerprint(&s));
                    out.push(Planned {
                        fingerprint: fingerprint(&s),
                        mandiant_id: ind.id,
                        stix: s,
                        stix_uuid,
                        valid_until: clock.now.unix_timestamp(),
                        decision: Decision::Expire,
                    });
                }
                continue;
            }
        };
        report.kept += 1;
        let mut s = to_stix(&ind, &obs, stix, clock);
        let held = cache.lookup(&ind.id, &s.pattern);
        let stix_uuid = adopt(&mut s, held.as_ref());
        let fp = fingerprint(&s);
        if seen.get(&ind.id) == Some(&fp) {
            report.duplicates += 1;
            continue;
        }
        seen.insert(ind.id.clone(), fp);
        let valid_until = clock.valid_until_unix(obs.kind);
        let decision = judge(held.as_ref(), fp, valid_until);
        match decision {
            Decision::Unchanged => {
                report.unchanged += 1;
                // Found in the workspace as it is: the cache learns it, nothing is sent.
                if let Some(h) = held.filter(|h| h.seeded)
                    && let Some(entry) = h.entry()
                {
                    out.push(Planned {
                        mandiant_id: ind.id,
                        stix: s,
                        stix_uuid: entry.stix_uuid,
                        fingerprint: entry.fingerprint,
                        valid_until: entry.valid_until,
                        decision,
                    });
                }
                continue;
            }
            Decision::Extend => report.extended += 1,
            Decision::New | Decision::Changed | Decision::Expire => {}
        }
        out.push(Planned {
            mandiant_id: ind.id,
            stix: s,
            stix_uuid,
            fingerprint: fp,
            valid_until,
            decision,
        });
    }
    out
}

/// A saved feed, read page by page.
pub type FileReader = std::sync::Mutex<PageReader<Box<dyn std::io::Read + Send>>>;

/// A policy that keeps anything well-formed: the observable of an indicator being expired
/// (its pattern is what Sentinel matches, whatever the policy now says).
fn any_indicator(p: &PolicyConfig) -> PolicyConfig {
    PolicyConfig {
        min_confidence: 0,
        min_threat_score: 0,
        exclude_osint: false,
        include_uncategorized: true,
        hash_type: p.hash_type,
        types: crate::config::EnabledTypes {
            ipv4: true,
            fqdn: true,
            url: true,
            hash: true,
        },
    }
}

/// Where indicators come from.
pub enum Source<'a> {
    Mandiant(&'a MatiClient),
    /// Saved pages (`--from-file`): one pass, no time windows, the checkpoint untouched.
    File(FileReader),
}

/// Where a dry run writes the objects it would send: each as `,\n` and one JSON object.
pub type DryRunOutput<'a> = &'a std::sync::Mutex<dyn std::io::Write + Send>;

/// Where they go.
pub enum Sink<'a> {
    Sentinel(&'a SentinelUploader),
    /// Send nothing and change no state; write the objects out when asked to.
    DryRun(Option<DryRunOutput<'a>>),
}

pub struct Pipeline<'a> {
    pub policy: &'a PolicyConfig,
    pub stix: &'a StixConfig,
    pub sync: &'a SyncConfig,
    pub store: &'a dyn StateStore,
    pub source: Source<'a>,
    pub sink: Sink<'a>,
    /// Reads the workspace back when the cache cannot be trusted to know it
    /// (`ENABLE_DEDUPLICATION`); only with a Sentinel sink.
    pub workspace: Option<&'a WorkspaceReader>,
    /// Set by a signal handler: the cycle stops at the next batch boundary, state saved.
    pub stop: Option<Arc<AtomicBool>>,
    /// Updated as pages and batches complete, when someone shows progress.
    pub progress: Option<Arc<Progress>>,
}

pub struct CycleResult {
    pub report: CycleReport,
    pub error: Option<anyhow::Error>,
}

/// The mutable state of one cycle.
struct Run<'a> {
    p: &'a Pipeline<'a>,
    now: OffsetDateTime,
    /// The timestamps of this cycle's objects, formatted once.
    clock: Clock,
    started: Instant,
    deadline: Instant,
    cache: DedupeCache,
    /// What the next cache write must find (the version read or last written).
    cache_version: Precondition,
    cache_dirty: bool,
    seen: HashMap<String, u64>,
    pending: Vec<Planned>,
    identity_sent: bool,
    /// Objects Sentinel refused, by Mandiant id, to be sent again by the next cycle.
    refused: HashMap<String, Refused>,
    refused_version: Precondition,
    refused_dirty: bool,
    report: CycleReport,
}

enum Flow {
    Continue,
    OutOfTime,
}

impl Run<'_> {
    fn elapsed_secs(&self) -> i64 {
        self.started.elapsed().as_secs() as i64
    }

    fn stop_requested(&self) -> bool {
        self.p
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// Time to stop between batches: the budget ran out, or a stop was asked for.
    fn out_of_time(&self) -> bool {
        Instant::now() >= self.deadline || self.stop_requested()
    }

    fn early_stop_reason(&self) -> StopReason {
        if self.stop_requested() {
            StopReason::Stopped
        } else {
            StopReason::TimeBudget
        }
    }

    /// Adds planned objects; a newer version of one still pending replaces it, so a batch
    /// never carries the same id twice.
    fn enqueue(&mut self, planned: Vec<Planned>) {
        for p in planned {
            if p.decision == Decision::Unchanged {
                self.cache.record(&p.mandiant_id, p.cache_entry());
                self.cache_dirty = true;
                continue;
            }
            if let Some(existing) = self
                .pending
                .iter_mut()
                .find(|q| q.mandiant_id == p.mandiant_id)
            {
                *existing = p;
            } else {
                self.pending.push(p);
            }
        }
    }

    /// Sends full batches, or everything pending when `all` (the end of a window).
    async fn flush(&mut self, all: bool) -> anyhow::Result<Flow> {
        loop {
            let room = self.batch_room();
            if self.pending.is_empty() || (!all && self.pending.len() < room) {
                return Ok(Flow::Continue);
            }
            if self.out_of_time() {
                return Ok(Flow::OutOfTime);
            }
            let n = room.min(self.pending.len());
            let batch: Vec<Planned> = self.pending.drain(..n).collect();
            self.send(batch).await?;
            self.show_progress();
        }
    }

    /// The STIX objects API gets the Mandiant `identity` once per cycle, in the first batch.
    fn sends_identity(&self) -> bool {
        matches!(self.p.sink, Sink::Sentinel(u) if u.api() == UploadApi::StixObjects)
            && !self.identity_sent
    }

    fn batch_room(&self) -> usize {
        if self.sends_identity() {
            MAX_BATCH - 1
        } else {
            MAX_BATCH
        }
    }

    async fn send(&mut self, batch: Vec<Planned>) -> anyhow::Result<()> {
        let uploader = match self.p.sink {
            Sink::DryRun(output) => {
                for p in &batch {
                    if p.decision == Decision::Expire {
                        self.report.expired += 1;
                    } else {
                        self.report.uploaded += 1;
                        self.report.uploaded_by_type.count(&p.stix.pattern);
                    }
                }
                if let Some(out) = output {
                    let mut text = String::new();
                    for p in &batch {
                        text.push_str(",\n");
                        text.push_str(&serde_json::to_string(&p.stix)?);
                    }
                    use anyhow::Context;
                    out.lock()
                        .expect("dry-run output")
                        .write_all(text.as_bytes())
                        .context("writing the dry run's output")?;
                }
                return Ok(());
            }
            Sink::Sentinel(u) => u,
        };
        let with_identity = self.sends_identity();
        let mut objects = Vec::with_capacity(batch.len() + 1);
        if with_identity {
            objects.push(identity().to_string());
        }
        for p in &batch {
            objects.push(serde_json::to_string(&p.stix)?);
        }
        self.report.upload_requests += 1;
        let outcome = uploader
            .upload(&objects)
            .instrument(tracing::info_span!("upload_batch", objects = objects.len()))
            .await?;
        crate::failpoint::reach("mid_upload").await;
        let offset = usize::from(with_identity);
        if with_identity {
            self.identity_sent = true;
        }
        for i in outcome.accepted {
            let Some(p) = i.checked_sub(offset).and_then(|i| batch.get(i)) else {
                continue;
            };
            // A newer version got in: an older refused one must never be resent over it.
            if self.refused.remove(&p.mandiant_id).is_some() {
                self.refused_dirty = true;
            }
            if p.decision == Decision::Expire {
                self.cache.remove(&p.mandiant_id);
                self.cache_dirty = true;
                self.report.expired += 1;
                continue;
            }
            self.cache.record(&p.mandiant_id, p.cache_entry());
            self.cache_dirty = true;
            self.report.uploaded += 1;
            self.report.uploaded_by_type.count(&p.stix.pattern);
        }
        for (i, message) in outcome.refused {
            let Some(p) = i.checked_sub(offset).and_then(|i| batch.get(i)) else {
                tracing::warn!(message, "Sentinel refused the Mandiant identity object");
                continue;
            };
            // Forget it was seen, so a later copy in this cycle is tried again.
            self.seen.remove(&p.mandiant_id);
            self.report.refused += 1;
            let attempts = self.refused.get(&p.mandiant_id).map_or(0, |r| r.attempts) + 1;
            self.refused.insert(
                p.mandiant_id.clone(),
                Refused {
                    mandiant_id: p.mandiant_id.clone(),
                    object: serde_json::to_value(&p.stix)?,
                    stix_uuid: p.stix_uuid,
                    fingerprint: p.fingerprint,
                    valid_until: p.valid_until,
                    expire: p.decision == Decision::Expire,
                    attempts,
                    message: message.clone(),
                },
            );
            self.refused_dirty = true;
            tracing::warn!(mandiant_id = %p.mandiant_id, stix_id = %p.stix.id, reason = %message, "Sentinel refused an indicator");
            if self.report.refusals.len() < REFUSALS_KEPT {
                self.report.refusals.push(Refusal {
                    mandiant_id: p.mandiant_id.clone(),
                    stix_id: p.stix.id.clone(),
                    message,
                });
            }
        }
        Ok(())
    }

    async fn save_cache(&mut self) -> anyhow::Result<()> {
        if matches!(self.p.sink, Sink::DryRun(_)) {
            return Ok(());
        }
        // The queue first: an object must be in it before the checkpoint passes its window.
        if self.refused_dirty {
            let mut queue = RefusedQueue {
                format: RefusedQueue::FORMAT,
                objects: self.refused.values().cloned().collect(),
            };
            queue
                .objects
                .sort_by(|a, b| a.mandiant_id.cmp(&b.mandiant_id));
            write_tracked(
                self.p.store,
                REFUSED,
                &queue.encode(),
                &mut self.refused_version,
            )
            .await?;
            self.refused_dirty = false;
        }
        if !self.cache_dirty {
            return Ok(());
        }
        write_tracked(
            self.p.store,
            DEDUPE_CACHE,
            &self.cache.encode(),
            &mut self.cache_version,
        )
        .await?;
        self.cache_dirty = false;
        // Every save is followed by a checkpoint write (or the cycle's end).
        crate::failpoint::reach("after_cache_write").await;
        Ok(())
    }

    /// Plans one page and sends the full batches it makes.
    async fn handle_page(&mut self, page: &MatiPage) -> anyhow::Result<Flow> {
        self.report.pages += 1;
        let planned = plan_page(
            page.indicators(),
            self.p.policy,
            self.p.stix,
            &self.cache,
            &mut self.seen,
            &self.clock,
            &mut self.report,
        );
        self.enqueue(planned);
        self.show_progress();
        self.flush(false).await
    }

    fn show_progress(&self) {
        if let Some(p) = &self.p.progress {
            p.update(&self.report);
        }
    }

    /// Pages through a window from its first page.
    async fn page_window(&mut self, client: &MatiClient, first: MatiPage) -> anyhow::Result<Flow> {
        let mut page = first;
        loop {
            if let Flow::OutOfTime = self.handle_page(&page).await? {
                return Ok(Flow::OutOfTime);
            }
            let Some(next) = page.next_cursor() else {
                return Ok(Flow::Continue);
            };
            if self.out_of_time() {
                return Ok(Flow::OutOfTime);
            }
            let next = next.to_string();
            page = client.next_page(&next).await?;
        }
    }
}

/// Runs one cycle. `now` is the wall clock at the start; `deadline` ends it cleanly.
pub async fn run_cycle(p: &Pipeline<'_>, now: OffsetDateTime, deadline: Instant) -> CycleResult {
    let api = match p.sink {
        Sink::Sentinel(u) => match u.api() {
            UploadApi::StixObjects => "stix-objects",
            UploadApi::UploadIndicators => "upload-indicators",
        },
        Sink::DryRun(_) => "dry-run",
    };
    let span = tracing::info_span!("sync_cycle", otel.kind = "internal", api);
    async {
        let result = cycle_with_lock(p, now, deadline).await;
        crate::telemetry::summary_event(&result.report, api);
        result
    }
    .instrument(span)
    .await
}

async fn cycle_with_lock(p: &Pipeline<'_>, now: OffsetDateTime, deadline: Instant) -> CycleResult {
    let started = Instant::now();
    let dry_run = matches!(p.sink, Sink::DryRun(_));
    let lock = if dry_run {
        None
    } else {
        match p.store.try_lock().await {
            Ok(Some(l)) => Some(l),
            Ok(None) => {
                let report = CycleReport {
                    stop_reason: Some(StopReason::AlreadyRunning),
                    ..Default::default()
                };
                return CycleResult {
                    report,
                    error: None,
                };
            }
            Err(e) => {
                return CycleResult {
                    report: CycleReport {
                        stop_reason: Some(StopReason::Failed),
                        error: Some(format!("{e}")),
                        ..Default::default()
                    },
                    error: Some(anyhow::Error::new(e).context("taking the state lock")),
                };
            }
        }
    };

    let mut run = Run {
        p,
        now,
        clock: Clock::new(now, p.stix),
        started,
        deadline,
        cache: DedupeCache::new(),
        cache_version: Precondition::Absent,
        cache_dirty: false,
        seen: HashMap::new(),
        pending: Vec::new(),
        identity_sent: false,
        refused: HashMap::new(),
        refused_version: Precondition::Absent,
        refused_dirty: false,
        report: CycleReport {
            dry_run,
            ..Default::default()
        },
    };
    set_deadlines(p, Some(deadline));
    let result = match cycle_body(&mut run).await {
        // A run from a file, or one stopped before its first window (reconciliation, the
        // refused queue): a retry past the deadline ends it here, with nothing to move.
        Err(e) if is_out_of_time(&e) => {
            run.report.retrying_at_stop = Some(format!("{e:#}"));
            Ok(StopReason::TimeBudget)
        }
        other => other,
    };
    set_deadlines(p, None);

    // Whatever happened, keep what Sentinel accepted: the next run then sends only the rest.
    // (A no-op when the cycle already saved everything.)
    if let Err(e) = run.save_cache().await {
        tracing::error!(error = %format!("{e:#}"), "could not save the dedupe cache");
    }
    if let Some(l) = lock
        && let Err(e) = l.release().await
    {
        tracing::warn!(error = %e, "could not release the state lock; it lapses on its own");
    }
    let mut report = run.report;
    if let Sink::Sentinel(u) = p.sink {
        report.retries += u.stats.retries();
        report.throttled += u.stats.throttled();
    }
    if let Source::Mandiant(m) = &p.source {
        report.retries += m.stats.retries();
        report.throttled += m.stats.throttled();
    }
    if let Some(w) = p.workspace {
        report.retries += w.stats.retries();
        report.throttled += w.stats.throttled();
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    let error = match result {
        Ok(reason) => {
            report.stop_reason = Some(reason);
            None
        }
        Err(e) => {
            report.stop_reason = Some(StopReason::Failed);
            report.error = Some(format!("{e:#}"));
            Some(e)
        }
    };
    CycleResult { report, error }
}

fn set_deadlines(p: &Pipeline<'_>, deadline: Option<Instant>) {
    if let Source::Mandiant(m) = &p.source {
        m.deadline.set(deadline);
    }
    if let Sink::Sentinel(u) = &p.sink {
        u.deadline.set(deadline);
    }
    if let Some(w) = p.workspace {
        w.deadline.set(deadline);
    }
}

async fn cycle_body(run: &mut Run<'_>) -> anyhow::Result<StopReason> {
    use anyhow::Context;
    let p = run.p;
    let checkpoint_read = p
        .store
        .read(CHECKPOINT)
        .await
        .context("reading the checkpoint")?;
    let checkpoint = checkpoint_read
        .as_ref()
        .map(|v| Checkpoint::decode(&v.bytes))
        .transpose()
        .context("reading the checkpoint")?;
    let cache_read = p
        .store
        .read(DEDUPE_CACHE)
        .await
        .context("reading the dedupe cache")?;
    run.cache_version = Precondition::from_read(cache_read.as_ref());
    if let Some(v) = &cache_read {
        match DedupeCache::decode(&v.bytes) {
            Ok(c) => run.cache = c,
            // A cache we cannot read only costs re-uploads: start empty, and overwrite it.
            Err(e) => tracing::warn!(error = %e, "ignoring an unreadable dedupe cache"),
        }
    }
    if !matches!(p.sink, Sink::DryRun(_)) {
        let refused_read = p
            .store
            .read(REFUSED)
            .await
            .context("reading the queue of refused objects")?;
        run.refused_version = Precondition::from_read(refused_read.as_ref());
        if let Some(v) = &refused_read {
            match RefusedQueue::decode(&v.bytes) {
                Ok(q) => {
                    run.refused = q
                        .objects
                        .into_iter()
                        .map(|r| (r.mandiant_id.clone(), r))
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable queue of refused objects")
                }
            }
        }
    }
    tracing::info!(
        cache_entries = run.cache.len(),
        refused_queued = run.refused.len(),
        checkpoint = ?checkpoint.as_ref().map(|c| c.window_start),
        "cycle started"
    );

    if let (Some(reader), Sink::Sentinel(uploader)) = (p.workspace, &p.sink) {
        // An empty cache (first run, lost state, a migration) knows nothing of what is there;
        // during a backfill the workspace may still hold objects under ids we never saw.
        let untrusted =
            run.cache.is_empty() || checkpoint.as_ref().is_none_or(|c| c.backfill_in_progress);
        if untrusted {
            reconcile(run, reader, uploader)
                .instrument(tracing::info_span!("reconcile"))
                .await
                .context(
                    "reading the indicators already in the workspace (ENABLE_DEDUPLICATION)",
                )?;
        }
    }

    if let Sink::Sentinel(uploader) = &p.sink {
        resend_refused(run, uploader)
            .await
            .context("sending again the objects Sentinel refused last time")?;
    }

    let now_unix = run.now.unix_timestamp();
    let client = match &p.source {
        Source::File(reader) => {
            loop {
                let page = reader
                    .lock()
                    .expect("page reader")
                    .next_page()
                    .context("reading --from-file")?;
                let Some(page) = page else { break };
                if let Flow::OutOfTime = run.handle_page(&page).await? {
                    run.save_cache().await.context("saving the dedupe cache")?;
                    return Ok(run.early_stop_reason());
                }
            }
            if let Flow::OutOfTime = run.flush(true).await? {
                run.save_cache().await.context("saving the dedupe cache")?;
                return Ok(run.early_stop_reason());
            }
            finish(run, None, None).await?;
            return Ok(StopReason::Completed);
        }
        Source::Mandiant(c) => *c,
    };

    let earliest = now_unix - MAX_LOOKBACK_DAYS * 86_400;
    let mut start = match &checkpoint {
        Some(c) => c.window_start - WINDOW_OVERLAP_SECS,
        None => now_unix - i64::from(p.sync.initial_lookback_days) * 86_400,
    };
    if start < earliest {
        tracing::warn!(
            "the checkpoint is older than Mandiant's 90-day limit; starting {MAX_LOOKBACK_DAYS} days back"
        );
        start = earliest;
    }
    let mut checkpoint_version = Precondition::from_read(checkpoint_read.as_ref());
    let last_finished = checkpoint.as_ref().and_then(|c| c.last_finished);

    run.report.window_start = Some(rfc3339(start));
    run.report.window_end = Some(rfc3339(start));
    while start < now_unix {
        let end = (start + WINDOW_SECS).min(now_unix);
        if run.out_of_time() {
            return stop_for_budget(run, &mut checkpoint_version, start, last_finished).await;
        }
        let span = tracing::info_span!("window", start = %rfc3339(start), end = %rfc3339(end));
        let flow = fetch_window(run, client, start, end).instrument(span).await;
        match flow {
            Ok(Flow::Continue) => {}
            Ok(Flow::OutOfTime) => {
                return stop_for_budget(run, &mut checkpoint_version, start, last_finished).await;
            }
            // A retry that would wait past the deadline: a budget stop, not a failure, but
            // the report says what kept failing.
            Err(e) if is_out_of_time(&e) => {
                run.report.retrying_at_stop = Some(format!("{e:#}"));
                return stop_for_budget(run, &mut checkpoint_version, start, last_finished).await;
            }
            Err(e) => return Err(e),
        }
        // The window is in Sentinel: save the cache first, then move the checkpoint.
        run.save_cache().await.context("saving the dedupe cache")?;
        if !matches!(p.sink, Sink::DryRun(_)) {
            let cp = Checkpoint {
                format: Checkpoint::FORMAT,
                window_start: end,
                last_finished,
                backfill_in_progress: true,
            };
            write_checkpoint(run, &mut checkpoint_version, &cp).await?;
        }
        run.report.windows_completed += 1;
        run.report.window_end = Some(rfc3339(end));
        start = end;
    }
    finish(run, Some(&mut checkpoint_version), Some(start)).await?;
    Ok(StopReason::Completed)
}

/// Sentinel refused an object in this many cycles: it is dropped from the queue (and logged
/// as an error), since Sentinel will not take it as it is; a Mandiant update brings it back.
pub const MAX_REFUSED_ATTEMPTS: u32 = 5;

/// Sends again, before anything new, what Sentinel refused in earlier cycles.
async fn resend_refused(run: &mut Run<'_>, uploader: &SentinelUploader) -> anyhow::Result<()> {
    let mut ids: Vec<String> = run.refused.keys().cloned().collect();
    ids.sort();
    for chunk in ids.chunks(MAX_BATCH) {
        if run.out_of_time() {
            return Ok(());
        }
        let objects: Vec<String> = chunk
            .iter()
            .map(|id| run.refused[id].object.to_string())
            .collect();
        run.report.upload_requests += 1;
        let outcome = uploader
            .upload(&objects)
            .instrument(tracing::info_span!(
                "upload_batch",
                objects = objects.len(),
                resend = true
            ))
            .await?;
        for i in outcome.accepted {
            let Some(r) = chunk.get(i).and_then(|id| run.refused.remove(id)) else {
                continue;
            };
            if r.expire {
                run.cache.remove(&r.mandiant_id);
                run.report.expired += 1;
            } else {
                run.cache.record(
                    &r.mandiant_id,
                    Entry {
                        stix_uuid: r.stix_uuid,
                        fingerprint: r.fingerprint,
                        valid_until: r.valid_until,
                    },
                );
                run.report.uploaded += 1;
                run.report
                    .uploaded_by_type
                    .count(r.object["pattern"].as_str().unwrap_or(""));
            }
            run.cache_dirty = true;
        }
        for (i, message) in outcome.refused {
            let Some(id) = chunk.get(i) else { continue };
            run.report.refused += 1;
            let r = run.refused.get_mut(id).expect("queued");
            r.attempts += 1;
            r.message = message;
            if r.attempts >= MAX_REFUSED_ATTEMPTS {
                let r = run.refused.remove(id).expect("queued");
                run.report.abandoned += 1;
                tracing::error!(mandiant_id = %r.mandiant_id, attempts = r.attempts, reason = %r.message, "Sentinel keeps refusing an indicator; giving up on it until Mandiant updates it");
            }
        }
        run.refused_dirty = true;
        run.show_progress();
    }
    Ok(())
}

/// Seeds the cache's view of the workspace with every indicator of our source it holds.
async fn reconcile(
    run: &mut Run<'_>,
    reader: &WorkspaceReader,
    uploader: &SentinelUploader,
) -> Result<(), WorkspaceError> {
    let cache = &mut run.cache;
    let stats = reader
        .read_all(uploader.source_system(), uploader, |f| {
            cache.seed(&f.pattern, f.seeded);
        })
        .await?;
    run.report.reconciled = stats.found;
    tracing::info!(
        pages = stats.pages,
        indicators = stats.found,
        distinct_patterns = run.cache.seeded(),
        skipped = stats.skipped,
        "read the workspace's indicators"
    );
    Ok(())
}

/// Pages through one window and sends everything it kept.
async fn fetch_window(
    run: &mut Run<'_>,
    client: &MatiClient,
    start: i64,
    end: i64,
) -> anyhow::Result<Flow> {
    use anyhow::Context;
    let mut restarted = false;
    loop {
        let first = client
            .first_page(&WindowQuery {
                start_epoch: start,
                end_epoch: end,
                min_confidence: run.p.policy.min_confidence,
                exclude_osint: run.p.policy.exclude_osint,
            })
            .await
            .with_context(|| {
                format!(
                    "fetching Mandiant indicators updated from {} to {}",
                    rfc3339(start),
                    rfc3339(end)
                )
            })?;
        match run.page_window(client, first).await {
            Ok(Flow::OutOfTime) => return Ok(Flow::OutOfTime),
            Ok(Flow::Continue) => break,
            // A `next` cursor that lapsed (a slow cycle, a long retry): page the window
            // again from its start; what was already planned is skipped as seen.
            Err(e) if !restarted && is_expired_cursor(&e) => {
                tracing::warn!(error = %format!("{e:#}"), "Mandiant refused the next cursor; paging the window again from its start");
                restarted = true;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "paging Mandiant indicators updated from {} to {}",
                    rfc3339(start),
                    rfc3339(end)
                )));
            }
        }
    }
    // Only a window that fetched something to send is worth crashing after.
    if !run.pending.is_empty() {
        crate::failpoint::reach("after_fetch").await;
    }
    run.flush(true).await
}

/// Mandiant answers a `next` it no longer knows with 400.
fn is_expired_cursor(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<MatiError>(),
            Some(MatiError::Status { status: 400, what, .. }) if what.contains("(next)")
        )
    })
}

fn is_out_of_time(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<OutOfTime>()
            || matches!(c.downcast_ref::<MatiError>(), Some(MatiError::OutOfTime(_)))
            || matches!(
                c.downcast_ref::<SentinelError>(),
                Some(SentinelError::OutOfTime(_))
            )
            || matches!(
                c.downcast_ref::<WorkspaceError>(),
                Some(WorkspaceError::OutOfTime(_))
            )
    })
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .map(crate::stix::format_timestamp)
        .unwrap_or_else(|_| unix.to_string())
}

/// A conditional write that moves `version` on, so the next write of `name` by this cycle
/// expects what this one left.
async fn write_tracked(
    store: &dyn StateStore,
    name: &str,
    bytes: &[u8],
    version: &mut Precondition,
) -> Result<(), crate::state::StateError> {
    let v = store.write(name, bytes, version.clone()).await?;
    *version = Precondition::Matches(v);
    Ok(())
}

async fn write_checkpoint(
    run: &mut Run<'_>,
    version: &mut Precondition,
    cp: &Checkpoint,
) -> anyhow::Result<()> {
    use anyhow::Context;
    write_tracked(run.p.store, CHECKPOINT, &cp.encode(), version)
        .await
        .context("saving the checkpoint")?;
    run.report.checkpoint = Some(rfc3339(cp.window_start));
    Ok(())
}

/// The budget ran out inside the window starting at `start`: keep what was accepted, leave
/// the checkpoint at the window's start, and mark the backfill in progress.
async fn stop_for_budget(
    run: &mut Run<'_>,
    version: &mut Precondition,
    start: i64,
    last_finished: Option<i64>,
) -> anyhow::Result<StopReason> {
    use anyhow::Context;
    tracing::info!("time budget reached; stopping between batches");
    run.save_cache().await.context("saving the dedupe cache")?;
    if !matches!(run.p.sink, Sink::DryRun(_)) {
        let cp = Checkpoint {
            format: Checkpoint::FORMAT,
            // The overlap is subtracted again on resume; add it here so a resumed window
            // starts where this one did.
            window_start: start + WINDOW_OVERLAP_SECS,
            last_finished,
            backfill_in_progress: true,
        };
        write_checkpoint(run, version, &cp).await?;
    }
    Ok(run.early_stop_reason())
}

async fn finish(
    run: &mut Run<'_>,
    version: Option<&mut Precondition>,
    window_start: Option<i64>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let pruned = run.cache.prune(run.now.unix_timestamp());
    run.report.pruned = pruned as u64;
    if pruned > 0 {
        run.cache_dirty = true;
    }
    run.save_cache().await.context("saving the dedupe cache")?;
    run.report.cache_entries = run.cache.len() as u64;
    if let (Some(version), Some(start)) = (version, window_start)
        && !matches!(run.p.sink, Sink::DryRun(_))
    {
        let cp = Checkpoint {
            format: Checkpoint::FORMAT,
            window_start: start,
            last_finished: Some(run.now.unix_timestamp() + run.elapsed_secs()),
            backfill_in_progress: false,
        };
        write_checkpoint(run, version, &cp).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, EnabledTypes, HashType};
    use time::Duration;

    fn policy() -> PolicyConfig {
        PolicyConfig {
            min_confidence: 80,
            min_threat_score: 80,
            exclude_osint: true,
            include_uncategorized: true,
            hash_type: HashType::Md5,
            types: EnabledTypes {
                ipv4: true,
                fqdn: true,
                url: true,
                hash: true,
            },
        }
    }

    fn stix() -> StixConfig {
        StixConfig {
            ipv4_days: 7,
            fqdn_days: 7,
            url_days: 7,
            hash_days: 90,
            action: Action::Alert,
            passive_only: false,
        }
    }

    /// `plan_page` with the tests' policy and mapping, and nothing seen yet.
    fn plan<'a>(
        raw: impl IntoIterator<Item = &'a str>,
        cache: &DedupeCache,
        clock: &Clock,
        report: &mut CycleReport,
    ) -> Vec<Planned> {
        plan_page(
            raw,
            &policy(),
            &stix(),
            cache,
            &mut HashMap::new(),
            clock,
            report,
        )
    }

    fn page(json: &str) -> MatiPage {
        MatiPage::parse(json.as_bytes().to_vec()).unwrap()
    }

    const NOW: OffsetDateTime = time::macros::datetime!(2026-12-03 12:00:00 UTC);

    #[test]
    fn plan_page_counts_by_reason_and_skips_duplicates_and_unchanged() {
        let pg = page(
            r#"{"indicators":[
            {"id":"ipv4--a","type":"ipv4","value":"1.1.1.1","mscore":90,"threat_rating":{"threat_score":90}},
            {"id":"ipv4--a","type":"ipv4","value":"1.1.1.1","mscore":90,"threat_rating":{"threat_score":90}},
            {"id":"ipv4--b","type":"ipv4","value":"2.2.2.2","mscore":10,"threat_rating":{"threat_score":90}},
            {"id":"ipv4--c","type":"ipv4","value":"3.3.3.3","mscore":90,"threat_rating":{"threat_score":10}},
            {"id":"ipv6--d","type":"ipv6","value":"::1","mscore":90},
            {"id":7},
            {"id":"fqdn--e","type":"fqdn","value":"e.example","mscore":90,"threat_rating":{"threat_score":90}}
        ]}"#,
        );
        let mut cache = DedupeCache::new();
        let mut report = CycleReport::default();
        let mut seen = HashMap::new();
        let first = plan_page(
            pg.indicators(),
            &policy(),
            &stix(),
            &cache,
            &mut seen,
            &Clock::new(NOW, &stix()),
            &mut report,
        );
        let ids: Vec<&str> = first.iter().map(|p| p.mandiant_id.as_str()).collect();
        assert_eq!(ids, vec!["ipv4--a", "fqdn--e"]);
        assert_eq!(report.fetched, 7);
        assert_eq!(report.malformed, 1);
        assert_eq!(report.kept, 3);
        assert_eq!(report.duplicates, 1);
        assert_eq!(
            report.rejected,
            BTreeMap::from([
                ("low_confidence", 1),
                ("low_threat_score", 1),
                ("unsupported_type", 1)
            ])
        );
        // Once Sentinel has them, a later cycle skips both as unchanged.
        for p in &first {
            cache.record(&p.mandiant_id, p.cache_entry());
        }
        let mut report = CycleReport::default();
        let again = plan_page(
            pg.indicators(),
            &policy(),
            &stix(),
            &cache,
            &mut HashMap::new(),
            &Clock::new(NOW, &stix()),
            &mut report,
        );
        assert!(again.is_empty());
        assert_eq!(report.unchanged, 2);
        // Two days later the same content extends its lifetime.
        let mut report = CycleReport::default();
        let later = plan_page(
            pg.indicators(),
            &policy(),
            &stix(),
            &cache,
            &mut HashMap::new(),
            &Clock::new(NOW + Duration::days(2), &stix()),
            &mut report,
        );
        assert_eq!(later.len(), 2);
        assert!(later.iter().all(|p| p.decision == Decision::Extend));
        assert_eq!(report.extended, 2);
    }

    #[test]
    fn an_uploaded_indicator_that_stops_qualifying_is_expired_once() {
        let before = page(
            r#"{"indicators":[{"id":"ipv4--a","type":"ipv4","value":"1.1.1.1","mscore":90,"first_seen":"2026-11-01T00:00:00.000Z","threat_rating":{"threat_score":90}}]}"#,
        );
        let after = page(
            r#"{"indicators":[{"id":"ipv4--a","type":"ipv4","value":"1.1.1.1","mscore":90,"first_seen":"2026-11-01T00:00:00.000Z","threat_rating":{"threat_score":20}},
                              {"id":"ipv4--b","type":"ipv4","value":"2.2.2.2","mscore":90,"threat_rating":{"threat_score":20}}]}"#,
        );
        let clock = Clock::new(NOW, &stix());
        let mut cache = DedupeCache::new();
        let mut report = CycleReport::default();
        for p in plan(before.indicators(), &cache, &clock, &mut report) {
            cache.record(&p.mandiant_id, p.cache_entry());
        }
        let mut report = CycleReport::default();
        let planned = plan(after.indicators(), &cache, &clock, &mut report);
        // Only the one Sentinel has is expired; the other was never uploaded.
        assert_eq!(planned.len(), 1);
        let p = &planned[0];
        assert_eq!(
            (p.mandiant_id.as_str(), p.decision),
            ("ipv4--a", Decision::Expire)
        );
        assert_eq!(
            p.stix.id,
            crate::stix::indicator_id("ipv4--a"),
            "the same STIX id"
        );
        assert_eq!(
            p.stix.valid_until, "2026-12-03T12:00:00.000Z",
            "valid until now"
        );
        assert_eq!(p.stix.valid_from, "2026-11-01T00:00:00.000Z");
        assert_eq!(report.rejected.get("low_threat_score"), Some(&2));
    }

    #[test]
    fn objects_found_in_the_workspace_are_adopted_or_learnt_never_duplicated() {
        let feed = page(
            r#"{"indicators":[
                {"id":"ipv4--own","type":"ipv4","value":"1.1.1.1","mscore":90,"threat_rating":{"threat_score":90}},
                {"id":"ipv4--vendor","type":"ipv4","value":"2.2.2.2","mscore":90,"threat_rating":{"threat_score":90}},
                {"id":"ipv4--gone","type":"ipv4","value":"3.3.3.3","mscore":90,"threat_rating":{"threat_score":10}},
                {"id":"ipv4--new","type":"ipv4","value":"4.4.4.4","mscore":90,"threat_rating":{"threat_score":90}}]}"#,
        );
        let clock = Clock::new(NOW, &stix());
        // What an earlier install uploaded, as it would read back.
        let mut earlier = CycleReport::default();
        let own = plan(
            feed.indicators().take(1),
            &DedupeCache::new(),
            &clock,
            &mut earlier,
        )
        .remove(0);
        let mut cache = DedupeCache::new();
        cache.seed(
            &own.stix.pattern,
            crate::dedupe::Seeded {
                stix_uuid: crate::dedupe::derived_uuid("ipv4--own"),
                fingerprint: crate::stix::fingerprint_value(
                    &serde_json::to_value(&own.stix).unwrap(),
                ),
                valid_until: own.valid_until,
            },
        );
        let vendor = [0x5a; 16];
        for pattern in [
            "[ipv4-addr:value = '2.2.2.2']",
            "[ipv4-addr:value = '3.3.3.3']",
        ] {
            cache.seed(
                pattern,
                crate::dedupe::Seeded {
                    stix_uuid: vendor,
                    fingerprint: None,
                    valid_until: NOW.unix_timestamp() + 86_400,
                },
            );
        }
        let mut report = CycleReport::default();
        let planned = plan(feed.indicators(), &cache, &clock, &mut report);
        let by_id: HashMap<&str, &Planned> = planned
            .iter()
            .map(|p| (p.mandiant_id.as_str(), p))
            .collect();
        assert_eq!(by_id.len(), 4);

        let own = by_id["ipv4--own"];
        assert_eq!(
            own.decision,
            Decision::Unchanged,
            "there as it is: learnt, not sent"
        );
        assert_eq!(own.cache_entry().stix_uuid, None);
        assert_eq!(report.unchanged, 1);

        let adopted = by_id["ipv4--vendor"];
        assert_eq!(adopted.decision, Decision::Changed);
        assert_eq!(
            adopted.stix.id,
            format!("indicator--{}", uuid_text(&vendor))
        );
        assert_eq!(
            adopted.cache_entry().stix_uuid,
            Some(vendor),
            "the cache keeps the adopted id"
        );
        assert_eq!(adopted.fingerprint, fingerprint(&adopted.stix));

        let gone = by_id["ipv4--gone"];
        assert_eq!(
            gone.decision,
            Decision::Expire,
            "in the workspace and no longer wanted"
        );
        assert_eq!(gone.stix.id, format!("indicator--{}", uuid_text(&vendor)));

        let new = by_id["ipv4--new"];
        assert_eq!(new.decision, Decision::New);
        assert_eq!(new.stix.id, crate::stix::indicator_id("ipv4--new"));

        // Recorded with its adopted id, later cycles keep using it without the seed.
        let mut later = DedupeCache::new();
        later.record("ipv4--vendor", adopted.cache_entry());
        let again = plan(
            feed.indicators().skip(1).take(1),
            &later,
            &clock,
            &mut CycleReport::default(),
        );
        assert!(again.is_empty(), "unchanged under the adopted id");
    }
}
