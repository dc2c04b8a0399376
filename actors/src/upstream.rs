//! Calling LLM providers. The only place in Meridian that makes outbound HTTP calls to them.
//!
//! An [`Upstream`] answers a [`ChatRequest`] either whole ([`Completion`]) or as a stream of
//! [`Chunk`]s. Chunks keep the upstream's JSON bytes as they came (parsed only as far as
//! metering and error detection need), so the relay forwards them without re-serialising.

pub mod anthropic;
pub mod api;
pub mod demo;
pub mod http1;
pub mod openai;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use meridian_proto::cluster::ProviderKind;
use meridian_proto::openai::{ChatRequest, UpstreamErrorInfo, Usage};
use meridian_proto::{ApiError, ErrorKind};

pub use api::{ApiAdapter, Dialect};
pub use demo::DemoModel;

/// Why an upstream's client cannot be built from its address (or its key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("{url:?} is not a URL: {reason}")]
    NotAUrl { url: String, reason: String },
    #[error("{url:?} has no host")]
    NoHost { url: String },
    #[error("{url:?}: unsupported scheme {scheme:?} (http or https)")]
    Scheme { url: String, scheme: Option<String> },
    #[error("{host:?} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("the API key contains characters not allowed in a header")]
    KeyNotAHeader,
}

impl EndpointError {
    /// `url` as a URI, or why it is not one.
    pub(crate) fn parse(url: &str) -> Result<http::Uri, EndpointError> {
        url.parse()
            .map_err(|e: http::uri::InvalidUri| EndpointError::NotAUrl {
                url: url.into(),
                reason: e.to_string(),
            })
    }
}

/// Time limits on one upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// From sending the request to the response headers and, when streaming, the first event.
    pub first_byte: Duration,
    /// Longest silence between two stream events.
    pub idle: Duration,
    /// The whole call.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            total: Duration::from_secs(600),
        }
    }
}

/// A whole (non-streaming) answer: the upstream's `chat.completion` body as received.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Bytes,
    pub usage: Option<Usage>,
}

/// One streamed `chat.completion.chunk`, as a single-line JSON object.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub json: Bytes,
    pub usage: Option<Usage>,
    /// The final usage-only chunk (`choices: []`), which the client gets only if it asked.
    pub usage_only: bool,
    /// It carries generated output (text, reasoning, a tool call): what a stream cut short is
    /// charged for, counted a token each. The chunk that opens a stream with the role, and the
    /// one with the finish reason, do not.
    pub generated: bool,
}

/// The chunks of a stream; it ends after the upstream's `[DONE]`, or with one `Err`.
pub type ChunkStream = BoxStream<'static, Result<Chunk, UpstreamError>>;

/// Which phase of a call ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    FirstByte,
    Idle,
    Total,
}

/// Why an upstream call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("the upstream timed out ({0:?})")]
    Timeout(Phase),
    #[error("the upstream answered {status}: {}", .info.message)]
    Status {
        status: u16,
        info: UpstreamErrorInfo,
        retry_after: Option<Duration>,
    },
    #[error("the upstream reported an error mid-stream: {}", .0.message)]
    InStream(UpstreamErrorInfo),
    #[error("the upstream closed the connection: {0}")]
    Closed(String),
    #[error("the upstream sent something we cannot use: {0}")]
    Protocol(String),
    /// The provider itself rejected the request before calling anyone (e.g. the demo model).
    #[error("{0}")]
    Rejected(ApiError),
}

