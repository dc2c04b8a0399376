//! One inference request's way through the node, whichever edge and API it came in by:
//!
//! ```text
//! authenticate → check the call → cache → admit → route → call with fallbacks → settle → record
//! ```
//!
//! An edge decodes its wire format into a [`Call`], makes one [`Gateway::serve`] call, and
//! encodes the [`Served`] answer (framing, heartbeats and connections stay the edge's). Routing
//! and the call with its fallbacks run in a [`ConnectionActor`](crate::connection), which settles
//! the reservation with what the request used; [`record`] is the one place where a request's
//! outcome is recorded, reached exactly once per request: here for an answer that ends before
//! a stream (an error, a cache hit, a whole completion), from the stream's end for a stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use meridian_proto::openai::ChatRequest;
use meridian_proto::{ApiError, ErrorKind, RequestId};
use tokio::time::Instant;

pub use crate::auth::Credentials;
use crate::connection::{ChatReply, RelayStream, RequestContext, StreamEnd, StreamPiece};
use crate::gateway::Gateway;
use crate::quota::RateLimitState;
use meridian_policy::route::Complexity;

/// What the client asked of Meridian itself, beside the request (the `X-Meridian-*` headers,
/// or their gRPC metadata).
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The client's own deadline.
    pub deadline: Option<Instant>,
    /// For a virtual model such as `auto`.
    pub complexity: Option<Complexity>,
    /// The feature the request is for (limited per tenant, if the tenant says so).
    pub feature: Option<String>,
    /// The client opts in to the response cache.
    pub cache: bool,
}

/// One inference request as an edge decoded it. The options and the request are checked after
/// the caller is known, so that a caller who is not let in learns nothing about its request:
/// an edge hands over what its decoding came to, failures included.
#[derive(Debug)]
pub struct Call<'a> {
    pub request_id: RequestId,
    pub credentials: Credentials<'a>,
    pub options: Result<CallOptions, ApiError>,
    pub request: Result<ChatRequest, ApiError>,
}

/// Whether a cacheable request was answered from the response cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

impl CacheOutcome {
    /// As the `x-meridian-cache` header (and gRPC metadata) says it.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
        }
    }
}

/// A whole answer from the response cache, to be replayed as the client asked for it.
#[derive(Debug, Clone)]
pub struct CacheHit {
    /// The `chat.completion` JSON as it was first answered.
    pub completion: Bytes,
    /// The client asked for a stream: replay it as [`CacheHit::chunks`].
    pub stream: bool,
    /// The stream should end with a usage chunk.
    pub include_usage: bool,
}

impl CacheHit {
    /// The chunks a stream of this answer would have carried (see [`crate::cache::as_chunks`]).
    pub fn chunks(&self) -> Result<Vec<String>, ApiError> {
        crate::cache::as_chunks(&self.completion, self.include_usage).ok_or_else(|| {
            ApiError::new(ErrorKind::Internal, "a cached answer could not be replayed")
        })
    }
}

/// The answer to a [`Call`].
#[derive(Debug)]
// Made once per request and moved to the edge once: boxing the stream would cost an
// allocation per request to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    /// A whole `chat.completion` JSON from a provider.
    Complete(Bytes),
    /// A stream from a provider.
    Stream(ServedStream),
    /// From the response cache.
    Cached(CacheHit),
}

/// What [`Gateway::serve`] hands back: the answer or the error, with what the edge writes
/// either way.
#[derive(Debug)]
pub struct Served {
    pub request_id: RequestId,
    pub answer: Result<Answer, ApiError>,
    /// The state of each limit the request was admitted under (none if it was not admitted).
    pub rate_limits: Vec<RateLimitState>,
    /// For a request that may be cached: whether it was answered from the cache.
    pub cache: Option<CacheOutcome>,
}

/// What [`Gateway::serve`] learns on the way, beside the answer.
struct Extras {
    started: Instant,
    model: String,
    rate_limits: Vec<RateLimitState>,
    cache: Option<CacheOutcome>,
}

/// How a request ended, as [`record`] sees it.
#[derive(Debug)]
pub enum Ending<'a> {
    /// A whole answer from a provider.
    Complete,
    /// Answered from the response cache.
    Cached,
    /// A stream ran to its end.
    Streamed,
    /// Refused or failed, before or during a stream.
    Failed(&'a ApiError),
    /// The client went away before its stream ended.
    Abandoned,
}

