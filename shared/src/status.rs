//! Per-worker sync status (`worker_sync_status`): the last attempt, the last success, failures.

use std::time::Duration;

use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use mongodb::{options::IndexOptions, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Longest error text kept: a CML error body can be long and is of no use past this.
const MAX_ERROR_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSyncStatus {
    pub worker_id: String,
    pub last_attempt_at: DateTime,
    #[serde(default)]
    pub last_success_at: Option<DateTime>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub consecutive_failures: i64,
    #[serde(default)]
    pub lab_count: i64,
    #[serde(default)]
    pub last_duration_ms: i64,
}

/// One worker's sync outcome, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub worker_id: String,
    update: Document,
}

impl StatusUpdate {
    pub fn success(worker_id: &str, at: DateTime, took: Duration, lab_count: usize) -> Self {
        Self {
            worker_id: worker_id.to_owned(),
            update: doc! { "$set": {
                "last_attempt_at": at,
                "last_success_at": at,
                "last_error": null,
                "consecutive_failures": 0_i64,
                "lab_count": i64::try_from(lab_count).unwrap_or(i64::MAX),
                "last_duration_ms": millis(took),
            } },
        }
    }

    pub fn failure(worker_id: &str, at: DateTime, took: Duration, error: &str) -> Self {
        let error: String = error.chars().take(MAX_ERROR_LEN).collect();
        Self {
            worker_id: worker_id.to_owned(),
            update: doc! {
                "$set": { "last_attempt_at": at, "last_error": error, "last_duration_ms": millis(took) },
                "$inc": { "consecutive_failures": 1_i64 },
                "$setOnInsert": { "last_success_at": null, "lab_count": 0_i64 },
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncStatusStore {
    db: Database,
    coll: Collection<WorkerSyncStatus>,
    raw: Collection<Document>,
}

impl SyncStatusStore {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            db: db.clone(),
            coll: db.collection(collection),
            raw: db.collection(collection),
        }
    }

    pub async fn ensure_indexes(&self) -> Result<()> {
        let unique = IndexModel::builder()
            .keys(doc! { "worker_id": 1 })
            .options(
                IndexOptions::builder()
                    .name("worker_id_1".to_owned())
                    .unique(true)
                    .build(),
            )
            .build();
        crate::store::ensure_indexes(&self.raw, [unique]).await
    }

    /// A successful sync: failures reset, the error cleared.
    pub async fn record_success(
        &self,
        worker_id: &str,
        at: DateTime,
        took: Duration,
        lab_count: usize,
    ) -> Result<()> {
        self.record_many(&[StatusUpdate::success(worker_id, at, took, lab_count)])
            .await
    }

    /// A failed sync: the count of failures in a row grows; the last lab count stays.
    pub async fn record_failure(
        &self,
        worker_id: &str,
        at: DateTime,
        took: Duration,
        error: &str,
    ) -> Result<()> {
        self.record_many(&[StatusUpdate::failure(worker_id, at, took, error)])
            .await
    }

    /// Records many outcomes in one round trip (a cycle writes all its workers' statuses at once).
    pub async fn record_many(&self, updates: &[StatusUpdate]) -> Result<()> {
        if updates.is_empty() {
            return Ok(());
        }
        let statements: Vec<Document> = updates
            .iter()
            .map(|u| doc! { "q": { "worker_id": &u.worker_id }, "u": &u.update, "upsert": true })
            .collect();
        let reply = self
            .db
            .run_command(
                doc! { "update": self.raw.name(), "updates": statements, "ordered": false },
            )
            .await?;
        match reply.get_array("writeErrors") {
            Ok(errors) if !errors.is_empty() => Err(crate::Error::WriteErrors(format!(
                "{} sync status writes failed: {:?}",
                errors.len(),
                errors.first()
            ))),
            _ => Ok(()),
        }
    }

    pub async fn get(&self, worker_id: &str) -> Result<Option<WorkerSyncStatus>> {
        Ok(self
            .coll
            .find_one(doc! { "worker_id": worker_id })
            .projection(doc! { "_id": 0 })
            .await?)
    }

    pub async fn all(&self) -> Result<Vec<WorkerSyncStatus>> {
        Ok(self
            .coll
            .find(doc! {})
            .projection(doc! { "_id": 0 })
            .sort(doc! { "worker_id": 1 })
            .await?
            .try_collect()
            .await?)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
