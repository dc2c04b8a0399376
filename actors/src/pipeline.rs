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

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use meridian_policy::cost::Rates;
use meridian_policy::route::Complexity;
use meridian_proto::cluster::UsageTotals;
use meridian_proto::openai::{Api, ChatRequest, Usage};
use meridian_proto::{ApiError, ErrorKind, RequestId};
use tokio::time::Instant;

pub use crate::auth::Credentials;
use crate::cache::{CacheKey, StreamCollector};
use crate::calllog::{CallEntry, Recorder};
use crate::connection::{ChatReply, RelayStream, RequestContext, Via, billable};
use crate::gateway::Gateway;
pub use crate::metrics::Edge;
use crate::metrics::{CallRecord, Operation, Tokens};
use crate::quota::{RateLimitState, RollupKey};
pub use crate::trace::TraceHeaders;
use crate::trace::{self, text};
use opentelemetry::KeyValue;
use opentelemetry::global::BoxedSpan;
use stream::CutSignal;
pub use stream::ServedStream;

mod stream;

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
    /// The client asks what a whole answer cost (`X-Meridian-Cost: on`).
    pub cost: bool,
}

/// One inference request as an edge decoded it. The options and the request are checked after
/// the caller is known, so that a caller who is not let in learns nothing about its request:
/// an edge hands over what its decoding came to, failures included.
#[derive(Debug)]
pub struct Call<'a> {
    pub edge: Edge,
    /// The API called (what the request is read as, even when reading it failed).
    pub api: Api,
    /// The client's W3C trace headers, if it sent them.
    pub trace: TraceHeaders<'a>,
    pub request_id: RequestId,
    pub credentials: Credentials<'a>,
    pub options: Result<CallOptions, ApiError>,
    pub request: Incoming<'a>,
}

/// The request of a call: decoded already (a gRPC message), or read only once the caller has
/// been let in (an HTTP body: a client without valid credentials never gets to send one).
// The decoded request moves once, by value, as it did before there were two kinds; boxing it
// would add an allocation to every gRPC call.
#[allow(clippy::large_enum_variant)]
pub enum Incoming<'a> {
    Read(Result<ChatRequest, ApiError>),
    Later(futures::future::BoxFuture<'a, Result<ChatRequest, ApiError>>),
}

impl Incoming<'_> {
    async fn read(self) -> Result<ChatRequest, ApiError> {
        match self {
            Incoming::Read(request) => request,
            Incoming::Later(reading) => reading.await,
        }
    }
}

impl std::fmt::Debug for Incoming<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Read(request) => f.debug_tuple("Read").field(request).finish(),
            Incoming::Later(_) => f.write_str("Later(..)"),
        }
    }
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
    /// What a whole answer cost, in millionths of a dollar, when the client asked
    /// (`X-Meridian-Cost: on`; a stream's cost is known only at its end, in the call log).
    pub cost_micro_usd: Option<u64>,
    /// The answer is in the API the client called, as a provider that speaks it natively sent
    /// it (Messages from an Anthropic provider), not a chat completion to translate back.
    pub native: bool,
}

/// What is known of a request when it ends, for [`record`]: filled in on its way through.
struct Summary {
    request_id: RequestId,
    edge: Edge,
    api: Api,
    started: Instant,
    /// When it arrived (Unix ms), for the per-call record.
    at_unix_ms: u64,
    /// The model asked for, as a metrics label (see [`Gateway::model_label`]).
    model: Arc<str>,
    /// The model asked for, as written (the label, unless this node does not serve it).
    asked: Option<Arc<str>>,
    tenant: Option<Arc<str>>,
    key_id: Option<Arc<str>>,
    user: Option<Arc<str>>,
    feature: Option<String>,
    stream: bool,
    via: Via,
    /// The request's server span, when traces are on (ended where the request is recorded).
    span: Option<BoxedSpan>,
    /// The model's price list (the provider's own, when it has one, is in `via`).
    price: Option<Rates>,
    /// The prompt's tokens as estimated at admission (0: not admitted against limits).
    prompt_estimate: u64,
    /// The choices' `finish_reason`s, read only for a recorded span.
    finish_reasons: Vec<String>,
}

