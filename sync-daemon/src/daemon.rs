//! The long-running loop: hold the lease, run a refresh cycle every interval, retry failed
//! workers with backoff in between, and shut down cleanly.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use bson::DateTime;
use cml_labs::{cml::CmlTarget, store::cutoff};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    backoff::{random_unit, Backoff},
    context::Context,
    cycle::{run_pass, PassReport},
    metrics::OutcomeLabel,
    Error, Result,
};

/// A failed worker waiting for its retry.
#[derive(Debug, Clone)]
struct Retry {
    target: CmlTarget,
    failures: u32,
    due: Instant,
}

/// Whether a pass covers every worker (a refresh cycle) or only the failed ones due a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassKind {
    Cycle,
    Retry,
}

/// Runs until `shutdown` is cancelled. Storage is prepared first (retrying while MongoDB is
/// unreachable), then cycles run only while this replica holds the lease.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) -> Result<()> {
    prepare_until_ready(&ctx, &shutdown).await;
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let (lease_tx, mut lease_rx) = watch::channel(false);
    let keeper = tokio::spawn(keep_lease(ctx.clone(), lease_tx, shutdown.clone()));

    let sync = &ctx.config.sync;
    let interval = sync.interval.get();
    let backoff = Backoff {
        base: sync.retry_base.get(),
        cap: interval,
    };
    let mut next_cycle = Instant::now()
        + if sync.run_immediately {
            Duration::ZERO
        } else {
            interval
        };
    let mut retries: BTreeMap<String, Retry> = BTreeMap::new();

    'outer: loop {
        // Standby: wait for the lease, then pick up the schedule where the last holder left it.
        while !*lease_rx.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                changed = lease_rx.changed() => if changed.is_err() { break 'outer },
            }
            if *lease_rx.borrow() {
                next_cycle = schedule_after_takeover(&ctx, interval, next_cycle).await;
            }
        }
        let wake = retries
            .values()
            .map(|r| r.due)
            .chain([next_cycle])
            .min()
            .unwrap_or(next_cycle);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = lease_rx.changed() => continue,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        let (kind, targets) = if now >= next_cycle {
            next_cycle += interval;
            match ctx.workers().await {
                Ok(t) => (PassKind::Cycle, t),
                Err(e) => {
                    tracing::warn!(error = %e, kind = e.metric_label(), "Cannot read the worker registry; the cycle is skipped: {e}");
                    ctx.metrics
                        .cycles
                        .get_or_create(&OutcomeLabel {
                            outcome: "registry_failed".into(),
                        })
                        .inc();
                    // Retry the registry soon rather than a whole interval later.
                    next_cycle = now + backoff.delay(1, random_unit());
                    continue;
                }
            }
        } else {
            let due: Vec<CmlTarget> = retries
                .values()
                .filter(|r| r.due <= now)
                .map(|r| r.target.clone())
                .collect();
            (PassKind::Retry, due)
        };

        let pass_stop = shutdown.child_token();
        let lease_watch = watch_lease_loss(lease_rx.clone(), pass_stop.clone());
        let Some(report) = run_logged(&ctx, kind, targets, &pass_stop, &shutdown).await else {
            lease_watch.abort();
            break;
        };
        lease_watch.abort();
        update_retries(&mut retries, &report, kind, &backoff);
        // A cycle that overran its interval is followed by the next one an interval later, not
        // by a burst of missed ones.
        if next_cycle <= Instant::now() {
            next_cycle = Instant::now() + interval;
        }
    }

    keeper.abort();
    if *lease_rx.borrow() {
        match ctx.lease.release().await {
            Ok(()) => tracing::info!(holder = ctx.lease.holder(), "Released the sync lease"),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot release the sync lease; it expires by itself")
            }
        }
    }
    ctx.metrics.lease_held.set(0);
    tracing::info!("sync-daemon stopped");
    Ok(())
}

