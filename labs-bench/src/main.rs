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
    access::{self, Account},
    accounts::AccountStore,
    change::{plan_sync, Groups, Listing},
    config::MongoConfig,
    fence::Term,
    record::{LabFields, LabState, ObservedLab},
    secret::Secret,
    store::{worker_labs_query, LabStore},
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
        /// Only the records these principals may read (comma-separated), as lab-api reads a
        /// partial view.
        #[arg(long, value_delimiter = ',')]
        principals: Option<Vec<String>>,
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
        /// Bearer tokens, one per line, handed to the streams in turn (lab-api in `tokens`
        /// mode); streams of one token must see the same events.
        #[arg(long)]
        tokens_file: Option<std::path::PathBuf>,
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
        /// Also explain the listing of a caller holding these principals (comma-separated,
        /// e.g. `u:W:bob,g:W:G`).
        #[arg(long, value_delimiter = ',')]
        principals: Option<Vec<String>>,
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
        /// A bearer token to send (lab-api in `tokens` mode).
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        load: Load,
    },
    /// Gives user USER an account on the first WORKERS seeded workers, and every lab of theirs
    /// to read (as an admin of those workers would see them); prints the user's principals.
    Grant {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        db: String,
        #[arg(long, default_value = "bob")]
        user: String,
        #[arg(long, default_value_t = 100)]
        workers: usize,
    },
    /// The access bench's data: worker 0 with LABS labs, every tenth shared with a group of
    /// which user `bob` (an account on worker 0 only) is a member; worker 1 with LABS / 10
    /// labs; readers as a full sync writes them.
    SeedAccess {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        db: String,
        #[arg(long, default_value_t = 1000)]
        labs: usize,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct Load {
    #[arg(long, default_value_t = 200)]
    workers: usize,
    /// The first worker's number (`bench-worker-NNNN`).
    #[arg(long, default_value_t = 0)]
    worker_offset: usize,
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
        Command::Floor {
            uri,
            db,
            principals,
            load,
        } => floor(&uri, &db, principals, load).await,
        Command::Http {
            url,
            if_none_match,
            token,
            load,
        } => http(url, if_none_match, token, load).await,
        Command::SeedAccess { uri, db, labs } => seed_access(&uri, &db, labs).await,
        Command::Grant {
            uri,
            db,
            user,
            workers,
        } => grant(&uri, &db, &user, workers).await,
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
        Command::Explain {
            uri,
            db,
            principals,
        } => queries::explain(&uri, &db, principals).await,
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
            tokens_file,
        } => {
            let tokens = match tokens_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect(),
                None => Vec::new(),
            };
            streams::run(
                url,
                streams,
                tokens,
                Duration::from_secs(idle_seconds),
                Duration::from_secs(seconds),
            )
            .await
        }
    }
}

