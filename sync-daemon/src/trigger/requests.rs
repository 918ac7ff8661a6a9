//! Refreshes asked for on demand (`sync_requests`): while this replica holds the lease, takes
//! pending requests oldest first, checks each worker as a cycle would, and hands the runner a
//! [`Trigger::Request`] for each active one; writes the outcome of those it refuses. Requests
//! this replica took and no longer serves, or another replica took and never finished, are
//! made pending again. The outcome of a served request is written by the runner's books
//! ([`finish`]), from the report of the pass that served it ([`outcome_of`]).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::{doc, DateTime};
use cml_client::CmlTarget;
use shared::{
    config::MongoConfig,
    registry::Standing,
    status::SyncCounts,
    sync_request::{Outcome, SyncRequest},
};
use tokio::sync::{watch, Notify};

use super::{serve_failed, Trigger, Triggers};
use crate::{
    context::Context,
    logs::{LogLine, RequestServed, RequestServing, RequestsRequeued},
    pass::PassReport,
    watch::Watch,
};

/// How often the holder looks for requests while change streams are unavailable.
const FALLBACK: Duration = Duration::from_secs(5);
/// How often it looks anyway (requests it took and lost track of, say).
const SWEEP: Duration = Duration::from_secs(60);

/// What wakes this source: new pending requests, a sweep every minute for requests nothing
/// announces, every few seconds where change streams are unavailable.
pub fn watch(mongo: &MongoConfig) -> Watch {
    Watch {
        name: "sync_requests",
        collection: mongo.sync_requests_collection.clone(),
        pipeline: vec![doc! { "$match": {
            "operationType": "insert", "fullDocument.status": "pending",
        } }],
        fallback: FALLBACK,
        sweep: Some(SWEEP),
    }
}

/// Longest error text written into a request: as much as a worker's sync status keeps.
const MAX_ERROR_LEN: usize = 1024;

/// The requests this replica took and has not written an outcome for yet: the runner serves
/// them. Any other request it is noted as holding is one it lost track of.
#[derive(Debug, Clone, Default)]
pub struct InHand(Arc<Mutex<HashSet<String>>>);

