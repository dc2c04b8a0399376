//! The HTTP API adapter: one client for every provider reached over HTTP, speaking a
//! [`Dialect`]: OpenAI chat completions (OpenAI itself, vLLM and any compatible server) or
//! Anthropic Messages. Whatever the dialect, callers get OpenAI-shaped completions and chunks.
//!
//! Streams always ask for usage (`stream_options.include_usage` in the OpenAI dialect;
//! Anthropic always reports it), so every call is metered; the relay hides the usage chunk from
//! clients that did not ask for it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::Request;
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT,
};
use http_body_util::Full;
use meridian_proto::openai::{Api, ChatRequest, UpstreamErrorInfo, Usage};
use meridian_proto::{ApiError, ErrorKind};
use serde::Deserialize;
use tokio::time::{Instant, Sleep, sleep, timeout};

use super::anthropic::{self, Step};
use super::http1::{Exchange, Pool};
use super::openai;
use super::sse::SseParser;
use super::{Chunk, ChunkStream, Completion, EndpointError, Phase, Timeouts, UpstreamError};

/// Most bytes of an upstream error body we read.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Most bytes of a whole (non-streamed) completion we accept.
const MAX_COMPLETION_BODY: usize = 64 * 1024 * 1024;

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `POST {base}/chat/completions`, `Authorization: Bearer`: OpenAI's API, and servers that
    /// take only its parameters.
    OpenAi,
    /// The same wire format, from a vLLM server: it also takes vLLM's own parameters (`top_k`,
    /// `min_p`, guided decoding, ...), which are sent to no other dialect.
    Vllm,
    /// `POST {base}/messages`, `x-api-key` and `anthropic-version`; requests without
    /// `max_tokens` get `default_max_tokens` (Anthropic requires it).
    Anthropic { default_max_tokens: u32 },
}

#[derive(Clone)]
pub struct ApiAdapter {
    pool: Arc<Pool>,
    base_url: Arc<str>,
    dialect: Dialect,
    /// Path of each API's endpoint, by [`Api`] (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/embeddings`; Anthropic's `/v1/messages` serves chat only).
    paths: Arc<[String; 3]>,
    /// The credential header (`Authorization: Bearer …` or `x-api-key`), marked sensitive so
    /// it is never logged.
    auth: Option<(HeaderName, HeaderValue)>,
    /// The most bytes one stream may send ([`MAX_STREAM_BYTES`]; less in tests).
    max_stream_bytes: u64,
}