/// One cycle (`sync-daemon once`): takes the lease, syncs every active worker (or just
/// `only`), purges old tombstones, releases the lease.
pub async fn once(
    ctx: Arc<Context>,
    only: Option<&str>,
    shutdown: CancellationToken,
) -> Result<PassReport> {
    ctx.prepare_storage().await?;
    if !ctx
        .lease
        .try_acquire(DateTime::now())
        .await
        .map_err(Error::from)?
    {
        let holder = ctx
            .lease
            .state()
            .await?
            .map(|s| s.holder)
            .unwrap_or_default();
        return Err(Error::LeaseHeld { holder });
    }
    let result = async {
        let mut targets = ctx.workers().await?;
        if let Some(id) = only {
            targets.retain(|t| t.worker_id == id);
            if targets.is_empty() {
                return Err(Error::UnknownWorker(id.to_owned()));
            }
        }
        let stop = shutdown.child_token();
        run_logged(&ctx, PassKind::Cycle, targets, &stop, &shutdown)
            .await
            .ok_or(Error::Deadline(ctx.config.sync.shutdown_grace.get()))
    }
    .await;
    if let Err(e) = ctx.lease.release().await {
        tracing::warn!(error = %e, "Cannot release the sync lease; it expires by itself");
    }
    result
}

/// Runs a pass with its log lines and metrics. `None` when shutdown came and the in-flight
/// syncs did not finish within the grace period.
async fn run_logged(
    ctx: &Arc<Context>,
    kind: PassKind,
    targets: Vec<CmlTarget>,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Option<PassReport> {
    let span = tracing::info_span!("labs_refresh", kind = ?kind, workers = targets.len());
    run_logged_in_span(ctx, kind, targets, stop, shutdown)
        .instrument(span)
        .await
}

async fn run_logged_in_span(
    ctx: &Arc<Context>,
    kind: PassKind,
    targets: Vec<CmlTarget>,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Option<PassReport> {
    match kind {
        PassKind::Cycle => {
            tracing::info!(workers = targets.len(), "Starting labs refresh cycle");
            if let Err(e) = ctx.lease.record_cycle(DateTime::now()).await {
                tracing::warn!(error = %e, "Cannot note the cycle start in the lease");
            }
        }
        PassKind::Retry => tracing::info!(
            workers = targets.len(),
            "Retrying {} failed workers",
            targets.len()
        ),
    }
    let grace = ctx.config.sync.shutdown_grace.get();
    let report = tokio::select! {
        r = run_pass(ctx, targets, stop) => r,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "In-flight worker syncs did not finish within the grace period; stopping anyway");
            return None;
        }
    };
    let purged = if kind == PassKind::Cycle && !stop.is_cancelled() {
        let retention = ctx.config.sync.removed_retention.get();
        match ctx
            .store
            .purge_removed(cutoff(DateTime::now(), retention))
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot purge removed lab records: {e}");
                0
            }
        }
    } else {
        0
    };
    ctx.metrics.labs_purged.inc_by(purged);
    let t = report.totals;
    let failed: Vec<&str> = report
        .failed
        .iter()
        .map(|(w, _)| w.worker_id.as_str())
        .collect();
    let outcome = if report.failed.is_empty() && report.skipped.is_empty() {
        "success"
    } else {
        "partial"
    };
    ctx.metrics
        .cycles
        .get_or_create(&OutcomeLabel {
            outcome: outcome.into(),
        })
        .inc();
    let fields_message = format!(
        "synced={}, created={}, updated={}, unchanged={}, removed={}, purged={purged}, failed_workers={}, duration_ms={}",
        t.synced, t.created, t.updated, t.unchanged, t.removed, report.failed.len(), report.duration.as_millis()
    );
    match kind {
        PassKind::Cycle => {
            ctx.metrics
                .cycle_duration
                .observe(report.duration.as_secs_f64());
            ctx.metrics
                .last_cycle_end
                .set(DateTime::now().timestamp_millis() as f64 / 1000.0);
            tracing::info!(
                workers = report.workers, synced = t.synced, created = t.created, updated = t.updated,
                unchanged = t.unchanged, removed = t.removed, purged, failed_workers = report.failed.len(),
                skipped_workers = report.skipped.len(), failed = ?failed, cml_calls = report.cml_calls,
                mongodb_writes = report.mongodb_writes, duration_ms = report.duration.as_millis() as u64,
                "Labs refresh complete: {fields_message}"
            );
        }
        PassKind::Retry => tracing::info!(
            workers = report.workers, synced = t.synced, failed_workers = report.failed.len(), failed = ?failed,
            duration_ms = report.duration.as_millis() as u64,
            "Retry of failed workers complete: {fields_message}"
        ),
    }
    Some(report)
}

