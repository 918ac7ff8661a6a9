//! The loop's core: accepts what the trigger sources send, opens passes in the schedule,
//! starts worker syncs as tasks under the global cap, turns every ending — a panic included —
//! into a recorded outcome, and hands what follows a sync's end (statuses, closed passes) to
//! the [books](books), which do that I/O off the loop. It does no I/O of its own, so nothing
//! MongoDB makes wait delays the start of a sync.
//!
//! Generic over what "sync this worker" is ([`Syncer`]), so it is tested with a fake on paused
//! time. The two modes that drive it live in [`crate::daemon`].

pub mod books;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use bson::DateTime;
use cml_client::CmlTarget;
use shared::sync_request::SyncRequest;
use shared::{backoff::random_unit, fence::Term};
use tokio::{
    sync::oneshot,
    task::{self, JoinSet},
    time::Instant,
};
use tracing::Instrument;

use crate::{
    context::Context,
    lease::LeaseState,
    logs::{CycleSkipped, CycleStarted, DrainTimedOut, LogLine, RetriesStarted, ServeFailed},
    metrics::Metrics,
    pass::{Pass, PassReport, Passes},
    schedule::{Finished, Opened, PassId, PassKind, Schedule, Scope},
    trigger::{registry::CycleRead, Trigger},
    worker::{sync_worker, WorkerSync},
};

use books::{Books, Closed, Closing};
use shared::metrics::Trigger as TriggerLabel;

/// Syncs one worker: the real one reads CML and writes MongoDB; tests fake it.
pub trait Syncer: Send + Sync + 'static {
    fn sync(&self, target: CmlTarget, scope: Scope) -> impl Future<Output = WorkerSync> + Send;

    /// The lease's term a sync starting now is made under.
    fn term(&self) -> Term;
}

impl Syncer for Context {
    fn sync(&self, target: CmlTarget, scope: Scope) -> impl Future<Output = WorkerSync> + Send {
        sync_worker(self, target, scope)
    }

    fn term(&self) -> Term {
        self.lease.term()
    }
}

/// How long past the shutdown grace the books may take to write what the last syncs left
/// (the Deployment's termination grace leaves room for it).
const BOOKS_AFTER_DRAIN: Duration = Duration::from_secs(5);

/// What a running sync task is for, so its ending is recorded even if it panics.
#[derive(Debug)]
struct InFlight {
    target: CmlTarget,
    scope: Scope,
    attempt_at: DateTime,
    started: Instant,
    term: Term,
}

#[derive(Debug)]
pub struct Runner<S> {
    syncer: Arc<S>,
    metrics: Arc<Metrics>,
    schedule: Schedule,
    passes: Passes,
    tasks: JoinSet<WorkerSync>,
    in_flight: HashMap<task::Id, InFlight>,
    books: Books,
    /// No new sync starts (shutdown, lease lost).
    stopped: bool,
    /// A cycle's worker list is being read: the cycle is not due again meanwhile.
    reading: bool,
    /// A cycle the last holder began (then) and never finished: its rest runs first.
    resume: Option<DateTime>,
    /// Refreshes asked for on demand, by the pass that serves each.
    requests: HashMap<PassId, SyncRequest>,
    /// Whoever waits for a pass's report.
    reports: HashMap<PassId, oneshot::Sender<PassReport>>,
    /// When the first change an event pass syncs arrived from CML (for the lag to its write).
    event_seen: HashMap<PassId, Instant>,
}

impl<S: Syncer> Runner<S> {
    /// A runner over `schedule`, handing what follows each sync to `books`.
    pub fn new(syncer: Arc<S>, metrics: Arc<Metrics>, schedule: Schedule, books: Books) -> Self {
        Self {
            syncer,
            metrics,
            schedule,
            passes: Passes::default(),
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            books,
            stopped: false,
            reading: false,
            resume: None,
            requests: HashMap::new(),
            reports: HashMap::new(),
            event_seen: HashMap::new(),
        }
    }

    /// When something timed is due next (a cycle or a retry); not the cycle while its worker
    /// list is being read.
    pub fn next_wake(&self) -> Option<Instant> {
        if self.reading {
            self.schedule.next_retry()
        } else {
            self.schedule.next_wake()
        }
    }

    /// Opens what is due at `now`: due retries start; a due cycle (or the rest of an
    /// interrupted one) is returned as the read the registry source is to make.
    pub fn tick(&mut self, now: Instant) -> Option<CycleRead> {
        if self.stopped {
            return None;
        }
        if let Some(opened) = self.schedule.due_retries(now) {
            RetriesStarted {
                workers: opened.workers.len(),
            }
            .emit(&self.metrics);
            let span = tracing::info_span!("sync_retries", workers = opened.workers.len());
            self.track(opened, span);
        }
        let read = if self.reading {
            None
        } else if let Some(since) = self.resume.take().filter(|_| !self.schedule.cycle_due(now)) {
            Some(CycleRead::Resume { since })
        } else {
            self.schedule.cycle_due(now).then_some(CycleRead::Full)
        };
        self.reading = read.is_some();
        self.start_syncs();
        read
    }

