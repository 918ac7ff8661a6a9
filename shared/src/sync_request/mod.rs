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
        }
    }
}

/// Whether a worker may be refreshed now, given its latest request.
#[derive(Debug, Clone, PartialEq)]
pub enum Throttle {
    Accept,
    /// A refresh is pending or running, or the last one finished too recently: ask again after
    /// `retry_after` (whole seconds, at least one).
    Refuse {
        retry_after: Duration,
        latest: Box<SyncRequest>,
    },
}

/// The throttle: one refresh per worker at a time, and none within `min_interval` of the end
/// of the last one. A request not finished yet means at least `min_interval` from now.
pub fn throttle(latest: Option<&SyncRequest>, now: DateTime, min_interval: Duration) -> Throttle {
    let Some(latest) = latest else {
        return Throttle::Accept;
    };
    let interval_ms = i64::try_from(min_interval.as_millis()).unwrap_or(i64::MAX);
    let wait_ms = if latest.status.is_finished() {
        // Finished without an end time: only an old or hand-made document; judge by its start.
        let end = latest.finished_at.unwrap_or(latest.requested_at);
        end.timestamp_millis()
            .saturating_add(interval_ms)
            .saturating_sub(now.timestamp_millis())
    } else {
        interval_ms
    };
    if wait_ms <= 0 {
        return Throttle::Accept;
    }
    // Whole seconds, rounded up: a client that waits that long is accepted. Never more than
    // the interval (a clock ahead of ours must not make a worker wait longer).
    let secs = u64::try_from(wait_ms)
        .unwrap_or(u64::MAX)
        .div_ceil(1000)
        .max(1);
    Throttle::Refuse {
        retry_after: Duration::from_secs(secs).min(min_interval.max(Duration::from_secs(1))),
        latest: Box::new(latest.clone()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn t(secs: f64) -> DateTime {
        DateTime::from_millis(1_795_000_000_000 + (secs * 1000.0) as i64)
    }

    fn request(status: RequestStatus, finished: Option<f64>) -> SyncRequest {
        SyncRequest {
            status,
            finished_at: finished.map(t),
            ..SyncRequest::pending("r1".into(), "w1".into(), t(0.0))
        }
    }

    fn retry_after(th: Throttle) -> Option<u64> {
        match th {
            Throttle::Accept => None,
            Throttle::Refuse { retry_after, .. } => Some(retry_after.as_secs()),
        }
    }

    #[test]
    fn a_first_refresh_is_accepted() {
        assert_eq!(throttle(None, t(0.0), MIN), Throttle::Accept);
    }

    #[test]
    fn one_at_a_time() {
        for status in [RequestStatus::Pending, RequestStatus::Running] {
            let r = request(status, None);
            assert_eq!(retry_after(throttle(Some(&r), t(500.0), MIN)), Some(60));
        }
    }

    #[test]
    fn the_interval_counts_from_the_end_of_the_last_refresh_and_counts_down() {
        for status in [RequestStatus::Done, RequestStatus::Failed] {
            let r = request(status, Some(10.0));
            assert_eq!(retry_after(throttle(Some(&r), t(10.0), MIN)), Some(60));
            assert_eq!(retry_after(throttle(Some(&r), t(30.5), MIN)), Some(40));
            assert_eq!(retry_after(throttle(Some(&r), t(69.9), MIN)), Some(1));
            assert_eq!(throttle(Some(&r), t(70.0), MIN), Throttle::Accept);
        }
    }

    #[test]
    fn a_clock_ahead_of_ours_never_makes_a_worker_wait_longer_than_the_interval() {
        let r = request(RequestStatus::Done, Some(100.0));
        assert_eq!(retry_after(throttle(Some(&r), t(0.0), MIN)), Some(60));
    }

    #[test]
    fn the_refusal_carries_the_request() {
        let r = request(RequestStatus::Running, None);
        match throttle(Some(&r), t(1.0), MIN) {
            Throttle::Refuse { latest, .. } => assert_eq!(*latest, r),
            Throttle::Accept => panic!("accepted"),
        }
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
        /// Waiting exactly `retry_after` is enough (clocks agreeing), and it is never more than
        /// the interval.
        #[test]
        fn waiting_retry_after_is_enough(end in 0u32..100_000, now in 0u32..200_000, min in 1u64..600) {
            let min = Duration::from_secs(min);
            let r = request(RequestStatus::Done, Some(f64::from(end) / 1000.0));
            let now_t = t(f64::from(now) / 1000.0);
            if let Throttle::Refuse { retry_after, .. } = throttle(Some(&r), now_t, min) {
                prop_assert!(retry_after >= Duration::from_secs(1) && retry_after <= min);
                if now < end {
                    // The request's clock was ahead of ours: capped, so not enough to wait.
                    return Ok(());
                }
                let later = DateTime::from_millis(now_t.timestamp_millis() + retry_after.as_millis() as i64);
                prop_assert_eq!(throttle(Some(&r), later, min), Throttle::Accept);
            }
        }
    }
}
