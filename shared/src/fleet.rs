//! The fleet at a glance: every worker the registry or the sync status knows, how its syncs
//! go, flagged stale or failing and ordered most urgent first, a page at a time.
//!
//! The view is `worker_sync_status` alone. sync-daemon copies each registry worker's name,
//! region and status into that worker's document ([`reconcile`]; a worker never synced gets a
//! document without a sync in it), so a page is a few queries that two indexes answer in
//! order ([`queries`]), and costs the same whatever the fleet's size. Pure: the caller runs
//! the queries and passes the time.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{cursor, registry::Worker, Error, Result};

/// A document of `worker_sync_status` as the fleet view reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRow {
    pub worker_id: String,
    /// From the registry (null for a worker it does not list).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub aws_region: Option<String>,
    /// The registry's status (`running`, `stopped`, …); null when the registry does not list
    /// the worker.
    #[serde(default)]
    pub registry_status: Option<String>,
    /// Meant to be synced: running in the registry, or not listed there (a static worker).
    /// A sync's first write sets it (true) and the registry's copy keeps it; only a document
    /// of an older version lacks it, until the lease holder copies the registry in (at once
    /// when it takes the lease): counted as true, and listed once it has it.
    #[serde(default)]
    pub active: Option<bool>,
    /// Absent for a worker never synced.
    #[serde(default)]
    pub last_attempt_at: Option<DateTime>,
    #[serde(default)]
    pub last_success_at: Option<DateTime>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_kind: Option<String>,
    #[serde(default)]
    pub consecutive_failures: i64,
    #[serde(default)]
    pub lab_count: i64,
    #[serde(default)]
    pub last_duration_ms: Option<i64>,
    /// What the last successful sync could not do ([`crate::status::SyncWarning`]).
    #[serde(default)]
    pub last_warning_kind: Option<String>,
    #[serde(default)]
    pub last_warning: Option<String>,
    /// The lease holder's watch of the worker's CML event stream
    /// ([`crate::status::WATCH_STATES`]); null when none is kept.
    #[serde(default)]
    pub watch_state: Option<String>,
    #[serde(default)]
    pub watch_failure: Option<String>,
    #[serde(default)]
    pub last_activity_at: Option<DateTime>,
    #[serde(default)]
    pub last_event_sync_at: Option<DateTime>,
}

/// The fields of a row the view reads (the projection of its queries).
pub fn projection() -> Document {
    doc! {
        "_id": 0, "worker_id": 1, "name": 1, "aws_region": 1, "registry_status": 1, "active": 1,
        "last_attempt_at": 1, "last_success_at": 1, "last_error": 1, "last_error_kind": 1,
        "consecutive_failures": 1, "lab_count": 1, "last_duration_ms": 1,
        "last_warning_kind": 1, "last_warning": 1, "watch_state": 1, "watch_failure": 1,
        "last_activity_at": 1, "last_event_sync_at": 1,
    }
}

/// A worker is stale when its last success is before this (or when it has none).
pub fn stale_threshold(now: DateTime, stale_after: Duration) -> DateTime {
    DateTime::from_millis(
        now.timestamp_millis()
            .saturating_sub(i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX)),
    )
}

impl FleetRow {
    /// The document a worker the registry lists but no sync has written yet reads as.
    pub fn unsynced(worker_id: &str) -> Self {
        Self {
            worker_id: worker_id.to_owned(),
            name: None,
            aws_region: None,
            registry_status: None,
            active: None,
            last_attempt_at: None,
            last_success_at: None,
            last_error: None,
            last_error_kind: None,
            consecutive_failures: 0,
            lab_count: 0,
            last_duration_ms: None,
            last_warning_kind: None,
            last_warning: None,
            watch_state: None,
            watch_failure: None,
            last_activity_at: None,
            last_event_sync_at: None,
        }
    }

    /// The last sync failed (its `consecutive_failures` is above zero).
    pub fn failing(&self) -> bool {
        self.consecutive_failures > 0
    }

    /// No success since `threshold` ([`stale_threshold`]), or never.
    pub fn stale(&self, threshold: DateTime) -> bool {
        self.last_success_at.is_none_or(|t| t < threshold)
    }

    /// Meant to be synced (see [`FleetRow::active`]).
    pub fn is_active(&self) -> bool {
        self.active.unwrap_or(true)
    }

