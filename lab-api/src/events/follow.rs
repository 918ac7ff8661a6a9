//! The replica's one change stream: on the database, filtered to lab changes and sync
//! statuses, so that one resume token orders every event. At start it reads back
//! `api.events.replay_window` to fill the hub's memory; after an error (MongoDB restarted,
//! failed over) it resumes after the last change it saw, so nothing is missed; when it cannot
//! (the oplog moved on) every client is told to reload. The following itself is
//! [`shared::change_stream`]'s; this module says what each change means here.

use std::{sync::Arc, time::Duration};

use bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::{
    change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken},
    options::FullDocumentType,
};
use serde_json::Value;
use shared::{
    backoff::Backoff,
    change_stream::{self, Follower, Source, Spec, State},
    store::LabStore,
};

use crate::logs::{ChangeStreamFailed, ChangeStreamOpened, ChangeStreamReset, LogLine};

use super::{
    derive::{
        account_changed, derive, finished_request, refreshed_for, Change, Collection, Operation,
    },
    hub::Audience,
    waiters::Waiters,
    Backlog, Hub,
};

/// Events published between two turns of the clients' streams; `api.events.client_buffer`
/// is at least twice this, so a client that reads keeps up with a burst.
const PUBLISH_BURST: u64 = 32;
/// The pause after each event while a client is behind.
const BACKLOG_PAUSE: Duration = Duration::from_millis(1);
/// Changes per batch from the server.
const BATCH: u32 = 256;
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// The collections whose changes are events.
#[derive(Debug, Clone)]
pub struct Watched {
    pub labs: String,
    pub status: String,
    pub requests: String,
    /// `cml_accounts`: a caller's streams end when its accounts change.
    pub accounts: String,
}

/// The change stream's filter: accounts written (a caller's access changed), inserts and
/// changes of labs (a change sets `last_changed_at`;
/// a stamp of an unchanged lab does not), changes of who may read a lab (`readers`), every status write of a sync (it sets
/// `last_attempt_at`; the registry's fields the daemon copies in are no event), throttle
/// notices, and sync requests that finished.
pub fn pipeline(w: &Watched) -> Vec<Document> {
    vec![doc! { "$match": { "$or": [
        { "ns.coll": &w.labs, "operationType": "insert" },
        { "ns.coll": &w.labs, "operationType": "update",
          "updateDescription.updatedFields.last_changed_at": { "$exists": true } },
        { "ns.coll": &w.labs, "operationType": "update",
          "updateDescription.updatedFields.readers": { "$exists": true } },
        { "ns.coll": &w.status, "operationType": { "$in": ["insert", "replace"] },
          "fullDocument.last_attempt_at": { "$exists": true } },
        { "ns.coll": &w.status, "operationType": "update",
          "updateDescription.updatedFields.last_attempt_at": { "$exists": true } },
        { "ns.coll": &w.requests, "operationType": "insert", "fullDocument.notice": "throttled" },
        { "ns.coll": &w.requests, "operationType": "update",
          "updateDescription.updatedFields.finished_at": { "$exists": true } },
        { "ns.coll": &w.accounts, "operationType": { "$in": ["insert", "update", "replace"] } },
    ] } }]
}

/// The SSE id of a change: its resume token's `_data` (hex), or the token as hex BSON.
pub fn event_id(token: &ResumeToken) -> String {
    match bson::to_bson(token) {
        Ok(Bson::Document(d)) => match d.get("_data") {
            Some(Bson::String(s)) => s.clone(),
            _ => {
                let mut bytes = Vec::new();
                let _ = d.to_writer(&mut bytes);
                bytes.iter().map(|b| format!("{b:02X}")).collect()
            }
        },
        _ => String::new(),
    }
}

fn change_of(e: &ChangeStreamEvent<Document>, w: &Watched) -> Option<Change> {
    let coll = e.ns.as_ref()?.coll.as_deref()?;
    let collection = if coll == w.labs {
        Collection::Labs
    } else if coll == w.status {
        Collection::Status
    } else if coll == w.requests {
        Collection::Requests
    } else if coll == w.accounts {
        Collection::Accounts
    } else {
        return None;
    };
    let operation = match e.operation_type {
        OperationType::Insert => Operation::Insert,
        OperationType::Update => Operation::Update,
        OperationType::Replace => Operation::Replace,
        OperationType::Delete => Operation::Delete,
        _ => Operation::Other,
    };
    Some(Change {
        collection,
        operation,
        updated_fields: e
            .update_description
            .as_ref()
            .map(|u| u.updated_fields.clone())
            .unwrap_or_default(),
        full_document: e.full_document.clone(),
    })
}

