//! The JSON the API returns: the UI's lab shape (key for key), full records, pages, status.

use std::collections::BTreeMap;

use bson::{Bson, DateTime};
use chrono::SecondsFormat;
use serde::Serialize;
use serde_json::Value;
use shared::{
    fleet::FleetRow,
    record::{HistoryEntry, LabRecord},
    status::{SyncCounts, WorkerSyncStatus},
    sync_request::{RequestStatus, SyncRequest},
};
use utoipa::ToSchema;

/// ISO-8601 in UTC with a `Z`, e.g. `2025-11-17T10:00:00Z` (milliseconds only when present).
pub fn iso(d: DateTime) -> String {
    d.to_chrono().to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// One lab as the UI's Labs tab reads it: exactly these keys.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UiLab {
    #[serde(flatten)]
    pub entry: LabEntry,
    pub notes: String,
}

/// A lab's keys the UI reads, but its `notes` (what the live events carry of a lab).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LabEntry {
    /// The CML lab id.
    pub id: String,
    pub title: String,
    pub description: String,
    #[schema(example = "STARTED")]
    pub state: String,
    /// The owner's full name; null when CML has none.
    pub owner: Option<String>,
    pub owner_username: String,
    pub node_count: i32,
    pub link_count: i32,
    /// When CML created the lab.
    pub created: Option<String>,
    pub modified: Option<String>,
    pub groups: Vec<String>,
    /// When the lab was last seen in CML.
    pub last_synced: String,
}

impl From<&LabRecord> for UiLab {
    fn from(r: &LabRecord) -> Self {
        Self {
            entry: LabEntry::from(r),
            notes: r.fields.notes.clone(),
        }
    }
}

impl From<&LabRecord> for LabEntry {
    fn from(r: &LabRecord) -> Self {
        let f = &r.fields;
        Self {
            id: r.lab_id.clone(),
            title: f.title.clone(),
            description: f.description.clone(),
            state: f.state.clone(),
            owner: (!f.owner_fullname.trim().is_empty()).then(|| f.owner_fullname.clone()),
            owner_username: f.owner_username.clone(),
            node_count: f.node_count,
            link_count: f.link_count,
            created: f.cml_created_at.map(iso),
            modified: f.modified_at.map(iso),
            groups: f.groups.clone(),
            last_synced: iso(r.last_synced_at),
        }
    }
}

/// A lab of the cross-worker listing: the UI shape plus the worker it lives on.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FleetLab {
    pub worker_id: String,
    #[serde(flatten)]
    pub lab: UiLab,
    pub removed_at: Option<String>,
}

impl From<&LabRecord> for FleetLab {
    fn from(r: &LabRecord) -> Self {
        Self {
            worker_id: r.worker_id.clone(),
            lab: UiLab::from(r),
            removed_at: r.removed_at.map(iso),
        }
    }
}

/// One page of the cross-worker listing.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LabPage {
    pub items: Vec<FleetLab>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// One change of one field.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldChangeDto {
    #[schema(value_type = Object)]
    pub old: Value,
    #[schema(value_type = Object)]
    pub new: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HistoryEntryDto {
    pub timestamp: String,
    pub previous_state: Option<String>,
    pub new_state: String,
    pub changed_fields: BTreeMap<String, FieldChangeDto>,
}

/// The full record of one lab, with its history.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LabRecordDto {
    /// Our record id.
    pub record_id: String,
    pub worker_id: String,
    #[serde(flatten)]
    pub lab: UiLab,
    pub owner_fullname: String,
    pub first_seen_at: String,
    pub removed_at: Option<String>,
    /// When the record was created or last changed; null on records older than this field.
    pub last_changed_at: Option<String>,
    /// Oldest first; the newest 50 (by default) are kept.
    pub operation_history: Vec<HistoryEntryDto>,
}

