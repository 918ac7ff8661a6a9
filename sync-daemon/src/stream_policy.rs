//! What a worker's event-stream watch does after each thing that happens to it, and the state
//! it shows: pure (the random draw and the time are passed in).
//!
//! A stream counts as healthy only once it has stayed up for [`Policy::healthy_after`]: a
//! server that sends a message and closes (a proxy dropping sockets, a server restarting in a
//! loop) fails like one that closes at once, and its failures in a row back off. A healthy
//! stream that broke is opened again within a few seconds; a token refused with 3000 is fetched
//! anew and the stream reopened at once, once per healthy stream; later refusals back off like
//! any failure (so renewals of a worker's token are bounded by the backoff). A server without a
//! stream (a 404: CML before 2.6) is polled, and its stream tried again only after a long
//! interval. Every time a stream is live again the worker is relisted, at most once per
//! [`Policy::relist_every`]: a relist asked for sooner waits until then (it still reads
//! everything that changed meanwhile).

use std::time::Duration;

use shared::backoff::Backoff;
use tokio::time::Instant;

/// Why a watch is failing, a closed set (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// The server cannot be reached, or did not answer in time.
    Unreachable,
    /// The token or the credentials were refused.
    Unauthorized,
    /// The upgrade answered with a redirect (never followed).
    Redirect,
    /// A message past the size bound, or the stream held the most when the streams together
    /// held more than their budget.
    TooLarge,
    /// More frames a second than allowed (pings and pongs count).
    Flooded,
    /// No text message for longer than the silence allowed.
    Silent,
    /// The server took none of our frames (pongs, the close) for longer than the silence
    /// allowed.
    Stalled,
    /// The stream broke or was closed by the server.
    Dropped,
}

impl FailReason {
    pub const ALL: [FailReason; 8] = [
        FailReason::Unreachable,
        FailReason::Unauthorized,
        FailReason::Redirect,
        FailReason::TooLarge,
        FailReason::Flooded,
        FailReason::Silent,
        FailReason::Stalled,
        FailReason::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Unreachable => "unreachable",
            FailReason::Unauthorized => "unauthorized",
            FailReason::Redirect => "redirect",
            FailReason::TooLarge => "too_large",
            FailReason::Flooded => "flooded",
            FailReason::Silent => "silent",
            FailReason::Stalled => "stalled",
            FailReason::Dropped => "dropped",
        }
    }
}

/// What a watch shows of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchState {
    /// Opening (or reopening after one break).
    Connecting,
    /// Authenticated, messages coming.
    Live,
    /// The server has no stream: synced by the periodic cycle only.
    Polling,
    /// Failed this many times in a row (past [`Policy::failing_after`]); a stream that comes
    /// back keeps showing it until it has been healthy.
    Failing(FailReason),
}

impl WatchState {
    /// The state's name (`failing` for every reason).
    pub fn as_str(self) -> &'static str {
        match self {
            WatchState::Connecting => "connecting",
            WatchState::Live => "live",
            WatchState::Polling => "polling",
            WatchState::Failing(_) => "failing",
        }
    }
}

/// Something that happened to a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happened {
    /// The stream is open and its first message came after the authentication: it is live.
    Live,
    /// The stream has stayed up for [`Policy::healthy_after`]: its failures are forgiven.
    Healthy,
    /// The relist asked for by [`Next::Relist`] was sent.
    Relisted,
    /// Opening failed for this reason (before anything came).
    OpenFailed(FailReason),
    /// The server has no stream (`/ws/ui` answered 404).
    NoStream,
    /// An open stream ended for this reason (3000: `Unauthorized`).
    Ended(FailReason),
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Sync the whole worker once, after this delay (zero: now), if the stream is still up
    /// then: a relist, what changed while it was not watched.
    Relist { after: Duration },
    /// Keep reading.
    Read,
    /// Open the stream again after this delay (zero: at once), fetching a new token first
    /// when `reauthenticate`.
    Reconnect {
        after: Duration,
        reauthenticate: bool,
    },
    /// Leave the worker to the periodic cycle; try its stream again after this long.
    Poll { retry_after: Duration },
}

