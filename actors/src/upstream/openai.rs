//! The OpenAI-compatible adapter: OpenAI itself and vLLM (and any server that speaks the same
//! chat-completions wire format).
//!
//! Streams always ask for usage (`stream_options.include_usage`), so every call is metered;
//! the relay hides the usage chunk from clients that did not ask for it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use meridian_proto::openai::{ChatRequest, ChunkProbe, UpstreamErrorInfo, Usage};
use reqwest::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use serde::Deserialize;
use tokio::time::timeout;

use super::sse::SseParser;
use super::{Chunk, ChunkStream, Completion, Phase, Timeouts, UpstreamError};

/// Most bytes of an upstream error body we read.
const MAX_ERROR_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct OpenAiAdapter {
    client: reqwest::Client,
    url: Arc<str>,
    api_key: Option<Arc<str>>,
}

impl std::fmt::Debug for OpenAiAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiAdapter")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl OpenAiAdapter {
    /// `base_url` is the API root that ends in `/v1` (e.g. `http://127.0.0.1:8000/v1`).
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        connect_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            // vLLM's uvicorn closes idle keep-alive connections after 5 s; close ours first so
            // a request never lands on a connection the server is about to drop.
            .pool_idle_timeout(Duration::from_secs(4))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            client,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')).into(),
            api_key: api_key.map(Into::into),
        })
    }

    async fn send(
        &self,
        req: &ChatRequest,
        model: &str,
        stream: bool,
        t: &Timeouts,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut rb = self
            .client
            .post(&*self.url)
            .header(CONTENT_TYPE, "application/json")
            .body(req.upstream_body(model, stream));
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        if stream {
            rb = rb.header(ACCEPT, "text/event-stream");
        }
        let resp = timeout(t.first_byte, rb.send())
            .await
            .map_err(|_| UpstreamError::Timeout(Phase::FirstByte))?
            .map_err(classify)?;
        if !resp.status().is_success() {
            return Err(status_error(resp, t).await);
        }
        Ok(resp)
    }

    pub async fn complete(
        &self,
        req: &ChatRequest,
        model: &str,
        t: &Timeouts,
    ) -> Result<Completion, UpstreamError> {
        let resp = self.send(req, model, false, t).await?;
        let body = timeout(t.idle, resp.bytes())
            .await
            .map_err(|_| UpstreamError::Timeout(Phase::Idle))?
            .map_err(classify)?;
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
        let resp = self.send(req, model, true, t).await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            return Err(UpstreamError::Protocol(format!(
                "expected an event stream, got content-type {content_type:?}"
            )));
        }
        let state = StreamState {
            bytes: resp.bytes_stream().boxed(),
            parser: SseParser::new(),
            seen_event: false,
            done: false,
            timeouts: *t,
        };
        Ok(futures::stream::unfold(state, StreamState::next).boxed())
    }
}

struct StreamState {
    bytes: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    seen_event: bool,
    done: bool,
    timeouts: Timeouts,
}

impl StreamState {
    async fn next(mut self) -> Option<(Result<Chunk, UpstreamError>, Self)> {
        if self.done {
            return None;
        }
        loop {
            match self.parser.next_event() {
                Err(e) => return self.fail(UpstreamError::Protocol(e.to_string())),
                Ok(Some(ev)) => {
                    self.seen_event = true;
                    if &ev.data[..] == b"[DONE]" {
                        return None;
                    }
                    return match to_chunk(ev.data) {
                        Ok(chunk) => Some((Ok(chunk), self)),
                        Err(e) => self.fail(e),
                    };
                }
                Ok(None) => {}
            }
            let (limit, phase) = if self.seen_event {
                (self.timeouts.idle, Phase::Idle)
            } else {
                (self.timeouts.first_byte, Phase::FirstByte)
            };
            match timeout(limit, self.bytes.next()).await {
                Err(_) => return self.fail(UpstreamError::Timeout(phase)),
                Ok(None) => {
                    return self.fail(UpstreamError::Closed(
                        "the stream ended before [DONE]".into(),
                    ));
                }
                Ok(Some(Err(e))) => return self.fail(UpstreamError::Closed(e.to_string())),
                Ok(Some(Ok(bytes))) => self.parser.push(&bytes),
            }
        }
    }

    fn fail(mut self, e: UpstreamError) -> Option<(Result<Chunk, UpstreamError>, Self)> {
        self.done = true;
        Some((Err(e), self))
    }
}

/// Probes one event's JSON; keeps its bytes unless they span lines (then they are compacted,
/// because a newline inside a relayed `data:` field would break the client's framing).
fn to_chunk(data: Bytes) -> Result<Chunk, UpstreamError> {
    let probe: ChunkProbe = serde_json::from_slice(&data)
        .map_err(|e| UpstreamError::Protocol(format!("a stream event is not a JSON chunk: {e}")))?;
    if probe.error.is_some() {
        let info = UpstreamErrorInfo::parse(&data).unwrap_or_default();
        return Err(UpstreamError::InStream(info));
    }
    let json = if memchr::memchr2(b'\n', b'\r', &data).is_some() {
        let v: serde_json::Value =
            serde_json::from_slice(&data).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        Bytes::from(serde_json::to_vec(&v).map_err(|e| UpstreamError::Protocol(e.to_string()))?)
    } else {
        data
    };
    Ok(Chunk {
        usage_only: probe.is_usage_only(),
        usage: probe.usage,
        json,
    })
}

fn classify(e: reqwest::Error) -> UpstreamError {
    if e.is_connect() {
        UpstreamError::Connect(error_chain(&e))
    } else if e.is_timeout() {
        UpstreamError::Timeout(Phase::Connect)
    } else {
        UpstreamError::Closed(error_chain(&e))
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); keep the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

async fn status_error(resp: reqwest::Response, t: &Timeouts) -> UpstreamError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)));
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while body.len() < MAX_ERROR_BODY {
        match timeout(t.idle, stream.next()).await {
            Ok(Some(Ok(b))) => body.extend_from_slice(&b),
            _ => break,
        }
    }
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
