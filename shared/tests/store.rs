//! The lab_records store against a real MongoDB-wire server (the stand-in, or `MONGODB_URI`).

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use futures::TryStreamExt;
use shared::{
    change::{plan_sync, Groups, Listing, SyncPlan},
    config::{BatchWriteMode, MongoConfig},
    cursor::PageCursor,
    fence::Term,
    record::{LabFields, LabRecord, LabState, ObservedLab, REMOVED_STATE},
    store::{cutoff, LabFilter, LabStore},
};
use testkit::TestDb;

fn config(db: &TestDb, mode: BatchWriteMode) -> MongoConfig {
    MongoConfig {
        database: db.name().to_owned(),
        batch_writes: mode,
        ..MongoConfig::default()
    }
}

async fn store(db: &TestDb, mode: BatchWriteMode) -> LabStore {
    let store = LabStore::new(&db.client, &config(db, mode), 50);
    store.ensure_indexes().await.expect("indexes");
    db.commands.take();
    store
}

fn lab(id: &str, state: &str, title: &str) -> ObservedLab {
    ObservedLab::new(
        id,
        LabFields {
            title: title.into(),
            state: state.into(),
            owner_username: "admin".into(),
            node_count: 2,
            link_count: 1,
            groups: vec!["g".into()],
            cml_created_at: Some(DateTime::from_millis(1_700_000_000_000)),
            ..LabFields::default()
        },
    )
}

/// The sync clock of the tests: a later instant at every call, so no test waits for the wall
/// clock to move.
fn tick() -> DateTime {
    static NEXT: std::sync::atomic::AtomicI64 =
        std::sync::atomic::AtomicI64::new(1_750_000_000_000);
    DateTime::from_millis(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn plan_at_tick(
    worker: &str,
    stored: &[LabRecord],
    labs: Vec<ObservedLab>,
    listing: Listing,
) -> SyncPlan {
    plan_sync(worker, stored, labs, listing, Groups::Observed, tick()).expect("plan")
}

/// A worker's labs as the API lists them (sorted by title then id), at most `limit`.
async fn listed(
    store: &LabStore,
    worker: &str,
    include_removed: bool,
    limit: usize,
) -> Vec<LabRecord> {
    store
        .labs_of_worker(worker, include_removed, None, limit)
        .await
        .expect("list")
        .try_collect()
        .await
        .expect("records")
}

/// Reads the worker's records, plans against a fresh listing, applies. Returns the plan.
async fn sync(
    store: &LabStore,
    worker: &str,
    labs: Vec<ObservedLab>,
    listing: Listing,
) -> SyncPlan {
    let stored = store.records_for_sync(worker).await.expect("read");
    let plan = plan_at_tick(worker, &stored, labs, listing);
    store.apply(&plan, Term(1)).await.expect("apply");
    plan
}

const MODES: [BatchWriteMode; 2] = [BatchWriteMode::UpdateCommand, BatchWriteMode::Auto];

#[tokio::test]
async fn indexes_are_created_once_and_the_unique_one_rejects_duplicates() {
    let db = TestDb::new("indexes").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    store.ensure_indexes().await.expect("second run is a no-op");
    let coll = db.db.collection::<Document>("lab_records");
    let names: Vec<String> = coll.list_index_names().await.expect("list");
    for name in ["worker_id_1", "worker_id_1_lab_id_1", "last_synced_at_1"] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    coll.insert_one(doc! { "worker_id": "w", "lab_id": "l" })
        .await
        .expect("first");
    let err = coll
        .insert_one(doc! { "worker_id": "w", "lab_id": "l" })
        .await
        .expect_err("duplicate");
    assert!(
        err.to_string().contains("11000") || err.to_string().to_lowercase().contains("duplicate"),
        "{err}"
    );
    coll.insert_one(doc! { "worker_id": "w2", "lab_id": "l" })
        .await
        .expect("other worker, same lab id");
}

#[tokio::test]
async fn an_index_made_under_another_name_is_accepted() {
    let db = TestDb::new("foreign_index").await;
    let coll = db.db.collection::<Document>("lab_records");
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! { "worker_id": 1, "lab_id": 1 })
            .options(
                mongodb::options::IndexOptions::builder()
                    .unique(true)
                    .name("legacy_unique".to_owned())
                    .build(),
            )
            .build(),
    )
    .await
    .expect("legacy index");
    store(&db, BatchWriteMode::Auto).await;
}

