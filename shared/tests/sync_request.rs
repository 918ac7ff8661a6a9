//! `sync_requests` against a real MongoDB-wire server (the stand-in, or `MONGODB_URI`).

use std::time::Duration;

use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use shared::{
    status::SyncCounts,
    sync_request::RequestStatus,
    sync_request::{Outcome, Recorded, RequestStore, KEEP_REQUESTS},
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

/// Records a refresh of `worker` at `secs` (as request `id`), throttled by [`MIN`].
async fn record(s: &RequestStore, id: &str, worker: &str, secs: i64) -> Recorded {
    s.record(id.into(), worker, t(secs), MIN)
        .await
        .expect("record")
}

fn accepted(r: Recorded) -> shared::sync_request::SyncRequest {
    match r {
        Recorded::Accepted(r) => *r,
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
    let first = accepted(record(&s, "r1", "w1", 0).await);
    assert_eq!(first.status, RequestStatus::Pending);
    assert_eq!(retry_after(record(&s, "r2", "w1", 1).await), 60);
    accepted(record(&s, "r3", "w2", 1).await);

    let claimed = s
        .claim(t(2), "holder-a")
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
    assert_eq!(retry_after(record(&s, "r4", "w1", 40).await), 30);
    accepted(record(&s, "r5", "w1", 70).await);
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
    accepted(record(&s, "late", "w2", 5).await);
    accepted(record(&s, "early", "w1", 1).await);
    assert_eq!(
        s.claim(t(6), "holder-a")
            .await
            .expect("claim")
            .map(|r| r.id),
        Some("early".into())
    );
    assert_eq!(
        s.claim(t(6), "holder-a")
            .await
            .expect("claim")
            .map(|r| r.id),
        Some("late".into())
    );
    assert_eq!(s.claim(t(6), "holder-a").await.expect("claim"), None);
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

#[tokio::test]
async fn a_new_holder_requeues_what_another_took_and_a_holder_finds_its_own() {
    let db = TestDb::new("requests_requeue").await;
    let s = store(&db).await;
    for (id, worker) in [("a1", "w1"), ("b1", "w2"), ("c1", "w3")] {
        accepted(
            s.record(id.into(), worker, t(0), MIN)
                .await
                .expect("record"),
        );
    }
    s.claim(t(1), "holder-a").await.expect("claim").expect("a1");
    s.claim(t(1), "holder-a").await.expect("claim").expect("b1");
    s.claim(t(1), "holder-b").await.expect("claim").expect("c1");
    let mut mine = s.claimed_by("holder-a").await.expect("read");
    mine.sort();
    assert_eq!(mine, ["a1", "b1"]);
    // holder-b took the lease over: what holder-a took is pending again, its own is not.
    assert_eq!(s.requeue_orphans("holder-b").await.expect("requeue"), 2);
    let a1 = s.get("a1").await.expect("get").expect("kept");
    assert_eq!(
        (a1.status, a1.claimed_by, a1.started_at),
        (RequestStatus::Pending, None, None)
    );
    assert_eq!(
        s.get("c1").await.expect("get").expect("kept").status,
        RequestStatus::Running
    );
    // A request taken but not served goes back too.
    s.requeue("c1").await.expect("requeue");
    assert_eq!(
        s.get("c1").await.expect("get").expect("kept").status,
        RequestStatus::Pending
    );
    assert!(s.claimed_by("holder-a").await.expect("read").is_empty());
}

#[tokio::test]
async fn waiting_for_an_outcome_returns_when_it_is_written() {
    let db = TestDb::new("requests_wait").await;
    let s = store(&db).await;
    accepted(record(&s, "r1", "w1", 0).await);
    let unfinished = s
        .wait_finished("r1", Duration::from_millis(300))
        .await
        .expect("wait")
        .expect("exists");
    assert_eq!(
        unfinished.status,
        RequestStatus::Pending,
        "the time ran out"
    );
    let writer = s.clone();
    let finish = async move {
        writer.claim(t(1), "holder-a").await.expect("claim");
        writer
            .finish(
                "r1",
                &Outcome::Done {
                    counts: SyncCounts::default(),
                    duration_ms: 5,
                },
                t(2),
            )
            .await
            .expect("finish");
    };
    let (waited, ()) = tokio::join!(s.wait_finished("r1", Duration::from_secs(60)), finish);
    assert_eq!(
        waited.expect("wait").expect("exists").status,
        RequestStatus::Done
    );
    assert_eq!(
        s.wait_finished("nope", Duration::from_secs(60))
            .await
            .expect("wait"),
        None
    );
}

#[tokio::test]
async fn a_throttle_notice_is_no_request() {
    let db = TestDb::new("requests_notice").await;
    let s = store(&db).await;
    s.notice_throttled("n1", "w1", Duration::from_secs(42), t(0))
        .await
        .expect("notice");
    assert_eq!(s.latest("w1").await.expect("latest"), None);
    assert_eq!(s.claim(t(1), "holder-a").await.expect("claim"), None);
    accepted(record(&s, "r1", "w1", 1).await);
}

/// The marker and throttle notice documents share the collection: asked for by their ids,
/// they are no request (not an error).
#[tokio::test]
async fn internal_documents_are_not_requests() {
    let db = TestDb::new("requests_internal").await;
    let s = store(&db).await;
    let request = accepted(record(&s, "r1", "w1", 0).await);
    s.notice_throttled("n1", "w1", Duration::from_secs(5), t(1))
        .await
        .expect("notice");
    for id in ["active:w1", "throttled:n1"] {
        assert_eq!(s.get(id).await.expect("no error"), None, "{id}");
    }
    assert_eq!(
        s.get("r1").await.expect("read").map(|r| r.id),
        Some(request.id)
    );
}