    /// Opens the pass a trigger asks for and starts what may start.
    pub fn accept(&mut self, trigger: Trigger) {
        match trigger {
            Trigger::Cycle { targets, resumed } => {
                self.reading = false;
                if !self.stopped {
                    self.open_cycle(targets, resumed, None);
                }
            }
            Trigger::CycleUnreadable { error, resumed } => {
                self.reading = false;
                if resumed {
                    // The next cycle comes on schedule; the rest waits for it.
                    ServeFailed {
                        error: &error,
                        action: "read what the interrupted cycle left",
                    }
                    .emit(&self.metrics);
                } else if !self.stopped {
                    let retry_in = self
                        .schedule
                        .cycle_not_started(Instant::now(), random_unit());
                    CycleSkipped {
                        error: &error,
                        retry_in,
                    }
                    .emit(&self.metrics);
                }
            }
            Trigger::Registry { sync_now, stopped } => {
                for id in &stopped {
                    if let Some(skipped) = self.schedule.forget(id) {
                        for pass in
                            self.passes
                                .skip(&skipped.passes, &skipped.target, Instant::now())
                        {
                            self.close(pass);
                        }
                    }
                }
                if !sync_now.is_empty() && !self.stopped {
                    let opened = self.schedule.request_all(sync_now);
                    let span =
                        tracing::info_span!("registry_change", workers = opened.workers.len());
                    self.track(opened, span);
                }
            }
            Trigger::Event {
                target,
                scope,
                seen,
            } => {
                // A watch only runs while this replica holds the lease; one closing may still
                // have sent something.
                if !self.stopped {
                    let labs = match &scope {
                        Scope::Full | Scope::Access => 0,
                        Scope::Labs(labs) => labs.len(),
                    };
                    let span = tracing::info_span!(
                        "cml_event",
                        worker_id = %target.worker_id,
                        labs,
                        relist = scope == Scope::Full,
                        access = scope == Scope::Access
                    );
                    let opened = self.schedule.event(target, scope);
                    if labs > 0 {
                        self.event_seen.insert(opened.pass, seen);
                    }
                    self.track(opened, span);
                }
            }
            Trigger::Request { request, target } => {
                if self.stopped {
                    // Pending again, for the next holder.
                    self.books.send(Closing::Requeue(Box::new(request)));
                } else {
                    let opened = self.schedule.request(target);
                    let span = tracing::info_span!("refresh_request", request_id = %request.id);
                    self.requests.insert(opened.pass, request);
                    self.track(opened, span);
                }
            }
        }
        self.start_syncs();
    }

    /// Opens a cycle over `targets` now (`once`); its report is sent once its books are
    /// written.
    pub fn run_cycle(&mut self, targets: Vec<CmlTarget>) -> oneshot::Receiver<PassReport> {
        let (tx, rx) = oneshot::channel();
        self.open_cycle(targets, false, Some(tx));
        self.start_syncs();
        rx
    }

    fn open_cycle(
        &mut self,
        targets: Vec<CmlTarget>,
        resumed: bool,
        report_to: Option<oneshot::Sender<PassReport>>,
    ) {
        let opened = if resumed {
            self.schedule.resume_cycle(targets)
        } else {
            CycleStarted {
                workers: targets.len(),
            }
            .emit(&self.metrics);
            self.schedule.start_cycle(targets)
        };
        if let Some(tx) = report_to {
            self.reports.insert(opened.pass, tx);
        }
        let span = if resumed {
            tracing::info_span!("sync_cycle", workers = opened.workers.len(), resumed = true)
        } else {
            tracing::info_span!("sync_cycle", workers = opened.workers.len())
        };
        self.track(opened, span);
    }

    /// This replica holds the lease (again): syncs may start, on the last holder's schedule
    /// (`lease` as stored), the rest of a cycle it left unfinished first; the last cycle any
    /// replica completed is this replica's to report, and the fleet view is brought up to date.
    pub fn took_over(&mut self, lease: Option<LeaseState>) {
        self.stopped = false;
        let now = DateTime::now();
        let since_last_cycle = lease.as_ref().and_then(|l| l.since_last_cycle(now));
        self.resume = lease.as_ref().and_then(LeaseState::interrupted_cycle);
        if let Some(end) = lease.and_then(|l| l.last_cycle_end_at) {
            self.metrics.note_cycle_end(end);
        }
        self.schedule.took_over(Instant::now(), since_last_cycle);
        // A view no holder kept up (a first start, say) is current before the first cycle ends.
        self.books.send(Closing::FleetView);
    }