    /// The part of the view the row is in: failing, stale and meant to be synced, stale and
    /// not (stopped, say), or healthy.
    pub fn rank(&self, threshold: DateTime) -> Rank {
        match (self.failing(), self.stale(threshold), self.is_active()) {
            (true, _, _) => Rank::Failing,
            (false, true, true) => Rank::Stale,
            (false, true, false) => Rank::StaleInactive,
            (false, false, _) => Rank::Healthy,
        }
    }

    /// Where the row stands in the view: by [`FleetRow::rank`]; within it failing rows by the
    /// longest streak, then every rank by the oldest success (never first); by worker id
    /// within a tie.
    pub fn key(&self, threshold: DateTime) -> FleetKey {
        FleetKey {
            rank: self.rank(threshold) as u8,
            failures: -self.consecutive_failures,
            last_success: self
                .last_success_at
                .map_or(i64::MIN, |t| t.timestamp_millis()),
            worker_id: self.worker_id.clone(),
        }
    }
}

/// The four parts of the view, in order; each is one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Rank {
    Failing = 0,
    Stale = 1,
    StaleInactive = 2,
    Healthy = 3,
}

const RANKS: [Rank; 4] = [
    Rank::Failing,
    Rank::Stale,
    Rank::StaleInactive,
    Rank::Healthy,
];

/// The sort key of a row: ascending is most urgent first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FleetKey {
    rank: u8,
    /// Failures in a row, negated (the longest streak first).
    failures: i64,
    /// Milliseconds of the last success; `i64::MIN` for never.
    last_success: i64,
    worker_id: String,
}

impl FleetKey {
    /// The opaque cursor of a page that ended at this row.
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
        if usize::from(rank) >= RANKS.len() || failures > 0 {
            return Err(Error::InvalidCursor);
        }
        Ok(Self {
            rank,
            failures,
            last_success,
            worker_id,
        })
    }

    fn last_success(&self) -> Option<DateTime> {
        (self.last_success != i64::MIN).then(|| DateTime::from_millis(self.last_success))
    }
}

/// Which workers a fleet view shows. Values are compared literally.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetFilter {
    pub stale: Option<bool>,
    pub failing: Option<bool>,
    pub region: Option<String>,
    /// Only workers whose event-stream watch is in this state.
    pub watch: Option<String>,
    /// Only these workers (those where a caller has a user); `None`: all.
    pub workers: Option<Vec<String>>,
}

impl FleetFilter {
    /// Whether the filter keeps `row` (what [`queries`] select, for checking them).
    pub fn keeps(&self, row: &FleetRow, threshold: DateTime) -> bool {
        self.stale.is_none_or(|s| s == row.stale(threshold))
            && self.failing.is_none_or(|f| f == row.failing())
            && self
                .region
                .as_deref()
                .is_none_or(|r| row.aws_region.as_deref() == Some(r))
            && self
                .watch
                .as_deref()
                .is_none_or(|w| row.watch_state.as_deref() == Some(w))
            && self
                .workers
                .as_ref()
                .is_none_or(|ws| ws.contains(&row.worker_id))
    }

    fn wants(&self, rank: Rank) -> bool {
        let (failing, stale) = match rank {
            Rank::Failing => (true, None),
            Rank::Stale | Rank::StaleInactive => (false, Some(true)),
            Rank::Healthy => (false, Some(false)),
        };
        self.failing.is_none_or(|f| f == failing)
            && match (self.stale, stale) {
                (Some(want), Some(is)) => want == is,
                _ => true,
            }
    }
}

/// One query of a page: rows of one rank (or of one part of it), in view order.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetQuery {
    pub rank: Rank,
    pub filter: Document,
    pub sort: Document,
}

/// The indexes [`queries`] need, as (keys, name): failing rows and healthy ones in order of
/// (failures desc, last success, id); stale ones by (active, last success, id).
pub fn indexes() -> [(Document, &'static str); 2] {
    [
        (
            doc! { "consecutive_failures": -1, "last_success_at": 1, "worker_id": 1 },
            "fleet_failures_success",
        ),
        (
            doc! { "consecutive_failures": 1, "active": 1, "last_success_at": 1, "worker_id": 1 },
            "fleet_active_success",
        ),
    ]
}

/// Which rows of a rank a query reads: those never successful (first in the view: no
/// success sorts before any), those with a success, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Never,
    Dated,
    Both,
}

