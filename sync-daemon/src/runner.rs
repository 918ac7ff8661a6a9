//! Runs what the schedule says: opens passes (reading the registry for a cycle), starts worker
//! syncs as tasks under the global cap, turns every ending — a panic included — into a recorded
//! outcome, and closes passes (statuses written a batch at a time as they come, the rest at the
//! end; a cycle's purge and log line).

use std::{collections::HashMap, sync::Arc, time::Duration};

use bson::DateTime;
use cml_client::CmlTarget;
use shared::{
    refresh::SyncRequest, registry::Standing, requests::Outcome, status::SyncCounts, store::cutoff,
};
use tokio::{task::JoinSet, time::Instant};
use tracing::Instrument;

use crate::{
    backoff::random_unit,
    context::Context,
    events::{
        CycleCompleted, CycleResumed, CycleSkipped, CycleStarted, DrainTimedOut, Event,
        FleetViewFailed, LeaseError, PurgeFailed, RegistryChange, RequestServed, RequestServing,
        RequestsRequeued, RetriesCompleted, RetriesStarted, RetryScheduled, ServeFailed,
        StatusWriteFailed,
    },
    known::{Changes, Known},
    lease::LeaseState,
    pass::{Pass, PassReport, Passes},
    schedule::{Opened, PassId, PassKind, Schedule},
    status::StatusUpdate,
    worker::{sync_worker, WorkerSync},
};

/// What a running sync task is for, so its ending is recorded even if it panics.
#[derive(Debug)]
struct InFlight {
    target: CmlTarget,
    attempt_at: DateTime,
    started: Instant,
}

#[derive(Debug)]
pub struct Runner {
    ctx: Arc<Context>,
    schedule: Schedule,
    passes: Passes,
    tasks: JoinSet<WorkerSync>,
    in_flight: HashMap<tokio::task::Id, InFlight>,
    /// Log when a failed worker will be retried (the long-running loop retries; `once` does not).
    announce_retries: bool,
    /// No new sync starts (shutdown, lease lost).
    stopped: bool,
    /// Reports kept for whoever waits for these passes.
    watched: HashMap<PassId, Option<PassReport>>,
    /// Refreshes asked for on demand, by the pass that serves each.
    requests: HashMap<PassId, SyncRequest>,
    /// The active workers as last read, to see which started, moved or stopped.
    known: Known,
    /// A cycle the last holder began (then) and never finished: its rest runs first.
    resume: Option<DateTime>,
}

/// Longest error text written into a request: as much as a worker's sync status keeps.
const MAX_ERROR_LEN: usize = 1024;

impl Runner {
    pub fn new(ctx: Arc<Context>, announce_retries: bool) -> Self {
        let sync = &ctx.config.sync;
        let schedule = Schedule::new(
            Instant::now(),
            sync.interval.get(),
            sync.run_immediately,
            sync.retry_base.get(),
            sync.concurrency,
        );
        Self {
            ctx,
            schedule,
            passes: Passes::default(),
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            announce_retries,
            stopped: false,
            watched: HashMap::new(),
            requests: HashMap::new(),
            known: Known::default(),
            resume: None,
        }
    }

    /// When something is due next (a cycle or a retry).
    pub fn next_wake(&self) -> Option<Instant> {
        self.schedule.next_wake()
    }

    /// This replica holds the lease (again): syncs may start, on the last holder's schedule,
    /// the last cycle any replica completed is this replica's to report, and the requests
    /// another replica took and never finished are pending again, for this one to serve.
    pub async fn took_over(&mut self, lease: Option<LeaseState>) {
        self.stopped = false;
        match self
            .ctx
            .requests
            .requeue_orphans(self.ctx.lease.holder())
            .await
        {
            Ok(0) => {}
            Ok(requests) => RequestsRequeued { requests }.emit(&self.ctx.metrics),
            Err(e) => self.serve_failed(e, "requeue refresh requests"),
        }
        let now = DateTime::now();
        let since_last_cycle = lease.as_ref().and_then(|l| l.since_last_cycle(now));
        self.resume = lease.as_ref().and_then(LeaseState::interrupted_cycle);
        if let Some(end) = lease.and_then(|l| l.last_cycle_end_at) {
            self.ctx.metrics.note_cycle_end(end);
        }
        self.schedule.took_over(Instant::now(), since_last_cycle);
        // A view no holder kept up (a first start, say) is current before the first cycle ends.
        tokio::spawn(update_fleet_view(self.ctx.clone()));
    }

