//! Live events end to end: real lab-api replicas following MongoDB's change stream, a real
//! sync-daemon writing, the simulated fleet changing, clients reading `text/event-stream`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use cml_sim::Faults;
use serde_json::Value;
use sha2::{Digest, Sha256};
use shared::record::LabRecord;
use system_tests::{
    metrics, other_state,
    sse::{count, with_ids, Next, SseFrame, SseStream},
    wait_metric, Fixture,
};

const WAIT: Duration = Duration::from_secs(30);
const LABS: &str = "worker.labs.updated";
const REFRESHED: &str = "worker.data.refreshed";
const FAILED: &str = "worker.sync.failed";

async fn open(base: &str, query: &str, headers: &[(&str, &str)]) -> SseStream {
    let mut s = SseStream::open(&format!("{base}/api/events/stream{query}"), headers)
        .await
        .unwrap_or_else(|r| panic!("the stream was refused: {}", r.status()));
    let first = s.expect(WAIT).await;
    assert_eq!(first.event, "connected", "{first:?}");
    s
}

/// Frames until `refreshed` and `failed` sync events have come (each sync's status is
/// written after its labs, and one change stream orders both: every lab event is in by then).
async fn until_syncs(s: &mut SseStream, refreshed: usize, failed: usize) -> Vec<SseFrame> {
    s.until(WAIT, |fs| {
        count(fs, REFRESHED) >= refreshed && count(fs, FAILED) >= failed
    })
    .await
}

fn ids(frames: &[SseFrame]) -> Vec<String> {
    with_ids(frames)
        .into_iter()
        .filter_map(|f| f.id.clone())
        .collect()
}

/// What the records' history says happened to each lab, as event actions: `created` for
/// labs first seen while watching, then one action per history entry.
fn history_actions(records: &[LabRecord]) -> BTreeMap<(String, String), Vec<String>> {
    records
        .iter()
        .map(|r| {
            let mut actions = vec!["created".to_owned()];
            actions.extend(r.operation_history.iter().map(|e| e.action().to_owned()));
            ((r.worker_id.clone(), r.lab_id.clone()), actions)
        })
        .collect()
}

