//! The reasons to sync a worker. Each source lives in a module of its own and feeds the
//! schedule: the two timed ones ([`cycle`], [`retry`]) are pure parts of the schedule the runner
//! consults when it wakes; the others run as tasks of their own, do their I/O there, and send
//! the runner a [`Trigger`] — so the loop never waits for MongoDB.
//!
//! Adding a source (CML's event watch, say): a module here that sends a new [`Trigger`]
//! variant, the runner's `accept` arm that opens a pass for it, and its task started in
//! [`crate::daemon`]'s `start_sources`.

pub mod access;
pub mod cycle;
pub mod events;
pub mod registry;
pub mod requests;
pub mod retry;

use cml_client::CmlTarget;
use shared::sync_request::SyncRequest;
use tokio::{sync::mpsc, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    logs::{LogLine, ServeFailed},
    schedule::Scope,
    Error,
};

/// One reason to sync, sent by a source to the runner.
#[derive(Debug)]
pub enum Trigger {
    /// A cycle's worker list was read: every active worker, or (`resumed`) the rest of a cycle
    /// another replica began and never finished.
    Cycle {
        targets: Vec<CmlTarget>,
        resumed: bool,
    },
    /// A cycle's worker list could not be read: the cycle is tried again soon; the rest of an
    /// interrupted one (`resumed`) waits for the next cycle.
    CycleUnreadable { error: Error, resumed: bool },
    /// Workers that started running or moved sync now; workers that stopped are no longer
    /// synced (a queued sync of them is skipped, their retry dropped).
    Registry {
        sync_now: Vec<CmlTarget>,
        stopped: Vec<String>,
    },
    /// What a worker's CML event stream announced: these labs changed (`Scope::Labs`), its
    /// users or groups changed (`Scope::Access`, also sent every `sync.access_interval` by
    /// [`access`]), or the stream is live (again) and the worker is relisted (`Scope::Full`).
    /// `seen`: when the first of the changes arrived.
    Event {
        target: CmlTarget,
        scope: Scope,
        seen: Instant,
    },
    /// A refresh someone asked for (claimed by this replica), of an active worker.
    Request {
        request: SyncRequest,
        target: CmlTarget,
    },
}

/// Where sources send their triggers. Bounded: a source waits while the runner is behind.
pub type Triggers = mpsc::Sender<Trigger>;

/// How many triggers may wait for the runner.
pub const TRIGGER_QUEUE: usize = 64;

/// What a source could not read or write (`sync_requests`, the registry): logged; its next
/// wake or sweep tries again.
pub fn serve_failed(ctx: &Context, error: impl Into<Error>, action: &'static str) {
    ServeFailed {
        error: &error.into(),
        action,
    }
    .emit(&ctx.metrics);
}

/// The source tasks of a running daemon, joined at shutdown.
#[derive(Debug)]
pub struct Sources {
    tasks: JoinSet<()>,
    stop: CancellationToken,
}

impl Sources {
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            tasks: JoinSet::new(),
            stop,
        }
    }

    /// Runs `task` until it ends or the sources stop.
    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Runs `task`, which watches [`Sources::stopping`] itself and ends soon after it (to
    /// close what it holds politely).
    pub fn spawn_graceful(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// The token that stops every source.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops every source and waits until each has ended.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
