//! The read mix of the scale run: each kind of lab-api query on its own for a while, with
//! random workers and a deep cursor, timing every answer; and `explain` of the MongoDB queries
//! behind them, to show which index each uses.

use std::time::{Duration, Instant};

use anyhow::Context;
use bson::{doc, Bson, Document};
use serde_json::{json, Value};
use shared::{
    cursor::PageCursor,
    fleet::{self, FleetFilter},
    record::LabState,
    store::{list_query, worker_labs_query, LabFilter},
};

/// One query of the mix: a name and its path (with `{w}` for a random worker).
fn mix(deep: &str) -> Vec<(&'static str, String)> {
    [
        ("worker labs", "/api/workers/{w}/labs".to_owned()),
        ("labs, first page", "/api/labs?limit=100".to_owned()),
        (
            "labs, state",
            "/api/labs?state=STOPPED&limit=100".to_owned(),
        ),
        (
            "labs, owner",
            "/api/labs?owner_username=carol&limit=100".to_owned(),
        ),
        (
            "labs, worker",
            "/api/labs?worker_id={w}&limit=100".to_owned(),
        ),
        (
            "labs, removed included",
            "/api/labs?include_removed=true&limit=100".to_owned(),
        ),
        (
            "labs, deep cursor",
            format!("/api/labs?limit=100&cursor={deep}"),
        ),
        ("fleet, first page", "/api/sync-status?limit=100".to_owned()),
        (
            "fleet, failing",
            "/api/sync-status?failing=true&limit=100".to_owned(),
        ),
        (
            "fleet, region",
            "/api/sync-status?region=eu-west-1&limit=100".to_owned(),
        ),
    ]
    .into()
}

