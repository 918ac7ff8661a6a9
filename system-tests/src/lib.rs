//! Support for the end-to-end tests in `tests/`: the project's binaries (built once per run),
//! a simulated CML fleet registered in a test database, and processes of ours whose address
//! comes from their one machine-readable `listening` line and whose state tests read from
//! their metrics, their documents and their named log events.

#![allow(unsafe_code)] // libc::kill on a child process we own

pub mod promql;
pub mod sse;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use bson::{doc, Document};
use cml_sim::{FleetConfig, Personality, RunningFleet, ServeOptions};
use futures::TryStreamExt;
use serde_json::Value;
use shared::record::LabRecord;
use testkit::TestDb;

/// Path of a workspace binary (`sync-daemon`, `lab-api`), built on first use with the same
/// cargo and profile as the tests, so plain `cargo test` never runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                // The `test` profile: what `cargo test --workspace` built the binaries with,
                // so after it this is a no-op (with `dev` it relinked both, on the first
                // system test's clock).
                .args([
                    "build",
                    "--quiet",
                    "--profile",
                    "test",
                    "-p",
                    "sync-daemon",
                    "-p",
                    "lab-api",
                ])
                .output()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "cargo build failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            // The test executable lives in target/<profile>/deps/.
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            exe.parent()
                .and_then(|deps| deps.parent())
                .map(PathBuf::from)
                .ok_or_else(|| "cannot locate the target directory".to_owned())
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A command for a project binary with a clean environment: no `CML_LABS_*` leaks in from the
/// developer's shell.
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(binary(name));
    cmd.env_clear();
    for key in ["PATH", "HOME", "TMPDIR"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd
}

/// A test database with a simulated fleet registered in its `cml_workers`.
#[derive(Debug)]
pub struct Fixture {
    pub db: TestDb,
    pub fleet: RunningFleet,
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// When the test's database was made: its lab-api replicas read the change stream back to
    /// this, not over what other tests wrote before.
    began: Instant,
}

impl Fixture {
    pub async fn new(test: &str, workers: usize, labs: usize) -> Self {
        Self::on(TestDb::new(test).await, workers, labs).await
    }

    /// On a database of the caller's (e.g. on a server the test stops and restarts).
    pub async fn on(db: TestDb, workers: usize, labs: usize) -> Self {
        // Built before anything of the test starts: no wait or window of a test holds a build.
        binary("lab-api");
        let began = Instant::now();
        let cfg = FleetConfig {
            workers,
            labs_per_worker: labs,
            seed: 11,
            personalities: Personality::ALL.to_vec(),
            ..FleetConfig::default()
        };
        let fleet = cml_sim::start(&cfg, &ServeOptions::default())
            .await
            .expect("simulator");
        fleet
            .register(&db.client, db.name(), "cml_workers")
            .await
            .expect("registry");
        let env = [
            ("CML_LABS_MONGODB__URI", db.uri.as_str()),
            ("CML_LABS_MONGODB__DATABASE", db.name()),
            ("CML_LABS_CML__PASSWORD", "local-dev-password"),
            // CML calls keep the production timeout (`cml.request_timeout`, 30 s): a tighter
            // one failed a 3 MB answer on a busy two-core machine. The tests of a hung server
            // set their own.
            ("CML_LABS_TELEMETRY__LOG_FORMAT", "json"),
            ("CML_LABS_SYNC__ADMIN_LISTEN", "127.0.0.1:0"),
            // The tests of the cycle, retries and refreshes count its syncs and calls exactly:
            // CML's event streams (on by default) are switched on by the tests of them.
            ("CML_LABS_SYNC__EVENTS__ENABLED", "false"),
            // Likewise the reads of users and groups between cycles (the tests of access set
            // their own interval).
            ("CML_LABS_SYNC__ACCESS_INTERVAL", "1d"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Self {
            db,
            fleet,
            dir: tempfile::tempdir().expect("tempdir"),
            env,
            began,
        }
    }

    fn command(&self, binary: &str, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut cmd = command(binary);
        cmd.args(args);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.envs(extra.iter().copied());
        cmd
    }

    /// `sync-daemon once` to completion.
    pub async fn once(&self, extra: &[(&str, &str)]) -> Output {
        self.daemon(&["once"], extra).await
    }

    /// `sync-daemon ARGS…` to completion.
    pub async fn daemon(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let cmd = self.command("sync-daemon", args, extra);
        tokio::process::Command::from(cmd)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run sync-daemon {args:?}: {e}"))
    }

    /// `sync-daemon run` in the background, its JSON log in a file of its own.
    pub fn spawn(&self, name: &str, extra: &[(&str, &str)]) -> Daemon {
        self.spawn_binary("sync-daemon", &["run"], name, extra)
    }

    /// `lab-api` in the background on a free port, authentication off unless `extra` says so.
    pub async fn spawn_api(&self, name: &str, extra: &[(&str, &str)]) -> (Daemon, String) {
        // A starting replica reads back `api.events.replay_window` of the change stream. On a
        // server the whole suite shares, ten minutes of it are mostly other tests' writes, and
        // reading past them held each replica's first events back by up to a minute: the
        // window here reaches back to this test's start, which is all its database holds.
        let window = format!("{}s", self.began.elapsed().as_secs() + 2);
        let mut env = vec![
            ("CML_LABS_API__LISTEN", "127.0.0.1:0"),
            ("CML_LABS_API__AUTH__MODE", "none"),
            ("CML_LABS_API__EVENTS__REPLAY_WINDOW", window.as_str()),
        ];
        env.extend_from_slice(extra);
        let api = self.spawn_binary("lab-api", &[], name, &env);
        let base = api.base_url("api").await;
        (api, base)
    }

    fn spawn_binary(
        &self,
        binary: &str,
        args: &[&str],
        name: &str,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut cmd = self.command(binary, args, extra);
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        Daemon { child, log }
    }

    /// Every record, by (worker_id, lab_id).
    pub async fn records(&self) -> Vec<LabRecord> {
        self.db
            .db
            .collection::<LabRecord>("lab_records")
            .find(doc! {})
            .sort(doc! { "worker_id": 1, "lab_id": 1 })
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("records")
    }

    pub async fn record(&self, worker: &str, lab: &str) -> LabRecord {
        self.db
            .db
            .collection::<LabRecord>("lab_records")
            .find_one(doc! { "worker_id": worker, "lab_id": lab })
            .await
            .expect("find")
            .unwrap_or_else(|| panic!("no record {worker}/{lab}"))
    }

    pub async fn status(&self, worker: &str) -> Document {
        self.db
            .db
            .collection::<Document>("worker_sync_status")
            .find_one(doc! { "worker_id": worker })
            .await
            .expect("find")
            .unwrap_or_else(|| panic!("no status for {worker}"))
    }
}

/// A lab state other than `state`, to change a lab's state in the simulator.
pub fn other_state(state: &str) -> &'static str {
    if state == "STARTED" {
        "STOPPED"
    } else {
        "STARTED"
    }
}

/// The text of a finished process, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The JSON log lines of a process's output.
pub fn log_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn message(line: &Value) -> &str {
    line.get("message").and_then(Value::as_str).unwrap_or("")
}

/// A background process of ours (`sync-daemon run`, `lab-api`) and its JSON log.
#[derive(Debug)]
pub struct Daemon {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn lines(&self) -> Vec<Value> {
        log_lines(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The log lines of one named event (the `event` field).
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["event"] == event)
            .collect()
    }

