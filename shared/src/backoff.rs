//! The one retry policy of the project: jittered exponential backoff, capped — a failing
//! worker's retries (capped at the sync interval), MongoDB not ready at start, a change stream
//! that failed.
//!
//! Pure: the random draw is passed in, so schedules are testable without a clock or an RNG.

use std::time::Duration;

/// Delays that double after each failure in a row, from `base` up to `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Never wait longer than this (for a worker: the next regular cycle covers it anyway).
    pub cap: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first), with "equal jitter":
    /// half the exponential step is fixed, the other half scaled by `unit` in `[0, 1)`. Retries
    /// of many clients that failed together (a network blip) spread out instead of stampeding.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let step = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let half = step / 2;
        let jitter = half.mul_f64(unit.clamp(0.0, 1.0));
        (half + jitter).min(self.cap)
    }
}

/// A uniform draw in `[0, 1)` from the thread-local generator, seeded from the clock.
pub fn random_unit() -> f64 {
    use std::{
        cell::Cell,
        time::{SystemTime, UNIX_EPOCH},
    };
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0x9E37_79B9, |d| d.as_nanos() as u64) | 1,
        );
    }
    STATE.with(|s| {
        // xorshift64*: plenty for spreading retries.
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const B: Backoff = Backoff {
        base: Duration::from_secs(60),
        cap: Duration::from_secs(1800),
    };

    #[test]
    fn grows_exponentially_until_the_cap() {
        let top = |n| B.delay(n, 0.999_999).as_secs();
        assert_eq!(B.delay(1, 0.0), Duration::from_secs(30));
        assert_eq!(top(1), 59);
        assert_eq!(top(2), 119);
        assert_eq!(top(3), 239);
        assert_eq!(top(6), 1799);
        assert_eq!(top(20), 1799);
        assert_eq!(top(u32::MAX), 1799);
    }

    proptest! {
        #[test]
        fn stays_within_half_a_step_and_the_cap(failures in 1u32..64, unit in 0.0f64..1.0) {
            let d = B.delay(failures, unit);
            prop_assert!(d <= B.cap);
            let step = B.base.saturating_mul(1u32 << (failures - 1).min(30)).min(B.cap);
            prop_assert!(d >= step / 2);
            prop_assert!(d <= step);
        }

        #[test]
        fn never_shrinks_as_failures_grow(failures in 1u32..40) {
            prop_assert!(B.delay(failures + 1, 0.0) >= B.delay(failures, 0.0));
        }

        #[test]
        fn random_units_are_in_range(_n in 0..100u8) {
            let u = random_unit();
            prop_assert!((0.0..1.0).contains(&u));
        }
    }
}