impl UpstreamError {
    /// Whether another attempt (here or at another provider) may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout(_) | Self::Closed(_) | Self::InStream(_) => true,
            Self::Status { status, .. } => {
                matches!(status, 408 | 409 | 429 | 500..=599)
            }
            Self::Protocol(_) | Self::Rejected(_) => false,
        }
    }

    /// The error as the client sees it. Upstream client errors (400, 404, 413, 422) are the
    /// client's own mistake and keep their status and message; everything else is ours to own:
    /// 429/529/503 → 503 with Retry-After, timeouts → 504, the rest → 502. What the provider
    /// said passes through [`sanitise`] first.
    pub fn into_api_error(self, provider: &str) -> ApiError {
        let mut e = self.into_api_error_as_said(provider);
        e.message = sanitise(&e.message);
        e
    }

    fn into_api_error_as_said(self, provider: &str) -> ApiError {
        match self {
            Self::Rejected(e) => e,
            Self::Timeout(phase) => ApiError::new(
                ErrorKind::Timeout,
                format!("provider {provider} timed out ({})", phase_name(phase)),
            )
            .with_code("upstream_timeout")
            .with_retry_after(Duration::from_secs(1)),
            Self::Status {
                status,
                info,
                retry_after,
            } => match status {
                400 | 404 | 413 | 422 => {
                    let kind = match status {
                        404 => ErrorKind::NotFound,
                        413 => ErrorKind::PayloadTooLarge,
                        _ => ErrorKind::InvalidRequest,
                    };
                    let mut e = ApiError::new(kind, info.message);
                    e.code = info.code.filter(|c| c.parse::<u16>().is_err());
                    e
                }
                429 | 503 | 529 => ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "provider {provider} is overloaded ({status}): {}",
                        info.message
                    ),
                )
                .with_code("upstream_overloaded")
                .with_retry_after(retry_after.unwrap_or(Duration::from_secs(1))),
                _ => ApiError::new(
                    ErrorKind::Upstream,
                    format!("provider {provider} failed ({status}): {}", info.message),
                )
                .with_code("upstream_error"),
            },
            Self::InStream(info) => ApiError::new(
                ErrorKind::Upstream,
                format!("provider {provider} failed mid-stream: {}", info.message),
            )
            .with_code("upstream_error"),
            other @ (Self::Connect(_) | Self::Closed(_) | Self::Protocol(_)) => {
                ApiError::new(ErrorKind::Upstream, format!("provider {provider}: {other}"))
                    .with_code("upstream_error")
            }
        }
    }
}

/// What an upstream's error text must not carry to a client, and what stands in for it: key
/// fragments (an OpenAI-style `sk-…`, a bearer token, a long opaque string) and where things
/// live inside (URLs, IP addresses, `host:port`).
static HIDDEN: std::sync::LazyLock<Vec<(regex::Regex, &'static str)>> =
    std::sync::LazyLock::new(|| {
        [
            (
                r"(?i)\b(?:https?|wss?|grpcs?)://[^\s\x22'<>()]*[^\s\x22'<>().,;:]",
                "[url]",
            ),
            (
                r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}",
                "Bearer [redacted]",
            ),
            (r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}", "[redacted]"),
            (r"\b[A-Za-z0-9_+/=-]{32,}", "[redacted]"),
            (r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b", "[address]"),
            (r"(?i)\b[a-z0-9-]+(?:\.[a-z0-9-]+)+:\d{2,5}\b", "[address]"),
        ]
        .into_iter()
        .filter_map(|(pattern, with)| regex::Regex::new(pattern).ok().map(|r| (r, with)))
        .collect()
    });

/// `text` with provider key fragments and internal addresses replaced (see [`HIDDEN`]).
pub fn sanitise(text: &str) -> String {
    let mut out = std::borrow::Cow::Borrowed(text);
    for (pattern, with) in HIDDEN.iter() {
        if pattern.is_match(&out) {
            out = std::borrow::Cow::Owned(pattern.replace_all(&out, *with).into_owned());
        }
    }
    out.into_owned()
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Connect => "connect",
        Phase::FirstByte => "no first byte in time",
        Phase::Idle => "silent for too long between chunks",
        Phase::Total => "the whole call took too long",
    }
}

/// A provider this node does not call itself: another node makes the calls for it (see the
/// actor mesh's forwarding). Kept abstract here, so that calling providers knows nothing of
/// how nodes reach each other.
pub trait Relay: std::fmt::Debug + Send + Sync {
    /// Where it is reached, as the registry records it.
    fn base_url(&self) -> &str;

    /// One whole answer.
    fn complete<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
        timeouts: &'a Timeouts,
    ) -> BoxFuture<'a, Result<Completion, UpstreamError>>;

    /// A stream of chunks, once the far end has accepted the request.
    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
        timeouts: &'a Timeouts,
    ) -> BoxFuture<'a, Result<ChunkStream, UpstreamError>>;
}

/// A provider's way of answering: one variant per adapter.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// An HTTP API: OpenAI-compatible (OpenAI itself, vLLM, other compatible servers) or
    /// Anthropic Messages.
    Api(ApiAdapter),
    /// The built-in deterministic demo model (no network).
    Demo(DemoModel),
    /// A provider only another node can reach, called through that node.
    Relayed(Arc<dyn Relay>),
}

