//! The monitoring shipped in `k8s/monitoring` against the real binaries: every metric the alert
//! rules and the Grafana dashboard query is exposed by the service whose job they select, and
//! every metric the services expose is in the README's metrics reference (a renamed metric
//! fails here instead of silently breaking a panel or an alert); the fleet gauges the alerts
//! read count what they say.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use cml_sim::Faults;
use system_tests::{
    cycles_done, metrics,
    promql::{dashboard_exprs, exposed_samples, metric_refs, rule_exprs, MetricRef},
    wait_metric, Fixture,
};

const WAIT: Duration = Duration::from_secs(30);

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Metrics Prometheus records itself for every target.
const PROMETHEUS_OWN: &[&str] = &["up"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_the_dashboard_query_is_exposed_by_its_service() {
    let f = Fixture::new("monitoring_metrics", 2, 3).await;
    let mut daemon = f.spawn("daemon", &[("CML_LABS_SYNC__INTERVAL", "1h")]);
    let admin = daemon.admin_base().await;
    cycles_done(&admin, 1.0).await;
    let (mut api, base) = f.spawn_api("api", &[]).await;
    let exposed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::from([
        ("sync-daemon", exposed_samples(&metrics(&admin).await)),
        ("lab-api", exposed_samples(&metrics(&base).await)),
    ]);

    let (rules, rule_count) = rule_exprs(&repo_file("k8s/monitoring/alerts.rules.yml"));
    assert_eq!(rules.len(), rule_count, "one expression read per rule");
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("k8s/monitoring/grafana-dashboard.json"))
            .expect("dashboard JSON");
    let panels = dashboard_exprs(&dashboard);
    assert!(!panels.is_empty());

    let mut used: BTreeMap<MetricRef, BTreeSet<&str>> = BTreeMap::new();
    for (source, exprs) in [("alert rules", &rules), ("dashboard", &panels)] {
        for expr in exprs {
            let refs = metric_refs(expr);
            assert!(!refs.is_empty(), "{source}: no metric in {expr}");
            for r in refs {
                used.entry(r).or_default().insert(source);
            }
        }
    }

    let mut problems = Vec::new();
    println!("{:<45} {:<12} used by", "metric", "job");
    for (r, sources) in &used {
        let job = r.job.as_deref().unwrap_or("-");
        println!(
            "{:<45} {:<12} {}",
            r.name,
            job,
            sources.iter().copied().collect::<Vec<_>>().join(", ")
        );
        if PROMETHEUS_OWN.contains(&r.name.as_str()) {
            continue;
        }
        match r.job.as_deref().and_then(|j| exposed.get(j)) {
            None => problems.push(format!(
                "{} ({sources:?}) selects no job of ours ({job}): scope every query to lab-api or sync-daemon",
                r.name
            )),
            Some(samples) if !samples.contains(&r.name) => problems.push(format!(
                "{} ({sources:?}) is not exposed by {job}",
                r.name
            )),
            Some(_) => {}
        }
    }
    let queried: BTreeSet<&str> = used.keys().map(|r| r.name.as_str()).collect();
    for (job, samples) in &exposed {
        let unused: Vec<&str> = samples
            .iter()
            .map(String::as_str)
            .filter(|s| !queried.contains(s))
            .collect();
        println!("exposed by {job}, queried nowhere: {unused:?}");
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // Every family either service exposes is in the README's metrics reference.
    let readme = repo_file("README.md");
    let undocumented: Vec<String> = exposed
        .iter()
        .flat_map(|(job, samples)| {
            samples
                .iter()
                .filter(|s| !s.ends_with("_sum") && !s.ends_with("_count"))
                .map(|s| s.strip_suffix("_bucket").unwrap_or(s))
                .filter(|s| !readme.contains(&format!("| `{s}` |")))
                .map(move |s| format!("{job}: {s}"))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in the README's metrics reference: {undocumented:?}"
    );

    daemon.signal(libc::SIGTERM);
    api.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).await.success());
    assert!(api.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_gauges_count_failing_and_stale_workers_and_labs_by_state() {
    let f = Fixture::new("daemon_fleet_gauges", 3, 4).await;
    let bad = f.fleet.fleet.workers[2].clone();
    bad.set_faults(Faults {
        malformed_json: true,
        ..Faults::default()
    });
    let mut d = f.spawn(
        "fleet_gauges",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1s"),
            ("CML_LABS_SYNC__RETRY_BASE", "1h"),
        ],
    );
    let admin = d.admin_base().await;
    // Three cycles, each failing the bad worker once more; the gauges follow each cycle.
    wait_metric(
        &admin,
        "sync_cycles_total",
        &[("outcome", "partial")],
        3.0,
        WAIT,
    )
    .await;
    let text = testkit::eventually("the gauges after the third cycle", WAIT, || async {
        let text = metrics(&admin).await;
        let v = testkit::metrics::value(&text, "sync_workers", &[("state", "failing_repeatedly")]);
        (v == Some(1.0)).then_some(text)
    })
    .await;
    let state = |name: &str, s: &str| testkit::metrics::value(&text, name, &[("state", s)]);
    assert_eq!(state("sync_workers", "known"), Some(3.0), "{text}");
    assert_eq!(state("sync_workers", "failing"), Some(1.0));
    assert_eq!(
        state("sync_workers", "stale"),
        Some(1.0),
        "never synced is stale"
    );
    assert_eq!(
        testkit::metrics::value(&text, "sync_interval_seconds", &[]),
        Some(1.0)
    );
    let records = f.records().await;
    assert_eq!(records.len(), 8, "the two good workers' labs");
    for s in shared::record::LabState::ALL {
        let stored = records
            .iter()
            .filter(|r| r.fields.state == s.as_str())
            .count() as f64;
        assert_eq!(
            state("cml_lab_records", s.as_str()),
            Some(stored),
            "{s}: {text}"
        );
    }
    assert_eq!(state("cml_lab_records", "removed"), Some(0.0));
    assert_eq!(state("cml_lab_records", "other"), Some(0.0));
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}
