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
use shared::{
    backoff::Backoff,
    change_stream::{self, Follower, Source, Spec, State},
    store::LabStore,
};

use crate::{
    access::Grants,
    logs::{ChangeStreamFailed, ChangeStreamOpened, ChangeStreamReset, LogLine},
};

use super::{
    derive::{
        account_changed, derive, finished_request, refreshed_per_view, Change, Collection, Derived,
        Operation,
    },
    hub::Audience,
    waiters::Waiters,
    Backlog, EventType, Hub,
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
pub async fn follow(
    hub: Arc<Hub>,
    waiters: Arc<Waiters>,
    grants: Arc<Grants>,
    store: LabStore,
    watched: Watched,
) {
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
        grants: grants.clone(),
        store,
        watched,
        published: 0,
        held: Vec::new(),
    };
    let source = Source::Database(db);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = change_stream::follow(&source, spec, &mut relay) => {}
    }
    grants.following(false);
    hub.metrics.change_stream_up.set(0.0);
}

/// Publishes each change to the hub's clients, wakes whoever waits for a request it finishes
/// and drops the grants a change of accounts makes stale. A sync's event is held back until the batch the server sent has been read (and
/// the changes after it with it, so that order is kept): the counts of all the syncs held
/// come from one read, and the clients get the batch in one go.
struct Relay {
    hub: Arc<Hub>,
    waiters: Arc<Waiters>,
    grants: Arc<Grants>,
    store: LabStore,
    watched: Watched,
    published: u64,
    held: Vec<Received>,
}

/// A change as the relay acts on it.
#[derive(Debug)]
struct Received {
    id: String,
    written_at: DateTime,
    /// The sync request it finished.
    finished: Option<String>,
    /// The user whose accounts it changed.
    account: Option<String>,
    event: Option<Derived>,
}

/// Most changes held back at once (a batch of the server's).
const HOLD_MAX: usize = BATCH as usize;

impl Relay {
    /// Acts on the changes held back, in order: one read of the readers of every worker whose
    /// sync has clients who see only some of its labs, counted per view (a failed read leaves
    /// those clients without these events; the next sync tells them).
    async fn flush(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut held = std::mem::take(&mut self.held);
        let mut wanted: Vec<(usize, Vec<Vec<String>>)> = Vec::new();
        for (i, r) in held.iter().enumerate() {
            if let Some(d) = r.event.as_ref().filter(|d| d.data.is_some()) {
                if matches!(d.audience, Audience::Counts { .. }) {
                    let views = self
                        .hub
                        .partial_views(&d.worker_id, EventType::DataRefreshed);
                    if !views.is_empty() {
                        wanted.push((i, views));
                    }
                }
            }
        }
        if !wanted.is_empty() {
            let mut workers: Vec<&str> = wanted
                .iter()
                .filter_map(|(i, _)| held[*i].event.as_ref().map(|d| d.worker_id.as_str()))
                .collect();
            workers.sort_unstable();
            workers.dedup();
            if let Ok(readers) = self.store.readers_of_workers(&workers).await {
                for (i, views) in wanted {
                    let Some(d) = held[i].event.as_mut() else {
                        continue;
                    };
                    let labs = readers.get(&d.worker_id).map_or(&[][..], Vec::as_slice);
                    if let (Some(data), Audience::Counts { views: counted }) =
                        (&d.data, &mut d.audience)
                    {
                        *counted = refreshed_per_view(data, labs, views);
                    }
                }
            }
        }
        for r in held.drain(..) {
            self.act(r).await;
        }
    }

    /// Wakes, resets and publishes what one change means.
    async fn act(&mut self, r: Received) {
        if let Some(id) = &r.finished {
            self.waiters.finished(id);
        }
        if let Some(user) = &r.account {
            self.grants.forget(user);
            self.hub.access_changed(user);
        }
        let Some(d) = r.event else {
            return;
        };
        let backlog =
            self.hub
                .publish_to(r.id, d.kind, d.worker_id, r.written_at, d.data, d.audience);
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

impl Follower for Relay {
    fn state(&mut self, state: State<'_>) {
        let metrics = &self.hub.metrics;
        match state {
            State::Up { resumed } => {
                self.grants.following(true);
                ChangeStreamOpened { resumed, metrics }.emit();
            }
            State::Down {
                error, retry_in, ..
            } => {
                self.grants.following(false);
                ChangeStreamFailed {
                    error,
                    retry_in,
                    metrics,
                }
                .emit();
            }
            State::HistoryLost { error, .. } => {
                self.grants.following(false);
                ChangeStreamReset { error, metrics }.emit();
                self.hub.reset_all("history_lost");
            }
        }
    }

    async fn change(&mut self, e: ChangeStreamEvent<Document>) {
        self.hub.metrics.changes.inc();
        let change = change_of(&e, &self.watched);
        let r = Received {
            id: event_id(&e.id),
            written_at: written_at(&e),
            finished: change.as_ref().and_then(finished_request),
            account: change.as_ref().and_then(account_changed),
            event: change.as_ref().and_then(derive),
        };
        let counts = r
            .event
            .as_ref()
            .is_some_and(|d| matches!(d.audience, Audience::Counts { .. }));
        if counts || !self.held.is_empty() {
            self.held.push(r);
            if self.held.len() >= HOLD_MAX {
                self.flush().await;
            }
        } else {
            self.act(r).await;
        }
    }

    async fn idle(&mut self) {
        self.flush().await;
    }
}
