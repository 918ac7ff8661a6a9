//! The daemon's two ways of running: the long-running loop (hold the lease, sync what the
//! schedule says, drain on shutdown) and `once` (one cycle, then exit).

use std::{sync::Arc, time::Duration};

use bson::DateTime;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::{random_unit, Backoff},
    context::Context,
    events::{Event, LeaseError, Lifecycle, StorageNotReady},
    lease::LeaseKeeper,
    pass::PassReport,
    runner::Runner,
    Error, Result,
};

/// Runs until `shutdown` is cancelled. Storage is prepared first (retrying while MongoDB is
/// unreachable), then syncs run only while this replica holds the lease.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) -> Result<()> {
    prepare_until_ready(&ctx, &shutdown).await;
    let mut lease = LeaseKeeper::start(ctx.clone(), shutdown.clone());
    let mut runner = Runner::new(ctx.clone(), true);
    while !shutdown.is_cancelled() {
        if lease.held() {
            runner.start_due().await;
        }
        let wake = runner.next_wake().filter(|_| lease.held());
        tokio::select! {
            _ = shutdown.cancelled() => {}
            held = lease.changed() => match held {
                Some(true) => runner.took_over(ctx.lease.state().await.ok().flatten()),
                Some(false) => runner.stop().await,
                None => break,
            },
            _ = sleep_until(wake) => {}
            Some(sync) = runner.join_next() => runner.finished(sync).await,
        }
    }
    runner.stop().await;
    runner.drain(ctx.config.sync.shutdown_grace.get()).await;
    lease.release(&ctx).await;
    Lifecycle::Stopped.emit(&ctx.metrics);
    Ok(())
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
