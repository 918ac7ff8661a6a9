//! One pass over a set of workers: a global concurrency cap, each worker at most once, and a
//! stop signal after which no new worker starts.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use cml_labs::{change::PlanCounts, cml::CmlTarget};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{context::Context, worker::sync_worker};

/// The figures of one pass, as logged at its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub workers: usize,
    pub succeeded: Vec<String>,
    /// Failed workers with their error kind.
    pub failed: Vec<(CmlTarget, &'static str)>,
    /// Workers never started because the pass was stopped.
    pub skipped: Vec<CmlTarget>,
    pub totals: PlanCounts,
    pub cml_calls: u64,
    pub mongodb_writes: u64,
    pub duration: Duration,
}

/// Syncs `targets` with at most `sync.concurrency` at once. Once `stop` is cancelled no new
/// worker starts; those already running finish (the caller bounds how long it waits).
pub async fn run_pass(
    ctx: &Arc<Context>,
    targets: Vec<CmlTarget>,
    stop: &CancellationToken,
) -> PassReport {
    let started = Instant::now();
    let mut seen = HashSet::new();
    let targets: Vec<CmlTarget> = targets
        .into_iter()
        .filter(|t| seen.insert(t.worker_id.clone()))
        .collect();
    let mut report = PassReport {
        workers: targets.len(),
        ..PassReport::default()
    };
    let permits = Arc::new(Semaphore::new(ctx.config.sync.concurrency.max(1)));
    let mut running = JoinSet::new();
    let mut pending = targets.into_iter();
    while let Some(target) = pending.next() {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            p = permits.clone().acquire_owned() => p.ok(),
        };
        let Some(permit) = permit else {
            report.skipped.push(target);
            report.skipped.extend(pending.by_ref());
            break;
        };
        let ctx = ctx.clone();
        // Worker spans are children of the cycle's span.
        running.spawn(
            async move {
                let (result, status) = sync_worker(&ctx, &target).await;
                drop(permit);
                (target, result, status)
            }
            .instrument(tracing::Span::current()),
        );
    }
    let mut statuses = Vec::new();
    while let Some(joined) = running.join_next().await {
        let Ok((target, result, status)) = joined else {
            continue;
        };
        statuses.push(status);
        match result {
            Ok(o) => {
                report.succeeded.push(target.worker_id);
                let t = &mut report.totals;
                t.synced += o.counts.synced;
                t.created += o.counts.created;
                t.updated += o.counts.updated;
                t.unchanged += o.counts.unchanged;
                t.removed += o.counts.removed;
                t.reappeared += o.counts.reappeared;
                report.cml_calls += u64::from(o.cml_calls);
                report.mongodb_writes += u64::from(o.applied.round_trips);
            }
            Err(e) => report.failed.push((target, e.metric_label())),
        }
    }
    if let Err(e) = ctx.status.record_many(&statuses).await {
        tracing::warn!(error = %e, workers = statuses.len(), "Cannot record the sync status of {} workers: {e}", statuses.len());
    }
    report.duration = started.elapsed();
    report
}