#[tokio::test]
async fn a_first_sync_creates_records_with_bson_dates() {
    for mode in MODES {
        let db = TestDb::new("first_sync").await;
        let store = store(&db, mode).await;
        let plan = sync(
            &store,
            "w1",
            vec![lab("l1", "STARTED", "A"), lab("l2", "STOPPED", "B")],
            Listing::Complete,
        )
        .await;
        assert_eq!(plan.counts().created, 2);
        let raw = db
            .db
            .collection::<Document>("lab_records")
            .find_one(doc! { "lab_id": "l1" })
            .await
            .expect("find")
            .expect("exists");
        for key in ["cml_created_at", "first_seen_at", "last_synced_at"] {
            assert!(
                matches!(raw.get(key), Some(Bson::DateTime(_))),
                "{key} is {:?}",
                raw.get(key)
            );
        }
        assert_eq!(raw.get("modified_at"), Some(&Bson::Null));
        assert_eq!(raw.get("removed_at"), Some(&Bson::Null));
        // History is the list of changes: a new record has none (first_seen_at says when).
        let history = raw.get_array("operation_history").expect("history");
        assert!(history.is_empty(), "{history:?}");
        assert!(uuid_like(raw.get_str("id").expect("id")));
        assert_eq!(raw.get_i32("node_count").ok(), Some(2));
        // Typed round trip: what was written reads back equal.
        let record = store.lab("w1", "l1").await.expect("get").expect("exists");
        assert_eq!(
            record.fields.cml_created_at,
            Some(DateTime::from_millis(1_700_000_000_000))
        );
        assert_eq!(record.first_seen_at, record.last_synced_at);
    }
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn the_record_id_and_first_seen_never_change() {
    let db = TestDb::new("id_stable").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    sync(
        &store,
        "w",
        vec![lab("l1", "STOPPED", "A")],
        Listing::Complete,
    )
    .await;
    let before = store.lab("w", "l1").await.expect("get").expect("exists");
    sync(
        &store,
        "w",
        vec![lab("l1", "STARTED", "A")],
        Listing::Complete,
    )
    .await;
    let after = store.lab("w", "l1").await.expect("get").expect("exists");
    assert_eq!(before.id, after.id);
    assert_eq!(before.first_seen_at, after.first_seen_at);
    assert!(after.last_synced_at > before.last_synced_at);
}

#[tokio::test]
async fn a_change_writes_one_entry_with_every_changed_field() {
    for mode in MODES {
        let db = TestDb::new("one_change").await;
        let store = store(&db, mode).await;
        sync(
            &store,
            "w",
            vec![lab("l1", "STOPPED", "A")],
            Listing::Complete,
        )
        .await;
        let mut changed = lab("l1", "STARTED", "A renamed");
        changed.fields.node_count = 7;
        let plan = sync(&store, "w", vec![changed], Listing::Complete).await;
        assert_eq!(plan.counts().updated, 1);
        let r = store.lab("w", "l1").await.expect("get").expect("exists");
        assert_eq!(r.fields.state, "STARTED");
        assert_eq!(r.fields.title, "A renamed");
        assert_eq!(r.operation_history.len(), 1);
        let e = &r.operation_history[0];
        assert!(matches!(
            bson::to_bson(&e.timestamp).expect("bson"),
            Bson::DateTime(_)
        ));
        assert_eq!(e.previous_state.as_deref(), Some("STOPPED"));
        assert_eq!(e.new_state, "STARTED");
        assert_eq!(
            e.changed_fields
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["node_count", "state", "title"]
        );
        assert_eq!(e.changed_fields["node_count"].old, Bson::Int32(2));
        assert_eq!(e.changed_fields["node_count"].new, Bson::Int32(7));
    }
}

#[tokio::test]
async fn seventy_changes_keep_the_newest_fifty_entries() {
    for mode in MODES {
        let db = TestDb::new("history_cap").await;
        let store = store(&db, mode).await;
        sync(
            &store,
            "w",
            vec![lab("l1", "STOPPED", "title 0")],
            Listing::Complete,
        )
        .await;
        for i in 1..=70 {
            sync(
                &store,
                "w",
                vec![lab("l1", "STOPPED", &format!("title {i}"))],
                Listing::Complete,
            )
            .await;
        }
        let r = store.lab("w", "l1").await.expect("get").expect("exists");
        assert_eq!(r.operation_history.len(), 50);
        let newest = &r.operation_history[49].changed_fields["title"];
        assert_eq!(newest.new, Bson::String("title 70".into()));
        let oldest = &r.operation_history[0].changed_fields["title"];
        assert_eq!(oldest.new, Bson::String("title 21".into()));
        assert!(r
            .operation_history
            .windows(2)
            .all(|w| w[0].timestamp <= w[1].timestamp));
    }
}

#[tokio::test]
async fn an_unchanged_sync_only_stamps_last_synced_at() {
    let db = TestDb::new("unchanged").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    sync(
        &store,
        "w",
        vec![lab("l1", "STOPPED", "A")],
        Listing::Complete,
    )
    .await;
    let before = store.lab("w", "l1").await.expect("get").expect("exists");
    // Groups repeated or in another order are the same set: no change.
    let mut same = lab("l1", "STOPPED", "A");
    same.fields.groups = vec!["g".into(), "g".into()];
    let plan = sync(&store, "w", vec![same], Listing::Complete).await;
    assert_eq!(plan.counts().unchanged, 1);
    let after = store.lab("w", "l1").await.expect("get").expect("exists");
    assert_eq!(after.operation_history, before.operation_history);
    assert!(after.last_synced_at > before.last_synced_at);
}

#[tokio::test]
async fn a_whitespace_only_edit_is_stored_and_recorded() {
    let db = TestDb::new("whitespace_edit").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    let mut first = lab("l1", "STOPPED", "A");
    first.fields.notes = "## Notes\nSave configs.".into();
    sync(&store, "w", vec![first.clone()], Listing::Complete).await;
    let mut edited = first;
    edited.fields.notes = "## Notes\n\nSave configs.".into();
    let plan = sync(&store, "w", vec![edited], Listing::Complete).await;
    assert_eq!(plan.counts().updated, 1);
    let r = store.lab("w", "l1").await.expect("get").expect("exists");
    assert_eq!(
        r.fields.notes, "## Notes\n\nSave configs.",
        "stored exactly"
    );
    assert_eq!(
        r.operation_history[0]
            .changed_fields
            .keys()
            .collect::<Vec<_>>(),
        ["notes"]
    );
}

#[tokio::test]
async fn apply_takes_one_round_trip() {
    for mode in MODES {
        let db = TestDb::new("round_trips").await;
        let store = store(&db, mode).await;
        let labs: Vec<ObservedLab> = (0..200)
            .map(|i| lab(&format!("l{i:03}"), "STOPPED", "t"))
            .collect();
        let stored = store.records_for_sync("w").await.expect("read");
        db.commands.take();
        let plan = plan_at_tick("w", &stored, labs.clone(), Listing::Complete);
        let outcome = store.apply(&plan, Term(1)).await.expect("apply");
        let sent = db.commands.take();
        assert_eq!(outcome.created, 200, "{mode:?}");
        assert_eq!(outcome.round_trips, 1, "{mode:?}: {sent:?}");
        assert_eq!(write_commands(&sent), 1, "{mode:?}: {sent:?}");

        // Steady state: some changed, one removed, the rest unchanged.
        let mut next = labs;
        next.pop();
        for l in next.iter_mut().take(4) {
            l.fields.state = "STARTED".into();
        }
        let stored = store.records_for_sync("w").await.expect("read");
        db.commands.take();
        let plan = plan_at_tick("w", &stored, next, Listing::Complete);
        let c = plan.counts();
        assert_eq!((c.updated, c.removed, c.unchanged), (4, 1, 195));
        let outcome = store.apply(&plan, Term(1)).await.expect("apply");
        let sent = db.commands.take();
        assert_eq!(outcome.round_trips, 1, "{mode:?}: {sent:?}");
        assert_eq!(write_commands(&sent), 1, "{mode:?}: {sent:?}");
        assert_eq!(
            (outcome.matched, outcome.stamped, outcome.conflicts),
            (5, 195, 0)
        );
    }
}

fn write_commands(sent: &[String]) -> usize {
    sent.iter()
        .filter(|c| matches!(c.as_str(), "update" | "bulkWrite" | "insert" | "delete"))
        .count()
}

#[tokio::test]
async fn two_tasks_creating_the_same_lab_at_once_leave_one_record() {
    for mode in MODES {
        let db = TestDb::new("race_create").await;
        let store = store(&db, mode).await;
        for round in 0..10 {
            let worker = format!("w{round}");
            // Both read "no records" before either writes: the worst interleaving.
            let plan_a = plan_at_tick(
                &worker,
                &[],
                vec![lab("l1", "STOPPED", "A")],
                Listing::Complete,
            );
            let plan_b = plan_at_tick(
                &worker,
                &[],
                vec![lab("l1", "STOPPED", "A")],
                Listing::Complete,
            );
            let (a, b) = tokio::join!(store.apply(&plan_a, Term(1)), store.apply(&plan_b, Term(1)));
            let (a, b) = (a.expect("a"), b.expect("b"));
            assert_eq!(a.created + b.created, 1, "{mode:?}: exactly one insert");
            let n = db
                .db
                .collection::<Document>("lab_records")
                .count_documents(doc! { "worker_id": &worker })
                .await
                .expect("count");
            assert_eq!(n, 1, "{mode:?}");
            let r = store
                .lab(&worker, "l1")
                .await
                .expect("get")
                .expect("exists");
            assert!(r.operation_history.is_empty(), "{mode:?}: no history yet");
        }
    }
}

#[tokio::test]
async fn a_stale_plan_does_not_overwrite_a_newer_sync() {
    let db = TestDb::new("stale_plan").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    sync(
        &store,
        "w",
        vec![lab("l1", "STOPPED", "A")],
        Listing::Complete,
    )
    .await;
    let stale_read = store.records_for_sync("w").await.expect("read");
    sync(
        &store,
        "w",
        vec![lab("l1", "STARTED", "A")],
        Listing::Complete,
    )
    .await;
    let stale = plan_at_tick(
        "w",
        &stale_read,
        vec![lab("l1", "DEFINED_ON_CORE", "A")],
        Listing::Complete,
    );
    let outcome = store.apply(&stale, Term(1)).await.expect("apply");
    assert_eq!(outcome.conflicts, 1);
    let r = store.lab("w", "l1").await.expect("get").expect("exists");
    assert_eq!(r.fields.state, "STARTED");
    assert_eq!(r.operation_history.len(), 1);
}

/// A holder that lost the lease (frozen past it) resumes and writes the plan it made: its
/// stamps, creates and updates carry the old term, and every record its successor wrote
/// since refuses them, in both write modes, even with a clock later than the successor's.
#[tokio::test]
async fn a_sync_under_an_older_term_changes_nothing_a_newer_term_wrote() {
    for mode in MODES {
        let db = TestDb::new("fenced").await;
        let store = store(&db, mode).await;
        let labs = || vec![lab("l1", "STOPPED", "A"), lab("l2", "STOPPED", "B")];
        let first = plan_at_tick("w", &[], labs(), Listing::Complete);
        store.apply(&first, Term(1)).await.expect("term 1");
        let stale_read = store.records_for_sync("w").await.expect("read");
        // The successor (term 2) sees l3 appear.
        let mut now = labs();
        now.push(lab("l3", "STARTED", "C"));
        let read = store.records_for_sync("w").await.expect("read");
        let newer = plan_at_tick("w", &read, now, Listing::Complete);
        let newer_outcome = store.apply(&newer, Term(2)).await.expect("term 2");
        assert_eq!((newer_outcome.created, newer_outcome.stamped), (1, 2));
        let after_newer: Vec<Document> = raw(&db).await;
        // The stale holder: l1 unchanged (a stamp), l2 changed, l3 new (a create).
        let stale = plan_at_tick(
            "w",
            &stale_read,
            vec![
                lab("l1", "STOPPED", "A"),
                lab("l2", "STARTED", "B"),
                lab("l3", "STOPPED", "stale"),
            ],
            Listing::Complete,
        );
        let outcome = store
            .apply(&stale, Term(1))
            .await
            .expect("fenced writes are no error");
        assert_eq!(
            (outcome.created, outcome.conflicts),
            (0, 2),
            "{mode:?}: {outcome:?}"
        );
        assert_eq!(raw(&db).await, after_newer, "{mode:?}: nothing changed");
        assert!(
            after_newer.iter().all(|r| r.get_i64("sync_term") == Ok(2)),
            "{after_newer:?}"
        );
        // The next holder's own term writes as before.
        let read = store.records_for_sync("w").await.expect("read");
        let next = plan_at_tick("w", &read, labs(), Listing::Complete);
        let outcome = store.apply(&next, Term(2)).await.expect("term 2 again");
        assert_eq!((outcome.stamped, outcome.matched), (2, 1), "{outcome:?}");
    }
}

/// The worker `w`'s records as stored, by lab id.
async fn raw(db: &TestDb) -> Vec<Document> {
    db.db
        .collection::<Document>("lab_records")
        .find(doc! { "worker_id": "w" })
        .sort(doc! { "lab_id": 1 })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("records")
}

#[tokio::test]
async fn vanish_reappear_and_purge() {
    for mode in MODES {
        let db = TestDb::new("vanish").await;
        let store = store(&db, mode).await;
        sync(
            &store,
            "w",
            vec![lab("l1", "STARTED", "A"), lab("l2", "STOPPED", "B")],
            Listing::Complete,
        )
        .await;

        // An incomplete listing removes nothing.
        let plan = sync(
            &store,
            "w",
            vec![lab("l1", "STARTED", "A")],
            Listing::Partial,
        )
        .await;
        assert_eq!(plan.counts().removed, 0);
        assert!(store
            .lab("w", "l2")
            .await
            .expect("get")
            .expect("exists")
            .removed_at
            .is_none());

        let plan = sync(
            &store,
            "w",
            vec![lab("l1", "STARTED", "A")],
            Listing::Complete,
        )
        .await;
        assert_eq!(plan.counts().removed, 1);
        let gone = store
            .lab("w", "l2")
            .await
            .expect("get")
            .expect("kept as a tombstone");
        let removed_at = gone.removed_at.expect("marked");
        let last = gone.operation_history.last().expect("entry");
        assert_eq!(
            gone.last_changed_at,
            Some(last.timestamp),
            "changed when removed"
        );
        assert_eq!(
            (last.previous_state.as_deref(), last.new_state.as_str()),
            (Some("STOPPED"), REMOVED_STATE)
        );
        let visible: Vec<String> = listed(&store, "w", false, 100)
            .await
            .into_iter()
            .map(|r| r.lab_id)
            .collect();
        assert_eq!(visible, ["l1"]);
        assert_eq!(listed(&store, "w", true, 100).await.len(), 2);

        // Purge keeps tombstones younger than the retention.
        assert_eq!(
            store
                .purge_removed(cutoff(tick(), Duration::from_secs(3600)))
                .await
                .expect("purge"),
            0
        );

        // It comes back: un-marked, with an entry.
        let plan = sync(
            &store,
            "w",
            vec![lab("l1", "STARTED", "A"), lab("l2", "STOPPED", "B")],
            Listing::Complete,
        )
        .await;
        assert_eq!(plan.counts().reappeared, 1);
        let back = store.lab("w", "l2").await.expect("get").expect("exists");
        assert!(back.removed_at.is_none());
        let last = back.operation_history.last().expect("entry");
        assert_eq!(
            back.last_changed_at,
            Some(last.timestamp),
            "changed when back"
        );
        let kept = store.lab("w", "l1").await.expect("get").expect("exists");
        assert_eq!(
            kept.last_changed_at,
            Some(kept.first_seen_at),
            "stamped, never changed: still its creation"
        );
        assert_eq!(
            (last.previous_state.as_deref(), last.new_state.as_str()),
            (Some(REMOVED_STATE), "STOPPED")
        );
        assert_eq!(
            last.changed_fields["removed_at"].old,
            Bson::DateTime(removed_at)
        );

        // Gone again, then purged once past the retention; the live record stays.
        sync(
            &store,
            "w",
            vec![lab("l1", "STARTED", "A")],
            Listing::Complete,
        )
        .await;
        let counts = store.count_by_state().await.expect("count");
        assert_eq!(
            (counts.by_state, counts.other, counts.removed),
            ([0, 0, 1], 0, 1),
            "the live lab by its state, the tombstone as removed: {counts:?}"
        );
        let later = DateTime::from_millis(tick().timestamp_millis() + 8 * 86_400_000);
        assert_eq!(
            store
                .purge_removed(cutoff(later, Duration::from_secs(7 * 86_400)))
                .await
                .expect("purge"),
            1
        );
        assert!(store.lab("w", "l2").await.expect("get").is_none());
        assert!(store.lab("w", "l1").await.expect("get").is_some());
    }
}

#[tokio::test]
async fn worker_labs_are_sorted_by_title_then_lab_id() {
    let db = TestDb::new("sorted").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    sync(
        &store,
        "w",
        vec![
            lab("c", "STOPPED", "Beta"),
            lab("b", "STOPPED", "Alpha"),
            lab("a", "STOPPED", "Beta"),
        ],
        Listing::Complete,
    )
    .await;
    sync(
        &store,
        "other",
        vec![lab("z", "STOPPED", "Aardvark")],
        Listing::Complete,
    )
    .await;
    let ids: Vec<String> = listed(&store, "w", false, 100)
        .await
        .into_iter()
        .map(|r| r.lab_id)
        .collect();
    assert_eq!(ids, ["b", "a", "c"]);
    assert_eq!(
        listed(&store, "w", false, 2).await.len(),
        2,
        "at most the limit"
    );
    assert!(listed(&store, "nobody", false, 100).await.is_empty());
    let r = listed(&store, "w", false, 100).await;
    assert!(
        r.iter().all(|r| r.operation_history.is_empty()),
        "history is not fetched for listings"
    );
}

#[tokio::test]
async fn paging_through_2500_records_returns_each_once() {
    let db = TestDb::new("paging").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    for w in 0..25 {
        let labs = (0..100)
            .map(|i| {
                lab(
                    &format!("lab-{i:03}"),
                    if i % 3 == 0 { "STARTED" } else { "STOPPED" },
                    "t",
                )
            })
            .collect();
        sync(&store, &format!("worker-{w:02}"), labs, Listing::Complete).await;
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<PageCursor> = None;
    let mut pages = 0;
    loop {
        // Through the opaque form, as an API client would.
        let after = cursor
            .as_ref()
            .map(|c| PageCursor::decode(&c.encode()).expect("decode"));
        let page = store
            .list(&LabFilter::default(), after.as_ref(), 97)
            .await
            .expect("page");
        pages += 1;
        for r in &page.records {
            assert!(
                seen.insert((r.worker_id.clone(), r.lab_id.clone())),
                "duplicate {}/{}",
                r.worker_id,
                r.lab_id
            );
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2500);
    assert_eq!(pages, 2500usize.div_ceil(97));

    // A deep page reads a page of the (worker_id, lab_id) index in its order, plus at most the
    // cursor's worker's labs before the cursor: no sort of everything after it (the plan, as
    // the server reports it; 2,000 keys lie after this cursor).
    let deep = PageCursor {
        worker_id: "worker-20".into(),
        lab_id: "lab-050".into(),
    };
    let (filter, sort) = shared::store::list_query(&LabFilter::default(), Some(&deep));
    let explained = db
        .db
        .run_command(bson::doc! {
            "explain": { "find": "lab_records", "filter": filter, "sort": sort, "limit": 98 },
            "verbosity": "executionStats",
        })
        .await
        .expect("explain");
    let stats = explained.get_document("executionStats").expect("stats");
    let examined = stats
        .get("totalKeysExamined")
        .and_then(shared::mongo::as_i64);
    assert!(examined.is_some_and(|n| n <= 98 + 100), "{stats}");
    let winning = explained
        .get_document("queryPlanner")
        .and_then(|q| q.get_document("winningPlan"))
        .expect("plan");
    assert!(!format!("{winning}").contains("\"SORT\""), "{winning}");

    let filter = LabFilter {
        state: Some(LabState::Started),
        worker_id: Some("worker-07".into()),
        ..LabFilter::default()
    };
    let page = store.list(&filter, None, 1000).await.expect("filtered");
    assert_eq!(page.records.len(), 34);
    assert!(page.next.is_none());
    assert!(page
        .records
        .iter()
        .all(|r: &LabRecord| r.fields.state == "STARTED" && r.worker_id == "worker-07"));
}

#[tokio::test]
async fn filter_values_are_never_operators() {
    let db = TestDb::new("injection").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    sync(
        &store,
        "w",
        vec![lab("l1", "STARTED", "A")],
        Listing::Complete,
    )
    .await;
    let filter = LabFilter {
        worker_id: Some("{\"$ne\": null}".into()),
        ..LabFilter::default()
    };
    assert!(store
        .list(&filter, None, 10)
        .await
        .expect("list")
        .records
        .is_empty());
    let filter = LabFilter {
        owner_username: Some("$where".into()),
        ..LabFilter::default()
    };
    assert!(store
        .list(&filter, None, 10)
        .await
        .expect("list")
        .records
        .is_empty());
}

#[tokio::test]
async fn documents_of_the_old_system_are_read_then_upgraded_in_place() {
    let db = TestDb::new("legacy_docs").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    db.db
        .collection::<Document>("lab_records")
        .insert_one(doc! {
            "id": "legacy-id", "worker_id": "w", "lab_id": "l1", "title": "A", "description": "", "notes": "",
            "state": "STOPPED", "owner_username": "admin", "owner_fullname": "", "node_count": 2, "link_count": 1,
            "groups": ["g"], "cml_created_at": "2023-11-14T22:13:20+00:00Z", "modified_at": null,
            "first_seen_at": "2025-11-17T09:00:00+00:00", "last_synced_at": "2025-11-17T12:30:00+00:00",
            // The entry earlier versions wrote on first sight: not a change, so it goes.
            "operation_history": [{ "timestamp": "2025-11-17T09:00:00Z", "previous_state": null,
                                    "new_state": "STOPPED", "changed_fields": {} }],
        })
        .await
        .expect("legacy insert");
    let stored = store.records_for_sync("w").await.expect("lenient read");
    assert_eq!(
        stored[0].fields.cml_created_at,
        Some(DateTime::from_millis(1_700_000_000_000))
    );

    // Two rewrites of the one document: its first-sight entry, its string dates.
    assert_eq!(store.upgrade_legacy_documents().await.expect("upgrade"), 2);
    assert_eq!(
        store.upgrade_legacy_documents().await.expect("idempotent"),
        0
    );
    let raw = db
        .db
        .collection::<Document>("lab_records")
        .find_one(doc! {})
        .await
        .expect("find")
        .expect("exists");
    for key in ["cml_created_at", "first_seen_at", "last_synced_at"] {
        assert!(
            matches!(raw.get(key), Some(Bson::DateTime(_))),
            "{key} is {:?}",
            raw.get(key)
        );
    }
    assert_eq!(
        raw.get_str("id").ok(),
        Some("legacy-id"),
        "an existing record id is kept"
    );
    assert_eq!(
        raw.get_array("operation_history").map(Vec::len).ok(),
        Some(0),
        "the first-sight entry is gone"
    );

    let plan = sync(
        &store,
        "w",
        vec![lab("l1", "STARTED", "A")],
        Listing::Complete,
    )
    .await;
    assert_eq!(plan.counts().updated, 1, "only the state changed: {plan:?}");
    let r = store.lab("w", "l1").await.expect("get").expect("exists");
    assert_eq!(r.fields.state, "STARTED");
    assert_eq!(r.operation_history.len(), 1);
}

#[tokio::test]
async fn a_record_too_large_for_mongodb_is_skipped_and_the_rest_written() {
    for mode in MODES {
        let db = TestDb::new("too_large").await;
        let store = store(&db, mode).await;
        sync(
            &store,
            "w",
            vec![lab("l1", "STOPPED", "A")],
            Listing::Complete,
        )
        .await;
        // Past the 16 MiB document limit (the daemon bounds fields first; this is the backstop).
        let mut huge = lab("l2", "STOPPED", "B");
        huge.fields.notes = "n".repeat(17 * 1024 * 1024);
        let stored = store.records_for_sync("w").await.expect("read");
        let plan = plan_at_tick(
            "w",
            &stored,
            vec![lab("l1", "STARTED", "A"), huge, lab("l3", "STOPPED", "C")],
            Listing::Complete,
        );
        let outcome = store
            .apply(&plan, Term(1))
            .await
            .expect("the other writes go through");
        assert_eq!(
            outcome
                .skipped
                .iter()
                .map(|s| s.lab_id.as_str())
                .collect::<Vec<_>>(),
            ["l2"],
            "{mode:?}"
        );
        assert_eq!(
            (outcome.created, outcome.matched, outcome.conflicts),
            (1, 1, 0),
            "{mode:?}"
        );
        assert_eq!(
            store
                .lab("w", "l1")
                .await
                .expect("get")
                .expect("exists")
                .fields
                .state,
            "STARTED"
        );
        assert!(store.lab("w", "l2").await.expect("get").is_none());
        assert!(store.lab("w", "l3").await.expect("get").is_some());
    }
}

/// A tracked field added to the model after records were written: old records lack it, the
/// upgrade marks them, and the first sync adopts its value — no history entry, no
/// `last_changed_at` (so no event) — while a later change of it is recorded as usual.
#[tokio::test]
async fn a_field_old_records_lack_is_adopted_without_a_change() {
    for mode in MODES {
        let db = TestDb::new("unobserved_field").await;
        let store = store(&db, mode).await;
        sync(
            &store,
            "w",
            vec![lab("l1", "STOPPED", "A"), lab("l2", "STOPPED", "B")],
            Listing::Complete,
        )
        .await;
        let raw = db.db.collection::<Document>("lab_records");
        // As if `groups` had been added to the model since: the stored documents lack it.
        raw.update_many(doc! {}, doc! { "$unset": { "groups": "" } })
            .await
            .expect("unset");
        let before = store.lab("w", "l1").await.expect("get").expect("exists");
        assert_eq!(store.upgrade_legacy_documents().await.expect("upgrade"), 2);
        assert_eq!(
            store.upgrade_legacy_documents().await.expect("idempotent"),
            0
        );
        let marked = store.lab("w", "l1").await.expect("get").expect("exists");
        assert_eq!(marked.unobserved_fields, ["groups"]);

        let mut retitled = lab("l2", "STOPPED", "B2");
        retitled.fields.groups = vec!["g".into()];
        let plan = sync(
            &store,
            "w",
            vec![lab("l1", "STOPPED", "A"), retitled],
            Listing::Complete,
        )
        .await;
        let c = plan.counts();
        assert_eq!((c.unchanged, c.updated), (1, 1), "{plan:?}");
        let l1 = raw
            .find_one(doc! { "lab_id": "l1" })
            .await
            .expect("find")
            .expect("exists");
        assert_eq!(
            l1.get_array("groups").map(Vec::len).ok(),
            Some(1),
            "adopted: {l1}"
        );
        assert!(!l1.contains_key("unobserved_fields"), "{l1}");
        assert_eq!(
            l1.get_array("operation_history").map(Vec::len).ok(),
            Some(0),
            "no change recorded"
        );
        assert_eq!(
            l1.get_datetime("last_changed_at").ok(),
            before.last_changed_at.as_ref(),
            "last_changed_at untouched: no event"
        );
        let l2 = store.lab("w", "l2").await.expect("get").expect("exists");
        let entry = l2.operation_history.last().expect("one entry");
        assert_eq!(
            entry.changed_fields.keys().collect::<Vec<_>>(),
            ["title"],
            "the real change only"
        );

        // From now on a change of the field is a change.
        let mut regrouped = lab("l1", "STOPPED", "A");
        regrouped.fields.groups = vec!["h".into()];
        let plan = sync(
            &store,
            "w",
            vec![regrouped, lab("l2", "STOPPED", "B2")],
            Listing::Complete,
        )
        .await;
        assert_eq!(plan.counts().updated, 1);
        let l1 = store.lab("w", "l1").await.expect("get").expect("exists");
        assert_eq!(
            l1.operation_history.last().map(|e| e
                .changed_fields
                .keys()
                .cloned()
                .collect::<Vec<_>>()),
            Some(vec!["groups".to_owned()])
        );
    }
}

#[tokio::test]
async fn the_readers_of_workers_come_grouped_by_list_with_their_counts() {
    let db = TestDb::new("readers_grouped").await;
    let store = store(&db, BatchWriteMode::Auto).await;
    let rec = |w: &str, lab: &str, readers: &[&str], removed: bool| {
        let mut d = doc! { "worker_id": w, "lab_id": lab, "readers": readers };
        d.insert(
            "removed_at",
            if removed {
                Bson::DateTime(DateTime::now())
            } else {
                Bson::Null
            },
        );
        d
    };
    db.db
        .collection::<Document>("lab_records")
        .insert_many([
            rec("w1", "l1", &["a:w1", "g:w1:g"], false),
            // The same list in another order is the same list.
            rec("w1", "l2", &["g:w1:g", "a:w1"], false),
            rec("w1", "l3", &["a:w1", "u:w1:bob"], false),
            rec("w1", "gone", &["a:w1", "u:w1:eve"], true),
            rec("w2", "l1", &["a:w2"], false),
            rec("w3", "l1", &["a:w3", "u:w3:bob"], false),
        ])
        .await
        .expect("insert");
    let got = store.readers_of_workers(&["w1", "w2"]).await.expect("read");
    let mut w1: Vec<(Vec<String>, usize)> = got["w1"].clone();
    // Lists that differ only in order come as two rows; their counts add up per list.
    let mut merged: Vec<(Vec<String>, usize)> = Vec::new();
    w1.sort();
    for (r, n) in w1 {
        match merged.last_mut() {
            Some((last, m)) if *last == r => *m += n,
            _ => merged.push((r, n)),
        }
    }
    let list = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
    assert_eq!(
        merged,
        vec![
            (list(&["a:w1", "g:w1:g"]), 2),
            (list(&["a:w1", "u:w1:bob"]), 1)
        ]
    );
    assert_eq!(got["w2"], vec![(list(&["a:w2"]), 1)]);
    assert!(!got.contains_key("w3"), "only the workers asked for");
}
