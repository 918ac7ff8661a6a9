//! The worker registry as a source: reads the worker list when the runner says a cycle is due
//! (or the rest of one another replica left unfinished), and, when workers come from the
//! registry, each time it changes (the `cml_workers` watch) — then workers that started
//! running or moved sync at once and those that stopped are no longer synced. It keeps the
//! list as last read ([`Known`]), so each change is logged once; the first read after taking
//! the lease is the baseline.

use std::{collections::HashSet, sync::Arc, time::Duration};

use bson::{doc, DateTime, Document};
use cml_client::CmlTarget;
use shared::config::MongoConfig;
use tokio::sync::{mpsc, watch, Notify};

use super::{serve_failed, Trigger, Triggers};
use crate::{
    context::Context,
    known::{Changes, Known},
    logs::{CycleResumed, FleetViewFailed, LogLine, RegistryChange},
    watch::Watch,
};

/// How often the registry is re-read while change streams are unavailable.
const FALLBACK: Duration = Duration::from_secs(60);

/// What wakes this source (when workers come from the registry): workers added, replaced or
/// removed, and changes of the fields that decide whether and where one is synced.
pub fn watch(mongo: &MongoConfig) -> Watch {
    let fields = ["status", "https_endpoint", "private_ip"];
    let mut touched: Vec<Document> = fields
        .iter()
        .map(|f| doc! { format!("updateDescription.updatedFields.{f}"): { "$exists": true } })
        .collect();
    touched.push(doc! { "updateDescription.removedFields": { "$in": fields.to_vec() } });
    Watch {
        name: "registry",
        collection: mongo.workers_collection.clone(),
        pipeline: vec![doc! { "$match": { "$or": [
            { "operationType": { "$in": ["insert", "replace", "delete"] } },
            { "operationType": "update", "$or": touched },
        ] } }],
        fallback: FALLBACK,
        sweep: None,
    }
}

/// A read the runner asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleRead {
    /// Every active worker, for a cycle that starts now.
    Full,
    /// The active workers no sync wrote to since the interrupted cycle began at `since`.
    Resume { since: DateTime },
}

/// The active workers as last read in this term of the lease (`None`: not read yet), for the
/// sources that follow the fleet (CML's event streams).
pub type Fleet = watch::Sender<Option<Vec<CmlTarget>>>;

/// Serves the runner's reads (`reads`) and, while `held`, the registry's changes (`changed`,
/// when workers come from the registry); publishes each list it reads to `fleet`.
pub async fn run(
    ctx: Arc<Context>,
    mut held: watch::Receiver<bool>,
    changed: Option<Arc<Notify>>,
    mut reads: mpsc::UnboundedReceiver<CycleRead>,
    triggers: Triggers,
    fleet: Fleet,
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
                    fleet.send_replace(None);
                }
                true
            }
            read = reads.recv() => match read {
                Some(read) => cycle(&ctx, &mut known, read, &triggers, &fleet).await,
                None => return,
            },
            _ = changed.notified(), if holds && watching => {
                registry_changed(&ctx, &mut known, &triggers, &fleet).await
            }
        };
        if !sent {
            return; // the runner is gone
        }
    }
}

/// Reads the workers of a cycle and hands them to the runner (with what changed since the
/// last read). A full cycle is noted in the lease, so a replica taking over keeps its rhythm;
/// the rest of an interrupted one leaves out the workers synced since it began.
async fn cycle(
    ctx: &Context,
    known: &mut Known,
    read: CycleRead,
    triggers: &Triggers,
    fleet: &Fleet,
) -> bool {
    let since = match read {
        CycleRead::Full => None,
        CycleRead::Resume { since } => Some(since),
    };
    let read = tokio::try_join!(ctx.workers(), async {
        match since {
            Some(since) => Ok(ctx.store.workers_synced_since(since).await?),
            None => Ok(HashSet::new()),
        }
    });
    let (targets, synced) = match read {
        Ok(read) => read,
        Err(error) => {
            let resumed = since.is_some();
            let unreadable = Trigger::CycleUnreadable { error, resumed };
            return triggers.send(unreadable).await.is_ok();
        }
    };
    fleet.send_replace(Some(targets.clone()));
    if !forget_stopped(ctx, known, &targets, triggers).await {
        return false;
    }
    let trigger = match since {
        None => {
            ctx.note_cycle_start().await;
            Trigger::Cycle {
                targets,
                resumed: false,
            }
        }
        Some(began) => {
            let total = targets.len();
            let rest: Vec<CmlTarget> = targets
                .into_iter()
                .filter(|t| !synced.contains(&t.worker_id))
                .collect();
            CycleResumed {
                began,
                workers: rest.len(),
                already_synced: total - rest.len(),
            }
            .emit(&ctx.metrics);
            Trigger::Cycle {
                targets: rest,
                resumed: true,
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
async fn registry_changed(
    ctx: &Context,
    known: &mut Known,
    triggers: &Triggers,
    fleet: &Fleet,
) -> bool {
    let targets = match ctx.workers().await {
        Ok(targets) => targets,
        Err(error) => {
            serve_failed(ctx, error, "read the worker registry");
            return true;
        }
    };
    fleet.send_replace(Some(targets.clone()));
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
