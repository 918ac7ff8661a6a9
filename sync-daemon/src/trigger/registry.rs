//! The worker registry as a source: reads the worker list when the runner says a cycle is due
//! (or the rest of one another replica left unfinished), and, when workers come from the
//! registry, each time it changes (the `cml_workers` watch) — then workers that started
//! running or moved sync at once and those that stopped are no longer synced. It keeps the
//! list as last read ([`Known`]), so each change is logged once; the first read after taking
//! the lease is the baseline.

use std::sync::Arc;

use bson::DateTime;
use cml_client::CmlTarget;
use tokio::sync::{mpsc, watch, Notify};

use super::{requests::failed, Trigger, Triggers};
use crate::{
    context::Context,
    events::{CycleResumed, Event, FleetViewFailed, LeaseError, RegistryChange},
    known::{Changes, Known},
};

/// A read the runner asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleRead {
    /// Every active worker, for a cycle that starts now.
    Full,
    /// The active workers no sync wrote to since the interrupted cycle began at `since`.
    Resume { since: DateTime },
}

/// Serves the runner's reads (`reads`) and, while `held`, the registry's changes (`changed`,
/// when workers come from the registry).
pub async fn run(
    ctx: Arc<Context>,
    mut held: watch::Receiver<bool>,
    changed: Option<Arc<Notify>>,
    mut reads: mpsc::UnboundedReceiver<CycleRead>,
    triggers: Triggers,
) {
    let mut known = Known::default();
    let watching = changed.is_some();
    let changed = changed.unwrap_or_default();
    loop {
        let holds = *held.borrow_and_update();
        let sent = tokio::select! {
            lease = held.changed() => {
                if lease.is_err() { return }
                if !*held.borrow() {
                    known.forget();
                }
                true
            }
            read = reads.recv() => match read {
                Some(read) => cycle(&ctx, &mut known, read, &triggers).await,
                None => return,
            },
            _ = changed.notified(), if holds && watching => {
                registry_changed(&ctx, &mut known, &triggers).await
            }
        };
        if !sent {
            return; // the runner is gone
        }
    }
}

/// Reads the workers of a cycle and hands them to the runner (with what changed since the
/// last read). A full cycle is noted in the lease, so a replica taking over keeps its rhythm.
async fn cycle(ctx: &Context, known: &mut Known, read: CycleRead, triggers: &Triggers) -> bool {
    let trigger = match read {
        CycleRead::Full => match ctx.workers().await {
            Ok(targets) => {
                if !forget_stopped(ctx, known, &targets, triggers).await {
                    return false;
                }
                if let Err(e) = ctx.lease.record_cycle(DateTime::now()).await {
                    LeaseError {
                        error: &e.into(),
                        action: "note_cycle",
                    }
                    .emit(&ctx.metrics);
                }
                Trigger::Cycle {
                    targets,
                    resumed: false,
                }
            }
            Err(error) => Trigger::CycleUnreadable {
                error,
                resumed: false,
            },
        },
        CycleRead::Resume { since } => {
            let read = tokio::try_join!(ctx.workers(), async {
                Ok(ctx.store.workers_synced_since(since).await?)
            });
            match read {
                Ok((targets, synced)) => {
                    if !forget_stopped(ctx, known, &targets, triggers).await {
                        return false;
                    }
                    let total = targets.len();
                    let rest: Vec<CmlTarget> = targets
                        .into_iter()
                        .filter(|t| !synced.contains(&t.worker_id))
                        .collect();
                    CycleResumed {
                        began: since,
                        workers: rest.len(),
                        already_synced: total - rest.len(),
                    }
                    .emit(&ctx.metrics);
                    Trigger::Cycle {
                        targets: rest,
                        resumed: true,
                    }
                }
                Err(error) => Trigger::CycleUnreadable {
                    error,
                    resumed: true,
                },
            }
        }
    };
    triggers.send(trigger).await.is_ok()
}

/// A cycle syncs whatever appeared or moved anyway; what stopped is forgotten by the runner.
async fn forget_stopped(
    ctx: &Context,
    known: &mut Known,
    targets: &[CmlTarget],
    triggers: &Triggers,
) -> bool {
    let changes = known.update(targets);
    log(ctx, &changes);
    changes.stopped.is_empty()
        || triggers
            .send(Trigger::Registry {
                sync_now: Vec::new(),
                stopped: changes.stopped,
            })
            .await
            .is_ok()
}

/// The registry changed: what appeared or moved syncs now, what stopped is forgotten; then the
/// fleet view follows.
async fn registry_changed(ctx: &Context, known: &mut Known, triggers: &Triggers) -> bool {
    let targets = match ctx.workers().await {
        Ok(targets) => targets,
        Err(error) => {
            failed(ctx, error, "read the worker registry");
            return true;
        }
    };
    let changes = known.update(&targets);
    log(ctx, &changes);
    if !changes.is_empty() {
        let Changes {
            appeared,
            moved,
            stopped,
        } = changes;
        let sync_now = appeared.into_iter().chain(moved).collect();
        if triggers
            .send(Trigger::Registry { sync_now, stopped })
            .await
            .is_err()
        {
            return false;
        }
    }
    if let Err(e) = ctx.update_fleet_view().await {
        FleetViewFailed { error: &e }.emit(&ctx.metrics);
    }
    true
}

/// Each change once.
fn log(ctx: &Context, changes: &Changes) {
    for t in &changes.appeared {
        RegistryChange::Appeared {
            worker_id: &t.worker_id,
        }
        .emit(&ctx.metrics);
    }
    for t in &changes.moved {
        RegistryChange::EndpointChanged {
            worker_id: &t.worker_id,
        }
        .emit(&ctx.metrics);
    }
    for id in &changes.stopped {
        RegistryChange::Stopped { worker_id: id }.emit(&ctx.metrics);
    }
}