/// Runs each query of the mix for `seconds` with `concurrency` clients; prints one JSON line.
pub async fn run(url: String, seconds: u64, concurrency: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let workers = worker_ids(&http, &url).await?;
    // 90% of the way through the (worker_id, lab_id) order.
    let deep = PageCursor {
        worker_id: workers[workers.len() * 9 / 10].clone(),
        lab_id: "0".into(),
    }
    .encode();
    let mut results = Vec::new();
    for (name, path) in mix(&deep) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..concurrency.max(1))
            .map(|i| {
                let (http, url, path, workers) =
                    (http.clone(), url.clone(), path.clone(), workers.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0u64;
                    let mut n = i;
                    while Instant::now() < deadline {
                        n = n
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        let w = &workers[(n >> 33) % workers.len()];
                        let started = Instant::now();
                        let ok = match http
                            .get(format!("{url}{}", path.replace("{w}", w)))
                            .send()
                            .await
                        {
                            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        if ok {
                            latencies.push(started.elapsed().as_micros());
                        } else {
                            errors += 1;
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await?;
            all.extend(l);
            errors += e;
        }
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        results.push(json!({
            "name": name, "requests": all.len(), "errors": errors,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        }));
    }
    println!(
        "{}",
        json!({ "workers": workers.len(), "queries": results })
    );
    Ok(())
}

/// Every worker id of the fleet view, in id order.
async fn worker_ids(http: &reqwest::Client, url: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut page_url = format!("{url}/api/sync-status?limit=1000");
        if let Some(c) = &cursor {
            page_url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = http
            .get(page_url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.extend(
            page["items"]
                .as_array()
                .context("no fleet page")?
                .iter()
                .filter_map(|w| w["worker_id"].as_str().map(str::to_owned)),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    anyhow::ensure!(!ids.is_empty(), "lab-api knows no worker");
    ids.sort();
    Ok(ids)
}

/// `explain` (executionStats) of the MongoDB queries behind the mix; prints one JSON line per
/// query: the plan's stages from the top, the index used, keys and documents examined.
/// With `principals`, also the reads of a caller who holds them (what lab-api sends for a user
/// who sees only some labs).
pub async fn explain(uri: &str, db: &str, principals: Option<Vec<String>>) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let db = client.database(db);
    let records = db.collection::<Document>("lab_records");
    let some_worker = records
        .find_one(doc! {})
        .await?
        .and_then(|d| d.get_str("worker_id").ok().map(str::to_owned))
        .context("no records")?;
    let mut ids: Vec<String> = records
        .distinct("worker_id", doc! {})
        .await?
        .into_iter()
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect();
    ids.sort();
    let deep = PageCursor {
        worker_id: ids[ids.len() * 9 / 10].clone(),
        lab_id: "0".into(),
    };
    let list = |f: LabFilter, after: Option<&PageCursor>| {
        let (filter, sort) = list_query(&f, after);
        (filter, sort, 101)
    };
    let worker = |include_removed, readers: Option<&[String]>| {
        let (filter, sort) = worker_labs_query(&some_worker, include_removed, readers);
        (filter, sort, 5001)
    };
    let mut queries: Vec<(&str, &str, (Document, Document, i64))> = vec![
        ("worker labs", "lab_records", worker(false, None)),
        (
            "labs, first page",
            "lab_records",
            list(LabFilter::default(), None),
        ),
        (
            "labs, state",
            "lab_records",
            list(
                LabFilter {
                    state: Some(LabState::Stopped),
                    ..LabFilter::default()
                },
                None,
            ),
        ),
        (
            "labs, owner",
            "lab_records",
            list(
                LabFilter {
                    owner_username: Some("carol".into()),
                    ..LabFilter::default()
                },
                None,
            ),
        ),
        (
            "labs, worker",
            "lab_records",
            list(
                LabFilter {
                    worker_id: Some(some_worker.clone()),
                    ..LabFilter::default()
                },
                None,
            ),
        ),
        (
            "labs, removed included",
            "lab_records",
            list(
                LabFilter {
                    include_removed: true,
                    ..LabFilter::default()
                },
                None,
            ),
        ),
        (
            "labs, deep cursor",
            "lab_records",
            list(LabFilter::default(), Some(&deep)),
        ),
    ];
    if let Some(p) = &principals {
        queries.push((
            "worker labs, a user's view",
            "lab_records",
            worker(false, Some(p)),
        ));
        queries.push((
            "labs, first page, a user's view",
            "lab_records",
            list(
                LabFilter {
                    readers: Some(p.clone()),
                    ..LabFilter::default()
                },
                None,
            ),
        ));
    }
    // The fleet view's queries (a page reads them in turn): every rank of the first page, and
    // the failing and region filters; stale after an hour, as with a 30-minute interval.
    let threshold = fleet::stale_threshold(bson::DateTime::now(), Duration::from_secs(3600));
    let region = FleetFilter {
        region: Some("eu-west-1".into()),
        ..FleetFilter::default()
    };
    let failing = FleetFilter {
        failing: Some(true),
        ..FleetFilter::default()
    };
    let fleet_queries = [
        ("fleet", FleetFilter::default()),
        ("fleet, failing", failing),
        ("fleet, region", region),
    ]
    .into_iter()
    .flat_map(|(name, f)| {
        fleet::queries(&f, None, threshold)
            .into_iter()
            .map(move |q| (format!("{name}: {:?}", q.rank), q))
    })
    .collect::<Vec<_>>();
    let queries = queries
        .into_iter()
        .map(|(name, coll, q)| (name.to_owned(), coll, q))
        .chain(
            fleet_queries
                .into_iter()
                .map(|(name, q)| (name, "worker_sync_status", (q.filter, q.sort, 101))),
        );
    for (name, coll, (filter, sort, limit)) in queries {
        let mut find = doc! { "find": coll, "filter": filter, "sort": sort };
        if limit > 0 {
            find.insert("limit", limit);
        }
        let r = db
            .run_command(doc! { "explain": find, "verbosity": "executionStats" })
            .await?;
        let plan = r
            .get_document("queryPlanner")
            .and_then(|q| q.get_document("winningPlan"))
            .cloned()
            .unwrap_or_default();
        let stats = r
            .get_document("executionStats")
            .cloned()
            .unwrap_or_default();
        let num = |k: &str| stats.get(k).and_then(shared::mongo::as_i64).unwrap_or(-1);
        let (stages, index) = stages(&plan);
        println!(
            "{}",
            json!({
                "name": name, "plan": stages.join(" < "), "index": index,
                "keys_examined": num("totalKeysExamined"), "docs_examined": num("totalDocsExamined"),
                "returned": num("nReturned"), "ms": num("executionTimeMillis"),
            })
        );
    }
    Ok(())
}

/// The stages of a plan from the top, and the index it scans (if any).
fn stages(plan: &Document) -> (Vec<String>, Option<String>) {
    let mut out = Vec::new();
    let mut index = None;
    let mut node = Some(plan.clone());
    while let Some(n) = node {
        out.push(n.get_str("stage").unwrap_or("?").to_owned());
        if let Ok(name) = n.get_str("indexName") {
            index = Some(name.to_owned());
        }
        node = match n.get("inputStage") {
            Some(Bson::Document(d)) => Some(d.clone()),
            _ => match n.get("inputStages") {
                Some(Bson::Array(a)) => a.first().and_then(|b| b.as_document().cloned()),
                _ => None,
            },
        };
    }
    (out, index)
}
