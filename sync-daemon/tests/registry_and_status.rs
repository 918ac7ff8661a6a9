//! The worker registry reader and the sync status writer against a real MongoDB-wire server.

use std::time::Duration;

use bson::{doc, DateTime, Document};
use cml_client::{CmlClient, CmlTarget};
use cml_sim::{FleetConfig, Personality, ServeOptions};
use shared::fence::Term;
use shared::{
    change::PlanCounts,
    config::CmlConfig,
    fleet,
    registry::{Worker, WorkerRegistry},
    secret::Secret,
    status::{SyncCounts, SyncStatusReader},
};
use sync_daemon::status::{StatusUpdate, StatusWriter, WatchUpdate};
use testkit::TestDb;

/// Writes one worker's outcome, as a pass does for all of its workers.
async fn record(status: &StatusWriter, update: StatusUpdate) {
    status.record_many(&[update]).await.expect("status written");
}

#[tokio::test]
async fn only_running_workers_with_an_endpoint_are_active() {
    let db = TestDb::new("registry").await;
    db.db
        .collection::<Document>("cml_workers")
        .insert_many([
            doc! { "id": "w-b", "name": "b", "aws_region": "us-east-1", "status": "running", "service_status": "available", "https_endpoint": "https://10.0.0.2", "private_ip": "10.1.0.2", "instance_type": "m5.xlarge" },
            doc! { "id": "w-a", "name": "a", "aws_region": "eu-west-1", "status": "running", "https_endpoint": "https://10.0.0.1" },
            doc! { "id": "w-stopped", "status": "stopped", "https_endpoint": "https://10.0.0.3" },
            doc! { "id": "w-noaddr", "status": "running", "https_endpoint": null },
            doc! { "id": "w-absent", "status": "running" },
            doc! { "id": "w-blank", "status": "running", "https_endpoint": "  " },
            doc! { "id": "w-pending", "status": "pending", "https_endpoint": "https://10.0.0.4" },
        ])
        .await
        .expect("seed");
    let registry = WorkerRegistry::new(&db.db, "cml_workers");
    let active = registry.active_workers().await.expect("read");
    let ids: Vec<&str> = active.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["w-a", "w-b"]);
    assert_eq!(active[1].private_ip.as_deref(), Some("10.1.0.2"));
    assert_eq!(active[1].aws_region.as_deref(), Some("us-east-1"));
    assert!(registry.worker("w-stopped").await.expect("read").is_some());
    assert!(registry.worker("nope").await.expect("read").is_none());
}

