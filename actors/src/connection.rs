//! ConnectionActor: one per request, from admission to the last byte.
//!
//! Spawned by [`Gateway::chat`](crate::Gateway::chat) under the
//! [`ConnectionSupervisor`](crate::supervisor::ConnectionSupervisor), which logs a crash but never
//! restarts it (a half-answered request cannot be replayed safely; the client sees an error).
//!
//! It owns the client's sink: it takes a slot at the chosen provider, calls the upstream, and
//! pipes chunks straight into a bounded channel that the edge drains into the response. Chunks
//! never pass through a mailbox. When the client goes away (the channel or reply closes), the
//! upstream call is dropped, which closes the upstream connection.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use meridian_proto::openai::{ChatRequest, Usage};
use meridian_proto::{ApiError, ErrorKind, RequestId};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::provider::Provider;
use crate::upstream::{Completion, Phase, UpstreamError};

/// Chunks buffered between the upstream and a slow client before the upstream read pauses.
const CLIENT_BUFFER: usize = 64;

/// What the edge hands a request along with its body.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: RequestId,
    /// The client's own deadline, if it gave one.
    pub deadline: Option<Instant>,
}

/// A request's answer, once the upstream has accepted it.
#[derive(Debug)]
pub enum ChatReply {
    Complete(Completion),
    /// Events until [`ClientEvent::Done`] or [`ClientEvent::Error`]. A channel that closes
    /// without either means the request died; the edge must report it, never end cleanly.
    Stream(mpsc::Receiver<ClientEvent>),
}

#[derive(Debug)]
pub enum ClientEvent {
    /// One `chat.completion.chunk`, single-line JSON.
    Chunk(Bytes),
    /// The stream failed after it started; nothing follows.
    Error(ApiError),
    /// The stream finished normally.
    Done,
}

/// Where a request goes: the provider and its name for the model.
#[derive(Debug, Clone)]
pub struct Route {
    pub provider: Arc<Provider>,
    pub upstream_model: Arc<str>,
}

pub struct ConnectionArgs {
    pub request: ChatRequest,
    pub ctx: RequestContext,
    pub route: Route,
    pub reply: oneshot::Sender<Result<ChatReply, ApiError>>,
}

/// The ConnectionActor's vocabulary: it is told once to run, and stops itself when done.
#[derive(Debug)]
pub enum ConnectionMsg {
    Run,
}

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
            serve(args).await;
        }
        myself.stop(None);
        Ok(())
    }
}

/// How a request ended, for the provider's counters and the log line.
enum Outcome {
    Ok(Option<Usage>),
    Failed(ApiError),
    ClientGone,
}

async fn serve(args: ConnectionArgs) {
    let ConnectionArgs {
        request,
        ctx,
        route,
        mut reply,
    } = args;
    let provider = &route.provider;
    let spec = &provider.spec;
    let now = Instant::now();
    let cap = |d| ctx.deadline.map_or(now + d, |c: Instant| c.min(now + d));
    let queue_deadline = cap(spec.queue_timeout);

    let permit = tokio::select! {
        p = provider.acquire(queue_deadline) => p,
        () = reply.closed() => return,
    };
    let _permit = match permit {
        Ok(p) => p,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    // The total deadline starts once the call starts, so queueing does not eat into it.
    let total = cap(spec.timeouts.total);
    let outcome = if request.stream() {
        stream(&request, &route, total, reply).await
    } else {
        let call = timeout_at(
            total,
            spec.upstream
                .complete(&request, &route.upstream_model, &spec.timeouts),
        );
        let result = tokio::select! {
            r = call => r.unwrap_or(Err(UpstreamError::Timeout(Phase::Total))),
            () = reply.closed() => {
                finish(&ctx, provider, Outcome::ClientGone);
                return;
            }
        };
        match result {
            Ok(c) => {
                let usage = c.usage;
                let _ = reply.send(Ok(ChatReply::Complete(c)));
                Outcome::Ok(usage)
            }
            Err(e) => {
                let e = e.into_api_error(&spec.id);
                let _ = reply.send(Err(e.clone()));
                Outcome::Failed(e)
            }
        }
    };
    finish(&ctx, provider, outcome);
}

async fn stream(
    request: &ChatRequest,
    route: &Route,
    total: Instant,
    mut reply: oneshot::Sender<Result<ChatReply, ApiError>>,
) -> Outcome {
    let spec = &route.provider.spec;
    let open = timeout_at(
        total,
        spec.upstream
            .stream(request, &route.upstream_model, &spec.timeouts),
    );
    let opened = tokio::select! {
        r = open => r.unwrap_or(Err(UpstreamError::Timeout(Phase::Total))),
        () = reply.closed() => return Outcome::ClientGone,
    };
    let mut chunks = match opened {
        Ok(s) => s,
        Err(e) => {
            let e = e.into_api_error(&spec.id);
            let _ = reply.send(Err(e.clone()));
            return Outcome::Failed(e);
        }
    };
    // Nothing reaches the client before the upstream's first event: a failure up to here is
    // still a clean status (and, later, a reason to try another provider).
    let first = tokio::select! {
        n = chunks.next() => n,
        () = sleep_until(total) => Some(Err(UpstreamError::Timeout(Phase::Total))),
        () = reply.closed() => return Outcome::ClientGone,
    };
    if let Some(Err(e)) = first {
        let e = e.into_api_error(&spec.id);
        let _ = reply.send(Err(e.clone()));
        return Outcome::Failed(e);
    }
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    if reply.send(Ok(ChatReply::Stream(rx))).is_err() {
        return Outcome::ClientGone;
    }
    let include_usage = request.include_usage();
    let mut usage = None;
    let mut pending = Some(first);
    loop {
        let next = match pending.take() {
            Some(first) => first,
            None => tokio::select! {
                n = chunks.next() => n,
                () = sleep_until(total) => Some(Err(UpstreamError::Timeout(Phase::Total))),
                () = tx.closed() => return Outcome::ClientGone,
            },
        };
        let event = match next {
            None => {
                let _ = timeout_at(total, tx.send(ClientEvent::Done)).await;
                return Outcome::Ok(usage);
            }
            Some(Err(e)) => {
                let e = e.into_api_error(&spec.id);
                let _ = timeout_at(total, tx.send(ClientEvent::Error(e.clone()))).await;
                return Outcome::Failed(e);
            }
            Some(Ok(chunk)) => {
                if chunk.usage.is_some() {
                    usage = chunk.usage;
                }
                if chunk.usage_only && !include_usage {
                    continue;
                }
                ClientEvent::Chunk(chunk.json)
            }
        };
        match timeout_at(total, tx.send(event)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Outcome::ClientGone,
            // The client reads too slowly to finish within the deadline.
            Err(_) => {
                return Outcome::Failed(ApiError::new(
                    ErrorKind::Timeout,
                    "the client did not read the stream before the deadline",
                ));
            }
        }
    }
}

fn finish(ctx: &RequestContext, provider: &Provider, outcome: Outcome) {
    let id = &provider.spec.id;
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
        Outcome::Failed(e) => {
            provider.record(false);
            tracing::info!(request_id = %ctx.request_id, provider = %id, error = %e, "request failed");
        }
        Outcome::ClientGone => {
            provider.record(true);
            tracing::debug!(request_id = %ctx.request_id, provider = %id, "client went away; upstream call cancelled");
        }
    }
}
