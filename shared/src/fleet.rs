//! The fleet at a glance: every worker the registry or the sync status knows, how its syncs
//! go, flagged stale or failing and sorted with the most urgent first, a page at a time.
//!
//! Pure: the caller reads the two collections and passes the time.

use std::{collections::BTreeMap, time::Duration};

use bson::DateTime;
use serde_json::json;

use crate::{cursor, registry::Worker, status::WorkerSyncStatus, Error, Result};

/// One worker as the fleet view shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEntry {
    pub worker_id: String,
    /// From the registry; `None` for a worker only the sync status knows (a static worker, or
    /// one since removed from the registry).
    pub registry: Option<Worker>,
    /// `None` for a worker never synced.
    pub status: Option<WorkerSyncStatus>,
    /// No success for longer than the staleness threshold, or never.
    pub stale: bool,
}

impl FleetEntry {
    /// The last sync failed (its `consecutive_failures` is above zero).
    pub fn failing(&self) -> bool {
        self.failures() > 0
    }

    fn failures(&self) -> i64 {
        self.status.as_ref().map_or(0, |s| s.consecutive_failures)
    }

    /// Whether it is meant to be synced: running in the registry, or known only to the sync
    /// status (a static worker).
    fn active(&self) -> bool {
        self.registry
            .as_ref()
            .is_none_or(|w| w.status.as_deref() == Some("running"))
    }

    /// Most urgent first: failing (the longest streak first), then stale workers meant to be
    /// synced (the longest without a success first), then stale ones that are not (stopped,
    /// say), then the healthy; by worker id within a tie.
    pub fn key(&self) -> FleetKey {
        let rank = match (self.failing(), self.stale, self.active()) {
            (true, _, _) => 0,
            (false, true, true) => 1,
            (false, true, false) => 2,
            (false, false, _) => 3,
        };
        let last_success = self
            .status
            .as_ref()
            .and_then(|s| s.last_success_at)
            .map_or(i64::MIN, |t| t.timestamp_millis());
        FleetKey {
            rank,
            failures: -self.failures(),
            last_success,
            worker_id: self.worker_id.clone(),
        }
    }
}

/// The sort key of an entry: ascending is most urgent first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FleetKey {
    rank: u8,
    failures: i64,
    last_success: i64,
    worker_id: String,
}

impl FleetKey {
    /// The opaque cursor of a page that ended at this entry.
    pub fn encode(&self) -> String {
        cursor::encode(&json!([
            self.rank,
            self.failures,
            self.last_success,
            self.worker_id
        ]))
    }

    pub fn decode(text: &str) -> Result<Self> {
        let (rank, failures, last_success, worker_id): (u8, i64, i64, String) =
            serde_json::from_value(cursor::decode(text)?).map_err(|_| Error::InvalidCursor)?;
        Ok(Self {
            rank,
            failures,
            last_success,
            worker_id,
        })
    }
}

/// Which workers a fleet view shows. Values are compared literally.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetFilter {
    pub stale: Option<bool>,
    pub failing: Option<bool>,
    pub region: Option<String>,
}

impl FleetFilter {
    fn keeps(&self, e: &FleetEntry) -> bool {
        let region = e.registry.as_ref().and_then(|w| w.aws_region.as_deref());
        self.stale.is_none_or(|s| s == e.stale)
            && self.failing.is_none_or(|f| f == e.failing())
            && self.region.as_deref().is_none_or(|r| region == Some(r))
    }
}