    /// Waits until `n` lines of `event` were logged; panics with the log on timeout.
    pub async fn wait_event(&self, event: &str, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.events(event);
            if lines.len() >= n {
                return lines;
            }
            if Instant::now() > deadline {
                panic!(
                    "no {n}× `{event}` within {timeout:?}; log:\n{}",
                    tail(&self.log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://<address>` of what the process serves on `endpoint` (`api`, `admin`), from its
    /// one machine-readable `listening` line.
    pub async fn base_url(&self, endpoint: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self
                .events("listening")
                .into_iter()
                .find(|l| l["endpoint"] == endpoint)
            {
                return format!("http://{}", line["address"].as_str().expect("address"));
            }
            assert!(
                Instant::now() < deadline,
                "no listening line for {endpoint}; log:\n{}",
                tail(&self.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://<address>` of the daemon's admin endpoints.
    pub async fn admin_base(&self) -> String {
        self.base_url("admin").await
    }

    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain syscall on our own child's pid.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "the process did not exit within {timeout:?}; log:\n{}",
                tail(&self.log, 40)
            ),
        }
    }
}

pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The metrics text the process serves at `base` now (empty when it does not answer).
pub async fn metrics(base: &str) -> String {
    match reqwest::get(format!("{base}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `sync_cycles_total{outcome="success"}` at `base` (a daemon's admin port) is at least `n`;
/// returns the metrics text that showed it.
pub async fn cycles_done(base: &str, n: f64) -> String {
    wait_metric(
        base,
        "sync_cycles_total",
        &[("outcome", "success")],
        n,
        Duration::from_secs(30),
    )
    .await
}

/// Waits until the metric `name` with `labels` (served at `base`) is at least `at_least`;
/// returns the metrics text then.
pub async fn wait_metric(
    base: &str,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
    timeout: Duration,
) -> String {
    testkit::eventually(
        &format!("{name}{labels:?} >= {at_least} at {base}"),
        timeout,
        || async {
            let text = metrics(base).await;
            (testkit::metrics::value(&text, name, labels).unwrap_or(0.0) >= at_least)
                .then_some(text)
        },
    )
    .await
}