    /// The rest of the cycle the last holder began at `since` and never finished: the active
    /// workers no sync wrote to since then (so none is synced twice in a row). A whole cycle
    /// due now makes it moot.
    async fn resume_cycle(&mut self, since: DateTime) {
        let (targets, synced) = match tokio::try_join!(self.ctx.workers(), async {
            Ok(self.ctx.store.workers_synced_since(since).await?)
        }) {
            Ok(read) => read,
            Err(error) => {
                // The next cycle comes on schedule; the rest waits for it.
                self.serve_failed(error, "read what the interrupted cycle left");
                return;
            }
        };
        let changes = self.known.update(&targets);
        self.registry_changes(&changes, false).await;
        let total = targets.len();
        let rest: Vec<CmlTarget> = targets
            .into_iter()
            .filter(|t| !synced.contains(&t.worker_id))
            .collect();
        CycleResumed {
            began: since,
            workers: rest.len(),
            already_synced: total - rest.len(),
        }
        .emit(&self.ctx.metrics);
        let opened = self.schedule.resume_cycle(rest);
        let span = tracing::info_span!(
            "labs_refresh",
            workers = opened.workers.len(),
            resumed = true
        );
        self.track(opened, span).await;
    }

    /// Opens whatever is due (the rest of an interrupted cycle; a cycle, reading the worker
    /// list; due retries) and starts syncs.
    pub async fn start_due(&mut self) {
        let now = Instant::now();
        if let Some(since) = self.resume.take() {
            if !self.schedule.cycle_due(now) {
                self.resume_cycle(since).await;
            }
        }
        if self.schedule.cycle_due(now) {
            match self.ctx.workers().await {
                Ok(targets) => {
                    // The cycle syncs whatever appeared or moved; the stopped are left out.
                    let changes = self.known.update(&targets);
                    self.registry_changes(&changes, false).await;
                    self.start_cycle(targets).await;
                }
                Err(error) => {
                    let retry_in = self.schedule.cycle_not_started(now, random_unit());
                    CycleSkipped {
                        error: &error,
                        retry_in,
                    }
                    .emit(&self.ctx.metrics);
                }
            }
        }
        if let Some(opened) = self.schedule.due_retries(now) {
            RetriesStarted {
                workers: opened.workers.len(),
            }
            .emit(&self.ctx.metrics);
            let span = tracing::info_span!("labs_retry", workers = opened.workers.len());
            self.track(opened, span).await;
        }
        self.start_syncs();
    }

    /// The registry changed: workers that started running or moved sync now, those that
    /// stopped are no longer synced (their records stay as they are).
    pub async fn registry_changed(&mut self) {
        if self.stopped {
            return;
        }
        match self.ctx.workers().await {
            Ok(targets) => {
                let changes = self.known.update(&targets);
                self.registry_changes(&changes, true).await;
                self.start_syncs();
                tokio::spawn(update_fleet_view(self.ctx.clone()));
            }
            Err(error) => self.serve_failed(error, "read the worker registry"),
        }
    }

