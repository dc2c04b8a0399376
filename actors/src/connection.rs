//! ConnectionActor: one per request, from admission to the last byte.
//!
//! Spawned by [`Gateway::chat`](crate::Gateway::chat) under the
//! [`ConnectionSupervisor`](crate::supervisor::ConnectionSupervisor), which logs a crash but never
//! restarts it (a half-answered request cannot be replayed safely; the client sees an error).
//!
//! It owns the request's lifecycle: it takes a slot at the chosen provider and calls the
//! upstream. A whole answer goes back through the reply. A stream is handed to the edge as a
//! [`RelayStream`] that the response body pulls straight from the upstream connection (chunks
//! never pass through a mailbox or an extra task); the actor keeps the slot, waits for the
//! relay's verdict, and at the total deadline cancels the upstream call itself, which also frees
//! the slot of a client that stopped reading. A client that goes away drops the relay, which
//! drops the upstream call and closes its connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use meridian_policy::cost::{Billable, Rates};
pub use meridian_policy::retry::RetryBudget;
use meridian_proto::openai::{ChatRequest, Usage};
use meridian_proto::{ApiError, ErrorKind, RequestId};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::breaker::Breaker;
use crate::provider::Provider;
use crate::quota::Reservation;
use crate::trace;
use crate::upstream::{Chunk, ChunkStream, Completion, Phase, UpstreamError};

/// Most chunks handed to the client in one piece (one write).
const MAX_BATCH: usize = 64;

/// What the edge hands a request along with its body.
#[derive(Debug)]
pub struct RequestContext {
    pub request_id: RequestId,
    /// Who sent it (`None` when authentication is off).
    pub principal: Option<crate::auth::Principal>,
    /// The client's own deadline, if it gave one.
    pub deadline: Option<Instant>,
    /// Its admission charge ([`crate::Gateway::admit`]), settled with the actual usage when
    /// the request ends.
    pub reservation: Option<Reservation>,
    /// `X-Meridian-Complexity`, for a virtual model such as `auto`.
    pub complexity: Option<meridian_policy::route::Complexity>,
    /// The tenant's share of provider queues (set by the gateway from the tenant's record).
    pub weight: u32,
    /// The request's server span, when traces are on: each attempt is a child of it.
    pub trace: Option<opentelemetry::Context>,
}

/// Where a request went and what it took to get there, handed back with its answer.
#[derive(Debug, Clone, Default)]
pub struct Via {
    /// The provider that answered, or was tried last (`None`: none was tried).
    pub provider: Option<Arc<str>>,
    /// Its name for the model.
    pub upstream_model: Option<Arc<str>>,
    /// Providers tried, the one that answered included.
    pub attempts: u32,
    /// Waiting for a slot at that provider.
    pub queue_wait: Option<Duration>,
    /// When the call to it began.
    pub called_at: Option<Instant>,
    /// Its own price list, if it has one (else the model's applies).
    pub rates: Option<Rates>,
    /// What kind of provider it is.
    pub kind: Option<meridian_proto::cluster::ProviderKind>,
}

/// What a request's actor answers: the reply or the error, and where it went.
#[derive(Debug)]
pub struct Routed {
    pub answer: Result<ChatReply, ApiError>,
    pub via: Via,
}

/// A request's answer, once the upstream has accepted it.
#[derive(Debug)]
pub enum ChatReply {
    Complete(Completion),
    Stream(RelayStream),
}

/// What a [`RelayStream`] yields: the chunks that were ready, then possibly the end.
#[derive(Debug, Default)]
pub struct StreamPiece {
    /// `chat.completion.chunk`s, each single-line JSON, in order.
    pub chunks: Vec<Bytes>,
    /// Set on the last piece; nothing follows it.
    pub end: Option<StreamEnd>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamEnd {
    /// The upstream finished (`[DONE]`).
    Done,
    /// The stream failed after it started.
    Failed(ApiError),
}

/// Where a request goes: the provider and its name for the model.
#[derive(Debug, Clone)]
pub struct Route {
    pub provider: Arc<Provider>,
    pub upstream_model: Arc<str>,
    /// The provider's circuit breaker (`None` without a cluster).
    pub breaker: Option<Arc<Breaker>>,
}

pub struct ConnectionArgs {
    pub request: ChatRequest,
    pub ctx: RequestContext,
    /// The providers to try, best first: a failure before anything reaches the client moves
    /// to the next, within the retry budget and the request's deadline.
    pub routes: Vec<Route>,
    /// Providers of the model left out (open breakers, or outside the tenant's regions): when
    /// every provider tried fails too, the model is unavailable to this request as a whole
    /// (503 with Retry-After), even after a single attempt.
    pub ejected: usize,
    pub retries: Arc<RetryBudget>,
    pub reply: oneshot::Sender<Routed>,
}

/// The ConnectionActor's vocabulary: it is told once to run, and stops itself when done.
#[derive(Debug)]
pub enum ConnectionMsg {
    Run,
}

/// Local only: it carries channels and streams that cannot leave the process.
impl ractor::Message for ConnectionMsg {}

pub struct ConnectionActor;

impl Actor for ConnectionActor {
    type Msg = ConnectionMsg;
    type State = Option<ConnectionArgs>;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConnectionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(ConnectionMsg::Run)?;
        Ok(Some(args))
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        ConnectionMsg::Run: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = state.take() {
            // Boxed: the request's future is several kilobytes, and the actor framework moves
            // its own (which would hold it) when it starts the actor.
            Box::pin(serve(args)).await;
        }
        myself.stop(None);
        Ok(())
    }
}