#[tokio::test]
async fn sync_status_counts_failures_and_resets_on_success() {
    let db = TestDb::new("sync_status").await;
    let status = StatusWriter::new(&db.db, "worker_sync_status");
    status.ensure_indexes().await.expect("indexes");
    status.ensure_indexes().await.expect("idempotent");
    let read = SyncStatusReader::new(&db.db, "worker_sync_status");
    let t = |ms: i64| DateTime::from_millis(1_700_000_000_000 + ms);
    let counts = PlanCounts {
        synced: 42,
        created: 2,
        updated: 3,
        unchanged: 37,
        removed: 1,
        reappeared: 1,
    };

    record(
        &status,
        StatusUpdate::failure(
            "w1",
            t(0),
            Duration::from_millis(120),
            "cml_unreachable",
            "CML unreachable: connect timeout",
        ),
    )
    .await;
    record(
        &status,
        StatusUpdate::failure(
            "w1",
            t(1000),
            Duration::from_millis(80),
            "cml_malformed",
            &"x".repeat(5000),
        ),
    )
    .await;
    let s = read.get("w1").await.expect("get").expect("exists");
    assert_eq!(s.consecutive_failures, 2);
    assert_eq!(s.last_success_at, None);
    assert_eq!(s.last_attempt_at, t(1000));
    assert_eq!(
        s.last_error.as_deref().map(str::len),
        Some(1024),
        "error text is capped"
    );
    assert_eq!(s.last_error_kind.as_deref(), Some("cml_malformed"));
    assert_eq!(s.last_counts, None, "never succeeded");

    record(
        &status,
        StatusUpdate::success("w1", t(2000), Duration::from_millis(950), 42, &counts, true),
    )
    .await;
    let s = read.get("w1").await.expect("get").expect("exists");
    assert_eq!(
        (s.consecutive_failures, s.lab_count, s.last_duration_ms),
        (0, 42, 950)
    );
    assert_eq!(s.last_success_at, Some(t(2000)));
    assert_eq!(s.last_activity_at, Some(t(2000)), "a lab changed state");
    assert_eq!((s.last_error, s.last_error_kind), (None, None));
    // A sync of some labs: its own stamp; the cycle's fields stay; activity never goes back.
    record(&status, StatusUpdate::labs_synced("w1", t(2500), false)).await;
    record(&status, StatusUpdate::labs_synced("w1", t(1500), true)).await;
    let s = read.get("w1").await.expect("get").expect("exists");
    assert_eq!(s.last_event_sync_at, Some(t(1500)));
    assert_eq!(s.last_activity_at, Some(t(2000)), "never back");
    assert_eq!((s.last_attempt_at, s.lab_count), (t(2000), 42));
    // What a watch shows, and activity it saw.
    let watch = WatchUpdate {
        worker_id: "w1".into(),
        state: Some(("failing", Some("unreachable"), t(2600))),
        activity: Some(t(2700)),
    };
    status
        .record_watches(&[watch], Term::default())
        .await
        .expect("watches");
    let s = read.get("w1").await.expect("get").expect("exists");
    assert_eq!(
        (
            s.watch_state.as_deref(),
            s.watch_failure.as_deref(),
            s.watch_since
        ),
        (Some("failing"), Some("unreachable"), Some(t(2600)))
    );
    assert_eq!(s.last_activity_at, Some(t(2700)));
    assert_eq!(
        s.last_counts,
        Some(SyncCounts {
            synced: 42,
            created: 2,
            updated: 3,
            unchanged: 37,
            removed: 1,
        })
    );

    record(
        &status,
        StatusUpdate::failure(
            "w1",
            t(3000),
            Duration::from_millis(10),
            "cml_http_status",
            "HTTP 503",
        ),
    )
    .await;
    let s = read.get("w1").await.expect("get").expect("exists");
    assert_eq!(
        (s.consecutive_failures, s.lab_count),
        (1, 42),
        "the last good lab count stays"
    );
    assert_eq!(
        s.last_counts.map(|c| c.synced),
        Some(42),
        "and what the last success did"
    );
    assert_eq!(s.last_success_at, Some(t(2000)));

    record(
        &status,
        StatusUpdate::success("w0", t(0), Duration::ZERO, 0, &PlanCounts::default(), false),
    )
    .await;
    let all: Vec<String> = read
        .fleet_rows()
        .await
        .expect("all")
        .into_iter()
        .map(|s| s.worker_id)
        .collect();
    assert_eq!(all, ["w0", "w1"]);

    // The registry's fields for the fleet view: w1 stopped, w2 never synced.
    let registry = [
        worker("w1", "stopped", "eu-west-1"),
        worker("w2", "running", "us-east-1"),
    ];
    let view = fleet::reconcile(&registry, read.fleet_rows().await.expect("rows"));
    // w0, not listed and synced, already reads as the registry says (meant to be synced).
    let changed: Vec<&str> = view.changes.iter().map(|c| c.worker_id.as_str()).collect();
    assert_eq!(changed, ["w1", "w2"]);
    status
        .record_registry(&view.changes)
        .await
        .expect("written");
    let again = fleet::reconcile(&registry, read.fleet_rows().await.expect("rows"));
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    assert_eq!(again.rows, view.rows, "as written, so read");
    let w1 = &again.rows[1];
    assert_eq!(
        (
            w1.name.as_deref(),
            w1.active,
            w1.consecutive_failures,
            w1.lab_count
        ),
        (Some("cml-w1"), Some(false), 1, 42),
        "the sync's fields kept"
    );
    // w2 has a document, but no sync: never synced, for a reader of one status.
    assert_eq!(again.rows[2].last_attempt_at, None);
    assert!(read.get("w2").await.expect("get").is_none());
    // Its first sync keeps the registry's fields.
    record(
        &status,
        StatusUpdate::failure("w2", t(4000), Duration::ZERO, "cml_timeout", "timed out"),
    )
    .await;
    let w2 = read.get("w2").await.expect("get").expect("synced now");
    assert_eq!((w2.consecutive_failures, w2.last_success_at), (1, None));
    let rows = read.fleet_rows().await.expect("rows");
    assert_eq!(rows[2].name.as_deref(), Some("cml-w2"));
    let n = db
        .db
        .collection::<Document>("worker_sync_status")
        .count_documents(doc! {})
        .await
        .expect("count");
    assert_eq!(n, 3, "one document per worker");
}

fn worker(id: &str, status: &str, region: &str) -> Worker {
    Worker {
        id: id.into(),
        name: Some(format!("cml-{id}")),
        aws_region: Some(region.into()),
        status: Some(status.into()),
        https_endpoint: Some("https://10.0.0.1".into()),
        private_ip: None,
    }
}

#[tokio::test]
async fn the_simulator_registers_its_fleet_for_discovery() {
    let db = TestDb::new("sim_registry").await;
    let f = cml_sim::start(
        &FleetConfig {
            workers: 4,
            labs_per_worker: 2,
            personalities: Personality::ALL.to_vec(),
            ..FleetConfig::default()
        },
        &ServeOptions::default(),
    )
    .await
    .expect("simulator");
    let n = cml_sim::registry::write_registry(
        &db.client,
        db.name(),
        "cml_workers",
        &f.fleet,
        &f.endpoints,
    )
    .await
    .expect("write");
    assert_eq!(n, 4);
    // Idempotent: written again, still one document per worker.
    cml_sim::registry::write_registry(&db.client, db.name(), "cml_workers", &f.fleet, &f.endpoints)
        .await
        .expect("rewrite");
    let active = WorkerRegistry::new(&db.db, "cml_workers")
        .active_workers()
        .await
        .expect("read");
    assert_eq!(active.len(), 4);
    let client = CmlClient::new(&CmlConfig {
        password: Secret::new("local-dev-password"),
        ..CmlConfig::default()
    })
    .expect("client");
    for w in active {
        let endpoint = w.https_endpoint.clone().expect("endpoint");
        assert_eq!(endpoint, f.endpoint(&w.id));
        let listing = client
            .fetch_labs(&CmlTarget {
                worker_id: w.id,
                endpoint,
            })
            .await
            .expect("fetch");
        assert_eq!(listing.labs.len(), 2);
    }
}
