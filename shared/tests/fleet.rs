//! The fleet view's queries against a real MongoDB-wire server (the stand-in, or
//! `MONGODB_URI`): pages give what sorting every row in memory gives, and the plans read an
//! index in order.

use std::time::Duration;

use bson::{doc, DateTime, Document};
use shared::{
    fleet::{self, FleetFilter, FleetKey, FleetRow, Rank},
    mongo,
    status::SyncStatusReader,
};
use testkit::TestDb;

const NOW: i64 = 1_800_000_000_000;
const HOUR: i64 = 3_600_000;

/// A small deterministic generator: the same fleet every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Rows of every kind: failing streaks that tie, stale and healthy successes that tie (a few
/// distinct instants), never synced, stopped, two regions.
fn fleet_rows(n: usize) -> Vec<FleetRow> {
    let mut g = Lcg(7);
    (0..n)
        .map(|i| {
            let mut r =
                FleetRow::unsynced(&format!("w{:04}", g.below(10_000) * 10 + i as u64 % 10));
            r.worker_id = format!("{}-{i:03}", r.worker_id);
            r.aws_region = Some(["us-east-1", "eu-west-1"][g.below(2) as usize].into());
            // As the daemon keeps them: every document says whether it is meant to be synced.
            r.active = Some(g.below(3) != 0);
            r.registry_status = r
                .active
                .map(|a| if a { "running" } else { "stopped" }.into());
            let synced = g.below(10) != 0;
            if synced {
                r.last_attempt_at = Some(DateTime::from_millis(NOW));
                r.consecutive_failures = [0, 0, 0, 1, 3][g.below(5) as usize];
                // Hours ago: 0..5 (stale past 2), or never.
                r.last_success_at = (g.below(6) != 0)
                    .then(|| DateTime::from_millis(NOW - g.below(5) as i64 * HOUR - HOUR / 2));
                r.last_duration_ms = Some(100);
                r.lab_count = 4;
            }
            r.watch_state = [None, Some("live"), Some("live"), Some("polling")]
                [g.below(4) as usize]
                .map(str::to_owned);
            r
        })
        .collect()
}

async fn seeded(test: &str, rows: &[FleetRow]) -> (TestDb, SyncStatusReader) {
    let db = TestDb::new(test).await;
    let coll = db.db.collection::<Document>("worker_sync_status");
    mongo::ensure_indexes(&coll, shared::status::indexes())
        .await
        .expect("indexes");
    let docs: Vec<Document> = rows
        .iter()
        .map(|r| {
            let mut d = bson::to_document(r).expect("document");
            // As stored: a field no write set is absent, not null.
            for f in ["active", "last_attempt_at", "last_duration_ms"] {
                if d.get(f) == Some(&bson::Bson::Null) {
                    d.remove(f);
                }
            }
            d
        })
        .collect();
    coll.insert_many(docs).await.expect("rows");
    let reader = SyncStatusReader::new(&db.db, "worker_sync_status");
    (db, reader)
}

fn threshold() -> DateTime {
    fleet::stale_threshold(
        DateTime::from_millis(NOW),
        Duration::from_millis(2 * HOUR as u64),
    )
}

fn expected(rows: &[FleetRow], filter: &FleetFilter) -> Vec<String> {
    let mut kept: Vec<&FleetRow> = rows
        .iter()
        .filter(|r| filter.keeps(r, threshold()))
        .collect();
    kept.sort_by_cached_key(|r| r.key(threshold()));
    kept.iter().map(|r| r.worker_id.clone()).collect()
}

async fn paged(reader: &SyncStatusReader, filter: &FleetFilter, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut after: Option<FleetKey> = None;
    loop {
        let (rows, next) = reader
            .fleet_page(filter, after.as_ref(), limit, threshold())
            .await
            .expect("page");
        assert!(rows.len() <= limit);
        seen.extend(rows.into_iter().map(|r| r.worker_id));
        match next {
            // Through the text a client gets.
            Some(k) => after = Some(FleetKey::decode(&k.encode()).expect("cursor")),
            None => return seen,
        }
    }
}

