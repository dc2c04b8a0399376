//! The client-visible failure of a request.
//!
//! Every crate reports request failures as an [`ApiError`]: a small [`ErrorKind`] that says whose
//! fault it is and whether a retry may help, plus the OpenAI-style message, `param` and `code`.
//! Only the node maps a kind to an HTTP status or gRPC code (one place), and error constructors
//! have no side effects (no logging).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What went wrong, at the granularity clients and status codes need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or out of range (400).
    InvalidRequest,
    /// The body is larger than the configured limit (413).
    PayloadTooLarge,
    /// The client did not send its request in time: a body slower than the configured rate or
    /// past the body timeout (408).
    RequestTimeout,
    /// No such model (404).
    NotFound,
    /// Missing or bad credentials (401).
    Unauthenticated,
    /// Credentials are fine but the action is not allowed (403).
    PermissionDenied,
    /// A limit was hit (429).
    RateLimited,
    /// No capacity now: queue full, provider down, node draining (503).
    Unavailable,
    /// A deadline passed: queue wait or upstream timeout (504).
    Timeout,
    /// The upstream provider failed or answered something we cannot use (502).
    Upstream,
    /// A bug or broken invariant on our side (500).
    Internal,
}

impl ErrorKind {
    /// The OpenAI `error.type` string for this kind.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest | Self::PayloadTooLarge | Self::NotFound => {
                "invalid_request_error"
            }
            Self::RequestTimeout => "timeout_error",
            Self::Unauthenticated => "authentication_error",
            Self::PermissionDenied => "permission_error",
            Self::RateLimited => "rate_limit_error",
            Self::Unavailable => "service_unavailable",
            Self::Timeout => "timeout_error",
            Self::Upstream => "upstream_error",
            Self::Internal => "server_error",
        }
    }

    /// The class of its HTTP status, `4xx` (the client's) or `5xx` (ours or a provider's), as
    /// metrics label it (the status itself is the edge's: `node::respond::http_status`).
    pub fn status_class(self) -> &'static str {
        match self {
            Self::Unavailable | Self::Timeout | Self::Upstream | Self::Internal => "5xx",
            Self::InvalidRequest
            | Self::PayloadTooLarge
            | Self::RequestTimeout
            | Self::NotFound
            | Self::Unauthenticated
            | Self::PermissionDenied
            | Self::RateLimited => "4xx",
        }
    }

    /// Whether sending the same request again later may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::Unavailable
                | Self::Timeout
                | Self::Upstream
                | Self::RequestTimeout
        )
    }
}

/// A failed request, as the client will see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault (`messages[0].role`), if any.
    pub param: Option<String>,
    /// A stable machine-readable code (`model_not_found`, `queue_full`, ...).
    pub code: Option<String>,
    /// When retrying makes sense, how long to wait first (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// Set when a retry cannot help even though the kind usually can (`x-should-retry: false`).
    pub no_retry: bool,
    /// Extra response headers (HTTP) / metadata (gRPC), e.g. `x-ratelimit-*`.
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            no_retry: false,
            headers: Vec::new(),
        }
    }

    /// Marks the error as one a retry cannot fix.
    pub fn no_retry(mut self) -> Self {
        self.no_retry = true;
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Whether sending the same request again later may succeed.
    pub fn retryable(&self) -> bool {
        self.kind.retryable() && !self.no_retry
    }

    /// A 400 naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
            .with_param(param)
            .with_code("invalid_value")
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The OpenAI error body for this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                r#type: self.kind.openai_type().to_owned(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// `{"error":{"message","type","param","code"}}`, as OpenAI sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub message: String,
    pub r#type: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    /// The body as compact JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}
