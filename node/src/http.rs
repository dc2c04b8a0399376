//! The OpenAI-compatible HTTP/SSE edge (axum on hyper).
//!
//! `POST /v1/chat/completions` and `/v1/completions` (stream and not), `POST /v1/embeddings`,
//! Anthropic's `POST /v1/messages` and OpenAI's `POST /v1/responses` (by translation, in
//! `translated.rs`), `GET /v1/models`, `/healthz`, `/readyz`, `/metrics`.
//! Every error is an OpenAI error body. The SSE body pulls the upstream stream directly, writes
//! each chunk's JSON as it came, and puts every chunk that has already arrived into one write
//! (never waiting for more), which is what keeps streaming through us close to a bare proxy.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::BytesMut;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use meridian_actors::{Answer, CacheHit, Call, Gateway, Incoming, ServedStream, StreamEnd};
use meridian_cluster::raft::ClusterNode;
use meridian_proto::openai::{Api, ChatRequest};
use meridian_proto::{ApiError, ErrorKind};
use serde_json::json;
use tokio::time::Instant;

use crate::headers::Edge;
use crate::respond::http_error;

#[derive(Clone)]
pub struct HttpState {
    pub gateway: Gateway,
    pub vllm: meridian_actors::vllm::supervisor::Vllm,
    pub cluster: ClusterNode,
    pub metrics: crate::metrics::NodeMetrics,
    pub sse_heartbeat: Duration,
    /// `created` of every model in `/v1/models` (the node's start time).
    pub started_unix: i64,
    /// Set when the node begins to stop: `/readyz` fails from then on, while requests are still
    /// served until the drain begins (`[shutdown] unready_period`).
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Set once this run of the node has applied everything the cluster committed before it
    /// started: `/readyz` fails until then.
    pub caught_up: Arc<std::sync::atomic::AtomicBool>,
    /// How inference request bodies must arrive.
    pub body: BodyBounds,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(crate::translated::messages))
        .route(
            "/v1/messages/count_tokens",
            post(crate::translated::count_tokens),
        )
        .route("/v1/responses", post(crate::translated::responses))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
        .with_state(Arc::new(state))
}

async fn chat(st: State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    serve(Api::Chat, st, headers, body).await
}

async fn completions(st: State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    serve(Api::Completions, st, headers, body).await
}

async fn embeddings(st: State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    serve(Api::Embeddings, st, headers, body).await
}

/// One call of an OpenAI-style API, through the pipeline; the body is read once the caller is
/// let in.
async fn serve(
    api: Api,
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request = Incoming::Later(Box::pin(async {
        let body = read_body(body, &headers, &st.body).await?;
        ChatRequest::from_json_as(api, &body, &st.gateway.limits())
    }));
    let served = call(&st, api, &headers, request).await;
    let resp = match served.answer {
        Ok(Answer::Complete(body)) => json_response(body, served.rate_limits.len()),
        Ok(Answer::Stream(stream)) => sse_response(stream, Framing::OpenAi, st.sse_heartbeat),
        Ok(Answer::Cached(hit)) if hit.stream => cached_sse(&hit, Framing::OpenAi),
        Ok(Answer::Cached(hit)) => json_response(hit.completion, 0),
        Err(e) => http_error(&e),
    };
    decorate(
        resp,
        served.cache,
        served.cost_micro_usd,
        served.rate_limits,
        &served.request_id,
    )
}

