//! `labs-bench live`: lab changes made on simulated CML servers (through the simulator's
//! control API, as a user in CML's UI would) at a steady rate, spread at random over the
//! fleet's labs, and timed until each one reaches every event-stream client of lab-api: from
//! the change to its write in MongoDB (the envelope's `time`) and from the write to the client.
//! Also counts the CML calls the fleet served meanwhile.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bson::DateTime;
use futures::{stream, StreamExt};
use serde_json::Value;
use tokio::sync::watch;

/// The title prefix of the changes made here (what the clients look for).
const PREFIX: &str = "live-bench ";

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub control: String,
    pub api: String,
    pub rate: f64,
    pub seconds: u64,
    pub streams: usize,
}

/// What one client saw of the changes: by change, (write time, arrival time), ms since epoch.
type Seen = HashMap<u64, (i64, i64)>;

pub async fn run(s: Settings) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let workers: Vec<Value> = http
        .get(format!("{}/workers", s.control))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let ids: Vec<String> = workers
        .iter()
        .filter(|w| w["event_stream"] == true)
        .filter_map(|w| w["id"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(!ids.is_empty(), "no worker with an event stream");
    let labs = lab_ids(&http, &s.control, &ids).await?;
    let calls_before = calls(&http, &s.control, &ids).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = Vec::new();
    let mut seen: Vec<Arc<Mutex<Seen>>> = Vec::new();
    for i in 0..s.streams {
        let resp = http_stream()?
            .get(format!("{}/api/events/stream", s.api))
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("stream {i}"))?;
        anyhow::ensure!(resp.status() == 200, "stream {i}: {}", resp.status());
        let mine: Arc<Mutex<Seen>> = Arc::default();
        seen.push(mine.clone());
        readers.push(tokio::spawn(read(resp, mine, stop_rx.clone())));
    }
    eprintln!("{} streams connected", s.streams);

    // The changes: one every 1/rate s, each on a lab picked at random (never the same lab
    // twice in a row), made by a task of its own so a slow one delays no other.
    let total = (s.rate * s.seconds as f64).round() as u64;
    let made: Arc<Mutex<HashMap<u64, i64>>> = Arc::default();
    let mut rng = Lcg(0x5eed);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..total {
        let at = started + Duration::from_secs_f64(n as f64 / s.rate);
        tokio::time::sleep_until(at.into()).await;
        let (worker, lab_list) = &labs[rng.below(labs.len())];
        let lab = lab_list[rng.below(lab_list.len())].clone();
        let url = format!("{}/workers/{worker}/labs/{lab}", s.control);
        let (http, made) = (http.clone(), made.clone());
        tasks.push(tokio::spawn(async move {
            let sent = DateTime::now().timestamp_millis();
            let body = serde_json::json!({ "title": format!("{PREFIX}{n}") });
            let ok = http
                .patch(url)
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                made.lock().expect("made").insert(n, sent);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let changes = made.lock().expect("made").clone();
    // Every client gets every change, or 30 s pass.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let done = seen
            .iter()
            .all(|m| m.lock().expect("seen").len() >= changes.len());
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_tx.send(true)?;
    let calls_after = calls(&http, &s.control, &ids).await?;

    let (mut total_ms, mut to_write, mut to_client) = (Vec::new(), Vec::new(), Vec::new());
    let mut missing = 0usize;
    for m in &seen {
        let m = m.lock().expect("seen");
        for (n, sent) in &changes {
            match m.get(n) {
                Some((written, arrived)) => {
                    total_ms.push((arrived - sent).max(0));
                    to_client.push((arrived - written).max(0));
                }
                None => missing += 1,
            }
        }
    }
    // The age of a change before it is in MongoDB, once per change (the first client's view
    // of its write time; every client sees the same).
    if let Some(first) = seen.first() {
        let m = first.lock().expect("seen");
        for (n, sent) in &changes {
            if let Some((written, _)) = m.get(n) {
                to_write.push((written - sent).max(0));
            }
        }
    }
    for r in readers {
        r.abort();
    }
    let stats = |v: &mut Vec<i64>| {
        v.sort_unstable();
        let pct = |p: f64| {
            v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<i64>() as f64 / v.len() as f64
        };
        serde_json::json!({ "p50": pct(0.5), "p99": pct(0.99), "max": v.last().copied().unwrap_or(0), "mean": mean })
    };
    let cml_calls: u64 = calls_after
        .iter()
        .map(|(k, v)| v.saturating_sub(calls_before.get(k).copied().unwrap_or(0)))
        .sum();
    let by_endpoint: HashMap<&String, u64> = calls_after
        .iter()
        .map(|(k, v)| {
            (
                k,
                v.saturating_sub(calls_before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "workers": ids.len(), "changes": changes.len(), "streams": s.streams,
            "missing": missing, "seconds": started.elapsed().as_secs_f64(),
            "total_ms": stats(&mut total_ms), "to_write_ms": stats(&mut to_write),
            "write_to_client_ms": stats(&mut to_client),
            "cml_calls": cml_calls, "cml_calls_by_endpoint": by_endpoint,
        })
    );
    Ok(())
}

fn http_stream() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

/// `GET {control}/workers/{id}/{what}` of every worker (16 at a time), with its id.
async fn of_each_worker(
    http: &reqwest::Client,
    control: &str,
    ids: &[String],
    what: &str,
) -> anyhow::Result<Vec<(String, Value)>> {
    stream::iter(ids.iter().cloned())
        .map(|id| async move {
            let body: Value = http
                .get(format!("{control}/workers/{id}/{what}"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok((id, body))
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Each worker's lab ids (workers without labs left out).
async fn lab_ids(
    http: &reqwest::Client,
    control: &str,
    ids: &[String],
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let labs = of_each_worker(http, control, ids, "labs").await?;
    Ok(labs
        .into_iter()
        .map(|(id, labs)| {
            let labs = labs
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["id"].as_str().map(str::to_owned))
                .collect::<Vec<_>>();
            (id, labs)
        })
        .filter(|(_, labs)| !labs.is_empty())
        .collect())
}

/// The REST calls every worker served so far, by endpoint (the event stream's upgrades left
/// out: they are not calls for labs).
async fn calls(
    http: &reqwest::Client,
    control: &str,
    ids: &[String],
) -> anyhow::Result<HashMap<String, u64>> {
    let mut total = HashMap::new();
    for (_, calls) in of_each_worker(http, control, ids, "calls").await? {
        let calls: HashMap<String, u64> = serde_json::from_value(calls)?;
        for (endpoint, n) in calls {
            if endpoint != "ws_ui" {
                *total.entry(endpoint).or_insert(0) += n;
            }
        }
    }
    Ok(total)
}

/// Reads one stream until told to stop, noting each change of ours it carries: when it was
/// written (the envelope's `time`) and when it arrived.
async fn read(
    mut resp: reqwest::Response,
    seen: Arc<Mutex<Seen>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            _ = stop.changed() => return,
            c = resp.chunk() => c,
        };
        match chunk {
            Ok(Some(bytes)) => buf.extend_from_slice(&bytes),
            _ => return,
        }
        let arrived = DateTime::now().timestamp_millis();
        let mut consumed = 0;
        while let Some(end) = find(&buf[consumed..], b"\n\n") {
            let frame = &buf[consumed..consumed + end];
            consumed += end + 2;
            if let Some((n, written)) = ours(frame) {
                seen.lock()
                    .expect("seen")
                    .entry(n)
                    .or_insert((written, arrived));
            }
        }
        buf.drain(..consumed);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A `worker.labs.updated` frame of one of our changes: its number and write time.
fn ours(frame: &[u8]) -> Option<(u64, i64)> {
    let text = std::str::from_utf8(frame).ok()?;
    if !text.contains("event: worker.labs.updated") {
        return None;
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data: "))?;
    let envelope: Value = serde_json::from_str(data).ok()?;
    let n = envelope["data"]["title"]
        .as_str()?
        .strip_prefix(PREFIX)?
        .parse()
        .ok()?;
    let written = DateTime::parse_rfc3339_str(envelope["time"].as_str()?).ok()?;
    Some((n, written.timestamp_millis()))
}

/// A small deterministic generator (the same changes every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}
