//! The kinds of limit, their windows, and the 429s that name them.

use std::time::Duration;

use meridian_proto::cluster::Limits;
use meridian_proto::{ApiError, ErrorKind};

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
pub(super) enum Unit {
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

    pub(super) fn of(self, limits: &Limits) -> Option<u64> {
        match self {
            Self::RequestsPerMinute => limits.requests_per_minute,
            Self::TokensPerMinute => limits.tokens_per_minute,
            Self::TokensPerDay => limits.tokens_per_day,
            Self::TokensPerMonth => limits.tokens_per_month,
            Self::CostPerDay => limits.cost_per_day_micro_usd,
        }
    }

    pub(super) fn unit(self) -> Unit {
        match self {
            Self::RequestsPerMinute => Unit::Requests,
            Self::CostPerDay => Unit::MicroUsd,
            _ => Unit::Tokens,
        }
    }

    pub(super) fn counts_tokens(self) -> bool {
        self.unit() == Unit::Tokens
    }
}

/// The calendar month (UTC) that holds `unix_ms`: its first midnight and its length, in ms.
pub(super) fn calendar_month(unix_ms: u64) -> (u64, u64) {
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

pub(super) fn window_reset(window_start: u64, window_ms: u64, now: u64) -> Duration {
    Duration::from_millis((window_start + window_ms).saturating_sub(now))
}

pub(super) fn limited(kind: LimitKind, limit: u64, left: u64, retry: Duration) -> ApiError {
    let suffix = kind.header_suffix();
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "rate limit reached: {} is {limit}; retry after {} s",
            kind.code(),
            whole_seconds(retry)
        ),
    )
    .with_code(kind.code())
    .with_retry_after(retry.max(Duration::from_secs(1)))
    .with_header(format!("x-ratelimit-limit-{suffix}"), limit.to_string())
    .with_header(format!("x-ratelimit-remaining-{suffix}"), left.to_string())
    .with_header(
        format!("x-ratelimit-reset-{suffix}"),
        format!("{}s", whole_seconds(retry)),
    )
}

/// A single request larger than the whole limit can never be admitted.
pub(super) fn too_big(kind: LimitKind, limit: u64, cost: u64) -> ApiError {
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "this request needs {cost} against {} = {limit}, more than the limit allows in any window; lower max_tokens or the prompt",
            kind.code()
        ),
    )
    .with_code(kind.code())
    .with_param("max_tokens")
    .no_retry()
}

/// One limit's state as an admission left it: what the edge renders as its `x-ratelimit-*`
/// headers (or whatever its protocol says instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitState {
    pub kind: LimitKind,
    pub limit: u64,
    /// What the cluster may still admit in this window, as far as this node knows.
    pub remaining: u64,
    /// Until the window ends.
    pub reset: Duration,
}

/// `d` in whole seconds, rounded up.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}
