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

/// `secs` after this test run began (not a fixed moment: the TTL index would remove documents
/// stamped more than a day ago while a test runs).
fn t(secs: i64) -> DateTime {
    static START: std::sync::LazyLock<i64> =
        std::sync::LazyLock::new(|| DateTime::now().timestamp_millis());
    DateTime::from_millis(*START + secs * 1000)
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
        "holder-a",
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
        "holder-a",
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
    // holder-a resumes and finishes a1: it is not holder-a's any more, so nothing changes (the
    // gate stays busy for the new holder's sync).
    let done = Outcome::Done {
        counts: SyncCounts::default(),
        duration_ms: 1,
    };
    assert!(!s
        .finish("a1", "holder-a", &done, t(2))
        .await
        .expect("finish"));
    assert_eq!(
        s.get("a1").await.expect("get").expect("kept").status,
        RequestStatus::Pending
    );
    assert_eq!(retry_after(record(&s, "a2", "w1", 200).await), 60);
    while s.claim(t(3), "holder-b").await.expect("claim").is_some() {}
    assert!(s
        .finish("a1", "holder-b", &done, t(4))
        .await
        .expect("finish"));
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
                "holder-a",
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

/// The gate and throttle notice documents share the collection: asked for by their ids,
/// they are no request (not an error).
#[tokio::test]
async fn internal_documents_are_not_requests() {
    let db = TestDb::new("requests_internal").await;
    let s = store(&db).await;
    let request = accepted(record(&s, "r1", "w1", 0).await);
    s.notice_throttled("n1", "w1", Duration::from_secs(5), t(1))
        .await
        .expect("notice");
    for id in ["gate:w1", "throttled:n1"] {
        assert_eq!(s.get(id).await.expect("no error"), None, "{id}");
    }
    assert_eq!(
        s.get("r1").await.expect("read").map(|r| r.id),
        Some(request.id)
    );
}

/// The race of the old read-then-insert throttle: a refresh decided at `now` from a read made
/// before the first request was recorded, arriving after that request finished. The gate
/// refuses it: the release is later than its `now`.
#[tokio::test]
async fn a_refresh_decided_before_another_finished_is_refused() {
    let db = TestDb::new("requests_late").await;
    let s = store(&db).await;
    accepted(record(&s, "r1", "w1", 10).await);
    let claimed = s.claim(t(11), "holder-a").await.expect("claim");
    assert!(claimed.is_some());
    let done = Outcome::Done {
        counts: SyncCounts::default(),
        duration_ms: 1,
    };
    s.finish("r1", "holder-a", &done, t(12))
        .await
        .expect("finish");
    // Its clock read 9 s: before r1 was recorded.
    assert_eq!(retry_after(record(&s, "r2", "w1", 9).await), 60);
    assert_eq!(retry_after(record(&s, "r3", "w1", 71).await), 1);
    accepted(record(&s, "r4", "w1", 72).await);
}

/// Storms of concurrent recordings from two replicas (a client each) while a lease holder
/// (a third) claims and finishes every request at once: the first recording of a storm goes
/// through, its request ends at the storm's time, so every other one is refused (busy, then
/// too recent) however the writes interleave. A throttle decided from a read made before the
/// first request existed lets a second one through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storms_over_two_replicas_let_exactly_one_request_through() {
    let db = TestDb::new("requests_storms").await;
    let replica = |_| async {
        let client = mongodb::Client::with_uri_str(testkit::mongodb_uri())
            .await
            .expect("client");
        RequestStore::new(&client.database(db.name()), "sync_requests")
    };
    let holder = store(&db).await;
    let replicas = [replica(0).await, replica(1).await];
    for storm in 0..10i64 {
        let at = t(storm * 100);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let finisher = tokio::spawn({
            let (holder, stop) = (holder.clone(), stop.clone());
            async move {
                let done = Outcome::Done {
                    counts: SyncCounts::default(),
                    duration_ms: 1,
                };
                loop {
                    let last = stop.load(std::sync::atomic::Ordering::SeqCst);
                    while let Some(r) = holder.claim(at, "holder-a").await.expect("claim") {
                        holder
                            .finish(&r.id, "holder-a", &done, at)
                            .await
                            .expect("finish");
                    }
                    if last {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
        });
        let recordings = (0..120).map(|i| {
            let s = replicas[i % 2].clone();
            tokio::spawn(async move { s.record(format!("s{storm}-{i}"), "w1", at, MIN).await })
        });
        let results = futures::future::join_all(recordings).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        finisher.await.expect("finisher");
        let accepted: Vec<_> = results
            .into_iter()
            .filter_map(|r| match r.expect("task") {
                Ok(Recorded::Accepted(r)) => Some(r.id),
                Ok(Recorded::Throttled { .. }) => None,
                Err(e) => panic!("storm {storm}: {e}"),
            })
            .collect();
        assert_eq!(accepted.len(), 1, "storm {storm}: {accepted:?}");
    }
}

/// A gate left busy by a request that finished without letting go of it (a finisher of an
/// earlier version, or one stopped between its two writes) is let go of by the next
/// recording, which is then judged by when that request ended.
#[tokio::test]
async fn a_gate_left_busy_by_a_finished_request_heals() {
    let db = TestDb::new("requests_heal").await;
    let s = store(&db).await;
    accepted(record(&s, "r1", "w1", 0).await);
    db.db
        .collection::<Document>("sync_requests")
        .update_one(
            doc! { "_id": "r1" },
            doc! { "$set": { "status": "done", "finished_at": t(5) } },
        )
        .await
        .expect("finish without the gate");
    assert_eq!(retry_after(record(&s, "r2", "w1", 30).await), 35);
    accepted(record(&s, "r3", "w1", 65).await);
    // A gate taken for a request that was never written is let go of after a minute.
    db.db
        .collection::<Document>("sync_requests")
        .update_one(
            doc! { "_id": "gate:w2" },
            doc! { "$set": { "gate_worker_id": "w2", "request_id": "lost", "requested_at": t(0), "busy": true } },
        )
        .upsert(true)
        .await
        .expect("a stuck gate");
    assert_eq!(retry_after(record(&s, "r4", "w2", 30).await), 60);
    accepted(record(&s, "r5", "w2", 61).await);
}
