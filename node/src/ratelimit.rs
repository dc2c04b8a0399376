//! The `x-ratelimit-*` headers of an admitted request, rendered from the states admission
//! left (OpenAI's names for the per-minute limits; `-day`, `-month` and `cost-day` for ours).

use http::{HeaderMap, HeaderName, HeaderValue};
use meridian_actors::quota::{LimitKind, RateLimitState, whole_seconds};

/// `x-ratelimit-limit-*`, `x-ratelimit-remaining-*`, `x-ratelimit-reset-*` of `kind` (built at
/// compile time, in a static: naming them costs nothing per response).
fn names(kind: LimitKind) -> &'static [HeaderName; 3] {
    const fn names(
        limit: &'static str,
        remaining: &'static str,
        reset: &'static str,
    ) -> [HeaderName; 3] {
        [
            HeaderName::from_static(limit),
            HeaderName::from_static(remaining),
            HeaderName::from_static(reset),
        ]
    }
    static NAMES: [[HeaderName; 3]; 5] = [
        names(
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        names(
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
        names(
            "x-ratelimit-limit-tokens-day",
            "x-ratelimit-remaining-tokens-day",
            "x-ratelimit-reset-tokens-day",
        ),
        names(
            "x-ratelimit-limit-tokens-month",
            "x-ratelimit-remaining-tokens-month",
            "x-ratelimit-reset-tokens-month",
        ),
        names(
            "x-ratelimit-limit-cost-day",
            "x-ratelimit-remaining-cost-day",
            "x-ratelimit-reset-cost-day",
        ),
    ];
    &NAMES[kind as usize]
}

/// Room in a header map for the `x-ratelimit-*` headers of `limits` limits and the few others
/// every answer gets (a map grows before it is full, so reserving only the three per limit
/// still left it to grow once).
pub fn header_room(limits: usize) -> usize {
    3 * limits + 4
}

/// `n` as a header value: one allocation of its exact size (http's `From<u64>` makes two).
fn count(n: u64) -> HeaderValue {
    HeaderValue::from_str(itoa::Buffer::new().format(n)).unwrap_or_else(|_| HeaderValue::from(n))
}

/// A reset as its header says it: whole seconds, rounded up, then `s` (`12s`).
fn reset(secs: u64) -> HeaderValue {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(secs).as_bytes();
    let mut text = [0u8; 21]; // u64::MAX has 20 digits
    text[..digits.len()].copy_from_slice(digits);
    text[digits.len()] = b's';
    HeaderValue::from_bytes(&text[..=digits.len()])
        .unwrap_or_else(|_| HeaderValue::from_static("0s"))
}

/// Adds the `x-ratelimit-limit-*`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` headers
/// of each limit to `headers`. This runs for every admitted response: the names are static and
/// each value is one allocation.
pub fn write_headers(states: Vec<RateLimitState>, headers: &mut HeaderMap) {
    if states.is_empty() {
        return;
    }
    headers.reserve(header_room(states.len()));
    for state in states {
        let [limit, remaining, reset_name] = names(state.kind);
        headers.insert(limit.clone(), count(state.limit));
        headers.insert(remaining.clone(), count(state.remaining));
        headers.insert(reset_name.clone(), reset(whole_seconds(state.reset)));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rate_limit_headers_are_named_and_written_exactly() {
        let state = |kind, limit, remaining, reset| RateLimitState {
            kind,
            limit,
            remaining,
            reset,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("r1"));
        write_headers(
            vec![
                state(
                    LimitKind::TokensPerDay,
                    10_000,
                    0,
                    Duration::from_millis(1_200),
                ),
                state(LimitKind::RequestsPerMinute, u64::MAX, 7, Duration::ZERO),
                state(LimitKind::CostPerDay, 5, 5, Duration::MAX),
            ],
            &mut headers,
        );
        let as_pairs: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            as_pairs,
            [
                ("x-request-id".into(), "r1".into()),
                ("x-ratelimit-limit-tokens-day".into(), "10000".into()),
                ("x-ratelimit-remaining-tokens-day".into(), "0".into()),
                ("x-ratelimit-reset-tokens-day".into(), "2s".into()),
                (
                    "x-ratelimit-limit-requests".into(),
                    "18446744073709551615".into()
                ),
                ("x-ratelimit-remaining-requests".into(), "7".into()),
                ("x-ratelimit-reset-requests".into(), "0s".into()),
                ("x-ratelimit-limit-cost-day".into(), "5".into()),
                ("x-ratelimit-remaining-cost-day".into(), "5".into()),
                (
                    "x-ratelimit-reset-cost-day".into(),
                    "18446744073709551615s".into()
                ),
            ]
        );
        for kind in LimitKind::ALL {
            let [limit, remaining, reset] = names(kind);
            let suffix = kind.header_suffix();
            assert_eq!(limit.as_str(), format!("x-ratelimit-limit-{suffix}"));
            assert_eq!(
                remaining.as_str(),
                format!("x-ratelimit-remaining-{suffix}")
            );
            assert_eq!(reset.as_str(), format!("x-ratelimit-reset-{suffix}"));
        }
    }
}
