//! sync-daemon against CML event streams that try to make it hold memory, end to end: the
//! real binary, the simulator, MongoDB. Apart from `hostile.rs` because these load the
//! machine (floods at full speed, 240 workers) and would starve that file's tests of time.

use std::time::Duration;

use cml_sim::{Faults, WsHostile};
use system_tests::{cycles_done, wait_metric, Fixture};

const WAIT: Duration = Duration::from_secs(60);

/// A status line of the daemon's process (`VmRSS`, `VmHWM`), in KiB.
fn status_kib(d: &system_tests::Daemon, field: &str) -> u64 {
    let pid = d.child.id().expect("running");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("the field")
}

/// 160 streams, all but four hostile: 100 holding an unfinished message and an unfinished
/// frame (about 1 MiB each, within the per-stream bound: together past the budget), 30 ping
/// floods and 26 servers that send a message and close. The daemon stays under 200 MiB (the
/// budget, 64 MiB, is what the streams may hold together), and a calm worker's change still
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_and_fifty_hostile_streams_keep_the_daemon_small_and_the_calm_ones_live() {
    const DAEMON_LIMIT_KIB: u64 = 200 * 1024;
    let f = Fixture::new("hostile_many_streams", 240, 1).await;
    let streaming: Vec<_> = f
        .fleet
        .fleet
        .workers
        .iter()
        .filter(|w| w.has_event_stream())
        .cloned()
        .collect();
    assert_eq!(streaming.len(), 160);
    for (i, w) in streaming.iter().enumerate() {
        let how = match i {
            0..100 => WsHostile::Unfinished { bytes: 512 * 1024 },
            100..130 => WsHostile::Pings {
                per_second: 0,
                text_every_ms: 0,
            },
            130..156 => WsHostile::CloseAfter {
                messages: 1,
                code: 1000,
            },
            _ => continue,
        };
        w.set_faults(Faults {
            ws_hostile: Some(how),
            ..Faults::default()
        });
    }
    let calm = streaming[159].clone();
    let d = f.spawn(
        "daemon",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1h"),
            ("CML_LABS_SYNC__EVENTS__ENABLED", "true"),
        ],
    );
    let admin = d.admin_base().await;
    cycles_done(&admin, 1.0).await;
    wait_metric(
        &admin,
        "sync_event_reconnects_total",
        &[("reason", "too_large")],
        // 100 streams of about 1 MiB each: at least 36 past a budget of 64 MiB.
        36.0,
        WAIT,
    )
    .await;
    let lab = calm.lab_ids()[0].clone();
    let changed = tokio::time::Instant::now();
    assert!(calm.update_lab(&lab, |l| l.title = "through the storm".into()));
    testkit::eventually("the calm worker's change", WAIT, || async {
        (f.record(&calm.id, &lab).await.fields.title == "through the storm").then_some(())
    })
    .await;
    let peak_kib = status_kib(&d, "VmHWM:");
    eprintln!(
        "160 streams, 156 hostile: a calm change stored after {:?}; sync-daemon peak RSS {} MiB",
        changed.elapsed(),
        peak_kib / 1024
    );
    assert!(peak_kib < DAEMON_LIMIT_KIB, "peak RSS {peak_kib} KiB");
}

/// A server that pings as fast as it can and never reads our pongs, with the frame rate
/// allowed so high that the flood is not cut as such: the pongs wait in a bounded buffer, so
/// the daemon's memory stays flat (it grew by 46 MiB in 10 s when each ping queued a pong
/// without bound) until the watch is reset, the server having taken none of our frames (or,
/// its window shut, sent nothing more) for the silence allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_never_grows_the_daemon() {
    let f = Fixture::new("hostile_ping_flood", 2, 1).await;
    let w = f.fleet.fleet.workers[1].clone();
    w.set_faults(Faults {
        ws_hostile: Some(WsHostile::Pings {
            per_second: 0,
            text_every_ms: 100,
        }),
        ..Faults::default()
    });
    let d = f.spawn(
        "daemon",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1h"),
            ("CML_LABS_SYNC__EVENTS__ENABLED", "true"),
            ("CML_LABS_SYNC__EVENTS__MAX_MESSAGES_PER_SECOND", "100000"),
            ("CML_LABS_SYNC__EVENTS__SILENCE_TIMEOUT", "10s"),
        ],
    );
    let admin = d.admin_base().await;
    cycles_done(&admin, 1.0).await;
    // Its stats come through the flood: the watch is live and reading it.
    testkit::eventually("the flooding stream is live", WAIT, || async {
        (f.status(&w.id).await.get_str("watch_state") == Ok("live")).then_some(())
    })
    .await;
    let start = status_kib(&d, "VmRSS:");
    let peak = std::sync::atomic::AtomicU64::new(start);
    let reason = testkit::eventually("the flooding watch is reset", WAIT, || async {
        peak.fetch_max(
            status_kib(&d, "VmRSS:"),
            std::sync::atomic::Ordering::Relaxed,
        );
        let text = system_tests::metrics(&admin).await;
        ["stalled", "silent"].into_iter().find(|r| {
            testkit::metrics::value(&text, "sync_event_reconnects_total", &[("reason", r)])
                .is_some_and(|n| n >= 1.0)
        })
    })
    .await;
    let peak = peak.into_inner();
    eprintln!(
        "ping flood until the watch was reset ({reason}): sync-daemon RSS {} MiB at its start, \
         {} MiB at most",
        start / 1024,
        peak / 1024
    );
    assert!(peak < start + 32 * 1024, "{start} KiB -> {peak} KiB");
}
