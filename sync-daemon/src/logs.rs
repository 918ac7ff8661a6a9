//! What the daemon tells operators: one type per outcome, whose `emit` writes one log line (a
//! fixed sentence, its facts as fields, and an `event` name that tools and tests match on) and
//! bumps that outcome's metrics. The design notes' operator lines keep their wording
//! (`Lab record indexes created`, `Starting labs refresh cycle`, `Worker <id>: synced=…`,
//! `Labs refresh complete: …`).

use std::time::Duration;

use bson::DateTime;
use cml_client::payload::clip;
use shared::metrics::{Field, Kind, Origin, Outcome, Reason};

use crate::{metrics::Metrics, pass::PassReport, worker::WorkerOutcome, Error};

/// An outcome worth a log line and its metrics.
pub trait LogLine {
    fn emit(&self, metrics: &Metrics);
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Indexes exist (created now or before).
#[derive(Debug)]
pub struct StoragePrepared<'a> {
    pub collection: &'a str,
}

impl LogLine for StoragePrepared<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "indexes_ready",
            collection = self.collection,
            "Lab record indexes created"
        );
    }
}

/// Documents of the previous system were rewritten to the stored contract.
#[derive(Debug)]
pub struct LegacyUpgraded {
    pub upgraded: u64,
}

impl LogLine for LegacyUpgraded {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "legacy_records_upgraded",
            upgraded = self.upgraded,
            "Upgraded lab records written by the previous system or an earlier version"
        );
    }
}

/// MongoDB cannot be prepared yet; the daemon tries again.
#[derive(Debug)]
pub struct StorageNotReady<'a> {
    pub error: &'a Error,
    pub attempt: u32,
    pub retry_in: Duration,
}

impl LogLine for StorageNotReady<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::error!(
            event = "storage_not_ready", error = %self.error, attempt = self.attempt,
            retry_in_ms = ms(self.retry_in),
            "Cannot prepare MongoDB (indexes); retrying"
        );
    }
}

/// A cycle begins.
#[derive(Debug)]
pub struct CycleStarted {
    pub workers: usize,
}

impl LogLine for CycleStarted {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "cycle_started",
            workers = self.workers,
            "Starting labs refresh cycle"
        );
    }
}

/// This replica took the lease over in the middle of a cycle: it syncs the rest.
#[derive(Debug)]
pub struct CycleResumed {
    /// When the interrupted cycle began.
    pub began: DateTime,
    /// Active workers no sync wrote to since then: synced now.
    pub workers: usize,
    /// Active workers synced since then: left alone.
    pub already_synced: usize,
}

impl LogLine for CycleResumed {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "cycle_resumed",
            began = %self.began,
            workers = self.workers,
            already_synced = self.already_synced,
            "Resuming the labs refresh cycle another replica left unfinished: {} workers left, {} already synced",
            self.workers, self.already_synced
        );
    }
}

/// The worker list could not be read, so the cycle did not start.
#[derive(Debug)]
pub struct CycleSkipped<'a> {
    pub error: &'a Error,
    pub retry_in: Duration,
}

impl LogLine for CycleSkipped<'_> {
    fn emit(&self, m: &Metrics) {
        m.cycles.get(&Outcome("registry_failed")).inc();
        tracing::warn!(
            event = "cycle_skipped", error = %self.error, kind = self.error.metric_label(),
            retry_in_ms = ms(self.retry_in),
            "Cannot read the worker registry; the cycle is skipped"
        );
    }
}

/// A cycle is over: every worker synced, failed or was skipped.
#[derive(Debug)]
pub struct CycleCompleted<'a> {
    pub report: &'a PassReport,
    pub purged: u64,
}

impl LogLine for CycleCompleted<'_> {
    fn emit(&self, m: &Metrics) {
        let r = self.report;
        let t = r.totals;
        m.cycles.get(&Outcome(r.outcome())).inc();
        m.cycle_duration.observe(r.duration.as_secs_f64());
        m.note_cycle_end(DateTime::now());
        m.labs_purged.inc_by(self.purged);
        let failed: Vec<&str> = r
            .failed
            .iter()
            .map(|f| f.target.worker_id.as_str())
            .collect();
        tracing::info!(
            event = "cycle_completed", workers = r.workers, synced = t.synced, created = t.created,
            updated = t.updated, unchanged = t.unchanged, removed = t.removed, purged = self.purged,
            failed_workers = r.failed.len(), skipped_workers = r.skipped.len(), failed = ?failed,
            cml_calls = r.cml_calls, mongodb_writes = r.mongodb_writes, duration_ms = ms(r.duration),
            "Labs refresh complete: synced={}, created={}, updated={}, unchanged={}, removed={}, purged={}, failed_workers={}, duration_ms={}",
            t.synced, t.created, t.updated, t.unchanged, t.removed, self.purged, r.failed.len(), ms(r.duration)
        );
    }
}

