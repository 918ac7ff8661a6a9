//! What syncs next: the passes the trigger sources open (a cycle, due retries, syncs asked for
//! now, labs a worker's event stream said changed), a global concurrency cap, and never two
//! syncs of one worker at once — a worker asked for while it is queued or syncing joins that
//! sync's outcome, except for changes a CML event announced: those never join a running sync
//! (its CML calls may predate the change) but queue one more sync after it, in which every
//! change announced meanwhile is coalesced. It owns the two timed sources
//! (the [cycle timer](crate::trigger::cycle) and the [retries](crate::trigger::retry)); the
//! others feed it through the runner.
//!
//! Pure: no I/O and no clock of its own; instants come in (tokio's, so tests pause and advance
//! time). The runner does the I/O around it.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    time::Duration,
};

use cml_client::CmlTarget;
use shared::backoff::Backoff;
use tokio::time::Instant;

use crate::trigger::{cycle::CycleTimer, retry::Retries};

/// Names one pass: a cycle, a batch of retries, or a requested sync.
pub type PassId = u64;

/// Why a pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// Every active worker, every interval.
    Cycle,
    /// Failed workers whose retry is due.
    Retry,
    /// Workers someone (or something: the registry) asked to sync now.
    Requested,
    /// What a worker's CML event stream announced: some of its labs changed, or the stream is
    /// live again and the worker is relisted.
    Event,
}

/// What a sync of a worker reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every lab of the worker.
    Full,
    /// These labs only (named by the worker's event stream).
    Labs(BTreeSet<String>),
    /// Who may see the worker's labs: its users and groups only (every
    /// `sync.access_interval`, or when its event stream says users or groups changed).
    Access,
}

impl Scope {
    /// One sync reading what both would: a full sync covers any labs and the access data;
    /// some labs and the access data together are read by a full sync (the one sync that
    /// reads both).
    fn merge(&mut self, other: Scope) {
        match (&mut *self, other) {
            (Scope::Full, _) | (Scope::Access, Scope::Access) => {}
            (_, Scope::Full) => *self = Scope::Full,
            (Scope::Labs(mine), Scope::Labs(theirs)) => mine.extend(theirs),
            (Scope::Labs(_), Scope::Access) | (Scope::Access, Scope::Labs(_)) => {
                *self = Scope::Full
            }
        }
    }
}

/// A pass the schedule just opened: the workers it waits for (each once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub pass: PassId,
    pub kind: PassKind,
    pub workers: Vec<CmlTarget>,
}

/// A worker sync to start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub target: CmlTarget,
    pub scope: Scope,
    /// The pass that asked first: it records the worker's status.
    pub owner: PassId,
}

/// What the end of one worker's sync means for the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Every pass waiting for this worker, the owner first.
    pub passes: Vec<PassId>,
    /// Failures in a row, this one included (0 after a success).
    pub failures: u32,
    /// When a failed worker is retried.
    pub retry_in: Option<Duration>,
}

/// A worker that will not sync after all (shutdown, lease lost), and the passes that wanted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub target: CmlTarget,
    pub passes: Vec<PassId>,
}

#[derive(Debug, Clone)]
struct Job {
    target: CmlTarget,
    passes: Vec<PassId>,
    scope: Scope,
}

#[derive(Debug)]
pub struct Schedule {
    pub(crate) cycle: CycleTimer,
    retries: Retries,
    concurrency: usize,
    queue: VecDeque<Job>,
    running: HashMap<String, Job>,
    next_pass: PassId,
}

impl Schedule {
    /// The first cycle is due at `now` (`run_immediately`) or an interval later.
    pub fn new(
        now: Instant,
        interval: Duration,
        run_immediately: bool,
        retry_base: Duration,
        concurrency: usize,
    ) -> Self {
        let backoff = Backoff {
            base: retry_base,
            cap: interval,
        };
        Self {
            cycle: CycleTimer::new(now, interval, run_immediately, backoff),
            retries: Retries::new(backoff),
            concurrency: concurrency.max(1),
            queue: VecDeque::new(),
            running: HashMap::new(),
            next_pass: 1,
        }
    }