/// When the change was written: MongoDB's wall time, else its cluster time.
fn written_at(e: &ChangeStreamEvent<Document>) -> DateTime {
    e.wall_time
        .or_else(|| {
            e.cluster_time
                .map(|t| DateTime::from_millis(i64::from(t.time) * 1000))
        })
        .unwrap_or_else(DateTime::now)
}

/// Follows the change stream until the hub stops; wakes `waiters` of requests that finish.
/// `store` counts the labs of a synced worker that its partial viewers see.
pub async fn follow(hub: Arc<Hub>, waiters: Arc<Waiters>, store: LabStore, watched: Watched) {
    let db = store.database().clone();
    let stop = hub.stopping();
    let start_at = (!hub.replay_window.is_zero()).then(|| {
        let from = DateTime::now().timestamp_millis()
            - i64::try_from(hub.replay_window.as_millis()).unwrap_or(i64::MAX);
        Timestamp {
            time: u32::try_from(from.max(0) / 1000).unwrap_or(0),
            increment: 0,
        }
    });
    let spec = Spec {
        pipeline: pipeline(&watched),
        full_document: Some(FullDocumentType::UpdateLookup),
        // Bounded batches: catching up (at start, after an outage) never holds megabytes of
        // changes at once.
        batch_size: Some(BATCH),
        start_at,
        backoff: Backoff {
            base: RETRY_FIRST,
            cap: RETRY_MAX,
        },
    };
    let mut relay = Relay {
        hub: hub.clone(),
        waiters,
        store,
        watched,
        published: 0,
    };
    let source = Source::Database(db);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = change_stream::follow(&source, spec, &mut relay) => {}
    }
    hub.metrics.change_stream_up.set(0.0);
}

/// Publishes each change to the hub's clients and wakes whoever waits for a request it
/// finishes.
struct Relay {
    hub: Arc<Hub>,
    waiters: Arc<Waiters>,
    store: LabStore,
    watched: Watched,
    published: u64,
}

impl Relay {
    /// A synced worker's refreshed event as each client who sees only some of its labs gets
    /// it: one read of the worker's readers (only when such clients listen), counted per view.
    /// A failed read leaves those clients without this event (the next sync tells them).
    async fn partial_counts(&self, worker_id: &str, data: &Value) -> Vec<(Vec<String>, Value)> {
        let views = self
            .hub
            .partial_views(worker_id, super::EventType::DataRefreshed);
        if views.is_empty() {
            return Vec::new();
        }
        let Ok(readers) = self.store.readers_of_worker(worker_id).await else {
            return Vec::new();
        };
        views
            .into_iter()
            .map(|view| {
                let n = readers
                    .iter()
                    .filter(|r| r.iter().any(|p| view.binary_search(p).is_ok()))
                    .count();
                let data = refreshed_for(data, i64::try_from(n).unwrap_or(i64::MAX));
                (view, data)
            })
            .collect()
    }
}

impl Follower for Relay {
    fn state(&mut self, state: State<'_>) {
        let metrics = &self.hub.metrics;
        match state {
            State::Up { resumed } => ChangeStreamOpened { resumed, metrics }.emit(),
            State::Down {
                error, retry_in, ..
            } => ChangeStreamFailed {
                error,
                retry_in,
                metrics,
            }
            .emit(),
            State::HistoryLost { error, .. } => {
                ChangeStreamReset { error, metrics }.emit();
                self.hub.reset_all("history_lost");
            }
        }
    }

    async fn change(&mut self, e: ChangeStreamEvent<Document>) {
        self.hub.metrics.changes.inc();
        let change = change_of(&e, &self.watched);
        if let Some(id) = change.as_ref().and_then(finished_request) {
            self.waiters.finished(&id);
        }
        if let Some(user) = change.as_ref().and_then(account_changed) {
            self.hub.access_changed(&user);
        }
        let Some(mut d) = change.as_ref().and_then(derive) else {
            return;
        };
        if let (Audience::Counts { views }, Some(data)) = (&mut d.audience, &d.data) {
            *views = self.partial_counts(&d.worker_id, data).await;
        }
        let backlog = self.hub.publish_to(
            event_id(&e.id),
            d.kind,
            d.worker_id,
            written_at(&e),
            d.data,
            d.audience,
        );
        // In a burst (a first cycle, a catch-up) the clients' streams get scheduled every few
        // events, each writing what piled up in one go; while one is behind, reading slows so
        // that it can catch up (one that stalled is dropped when its queue is full, and holds
        // nobody up after that).
        self.published += 1;
        if backlog == Backlog::Behind {
            tokio::time::sleep(BACKLOG_PAUSE).await;
        } else if self.published % PUBLISH_BURST == 0 {
            tokio::task::yield_now().await;
        }
    }
}