impl Summary {
    /// Whether the request's span is recorded (traces are on and the sampler kept it): only
    /// then is anything gathered for it.
    fn recorded(&self) -> bool {
        self.span
            .as_ref()
            .is_some_and(opentelemetry::trace::Span::is_recording)
    }

    fn new(request_id: RequestId, edge: Edge, api: Api, model: Arc<str>, at_unix_ms: u64) -> Self {
        Self {
            request_id,
            edge,
            api,
            started: Instant::now(),
            at_unix_ms,
            model,
            asked: None,
            tenant: None,
            key_id: None,
            user: None,
            feature: None,
            stream: false,
            via: Via::default(),
            span: None,
            price: None,
            prompt_estimate: 0,
            finish_reasons: Vec::new(),
        }
    }
}

/// What [`Gateway::serve`] learns on the way, beside the answer.
struct Extras {
    summary: Summary,
    rate_limits: Vec<RateLimitState>,
    cache: Option<CacheOutcome>,
    /// A whole answer's usage, as its provider reported it.
    usage: Option<Usage>,
    /// The client asked for the answer's cost.
    wants_cost: bool,
    /// See [`Served::native`].
    native: bool,
}

/// How far [`Gateway::run`] got: an answer, or a provider's stream still to be wrapped (it
/// takes the request's summary along, to record itself at its end).
// Made once per request and moved once, like `Answer`.
#[allow(clippy::large_enum_variant)]
enum Reached {
    Complete(Bytes),
    Cached(CacheHit),
    /// With the cache key it is stored under once it has run to its end, if it may be cached.
    Stream(RelayStream, Option<CacheKey>),
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

/// The one place where a request's outcome is recorded, once per request: its metrics, its
/// per-call record, its tenant's daily roll-up (from the same figures, so that reports add up
/// to the records), its span and a debug event. (Limits are charged by the reservation's
/// settlement, in the connection.)
fn record(
    recorder: &Recorder,
    s: &mut Summary,
    ending: Ending<'_>,
    usage: Option<Usage>,
    first_token: Option<Instant>,
) -> u64 {
    let now = Instant::now();
    let fixed: Option<&'static str> = match &ending {
        Ending::Complete | Ending::Streamed => Some("ok"),
        Ending::Cached => Some("cached"),
        Ending::Abandoned => Some("cancelled"),
        Ending::Failed(_) => None,
    };
    let code = match &ending {
        Ending::Failed(e) => e.code.as_deref().unwrap_or(e.kind.openai_type()),
        _ => fixed.unwrap_or("ok"),
    };
    let tokens = usage.map(|u| Tokens {
        input: u64::from(u.prompt_tokens),
        output: u64::from(u.completion_tokens),
        cached_input: u64::from(u.cached_tokens()),
    });
    let billable = usage.as_ref().map(billable);
    let duration = now - s.started;
    // At the price list of the provider that answered, else the model's.
    let cost_micro_usd = match (s.via.rates.or(s.price), billable) {
        (Some(rates), Some(b)) => rates.micro_usd(&b),
        _ => 0,
    };
    let first_token = first_token.map(|t| t - s.started);
    recorder.metrics.record(&CallRecord {
        edge: s.edge,
        operation: Operation(s.api),
        model: &s.model,
        provider: s.via.provider.as_ref(),
        tenant: s.tenant.as_deref(),
        feature: s.feature.as_deref(),
        code,
        status_class: match &ending {
            Ending::Failed(e) => e.kind.status_class(),
            // A stream the client dropped had its 200 sent.
            _ => "2xx",
        },
        duration,
        first_token,
        queue_wait: s.via.queue_wait,
        upstream: s.via.called_at.map(|t| now - t),
        tokens,
        cost_micro_usd,
    });
    if let Some(log) = &recorder.calls {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1_000.0;
        log.write(CallEntry {
            at_unix_ms: s.at_unix_ms,
            request_id: s.request_id.clone(),
            edge: s.edge,
            api: s.api.as_str(),
            tenant: s.tenant.clone(),
            key_id: s.key_id.clone(),
            user: s.user.clone(),
            feature: s.feature.clone(),
            model: s.asked.clone().unwrap_or_else(|| Arc::clone(&s.model)),
            served_model: s.via.upstream_model.clone(),
            provider: s.via.provider.clone(),
            attempts: s.via.attempts,
            code: fixed.map_or_else(|| Cow::Owned(code.to_owned()), Cow::Borrowed),
            tokens,
            ttft_ms: first_token.map(ms),
            duration_ms: ms(duration),
            queue_wait_ms: s.via.queue_wait.map(ms),
            cost_micro_usd,
            cache_hit: matches!(ending, Ending::Cached),
            stream: s.stream,
            cancelled: matches!(ending, Ending::Abandoned),
        });
    }
    // Calls that reached a provider or the cache are billed; a refusal is not a call.
    if let (Some(quota), Some(tenant)) = (&recorder.usage, &s.tenant)
        && (s.via.provider.is_some() || matches!(ending, Ending::Cached))
    {
        let t = tokens.unwrap_or_default();
        let key = RollupKey {
            model: s.asked.as_deref().unwrap_or(&s.model),
            provider: s.via.provider.as_deref().unwrap_or(""),
            feature: s.feature.as_deref().unwrap_or(""),
            user: s.user.as_deref().unwrap_or(""),
        };
        let usage = UsageTotals {
            requests: 1,
            prompt_tokens: t.input,
            completion_tokens: t.output,
            cached_tokens: t.cached_input,
            cost_micro_usd,
            cache_hits: u64::from(matches!(ending, Ending::Cached)),
        };
        // In the call's own day (its record's), however late the flush commits.
        let day = meridian_proto::cluster::day_of(s.at_unix_ms);
        quota.record(tenant, day, key, &usage);
    }
    if s.recorded()
        && let Some(span) = s.span.take()
    {
        end_span(span, s, code, &ending, tokens, first_token);
    }
    tracing::debug!(
        request_id = %s.request_id,
        model = &*s.model,
        provider = s.via.provider.as_deref().unwrap_or(""),
        elapsed_ms = duration.as_secs_f64() * 1_000.0,
        code,
        "request ended"
    );
    cost_micro_usd
}

