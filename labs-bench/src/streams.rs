//! `labs-bench streams`: many event-stream clients on one lab-api, each timing every event
//! from its write in MongoDB (the envelope's `time`) to its arrival.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bson::DateTime;
use tokio::sync::watch;

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    events: u64,
    resets: u64,
    ended: bool,
    latencies_ms: Vec<u32>,
}

/// Opens `streams` streams at `url` (stream `i` with the `i`-th of `tokens` in turn, if any),
/// then reads until no event arrived anywhere for `idle` after the first one (or `deadline`
/// passed); prints one JSON line. `tokens_uneven` counts the tokens whose streams did not all
/// see the same number of events.
pub async fn run(
    url: String,
    streams: usize,
    tokens: Vec<String>,
    idle: Duration,
    deadline: Duration,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let mut opened = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut req = client.get(&url).header("accept", "text/event-stream");
        if !tokens.is_empty() {
            req = req.bearer_auth(&tokens[i % tokens.len()]);
        }
        let resp = req.send().await.with_context(|| format!("stream {i}"))?;
        anyhow::ensure!(resp.status() == 200, "stream {i}: {}", resp.status());
        opened.push(resp);
    }
    eprintln!("all {streams} streams connected");
    let started = Instant::now();
    let last_event = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|resp| tokio::spawn(read(resp, last_event.clone(), started, stop_rx.clone())))
        .collect();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let last = last_event.load(Ordering::Relaxed);
        let now = started.elapsed().as_millis() as u64;
        let quiet = last > 0 && now.saturating_sub(last) >= idle.as_millis() as u64;
        if quiet || started.elapsed() > deadline {
            break;
        }
    }
    stop_tx.send(true)?;
    let mut all = Vec::new();
    let (mut min, mut max, mut resets, mut ended) = (u64::MAX, 0, 0, 0);
    let groups = tokens.len().max(1);
    let mut per_token: Vec<(u64, u64)> = vec![(u64::MAX, 0); groups];
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await?;
        let seen = &mut per_token[i % groups];
        *seen = (seen.0.min(s.events), seen.1.max(s.events));
        min = min.min(s.events);
        max = max.max(s.events);
        resets += s.resets;
        ended += u64::from(s.ended);
        all.extend(s.latencies_ms);
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{}",
        serde_json::json!({
            "streams": streams, "events": all.len(),
            "events_per_stream_min": if min == u64::MAX { 0 } else { min },
            "events_per_stream_max": max, "resets": resets, "ended_by_server": ended,
            "tokens": tokens.len(),
            "tokens_uneven": per_token.iter().filter(|(lo, hi)| lo != hi).count(),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": all.last().copied().unwrap_or(0),
        })
    );
    Ok(())
}

/// Reads one stream until told to stop or the server ends it.
async fn read(
    mut resp: reqwest::Response,
    last_event: Arc<AtomicU64>,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            _ = stop.changed() => return seen,
            c = resp.chunk() => c,
        };
        match chunk {
            Ok(Some(bytes)) => buf.extend_from_slice(&bytes),
            _ => {
                seen.ended = true;
                return seen;
            }
        }
        let now = DateTime::now().timestamp_millis();
        let mut consumed = 0;
        while let Some(end) = find(&buf[consumed..], b"\n\n") {
            let frame = &buf[consumed..consumed + end];
            consumed += end + 2;
            if frame.starts_with(b"id: ") {
                if let Some(t) = written_at(frame) {
                    seen.events += 1;
                    seen.latencies_ms
                        .push(u32::try_from((now - t).max(0)).unwrap_or(u32::MAX));
                    last_event.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            } else if find(frame, b"event: reset").is_some() {
                seen.resets += 1;
            }
        }
        buf.drain(..consumed);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The envelope's `time` (the last `"time":"…"` of the frame: the envelope's keys are sorted,
/// so it comes after `data`).
fn written_at(frame: &[u8]) -> Option<i64> {
    let key = b"\"time\":\"";
    let start = frame.windows(key.len()).rposition(|w| w == key)? + key.len();
    let len = frame[start..].iter().position(|&b| b == b'"')?;
    let text = std::str::from_utf8(&frame[start..start + len]).ok()?;
    DateTime::parse_rfc3339_str(text)
        .ok()
        .map(|d| d.timestamp_millis())
}