    /// Logs each change once; with `sync_now`, opens a pass over the workers that appeared or
    /// moved. Stopped workers are forgotten by the schedule (no retry, not left queued).
    async fn registry_changes(&mut self, changes: &Changes, sync_now: bool) {
        let metrics = self.ctx.metrics.clone();
        for t in &changes.appeared {
            RegistryChange::Appeared {
                worker_id: &t.worker_id,
            }
            .emit(&metrics);
        }
        for t in &changes.moved {
            RegistryChange::EndpointChanged {
                worker_id: &t.worker_id,
            }
            .emit(&metrics);
        }
        for id in &changes.stopped {
            RegistryChange::Stopped { worker_id: id }.emit(&metrics);
            if let Some(skipped) = self.schedule.forget(id) {
                for pass in self
                    .passes
                    .skip(&skipped.passes, &skipped.target, Instant::now())
                {
                    self.close(pass).await;
                }
            }
        }
        let now: Vec<CmlTarget> = changes
            .appeared
            .iter()
            .chain(&changes.moved)
            .cloned()
            .collect();
        if sync_now && !now.is_empty() {
            let opened = self.schedule.request_all(now);
            let span = tracing::info_span!("labs_registry_change", workers = opened.workers.len());
            self.track(opened, span).await;
        }
    }

    /// Serves the refreshes asked for on demand: requeues those this replica took and no
    /// longer serves, then takes every pending one, oldest first, and opens a pass for each
    /// (joining a sync of that worker that is queued or running).
    pub async fn serve_requests(&mut self) {
        if self.stopped {
            return;
        }
        let holder = self.ctx.lease.holder().to_owned();
        match self.ctx.requests.claimed_by(&holder).await {
            Ok(ids) => {
                for id in ids {
                    if !self.requests.values().any(|r| r.id == id) {
                        if let Err(e) = self.ctx.requests.requeue(&id).await {
                            self.serve_failed(e, "requeue refresh requests");
                        }
                    }
                }
            }
            Err(e) => {
                self.serve_failed(e, "read refresh requests");
                return;
            }
        }
        loop {
            match self.ctx.requests.claim(DateTime::now(), &holder).await {
                Ok(Some(request)) => self.serve(request).await,
                Ok(None) => break,
                Err(e) => {
                    self.serve_failed(e, "take a refresh request");
                    break;
                }
            }
        }
        self.start_syncs();
    }

    async fn serve(&mut self, request: SyncRequest) {
        RequestServing {
            request_id: &request.id,
            worker_id: &request.worker_id,
        }
        .emit(&self.ctx.metrics);
        let refused = match self.ctx.standing(&request.worker_id).await {
            Ok(Standing::Active { endpoint }) => {
                let target = CmlTarget {
                    worker_id: request.worker_id.clone(),
                    endpoint,
                };
                let opened = self.schedule.request(target);
                let span = tracing::info_span!("labs_request", request_id = %request.id);
                self.requests.insert(opened.pass, request);
                self.track(opened, span).await;
                return;
            }
            Ok(Standing::Inactive { status }) => (
                "not_running",
                format!(
                    "worker {} is not running (status {})",
                    request.worker_id,
                    status.as_deref().unwrap_or("unknown")
                ),
            ),
            Ok(Standing::Unknown) => (
                "unknown_worker",
                format!("worker {} is not known", request.worker_id),
            ),
            Err(e) => (e.metric_label(), e.to_string()),
        };
        let outcome = Outcome::Failed {
            kind: refused.0.to_owned(),
            error: refused.1,
            duration_ms: 0,
        };
        self.finish_request(request, Some(outcome), Duration::ZERO)
            .await;
    }

    /// `sync_requests` or the registry could not be read or written: logged; the next wake or
    /// sweep tries again.
    fn serve_failed(&self, error: impl Into<crate::Error>, action: &'static str) {
        ServeFailed {
            error: &error.into(),
            action,
        }
        .emit(&self.ctx.metrics);
    }

    /// Writes a request's outcome (`None`: it did not run, and is pending again).
    async fn finish_request(
        &self,
        request: SyncRequest,
        outcome: Option<Outcome>,
        duration: Duration,
    ) {
        let store = &self.ctx.requests;
        let (written, label, kind) = match &outcome {
            None => (store.requeue(&request.id).await, "requeued", None),
            Some(o) => {
                let (label, kind) = match o {
                    Outcome::Done { .. } => ("done", None),
                    Outcome::Failed { kind, .. } => ("failed", Some(kind.as_str())),
                };
                (
                    store.finish(&request.id, o, DateTime::now()).await,
                    label,
                    kind,
                )
            }
        };
        match written {
            Ok(()) => RequestServed {
                request_id: &request.id,
                worker_id: &request.worker_id,
                outcome: label,
                kind,
                duration,
            }
            .emit(&self.ctx.metrics),
            Err(e) => self.serve_failed(e, "write a refresh request's outcome"),
        }
    }