/// The queries of one page, in view order: for each rank the filter keeps from the cursor's
/// on, the rows of that rank (after the cursor in its own rank) sorted as the view is; a stale
/// rank in two parts, the never successful before the rest. Run them in turn until a page is
/// full. Each has equalities or one range on the leading fields of one of [`indexes`] and
/// sorts in its order, so it reads about as many keys as it returns (a `region` filter is
/// applied to the rows an index yields, in order).
pub fn queries(
    filter: &FleetFilter,
    after: Option<&FleetKey>,
    threshold: DateTime,
) -> Vec<FleetQuery> {
    let parts = RANKS.into_iter().flat_map(|rank| match rank {
        Rank::Stale | Rank::StaleInactive => vec![(rank, Part::Never), (rank, Part::Dated)],
        _ => vec![(rank, Part::Both)],
    });
    parts
        .filter(|(rank, part)| {
            filter.wants(*rank)
                && after.is_none_or(|a| match (*rank as u8).cmp(&a.rank) {
                    std::cmp::Ordering::Less => false,
                    std::cmp::Ordering::Greater => true,
                    // Within the cursor's rank: not the never part once past it.
                    std::cmp::Ordering::Equal => *part != Part::Never || a.last_success().is_none(),
                })
        })
        .map(|(rank, part)| {
            let after = after.filter(|a| a.rank == rank as u8);
            query(rank, part, filter, after, threshold)
        })
        .collect()
}

fn query(
    rank: Rank,
    part: Part,
    filter: &FleetFilter,
    after: Option<&FleetKey>,
    threshold: DateTime,
) -> FleetQuery {
    let mut clauses = Vec::new();
    match rank {
        Rank::Failing => {
            // `$gte: 1` rather than `$gt: 0` (the same for counts): a plain lower bound.
            clauses.push(doc! { "consecutive_failures": { "$gte": 1_i64 } });
            if let Some(a) = after {
                // Bounds the scan to the cursor's streak and shorter ones.
                clauses.push(doc! { "consecutive_failures": { "$lte": -a.failures } });
            }
            match filter.stale {
                Some(true) => clauses.push(doc! { "$or": [
                    { "last_success_at": Bson::Null },
                    { "last_success_at": { "$lt": threshold } },
                ] }),
                Some(false) => clauses.push(doc! { "last_success_at": { "$gte": threshold } }),
                None => {}
            }
        }
        Rank::Stale | Rank::StaleInactive => {
            clauses.push(doc! { "consecutive_failures": 0_i64 });
            clauses.push(doc! { "active": rank == Rank::Stale });
            clauses.push(match part {
                Part::Never => doc! { "last_success_at": Bson::Null },
                _ => doc! { "last_success_at": { "$lt": threshold } },
            });
        }
        Rank::Healthy => {
            clauses.push(doc! { "consecutive_failures": 0_i64 });
            clauses.push(doc! { "last_success_at": { "$gte": threshold } });
        }
    }
    if let Some(a) = after {
        clauses.extend(after_clauses(rank, part, a));
    }
    if let Some(r) = &filter.region {
        clauses.push(doc! { "aws_region": r });
    }
    if let Some(w) = &filter.watch {
        clauses.push(doc! { "watch_state": w });
    }
    if let Some(ws) = &filter.workers {
        clauses.push(doc! { "worker_id": { "$in": ws } });
    }
    let sort = match (rank, part) {
        (Rank::Failing, _) => {
            doc! { "consecutive_failures": -1, "last_success_at": 1, "worker_id": 1 }
        }
        (_, Part::Never) => doc! { "worker_id": 1 },
        _ => doc! { "last_success_at": 1, "worker_id": 1 },
    };
    FleetQuery {
        rank,
        filter: doc! { "$and": clauses },
        sort,
    }
}

