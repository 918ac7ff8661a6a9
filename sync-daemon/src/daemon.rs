//! The daemon's two modes, both driving a [`Runner`]: [`run`], the long-running loop (hold the
//! lease, sync what the trigger sources and the schedule say, drain on shutdown), and [`once`]
//! (one cycle, then exit). Also `sync-daemon refresh` ([`refresh`]).

use std::{sync::Arc, time::Duration};

use bson::DateTime;
use shared::backoff::{random_unit, Backoff};
use shared::{
    registry::Standing,
    sync_request::{Recorded, SyncRequest},
};
use tokio::{
    sync::{mpsc, Notify},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    lease::LeaseKeeper,
    logs::{CycleScheduled, LeaseError, Lifecycle, LogLine, RetryScheduled, StorageNotReady},
    pass::PassReport,
    runner::{
        books::{Bookkeeper, Books},
        Runner,
    },
    schedule::Schedule,
    trigger::{self, registry::CycleRead, requests::InHand, Sources, Trigger, TRIGGER_QUEUE},
    Error, Result,
};

/// The daemon mode: runs until `shutdown` is cancelled. Storage is prepared first (retrying
/// while MongoDB is unreachable); then syncs run only while this replica holds the lease. The
/// trigger sources run as tasks of their own; the loop only accepts what they send, wakes for
/// what is due, and records syncs as they end. On shutdown every source stops and is joined,
/// then the running syncs and the books drain within `sync.shutdown_grace`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) -> Result<()> {
    let sync = &ctx.config.sync;
    CycleScheduled {
        interval: sync.interval.get(),
        run_immediately: sync.run_immediately,
    }
    .emit(&ctx.metrics);
    prepare_until_ready(&ctx, &shutdown).await;
    let mut lease = LeaseKeeper::start(ctx.clone(), shutdown.clone());
    let in_hand = InHand::default();
    let books = Books::start(Arc::new(Bookkeeper {
        ctx: ctx.clone(),
        in_hand: in_hand.clone(),
    }));
    let mut runner = Runner::new(ctx.clone(), ctx.metrics.clone(), schedule(&ctx), books);
    let (triggers, mut triggered) = mpsc::channel(TRIGGER_QUEUE);
    let (reads, read_rx) = mpsc::unbounded_channel();
    let sources = start_sources(&ctx, &lease, triggers, read_rx, in_hand, &shutdown);
    while !shutdown.is_cancelled() {
        let held = lease.held();
        if held {
            if let Some(read) = runner.tick(Instant::now()) {
                // The source lives as long as the loop; a send cannot fail before shutdown.
                let _ = reads.send(read);
            }
        }
        let wake = runner.next_wake().filter(|_| held);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            held = lease.changed() => match held {
                // Read once, before any sync of this term starts: the last holder's schedule.
                Some(true) => runner.took_over(ctx.lease.state().await.ok().flatten()),
                Some(false) => runner.stop(),
                None => break,
            },
            _ = sleep_until(wake) => {}
            Some(trigger) = triggered.recv() => runner.accept(trigger),
            Some(sync) = runner.join_next() => {
                let worker_id = sync.target.worker_id.clone();
                let done = runner.finished(sync);
                if let Some(retry_in) = done.retry_in {
                    RetryScheduled { worker_id: &worker_id, failures: done.failures, retry_in }
                        .emit(&ctx.metrics);
                }
            }
        }
    }
    runner.stop();
    drop(triggered);
    sources.stop().await;
    runner.drain(ctx.config.sync.shutdown_grace.get()).await;
    lease.release(&ctx).await;
    Lifecycle::Stopped.emit(&ctx.metrics);
    Ok(())
}

fn schedule(ctx: &Context) -> Schedule {
    let sync = &ctx.config.sync;
    Schedule::new(
        Instant::now(),
        sync.interval.get(),
        sync.run_immediately,
        sync.retry_base.get(),
        sync.concurrency,
    )
}

