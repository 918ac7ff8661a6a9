//! Sync requests ("refresh this worker's labs now", collection `sync_requests`): the document
//! lab-api records and the lease holder of sync-daemon serves, its states and the per-worker
//! throttle (pure, here), and their [store] (reading and writing the collection).

mod store;

pub use store::{Outcome, Recorded, RequestStore, KEEP_REQUESTS};

use std::time::Duration;

use bson::DateTime;
use serde::{Deserialize, Serialize};

use crate::status::SyncCounts;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// Recorded; no replica has picked it up yet.
    Pending,
    /// The lease holder is syncing the worker for it.
    Running,
    Done,
    Failed,
}

impl RequestStatus {
    /// Whether the request has an outcome.
    pub fn is_finished(self) -> bool {
        matches!(self, RequestStatus::Done | RequestStatus::Failed)
    }
}

/// A document of `sync_requests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    #[serde(rename = "_id")]
    pub id: String,
    pub worker_id: String,
    pub status: RequestStatus,
    pub requested_at: DateTime,
    #[serde(default)]
    pub started_at: Option<DateTime>,
    #[serde(default)]
    pub finished_at: Option<DateTime>,
    /// What the sync did (when done).
    #[serde(default)]
    pub counts: Option<SyncCounts>,
    #[serde(default)]
    pub duration_ms: Option<i64>,
    /// Why it failed (when failed): the error's fixed label and its text.
    #[serde(default)]
    pub error_kind: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// The sync-daemon replica that took it (while running), so that the next lease holder
    /// can tell the requests of a replica that died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// The CML username of who asked for it (none: an admin of the fleet, or open access):
    /// only they and the fleet's admins may read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

impl SyncRequest {
    /// A new pending request for `worker_id`.
    pub fn pending(id: String, worker_id: String, now: DateTime) -> Self {
        Self {
            id,
            worker_id,
            status: RequestStatus::Pending,
            requested_at: now,
            started_at: None,
            finished_at: None,
            counts: None,
            duration_ms: None,
            error_kind: None,
            error: None,
            claimed_by: None,
            requested_by: None,
        }
    }
}

/// A worker's refresh gate: one document per worker (`_id: "gate:<worker_id>"`) through which
/// every accepted refresh passes, taken by one conditional update (see [`Gate::free`]), so that
/// the throttle and the one-active rule hold whichever replica records a request. It has no
/// `worker_id` or `status` field: no query for requests sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    #[serde(rename = "_id")]
    pub id: String,
    pub gate_worker_id: String,
    /// The request that last went through.
    pub request_id: String,
    /// When it did (the TTL index removes a gate a day after its last request).
    pub requested_at: DateTime,
    /// That request is not finished yet.
    pub busy: bool,
    /// When it finished.
    #[serde(default)]
    pub released_at: Option<DateTime>,
}

impl Gate {
    /// The id of `worker_id`'s gate.
    pub fn id_of(worker_id: &str) -> String {
        format!("gate:{worker_id}")
    }

    /// The filter matching `worker_id`'s gate when a refresh may go through it at `now`: not
    /// busy, and released at least `min_interval` ago. The same rule as [`throttle`], for the
    /// database to decide atomically.
    pub fn free(worker_id: &str, now: DateTime, min_interval: Duration) -> bson::Document {
        let interval_ms = i64::try_from(min_interval.as_millis()).unwrap_or(i64::MAX);
        let latest_release =
            DateTime::from_millis(now.timestamp_millis().saturating_sub(interval_ms));
        bson::doc! {
            "_id": Self::id_of(worker_id),
            "busy": { "$ne": true },
            "$or": [
                { "released_at": { "$exists": false } },
                { "released_at": { "$lte": latest_release } },
            ],
        }
    }
}

