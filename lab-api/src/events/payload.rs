//! The `data` of each event of the live stream, typed: what a client reads is declared here
//! once, serialised from these types, and published as components of the OpenAPI document
//! (`EventEnvelope` and one schema per event type), so clients can generate their types.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::dto::{FieldChangeDto, LabEntry};

/// Every frame's data line: the envelope around the event's `data`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventEnvelope {
    /// The event type, as the frame's `event:` line: `connected`, `heartbeat`, `reset`,
    /// `worker.labs.updated`, `worker.data.refreshed`, `worker.sync.failed`,
    /// `worker.refresh.throttled`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always `lab-api`.
    pub source: String,
    /// When the change was written (RFC 3339).
    pub time: String,
    /// One of the payloads below, by `type`: [`Connected`], [`Heartbeat`], [`Reset`],
    /// [`LabUpdated`] (or [`LabHidden`] for a caller who lost the lab), [`DataRefreshed`],
    /// [`SyncFailed`], [`RefreshThrottled`].
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// `connected`: the stream is open.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Connected {
    /// Always `connected`.
    pub status: &'static str,
    /// This stream's id (for support: it names the stream in lab-api's logs).
    pub client_id: String,
}

/// `heartbeat`: nothing happened for `api.events.heartbeat_interval`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Heartbeat {}

/// `reset`: events were missed; reload what is shown from the REST API.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Reset {
    /// Why: `unknown_id`, `lagged`, `history_lost`, …
    pub reason: &'static str,
    pub message: &'static str,
}

/// `worker.labs.updated`: a lab was created or changed. The lab as the UI's list shows it
/// (without `notes`: the lab's own endpoint has them), and what happened to it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LabUpdated {
    pub worker_id: String,
    pub lab_id: String,
    #[serde(flatten)]
    pub lab: LabEntry,
    /// When the lab vanished from CML; null while it is there.
    pub removed_at: Option<String>,
    #[serde(flatten)]
    pub change: LabChange,
}

/// `worker.labs.updated` for a caller who may no longer see the lab (its share was withdrawn,
/// its owner changed): it leaves the caller's list; nothing of it is said.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LabHidden {
    pub worker_id: String,
    pub lab_id: String,
    /// Always `removed`.
    pub action: &'static str,
    /// Always `access`: the lab is still there, for others.
    pub reason: &'static str,
}

/// What happened to the lab, by `action`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum LabChange {
    /// First seen.
    Created {
        first_seen_at: String,
    },
    /// A tracked field other than the state changed.
    Updated {
        #[serde(flatten)]
        change: Changed,
        /// When the sync that saw it ran.
        synced_at: String,
    },
    StateChanged(Changed),
    /// Vanished from CML.
    Removed(Changed),
    /// Back in CML after it had vanished.
    Reappeared(Changed),
}

/// A change as its history entry records it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Changed {
    pub previous_state: Option<String>,
    pub new_state: String,
    /// Every field that changed: `{field: {old, new}}`.
    pub changed_fields: BTreeMap<String, FieldChangeDto>,
    pub changed_at: String,
}

/// `worker.data.refreshed`: a worker synced. A caller who sees only some of its labs gets
/// its own count in `lab_count` and `labs_synced`, and null for the other figures.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DataRefreshed {
    pub worker_id: String,
    pub last_success_at: Option<String>,
    pub lab_count: i64,
    pub duration_ms: i64,
    pub labs_synced: i64,
    pub labs_created: Option<i64>,
    pub labs_updated: Option<i64>,
    pub labs_unchanged: Option<i64>,
    pub labs_removed: Option<i64>,
}

/// `worker.sync.failed`: a worker's sync failed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SyncFailed {
    pub worker_id: String,
    /// A fixed label: `cml_unreachable`, `cml_auth`, `deadline`, …
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub consecutive_failures: i64,
    pub last_attempt_at: String,
    pub last_success_at: Option<String>,
}

/// `worker.refresh.throttled`: a refresh of the worker was refused; ask again after this long.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RefreshThrottled {
    pub worker_id: String,
    pub retry_after_seconds: i64,
}

/// A payload as the `data` of a frame.
pub fn data(payload: &impl Serialize) -> serde_json::Value {
    // These types hold strings, numbers and maps of them only: they always serialise.
    serde_json::to_value(payload).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client generating types for the stream finds the envelope and every payload.
    #[test]
    fn the_document_publishes_every_payload() {
        let (_, doc) = crate::app::documented_routes();
        let doc = serde_json::to_value(&doc).expect("json");
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for name in [
            "EventEnvelope",
            "Connected",
            "Heartbeat",
            "Reset",
            "LabUpdated",
            "LabHidden",
            "LabChange",
            "Changed",
            "LabEntry",
            "DataRefreshed",
            "SyncFailed",
            "RefreshThrottled",
        ] {
            assert!(schemas.contains_key(name), "{name} is not a component");
        }
    }

    /// The action is the tag of what happened, and only an update carries `synced_at`.
    #[test]
    fn a_change_serialises_under_its_action() {
        let changed = Changed {
            previous_state: Some("STOPPED".into()),
            new_state: "STARTED".into(),
            changed_fields: BTreeMap::new(),
            changed_at: "t".into(),
        };
        let state = data(&LabChange::StateChanged(changed.clone()));
        assert_eq!(state["action"], "state_changed");
        assert_eq!(state["new_state"], "STARTED");
        assert!(state.get("synced_at").is_none());
        let updated = data(&LabChange::Updated {
            change: changed,
            synced_at: "s".into(),
        });
        assert_eq!(
            (updated["action"].as_str(), updated["synced_at"].as_str()),
            (Some("updated"), Some("s"))
        );
        let created = data(&LabChange::Created {
            first_seen_at: "f".into(),
        });
        assert_eq!(created["action"], "created");
    }
}
