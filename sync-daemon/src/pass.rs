//! Passes in progress: which workers each cycle, batch of retries or requested sync still waits
//! for, the statuses it has yet to write, and the report it ends with. Pure bookkeeping; the
//! runner's books do the I/O when a pass closes.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use cml_client::CmlTarget;
use shared::change::PlanCounts;
use tokio::time::Instant;

use crate::{
    schedule::{Opened, PassId, PassKind},
    status::StatusUpdate,
    worker::WorkerSync,
};

/// A worker whose sync failed: its error's fixed label and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedWorker {
    pub target: CmlTarget,
    pub kind: &'static str,
    pub error: String,
}

/// The figures of one pass, as logged at its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub workers: usize,
    pub succeeded: Vec<String>,
    pub failed: Vec<FailedWorker>,
    /// Workers never started because syncing stopped (shutdown, lease lost).
    pub skipped: Vec<CmlTarget>,
    pub totals: PlanCounts,
    pub cml_calls: u64,
    pub mongodb_writes: u64,
    pub duration: Duration,
}

impl PassReport {
    /// `success` when every worker synced, `partial` otherwise.
    pub fn outcome(&self) -> &'static str {
        if self.failed.is_empty() && self.skipped.is_empty() {
            "success"
        } else {
            "partial"
        }
    }

    fn add(&mut self, sync: &WorkerSync) {
        match &sync.result {
            Ok(o) => {
                self.succeeded.push(sync.target.worker_id.clone());
                let t = &mut self.totals;
                t.synced += o.counts.synced;
                t.created += o.counts.created;
                t.updated += o.counts.updated;
                t.unchanged += o.counts.unchanged;
                t.removed += o.counts.removed;
                t.reappeared += o.counts.reappeared;
                self.cml_calls += u64::from(o.cml_calls);
                self.mongodb_writes += u64::from(o.applied.round_trips);
            }
            Err(e) => self.failed.push(FailedWorker {
                target: sync.target.clone(),
                kind: e.metric_label(),
                error: e.to_string(),
            }),
        }
    }
}

/// A pass that is still waiting for workers.
#[derive(Debug)]
pub struct Pass {
    pub id: PassId,
    pub kind: PassKind,
    pub span: tracing::Span,
    started: Instant,
    pending: HashSet<String>,
    /// Statuses of the syncs this pass owns not written yet: written [`STATUS_BATCH`] at a
    /// time while it runs, the rest when it closes.
    pub statuses: Vec<StatusUpdate>,
    pub report: PassReport,
}

/// Statuses a pass writes together while it runs, so that a cycle of any size holds at most
/// this many (and the fleet view and the event stream see its progress).
pub const STATUS_BATCH: usize = 256;

/// Every open pass.
#[derive(Debug, Default)]
pub struct Passes {
    open: HashMap<PassId, Pass>,
}

impl Passes {
    /// Starts tracking a pass the schedule opened. Returns it at once when it waits for nobody.
    pub fn open(&mut self, opened: &Opened, span: tracing::Span, now: Instant) -> Option<Pass> {
        let pass = Pass {
            id: opened.pass,
            kind: opened.kind,
            span,
            started: now,
            pending: opened.workers.iter().map(|t| t.worker_id.clone()).collect(),
            statuses: Vec::new(),
            report: PassReport {
                workers: opened.workers.len(),
                ..PassReport::default()
            },
        };
        self.insert(pass, now)
    }

    fn insert(&mut self, pass: Pass, now: Instant) -> Option<Pass> {
        if pass.pending.is_empty() {
            return Some(finish(pass, now));
        }
        self.open.insert(pass.id, pass);
        None
    }

    /// Why `pass` runs, while it is open.
    pub fn kind(&self, pass: PassId) -> Option<PassKind> {
        self.open.get(&pass).map(|p| p.kind)
    }

    /// The span worker syncs of `pass` run in (a child of the pass's span).
    pub fn span(&self, pass: PassId) -> tracing::Span {
        self.open
            .get(&pass)
            .map_or_else(tracing::Span::none, |p| p.span.clone())
    }

    /// A worker's outcome reached the passes waiting for it; `passes[0]` owns the sync and
    /// records its status. Returns the passes that are now complete.
    pub fn record(&mut self, passes: &[PassId], sync: &WorkerSync, now: Instant) -> Vec<Pass> {
        let mut closed = Vec::new();
        for (i, id) in passes.iter().enumerate() {
            let Some(mut pass) = self.open.remove(id) else {
                continue;
            };
            if pass.pending.remove(&sync.target.worker_id) {
                pass.report.add(sync);
                if i == 0 {
                    pass.statuses.push(sync.status());
                }
            }
            closed.extend(self.insert(pass, now));
        }
        closed
    }

    /// The statuses of open passes that reached [`STATUS_BATCH`], taken to be written now.
    pub fn full_status_batches(&mut self) -> Vec<Vec<StatusUpdate>> {
        self.open
            .values_mut()
            .filter(|p| p.statuses.len() >= STATUS_BATCH)
            .map(|p| std::mem::take(&mut p.statuses))
            .collect()
    }

