//! Per-worker sync status (`worker_sync_status`) as stored, and reading it. sync-daemon is the
//! only writer (its `status` module).

use bson::{doc, DateTime};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use crate::Result;

/// A document of `worker_sync_status`.
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

/// Reads `worker_sync_status`.
#[derive(Debug, Clone)]
pub struct SyncStatusReader {
    coll: Collection<WorkerSyncStatus>,
}

impl SyncStatusReader {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            coll: db.collection(collection),
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
