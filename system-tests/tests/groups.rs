//! Lab groups end to end: read from the lab objects (CML 2.4) or from the server's group
//! associations (2.9, 2.10), kept when they cannot be read, and their changes seen as changes.

use std::time::Duration;

use bson::{Bson, Document};
use cml_sim::{EndpointFault, Faults, SimGroup, SimWorker};
use shared::record::LabRecord;
use system_tests::{
    cycles_done, log_lines, metrics, output_text,
    sse::{SseFrame, SseStream},
    Fixture,
};

const WAIT: Duration = Duration::from_secs(30);

/// Shares the lab with exactly these groups, as the simulator's control API does.
fn share(w: &SimWorker, lab_id: &str, names: &[&str]) {
    let groups = names
        .iter()
        .map(|&name| SimGroup {
            id: w.group_named(name),
            name: name.into(),
            permissions: vec!["lab_view".into(), "lab_exec".into()],
        })
        .collect();
    assert!(w.set_lab_groups(lab_id, groups));
}

fn groups_change(r: &LabRecord) -> Option<(Bson, Bson)> {
    r.operation_history
        .last()
        .and_then(|e| e.changed_fields.get("groups"))
        .map(|c| (c.old.clone(), c.new.clone()))
}

fn strings(names: &[&str]) -> Bson {
    Bson::Array(names.iter().map(|&n| Bson::String(n.into())).collect())
}

fn groups_calls(w: &SimWorker) -> u64 {
    w.calls().get("groups").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_release_gives_its_groups_and_a_removed_association_is_a_change() {
    // Workers 0, 1, 2 are CML 2.4, 2.9 and 2.10.
    let f = Fixture::new("groups_releases", 3, 4).await;
    let workers = f.fleet.fleet.workers.clone();
    for w in &workers {
        share(w, &w.lab_ids()[0], &["netops", "students"]);
        w.reset_calls();
    }
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let logs = log_lines(&String::from_utf8_lossy(&out.stderr));
    // Every release: one `groups` call per full sync, its labs' groups taken from it.
    for (w, source, calls) in [
        (&workers[0], "associations", 1),
        (&workers[1], "associations", 1),
        (&workers[2], "associations", 1),
    ] {
        let lab = w.lab_ids()[0].clone();
        let r = f.record(&w.id, &lab).await;
        assert_eq!(
            r.fields.groups,
            ["netops", "students"],
            "{:?}",
            w.personality
        );
        for other in w.lab_ids() {
            assert_eq!(
                f.record(&w.id, &other).await.fields.groups,
                w.lab(&other).expect("lab").group_names()
            );
        }
        assert_eq!(groups_calls(w), calls, "{:?}", w.personality);
        let line = logs
            .iter()
            .find(|l| l["event"] == "worker_synced" && l["worker_id"] == w.id.as_str())
            .expect("worker line");
        assert_eq!(line["groups"], source, "{line}");
        assert_eq!(
            line["cml_calls"].as_u64(),
            Some(4),
            "login, then tiles, users and groups: {line}"
        );
    }

    // One association removed on every worker; nothing else changes (not even `modified`).
    for w in &workers {
        share(w, &w.lab_ids()[0], &["netops"]);
    }
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("updated=1"),
        "{}",
        output_text(&out)
    );
    for (w, calls) in [(&workers[0], 2), (&workers[1], 2), (&workers[2], 2)] {
        let r = f.record(&w.id, &w.lab_ids()[0]).await;
        assert_eq!(r.fields.groups, ["netops"]);
        assert_eq!(r.operation_history.len(), 1);
        let entry = &r.operation_history[0];
        assert_eq!(
            entry.changed_fields.keys().collect::<Vec<_>>(),
            ["groups"],
            "{:?}",
            w.personality
        );
        assert_eq!(
            groups_change(&r),
            Some((strings(&["netops", "students"]), strings(&["netops"])))
        );
        assert_eq!(groups_calls(w), calls, "one per worker sync");
        let status = f.status(&w.id).await;
        assert_eq!(status.get_i64("consecutive_failures").ok(), Some(0));
        assert_eq!(status.get("last_warning_kind"), Some(&Bson::Null));
    }
}

/// Quickest refreshes on demand allowed: one a second.
const REFRESH_EVERY: (&str, &str) = ("CML_LABS_SYNC__REFRESH_MIN_INTERVAL", "1s");

/// `sync-daemon refresh WORKER --wait`, asked again while the last refresh holds it back.
async fn refresh(f: &Fixture, worker_id: &str) {
    testkit::eventually("a refresh is let in and done", WAIT, || async {
        let out = f
            .daemon(&["refresh", worker_id, "--wait", "30s"], &[REFRESH_EVERY])
            .await;
        let text = output_text(&out);
        if out.status.success() {
            return Some(());
        }
        assert!(text.contains("too recently"), "{text}");
        None
    })
    .await
}

