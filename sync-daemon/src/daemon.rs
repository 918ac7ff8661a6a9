//! The daemon's two ways of running: the long-running loop (hold the lease, sync what the
//! schedule says, drain on shutdown) and `once` (one cycle, then exit).

use std::{sync::Arc, time::Duration};

use bson::{doc, DateTime};
use shared::{refresh::SyncRequest, registry::Standing, requests::Recorded};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::{random_unit, Backoff},
    context::Context,
    events::{Event, LeaseError, Lifecycle, RefreshScheduled, StorageNotReady},
    lease::LeaseKeeper,
    pass::PassReport,
    runner::Runner,
    watch::Watch,
    Error, Result,
};

/// How often the holder looks for requests while change streams are unavailable.
const REQUESTS_FALLBACK: Duration = Duration::from_secs(5);
/// How often it looks anyway (requests it took and lost track of, say).
const REQUESTS_SWEEP: Duration = Duration::from_secs(60);
/// How often it re-reads the registry while change streams are unavailable.
const REGISTRY_FALLBACK: Duration = Duration::from_secs(60);

/// Runs until `shutdown` is cancelled. Storage is prepared first (retrying while MongoDB is
/// unreachable), then syncs run only while this replica holds the lease.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) -> Result<()> {
    let sync = &ctx.config.sync;
    RefreshScheduled {
        interval: sync.interval.get(),
        run_immediately: sync.run_immediately,
    }
    .emit(&ctx.metrics);
    prepare_until_ready(&ctx, &shutdown).await;
    let mut lease = LeaseKeeper::start(ctx.clone(), shutdown.clone());
    let mut runner = Runner::new(ctx.clone(), true);
    let requests = Arc::new(Notify::new());
    let registry = Arc::new(Notify::new());
    let watches = start_watches(&ctx, &lease, &requests, &registry, &shutdown);
    while !shutdown.is_cancelled() {
        if lease.held() {
            runner.start_due().await;
        }
        let held = lease.held();
        let wake = runner.next_wake().filter(|_| held);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            held = lease.changed() => match held {
                Some(true) => runner.took_over(ctx.lease.state().await.ok().flatten()).await,
                Some(false) => runner.stop().await,
                None => break,
            },
            _ = sleep_until(wake) => {}
            _ = requests.notified(), if held => runner.serve_requests().await,
            _ = registry.notified(), if held => runner.registry_changed().await,
            Some(sync) = runner.join_next() => runner.finished(sync).await,
        }
    }
    for w in watches {
        w.abort();
    }
    runner.stop().await;
    runner.drain(ctx.config.sync.shutdown_grace.get()).await;
    lease.release(&ctx).await;
    Lifecycle::Stopped.emit(&ctx.metrics);
    Ok(())
}

/// The lease holder watches `sync_requests` (new requests; a sweep every minute for requests
/// nothing announces; every few seconds where change streams are unavailable) and, when it
/// reads workers from it, the registry (every minute where change streams are unavailable).
fn start_watches(
    ctx: &Context,
    lease: &LeaseKeeper,
    requests: &Arc<Notify>,
    registry: &Arc<Notify>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mongo = &ctx.config.mongodb;
    let mut watches = vec![Watch {
        name: "sync_requests",
        collection: mongo.sync_requests_collection.clone(),
        pipeline: vec![doc! { "$match": {
            "operationType": "insert", "fullDocument.status": "pending",
        } }],
        fallback: REQUESTS_FALLBACK,
        sweep: Some(REQUESTS_SWEEP),
    }
    .spawn(ctx, lease, requests, shutdown)];
    if ctx.config.sync.workers_from_registry {
        let fields = ["status", "https_endpoint", "private_ip"];
        let mut touched: Vec<bson::Document> = fields
            .iter()
            .map(|f| doc! { format!("updateDescription.updatedFields.{f}"): { "$exists": true } })
            .collect();
        touched.push(doc! { "updateDescription.removedFields": { "$in": fields.to_vec() } });
        watches.push(
            Watch {
                name: "registry",
                collection: mongo.workers_collection.clone(),
                pipeline: vec![doc! { "$match": { "$or": [
                    { "operationType": { "$in": ["insert", "replace", "delete"] } },
                    { "operationType": "update", "$or": touched },
                ] } }],
                fallback: REGISTRY_FALLBACK,
                sweep: None,
            }
            .spawn(ctx, lease, registry, shutdown),
        );
    }
    watches
}

async fn sleep_until(wake: Option<tokio::time::Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One cycle (`sync-daemon once`): takes the lease, syncs every active worker (or just
/// `only`), purges old tombstones, releases the lease.
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
    let mut runner = Runner::new(ctx.clone(), false);
    let pass = runner.start_cycle(targets).await;
    runner.watch(pass);
    loop {
        if let Some(report) = runner.take_report(pass) {
            return Ok(report);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(sync) = runner.join_next() => runner.finished(sync).await,
        }
    }
    runner.stop().await;
    let grace = ctx.config.sync.shutdown_grace.get();
    runner.drain(grace).await;
    runner.take_report(pass).ok_or(Error::Drain(grace))
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
