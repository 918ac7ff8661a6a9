//! sync-daemon end to end: the real binary, the MongoDB stand-in (or `MONGODB_URI`) and the
//! simulated CML fleet.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bson::{doc, Bson, DateTime, Document};
use cml_sim::Faults;
use futures::TryStreamExt;
use mongodb::Collection;
use shared::{
    record::REMOVED_STATE,
    sync_request::{Recorded, RequestStore},
};
use system_tests::{
    cycles_done, log_lines, message, metrics, other_state, output_text, wait_metric, Daemon,
    Fixture,
};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_cycle_populates_every_worker_of_a_mixed_version_fleet() {
    let f = Fixture::new("daemon_initial", 3, 8).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let logs = log_lines(&String::from_utf8_lossy(&out.stderr));
    let messages: Vec<&str> = logs.iter().map(message).collect();
    assert!(
        messages.contains(&"Lab record indexes created"),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"Starting labs refresh cycle"),
        "{messages:?}"
    );
    assert_eq!(
        messages
            .iter()
            .filter(|m| m.starts_with("Worker ") && m.contains("synced=8, created=8, updated=0"))
            .count(),
        3,
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Labs refresh complete: synced=24, created=24, updated=0")),
        "{messages:?}"
    );

    let records = f.records().await;
    assert_eq!(records.len(), 24);
    for w in &f.fleet.fleet.workers {
        for lab in w.labs() {
            let r = records
                .iter()
                .find(|r| r.worker_id == w.id && r.lab_id == lab.id)
                .expect("record");
            assert_eq!(
                (r.fields.title.as_str(), r.fields.state.as_str()),
                (lab.title.as_str(), lab.state.as_str())
            );
            assert_eq!(r.fields.node_count as u32, lab.node_count);
            assert!(r.operation_history.is_empty(), "no history before a change");
        }
        let status = f.status(&w.id).await;
        assert_eq!(status.get_i64("consecutive_failures").ok(), Some(0));
        assert_eq!(status.get_i64("lab_count").ok(), Some(8));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_change_gives_one_entry_and_sixty_changes_keep_fifty() {
    let f = Fixture::new("daemon_changes", 1, 3).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let w = f.fleet.fleet.workers[0].clone();
    let lab = w.labs()[0].clone();
    let next = other_state(&lab.state);
    w.update_lab(&lab.id, |l| l.state = next.to_owned());
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let r = f.record(&w.id, &lab.id).await;
    assert_eq!(r.operation_history.len(), 1);
    let e = &r.operation_history[0];
    assert_eq!(e.previous_state.as_deref(), Some(lab.state.as_str()));
    assert_eq!(e.new_state, next);
    assert_eq!(
        e.changed_fields["state"].old,
        Bson::String(lab.state.clone())
    );
    assert_eq!(e.changed_fields["state"].new, Bson::String(next.to_owned()));
    // The other labs did not change: no entries for them.
    for other in w.labs().iter().filter(|l| l.id != lab.id) {
        assert!(f
            .record(&w.id, &other.id)
            .await
            .operation_history
            .is_empty());
    }

    for i in 0..60 {
        w.update_lab(&lab.id, |l| l.title = format!("renamed {i}"));
        let out = f.once(&[]).await;
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let r = f.record(&w.id, &lab.id).await;
    assert_eq!(r.operation_history.len(), 50);
    assert_eq!(r.fields.title, "renamed 59");
    assert_eq!(
        r.operation_history[49].changed_fields["title"].new,
        Bson::String("renamed 59".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_lab_is_tombstoned_comes_back_and_is_purged_later() {
    let f = Fixture::new("daemon_vanish", 1, 4).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let w = f.fleet.fleet.workers[0].clone();
    let lab = w.labs()[0].clone();
    w.delete_lab(&lab.id);
    let out = f.once(&[]).await;
    assert!(
        output_text(&out).contains("removed=1"),
        "{}",
        output_text(&out)
    );
    let r = f.record(&w.id, &lab.id).await;
    assert!(r.removed_at.is_some());
    assert_eq!(
        r.operation_history.last().map(|e| e.new_state.as_str()),
        Some(REMOVED_STATE)
    );

    // Back again: un-marked, with an entry.
    w.create_lab(Some(lab.clone()));
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let r = f.record(&w.id, &lab.id).await;
    assert!(r.removed_at.is_none());
    let last = r.operation_history.last().expect("entry");
    assert_eq!(
        (last.previous_state.as_deref(), last.new_state.as_str()),
        (Some(REMOVED_STATE), lab.state.as_str())
    );

    // Gone for good: purged once past the retention (zero here), the others untouched.
    w.delete_lab(&lab.id);
    let out = f.once(&[("CML_LABS_SYNC__REMOVED_RETENTION", "0s")]).await;
    assert!(
        output_text(&out).contains("purged=1"),
        "{}",
        output_text(&out)
    );
    let records = f.records().await;
    assert_eq!(records.len(), 3);
    assert!(records
        .iter()
        .all(|r| r.lab_id != lab.id && r.removed_at.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_worker_keeps_its_records_and_never_holds_up_the_others() {
    let f = Fixture::new("daemon_faults", 3, 5).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let workers = f.fleet.fleet.workers.clone();
    let (bad, good) = (&workers[0], &workers[1..]);
    let faults = [
        (
            "hang",
            Faults {
                hang: true,
                ..Faults::default()
            },
        ),
        (
            "reset",
            Faults {
                reset: true,
                ..Faults::default()
            },
        ),
        (
            "503",
            Faults {
                error_rate: 1.0,
                error_statuses: vec![503],
                ..Faults::default()
            },
        ),
        (
            "500",
            Faults {
                error_rate: 1.0,
                error_statuses: vec![500],
                ..Faults::default()
            },
        ),
        (
            "malformed",
            Faults {
                malformed_json: true,
                ..Faults::default()
            },
        ),
        (
            "truncated",
            Faults {
                truncated_body: true,
                ..Faults::default()
            },
        ),
        (
            "labs 404",
            Faults {
                bulk_missing: true,
                labs_list_404: true,
                ..Faults::default()
            },
        ),
    ];
    for (round, (name, fault)) in faults.into_iter().enumerate() {
        let before = f
            .records()
            .await
            .into_iter()
            .filter(|r| r.worker_id == bad.id)
            .collect::<Vec<_>>();
        // Labs change everywhere; on the faulty worker one lab disappears and another appears.
        for w in &workers {
            for lab in w.labs() {
                w.update_lab(&lab.id, |l| l.title = format!("{} r{round}", lab.title));
            }
        }
        bad.delete_lab(&bad.lab_ids()[0]);
        bad.create_lab(None);
        bad.set_faults(fault);
        let out = f.once(&[("CML_LABS_CML__REQUEST_TIMEOUT", "1s")]).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: a failed worker makes `once` fail: {}",
            output_text(&out)
        );
        let text = output_text(&out);
        assert!(text.contains("failed_workers=1"), "{name}: {text}");

        let after = f.records().await;
        let bad_after: Vec<_> = after
            .iter()
            .filter(|r| r.worker_id == bad.id)
            .cloned()
            .collect();
        assert_eq!(
            bad_after, before,
            "{name}: the faulty worker's records are untouched"
        );
        for w in good {
            for lab in w.labs() {
                let r = after
                    .iter()
                    .find(|r| r.worker_id == w.id && r.lab_id == lab.id)
                    .expect("record");
                assert_eq!(
                    r.fields.title, lab.title,
                    "{name}: the healthy workers are synced"
                );
            }
        }
        let status = f.status(&bad.id).await;
        assert_eq!(
            status.get_i64("consecutive_failures").ok(),
            Some(1),
            "{name}"
        );
        assert!(
            status.get_str("last_error").is_ok_and(|e| !e.is_empty()),
            "{name}"
        );

        // Healed: the next cycle catches up, the vanished lab included.
        bad.set_faults(Faults::default());
        let out = f.once(&[]).await;
        assert!(out.status.success(), "{name}: {}", output_text(&out));
        assert!(
            output_text(&out).contains("created=1, updated=4, unchanged=0, removed=1"),
            "{name}: {}",
            output_text(&out)
        );
        assert_eq!(
            f.status(&bad.id).await.get_i64("consecutive_failures").ok(),
            Some(0),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_for_one_worker_syncs_only_that_worker() {
    let f = Fixture::new("daemon_once_worker", 3, 2).await;
    let id = f.fleet.fleet.workers[1].id.clone();
    let out = f.once(&[]).await;
    assert!(out.status.success());
    f.db.db
        .collection::<Document>("lab_records")
        .delete_many(bson::doc! {})
        .await
        .expect("clear");
    let mut cmd = tokio::process::Command::from({
        let mut c = system_tests::command("sync-daemon");
        c.args(["once", "--worker", &id]);
        c.env("CML_LABS_MONGODB__URI", &f.db.uri)
            .env("CML_LABS_MONGODB__DATABASE", f.db.name());
        c.env("CML_LABS_CML__PASSWORD", "local-dev-password")
            .env("CML_LABS_TELEMETRY__LOG_FORMAT", "json");
        c
    });
    let out = cmd.output().await.expect("run");
    assert!(out.status.success(), "{}", output_text(&out));
    let records = f.records().await;
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.worker_id == id));

    let mut cmd = tokio::process::Command::from({
        let mut c = system_tests::command("sync-daemon");
        c.args(["once", "--worker", "no-such-worker"]);
        c.env("CML_LABS_MONGODB__URI", &f.db.uri)
            .env("CML_LABS_MONGODB__DATABASE", f.db.name());
        c.env("CML_LABS_CML__PASSWORD", "local-dev-password");
        c
    });
    let out = cmd.output().await.expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("no-such-worker"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_cycle_drains_and_leaves_no_partial_record() {
    let f = Fixture::new("daemon_sigterm", 4, 6).await;
    let workers = f.fleet.fleet.workers.clone();
    // Every CML call waits at the gate: the test knows which syncs are in flight.
    let held = Faults {
        hold: true,
        ..Faults::default()
    };
    for w in &workers {
        w.set_faults(held.clone());
    }
    let mut d = f.spawn(
        "sigterm",
        &[
            ("CML_LABS_SYNC__CONCURRENCY", "2"),
            ("CML_LABS_SYNC__SHUTDOWN_GRACE", "20s"),
        ],
    );
    let contacted = || workers.iter().filter(|w| !w.calls().is_empty()).count();
    testkit::eventually("two workers are being synced", WAIT, || async {
        (contacted() == 2).then_some(())
    })
    .await;
    d.signal(libc::SIGTERM);
    d.wait_event("shutdown_started", 1, WAIT).await;
    // Draining: the two in flight may finish; no other may start.
    for w in &workers {
        w.set_faults(Faults::default());
    }
    let status = d.wait_exit(WAIT).await;
    assert!(status.success(), "clean exit: {status:?}");
    assert_eq!(contacted(), 2, "no worker started after SIGTERM");
    assert_eq!(
        d.events("worker_synced").len(),
        2,
        "the two in flight finished"
    );
    assert_eq!(d.events("lease_released").len(), 1);
    let completed = d.events("cycle_completed");
    assert_eq!(completed[0]["skipped_workers"], 2, "{completed:?}");
    // Workers that ran are complete; the others have nothing. No half-written record.
    let records = f.records().await;
    for w in &workers {
        let n = records.iter().filter(|r| r.worker_id == w.id).count();
        let expected = if w.calls().is_empty() { 0 } else { 6 };
        assert_eq!(n, expected, "worker {} has {n} of 6 records", w.id);
    }
    for r in &records {
        let lab = f
            .fleet
            .fleet
            .worker(&r.worker_id)
            .and_then(|w| w.lab(&r.lab_id))
            .expect("a lab of the fleet");
        assert_eq!(
            (r.fields.title.as_str(), r.fields.state.as_str()),
            (lab.title.as_str(), lab.state.as_str())
        );
        assert!(r.operation_history.is_empty());
        assert!(!r.id.is_empty());
    }
    // The lease was released: another replica may take it at once.
    let lease =
        f.db.db
            .collection::<Document>("sync_lease")
            .find_one(bson::doc! {})
            .await
            .expect("find")
            .expect("lease");
    assert_eq!(
        lease
            .get_datetime("expires_at")
            .ok()
            .map(|d| d.timestamp_millis()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sync_one_at_a_time_and_the_standby_takes_over() {
    let f = Fixture::new("daemon_lease", 2, 2).await;
    let env = [
        ("CML_LABS_SYNC__INTERVAL", "1s"),
        ("CML_LABS_SYNC__LEASE_TTL", "2s"),
    ];
    let mut a = f.spawn("a", &env);
    let a_admin = a.admin_base().await;
    wait_metric(&a_admin, "sync_lease_held", &[], 1.0, WAIT).await;
    let mut b = f.spawn("b", &env);
    let b_admin = b.admin_base().await;
    b.wait_event("lease_standby", 1, WAIT).await;
    cycles_done(&a_admin, 3.0).await;
    let standby = metrics(&b_admin).await;
    assert_eq!(
        testkit::metrics::sum(&standby, "sync_cycles_total"),
        0.0,
        "the standby never syncs while the lease is held: {standby}"
    );
    assert_eq!(
        testkit::metrics::value(&standby, "sync_lease_held", &[]),
        Some(0.0)
    );

    // The holder dies without releasing: the standby takes over once the lease expires.
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(5)).await;
    wait_metric(&b_admin, "sync_lease_held", &[], 1.0, WAIT).await;
    cycles_done(&b_admin, 1.0).await;
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_taking_over_reports_when_the_fleet_last_synced() {
    // A long interval: the new holder keeps the old schedule and runs no cycle of its own, so
    // its last-cycle gauge can only come from the lease.
    let f = Fixture::new("daemon_takeover_gauge", 1, 2).await;
    let env = [
        ("CML_LABS_SYNC__INTERVAL", "1h"),
        ("CML_LABS_SYNC__LEASE_TTL", "2s"),
    ];
    let mut a = f.spawn("a", &env);
    let a_admin = a.admin_base().await;
    cycles_done(&a_admin, 1.0).await;
    let lease = f.db.db.collection::<Document>("sync_lease");
    let ended_at = testkit::eventually("the lease notes the cycle's end", WAIT, || async {
        let doc = lease.find_one(bson::doc! {}).await.ok()??;
        doc.get_datetime("last_cycle_end_at").ok().copied()
    })
    .await;
    let a_gauge = testkit::metrics::value(
        &metrics(&a_admin).await,
        "sync_last_cycle_end_timestamp_seconds",
        &[],
    )
    .expect("a's gauge");
    let mut b = f.spawn("b", &env);
    let b_admin = b.admin_base().await;
    b.wait_event("lease_standby", 1, WAIT).await;
    let standby = metrics(&b_admin).await;
    assert_eq!(
        testkit::metrics::value(&standby, "sync_last_cycle_end_timestamp_seconds", &[]),
        Some(0.0),
        "a standby reports no cycle of its own"
    );

    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(5)).await;
    let noted = ended_at.timestamp_millis() as f64 / 1000.0;
    wait_metric(
        &b_admin,
        "sync_last_cycle_end_timestamp_seconds",
        &[],
        noted,
        WAIT,
    )
    .await;
    let after = metrics(&b_admin).await;
    let b_gauge =
        testkit::metrics::value(&after, "sync_last_cycle_end_timestamp_seconds", &[]).expect("b");
    assert!(
        (b_gauge - a_gauge).abs() < 1.0,
        "the new holder reports the old holder's cycle: {a_gauge} vs {b_gauge}"
    );
    assert_eq!(
        testkit::metrics::sum(&after, "sync_cycles_total"),
        0.0,
        "and ran none itself: {after}"
    );
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_stopped_mid_cycle_and_restarted_is_survived() {
    // This test stops its server, so it always runs on a stand-in of its own.
    let Some(mut server) = testkit::own_stand_in() else {
        return;
    };
    let db = testkit::TestDb::on(&server.uri(), "daemon_mongo_restart").await;
    let f = Fixture::on(db, 3, 4).await;
    for w in &f.fleet.fleet.workers {
        w.set_faults(Faults {
            latency_ms: 300,
            ..Faults::default()
        });
    }
    let mut d = f.spawn(
        "restart",
        &[
            ("CML_LABS_SYNC__INTERVAL", "2s"),
            ("CML_LABS_SYNC__RETRY_BASE", "1s"),
            ("CML_LABS_SYNC__LEASE_TTL", "3s"),
            ("CML_LABS_MONGODB__SERVER_SELECTION_TIMEOUT", "1s"),
        ],
    );
    let admin = d.admin_base().await;
    cycles_done(&admin, 1.0).await;

    let w = f.fleet.fleet.workers[0].clone();
    let lab = w.labs()[0].clone();
    let next = other_state(&lab.state);
    w.update_lab(&lab.id, |l| l.state = next.to_owned());
    // Stop MongoDB while a cycle is in flight (each CML call takes 300 ms).
    d.wait_event("cycle_started", 2, WAIT).await;
    server.stop();
    // Workers fail on MongoDB meanwhile; the daemon lives on.
    wait_metric(
        &admin,
        "sync_worker_failures_total",
        &[("kind", "mongodb")],
        1.0,
        WAIT,
    )
    .await;
    assert!(
        d.child.try_wait().expect("wait").is_none(),
        "still running without MongoDB"
    );
    let clean_before_restart = testkit::metrics::value(
        &metrics(&admin).await,
        "sync_cycles_total",
        &[("outcome", "success")],
    )
    .unwrap_or(0.0);
    server.restart().expect("restart");

    // The change lands once MongoDB is back, without a restart of the daemon.
    testkit::eventually(
        "the change is synced after the restart",
        Duration::from_secs(40),
        || async {
            let record =
                f.db.db
                    .collection::<shared::record::LabRecord>("lab_records")
                    .find_one(bson::doc! { "worker_id": &w.id, "lab_id": &lab.id })
                    .await
                    .ok()
                    .flatten()?;
            (record.fields.state == next).then_some(())
        },
    )
    .await;
    // A clean cycle after the restart.
    cycles_done(&admin, clean_before_restart + 1.0).await;
    assert!(d.child.try_wait().expect("wait").is_none(), "never crashed");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_worker_is_retried_with_backoff_before_the_next_cycle() {
    let f = Fixture::new("daemon_retry", 2, 3).await;
    let bad = f.fleet.fleet.workers[0].clone();
    // Its first eight calls fail, then it answers. A failing sync makes four calls (the logins
    // of its bulk, users and groups calls, made at once, then the login of the per-lab
    // fallback), so the cycle's sync and the first retry fail and the second retry succeeds.
    bad.set_faults(Faults {
        fail_next: 8,
        ..Faults::default()
    });
    let mut d = f.spawn(
        "retry",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1h"),
            ("CML_LABS_SYNC__RETRY_BASE", "1s"),
        ],
    );
    let admin = d.admin_base().await;
    // Healed: both workers synced, the bad one by its second retry.
    wait_metric(
        &admin,
        "sync_worker_syncs_total",
        &[("outcome", "success")],
        2.0,
        WAIT,
    )
    .await;
    let scheduled: Vec<_> = d
        .events("retry_scheduled")
        .into_iter()
        .filter(|l| l["worker_id"] == bad.id.as_str())
        .collect();
    assert_eq!(scheduled.len(), 2, "{scheduled:?}");
    assert_eq!(
        (
            scheduled[0]["failures"].as_u64(),
            scheduled[1]["failures"].as_u64()
        ),
        (Some(1), Some(2))
    );
    // The second delay is a doubled, jittered step: between 1 and 2 times retry_base.
    assert!(
        scheduled[1]["retry_in_ms"]
            .as_u64()
            .is_some_and(|ms| (1000..=2000).contains(&ms)),
        "{:?}",
        scheduled[1]
    );
    // The pass of the second retry closes just after the worker's sync ends.
    d.wait_event("retries_completed", 2, WAIT).await;
    let records = f.records().await;
    assert_eq!(
        records.iter().filter(|r| r.worker_id == bad.id).count(),
        3,
        "synced by a retry, not a cycle"
    );
    assert_eq!(
        d.events("cycle_started").len(),
        1,
        "no extra cycle was needed"
    );
    assert_eq!(
        f.status(&bad.id).await.get_i64("consecutive_failures").ok(),
        Some(0)
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_serves_health_readiness_and_metrics() {
    let f = Fixture::new("daemon_admin", 2, 5).await;
    let mut d = f.spawn("admin", &[("CML_LABS_SYNC__INTERVAL", "1h")]);
    let base = d.admin_base().await;
    cycles_done(&base, 1.0).await;
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http.get(format!("{base}{path}"));
        async move {
            let r = req.send().await.expect("admin answers");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "cml_labs_created_total 10",
        "cml_labs_synced_total 10",
        "sync_worker_syncs_total{outcome=\"success\"} 2",
        "sync_cycles_total{outcome=\"success\"} 1",
        "sync_lease_held 1",
        // Per worker: one login, then populate_lab_tiles, users and groups.
        "cml_requests_total 8",
        "sync_worker_warnings_total{kind=\"groups_unread\"} 0",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }
    assert!(
        text.contains("mongodb_commands_total{command=\"update\"}"),
        "{text}"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_metrics_go_to_the_otlp_endpoint() {
    use std::sync::{Arc, Mutex};
    // A stand-in OTLP/HTTP collector that notes what it receives.
    let received: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let seen = received.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: axum::body::Bytes| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .expect("lock")
                .push((uri.path().to_owned(), body.len()));
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let f = Fixture::new("daemon_otlp", 2, 3).await;
    let mut d = f.spawn(
        "otlp",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1h"),
            ("CML_LABS_TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ],
    );
    d.wait_event("otlp_export_started", 1, WAIT).await;
    cycles_done(&d.admin_base().await, 1.0).await;
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(30)).await.success());
    let got = received.lock().expect("lock").clone();
    let posted = |path: &str| got.iter().any(|(p, len)| p == path && *len > 0);
    assert!(posted("/v1/traces"), "spans exported: {got:?}");
    assert!(posted("/v1/metrics"), "metrics exported: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let f = Fixture::new("daemon_second_signal", 1, 2).await;
    f.fleet.fleet.workers[0].set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let mut d = f.spawn(
        "second_signal",
        &[
            ("CML_LABS_SYNC__SHUTDOWN_GRACE", "60s"),
            ("CML_LABS_CML__REQUEST_TIMEOUT", "60s"),
            ("CML_LABS_SYNC__WORKER_DEADLINE", "120s"),
        ],
    );
    testkit::eventually("the hung worker is called", WAIT, || async {
        (!f.fleet.fleet.workers[0].calls().is_empty()).then_some(())
    })
    .await;
    d.signal(libc::SIGTERM);
    d.wait_event("shutdown_started", 1, WAIT).await;
    assert!(
        d.child.try_wait().expect("wait").is_none(),
        "draining the hung worker"
    );
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_cycle_costs_one_cml_call_per_read_and_two_mongodb_round_trips_per_worker() {
    let f = Fixture::new("daemon_round_trips", 4, 10).await;
    let mut d = f.spawn("round_trips", &[("CML_LABS_SYNC__INTERVAL", "2s")]);
    let base = d.admin_base().await;
    cycles_done(&base, 1.0).await;
    let before = mongodb_commands(&base).await;
    // One lab changes somewhere, the rest stay.
    let w = f.fleet.fleet.workers[1].clone();
    let lab = w.labs()[0].clone();
    w.update_lab(&lab.id, |l| l.title = format!("{} (renamed)", l.title));
    cycles_done(&base, 2.0).await;
    let after = mongodb_commands(&base).await;
    // The line is written just after the counter moves.
    d.wait_event("cycle_completed", 2, WAIT).await;
    assert_eq!(d.events("cycle_completed")[1]["updated"], 1);

    let per_worker: Vec<_> = d
        .events("worker_synced")
        .into_iter()
        .skip(4)
        .take(4)
        .collect();
    assert_eq!(per_worker.len(), 4);
    for l in &per_worker {
        let worker = f
            .fleet
            .fleet
            .worker(l["worker_id"].as_str().expect("worker_id"))
            .expect("worker");
        // The token is reused: populate_lab_tiles, users and groups, on every release.
        assert_eq!(l["cml_calls"], 3, "{:?}: {l}", worker.personality);
        assert_eq!(l["mongodb_writes"], 1, "one write round trip: {l}");
    }
    // Reads: one `find` of its records and one of its accounts per worker (both while CML
    // answers); per cycle, the registry read that lists the workers and the two reads of the
    // fleet gauges (registry and statuses). Unchanged accounts are not written.
    let finds = after.get("find").copied().unwrap_or(0) - before.get("find").copied().unwrap_or(0);
    assert_eq!(finds, 4 + 4 + 1 + 2, "{before:?} -> {after:?}");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}

async fn mongodb_commands(base: &str) -> HashMap<String, u64> {
    testkit::metrics::parse(&metrics(base).await)
        .into_iter()
        .filter(|s| s.name == "mongodb_commands_total")
        .filter_map(|s| Some((s.labels.first()?.1.clone(), s.value as u64)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_taking_over_mid_cycle_syncs_only_the_rest_of_it() {
    let f = Fixture::new("daemon_resume", 4, 2).await;
    let mut ids: Vec<String> = f.fleet.fleet.workers.iter().map(|w| w.id.clone()).collect();
    ids.sort();
    // One at a time in id order: the holder syncs two, then waits at the third's gate.
    let third = f.fleet.fleet.worker(&ids[2]).expect("worker");
    third.set_faults(Faults {
        hold: true,
        ..Faults::default()
    });
    let env = [
        ("CML_LABS_SYNC__INTERVAL", "1h"),
        ("CML_LABS_SYNC__LEASE_TTL", "2s"),
        ("CML_LABS_SYNC__CONCURRENCY", "1"),
    ];
    let mut a = f.spawn("a", &env);
    a.wait_event("worker_synced", 2, WAIT).await;
    testkit::eventually("the third worker is being synced", WAIT, || async {
        (!third.calls().is_empty()).then_some(())
    })
    .await;
    let b = f.spawn("b", &env);
    b.wait_event("lease_standby", 1, WAIT).await;
    a.signal(libc::SIGKILL);
    a.wait_exit(WAIT).await;
    let resumed = b.wait_event("cycle_resumed", 1, WAIT).await;
    assert!(
        resumed[0]["workers"] == 2 && resumed[0]["already_synced"] == 2,
        "{resumed:?}"
    );
    third.set_faults(Faults::default());
    let done = b.wait_event("cycle_completed", 1, WAIT).await;
    assert_eq!(done[0]["workers"], 2, "{done:?}");
    let synced: Vec<String> = b
        .events("worker_synced")
        .iter()
        .filter_map(|l| l["worker_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        synced,
        ids[2..],
        "only the workers the dead holder did not reach"
    );
    assert_eq!(
        b.events("cycle_started").len(),
        0,
        "no new cycle: the schedule is kept"
    );
    // Every worker has its records.
    let records = f.records().await;
    for id in &ids {
        assert_eq!(
            records.iter().filter(|r| &r.worker_id == id).count(),
            2,
            "{id}"
        );
    }
}

/// The stamps of worker `w`'s records, by lab id.
async fn stamps(records: &Collection<Document>, w: &str) -> HashMap<String, DateTime> {
    let docs: Vec<Document> = records
        .find(doc! { "worker_id": w })
        .projection(doc! { "lab_id": 1, "last_synced_at": 1 })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("records");
    docs.iter()
        .filter_map(|d| {
            Some((
                d.get_str("lab_id").ok()?.to_owned(),
                *d.get_datetime("last_synced_at").ok()?,
            ))
        })
        .collect()
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) state ...`: the state follows the last `)`.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}

/// The freeze scenario, round after round with the roles swapped: the lease holder syncs a
/// worker one of whose labs went, plans (every other record to be stamped), and is frozen
/// (SIGSTOP) while it checks the id list; the standby takes the lease over once it expires
/// and syncs that worker itself; then the frozen holder resumes and writes the plan it made
/// before. Its writes carry the old term and change nothing: no stamp ever goes back (a
/// watcher reads them all along), every record and the status carry the new holder's term,
/// and every record is what the new holder read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_frozen_past_its_lease_changes_nothing_when_it_resumes() {
    const ROUNDS: usize = 8;
    let f = Fixture::new("daemon_fenced", 2, 100).await;
    let env = [
        ("CML_LABS_SYNC__INTERVAL", "1h"),
        ("CML_LABS_SYNC__LEASE_TTL", "2s"),
        ("CML_LABS_SYNC__REFRESH_MIN_INTERVAL", "1s"),
        // The frozen holder's call must not time out when it resumes.
        ("CML_LABS_CML__REQUEST_TIMEOUT", "60s"),
    ];
    let a = f.spawn("a", &env);
    wait_metric(&a.admin_base().await, "sync_lease_held", &[], 1.0, WAIT).await;
    a.wait_event("cycle_completed", 1, WAIT).await;
    let b = f.spawn("b", &env);
    b.wait_event("lease_standby", 1, WAIT).await;
    let w = f.fleet.fleet.workers[0].clone();
    let requests = RequestStore::new(&f.db.db, "sync_requests");
    let records = f.db.db.collection::<Document>("lab_records");

    // Every stamp, read again and again: none may ever go back.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (records, w, stop) = (records.clone(), w.id.clone(), stop.clone());
        async move {
            let mut seen: HashMap<String, DateTime> = HashMap::new();
            let (mut reads, mut backwards) = (0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                for (lab, at) in stamps(&records, &w).await {
                    match seen.get(&lab) {
                        Some(before) if at < *before => backwards.push((lab, *before, at)),
                        Some(before) if at == *before => {}
                        _ => {
                            seen.insert(lab, at);
                        }
                    }
                }
                reads += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (reads, backwards)
        }
    });

    let daemons = [a, b];
    for round in 0..ROUNDS {
        let label = format!("round {round}");
        // One lab goes: the holder's sync plans to stamp the rest and to remove it, and checks
        // the id list (held here) before it writes.
        w.set_faults(Faults {
            hold_endpoint: Some("labs".into()),
            ..Faults::default()
        });
        let checks = w.calls().get("labs").copied().unwrap_or(0);
        let gone = w.lab_ids()[0].clone();
        assert!(w.delete_lab(&gone));
        let request = testkit::eventually(&format!("{label}: a refresh"), WAIT, || async {
            let id = format!("fence-{}", DateTime::now().timestamp_millis());
            match requests
                .record(id, &w.id, DateTime::now(), Duration::from_secs(1))
                .await
                .expect("record")
            {
                Recorded::Accepted(r) => Some(r.id),
                Recorded::Throttled { .. } => None,
            }
        })
        .await;
        // The holder's call for the id list waits at the gate: its sync cannot have written.
        testkit::eventually(
            &format!("{label}: the id list is asked for and held"),
            WAIT,
            || async { (w.held_calls("labs") == 1).then_some(()) },
        )
        .await;
        let held_at = DateTime::now();
        assert!(w.calls().get("labs").copied().unwrap_or(0) > checks);
        // The holder is the replica serving the request: the roles usually swap each round,
        // but a renewal late on a loaded machine may have moved the lease (its TTL is 2 s).
        let serving = |d: &Daemon| {
            d.events("refresh_started")
                .iter()
                .any(|l| l["request_id"] == request.as_str())
        };
        let holder = testkit::eventually(&format!("{label}: who serves it"), WAIT, || async {
            daemons.iter().position(serving)
        })
        .await;
        let standby = 1 - holder;
        let admin = daemons[holder].admin_base().await;
        // Its updates so far: the sync it is in and its status write will add two.
        let updates = mongodb_commands(&admin)
            .await
            .get("update")
            .copied()
            .unwrap_or(0);
        daemons[holder].signal(libc::SIGSTOP);
        // kill() returns before every thread has stopped: one still running could take the
        // answer released below and write within its lease. Released only once all are.
        let pid = daemons[holder].child.id().expect("running");
        testkit::eventually(&format!("{label}: the holder is stopped"), WAIT, || async {
            all_threads_stopped(pid).then_some(())
        })
        .await;
        let frozen_at = DateTime::now();
        w.set_faults(Faults::default());

        // The standby takes over (the lease expires), takes the request back and serves it.
        testkit::eventually(&format!("{label}: served by the standby"), WAIT, || async {
            let r = requests.get(&request).await.expect("read")?;
            r.status.is_finished().then_some(())
        })
        .await;
        let lease =
            f.db.db
                .collection::<Document>("sync_lease")
                .find_one(doc! {})
                .await
                .expect("lease")
                .expect("exists");
        let term = lease.get_i64("term").expect("a term");
        let before = stamps(&records, &w.id).await;
        let taken_over = |d: &Daemon| {
            d.events("refresh_finished")
                .iter()
                .filter(|l| l["outcome"] == "taken_over")
                .count()
        };
        let (was_taken_over, syncs) = (
            taken_over(&daemons[holder]),
            daemons[holder].events("worker_synced").len(),
        );

        // The frozen holder resumes: its sync ends and is written, under its old term.
        daemons[holder].signal(libc::SIGCONT);
        testkit::eventually(
            &format!("{label}: the old holder finished"),
            WAIT,
            || async {
                let d = &daemons[holder];
                (taken_over(d) > was_taken_over && d.events("worker_synced").len() > syncs)
                    .then_some(())
            },
        )
        .await;
        let stale = daemons[holder]
            .events("worker_synced")
            .into_iter()
            .rfind(|l| l["worker_id"] == w.id.as_str())
            .expect("its sync");
        // On failure, both daemons' last lines tell which path the round took (who claimed
        // the request, when each lost or took the lease, how long the frozen sync took).
        let story = || {
            let messages = |d: &Daemon| {
                d.lines()
                    .iter()
                    .rev()
                    .take(25)
                    .rev()
                    .map(|l| format!("  {} {}", l["timestamp"], message(l)))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            format!(
                "held at {held_at:?}, frozen at {frozen_at:?}; the simulator's calls: {:?}\n\
                 holder's log:\n{}\nstandby's log:\n{}",
                w.calls(),
                messages(&daemons[holder]),
                messages(&daemons[standby])
            )
        };
        assert!(
            stale["conflicts"].as_u64() >= Some(1),
            "{label}: {stale}\n{}",
            story()
        );
        // Its status write comes from its books, after the sync's own write.
        testkit::eventually(
            &format!("{label}: the old holder wrote its status"),
            WAIT,
            || async {
                let now = mongodb_commands(&admin).await.get("update").copied();
                (now.unwrap_or(0) >= updates + 2).then_some(())
            },
        )
        .await;

        let after = stamps(&records, &w.id).await;
        assert_eq!(after, before, "{label}: the old holder changed no stamp");
        let stored: Vec<Document> = records
            .find(doc! { "worker_id": &w.id })
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("records");
        for r in &stored {
            let lab = r.get_str("lab_id").expect("lab_id");
            // Written this round by the new holder (tombstones of earlier rounds are not).
            if w.lab(lab).is_some() || lab == gone {
                assert_eq!(r.get_i64("sync_term"), Ok(term), "{label}: {r}");
            }
            match w.lab(lab) {
                Some(l) => assert_eq!(
                    (r.get_str("title"), r.get("removed_at")),
                    (Ok(l.title.as_str()), Some(&Bson::Null)),
                    "{label}: {r}"
                ),
                None => assert!(r.get_datetime("removed_at").is_ok(), "{label}: {r}"),
            }
        }
        let status = f.status(&w.id).await;
        assert_eq!(status.get_i64("sync_term"), Ok(term), "{label}: {status}");
        assert_eq!(
            status.get_i64("lab_count"),
            Ok(w.lab_ids().len() as i64),
            "{label}: {status}"
        );
        assert!(
            !daemons[standby].events("lease_acquired").is_empty(),
            "{label}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let (reads, backwards) = watcher.await.expect("watcher");
    assert!(reads > 10, "the watcher read {reads} times");
    assert!(backwards.is_empty(), "stamps went back: {backwards:?}");
    eprintln!("{ROUNDS} freezes: {reads} reads of every stamp, none went back");
}