impl std::fmt::Debug for ApiAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAdapter")
            .field("pool", &self.pool)
            .field("dialect", &self.dialect)
            .field("paths", &self.paths)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ApiAdapter {
    /// The API root it was made with.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// `base_url` is the API root that ends in `/v1` (e.g. `http://127.0.0.1:8000/v1`,
    /// `https://api.anthropic.com/v1`).
    pub fn new(
        dialect: Dialect,
        base_url: &str,
        api_key: Option<String>,
        connect_timeout: Duration,
    ) -> Result<Self, EndpointError> {
        let pool = Pool::new(base_url, connect_timeout)?;
        let uri = EndpointError::parse(base_url)?;
        let root = uri.path().trim_end_matches('/');
        let path = |api: Api| match dialect {
            Dialect::OpenAi | Dialect::Vllm => format!("{root}/{}", api.path()),
            Dialect::Anthropic { .. } => format!("{root}/messages"),
        };
        let paths = [Api::Chat, Api::Completions, Api::Embeddings].map(path);
        let auth = match api_key {
            None => None,
            Some(key) => {
                let (name, value) = match dialect {
                    Dialect::OpenAi | Dialect::Vllm => (AUTHORIZATION, format!("Bearer {key}")),
                    Dialect::Anthropic { .. } => (HeaderName::from_static("x-api-key"), key),
                };
                let mut v =
                    HeaderValue::from_str(&value).map_err(|_| EndpointError::KeyNotAHeader)?;
                v.set_sensitive(true);
                Some((name, v))
            }
        };
        Ok(Self {
            pool: Arc::new(pool),
            base_url: base_url.into(),
            dialect,
            paths: Arc::new(paths),
            auth,
            max_stream_bytes: MAX_STREAM_BYTES,
        })
    }

    async fn send(
        &self,
        req: &ChatRequest,
        model: &str,
        stream: bool,
        t: &Timeouts,
    ) -> Result<Exchange, UpstreamError> {
        if req.api.upstream() != Api::Chat && matches!(self.dialect, Dialect::Anthropic { .. }) {
            return Err(UpstreamError::Rejected(
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "the model `{}` is served by Anthropic, which has no {} API",
                        req.model(),
                        req.api.as_str()
                    ),
                )
                .with_param("model")
                .with_code("unsupported_api"),
            ));
        }
        // In the order of `paths` (and of `Api`'s variants).
        let path = &self.paths[req.api.upstream() as usize];
        let mut rb = Request::post(path.as_str())
            .header(HOST, self.pool.authority())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("meridian/", env!("CARGO_PKG_VERSION")));
        if let Some(traceparent) = crate::trace::outgoing_traceparent() {
            rb = rb.header("traceparent", traceparent);
        }
        if let Some((name, value)) = &self.auth {
            rb = rb.header(name, value.clone());
        }
        if stream {
            rb = rb.header(ACCEPT, "text/event-stream");
        }
        let body = match self.dialect {
            Dialect::OpenAi | Dialect::Vllm => req.upstream_body(model, stream),
            // A client that asked in Messages: its request as it wrote it.
            Dialect::Anthropic { .. } if let Some(native) = &req.native => {
                rb = rb.header(
                    "anthropic-version",
                    native.version.as_deref().unwrap_or(anthropic::API_VERSION),
                );
                if let Some(beta) = &native.beta {
                    rb = rb.header("anthropic-beta", beta.as_str());
                }
                native.body_for(model, stream)
            }
            Dialect::Anthropic { default_max_tokens } => {
                rb = rb.header("anthropic-version", anthropic::API_VERSION);
                anthropic::request_body(req, model, stream, default_max_tokens)?
            }
        };
        let request = rb
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let mut exchange = self.pool.send(request).await?;
        let head = timeout(t.first_byte, exchange.head())
            .await
            .map_err(|_| UpstreamError::Timeout(Phase::FirstByte))??;
        if !head.status.is_success() {
            return Err(status_error(head, exchange, t).await);
        }
        if stream {
            let content_type = head
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with("text/event-stream") {
                return Err(UpstreamError::Protocol(format!(
                    "expected an event stream, got content-type {content_type:?}"
                )));
            }
        }
        Ok(exchange)
    }

    pub async fn complete(
        &self,
        req: &ChatRequest,
        model: &str,
        t: &Timeouts,
    ) -> Result<Completion, UpstreamError> {
        let mut exchange = self.send(req, model, false, t).await?;
        let body = exchange.read_to_end(t.idle, MAX_COMPLETION_BODY).await?;
        if let Dialect::Anthropic { .. } = self.dialect {
            return match req.native {
                Some(_) => anthropic::native_completion(body),
                None => anthropic::completion(&body),
            };
        }
        #[derive(Deserialize)]
        struct UsageProbe {
            #[serde(default)]
            usage: Option<Usage>,
        }
        let probe: UsageProbe = serde_json::from_slice(&body).map_err(|e| {
            UpstreamError::Protocol(format!("the completion is not a JSON object: {e}"))
        })?;
        Ok(Completion {
            body,
            usage: probe.usage,
        })
    }

    pub async fn stream(
        &self,
        req: &ChatRequest,
        model: &str,
        t: &Timeouts,
    ) -> Result<ChunkStream, UpstreamError> {
        let exchange = self.send(req, model, true, t).await?;
        Ok(Box::pin(SseChunks {
            bytes: exchange,
            parser: SseParser::new(),
            decoder: match self.dialect {
                Dialect::OpenAi | Dialect::Vllm => Decoder::OpenAi,
                Dialect::Anthropic { .. } if req.native.is_some() => {
                    Decoder::AnthropicNative(Box::default())
                }
                Dialect::Anthropic { .. } => Decoder::Anthropic(Box::default()),
            },
            ready: VecDeque::new(),
            seen_event: false,
            done: false,
            received: 0,
            max_bytes: self.max_stream_bytes,
            timeouts: *t,
            last_progress: Instant::now(),
            timer: Box::pin(sleep(t.first_byte)),
        }))
    }
}

/// How a stream's events become chunks.
enum Decoder {
    /// Each event is a chunk; `[DONE]` ends the stream.
    OpenAi,
    /// Named events translated (a message's end yields two chunks at once).
    Anthropic(Box<anthropic::StreamState>),
    /// Named events passed on as they are (the client speaks Messages), their usage read.
    AnthropicNative(Box<anthropic::StreamState>),
}

/// The upstream's event stream as chunks. The first-byte and idle limits use one timer that
/// is re-armed lazily (only when it fires early), not once per chunk.
struct SseChunks {
    bytes: Exchange,
    parser: SseParser,
    decoder: Decoder,
    /// Chunks decoded and not yet taken.
    ready: VecDeque<Chunk>,
    seen_event: bool,
    done: bool,
    /// Bytes the upstream has sent on this stream (bounded by [`MAX_STREAM_BYTES`]).
    received: u64,
    max_bytes: u64,
    timeouts: Timeouts,
    last_progress: Instant,
    timer: Pin<Box<Sleep>>,
}