/// A batch of retries begins.
#[derive(Debug)]
pub struct RetriesStarted {
    pub workers: usize,
}

impl LogLine for RetriesStarted {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "retries_started",
            workers = self.workers,
            "Retrying failed workers"
        );
    }
}

/// A batch of retries is over.
#[derive(Debug)]
pub struct RetriesCompleted<'a> {
    pub report: &'a PassReport,
}

impl LogLine for RetriesCompleted<'_> {
    fn emit(&self, m: &Metrics) {
        let r = self.report;
        m.cycles
            .get(&Outcome(if r.outcome() == "success" {
                "retry_success"
            } else {
                "retry_partial"
            }))
            .inc();
        let failed: Vec<&str> = r
            .failed
            .iter()
            .map(|f| f.target.worker_id.as_str())
            .collect();
        tracing::info!(
            event = "retries_completed", workers = r.workers, synced = r.totals.synced,
            failed_workers = r.failed.len(), failed = ?failed, duration_ms = ms(r.duration),
            "Retry of failed workers complete"
        );
    }
}

/// One worker synced: its labs are written and its listing compared.
#[derive(Debug)]
pub struct WorkerSynced<'a> {
    pub worker_id: &'a str,
    pub outcome: &'a WorkerOutcome,
    pub took: Duration,
}

impl LogLine for WorkerSynced<'_> {
    fn emit(&self, m: &Metrics) {
        let o = self.outcome;
        let c = o.counts;
        m.worker_syncs.get(&Outcome("success")).inc();
        m.worker_duration.observe(self.took.as_secs_f64());
        m.labs_synced.inc_by(c.synced as u64);
        m.labs_created.inc_by(o.applied.created);
        m.labs_updated.inc_by(c.updated as u64);
        m.labs_removed.inc_by(c.removed as u64);
        m.write_conflicts.inc_by(o.applied.conflicts);
        tracing::info!(
            event = "worker_synced",
            worker_id = self.worker_id,
            synced = c.synced,
            created = c.created,
            updated = c.updated,
            unchanged = c.unchanged,
            removed = c.removed,
            reappeared = c.reappeared,
            conflicts = o.applied.conflicts,
            complete = o.complete,
            source = o.source,
            groups = groups_source(&o.groups),
            cml_calls = o.cml_calls,
            mongodb_writes = o.applied.round_trips,
            duration_ms = ms(self.took),
            "Worker {}: synced={}, created={}, updated={}, unchanged={}, removed={}",
            self.worker_id,
            c.synced,
            c.created,
            c.updated,
            c.unchanged,
            c.removed
        );
    }
}

/// Where a listing's groups came from, for the log line.
fn groups_source(groups: &cml_client::GroupsRead) -> &'static str {
    match groups {
        cml_client::GroupsRead::InLabs => "lab_objects",
        cml_client::GroupsRead::Associations => "associations",
        cml_client::GroupsRead::Kept => "kept",
        cml_client::GroupsRead::Unread { .. } => "unread",
    }
}

/// The worker's labs hold no groups and its group associations could not be read: its
/// labs are synced, each record keeping the groups it had.
#[derive(Debug)]
pub struct GroupsUnread<'a> {
    pub worker_id: &'a str,
    /// The error's fixed label.
    pub kind: &'a str,
    pub error: &'a str,
}

impl LogLine for GroupsUnread<'_> {
    fn emit(&self, m: &Metrics) {
        let warning = shared::status::SyncWarning::GroupsUnread.as_str();
        m.worker_warnings.get(&Kind(warning)).inc();
        tracing::warn!(
            event = "groups_unread", worker_id = self.worker_id, kind = self.kind,
            error = self.error,
            "Cannot read the worker's lab groups (its group associations); its labs are synced, each keeping the groups it had"
        );
    }
}

/// The worker's users or groups could not be read: its labs are synced, who may see them
/// stays as last read.
#[derive(Debug)]
pub struct AccessUnread<'a> {
    pub worker_id: &'a str,
    /// The error's fixed label.
    pub kind: &'a str,
    pub error: &'a str,
}

