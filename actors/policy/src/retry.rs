//! The node's retry budget: how many extra attempts (fallbacks) it allows, so that an outage
//! cannot multiply the load on the providers left.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The wait before the `n`-th attempt in a row (1: the first): `base`, doubled at each
/// attempt after the first, and never more than `max`. Breakers' open periods and the vLLM
/// supervisor's restart backoff grow this way.
pub fn doubling(base: Duration, n: u32, max: Duration) -> Duration {
    let doublings = n.saturating_sub(1).min(31);
    base.saturating_mul(1 << doublings).min(max)
}

/// At most a fifth of the node's requests plus ten may be retried, over a rolling ten-second
/// window. The caller says what time it is, so a test can move it.
#[derive(Debug)]
pub struct RetryBudget {
    window: Mutex<Instant>,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A budget whose first window starts at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            window: Mutex::new(now),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
        }
    }

    fn roll(&self, now: Instant) {
        let mut start = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(*start) >= Self::WINDOW {
            *start = now;
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    /// One request came in.
    pub fn count_request(&self, now: Instant) {
        self.roll(now);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one extra attempt from the budget, if any is left.
    pub fn try_retry(&self, now: Instant) -> bool {
        self.roll(now);
        let allowed = self.requests.load(Ordering::Relaxed) / 5 + 10;
        self.retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r < allowed).then_some(r + 1)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_waits_start_at_the_base_and_stop_at_the_cap() {
        let (base, max) = (Duration::from_millis(500), Duration::from_secs(5));
        for (n, want_ms) in [
            (0, 500),
            (1, 500),
            (2, 1_000),
            (4, 4_000),
            (5, 5_000),
            (u32::MAX, 5_000),
        ] {
            assert_eq!(
                doubling(base, n, max),
                Duration::from_millis(want_ms),
                "attempt {n}"
            );
        }
        // A cap beyond what 31 doublings reach: no overflow, the largest doubling.
        assert_eq!(
            doubling(Duration::from_secs(1), 40, Duration::MAX),
            Duration::from_secs(1 << 31)
        );
    }

    #[test]
    fn a_fifth_of_the_requests_plus_ten_may_be_retried_per_window() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(t0);
        for _ in 0..50 {
            budget.count_request(t0);
        }
        let granted = (0..100).filter(|_| budget.try_retry(t0)).count();
        assert_eq!(granted, 50 / 5 + 10);
        // Still inside the window: nothing more.
        assert!(!budget.try_retry(t0 + Duration::from_secs(9)));
        // A new window starts empty: ten retries with no request counted yet.
        let t1 = t0 + RetryBudget::WINDOW;
        let granted = (0..100).filter(|_| budget.try_retry(t1)).count();
        assert_eq!(granted, 10);
    }
}