/// How a request ended, for the provider's counters and the log line.
#[derive(Debug)]
enum Outcome {
    Ok(Option<Usage>),
    /// Failed after this many content chunks (≈ tokens) had been generated.
    Failed(ApiError, u32),
    /// The client went away after this many content chunks.
    ClientGone(u32),
}

type Reply = oneshot::Sender<Routed>;

/// One attempt at one provider.
enum Step {
    /// The client has its answer (or left): this is how the request ended.
    Done(Outcome),
    /// It failed before anything reached the client; the next candidate may be tried.
    Failed(ApiError, Reply),
}

async fn serve(args: ConnectionArgs) {
    let ConnectionArgs {
        request,
        mut ctx,
        routes,
        ejected,
        retries,
        mut reply,
    } = args;
    let mut last: Option<(ApiError, usize)> = None;
    // Whether some attempt's call reached a provider (its prompt is then charged, however
    // the request ends).
    let mut sent = false;
    for (attempt, route) in routes.iter().enumerate() {
        if attempt > 0 {
            let past_deadline = ctx.deadline.is_some_and(|d| d <= Instant::now());
            if past_deadline || !retries.try_retry(Instant::now().into_std()) {
                break;
            }
            tracing::info!(
                request_id = %ctx.request_id,
                provider = %route.provider.spec.id,
                attempt = attempt + 1,
                after = ?last.as_ref().map(|(e, _)| e.code.clone()),
                "falling back to the next provider"
            );
        }
        let mut via = Via {
            provider: Some(Arc::clone(&route.provider.name)),
            upstream_model: Some(Arc::clone(&route.upstream_model)),
            attempts: attempt as u32 + 1,
            rates: route.provider.spec.rates(),
            kind: Some(route.provider.spec.upstream.kind()),
            ..Via::default()
        };
        let traced = ctx.trace.as_ref().map(|cx| {
            trace::client_span(
                cx,
                request.api.operation(),
                &route.provider.name,
                &route.upstream_model,
                attempt as u32 + 1,
            )
        });
        let (mut span, traceparent) = traced.unwrap_or_default();
        let step = trace::TRACEPARENT
            .scope(
                traceparent,
                attempt_at(&request, &ctx, route, reply, &mut via),
            )
            .await;
        if let Some(span) = &mut span {
            use opentelemetry::trace::Span;
            let failed = match &step {
                Step::Failed(e, _) | Step::Done(Outcome::Failed(e, _)) => Some(e),
                _ => None,
            };
            if let Some(e) = failed {
                let kind = e
                    .code
                    .clone()
                    .unwrap_or_else(|| e.kind.openai_type().to_owned());
                span.set_attribute(opentelemetry::KeyValue::new("error.type", kind));
                span.set_status(opentelemetry::trace::Status::error(e.message.clone()));
            }
            span.end();
        }
        sent |= via.called_at.is_some();
        match step {
            Step::Done(outcome) => {
                if let (Some(r), Some(rates)) = (&mut ctx.reservation, via.rates) {
                    r.bill_at(rates);
                }
                finish(&mut ctx, route, outcome, sent);
                return;
            }
            Step::Failed(e, back) => {
                route.provider.record(false);
                if let Some(b) = &route.breaker
                    && provider_failure(&e)
                {
                    b.observe(false, ctx.principal.as_ref().map(|p| &*p.tenant));
                }
                reply = back;
                let retryable = e.retryable();
                last = Some((e, attempt));
                if !retryable {
                    break;
                }
            }
        }
    }
    let Some((e, attempt)) = last else { return };
    let via = Via {
        provider: Some(Arc::clone(&routes[attempt].provider.name)),
        upstream_model: Some(Arc::clone(&routes[attempt].upstream_model)),
        attempts: attempt as u32 + 1,
        ..Via::default()
    };
    let e = if (attempt > 0 || ejected > 0) && e.retryable() {
        // Every candidate failed or is left out: say so, and when to come back.
        let skipped = if ejected > 0 {
            format!(
                " ({ejected} more left out: open circuit breakers or outside the allowed regions)"
            )
        } else {
            String::new()
        };
        ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "all {} providers tried for this model failed{skipped}; the last said: {}",
                attempt + 1,
                e.message
            ),
        )
        .with_code("all_providers_failed")
        .with_retry_after(e.retry_after.unwrap_or(Duration::from_secs(1)))
    } else {
        e
    };
    if let Some(r) = ctx.reservation.take() {
        r.settle_partial(0, sent);
    }
    let _ = reply.send(Routed {
        answer: Err(e),
        via,
    });
}