impl LogLine for AccessUnread<'_> {
    fn emit(&self, m: &Metrics) {
        let warning = shared::status::SyncWarning::AccessUnread.as_str();
        m.worker_warnings.get(&Kind(warning)).inc();
        tracing::warn!(
            event = "access_unread", worker_id = self.worker_id, kind = self.kind,
            error = self.error,
            "Cannot read the worker's users or groups; its labs are synced, who may see them stays as last read"
        );
    }
}

/// One worker's sync failed; its records are as they were.
#[derive(Debug)]
pub struct WorkerSyncFailed<'a> {
    pub worker_id: &'a str,
    pub error: &'a Error,
    pub took: Duration,
}

impl LogLine for WorkerSyncFailed<'_> {
    fn emit(&self, m: &Metrics) {
        let kind = self.error.metric_label();
        m.worker_syncs.get(&Outcome("failure")).inc();
        m.worker_failures.get(&Kind(kind)).inc();
        m.worker_duration.observe(self.took.as_secs_f64());
        tracing::warn!(
            event = "worker_sync_failed", worker_id = self.worker_id, kind, error = %self.error,
            duration_ms = ms(self.took),
            "Worker sync failed; its records are left as they were"
        );
    }
}

/// A worker's listing needed the fallback, or is partial.
#[derive(Debug)]
pub struct ListingNote<'a> {
    pub worker_id: &'a str,
    pub note: &'a str,
    pub complete: bool,
}

impl LogLine for ListingNote<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "listing_fallback",
            worker_id = self.worker_id,
            complete = self.complete,
            note = self.note,
            "Worker labs fetched without populate_lab_tiles"
        );
    }
}

/// Labs a CML server named by ids that cannot be CML's (`..` would walk the API's path), or
/// whose object named another id than it was asked for: neither read nor written.
#[derive(Debug)]
pub struct LabIdsRefused<'a> {
    pub worker_id: &'a str,
    /// `listing` (the tile map, the id list, the labs read one by one) or `stream`.
    pub source: &'static str,
    /// Why each was refused (clipped); a log line names the first few.
    pub refused: &'a [String],
}

impl LogLine for LabIdsRefused<'_> {
    fn emit(&self, m: &Metrics) {
        const NAMED: usize = 5;
        m.lab_ids_refused
            .get(&Origin(self.source))
            .inc_by(self.refused.len() as u64);
        tracing::warn!(
            event = "lab_ids_refused",
            worker_id = self.worker_id,
            source = self.source,
            count = self.refused.len(),
            first = ?&self.refused[..self.refused.len().min(NAMED)],
            "Refused labs a CML server named by ids that are not CML lab ids, or whose object named another lab"
        );
    }
}

/// Text of a lab longer than its limit was cut before it was stored.
#[derive(Debug)]
pub struct FieldsTruncated<'a> {
    pub worker_id: &'a str,
    pub lab_id: &'a str,
    pub fields: &'a [&'static str],
}

impl LogLine for FieldsTruncated<'_> {
    fn emit(&self, m: &Metrics) {
        for field in self.fields {
            m.fields_truncated.get(&Field(field)).inc();
        }
        tracing::warn!(
            event = "fields_truncated", worker_id = self.worker_id,
            lab_id = %clip(self.lab_id), fields = ?self.fields,
            "Lab text longer than its limit was cut before it was stored"
        );
    }
}

/// A record could not be written (too large for MongoDB); the worker's other labs were.
#[derive(Debug)]
pub struct RecordSkipped<'a> {
    pub worker_id: &'a str,
    pub lab_id: &'a str,
    pub reason: &'a str,
}

impl LogLine for RecordSkipped<'_> {
    fn emit(&self, m: &Metrics) {
        m.records_skipped.inc();
        tracing::warn!(
            event = "record_skipped", worker_id = self.worker_id, lab_id = %clip(self.lab_id),
            reason = self.reason,
            "A lab record could not be written; the worker's other labs were"
        );
    }
}

/// A listing that would remove labs was checked against the worker's id list.
#[derive(Debug)]
pub struct RemovalsChecked<'a> {
    pub worker_id: &'a str,
    /// Labs the listing alone would have removed.
    pub planned: usize,
    /// Labs absent from the id list too: removed.
    pub confirmed: usize,
    pub error: Option<&'a cml_client::Error>,
}