    /// Opens a cycle over `targets` now; returns its pass.
    pub async fn start_cycle(&mut self, targets: Vec<CmlTarget>) -> PassId {
        CycleStarted {
            workers: targets.len(),
        }
        .emit(&self.ctx.metrics);
        if let Err(e) = self.ctx.lease.record_cycle(DateTime::now()).await {
            LeaseError {
                error: &e.into(),
                action: "note_cycle",
            }
            .emit(&self.ctx.metrics);
        }
        let opened = self.schedule.start_cycle(targets);
        let pass = opened.pass;
        let span = tracing::info_span!("labs_refresh", workers = opened.workers.len());
        self.track(opened, span).await;
        self.start_syncs();
        pass
    }

    /// Keeps the report of `pass` for [`Runner::take_report`].
    pub fn watch(&mut self, pass: PassId) {
        self.watched.entry(pass).or_insert(None);
    }

    /// The report of a watched pass, once it closed.
    pub fn take_report(&mut self, pass: PassId) -> Option<PassReport> {
        match self.watched.get(&pass) {
            Some(Some(_)) => self.watched.remove(&pass).flatten(),
            _ => None,
        }
    }

    async fn track(&mut self, opened: Opened, span: tracing::Span) {
        if let Some(pass) = self.passes.open(&opened, span, Instant::now()) {
            self.close(pass).await;
        }
    }

    fn start_syncs(&mut self) {
        if self.stopped {
            return;
        }
        while let Some(start) = self.schedule.next_start() {
            let span = tracing::info_span!(
                parent: &self.passes.span(start.owner),
                "worker_sync",
                worker_id = %start.target.worker_id
            );
            let ctx = self.ctx.clone();
            let target = start.target.clone();
            let handle = self
                .tasks
                .spawn(async move { sync_worker(&ctx, target).await }.instrument(span));
            self.in_flight.insert(
                handle.id(),
                InFlight {
                    target: start.target,
                    attempt_at: DateTime::now(),
                    started: Instant::now(),
                },
            );
        }
        self.ctx
            .metrics
            .workers_in_flight
            .set(self.tasks.len() as f64);
    }

    /// The next worker sync to end; `None` when none runs. A sync whose task panicked ends as
    /// a failure of its own kind, logged and counted like any other.
    pub async fn join_next(&mut self) -> Option<WorkerSync> {
        let (id, sync) = match self.tasks.join_next_with_id().await? {
            Ok(done) => done,
            Err(e) => {
                let id = e.id();
                let why = if e.is_panic() {
                    panic_message(e.into_panic())
                } else {
                    e.to_string()
                };
                let f = self.in_flight.remove(&id)?;
                let sync = WorkerSync::panicked(f.target, f.attempt_at, f.started.elapsed(), why);
                sync.emit(&self.ctx);
                return Some(sync);
            }
        };
        self.in_flight.remove(&id);
        Some(sync)
    }

    /// Records a sync's end: its retry, the passes it completes; then starts what may start.
    pub async fn finished(&mut self, sync: WorkerSync) {
        let now = Instant::now();
        let done = self.schedule.finished(
            &sync.target.worker_id,
            sync.result.is_ok(),
            now,
            random_unit(),
        );
        if let (Some(retry_in), true) = (done.retry_in, self.announce_retries) {
            RetryScheduled {
                worker_id: &sync.target.worker_id,
                failures: done.failures,
                retry_in,
            }
            .emit(&self.ctx.metrics);
        }
        for pass in self.passes.record(&done.passes, &sync, now) {
            self.close(pass).await;
        }
        for batch in self.passes.full_status_batches() {
            write_statuses(&self.ctx, &batch).await;
        }
        self.start_syncs();
    }