fn update_retries(
    retries: &mut BTreeMap<String, Retry>,
    report: &PassReport,
    kind: PassKind,
    backoff: &Backoff,
) {
    if kind == PassKind::Cycle {
        // Workers that left the fleet are not retried.
        let failed: Vec<&str> = report
            .failed
            .iter()
            .map(|(t, _)| t.worker_id.as_str())
            .collect();
        retries.retain(|id, _| failed.contains(&id.as_str()));
    }
    for id in &report.succeeded {
        retries.remove(id);
    }
    let now = Instant::now();
    for (target, _) in &report.failed {
        let failures = retries.get(&target.worker_id).map_or(0, |r| r.failures) + 1;
        let delay = backoff.delay(failures, random_unit());
        tracing::info!(worker_id = %target.worker_id, failures, retry_in_ms = delay.as_millis() as u64, "Worker {} will be retried in {:?}", target.worker_id, delay);
        retries.insert(
            target.worker_id.clone(),
            Retry {
                target: target.clone(),
                failures,
                due: now + delay,
            },
        );
    }
}

/// Cancels `stop` as soon as the lease is lost.
fn watch_lease_loss(
    mut lease: watch::Receiver<bool>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while lease.changed().await.is_ok() {
            if !*lease.borrow() {
                tracing::warn!("Lost the sync lease: no new worker syncs start");
                stop.cancel();
                return;
            }
        }
    })
}

/// After taking the lease over: the next cycle is an interval after the last one any replica
/// started, so a rolling update neither skips nor doubles a cycle.
async fn schedule_after_takeover(ctx: &Context, interval: Duration, planned: Instant) -> Instant {
    let last = match ctx.lease.state().await {
        Ok(Some(s)) => s.last_cycle_at,
        _ => None,
    };
    let Some(last) = last else { return planned };
    let since = DateTime::now()
        .timestamp_millis()
        .saturating_sub(last.timestamp_millis())
        .max(0) as u64;
    let since = Duration::from_millis(since);
    Instant::now() + interval.saturating_sub(since)
}

/// Holds the lease: renews it every third of its lifetime; publishes whether it is held.
async fn keep_lease(ctx: Arc<Context>, tx: watch::Sender<bool>, shutdown: CancellationToken) {
    let ttl = ctx.lease.ttl();
    let period = ttl / 3;
    let mut last_renewal: Option<Instant> = None;
    let mut first = true;
    loop {
        let held = match ctx.lease.try_acquire(DateTime::now()).await {
            Ok(true) => {
                last_renewal = Some(Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                // Unsure whether the lease still holds: keep it only while it surely has not expired.
                let still = *tx.borrow() && last_renewal.is_some_and(|t| t.elapsed() < ttl * 2 / 3);
                tracing::warn!(error = %e, "Cannot renew the sync lease: {e}");
                still
            }
        };
        if held != *tx.borrow() || (first && !held) {
            first = false;
            if held {
                tracing::info!(holder = ctx.lease.holder(), "Acquired the sync lease");
            } else {
                tracing::warn!(
                    holder = ctx.lease.holder(),
                    "This replica does not hold the sync lease; standing by"
                );
            }
            let _ = tx.send(held);
        }
        ctx.metrics.lease_held.set(i64::from(held));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Indexes at start; while MongoDB is unreachable, retries every few seconds instead of dying.
async fn prepare_until_ready(ctx: &Context, shutdown: &CancellationToken) {
    let mut attempt = 0;
    loop {
        match ctx.prepare_storage().await {
            Ok(()) => return,
            Err(e) => {
                attempt += 1;
                let delay = Backoff {
                    base: Duration::from_secs(2),
                    cap: Duration::from_secs(30),
                }
                .delay(attempt, random_unit());
                tracing::error!(error = %e, attempt, "Cannot prepare MongoDB (indexes); retrying in {delay:?}: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