/// The lab events per lab, in the order they came.
fn event_actions(frames: &[SseFrame]) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for f in frames.iter().filter(|f| f.event == LABS) {
        let d = f.data();
        let key = (
            d["worker_id"].as_str().expect("worker_id").to_owned(),
            d["lab_id"].as_str().expect("lab_id").to_owned(),
        );
        out.entry(key)
            .or_default()
            .push(d["action"].as_str().expect("action").to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_stream_every_event_of_every_kind_once_in_order() {
    let f = Fixture::new("events_replicas", 3, 4).await;
    let (_a, base_a) = f.spawn_api("api-a", &[]).await;
    let (_b, base_b) = f.spawn_api("api-b", &[]).await;
    let mut on_a = open(&base_a, "", &[]).await;
    let mut on_b = open(&base_b, "", &[]).await;
    let w = f.fleet.fleet.workers.clone();
    let filtered_query = format!("?worker_ids={}&event_types={LABS}", w[0].id);
    let mut filtered = open(&base_b, &filtered_query, &[]).await;

    // Cycle 1: every lab is new. Cycle 2: a state change, a title change, a removal, a failed
    // worker. Cycle 3: the removed lab is back, the failed worker heals.
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let labs = w[0].labs();
    let (changed, retitled, removed) = (&labs[0], &labs[1], labs[2].clone());
    w[0].update_lab(&changed.id, |l| l.state = other_state(&l.state).to_owned());
    w[0].update_lab(&retitled.id, |l| {
        l.title = "<b>renamed</b> & \"quoted\"".into()
    });
    w[0].delete_lab(&removed.id);
    w[1].set_faults(Faults {
        malformed_json: true,
        ..Faults::default()
    });
    let out = f.once(&[]).await;
    assert!(!out.status.success(), "a failed worker fails `once`");
    w[0].create_lab(Some(removed.clone()));
    w[1].set_faults(Faults::default());
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));

    let a = until_syncs(&mut on_a, 3 + 2 + 3, 1).await;
    let b = until_syncs(&mut on_b, 3 + 2 + 3, 1).await;
    assert_eq!(
        ids(&a),
        ids(&b),
        "both replicas send the same events, same ids"
    );
    let mut unique = ids(&a);
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids(&a).len(), "no event twice");
    assert_eq!(with_ids(&a).len(), a.len(), "nothing but events");

    let records = f.records().await;
    assert_eq!(event_actions(&a), history_actions(&records));
    assert_eq!(count(&a, LABS), 12 + 3 + 1);
    assert_eq!(
        (count(&a, REFRESHED), count(&a, FAILED)),
        (8, 1),
        "one event per worker sync"
    );

    let by_action = |action: &str| -> Vec<&Value> {
        a.iter()
            .filter(|f| f.event == LABS && f.data()["action"] == action)
            .map(|f| f.data())
            .collect()
    };
    let state = by_action("state_changed");
    assert_eq!(state.len(), 1);
    let record = f.record(&w[0].id, &changed.id).await;
    let entry = &record.operation_history[0];
    assert_eq!(state[0]["previous_state"], changed.state.as_str());
    assert_eq!(state[0]["new_state"], other_state(&changed.state));
    assert_eq!(state[0]["state"], other_state(&changed.state));
    assert_eq!(
        state[0]["changed_fields"]["state"],
        serde_json::json!({"old": changed.state, "new": other_state(&changed.state)})
    );
    let changed_at = state[0]["changed_at"].as_str().expect("changed_at");
    assert_eq!(
        bson::DateTime::parse_rfc3339_str(changed_at).ok(),
        Some(entry.timestamp),
        "the event is the history entry the write pushed"
    );
    let updated = by_action("updated");
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0]["lab_id"], retitled.id.as_str());
    assert_eq!(updated[0]["title"], "<b>renamed</b> & \"quoted\"");
    assert_eq!(
        updated[0]["changed_fields"]["title"]["new"],
        "<b>renamed</b> & \"quoted\""
    );
    assert!(updated[0]["changed_fields"].get("state").is_none());
    assert!(updated[0]["synced_at"].is_string());
    let gone = by_action("removed");
    assert_eq!(gone[0]["lab_id"], removed.id.as_str());
    assert!(gone[0]["removed_at"].is_string());
    let back = by_action("reappeared");
    assert_eq!(back[0]["lab_id"], removed.id.as_str());
    assert!(back[0]["removed_at"].is_null());
    for created in by_action("created") {
        for key in [
            "title",
            "state",
            "node_count",
            "link_count",
            "owner_username",
        ] {
            assert!(!created[key].is_null(), "{key} in {created}");
        }
    }

    let failed: Vec<&SseFrame> = a.iter().filter(|f| f.event == FAILED).collect();
    assert_eq!(failed[0].data()["worker_id"], w[1].id.as_str());
    assert_eq!(failed[0].data()["consecutive_failures"], 1);
    assert!(failed[0].data()["error_kind"].is_string(), "{failed:?}");
    let refreshed: Vec<&Value> = a
        .iter()
        .filter(|f| f.event == REFRESHED)
        .map(|f| f.data())
        .collect();
    assert_eq!(refreshed[0]["labs_created"], 4);
    assert!(refreshed.iter().all(|r| r["last_success_at"].is_string()));
    let w0_second = refreshed
        .iter()
        .filter(|r| r["worker_id"] == w[0].id.as_str())
        .nth(1)
        .expect("worker 0's second sync");
    assert_eq!(
        (
            w0_second["labs_updated"].as_u64(),
            w0_second["labs_removed"].as_u64()
        ),
        (Some(2), Some(1)),
        "{w0_second}"
    );
    for f in &a {
        assert_eq!(f.envelope["type"], f.event.as_str());
        assert_eq!(f.envelope["source"], "lab-api");
        assert!(f.envelope["time"].is_string());
    }

    // The filtered client got exactly its part of the same sequence.
    let mine: Vec<String> = with_ids(&a)
        .into_iter()
        .filter(|f| f.event == LABS && f.data()["worker_id"] == w[0].id.as_str())
        .filter_map(|f| f.id.clone())
        .collect();
    let got = filtered
        .until(WAIT, |fs| with_ids(fs).len() >= mine.len())
        .await;
    assert_eq!(ids(&got), mine);
    assert_eq!(
        filtered.next(Duration::from_millis(300)).await,
        Err(Next::Quiet)
    );

    // A write that only stamps `last_synced_at` is no event.
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let quiet = until_syncs(&mut on_a, 3, 0).await;
    assert_eq!(count(&quiet, LABS), 0, "{quiet:?}");
    assert_eq!(
        on_a.next(Duration::from_millis(500)).await,
        Err(Next::Quiet)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_to_the_other_replica_misses_nothing_and_gets_nothing_twice() {
    let f = Fixture::new("events_resume", 4, 12).await;
    // Every worker holds its calls until the test lets it answer: one worker is synced while
    // the client reads, the next while it is away, the others after it came back.
    let workers = f.fleet.fleet.workers.clone();
    for w in &workers {
        w.set_faults(Faults {
            hold: true,
            ..Faults::default()
        });
    }
    let (_a, base_a) = f.spawn_api("api-a", &[]).await;
    let (_b, base_b) = f.spawn_api("api-b", &[]).await;
    let mut observer = open(&base_a, "", &[]).await;
    let observed = tokio::spawn(async move { until_syncs(&mut observer, 4, 0).await });
    let mut hopper = open(&base_a, "", &[]).await;

    let cycle = f.once(&[("CML_LABS_SYNC__CONCURRENCY", "1")]);
    let client = async {
        let mut released = BTreeSet::new();
        release_the_called(&workers, &mut released).await;
        let before = hopper.until(WAIT, |fs| with_ids(fs).len() >= 10).await;
        let last = before.last().and_then(|f| f.id.clone()).expect("an id");
        drop(hopper);
        // The cycle goes on while the client is away: another worker's labs are written.
        release_the_called(&workers, &mut released).await;
        testkit::eventually("another worker written", WAIT, || async {
            (f.records().await.len() >= 24).then_some(())
        })
        .await;
        let mut again = open(&base_b, "", &[("last-event-id", &last)]).await;
        for w in &workers {
            w.set_faults(Faults::default());
        }
        let after = until_syncs(&mut again, 4 - count(&before, REFRESHED), 0).await;
        (before, after)
    };
    let (out, (before, after)) = tokio::join!(cycle, client);
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let all = observed.await.expect("observer");
    assert_eq!(count(&after, "reset"), 0, "{after:?}");
    assert!(
        count(&after, LABS) >= 12,
        "what was written while away came from the other replica"
    );
    assert_eq!(
        [ids(&before), ids(&after)].concat(),
        ids(&all),
        "the union is the whole sequence: nothing lost, nothing twice"
    );
    assert_eq!(count(&all, LABS), 48);
}

/// Lets the worker the cycle calls now answer (its calls were held), and notes it.
async fn release_the_called(workers: &[Arc<cml_sim::SimWorker>], released: &mut BTreeSet<String>) {
    let w = testkit::eventually("a held worker called", WAIT, || async {
        workers
            .iter()
            .find(|w| !released.contains(&w.id) && !w.calls().is_empty())
            .cloned()
    })
    .await;
    w.set_faults(Faults::default());
    released.insert(w.id.clone());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_go_on_across_a_mongodb_restart_and_miss_nothing_written_after_it() {
    // This test stops its server, so it always runs on a stand-in of its own.
    let Some(mut server) = testkit::own_stand_in() else {
        return;
    };
    let db = testkit::TestDb::on(&server.uri(), "events_mongo_restart").await;
    let f = Fixture::on(db, 2, 3).await;
    let (api, base) = f
        .spawn_api(
            "api",
            &[("CML_LABS_MONGODB__SERVER_SELECTION_TIMEOUT", "1s")],
        )
        .await;
    let mut client = open(&base, "", &[]).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let first = until_syncs(&mut client, 2, 0).await;
    assert_eq!(count(&first, LABS), 6);

    // Down long enough for lab-api to notice (the driver's own single resume fails too).
    server.stop();
    api.wait_event("change_stream_failed", 1, WAIT).await;
    server.restart().expect("restart the server");
    let w = f.fleet.fleet.workers[0].clone();
    let lab = w.labs()[0].clone();
    w.update_lab(&lab.id, |l| l.state = other_state(&l.state).to_owned());
    // Written at once after the restart, likely before lab-api's change stream is back.
    testkit::eventually("a cycle after the restart", WAIT, || async {
        f.once(&[]).await.status.success().then_some(())
    })
    .await;
    let after = until_syncs(&mut client, 2, 0).await;
    assert_eq!(count(&after, "reset"), 0, "{after:?}");
    let changes: Vec<&SseFrame> = after.iter().filter(|f| f.event == LABS).collect();
    assert_eq!(changes.len(), 1, "{after:?}");
    assert_eq!(changes[0].data()["lab_id"], lab.id.as_str());
    assert_eq!(changes[0].data()["action"], "state_changed");
    let mut seen = ids(&[first, after].concat());
    let n = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n, "nothing twice");
    let reopened = api.wait_event("change_stream_opened", 2, WAIT).await;
    assert_eq!(reopened[1]["resumed"], true, "{reopened:?}");
    assert!(!api.events("change_stream_failed").is_empty());
}

/// Gives every lab of the fleet a description `chars` long (large events).
fn long_descriptions(f: &Fixture, chars: usize) {
    for w in &f.fleet.fleet.workers {
        for id in w.lab_ids() {
            w.update_lab(&id, |l| l.description = "d".repeat(chars));
        }
    }
}

/// A socket with a small receive window that sends its request for `path` and never reads.
async fn never_reading(base: &str, path: &str) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().expect("address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stalled = socket.connect(addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut stalled,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    stalled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_reset_and_cut_off_without_holding_up_the_others() {
    let f = Fixture::new("events_slow", 4, 500).await;
    // 8 MB of events: more than the socket buffers between lab-api and a client can hold.
    long_descriptions(&f, 4000);
    let (_api, base) = f
        .spawn_api(
            "api",
            &[
                ("CML_LABS_API__EVENTS__CLIENT_BUFFER", "64"),
                ("CML_LABS_API__EVENTS__HEARTBEAT_INTERVAL", "1s"),
            ],
        )
        .await;
    let mut stalled = never_reading(&base, "/api/events/stream").await;
    let mut reader = open(&base, "", &[]).await;
    wait_metric(&base, "events_streams", &[], 2.0, WAIT).await;

    let reading = tokio::spawn(async move {
        let frames = until_syncs(&mut reader, 4, 0).await;
        (frames, reader)
    });
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let (frames, _reader) = reading.await.expect("reader");
    assert_eq!(count(&frames, LABS), 2000, "the reader got everything");
    assert_eq!(count(&frames, "reset"), 0);
    // Dropped as lagged (its queue filled) or cut as stalled (it took nothing for a heartbeat
    // interval), whichever comes first.
    testkit::eventually("the stalled stream is dropped", WAIT, || async {
        let text = metrics(&base).await;
        let lagged = testkit::metrics::value(&text, "events_resets_total", &[("reason", "lagged")]);
        let stalled =
            testkit::metrics::value(&text, "events_streams_cut_total", &[("reason", "stalled")]);
        (lagged.unwrap_or(0.0) + stalled.unwrap_or(0.0) >= 1.0).then_some(())
    })
    .await;
    testkit::eventually("the stalled stream closed", WAIT, || async {
        let text = metrics(&base).await;
        (testkit::metrics::value(&text, "events_streams", &[]) == Some(1.0)).then_some(())
    })
    .await;
    // Its connection is closed: reading what was buffered for it comes to an end.
    let mut sink = Vec::new();
    let read = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stalled, &mut sink),
    )
    .await;
    assert!(read.is_ok(), "the connection stays open");
    assert!(sink.len() < 4 << 20, "{} bytes", sink.len());
}

