//! CML's event stream read by the client, against the simulator: authentication with the
//! worker's token, TLS as the REST client does it, a refused token, the bounds, the ends.

mod common;

use common::{config, target};

use std::time::Duration;

use cml_client::{
    events::{EventLimits, StreamBudget, StreamEnd},
    CmlClient, Error,
};
use cml_sim::{Faults, FleetConfig, Personality, RunningFleet, ServeOptions, WsHostile};
use serde_json::Value;
use shared::config::CmlConfig;

const SILENCE: Duration = Duration::from_secs(5);

async fn fleet(
    personalities: Vec<Personality>,
    stats: Duration,
    opts: ServeOptions,
) -> RunningFleet {
    let cfg = FleetConfig {
        workers: personalities.len(),
        labs_per_worker: 3,
        personalities,
        stats_interval: stats,
        ..FleetConfig::default()
    };
    cml_sim::start(&cfg, &opts).await.expect("simulator starts")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("JSON")
}

#[tokio::test]
async fn a_stream_opened_with_the_worker_s_token_carries_its_changes() {
    let f = fleet(
        vec![Personality::V2_9],
        Duration::from_millis(100),
        ServeOptions::default(),
    )
    .await;
    let w = &f.fleet.workers[0];
    let client = CmlClient::new(&config()).expect("client");
    // The token of a sync is the stream's: one login for both.
    client.fetch_labs(&target(&f, 0)).await.expect("sync");
    let mut s = client
        .open_events(&target(&f, 0), EventLimits::default())
        .await
        .expect("open");
    assert_eq!(w.calls().get("authenticate"), Some(&1));
    assert_eq!(
        json(&s.next(SILENCE).await.expect("stats"))["event_type"],
        "system_stats"
    );
    let lab = w.lab_ids()[0].clone();
    w.update_lab(&lab, |l| l.title = "renamed".into());
    let modified = loop {
        let m = json(&s.next(SILENCE).await.expect("message"));
        if m["event_type"] == "lab_event" {
            break m;
        }
    };
    assert_eq!(
        (modified["event"].as_str(), modified["lab_id"].as_str()),
        (Some("modified"), Some(lab.as_str()))
    );
    s.close(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_refused_token_ends_the_stream_and_a_new_one_is_fetched_after_forgetting_it() {
    let f = fleet(
        vec![Personality::V2_10],
        Duration::from_millis(100),
        ServeOptions::default(),
    )
    .await;
    let w = &f.fleet.workers[0];
    let client = CmlClient::new(&config()).expect("client");
    w.expire_tokens();
    let mut s = client
        .open_events(&target(&f, 0), EventLimits::default())
        .await
        .expect("open");
    // The token is good until the server says otherwise: revoke it now.
    w.expire_tokens();
    let end = loop {
        match s.next(SILENCE).await {
            Ok(_) => continue,
            Err(end) => break end,
        }
    };
    assert_eq!(end, StreamEnd::Unauthorized);
    client.forget_token(&target(&f, 0), s.token()).await;
    let mut again = client
        .open_events(&target(&f, 0), EventLimits::default())
        .await
        .expect("reopen");
    assert_ne!(again.token(), s.token(), "a fresh token");
    assert_eq!(w.calls().get("authenticate"), Some(&2));
    assert!(again.next(SILENCE).await.is_ok());

    w.set_faults(Faults {
        ws_refuse_tokens: 1,
        ..Faults::default()
    });
    let mut refused = client
        .open_events(&target(&f, 0), EventLimits::default())
        .await
        .expect("the upgrade succeeds");
    assert_eq!(refused.next(SILENCE).await, Err(StreamEnd::Unauthorized));
}

#[tokio::test]
async fn what_a_stream_can_make_us_hold_is_bounded_and_its_ends_are_told_apart() {
    let f = fleet(
        vec![Personality::V2_9, Personality::V2_4],
        Duration::from_secs(3600),
        ServeOptions::default(),
    )
    .await;
    let w = &f.fleet.workers[0];
    let client = CmlClient::new(&config()).expect("client");
    let limits = EventLimits {
        max_message_bytes: 64 * 1024,
        ..EventLimits::default()
    };

    // No stats for an hour: silence.
    let mut s = client
        .open_events(&target(&f, 0), limits.clone())
        .await
        .expect("open");
    assert_eq!(
        s.next(Duration::from_millis(300)).await,
        Err(StreamEnd::Silent)
    );

    // Dropped by the server without a close frame.
    let mut s = client
        .open_events(&target(&f, 0), limits.clone())
        .await
        .expect("open");
    w.drop_streams();
    assert!(
        matches!(s.next(SILENCE).await, Err(StreamEnd::Dropped(_))),
        "dropped"
    );

    // A message past the bound ends the stream, garbage does not.
    w.set_faults(Faults {
        ws_garbage: true,
        ws_oversized_bytes: 200 * 1024,
        ..Faults::default()
    });
    let mut s = client
        .open_events(&target(&f, 0), limits.clone())
        .await
        .expect("open");
    assert_eq!(
        s.next(SILENCE).await.expect("garbage is a message"),
        "<<not json"
    );
    assert_eq!(s.next(SILENCE).await, Err(StreamEnd::TooLarge));

    // No stream before 2.6 (404), and a redirect is never followed.
    let err = client
        .open_events(&target(&f, 1), limits.clone())
        .await
        .expect_err("2.4 has no stream");
    assert!(matches!(err, Error::Status { status: 404, .. }), "{err:?}");
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let to = format!("http://{}/ws/ui", elsewhere.local_addr().expect("addr"));
    w.set_faults(Faults {
        redirect_ws_to: Some(to.clone()),
        ..Faults::default()
    });
    let err = client
        .open_events(&target(&f, 0), limits.clone())
        .await
        .expect_err("redirected");
    assert!(
        matches!(&err, Error::Redirect { status: 302, location, .. } if *location == to),
        "{err:?}"
    );
    let followed = tokio::time::timeout(Duration::from_millis(300), elsewhere.accept()).await;
    assert!(followed.is_err(), "the redirect was followed");
}

#[tokio::test]
async fn streams_use_the_rest_client_s_tls_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ServeOptions {
        tls: true,
        state_dir: Some(dir.path().to_owned()),
        ..ServeOptions::default()
    };
    let f = fleet(vec![Personality::V2_10], Duration::from_millis(100), opts).await;
    let t = target(&f, 0);
    assert!(t.endpoint.starts_with("https://"));
    // Without the simulator's CA the login fails before any stream (the stream's own check is
    // a unit test of `events`).
    let ca = f
        .ca_path
        .clone()
        .expect("CA")
        .to_string_lossy()
        .into_owned();
    let trusted = CmlClient::new(&CmlConfig {
        ca_bundle: ca,
        ..config()
    })
    .expect("client");
    let mut s = trusted
        .open_events(&t, EventLimits::default())
        .await
        .expect("trusted");
    assert!(s.next(SILENCE).await.is_ok());

    let insecure = CmlClient::new(&CmlConfig {
        verify_tls: false,
        ..config()
    })
    .expect("client");
    let mut s = insecure
        .open_events(&t, EventLimits::default())
        .await
        .expect("unverified");
    assert!(s.next(SILENCE).await.is_ok());
}

fn hostile(how: WsHostile) -> Faults {
    Faults {
        ws_hostile: Some(how),
        ..Faults::default()
    }
}

/// A hostile server makes a stream end with its own reason, never grow: pings count as frames
/// and never as life, and what a stream holds (an unfinished message and an unfinished frame together) is bounded, alone and
/// with the others.
#[tokio::test]
async fn hostile_streams_end_with_their_reason_and_never_hold_more_than_their_bounds() {
    let f = fleet(
        vec![Personality::V2_9, Personality::V2_10],
        Duration::from_secs(3600),
        ServeOptions::default(),
    )
    .await;
    let (a, b) = (&f.fleet.workers[0], &f.fleet.workers[1]);
    let client = CmlClient::new(&config()).expect("client");
    let budget = StreamBudget::new(100 * 1024);
    let limits = EventLimits {
        max_message_bytes: 64 * 1024,
        max_frames_per_second: 1000,
        budget: budget.clone(),
    };
    let open = |i: usize| {
        let (client, limits, t) = (&client, limits.clone(), target(&f, i));
        async move { client.open_events(&t, limits).await.expect("open") }
    };

    // A ping flood: more frames a second than allowed.
    a.set_faults(hostile(WsHostile::Pings {
        per_second: 0,
        text_every_ms: 0,
    }));
    assert_eq!(open(0).await.next(SILENCE).await, Err(StreamEnd::Flooded));

    // Pings every 100 ms and no text: silent, whatever the pings.
    a.set_faults(hostile(WsHostile::Pings {
        per_second: 10,
        text_every_ms: 0,
    }));
    let started = tokio::time::Instant::now();
    assert_eq!(
        open(0).await.next(Duration::from_millis(800)).await,
        Err(StreamEnd::Silent)
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{started:?}");

    // An unfinished message (40 KiB) and an unfinished frame (40 KiB): each within the
    // message bound, together past what one stream may hold.
    a.set_faults(hostile(WsHostile::Unfinished { bytes: 40 * 1024 }));
    assert_eq!(open(0).await.next(SILENCE).await, Err(StreamEnd::TooLarge));
    assert_eq!(budget.held(), 0, "an ended stream holds nothing");

    // Two streams each within their bound, together past the budget: the one holding the
    // most ends, the other goes on.
    a.set_faults(hostile(WsHostile::Unfinished { bytes: 30 * 1024 }));
    b.set_faults(hostile(WsHostile::Unfinished { bytes: 25 * 1024 }));
    let mut alone = open(0).await;
    assert_eq!(
        alone.next(Duration::from_millis(500)).await,
        Err(StreamEnd::Silent),
        "alone within the budget"
    );
    drop(alone);
    let mut big = open(0).await;
    let mut small = open(1).await;
    let (big_end, small_end) = tokio::join!(big.next(SILENCE), small.next(Duration::from_secs(2)));
    assert_eq!(big_end, Err(StreamEnd::OverBudget));
    assert_eq!(small_end, Err(StreamEnd::Silent));
    drop(big);
    assert!(budget.held() <= 100 * 1024, "{budget:?}");
    drop(small);
    assert_eq!(budget.held(), 0, "{budget:?}");
}
