//! What follows a sync's end, done off the loop: writing statuses (a batch at a time as a
//! long pass goes, the rest when it closes), closing passes (a cycle's purge, fleet view, lab
//! gauges, log line and lease note; a retry pass's log line; a refresh request's outcome), and
//! the fleet view's upkeep. One task takes these in order from an unbounded queue, so the loop
//! never waits for MongoDB; the queue holds at most what the syncs ended meanwhile produced.

use std::{future::Future, sync::Arc, time::Duration};

use bson::DateTime;
use shared::{store::cutoff, sync_request::SyncRequest};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tracing::Instrument;

use crate::{
    context::Context,
    logs::{
        BooksTimedOut, CycleCompleted, FleetViewFailed, LogLine, PurgeFailed, RetriesCompleted,
        StatusWriteFailed,
    },
    metrics::Metrics,
    pass::{Pass, PassReport},
    schedule::PassKind,
    status::StatusUpdate,
    trigger::requests::{self, outcome_of, InHand},
};

/// The I/O the books do: MongoDB for the daemon, a fake in tests.
pub trait Bookkeeping: Send + Sync + 'static {
    /// Writes statuses; a failure is logged (the next sync of each writes it again).
    fn write_statuses(&self, statuses: &[StatusUpdate]) -> impl Future<Output = ()> + Send;
    /// A cycle ended: purge old tombstones (unless syncing stopped), bring the fleet view and
    /// the lab gauges up to date, log it, note it in the lease.
    fn cycle_closed(&self, report: &PassReport, purge: bool) -> impl Future<Output = ()> + Send;
    /// Writes a refresh request's outcome (`None`: pending again).
    fn request_finished(
        &self,
        request: SyncRequest,
        report: Option<&PassReport>,
    ) -> impl Future<Output = ()> + Send;
    /// Brings the fleet view up to date.
    fn update_fleet_view(&self) -> impl Future<Output = ()> + Send;
    fn metrics(&self) -> &Metrics;
}

/// A pass with nothing left to wait for, and who waits for it.
#[derive(Debug)]
pub struct Closed {
    pub pass: Pass,
    /// The refresh request it served.
    pub request: Option<SyncRequest>,
    /// Whoever waits for its report (`once`).
    pub report_to: Option<oneshot::Sender<PassReport>>,
    /// Whether a cycle purges old tombstones (not when it ends because syncing stopped).
    pub purge: bool,
}

impl Closed {
    /// A pass of a CML event that nobody waits for: all it leaves is its statuses.
    fn is_event_only(&self) -> bool {
        self.pass.kind == PassKind::Event && self.request.is_none() && self.report_to.is_none()
    }
}

/// One piece of work for the books.
#[derive(Debug)]
pub enum Closing {
    Statuses(Vec<StatusUpdate>),
    Pass(Box<Closed>),
    /// A request the runner will not serve (syncing stopped): pending again.
    Requeue(Box<SyncRequest>),
    FleetView,
}

/// The runner's end of the books: hands work over without waiting.
#[derive(Debug)]
pub struct Books {
    tx: mpsc::UnboundedSender<Closing>,
    task: JoinHandle<()>,
}

impl Books {
    /// Starts the books' task.
    pub fn start<B: Bookkeeping>(books: Arc<B>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            task: tokio::spawn(keep(books, rx)),
        }
    }

    pub fn send(&self, work: Closing) {
        // The task ends only when this sender is dropped or it panicked: nothing to do then.
        let _ = self.tx.send(work);
    }

    /// No more work: waits until the books are written, at most until `deadline`, then
    /// aborts them. False when they were aborted.
    pub async fn close(self, deadline: Instant, grace: Duration, metrics: &Metrics) -> bool {
        let Self { tx, mut task } = self;
        drop(tx);
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(_) => true,
            Err(_) => {
                BooksTimedOut { grace }.emit(metrics);
                task.abort();
                let _ = task.await;
                false
            }
        }
    }
}

/// How long the statuses of event passes may wait to be written together.
const EVENT_STATUSES_WITHIN: Duration = Duration::from_secs(1);
/// ...and how many may wait.
const EVENT_STATUSES_AT_MOST: usize = 256;

