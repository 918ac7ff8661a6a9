//! Live sync from CML's event streams (`/ws/ui`), end to end: the real daemon watching the
//! simulator's 2.9/2.10 workers (2.4 has no stream), the stand-in, lab-api's SSE. The periodic
//! cycle is an hour away in every test: whatever happens here happens because of the streams.

use std::{sync::Arc, time::Duration};

use cml_sim::{Faults, SimWorker, WsHostile};
use shared::record::LabRecord;
use system_tests::{metrics, sse::SseStream, wait_metric, Daemon, Fixture};

const WAIT: Duration = Duration::from_secs(30);

/// The daemon's settings in these tests: one cycle at start, the next an hour later.
const QUIET: [(&str, &str); 2] = [
    ("CML_LABS_SYNC__INTERVAL", "1h"),
    ("CML_LABS_SYNC__EVENTS__ENABLED", "true"),
];

fn calls(w: &SimWorker, endpoint: &str) -> u64 {
    w.calls().get(endpoint).copied().unwrap_or(0)
}

/// Starts a daemon and waits until its first cycle is done and every worker with a stream is
/// watched live and relisted (`live` watches, and as many relists ended).
async fn started(f: &Fixture, name: &str, extra: &[(&str, &str)]) -> (Daemon, String) {
    let mut env = QUIET.to_vec();
    env.extend_from_slice(extra);
    let d = f.spawn(name, &env);
    let admin = d.admin_base().await;
    let streams = streaming(f).len() as f64;
    wait_metric(
        &admin,
        "sync_cycles_total",
        &[("outcome", "success")],
        1.0,
        WAIT,
    )
    .await;
    wait_metric(
        &admin,
        "sync_event_watches",
        &[("state", "live")],
        streams,
        WAIT,
    )
    .await;
    testkit::eventually("the relists ended", WAIT, || async {
        let relisted = d
            .events("worker_synced")
            .iter()
            .filter(|l| l["spans"].to_string().contains("\"relist\":true"))
            .count();
        (relisted as f64 >= streams).then_some(())
    })
    .await;
    (d, admin)
}

/// The workers whose servers have an event stream (CML 2.6+: the 2.9 and 2.10 ones).
fn streaming(f: &Fixture) -> Vec<&Arc<SimWorker>> {
    f.fleet
        .fleet
        .workers
        .iter()
        .filter(|w| w.has_event_stream())
        .collect()
}