impl LogLine for RemovalsChecked<'_> {
    fn emit(&self, m: &Metrics) {
        let kept = self.planned - self.confirmed;
        m.removals_kept.inc_by(kept as u64);
        match self.error {
            None => tracing::info!(
                event = "removals_checked", worker_id = self.worker_id, planned = self.planned,
                confirmed = self.confirmed, kept,
                "Labs missing from the listing were checked against the id list; only those absent from both are removed"
            ),
            Some(error) => tracing::warn!(
                event = "removals_checked", worker_id = self.worker_id, planned = self.planned,
                confirmed = 0, kept, error = %error,
                "Labs missing from the listing are kept: the id list cannot be read"
            ),
        }
    }
}

/// A failed worker will be synced again before the next cycle.
#[derive(Debug)]
pub struct RetryScheduled<'a> {
    pub worker_id: &'a str,
    pub failures: u32,
    pub retry_in: Duration,
}

impl LogLine for RetryScheduled<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "retry_scheduled",
            worker_id = self.worker_id,
            failures = self.failures,
            retry_in_ms = ms(self.retry_in),
            "Failed worker will be retried"
        );
    }
}

/// A pass's statuses could not be written.
#[derive(Debug)]
pub struct StatusWriteFailed<'a> {
    pub error: &'a Error,
    pub workers: usize,
}

impl LogLine for StatusWriteFailed<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "status_write_failed", error = %self.error, workers = self.workers,
            "Cannot record the sync status of workers"
        );
    }
}

/// The fleet view (the registry's fields in the sync status) and its gauges could not be
/// brought up to date.
#[derive(Debug)]
pub struct FleetViewFailed<'a> {
    pub error: &'a Error,
}

impl LogLine for FleetViewFailed<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(event = "fleet_view_failed", error = %self.error, "Cannot update the fleet view and count the fleet's workers and lab records");
    }
}

/// Old tombstones could not be purged this cycle.
#[derive(Debug)]
pub struct PurgeFailed<'a> {
    pub error: &'a Error,
}

impl LogLine for PurgeFailed<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(event = "purge_failed", error = %self.error, "Cannot purge removed lab records");
    }
}

/// The lease changed hands, as seen by this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange<'a> {
    Acquired { holder: &'a str },
    StandingBy { holder: &'a str },
    Lost { holder: &'a str },
    Released { holder: &'a str },
}

impl LogLine for LeaseChange<'_> {
    fn emit(&self, m: &Metrics) {
        match *self {
            LeaseChange::Acquired { holder } => {
                m.lease_held.set(1.0);
                tracing::info!(event = "lease_acquired", holder, "Acquired the sync lease");
            }
            LeaseChange::StandingBy { holder } => {
                m.lease_held.set(0.0);
                tracing::warn!(
                    event = "lease_standby",
                    holder,
                    "This replica does not hold the sync lease; standing by"
                );
            }
            LeaseChange::Lost { holder } => {
                m.lease_held.set(0.0);
                tracing::warn!(
                    event = "lease_lost",
                    holder,
                    "Lost the sync lease: no new worker syncs start"
                );
            }
            LeaseChange::Released { holder } => {
                m.lease_held.set(0.0);
                tracing::info!(event = "lease_released", holder, "Released the sync lease");
            }
        }
    }
}

/// Talking to the lease document failed.
#[derive(Debug)]
pub struct LeaseError<'a> {
    pub error: &'a Error,
    /// What was being done: `renew` or `release` or `note_cycle`.
    pub action: &'static str,
}

impl LogLine for LeaseError<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "lease_error", action = self.action, error = %self.error,
            "Cannot update the sync lease; it expires by itself if this persists"
        );
    }
}

/// Worker syncs still ran when the shutdown grace ran out.
#[derive(Debug)]
pub struct DrainTimedOut {
    pub grace: Duration,
    pub running: usize,
}

impl LogLine for DrainTimedOut {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "drain_timed_out",
            grace_ms = ms(self.grace),
            running = self.running,
            "Worker syncs in flight did not finish within the shutdown grace; stopping anyway"
        );
    }
}

/// What follows the last syncs (statuses, a pass's records) was not written within the
/// shutdown grace: the next holder's syncs write it again.
#[derive(Debug)]
pub struct BooksTimedOut {
    pub grace: Duration,
}

impl LogLine for BooksTimedOut {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "books_timed_out",
            grace_ms = ms(self.grace),
            "The last statuses were not written within the shutdown grace; stopping anyway"
        );
    }
}

