//! The kinds of limit, their windows, and the arithmetic of sharing a limit among nodes.

use std::time::Duration;

/// A limit a tenant can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    TokensPerMonth,
    /// Millionths of a US dollar per day, from the model's price.
    CostPerDay,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Requests,
    Tokens,
    MicroUsd,
}

impl LimitKind {
    pub const ALL: [LimitKind; 5] = [
        Self::RequestsPerMinute,
        Self::TokensPerMinute,
        Self::TokensPerDay,
        Self::TokensPerMonth,
        Self::CostPerDay,
    ];

    /// The name in configs, ledger keys and 429 error codes.
    pub fn code(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::TokensPerDay => "tokens_per_day",
            Self::TokensPerMonth => "tokens_per_month",
            Self::CostPerDay => "cost_per_day",
        }
    }

    /// The suffix of its `x-ratelimit-*` headers (OpenAI's names for the per-minute ones):
    /// `x-ratelimit-limit-<suffix>`, `-remaining-<suffix>`, `-reset-<suffix>`.
    pub fn header_suffix(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests",
            Self::TokensPerMinute => "tokens",
            Self::TokensPerDay => "tokens-day",
            Self::TokensPerMonth => "tokens-month",
            Self::CostPerDay => "cost-day",
        }
    }

    /// The window that holds `unix_ms`: its start and its length, both in ms. Minutes and days
    /// are aligned multiples of their length since the Unix epoch; months are calendar months
    /// in UTC (28 to 31 days).
    pub fn window(self, unix_ms: u64) -> (u64, u64) {
        let fixed = |len: u64| (unix_ms - unix_ms % len, len);
        match self {
            Self::RequestsPerMinute | Self::TokensPerMinute => fixed(60_000),
            Self::TokensPerDay | Self::CostPerDay => fixed(86_400_000),
            Self::TokensPerMonth => calendar_month(unix_ms),
        }
    }

    /// The length of the window that begins at `start` (ms).
    pub fn window_len(self, start: u64) -> u64 {
        self.window(start).1
    }

    /// What it counts.
    pub fn unit(self) -> Unit {
        match self {
            Self::RequestsPerMinute => Unit::Requests,
            Self::CostPerDay => Unit::MicroUsd,
            _ => Unit::Tokens,
        }
    }

    /// Whether it counts tokens (and so is settled by the tokens a call used).
    pub fn counts_tokens(self) -> bool {
        self.unit() == Unit::Tokens
    }
}

/// The calendar month (UTC) that holds `unix_ms`: its first midnight and its length, in ms.
pub fn calendar_month(unix_ms: u64) -> (u64, u64) {
    use time::{Date, Month, OffsetDateTime};
    let at = i64::try_from(unix_ms / 1000)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let first = |year: i32, month: Month| {
        Date::from_calendar_date(year, month, 1).map_or(0, |d| {
            d.midnight().assume_utc().unix_timestamp().max(0) as u64 * 1000
        })
    };
    let (year, month) = (at.year(), at.month());
    let start = first(year, month);
    let next = match month {
        Month::December => first(year + 1, Month::January),
        m => first(year, m.next()),
    };
    (start, next.saturating_sub(start))
}

/// How long until the window that began at `window_start` (`window_ms` long) ends.
pub fn window_reset(window_start: u64, window_ms: u64, now: u64) -> Duration {
    Duration::from_millis((window_start + window_ms).saturating_sub(now))
}

/// `d` in whole seconds, rounded up.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// A node's static share of `limit` (what it may admit alone, before any slice): `fraction` of
/// the limit split evenly over `nodes` (at least one), rounded down.
pub fn static_share(limit: u64, fraction: f64, nodes: u64) -> u64 {
    (limit as f64 * fraction / nodes.max(1) as f64).floor() as u64
}

/// How much of a limit to ask the ledger for in one slice: enough for `horizon` at the recent
/// demand rate (`demand` over `elapsed`), at least a tenth of the cap and what the waiting
/// request needs (`need`), at most `max_fraction` of the limit (and never over the limit).
pub fn slice_size(
    limit: u64,
    max_fraction: f64,
    demand: u64,
    elapsed: Duration,
    horizon: Duration,
    need: u64,
) -> u64 {
    let rate = demand as f64 / elapsed.as_secs_f64().max(0.05);
    let cap = ((limit as f64 * max_fraction).ceil() as u64).max(1);
    let want = (rate * horizon.as_secs_f64()).ceil() as u64;
    want.clamp((cap / 10).max(1), cap).max(need).min(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_follows_demand_between_a_tenth_of_the_cap_and_the_cap() {
        let s = Duration::from_secs;
        // 5 % of 1,000,000 is the cap; a tenth of it the floor.
        assert_eq!(slice_size(1_000_000, 0.05, 0, s(1), s(2), 0), 5_000);
        assert_eq!(slice_size(1_000_000, 0.05, 10_000, s(1), s(2), 0), 20_000);
        assert_eq!(
            slice_size(1_000_000, 0.05, 1_000_000, s(1), s(2), 0),
            50_000
        );
        // What the waiting request needs, even past the cap; never past the limit.
        assert_eq!(slice_size(1_000_000, 0.05, 0, s(1), s(2), 70_000), 70_000);
        assert_eq!(slice_size(100, 0.05, 0, s(1), s(2), 500), 100);
        // A tiny limit still gets a slice of one.
        assert_eq!(slice_size(3, 0.05, 0, s(1), s(2), 0), 1);
    }

    #[test]
    fn static_shares_split_evenly_and_round_down() {
        assert_eq!(static_share(1_000, 0.5, 3), 166);
        assert_eq!(static_share(1_000, 0.5, 0), 500, "no members counts as one");
        assert_eq!(static_share(1, 1.0, 2), 0);
    }
}