impl Upstream {
    /// Where it is reached (`builtin:demo` for the demo model).
    pub fn base_url(&self) -> &str {
        match self {
            Self::Api(a) => a.base_url(),
            Self::Demo(_) => "builtin:demo",
            Self::Relayed(r) => r.base_url(),
        }
    }

    pub fn kind(&self) -> ProviderKind {
        match self {
            Self::Api(a) => match a.dialect() {
                Dialect::OpenAi => ProviderKind::OpenAi,
                Dialect::Vllm => ProviderKind::Vllm,
                Dialect::Anthropic { .. } => ProviderKind::Anthropic,
            },
            Self::Demo(_) => ProviderKind::Demo,
            Self::Relayed(_) => ProviderKind::Mesh,
        }
    }

    /// Whether `req`, which sends vLLM's own fields ([`ChatRequest::engine_field`]), may be
    /// sent here: to a vLLM server (a replica, here or through its owner; a provider of kind
    /// `vllm`), to the demo model (which reads none of them), or to an Anthropic provider when
    /// it is sent the client's own Messages body (those fields are then Anthropic's own).
    pub fn takes_engine_fields(&self, req: &ChatRequest) -> bool {
        match self {
            Self::Api(a) => match a.dialect() {
                Dialect::Vllm => true,
                Dialect::OpenAi => false,
                Dialect::Anthropic { .. } => req.native.is_some(),
            },
            Self::Demo(_) | Self::Relayed(_) => true,
        }
    }

    /// One whole answer. `model` is the upstream's name for the requested model.
    pub async fn complete(
        &self,
        req: &ChatRequest,
        model: &str,
        timeouts: &Timeouts,
    ) -> Result<Completion, UpstreamError> {
        match self {
            Self::Api(a) => a.complete(req, model, timeouts).await,
            Self::Demo(d) => d.complete(req, model),
            Self::Relayed(r) => r.complete(req, model, timeouts).await,
        }
    }

    /// A stream of chunks. Resolves once the upstream has accepted the request (headers in).
    pub async fn stream(
        &self,
        req: &ChatRequest,
        model: &str,
        timeouts: &Timeouts,
    ) -> Result<ChunkStream, UpstreamError> {
        match self {
            Self::Api(a) => a.stream(req, model, timeouts).await,
            Self::Demo(d) => d.stream(req, model),
            Self::Relayed(r) => r.stream(req, model, timeouts).await,
        }
    }
}

#[cfg(test)]
mod sanitise_tests {
    use super::*;

    #[test]
    fn provider_keys_and_internal_addresses_never_reach_a_client() {
        let cases = [
            (
                "Incorrect API key provided: sk-proj-abcDEF123456789. You can find your API key at https://platform.openai.com/account/api-keys.",
                "Incorrect API key provided: [redacted]. You can find your API key at [url]",
            ),
            (
                "error sending request for url (http://10.0.3.7:8000/v1/chat/completions): connection refused",
                "error sending request for url ([url]): connection refused",
            ),
            (
                "dial tcp 10.0.3.7:8000: i/o timeout",
                "dial tcp [address]: i/o timeout",
            ),
            (
                "upstream vllm-0.gpu.internal:8000 is gone",
                "upstream [address] is gone",
            ),
            (
                "header was Bearer abcdefghijklmnop",
                "header was Bearer [redacted]",
            ),
            (
                "token 0123456789abcdef0123456789abcdef0123 rejected",
                "token [redacted] rejected",
            ),
        ];
        for (said, shown) in cases {
            assert_eq!(sanitise(said).trim_end_matches('.'), shown, "{said}");
        }
        // What a client needs to fix its request stays.
        let plain = "max_tokens must be at most 4096 for model llama-3.1-8b (got 10000)";
        assert_eq!(sanitise(plain), plain);
        let e = UpstreamError::Status {
            status: 401,
            info: UpstreamErrorInfo {
                message: "invalid key sk-live-0000000000000000".into(),
                ..UpstreamErrorInfo::default()
            },
            retry_after: None,
        }
        .into_api_error("openai");
        assert_eq!(
            e.message,
            "provider openai failed (401): invalid key [redacted]"
        );
    }
}
