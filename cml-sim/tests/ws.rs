//! The simulator's `/ws/ui` event stream, read as a client reads it: first-message
//! authentication, the messages of every change, the periodic stats, and the stream's faults.

use std::time::Duration;

use cml_sim::{Faults, FleetConfig, Personality, RunningFleet, ServeOptions, SimWorker};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::{connect_async, tungstenite::Message, MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

async fn fleet(personalities: Vec<Personality>) -> RunningFleet {
    let cfg = FleetConfig {
        workers: personalities.len(),
        labs_per_worker: 3,
        personalities,
        stats_interval: Duration::from_millis(100),
        ..FleetConfig::default()
    };
    cml_sim::start(&cfg, &ServeOptions::default())
        .await
        .expect("simulator starts")
}

async fn token(f: &RunningFleet, w: &SimWorker) -> String {
    let url = format!("{}/api/v0/authenticate", f.endpoint(&w.id));
    reqwest::Client::new()
        .post(url)
        .json(&json!({ "username": "admin", "password": "local-dev-password" }))
        .send()
        .await
        .expect("login")
        .json::<String>()
        .await
        .expect("token")
}

fn ws_url(f: &RunningFleet, w: &SimWorker) -> String {
    format!("{}/ws/ui", f.endpoint(&w.id).replacen("http", "ws", 1))
}

/// A stream opened and authenticated with `token`.
async fn open(f: &RunningFleet, w: &SimWorker, token: &str) -> Socket {
    let (mut socket, response) = connect_async(ws_url(f, w)).await.expect("upgrade");
    assert_eq!(response.status(), 101);
    let hello = json!({ "token": token, "client_uuid": "6f3c2a9e-0000-4000-8000-000000000001" });
    socket
        .send(Message::text(hello.to_string()))
        .await
        .expect("hello");
    socket
}

/// The next text message as JSON, or what ended the stream.
async fn next(socket: &mut Socket) -> Result<Value, String> {
    loop {
        let frame = tokio::time::timeout(WAIT, socket.next())
            .await
            .map_err(|_| "no message within the wait".to_owned())?;
        match frame {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).map_err(|e| format!("not JSON: {e}: {t}"))
            }
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("error: {e}")),
            None => return Err("ended".into()),
        }
    }
}

/// Messages until one of `event_type`/`event` comes (stats and others skipped).
async fn until(socket: &mut Socket, event_type: &str, event: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = next(socket).await.expect("a message");
        let done = m["event_type"] == event_type && m["event"] == event;
        seen.push(m);
        if done {
            return seen;
        }
    }
}

/// The close frame a stream ends with.
async fn close_of(socket: &mut Socket) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => panic!("no close frame"),
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn an_authenticated_stream_gets_every_change_and_the_stats() {
    let f = fleet(vec![Personality::V2_9, Personality::V2_10]).await;
    for w in &f.fleet.workers {
        let token = token(&f, w).await;
        let mut s = open(&f, w, &token).await;
        let stats = next(&mut s).await.expect("stats come by themselves");
        assert_eq!(stats["event_type"], "system_stats", "{stats}");
        let lab = w.labs().remove(0);
        let target = if lab.state == "STARTED" {
            "STOPPED"
        } else {
            "STARTED"
        };
        w.update_lab(&lab.id, |l| {
            l.state = target.into();
            l.title = "renamed".into();
            l.node_count = 2;
        });
        let seen = until(&mut s, "lab_event", "state").await;
        let changes: Vec<&Value> = seen
            .iter()
            .filter(|m| m["event_type"] != "system_stats" && m["event_type"] != "lab_stats")
            .collect();
        assert_eq!(changes[0]["event_type"], "lab_event");
        assert_eq!(changes[0]["event"], "modified");
        assert_eq!(changes[0]["data"]["title"], "renamed");
        assert!(changes.iter().all(|m| m["lab_id"] == lab.id.as_str()));
        assert!(changes
            .iter()
            .any(|m| m["event_type"] == "state_change" && m["element_type"] == "node"));
        assert_eq!(
            changes.last().map(|m| &m["data"]["state"]),
            Some(&json!(target))
        );

        let added = w.create_lab(None);
        let seen = until(&mut s, "lab_event", "created").await;
        assert_eq!(seen.last().map(|m| &m["lab_id"]), Some(&json!(added)));
        w.delete_lab(&added);
        let seen = until(&mut s, "lab_event", "deleted").await;
        assert_eq!(seen.last().map(|m| &m["lab_id"]), Some(&json!(added)));
        if target == "STARTED" {
            until(&mut s, "lab_stats", "lab_stats").await;
        }
        assert_eq!(w.open_streams(), 1);
        s.close(None).await.expect("close");
    }
}

