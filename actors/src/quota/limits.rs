//! The 429s that name a limit, and a limit's value in a tenant's limits.

use std::time::Duration;

pub use meridian_policy::limit::{LimitKind, whole_seconds};
use meridian_proto::cluster::Limits;
use meridian_proto::{ApiError, ErrorKind};

/// The limit `kind` of a tenant's or tier's `limits`, if set.
pub(super) fn limit_of(kind: LimitKind, limits: &Limits) -> Option<u64> {
    match kind {
        LimitKind::RequestsPerMinute => limits.requests_per_minute,
        LimitKind::TokensPerMinute => limits.tokens_per_minute,
        LimitKind::TokensPerDay => limits.tokens_per_day,
        LimitKind::TokensPerMonth => limits.tokens_per_month,
        LimitKind::CostPerDay => limits.cost_per_day_micro_usd,
    }
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