/// The knobs of the policy (from `sync.events.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Delays of reconnections after failures in a row (the first after a healthy stream
    /// broke is at most `reconnect.base`).
    pub reconnect: Backoff,
    /// How long a server without a stream is left to polling before its stream is tried again.
    pub no_stream_retry: Duration,
    /// Failures in a row after which the watch shows `failing`.
    pub failing_after: u32,
    /// How long a stream must stay up before it counts as healthy.
    pub healthy_after: Duration,
    /// Relists of one worker start at least this far apart.
    pub relist_every: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            reconnect: Backoff {
                base: Duration::from_secs(2),
                cap: Duration::from_secs(300),
            },
            no_stream_retry: Duration::from_secs(1800),
            failing_after: 3,
            healthy_after: Duration::from_secs(30),
            relist_every: Duration::from_secs(60),
        }
    }
}

/// One worker's watch: its state, its failures in a row and when it was last relisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    state: WatchState,
    /// Failures since the stream was last healthy.
    failures: u32,
    /// 3000s since the stream was last healthy.
    refusals: u32,
    /// When the last relist was sent.
    relisted: Option<Instant>,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            state: WatchState::Connecting,
            failures: 0,
            refusals: 0,
            relisted: None,
        }
    }
}

impl Watch {
    pub fn state(&self) -> WatchState {
        self.state
    }

