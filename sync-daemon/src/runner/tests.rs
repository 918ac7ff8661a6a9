//! The runner with a fake sync and fake books, on paused time.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

use shared::{
    change::PlanCounts,
    fence::Term,
    store::ApplyOutcome,
    sync_request::{Outcome, RequestStatus},
};
use tokio::sync::Semaphore;

use super::*;
use crate::{runner::books::Bookkeeping, status::StatusUpdate, worker::WorkerOutcome};

const INTERVAL: Duration = Duration::from_secs(3600);
const RETRY_BASE: Duration = Duration::from_secs(10);

fn t(id: &str) -> CmlTarget {
    CmlTarget {
        worker_id: id.into(),
        endpoint: format!("https://{id}.example"),
    }
}

/// Counts the syncs dropped before they ended (aborted at shutdown).
struct DropGuard<'a>(&'a AtomicUsize, bool);

impl Drop for DropGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A sync that succeeds at once, unless its worker has a closed gate (it waits for a permit)
/// or panics left.
#[derive(Default)]
struct FakeSync {
    started: Mutex<Vec<String>>,
    scopes: Mutex<Vec<Scope>>,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    panics: Mutex<HashMap<String, u32>>,
    aborted: AtomicUsize,
}

impl FakeSync {
    fn gate(&self, worker: &str) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        self.gates
            .lock()
            .unwrap()
            .insert(worker.into(), gate.clone());
        gate
    }

    fn panic_once(&self, worker: &str) {
        self.panics.lock().unwrap().insert(worker.into(), 1);
    }

    fn started(&self) -> Vec<String> {
        self.started.lock().unwrap().clone()
    }
}

impl Syncer for FakeSync {
    fn term(&self) -> Term {
        Term(1)
    }

    fn sync(&self, target: CmlTarget, scope: Scope) -> impl Future<Output = WorkerSync> + Send {
        let id = target.worker_id.clone();
        self.started.lock().unwrap().push(id.clone());
        self.scopes.lock().unwrap().push(scope.clone());
        let gate = self.gates.lock().unwrap().get(&id).cloned();
        let panic = self
            .panics
            .lock()
            .unwrap()
            .get_mut(&id)
            .is_some_and(|left| {
                let now = *left > 0;
                *left = left.saturating_sub(1);
                now
            });
        async move {
            let mut guard = DropGuard(&self.aborted, false);
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate").forget();
            }
            assert!(!panic, "the sync of {id} panicked");
            guard.1 = true;
            WorkerSync {
                target,
                scope,
                attempt_at: DateTime::now(),
                took: Duration::from_millis(1),
                term: Term(1),
                result: Ok(WorkerOutcome {
                    access: crate::worker::AccessOutcome::NotAsked,
                    counts: PlanCounts {
                        synced: 2,
                        unchanged: 2,
                        ..PlanCounts::default()
                    },
                    applied: ApplyOutcome::default(),
                    complete: true,
                    source: "bulk",
                    groups: cml_client::GroupsRead::InLabs,
                    cml_calls: 1,
                    activity: false,
                }),
            }
        }
    }
}

/// Books that write nothing but what they were given; status writes wait at a gate.
struct FakeBooks {
    metrics: Metrics,
    gate: Semaphore,
    statuses: Mutex<Vec<String>>,
    /// Status writes (round trips).
    writes: AtomicUsize,
    requests: Mutex<Vec<(String, Option<Outcome>)>>,
    cycles: AtomicUsize,
}

