//! A circuit breaker's decisions: how long it stays open, whether a request may pass, and
//! whether the calls seen over a sliding window should trip it. The actors crate holds the
//! state (per provider, replicated through Raft) and asks these.

use std::time::Duration;

use crate::route::Gate;

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// This many failures in a row trip it.
    pub consecutive_failures: u32,
    /// An error rate at or over this (0–1) over `window` trips it, once `min_calls` were made.
    pub error_rate: f64,
    pub min_calls: u32,
    pub window: Duration,
    /// A call whose first byte takes longer than this is slow; a share of slow calls at or
    /// over `slow_rate` (with `min_calls`) trips it.
    pub slow_call: Duration,
    pub slow_rate: f64,
    /// The first open period; each further consecutive trip doubles it, up to `open_max`.
    pub open_base: Duration,
    pub open_max: Duration,
    /// Requests let through while half-open; that many successes close it.
    pub probes: u32,
    /// How long a half-open breaker waits for its tripping node's probes before any node may
    /// probe (the tripping node may be gone, or see no traffic).
    pub probe_grace: Duration,
    /// One tenant's failures, while another tenant's calls succeed, trip the provider only if
    /// that tenant made at least this share (0–1) of the window's calls; 1: never.
    pub lone_tenant_share: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            error_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(10),
            slow_call: Duration::from_secs(30),
            slow_rate: 0.5,
            open_base: Duration::from_secs(5),
            open_max: Duration::from_secs(300),
            probes: 3,
            probe_grace: Duration::from_secs(10),
            lone_tenant_share: 1.0,
        }
    }
}

impl BreakerConfig {
    /// How long the `trips`-th consecutive trip keeps the breaker open.
    pub fn open_for(&self, trips: u32) -> Duration {
        crate::retry::doubling(self.open_base, trips, self.open_max)
    }
}

/// What the gate reads of a provider's replicated breaker record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// `Some(t)`: open until `t` (Unix ms); `None`: closed.
    pub open_until_ms: Option<u64>,
    /// An operator forced it (a forced-open breaker is never probed).
    pub forced: bool,
    /// The node that decided its state.
    pub by: u64,
}

/// The gate for `record` at `now_ms` on node `me`: closed, open, or half-open and probed
/// first by the node that tripped it, by any node once `grace` has passed without a verdict.
pub fn gate(record: Option<Record>, me: u64, now_ms: u64, grace: Duration) -> Gate {
    let Some(r) = record else {
        return Gate::Closed;
    };
    match r.open_until_ms {
        None => Gate::Closed,
        Some(until) => {
            if r.forced || now_ms < until {
                Gate::Open
            } else if r.by == me || now_ms >= until.saturating_add(grace.as_millis() as u64) {
                Gate::Probe
            } else {
                Gate::Open
            }
        }
    }
}

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which slice of time (since the epoch, in bucket lengths) this bucket counts.
    slot: u64,
    ok: u32,
    failed: u32,
    /// Calls whose first-byte time was measured, and of those the slow ones.
    timed: u32,
    slow: u32,
}