/// Takes a slot at `route`'s provider and calls it.
async fn attempt_at(
    request: &ChatRequest,
    ctx: &RequestContext,
    route: &Route,
    mut reply: Reply,
    via: &mut Via,
) -> Step {
    let provider = &route.provider;
    let spec = &provider.spec;
    let now = Instant::now();
    let cap = |d| ctx.deadline.map_or(now + d, |c: Instant| c.min(now + d));
    let queue_deadline = cap(spec.queue_timeout);
    let tenant = ctx.principal.as_ref().map(|p| Arc::clone(&p.tenant));
    let permit = tokio::select! {
        p = provider.acquire(queue_deadline, tenant, ctx.weight) => p,
        () = reply.closed() => return Step::Done(Outcome::ClientGone(0)),
    };
    let _permit = match permit {
        Ok(p) => p,
        Err(e) => return Step::Failed(e, reply),
    };
    // The total deadline starts once the call starts, so queueing does not eat into it.
    let started = Instant::now();
    let provider_limit = started + spec.timeouts.total;
    // Whose limit `total` is: a call that runs out of the request's own deadline says nothing
    // about the provider (its breaker does not hear of it, and no other provider is tried).
    let own_deadline = ctx.deadline.is_some_and(|c| c < provider_limit);
    let total = ctx
        .deadline
        .map_or(provider_limit, |c| c.min(provider_limit));
    via.queue_wait = Some(started - now);
    via.called_at = Some(started);
    if request.stream() {
        return stream(request, route, total, own_deadline, reply, via).await;
    }
    // The upstream's future is raced in place, here and for streams below: each move of that
    // large future is a copy, and a shared helper that took it cost about 8,600 instructions
    // per request more (measured with `bench-gateway --instructions`).
    let call = timeout_at(
        total,
        spec.upstream
            .complete(request, &route.upstream_model, &spec.timeouts),
    );
    let result = tokio::select! {
        r = call => r.unwrap_or(Err(UpstreamError::Timeout(Phase::Total))),
        () = reply.closed() => return Step::Done(Outcome::ClientGone(0)),
    };
    match result {
        Ok(c) => {
            if let Some(b) = &route.breaker {
                b.first_byte(started.elapsed());
            }
            let usage = c.usage;
            let _ = reply.send(Routed {
                answer: Ok(ChatReply::Complete(c)),
                via: via.clone(),
            });
            Step::Done(Outcome::Ok(usage))
        }
        Err(e) => Step::Failed(call_error(e, own_deadline, &spec.id), reply),
    }
}

/// A call's error as the client sees it. Running out of the whole call's time is the request's
/// own deadline passing when that was the tighter limit (`own_deadline`: `grpc-timeout`), and
/// then not the provider's failure.
fn call_error(e: UpstreamError, own_deadline: bool, provider: &str) -> ApiError {
    match e {
        UpstreamError::Timeout(Phase::Total) if own_deadline => ApiError::new(
            ErrorKind::Timeout,
            "the request's own deadline passed before the provider finished",
        )
        .with_code("deadline_exceeded")
        .no_retry(),
        e => e.into_api_error(provider),
    }
}