impl FakeBooks {
    fn new(open: bool) -> Arc<Self> {
        Arc::new(Self {
            metrics: Metrics::default(),
            gate: Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }),
            statuses: Mutex::default(),
            writes: AtomicUsize::new(0),
            requests: Mutex::default(),
            cycles: AtomicUsize::new(0),
        })
    }

    fn statuses(&self) -> Vec<String> {
        self.statuses.lock().unwrap().clone()
    }

    fn requests(&self) -> Vec<(String, Option<Outcome>)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Bookkeeping for FakeBooks {
    async fn write_statuses(&self, statuses: &[StatusUpdate]) {
        self.gate.acquire().await.expect("gate").forget();
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.statuses
            .lock()
            .unwrap()
            .extend(statuses.iter().map(|s| s.worker_id.clone()));
    }

    async fn cycle_closed(&self, _: &PassReport, _: bool) {
        self.cycles.fetch_add(1, Ordering::SeqCst);
    }

    async fn request_finished(&self, request: SyncRequest, report: Option<&PassReport>) {
        let outcome = report.and_then(crate::trigger::requests::outcome_of);
        self.requests.lock().unwrap().push((request.id, outcome));
    }

    async fn update_fleet_view(&self) {}

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

fn runner(sync: &Arc<FakeSync>, books: &Arc<FakeBooks>, concurrency: usize) -> Runner<FakeSync> {
    with_schedule(
        sync,
        books,
        Schedule::new(Instant::now(), INTERVAL, false, RETRY_BASE, concurrency),
    )
}

/// A runner whose first cycle is due at once.
fn runner_due_now(sync: &Arc<FakeSync>, books: &Arc<FakeBooks>) -> Runner<FakeSync> {
    with_schedule(
        sync,
        books,
        Schedule::new(Instant::now(), INTERVAL, true, RETRY_BASE, 4),
    )
}

fn with_schedule(
    sync: &Arc<FakeSync>,
    books: &Arc<FakeBooks>,
    schedule: Schedule,
) -> Runner<FakeSync> {
    Runner::new(
        sync.clone(),
        Arc::new(Metrics::default()),
        schedule,
        Books::start(books.clone()),
    )
}

fn request(id: &str, worker: &str) -> Trigger {
    Trigger::Request {
        request: SyncRequest {
            status: RequestStatus::Running,
            ..SyncRequest::pending(id.into(), worker.into(), DateTime::now())
        },
        target: t(worker),
    }
}

/// Lets the tasks (syncs, books) run until `done` holds (paused time: no clock moves meanwhile).
async fn settle(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        task::yield_now().await;
    }
    panic!("the tasks did not get there");
}

