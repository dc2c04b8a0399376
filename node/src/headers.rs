//! The request headers both inference edges read, parsed in one place: HTTP headers and gRPC
//! metadata carry the same names (`authorization`, `x-api-key`, `x-request-id`,
//! `x-meridian-*`), so each edge hands over its headers and gets the pipeline's parts back.

use std::time::Duration;

pub use meridian_actors::pipeline::Edge;
use meridian_actors::pipeline::TraceHeaders;
use meridian_actors::{CallOptions, Credentials};
use meridian_policy::route::Complexity;
use meridian_proto::{ApiError, RequestId};
use tokio::time::Instant;

/// The headers (or metadata) the pipeline reads, as a request carried them (the first of each).
#[derive(Default)]
struct Read<'a> {
    request_id: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
    api_key: Option<&'a [u8]>,
    deadline_ms: Option<&'a [u8]>,
    complexity: Option<&'a [u8]>,
    feature: Option<&'a [u8]>,
    cache: Option<&'a [u8]>,
    cost: Option<&'a [u8]>,
    traceparent: Option<&'a [u8]>,
    tracestate: Option<&'a [u8]>,
    grpc_timeout: Option<&'a [u8]>,
}

impl<'a> Read<'a> {
    /// One pass over `headers` (lower-case names, as HTTP/2, gRPC and `http`'s `HeaderMap` keep
    /// them): cheaper than a lookup per name, each of which hashes and checks the name again.
    fn from(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut read = Read::default();
        for (name, value) in headers {
            let slot = match name {
                "x-request-id" => &mut read.request_id,
                "authorization" => &mut read.authorization,
                "x-api-key" => &mut read.api_key,
                "x-meridian-deadline-ms" => &mut read.deadline_ms,
                "x-meridian-complexity" => &mut read.complexity,
                "x-meridian-feature" => &mut read.feature,
                "x-meridian-cache" => &mut read.cache,
                "x-meridian-cost" => &mut read.cost,
                "traceparent" => &mut read.traceparent,
                "tracestate" => &mut read.tracestate,
                "grpc-timeout" => &mut read.grpc_timeout,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        read
    }
}

/// The request id, the credentials and the checked options of a request with these headers
/// (or gRPC metadata).
pub fn call_parts<'a>(
    edge: Edge,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> (
    RequestId,
    Credentials<'a>,
    Result<CallOptions, ApiError>,
    TraceHeaders<'a>,
) {
    let read = Read::from(headers);
    // UTF-8 is all the key check needs (it says what is wrong with anything else), and checks
    // faster than a visible-ASCII test.
    let text = |v: Option<&'a [u8]>| v.and_then(|v| std::str::from_utf8(v).ok());
    let request_id = RequestId::from_client(text(read.request_id));
    let credentials = Credentials {
        authorization: text(read.authorization),
        api_key: text(read.api_key),
    };
    let options = (|| {
        let mut deadline = deadline_of(read.deadline_ms)?;
        let grpc = read.grpc_timeout.filter(|_| edge == Edge::Grpc);
        if let Some(t) = grpc_timeout(grpc)? {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        Ok(CallOptions {
            deadline,
            complexity: complexity_of(read.complexity)?,
            feature: feature_of(read.feature)?.map(str::to_owned),
            cache: on_off("X-Meridian-Cache", read.cache)?,
            cost: on_off("X-Meridian-Cost", read.cost)?,
        })
    })();
    let trace = TraceHeaders {
        traceparent: text(read.traceparent),
        tracestate: text(read.tracestate),
    };
    (request_id, credentials, options, trace)
}

/// Millionths of a dollar as the `x-meridian-cost-usd` header (and gRPC metadata) says it:
/// dollars with six decimals.
pub fn usd(micro: u64) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// Sets the feature a gRPC message names (its `feature` field, which wins over the metadata),
/// checked like the header.
pub fn with_feature(
    options: Result<CallOptions, ApiError>,
    feature: Option<String>,
) -> Result<CallOptions, ApiError> {
    let mut options = options?;
    if let Some(f) = feature {
        if meridian_proto::convert::invalid_name(&f).is_some() {
            return Err(ApiError::invalid(
                "feature",
                "feature must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
            ));
        }
        options.feature = Some(f);
    }
    Ok(options)
}

/// The feature a request is for (`X-Meridian-Feature`), checked: 1 to 64 of `A-Z a-z 0-9 _ . -`.
fn feature_of(value: Option<&[u8]>) -> Result<Option<&str>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    match std::str::from_utf8(v) {
        Ok(name) if meridian_proto::convert::invalid_name(name).is_none() => Ok(Some(name)),
        _ => Err(ApiError::invalid(
            "X-Meridian-Feature",
            "X-Meridian-Feature must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
        )),
    }
}

/// A switch header: `on` or `off` (any case); absent is off.
fn on_off(name: &str, value: Option<&[u8]>) -> Result<bool, ApiError> {
    match value.map(<[u8]>::trim_ascii) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case(b"on") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case(b"off") => Ok(false),
        Some(_) => Err(ApiError::invalid(name, format!("{name} must be on or off"))),
    }
}

/// `X-Meridian-Complexity` (`trivial`, `moderate` or `hard`), for a virtual model like `auto`.
fn complexity_of(value: Option<&[u8]>) -> Result<Option<Complexity>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    std::str::from_utf8(v)
        .ok()
        .and_then(Complexity::parse)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                "X-Meridian-Complexity",
                "X-Meridian-Complexity must be trivial, moderate or hard",
            )
        })
}

