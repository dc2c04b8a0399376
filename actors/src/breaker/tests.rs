use super::*;

fn record(state: BreakerState, by: NodeId, forced: bool) -> BreakerRecord {
    BreakerRecord {
        state,
        reason: String::new(),
        since_unix_ms: 0,
        by,
        trips: 1,
        forced,
        version: 1,
    }
}

#[test]
fn the_gate_table() {
    let grace = Duration::from_secs(10);
    let open = |until| BreakerState::Open {
        until_unix_ms: until,
    };
    // (record, me, now, expected)
    let cases: Vec<(Option<BreakerRecord>, NodeId, u64, Gate)> = vec![
        (None, 1, 0, Gate::Closed),
        (
            Some(record(BreakerState::Closed, 2, false)),
            1,
            0,
            Gate::Closed,
        ),
        (
            Some(record(BreakerState::Closed, 2, true)),
            1,
            0,
            Gate::Closed,
        ),
        // Open until 5 s: nobody routes there before.
        (Some(record(open(5_000), 1, false)), 1, 4_999, Gate::Open),
        (Some(record(open(5_000), 2, false)), 1, 4_999, Gate::Open),
        // Half-open: the node that tripped it probes; the others wait...
        (Some(record(open(5_000), 1, false)), 1, 5_000, Gate::Probe),
        (Some(record(open(5_000), 2, false)), 1, 5_000, Gate::Open),
        (Some(record(open(5_000), 2, false)), 1, 14_999, Gate::Open),
        // ...until the grace period has passed without a verdict.
        (Some(record(open(5_000), 2, false)), 1, 15_000, Gate::Probe),
        // Forced open never probes.
        (Some(record(open(5_000), 1, true)), 1, 1_000_000, Gate::Open),
    ];
    for (r, me, now, expected) in cases {
        assert_eq!(
            gate(r.as_ref(), me, now, grace),
            expected,
            "{r:?} me={me} now={now}"
        );
    }
}

#[test]
fn open_periods_double_up_to_the_cap() {
    let c = BreakerConfig {
        open_base: Duration::from_secs(5),
        open_max: Duration::from_secs(60),
        ..BreakerConfig::default()
    };
    let got: Vec<u64> = (1..=6).map(|t| c.open_for(t).as_secs()).collect();
    assert_eq!(got, [5, 10, 20, 40, 60, 60]);
    assert_eq!(c.open_for(u32::MAX), Duration::from_secs(60), "no overflow");
}

/// A window of `c`'s length holding `count` calls, one every 100 ms from 0; call `i` succeeded
/// when `ok(i)`.
fn calls(c: &BreakerConfig, count: u64, ok: impl Fn(u64) -> bool) -> Window {
    let mut w = Window::new(c.window);
    for i in 0..count {
        w.record(i * 100, ok(i));
    }
    w
}

/// Asserts that the detector trips on `w` (after `consecutive` failures in a row, at `now_ms`),
/// for a reason that says `why`.
fn assert_trips(c: &BreakerConfig, w: &Window, consecutive: u32, now_ms: u64, why: &str) {
    let reason = verdict(c, w, consecutive, now_ms).expect("the detector trips");
    assert!(reason.contains(why), "{reason:?} does not say {why:?}");
}

#[test]
fn the_detector_trips_on_consecutive_failures_error_rate_or_slow_calls() {
    let c = BreakerConfig {
        consecutive_failures: 5,
        error_rate: 0.5,
        min_calls: 20,
        window: Duration::from_secs(10),
        slow_rate: 0.5,
        ..BreakerConfig::default()
    };
    let w = Window::new(c.window);
    assert_eq!(verdict(&c, &w, 4, 0), None);
    assert_trips(&c, &w, 5, 0, "5 failures in a row");

    // Error rate: 10 failures in 19 calls is below the minimum count; the 20th call decides.
    let mut w = calls(&c, 19, |i| i % 2 == 0);
    assert_eq!(verdict(&c, &w, 1, 1_900), None, "too few calls to judge");
    w.record(1_950, false);
    assert_trips(&c, &w, 1, 1_950, "10 of 20 calls failed");
    // A healthy majority does not trip.
    let w = calls(&c, 40, |i| i % 3 != 0);
    assert_eq!(verdict(&c, &w, 0, 4_000), None);

    // Slow calls.
    let mut w = calls(&c, 20, |_| true);
    for i in 0..20 {
        w.record_latency(i * 100, i < 10);
    }
    assert_trips(&c, &w, 0, 2_000, "10 of 20 calls took over");
}

#[test]
fn the_window_forgets_what_is_older_than_its_length() {
    let mut w = Window::new(Duration::from_secs(10));
    for i in 0..10 {
        w.record(i * 1_000, false);
    }
    assert_eq!(w.totals(9_999), (10, 10, 0, 0));
    // 10.5 s: the calls of the first second have left the window.
    assert_eq!(w.totals(10_500).0, 9);
    w.record(10_500, true);
    assert_eq!(w.totals(10_500), (10, 9, 0, 0));
    // Long after, nothing is left (stale buckets are not counted even before being reused).
    assert_eq!(w.totals(100_000), (0, 0, 0, 0));
}
