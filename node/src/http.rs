//! The OpenAI-compatible HTTP/SSE edge (axum on hyper).
//!
//! `POST /v1/chat/completions` (stream and not), `GET /v1/models`, `/healthz`, `/readyz`.
//! Every error is an OpenAI error body. The SSE relay writes each upstream chunk's JSON as it
//! came, and coalesces the events that have already arrived into one write (never waiting for
//! more), which is what keeps streaming through us close to a bare proxy.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use meridian_actors::{ChatReply, ClientEvent, Gateway, RequestContext};
use meridian_proto::openai::ChatRequest;
use meridian_proto::{ApiError, ErrorKind, RequestId};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use crate::respond::http_error;

/// Largest single write the relay coalesces events into.
const MAX_COALESCED: usize = 64 * 1024;

#[derive(Clone)]
pub struct HttpState {
    pub gateway: Gateway,
    pub sse_heartbeat: Duration,
    /// `created` of every model in `/v1/models` (the node's start time).
    pub started_unix: i64,
}

pub fn router(state: HttpState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            http_error(&ApiError::new(ErrorKind::NotFound, "unknown URL").with_code("unknown_url"))
        })
        .method_not_allowed_fallback(|| async {
            let mut r = http_error(
                &ApiError::new(ErrorKind::InvalidRequest, "method not allowed for this URL")
                    .with_code("method_not_allowed"),
            );
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(Arc::new(state))
}

async fn chat(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id =
        RequestId::from_client(headers.get("x-request-id").and_then(|v| v.to_str().ok()));
    let result = async {
        let body = body.map_err(body_error)?;
        let request = ChatRequest::from_json(&body, st.gateway.limits())?;
        let ctx = RequestContext {
            request_id: request_id.clone(),
            deadline: None,
        };
        st.gateway.chat(request, ctx).await
    }
    .await;
    let mut resp = match result {
        Ok(ChatReply::Complete(c)) => {
            ([(header::CONTENT_TYPE, "application/json")], c.body).into_response()
        }
        Ok(ChatReply::Stream(rx)) => sse_response(rx, st.sse_heartbeat),
        Err(e) => http_error(&e),
    };
    if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn body_error(rejection: BytesRejection) -> ApiError {
    let too_large = matches!(
        &rejection,
        BytesRejection::FailedToBufferBody(
            axum::extract::rejection::FailedToBufferBody::LengthLimitError(_)
        )
    );
    if too_large {
        ApiError::new(
            ErrorKind::PayloadTooLarge,
            "the request body is larger than this node accepts",
        )
        .with_code("request_too_large")
    } else {
        ApiError::new(
            ErrorKind::InvalidRequest,
            format!("the request body could not be read: {rejection}"),
        )
        .with_code("invalid_body")
    }
}

async fn models(State(st): State<Arc<HttpState>>) -> Response {
    let data: Vec<_> = st
        .gateway
        .models()
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": st.started_unix, "owned_by": "meridian"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn readyz(State(st): State<Arc<HttpState>>) -> Response {
    if st.gateway.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    axum::Json(json!({"status": "ready", "in_flight": st.gateway.in_flight()})).into_response()
}

fn sse_response(rx: mpsc::Receiver<ClientEvent>, heartbeat: Duration) -> Response {
    let relay = SseRelay {
        rx,
        heartbeat,
        finished: false,
    };
    let body = Body::from_stream(futures::stream::unfold(relay, SseRelay::next));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (http::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response()
}

/// Turns client events into SSE bytes: `data: <json>\n\n` per chunk, `data: [DONE]` at a clean
/// end, an OpenAI error event (and no `[DONE]`) at a failed one, `: ping` while silent.
struct SseRelay {
    rx: mpsc::Receiver<ClientEvent>,
    heartbeat: Duration,
    finished: bool,
}

impl SseRelay {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.finished {
            return None;
        }
        let first = match tokio::time::timeout(self.heartbeat, self.rx.recv()).await {
            Err(_) => return Some((Ok(Bytes::from_static(b": ping\n\n")), self)),
            Ok(ev) => ev,
        };
        let mut buf = BytesMut::new();
        self.write(first, &mut buf);
        while !self.finished && buf.len() < MAX_COALESCED {
            match self.rx.try_recv() {
                Ok(ev) => self.write(Some(ev), &mut buf),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.write(None, &mut buf),
            }
        }
        Some((Ok(buf.freeze()), self))
    }

    fn write(&mut self, event: Option<ClientEvent>, buf: &mut BytesMut) {
        match event {
            Some(ClientEvent::Chunk(json)) => {
                buf.extend_from_slice(b"data: ");
                buf.extend_from_slice(&json);
                buf.extend_from_slice(b"\n\n");
            }
            Some(ClientEvent::Done) => {
                buf.extend_from_slice(b"data: [DONE]\n\n");
                self.finished = true;
            }
            Some(ClientEvent::Error(e)) => {
                write_error(buf, &e);
                self.finished = true;
            }
            None => {
                // The request died without a verdict: say so, never end as if complete.
                write_error(
                    buf,
                    &ApiError::new(ErrorKind::Internal, "the stream ended unexpectedly"),
                );
                self.finished = true;
            }
        }
    }
}

fn write_error(buf: &mut BytesMut, e: &ApiError) {
    buf.extend_from_slice(b"data: ");
    buf.extend_from_slice(&e.body().to_json());
    buf.extend_from_slice(b"\n\n");
}