    /// What to do after `what` happened at `now`; `unit` is a uniform draw in `[0, 1)` for the
    /// jitter.
    pub fn on(&mut self, what: Happened, policy: &Policy, unit: f64, now: Instant) -> Next {
        match what {
            Happened::Live => {
                if !matches!(self.state, WatchState::Failing(_)) {
                    self.state = WatchState::Live;
                }
                let after = self.relisted.map_or(Duration::ZERO, |at| {
                    (at + policy.relist_every).saturating_duration_since(now)
                });
                Next::Relist { after }
            }
            Happened::Healthy => {
                self.state = WatchState::Live;
                self.failures = 0;
                self.refusals = 0;
                Next::Read
            }
            Happened::Relisted => {
                self.relisted = Some(now);
                Next::Read
            }
            Happened::NoStream => {
                self.state = WatchState::Polling;
                self.failures = 0;
                Next::Poll {
                    retry_after: policy.no_stream_retry,
                }
            }
            Happened::OpenFailed(reason) | Happened::Ended(reason) => {
                self.failures = self.failures.saturating_add(1);
                let refused = reason == FailReason::Unauthorized;
                if refused {
                    self.refusals = self.refusals.saturating_add(1);
                }
                self.state = if self.failures >= policy.failing_after {
                    WatchState::Failing(reason)
                } else {
                    WatchState::Connecting
                };
                // The first refusal since the stream was healthy is an expired token: a new
                // one, at once.
                let after = if refused && self.refusals == 1 {
                    Duration::ZERO
                } else {
                    policy.reconnect.delay(self.failures, unit)
                };
                Next::Reconnect {
                    after,
                    reauthenticate: refused,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    const P: Policy = Policy {
        reconnect: Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        },
        no_stream_retry: Duration::from_secs(1800),
        failing_after: 3,
        healthy_after: Duration::from_secs(30),
        relist_every: Duration::from_secs(60),
    };

    fn reconnect(n: Next) -> (Duration, bool) {
        match n {
            Next::Reconnect {
                after,
                reauthenticate,
            } => (after, reauthenticate),
            other => panic!("{other:?}"),
        }
    }

    /// A watch on a clock of its own: `at(s)` is `s` seconds after the start.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }
        fn at(&self, seconds: f64) -> Instant {
            self.0 + Duration::from_secs_f64(seconds)
        }
    }

    #[test]
    fn a_healthy_stream_that_breaks_is_reopened_within_seconds_then_relisted() {
        let c = Clock::new();
        let mut w = Watch::default();
        assert_eq!(w.state(), WatchState::Connecting);
        assert_eq!(
            w.on(Happened::Live, &P, 0.5, c.at(0.0)),
            Next::Relist {
                after: Duration::ZERO
            }
        );
        assert_eq!(w.on(Happened::Relisted, &P, 0.5, c.at(0.0)), Next::Read);
        assert_eq!(w.state(), WatchState::Live);
        let mut t = 0.0;
        for reason in [FailReason::Dropped, FailReason::Silent] {
            t += 100.0;
            w.on(Happened::Healthy, &P, 0.5, c.at(t - 70.0));
            let (after, reauth) = reconnect(w.on(Happened::Ended(reason), &P, 0.999, c.at(t)));
            assert!(after <= Duration::from_secs(2) && !reauth, "{after:?}");
            assert_eq!(w.state(), WatchState::Connecting);
            assert_eq!(
                w.on(Happened::Live, &P, 0.5, c.at(t + 2.0)),
                Next::Relist {
                    after: Duration::ZERO
                },
                "relisted at once: the last relist is long past"
            );
            w.on(Happened::Relisted, &P, 0.5, c.at(t + 2.0));
        }
    }

    #[test]
    fn relists_of_a_worker_are_spaced_whatever_its_stream_does() {
        let c = Clock::new();
        let mut w = Watch::default();
        w.on(Happened::Live, &P, 0.5, c.at(0.0));
        w.on(Happened::Relisted, &P, 0.5, c.at(0.0));
        w.on(Happened::Ended(FailReason::Dropped), &P, 0.5, c.at(1.0));
        assert_eq!(
            w.on(Happened::Live, &P, 0.5, c.at(5.0)),
            Next::Relist {
                after: Duration::from_secs(55)
            }
        );
        // That stream ended before its relist was due: the next one still waits for it.
        w.on(Happened::Ended(FailReason::Dropped), &P, 0.5, c.at(6.0));
        assert_eq!(
            w.on(Happened::Live, &P, 0.5, c.at(20.0)),
            Next::Relist {
                after: Duration::from_secs(40)
            }
        );
        w.on(Happened::Relisted, &P, 0.5, c.at(60.0));
        w.on(Happened::Ended(FailReason::Dropped), &P, 0.5, c.at(61.0));
        assert_eq!(
            w.on(Happened::Live, &P, 0.5, c.at(200.0)),
            Next::Relist {
                after: Duration::ZERO
            },
            "down for longer than the spacing: relisted at once"
        );
    }

    #[test]
    fn a_stream_that_dies_young_fails_backs_off_and_shows_failing_when_it_comes_back() {
        let c = Clock::new();
        let mut w = Watch::default();
        let mut delays = Vec::new();
        for i in 0..6 {
            let t = f64::from(i) * 10.0;
            w.on(Happened::Live, &P, 0.5, c.at(t));
            delays.push(
                reconnect(w.on(Happened::Ended(FailReason::Dropped), &P, 0.0, c.at(t + 1.0))).0,
            );
        }
        assert_eq!(
            delays,
            [1, 2, 4, 8, 16, 32].map(Duration::from_secs),
            "never healthy: failures in a row"
        );
        assert_eq!(w.state(), WatchState::Failing(FailReason::Dropped));
        w.on(Happened::Live, &P, 0.5, c.at(100.0));
        assert_eq!(
            w.state(),
            WatchState::Failing(FailReason::Dropped),
            "live, not yet healthy"
        );
        w.on(Happened::Healthy, &P, 0.5, c.at(130.0));
        assert_eq!(w.state(), WatchState::Live);
        let (after, _) =
            reconnect(w.on(Happened::Ended(FailReason::Dropped), &P, 0.999, c.at(140.0)));
        assert!(after <= P.reconnect.base, "healthy again: {after:?}");
    }

    #[test]
    fn a_refused_token_is_renewed_at_once_once_per_healthy_stream() {
        let c = Clock::new();
        let mut w = Watch::default();
        w.on(Happened::Live, &P, 0.5, c.at(0.0));
        assert_eq!(
            reconnect(w.on(
                Happened::Ended(FailReason::Unauthorized),
                &P,
                0.5,
                c.at(1.0)
            )),
            (Duration::ZERO, true)
        );
        // Live for a moment, refused again: a server refusing every token is not renewed in a
        // loop.
        w.on(Happened::Live, &P, 0.5, c.at(1.1));
        let (second, reauth) = reconnect(w.on(
            Happened::Ended(FailReason::Unauthorized),
            &P,
            0.5,
            c.at(1.2),
        ));
        assert!(second > Duration::ZERO && reauth);
        w.on(
            Happened::Ended(FailReason::Unauthorized),
            &P,
            0.5,
            c.at(5.0),
        );
        assert_eq!(w.state(), WatchState::Failing(FailReason::Unauthorized));
        // Healthy again: the next refusal is an expired token again.
        w.on(Happened::Live, &P, 0.5, c.at(10.0));
        w.on(Happened::Healthy, &P, 0.5, c.at(40.0));
        assert_eq!(
            reconnect(w.on(
                Happened::Ended(FailReason::Unauthorized),
                &P,
                0.5,
                c.at(50.0)
            )),
            (Duration::ZERO, true)
        );
    }

    #[test]
    fn failures_in_a_row_back_off_to_the_cap_and_show_failing_with_their_reason() {
        let c = Clock::new();
        let mut w = Watch::default();
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays.push(
                reconnect(w.on(
                    Happened::OpenFailed(FailReason::Unreachable),
                    &P,
                    0.999,
                    c.at(0.0),
                ))
                .0,
            );
        }
        assert!(delays.windows(2).all(|d| d[0] <= d[1]), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= P.reconnect.cap));
        assert!(
            delays
                .last()
                .is_some_and(|d| *d > P.reconnect.cap.mul_f64(0.99)),
            "{delays:?}"
        );
        assert_eq!(w.state(), WatchState::Failing(FailReason::Unreachable));
        w.on(
            Happened::OpenFailed(FailReason::Redirect),
            &P,
            0.5,
            c.at(0.0),
        );
        assert_eq!(w.state(), WatchState::Failing(FailReason::Redirect));
        assert_eq!(w.state().as_str(), "failing");
    }