    fn track(&mut self, opened: Opened, span: tracing::Span) {
        if let Some(pass) = self.passes.open(&opened, span, Instant::now()) {
            self.close(pass);
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
            let trigger = match (self.passes.kind(start.owner), &start.scope) {
                (Some(PassKind::Event), Scope::Full) => "relist",
                (Some(PassKind::Event), Scope::Labs(_)) => "event",
                (Some(PassKind::Event), Scope::Access) => "access",
                (Some(PassKind::Cycle), _) => "cycle",
                (Some(PassKind::Retry), _) => "retry",
                (Some(PassKind::Requested) | None, _) => "requested",
            };
            self.metrics
                .syncs_by_trigger
                .get(&TriggerLabel(trigger))
                .inc();
            let syncer = self.syncer.clone();
            let (target, scope) = (start.target.clone(), start.scope.clone());
            let handle = self
                .tasks
                .spawn(async move { syncer.sync(target, scope).await }.instrument(span));
            self.in_flight.insert(
                handle.id(),
                InFlight {
                    target: start.target,
                    scope: start.scope,
                    attempt_at: DateTime::now(),
                    started: Instant::now(),
                    term: self.syncer.term(),
                },
            );
        }
        self.metrics.workers_in_flight.set(self.tasks.len() as f64);
    }

    /// The next worker sync to end; `None` when none runs. A sync whose task panicked ends as
    /// a failure of its own kind, logged and counted like any other.
    pub async fn join_next(&mut self) -> Option<WorkerSync> {
        loop {
            let (id, sync) = match self.tasks.join_next_with_id().await? {
                Ok(done) => done,
                Err(e) => {
                    let id = e.id();
                    let why = if e.is_panic() {
                        panic_message(e.into_panic())
                    } else {
                        e.to_string()
                    };
                    let Some(f) = self.in_flight.remove(&id) else {
                        continue;
                    };
                    let sync = WorkerSync::panicked(
                        f.target,
                        f.scope,
                        f.attempt_at,
                        f.started.elapsed(),
                        f.term,
                        why,
                    );
                    sync.emit(&self.metrics);
                    return Some(sync);
                }
            };
            self.in_flight.remove(&id);
            return Some(sync);
        }
    }

    /// Records a sync's end — its retry, the passes it completes, statuses to write — then
    /// starts what may start. Returns what it means for the schedule.
    pub fn finished(&mut self, sync: WorkerSync) -> Finished {
        let now = Instant::now();
        let done = self.schedule.finished(
            &sync.target.worker_id,
            sync.result.is_ok(),
            now,
            random_unit(),
        );
        for pass in self.passes.record(&done.passes, &sync, now) {
            self.close(pass);
        }
        for batch in self.passes.full_status_batches() {
            self.books.send(Closing::Statuses(batch));
        }
        self.start_syncs();
        done
    }

    /// No new sync starts; queued ones are skipped (their requests pending again, for the
    /// next holder). Running ones go on.
    pub fn stop(&mut self) {
        self.stopped = true;
        self.resume = None;
        for skipped in self.schedule.stop() {
            for pass in self
                .passes
                .skip(&skipped.passes, &skipped.target, Instant::now())
            {
                self.close(pass);
            }
        }
    }

    /// Waits up to `grace` for the syncs that run, then hands the books their last work and
    /// waits for them too (within the same grace). False when something was still running
    /// then: it was aborted and joined (each record write is atomic, so none is left
    /// half-written).
    pub async fn drain(mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut drained = true;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.join_next()).await {
                Ok(Some(sync)) => {
                    self.finished(sync);
                }
                Ok(None) => break,
                Err(_) => {
                    DrainTimedOut {
                        grace,
                        running: self.tasks.len(),
                    }
                    .emit(&self.metrics);
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    drained = false;
                    break;
                }
            }
        }
        self.metrics.workers_in_flight.set(0.0);
        // The books have been writing all along; what is left is the last passes' statuses.
        let books = self.books;
        drained
            & books
                .close(deadline + BOOKS_AFTER_DRAIN, grace, &self.metrics)
                .await
    }

    fn close(&mut self, pass: Pass) {
        if pass.kind == PassKind::Cycle {
            self.schedule.cycle_finished(pass.id, Instant::now());
        }
        if let Some(seen) = self.event_seen.remove(&pass.id) {
            if pass.report.failed.is_empty() && pass.report.skipped.is_empty() {
                self.metrics.event_lag.observe(seen.elapsed().as_secs_f64());
            }
        }
        self.books.send(Closing::Pass(Box::new(Closed {
            request: self.requests.remove(&pass.id),
            report_to: self.reports.remove(&pass.id),
            purge: !self.stopped,
            pass,
        })));
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