impl From<&HistoryEntry> for HistoryEntryDto {
    fn from(e: &HistoryEntry) -> Self {
        Self {
            timestamp: iso(e.timestamp),
            previous_state: e.previous_state.clone(),
            new_state: e.new_state.clone(),
            changed_fields: e
                .changed_fields
                .iter()
                .map(|(k, c)| {
                    (
                        k.clone(),
                        FieldChangeDto {
                            old: json_value(&c.old),
                            new: json_value(&c.new),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// A stored BSON value as JSON, dates as ISO strings.
pub fn json_value(b: &Bson) -> Value {
    match b {
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::String(s) => Value::String(s.clone()),
        Bson::Int32(n) => Value::from(*n),
        Bson::Int64(n) => Value::from(*n),
        Bson::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Bson::Boolean(v) => Value::Bool(*v),
        Bson::DateTime(d) => Value::String(iso(*d)),
        Bson::Array(a) => Value::Array(a.iter().map(json_value).collect()),
        Bson::Document(d) => {
            Value::Object(d.iter().map(|(k, v)| (k.clone(), json_value(v))).collect())
        }
        other => Value::String(other.to_string()),
    }
}

impl From<&LabRecord> for LabRecordDto {
    fn from(r: &LabRecord) -> Self {
        Self {
            record_id: r.id.clone(),
            worker_id: r.worker_id.clone(),
            lab: UiLab::from(r),
            owner_fullname: r.fields.owner_fullname.clone(),
            first_seen_at: iso(r.first_seen_at),
            removed_at: r.removed_at.map(iso),
            last_changed_at: r.last_changed_at.map(iso),
            operation_history: r
                .operation_history
                .iter()
                .map(HistoryEntryDto::from)
                .collect(),
        }
    }
}

/// The last sync of one worker.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SyncStatusDto {
    pub worker_id: String,
    pub last_attempt_at: String,
    pub last_success_at: Option<String>,
    pub last_error: Option<String>,
    /// The fixed label of the last error (`cml_timeout`, `mongodb`, …); null after a success.
    pub last_error_kind: Option<String>,
    pub consecutive_failures: i64,
    pub lab_count: i64,
    pub last_duration_ms: i64,
    /// What the last successful sync did.
    pub last_counts: Option<SyncCounts>,
    /// What the last successful sync could not do (`groups_unread`: the worker's group
    /// associations could not be read, its records kept their groups); null when it did
    /// everything.
    pub last_warning_kind: Option<String>,
    /// The warning's text (the error behind it).
    pub last_warning: Option<String>,
    /// When the worker's users and groups (who may see its labs) were last read.
    pub last_access_read_at: Option<String>,
    #[serde(flatten)]
    pub live: LiveSyncDto,
}

/// How a worker's changes reach its records: its CML event stream's watch, the last sync of
/// labs the stream named, the last activity seen.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LiveSyncDto {
    /// `live` (changes sync as they happen), `connecting`, `polling` (the server has no event
    /// stream: synced by the periodic cycle only), `failing` (see `watch_failure`); null when
    /// no watch is kept (events off).
    pub watch_state: Option<String>,
    /// Why the watch is failing: `unreachable`, `unauthorized`, `redirect`, `too_large`,
    /// `flooded`, `silent`, `stalled` or `dropped`.
    pub watch_failure: Option<String>,
    /// The last lab or node state change seen on the worker (its event stream, or a sync that
    /// found a lab's state changed): what an idle-worker check reads.
    pub last_activity_at: Option<String>,
    /// When labs its event stream named were last synced.
    pub last_event_sync_at: Option<String>,
}

impl SyncStatusDto {
    /// As a caller who sees only `visible` of the worker's labs is shown it: its own count,
    /// no figures of the whole worker, no error text (it may name labs), kinds kept.
    pub fn limit_to(&mut self, visible: i64) {
        self.lab_count = visible;
        self.last_counts = None;
        self.last_error = None;
        self.last_warning = None;
    }
}

impl From<&WorkerSyncStatus> for SyncStatusDto {
    fn from(s: &WorkerSyncStatus) -> Self {
        Self {
            worker_id: s.worker_id.clone(),
            last_attempt_at: iso(s.last_attempt_at),
            last_success_at: s.last_success_at.map(iso),
            last_error: s.last_error.clone(),
            last_error_kind: s.last_error_kind.clone(),
            consecutive_failures: s.consecutive_failures,
            lab_count: s.lab_count,
            last_duration_ms: s.last_duration_ms,
            last_counts: s.last_counts,
            last_warning_kind: s.last_warning_kind.clone(),
            last_warning: s.last_warning.clone(),
            last_access_read_at: s.last_access_read_at.map(iso),
            live: LiveSyncDto {
                watch_state: s.watch_state.clone(),
                watch_failure: s.watch_failure.clone(),
                last_activity_at: s.last_activity_at.map(iso),
                last_event_sync_at: s.last_event_sync_at.map(iso),
            },
        }
    }
}

/// A refresh asked for on demand (a document of `sync_requests`), with its outcome once it
/// has one: the counts under the keys the UI's refresh button reads, or the error.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SyncRequestDto {
    pub id: String,
    pub worker_id: String,
    /// `pending` (no sync-daemon took it yet), `running`, `done` or `failed`.
    #[schema(value_type = String, example = "done")]
    pub status: &'static str,
    pub requested_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Labs in the worker's listing (when done).
    pub labs_synced: Option<i64>,
    pub labs_created: Option<i64>,
    /// Labs that changed (reappeared ones included), as in the daemon's log line.
    pub labs_updated: Option<i64>,
    pub labs_unchanged: Option<i64>,
    pub labs_removed: Option<i64>,
    /// From the moment a sync-daemon took the request to its outcome.
    pub duration_ms: Option<i64>,
    /// Why it failed: a fixed label (`cml_timeout`, `not_running`, …) and the error's text.
    pub error_kind: Option<String>,
    pub error: Option<String>,
}

impl SyncRequestDto {
    /// As a caller who sees only some of the worker's labs is shown it: no figures of the
    /// whole worker, no error text (it may name labs).
    pub fn limit(&mut self) {
        self.labs_synced = None;
        self.labs_created = None;
        self.labs_updated = None;
        self.labs_unchanged = None;
        self.labs_removed = None;
        self.error = None;
    }
}

impl From<&SyncRequest> for SyncRequestDto {
    fn from(r: &SyncRequest) -> Self {
        let c = r.counts;
        Self {
            id: r.id.clone(),
            worker_id: r.worker_id.clone(),
            status: match r.status {
                RequestStatus::Pending => "pending",
                RequestStatus::Running => "running",
                RequestStatus::Done => "done",
                RequestStatus::Failed => "failed",
            },
            requested_at: iso(r.requested_at),
            started_at: r.started_at.map(iso),
            finished_at: r.finished_at.map(iso),
            labs_synced: c.map(|c| c.synced),
            labs_created: c.map(|c| c.created),
            labs_updated: c.map(|c| c.updated),
            labs_unchanged: c.map(|c| c.unchanged),
            labs_removed: c.map(|c| c.removed),
            duration_ms: r.duration_ms,
            error_kind: r.error_kind.clone(),
            error: r.error.clone(),
        }
    }
}

/// One worker in the fleet view.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FleetWorkerDto {
    pub worker_id: String,
    /// From the registry (null for a worker it does not list).
    pub name: Option<String>,
    pub aws_region: Option<String>,
    /// The registry's status (`running`, `stopped`, …); null when the registry does not list it.
    pub registry_status: Option<String>,
    pub last_attempt_at: Option<String>,
    pub last_success_at: Option<String>,
    pub last_error: Option<String>,
    /// The fixed label of the last error (`cml_timeout`, `mongodb`, …); null after a success.
    pub last_error_kind: Option<String>,
    pub consecutive_failures: i64,
    pub lab_count: i64,
    pub last_duration_ms: Option<i64>,
    /// No success for more than two sync intervals, or never.
    pub stale: bool,
    /// The last sync failed.
    pub failing: bool,
    /// What the last successful sync could not do (`groups_unread`); null when it did
    /// everything.
    pub last_warning_kind: Option<String>,
    pub last_warning: Option<String>,
    #[serde(flatten)]
    pub live: LiveSyncDto,
}

impl FleetWorkerDto {
    /// As a caller who sees only `visible` of the worker's labs is shown it (see
    /// [`SyncStatusDto::limit_to`]).
    pub fn limit_to(&mut self, visible: i64) {
        self.lab_count = visible;
        self.last_error = None;
        self.last_warning = None;
    }

    /// The row as the view shows it; stale when no success since `threshold`.
    pub fn new(r: &FleetRow, threshold: DateTime) -> Self {
        Self {
            worker_id: r.worker_id.clone(),
            name: r.name.clone(),
            aws_region: r.aws_region.clone(),
            registry_status: r.registry_status.clone(),
            last_attempt_at: r.last_attempt_at.map(iso),
            last_success_at: r.last_success_at.map(iso),
            last_error: r.last_error.clone(),
            last_error_kind: r.last_error_kind.clone(),
            consecutive_failures: r.consecutive_failures,
            lab_count: r.lab_count,
            last_duration_ms: r.last_duration_ms,
            stale: r.stale(threshold),
            failing: r.failing(),
            last_warning_kind: r.last_warning_kind.clone(),
            last_warning: r.last_warning.clone(),
            live: LiveSyncDto {
                watch_state: r.watch_state.clone(),
                watch_failure: r.watch_failure.clone(),
                last_activity_at: r.last_activity_at.map(iso),
                last_event_sync_at: r.last_event_sync_at.map(iso),
            },
        }
    }
}

/// One page of the fleet view, most urgent first.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FleetPage {
    pub items: Vec<FleetWorkerDto>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_with_a_z_and_never_plus_zero_z() {
        assert_eq!(
            iso(DateTime::from_millis(1_763_373_600_000)),
            "2025-11-17T10:00:00Z"
        );
        assert_eq!(
            iso(DateTime::from_millis(1_763_373_600_123)),
            "2025-11-17T10:00:00.123Z"
        );
    }
}