/// Calls over the last `window`, in ten buckets.
#[derive(Debug, Clone)]
pub struct Window {
    bucket_ms: u64,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    pub fn new(window: Duration) -> Self {
        Self {
            bucket_ms: (window.as_millis() as u64 / BUCKETS as u64).max(1),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn bucket(&mut self, now_ms: u64) -> &mut Bucket {
        let slot = now_ms / self.bucket_ms;
        let b = &mut self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        b
    }

    pub fn record(&mut self, now_ms: u64, ok: bool) {
        let b = self.bucket(now_ms);
        if ok {
            b.ok += 1;
        } else {
            b.failed += 1;
        }
    }

    pub fn record_latency(&mut self, now_ms: u64, slow: bool) {
        let b = self.bucket(now_ms);
        b.timed += 1;
        if slow {
            b.slow += 1;
        }
    }

    /// (calls, failed, timed, slow) over the window ending at `now_ms`.
    pub fn totals(&self, now_ms: u64) -> (u32, u32, u32, u32) {
        let current = now_ms / self.bucket_ms;
        self.buckets
            .iter()
            .filter(|b| b.slot + (BUCKETS as u64) > current && b.slot <= current)
            .fold((0, 0, 0, 0), |(c, f, t, s), b| {
                (c + b.ok + b.failed, f + b.failed, t + b.timed, s + b.slow)
            })
    }

    pub fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

/// Calls a breaker's window remembers by who made them, at most this many.
const CALLERS_KEPT: usize = 1_024;

/// Who the recent calls came from (each caller as a number: its tenant, hashed by the caller
/// of [`Callers::record`]; one number for callers without a tenant), so that one tenant whose
/// requests fail cannot trip a provider that serves the other tenants well.
#[derive(Debug, Clone, Default)]
pub struct Callers {
    recent: std::collections::VecDeque<(u64, u64, bool)>,
}

impl Callers {
    /// One call of `caller` at `now_ms`, `ok` or failed; calls older than `window` go.
    pub fn record(&mut self, now_ms: u64, caller: u64, ok: bool, window: Duration) {
        let since = now_ms.saturating_sub(window.as_millis() as u64);
        while self
            .recent
            .front()
            .is_some_and(|(at, ..)| *at < since || self.recent.len() >= CALLERS_KEPT)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now_ms, caller, ok));
    }

    /// Whether the failures remembered are one caller's alone while another caller's calls
    /// succeeded, and that caller made less than `share` of the calls: they then say more about
    /// that caller's requests than about the provider, and do not trip it. (When every caller
    /// fails, only one caller uses the provider, or the failing caller is at least `share` of
    /// the traffic, they do.)
    pub fn one_callers_alone(&self, share: f64) -> bool {
        let mut failing = None;
        for (_, caller, ok) in &self.recent {
            if !ok {
                match failing {
                    None => failing = Some(*caller),
                    Some(f) if f != *caller => return false,
                    Some(_) => {}
                }
            }
        }
        let Some(f) = failing else {
            return false;
        };
        if !self.recent.iter().any(|(_, c, ok)| *ok && *c != f) {
            return false;
        }
        let theirs = self.recent.iter().filter(|(_, c, _)| *c == f).count();
        share >= 1.0 || (theirs as f64) < share * self.recent.len() as f64
    }

    pub fn clear(&mut self) {
        self.recent.clear();
    }
}

/// Why the detector would trip, if it would (pure).
pub fn verdict(
    config: &BreakerConfig,
    window: &Window,
    consecutive: u32,
    now_ms: u64,
) -> Option<String> {
    if consecutive >= config.consecutive_failures {
        return Some(format!("{consecutive} failures in a row"));
    }
    let (calls, failed, timed, slow) = window.totals(now_ms);
    let min = config.min_calls.max(1);
    let secs = config.window.as_secs_f64();
    if calls >= min && f64::from(failed) >= config.error_rate * f64::from(calls) {
        return Some(format!("{failed} of {calls} calls failed in {secs:.0} s"));
    }
    if timed >= min && f64::from(slow) >= config.slow_rate * f64::from(timed) {
        return Some(format!(
            "{slow} of {timed} calls took over {:?} to the first byte in {secs:.0} s",
            config.slow_call
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_callers_failures_alone_do_not_count_against_the_provider() {
        let w = Duration::from_secs(30);
        let (hostile, other) = (7, 9);
        let mut c = Callers::default();
        c.record(1_000, other, true, w);
        for at in 2_000..2_006 {
            c.record(at, hostile, false, w);
        }
        assert!(c.one_callers_alone(1.0), "another tenant's calls succeed");
        // The other tenant's calls fail too: the provider is failing.
        c.record(2_010, other, false, w);
        assert!(!c.one_callers_alone(1.0));
        // Only one caller uses the provider: its failures count.
        let mut lone = Callers::default();
        for at in 0..5 {
            lone.record(at, hostile, false, w);
        }
        assert!(!lone.one_callers_alone(1.0));
        // The other's success left the window: one caller's failures, nobody else's calls.
        let mut old = Callers::default();
        old.record(0, other, true, w);
        old.record(40_000, hostile, false, w);
        assert!(!old.one_callers_alone(1.0));
    }

    #[test]
    fn a_lone_tenant_that_is_most_of_the_traffic_trips_at_the_configured_share() {
        let w = Duration::from_secs(30);
        let (big, small) = (7, 9);
        let mut c = Callers::default();
        c.record(0, small, true, w);
        for at in 1..10 {
            c.record(at, big, false, w);
        }
        // 9 of 10 calls are the failing tenant's.
        assert!(
            c.one_callers_alone(1.0),
            "1: never on one tenant's failures"
        );
        assert!(!c.one_callers_alone(0.9), "at the share: counts");
        assert!(c.one_callers_alone(0.95), "under the share: does not");
    }
}