/// The daemon starts or stops.
#[derive(Debug)]
pub enum Lifecycle<'a> {
    Starting { instance: &'a str },
    Stopped,
}

impl LogLine for Lifecycle<'_> {
    fn emit(&self, _: &Metrics) {
        match self {
            Lifecycle::Starting { instance } => tracing::info!(
                event = "daemon_starting",
                instance = *instance,
                version = shared::cli::VERSION,
                "sync-daemon starting"
            ),
            Lifecycle::Stopped => tracing::info!(event = "daemon_stopped", "sync-daemon stopped"),
        }
    }
}

/// The schedule, at start, in the design notes' words.
#[derive(Debug)]
pub struct CycleScheduled {
    pub interval: Duration,
    pub run_immediately: bool,
}

impl LogLine for CycleScheduled {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "refresh_scheduled",
            interval_s = self.interval.as_secs(),
            run_immediately = self.run_immediately,
            "Scheduled labs refresh job ({} interval)",
            interval_phrase(self.interval)
        );
    }
}

/// `30-minute`, `2-hour`, `90-second`: an interval as the design notes' start line says it.
pub fn interval_phrase(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}-hour", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}-minute", s / 60),
        s => format!("{s}-second"),
    }
}

/// The lease holder's change stream on a collection is open (again).
#[derive(Debug)]
pub struct WatchOpened {
    pub name: &'static str,
}

impl LogLine for WatchOpened {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "watch_opened",
            watch = self.name,
            "Watching {} for changes",
            self.name
        );
    }
}

/// A change stream could not be opened or failed; the holder reads on a timer until it works.
#[derive(Debug)]
pub struct WatchFailed<'a> {
    pub name: &'static str,
    pub error: &'a str,
    pub failures: u32,
    pub retry_in: Duration,
}

impl LogLine for WatchFailed<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "watch_failed",
            watch = self.name,
            error = self.error,
            failures = self.failures,
            retry_in_ms = ms(self.retry_in),
            "Cannot watch {} for changes; reading it every {} s until the change stream works",
            self.name,
            self.retry_in.as_secs().max(1)
        );
    }
}

/// A refresh asked for on demand is being served.
#[derive(Debug)]
pub struct RequestServing<'a> {
    pub request_id: &'a str,
    pub worker_id: &'a str,
}

impl LogLine for RequestServing<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "refresh_started",
            request_id = self.request_id,
            worker_id = self.worker_id,
            "Refreshing worker {} on demand",
            self.worker_id
        );
    }
}

/// How a refresh asked for on demand ended.
#[derive(Debug)]
pub struct RequestServed<'a> {
    pub request_id: &'a str,
    pub worker_id: &'a str,
    /// `done`, `failed`, `requeued` (this replica stopped syncing before it ran) or
    /// `taken_over` (it lost the lease meanwhile: the next holder took it back to serve it).
    pub outcome: &'static str,
    pub kind: Option<&'a str>,
    pub duration: Duration,
}

impl LogLine for RequestServed<'_> {
    fn emit(&self, m: &Metrics) {
        m.refresh_requests.get(&Outcome(self.outcome)).inc();
        tracing::info!(
            event = "refresh_finished",
            request_id = self.request_id,
            worker_id = self.worker_id,
            outcome = self.outcome,
            kind = self.kind,
            duration_ms = ms(self.duration),
            "Refresh of worker {} on demand: {}",
            self.worker_id,
            self.outcome
        );
    }
}

/// The lease holder could not read or write what it serves on demand (`sync_requests`, the
/// registry when it changed); the next wake or sweep tries again.
#[derive(Debug)]
pub struct ServeFailed<'a> {
    pub error: &'a Error,
    /// What it could not do, as a phrase: `take a refresh request`, `read the worker registry`.
    pub action: &'static str,
}

impl LogLine for ServeFailed<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "serve_failed", action = self.action, error = %self.error,
            kind = self.error.metric_label(),
            "Cannot {}; trying again at the next change or sweep", self.action
        );
    }
}

/// Requests a replica took and never finished are pending again (after a takeover).
#[derive(Debug)]
pub struct RequestsRequeued {
    pub requests: u64,
}

impl LogLine for RequestsRequeued {
    fn emit(&self, _: &Metrics) {
        tracing::info!(
            event = "refresh_requests_requeued",
            requests = self.requests,
            "Serving {} refresh requests another replica took and never finished",
            self.requests
        );
    }
}