/// One call of `api` through the pipeline: the request as the edge read it, with what the
/// HTTP headers say of the caller and the call.
pub(crate) async fn call(
    st: &HttpState,
    api: Api,
    headers: &HeaderMap,
    request: Incoming<'_>,
) -> meridian_actors::Served {
    let (request_id, credentials, options, trace) = crate::headers::call_parts(
        Edge::Http,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    st.gateway
        .serve(Call {
            edge: Edge::Http,
            api,
            trace,
            request_id,
            credentials,
            options,
            request,
        })
        .await
}

/// The headers every answer of the pipeline gets: whether it came from the cache, what it
/// cost (when asked), the limits' `x-ratelimit-*` and the request id.
pub(crate) fn decorate(
    mut resp: Response,
    cache: Option<meridian_actors::CacheOutcome>,
    cost_micro_usd: Option<u64>,
    rate_limits: Vec<meridian_actors::quota::RateLimitState>,
    request_id: &meridian_proto::RequestId,
) -> Response {
    if let Some(cache) = cache {
        resp.headers_mut()
            .insert("x-meridian-cache", HeaderValue::from_static(cache.as_str()));
    }
    if let Some(v) =
        cost_micro_usd.and_then(|c| HeaderValue::from_str(&crate::headers::usd(c)).ok())
    {
        resp.headers_mut().insert("x-meridian-cost-usd", v);
    }
    crate::ratelimit::write_headers(rate_limits, resp.headers_mut());
    if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// A whole JSON answer, its header map sized up front for the `x-ratelimit-*` headers of `limits`
/// limits and the few others every answer gets (growing it later rehashes it).
pub(crate) fn json_response(body: Bytes, limits: usize) -> Response {
    let mut resp = Response::new(Body::from(body));
    let headers = resp.headers_mut();
    headers.reserve(crate::ratelimit::header_room(limits));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A cached whole answer as the SSE stream the client asked for.
pub(crate) fn cached_sse(hit: &CacheHit, mut framing: Framing) -> Response {
    let chunks = match hit.chunks() {
        Ok(chunks) => chunks,
        Err(e) => return framing.error_response(&e),
    };
    let mut body = BytesMut::new();
    for c in chunks {
        framing.chunk(&mut body, c.as_bytes());
    }
    framing.done(&mut body);
    (SSE_HEADERS, Body::from(body.freeze())).into_response()
}

const SSE_HEADERS: [(http::HeaderName, &str); 3] = [
    (header::CONTENT_TYPE, "text/event-stream"),
    (header::CACHE_CONTROL, "no-cache"),
    (http::HeaderName::from_static("x-accel-buffering"), "no"),
];

/// How a stream's chunks are written: OpenAI's `data:` frames ending in `[DONE]`, or
/// Anthropic's named events (the chat chunks translated as they pass).
pub(crate) enum Framing {
    OpenAi,
    Anthropic {
        events: Box<meridian_proto::anthropic::MessageStream>,
        request_id: String,
    },
    /// Anthropic's events as an Anthropic provider sent them (each chunk is one event's data,
    /// named by its `type`; the provider's `message_stop` ends it).
    AnthropicNative {
        request_id: String,
    },
    /// The Responses API's semantic events (no `[DONE]`).
    Responses {
        events: Box<meridian_proto::responses::ResponseStream>,
    },
}

impl Framing {
    fn chunk(&mut self, buf: &mut BytesMut, json: &[u8]) {
        match self {
            Self::OpenAi => {
                buf.extend_from_slice(b"data: ");
                buf.extend_from_slice(json);
                buf.extend_from_slice(b"\n\n");
            }
            Self::Anthropic { events, .. } => write_events(buf, events.on_chunk(json)),
            Self::Responses { events } => write_events(buf, events.on_chunk(json)),
            Self::AnthropicNative { .. } => {
                #[derive(serde::Deserialize)]
                struct Named<'a> {
                    #[serde(borrow, rename = "type")]
                    kind: std::borrow::Cow<'a, str>,
                }
                let name = serde_json::from_slice::<Named<'_>>(json)
                    .map_or(std::borrow::Cow::Borrowed("message"), |n| n.kind);
                buf.extend_from_slice(b"event: ");
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(b"\ndata: ");
                buf.extend_from_slice(json);
                buf.extend_from_slice(b"\n\n");
            }
        }
    }

    fn done(&mut self, buf: &mut BytesMut) {
        match self {
            Self::OpenAi => buf.extend_from_slice(b"data: [DONE]\n\n"),
            Self::Anthropic { events, .. } => write_events(buf, events.finish()),
            Self::Responses { events } => write_events(buf, events.finish()),
            // The provider's own `message_stop` was its last event.
            Self::AnthropicNative { .. } => {}
        }
    }

    /// A failure once the stream has begun: an error event, and no end event.
    fn error(&mut self, buf: &mut BytesMut, e: &ApiError) {
        match self {
            Self::OpenAi => {
                buf.extend_from_slice(b"data: ");
                buf.extend_from_slice(&e.body().to_json());
                buf.extend_from_slice(b"\n\n");
            }
            Self::Anthropic { request_id, .. } | Self::AnthropicNative { request_id } => {
                let body = meridian_proto::anthropic::error_body(e, Some(request_id));
                write_events(buf, vec![("error", body)]);
            }
            Self::Responses { events } => write_events(buf, events.error(e)),
        }
    }

    /// A failure before the stream began, as a whole answer.
    fn error_response(&self, e: &ApiError) -> Response {
        match self {
            Self::OpenAi | Self::Responses { .. } => http_error(e),
            Self::Anthropic { request_id, .. } | Self::AnthropicNative { request_id } => {
                crate::respond::anthropic_error(e, request_id)
            }
        }
    }

    fn ping(&self) -> Bytes {
        match self {
            Self::OpenAi | Self::Responses { .. } => Bytes::from_static(b": ping\n\n"),
            Self::Anthropic { .. } | Self::AnthropicNative { .. } => {
                Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n")
            }
        }
    }
}

fn write_events(buf: &mut BytesMut, events: Vec<meridian_proto::anthropic::Event>) {
    for (name, data) in events {
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\ndata: ");
        buf.extend_from_slice(data.to_string().as_bytes());
        buf.extend_from_slice(b"\n\n");
    }
}

/// How a request body must arrive (`[http]`).
#[derive(Debug, Clone, Copy)]
pub struct BodyBounds {
    /// Larger bodies are refused (413), from their `Content-Length` or as they arrive.
    pub max_bytes: usize,
    /// The whole body must arrive within this (408 after).
    pub timeout: Duration,
    /// The least rate a body must keep, in bytes a second (0: none): it has
    /// [`BODY_RATE_GRACE`], and each byte received gives it `1 / min_rate` s more; past that,
    /// 408. A client cannot hold a connection and a task with a trickle.
    pub min_rate: u64,
}

/// The time a body has before what it has sent must pay for more ([`BodyBounds::min_rate`]).
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(5);

/// Reads a request body within `bounds`.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    bounds: &BodyBounds,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the request body is larger than this node accepts ({} bytes)",
                bounds.max_bytes
            ),
        )
        .with_code("request_too_large")
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut frames = body.into_data_stream();
    if let Some(n) = declared.filter(|&n| n > bounds.max_bytes as u64) {
        if n <= LINGER_BYTES {
            discard(&mut frames).await;
        }
        return Err(too_large());
    }
    let slow = |why: String| {
        ApiError::new(ErrorKind::RequestTimeout, why)
            .with_code("body_timeout")
            .with_retry_after(Duration::from_secs(1))
    };
    let start = tokio::time::Instant::now();
    // What the client announces is reserved only up to 64 KiB: the rest grows as bytes come.
    let mut buf = bytes::BytesMut::with_capacity(
        declared
            .map_or(8 * 1024, |n| n as usize)
            .min(bounds.max_bytes)
            .min(64 * 1024),
    );
    loop {
        // The moment the body falls behind: its timeout, or the grace plus the time what has
        // come pays for at the least rate.
        let behind = if bounds.min_rate == 0 {
            bounds.timeout
        } else {
            BODY_RATE_GRACE + Duration::from_secs_f64(buf.len() as f64 / bounds.min_rate as f64)
        };
        let deadline = start + bounds.timeout.min(behind);
        match tokio::time::timeout_at(deadline, frames.next()).await {
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Ok(data))) => {
                if buf.len() + data.len() > bounds.max_bytes {
                    discard(&mut frames).await;
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("the request body could not be read: {e}"),
                )
                .with_code("invalid_body"));
            }
            Err(_) if start.elapsed() >= bounds.timeout => {
                return Err(slow(format!(
                    "the request body did not arrive within {:?}",
                    bounds.timeout
                )));
            }
            Err(_) => {
                return Err(slow(format!(
                    "the request body arrives slower than {} bytes a second ({} bytes in {:.1} s)",
                    bounds.min_rate,
                    buf.len(),
                    start.elapsed().as_secs_f64()
                )));
            }
        }
    }
}