/// The sources that feed the runner: the registry (the cycles' worker lists; its changes when
/// workers come from it) and refreshes asked for on demand, each woken by the watch the lease
/// holder keeps on its collection; and (unless `sync.events.enabled` is off) each active
/// worker's CML event stream.
fn start_sources(
    ctx: &Arc<Context>,
    lease: &LeaseKeeper,
    triggers: mpsc::Sender<Trigger>,
    reads: mpsc::UnboundedReceiver<CycleRead>,
    in_hand: InHand,
    shutdown: &CancellationToken,
) -> Sources {
    let mut sources = Sources::new(shutdown.child_token());
    let stop = sources.stopping();
    let mongo = &ctx.config.mongodb;
    let requests = Arc::new(Notify::new());
    sources.spawn(trigger::requests::watch(mongo).run(ctx, lease, &requests, &stop));
    sources.spawn(trigger::requests::run(
        ctx.clone(),
        lease.subscribe(),
        requests,
        triggers.clone(),
        in_hand,
    ));
    let registry = ctx.config.sync.workers_from_registry.then(|| {
        let changed = Arc::new(Notify::new());
        sources.spawn(trigger::registry::watch(mongo).run(ctx, lease, &changed, &stop));
        changed
    });
    let (fleet, fleet_rx) = tokio::sync::watch::channel(None);
    sources.spawn(trigger::access::run(
        ctx.config.sync.access_interval.get(),
        fleet_rx.clone(),
        triggers.clone(),
    ));
    if ctx.config.sync.events.enabled {
        sources.spawn_graceful(trigger::events::run(
            ctx.clone(),
            lease.subscribe(),
            fleet_rx,
            triggers.clone(),
            stop,
        ));
    }
    sources.spawn(trigger::registry::run(
        ctx.clone(),
        lease.subscribe(),
        registry,
        reads,
        triggers,
        fleet,
    ));
    sources
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The `once` mode (`sync-daemon once`): takes the lease, syncs every active worker (or just
/// `only`) in one cycle — a failure is final, nothing is retried — purges old tombstones,
/// releases the lease.
pub async fn once(
    ctx: Arc<Context>,
    only: Option<&str>,
    shutdown: CancellationToken,
) -> Result<PassReport> {
    ctx.prepare_storage().await?;
    if !ctx.lease.try_acquire(DateTime::now()).await? {
        let holder = ctx
            .lease
            .state()
            .await?
            .map(|s| s.holder)
            .unwrap_or_default();
        return Err(Error::LeaseHeld { holder });
    }
    let result = one_cycle(&ctx, only, &shutdown).await;
    if let Err(e) = ctx.lease.release().await {
        LeaseError {
            error: &e.into(),
            action: "release",
        }
        .emit(&ctx.metrics);
    }
    result
}

async fn one_cycle(
    ctx: &Arc<Context>,
    only: Option<&str>,
    shutdown: &CancellationToken,
) -> Result<PassReport> {
    let mut targets = ctx.workers().await?;
    if let Some(id) = only {
        targets.retain(|t| t.worker_id == id);
        if targets.is_empty() {
            return Err(Error::UnknownWorker(id.to_owned()));
        }
    }
    ctx.note_cycle_start().await;
    let books = Books::start(Arc::new(Bookkeeper {
        ctx: ctx.clone(),
        in_hand: InHand::default(),
    }));
    let mut runner = Runner::new(ctx.clone(), ctx.metrics.clone(), schedule(ctx), books);
    let mut report = runner.run_cycle(targets);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            done = &mut report => {
                let grace = ctx.config.sync.shutdown_grace.get();
                runner.drain(grace).await;
                return done.map_err(|_| Error::Drain(grace));
            }
            Some(sync) = runner.join_next() => {
                runner.finished(sync);
            }
        }
    }
    runner.stop();
    let grace = ctx.config.sync.shutdown_grace.get();
    runner.drain(grace).await;
    report.await.map_err(|_| Error::Drain(grace))
}

/// `sync-daemon refresh`: records a refresh of `worker_id` (as lab-api does, throttle
/// included) for the lease holder to serve, and waits up to `wait` for its outcome. Returns the
/// request as it then is (finished, or still pending or running).
pub async fn refresh(ctx: &Context, worker_id: &str, wait: Duration) -> Result<SyncRequest> {
    match ctx.standing(worker_id).await? {
        Standing::Active { .. } => {}
        Standing::Unknown => return Err(Error::UnknownWorker(worker_id.to_owned())),
        Standing::Inactive { status } => {
            return Err(Error::NotRunning {
                worker_id: worker_id.to_owned(),
                status: status.unwrap_or_else(|| "unknown".into()),
            })
        }
    }
    ctx.requests.ensure_indexes().await?;
    let id = uuid::Uuid::new_v4().to_string();
    let min_interval = ctx.config.sync.refresh_min_interval.get();
    let request = match ctx
        .requests
        .record(id, worker_id, DateTime::now(), min_interval)
        .await?
    {
        Recorded::Accepted(request) => *request,
        Recorded::Throttled {
            retry_after,
            latest,
        } => {
            return Err(Error::Throttled {
                worker_id: worker_id.to_owned(),
                request_id: latest.id,
                retry_after_s: retry_after.as_secs(),
            })
        }
    };
    if wait.is_zero() {
        return Ok(request);
    }
    Ok(ctx
        .requests
        .wait_finished(&request.id, wait)
        .await?
        .unwrap_or(request))
}

/// Indexes at start; while MongoDB is unreachable, retries every few seconds instead of dying.
async fn prepare_until_ready(ctx: &Context, shutdown: &CancellationToken) {
    let backoff = Backoff {
        base: Duration::from_secs(2),
        cap: Duration::from_secs(30),
    };
    let mut attempt = 0;
    while let Err(error) = ctx.prepare_storage().await {
        attempt += 1;
        let retry_in = backoff.delay(attempt, random_unit());
        StorageNotReady {
            error: &error,
            attempt,
            retry_in,
        }
        .emit(&ctx.metrics);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(retry_in) => {}
        }
    }
}
