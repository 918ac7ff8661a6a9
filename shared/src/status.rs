//! Per-worker sync status (`worker_sync_status`) as stored, and reading it: one worker's, or a
//! page of the fleet view. sync-daemon is the only writer (its `status` module).

use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

use crate::{
    fleet::{self, FleetFilter, FleetKey, FleetRow},
    mongo, Result,
};

/// The indexes of `worker_sync_status`: one document per worker, and the fleet view's order
/// ([`fleet::indexes`]). sync-daemon, its only writer, ensures them.
pub fn indexes() -> Vec<IndexModel> {
    std::iter::once(mongo::index(doc! { "worker_id": 1 }, "worker_id_1", true))
        .chain(
            fleet::indexes()
                .into_iter()
                .map(|(keys, name)| mongo::index(keys, name, false)),
        )
        .collect()
}

/// Matches the documents a sync wrote (not those that only hold a worker's registry fields).
fn synced() -> Document {
    doc! { "last_attempt_at": { "$type": "date" } }
}

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
    /// What the last successful sync could not do, a [`SyncWarning`] (`groups_unread`);
    /// null when it did everything.
    #[serde(default)]
    pub last_warning_kind: Option<String>,
    /// The warning's text (the error behind it).
    #[serde(default)]
    pub last_warning: Option<String>,
    /// When labs named by the worker's CML event stream were last synced.
    #[serde(default)]
    pub last_event_sync_at: Option<DateTime>,
    /// When the worker's users and groups (who may see its labs) were last read.
    #[serde(default)]
    pub last_access_read_at: Option<DateTime>,
    /// The last lab or node state change seen on the worker (from its event stream, or a sync
    /// that found a lab's state changed): what an idle-worker check reads.
    #[serde(default)]
    pub last_activity_at: Option<DateTime>,
    /// The lease holder's watch of the worker's event stream, one of [`WATCH_STATES`]; null
    /// when none is kept (events off, or no holder yet).
    #[serde(default)]
    pub watch_state: Option<String>,
    /// Why the watch is `failing` (`unreachable`, `unauthorized`, `redirect`, `too_large`,
    /// `flooded`, `silent`, `stalled`, `dropped`); null otherwise.
    #[serde(default)]
    pub watch_failure: Option<String>,
    /// Since when the watch is in its state.
    #[serde(default)]
    pub watch_since: Option<DateTime>,
}

/// The field of the last activity seen on a worker.
pub const LAST_ACTIVITY_AT: &str = "last_activity_at";

/// The states of a worker's event-stream watch: `live` (changes come as they happen),
/// `connecting`, `polling` (the server has no stream, or past the watch cap: the periodic cycle
/// only), `failing` (opening it failed several times in a row: see `watch_failure`).
pub const WATCH_STATES: [&str; 4] = ["live", "connecting", "polling", "failing"];

/// Something a successful sync could not do: the worker is synced, not failed, but part of
/// what its records hold could not be brought up to date. A closed set (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncWarning {
    /// The lab objects hold no groups (CML 2.9+) and the server's group associations could
    /// not be read: every record kept the groups it had.
    GroupsUnread,
    /// The server's users or groups could not be read: who may see each lab stays as last
    /// read (a worker never read shows nothing to callers who are not admins of the fleet).
    AccessUnread,
}

impl SyncWarning {
    pub const ALL: [SyncWarning; 2] = [SyncWarning::GroupsUnread, SyncWarning::AccessUnread];

    /// The fixed label stored and counted.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncWarning::GroupsUnread => "groups_unread",
            SyncWarning::AccessUnread => "access_unread",
        }
    }
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

    /// The status of a worker a sync wrote (`None` when never synced).
    pub async fn get(&self, worker_id: &str) -> Result<Option<WorkerSyncStatus>> {
        let mut filter = synced();
        filter.insert("worker_id", worker_id);
        Ok(self
            .coll
            .find_one(filter)
            .projection(doc! { "_id": 0 })
            .await?)
    }

    /// Every worker's row of the fleet view, by id.
    pub async fn fleet_rows(&self) -> Result<Vec<FleetRow>> {
        Ok(self
            .coll
            .clone_with_type::<FleetRow>()
            .find(doc! {})
            .projection(fleet::projection())
            .sort(doc! { "worker_id": 1 })
            .await?
            .try_collect()
            .await?)
    }

    /// One page of the fleet view: the rows `filter` keeps after `after`, at most `limit`, most
    /// urgent first (stale: no success since `threshold`), and the next page's cursor.
    pub async fn fleet_page(
        &self,
        filter: &FleetFilter,
        after: Option<&FleetKey>,
        limit: usize,
        threshold: DateTime,
    ) -> Result<(Vec<FleetRow>, Option<FleetKey>)> {
        let coll = self.coll.clone_with_type::<FleetRow>();
        let mut rows: Vec<FleetRow> = Vec::new();
        for q in fleet::queries(filter, after, threshold) {
            let want = (limit.max(1) + 1).saturating_sub(rows.len());
            if want == 0 {
                break;
            }
            let mut found: Vec<FleetRow> = coll
                .find(q.filter)
                .sort(q.sort)
                .projection(fleet::projection())
                .limit(i64::try_from(want).unwrap_or(i64::MAX))
                .await?
                .try_collect()
                .await?;
            rows.append(&mut found);
        }
        Ok(fleet::page(rows, limit, threshold))
    }
}
