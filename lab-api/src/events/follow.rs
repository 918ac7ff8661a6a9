//! The replica's one change stream: on the database, filtered to lab changes and sync
//! statuses, so that one resume token orders every event. At start it reads back
//! `api.events.replay_window` to fill the hub's memory; after an error (MongoDB restarted,
//! failed over) it resumes after the last change it saw, so nothing is missed; when it cannot
//! (the oplog moved on) every client is told to reload.

use std::{sync::Arc, time::Duration};

use bson::{doc, Bson, DateTime, Document, Timestamp};
use futures::StreamExt;
use mongodb::{
    change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken},
    options::FullDocumentType,
    Database,
};

use super::{
    derive::{derive, finished_request, Change, Collection, Operation},
    waiters::Waiters,
    Backlog, Hub,
};

/// MongoDB's codes for a change stream that cannot resume from its token.
const CANNOT_RESUME: [i32; 3] = [
    260, // InvalidResumeToken
    280, // ChangeStreamFatalError
    286, // ChangeStreamHistoryLost
];
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
}

/// The change stream's filter: inserts and changes of labs (a change sets `last_changed_at`;
/// a stamp of an unchanged lab does not), every status write of a sync (it sets
/// `last_attempt_at`; the registry's fields the daemon copies in are no event), throttle
/// notices, and sync requests that finished.
pub fn pipeline(w: &Watched) -> Vec<Document> {
    vec![doc! { "$match": { "$or": [
        { "ns.coll": &w.labs, "operationType": "insert" },
        { "ns.coll": &w.labs, "operationType": "update",
          "updateDescription.updatedFields.last_changed_at": { "$exists": true } },
        { "ns.coll": &w.status, "operationType": { "$in": ["insert", "replace"] },
          "fullDocument.last_attempt_at": { "$exists": true } },
        { "ns.coll": &w.status, "operationType": "update",
          "updateDescription.updatedFields.last_attempt_at": { "$exists": true } },
        { "ns.coll": &w.requests, "operationType": "insert", "fullDocument.notice": "throttled" },
        { "ns.coll": &w.requests, "operationType": "update",
          "updateDescription.updatedFields.finished_at": { "$exists": true } },
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
pub async fn follow(hub: Arc<Hub>, waiters: Arc<Waiters>, db: Database, watched: Watched) {
    let stop = hub.stopping();
    let mut resume: Option<ResumeToken> = None;
    let mut started = false;
    let mut retry = RETRY_FIRST;
    let mut published: u64 = 0;
    loop {
        let mut watch = db
            .watch()
            .pipeline(pipeline(&watched))
            .full_document(FullDocumentType::UpdateLookup)
            // Bounded batches: catching up (at start, after an outage) never holds megabytes
            // of changes at once.
            .batch_size(BATCH);
        if let Some(token) = &resume {
            watch = watch.resume_after(token.clone());
        } else if !started && !hub.replay_window.is_zero() {
            let from = DateTime::now().timestamp_millis()
                - i64::try_from(hub.replay_window.as_millis()).unwrap_or(i64::MAX);
            watch = watch.start_at_operation_time(Timestamp {
                time: u32::try_from(from.max(0) / 1000).unwrap_or(0),
                increment: 0,
            });
        }
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = watch => opened,
        };
        let error = match opened {
            Ok(mut stream) => {
                started = true;
                hub.metrics.change_stream_up.set(1.0);
                tracing::info!(
                    event = "change_stream_opened",
                    resumed = resume.is_some(),
                    "Following lab changes"
                );
                let error = loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => {
                            hub.metrics.change_stream_up.set(0.0);
                            return;
                        }
                        next = stream.next() => next,
                    };
                    match next {
                        Some(Ok(e)) => {
                            retry = RETRY_FIRST;
                            hub.metrics.changes.inc();
                            let change = change_of(&e, &watched);
                            if let Some(id) = change.as_ref().and_then(finished_request) {
                                waiters.finished(&id);
                            }
                            if let Some(d) = change.as_ref().and_then(derive) {
                                let backlog = hub.publish(
                                    event_id(&e.id),
                                    d.kind,
                                    d.worker_id,
                                    written_at(&e),
                                    d.data,
                                );
                                // In a burst (a first cycle, a catch-up) the clients'
                                // streams get scheduled every few events, each writing what
                                // piled up in one go; while one is behind, reading slows so
                                // that it can catch up (one that stalled is dropped when its
                                // queue is full, and holds nobody up after that).
                                published += 1;
                                if backlog == Backlog::Behind {
                                    tokio::time::sleep(BACKLOG_PAUSE).await;
                                } else if published % PUBLISH_BURST == 0 {
                                    tokio::task::yield_now().await;
                                }
                            }
                            // The stream's own token: past this event, or past a quiet
                            // stretch the server reported (post-batch token).
                            resume = stream.resume_token().or(Some(e.id));
                        }
                        Some(Err(e)) => {
                            resume = stream.resume_token().or(resume);
                            break e;
                        }
                        None => {
                            break mongodb::error::Error::custom("the change stream ended");
                        }
                    }
                };
                hub.metrics.change_stream_up.set(0.0);
                error
            }
            Err(e) => e,
        };
        hub.metrics.change_stream_errors.inc();
        let code = match *error.kind {
            mongodb::error::ErrorKind::Command(ref c) => Some(c.code),
            _ => None,
        };
        if code.is_some_and(|c| CANNOT_RESUME.contains(&c)) {
            tracing::warn!(event = "change_stream_reset", error = %error, "The change stream cannot resume: every client reloads");
            hub.reset_all("history_lost");
            resume = None;
            started = true;
        } else {
            tracing::warn!(event = "change_stream_failed", error = %error, retry_in_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX), "The change stream failed; resuming");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}