/// The warning's fields of a worker's status document.
fn warning(status: &Document) -> (Option<&str>, Option<&str>) {
    (
        status.get_str("last_warning_kind").ok(),
        status.get_str("last_warning").ok(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_groups_are_kept_and_the_sync_succeeds_with_a_warning() {
    let f = Fixture::new("groups_unread", 2, 3).await;
    let w = f.fleet.fleet.workers[1].clone(); // CML 2.9
    let labs = w.lab_ids();
    share(&w, &labs[0], &["netops", "students"]);
    let daemon = f.spawn("daemon", &[REFRESH_EVERY]);
    let admin = daemon.admin_base().await;
    cycles_done(&admin, 1.0).await;
    assert_eq!(
        f.record(&w.id, &labs[0]).await.fields.groups,
        ["netops", "students"]
    );

    // The groups can no longer be read; meanwhile an association goes, a lab is retitled
    // and a new one appears.
    for (fault, says) in [
        (EndpointFault::Status(403), "403"),
        (EndpointFault::Status(503), "503"),
        (EndpointFault::Malformed, "not JSON"),
    ] {
        w.set_faults(Faults {
            endpoint_faults: [("groups".to_owned(), fault.clone())].into(),
            ..Faults::default()
        });
        share(&w, &labs[0], &[]);
        w.update_lab(&labs[1], |l| l.title = format!("retitled {says}"));
        let added = w.create_lab(None);
        share(&w, &added, &["lab-team"]);
        refresh(&f, &w.id).await;

        let kept = f.record(&w.id, &labs[0]).await;
        assert_eq!(
            kept.fields.groups,
            ["netops", "students"],
            "{fault:?}: never emptied because the read failed"
        );
        let retitled = f.record(&w.id, &labs[1]).await;
        assert_eq!(retitled.fields.title, format!("retitled {says}"));
        let entry = retitled.operation_history.last().expect("entry");
        assert!(!entry.changed_fields.contains_key("groups"), "{entry:?}");
        let new = f.record(&w.id, &added).await;
        assert!(new.fields.groups.is_empty());
        assert_eq!(new.unobserved_fields, ["groups"]);

        let status = f.status(&w.id).await;
        assert_eq!(status.get_i64("consecutive_failures").ok(), Some(0));
        assert_eq!(status.get("last_error_kind"), Some(&Bson::Null));
        let (kind, text) = warning(&status);
        assert_eq!(kind, Some("groups_unread"), "{status}");
        assert!(
            text.is_some_and(|t| t.contains(says)),
            "{fault:?}: {status}"
        );
    }
    let text = metrics(&admin).await;
    let count = |name: &str, labels: &[(&str, &str)]| {
        testkit::metrics::value(&text, name, labels).unwrap_or(0.0)
    };
    assert_eq!(
        count("sync_worker_warnings_total", &[("kind", "groups_unread")]),
        3.0,
        "{text}"
    );
    assert_eq!(
        count("sync_worker_syncs_total", &[("outcome", "failure")]),
        0.0
    );
    let unread = daemon.wait_event("groups_unread", 3, WAIT).await;
    assert_eq!(unread[0]["worker_id"], w.id.as_str());
    assert_eq!(unread[0]["kind"], "cml_http_status");
    assert_eq!(unread[2]["kind"], "cml_malformed");

    // Readable again: the removed association is a change, the labs first seen meanwhile
    // adopt their groups without an entry, and the warning is gone.
    w.set_faults(Faults::default());
    refresh(&f, &w.id).await;
    let r = f.record(&w.id, &labs[0]).await;
    assert!(r.fields.groups.is_empty());
    assert_eq!(
        groups_change(&r),
        Some((strings(&["netops", "students"]), strings(&[])))
    );
    let records = f.records().await;
    let adopted: Vec<&LabRecord> = records
        .iter()
        .filter(|r| r.worker_id == w.id && !labs.contains(&r.lab_id))
        .collect();
    assert_eq!(adopted.len(), 3);
    for r in adopted {
        assert_eq!(r.fields.groups, ["lab-team"]);
        assert!(r.unobserved_fields.is_empty());
        assert!(r.operation_history.is_empty(), "adopted, not changed");
    }
    let status = f.status(&w.id).await;
    assert_eq!(warning(&status), (None, None), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_association_is_an_updated_event_naming_the_groups() {
    let f = Fixture::new("groups_events", 3, 2).await;
    let (_api, base) = f.spawn_api("api", &[]).await;
    let w = f.fleet.fleet.workers[2].clone(); // CML 2.10
    let lab = w.lab_ids()[0].clone();
    let url = format!("{base}/api/events/stream?worker_ids={}", w.id);
    let mut stream = SseStream::open(&url, &[])
        .await
        .unwrap_or_else(|r| panic!("the stream was refused: {}", r.status()));
    assert_eq!(stream.expect(WAIT).await.event, "connected");
    let refreshed = |n: usize| {
        move |fs: &[SseFrame]| {
            fs.iter()
                .filter(|f| f.event == "worker.data.refreshed")
                .count()
                >= n
        }
    };
    share(&w, &lab, &["netops"]);
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let first = stream.until(WAIT, refreshed(1)).await;
    assert!(
        first.iter().any(|f| f.event == "worker.labs.updated"),
        "{first:?}"
    );

    share(&w, &lab, &["admins", "netops"]);
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let frames = stream.until(WAIT, refreshed(1)).await;
    let updates: Vec<&SseFrame> = frames
        .iter()
        .filter(|f| f.event == "worker.labs.updated")
        .collect();
    assert_eq!(updates.len(), 1, "{frames:?}");
    let d = updates[0].data();
    assert_eq!(d["lab_id"], lab.as_str());
    assert_eq!(d["action"], "updated");
    assert_eq!(
        d["changed_fields"]["groups"],
        serde_json::json!({ "old": ["netops"], "new": ["admins", "netops"] })
    );
    assert_eq!(d["groups"], serde_json::json!(["admins", "netops"]));
    let keys: Vec<&String> = d["changed_fields"]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(keys, ["groups"], "{d}");
}