impl InHand {
    fn insert(&self, id: &str) {
        self.lock().insert(id.to_owned());
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn contains(&self, id: &str) -> bool {
        self.lock().contains(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set stays consistent whatever panicked while holding it.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a request comes to, from the report of the pass that served it: `None` when the sync
/// did not run (skipped: shutdown, lease lost), so the request is pending again.
pub fn outcome_of(report: &PassReport) -> Option<Outcome> {
    let duration_ms = i64::try_from(report.duration.as_millis()).unwrap_or(i64::MAX);
    if !report.skipped.is_empty() {
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
    }
}

/// Serves requests while `held`, each time `wake` is notified (the `sync_requests` watch).
pub async fn run(
    ctx: Arc<Context>,
    mut held: watch::Receiver<bool>,
    wake: Arc<Notify>,
    triggers: Triggers,
    in_hand: InHand,
) {
    loop {
        // Standby: nothing to serve.
        while !*held.borrow_and_update() {
            if held.changed().await.is_err() {
                return;
            }
        }
        requeue_orphans(&ctx).await;
        loop {
            tokio::select! {
                changed = held.changed() => {
                    if changed.is_err() { return }
                    if !*held.borrow() { break }
                }
                _ = wake.notified() => serve(&ctx, &triggers, &in_hand).await,
            }
        }
    }
}

/// This replica took the lease: the requests another replica took and never finished are
/// pending again, for this one to serve.
async fn requeue_orphans(ctx: &Context) {
    match ctx.requests.requeue_orphans(ctx.lease.holder()).await {
        Ok(0) => {}
        Ok(requests) => RequestsRequeued { requests }.emit(&ctx.metrics),
        Err(e) => serve_failed(ctx, e, "requeue refresh requests"),
    }
}

/// Requeues what this replica took and no longer serves, then takes every pending request.
async fn serve(ctx: &Context, triggers: &Triggers, in_hand: &InHand) {
    let holder = ctx.lease.holder();
    match ctx.requests.claimed_by(holder).await {
        Ok(ids) => {
            for id in ids.iter().filter(|id| !in_hand.contains(id)) {
                if let Err(e) = ctx.requests.requeue(id).await {
                    serve_failed(ctx, e, "requeue refresh requests");
                }
            }
        }
        Err(e) => return serve_failed(ctx, e, "read refresh requests"),
    }
    loop {
        match ctx.requests.claim(DateTime::now(), holder).await {
            Ok(Some(request)) => {
                if !hand_over(ctx, triggers, in_hand, request).await {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => return serve_failed(ctx, e, "take a refresh request"),
        }
    }
}

/// Hands `request` to the runner if its worker is active, else writes why it was refused.
/// False when the runner is gone.
async fn hand_over(
    ctx: &Context,
    triggers: &Triggers,
    in_hand: &InHand,
    request: SyncRequest,
) -> bool {
    RequestServing {
        request_id: &request.id,
        worker_id: &request.worker_id,
    }
    .emit(&ctx.metrics);
    let (kind, error) = match ctx.standing(&request.worker_id).await {
        Ok(Standing::Active { endpoint }) => {
            let target = CmlTarget {
                worker_id: request.worker_id.clone(),
                endpoint,
            };
            in_hand.insert(&request.id);
            return triggers
                .send(Trigger::Request { request, target })
                .await
                .is_ok();
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
        kind: kind.to_owned(),
        error,
        duration_ms: 0,
    };
    finish(ctx, in_hand, request, Some(outcome), Duration::ZERO).await;
    true
}

/// Writes a request's outcome (`None`: it did not run, and is pending again); it is no longer
/// in hand.
pub async fn finish(
    ctx: &Context,
    in_hand: &InHand,
    request: SyncRequest,
    outcome: Option<Outcome>,
    duration: Duration,
) {
    let store = &ctx.requests;
    let (written, label, kind) = match &outcome {
        None => (store.requeue(&request.id).await, "requeued", None),
        Some(o) => {
            let (label, kind) = match o {
                Outcome::Done { .. } => ("done", None),
                Outcome::Failed { kind, .. } => ("failed", Some(kind.as_str())),
            };
            let finished = store
                .finish(&request.id, ctx.lease.holder(), o, DateTime::now())
                .await;
            match finished {
                // Taken back by the next lease holder (this one lost the lease), which serves it.
                Ok(false) => (Ok(()), "taken_over", None),
                other => (other.map(drop), label, kind),
            }
        }
    };
    in_hand.remove(&request.id);
    match written {
        Ok(()) => RequestServed {
            request_id: &request.id,
            worker_id: &request.worker_id,
            outcome: label,
            kind,
            duration,
        }
        .emit(&ctx.metrics),
        Err(e) => serve_failed(ctx, e, "write a refresh request's outcome"),
    }
}

#[cfg(test)]
mod tests {
    use cml_client::CmlTarget;
    use shared::change::PlanCounts;

    use super::*;
    use crate::pass::FailedWorker;

    fn report() -> PassReport {
        PassReport {
            workers: 1,
            duration: Duration::from_millis(1500),
            ..PassReport::default()
        }
    }

    #[test]
    fn a_served_request_ends_with_the_counts_of_its_sync() {
        let r = PassReport {
            succeeded: vec!["w".into()],
            totals: PlanCounts {
                synced: 3,
                created: 1,
                unchanged: 2,
                ..PlanCounts::default()
            },
            ..report()
        };
        match outcome_of(&r) {
            Some(Outcome::Done {
                counts,
                duration_ms,
            }) => {
                assert_eq!((counts.synced, counts.created, counts.unchanged), (3, 1, 2));
                assert_eq!(duration_ms, 1500);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_sync_fails_the_request_with_its_kind_and_a_bounded_error() {
        let r = PassReport {
            failed: vec![FailedWorker {
                target: CmlTarget {
                    worker_id: "w".into(),
                    endpoint: "https://w".into(),
                },
                kind: "cml_unreachable",
                error: "x".repeat(5000),
            }],
            ..report()
        };
        match outcome_of(&r) {
            Some(Outcome::Failed { kind, error, .. }) => {
                assert_eq!(kind, "cml_unreachable");
                assert_eq!(error.len(), MAX_ERROR_LEN);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_skipped_sync_leaves_the_request_pending() {
        let r = PassReport {
            skipped: vec![CmlTarget {
                worker_id: "w".into(),
                endpoint: "https://w".into(),
            }],
            ..report()
        };
        assert_eq!(outcome_of(&r), None);
    }
}