/// The client's deadline from `X-Meridian-Deadline-Ms` (milliseconds from now).
fn deadline_of(value: Option<&[u8]>) -> Result<Option<Instant>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    let ms = std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match ms {
        Some(ms) if (1..=86_400_000).contains(&ms) => {
            Ok(Some(Instant::now() + Duration::from_millis(ms)))
        }
        _ => Err(ApiError::invalid(
            "X-Meridian-Deadline-Ms",
            "X-Meridian-Deadline-Ms must be a whole number of milliseconds between 1 and 86400000",
        )),
    }
}

/// The deadline a gRPC client set with `grpc-timeout` (e.g. `250m`: 250 ms; units H M S m u n).
fn grpc_timeout(value: Option<&[u8]>) -> Result<Option<Instant>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    let v = String::from_utf8_lossy(v);
    let bad = || {
        ApiError::invalid(
            "grpc-timeout",
            format!(
                "grpc-timeout {v:?} is not a number of 1 to 8 digits followed by H, M, S, m, u or n"
            ),
        )
    };
    if v.len() < 2 || v.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(Some(Instant::now() + d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&'static str, &'static str)]) -> Result<CallOptions, ApiError> {
        call_parts(Edge::Http, headers.iter().map(|(n, v)| (*n, v.as_bytes()))).2
    }

    #[test]
    fn every_bad_option_names_its_header() {
        for (name, value) in [
            ("x-meridian-deadline-ms", "0"),
            ("x-meridian-deadline-ms", "soon"),
            ("x-meridian-complexity", "extreme"),
            ("x-meridian-feature", "has space"),
            ("x-meridian-cache", "forever"),
            ("x-meridian-cost", "yes"),
        ] {
            let e = parts(&[(name, value)]).unwrap_err();
            assert!(
                e.param.as_deref().unwrap().eq_ignore_ascii_case(name),
                "{name}: {e:?}"
            );
        }
        for bad in ["", "5", "123456789S", "10x", "-1S"] {
            let e = grpc_timeout(Some(bad.as_bytes())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("grpc-timeout"), "{bad:?}");
        }
    }

    #[test]
    fn good_options_are_read() {
        let o = parts(&[
            ("x-meridian-deadline-ms", " 1500 "),
            ("x-meridian-complexity", "hard"),
            ("x-meridian-feature", "search.v2"),
            ("x-meridian-cache", "ON"),
        ])
        .unwrap();
        let left = o.deadline.unwrap() - Instant::now();
        assert!(left <= Duration::from_millis(1500) && left > Duration::from_millis(1000));
        assert_eq!(o.complexity, Some(Complexity::Hard));
        assert_eq!(o.feature.as_deref(), Some("search.v2"));
        assert!(o.cache);
        assert!(!parts(&[("x-meridian-cache", "off")]).unwrap().cache);
        let left = grpc_timeout(Some(b"250m")).unwrap().unwrap() - Instant::now();
        assert!(left <= Duration::from_millis(250) && left > Duration::from_millis(100));
        // Both deadlines on gRPC: the earlier holds; `grpc-timeout` means nothing over HTTP.
        let both = [
            ("x-meridian-deadline-ms", &b"60000"[..]),
            ("grpc-timeout", &b"2S"[..]),
        ];
        let grpc = call_parts(Edge::Grpc, both).2.unwrap().deadline.unwrap();
        assert!(grpc - Instant::now() <= Duration::from_secs(2));
        let http = call_parts(Edge::Http, both).2.unwrap().deadline.unwrap();
        assert!(http - Instant::now() > Duration::from_secs(50));
        // The first of a repeated header counts, as a lookup by name would give it.
        let (id, ..) = call_parts(
            Edge::Http,
            [("x-request-id", &b"a1"[..]), ("x-request-id", b"b2")],
        );
        assert_eq!(id.as_str(), "a1");
    }

    #[test]
    fn costs_are_dollars_with_six_decimals() {
        assert_eq!(usd(0), "0.000000");
        assert_eq!(usd(42), "0.000042");
        assert_eq!(usd(1_234_567), "1.234567");
    }
}