#[tokio::test]
async fn pages_of_every_filter_give_the_rows_in_view_order_once() {
    let rows = fleet_rows(240);
    let (_db, reader) = seeded("fleet_pages", &rows).await;
    let bools = [None, Some(true), Some(false)];
    // A caller's workers: every third one.
    let some: Vec<String> = rows
        .iter()
        .step_by(3)
        .map(|r| r.worker_id.clone())
        .collect();
    for stale in bools {
        for failing in bools {
            for (region, watch, workers) in [
                (None, None, None),
                (Some("eu-west-1".to_owned()), None, None),
                (None, Some("polling".to_owned()), None),
                (Some("us-east-1".to_owned()), Some("live".to_owned()), None),
                (None, None, Some(some.clone())),
            ] {
                let filter = FleetFilter {
                    stale,
                    failing,
                    region,
                    watch,
                    workers,
                };
                let want = expected(&rows, &filter);
                for limit in [1, 7, 1000] {
                    if limit == 1 && want.len() > 60 {
                        continue;
                    }
                    assert_eq!(
                        paged(&reader, &filter, limit).await,
                        want,
                        "{filter:?} by {limit}"
                    );
                }
            }
        }
    }
    // Every rank is there, with ties within them.
    let first = reader
        .fleet_page(&FleetFilter::default(), None, 1000, threshold())
        .await
        .expect("page")
        .0;
    let ranks: std::collections::BTreeSet<_> = first.iter().map(|r| r.rank(threshold())).collect();
    assert_eq!(ranks.len(), 4, "{ranks:?}");
}

/// Each query of a page, at the start and from a cursor deep in its rank, reads an index in
/// order: no sort stage, and keys in proportion to the page, not to the fleet. (The stale
/// ranks may be read from the other index, skipping the other half of `active`: a planner's
/// choice; either reads a bounded range in order.)
#[tokio::test]
async fn a_page_reads_an_index_in_order() {
    let rows = fleet_rows(600);
    let (db, reader) = seeded("fleet_plans", &rows).await;
    let all = reader
        .fleet_page(&FleetFilter::default(), None, 1000, threshold())
        .await
        .expect("all")
        .0;
    let mut cursors: Vec<Option<FleetKey>> = vec![None];
    // Deep in each rank: the middle row of it.
    for rank in [
        Rank::Failing,
        Rank::Stale,
        Rank::StaleInactive,
        Rank::Healthy,
    ] {
        let of_rank: Vec<&FleetRow> = all.iter().filter(|r| r.rank(threshold()) == rank).collect();
        assert!(of_rank.len() > 10, "{rank:?}: {}", of_rank.len());
        cursors.push(Some(of_rank[of_rank.len() / 2].key(threshold())));
    }
    for after in &cursors {
        for q in fleet::queries(&FleetFilter::default(), after.as_ref(), threshold()) {
            let explained = db
                .db
                .run_command(doc! {
                    "explain": { "find": "worker_sync_status", "filter": &q.filter, "sort": &q.sort, "limit": 11 },
                    "verbosity": "executionStats",
                })
                .await
                .expect("explain");
            let stats = explained.get_document("executionStats").expect("stats");
            let keys = stats.get("totalKeysExamined").and_then(mongo::as_i64);
            let returned = stats.get("nReturned").and_then(mongo::as_i64).unwrap_or(0);
            // A bounded scan: the page, or the page among rows of the rank's other kinds.
            assert!(
                keys.is_some_and(|k| k <= 4 * returned + 12),
                "{:?} after {after:?}: {stats}",
                q.rank
            );
            let plan = explained
                .get_document("queryPlanner")
                .and_then(|p| p.get_document("winningPlan"))
                .expect("plan");
            let plan = plan.to_string();
            assert!(plan.contains("IXSCAN"), "{:?}: {plan}", q.rank);
            assert!(!plan.contains("\"SORT\""), "{:?}: {plan}", q.rank);
        }
    }
}
