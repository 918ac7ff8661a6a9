//! The sync lease against a real MongoDB-wire server.

use std::time::Duration;

use bson::DateTime;
use shared::fence::Term;
use sync_daemon::lease::Lease;
use testkit::TestDb;

fn at(ms: i64) -> DateTime {
    DateTime::from_millis(1_700_000_000_000 + ms)
}

#[tokio::test]
async fn one_holder_at_a_time_and_takeover_only_after_expiry() {
    let db = TestDb::new("lease").await;
    let ttl = Duration::from_secs(30);
    let a = Lease::new(&db.db, "sync_lease", "sync-daemon", "replica-a", ttl);
    let b = Lease::new(&db.db, "sync_lease", "sync-daemon", "replica-b", ttl);

    assert!(
        a.try_acquire(at(0)).await.expect("a"),
        "a free lease is taken"
    );
    assert!(
        !b.try_acquire(at(1_000)).await.expect("b"),
        "a held lease is not"
    );
    assert!(
        a.try_acquire(at(2_000)).await.expect("a again"),
        "the holder may re-acquire"
    );
    assert!(a.renew(at(10_000)).await.expect("renew"));
    assert!(
        !b.try_acquire(at(39_000)).await.expect("b"),
        "renewed until 40 s"
    );
    assert!(
        b.try_acquire(at(40_001)).await.expect("b"),
        "expired: b takes over"
    );
    assert!(
        !a.renew(at(40_002)).await.expect("a renew"),
        "a learns it lost the lease"
    );
    let state = b.state().await.expect("state").expect("exists");
    assert_eq!(state.holder, "replica-b");

    b.record_cycle(at(41_000)).await.expect("cycle");
    a.record_cycle(at(42_000))
        .await
        .expect("ignored: not the holder");
    b.record_cycle_end(at(41_300)).await.expect("cycle end");
    a.record_cycle_end(at(42_300))
        .await
        .expect("ignored: not the holder");
    let state = b.state().await.expect("state").expect("exists");
    assert_eq!(
        (state.last_cycle_at, state.last_cycle_end_at),
        (Some(at(41_000)), Some(at(41_300)))
    );
    assert_eq!(
        state.since_last_cycle(at(41_250)),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        state.since_last_cycle(at(40_000)),
        Some(Duration::ZERO),
        "a start ahead of this clock counts as just now"
    );

    b.release().await.expect("release");
    assert!(
        a.try_acquire(at(41_500)).await.expect("a"),
        "released: free at once"
    );
}

#[tokio::test]
async fn racing_replicas_get_one_winner() {
    let db = TestDb::new("lease_race").await;
    for round in 0..10 {
        let name = format!("lease-{round}");
        let leases: Vec<Lease> = (0..4)
            .map(|i| {
                Lease::new(
                    &db.db,
                    "sync_lease",
                    &name,
                    &format!("r{i}"),
                    Duration::from_secs(30),
                )
            })
            .collect();
        let results = futures::future::join_all(leases.iter().map(|l| l.try_acquire(at(0)))).await;
        let winners = results
            .into_iter()
            .map(|r| r.expect("no error"))
            .filter(|w| *w)
            .count();
        assert_eq!(winners, 1, "round {round}");
    }
}

/// Each taking of the lease is a new term; renewing keeps it. A holder that lost the lease
/// keeps its old term (its writes are then refused by what the new holder wrote).
#[tokio::test]
async fn each_taking_is_a_new_term_and_renewing_keeps_it() {
    let db = TestDb::new("lease_terms").await;
    let ttl = Duration::from_secs(30);
    let a = Lease::new(&db.db, "sync_lease", "sync-daemon", "replica-a", ttl);
    let b = Lease::new(&db.db, "sync_lease", "sync-daemon", "replica-b", ttl);
    assert_eq!(a.term(), Term(0), "none taken yet");
    assert!(a.try_acquire(at(0)).await.expect("a"));
    assert_eq!(a.term(), Term(1));
    assert!(a.try_acquire(at(10_000)).await.expect("a renews"));
    assert_eq!(a.term(), Term(1), "renewed in the same term");
    assert!(!b.try_acquire(at(20_000)).await.expect("b"));
    assert_eq!(b.term(), Term(0));
    assert!(b.try_acquire(at(40_001)).await.expect("b takes over"));
    assert_eq!(b.term(), Term(2));
    assert!(!a.try_acquire(at(40_002)).await.expect("a"));
    assert_eq!(a.term(), Term(1), "a keeps its old term");
    // Given up and taken again by the same replica: a new term.
    b.release().await.expect("release");
    assert!(b.try_acquire(at(41_000)).await.expect("b again"));
    assert_eq!(b.term(), Term(3));
    // Its own lease expired (it was frozen) and taken again: a new term too.
    assert!(b.try_acquire(at(80_000)).await.expect("b after expiry"));
    assert_eq!(b.term(), Term(4));
}

/// A lease document written before terms existed: its holder's next renewal starts term 1.
#[tokio::test]
async fn a_lease_without_a_term_gets_one() {
    let db = TestDb::new("lease_legacy").await;
    db.db
        .collection::<bson::Document>("sync_lease")
        .insert_one(
            bson::doc! { "_id": "sync-daemon", "holder": "replica-a", "expires_at": at(30_000) },
        )
        .await
        .expect("legacy lease");
    let a = Lease::new(
        &db.db,
        "sync_lease",
        "sync-daemon",
        "replica-a",
        Duration::from_secs(30),
    );
    assert!(a.try_acquire(at(1_000)).await.expect("a"));
    assert_eq!(a.term(), Term(1));
}
