//! Wakes the lease holder when a collection it serves changes (new sync requests, edits of the
//! worker registry): a change stream while this replica holds the lease, a wake each time it
//! (re)opens, and where change streams are unavailable a wake every `fallback` instead. Only
//! wakes: what changed is read by the loop, so a missed or doubled wake costs one read.

use std::{sync::Arc, time::Duration};

use bson::Document;
use mongodb::{change_stream::event::ChangeStreamEvent, Database};
use shared::{
    backoff::Backoff,
    change_stream::{follow, Follower, Source, Spec, State},
    metrics::Watched,
};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    lease::LeaseKeeper,
    logs::{LogLine, WatchFailed, WatchOpened},
    metrics::Metrics,
};

/// The first retry after a change stream failed (before jitter); later ones back off up to
/// `fallback`.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// One collection to watch.
#[derive(Debug, Clone)]
pub struct Watch {
    /// For the logs: `sync_requests`, `registry`.
    pub name: &'static str,
    pub collection: String,
    /// Which changes wake (a `$match` stage, say).
    pub pipeline: Vec<Document>,
    /// How often to wake while the change stream cannot be opened.
    pub fallback: Duration,
    /// Wake this often even while the change stream works (a sweep for what no change
    /// announces), if at all.
    pub sweep: Option<Duration>,
}

impl Watch {
    /// Watches while `lease` is held by this replica; wakes `wake` (coalesced). Ends when
    /// `stop` is cancelled.
    pub fn run(
        self,
        ctx: &Context,
        lease: &LeaseKeeper,
        wake: &Arc<Notify>,
        stop: &CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        run(
            ctx.db.clone(),
            self,
            lease.subscribe(),
            wake.clone(),
            ctx.metrics.clone(),
            stop.clone(),
        )
    }
}

async fn run(
    db: Database,
    w: Watch,
    mut held: watch::Receiver<bool>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let source = Source::Collection(db.collection(&w.collection));
    let spec = Spec {
        pipeline: w.pipeline.clone(),
        full_document: None,
        batch_size: None,
        start_at: None,
        backoff: Backoff {
            base: FIRST_RETRY.min(w.fallback),
            cap: w.fallback,
        },
    };
    let mut waker = Waker {
        name: w.name,
        wake: wake.clone(),
        metrics: metrics.clone(),
        announce: true,
    };
    loop {
        // Standby: nothing to watch for.
        while !*held.borrow_and_update() {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = held.changed() => if changed.is_err() { return },
            }
        }
        let lost = async {
            while *held.borrow_and_update() {
                if held.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lost => {}
            _ = sweep(w.sweep, &wake) => {}
            _ = follow(&source, spec.clone(), &mut waker) => {}
        }
        metrics.watch_up.get(&Watched(w.name)).set(0.0);
    }
}

/// Wakes the holder every `every`, if at all.
async fn sweep(every: Option<Duration>, wake: &Notify) {
    let Some(every) = every else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        wake.notify_one();
    }
}

/// Follows a watched collection: every change, and every time the stream (re)opens or fails,
/// wakes the holder — whatever changed while nobody watched is read then, so where change
/// streams are unavailable the holder is woken at each attempt, every `fallback` at most.
struct Waker {
    name: &'static str,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Log the next opening (the first, or the first after a failure).
    announce: bool,
}

impl Follower for Waker {
    fn state(&mut self, state: State<'_>) {
        self.wake.notify_one();
        match state {
            State::Up { .. } => {
                if std::mem::take(&mut self.announce) {
                    WatchOpened { name: self.name }.emit(&self.metrics);
                }
                self.metrics.watch_up.get(&Watched(self.name)).set(1.0);
            }
            State::Down {
                error,
                failures,
                retry_in,
            } => self.failed(error, failures, retry_in),
            // Nothing to resume for a watch that only wakes: a failure like any other.
            State::HistoryLost { error, retry_in } => self.failed(error, 1, retry_in),
        }
    }

    async fn change(&mut self, _: ChangeStreamEvent<Document>) {
        self.wake.notify_one();
    }
}

impl Waker {
    fn failed(&mut self, error: &mongodb::error::Error, failures: u32, retry_in: Duration) {
        self.metrics.watch_up.get(&Watched(self.name)).set(0.0);
        self.announce = true;
        WatchFailed {
            name: self.name,
            error: &error.to_string(),
            failures,
            retry_in,
        }
        .emit(&self.metrics);
    }
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinHandle;

    use super::*;

    /// A database on a server that is not there: every change stream fails to open.
    async fn nowhere() -> Database {
        mongodb::Client::with_uri_str(
            "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=50&directConnection=true",
        )
        .await
        .expect("client")
        .database("nowhere")
    }

    /// A watch of `w` on a server that is not there, run until `stop`.
    struct Running {
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        task: JoinHandle<()>,
    }

    async fn start(w: Watch, held: watch::Receiver<bool>) -> Running {
        let (wake, metrics, stop) = (
            Arc::new(Notify::new()),
            Arc::new(Metrics::default()),
            CancellationToken::new(),
        );
        let task = tokio::spawn(run(
            nowhere().await,
            w,
            held,
            wake.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        Running {
            wake,
            metrics,
            stop,
            task,
        }
    }

    /// Where change streams cannot be opened (here: no server at all), the holder is woken
    /// every `fallback` instead, and the gauge says the stream is down.
    #[tokio::test]
    async fn without_change_streams_the_holder_is_woken_on_a_timer() {
        let (_held_tx, held) = watch::channel(true);
        let w = Watch {
            name: "sync_requests",
            collection: "sync_requests".into(),
            pipeline: Vec::new(),
            fallback: Duration::from_millis(100),
            sweep: None,
        };
        let Running {
            wake,
            metrics,
            stop,
            task,
        } = start(w, held).await;
        for _ in 0..4 {
            tokio::time::timeout(Duration::from_secs(30), wake.notified())
                .await
                .expect("woken again");
        }
        assert_eq!(metrics.watch_up.get(&Watched("sync_requests")).get(), 0.0);
        stop.cancel();
        task.await.expect("the watch ends when stopped");
    }

    /// A standby watches nothing; taking the lease starts the watch and wakes the holder (to
    /// read what came while nobody watched).
    #[tokio::test]
    async fn taking_the_lease_starts_the_watch_and_wakes_the_holder() {
        let (held_tx, held) = watch::channel(false);
        let w = Watch {
            name: "registry",
            collection: "cml_workers".into(),
            pipeline: Vec::new(),
            fallback: Duration::from_millis(10),
            sweep: Some(Duration::from_millis(10)),
        };
        let Running {
            wake, stop, task, ..
        } = start(w, held).await;
        // The task is parked on the lease: taking it is what wakes the holder first.
        let first = wake.notified();
        tokio::pin!(first);
        first.as_mut().enable();
        held_tx.send(true).expect("send");
        tokio::time::timeout(Duration::from_secs(30), first)
            .await
            .expect("woken once it holds the lease");
        stop.cancel();
        task.await.expect("ends");
    }
}