#[tokio::test]
async fn a_bad_token_or_a_refused_one_is_closed_with_3000() {
    let f = fleet(vec![Personality::V2_10]).await;
    let w = &f.fleet.workers[0];
    for bad in ["not-a-token", ""] {
        let mut s = open(&f, w, bad).await;
        assert_eq!(close_of(&mut s).await, (3000, "Unauthorized".into()));
    }
    let (mut s, _) = connect_async(ws_url(&f, w)).await.expect("upgrade");
    s.send(Message::text("{\"no\": \"token\"}"))
        .await
        .expect("send");
    assert_eq!(close_of(&mut s).await.0, 3000);

    let good = token(&f, w).await;
    w.set_faults(Faults {
        ws_refuse_tokens: 1,
        ..Faults::default()
    });
    let mut s = open(&f, w, &good).await;
    assert_eq!(close_of(&mut s).await.0, 3000, "refused once");
    let mut s = open(&f, w, &good).await;
    assert_eq!(
        next(&mut s).await.expect("stats")["event_type"],
        "system_stats"
    );

    // A token that expires mid-stream ends it the same way.
    w.expire_tokens();
    assert_eq!(close_of(&mut s).await, (3000, "Unauthorized".into()));
}

#[tokio::test]
async fn dropped_streams_end_without_a_close_frame() {
    let f = fleet(vec![Personality::V2_9]).await;
    let w = &f.fleet.workers[0];
    let token = token(&f, w).await;
    let mut a = open(&f, w, &token).await;
    let mut b = open(&f, w, &token).await;
    next(&mut a).await.expect("a is open");
    next(&mut b).await.expect("b is open");
    assert_eq!(w.open_streams(), 2);
    w.drop_streams();
    for s in [&mut a, &mut b] {
        let end = loop {
            match next(s).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(!end.starts_with("closed"), "{end}");
    }
    testkit_wait(|| w.open_streams() == 0).await;
}

async fn testkit_wait(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_stream_s_faults_and_a_server_without_one() {
    let f = fleet(vec![Personality::V2_4, Personality::V2_9]).await;
    let (old, w) = (&f.fleet.workers[0], &f.fleet.workers[1]);
    let err = connect_async(ws_url(&f, old))
        .await
        .expect_err("2.4 has no stream");
    assert!(err.to_string().contains("404"), "{err}");

    w.set_faults(Faults {
        redirect_ws_to: Some("http://elsewhere.invalid/ws/ui".into()),
        ..Faults::default()
    });
    let err = connect_async(ws_url(&f, w)).await.expect_err("redirected");
    assert!(err.to_string().contains("302"), "{err}");

    let token = token(&f, w).await;
    w.set_faults(Faults {
        ws_garbage: true,
        ws_oversized_bytes: 100_000,
        ..Faults::default()
    });
    let mut s = open(&f, w, &token).await;
    assert!(next(&mut s)
        .await
        .expect_err("garbage")
        .starts_with("not JSON"));
    let big = next(&mut s).await.expect("oversized but JSON");
    assert!(big["data"].as_str().is_some_and(|d| d.len() == 100_000));
    assert_eq!(w.calls().get("ws_ui"), Some(&2));
}
