//! The cycle timer: a cycle of every active worker each interval — never two at once, no burst
//! of missed cycles after an overrun, the previous holder's rhythm kept across a takeover, a
//! cycle whose worker list could not be read tried again soon. Pure: instants come in.
//!
//! The list itself is read by the registry source ([`super::registry`]) when the runner says a
//! cycle is due, so the loop never waits for MongoDB.

use std::time::Duration;

use tokio::time::Instant;

use shared::backoff::Backoff;

use crate::schedule::PassId;

#[derive(Debug)]
pub struct CycleTimer {
    interval: Duration,
    /// When an unreadable registry lets the cycle try again.
    backoff: Backoff,
    pub(crate) next: Instant,
    /// The cycle in progress: the next one waits for it.
    running: Option<PassId>,
}

impl CycleTimer {
    /// The first cycle is due at `now` (`run_immediately`) or an interval later.
    pub fn new(now: Instant, interval: Duration, run_immediately: bool, retry: Backoff) -> Self {
        Self {
            interval,
            backoff: retry,
            next: if run_immediately { now } else { now + interval },
            running: None,
        }
    }

    /// When the next cycle is due, unless one runs.
    pub fn next_wake(&self) -> Option<Instant> {
        self.running.is_none().then_some(self.next)
    }

    /// Whether a cycle should start now.
    pub fn due(&self, now: Instant) -> bool {
        self.running.is_none() && now >= self.next
    }

    /// Cycle `pass` starts. The next is due an interval after this one was; if that is
    /// already past (an overdue cycle), the overrun rule of [`CycleTimer::finished`] applies.
    pub fn started(&mut self, pass: PassId) {
        self.next += self.interval;
        self.running = Some(pass);
    }

    /// The rest of a cycle another replica began runs as `pass`: the schedule stays that
    /// cycle's (the next is still an interval after it began).
    pub fn resumed(&mut self, pass: PassId) {
        self.running = Some(pass);
    }

    /// The worker list could not be read: the cycle is tried again soon (a first retry's
    /// delay, jittered by `unit` in `[0, 1)`), not an interval later. Returns that delay.
    pub fn not_started(&mut self, now: Instant, unit: f64) -> Duration {
        let retry_in = self.backoff.delay(1, unit);
        self.next = now + retry_in;
        retry_in
    }

    /// Cycle `pass` has no worker left to wait for. After an overrun the next cycle is an
    /// interval from now: missed cycles are not run in a burst.
    pub fn finished(&mut self, pass: PassId, now: Instant) {
        if self.running == Some(pass) {
            self.running = None;
        }
        if self.next <= now {
            self.next = now + self.interval;
        }
    }

    /// This replica took the lease over: the next cycle is an interval after the last one any
    /// replica started (`since_last_cycle` ago), so a handover neither skips nor doubles one.
    pub fn took_over(&mut self, now: Instant, since_last_cycle: Option<Duration>) {
        if let Some(since) = since_last_cycle {
            self.next = now + self.interval.saturating_sub(since);
        }
    }
}
