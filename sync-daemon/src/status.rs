//! Writing per-worker sync status (`worker_sync_status`): the last attempt, the last success,
//! failures in a row, and the registry's fields the fleet view reads. Statuses are written
//! many to a round trip; a sync's status is fenced by the lease's term like its records.

use std::time::Duration;

use bson::{doc, DateTime, Document};
use mongodb::{Collection, Database};
use shared::{
    change::PlanCounts,
    fence::{self, Term},
    fleet, mongo,
    status::{self, SyncCounts, SyncWarning},
    Result,
};

/// Statements per `update` command (well under the 16 MiB a command may be).
const STATEMENTS_PER_COMMAND: usize = 1000;

/// Longest error text kept: a CML error body can be long and is of no use past this.
const MAX_ERROR_LEN: usize = 1024;

/// One worker's sync outcome, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub worker_id: String,
    update: Document,
    /// The lease's term the sync was made under.
    term: Term,
}

impl StatusUpdate {
    /// This update as written under the lease's `term`: a status written under a newer one
    /// refuses it.
    pub fn fenced(mut self, term: Term) -> Self {
        self.term = term;
        if let Ok(set) = self.update.get_document_mut("$set") {
            set.insert(fence::FIELD, term.0);
        }
        self
    }

    /// The statement of the `update` command writing it.
    fn statement(&self) -> Document {
        doc! {
            "q": { "worker_id": &self.worker_id, fence::FIELD: self.term.admits() },
            "u": &self.update,
            "upsert": true,
        }
    }

    /// A sync that wrote `lab_count` records; `counts` are what its plan did; `activity`: a
    /// lab it wrote changed state.
    pub fn success(
        worker_id: &str,
        at: DateTime,
        took: Duration,
        lab_count: usize,
        counts: &PlanCounts,
        activity: bool,
    ) -> Self {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        Self {
            worker_id: worker_id.to_owned(),
            update: with_activity(
                activity,
                at,
                doc! {
                    "$set": {
                        "last_attempt_at": at,
                        "last_success_at": at,
                        "last_error": null,
                        "last_error_kind": null,
                        "consecutive_failures": 0_i64,
                        "lab_count": n(lab_count),
                        "last_duration_ms": millis(took),
                        "last_counts": bson::to_bson(&SyncCounts::from(counts)).unwrap_or_default(),
                        "last_warning_kind": null,
                        "last_warning": null,
                    },
                    // Synced, so meant to be (the registry's copy keeps it from then on).
                    "$setOnInsert": { "active": true },
                },
            ),
            term: Term::default(),
        }
    }

    /// A sync of the labs a worker's event stream named: when it was (`last_event_sync_at`),
    /// and activity if a lab changed state. The cycle's fields (`last_attempt_at`,
    /// `last_success_at`, `lab_count`, …) stay the last full sync's.
    pub fn labs_synced(worker_id: &str, at: DateTime, activity: bool) -> Self {
        Self {
            worker_id: worker_id.to_owned(),
            update: with_activity(
                activity,
                at,
                doc! {
                    "$set": { "last_event_sync_at": at },
                    "$setOnInsert": { "active": true },
                },
            ),
            term: Term::default(),
        }
    }

    /// A read of the worker's users and groups alone: when it was (`last_access_read_at`), or
    /// why it could not be made (the warning; the last read's data stay).
    pub fn access_read(
        worker_id: &str,
        at: DateTime,
        warning: Option<(SyncWarning, &str)>,
    ) -> Self {
        let set = match warning {
            None => doc! { "last_access_read_at": at },
            Some((w, text)) => {
                let text: String = text.chars().take(MAX_ERROR_LEN).collect();
                doc! { "last_warning_kind": w.as_str(), "last_warning": text }
            }
        };
        Self {
            worker_id: worker_id.to_owned(),
            update: doc! { "$set": set, "$setOnInsert": { "active": true } },
            term: Term::default(),
        }
    }

    /// This update also says the worker's users and groups were read at `at`.
    pub fn access_read_at(mut self, at: DateTime) -> Self {
        if let Ok(set) = self.update.get_document_mut("$set") {
            set.insert("last_access_read_at", at);
        }
        self
    }

    /// This success with what it could not do (a success without one clears the last).
    pub fn warned(mut self, warning: SyncWarning, text: &str) -> Self {
        if let Ok(set) = self.update.get_document_mut("$set") {
            if set.contains_key("last_warning_kind") {
                let text: String = text.chars().take(MAX_ERROR_LEN).collect();
                set.insert("last_warning_kind", warning.as_str());
                set.insert("last_warning", text);
            }
        }
        self
    }