/// The most one upstream stream may send. The most output tokens a request may ask for
/// (262,144 by default) at a few hundred bytes a chunk stays well under it, logprobs included;
/// an upstream beyond it is broken or hostile, and is cut off.
pub const MAX_STREAM_BYTES: u64 = 1 << 30;

impl SseChunks {
    fn fail(&mut self, e: UpstreamError) -> Poll<Option<Result<Chunk, UpstreamError>>> {
        self.done = true;
        Poll::Ready(Some(Err(e)))
    }

    fn limit(&self) -> (Duration, Phase) {
        if self.seen_event {
            (self.timeouts.idle, Phase::Idle)
        } else {
            (self.timeouts.first_byte, Phase::FirstByte)
        }
    }
}

impl Stream for SseChunks {
    type Item = Result<Chunk, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(chunk) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(chunk)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.parser.next_event() {
                Err(e) => return this.fail(UpstreamError::Protocol(e.to_string())),
                Ok(Some(ev)) => {
                    if !this.seen_event {
                        this.seen_event = true;
                        // From now on the (possibly shorter) idle limit applies.
                        let deadline = this.last_progress + this.timeouts.idle;
                        this.timer.as_mut().reset(deadline);
                    }
                    let step = match &mut this.decoder {
                        Decoder::OpenAi if &ev.data[..] == b"[DONE]" => Ok(Step::Done(Vec::new())),
                        Decoder::OpenAi => openai::to_chunk(ev.data).map(|c| Step::Chunks(vec![c])),
                        Decoder::Anthropic(state) => state.on_event(&ev.data),
                        Decoder::AnthropicNative(state) => state.on_native_event(ev.data),
                    };
                    let chunks = match step {
                        Ok(Step::Chunks(chunks)) => chunks,
                        Ok(Step::Done(chunks)) => {
                            this.done = true;
                            this.bytes.drain_ready(cx);
                            chunks
                        }
                        Err(e) => return this.fail(e),
                    };
                    this.ready.extend(chunks);
                    if let Some(chunk) = this.ready.pop_front() {
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    if this.done {
                        return Poll::Ready(None);
                    }
                    continue;
                }
                Ok(None) => {}
            }
            match this.bytes.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    this.received += bytes.len() as u64;
                    if this.received > this.max_bytes {
                        let e = format!("the stream exceeded {} bytes", this.max_bytes);
                        return this.fail(UpstreamError::Protocol(e));
                    }
                    this.parser.push(&bytes);
                    this.last_progress = Instant::now();
                }
                Poll::Ready(Some(Err(e))) => return this.fail(e),
                Poll::Ready(None) => {
                    return this.fail(UpstreamError::Closed(
                        "the stream ended before its end event".into(),
                    ));
                }
                Poll::Pending => loop {
                    let (limit, phase) = this.limit();
                    let deadline = this.last_progress + limit;
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if Instant::now() >= deadline {
                        return this.fail(UpstreamError::Timeout(phase));
                    }
                    // Fired early: progress was made since it was armed.
                    this.timer.as_mut().reset(deadline);
                },
            }
        }
    }
}

async fn status_error(
    head: http::response::Parts,
    mut exchange: Exchange,
    t: &Timeouts,
) -> UpstreamError {
    let status = head.status.as_u16();
    let retry_after = head
        .headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)));
    let body = exchange
        .read_to_end(t.idle, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let info = UpstreamErrorInfo::parse(&body).unwrap_or_else(|| UpstreamErrorInfo {
        message: format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
        ..UpstreamErrorInfo::default()
    });
    UpstreamError::Status {
        status,
        info,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// An upstream that streams without end (comment lines: no event, but bytes, so neither the
    /// idle limit nor the line bound stops it) is cut off at the stream's byte bound.
    #[tokio::test]
    async fn an_endless_stream_is_cut_off_at_its_byte_bound() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                  transfer-encoding: chunked\r\n\r\n",
            );
            let line = format!(": {}\n", "x".repeat(1_000));
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            while conn.write_all(chunk.as_bytes()).is_ok() {}
        });
        let mut upstream = ApiAdapter::new(
            Dialect::OpenAi,
            &format!("http://{addr}/v1"),
            None,
            Duration::from_secs(5),
        )
        .expect("adapter");
        upstream.max_stream_bytes = 256 * 1024;
        let limits = meridian_proto::openai::RequestLimits::default();
        let req = ChatRequest::from_json_as(
            Api::Chat,
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            &limits,
        )
        .expect("request");
        let t = Timeouts {
            total: Duration::from_secs(20),
            ..Timeouts::default()
        };
        let mut stream = upstream.stream(&req, "m", &t).await.expect("stream");
        let ended = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("cut off, not left running");
        match ended {
            Some(Err(UpstreamError::Protocol(m))) => assert!(m.contains("exceeded"), "{m}"),
            other => panic!("not cut off at its bound: {other:?}"),
        }
    }
}