    #[test]
    fn a_server_without_a_stream_is_polled_and_tried_again_much_later() {
        let c = Clock::new();
        let mut w = Watch::default();
        w.on(
            Happened::OpenFailed(FailReason::Unreachable),
            &P,
            0.5,
            c.at(0.0),
        );
        assert_eq!(
            w.on(Happened::NoStream, &P, 0.5, c.at(0.0)),
            Next::Poll {
                retry_after: Duration::from_secs(1800)
            }
        );
        assert_eq!(w.state(), WatchState::Polling);
        // Upgraded meanwhile: live, and relisted.
        assert_eq!(
            w.on(Happened::Live, &P, 0.5, c.at(1800.0)),
            Next::Relist {
                after: Duration::ZERO
            }
        );
        assert_eq!(w.state(), WatchState::Live);
    }

    fn happened() -> impl Strategy<Value = Happened> {
        let reason = prop::sample::select(FailReason::ALL.to_vec());
        prop_oneof![
            Just(Happened::Live),
            Just(Happened::Healthy),
            Just(Happened::Relisted),
            Just(Happened::NoStream),
            reason.clone().prop_map(Happened::OpenFailed),
            reason.prop_map(Happened::Ended),
        ]
    }

    proptest! {
        /// Whatever happens, a watch never waits longer than the cap to reconnect, never
        /// reconnects at once twice without being healthy in between, and never relists
        /// sooner than `relist_every` after the last relist.
        #[test]
        fn reconnections_and_relists_are_bounded_and_never_spin(
            seq in prop::collection::vec((happened(), 0.0f64..1.0, 0u64..120), 1..80)
        ) {
            let c = Clock::new();
            let mut w = Watch::default();
            let mut now = c.at(0.0);
            let mut at_once_since_healthy = 0;
            let mut last_relist: Option<Instant> = None;
            for (what, unit, step) in seq {
                now += Duration::from_secs(step);
                let next = w.on(what, &P, unit, now);
                match next {
                    Next::Reconnect { after, .. } => {
                        prop_assert!(after <= P.reconnect.cap);
                        if after.is_zero() {
                            at_once_since_healthy += 1;
                            prop_assert!(at_once_since_healthy <= 1, "spinning");
                        }
                    }
                    Next::Relist { after } => {
                        prop_assert_eq!(what, Happened::Live);
                        if let Some(last) = last_relist {
                            prop_assert!(now + after >= last + P.relist_every);
                        }
                    }
                    Next::Read => prop_assert!(matches!(what, Happened::Healthy | Happened::Relisted)),
                    Next::Poll { retry_after } => prop_assert_eq!(retry_after, P.no_stream_retry),
                }
                match what {
                    Happened::Healthy => at_once_since_healthy = 0,
                    Happened::Relisted => last_relist = Some(now),
                    _ => {}
                }
            }
        }

        /// A stream that never stays up long enough to be healthy (a message, then closed, in
        /// any way) is reopened at most 8 times in 40 s, whatever the jitter draws.
        #[test]
        fn a_flapping_stream_is_reopened_a_bounded_number_of_times(
            reasons in prop::collection::vec(prop::sample::select(FailReason::ALL.to_vec()), 40),
            units in prop::collection::vec(0.0f64..1.0, 40),
        ) {
            let c = Clock::new();
            let mut w = Watch::default();
            let mut t = Duration::ZERO;
            let mut opened = 1;
            for (reason, unit) in reasons.into_iter().zip(units) {
                w.on(Happened::Live, &P, unit, c.0 + t);
                match w.on(Happened::Ended(reason), &P, unit, c.0 + t) {
                    Next::Reconnect { after, .. } => t += after,
                    other => prop_assert!(false, "{other:?}"),
                }
                if t > 40 * SECOND {
                    break;
                }
                opened += 1;
            }
            prop_assert!(opened <= 8, "{opened} opens in 40 s");
        }
    }
}