async fn stream(
    request: &ChatRequest,
    route: &Route,
    total: Instant,
    own_deadline: bool,
    mut reply: Reply,
    via: &Via,
) -> Step {
    let spec = &route.provider.spec;
    let timed_out = |e: UpstreamError| call_error(e, own_deadline, &spec.id);
    let started = Instant::now();
    let open = timeout_at(
        total,
        spec.upstream
            .stream(request, &route.upstream_model, &spec.timeouts),
    );
    let opened = tokio::select! {
        r = open => r.unwrap_or(Err(UpstreamError::Timeout(Phase::Total))),
        () = reply.closed() => return Step::Done(Outcome::ClientGone(0)),
    };
    let mut chunks = match opened {
        Ok(s) => s,
        Err(e) => return Step::Failed(timed_out(e), reply),
    };
    // Nothing reaches the client before the upstream's first event: a failure up to here is
    // still a clean status (and, later, a reason to try another provider).
    let first = tokio::select! {
        n = chunks.next() => n,
        () = sleep_until(total) => Some(Err(UpstreamError::Timeout(Phase::Total))),
        () = reply.closed() => return Step::Done(Outcome::ClientGone(0)),
    };
    let first = match first {
        Some(Err(e)) => return Step::Failed(timed_out(e), reply),
        other => other,
    };
    if let Some(b) = &route.breaker {
        b.first_byte(started.elapsed());
    }
    let shared = Arc::new(RelayShared {
        upstream: Mutex::new(UpstreamState::Live(chunks)),
        waker: AtomicWaker::new(),
    });
    let (report, verdict) = oneshot::channel();
    let generated = Arc::new(AtomicU32::new(0));
    let relay = RelayStream {
        shared: Arc::clone(&shared),
        first: Some(first),
        include_usage: request.include_usage(),
        usage: None,
        generated: Arc::clone(&generated),
        provider: Arc::clone(&route.provider.name),
        report: Some(report),
    };
    let routed = Routed {
        answer: Ok(ChatReply::Stream(relay)),
        via: via.clone(),
    };
    if reply.send(routed).is_err() {
        return Step::Done(Outcome::ClientGone(0));
    }
    Step::Done(tokio::select! {
        v = verdict => v.unwrap_or(Outcome::ClientGone(generated.load(Ordering::Relaxed))),
        () = sleep_until(total) => {
            let e = timed_out(UpstreamError::Timeout(Phase::Total));
            shared.cancel(e.clone());
            Outcome::Failed(e, generated.load(Ordering::Relaxed))
        }
    })
}

/// The upstream side of a relay, shared with the ConnectionActor so it can cancel the call.
struct RelayShared {
    upstream: Mutex<UpstreamState>,
    /// The relay's waker, so a cancellation reaches a relay that waits on the upstream.
    waker: AtomicWaker,
}

enum UpstreamState {
    Live(ChunkStream),
    Cancelled(ApiError),
    Finished,
}

impl RelayShared {
    fn cancel(&self, reason: ApiError) {
        let old = std::mem::replace(&mut *self.lock(), UpstreamState::Cancelled(reason));
        drop(old); // closes the upstream connection
        self.waker.wake();
    }

    /// Short, never held across an await: one poll of the upstream, or a cancellation.
    fn lock(&self) -> std::sync::MutexGuard<'_, UpstreamState> {
        self.upstream.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A streaming answer, pulled by the edge straight from the upstream connection. Each poll
/// yields every chunk that is ready (one client write per network read). Dropping it before the
/// end cancels the upstream call.
pub struct RelayStream {
    shared: Arc<RelayShared>,
    /// The upstream's first event, read before the stream was handed over (`None`: it ended).
    first: Option<Option<Result<Chunk, UpstreamError>>>,
    include_usage: bool,
    usage: Option<Usage>,
    /// Content chunks relayed so far (≈ tokens generated), shared with the ConnectionActor.
    generated: Arc<AtomicU32>,
    provider: Arc<str>,
    report: Option<oneshot::Sender<Outcome>>,
}

impl std::fmt::Debug for RelayStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayStream")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl RelayStream {
    /// The usage the provider reported, once its usage chunk has passed.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Content chunks relayed so far (≈ tokens generated).
    pub fn generated(&self) -> u32 {
        self.generated.load(Ordering::Relaxed)
    }

    fn end(&mut self, end: StreamEnd) -> Option<StreamEnd> {
        let outcome = match &end {
            StreamEnd::Done => Outcome::Ok(self.usage),
            StreamEnd::Failed(e) => {
                Outcome::Failed(e.clone(), self.generated.load(Ordering::Relaxed))
            }
        };
        if let Some(report) = self.report.take() {
            let _ = report.send(outcome);
        }
        Some(end)
    }
}