/// Adds the `finish_reason`s of an answer's (or a stream chunk's) choices to `into`; read only
/// for a traced request. Found by searching the JSON for the key rather than parsing it again:
/// parsing every chunk again came to about 10,500 more instructions a traced request in the
/// gateway bench (16-chunk streams; 201,692 against 191,217 with this search). The key can
/// only match where it is a key, since a quote inside a JSON string is escaped.
fn finish_reasons(json: &[u8], into: &mut Vec<String>) {
    const KEY: &[u8] = b"\"finish_reason\"";
    // Built once: a searcher made per chunk cost more than the search.
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
    for at in FINDER.find_iter(json) {
        let rest = &json[at + KEY.len()..];
        let value = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b':'))
            .map_or(&[][..], |i| &rest[i..]);
        // A reason is a short plain string; `null` (not finished yet) is none.
        if let Some(text) = value.strip_prefix(b"\"")
            && let Some(end) = memchr::memchr(b'"', text).filter(|n| *n <= 64)
            && let Ok(reason) = std::str::from_utf8(&text[..end])
        {
            into.push(reason.to_owned());
        }
    }
}

/// Ends a request's server span with what it came to (GenAI attributes and Meridian's own).
fn end_span(
    mut span: BoxedSpan,
    s: &Summary,
    code: &str,
    ending: &Ending<'_>,
    tokens: Option<Tokens>,
    first_token: Option<std::time::Duration>,
) {
    use opentelemetry::trace::{Span, Status};
    span.update_name(trace::span_name(
        s.api.operation(),
        s.asked.as_deref().unwrap_or(&s.model),
    ));
    let mut attributes = vec![
        KeyValue::new(
            "gen_ai.request.model",
            Arc::clone(s.asked.as_ref().unwrap_or(&s.model)),
        ),
        text("meridian.request_id", s.request_id.as_str().to_owned()),
        text("meridian.code", code.to_owned()),
        KeyValue::new("meridian.attempts", i64::from(s.via.attempts)),
        KeyValue::new("meridian.cache_hit", matches!(ending, Ending::Cached)),
        KeyValue::new("gen_ai.request.stream", s.stream),
    ];
    if let Some(kind) = &s.via.kind {
        attributes.push(text("gen_ai.provider.name", kind.as_str().to_owned()));
    }
    if let Some(p) = &s.via.provider {
        attributes.push(KeyValue::new("meridian.provider", Arc::clone(p)));
    }
    if let Some(m) = &s.via.upstream_model {
        attributes.push(KeyValue::new("gen_ai.response.model", Arc::clone(m)));
    }
    if let Some(t) = &s.tenant {
        attributes.push(KeyValue::new("meridian.tenant", Arc::clone(t)));
    }
    if let Some(f) = &s.feature {
        attributes.push(text("meridian.feature", f.clone()));
    }
    if let Some(t) = tokens {
        attributes.push(KeyValue::new("gen_ai.usage.input_tokens", t.input as i64));
        attributes.push(KeyValue::new("gen_ai.usage.output_tokens", t.output as i64));
        attributes.push(KeyValue::new(
            "gen_ai.usage.cache_read.input_tokens",
            t.cached_input as i64,
        ));
    }
    if let Some(first) = first_token {
        attributes.push(KeyValue::new(
            "gen_ai.response.time_to_first_chunk",
            first.as_secs_f64(),
        ));
    }
    if !s.finish_reasons.is_empty() {
        let reasons = s.finish_reasons.iter().cloned().map(Into::into).collect();
        attributes.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(opentelemetry::Array::String(reasons)),
        ));
    }
    if let Ending::Failed(e) = ending {
        attributes.push(text("error.type", code.to_owned()));
        span.set_status(Status::error(e.message.clone()));
    }
    span.set_attributes(attributes);
    span.end();
}

