//! The sync of one worker: fetch its labs, diff against its records, write, record the status.

use std::time::{Duration, Instant};

use bson::DateTime;
use cml_labs::{
    change::{plan_sync, Listing, PlanCounts},
    cml::{CmlTarget, FetchSource},
    status::StatusUpdate,
    store::ApplyOutcome,
};
use tracing::Instrument;

use crate::{context::Context, Error, Result};

/// What one successful worker sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerOutcome {
    pub counts: PlanCounts,
    pub applied: ApplyOutcome,
    pub listing: Listing,
    pub source: FetchSource,
    pub cml_calls: u32,
    pub duration: Duration,
}

/// Syncs one worker within the configured deadline and logs one line. Returns the outcome and
/// the status to record (the pass writes all statuses in one round trip).
///
/// A failure leaves the worker's records as they were: nothing is written before the listing
/// is complete in memory, and the write itself is per-record atomic.
pub async fn sync_worker(
    ctx: &Context,
    target: &CmlTarget,
) -> (Result<WorkerOutcome>, StatusUpdate) {
    let span = tracing::info_span!("worker_sync", worker_id = %target.worker_id);
    async {
        let started = Instant::now();
        let attempt_at = DateTime::now();
        let deadline = ctx.config.sync.worker_deadline.get();
        let result = match tokio::time::timeout(deadline, sync_inner(ctx, target, started)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Deadline(deadline)),
        };
        let took = started.elapsed();
        ctx.metrics.worker_duration.observe(took.as_secs_f64());
        match &result {
            Ok(o) => {
                let c = o.counts;
                ctx.metrics.success();
                ctx.metrics.labs_synced.inc_by(c.synced as u64);
                ctx.metrics.labs_created.inc_by(o.applied.created);
                ctx.metrics.labs_updated.inc_by(c.updated as u64);
                ctx.metrics.labs_removed.inc_by(c.removed as u64);
                ctx.metrics.write_conflicts.inc_by(o.applied.conflicts);
                tracing::info!(
                    worker_id = %target.worker_id,
                    synced = c.synced, created = c.created, updated = c.updated, unchanged = c.unchanged,
                    removed = c.removed, reappeared = c.reappeared, conflicts = o.applied.conflicts,
                    complete = o.listing == Listing::Complete, source = ?o.source, cml_calls = o.cml_calls,
                    mongodb_writes = o.applied.round_trips, duration_ms = took.as_millis() as u64,
                    "Worker {}: synced={}, created={}, updated={}, unchanged={}, removed={}",
                    target.worker_id, c.synced, c.created, c.updated, c.unchanged, c.removed
                );
            }
            Err(e) => {
                let kind = e.metric_label();
                ctx.metrics.failure(kind);
                tracing::warn!(
                    worker_id = %target.worker_id, kind, error = %e, duration_ms = took.as_millis() as u64,
                    "Worker {}: sync failed ({kind}): {e}", target.worker_id
                );
            }
        }
        let status = match &result {
            Ok(o) => StatusUpdate::success(&target.worker_id, attempt_at, took, o.counts.synced),
            Err(e) => StatusUpdate::failure(&target.worker_id, attempt_at, took, &e.to_string()),
        };
        (result, status)
    }
    .instrument(span)
    .await
}

async fn sync_inner(ctx: &Context, target: &CmlTarget, started: Instant) -> Result<WorkerOutcome> {
    // The stored records do not depend on the listing: read them while CML answers, so a
    // worker costs one CML round trip plus one write, not plus a read as well.
    let (fetched, stored) = tokio::try_join!(
        ctx.cml.fetch_labs(target),
        ctx.store.records_for_sync(&target.worker_id)
    )?;
    if let Some(note) = &fetched.note {
        tracing::info!(worker_id = %target.worker_id, complete = fetched.listing == Listing::Complete, "Worker {}: {note}", target.worker_id);
    }
    let plan = plan_sync(
        &target.worker_id,
        &stored,
        fetched.labs,
        fetched.listing,
        DateTime::now(),
    );
    let counts = plan.counts();
    let applied = ctx.store.apply(&plan).await?;
    Ok(WorkerOutcome {
        counts,
        applied,
        listing: fetched.listing,
        source: fetched.source,
        cml_calls: fetched.calls,
        duration: started.elapsed(),
    })
}