impl Stream for RelayStream {
    type Item = StreamPiece;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamPiece>> {
        let this = &mut *self;
        if this.report.is_none() {
            return Poll::Ready(None);
        }
        let shared = Arc::clone(&this.shared);
        let mut upstream = shared.lock();
        let mut piece = StreamPiece::default();
        while piece.chunks.len() < MAX_BATCH {
            let item = match this.first.take() {
                Some(first) => first,
                None => match &mut *upstream {
                    UpstreamState::Live(chunks) => match chunks.poll_next_unpin(cx) {
                        Poll::Ready(item) => item,
                        Poll::Pending => {
                            this.shared.waker.register(cx.waker());
                            break;
                        }
                    },
                    UpstreamState::Cancelled(e) => {
                        piece.end = this.end(StreamEnd::Failed(e.clone()));
                        break;
                    }
                    UpstreamState::Finished => break,
                },
            };
            match item {
                None => {
                    *upstream = UpstreamState::Finished;
                    piece.end = this.end(StreamEnd::Done);
                    break;
                }
                Some(Err(e)) => {
                    *upstream = UpstreamState::Finished;
                    piece.end = this.end(StreamEnd::Failed(e.into_api_error(&this.provider)));
                    break;
                }
                Some(Ok(chunk)) => {
                    if chunk.usage.is_some() {
                        this.usage = chunk.usage;
                    }
                    if chunk.generated {
                        this.generated.fetch_add(1, Ordering::Relaxed);
                    }
                    if !chunk.usage_only || this.include_usage {
                        piece.chunks.push(chunk.json);
                    }
                }
            }
        }
        if piece.chunks.is_empty() && piece.end.is_none() {
            return Poll::Pending;
        }
        Poll::Ready(Some(piece))
    }
}

impl Drop for RelayStream {
    fn drop(&mut self) {
        if let Some(report) = self.report.take() {
            let _ = report.send(Outcome::ClientGone(self.generated.load(Ordering::Relaxed)));
        }
    }
}

/// What a provider's usage report bills: every kind of token it counts.
pub(crate) fn billable(u: &Usage) -> Billable {
    Billable {
        input: u64::from(u.prompt_tokens),
        cached_input: u64::from(u.cached_tokens()),
        cache_write: u64::from(u.cache_write_tokens),
        output: u64::from(u.completion_tokens),
        reasoning: u64::from(u.reasoning_tokens()),
    }
}

/// Whether a failure says something about the provider (its breaker counts it): not a client
/// mistake, a full local queue or a missed deadline.
fn provider_failure(e: &ApiError) -> bool {
    matches!(
        e.code.as_deref(),
        Some("upstream_error" | "upstream_timeout" | "upstream_overloaded")
    )
}

/// How the request ended: the breaker hears of it, the reservation is settled (a request whose
/// call reached a provider, `sent`, is charged at least its prompt), the provider's counts.
fn finish(ctx: &mut RequestContext, route: &Route, outcome: Outcome, sent: bool) {
    let provider: &Provider = &route.provider;
    let id = &provider.spec.id;
    if let Some(b) = &route.breaker {
        let tenant = ctx.principal.as_ref().map(|p| &*p.tenant);
        match &outcome {
            Outcome::Ok(_) => b.observe(true, tenant),
            Outcome::Failed(e, _) if provider_failure(e) => b.observe(false, tenant),
            Outcome::Failed(..) | Outcome::ClientGone(_) => {}
        }
    }
    if let Some(reservation) = ctx.reservation.take() {
        match &outcome {
            Outcome::Ok(Some(u)) => reservation.settle(&billable(u)),
            // No usage from the upstream: charge the estimate as it stands.
            Outcome::Ok(None) => reservation.keep(),
            // Charged only for what was generated (and the prompt it read).
            Outcome::Failed(_, generated) | Outcome::ClientGone(generated) => {
                reservation.settle_partial(u64::from(*generated), sent);
            }
        }
    }
    match outcome {
        Outcome::Ok(usage) => {
            provider.record(true);
            let u = usage.unwrap_or_default();
            tracing::debug!(
                request_id = %ctx.request_id,
                provider = %id,
                prompt_tokens = u.prompt_tokens,
                completion_tokens = u.completion_tokens,
                cached_tokens = u.cached_tokens(),
                "request completed"
            );
        }
        Outcome::Failed(e, _) => {
            provider.record(false);
            tracing::info!(request_id = %ctx.request_id, provider = %id, error = %e, "request failed");
        }
        Outcome::ClientGone(_) => {
            provider.record(true);
            tracing::debug!(request_id = %ctx.request_id, provider = %id, "client went away; upstream call cancelled");
        }
    }
}
