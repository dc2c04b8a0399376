//! The forwarder's side of a call through the actor mesh: a provider only its owner can reach
//! is a [`MeshUpstream`] here, a [`Relay`] to the rest of the node; its calls go to the owner's
//! agent (see [`super::forward`] for the conversation).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use meridian_proto::openai::ChatRequest;
use ractor::rpc::CallResult;
use ractor::{ActorRef, pg};
use tokio::time::Instant;

use meridian_proto::cluster::Reach;

use super::link;
use super::wire::*;
use crate::upstream::{Chunk, ChunkStream, Completion, Phase, Relay, Timeouts, UpstreamError};

// ---------------------------------------------------------------------------------------------
// The forwarder's side.

/// A provider reached through its owner's agent on the actor mesh.
#[derive(Debug, Clone)]
pub struct MeshUpstream {
    node: u64,
    provider: String,
    url: String,
}

impl MeshUpstream {
    /// Provider `provider` of node `node`.
    pub fn new(node: u64, provider: String) -> Self {
        Self {
            node,
            provider,
            url: Reach::Through(node).to_string(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.url
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    fn agent(&self) -> Result<ActorRef<MeshMsg>, UpstreamError> {
        // Any node may put an actor in any group: the agent is the one behind this node's own
        // (certificate-bound) session.
        pg::get_members(&node_group(self.node))
            .into_iter()
            .find(|cell| link::remote_session(cell).and_then(link::session_peer) == Some(self.node))
            .map(ActorRef::from)
            .ok_or_else(|| {
                UpstreamError::Connect(format!(
                    "node {} is not connected on the actor mesh",
                    self.node
                ))
            })
    }

    /// Sends `Call` and reads the answer, within `limit`. The returned guard cancels the call
    /// at the owner when dropped; it is disarmed when the owner has already ended the call. If
    /// this future is dropped or runs out of time, the guard goes with it and cancels.
    async fn open(
        &self,
        req: &ChatRequest,
        model: &str,
        stream: bool,
        limit: Duration,
        phase: Phase,
    ) -> Result<(CancelOnDrop, CallAnswer), UpstreamError> {
        let agent = self.agent()?;
        let call = call_id();
        let bytes = encode(&CallRequest {
            call: call.clone(),
            provider: self.provider.clone(),
            model: model.to_owned(),
            stream,
            wait_ms: limit.as_millis() as u64,
            api: req.api,
            body: &req.body,
            traceparent: crate::trace::outgoing_traceparent(),
        });
        if bytes.len() + ENVELOPE > MAX_FRAME as usize {
            // Retriable: another provider may be reachable directly.
            return Err(UpstreamError::Connect(format!(
                "the request ({} bytes) is too large to forward through the actor mesh (at most {})",
                bytes.len(),
                MAX_FRAME as usize - ENVELOPE
            )));
        }
        FORWARDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut guard = CancelOnDrop {
            agent: agent.clone(),
            call,
            armed: true,
        };
        match agent
            .call(|reply| MeshMsg::Call(bytes, reply), Some(limit))
            .await
        {
            Ok(CallResult::Success(answer)) => {
                let answer: CallAnswer = serde_json::from_slice(&answer).map_err(|e| {
                    UpstreamError::Protocol(format!("node {} answered badly: {e}", self.node))
                })?;
                // Only an opened stream lives on at the owner.
                guard.armed = matches!(answer, CallAnswer::Opened);
                Ok((guard, answer))
            }
            Ok(CallResult::Timeout) => Err(UpstreamError::Timeout(phase)),
            Ok(CallResult::SenderError) => Err(UpstreamError::Closed(format!(
                "node {} dropped the call (its mesh session closed)",
                self.node
            ))),
            Err(e) => Err(UpstreamError::Connect(format!(
                "node {} on the actor mesh: {e}",
                self.node
            ))),
        }
    }

    pub async fn complete(
        &self,
        req: &ChatRequest,
        model: &str,
        timeouts: &Timeouts,
    ) -> Result<Completion, UpstreamError> {
        match self
            .open(req, model, false, timeouts.total, Phase::Total)
            .await?
        {
            (_, CallAnswer::Complete { body, usage }) => Ok(Completion {
                body: Bytes::from(body),
                usage,
            }),
            (_, CallAnswer::Failed { error }) => Err(error.into()),
            // The guard cancels it.
            (_, CallAnswer::Opened) => Err(UpstreamError::Protocol(format!(
                "node {} opened a stream for a whole answer",
                self.node
            ))),
        }
    }

    pub async fn stream(
        &self,
        req: &ChatRequest,
        model: &str,
        timeouts: &Timeouts,
    ) -> Result<ChunkStream, UpstreamError> {
        // The first-byte limit runs from here, across the open and the first pulls.
        let started = Instant::now();
        let guard = match self
            .open(req, model, true, timeouts.first_byte, Phase::FirstByte)
            .await?
        {
            (guard, CallAnswer::Opened) => guard,
            (_, CallAnswer::Failed { error }) => return Err(error.into()),
            (_, CallAnswer::Complete { .. }) => {
                return Err(UpstreamError::Protocol(format!(
                    "node {} answered a stream whole",
                    self.node
                )));
            }
        };
        let pulling = Pulling {
            node: self.node,
            guard,
            buffer: VecDeque::new(),
            finished: false,
            first: true,
            last_event: started,
            first_byte: timeouts.first_byte,
            idle: timeouts.idle,
        };
        Ok(futures::stream::unfold(pulling, |mut p| async move {
            let item = p.next().await?;
            Some((item, p))
        })
        .boxed())
    }
}

/// Calls this node has forwarded to other nodes through the mesh since it started.
pub fn forwarded_total() -> u64 {
    FORWARDED.load(std::sync::atomic::Ordering::Relaxed)
}

static FORWARDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn call_id() -> String {
    let mut id = [0u8; 12];
    if getrandom::fill(&mut id).is_err() {
        // Unique within the process is enough then: the owner keys calls per id.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        id[..8].copy_from_slice(&n.to_le_bytes());
        id[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cancels the call at its owner unless the owner already ended it.
struct CancelOnDrop {
    agent: ActorRef<MeshMsg>,
    call: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self
                .agent
                .cast(MeshMsg::Cancel(std::mem::take(&mut self.call)));
        }
    }
}

/// A forwarded stream, pulled from its owner.
struct Pulling {
    node: u64,
    guard: CancelOnDrop,
    buffer: VecDeque<Result<Chunk, UpstreamError>>,
    finished: bool,
    /// No chunk yet (the first-byte limit applies, not the idle one).
    first: bool,
    last_event: Instant,
    first_byte: Duration,
    idle: Duration,
}

impl Pulling {
    /// The owner stopped answering: the stream ends with a retriable error.
    fn lost(&mut self, why: &str) -> Result<Chunk, UpstreamError> {
        self.finished = true;
        Err(UpstreamError::Closed(format!(
            "node {} stopped answering on the actor mesh: {why}",
            self.node
        )))
    }

    async fn next(&mut self) -> Option<Result<Chunk, UpstreamError>> {
        loop {
            if let Some(item) = self.buffer.pop_front() {
                return Some(item);
            }
            if self.finished {
                return None;
            }
            // Pull first: chunks already waiting at the owner count, however long the client
            // took to read the last batch.
            let call = self.guard.call.clone();
            let answer = self
                .guard
                .agent
                .call(|reply| MeshMsg::Pull(call, reply), Some(PULL_WAIT * 10))
                .await;
            let bytes = match answer {
                Ok(CallResult::Success(bytes)) => bytes,
                Ok(CallResult::Timeout) => return Some(self.lost("no answer in time")),
                Ok(CallResult::SenderError) => return Some(self.lost("its mesh session closed")),
                Err(e) => return Some(self.lost(&e.to_string())),
            };
            let pulled: Pulled = match serde_json::from_slice(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    self.finished = true;
                    return Some(Err(UpstreamError::Protocol(format!(
                        "node {} answered a pull badly: {e}",
                        self.node
                    ))));
                }
            };
            if !pulled.chunks.is_empty() {
                self.first = false;
                self.last_event = Instant::now();
            }
            self.buffer.extend(pulled.chunks.into_iter().map(|c| {
                Ok(Chunk {
                    json: Bytes::from(c.json),
                    usage: c.usage,
                    usage_only: c.usage_only,
                    generated: c.generated && !c.usage_only,
                })
            }));
            if let Some(e) = pulled.error {
                self.buffer.push_back(Err(e.into()));
            }
            if pulled.done {
                self.finished = true;
                self.guard.armed = false;
            }
            if self.buffer.is_empty() && !self.finished {
                let (limit, phase) = if self.first {
                    (self.first_byte, Phase::FirstByte)
                } else {
                    (self.idle, Phase::Idle)
                };
                if self.last_event.elapsed() > limit {
                    // The guard cancels the call at the owner when the stream is dropped.
                    self.finished = true;
                    return Some(Err(UpstreamError::Timeout(phase)));
                }
            }
        }
    }
}

impl Relay for MeshUpstream {
    fn base_url(&self) -> &str {
        MeshUpstream::base_url(self)
    }

    fn complete<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
        timeouts: &'a Timeouts,
    ) -> BoxFuture<'a, Result<Completion, UpstreamError>> {
        Box::pin(MeshUpstream::complete(self, req, model, timeouts))
    }

    fn stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
        timeouts: &'a Timeouts,
    ) -> BoxFuture<'a, Result<ChunkStream, UpstreamError>> {
        Box::pin(MeshUpstream::stream(self, req, model, timeouts))
    }
}