/// What the registry says about a worker, seen once by the lease holder.
#[derive(Debug)]
pub enum RegistryChange<'a> {
    /// Running with an endpoint now: synced at once.
    Appeared { worker_id: &'a str },
    /// Its endpoint changed: synced at once, at the new one.
    EndpointChanged { worker_id: &'a str },
    /// No longer running (or gone): no longer synced; its records stay as they are.
    Stopped { worker_id: &'a str },
}

impl LogLine for RegistryChange<'_> {
    fn emit(&self, m: &Metrics) {
        match self {
            RegistryChange::Appeared { worker_id } => {
                m.registry_changes.get(&Reason("appeared")).inc();
                tracing::info!(
                    event = "worker_discovered",
                    worker_id = *worker_id,
                    "Worker {worker_id} is running: syncing it now"
                );
            }
            RegistryChange::EndpointChanged { worker_id } => {
                m.registry_changes.get(&Reason("endpoint_changed")).inc();
                tracing::info!(
                    event = "worker_endpoint_changed",
                    worker_id = *worker_id,
                    "Worker {worker_id} has a new endpoint: syncing it now"
                );
            }
            RegistryChange::Stopped { worker_id } => {
                m.registry_changes.get(&Reason("stopped")).inc();
                tracing::info!(
                    event = "worker_stopped",
                    worker_id = *worker_id,
                    "Worker {worker_id} is no longer running: no longer synced, its records kept"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_line_says_the_interval_as_the_design_notes_do() {
        let phrase = |s| interval_phrase(Duration::from_secs(s));
        assert_eq!(phrase(1800), "30-minute");
        assert_eq!(phrase(7200), "2-hour");
        assert_eq!(phrase(5400), "90-minute");
        assert_eq!(phrase(90), "90-second");
        assert_eq!(phrase(60), "1-minute");
        assert_eq!(phrase(1), "1-second");
    }
}

/// A worker's event-stream watch changed state: live, connecting, polling or failing.
#[derive(Debug)]
pub struct WatchChanged<'a> {
    pub worker_id: &'a str,
    pub state: crate::stream_policy::WatchState,
    /// Why it left the last state (how the stream ended or failed to open), if it did.
    pub why: Option<&'a str>,
    /// When the stream is opened again (polling: tried again).
    pub retry_in: Option<Duration>,
}

impl LogLine for WatchChanged<'_> {
    fn emit(&self, _: &Metrics) {
        use crate::stream_policy::WatchState;
        let (state, failure) = match self.state {
            WatchState::Failing(reason) => ("failing", Some(reason.as_str())),
            other => (other.as_str(), None),
        };
        let retry_in_ms = self.retry_in.map(ms);
        let sentence = match self.state {
            WatchState::Live => "Event stream live: lab changes sync as they happen",
            WatchState::Connecting => "Event stream opening",
            WatchState::Polling => "No event stream (CML before 2.6, or past sync.events.max_watches): synced by the periodic cycle",
            WatchState::Failing(_) => "Event stream failing: synced by the periodic cycle until it is back",
        };
        match self.state {
            WatchState::Failing(_) => tracing::warn!(
                event = "event_watch",
                worker_id = self.worker_id,
                state,
                failure,
                why = self.why,
                retry_in_ms,
                "{sentence}"
            ),
            _ => tracing::info!(
                event = "event_watch",
                worker_id = self.worker_id,
                state,
                why = self.why,
                retry_in_ms,
                "{sentence}"
            ),
        }
    }
}

/// More active workers than `sync.events.max_watches`: the rest are left to the cycle.
#[derive(Debug)]
pub struct WatchesCapped {
    pub workers: usize,
    pub max_watches: usize,
}

impl LogLine for WatchesCapped {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "event_watches_capped",
            workers = self.workers,
            max_watches = self.max_watches,
            "More active workers than sync.events.max_watches: those past it are synced by the periodic cycle only"
        );
    }
}

/// What the watches showed could not be written to `worker_sync_status` (tried again with the
/// next change).
#[derive(Debug)]
pub struct WatchWriteFailed<'a> {
    pub error: &'a Error,
    pub workers: usize,
}

impl LogLine for WatchWriteFailed<'_> {
    fn emit(&self, _: &Metrics) {
        tracing::warn!(
            event = "event_watch_write_failed",
            workers = self.workers,
            error = %self.error,
            "Could not write the event-stream watches' states"
        );
    }
}