    /// No new sync starts; queued ones are skipped (their requests pending again, for the
    /// next holder). Running ones go on.
    pub async fn stop(&mut self) {
        self.stopped = true;
        self.known.forget();
        for skipped in self.schedule.stop() {
            for pass in self
                .passes
                .skip(&skipped.passes, &skipped.target, Instant::now())
            {
                self.close(pass).await;
            }
        }
    }

    /// Waits up to `grace` for the syncs that run. False when some were still running: they
    /// are abandoned (each record write is atomic, so none is left half-written).
    pub async fn drain(&mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.join_next()).await {
                Ok(Some(sync)) => self.finished(sync).await,
                Ok(None) => break,
                Err(_) => {
                    DrainTimedOut {
                        grace,
                        running: self.tasks.len(),
                    }
                    .emit(&self.ctx.metrics);
                    self.tasks.abort_all();
                    return false;
                }
            }
        }
        true
    }

    async fn close(&mut self, pass: Pass) {
        let Pass {
            id,
            kind,
            span,
            statuses,
            report,
            ..
        } = pass;
        let ctx = self.ctx.clone();
        let stopped = self.stopped;
        async {
            write_statuses(&ctx, &statuses).await;
            match kind {
                PassKind::Cycle => {
                    let purged = if stopped { 0 } else { purge(&ctx).await };
                    let (view, labs) =
                        tokio::join!(ctx.update_fleet_view(), ctx.count_lab_records());
                    for e in [view.err(), labs.err()].into_iter().flatten() {
                        FleetViewFailed { error: &e }.emit(&ctx.metrics);
                    }
                    CycleCompleted {
                        report: &report,
                        purged,
                    }
                    .emit(&ctx.metrics);
                    if let Err(e) = ctx.lease.record_cycle_end(DateTime::now()).await {
                        LeaseError {
                            error: &e.into(),
                            action: "note_cycle_end",
                        }
                        .emit(&ctx.metrics);
                    }
                }
                PassKind::Retry => RetriesCompleted { report: &report }.emit(&ctx.metrics),
                PassKind::Requested => {}
            }
        }
        .instrument(span)
        .await;
        if kind == PassKind::Cycle {
            self.schedule.cycle_finished(id, Instant::now());
        }
        if let Some(request) = self.requests.remove(&id) {
            let duration_ms = i64::try_from(report.duration.as_millis()).unwrap_or(i64::MAX);
            let outcome = if !report.skipped.is_empty() {
                None
            } else if let Some(f) = report.failed.first() {
                Some(Outcome::Failed {
                    kind: f.kind.to_owned(),
                    error: f.error.chars().take(MAX_ERROR_LEN).collect(),
                    duration_ms,
                })
            } else {
                Some(Outcome::Done {
                    counts: SyncCounts::from(&report.totals),
                    duration_ms,
                })
            };
            self.finish_request(request, outcome, report.duration).await;
        }
        if let Some(slot) = self.watched.get_mut(&id) {
            *slot = Some(report);
        }
    }
}

/// Deletes tombstones older than `sync.removed_retention`; returns how many went.
async fn purge(ctx: &Context) -> u64 {
    let retention = ctx.config.sync.removed_retention.get();
    match ctx
        .store
        .purge_removed(cutoff(DateTime::now(), retention))
        .await
    {
        Ok(n) => n,
        Err(e) => {
            PurgeFailed { error: &e.into() }.emit(&ctx.metrics);
            0
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Writes statuses of a pass; a failure is logged (the next sync of each writes it again).
async fn write_statuses(ctx: &Context, statuses: &[StatusUpdate]) {
    if let Err(e) = ctx.status.record_many(statuses).await {
        StatusWriteFailed {
            error: &e.into(),
            workers: statuses.len(),
        }
        .emit(&ctx.metrics);
    }
}

/// Brings the fleet view up to date; a failure is logged (the next cycle tries again).
async fn update_fleet_view(ctx: Arc<Context>) {
    if let Err(e) = ctx.update_fleet_view().await {
        FleetViewFailed { error: &e }.emit(&ctx.metrics);
    }
}