/// The throttle, given a worker's gate: one refresh per worker at a time, and none within
/// `min_interval` of the end of the last one. `None`: a refresh may go through now; else how
/// long to wait (whole seconds, at least one, never more than the interval: a request not
/// finished yet means the whole interval from now).
pub fn throttle(gate: Option<&Gate>, now: DateTime, min_interval: Duration) -> Option<Duration> {
    let gate = gate?;
    let interval_ms = i64::try_from(min_interval.as_millis()).unwrap_or(i64::MAX);
    let wait_ms = match (gate.busy, gate.released_at) {
        (true, _) => interval_ms,
        (false, None) => return None,
        (false, Some(released)) => released
            .timestamp_millis()
            .saturating_add(interval_ms)
            .saturating_sub(now.timestamp_millis()),
    };
    if wait_ms <= 0 {
        return None;
    }
    // Whole seconds, rounded up: a client that waits that long is accepted. Never more than
    // the interval (a clock ahead of ours must not make a worker wait longer).
    let secs = u64::try_from(wait_ms)
        .unwrap_or(u64::MAX)
        .div_ceil(1000)
        .max(1);
    Some(Duration::from_secs(secs).min(min_interval.max(Duration::from_secs(1))))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn t(secs: f64) -> DateTime {
        DateTime::from_millis(1_795_000_000_000 + (secs * 1000.0) as i64)
    }

    fn gate(busy: bool, released: Option<f64>) -> Gate {
        Gate {
            id: Gate::id_of("w1"),
            gate_worker_id: "w1".into(),
            request_id: "r1".into(),
            requested_at: t(0.0),
            busy,
            released_at: released.map(t),
        }
    }

    fn retry_after(g: &Gate, now: f64) -> Option<u64> {
        throttle(Some(g), t(now), MIN).map(|d| d.as_secs())
    }

    #[test]
    fn a_first_refresh_is_accepted() {
        assert_eq!(throttle(None, t(0.0), MIN), None);
    }

    #[test]
    fn one_at_a_time() {
        assert_eq!(retry_after(&gate(true, None), 500.0), Some(60));
        // Busy again after an earlier release: the earlier release does not count.
        assert_eq!(retry_after(&gate(true, Some(1.0)), 500.0), Some(60));
    }

    #[test]
    fn the_interval_counts_from_the_end_of_the_last_refresh_and_counts_down() {
        let g = gate(false, Some(10.0));
        assert_eq!(retry_after(&g, 10.0), Some(60));
        assert_eq!(retry_after(&g, 30.5), Some(40));
        assert_eq!(retry_after(&g, 69.9), Some(1));
        assert_eq!(retry_after(&g, 70.0), None);
    }

    #[test]
    fn a_clock_ahead_of_ours_never_makes_a_worker_wait_longer_than_the_interval() {
        assert_eq!(retry_after(&gate(false, Some(100.0)), 0.0), Some(60));
    }

    #[test]
    fn the_free_filter_names_the_gate_and_the_latest_release_allowed() {
        let f = Gate::free("w1", t(70.0), MIN);
        assert_eq!(f.get_str("_id").ok(), Some("gate:w1"));
        let or = f.get_array("$or").expect("$or");
        let lte = or[1]
            .as_document()
            .and_then(|d| d.get_document("released_at").ok());
        assert_eq!(
            lte.and_then(|d| d.get_datetime("$lte").ok()),
            Some(&t(10.0))
        );
    }

    #[test]
    fn the_document_round_trips_with_snake_case_states() {
        let r = SyncRequest {
            started_at: Some(t(1.0)),
            finished_at: Some(t(2.0)),
            status: RequestStatus::Done,
            counts: Some(SyncCounts {
                synced: 5,
                created: 1,
                updated: 2,
                unchanged: 2,
                removed: 0,
            }),
            duration_ms: Some(1000),
            ..SyncRequest::pending("r1".into(), "w1".into(), t(0.0))
        };
        let doc = bson::to_document(&r).expect("bson");
        assert_eq!(doc.get_str("status").ok(), Some("done"));
        assert_eq!(doc.get_str("_id").ok(), Some("r1"));
        assert_eq!(bson::from_document::<SyncRequest>(doc).expect("back"), r);
    }

    proptest! {
        /// Waiting exactly the answer is enough (clocks agreeing), and it is never more than
        /// the interval.
        #[test]
        fn waiting_retry_after_is_enough(end in 0u32..100_000, now in 0u32..200_000, min in 1u64..600) {
            let min = Duration::from_secs(min);
            let g = gate(false, Some(f64::from(end) / 1000.0));
            let now_t = t(f64::from(now) / 1000.0);
            if let Some(retry_after) = throttle(Some(&g), now_t, min) {
                prop_assert!(retry_after >= Duration::from_secs(1) && retry_after <= min);
                if now < end {
                    // The release's clock was ahead of ours: capped, so not enough to wait.
                    return Ok(());
                }
                let later = DateTime::from_millis(now_t.timestamp_millis() + retry_after.as_millis() as i64);
                prop_assert_eq!(throttle(Some(&g), later, min), None);
            }
        }
    }
}