async fn keep<B: Bookkeeping>(books: Arc<B>, mut rx: mpsc::UnboundedReceiver<Closing>) {
    // Passes of CML events come many a second, each with one status and nobody waiting: their
    // statuses are written together, at most a second later. Anything else writes them first,
    // so a worker's statuses are still written in the order its syncs ended.
    let mut waiting: Vec<StatusUpdate> = Vec::new();
    let mut flush_at: Option<Instant> = None;
    loop {
        let work = tokio::select! {
            work = rx.recv() => work,
            _ = sleep_until(flush_at) => {
                flush(books.as_ref(), &mut waiting, &mut flush_at).await;
                continue;
            }
        };
        let Some(work) = work else { break };
        match work {
            Closing::Pass(closed) if closed.is_event_only() => {
                waiting.extend(closed.pass.statuses);
                flush_at.get_or_insert_with(|| Instant::now() + EVENT_STATUSES_WITHIN);
                if waiting.len() >= EVENT_STATUSES_AT_MOST {
                    flush(books.as_ref(), &mut waiting, &mut flush_at).await;
                }
                continue;
            }
            _ => flush(books.as_ref(), &mut waiting, &mut flush_at).await,
        }
        match work {
            Closing::Statuses(statuses) => books.write_statuses(&statuses).await,
            Closing::Pass(closed) => close(books.as_ref(), *closed).await,
            Closing::Requeue(request) => books.request_finished(*request, None).await,
            Closing::FleetView => books.update_fleet_view().await,
        }
    }
    flush(books.as_ref(), &mut waiting, &mut flush_at).await;
}

async fn flush<B: Bookkeeping>(
    books: &B,
    waiting: &mut Vec<StatusUpdate>,
    flush_at: &mut Option<Instant>,
) {
    *flush_at = None;
    if !waiting.is_empty() {
        books.write_statuses(&std::mem::take(waiting)).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn close<B: Bookkeeping>(books: &B, closed: Closed) {
    let Closed {
        pass,
        request,
        report_to,
        purge,
    } = closed;
    let Pass {
        kind,
        span,
        statuses,
        report,
        ..
    } = pass;
    async {
        if !statuses.is_empty() {
            books.write_statuses(&statuses).await;
        }
        match kind {
            PassKind::Cycle => books.cycle_closed(&report, purge).await,
            PassKind::Retry => RetriesCompleted { report: &report }.emit(books.metrics()),
            PassKind::Requested | PassKind::Event => {}
        }
    }
    .instrument(span)
    .await;
    if let Some(request) = request {
        books.request_finished(request, Some(&report)).await;
    }
    if let Some(tx) = report_to {
        let _ = tx.send(report);
    }
}

/// The daemon's books: MongoDB, and the requests the lease holder has in hand.
#[derive(Debug)]
pub struct Bookkeeper {
    pub ctx: Arc<Context>,
    pub in_hand: InHand,
}

impl Bookkeeping for Bookkeeper {
    async fn write_statuses(&self, statuses: &[StatusUpdate]) {
        if let Err(e) = self.ctx.status.record_many(statuses).await {
            StatusWriteFailed {
                error: &e.into(),
                workers: statuses.len(),
            }
            .emit(&self.ctx.metrics);
        }
    }

    async fn cycle_closed(&self, report: &PassReport, purge: bool) {
        let ctx = &self.ctx;
        let purged = if purge { purge_removed(ctx).await } else { 0 };
        let (view, labs) = tokio::join!(ctx.update_fleet_view(), ctx.count_lab_records());
        for e in [view.err(), labs.err()].into_iter().flatten() {
            FleetViewFailed { error: &e }.emit(&ctx.metrics);
        }
        CycleCompleted { report, purged }.emit(&ctx.metrics);
        ctx.note_cycle_end().await;
    }

    async fn request_finished(&self, request: SyncRequest, report: Option<&PassReport>) {
        let outcome = report.and_then(outcome_of);
        let took = report.map_or(Duration::ZERO, |r| r.duration);
        requests::finish(&self.ctx, &self.in_hand, request, outcome, took).await;
    }

    async fn update_fleet_view(&self) {
        if let Err(e) = self.ctx.update_fleet_view().await {
            FleetViewFailed { error: &e }.emit(&self.ctx.metrics);
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }
}

/// Deletes tombstones older than `sync.removed_retention`; returns how many went.
async fn purge_removed(ctx: &Context) -> u64 {
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
