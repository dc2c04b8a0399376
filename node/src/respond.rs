//! The one place that turns an [`ApiError`] into an HTTP response or a gRPC status.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use meridian_proto::{ApiError, ErrorKind};

pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The OpenAI error body with its status, `Retry-After` when a retry helps later, and
/// `x-should-retry: false` when it cannot help (so SDKs do not hammer us).
pub fn http_error(e: &ApiError) -> Response {
    error_with_body(e, e.body().to_json())
}

/// The same answer with Anthropic's error body (the Messages route).
pub fn anthropic_error(e: &ApiError, request_id: &str) -> Response {
    let body = meridian_proto::anthropic::error_body(e, Some(request_id)).to_string();
    error_with_body(e, body.into_bytes())
}

fn error_with_body(e: &ApiError, body: Vec<u8>) -> Response {
    let status = http_status(e.kind);
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), error = %e, "request failed");
    }
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    let headers = resp.headers_mut();
    if let Some(after) = e.retry_after {
        let secs = after.as_secs_f64().ceil().max(1.0) as u64;
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if !e.retryable() {
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
    }
    for (name, value) in &e.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    resp
}

pub fn grpc_status(e: &ApiError) -> tonic::Status {
    use tonic::Code;
    let code = match e.kind {
        ErrorKind::InvalidRequest => Code::InvalidArgument,
        ErrorKind::PayloadTooLarge => Code::ResourceExhausted,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::RateLimited => Code::ResourceExhausted,
        ErrorKind::Unavailable | ErrorKind::Upstream => Code::Unavailable,
        ErrorKind::Timeout | ErrorKind::RequestTimeout => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
    };
    let mut status = tonic::Status::new(code, e.message.clone());
    let md = status.metadata_mut();
    if let Some(after) = e.retry_after {
        md.insert("retry-after", after.as_secs().max(1).into());
    }
    if let Some(code) = e.code.as_deref().and_then(|c| c.parse().ok()) {
        md.insert("x-meridian-error-code", code);
    }
    if let Some(param) = e.param.as_deref().and_then(|p| p.parse().ok()) {
        md.insert("x-meridian-error-param", param);
    }
    for (name, value) in &e.headers {
        if let (Ok(n), Ok(v)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes()),
            value.parse(),
        ) {
            md.insert(n, v);
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_class_metrics_use_is_the_status_sent() {
        for kind in [
            ErrorKind::InvalidRequest,
            ErrorKind::PayloadTooLarge,
            ErrorKind::RequestTimeout,
            ErrorKind::NotFound,
            ErrorKind::Unauthenticated,
            ErrorKind::PermissionDenied,
            ErrorKind::RateLimited,
            ErrorKind::Unavailable,
            ErrorKind::Timeout,
            ErrorKind::Upstream,
            ErrorKind::Internal,
        ] {
            let class = format!("{}xx", http_status(kind).as_u16() / 100);
            assert_eq!(kind.status_class(), class, "{kind:?}");
        }
    }
}
