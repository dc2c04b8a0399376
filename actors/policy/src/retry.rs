//! The node's retry budget: how many extra attempts (fallbacks) it allows, so that an outage
//! cannot multiply the load on the providers left.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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
