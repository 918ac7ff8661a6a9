//! lab-api end to end: the real binary on a real socket, data written by a real sync.

use std::time::Duration;

use serde_json::Value;
use system_tests::Fixture;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_what_the_daemon_synced_over_a_real_socket() {
    let f = Fixture::new("api_socket", 2, 6).await;
    assert!(f.once(&[]).await.status.success());
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
    assert!(f.once(&[]).await.status.success());
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