/// The raw-driver floor: the same find and JSON serialisation lab-api does, nothing else.
async fn floor(
    uri: &str,
    db: &str,
    principals: Option<Vec<String>>,
    load: Load,
) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let coll = Arc::new(client.database(db).collection::<Document>("lab_records"));
    let principals = Arc::new(principals);
    run(load, move |w| {
        let (coll, principals) = (coll.clone(), principals.clone());
        async move {
            let (filter, sort) = worker_labs_query(&w, false, principals.as_deref());
            let docs: Vec<Document> = coll
                .find(filter)
                .sort(sort)
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
async fn http(
    url: String,
    if_none_match: bool,
    token: Option<String>,
    load: Load,
) -> anyhow::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert("authorization", format!("Bearer {t}").parse()?);
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(load.concurrency)
        .default_headers(headers)
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

/// The store of database `db`, with its indexes.
async fn bench_store(client: &mongodb::Client, uri: &str, db: &str) -> anyhow::Result<LabStore> {
    let cfg = MongoConfig {
        uri: Secret::new(uri),
        database: db.to_owned(),
        ..MongoConfig::default()
    };
    let store = LabStore::new(client, &cfg, 50);
    store.ensure_indexes().await?;
    Ok(store)
}

/// The accounts of database `db`, with their indexes.
async fn bench_accounts(client: &mongodb::Client, db: &str) -> anyhow::Result<AccountStore> {
    let accounts = AccountStore::new(&client.database(db), "cml_accounts");
    accounts.ensure_indexes().await?;
    Ok(accounts)
}

async fn seed(uri: &str, db: &str, workers: usize, labs: usize) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let store = bench_store(&client, uri, db).await?;
    let started = Instant::now();
    for w in 0..workers {
        seed_worker(&store, w, labs).await?;
    }
    println!(
        "{}",
        serde_json::json!({ "seeded_workers": workers, "labs_per_worker": labs, "seconds": started.elapsed().as_secs_f64() })
    );
    Ok(())
}

/// Writes worker `w`'s `labs` records as its first sync would.
// Every field is set today; `..LabFields::default()` lets a tracked field added later default.
#[allow(clippy::needless_update)]
async fn seed_worker(store: &LabStore, w: usize, labs: usize) -> anyhow::Result<()> {
    let observed: Vec<ObservedLab> = (0..labs)
        .map(|i| {
            ObservedLab::new(
                lab_id(w, i),
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
                    modified_at: Some(DateTime::from_millis(1_700_000_500_000 + i as i64 * 60_000)),
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
    Ok(())
}

fn lab_id(w: usize, i: usize) -> String {
    format!("lab-{w:04}-{i:03}")
}

/// The user of the access bench, and the group through which labs are shared with it.
const ACCESS_USER: &str = "bob";
const ACCESS_GROUP: &str = "bench-group";

async fn grant(uri: &str, db: &str, user: &str, workers: usize) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let records = client.database(db).collection::<Document>("lab_records");
    let accounts = bench_accounts(&client, db).await?;
    let mut principals = Vec::new();
    let mut granted = 0;
    for w in 0..workers {
        let worker = worker_id(w);
        let p = access::user_principal(&worker, user);
        granted += records
            .update_many(
                doc! { "worker_id": &worker },
                doc! { "$addToSet": { "readers": &p } },
            )
            .await?
            .matched_count;
        let account = Account {
            worker_id: worker.clone(),
            username: user.to_owned(),
            admin: false,
            groups: Vec::new(),
        };
        accounts
            .write_changes(&worker, &[], &[account], DateTime::now())
            .await?;
        principals.push(p);
    }
    println!(
        "{}",
        serde_json::json!({ "user": user, "workers": workers, "labs": granted, "principals": principals.join(",") })
    );
    Ok(())
}

async fn seed_access(uri: &str, db: &str, labs: usize) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let store = bench_store(&client, uri, db).await?;
    seed_worker(&store, 0, labs).await?;
    seed_worker(&store, 1, labs / 10).await?;
    let records = client.database(db).collection::<Document>("lab_records");
    for w in 0..2 {
        let worker = worker_id(w);
        let count = if w == 0 { labs } else { labs / 10 };
        for i in 0..count {
            let owner = format!("user{}", i % 7);
            let shares = if w == 0 && i % 10 == 0 {
                vec![access::group_principal(&worker, ACCESS_GROUP)]
            } else {
                Vec::new()
            };
            let readers = access::readers(&worker, &owner, &shares);
            records
                .update_one(
                    doc! { "worker_id": &worker, "lab_id": lab_id(w, i) },
                    doc! { "$set": { "readers": readers } },
                )
                .await?;
        }
    }
    let accounts = bench_accounts(&client, db).await?;
    let bob = Account {
        worker_id: worker_id(0),
        username: ACCESS_USER.into(),
        admin: false,
        groups: vec![ACCESS_GROUP.into()],
    };
    accounts
        .write_changes(&bob.worker_id.clone(), &[], &[bob], DateTime::now())
        .await?;
    println!(
        "{}",
        serde_json::json!({ "user": ACCESS_USER, "labs": labs, "visible_to_user": labs.div_ceil(10), "admin_worker_labs": labs / 10 })
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
            let (workers, offset) = (load.workers, load.worker_offset);
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
                    let w = worker_id(offset + (state % workers as u64) as usize);
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