    /// A failed sync: `kind` is the error's fixed label, `error` its text.
    pub fn failure(worker_id: &str, at: DateTime, took: Duration, kind: &str, error: &str) -> Self {
        let error: String = error.chars().take(MAX_ERROR_LEN).collect();
        Self {
            worker_id: worker_id.to_owned(),
            update: doc! {
                "$set": {
                    "last_attempt_at": at,
                    "last_error": error,
                    "last_error_kind": kind,
                    "last_duration_ms": millis(took),
                },
                "$inc": { "consecutive_failures": 1_i64 },
                "$setOnInsert": { "last_success_at": null, "lab_count": 0_i64, "active": true },
            },
            term: Term::default(),
        }
    }
}

/// What a worker's event-stream watch last showed, and the activity it saw, to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchUpdate {
    pub worker_id: String,
    /// Its state (one of [`status::WATCH_STATES`]), why it fails, and since when.
    pub state: Option<(&'static str, Option<&'static str>, DateTime)>,
    /// The last lab or node state change it saw.
    pub activity: Option<DateTime>,
}

impl WatchUpdate {
    /// The upsert writing it, made under the lease's `term` (a status of a newer term
    /// refuses it, and it marks what it writes with its term, as a sync's status does).
    fn statement(&self, term: Term) -> Document {
        let mut set = doc! { fence::FIELD: term.0 };
        if let Some((state, failure, since)) = self.state {
            set.insert("watch_state", state);
            set.insert("watch_failure", failure);
            set.insert("watch_since", since);
        }
        let mut update = doc! { "$set": set, "$setOnInsert": { "active": true } };
        if let Some(at) = self.activity {
            update.insert("$max", doc! { status::LAST_ACTIVITY_AT: at });
        }
        doc! {
            "q": { "worker_id": &self.worker_id, fence::FIELD: term.admits() },
            "u": update,
            "upsert": true,
        }
    }
}

/// Writes `worker_sync_status`.
#[derive(Debug, Clone)]
pub struct StatusWriter {
    db: Database,
    raw: Collection<Document>,
}

impl StatusWriter {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            db: db.clone(),
            raw: db.collection(collection),
        }
    }

    pub async fn ensure_indexes(&self) -> Result<()> {
        mongo::ensure_indexes(&self.raw, status::indexes()).await
    }

    /// Writes the registry's fields of these workers (see [`fleet::reconcile`]).
    pub async fn record_registry(&self, changes: &[fleet::RegistryFields]) -> Result<()> {
        for chunk in changes.chunks(STATEMENTS_PER_COMMAND) {
            self.upsert(chunk.len(), |i| chunk[i].statement()).await?;
        }
        Ok(())
    }

    /// Records many outcomes in one round trip (those of a term older than the status's left
    /// out).
    pub async fn record_many(&self, updates: &[StatusUpdate]) -> Result<()> {
        self.upsert(updates.len(), |i| updates[i].statement()).await
    }

    /// Records what watches showed, in one round trip per thousand workers.
    pub async fn record_watches(&self, updates: &[WatchUpdate], term: Term) -> Result<()> {
        for chunk in updates.chunks(STATEMENTS_PER_COMMAND) {
            self.upsert(chunk.len(), |i| chunk[i].statement(term))
                .await?;
        }
        Ok(())
    }

    /// Sends `n` upserts by `worker_id` (statement `i` made by `statement(i)`) in one command.
    async fn upsert(&self, n: usize, statement: impl Fn(usize) -> Document) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // Two writers upserting one new worker at once may race on the unique index; the
        // loser is retried once, when it matches (a second collision: a fenced statement whose
        // status a newer term wrote, left out).
        let reply = mongo::update_command(
            &self.db,
            self.raw.name(),
            (0..n).map(&statement).collect(),
            |_| true,
        )
        .await?;
        if !reply.duplicate_upserts.is_empty() {
            let again = reply
                .duplicate_upserts
                .iter()
                .map(|&i| statement(i))
                .collect();
            mongo::update_command(&self.db, self.raw.name(), again, |_| true).await?;
        }
        Ok(())
    }
}

/// `update` also moves `last_activity_at` forward to `at` when there was activity (never back).
fn with_activity(activity: bool, at: DateTime, mut update: Document) -> Document {
    if activity {
        update.insert("$max", doc! { status::LAST_ACTIVITY_AT: at });
    }
    update
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
