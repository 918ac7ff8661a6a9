//! lab-api end to end: the real binary on a real socket, data written by a real sync.

use std::time::Duration;

use serde_json::Value;
use system_tests::Fixture;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_what_the_daemon_synced_over_a_real_socket() {
    let f = Fixture::new("api_socket", 2, 6).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let (mut api, base) = f.spawn_api("api", &[]).await;
    assert_eq!(api.events("auth_disabled").len(), 1, "mode none warns");
    let http = reqwest::Client::new();
    let w = &f.fleet.fleet.workers[0];
    let r = http
        .get(format!("{base}/api/workers/{}/labs", w.id))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    let etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("etag")
        .to_owned();
    let labs: Vec<Value> = r.json().await.expect("json");
    let mut expected: Vec<(String, String)> =
        w.labs().into_iter().map(|l| (l.title, l.id)).collect();
    expected.sort();
    let got: Vec<(String, String)> = labs
        .iter()
        .map(|l| {
            (
                l["title"].as_str().expect("t").to_owned(),
                l["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    assert_eq!(got, expected, "every lab, sorted by title then id");
    let r = http
        .get(format!("{base}/api/workers/{}/labs", w.id))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 304);
    api.signal(libc::SIGTERM);
    assert!(
        api.wait_exit(Duration::from_secs(15)).await.success(),
        "graceful shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_is_a_quick_503_and_both_recover_by_themselves() {
    let Some(mut server) = testkit::own_stand_in() else {
        return;
    };
    let db = testkit::TestDb::on(&server.uri(), "api_mongo_down").await;
    let f = Fixture::on(db, 1, 3).await;
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let (mut api, base) = f
        .spawn_api(
            "api",
            &[("CML_LABS_MONGODB__SERVER_SELECTION_TIMEOUT", "2s")],
        )
        .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let labs = format!("{base}/api/workers/{}/labs", f.fleet.fleet.workers[0].id);
    assert_eq!(http.get(&labs).send().await.expect("GET").status(), 200);

    server.stop();
    let r = http.get(&labs).send().await.expect("GET");
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body = r.text().await.expect("body");
    assert!(
        !body.contains("127.0.0.1") && !body.to_lowercase().contains("server selection"),
        "no internals: {body}"
    );
    // Within the server selection timeout (2 s), not the client's 20 s: the problem says
    // "unavailable", which only the store's own error gives.
    assert!(body.contains("/unavailable"), "{body}");
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .expect("GET")
            .status(),
        503
    );
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .expect("GET")
            .status(),
        200,
        "alive all the same"
    );

    server.restart().expect("restart");
    testkit::eventually(
        "readyz and the labs answer 200 again",
        Duration::from_secs(30),
        || async {
            let status =
                |r: reqwest::Result<reqwest::Response>| r.map(|r| r.status().as_u16()).ok();
            let ready = status(http.get(format!("{base}/readyz")).send().await)?;
            let data = status(http.get(&labs).send().await)?;
            (ready == 200 && data == 200).then_some(())
        },
    )
    .await;
    api.signal(libc::SIGTERM);
    assert!(api.wait_exit(Duration::from_secs(15)).await.success());
}

/// The fleet view end to end: after the daemon's first cycle every registry worker is listed,
/// the one stopped before it ever synced too (with the registry's name and region, never
/// synced); a worker stopped later shows as stopped without another cycle (the registry
/// watch); the daemon's gauges count what the view lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_lists_every_registry_worker_and_follows_the_registry() {
    const WAIT: Duration = Duration::from_secs(30);
    let f = Fixture::new("api_fleet_view", 4, 2).await;
    let workers = f.fleet.fleet.workers.clone();
    let registry = f.db.db.collection::<bson::Document>("cml_workers");
    let set_status = |id: String, status: &'static str| {
        let registry = registry.clone();
        async move {
            registry
                .update_one(
                    bson::doc! { "id": id },
                    bson::doc! { "$set": { "status": status } },
                )
                .await
                .expect("registry");
        }
    };
    set_status(workers[3].id.clone(), "stopped").await;
    let d = f.spawn("daemon", &[("CML_LABS_SYNC__INTERVAL", "1h")]);
    d.wait_event("cycle_completed", 1, WAIT).await;
    d.wait_event("watch_opened", 2, WAIT).await;
    let (_api, base) = f.spawn_api("api", &[]).await;
    let fleet = || async {
        let page: Value = reqwest::get(format!("{base}/api/sync-status"))
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        page["items"].as_array().expect("items").clone()
    };
    let items = fleet().await;
    let ids: Vec<&str> = items
        .iter()
        .filter_map(|i| i["worker_id"].as_str())
        .collect();
    // The stopped one first (stale: never synced), then the healthy by their success.
    assert_eq!(ids.len(), 4, "{items:?}");
    assert_eq!(ids[0], workers[3].id);
    let stopped = &items[0];
    assert_eq!(stopped["registry_status"], "stopped");
    assert_eq!(stopped["name"], workers[3].name.as_str());
    assert_eq!(stopped["aws_region"], workers[3].aws_region.as_str());
    assert_eq!(stopped["last_attempt_at"], Value::Null);
    assert_eq!(
        (&stopped["stale"], &stopped["failing"]),
        (&Value::Bool(true), &Value::Bool(false))
    );
    for synced in &items[1..] {
        assert_eq!(synced["registry_status"], "running", "{synced}");
        assert_eq!(synced["stale"], false, "{synced}");
        assert!(synced["last_attempt_at"].is_string(), "{synced}");
    }
    let never = reqwest::get(format!("{base}/api/workers/{}/sync-status", workers[3].id))
        .await
        .expect("GET");
    assert_eq!(never.status(), 404);
    let admin = d.admin_base().await;
    system_tests::wait_metric(&admin, "sync_workers", &[("state", "known")], 4.0, WAIT).await;
    let text =
        system_tests::wait_metric(&admin, "sync_workers", &[("state", "stale")], 0.0, WAIT).await;
    // Only workers meant to be synced count as stale: not the stopped one.
    assert_eq!(
        testkit::metrics::value(&text, "sync_workers", &[("state", "stale")]),
        Some(0.0)
    );

    // Stopped later: the view says so without another cycle.
    set_status(workers[0].id.clone(), "stopped").await;
    testkit::eventually("the view shows the worker stopped", WAIT, || async {
        fleet()
            .await
            .iter()
            .any(|i| i["worker_id"] == workers[0].id.as_str() && i["registry_status"] == "stopped")
            .then_some(())
    })
    .await;
    assert_eq!(d.events("cycle_started").len(), 1, "no cycle did it");
}
