//! Wakes the lease holder when a collection it serves changes (new sync requests, edits of the
//! worker registry): a change stream while this replica holds the lease, a wake each time it
//! (re)opens, and where change streams are unavailable a wake every `fallback` instead. Only
//! wakes: what changed is read by the loop, so a missed or doubled wake costs one read.

use std::{sync::Arc, time::Duration};

use bson::Document;
use futures::StreamExt;
use mongodb::Database;
use shared::metrics::Watched;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    events::{Event, WatchFailed, WatchOpened},
    lease::LeaseKeeper,
    metrics::Metrics,
};

/// The first retry after a change stream failed; later ones wait `fallback`.
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
    let coll = db.collection::<Document>(&w.collection);
    let mut failures: u32 = 0;
    let mut opened_before = false;
    loop {
        // Standby: nothing to watch for.
        while !*held.borrow_and_update() {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = held.changed() => if changed.is_err() { return },
            }
        }
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = coll.watch().pipeline(w.pipeline.clone()) => opened,
        };
        // Whatever changed while nobody watched is read now.
        wake.notify_one();
        let error = match opened {
            Ok(mut stream) => {
                if failures > 0 || !opened_before {
                    WatchOpened { name: w.name }.emit(&metrics);
                }
                opened_before = true;
                metrics.watch_up.get(&Watched(w.name)).set(1.0);
                failures = 0;
                let sweep = w.sweep.unwrap_or(Duration::MAX);
                let error = loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        changed = held.changed() => {
                            if changed.is_err() { return }
                            if *held.borrow() { continue }
                            break None;
                        }
                        _ = tokio::time::sleep(sweep) => { wake.notify_one(); continue }
                        next = stream.next() => next,
                    };
                    match next {
                        Some(Ok(_)) => wake.notify_one(),
                        Some(Err(e)) => break Some(e.to_string()),
                        None => break Some("the change stream ended".to_owned()),
                    }
                };
                metrics.watch_up.get(&Watched(w.name)).set(0.0);
                error
            }
            Err(e) => Some(e.to_string()),
        };
        let Some(error) = error else {
            continue; // the lease was lost
        };
        failures += 1;
        let retry_in = if failures == 1 {
            FIRST_RETRY.min(w.fallback)
        } else {
            w.fallback
        };
        WatchFailed {
            name: w.name,
            error: &error,
            failures,
            retry_in,
        }
        .emit(&metrics);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry_in) => {}
        }
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