/// A refused body is read and thrown away for up to this long, and this many bytes, before the
/// 413 goes out (a "lingering close"): a client still sending it would otherwise meet a reset,
/// which on its side discards the answer too.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 64 << 20;

async fn discard(frames: &mut axum::body::BodyDataStream) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut read = 0u64;
        while let Some(Ok(data)) = frames.next().await {
            read += data.len() as u64;
            if read > LINGER_BYTES {
                return;
            }
        }
    })
    .await;
}

async fn models(State(st): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let (_, credentials, ..) = crate::headers::call_parts(
        Edge::Http,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    let models = match st.gateway.list_models(credentials) {
        Ok(models) => models,
        Err(e) => return http_error(&e),
    };
    let data: Vec<_> = models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": st.started_unix, "owned_by": "meridian"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Ready unless draining. Without a known Raft leader the node still serves from its last
/// applied state, and says so under `cluster`.
async fn metrics(State(st): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(header::CONTENT_TYPE, crate::metrics::OPENMETRICS)],
            st.metrics.render(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, crate::metrics::PROMETHEUS_TEXT)],
            st.metrics.render_prometheus(),
        )
            .into_response()
    }
}

/// Ready once the node has caught up with the cluster (it has applied what was committed before
/// it started: a restarted node does not take traffic it cannot yet admit), until it begins to
/// stop (it may still serve for `[shutdown] unready_period`, so
/// that balancers take it out of rotation before its drain refuses anything). Without quorum
/// the node stays ready (it serves from its last applied state) and says so under `cluster`.
async fn readyz(State(st): State<Arc<HttpState>>) -> Response {
    let c = st.cluster.status();
    let cluster = json!({
        "leader": c.leader,
        "term": c.term,
        "commit_index": c.commit_index,
        "applied_index": c.applied_index,
        "quorum": if c.quorum { "ok" } else { "lost" },
        "state": if c.quorum { "current" } else { "serving from the last applied state; writes wait for a quorum" },
    });
    if !st.caught_up.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "starting", "cluster": cluster})),
        )
            .into_response();
    }
    let stopping = st.stopping.load(std::sync::atomic::Ordering::Relaxed);
    if stopping || st.gateway.is_draining() {
        let status = if st.gateway.is_draining() {
            "draining"
        } else {
            "stopping"
        };
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": status, "cluster": cluster})),
        )
            .into_response();
    }
    axum::Json(json!({"status": "ready", "in_flight": st.gateway.in_flight(), "cluster": cluster}))
        .into_response()
}