impl Gateway {
    /// The prompt tokens of `request` as admission counts them (with the model's tokenizer),
    /// for a caller let in: Anthropic's `count_tokens`. No provider is asked, nothing charged.
    pub fn count_tokens(
        &self,
        credentials: Credentials<'_>,
        request: Result<ChatRequest, ApiError>,
    ) -> Result<u64, ApiError> {
        self.authenticate(credentials)?;
        let request = request?;
        Ok(self.prompt_estimate(&request))
    }

    /// Serves one inference request from start to end (see the module's steps).
    pub async fn serve(&self, call: Call<'_>) -> Served {
        let request_id = call.request_id.clone();
        let mut extras = Extras {
            summary: Summary::new(
                call.request_id.clone(),
                call.edge,
                call.api,
                self.unknown_model(),
                self.recorder().clock.now_ms(),
            ),
            rate_limits: Vec::new(),
            cache: None,
            usage: None,
            wants_cost: false,
            native: false,
        };
        if self.traces() {
            extras.summary.span = Some(trace::server_span(call.trace, call.api.operation()));
        }
        let reached = self.run(call, &mut extras).await;
        let mut cost_micro_usd = None;
        let (recorder, summary) = (self.recorder(), &mut extras.summary);
        let answer = match reached {
            // The stream records itself, at its end.
            Ok(Reached::Stream(relay, cache_key)) => Ok(Answer::Stream(ServedStream {
                relay,
                recorder: Arc::clone(recorder),
                summary: extras.summary,
                first_chunk: None,
                recorded: false,
                cache: cache_key.map(|key| (key, self.clone(), StreamCollector::default())),
                cut: CutSignal {
                    rx: self.streams_cut(),
                    wait: None,
                },
            })),
            Ok(Reached::Complete(body)) => {
                if summary.recorded() {
                    finish_reasons(&body, &mut summary.finish_reasons);
                }
                let cost = record(recorder, summary, Ending::Complete, extras.usage, None);
                cost_micro_usd = Some(cost);
                Ok(Answer::Complete(body))
            }
            Ok(Reached::Cached(hit)) => {
                cost_micro_usd = Some(record(recorder, summary, Ending::Cached, None, None));
                Ok(Answer::Cached(hit))
            }
            Err(e) => {
                record(recorder, summary, Ending::Failed(&e), None, None);
                Err(e)
            }
        };
        Served {
            request_id,
            answer,
            rate_limits: extras.rate_limits,
            cache: extras.cache,
            cost_micro_usd: cost_micro_usd.filter(|_| extras.wants_cost),
            native: extras.native,
        }
    }