/// What keeps a query of the cursor's own rank to the rows after it: (last success, id)
/// after the cursor's, within its streak when failing; a range on the leading sort field
/// bounds the index scan, the `$or` decides ties.
fn after_clauses(rank: Rank, part: Part, a: &FleetKey) -> Vec<Document> {
    let last = a.last_success();
    match (part, last) {
        (Part::Never, _) => return vec![doc! { "worker_id": { "$gt": &a.worker_id } }],
        // The cursor is in the never part: every dated row comes after it.
        (Part::Dated, None) => return Vec::new(),
        _ => {}
    }
    let later_success = match last {
        Some(t) => doc! { "last_success_at": { "$gt": t } },
        None => doc! { "last_success_at": { "$type": "date" } },
    };
    let same_success_later_id = doc! {
        "last_success_at": last.map_or(Bson::Null, Bson::DateTime),
        "worker_id": { "$gt": &a.worker_id },
    };
    let mut clauses = Vec::new();
    let mut cases = vec![later_success, same_success_later_id];
    if rank == Rank::Failing {
        for d in &mut cases {
            d.insert("consecutive_failures", -a.failures);
        }
        cases.insert(0, doc! { "consecutive_failures": { "$lt": -a.failures } });
    } else if let Some(t) = last {
        clauses.push(doc! { "last_success_at": { "$gte": t } });
    }
    clauses.push(doc! { "$or": cases });
    clauses
}

/// The page `rows` (what [`queries`] returned in turn, up to `limit + 1`) make: at most
/// `limit` rows, and the cursor of the next page when there is one.
pub fn page(
    mut rows: Vec<FleetRow>,
    limit: usize,
    threshold: DateTime,
) -> (Vec<FleetRow>, Option<FleetKey>) {
    let limit = limit.max(1);
    let next = (rows.len() > limit).then(|| rows[limit - 1].key(threshold));
    rows.truncate(limit);
    (rows, next)
}

/// How many workers are known, failing, failing repeatedly (three times or more in a row),
/// stale (only those meant to be synced), warned (their last success could not do everything).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounts {
    pub known: usize,
    pub failing: usize,
    pub failing_repeatedly: usize,
    pub stale: usize,
    pub warned: usize,
}

/// Counts of the view, for the daemon's gauges.
pub fn counts(rows: &[FleetRow], threshold: DateTime) -> FleetCounts {
    FleetCounts {
        known: rows.len(),
        failing: rows.iter().filter(|r| r.failing()).count(),
        failing_repeatedly: rows.iter().filter(|r| r.consecutive_failures >= 3).count(),
        stale: rows
            .iter()
            .filter(|r| r.stale(threshold) && r.is_active())
            .count(),
        warned: rows
            .iter()
            .filter(|r| r.last_warning_kind.is_some())
            .count(),
    }
}

/// The registry's view of one worker, as its status document keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryFields {
    pub worker_id: String,
    pub name: Option<String>,
    pub aws_region: Option<String>,
    pub registry_status: Option<String>,
    pub active: bool,
}

impl RegistryFields {
    fn of(worker_id: &str, registered: Option<&Worker>) -> Self {
        Self {
            worker_id: worker_id.to_owned(),
            name: registered.and_then(|w| w.name.clone()),
            aws_region: registered.and_then(|w| w.aws_region.clone()),
            registry_status: registered.and_then(|w| w.status.clone()),
            active: registered.is_none_or(|w| w.status.as_deref() == Some("running")),
        }
    }

    fn matches(&self, row: &FleetRow) -> bool {
        row.name == self.name
            && row.aws_region == self.aws_region
            && row.registry_status == self.registry_status
            && row.active == Some(self.active)
    }

    fn apply(&self, row: &mut FleetRow) {
        row.name.clone_from(&self.name);
        row.aws_region.clone_from(&self.aws_region);
        row.registry_status.clone_from(&self.registry_status);
        row.active = Some(self.active);
    }

    /// The upsert that writes them (a worker without a document gets one without a sync).
    pub fn statement(&self) -> Document {
        doc! {
            "q": { "worker_id": &self.worker_id },
            "u": {
                "$set": {
                    "name": &self.name,
                    "aws_region": &self.aws_region,
                    "registry_status": &self.registry_status,
                    "active": self.active,
                },
                "$setOnInsert": { "consecutive_failures": 0_i64, "last_success_at": Bson::Null, "lab_count": 0_i64 },
            },
            "upsert": true,
        }
    }
}

/// The view after copying the registry in, and what to write for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconciled {
    /// Every worker of the registry or of `rows`, by id.
    pub rows: Vec<FleetRow>,
    /// The rows whose registry fields differ from the registry's (new rows included).
    pub changes: Vec<RegistryFields>,
}