#[tokio::test(start_paused = true)]
async fn a_status_write_held_at_a_gate_does_not_delay_the_next_sync() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(false));
    let mut runner = runner(&sync, &books, 1);
    runner.accept(request("r1", "a"));
    let a = runner.join_next().await.expect("a ends");
    runner.finished(a);
    // a's pass closed: its status write is now held at the books' gate.
    runner.accept(request("r2", "b"));
    settle(|| sync.started().len() == 2).await;
    assert_eq!(sync.started(), ["a", "b"], "b started while a's books wait");
    let b = tokio::time::timeout(Duration::from_secs(1), runner.join_next())
        .await
        .expect("b ends while the gate is closed")
        .expect("b");
    runner.finished(b);
    assert!(books.statuses().is_empty(), "nothing written yet");
    books.gate.add_permits(Semaphore::MAX_PERMITS);
    settle(|| books.requests().len() == 2).await;
    assert_eq!(books.statuses(), ["a", "b"], "in the order the syncs ended");
    assert!(runner.drain(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn a_request_for_a_worker_whose_sync_is_running_joins_it() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    let gate = sync.gate("w");
    let mut runner = runner(&sync, &books, 4);
    runner.accept(request("r1", "w"));
    runner.accept(request("r2", "w"));
    settle(|| !sync.started().is_empty()).await;
    assert_eq!(sync.started(), ["w"], "one sync of w");
    gate.add_permits(1);
    let w = runner.join_next().await.expect("w ends");
    let done = runner.finished(w);
    assert_eq!(done.passes.len(), 2, "both requests waited for it");
    settle(|| books.requests().len() == 2).await;
    let requests = books.requests();
    for (id, outcome) in &requests {
        assert!(
            matches!(outcome, Some(Outcome::Done { counts, .. }) if counts.synced == 2),
            "{id}: {outcome:?}"
        );
    }
    assert_eq!(books.statuses(), ["w"], "one status, by the sync's owner");
    assert_eq!(sync.started().len(), 1);
    assert!(runner.drain(Duration::from_secs(1)).await);
}

fn event(worker: &str, labs: &[&str]) -> Trigger {
    Trigger::Event {
        target: t(worker),
        scope: if labs.is_empty() {
            Scope::Full
        } else {
            Scope::Labs(labs.iter().map(|l| (*l).to_owned()).collect())
        },
        seen: Instant::now(),
    }
}

#[tokio::test(start_paused = true)]
async fn changes_announced_during_a_sync_are_synced_once_after_it_and_counted_by_trigger() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    let gate = sync.gate("w");
    let mut runner = runner(&sync, &books, 4);
    // The stream went live: a relist; then three changes while it runs.
    runner.accept(event("w", &[]));
    settle(|| sync.started().len() == 1).await;
    for labs in [&["l1"][..], &["l2"], &["l1", "l3"]] {
        runner.accept(event("w", labs));
    }
    tokio::time::advance(Duration::from_millis(40)).await;
    gate.add_permits(2);
    let relist = runner.join_next().await.expect("the relist ends");
    runner.finished(relist);
    let after = runner.join_next().await.expect("one more sync");
    runner.finished(after);
    let labs: BTreeSet<String> = ["l1", "l2", "l3"].map(String::from).into();
    assert_eq!(
        *sync.scopes.lock().unwrap(),
        [Scope::Full, Scope::Labs(labs)],
        "the changes never joined the running sync; one sync after it took them all"
    );
    let text = runner.metrics.render();
    for line in [
        "sync_worker_syncs_started_total{trigger=\"relist\"} 1",
        "sync_worker_syncs_started_total{trigger=\"event\"} 1",
        // Each of the three announcements, from its arrival to the write that took it.
        "sync_event_lag_seconds_count 3",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    // The changes waited 40 ms for the relist: the lag from the first to its write says so.
    assert!(
        text.contains("sync_event_lag_seconds_bucket{le=\"0.05\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("sync_event_lag_seconds_bucket{le=\"0.025\"} 0"),
        "{text}"
    );
    assert!(runner.drain(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn the_statuses_of_event_passes_are_written_together_within_a_second() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    let mut runner = runner(&sync, &books, 4);
    for w in ["a", "b", "c"] {
        runner.accept(event(w, &["l1"]));
    }
    for _ in 0..3 {
        let done = runner.join_next().await.expect("a sync ends");
        runner.finished(done);
    }
    settle(|| true).await;
    assert!(books.statuses().is_empty(), "they wait for the others");
    tokio::time::sleep(Duration::from_millis(1001)).await;
    settle(|| books.statuses().len() == 3).await;
    assert_eq!(
        books.writes.load(Ordering::SeqCst),
        1,
        "one write for three"
    );
    // Anything else writes what waits first: a worker's statuses stay in order.
    runner.accept(event("a", &["l2"]));
    let done = runner.join_next().await.expect("a ends");
    runner.finished(done);
    runner.accept(request("r1", "a"));
    let done = runner.join_next().await.expect("a ends again");
    runner.finished(done);
    settle(|| books.requests().len() == 1).await;
    assert_eq!(books.statuses(), ["a", "b", "c", "a", "a"]);
    assert_eq!(books.writes.load(Ordering::SeqCst), 3);
    assert!(runner.drain(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn a_request_while_syncing_is_stopped_is_left_pending() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    let mut runner = runner(&sync, &books, 4);
    runner.stop();
    runner.accept(request("r1", "w"));
    assert!(sync.started().is_empty());
    settle(|| books.requests().len() == 1).await;
    assert_eq!(books.requests(), [("r1".to_owned(), None)], "requeued");
    assert!(runner.drain(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn a_worker_whose_sync_panics_is_retried() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    sync.panic_once("w");
    let mut runner = runner(&sync, &books, 4);
    runner.accept(Trigger::Registry {
        sync_now: vec![t("w")],
        stopped: Vec::new(),
    });
    let first = runner.join_next().await.expect("ends");
    assert!(
        matches!(&first.result, Err(crate::Error::Panicked(why)) if why.contains("panicked")),
        "{:?}",
        first.result
    );
    let done = runner.finished(first);
    let retry_in = done.retry_in.expect("a retry is scheduled");
    assert_eq!(done.failures, 1);
    assert_eq!(runner.next_wake(), Some(Instant::now() + retry_in));
    tokio::time::advance(retry_in).await;
    assert_eq!(runner.tick(Instant::now()), None, "no cycle due");
    settle(|| sync.started().len() == 2).await;
    assert_eq!(sync.started(), ["w", "w"], "the retry started");
    let second = runner.join_next().await.expect("ends");
    assert!(second.result.is_ok());
    let done = runner.finished(second);
    assert_eq!((done.failures, done.retry_in), (0, None));
    settle(|| books.statuses().len() == 2).await;
    assert!(runner.drain(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_within_the_grace_and_joins_every_task() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    let _never = sync.gate("stuck");
    let slow = sync.gate("slow");
    let mut runner = runner(&sync, &books, 1);
    runner.accept(Trigger::Registry {
        sync_now: vec![t("stuck"), t("slow"), t("queued")],
        stopped: Vec::new(),
    });
    runner.accept(Trigger::Registry {
        sync_now: vec![t("slow")],
        stopped: Vec::new(),
    });
    settle(|| !sync.started().is_empty()).await;
    assert_eq!(sync.started(), ["stuck"], "the cap holds");
    runner.stop();
    slow.add_permits(1);
    let grace = Duration::from_secs(25);
    let began = Instant::now();
    let metrics = runner.metrics.clone();
    assert!(!runner.drain(grace).await, "stuck never ends");
    assert_eq!(began.elapsed(), grace, "drained at the grace, not later");
    assert_eq!(
        sync.aborted.load(Ordering::SeqCst),
        1,
        "stuck's sync was dropped"
    );
    assert_eq!(
        sync.started(),
        ["stuck"],
        "nothing queued started after stop"
    );
    assert_eq!(metrics.workers_in_flight.get(), 0.0);
    // The runner (and with it the books' task) is gone: drain consumed it and joined them.
    assert!(books.statuses().is_empty(), "no sync ended, no status");
    assert_eq!(books.cycles.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cycle_due_is_read_by_the_source_and_not_asked_again_meanwhile() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    let mut runner = runner_due_now(&sync, &books);
    assert_eq!(runner.tick(Instant::now()), Some(CycleRead::Full));
    assert_eq!(
        runner.next_wake(),
        None,
        "no wake for the cycle while it is read"
    );
    assert_eq!(runner.tick(Instant::now()), None, "asked once");
    runner.accept(Trigger::Cycle {
        targets: vec![t("a"), t("b")],
        resumed: false,
    });
    let mut ended = HashSet::new();
    while ended.len() < 2 {
        let s = runner.join_next().await.expect("ends");
        ended.insert(s.target.worker_id.clone());
        runner.finished(s);
    }
    settle(|| books.cycles.load(Ordering::SeqCst) == 1).await;
    assert_eq!(runner.next_wake(), Some(Instant::now() + INTERVAL));
    assert!(runner.drain(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_worker_list_retries_the_cycle_soon_but_an_unfinished_rest_waits() {
    let (sync, books) = (Arc::new(FakeSync::default()), FakeBooks::new(true));
    let mut runner = runner_due_now(&sync, &books);
    let unreadable = |resumed| Trigger::CycleUnreadable {
        error: crate::Error::Deadline(Duration::from_secs(1)),
        resumed,
    };
    assert_eq!(runner.tick(Instant::now()), Some(CycleRead::Full));
    runner.accept(unreadable(false));
    let wake = runner.next_wake().expect("a wake");
    assert!(
        wake <= Instant::now() + RETRY_BASE,
        "soon, not an interval later"
    );
    // A takeover in the middle of a cycle: the rest is read first.
    let began = DateTime::from_millis(DateTime::now().timestamp_millis() - 1000);
    runner.took_over(Some(LeaseState {
        holder: "other".into(),
        expires_at: DateTime::now(),
        last_cycle_at: Some(began),
        last_cycle_end_at: None,
    }));
    assert_eq!(
        runner.tick(Instant::now()),
        Some(CycleRead::Resume { since: began })
    );
    runner.accept(unreadable(true));
    assert_eq!(
        runner.next_wake(),
        Some(Instant::now() + INTERVAL - Duration::from_secs(1)),
        "the rest waits for the next cycle, on the last holder's schedule"
    );
    assert_eq!(books.cycles.load(Ordering::SeqCst), 0);
    assert!(runner.drain(Duration::from_secs(1)).await);
}