    async fn run(&self, call: Call<'_>, served: &mut Extras) -> Result<Reached, ApiError> {
        let principal = self.authenticate(call.credentials)?;
        let summary = &mut served.summary;
        if let Some(p) = &principal {
            summary.tenant = Some(Arc::clone(&p.tenant));
            summary.key_id = p.key_id.clone();
            summary.user = p.user.clone();
        }
        let options = call.options?;
        served.wants_cost = options.cost;
        let mut request = call.request.read().await?;
        summary.model = self.model_label(request.model());
        if &*summary.model != request.model() {
            summary.asked = Some(request.model().into());
        }
        if summary.user.is_none() {
            summary.user = request.params.user.as_deref().map(Arc::from);
        }
        summary.stream = request.stream();
        self.check_engine_fields(principal.as_ref(), &request)?;
        let cache_key = self.cache_key(
            principal.as_ref(),
            &request,
            options.cache,
            options.complexity,
        );
        let hit = cache_key.and_then(|key| self.cache_get(key));
        if hit.is_some() {
            // A hit needs no provider, but the tenant must still be allowed the model here,
            // and it counts against its request limits (admitted as a request, no tokens).
            self.may_serve_cached(
                principal.as_ref(),
                &request,
                options.complexity,
                &call.request_id,
            )?;
        }
        let admitted = self
            .admit(
                principal.as_ref(),
                &request,
                options.feature.as_deref(),
                hit.is_some(),
            )
            .await;
        self.metrics().quota_decision(&admitted);
        let mut reservation = admitted?;
        summary.feature = options.feature;
        if let Some(r) = &mut reservation {
            served.rate_limits = std::mem::take(&mut r.rate_limits);
            summary.prompt_estimate = r.prompt_estimate();
            // Reserved for a default output: the engine is told so, and cannot generate (or be
            // asked, with `ignore_eos`, to go on) beyond what the limits were charged for.
            if r.limits_output() {
                request.cap_output(self.default_max_tokens_of(request.model()));
            }
        }
        if let Some(completion) = hit {
            // Dropped unsettled: the request stays counted, there were no tokens to give back.
            drop(reservation);
            served.cache = Some(CacheOutcome::Hit);
            return Ok(Reached::Cached(CacheHit {
                completion,
                stream: request.stream(),
                include_usage: request.include_usage(),
            }));
        }
        if cache_key.is_some() {
            served.cache = Some(CacheOutcome::Miss);
        }
        summary.price = self.price_of(request.model());
        let ctx = RequestContext {
            request_id: call.request_id,
            principal,
            deadline: options.deadline,
            reservation,
            complexity: options.complexity,
            weight: 1,
            trace: summary.span.as_ref().map(trace::context_of),
        };
        let speaks_native = request.native.is_some();
        let routed = self.chat(request, ctx).await;
        summary.via = routed.via;
        // Only an Anthropic provider (called directly) is sent the client's own request, and
        // what it answers is passed on as it is; it is not cached (the cache keeps chat).
        served.native = speaks_native
            && summary.via.kind == Some(meridian_proto::cluster::ProviderKind::Anthropic);
        let cache_key = cache_key.filter(|_| !served.native);
        match routed.answer? {
            ChatReply::Complete(c) => {
                if let Some(key) = cache_key {
                    self.cache_put(key, c.body.clone());
                }
                served.usage = c.usage;
                Ok(Reached::Complete(c.body))
            }
            // Stored once it has run to its end (see `ServedStream`).
            ChatReply::Stream(relay) => Ok(Reached::Stream(relay, cache_key)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finish_reasons_are_found_in_answers_and_chunks() {
        let mut found = Vec::new();
        let answer = br#"{"choices":[{"index":0,"message":{"content":"say \"finish_reason\": \"fake\""},"finish_reason":"stop"},{"index":1,"finish_reason" : "length"}]}"#;
        super::finish_reasons(answer, &mut found);
        assert_eq!(
            found,
            ["stop", "length"],
            "a quoted key inside content is not one"
        );
        let mut none = Vec::new();
        super::finish_reasons(
            br#"{"choices":[{"delta":{"content":"x"},"finish_reason":null}]}"#,
            &mut none,
        );
        assert!(none.is_empty());
    }
}
