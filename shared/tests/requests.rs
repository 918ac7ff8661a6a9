//! `sync_requests` against a real MongoDB-wire server (the stand-in, or `MONGODB_URI`).

use std::time::Duration;

use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use shared::{
    refresh::RequestStatus,
    requests::{Outcome, Recorded, RequestStore, KEEP_REQUESTS},
    status::SyncCounts,
};
use testkit::TestDb;

const MIN: Duration = Duration::from_secs(60);

fn t(secs: i64) -> DateTime {
    DateTime::from_millis(1_795_000_000_000 + secs * 1000)
}

async fn store(db: &TestDb) -> RequestStore {
    let s = RequestStore::new(&db.db, "sync_requests");
    s.ensure_indexes().await.expect("indexes");
    s
}

fn accepted(r: Recorded) -> shared::refresh::SyncRequest {
    match r {
        Recorded::Accepted(r) => r,
        Recorded::Throttled { .. } => panic!("throttled: {r:?}"),
    }
}

fn retry_after(r: Recorded) -> u64 {
    match r {
        Recorded::Throttled { retry_after, .. } => retry_after.as_secs(),
        Recorded::Accepted(r) => panic!("accepted: {r:?}"),
    }
}

#[tokio::test]
async fn a_refresh_is_throttled_while_active_and_for_the_interval_after() {
    let db = TestDb::new("requests_throttle").await;
    let s = store(&db).await;
    let first = accepted(
        s.record("r1".into(), "w1", t(0), MIN)
            .await
            .expect("record"),
    );
    assert_eq!(first.status, RequestStatus::Pending);
    assert_eq!(
        retry_after(
            s.record("r2".into(), "w1", t(1), MIN)
                .await
                .expect("record")
        ),
        60
    );
    accepted(
        s.record("r3".into(), "w2", t(1), MIN)
            .await
            .expect("another worker"),
    );

    let claimed = s
        .claim(t(2))
        .await
        .expect("claim")
        .expect("a pending request");
    assert_eq!(
        (claimed.id.as_str(), claimed.status),
        ("r1", RequestStatus::Running)
    );
    assert_eq!(claimed.started_at, Some(t(2)));
    let counts = SyncCounts {
        synced: 3,
        created: 1,
        ..SyncCounts::default()
    };
    s.finish(
        "r1",
        &Outcome::Done {
            counts,
            duration_ms: 1500,
        },
        t(10),
    )
    .await
    .expect("finish");
    let done = s.get("r1").await.expect("get").expect("kept");
    assert_eq!(done.status, RequestStatus::Done);
    assert_eq!((done.counts, done.finished_at), (Some(counts), Some(t(10))));
    assert_eq!(
        retry_after(
            s.record("r4".into(), "w1", t(40), MIN)
                .await
                .expect("record")
        ),
        30
    );
    accepted(
        s.record("r5".into(), "w1", t(70), MIN)
            .await
            .expect("after the interval"),
    );
}

#[tokio::test]
async fn two_replicas_recording_at_once_make_one_request() {
    let db = TestDb::new("requests_race").await;
    let s = store(&db).await;
    let results =
        futures::future::join_all((0..8).map(|i| s.record(format!("r{i}"), "w1", t(0), MIN))).await;
    let accepted = results
        .iter()
        .filter(|r| matches!(r, Ok(Recorded::Accepted(_))))
        .count();
    assert_eq!(accepted, 1, "{results:?}");
    let active: Vec<Document> = db
        .db
        .collection::<Document>("sync_requests")
        .find(doc! { "worker_id": "w1" })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("docs");
    assert_eq!(active.len(), 1);
}

#[tokio::test]
async fn requests_are_claimed_oldest_first_and_a_failure_is_kept() {
    let db = TestDb::new("requests_claim").await;
    let s = store(&db).await;
    accepted(
        s.record("late".into(), "w2", t(5), MIN)
            .await
            .expect("record"),
    );
    accepted(
        s.record("early".into(), "w1", t(1), MIN)
            .await
            .expect("record"),
    );
    assert_eq!(
        s.claim(t(6)).await.expect("claim").map(|r| r.id),
        Some("early".into())
    );
    assert_eq!(
        s.claim(t(6)).await.expect("claim").map(|r| r.id),
        Some("late".into())
    );
    assert_eq!(s.claim(t(6)).await.expect("claim"), None);
    s.finish(
        "late",
        &Outcome::Failed {
            kind: "cml_timeout".into(),
            error: "timed out".into(),
            duration_ms: 2000,
        },
        t(9),
    )
    .await
    .expect("finish");
    let failed = s.get("late").await.expect("get").expect("kept");
    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.error_kind.as_deref(), Some("cml_timeout"));
    // Requests go a day after they were made.
    let indexes: Vec<Document> = db
        .db
        .collection::<Document>("sync_requests")
        .list_indexes()
        .await
        .expect("indexes")
        .try_collect::<Vec<_>>()
        .await
        .expect("list")
        .into_iter()
        .map(|m| bson::to_document(&m).expect("doc"))
        .collect();
    let ttl = indexes
        .iter()
        .find(|i| i.get_document("key").ok() == Some(&doc! { "requested_at": 1 }))
        .expect("a TTL index");
    let expire = ttl.get("expireAfterSeconds").cloned();
    assert!(
        expire
            .is_some_and(|v| v.as_i64().or(v.as_i32().map(i64::from))
                == Some(KEEP_REQUESTS.as_secs() as i64)),
        "{ttl}"
    );
}
