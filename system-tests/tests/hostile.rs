//! sync-daemon against CML servers that misbehave or are hostile, end to end: the real binary,
//! the simulator, MongoDB. One bad server never hurts the others, the daemon, or the records.

use std::time::Duration;

use cml_sim::Faults;
use serde_json::Value;
use shared::record::TRUNCATED;
use system_tests::{cycles_done, log_lines, output_text, wait_metric, Fixture};

const WAIT: Duration = Duration::from_secs(60);
/// The daemon's memory limit in the Kubernetes manifests (k8s/base/sync-daemon.yaml).
const POD_LIMIT_KIB: u64 = 256 * 1024;

fn events(out: &std::process::Output, event: &str) -> Vec<Value> {
    log_lines(&String::from_utf8_lossy(&out.stderr))
        .into_iter()
        .filter(|l| l["event"] == event)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_server_fails_alone_and_never_gets_the_password_sent_elsewhere() {
    let other = testkit::origin::Origin::start(serde_json::json!("a-stolen-token")).await;
    let elsewhere = &other.url;
    let f = Fixture::new("hostile_redirect", 2, 3).await;
    let (bad, good) = (&f.fleet.fleet.workers[0], &f.fleet.fleet.workers[1]);
    bad.set_faults(Faults {
        redirect_login_to: Some(format!("{elsewhere}/api/v0/authenticate")),
        ..Faults::default()
    });
    let out = f.once(&[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let failed = events(&out, "worker_sync_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["worker_id"], bad.id.as_str());
    assert_eq!(failed[0]["kind"], "cml_redirect");
    let records = f.records().await;
    assert_eq!(records.iter().filter(|r| r.worker_id == good.id).count(), 3);
    assert!(records.iter().all(|r| r.worker_id != bad.id));
    assert_eq!(
        other.requests(),
        Vec::<String>::new(),
        "nothing reached the other origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_answer_fails_its_worker_within_the_pods_memory() {
    let f = Fixture::new("hostile_huge_body", 2, 3).await;
    let mut d = f.spawn("huge_body", &[("CML_LABS_SYNC__INTERVAL", "2s")]);
    let admin = d.admin_base().await;
    cycles_done(&admin, 1.0).await;
    let bad = f.fleet.fleet.workers[0].clone();
    let before: Vec<_> = f
        .records()
        .await
        .into_iter()
        .filter(|r| r.worker_id == bad.id)
        .collect();
    // Its next answer is 200 MiB; and a lab changed, which must not be written meanwhile.
    bad.set_faults(Faults {
        tiles_padding_bytes: 200 * 1024 * 1024,
        ..Faults::default()
    });
    bad.update_lab(&bad.lab_ids()[0], |l| l.title = "changed".into());
    wait_metric(
        &admin,
        "sync_worker_failures_total",
        &[("kind", "cml_too_large")],
        1.0,
        WAIT,
    )
    .await;
    let peak_kib = peak_rss_kib(&d);
    eprintln!(
        "sync-daemon peak RSS after a 200 MiB answer: {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib < POD_LIMIT_KIB, "peak RSS {peak_kib} KiB");
    let after: Vec<_> = f
        .records()
        .await
        .into_iter()
        .filter(|r| r.worker_id == bad.id)
        .collect();
    assert_eq!(
        after, before,
        "the failing worker's records are as they were"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}

fn peak_rss_kib(d: &system_tests::Daemon) -> u64 {
    let pid = d.child.id().expect("running");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_lab_is_cut_and_its_worker_synced() {
    let f = Fixture::new("hostile_oversized", 1, 3).await;
    let w = f.fleet.fleet.workers[0].clone();
    let ids = w.lab_ids();
    // A 10 MB title, and 4 MB of notes that change twice (history keeps old and new).
    w.update_lab(&ids[0], |l| l.title = "t".repeat(10 * 1024 * 1024));
    w.update_lab(&ids[1], |l| l.notes = "a".repeat(4 * 1024 * 1024));
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let cut = events(&out, "fields_truncated");
    assert_eq!(cut.len(), 2, "{cut:?}");
    for (i, fill) in ["b", "c"].into_iter().enumerate() {
        w.update_lab(&ids[1], |l| l.notes = fill.repeat(4 * 1024 * 1024));
        let out = f.once(&[]).await;
        assert!(out.status.success(), "change {i}: {}", output_text(&out));
    }
    let title = f.record(&w.id, &ids[0]).await.fields.title;
    assert!(
        title.ends_with(TRUNCATED) && title.chars().count() == 1024,
        "{}",
        title.len()
    );
    let notes = f.record(&w.id, &ids[1]).await;
    assert!(notes.fields.notes.starts_with('c') && notes.fields.notes.ends_with(TRUNCATED));
    assert_eq!(notes.operation_history.len(), 2, "both changes recorded");
    let status = f.status(&w.id).await;
    assert_eq!(status.get_i64("consecutive_failures").ok(), Some(0));
    assert_eq!(
        status.get_i64("lab_count").ok(),
        Some(3),
        "every lab written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_tile_map_wipes_nothing_and_a_real_removal_still_lands() {
    let f = Fixture::new("hostile_empty_tiles", 1, 4).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let w = f.fleet.fleet.workers[0].clone();
    w.set_faults(Faults {
        empty_tiles: true,
        ..Faults::default()
    });
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let checked = events(&out, "removals_checked");
    assert_eq!(
        (
            checked[0]["planned"].as_u64(),
            checked[0]["confirmed"].as_u64()
        ),
        (Some(4), Some(0)),
        "{checked:?}"
    );
    assert!(f.records().await.iter().all(|r| r.removed_at.is_none()));
    // A lab really deleted (the tile map still empty): only it goes.
    let gone = w.lab_ids()[0].clone();
    w.delete_lab(&gone);
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let records = f.records().await;
    let removed: Vec<&str> = records
        .iter()
        .filter(|r| r.removed_at.is_some())
        .map(|r| r.lab_id.as_str())
        .collect();
    assert_eq!(removed, [gone.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_a_server_sends_is_clipped_in_the_logs() {
    let f = Fixture::new("hostile_long_errors", 1, 2).await;
    f.fleet.fleet.workers[0].set_faults(Faults {
        error_rate: 1.0,
        error_statuses: vec![500],
        error_description_bytes: 5 * 1024 * 1024,
        ..Faults::default()
    });
    let out = f.once(&[]).await;
    assert_eq!(out.status.code(), Some(1));
    let longest = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert_eq!(
        events(&out, "worker_sync_failed")[0]["kind"],
        "cml_http_status"
    );
}

/// Lab ids that would walk the API's path (`.`, `..`) are refused wherever they come from (the
/// tile map, the id list, a stream message): never asked for, never stored, counted and
/// logged. A lab object naming another lab than the one asked for is not written either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_ids_that_walk_the_api_path_are_refused_wherever_they_come_from() {
    let f = Fixture::new("hostile_lab_ids", 2, 3).await;
    let w = f.fleet.fleet.workers[1].clone();
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    // What a sync may change of a record: its lab, its fields, whether it is removed.
    let kept = |records: Vec<shared::record::LabRecord>| -> Vec<_> {
        records
            .into_iter()
            .map(|r| (r.worker_id, r.lab_id, r.fields, r.removed_at.is_some()))
            .collect()
    };
    let before = kept(f.records().await);
    let misnamed = w.lab_ids()[0].clone();
    for id in [".", ".."] {
        let mut lab = w.lab(&misnamed).expect("a lab");
        lab.id = id.into();
        w.create_lab(Some(lab));
    }
    let mut faults = Faults {
        lab_named_as: Some((misnamed.clone(), "api-root".into())),
        ..Faults::default()
    };
    w.set_faults(faults.clone());
    assert!(w.update_lab(&misnamed, |l| l.title = "not written".into()));
    // The tile map, then the id list with each lab read alone.
    for bulk_missing in [false, true] {
        faults.bulk_missing = bulk_missing;
        w.set_faults(faults.clone());
        w.reset_calls();
        let out = f.once(&[]).await;
        assert!(out.status.success(), "{}", output_text(&out));
        let refused = events(&out, "lab_ids_refused");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0]["count"], 3, "{refused:?}");
        assert_eq!(refused[0]["source"], "listing");
        assert_eq!(
            kept(f.records().await),
            before,
            "nothing written, nothing removed (bulk_missing: {bulk_missing})"
        );
        if bulk_missing {
            // The plausible labs were read one by one; `.` and `..` never asked for.
            assert_eq!(w.calls().get("lab"), Some(&3), "{:?}", w.calls());
        }
    }

    // A stream message naming `..`: counted, logged, nothing read.
    w.set_faults(Faults::default());
    let d = f.spawn(
        "daemon",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1h"),
            ("CML_LABS_SYNC__EVENTS__ENABLED", "true"),
        ],
    );
    let admin = d.admin_base().await;
    wait_metric(
        &admin,
        "sync_event_watches",
        &[("state", "live")],
        1.0,
        WAIT,
    )
    .await;
    w.reset_calls();
    w.send_stream_message(r#"{"event_type":"lab_event","event":"created","lab_id":".."}"#);
    wait_metric(
        &admin,
        "sync_lab_ids_refused_total",
        &[("source", "stream")],
        1.0,
        WAIT,
    )
    .await;
    let from_stream: Vec<Value> = d
        .events("lab_ids_refused")
        .into_iter()
        .filter(|l| l["source"] == "stream")
        .collect();
    assert_eq!(from_stream.len(), 1, "{from_stream:?}");
    assert_eq!(w.calls().get("lab"), None, "{:?}", w.calls());
    assert!(f.records().await.iter().all(|r| r.lab_id != "api-root"));
}