async fn record_where(
    f: &Fixture,
    worker: &str,
    lab: &str,
    what: &str,
    done: impl Fn(&LabRecord) -> bool,
) -> LabRecord {
    testkit::eventually(what, WAIT, || async {
        let r = f
            .records()
            .await
            .into_iter()
            .find(|r| r.worker_id == worker && r.lab_id == lab)?;
        done(&r).then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_changed_on_cml_is_in_its_record_and_on_the_stream_at_once_for_one_call() {
    // Workers 0, 1, 2 are CML 2.4, 2.9 and 2.10.
    let f = Fixture::new("events_changes", 3, 5).await;
    let (_api, base) = f.spawn_api("api", &[]).await;
    let (d, admin) = started(&f, "daemon", &[]).await;
    let w = f.fleet.fleet.workers[2].clone();
    let url = format!("{base}/api/events/stream?worker_ids={}", w.id);
    let mut sse = SseStream::open(&url, &[])
        .await
        .unwrap_or_else(|r| panic!("the stream was refused: {}", r.status()));
    assert_eq!(sse.expect(WAIT).await.event, "connected");
    w.reset_calls();
    let untouched: Vec<LabRecord> = f
        .records()
        .await
        .into_iter()
        .filter(|r| r.worker_id == w.id)
        .collect();

    // A state change: the record, its history and an SSE state_changed, for one call.
    let lab = w.lab_ids()[0].clone();
    let before = w.lab(&lab).expect("lab").state;
    let after = system_tests::other_state(&before);
    assert!(w.update_lab(&lab, |l| l.state = after.into()));
    let r = record_where(&f, &w.id, &lab, "the new state", |r| {
        r.fields.state == after
    })
    .await;
    assert_eq!(r.operation_history.len(), 1, "{r:?}");
    assert_eq!(
        r.operation_history[0].previous_state.as_deref(),
        Some(before.as_str())
    );
    let frames = sse
        .until(WAIT, |fs| {
            fs.iter().any(|f| f.event == "worker.labs.updated")
        })
        .await;
    let update = frames.last().expect("frame");
    assert_eq!(update.data()["action"], "state_changed", "{update:?}");
    assert_eq!(update.data()["lab_id"], lab.as_str());
    assert_eq!(calls(&w, "lab"), 1, "{:?}", w.calls());
    assert_eq!(calls(&w, "populate_lab_tiles"), 0, "{:?}", w.calls());

    // A new title, a new lab, a deleted lab, a node added.
    let title = "Renamed from CML".to_owned();
    assert!(w.update_lab(&lab, |l| l.title.clone_from(&title)));
    record_where(&f, &w.id, &lab, "the new title", |r| {
        r.fields.title == title
    })
    .await;
    let new = w.create_lab(None);
    record_where(&f, &w.id, &new, "the new lab", |_| true).await;
    let gone = w
        .lab_ids()
        .into_iter()
        .find(|id| *id != lab && *id != new)
        .expect("one more");
    assert!(w.delete_lab(&gone));
    record_where(&f, &w.id, &gone, "the deleted lab's tombstone", |r| {
        r.removed_at.is_some()
    })
    .await;
    let nodes = w.lab(&lab).expect("lab").node_count;
    assert!(w.update_lab(&lab, |l| l.node_count += 1));
    record_where(&f, &w.id, &lab, "one more node", |r| {
        i64::from(r.fields.node_count) == i64::from(nodes) + 1
    })
    .await;
    // None of that read the worker's listing; a lab no event named was not written at all.
    assert_eq!(calls(&w, "populate_lab_tiles"), 0, "{:?}", w.calls());
    for before in untouched
        .iter()
        .filter(|r| r.lab_id != lab && r.lab_id != gone)
    {
        let now = record_where(&f, &w.id, &before.lab_id, "a lab no event named", |_| true).await;
        assert_eq!(
            (now.last_synced_at, now.removed_at),
            (before.last_synced_at, None),
            "{}",
            before.lab_id
        );
    }
    // Each of the five written, and its lag from the event observed (the last pass closes
    // just after its record is written).
    wait_metric(
        &admin,
        "sync_worker_syncs_started_total",
        &[("trigger", "event")],
        5.0,
        WAIT,
    )
    .await;
    wait_metric(&admin, "sync_event_lag_seconds_count", &[], 5.0, WAIT).await;
    let status = f.status(&w.id).await;
    assert_eq!(status.get_str("watch_state"), Ok("live"), "{status}");
    assert!(
        status.get_datetime("last_event_sync_at").is_ok(),
        "{status}"
    );
    assert!(status.get_datetime("last_activity_at").is_ok(), "{status}");
    // The 2.4 worker has no stream: it is polled, and its upgrade was tried once.
    let old = &f.fleet.fleet.workers[0];
    assert_eq!(
        f.status(&old.id).await.get_str("watch_state"),
        Ok("polling")
    );
    assert_eq!(calls(old, "ws_ui"), 1, "{:?}", old.calls());
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_state_changes_and_stats_cost_no_call_and_a_burst_of_changes_is_coalesced() {
    let f = Fixture::new("events_quiet", 2, 4).await;
    let (_d, admin) = started(
        &f,
        "daemon",
        &[("CML_LABS_SYNC__EVENTS__COALESCE", "500ms")],
    )
    .await;
    let w = f.fleet.fleet.workers[1].clone(); // CML 2.9
    w.reset_calls();
    let lab = w.lab_ids()[0].clone();
    assert!(w.update_lab(&lab, |l| l.node_count = l.node_count.max(5)));
    record_where(&f, &w.id, &lab, "five nodes", |r| r.fields.node_count >= 5).await;
    w.reset_calls();
    let messages = |text: &str, kind: &str| {
        testkit::metrics::value(text, "sync_event_messages_total", &[("kind", kind)]).unwrap_or(0.0)
    };
    let before = metrics(&admin).await;
    // 50 node state changes, and stats for 10 s: nothing a record keeps.
    let mut sent = 0;
    for state in ["STOPPED", "BOOTED"].iter().cycle().take(10) {
        sent += w.change_node_states(&lab, state);
    }
    assert!(sent >= 50, "{sent}");
    let text = wait_metric(
        &admin,
        "sync_event_messages_total",
        &[("kind", "state_change")],
        messages(&before, "state_change") + sent as f64,
        WAIT,
    )
    .await;
    testkit::eventually("10 s of stats", WAIT, || async {
        let now = metrics(&admin).await;
        (messages(&now, "system_stats") >= messages(&text, "system_stats") + 3.0).then_some(())
    })
    .await;
    assert_eq!(
        w.calls(),
        Default::default(),
        "no CML call for node states and stats"
    );

    // A burst of 20 lab events within the coalescing window: one sync of that lab.
    for i in 0..20 {
        assert!(w.update_lab(&lab, |l| l.title = format!("burst {i}")));
    }
    record_where(&f, &w.id, &lab, "the last title", |r| {
        r.fields.title == "burst 19"
    })
    .await;
    assert!(
        calls(&w, "lab") <= 2,
        "20 events, coalesced: {:?}",
        w.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_the_stream_was_down_is_caught_by_the_relist() {
    let f = Fixture::new("events_relist", 2, 3).await;
    // The relist of the break follows the start's: spaced by a second, not the minute a
    // production fleet is given.
    let (d, admin) = started(
        &f,
        "daemon",
        &[("CML_LABS_SYNC__EVENTS__RELIST_MIN_INTERVAL", "1s")],
    )
    .await;
    let w = f.fleet.fleet.workers[1].clone();
    let lab = w.lab_ids()[0].clone();
    // No stream to tell: the change is made with every socket refused for a while.
    w.set_faults(Faults {
        hold_endpoint: Some("ws_ui".into()),
        ..Faults::default()
    });
    w.drop_streams();
    reopened(&admin, "dropped", 1.0).await;
    let title = "Changed while unwatched".to_owned();
    w.update_lab(&lab, |l| l.title.clone_from(&title));
    w.set_faults(Faults::default());
    record_where(&f, &w.id, &lab, "the relist's title", |r| {
        r.fields.title == title
    })
    .await;
    assert!(
        d.events("event_watch")
            .iter()
            .any(|l| l["state"] == "connecting"),
        "the break was logged"
    );
    wait_metric(
        &admin,
        "sync_event_watches",
        &[("state", "live")],
        1.0,
        WAIT,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_renewed_once_and_the_watch_is_live_again() {
    let f = Fixture::new("events_token", 2, 2).await;
    let (_d, admin) = started(&f, "daemon", &[]).await;
    let w = f.fleet.fleet.workers[1].clone();
    w.reset_calls();
    w.set_faults(Faults {
        ws_refuse_tokens: 1,
        ..Faults::default()
    });
    w.expire_tokens();
    reopened(&admin, "unauthorized", 1.0).await;
    testkit::eventually("live again", WAIT, || async {
        let status = f.status(&w.id).await;
        (status.get_str("watch_state") == Ok("live") && w.open_streams() == 1).then_some(())
    })
    .await;
    let logins = calls(&w, "authenticate");
    assert!(
        (1..=2).contains(&logins),
        "one new token (two at most): {:?}",
        w.calls()
    );
}

/// Waits until the daemon at `admin` has opened streams again `times` times for `reason`.
async fn reopened(admin: &str, reason: &str, times: f64) {
    wait_metric(
        admin,
        "sync_event_reconnects_total",
        &[("reason", reason)],
        times,
        WAIT,
    )
    .await;
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    testkit::metrics::value(text, name, labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_during_a_running_sync_of_its_worker_makes_one_more_sync() {
    let f = Fixture::new("events_one_more", 2, 3).await;
    let (_d, admin) = started(&f, "daemon", &[]).await;
    let w = f.fleet.fleet.workers[1].clone();
    let lab = w.lab_ids()[0].clone();
    let first = w.lab(&lab).expect("lab").state;
    let second = system_tests::other_state(&first);
    w.reset_calls();
    // The sync of the first change is held at its CML read; the second change comes then.
    w.set_faults(Faults {
        hold_endpoint: Some("lab".into()),
        ..Faults::default()
    });
    let before = metrics(&admin).await;
    let lab_events = value(
        &before,
        "sync_event_messages_total",
        &[("kind", "lab_event")],
    );
    assert!(w.update_lab(&lab, |l| l.title = "first change".into()));
    testkit::eventually("the first sync reads CML", WAIT, || async {
        (calls(&w, "lab") >= 1).then_some(())
    })
    .await;
    assert!(w.update_lab(&lab, |l| l.state = second.into()));
    wait_metric(
        &admin,
        "sync_event_messages_total",
        &[("kind", "lab_event")],
        lab_events + 2.0,
        WAIT,
    )
    .await;
    w.set_faults(Faults::default());
    let r = record_where(&f, &w.id, &lab, "the newest state", |r| {
        r.fields.state == second && r.fields.title == "first change"
    })
    .await;
    testkit::eventually("a second sync after the first", WAIT, || async {
        (calls(&w, "lab") == 2).then_some(())
    })
    .await;
    assert_eq!(calls(&w, "populate_lab_tiles"), 0, "{:?}", w.calls());
    assert!(!r.operation_history.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_reset_their_own_watch_and_leave_the_others_live() {
    // Workers 1 and 4 are 2.9, 2 is 2.10 (0 and 3 are 2.4). Two of them turn hostile.
    let f = Fixture::new("events_hostile", 5, 2).await;
    let env = [
        ("CML_LABS_SYNC__EVENTS__MAX_MESSAGE_BYTES", "65536"),
        ("CML_LABS_SYNC__EVENTS__MAX_MESSAGES_PER_SECOND", "20"),
    ];
    let (d, admin) = started(&f, "daemon", &env).await;
    let workers = f.fleet.fleet.workers.clone();
    let (oversized, flooding, calm) = (&workers[1], &workers[2], &workers[4]);
    oversized.set_faults(Faults {
        ws_oversized_bytes: 1 << 20,
        ..Faults::default()
    });
    oversized.drop_streams();
    // 100 node state changes at once: more than 20 in a second.
    let lab = flooding.lab_ids()[0].clone();
    assert!(flooding.update_lab(&lab, |l| l.node_count = 50));
    record_where(&f, &flooding.id, &lab, "50 nodes", |r| {
        r.fields.node_count == 50
    })
    .await;
    flooding.change_node_states(&lab, "STOPPED");
    flooding.change_node_states(&lab, "BOOTED");
    reopened(&admin, "flooded", 1.0).await;
    testkit::eventually("the oversized stream's watch is failing", WAIT, || async {
        let s = f.status(&oversized.id).await;
        (s.get_str("watch_state") == Ok("failing") && s.get_str("watch_failure") == Ok("too_large"))
            .then_some(())
    })
    .await;
    // The calm worker's changes still arrive at once.
    let calm_lab = calm.lab_ids()[0].clone();
    assert!(calm.update_lab(&calm_lab, |l| l.title = "still live".into()));
    record_where(&f, &calm.id, &calm_lab, "the calm worker's change", |r| {
        r.fields.title == "still live"
    })
    .await;
    assert_eq!(f.status(&calm.id).await.get_str("watch_state"), Ok("live"));
    // The flooding one is back once it calms down.
    testkit::eventually("the flooded watch is live again", WAIT, || async {
        (f.status(&flooding.id).await.get_str("watch_state") == Ok("live")).then_some(())
    })
    .await;
    let text = metrics(&admin).await;
    assert!(
        value(
            &text,
            "sync_event_reconnects_total",
            &[("reason", "too_large")]
        ) >= 1.0
    );
    assert!(d.child.id().is_some(), "the daemon runs on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_upgrade_is_not_followed_and_the_token_goes_nowhere_else() {
    let f = Fixture::new("events_redirect", 2, 2).await;
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let to = format!("http://{}/ws/ui", elsewhere.local_addr().expect("addr"));
    let w = f.fleet.fleet.workers[1].clone();
    w.set_faults(Faults {
        redirect_ws_to: Some(to),
        ..Faults::default()
    });
    let d = f.spawn("daemon", &QUIET);
    let admin = d.admin_base().await;
    reopened(&admin, "redirect", 2.0).await;
    let accepted = tokio::time::timeout(Duration::from_millis(200), elsewhere.accept()).await;
    assert!(
        accepted.is_err(),
        "nothing connected to the redirect's target"
    );
    assert!(calls(&w, "ws_ui") >= 2);
    assert_eq!(w.open_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_watches_and_a_takeover_opens_and_relists_every_stream() {
    let f = Fixture::new("events_takeover", 3, 2).await;
    let env = [("CML_LABS_SYNC__LEASE_TTL", "2s")];
    let (mut a, _) = started(&f, "a", &env).await;
    let mut env_b = QUIET.to_vec();
    env_b.extend_from_slice(&env);
    let b = f.spawn("b", &env_b);
    b.wait_event("lease_standby", 1, WAIT).await;
    let b_admin = b.admin_base().await;
    let streaming = streaming(&f);
    for w in &streaming {
        assert_eq!(w.open_streams(), 1, "one watch per worker: the holder's");
    }
    let text = metrics(&b_admin).await;
    assert_eq!(
        value(&text, "sync_event_watches", &[("state", "live")]),
        0.0
    );

    a.signal(libc::SIGKILL);
    let _ = a.wait_exit(WAIT).await;
    wait_metric(&b_admin, "sync_lease_held", &[], 1.0, WAIT).await;
    for (name, labels) in [
        ("sync_event_watches", [("state", "live")]),
        ("sync_worker_syncs_started_total", [("trigger", "relist")]),
    ] {
        wait_metric(&b_admin, name, &labels, streaming.len() as f64, WAIT).await;
    }
    // The killed holder's sockets are gone; one stream per worker again.
    testkit::eventually("one stream per worker", WAIT, || async {
        streaming
            .iter()
            .all(|w| w.open_streams() == 1)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_stream_promptly() {
    let f = Fixture::new("events_sigterm", 3, 2).await;
    let (mut d, _) = started(&f, "daemon", &[]).await;
    let streaming = streaming(&f);
    assert!(streaming.iter().all(|w| w.open_streams() == 1));
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    testkit::eventually("every stream closed", Duration::from_secs(5), || async {
        streaming
            .iter()
            .all(|w| w.open_streams() == 0)
            .then_some(())
    })
    .await;
}

/// Servers that send one message and close, every way of closing (1000, 1011, 3000 and a bare
/// end of the connection), for 40 s from the daemon's start: each worker gets at most ten
/// upgrades, ten logins and ten full listings, and shows `failing` with its reason, while a
/// calm worker's changes still arrive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_close_after_one_message_get_no_storm_and_show_failing() {
    let f = Fixture::new("events_flapping", 8, 2).await;
    let streaming = streaming(&f);
    let (flapping, calm) = (&streaming[..4], streaming[4]);
    let closes: [(u16, &str); 4] = [
        (1000, "dropped"),
        (1011, "dropped"),
        // CML's close of a refused token.
        (3000, "unauthorized"),
        (0, "dropped"),
    ];
    for (w, (code, _)) in flapping.iter().zip(closes) {
        w.set_faults(Faults {
            ws_hostile: Some(WsHostile::CloseAfter { messages: 1, code }),
            ..Faults::default()
        });
    }
    let started = tokio::time::Instant::now();
    let d = f.spawn("daemon", &QUIET);
    let admin = d.admin_base().await;
    wait_metric(
        &admin,
        "sync_cycles_total",
        &[("outcome", "success")],
        1.0,
        WAIT,
    )
    .await;
    for (w, (code, reason)) in flapping.iter().zip(closes) {
        testkit::eventually("the flapping watch is failing", WAIT, || async {
            let s = f.status(&w.id).await;
            (s.get_str("watch_state") == Ok("failing") && s.get_str("watch_failure") == Ok(reason))
                .then_some(())
        })
        .await;
        eprintln!("close {code}: failing after {:?}", started.elapsed());
    }
    let lab = calm.lab_ids()[0].clone();
    assert!(calm.update_lab(&lab, |l| l.title = "still live".into()));
    record_where(&f, &calm.id, &lab, "the calm worker's change", |r| {
        r.fields.title == "still live"
    })
    .await;
    tokio::time::sleep_until(started + Duration::from_secs(40)).await;
    for (w, (code, _)) in flapping.iter().zip(closes) {
        let seen = [
            calls(w, "ws_ui"),
            calls(w, "authenticate"),
            calls(w, "populate_lab_tiles"),
        ];
        eprintln!("close {code}: upgrades, logins, listings in 40 s: {seen:?}");
        assert!(seen.iter().all(|&n| n <= 10), "close {code}: {seen:?}");
        assert!(seen[0] >= 3, "it was retried: {seen:?}");
    }
}

/// Whatever the level asked for (trace, by `RUST_LOG` and by `telemetry.log_level`), neither
/// the CML password nor a token reaches the logs: not by the REST calls, not by the stream's
/// first message (which carries the token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_even_at_trace_level() {
    let f = Fixture::new("events_trace_secrets", 3, 2).await;
    let trace = [
        ("RUST_LOG", "trace"),
        ("CML_LABS_TELEMETRY__LOG_LEVEL", "trace"),
    ];
    let (mut d, admin) = started(&f, "daemon", &trace).await;
    let w = streaming(&f)[0].clone();
    let lab = w.lab_ids()[0].clone();
    assert!(w.update_lab(&lab, |l| l.title = "seen on the stream".into()));
    record_where(&f, &w.id, &lab, "the change", |r| {
        r.fields.title == "seen on the stream"
    })
    .await;
    w.expire_tokens();
    w.drop_streams();
    reopened(&admin, "dropped", 1.0).await;
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
    let text = std::fs::read_to_string(&d.log).expect("log");
    assert!(
        d.events("stream_message").len() > 1,
        "trace lines were logged"
    );
    // Every token the simulator issues is a JWT with this header.
    const TOKEN_HEADER: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9";
    for secret in [TOKEN_HEADER, "local-dev-password"] {
        assert!(!text.contains(secret), "{secret} in the log");
    }
}
