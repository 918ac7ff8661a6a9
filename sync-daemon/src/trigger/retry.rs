//! Retries of failed workers: after each failure in a row a jittered, growing delay (capped at
//! the interval: the next cycle covers the worker anyway), forgotten on success or when the
//! worker leaves the fleet. Pure: instants and random draws come in.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use cml_client::CmlTarget;
use tokio::time::Instant;

use shared::backoff::Backoff;

#[derive(Debug, Clone)]
struct Due {
    target: CmlTarget,
    at: Instant,
}

#[derive(Debug)]
pub struct Retries {
    backoff: Backoff,
    failures: HashMap<String, u32>,
    due: BTreeMap<String, Due>,
}

impl Retries {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            failures: HashMap::new(),
            due: BTreeMap::new(),
        }
    }

    /// When the first retry is due.
    pub fn next_wake(&self) -> Option<Instant> {
        self.due.values().map(|r| r.at).min()
    }

    /// A sync of `target` succeeded: it is healthy again.
    pub fn succeeded(&mut self, worker_id: &str) {
        self.forget(worker_id);
    }

    /// A sync of `target` failed: schedules its retry (`unit` is a draw in `[0, 1)` for the
    /// jitter). Returns the failures in a row and the delay.
    pub fn failed(&mut self, target: CmlTarget, now: Instant, unit: f64) -> (u32, Duration) {
        let failures = self.failures.entry(target.worker_id.clone()).or_insert(0);
        *failures += 1;
        let failures = *failures;
        let delay = self.backoff.delay(failures, unit);
        self.due.insert(
            target.worker_id.clone(),
            Due {
                target,
                at: now + delay,
            },
        );
        (failures, delay)
    }

    /// Takes the workers whose retry is due.
    pub fn take_due(&mut self, now: Instant) -> Vec<CmlTarget> {
        let due: Vec<String> = self
            .due
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.iter()
            .filter_map(|id| self.due.remove(id))
            .map(|r| r.target)
            .collect()
    }

    /// Only these workers are active now: the others are no longer retried.
    pub fn retain(&mut self, active: &HashSet<&str>) {
        self.due.retain(|id, _| active.contains(id.as_str()));
        self.failures.retain(|id, _| active.contains(id.as_str()));
    }

    /// `worker_id` is no longer to be synced, or is healthy: no retry, no failure count.
    pub fn forget(&mut self, worker_id: &str) {
        self.due.remove(worker_id);
        self.failures.remove(worker_id);
    }

    /// Pending retries are dropped (another replica, or a later holder, has its own).
    pub fn clear(&mut self) {
        self.due.clear();
    }
}