pub(crate) fn sse_response(relay: ServedStream, framing: Framing, heartbeat: Duration) -> Response {
    let body = SseBody {
        relay,
        framing,
        heartbeat,
        last_write: Instant::now(),
        timer: Box::pin(tokio::time::sleep(heartbeat)),
        finished: false,
    };
    (SSE_HEADERS, Body::from_stream(body)).into_response()
}

/// The SSE response body: each chunk framed as it comes (every chunk that is ready goes out in
/// one write), the end (`data: [DONE]`, or Anthropic's closing events) at a clean end, an error
/// event (and no end) at a failed one, and a ping while the upstream is silent. The heartbeat
/// timer is re-armed only when it fires, not once per chunk.
struct SseBody {
    relay: ServedStream,
    framing: Framing,
    heartbeat: Duration,
    last_write: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    finished: bool,
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        match this.relay.poll_next_unpin(cx) {
            Poll::Ready(piece) => {
                let mut buf = BytesMut::new();
                match piece {
                    Some(piece) => {
                        for json in &piece.chunks {
                            this.framing.chunk(&mut buf, json);
                        }
                        match piece.end {
                            None => {}
                            Some(StreamEnd::Done) => {
                                this.framing.done(&mut buf);
                                this.finished = true;
                            }
                            Some(StreamEnd::Failed(e)) => {
                                this.framing.error(&mut buf, &e);
                                this.finished = true;
                            }
                        }
                    }
                    None => {
                        // The relay ended without a verdict: say so, never end as if complete.
                        this.framing.error(
                            &mut buf,
                            &ApiError::new(ErrorKind::Internal, "the stream ended unexpectedly"),
                        );
                        this.finished = true;
                    }
                }
                this.last_write = Instant::now();
                Poll::Ready(Some(Ok(buf.freeze())))
            }
            Poll::Pending => loop {
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = this.last_write + this.heartbeat;
                let now = Instant::now();
                if now >= due {
                    this.last_write = now;
                    this.timer.as_mut().reset(now + this.heartbeat);
                    return Poll::Ready(Some(Ok(this.framing.ping())));
                }
                this.timer.as_mut().reset(due);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trickle(pieces: usize, every: Duration) -> Body {
        Body::from_stream(futures::stream::unfold(0, move |n| async move {
            if n == pieces {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((
                Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789")),
                n + 1,
            ))
        }))
    }

    /// `trickle(pieces, every)` read as a body with no headers.
    async fn read_trickle(
        pieces: usize,
        every: Duration,
        bounds: &BodyBounds,
    ) -> Result<Bytes, ApiError> {
        read_body(trickle(pieces, every), &HeaderMap::new(), bounds).await
    }

    const BOUNDS: BodyBounds = BodyBounds {
        max_bytes: 1 << 20,
        timeout: Duration::from_secs(60),
        min_rate: 1024,
    };

    /// Past the grace, a body under the least rate is refused (408) at the moment it falls
    /// behind; one that keeps the rate, or ends within the grace, is read whole.
    #[tokio::test(start_paused = true)]
    async fn a_body_under_the_least_rate_is_refused_once_the_grace_is_over() {
        let started = tokio::time::Instant::now();
        let e = read_trickle(100, Duration::from_secs(1), &BOUNDS)
            .await
            .expect_err("too slow");
        assert_eq!(e.kind, ErrorKind::RequestTimeout);
        assert_eq!(e.code.as_deref(), Some("body_timeout"));
        assert!(
            e.message.contains("slower than 1024 bytes a second"),
            "{e:?}"
        );
        // Five pieces (50 bytes) came in the grace; they pay for 50 / 1024 s more.
        let behind = BODY_RATE_GRACE + Duration::from_secs_f64(50.0 / 1024.0);
        assert!(
            started.elapsed().abs_diff(behind) < Duration::from_millis(2),
            "{:?}",
            started.elapsed()
        );

        let whole = read_trickle(40, Duration::from_millis(100), &BOUNDS)
            .await
            .expect("within the grace");
        assert_eq!(whole.len(), 400);
        let fast = BodyBounds {
            min_rate: 10,
            ..BOUNDS
        };
        let whole = read_trickle(8, Duration::from_millis(900), &fast)
            .await
            .expect("at its rate");
        assert_eq!(whole.len(), 80);
    }

    /// A body larger than the bound is refused by its `Content-Length` before a byte is read,
    /// or as it arrives when it names none.
    #[tokio::test]
    async fn a_body_over_the_bound_is_413() {
        let small = BodyBounds {
            max_bytes: 15,
            ..BOUNDS
        };
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("16"));
        let e = read_body(Body::empty(), &headers, &small)
            .await
            .expect_err("declared too large");
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
        let e = read_trickle(2, Duration::ZERO, &small)
            .await
            .expect_err("too large as it came");
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
    }
}
