//! `labs-bench`: seeds lab records through the store, and measures read throughput and
//! latency either straight from MongoDB (the floor) or through lab-api over HTTP, with the same
//! concurrency and the same random worker choice, printing one JSON line of figures; and
//! holds many event streams open, timing each event's delivery ([`streams`]); and times
//! refreshes on demand ([`refresh`]); and runs the read mix of the scale run, with the query
//! plans behind it ([`queries`]).

mod live;
mod queries;
mod refresh;
mod streams;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bson::{doc, DateTime, Document};
use clap::{Parser, Subcommand};
use futures::TryStreamExt;
use shared::{
    change::{plan_sync, Groups, Listing},
    config::MongoConfig,
    fence::Term,
    record::{LabFields, LabState, ObservedLab},
    secret::Secret,
    store::LabStore,
};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes WORKERS x LABS records through the store (as a first sync would).
    Seed {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        db: String,
        #[arg(long, default_value_t = 200)]
        workers: usize,
        #[arg(long, default_value_t = 50)]
        labs: usize,
    },
    /// The floor: the same `find` and JSON serialisation with the raw driver, no HTTP.
    Floor {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        db: String,
        #[command(flatten)]
        load: Load,
    },
    /// Many clients of GET /api/events/stream, timing each event from write to arrival.
    Streams {
        /// The stream's URL.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        /// Stop after this long without an event (once events came).
        #[arg(long, default_value_t = 5)]
        idle_seconds: u64,
        /// Stop after this long in any case.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Each kind of lab-api read (worker labs, the listing with each filter and a deep cursor,
    /// the fleet view) on its own for a while; p50 and p99 of each.
    Queries {
        /// lab-api's base URL.
        #[arg(long)]
        url: String,
        /// Seconds per query.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// `explain` of the MongoDB queries behind those reads: plan, index, keys and documents
    /// examined.
    Explain {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        db: String,
    },
    /// POST /api/workers/{id}/labs/refresh?wait=30s for the workers lab-api knows.
    Refresh {
        /// lab-api's base URL.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 200)]
        workers: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Lab changes made on simulated CML servers at a steady rate, timed to every client of
    /// lab-api's event stream (change -> write -> client); counts the CML calls meanwhile.
    Live {
        /// The simulator's control API.
        #[arg(long)]
        control: String,
        /// lab-api's base URL.
        #[arg(long)]
        api: String,
        /// Changes per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Event-stream clients.
        #[arg(long, default_value_t = 10)]
        streams: usize,
    },
    /// GET /api/workers/{id}/labs through lab-api.
    Http {
        #[arg(long)]
        url: String,
        /// Send the ETag of each worker's list back in If-None-Match (the 304 path).
        #[arg(long)]
        if_none_match: bool,
        #[command(flatten)]
        load: Load,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct Load {
    #[arg(long, default_value_t = 200)]
    workers: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

fn worker_id(i: usize) -> String {
    format!("bench-worker-{i:04}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed {
            uri,
            db,
            workers,
            labs,
        } => seed(&uri, &db, workers, labs).await,
        Command::Floor { uri, db, load } => floor(&uri, &db, load).await,
        Command::Http {
            url,
            if_none_match,
            load,
        } => http(url, if_none_match, load).await,
        Command::Refresh {
            url,
            workers,
            concurrency,
        } => refresh::run(url, workers, concurrency).await,
        Command::Queries {
            url,
            seconds,
            concurrency,
        } => queries::run(url, seconds, concurrency).await,
        Command::Explain { uri, db } => queries::explain(&uri, &db).await,
        Command::Live {
            control,
            api,
            rate,
            seconds,
            streams,
        } => {
            live::run(live::Settings {
                control,
                api,
                rate,
                seconds,
                streams,
            })
            .await
        }
        Command::Streams {
            url,
            streams,
            idle_seconds,
            seconds,
        } => {
            streams::run(
                url,
                streams,
                Duration::from_secs(idle_seconds),
                Duration::from_secs(seconds),
            )
            .await
        }
    }
}

/// The raw-driver floor: the same find and JSON serialisation lab-api does, nothing else.
async fn floor(uri: &str, db: &str, load: Load) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let coll = Arc::new(client.database(db).collection::<Document>("lab_records"));
    run(load, move |w| {
        let coll = coll.clone();
        async move {
            let docs: Vec<Document> = coll
                .find(doc! { "worker_id": &w, "removed_at": null })
                .sort(doc! { "title": 1, "lab_id": 1 })
                .projection(doc! { "operation_history": 0 })
                .await?
                .try_collect()
                .await?;
            let body = serde_json::to_vec(&docs)?;
            anyhow::ensure!(body.len() > 2, "no records for {w}");
            Ok(())
        }
    })
    .await
}

/// Load on lab-api's worker labs endpoint; with `if_none_match`, every request revalidates
/// the ETag it got first (the 304 path).
async fn http(url: String, if_none_match: bool, load: Load) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(load.concurrency)
        .build()?;
    let mut etags = Vec::new();
    if if_none_match {
        for i in 0..load.workers {
            let r = http
                .get(format!("{url}/api/workers/{}/labs", worker_id(i)))
                .send()
                .await?;
            etags.push(
                r.headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
            );
        }
    }
    let (http, etags, url) = (Arc::new(http), Arc::new(etags), Arc::new(url));
    run(load, move |w| {
        let (http, etags, url) = (http.clone(), etags.clone(), url.clone());
        async move {
            let mut req = http.get(format!("{url}/api/workers/{w}/labs"));
            let index: usize = w
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if let Some(tag) = etags.get(index) {
                req = req.header("if-none-match", tag);
            }
            let r = req.send().await?;
            let status = r.status().as_u16();
            let body = r.bytes().await?;
            let expected = if etags.is_empty() { 200 } else { 304 };
            anyhow::ensure!(status == expected, "HTTP {status}, expected {expected}");
            anyhow::ensure!(expected == 304 || body.len() > 2, "empty list for {w}");
            Ok(())
        }
    })
    .await
}

// Every field is set today; `..LabFields::default()` lets a tracked field added later default.
#[allow(clippy::needless_update)]
async fn seed(uri: &str, db: &str, workers: usize, labs: usize) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let cfg = MongoConfig {
        uri: Secret::new(uri),
        database: db.to_owned(),
        ..MongoConfig::default()
    };
    let store = LabStore::new(&client, &cfg, 50);
    store.ensure_indexes().await?;
    let started = Instant::now();
    for w in 0..workers {
        let observed: Vec<ObservedLab> = (0..labs)
            .map(|i| {
                ObservedLab::new(
                    format!("lab-{w:04}-{i:03}"),
                    LabFields {
                        title: format!("Lab {i:03} of worker {w}"),
                        description: "A practice lab with a few routers and switches.".into(),
                        notes: if i % 3 == 0 {
                            "## Notes\n\nSave configs before stopping.".into()
                        } else {
                            String::new()
                        },
                        state: LabState::ALL[i % 3].to_string(),
                        owner_username: format!("user{}", i % 7),
                        owner_fullname: format!("User {}", i % 7),
                        node_count: (i % 12) as i32,
                        link_count: (i % 11) as i32,
                        groups: vec!["netops".into()],
                        cml_created_at: Some(DateTime::from_millis(
                            1_700_000_000_000 + i as i64 * 60_000,
                        )),
                        modified_at: Some(DateTime::from_millis(
                            1_700_000_500_000 + i as i64 * 60_000,
                        )),
                        ..LabFields::default()
                    },
                )
            })
            .collect();
        let plan = plan_sync(
            &worker_id(w),
            &[],
            observed,
            Listing::Complete,
            Groups::Observed,
            DateTime::now(),
        )?;
        store
            .apply(&plan, Term(1))
            .await
            .with_context(|| format!("seeding worker {w}"))?;
    }
    println!(
        "{}",
        serde_json::json!({ "seeded_workers": workers, "labs_per_worker": labs, "seconds": started.elapsed().as_secs_f64() })
    );
    Ok(())
}

/// Runs `op` from `concurrency` tasks for `seconds`, each call on a random worker; prints
/// requests/s and latency percentiles as one JSON line.
async fn run<F, Fut>(load: Load, op: F) -> anyhow::Result<()>
where
    F: Fn(String) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(load.seconds);
    let tasks: Vec<_> = (0..load.concurrency)
        .map(|t| {
            let op = op.clone();
            let workers = load.workers;
            tokio::spawn(async move {
                let mut state =
                    0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < deadline {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let w = worker_id((state % workers as u64) as usize);
                    let started = Instant::now();
                    match op(w).await {
                        Ok(()) => latencies.push(started.elapsed().as_micros() as u64),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e.to_string());
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, e, f) = t.await?;
        all.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(load.seconds as f64);
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(), "errors": errors, "first_error": first_error,
            "rps": all.len() as f64 / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        })
    );
    Ok(())
}