/// The one place where a request's outcome is recorded, once per request.
///
/// Today this is a debug event; per-request metrics, traces and usage records are written
/// here as they are built. (Usage is charged by the reservation's settlement, in the
/// connection, and counted in the tenant's roll-up from there.)
pub fn record(request_id: &RequestId, model: &str, started: Instant, ending: Ending<'_>) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1_000.0;
    match ending {
        Ending::Failed(e) => tracing::debug!(
            request_id = %request_id,
            model,
            elapsed_ms,
            kind = ?e.kind,
            code = e.code.as_deref().unwrap_or(""),
            "request failed"
        ),
        ending => tracing::debug!(
            request_id = %request_id,
            model,
            elapsed_ms,
            ending = ?ending,
            "request served"
        ),
    }
}

impl Gateway {
    /// Serves one inference request from start to end (see the module's steps).
    pub async fn serve(&self, call: Call<'_>) -> Served {
        let request_id = call.request_id.clone();
        let mut extras = Extras {
            started: Instant::now(),
            model: String::new(),
            rate_limits: Vec::new(),
            cache: None,
        };
        let answer = self.run(call, &mut extras).await;
        let (model, started) = (&extras.model, extras.started);
        match &answer {
            Ok(Answer::Stream(_)) => {}
            Ok(Answer::Complete(_)) => record(&request_id, model, started, Ending::Complete),
            Ok(Answer::Cached(_)) => record(&request_id, model, started, Ending::Cached),
            Err(e) => record(&request_id, model, started, Ending::Failed(e)),
        }
        Served {
            request_id,
            answer,
            rate_limits: extras.rate_limits,
            cache: extras.cache,
        }
    }

    async fn run(&self, call: Call<'_>, served: &mut Extras) -> Result<Answer, ApiError> {
        let principal = self.authenticate(call.credentials)?;
        let options = call.options?;
        let request = call.request?;
        // Only [`record`] reads it, and only when its event is on: no copy per request otherwise.
        if tracing::enabled!(tracing::Level::DEBUG) {
            served.model.push_str(request.model());
        }
        let cache_key = self.cache_key(principal.as_ref(), &request, options.cache);
        if let Some(key) = cache_key {
            if let Some(completion) = self.cache_get(key, principal.as_ref(), request.model()) {
                // A hit is free: no admission, no provider.
                served.cache = Some(CacheOutcome::Hit);
                return Ok(Answer::Cached(CacheHit {
                    completion,
                    stream: request.stream(),
                    include_usage: request.include_usage(),
                }));
            }
            served.cache = Some(CacheOutcome::Miss);
        }
        let mut reservation = self
            .admit(principal.as_ref(), &request, options.feature.as_deref())
            .await?;
        if let Some(r) = &mut reservation {
            served.rate_limits = std::mem::take(&mut r.rate_limits);
        }
        let ctx = RequestContext {
            request_id: call.request_id,
            principal,
            deadline: options.deadline,
            reservation,
            complexity: options.complexity,
            weight: 1,
        };
        let request_id = ctx.request_id.clone();
        match self.chat(request, ctx).await? {
            ChatReply::Complete(c) => {
                if let Some(key) = cache_key {
                    self.cache_put(key, c.body.clone());
                }
                Ok(Answer::Complete(c.body))
            }
            // Streams are not stored (only whole answers are); a later whole call fills it.
            ChatReply::Stream(relay) => Ok(Answer::Stream(ServedStream {
                relay,
                request_id,
                model: std::mem::take(&mut served.model),
                started: served.started,
                recorded: false,
            })),
        }
    }
}

/// A provider's stream as the edge pulls it: the [`RelayStream`], recorded once at its end (or
/// when the client drops it first).
pub struct ServedStream {
    relay: RelayStream,
    request_id: RequestId,
    model: String,
    started: Instant,
    recorded: bool,
}

impl std::fmt::Debug for ServedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedStream")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl ServedStream {
    fn record(&mut self, ending: Ending<'_>) {
        if !self.recorded {
            self.recorded = true;
            record(&self.request_id, &self.model, self.started, ending);
        }
    }
}

impl Stream for ServedStream {
    type Item = StreamPiece;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamPiece>> {
        let this = &mut *self;
        let piece = std::task::ready!(this.relay.poll_next_unpin(cx));
        match piece.as_ref().map(|p| &p.end) {
            Some(None) => {}
            Some(Some(StreamEnd::Done)) => this.record(Ending::Streamed),
            Some(Some(StreamEnd::Failed(e))) => this.record(Ending::Failed(e)),
            None => this.record(Ending::Failed(&ApiError::new(
                ErrorKind::Internal,
                "the stream ended unexpectedly",
            ))),
        }
        Poll::Ready(piece)
    }
}

impl Drop for ServedStream {
    fn drop(&mut self) {
        self.record(Ending::Abandoned);
    }
}
