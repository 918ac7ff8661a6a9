//! The daemon as a service in this process: built with `App`, its admin address read from the
//! value, against the MongoDB stand-in (or `MONGODB_URI`) and the simulated fleet.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bson::{doc, Document};
use cml_client::CmlClient;
use cml_sim::{FleetConfig, RunningFleet, ServeOptions};
use shared::{config::Config, duration::HumanDuration, secret::Secret};
use sync_daemon::{app::App, context::Context};
use testkit::{eventually, logs::Logs, TestDb};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

async fn fleet(db: &TestDb, workers: usize, labs: usize) -> RunningFleet {
    let fleet = cml_sim::start(
        &FleetConfig {
            workers,
            labs_per_worker: labs,
            ..FleetConfig::default()
        },
        &ServeOptions::default(),
    )
    .await
    .expect("simulator");
    fleet
        .register(&db.client, db.name(), "cml_workers")
        .await
        .expect("registry");
    fleet
}

fn config(db: &TestDb) -> Config {
    let mut c = Config::default();
    c.mongodb.uri = Secret::new(db.uri.clone());
    c.mongodb.database = db.name().to_owned();
    c.cml.password = Secret::new("local-dev-password");
    c.sync.admin_listen = "127.0.0.1:0".into();
    c.sync.interval = HumanDuration::from_secs(3600);
    c.sync.retry_base = HumanDuration(Duration::from_millis(200));
    // These tests count the cycle's CML requests (and fail one on purpose): no event streams.
    c.sync.events.enabled = false;
    c
}

async fn metrics(admin: &str) -> String {
    reqwest::get(format!("{admin}/metrics"))
        .await
        .expect("admin answers")
        .text()
        .await
        .expect("body")
}

async fn status(db: &TestDb, worker: &str) -> Option<Document> {
    db.db
        .collection::<Document>("worker_sync_status")
        .find_one(doc! { "worker_id": worker })
        .await
        .expect("find")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_sync_is_a_recorded_failure_and_is_retried() {
    let logs = Logs::capture();
    let db = TestDb::new("daemon_panic").await;
    let f = fleet(&db, 2, 3).await;
    let bad = f.fleet.workers[0].id.clone();
    let cfg = config(&db);
    // The first request to the bad worker panics inside its sync task; later ones do not.
    let armed = Arc::new(AtomicBool::new(true));
    let trap = {
        let (bad, armed) = (bad.clone(), armed.clone());
        Arc::new(move |t: &cml_client::CmlTarget| {
            if t.worker_id == bad && armed.swap(false, Ordering::SeqCst) {
                panic!("injected by the test");
            }
        })
    };
    let cml = CmlClient::new(&cfg.cml)
        .expect("client")
        .with_request_hook(trap);
    let ctx = Context::with_cml_client(cfg, "test-replica", cml)
        .await
        .expect("context");
    let app = App::new(ctx, "test-replica").await.expect("app");
    let admin = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));

    // Recorded: the status says so, with the panic's message.
    let failed = eventually("the panic is recorded in the status", WAIT, || async {
        status(&db, &bad)
            .await
            .filter(|s| s.get_i64("consecutive_failures") == Ok(1))
    })
    .await;
    let error = failed.get_str("last_error").expect("last_error");
    assert!(
        error.contains("panicked") && error.contains("injected by the test"),
        "{error}"
    );
    // Counted under its own kind.
    let text = metrics(&admin).await;
    assert_eq!(
        testkit::metrics::value(&text, "sync_worker_failures_total", &[("kind", "panic")]),
        Some(1.0),
        "{text}"
    );
    // Retried: the worker heals without a new cycle.
    eventually("the retry syncs the worker", WAIT, || async {
        status(&db, &bad)
            .await
            .filter(|s| s.get_i64("consecutive_failures") == Ok(0))
    })
    .await;
    let records = db
        .db
        .collection::<Document>("lab_records")
        .count_documents(doc! { "worker_id": &bad })
        .await
        .expect("count");
    assert_eq!(records, 3);
    // One log line for the failure, one for the retry it scheduled; the other worker is fine.
    let failures = logs.events("worker_sync_failed");
    let failure = failures
        .iter()
        .find(|l| l["worker_id"] == bad.as_str())
        .expect("a failure line");
    assert_eq!(failure["kind"], "panic");
    assert!(logs
        .events("retry_scheduled")
        .iter()
        .any(|l| l["worker_id"] == bad.as_str() && l["failures"] == 1));
    // Healed by a retry, not by a second cycle (this app's own counters).
    let text = metrics(&admin).await;
    let cycles =
        |outcome| testkit::metrics::value(&text, "sync_cycles_total", &[("outcome", outcome)]);
    assert_eq!(
        (cycles("partial"), cycles("success")),
        (Some(1.0), None),
        "{text}"
    );
    assert_eq!(cycles("retry_success"), Some(1.0), "{text}");

    stop.cancel();
    running.await.expect("joined").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_address_comes_from_the_app_and_serves_probes_and_metrics() {
    let db = TestDb::new("daemon_admin_inproc").await;
    let f = fleet(&db, 2, 4).await;
    let app = App::build(config(&db), "test-replica").await.expect("app");
    let admin = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let req = http.get(format!("{admin}{path}"));
        async move {
            let r = req.send().await.ok()?;
            Some((r.status().as_u16(), r.text().await.ok()?))
        }
    };
    assert_eq!(get("/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(get("/readyz").await.map(|r| r.0), Some(200));
    let text = eventually("both workers synced", WAIT, || async {
        get("/metrics").await.map(|r| r.1).filter(|text| {
            testkit::metrics::value(text, "sync_worker_syncs_total", &[("outcome", "success")])
                == Some(2.0)
        })
    })
    .await;
    assert_eq!(
        testkit::metrics::value(&text, "cml_labs_created_total", &[]),
        Some(8.0)
    );
    assert_eq!(
        testkit::metrics::value(&text, "sync_lease_held", &[]),
        Some(1.0)
    );
    drop(f);
    stop.cancel();
    running.await.expect("joined").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_closes_connections_that_send_nothing() {
    use tokio::io::AsyncReadExt;
    let db = TestDb::new("daemon_admin_limits").await;
    let _f = fleet(&db, 1, 1).await;
    let mut cfg = config(&db);
    cfg.sync.admin_header_read_timeout = HumanDuration(Duration::from_millis(300));
    let app = App::build(cfg, "test-replica").await.expect("app");
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));
    let mut silent = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("closed by the server, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    stop.cancel();
    running.await.expect("joined").expect("clean stop");
}