/// A client filtered to one worker that stops reading: its queue never fills (its bound is
/// set far above what it gets), so it never falls behind; its socket stops taking bytes, and
/// the watchdog cuts it within about a heartbeat interval, its queue freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_client_that_stops_reading_is_cut_though_its_queue_never_fills() {
    let f = Fixture::new("events_stalled", 2, 200).await;
    // About 3.4 MB of events for the stalled client's worker: more than the socket buffers
    // between lab-api and a client hold.
    long_descriptions(&f, 16_000);
    let (api, base) = f
        .spawn_api(
            "api",
            &[
                ("CML_LABS_API__EVENTS__CLIENT_BUFFER", "65536"),
                ("CML_LABS_API__EVENTS__CLIENT_BUFFER_BYTES", "268435456"),
                ("CML_LABS_API__EVENTS__BUFFER_BYTES", "268435456"),
                ("CML_LABS_API__EVENTS__HEARTBEAT_INTERVAL", "1s"),
            ],
        )
        .await;
    let w = &f.fleet.fleet.workers[0].id;
    let mut stalled = never_reading(&base, &format!("/api/events/stream?worker_ids={w}")).await;
    let mut reader = open(&base, "", &[]).await;
    wait_metric(&base, "events_streams", &[], 2.0, WAIT).await;
    let reading = tokio::spawn(async move {
        let frames = until_syncs(&mut reader, 2, 0).await;
        (frames, reader)
    });
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let (frames, _reader) = reading.await.expect("reader");
    assert_eq!(count(&frames, LABS), 400, "the reader got everything");
    let cut = api.wait_event("stream_cut", 1, WAIT).await;
    assert_eq!(cut[0]["reason"], "stalled", "{cut:?}");
    wait_metric(
        &base,
        "events_streams_cut_total",
        &[("reason", "stalled")],
        1.0,
        WAIT,
    )
    .await;
    testkit::eventually("the stalled stream closed and freed", WAIT, || async {
        let text = metrics(&base).await;
        let open = testkit::metrics::value(&text, "events_streams", &[]);
        let queued = testkit::metrics::value(&text, "events_queued_bytes", &[]);
        (open == Some(1.0) && queued == Some(0.0)).then_some(())
    })
    .await;
    let text = metrics(&base).await;
    assert_eq!(
        testkit::metrics::value(&text, "events_resets_total", &[("reason", "lagged")]),
        None,
        "it never fell behind: {text}"
    );
    let mut sink = Vec::new();
    let read = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stalled, &mut sink),
    )
    .await;
    assert!(read.is_ok(), "the connection stays open");
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_authenticated_capped_kept_alive_and_end_at_sigterm() {
    let f = Fixture::new("events_edges", 1, 2).await;
    let token = "events-token-1";
    let hashes = format!("[\"{}\"]", token_hash(token));
    let (mut api, base) = f
        .spawn_api(
            "api",
            &[
                ("CML_LABS_API__AUTH__MODE", "tokens"),
                ("CML_LABS_API__AUTH__TOKEN_HASHES", &hashes),
                ("CML_LABS_API__AUTH__COOKIE_NAME", "labs_token"),
                ("CML_LABS_API__EVENTS__MAX_STREAMS", "3"),
                ("CML_LABS_API__EVENTS__HEARTBEAT_INTERVAL", "1s"),
            ],
        )
        .await;
    let url = format!("{base}/api/events/stream");
    let bearer = format!("Bearer {token}");
    let cookie = format!("theme=dark; labs_token={token}");

    // No token, a wrong one, or one in the query string: refused.
    for (query, headers) in [
        ("", vec![]),
        ("", vec![("authorization", "Bearer nope")]),
        ("?access_token=events-token-1", vec![]),
        ("?token=events-token-1", vec![]),
    ] {
        let refused = SseStream::open(&format!("{url}{query}"), &headers)
            .await
            .expect_err("refused");
        assert!(
            [400, 401].contains(&refused.status().as_u16()),
            "{query} {headers:?}: {}",
            refused.status()
        );
    }
    // Bad filters name the parameter.
    let bad = SseStream::open(
        &format!("{url}?event_types=worker.labs.updated,nope"),
        &[("authorization", &bearer)],
    )
    .await
    .expect_err("a bad filter");
    assert_eq!(bad.status(), 400);
    let problem: Value = bad.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("nope")),
        "{problem}"
    );

    // Header and cookie both open a stream, with the headers a stream needs.
    let mut by_header = open(&base, "", &[("authorization", &bearer)]).await;
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("x-accel-buffering", "no"),
    ] {
        assert_eq!(by_header.headers()[name], value);
    }
    assert!(
        by_header.headers().get("content-encoding").is_none(),
        "a stream is never compressed (it would be held back)"
    );
    let mut by_cookie = open(
        &base,
        "",
        &[("cookie", &cookie), ("accept-encoding", "gzip")],
    )
    .await;
    assert!(by_cookie.headers().get("content-encoding").is_none());
    // Quiet streams get heartbeats.
    for s in [&mut by_header, &mut by_cookie] {
        let beat = s.expect(Duration::from_secs(5)).await;
        assert_eq!(beat.event, "heartbeat", "{beat:?}");
        assert_eq!(beat.id, None);
    }
    // An id that cannot be resumed from: connected, then reset, then live events.
    let mut unknown = open(
        &base,
        "",
        &[("authorization", &bearer), ("last-event-id", "not an id!")],
    )
    .await;
    let reset = unknown.expect(WAIT).await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.data()["reason"], "unknown_id");
    // The fourth stream is one too many.
    let full = SseStream::open(&url, &[("authorization", &bearer)])
        .await
        .expect_err("over the cap");
    assert_eq!(full.status(), 503);
    assert!(full.headers().get("retry-after").is_some());
    let problem: Value = full.json().await.expect("problem");
    assert_eq!(problem["status"], 503);
    drop(unknown);
    testkit::eventually("a slot is free again", WAIT, || async {
        SseStream::open(&url, &[("authorization", &bearer)])
            .await
            .ok()
    })
    .await;
    // An id that is not text (a byte past ASCII) is no id this API issued either: a reset,
    // not "no header" (the client would silently miss what happened while it was away).
    // (The stream that found a free slot has just been dropped: its slot is freed once the
    // server sees the connection close, so this one may have to ask again.)
    let garbled_headers = [
        ("authorization", bearer.as_str()),
        ("last-event-id", "caf\u{e9}"),
    ];
    let mut garbled = testkit::eventually("a slot for the garbled id", WAIT, || async {
        SseStream::open(&url, &garbled_headers).await.ok()
    })
    .await;
    assert_eq!(garbled.expect(WAIT).await.event, "connected");
    let reset = garbled.expect(WAIT).await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.data()["reason"], "unknown_id");
    drop(garbled);
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let live = until_syncs(&mut by_cookie, 1, 0).await;
    assert_eq!(count(&live, LABS), 2);

    // SIGTERM ends every stream; the process exits without waiting for them to time out.
    api.signal(libc::SIGTERM);
    for s in [&mut by_header, &mut by_cookie] {
        // What was sent before the signal may still be read (a few frames); then the stream
        // ends. A stream left open would keep sending heartbeats: bounded, it fails, not hangs.
        let mut end = Ok(());
        for _ in 0..20 {
            end = s.next(Duration::from_secs(5)).await.map(drop);
            if end.is_err() {
                break;
            }
        }
        assert_eq!(end, Err(Next::Ended));
    }
    assert!(api.wait_exit(Duration::from_secs(10)).await.success());
}
