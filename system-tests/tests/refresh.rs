//! Refresh on demand and workers that start running, end to end: lab-api records requests,
//! the real sync-daemon serves them (through the cycle's path, across a failover), the
//! simulator counts the CML calls.

use std::time::Duration;

use bson::{doc, Document};
use cml_sim::Faults;
use reqwest::StatusCode;
use serde_json::Value;
use system_tests::{
    message, output_text,
    sse::{count, SseStream},
    wait_metric, Daemon, Fixture,
};

const WAIT: Duration = Duration::from_secs(30);
/// No cycle but the first (or none): whatever syncs later was asked for.
const NO_CYCLES: [(&str, &str); 1] = [("CML_LABS_SYNC__INTERVAL", "1h")];

async fn post(
    base: &str,
    worker: &str,
    query: &str,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/workers/{worker}/labs/refresh{query}"))
        .send()
        .await
        .expect("post");
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, path: &str) -> (StatusCode, Value) {
    let r = reqwest::get(format!("{base}{path}")).await.expect("get");
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// The request, once its status is `status`.
async fn request_in(base: &str, id: &str, status: &str) -> Value {
    testkit::eventually(&format!("request {id} is {status}"), WAIT, || async {
        let (_, r) = get(base, &format!("/api/sync-requests/{id}")).await;
        (r["status"] == status).then_some(r)
    })
    .await
}

fn records_of(records: &[shared::record::LabRecord], worker: &str) -> usize {
    records.iter().filter(|r| r.worker_id == worker).count()
}

/// The worker's `worker_synced` lines in the daemon's log.
fn syncs_of(d: &Daemon, worker: &str) -> usize {
    d.events("worker_synced")
        .iter()
        .filter(|l| l["worker_id"] == worker)
        .count()
}

async fn set_status(f: &Fixture, worker: &str, status: &str) {
    f.db.db
        .collection::<Document>("cml_workers")
        .update_one(doc! { "id": worker }, doc! { "$set": { "status": status } })
        .await
        .expect("registry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_wait_syncs_the_worker_once_and_answers_with_what_the_records_show() {
    let f = Fixture::new("refresh_wait", 3, 6).await;
    let env = [
        NO_CYCLES[0],
        ("CML_LABS_SYNC__RUN_IMMEDIATELY", "false"),
        ("CML_LABS_SYNC__REFRESH_MIN_INTERVAL", "3s"),
    ];
    let d = f.spawn("daemon", &env);
    let admin = d.admin_base().await;
    wait_metric(&admin, "sync_lease_held", &[], 1.0, WAIT).await;
    let start = d.wait_event("refresh_scheduled", 1, WAIT).await;
    assert_eq!(
        message(&start[0]),
        "Scheduled labs refresh job (1-hour interval)"
    );
    let (_api, base) = f.spawn_api("api", &env).await;
    let w = f.fleet.fleet.workers[2].clone();
    let (status, headers, body) = post(&base, &w.id, "?wait=30s").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "done", "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    assert_eq!(
        headers["location"],
        format!("/api/sync-requests/{id}").as_str()
    );
    let records = f.records().await;
    assert_eq!(records_of(&records, &w.id), 6);
    assert_eq!(records.len(), 6, "no other worker synced");
    assert_eq!(
        (
            &body["labs_synced"],
            &body["labs_created"],
            &body["labs_updated"],
            &body["labs_removed"]
        ),
        (
            &Value::from(6),
            &Value::from(6),
            &Value::from(0),
            &Value::from(0)
        )
    );
    assert!(
        body["duration_ms"].as_i64().is_some_and(|ms| ms >= 0),
        "{body}"
    );
    assert!(
        body["error"].is_null() && body["finished_at"].is_string(),
        "{body}"
    );
    assert_eq!(
        w.calls().get("populate_lab_tiles"),
        Some(&1),
        "one sync: {:?}",
        w.calls()
    );
    assert_eq!(syncs_of(&d, &w.id), 1);
    // The status a cycle would write, and the metrics a cycle would count.
    assert_eq!(f.status(&w.id).await.get_i64("lab_count").ok(), Some(6));
    wait_metric(
        &admin,
        "sync_refresh_requests_total",
        &[("outcome", "done")],
        1.0,
        WAIT,
    )
    .await;
    // Read back.
    let (status, again) = get(&base, &format!("/api/sync-requests/{id}")).await;
    assert_eq!((status, &again), (StatusCode::OK, &body));

    // The next one changes a lab: its counts say so.
    let lab = w.labs()[0].clone();
    w.update_lab(&lab.id, |l| l.title = format!("{} (renamed)", l.title));
    w.reset_calls();
    let (status, headers, refused) = post(&base, &w.id, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{refused}");
    assert!(headers.contains_key("retry-after"));
    let done = testkit::eventually("the throttle lets a refresh in", WAIT, || async {
        let (status, _, body) = post(&base, &w.id, "?wait=30s").await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(
        (&done["labs_synced"], &done["labs_updated"]),
        (&Value::from(6), &Value::from(1)),
        "{done}"
    );
    assert_eq!(w.calls().get("populate_lab_tiles"), Some(&1));

    // From the command line, for another worker; then throttled.
    let other = f.fleet.fleet.workers[1].id.clone();
    let out = f.daemon(&["refresh", &other, "--wait", "30s"], &env).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains(&format!("Worker {other} refreshed: synced=6, created=6")),
        "{said}"
    );
    let out = f.daemon(&["refresh", &other], &env).await;
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("try again in"),
        "{}",
        output_text(&out)
    );
    let out = f.daemon(&["refresh", "no-such-worker"], &env).await;
    assert_eq!(out.status.code(), Some(2));
    // A worker whose sync fails: exit 1, and why.
    let broken = f.fleet.fleet.workers[0].clone();
    broken.set_faults(Faults {
        malformed_json: true,
        ..Faults::default()
    });
    let out = f.daemon(&["refresh", &broken.id], &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("could not be refreshed (cml_malformed)"),
        "{said}"
    );
    // `once --worker` while this daemon holds the lease points to `refresh`.
    let out = f.daemon(&["once", "--worker", &other], &env).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        output_text(&out).contains("sync-daemon refresh"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_says_when_to_ask_again_counts_down_and_is_an_event() {
    let f = Fixture::new("refresh_throttle", 2, 2).await;
    let env = [NO_CYCLES[0], ("CML_LABS_SYNC__REFRESH_MIN_INTERVAL", "4s")];
    let d = f.spawn("daemon", &env);
    d.wait_event("cycle_completed", 1, WAIT).await;
    let (_a, base) = f.spawn_api("a", &env).await;
    let (_b, other) = f.spawn_api("b", &env).await;
    let w = f.fleet.fleet.workers[0].id.clone();
    // Watch on the other replica: the event travels through MongoDB.
    let mut stream = SseStream::open(
        &format!("{other}/api/events/stream?event_types=worker.refresh.throttled"),
        &[],
    )
    .await
    .unwrap_or_else(|r| panic!("refused: {}", r.status()));
    assert_eq!(stream.expect(WAIT).await.event, "connected");

    let (status, _, first) = post(&base, &w, "?wait=30s").await;
    assert_eq!(
        (status, first["status"].as_str()),
        (StatusCode::OK, Some("done"))
    );
    let (status, headers, problem) = post(&base, &w, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{problem}");
    let first_wait: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=4).contains(&first_wait), "{first_wait}");
    assert_eq!(problem["retry_after_seconds"], first_wait);
    assert_eq!(
        problem["request"]["id"], first["id"],
        "the refresh that holds it back"
    );
    assert_eq!(headers["content-type"], "application/problem+json");
    let events = stream
        .until(WAIT, |fs| count(fs, "worker.refresh.throttled") >= 1)
        .await;
    let event = events
        .iter()
        .find(|e| e.event == "worker.refresh.throttled")
        .expect("event");
    assert_eq!(event.data()["worker_id"], w.as_str());
    assert_eq!(event.data()["retry_after_seconds"], first_wait);
    assert!(event.id.is_some(), "resumable like every event");

    // It counts down, never up, and then a refresh is accepted.
    let seen = std::sync::Mutex::new(vec![first_wait]);
    let accepted = testkit::eventually("the throttle lets a refresh in", WAIT, || async {
        let (status, headers, body) = post(&base, &w, "").await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            let secs = headers["retry-after"].to_str().ok()?.parse().ok()?;
            seen.lock().expect("lock").push(secs);
            return None;
        }
        Some((status, body))
    })
    .await;
    let waits = seen.into_inner().expect("lock");
    assert_eq!(accepted.0, StatusCode::ACCEPTED, "{}", accepted.1);
    assert!(waits.windows(2).all(|p| p[1] <= p[0]), "{waits:?}");
    assert!(
        waits.iter().any(|s| *s < first_wait),
        "it counted down: {waits:?}"
    );
    // A pending or running one holds the next back for a whole interval.
    let (status, headers, _) = post(&base, &w, "").await;
    if status == StatusCode::TOO_MANY_REQUESTS {
        assert!(headers["retry-after"].to_str().is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_while_the_cycle_syncs_that_worker_joins_that_sync() {
    let f = Fixture::new("refresh_join", 3, 4).await;
    let w = f.fleet.fleet.workers[2].clone();
    // The cycle's call to `w` waits at the gate: the test knows it is in flight.
    w.set_faults(Faults {
        hold: true,
        ..Faults::default()
    });
    let d = f.spawn("daemon", &NO_CYCLES);
    let (_api, base) = f.spawn_api("api", &NO_CYCLES).await;
    testkit::eventually("the cycle is syncing w", WAIT, || async {
        (!w.calls().is_empty()).then_some(())
    })
    .await;
    let (status, _, pending) = post(&base, &w.id, "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    let id = pending["id"].as_str().expect("id").to_owned();
    // Taken by the holder, joined to the sync in flight; then the gate opens.
    request_in(&base, &id, "running").await;
    d.wait_event("refresh_started", 1, WAIT).await;
    w.set_faults(Faults::default());
    let (status, done) = get(&base, &format!("/api/sync-requests/{id}?wait=30s")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done["status"], "done", "{done}");
    let completed = d.wait_event("cycle_completed", 1, WAIT).await;
    assert_eq!(completed[0]["failed_workers"], 0, "{completed:?}");
    assert_eq!(syncs_of(&d, &w.id), 1, "one sync for both");
    assert_eq!(
        w.calls().get("populate_lab_tiles"),
        Some(&1),
        "{:?}",
        w.calls()
    );
    // Both got its outcome: the cycle counted its labs, the request carries the same.
    assert_eq!(done["labs_synced"], 4);
    assert_eq!(done["labs_created"], 4);
    assert_eq!(
        f.status(&w.id)
            .await
            .get_document("last_counts")
            .ok()
            .and_then(|c| c.get_i64("created").ok()),
        Some(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pending_or_running_when_the_holder_dies_are_served_by_the_next_one() {
    let f = Fixture::new("refresh_failover", 3, 2).await;
    let env = [NO_CYCLES[0], ("CML_LABS_SYNC__LEASE_TTL", "2s")];
    let mut a = f.spawn("a", &env);
    let a_admin = a.admin_base().await;
    wait_metric(&a_admin, "sync_lease_held", &[], 1.0, WAIT).await;
    a.wait_event("cycle_completed", 1, WAIT).await;
    let b = f.spawn("b", &env);
    b.wait_event("lease_standby", 1, WAIT).await;
    let (_api, base) = f.spawn_api("api", &env).await;
    let (w1, w2) = (
        f.fleet.fleet.workers[1].clone(),
        f.fleet.fleet.workers[2].clone(),
    );

    // While `a` holds the lease, it serves; the standby does not.
    let (status, _, served) = post(&base, &f.fleet.fleet.workers[0].id, "?wait=30s").await;
    assert_eq!(
        (status, served["status"].as_str()),
        (StatusCode::OK, Some("done"))
    );

    // w1's sync for a request hangs at the gate in `a` (running, taken by `a`)...
    w1.reset_calls();
    w1.set_faults(Faults {
        hold: true,
        ..Faults::default()
    });
    let (_, _, r1) = post(&base, &w1.id, "").await;
    let r1 = r1["id"].as_str().expect("id").to_owned();
    request_in(&base, &r1, "running").await;
    // ...and w2's request comes while `a` is frozen (pending).
    a.signal(libc::SIGSTOP);
    let (_, _, r2) = post(&base, &w2.id, "").await;
    let r2 = r2["id"].as_str().expect("id").to_owned();
    a.signal(libc::SIGKILL);
    a.wait_exit(WAIT).await;
    b.wait_event("lease_acquired", 1, WAIT).await;
    w1.set_faults(Faults::default());
    for id in [&r1, &r2] {
        let (_, done) = get(&base, &format!("/api/sync-requests/{id}?wait=30s")).await;
        assert_eq!(done["status"], "done", "{done}");
    }
    assert_eq!(
        b.events("refresh_requests_requeued").len(),
        1,
        "r1 was taken by a"
    );
    // The standby served nothing before it held the lease.
    let lines = b.lines();
    let acquired = lines
        .iter()
        .position(|l| l["event"] == "lease_acquired")
        .expect("acquired");
    let first_served = lines
        .iter()
        .position(|l| l["event"] == "refresh_started")
        .expect("served");
    assert!(first_served > acquired, "b served a request while standby");
    assert_eq!(b.events("refresh_started").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_start_running_are_synced_at_once_and_stopped_ones_no_longer() {
    let f = Fixture::new("refresh_registry", 5, 3).await;
    let ids: Vec<String> = f.fleet.fleet.workers.iter().map(|w| w.id.clone()).collect();
    let registry = f.db.db.collection::<Document>("cml_workers");
    // w3 is stopped and w4 not registered yet when the daemon starts.
    set_status(&f, &ids[3], "stopped").await;
    let w4 = registry
        .find_one_and_delete(doc! { "id": &ids[4] })
        .await
        .expect("registry")
        .expect("w4");
    let d = f.spawn("daemon", &NO_CYCLES);
    d.wait_event("cycle_completed", 1, WAIT).await;
    d.wait_event("watch_opened", 2, WAIT).await;
    assert_eq!(f.records().await.len(), 9);

    // Inserted as running: synced by the watch, not by a cycle.
    registry.insert_one(w4).await.expect("insert");
    testkit::eventually("w4 is synced", WAIT, || async {
        (records_of(&f.records().await, &ids[4]) == 3).then_some(())
    })
    .await;
    // Flipped to running: the same.
    set_status(&f, &ids[3], "running").await;
    testkit::eventually("w3 is synced", WAIT, || async {
        (records_of(&f.records().await, &ids[3]) == 3).then_some(())
    })
    .await;
    let discovered: Vec<Value> = d.events("worker_discovered");
    let named: Vec<&str> = discovered
        .iter()
        .filter_map(|l| l["worker_id"].as_str())
        .collect();
    assert_eq!(named, [ids[4].as_str(), ids[3].as_str()], "each once");
    assert_eq!(d.events("cycle_started").len(), 1, "no cycle did it");

    // Stopped: logged once, not synced again (not even on request), its records kept.
    let w0 = f.fleet.fleet.workers[0].clone();
    w0.reset_calls();
    set_status(&f, &ids[0], "stopped").await;
    let stopped = d.wait_event("worker_stopped", 1, WAIT).await;
    assert_eq!(stopped[0]["worker_id"], ids[0].as_str());
    let (_api, base) = f.spawn_api("api", &NO_CYCLES).await;
    let (status, _, problem) = post(&base, &ids[0], "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["status"], 409);
    // A later change of the registry (another worker moves back to stopped and running)
    // syncs only that one.
    set_status(&f, &ids[1], "stopped").await;
    d.wait_event("worker_stopped", 2, WAIT).await;
    set_status(&f, &ids[1], "running").await;
    d.wait_event("worker_discovered", 3, WAIT).await;
    testkit::eventually("w1 synced again", WAIT, || async {
        (syncs_of(&d, &ids[1]) == 2).then_some(())
    })
    .await;
    assert!(
        w0.calls().is_empty(),
        "the stopped worker was not called: {:?}",
        w0.calls()
    );
    assert_eq!(
        records_of(&f.records().await, &ids[0]),
        3,
        "its records stay"
    );
    assert_eq!(d.events("worker_stopped").len(), 2, "each stop once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stopped_off_and_unreachable_are_problems() {
    let f = Fixture::new("refresh_errors", 2, 1).await;
    set_status(&f, &f.fleet.fleet.workers[1].id, "stopped").await;
    let (_api, base) = f.spawn_api("api", &[]).await;
    let (status, _, p) = post(&base, "no-such-worker", "").await;
    assert_eq!(
        (status, p["status"].as_i64()),
        (StatusCode::NOT_FOUND, Some(404)),
        "{p}"
    );
    let (status, _, p) = post(&base, &f.fleet.fleet.workers[1].id, "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{p}");
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("stopped")),
        "{p}"
    );
    let (status, _, p) = post(&base, &f.fleet.fleet.workers[0].id, "?wait=31s").await;
    assert_eq!(
        (status, p["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("wait")),
        "{p}"
    );
    let (status, _, p) = post(&base, &f.fleet.fleet.workers[0].id, "?force=1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");
    let (status, _) = get(&base, "/api/sync-requests/no-such-request").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // No daemon runs: recorded, pending, and a wait ends with it still pending.
    let (status, headers, pending) = post(&base, &f.fleet.fleet.workers[0].id, "?wait=1s").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    assert_eq!(pending["status"], "pending");
    assert!(headers.contains_key("location"));

    // Switched off: 404, as for any path it does not serve.
    let (_off, off) = f
        .spawn_api("off", &[("CML_LABS_API__REFRESH_ENABLED", "false")])
        .await;
    let (status, _, p) = post(&off, &f.fleet.fleet.workers[0].id, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{p}");
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("api.refresh_enabled")),
        "{p}"
    );

    // MongoDB unreachable: 503, a problem that says nothing of the cause.
    let (_down, down) = f
        .spawn_api(
            "down",
            &[
                (
                    "CML_LABS_MONGODB__URI",
                    "mongodb://127.0.0.1:9/?directConnection=true",
                ),
                ("CML_LABS_MONGODB__SERVER_SELECTION_TIMEOUT", "300ms"),
            ],
        )
        .await;
    let (status, headers, p) = post(&down, &f.fleet.fleet.workers[0].id, "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{p}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(!p.to_string().contains("127.0.0.1:9"), "{p}");
}

/// Storms of 500 concurrent refreshes of one worker, split over two lab-api replicas while
/// the lease holder serves the first at once: exactly one is accepted and one sync made, each
/// storm (a worker each, so each storm starts from a worker never refreshed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storms_of_refreshes_over_two_replicas_make_one_request_and_one_sync() {
    const STORMS: usize = 6;
    const POSTS: usize = 500;
    let f = Fixture::new("refresh_storms", STORMS, 2).await;
    let env = [
        NO_CYCLES[0],
        ("CML_LABS_SYNC__RUN_IMMEDIATELY", "false"),
        ("CML_LABS_SYNC__REFRESH_MIN_INTERVAL", "1h"),
    ];
    let d = f.spawn("daemon", &env);
    wait_metric(&d.admin_base().await, "sync_lease_held", &[], 1.0, WAIT).await;
    let (_a, a) = f.spawn_api("a", &env).await;
    let (_b, b) = f.spawn_api("b", &env).await;
    let client = reqwest::Client::new();
    let mut counts = Vec::new();
    for w in &f.fleet.fleet.workers {
        let posts = (0..POSTS).map(|i| {
            let url = format!(
                "{}/api/workers/{}/labs/refresh",
                if i % 2 == 0 { &a } else { &b },
                w.id
            );
            let client = client.clone();
            tokio::spawn(async move {
                let r = client.post(url).send().await.expect("post");
                let status = r.status();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            })
        });
        let answers = futures::future::join_all(posts).await;
        let mut accepted = Vec::new();
        let mut throttled = 0;
        for answer in answers {
            match answer.expect("task") {
                (StatusCode::ACCEPTED, body) => accepted.push(body["id"].clone()),
                (StatusCode::TOO_MANY_REQUESTS, _) => throttled += 1,
                (status, body) => panic!("worker {}: {status} {body}", w.id),
            }
        }
        assert_eq!(accepted.len(), 1, "worker {}: {accepted:?}", w.id);
        let id = accepted[0].as_str().expect("id");
        request_in(&a, id, "done").await;
        let requests =
            f.db.db
                .collection::<Document>("sync_requests")
                .count_documents(doc! { "worker_id": &w.id })
                .await
                .expect("count");
        assert_eq!(requests, 1, "worker {}", w.id);
        assert_eq!(
            w.calls().get("populate_lab_tiles"),
            Some(&1),
            "worker {}: {:?}",
            w.id,
            w.calls()
        );
        counts.push((accepted.len(), throttled));
    }
    assert_eq!(syncs_of(&d, &f.fleet.fleet.workers[0].id), 1);
    eprintln!("storms (accepted, throttled): {counts:?}");
}

/// With CML's streams on, a refresh joins the sync the stream's relist started: one sync, one
/// status write, one `worker.data.refreshed` on the live stream, however many passes waited
/// on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sync_is_one_status_and_one_event_however_many_passes_wait_on_it() {
    let f = Fixture::new("refresh_one_event", 3, 2).await;
    let env = [
        NO_CYCLES[0],
        ("CML_LABS_SYNC__RUN_IMMEDIATELY", "false"),
        ("CML_LABS_SYNC__EVENTS__ENABLED", "true"),
    ];
    let w = f.fleet.fleet.workers[2].clone();
    assert!(w.has_event_stream());
    // The relist's listing waits at the gate: the test knows it is in flight.
    w.set_faults(Faults {
        hold_endpoint: Some("populate_lab_tiles".into()),
        ..Faults::default()
    });
    let (_api, base) = f.spawn_api("api", &env).await;
    let mut sse = SseStream::open(
        &format!("{base}/api/events/stream?worker_ids={}", w.id),
        &[],
    )
    .await
    .unwrap_or_else(|r| panic!("the stream was refused: {}", r.status()));
    assert_eq!(sse.expect(WAIT).await.event, "connected");
    let d = f.spawn("daemon", &env);
    testkit::eventually("the relist is syncing w", WAIT, || async {
        w.calls().contains_key("populate_lab_tiles").then_some(())
    })
    .await;
    let (status, _, pending) = post(&base, &w.id, "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    let id = pending["id"].as_str().expect("id").to_owned();
    request_in(&base, &id, "running").await;
    d.wait_event("refresh_started", 1, WAIT).await;
    w.set_faults(Faults::default());
    request_in(&base, &id, "done").await;
    // The stream is read until it stays quiet past a heartbeat: whatever the sync wrote has
    // been told by then.
    let mut frames = Vec::new();
    while let Ok(frame) = sse.next(Duration::from_secs(3)).await {
        if frame.event != "heartbeat" {
            frames.push(frame);
        }
    }
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
    assert_eq!(syncs_of(&d, &w.id), 1, "one sync for both");
    assert_eq!(w.calls().get("populate_lab_tiles"), Some(&1));
    assert_eq!(count(&frames, "worker.data.refreshed"), 1, "{kinds:?}");
}