/// Every worker either collection knows, flagged and sorted most urgent first. A worker is
/// stale when its last success is more than `stale_after` before `now`, or when it has none.
pub fn fleet(
    workers: Vec<Worker>,
    statuses: Vec<WorkerSyncStatus>,
    now: DateTime,
    stale_after: Duration,
) -> Vec<FleetEntry> {
    let threshold = now
        .timestamp_millis()
        .saturating_sub(i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX));
    let mut by_id: BTreeMap<String, (Option<Worker>, Option<WorkerSyncStatus>)> = BTreeMap::new();
    for w in workers {
        let id = w.id.clone();
        by_id.entry(id).or_default().0 = Some(w);
    }
    for s in statuses {
        let id = s.worker_id.clone();
        by_id.entry(id).or_default().1 = Some(s);
    }
    let mut entries: Vec<FleetEntry> = by_id
        .into_iter()
        .map(|(worker_id, (registry, status))| {
            let stale = status
                .as_ref()
                .and_then(|s| s.last_success_at)
                .is_none_or(|t| t.timestamp_millis() < threshold);
            FleetEntry {
                worker_id,
                registry,
                status,
                stale,
            }
        })
        .collect();
    entries.sort_by_cached_key(FleetEntry::key);
    entries
}

/// One page of `entries` (sorted as [`fleet`] sorts them): those `filter` keeps, after the
/// cursor `after`, at most `limit`; and the cursor of the next page when there is one.
pub fn page(
    entries: Vec<FleetEntry>,
    filter: &FleetFilter,
    after: Option<&FleetKey>,
    limit: usize,
) -> (Vec<FleetEntry>, Option<FleetKey>) {
    let mut kept = entries
        .into_iter()
        .filter(|e| filter.keeps(e))
        .filter(|e| after.is_none_or(|a| e.key() > *a));
    let items: Vec<FleetEntry> = kept.by_ref().take(limit.max(1)).collect();
    let next = match kept.next() {
        Some(_) => items.last().map(FleetEntry::key),
        None => None,
    };
    (items, next)
}

/// How many workers are failing, failing repeatedly (three times or more in a row), stale.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounts {
    pub known: usize,
    pub failing: usize,
    pub failing_repeatedly: usize,
    pub stale: usize,
}

