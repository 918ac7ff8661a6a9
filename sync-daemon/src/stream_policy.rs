//! What a worker's event-stream watch does after each thing that happens to it, and the state
//! it shows: pure (the random draw is passed in).
//!
//! A stream that was live and broke is opened again within a few seconds; a token refused
//! with 3000 is fetched anew and the stream reopened at once, once; only failures in a row back
//! off, with the one jittered policy, up to a bounded interval. A server without a stream (a
//! 404: CML before 2.6) is polled, and its stream tried again only after a long interval.
//! Every (re)connection is followed by one full sync of the worker (a relist).

use std::time::Duration;

use shared::backoff::Backoff;

/// Why a watch is failing, a closed set (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// The server cannot be reached, or did not answer in time.
    Unreachable,
    /// The token or the credentials were refused.
    Unauthorized,
    /// The upgrade answered with a redirect (never followed).
    Redirect,
    /// A message past the size bound.
    TooLarge,
    /// More messages a second than allowed.
    Flooded,
    /// No message for longer than the silence allowed.
    Silent,
    /// The stream broke or was closed by the server.
    Dropped,
}

impl FailReason {
    pub const ALL: [FailReason; 7] = [
        FailReason::Unreachable,
        FailReason::Unauthorized,
        FailReason::Redirect,
        FailReason::TooLarge,
        FailReason::Flooded,
        FailReason::Silent,
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
    /// Failed this many times in a row (past [`Policy::failing_after`]).
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
    /// Sync the whole worker once now (a relist: what changed while it was not watched).
    Relist,
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
    /// Delays of reconnections after failures in a row (the first after a live stream broke
    /// is at most `reconnect.base`).
    pub reconnect: Backoff,
    /// How long a server without a stream is left to polling before its stream is tried again.
    pub no_stream_retry: Duration,
    /// Failures in a row after which the watch shows `failing`.
    pub failing_after: u32,
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
        }
    }
}

/// One worker's watch: its state and its failures in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    state: WatchState,
    /// Failures since the stream was last live.
    failures: u32,
    /// 3000s since the stream was last live.
    refusals: u32,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            state: WatchState::Connecting,
            failures: 0,
            refusals: 0,
        }
    }
}

impl Watch {
    pub fn state(&self) -> WatchState {
        self.state
    }

    /// What to do after `what`; `unit` is a uniform draw in `[0, 1)` for the jitter.
    pub fn on(&mut self, what: Happened, policy: &Policy, unit: f64) -> Next {
        match what {
            Happened::Live => {
                self.state = WatchState::Live;
                self.failures = 0;
                self.refusals = 0;
                Next::Relist
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
                // The first refusal is an expired token: a new one, at once.
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

    const P: Policy = Policy {
        reconnect: Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        },
        no_stream_retry: Duration::from_secs(1800),
        failing_after: 3,
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

    #[test]
    fn a_live_stream_that_breaks_is_reopened_within_seconds_then_relisted() {
        let mut w = Watch::default();
        assert_eq!(w.state(), WatchState::Connecting);
        assert_eq!(w.on(Happened::Live, &P, 0.5), Next::Relist);
        assert_eq!(w.state(), WatchState::Live);
        for reason in [FailReason::Dropped, FailReason::Silent] {
            let (after, reauth) = reconnect(w.on(Happened::Ended(reason), &P, 0.999));
            assert!(after <= Duration::from_secs(2) && !reauth, "{after:?}");
            assert_eq!(w.state(), WatchState::Connecting);
            assert_eq!(
                w.on(Happened::Live, &P, 0.5),
                Next::Relist,
                "relist after every reconnect"
            );
        }
    }

    #[test]
    fn a_refused_token_is_renewed_at_once_but_refusals_in_a_row_back_off() {
        let mut w = Watch::default();
        w.on(Happened::Live, &P, 0.5);
        assert_eq!(
            reconnect(w.on(Happened::Ended(FailReason::Unauthorized), &P, 0.5)),
            (Duration::ZERO, true)
        );
        let (second, reauth) = reconnect(w.on(Happened::Ended(FailReason::Unauthorized), &P, 0.5));
        assert!(second > Duration::ZERO && reauth);
        w.on(Happened::Ended(FailReason::Unauthorized), &P, 0.5);
        assert_eq!(w.state(), WatchState::Failing(FailReason::Unauthorized));
        // Live again: the next refusal is an expired token again.
        w.on(Happened::Live, &P, 0.5);
        assert_eq!(
            reconnect(w.on(Happened::Ended(FailReason::Unauthorized), &P, 0.5)),
            (Duration::ZERO, true)
        );
    }

    #[test]
    fn failures_in_a_row_back_off_to_the_cap_and_show_failing_with_their_reason() {
        let mut w = Watch::default();
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays
                .push(reconnect(w.on(Happened::OpenFailed(FailReason::Unreachable), &P, 0.999)).0);
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
        w.on(Happened::OpenFailed(FailReason::Redirect), &P, 0.5);
        assert_eq!(w.state(), WatchState::Failing(FailReason::Redirect));
        assert_eq!(w.state().as_str(), "failing");
    }

    #[test]
    fn a_server_without_a_stream_is_polled_and_tried_again_much_later() {
        let mut w = Watch::default();
        w.on(Happened::OpenFailed(FailReason::Unreachable), &P, 0.5);
        assert_eq!(
            w.on(Happened::NoStream, &P, 0.5),
            Next::Poll {
                retry_after: Duration::from_secs(1800)
            }
        );
        assert_eq!(w.state(), WatchState::Polling);
        // Upgraded meanwhile: live, and relisted.
        assert_eq!(w.on(Happened::Live, &P, 0.5), Next::Relist);
        assert_eq!(w.state(), WatchState::Live);
    }

    fn happened() -> impl Strategy<Value = Happened> {
        let reason = prop::sample::select(FailReason::ALL.to_vec());
        prop_oneof![
            Just(Happened::Live),
            Just(Happened::NoStream),
            reason.clone().prop_map(Happened::OpenFailed),
            reason.prop_map(Happened::Ended),
        ]
    }

    proptest! {
        /// Whatever happens, a watch never waits longer than the cap to reconnect, never
        /// reconnects at once twice in a row without being live in between, and relists after
        /// every time it is live.
        #[test]
        fn reconnections_are_bounded_and_never_spin(seq in prop::collection::vec((happened(), 0.0f64..1.0), 1..60)) {
            let mut w = Watch::default();
            let mut at_once_since_live = 0;
            for (what, unit) in seq {
                match w.on(what, &P, unit) {
                    Next::Reconnect { after, .. } => {
                        prop_assert!(after <= P.reconnect.cap);
                        if after.is_zero() {
                            at_once_since_live += 1;
                            prop_assert!(at_once_since_live <= 1, "spinning");
                        }
                    }
                    Next::Relist => {
                        prop_assert_eq!(what, Happened::Live);
                        at_once_since_live = 0;
                    }
                    Next::Poll { retry_after } => prop_assert_eq!(retry_after, P.no_stream_retry),
                }
            }
        }
    }
}