    /// When something timed is due next: the next cycle (unless one runs) or a retry.
    pub fn next_wake(&self) -> Option<Instant> {
        self.cycle
            .next_wake()
            .into_iter()
            .chain(self.retries.next_wake())
            .min()
    }

    /// When the first retry is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.next_wake()
    }

    /// Whether a cycle should start now.
    pub fn cycle_due(&self, now: Instant) -> bool {
        self.cycle.due(now)
    }

    /// Opens a cycle over `workers` (the active ones now). Workers that left the fleet are no
    /// longer retried.
    pub fn start_cycle(&mut self, workers: Vec<CmlTarget>) -> Opened {
        let active: HashSet<&str> = workers.iter().map(|t| t.worker_id.as_str()).collect();
        self.retries.retain(&active);
        let opened = self.open(PassKind::Cycle, workers);
        self.cycle.started(opened.pass);
        opened
    }

    /// Opens the rest of a cycle another replica began and never finished, over `workers` (the
    /// ones it did not reach). The schedule stays that cycle's: the next one is still an
    /// interval after it began.
    pub fn resume_cycle(&mut self, workers: Vec<CmlTarget>) -> Opened {
        let opened = self.open(PassKind::Cycle, workers);
        self.cycle.resumed(opened.pass);
        opened
    }

    /// The worker list could not be read: the cycle is tried again soon. Returns the delay.
    pub fn cycle_not_started(&mut self, now: Instant, unit: f64) -> Duration {
        self.cycle.not_started(now, unit)
    }

    /// The cycle `pass` has no worker left to wait for (see [`CycleTimer::finished`]).
    pub fn cycle_finished(&mut self, pass: PassId, now: Instant) {
        self.cycle.finished(pass, now);
    }

    /// This replica took the lease over (see [`CycleTimer::took_over`]).
    pub fn took_over(&mut self, now: Instant, since_last_cycle: Option<Duration>) {
        self.cycle.took_over(now, since_last_cycle);
    }

    /// Opens a pass over the workers whose retry is due, if any.
    pub fn due_retries(&mut self, now: Instant) -> Option<Opened> {
        let due = self.retries.take_due(now);
        (!due.is_empty()).then(|| self.open(PassKind::Retry, due))
    }

    /// Asks for `target` to sync now. Joins a sync of that worker that is queued or running.
    pub fn request(&mut self, target: CmlTarget) -> Opened {
        self.request_all(vec![target])
    }

    /// Asks for every one of `targets` to sync now, in one pass.
    pub fn request_all(&mut self, targets: Vec<CmlTarget>) -> Opened {
        self.open(PassKind::Requested, targets)
    }

    fn open(&mut self, kind: PassKind, targets: Vec<CmlTarget>) -> Opened {
        let pass = self.next_pass;
        self.next_pass += 1;
        let mut seen = HashSet::new();
        let workers: Vec<CmlTarget> = targets
            .into_iter()
            .filter(|t| seen.insert(t.worker_id.clone()))
            .collect();
        for target in &workers {
            match self.running.get_mut(&target.worker_id) {
                Some(job) if job.scope == Scope::Full => job.passes.push(pass),
                _ => self.enqueue(target, pass, Scope::Full),
            }
        }
        Opened {
            pass,
            kind,
            workers,
        }
    }

    /// What `target`'s event stream announced: `scope` is to be synced. Never joins a running
    /// sync of the worker (it may have read CML before the change): a sync after it does,
    /// and every change announced until that one starts is coalesced into it.
    pub fn event(&mut self, target: CmlTarget, scope: Scope) -> Opened {
        let pass = self.next_pass;
        self.next_pass += 1;
        self.enqueue(&target, pass, scope);
        Opened {
            pass,
            kind: PassKind::Event,
            workers: vec![target],
        }
    }

    /// Adds `pass` to the worker's queued sync (widened to `scope`), or queues one.
    fn enqueue(&mut self, target: &CmlTarget, pass: PassId, scope: Scope) {
        if let Some(job) = self
            .queue
            .iter_mut()
            .find(|j| j.target.worker_id == target.worker_id)
        {
            job.passes.push(pass);
            job.scope.merge(scope);
        } else {
            self.queue.push_back(Job {
                target: target.clone(),
                passes: vec![pass],
                scope,
            });
        }
    }

    /// The next sync to start, while fewer than `concurrency` run.
    pub fn next_start(&mut self) -> Option<Start> {
        if self.running.len() >= self.concurrency {
            return None;
        }
        // A worker's next sync waits for the one it follows.
        let at = self
            .queue
            .iter()
            .position(|j| !self.running.contains_key(&j.target.worker_id))?;
        let job = self.queue.remove(at)?;
        let start = Start {
            target: job.target.clone(),
            scope: job.scope.clone(),
            owner: job.passes[0],
        };
        self.running.insert(job.target.worker_id.clone(), job);
        Some(start)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// A worker's sync ended. `unit` is a random draw in `[0, 1)` for the retry's jitter.
    pub fn finished(&mut self, worker_id: &str, ok: bool, now: Instant, unit: f64) -> Finished {
        let Some(job) = self.running.remove(worker_id) else {
            return Finished {
                passes: Vec::new(),
                failures: 0,
                retry_in: None,
            };
        };
        if ok {
            self.retries.succeeded(worker_id);
            return Finished {
                passes: job.passes,
                failures: 0,
                retry_in: None,
            };
        }
        let (failures, delay) = self.retries.failed(job.target, now, unit);
        Finished {
            passes: job.passes,
            failures,
            retry_in: Some(delay),
        }
    }

    /// Worker `worker_id` is no longer to be synced (it stopped): its retry is dropped, and a
    /// queued sync of it is given back as skipped. A sync of it that runs goes on.
    pub fn forget(&mut self, worker_id: &str) -> Option<Skipped> {
        self.retries.forget(worker_id);
        let at = self
            .queue
            .iter()
            .position(|j| j.target.worker_id == worker_id)?;
        let job = self.queue.remove(at)?;
        Some(Skipped {
            target: job.target,
            passes: job.passes,
        })
    }

    /// No new sync starts: the queued ones are given back as skipped, and pending retries are
    /// forgotten (another replica, or a later holder, has its own schedule). Syncs that run go on.
    pub fn stop(&mut self) -> Vec<Skipped> {
        self.retries.clear();
        self.queue
            .drain(..)
            .map(|j| Skipped {
                target: j.target,
                passes: j.passes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(60);
    const RETRY_BASE: Duration = Duration::from_secs(4);

    fn t(id: &str) -> CmlTarget {
        CmlTarget {
            worker_id: id.into(),
            endpoint: format!("https://{id}.example"),
        }
    }

    fn ids(workers: &[CmlTarget]) -> Vec<&str> {
        workers.iter().map(|t| t.worker_id.as_str()).collect()
    }

    fn schedule(concurrency: usize) -> Schedule {
        Schedule::new(Instant::now(), INTERVAL, true, RETRY_BASE, concurrency)
    }

    /// Starts everything the cap allows; returns the worker ids started.
    fn start_all(s: &mut Schedule) -> Vec<String> {
        std::iter::from_fn(|| s.next_start())
            .map(|start| start.target.worker_id)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_cycle_is_due_at_once_or_an_interval_later() {
        let now = Instant::now();
        let s = schedule(4);
        assert!(s.cycle_due(now));
        assert_eq!(s.next_wake(), Some(now));
        let later = Schedule::new(now, INTERVAL, false, RETRY_BASE, 4);
        assert!(!later.cycle_due(now));
        assert_eq!(later.next_wake(), Some(now + INTERVAL));
    }

    #[tokio::test(start_paused = true)]
    async fn cycles_come_every_interval_and_never_overlap() {
        let start = Instant::now();
        let mut s = schedule(4);
        let c1 = s.start_cycle(vec![t("a"), t("b")]);
        assert_eq!(c1.kind, PassKind::Cycle);
        assert_eq!(start_all(&mut s), ["a", "b"]);
        tokio::time::advance(Duration::from_secs(10)).await;
        s.finished("a", true, Instant::now(), 0.5);
        s.finished("b", true, Instant::now(), 0.5);
        s.cycle_finished(c1.pass, Instant::now());
        assert_eq!(
            s.next_wake(),
            Some(start + INTERVAL),
            "an interval after the last start"
        );
        tokio::time::advance(Duration::from_secs(49)).await;
        assert!(!s.cycle_due(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(s.cycle_due(Instant::now()));

        // While a cycle runs, the next one is not due even when its time has come.
        let c2 = s.start_cycle(vec![t("a")]);
        tokio::time::advance(INTERVAL * 2).await;
        assert!(!s.cycle_due(Instant::now()));
        assert_eq!(s.next_wake(), None, "nothing timed while the cycle runs");
        start_all(&mut s);
        s.finished("a", true, Instant::now(), 0.5);
        s.cycle_finished(c2.pass, Instant::now());
        // Overrun: the next cycle is an interval from now, not a burst of the missed ones.
        assert_eq!(s.next_wake(), Some(Instant::now() + INTERVAL));
    }

    #[tokio::test(start_paused = true)]
    async fn the_concurrency_cap_holds_across_passes() {
        let mut s = schedule(2);
        s.start_cycle(vec![t("a"), t("b"), t("c")]);
        s.request(t("d"));
        assert_eq!(start_all(&mut s), ["a", "b"]);
        assert_eq!(s.running(), 2);
        assert!(s.next_start().is_none());
        s.finished("a", true, Instant::now(), 0.5);
        assert_eq!(start_all(&mut s), ["c"]);
        s.finished("b", true, Instant::now(), 0.5);
        assert_eq!(start_all(&mut s), ["d"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_for_a_running_or_queued_worker_joins_that_sync() {
        let mut s = schedule(1);
        let cycle = s.start_cycle(vec![t("a"), t("b")]);
        assert_eq!(start_all(&mut s), ["a"]);
        // `a` is syncing: the request joins it instead of starting a second sync.
        let on_running = s.request(t("a"));
        // `b` is queued: the request joins the queued sync.
        let on_queued = s.request(t("b"));
        let done = s.finished("a", true, Instant::now(), 0.5);
        assert_eq!(done.passes, [cycle.pass, on_running.pass]);
        let starts: Vec<Start> = std::iter::from_fn(|| s.next_start()).collect();
        assert_eq!(starts.len(), 1, "b syncs once");
        assert_eq!(starts[0].owner, cycle.pass, "the first asker owns the sync");
        let done = s.finished("b", true, Instant::now(), 0.5);
        assert_eq!(done.passes, [cycle.pass, on_queued.pass]);
        assert!(s.next_start().is_none());
        // Once `a` is idle, a request starts a sync of its own.
        let fresh = s.request(t("a"));
        let start = s.next_start().expect("starts");
        assert_eq!(
            (start.target.worker_id.as_str(), start.owner),
            ("a", fresh.pass)
        );
    }

    fn labs(ids: &[&str]) -> Scope {
        Scope::Labs(ids.iter().map(|id| (*id).to_owned()).collect())
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_during_a_sync_of_its_worker_makes_one_more_sync_after_it() {
        let mut s = schedule(4);
        let cycle = s.start_cycle(vec![t("a")]);
        assert_eq!(start_all(&mut s), ["a"]);
        // Three changes announced while `a` syncs: none joins it (its CML read may be older).
        let e1 = s.event(t("a"), labs(&["l1"]));
        let e2 = s.event(t("a"), labs(&["l2"]));
        let e3 = s.event(t("a"), labs(&["l1"]));
        assert_eq!(e1.kind, PassKind::Event);
        assert!(s.next_start().is_none(), "never two syncs of one worker");
        let done = s.finished("a", true, Instant::now(), 0.5);
        assert_eq!(
            done.passes,
            [cycle.pass],
            "the events did not join the cycle's sync"
        );
        // One more sync, of both labs, for the three of them.
        let start = s.next_start().expect("one more sync");
        assert_eq!(
            (
                start.target.worker_id.as_str(),
                start.scope.clone(),
                start.owner
            ),
            ("a", labs(&["l1", "l2"]), e1.pass)
        );
        assert!(s.next_start().is_none());
        let done = s.finished("a", true, Instant::now(), 0.5);
        assert_eq!(done.passes, [e1.pass, e2.pass, e3.pass]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_sync_covers_the_labs_queued_and_a_labs_sync_covers_no_full_one() {
        let mut s = schedule(1);
        // `b` holds the only slot; `a`'s announced labs wait, then a relist widens them.
        s.request(t("b"));
        start_all(&mut s);
        let event = s.event(t("a"), labs(&["l1"]));
        let relist = s.event(t("a"), Scope::Full);
        s.finished("b", true, Instant::now(), 0.5);
        let start = s.next_start().expect("a");
        assert_eq!((start.scope, start.owner), (Scope::Full, event.pass));
        let done = s.finished("a", true, Instant::now(), 0.5);
        assert_eq!(done.passes, [event.pass, relist.pass]);
        // A refresh asked for while a sync of some labs runs does not join it: a full one
        // follows.
        s.event(t("a"), labs(&["l2"]));
        assert_eq!(start_all(&mut s), ["a"]);
        let refresh = s.request(t("a"));
        assert!(s.next_start().is_none());
        s.finished("a", true, Instant::now(), 0.5);
        let start = s.next_start().expect("the refresh's own sync");
        assert_eq!((start.scope, start.owner), (Scope::Full, refresh.pass));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_waiting_for_its_own_sync_does_not_hold_up_the_others() {
        let mut s = schedule(2);
        s.request(t("a"));
        assert_eq!(start_all(&mut s), ["a"]);
        s.event(t("a"), labs(&["l1"]));
        s.request(t("b"));
        assert_eq!(start_all(&mut s), ["b"], "b starts past a's follow-up");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_worker_is_retried_with_growing_jittered_delays_until_it_succeeds() {
        let mut s = schedule(4);
        let c = s.start_cycle(vec![t("a"), t("b")]);
        start_all(&mut s);
        s.finished("b", true, Instant::now(), 0.5);
        let first = s.finished("a", false, Instant::now(), 0.0);
        assert_eq!(first.failures, 1);
        assert_eq!(
            first.retry_in,
            Some(RETRY_BASE / 2),
            "half a step at the low end of the jitter"
        );
        s.cycle_finished(c.pass, Instant::now());
        assert_eq!(s.next_wake(), Some(Instant::now() + RETRY_BASE / 2));

        tokio::time::advance(RETRY_BASE / 2 - Duration::from_millis(1)).await;
        assert!(s.due_retries(Instant::now()).is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        let retry = s.due_retries(Instant::now()).expect("due");
        assert_eq!(
            (retry.kind, ids(&retry.workers)),
            (PassKind::Retry, vec!["a"])
        );
        assert_eq!(start_all(&mut s), ["a"]);
        let second = s.finished("a", false, Instant::now(), 0.999);
        assert_eq!(second.failures, 2);
        let delay = second.retry_in.expect("retried");
        assert!(delay > RETRY_BASE && delay < RETRY_BASE * 2, "{delay:?}");

        tokio::time::advance(delay).await;
        s.due_retries(Instant::now()).expect("due again");
        start_all(&mut s);
        let healed = s.finished("a", true, Instant::now(), 0.5);
        assert_eq!((healed.failures, healed.retry_in), (0, None));
        assert_eq!(
            s.next_wake(),
            Some(s.cycle.next),
            "only the next cycle is left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_never_wait_longer_than_the_interval() {
        let mut s = schedule(1);
        for _ in 0..20 {
            s.request(t("a"));
            start_all(&mut s);
            let f = s.finished("a", false, Instant::now(), 0.999);
            assert!(f.retry_in.expect("retried") <= INTERVAL);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_due_while_the_cycle_has_the_worker_queued_joins_it() {
        let mut s = schedule(1);
        s.request(t("a"));
        start_all(&mut s);
        s.finished("a", false, Instant::now(), 0.0);
        // A cycle queues `a` behind `b`; then a's retry comes due.
        let cycle = s.start_cycle(vec![t("b"), t("a")]);
        tokio::time::advance(RETRY_BASE).await;
        let retry = s.due_retries(Instant::now()).expect("due");
        assert_eq!(start_all(&mut s), ["b"]);
        s.finished("b", true, Instant::now(), 0.5);
        assert_eq!(start_all(&mut s), ["a"], "a syncs once for both");
        let done = s.finished("a", false, Instant::now(), 0.0);
        assert_eq!(done.passes, [cycle.pass, retry.pass]);
        assert_eq!(done.failures, 2, "one failure counted once, not per pass");
    }

    #[tokio::test(start_paused = true)]
    async fn workers_that_left_the_fleet_are_not_retried() {
        let mut s = schedule(4);
        s.start_cycle(vec![t("gone"), t("stays")]);
        start_all(&mut s);
        s.finished("gone", false, Instant::now(), 0.5);
        s.finished("stays", false, Instant::now(), 0.5);
        s.cycle_finished(1, Instant::now());
        tokio::time::advance(INTERVAL).await;
        s.start_cycle(vec![t("stays")]);
        tokio::time::advance(INTERVAL).await;
        let retry = s.due_retries(Instant::now());
        assert!(retry.is_none_or(|r| ids(&r.workers) == ["stays"]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_takeover_keeps_the_previous_holders_schedule() {
        let mut s = Schedule::new(Instant::now(), INTERVAL, true, RETRY_BASE, 4);
        s.took_over(Instant::now(), Some(Duration::from_secs(45)));
        assert_eq!(
            s.next_wake(),
            Some(Instant::now() + Duration::from_secs(15))
        );
        s.took_over(Instant::now(), Some(INTERVAL * 3));
        assert!(s.cycle_due(Instant::now()), "long overdue: at once");
        let mut fresh = Schedule::new(Instant::now(), INTERVAL, true, RETRY_BASE, 4);
        fresh.took_over(Instant::now(), None);
        assert!(
            fresh.cycle_due(Instant::now()),
            "no cycle ever ran: as configured"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_rest_of_an_interrupted_cycle_keeps_its_schedule() {
        let mut s = Schedule::new(Instant::now(), INTERVAL, true, RETRY_BASE, 4);
        // The last holder began a cycle 20 s ago and died in it.
        s.took_over(Instant::now(), Some(Duration::from_secs(20)));
        let rest = s.resume_cycle(vec![t("c"), t("d")]);
        assert_eq!(rest.kind, PassKind::Cycle);
        assert_eq!(start_all(&mut s), ["c", "d"]);
        assert_eq!(s.next_wake(), None, "a cycle runs");
        s.finished("c", true, Instant::now(), 0.5);
        s.finished("d", true, Instant::now(), 0.5);
        s.cycle_finished(rest.pass, Instant::now());
        assert_eq!(
            s.next_wake(),
            Some(Instant::now() + Duration::from_secs(40)),
            "an interval after the interrupted cycle began"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_registry_retries_the_cycle_soon() {
        let mut s = schedule(4);
        let retry_in = s.cycle_not_started(Instant::now(), 0.0);
        assert_eq!(retry_in, RETRY_BASE / 2);
        assert!(!s.cycle_due(Instant::now()));
        tokio::time::advance(retry_in).await;
        assert!(s.cycle_due(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_skips_queued_syncs_and_lets_running_ones_finish() {
        let mut s = schedule(1);
        let cycle = s.start_cycle(vec![t("a"), t("b"), t("c")]);
        start_all(&mut s);
        let skipped = s.stop();
        assert_eq!(
            skipped
                .iter()
                .map(|k| k.target.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert!(skipped.iter().all(|k| k.passes == [cycle.pass]));
        assert!(s.next_start().is_none());
        assert_eq!(
            s.finished("a", true, Instant::now(), 0.5).passes,
            [cycle.pass]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_worker_is_neither_retried_nor_left_queued() {
        let mut s = schedule(1);
        s.request(t("a"));
        start_all(&mut s);
        s.finished("a", false, Instant::now(), 0.0);
        let cycle = s.start_cycle(vec![t("b"), t("c")]);
        assert_eq!(start_all(&mut s), ["b"]);
        assert!(s.forget("a").is_none(), "not queued");
        let skipped = s.forget("c").expect("c was queued");
        assert_eq!(skipped.passes, [cycle.pass]);
        assert!(s.forget("b").is_none(), "b runs on");
        tokio::time::advance(INTERVAL).await;
        assert!(s.due_retries(Instant::now()).is_none(), "a is not retried");
        s.finished("b", true, Instant::now(), 0.5);
        assert!(s.next_start().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_names_each_worker_once() {
        let mut s = schedule(4);
        let c = s.start_cycle(vec![t("a"), t("a"), t("b")]);
        assert_eq!(ids(&c.workers), ["a", "b"]);
        assert_eq!(start_all(&mut s), ["a", "b"]);
    }
}