/// Counts of the fleet view, for the daemon's gauges.
pub fn counts(entries: &[FleetEntry]) -> FleetCounts {
    FleetCounts {
        known: entries.len(),
        failing: entries.iter().filter(|e| e.failing()).count(),
        failing_repeatedly: entries.iter().filter(|e| e.failures() >= 3).count(),
        stale: entries.iter().filter(|e| e.stale && e.active()).count(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(minutes: i64) -> DateTime {
        DateTime::from_millis(1_800_000_000_000 + minutes * 60_000)
    }

    fn worker(id: &str, status: &str, region: &str) -> Worker {
        Worker {
            id: id.into(),
            name: Some(format!("name-{id}")),
            aws_region: Some(region.into()),
            status: Some(status.into()),
            https_endpoint: Some("https://10.0.0.1".into()),
            private_ip: None,
        }
    }

    fn status(id: &str, last_success: Option<i64>, failures: i64) -> WorkerSyncStatus {
        WorkerSyncStatus {
            worker_id: id.into(),
            last_attempt_at: t(0),
            last_success_at: last_success.map(t),
            last_error: (failures > 0).then(|| "boom".into()),
            consecutive_failures: failures,
            lab_count: 3,
            last_duration_ms: 10,
            last_error_kind: (failures > 0).then(|| "cml_timeout".into()),
            last_counts: None,
        }
    }

    fn ids(entries: &[FleetEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.worker_id.as_str()).collect()
    }

    #[test]
    fn the_most_urgent_come_first() {
        let workers = vec![
            worker("healthy", "running", "us-east-1"),
            worker("stale-old", "running", "us-east-1"),
            worker("stale-new", "running", "eu-west-1"),
            worker("never", "running", "eu-west-1"),
            worker("stopped", "stopped", "eu-west-1"),
            worker("failing-1", "running", "us-east-1"),
            worker("failing-5", "running", "us-east-1"),
        ];
        let statuses = vec![
            status("healthy", Some(-10), 0),
            status("stale-old", Some(-600), 0),
            status("stale-new", Some(-200), 0),
            status("stopped", Some(-900), 0),
            status("failing-1", Some(-40), 1),
            status("failing-5", Some(-300), 5),
            status("static-only", Some(-5), 0),
        ];
        let view = fleet(workers, statuses, t(0), 2 * HOUR);
        assert_eq!(
            ids(&view),
            [
                "failing-5",
                "failing-1",
                "never",
                "stale-old",
                "stale-new",
                "stopped",
                "healthy",
                "static-only"
            ]
        );
        let never = &view[2];
        assert!(never.stale && never.status.is_none());
        let static_only = &view[7];
        assert!(static_only.registry.is_none() && !static_only.stale);
        assert_eq!(
            counts(&view),
            FleetCounts {
                known: 8,
                failing: 2,
                failing_repeatedly: 1,
                // never, stale-old, stale-new, and failing-5 (failing and stale both)
                stale: 4
            }
        );
    }

    #[test]
    fn filters_keep_what_they_name() {
        let view = fleet(
            vec![
                worker("a", "running", "us-east-1"),
                worker("b", "running", "eu-west-1"),
            ],
            vec![status("a", Some(-10), 2), status("b", Some(-999), 0)],
            t(0),
            2 * HOUR,
        );
        let only = |f: FleetFilter| ids(&page(view.clone(), &f, None, 100).0).join(",");
        assert_eq!(
            only(FleetFilter {
                failing: Some(true),
                ..Default::default()
            }),
            "a"
        );
        assert_eq!(
            only(FleetFilter {
                stale: Some(true),
                ..Default::default()
            }),
            "b"
        );
        assert_eq!(
            only(FleetFilter {
                stale: Some(false),
                ..Default::default()
            }),
            "a"
        );
        assert_eq!(
            only(FleetFilter {
                region: Some("eu-west-1".into()),
                ..Default::default()
            }),
            "b"
        );
        assert_eq!(
            only(FleetFilter {
                region: Some("{\"$ne\":1}".into()),
                ..Default::default()
            }),
            ""
        );
    }

    #[test]
    fn cursors_round_trip_and_other_text_is_refused() {
        let key = fleet(vec![], vec![status("w", Some(-1), 0)], t(0), HOUR)[0].key();
        assert_eq!(FleetKey::decode(&key.encode()).ok(), Some(key));
        let other_listing = cursor::PageCursor {
            worker_id: "w".into(),
            lab_id: "l".into(),
        }
        .encode();
        for bad in ["", "abc", &other_listing] {
            assert!(FleetKey::decode(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// Paging through the view with any page size gives every kept worker once, in order.
        #[test]
        fn pages_cover_the_view_once_in_order(
            rows in prop::collection::vec((0u8..4, prop::option::of(-1000i64..0), 0i64..5, any::<bool>()), 0..40),
            limit in 1usize..7,
            failing in prop::option::of(any::<bool>()),
        ) {
            let mut workers = Vec::new();
            let mut statuses = Vec::new();
            for (i, (kind, success, failures, running)) in rows.into_iter().enumerate() {
                let id = format!("w{i:02}");
                if kind != 0 {
                    workers.push(worker(&id, if running { "running" } else { "stopped" }, "r"));
                }
                if kind != 1 {
                    statuses.push(status(&id, success, failures));
                }
            }
            let view = fleet(workers, statuses, t(0), HOUR);
            let filter = FleetFilter { failing, ..Default::default() };
            let expected: Vec<String> = page(view.clone(), &filter, None, usize::MAX).0
                .into_iter().map(|e| e.worker_id).collect();
            let mut seen = Vec::new();
            let mut after: Option<FleetKey> = None;
            loop {
                let cursor = after.as_ref().map(|k| FleetKey::decode(&k.encode()).expect("decodes"));
                let (items, next) = page(view.clone(), &filter, cursor.as_ref(), limit);
                prop_assert!(items.len() <= limit);
                seen.extend(items.into_iter().map(|e| e.worker_id));
                match next { Some(k) => after = Some(k), None => break }
            }
            prop_assert_eq!(seen, expected);
        }
    }
}
