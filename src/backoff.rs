//! Capped exponential backoff with full jitter.
//!
//! The n-th delay (counting from 0 after [`Backoff::reset`]) is drawn uniformly from
//! `[initial, min(max, initial * 2^n)]` — "full jitter" with a floor of `initial`, so a fleet of
//! devices that lost the same broker at the same moment spreads its reconnects out, and a delay
//! is never zero (a zero delay would turn a refused connection into a tight loop).
//!
//! The random input is a parameter of [`Backoff::next`], which keeps the type pure and testable;
//! [`Backoff::next_jittered`] draws it from `fastrand`.

use std::time::Duration;

/// The smallest delay ever returned, whatever `initial` was given.
const MIN_DELAY: Duration = Duration::from_millis(1);

/// Capped exponential backoff with full jitter.
///
/// The n-th delay after [`Backoff::reset`] is uniform in `[initial, min(max, initial * 2^n)]`:
/// never zero, never above `max`. [`Backoff::next`] takes the random input as a parameter;
/// [`Backoff::next_jittered`] draws it from `fastrand`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Number of delays handed out since the last reset, saturating once the cap is reached.
    attempt: u32,
}

impl Backoff {
    /// `initial` is raised to 1 ms if smaller; `max` is raised to `initial` if smaller.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(MIN_DELAY);
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay: `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        1u32.checked_shl(self.attempt)
            .and_then(|factor| self.initial.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The next delay, for a uniform random `rand01` in `[0, 1]` (values outside are clamped;
    /// NaN counts as 1). Result is in `[initial, ceiling()]`; the ceiling then doubles, up to `max`.
    pub fn next(&mut self, rand01: f64) -> Duration {
        let r = if rand01.is_nan() {
            1.0
        } else {
            rand01.clamp(0.0, 1.0)
        };
        let ceiling = self.ceiling();
        if ceiling < self.max {
            self.attempt += 1;
        }
        let span = ceiling - self.initial;
        // f64 -> integer casts saturate; spans below 2^53 ns (104 days) are exact at r = 1.
        let jitter_ns = (span.as_nanos() as f64 * r) as u128;
        let jitter = Duration::from_nanos(u64::try_from(jitter_ns).unwrap_or(u64::MAX));
        self.initial.saturating_add(jitter).min(ceiling)
    }

    /// [`Backoff::next`] with a random input from `fastrand`.
    pub fn next_jittered(&mut self) -> Duration {
        self.next(fastrand::f64())
    }

    /// Start over from `initial` (call after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn initial(&self) -> Duration {
        self.initial
    }

    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_until_cap_with_full_jitter_input() {
        let mut b = Backoff::new(ms(500), Duration::from_secs(5));
        let seq: Vec<_> = (0..7).map(|_| b.next(1.0)).collect();
        assert_eq!(
            seq,
            [
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(5000),
                ms(5000),
                ms(5000)
            ]
        );
    }

    #[test]
    fn jitter_spreads_between_initial_and_ceiling() {
        let mut b = Backoff::new(ms(100), Duration::from_secs(10));
        for _ in 0..4 {
            b.next(1.0);
        }
        // ceiling is now 1600 ms
        assert_eq!(b.ceiling(), ms(1600));
        assert_eq!(b.clone().next(0.5), ms(850));
        assert_eq!(
            b.clone().next(0.0),
            ms(100),
            "floor is `initial`, never zero"
        );
        assert_eq!(b.clone().next(f64::NAN), ms(1600));
        assert_eq!(b.clone().next(7.0), ms(1600));
        assert_eq!(b.clone().next(-1.0), ms(100));
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(ms(500), Duration::from_secs(300));
        for _ in 0..20 {
            b.next(1.0);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(300));
        b.reset();
        assert_eq!(b.next(1.0), ms(500));
        assert_eq!(b.next(1.0), ms(1000));
    }

    #[test]
    fn degenerate_inputs() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.next(0.0), MIN_DELAY);
        assert_eq!(b.next(1.0), MIN_DELAY);
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(b.max(), Duration::from_secs(10));
        assert_eq!(b.next(1.0), Duration::from_secs(10));
        // huge max: the shift and the multiplication saturate instead of overflowing
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..100 {
            assert!(b.next(1.0) >= Duration::from_secs(1));
        }
        assert_eq!(b.ceiling(), Duration::MAX);
    }

    #[test]
    fn next_jittered_stays_in_bounds() {
        let mut b = Backoff::new(ms(10), ms(100));
        for _ in 0..1000 {
            let d = b.next_jittered();
            assert!((ms(10)..=ms(100)).contains(&d), "{d:?}");
        }
    }

    proptest! {
        #[test]
        fn never_above_max_never_below_initial(
            initial_ms in 0u64..10_000,
            max_ms in 0u64..1_000_000,
            rands in proptest::collection::vec(proptest::num::f64::ANY, 1..80),
        ) {
            let mut b = Backoff::new(ms(initial_ms), ms(max_ms));
            for r in rands {
                let d = b.next(r);
                prop_assert!(d <= b.max());
                prop_assert!(d >= b.initial());
                prop_assert!(!d.is_zero());
            }
        }

        #[test]
        fn grows_until_cap(initial_ms in 1u64..5_000, max_ms in 1u64..600_000) {
            let mut b = Backoff::new(ms(initial_ms), ms(max_ms));
            let mut prev = b.next(1.0);
            prop_assert_eq!(prev, ms(initial_ms).min(b.max()));
            // reaching the cap takes at most log2(max / initial) + 1 steps
            for _ in 0..40 {
                let d = b.next(1.0);
                prop_assert!(d >= prev);
                prop_assert!(d == b.max() || d == prev * 2, "{:?} after {:?}", d, prev);
                prev = d;
            }
            prop_assert_eq!(prev, b.max());
        }

        #[test]
        fn reset_works(initial_ms in 1u64..5_000, max_ms in 1u64..600_000, n in 0usize..64, r in 0.0f64..=1.0) {
            let mut b = Backoff::new(ms(initial_ms), ms(max_ms));
            for _ in 0..n {
                b.next(r);
            }
            b.reset();
            prop_assert_eq!(b.ceiling(), b.initial());
            prop_assert_eq!(b.next(r), b.initial());
        }
    }
}
