//! lab-api as a service in this process, on a real socket: port 0, the address read from the
//! value, a graceful stop.

use lab_api::app::App;
use shared::{
    config::{AuthMode, Config},
    secret::Secret,
};
use testkit::TestDb;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_the_port_it_picked_and_stops_on_request() {
    let db = TestDb::new("api_socket_inproc").await;
    let mut config = Config::default();
    config.mongodb.uri = Secret::new(db.uri.clone());
    config.mongodb.database = db.name().to_owned();
    config.api.listen = "127.0.0.1:0".into();
    config.api.auth.mode = AuthMode::None;
    let app = App::build(&config).await.expect("builds");
    let addr = app.local_addr();
    assert_ne!(addr.port(), 0, "a real port was picked");
    let registry = app.registry();
    let up = move || {
        registry
            .render()
            .lines()
            .any(|l| l.starts_with("events_change_stream_up") && l.ends_with(" 1"))
    };
    assert!(!up(), "building starts nothing");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(app.run(stop.clone()));
    let base = format!("http://{addr}");
    let labs = reqwest::get(format!("{base}/api/workers/w1/labs"))
        .await
        .expect("answers");
    assert_eq!(labs.status(), 200);
    assert_eq!(labs.text().await.expect("body"), "[]");
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .expect("answers")
            .status(),
        200
    );
    // Running follows the change stream.
    let following = async {
        while !up() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), following)
        .await
        .expect("the change stream is followed once running");
    stop.cancel();
    serving.await.expect("joined").expect("stopped cleanly");
    assert!(!up(), "the follower ended before run returned");
    assert!(
        reqwest::get(format!("{base}/healthz")).await.is_err(),
        "the port is closed after the stop"
    );
}

/// Over HTTP/2 (h2c, as an ingress may speak it) there is no `Host` header, only
/// `:authority`: a same-origin refresh is let through, another site's is refused, as over
/// HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cross_site_guard_reads_the_authority_over_http2_too() {
    let db = TestDb::new("api_socket_h2c").await;
    let mut config = Config::default();
    config.mongodb.uri = Secret::new(db.uri.clone());
    config.mongodb.database = db.name().to_owned();
    config.api.listen = "127.0.0.1:0".into();
    config.api.auth.mode = AuthMode::None;
    let app = App::build(&config).await.expect("builds");
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(app.run(stop.clone()));
    let url = format!("http://{addr}/api/workers/w1/labs/refresh");
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let h1 = reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client");
    for (client, version) in [
        (&h2, reqwest::Version::HTTP_2),
        (&h1, reqwest::Version::HTTP_11),
    ] {
        let same = client
            .post(&url)
            .header("origin", format!("http://{addr}"))
            .send()
            .await
            .expect("answers");
        assert_eq!(same.version(), version);
        // Past the guard: the worker is simply unknown.
        assert_eq!(same.status(), 404, "{version:?}");
        let foreign = client
            .post(&url)
            .header("origin", "https://elsewhere.example")
            .send()
            .await
            .expect("answers");
        assert_eq!(foreign.status(), 403, "{version:?}");
    }
    stop.cancel();
    serving.await.expect("joined").expect("stopped cleanly");
}
