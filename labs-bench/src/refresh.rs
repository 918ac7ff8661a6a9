//! Refresh on demand under a daemon that holds the lease: each worker of the fleet refreshed
//! once with `POST …/labs/refresh?wait=30s`, a few at a time, timing each answer.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{stream, StreamExt};
use serde_json::Value;

/// Refreshes up to `workers` workers of the fleet lab-api at `url` knows, `concurrency` at a
/// time; prints one JSON line: how many, how many came back done, latency p50/p99/max (ms).
pub async fn run(url: String, workers: usize, concurrency: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let page: Value = http
        .get(format!("{url}/api/sync-status?limit=1000"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let ids: Vec<String> = page["items"]
        .as_array()
        .context("no fleet page")?
        .iter()
        .filter_map(|w| w["worker_id"].as_str().map(str::to_owned))
        .take(workers)
        .collect();
    anyhow::ensure!(!ids.is_empty(), "lab-api knows no worker");
    let results: Vec<anyhow::Result<(u128, bool)>> = stream::iter(ids)
        .map(|id| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let started = Instant::now();
                let r = http
                    .post(format!("{url}/api/workers/{id}/labs/refresh?wait=30s"))
                    .send()
                    .await?;
                let status = r.status();
                let body: Value = r.json().await?;
                let took = started.elapsed().as_micros();
                anyhow::ensure!(status.is_success(), "{id}: {status} {body}");
                Ok((took, body["status"] == "done"))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut latencies = Vec::new();
    let (mut done, mut errors, mut first_error) = (0, 0, None);
    for r in results {
        match r {
            Ok((us, finished)) => {
                latencies.push(us);
                done += usize::from(finished);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "refreshes": latencies.len(), "done": done, "errors": errors, "first_error": first_error,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": latencies.last().map_or(0.0, |us| *us as f64 / 1000.0),
        })
    );
    Ok(())
}
