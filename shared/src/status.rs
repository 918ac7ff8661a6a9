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
    /// The fixed label of the last error (`cml_timeout`, `mongodb`, …); null after a success.
    #[serde(default)]
    pub last_error_kind: Option<String>,
    /// What the last successful sync did.
    #[serde(default)]
    pub last_counts: Option<SyncCounts>,
}

/// What one worker sync did to the worker's records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncCounts {
    /// Labs in the listing.
    pub synced: i64,
    pub created: i64,
    /// Changed labs, reappeared ones included.
    pub updated: i64,
    pub unchanged: i64,
    pub removed: i64,
}

impl From<&crate::change::PlanCounts> for SyncCounts {
    fn from(c: &crate::change::PlanCounts) -> Self {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        Self {
            synced: n(c.synced),
            created: n(c.created),
            updated: n(c.updated),
            unchanged: n(c.unchanged),
            removed: n(c.removed),
        }
    }
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