/// Copies `workers` (the whole registry) into `rows` (every status document): each registry
/// worker gets a row, and each row the registry's name, region, status and whether it is
/// meant to be synced (a row the registry does not list: none, and it is).
pub fn reconcile(workers: &[Worker], rows: Vec<FleetRow>) -> Reconciled {
    let mut by_id: std::collections::BTreeMap<String, (Option<&Worker>, Option<FleetRow>)> =
        std::collections::BTreeMap::new();
    for w in workers {
        by_id.entry(w.id.clone()).or_default().0 = Some(w);
    }
    for r in rows {
        let id = r.worker_id.clone();
        by_id.entry(id).or_default().1 = Some(r);
    }
    let mut out = Reconciled {
        rows: Vec::with_capacity(by_id.len()),
        changes: Vec::new(),
    };
    for (id, (registered, row)) in by_id {
        let fields = RegistryFields::of(&id, registered);
        let mut row = row.unwrap_or_else(|| FleetRow::unsynced(&id));
        if !fields.matches(&row) {
            fields.apply(&mut row);
            out.changes.push(fields);
        }
        out.rows.push(row);
    }
    out
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

    fn row(id: &str, last_success: Option<i64>, failures: i64) -> FleetRow {
        FleetRow {
            last_attempt_at: Some(t(0)),
            last_success_at: last_success.map(t),
            last_error: (failures > 0).then(|| "boom".into()),
            consecutive_failures: failures,
            lab_count: 3,
            last_duration_ms: Some(10),
            ..FleetRow::unsynced(id)
        }
    }

    fn sorted(mut rows: Vec<FleetRow>, threshold: DateTime) -> Vec<FleetRow> {
        rows.sort_by_cached_key(|r| r.key(threshold));
        rows
    }

    fn ids(rows: &[FleetRow]) -> Vec<&str> {
        rows.iter().map(|r| r.worker_id.as_str()).collect()
    }

    fn example() -> Reconciled {
        let workers = vec![
            worker("healthy", "running", "us-east-1"),
            worker("stale-old", "running", "us-east-1"),
            worker("stale-new", "running", "eu-west-1"),
            worker("never", "running", "eu-west-1"),
            worker("stopped", "stopped", "eu-west-1"),
            worker("failing-1", "running", "us-east-1"),
            worker("failing-5", "running", "us-east-1"),
        ];
        let rows = vec![
            row("healthy", Some(-10), 0),
            row("stale-old", Some(-600), 0),
            row("stale-new", Some(-200), 0),
            row("stopped", Some(-900), 0),
            row("failing-1", Some(-40), 1),
            row("failing-5", Some(-300), 5),
            FleetRow {
                last_warning_kind: Some("groups_unread".into()),
                last_warning: Some("groups answered HTTP 403".into()),
                ..row("static-only", Some(-5), 0)
            },
        ];
        reconcile(&workers, rows)
    }

    #[test]
    fn the_most_urgent_come_first() {
        let threshold = stale_threshold(t(0), 2 * HOUR);
        let view = sorted(example().rows, threshold);
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
        assert!(never.stale(threshold) && never.last_attempt_at.is_none());
        let static_only = &view[7];
        assert!(static_only.registry_status.is_none() && !static_only.stale(threshold));
        assert_eq!(
            counts(&view, threshold),
            FleetCounts {
                known: 8,
                failing: 2,
                failing_repeatedly: 1,
                // never, stale-old, stale-new, and failing-5 (failing and stale both)
                stale: 4,
                warned: 1,
            }
        );
    }

    #[test]
    fn reconciling_copies_the_registry_in_and_writes_only_what_differs() {
        let first = example();
        // Every registry worker and every status: never and the seven others.
        assert_eq!(first.rows.len(), 8);
        assert_eq!(first.changes.len(), 8);
        let never = first.changes.iter().find(|c| c.worker_id == "never");
        assert_eq!(
            never,
            Some(&RegistryFields {
                worker_id: "never".into(),
                name: Some("name-never".into()),
                aws_region: Some("eu-west-1".into()),
                registry_status: Some("running".into()),
                active: true,
            })
        );
        let stopped = first.changes.iter().find(|c| c.worker_id == "stopped");
        assert_eq!(stopped.map(|c| c.active), Some(false));
        let static_only = first.changes.iter().find(|c| c.worker_id == "static-only");
        assert_eq!(
            static_only.map(|c| (c.name.clone(), c.active)),
            Some((None, true))
        );
        // Once written, nothing to write until the registry changes.
        let workers = vec![
            worker("healthy", "stopped", "us-east-1"),
            worker("never", "running", "eu-west-1"),
        ];
        let again = reconcile(&workers[1..], reconcile(&workers[1..], vec![]).rows);
        assert!(again.changes.is_empty());
        let stopping = reconcile(&workers, again.rows);
        assert_eq!(ids(&stopping.rows), ["healthy", "never"]);
        assert_eq!(stopping.changes.len(), 1);
        assert!(!stopping.changes[0].active);
        // Gone from the registry: its name and region cleared, meant to be synced again.
        let gone = reconcile(&[], stopping.rows);
        assert_eq!(gone.changes.len(), 2);
        assert!(gone.rows.iter().all(|r| r.name.is_none() && r.is_active()));
    }

    #[test]
    fn the_upsert_creates_a_document_without_a_sync() {
        let s = RegistryFields::of("w1", Some(&worker("w1", "stopped", "r"))).statement();
        assert_eq!(s.get_document("q").ok(), Some(&doc! { "worker_id": "w1" }));
        let u = s.get_document("u").expect("update");
        assert_eq!(
            u.get_document("$set").ok(),
            Some(
                &doc! { "name": "name-w1", "aws_region": "r", "registry_status": "stopped", "active": false }
            )
        );
        let on_insert = u.get_document("$setOnInsert").expect("on insert");
        assert!(!on_insert.contains_key("last_attempt_at"));
        assert_eq!(s.get_bool("upsert").ok(), Some(true));
    }

    #[test]
    fn each_filter_asks_only_the_ranks_it_can_keep() {
        use Rank::*;
        // The stale ranks in two parts: never successful, then the rest.
        let all: Vec<Rank> = queries(&FleetFilter::default(), None, t(0))
            .into_iter()
            .map(|q| q.rank)
            .collect();
        assert_eq!(
            all,
            [Failing, Stale, Stale, StaleInactive, StaleInactive, Healthy]
        );
        let ranks = |f: FleetFilter| -> Vec<Rank> {
            let mut r: Vec<Rank> = queries(&f, None, t(0))
                .into_iter()
                .map(|q| q.rank)
                .collect();
            r.dedup();
            r
        };
        let f = |failing, stale| FleetFilter {
            failing,
            stale,
            ..FleetFilter::default()
        };
        assert_eq!(ranks(f(Some(true), None)), [Failing]);
        assert_eq!(ranks(f(Some(false), None)), [Stale, StaleInactive, Healthy]);
        assert_eq!(ranks(f(None, Some(true))), [Failing, Stale, StaleInactive]);
        assert_eq!(ranks(f(None, Some(false))), [Failing, Healthy]);
        assert_eq!(ranks(f(Some(false), Some(false))), [Healthy]);
        assert_eq!(ranks(f(Some(true), Some(false))), [Failing]);
    }

    #[test]
    fn a_cursor_skips_the_ranks_before_its_own() {
        let threshold = stale_threshold(t(0), 2 * HOUR);
        let stale = row("a", Some(-600), 0).key(threshold);
        let qs = queries(&FleetFilter::default(), Some(&stale), threshold);
        // Past the never successful of its rank: its dated part, then the later ranks.
        assert_eq!(
            qs.iter().map(|q| q.rank).collect::<Vec<_>>(),
            [
                Rank::Stale,
                Rank::StaleInactive,
                Rank::StaleInactive,
                Rank::Healthy
            ]
        );
        // Only the cursor's own rank continues after it.
        assert!(qs[0].filter.to_string().contains("$or"));
        assert!(!qs[1].filter.to_string().contains("$or"));
        // A cursor among the never successful: the rest of them by id, then every dated row.
        let never = row("n", None, 0).key(threshold);
        let qs = queries(&FleetFilter::default(), Some(&never), threshold);
        assert_eq!(qs.len(), 5);
        let and = qs[0].filter.get_array("$and").expect("and");
        assert!(and.contains(&Bson::Document(doc! { "worker_id": { "$gt": "n" } })));
        assert_eq!(qs[0].sort, doc! { "worker_id": 1 });
        assert!(!qs[1].filter.to_string().contains("worker_id"));
        // A failing cursor bounds the streak from above: the scan starts at it.
        let failing = row("b", None, 4).key(threshold);
        let q = &queries(&FleetFilter::default(), Some(&failing), threshold)[0];
        let and = q.filter.get_array("$and").expect("and");
        assert_eq!(
            &and[..2],
            [
                Bson::Document(doc! { "consecutive_failures": { "$gte": 1_i64 } }),
                Bson::Document(doc! { "consecutive_failures": { "$lte": 4_i64 } })
            ]
        );
    }

    #[test]
    fn filters_and_sorts_follow_an_index() {
        let threshold = t(0);
        let index_keys: Vec<Vec<String>> = indexes()
            .iter()
            .map(|(k, _)| k.keys().cloned().collect())
            .collect();
        for q in queries(&FleetFilter::default(), None, threshold) {
            let sort: Vec<String> = q.sort.keys().cloned().collect();
            // Some index is (equality fields…, the sort fields).
            assert!(
                index_keys.iter().any(|k| k.ends_with(&sort)),
                "{:?} sorts by {sort:?}",
                q.rank
            );
        }
    }

    #[test]
    fn the_region_filter_compares_literally() {
        let threshold = t(0);
        let r = row("a", Some(-1), 0);
        let mut eu = r.clone();
        eu.aws_region = Some("eu-west-1".into());
        let f = FleetFilter {
            region: Some("eu-west-1".into()),
            ..Default::default()
        };
        assert!(f.keeps(&eu, threshold) && !f.keeps(&r, threshold));
        let q = &queries(&f, None, threshold)[0];
        assert!(q
            .filter
            .get_array("$and")
            .expect("and")
            .contains(&Bson::Document(doc! { "aws_region": "eu-west-1" })));
    }

    #[test]
    fn cursors_round_trip_and_other_text_is_refused() {
        let key = row("w", Some(-1), 0).key(t(0));
        assert_eq!(FleetKey::decode(&key.encode()).ok(), Some(key));
        let other_listing = cursor::PageCursor {
            worker_id: "w".into(),
            lab_id: "l".into(),
        }
        .encode();
        let bad_rank = cursor::encode(&json!([9, 0, 0, "w"]));
        let bad_failures = cursor::encode(&json!([0, 3, 0, "w"]));
        for bad in ["", "abc", &other_listing, &bad_rank, &bad_failures] {
            assert!(FleetKey::decode(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// A page is at most `limit` rows, with a cursor at its last row exactly when rows were
        /// left over.
        #[test]
        fn a_page_ends_where_its_cursor_starts(n in 0usize..12, limit in 1usize..6) {
            let threshold = t(0);
            let rows: Vec<FleetRow> = (0..n).map(|i| row(&format!("w{i:02}"), Some(-(i as i64)), 0)).collect();
            let (items, next) = page(rows.clone(), limit, threshold);
            prop_assert_eq!(items.len(), n.min(limit));
            prop_assert_eq!(next.is_some(), n > limit);
            if let Some(k) = next {
                prop_assert_eq!(k, rows[limit - 1].key(threshold));
            }
        }

        /// Whatever the registry and the statuses, reconciling twice writes nothing the second
        /// time, and every registry worker has a row.
        #[test]
        fn reconciling_settles(
            entries in prop::collection::vec((0u8..3, any::<bool>(), prop::option::of(-1000i64..0)), 0..30),
        ) {
            let mut workers = Vec::new();
            let mut rows = Vec::new();
            for (i, (kind, running, success)) in entries.into_iter().enumerate() {
                let id = format!("w{i:02}");
                if kind != 0 {
                    workers.push(worker(&id, if running { "running" } else { "stopped" }, "r"));
                }
                if kind != 1 {
                    rows.push(row(&id, success, 0));
                }
            }
            let once = reconcile(&workers, rows);
            for w in &workers {
                prop_assert!(once.rows.iter().any(|r| r.worker_id == w.id));
            }
            let twice = reconcile(&workers, once.rows.clone());
            prop_assert!(twice.changes.is_empty());
            prop_assert_eq!(twice.rows, once.rows);
        }
    }
}