    /// A worker will not sync after all. Returns the passes that are now complete.
    pub fn skip(&mut self, passes: &[PassId], target: &CmlTarget, now: Instant) -> Vec<Pass> {
        let mut closed = Vec::new();
        for id in passes {
            let Some(mut pass) = self.open.remove(id) else {
                continue;
            };
            if pass.pending.remove(&target.worker_id) {
                pass.report.skipped.push(target.clone());
            }
            closed.extend(self.insert(pass, now));
        }
        closed
    }
}

fn finish(mut pass: Pass, now: Instant) -> Pass {
    pass.report.duration = now.saturating_duration_since(pass.started);
    pass
}

#[cfg(test)]
mod tests {
    use bson::DateTime;
    use shared::store::ApplyOutcome;

    use super::*;
    use crate::{worker::WorkerOutcome, Error};

    fn t(id: &str) -> CmlTarget {
        CmlTarget {
            worker_id: id.into(),
            endpoint: "https://x".into(),
        }
    }

    fn synced(id: &str, labs: usize) -> WorkerSync {
        WorkerSync {
            target: t(id),
            scope: crate::schedule::Scope::Full,
            attempt_at: DateTime::from_millis(0),
            took: Duration::from_millis(5),
            term: shared::fence::Term(1),
            result: Ok(WorkerOutcome {
                access: crate::worker::AccessOutcome::NotAsked,
                counts: PlanCounts {
                    synced: labs,
                    unchanged: labs,
                    ..PlanCounts::default()
                },
                applied: ApplyOutcome {
                    round_trips: 1,
                    ..ApplyOutcome::default()
                },
                complete: true,
                source: "bulk",
                groups: cml_client::GroupsRead::InLabs,
                cml_calls: 1,
                activity: false,
            }),
        }
    }

    fn failed(id: &str) -> WorkerSync {
        WorkerSync {
            result: Err(Error::Deadline(Duration::from_secs(1))),
            ..synced(id, 0)
        }
    }

    fn opened(pass: PassId, kind: PassKind, ids: &[&str]) -> Opened {
        Opened {
            pass,
            kind,
            workers: ids.iter().map(|i| t(i)).collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_closes_when_every_worker_synced_failed_or_was_skipped() {
        let mut passes = Passes::default();
        let start = Instant::now();
        assert!(passes
            .open(
                &opened(1, PassKind::Cycle, &["a", "b", "c"]),
                tracing::Span::none(),
                start
            )
            .is_none());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(passes
            .record(&[1], &synced("a", 4), Instant::now())
            .is_empty());
        assert!(passes.record(&[1], &failed("b"), Instant::now()).is_empty());
        let closed = passes.skip(&[1], &t("c"), Instant::now());
        assert_eq!(closed.len(), 1);
        let r = &closed[0].report;
        assert_eq!(
            (
                r.workers,
                r.succeeded.len(),
                r.failed.len(),
                r.skipped.len()
            ),
            (3, 1, 1, 1)
        );
        assert_eq!((r.totals.synced, r.cml_calls, r.mongodb_writes), (4, 1, 1));
        assert_eq!(r.failed[0].kind, "deadline");
        assert_eq!(r.outcome(), "partial");
        assert_eq!(r.duration, Duration::from_secs(3));
        assert_eq!(
            closed[0].statuses.len(),
            2,
            "a status for each sync that ran"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_sync_counts_in_every_pass_but_only_its_owner_records_the_status() {
        let mut passes = Passes::default();
        let now = Instant::now();
        passes.open(
            &opened(1, PassKind::Cycle, &["a"]),
            tracing::Span::none(),
            now,
        );
        passes.open(
            &opened(2, PassKind::Requested, &["a"]),
            tracing::Span::none(),
            now,
        );
        let closed = passes.record(&[1, 2], &synced("a", 2), now);
        assert_eq!(closed.len(), 2);
        assert_eq!(closed[0].statuses.len(), 1);
        assert!(closed[1].statuses.is_empty());
        assert!(closed.iter().all(|p| p.report.totals.synced == 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_pass_hands_its_statuses_over_a_batch_at_a_time() {
        let mut passes = Passes::default();
        let now = Instant::now();
        let ids: Vec<String> = (0..STATUS_BATCH * 2 + 10)
            .map(|i| format!("w{i}"))
            .collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        passes.open(
            &opened(1, PassKind::Cycle, &refs),
            tracing::Span::none(),
            now,
        );
        let mut written = Vec::new();
        let mut closed = Vec::new();
        for id in &ids {
            closed.extend(passes.record(&[1], &synced(id, 1), now));
            for batch in passes.full_status_batches() {
                assert_eq!(batch.len(), STATUS_BATCH);
                written.extend(batch.into_iter().map(|s| s.worker_id));
            }
        }
        assert_eq!(written.len(), STATUS_BATCH * 2);
        assert_eq!(closed.len(), 1);
        // The rest when it closes: every status once, in the order the syncs ended.
        written.extend(closed[0].statuses.iter().map(|s| s.worker_id.clone()));
        assert_eq!(written, ids);
        assert_eq!(closed[0].report.succeeded.len(), ids.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_over_no_workers_closes_at_once() {
        let mut passes = Passes::default();
        let closed = passes.open(
            &opened(7, PassKind::Cycle, &[]),
            tracing::Span::none(),
            Instant::now(),
        );
        assert_eq!(closed.map(|p| p.report.outcome()), Some("success"));
    }
}
