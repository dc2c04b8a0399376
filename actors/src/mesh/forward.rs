//! Calls forwarded through the actor mesh. A replica that only its own node can reach (it
//! listens on that node's loopback or private network) is registered as `mesh://node-<id>`;
//! other nodes route to it like any provider, and their calls go to the owner's
//! [`MeshAgent`](super::MeshAgent), which makes them at its local provider.
//!
//! The conversation, all of it messages to the owner's agent:
//! - `Call` opens a call at one of the owner's providers. The owner takes a slot there (its queue
//!   and concurrency limit count forwarded calls like its own) and calls the upstream. A whole
//!   answer comes back in the reply; a stream is kept at the owner under the call's id, and the
//!   reply only says it opened.
//! - `Pull` long-polls a stream: the reply carries the chunks that arrived since the last pull
//!   (waiting up to [`PULL_WAIT`] for the first one), and whether and how the stream ended.
//! - `Cancel` drops a call: the client went away or the forwarder gave up. Dropping closes the
//!   upstream connection and frees the slot.
//!
//! A stream nobody pulls for [`LEASE`] is dropped the same way, so a forwarder that dies frees
//! what it held. Chunks cross the mesh in batches, one message per pull rather than per token, and
//! pulling gives back-pressure: the owner buffers at most [`BUFFER`] chunks per stream.
//!
//! Quotas, breakers and fallbacks are the forwarder's business, as for any provider: the owner
//! only makes the call. What is not carried: the tenant, so the owner's queue treats forwarded
//! calls as one anonymous tenant of weight 1 for its fair share.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt;
use meridian_proto::ApiError;
use meridian_proto::openai::{ChatCompletionRequest, ChatRequest, UpstreamErrorInfo, Usage};
use ractor::rpc::CallResult;
use ractor::{ActorRef, pg};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::{Instant, timeout, timeout_at};

use super::{MAX_FRAME, MeshMsg};
use crate::gateway::Gateway;
use crate::upstream::{Chunk, ChunkStream, Completion, Phase, Timeouts, Upstream, UpstreamError};

/// How long the owner holds a pull open waiting for the stream's next chunk.
pub const PULL_WAIT: Duration = Duration::from_millis(500);
/// A stream not pulled for this long is dropped at the owner.
pub const LEASE: Duration = Duration::from_secs(30);
/// Chunks the owner buffers per stream before the upstream waits for a pull.
pub const BUFFER: usize = 64;
/// Chunk bytes one pull answer carries at most (more wait for the next pull).
const BATCH_BYTES: usize = 256 * 1024;
/// Room left in a frame for the envelope around a request or an answer.
const ENVELOPE: usize = 16 * 1024;

/// The process group of node `id`'s agent alone.
pub fn node_group(id: u64) -> String {
    format!("meridian.node.{id}")
}

/// The registry address of a provider reached through node `id`.
pub fn mesh_url(id: u64) -> String {
    format!("mesh://node-{id}")
}

/// The node a `mesh://node-<id>` address names.
pub fn mesh_node(url: &str) -> Option<u64> {
    url.strip_prefix("mesh://node-")?.parse().ok()
}

#[derive(Serialize, Deserialize)]
struct CallRequest<B> {
    /// Chosen by the forwarder; names the call in `Pull` and `Cancel`.
    call: String,
    provider: String,
    /// The upstream's name for the model.
    model: String,
    stream: bool,
    /// How long the forwarder waits for the call to open (queueing at the owner included).
    wait_ms: u64,
    /// The client's request as the forwarder validated it.
    body: B,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum CallAnswer {
    Complete { body: String, usage: Option<Usage> },
    Opened,
    Failed { error: WireError },
}

#[derive(Default, Serialize, Deserialize)]
struct Pulled {
    chunks: Vec<WireChunk>,
    /// No more chunks will come (after `error`, if any).
    done: bool,
    error: Option<WireError>,
}

#[derive(Serialize, Deserialize)]
struct WireChunk {
    json: String,
    usage: Option<Usage>,
    usage_only: bool,
}

/// An [`UpstreamError`] as it crosses the mesh.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
enum WireError {
    Connect {
        message: String,
    },
    Timeout {
        phase: WirePhase,
    },
    Status {
        status: u16,
        message: String,
        r#type: Option<String>,
        code: Option<String>,
        retry_after_ms: Option<u64>,
    },
    InStream {
        message: String,
        r#type: Option<String>,
        code: Option<String>,
    },
    Closed {
        message: String,
    },
    Protocol {
        message: String,
    },
    Rejected {
        kind: meridian_proto::ErrorKind,
        message: String,
        param: Option<String>,
        code: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WirePhase {
    Connect,
    FirstByte,
    Idle,
    Total,
}

impl From<UpstreamError> for WireError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Connect(message) => Self::Connect { message },
            UpstreamError::Timeout(phase) => Self::Timeout {
                phase: match phase {
                    Phase::Connect => WirePhase::Connect,
                    Phase::FirstByte => WirePhase::FirstByte,
                    Phase::Idle => WirePhase::Idle,
                    Phase::Total => WirePhase::Total,
                },
            },
            UpstreamError::Status {
                status,
                info,
                retry_after,
            } => Self::Status {
                status,
                message: info.message,
                r#type: info.r#type,
                code: info.code,
                retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
            },
            UpstreamError::InStream(info) => Self::InStream {
                message: info.message,
                r#type: info.r#type,
                code: info.code,
            },
            UpstreamError::Closed(message) => Self::Closed { message },
            UpstreamError::Protocol(message) => Self::Protocol { message },
            UpstreamError::Rejected(e) => Self::Rejected {
                kind: e.kind,
                message: e.message,
                param: e.param,
                code: e.code,
            },
        }
    }
}

impl From<WireError> for UpstreamError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Connect { message } => Self::Connect(message),
            WireError::Timeout { phase } => Self::Timeout(match phase {
                WirePhase::Connect => Phase::Connect,
                WirePhase::FirstByte => Phase::FirstByte,
                WirePhase::Idle => Phase::Idle,
                WirePhase::Total => Phase::Total,
            }),
            WireError::Status {
                status,
                message,
                r#type,
                code,
                retry_after_ms,
            } => Self::Status {
                status,
                info: UpstreamErrorInfo {
                    message,
                    r#type,
                    code,
                },
                retry_after: retry_after_ms.map(Duration::from_millis),
            },
            WireError::InStream {
                message,
                r#type,
                code,
            } => Self::InStream(UpstreamErrorInfo {
                message,
                r#type,
                code,
            }),
            WireError::Closed { message } => Self::Closed(message),
            WireError::Protocol { message } => Self::Protocol(message),
            WireError::Rejected {
                kind,
                message,
                param,
                code,
            } => {
                let mut e = ApiError::new(kind, message);
                e.param = param;
                e.code = code;
                Self::Rejected(e)
            }
        }
    }
}

/// The owner refused to start the call (queue full, deadline unreachable, provider gone): as
/// an upstream status, so that the forwarder retries elsewhere when the refusal allows it.
fn refusal(e: ApiError) -> WireError {
    use meridian_proto::ErrorKind as K;
    let status = match e.kind {
        K::RateLimited => 429,
        K::Unavailable => 503,
        K::Timeout => 504,
        K::Upstream => 502,
        _ => {
            return WireError::Rejected {
                kind: e.kind,
                message: e.message,
                param: e.param,
                code: e.code,
            };
        }
    };
    WireError::Status {
        status,
        message: e.message,
        r#type: Some(e.kind.openai_type().into()),
        code: e.code,
        retry_after_ms: e.retry_after.map(|d| d.as_millis() as u64),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The owner's side.

/// Calls this node makes for other nodes, and the streams they are pulling.
pub(crate) struct Served {
    gateway: Gateway,
    streams: DashMap<String, Arc<OpenStream>>,
    /// Calls cancelled before they opened (the forwarder gave up while this node queued them):
    /// they are dropped when they do open.
    cancelled: DashMap<String, Instant>,
}

struct OpenStream {
    chunks: tokio::sync::Mutex<mpsc::Receiver<Result<Chunk, UpstreamError>>>,
    last_pull: Mutex<Instant>,
    pump: AbortHandle,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        // Dropping the upstream stream closes its connection; the slot goes with it.
        self.pump.abort();
    }
}

fn touch(open: &OpenStream) {
    *open.last_pull.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
}

impl Served {
    pub(crate) fn new(gateway: Gateway) -> Arc<Self> {
        let served = Arc::new(Self {
            gateway,
            streams: DashMap::new(),
            cancelled: DashMap::new(),
        });
        tokio::spawn(expire(Arc::downgrade(&served)));
        served
    }

    /// Answers a `Call` (a JSON [`CallRequest`]) with a JSON [`CallAnswer`].
    pub(crate) async fn call(&self, bytes: &[u8]) -> Vec<u8> {
        let answer = match serde_json::from_slice::<CallRequest<Map<String, Value>>>(bytes) {
            Ok(req) => self.open(req).await,
            Err(e) => CallAnswer::Failed {
                error: WireError::Protocol {
                    message: format!("a forwarded call this node cannot read: {e}"),
                },
            },
        };
        encode(&answer)
    }

    async fn open(&self, req: CallRequest<Map<String, Value>>) -> CallAnswer {
        SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let failed = |error: WireError| CallAnswer::Failed { error };
        let provider = match self.gateway.provider_by_id(&req.provider) {
            // Never forward again: a provider this node reaches through the mesh is not ours.
            Some(p) if !matches!(p.spec.upstream, Upstream::Mesh(_)) => p,
            _ => {
                return failed(WireError::Connect {
                    message: format!("provider {} is not served by this node", req.provider),
                });
            }
        };
        // The forwarder validated the request; only the typed view is rebuilt here.
        let params: ChatCompletionRequest =
            match serde_json::from_value(Value::Object(req.body.clone())) {
                Ok(p) => p,
                Err(e) => {
                    return failed(WireError::Protocol {
                        message: format!("a forwarded request this node cannot read: {e}"),
                    });
                }
            };
        let request = ChatRequest {
            params,
            body: req.body,
        };
        let spec = &provider.spec;
        let wait = spec.queue_timeout.min(Duration::from_millis(req.wait_ms));
        let permit = match provider.acquire(Instant::now() + wait, None, 1).await {
            Ok(p) => p,
            Err(e) => return failed(refusal(e)),
        };
        let total = Instant::now() + spec.timeouts.total;
        if !req.stream {
            let result = timeout_at(
                total,
                spec.upstream.complete(&request, &req.model, &spec.timeouts),
            )
            .await
            .unwrap_or(Err(UpstreamError::Timeout(Phase::Total)));
            drop(permit);
            provider.record(result.is_ok());
            return match result {
                Ok(c) if c.body.len() + ENVELOPE > MAX_FRAME as usize => {
                    failed(WireError::Protocol {
                        message: format!(
                            "the answer ({} bytes) is larger than the actor mesh carries",
                            c.body.len()
                        ),
                    })
                }
                Ok(c) => CallAnswer::Complete {
                    body: String::from_utf8_lossy(&c.body).into_owned(),
                    usage: c.usage,
                },
                Err(e) => failed(e.into()),
            };
        }
        let opened = timeout_at(
            total,
            spec.upstream.stream(&request, &req.model, &spec.timeouts),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout(Phase::Total)));
        let mut upstream = match opened {
            Ok(s) => s,
            Err(e) => {
                provider.record(false);
                return failed(e.into());
            }
        };
        if self.cancelled.remove(&req.call).is_some() {
            return failed(WireError::Closed {
                message: "cancelled by the forwarder".into(),
            });
        }
        let (tx, rx) = mpsc::channel(BUFFER);
        let counted = Arc::clone(&provider);
        let pump = tokio::spawn(async move {
            let _permit = permit;
            let mut ok = true;
            loop {
                let next = timeout_at(total, upstream.next())
                    .await
                    .unwrap_or(Some(Err(UpstreamError::Timeout(Phase::Total))));
                let Some(item) = next else { break };
                let failed = item.is_err();
                ok &= !failed;
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
            counted.record(ok);
        });
        self.streams.insert(
            req.call,
            Arc::new(OpenStream {
                chunks: tokio::sync::Mutex::new(rx),
                last_pull: Mutex::new(Instant::now()),
                pump: pump.abort_handle(),
            }),
        );
        CallAnswer::Opened
    }

    /// Answers a `Pull` of stream `call` with a JSON [`Pulled`].
    pub(crate) async fn pull(&self, call: &str) -> Vec<u8> {
        let Some(open) = self.streams.get(call).map(|e| Arc::clone(e.value())) else {
            return encode(&Pulled {
                chunks: Vec::new(),
                done: true,
                error: Some(WireError::Closed {
                    message: "the forwarded stream is gone (cancelled, or not pulled in time)"
                        .into(),
                }),
            });
        };
        touch(&open);
        let mut out = Pulled::default();
        {
            let mut chunks = open.chunks.lock().await;
            let mut bytes = 0;
            let mut next = match timeout(PULL_WAIT, chunks.recv()).await {
                Ok(item) => item,
                Err(_) => return encode(&out),
            };
            loop {
                match next {
                    None => out.done = true,
                    Some(Ok(chunk)) => {
                        bytes += chunk.json.len();
                        out.chunks.push(WireChunk {
                            json: String::from_utf8_lossy(&chunk.json).into_owned(),
                            usage: chunk.usage,
                            usage_only: chunk.usage_only,
                        });
                    }
                    Some(Err(e)) => {
                        out.error = Some(e.into());
                        out.done = true;
                    }
                }
                if out.done || bytes >= BATCH_BYTES {
                    break;
                }
                next = match chunks.try_recv() {
                    Ok(item) => Some(item),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
            }
        }
        touch(&open);
        if out.done {
            self.streams.remove(call);
        }
        encode(&out)
    }

    /// Drops call `call`, open or not yet.
    pub(crate) fn cancel(&self, call: &str) {
        if self.streams.remove(call).is_none() {
            self.cancelled.insert(call.to_owned(), Instant::now());
        }
    }

    /// Drops every forwarded stream (the node is leaving the mesh).
    pub(crate) fn close_all(&self) {
        self.streams.clear();
    }

    /// Forwarded streams open now.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }
}

/// Drops streams nobody pulls any more, and forgets old cancellations.
async fn expire(served: Weak<Served>) {
    let mut tick = tokio::time::interval(LEASE / 6);
    loop {
        tick.tick().await;
        let Some(served) = served.upgrade() else {
            return;
        };
        let now = Instant::now();
        served.streams.retain(|call, open| {
            let idle =
                now.duration_since(*open.last_pull.lock().unwrap_or_else(|e| e.into_inner()));
            if idle > LEASE {
                tracing::info!(%call, "mesh: dropping a forwarded stream nobody pulls");
            }
            idle <= LEASE
        });
        served
            .cancelled
            .retain(|_, at| now.duration_since(*at) <= LEASE * 2);
    }
}

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
            url: mesh_url(node),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.url
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    fn agent(&self) -> Result<ActorRef<MeshMsg>, UpstreamError> {
        pg::get_members(&node_group(self.node))
            .into_iter()
            .find(|cell| !cell.get_id().is_local())
            .map(ActorRef::from)
            .ok_or_else(|| {
                UpstreamError::Connect(format!(
                    "node {} is not connected on the actor mesh",
                    self.node
                ))
            })
    }

    /// Sends `Call` and reads the answer, within `limit` (cancelling the call past it).
    async fn open(
        &self,
        req: &ChatRequest,
        model: &str,
        stream: bool,
        limit: Duration,
        phase: Phase,
    ) -> Result<(ActorRef<MeshMsg>, String, CallAnswer), UpstreamError> {
        let agent = self.agent()?;
        let call = call_id();
        let bytes = encode(&CallRequest {
            call: call.clone(),
            provider: self.provider.clone(),
            model: model.to_owned(),
            stream,
            wait_ms: limit.as_millis() as u64,
            body: &req.body,
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
        match agent
            .call(|reply| MeshMsg::Call(bytes, reply), Some(limit))
            .await
        {
            Ok(CallResult::Success(answer)) => {
                let answer = serde_json::from_slice(&answer).map_err(|e| {
                    UpstreamError::Protocol(format!("node {} answered badly: {e}", self.node))
                })?;
                Ok((agent, call, answer))
            }
            Ok(CallResult::Timeout) => {
                let _ = agent.cast(MeshMsg::Cancel(call));
                Err(UpstreamError::Timeout(phase))
            }
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
            (_, _, CallAnswer::Complete { body, usage }) => Ok(Completion {
                body: Bytes::from(body),
                usage,
            }),
            (_, _, CallAnswer::Failed { error }) => Err(error.into()),
            (agent, call, CallAnswer::Opened) => {
                let _ = agent.cast(MeshMsg::Cancel(call));
                Err(UpstreamError::Protocol(format!(
                    "node {} opened a stream for a whole answer",
                    self.node
                )))
            }
        }
    }

    pub async fn stream(
        &self,
        req: &ChatRequest,
        model: &str,
        timeouts: &Timeouts,
    ) -> Result<ChunkStream, UpstreamError> {
        let (agent, call) = match self
            .open(req, model, true, timeouts.first_byte, Phase::FirstByte)
            .await?
        {
            (agent, call, CallAnswer::Opened) => (agent, call),
            (_, _, CallAnswer::Failed { error }) => return Err(error.into()),
            (_, _, CallAnswer::Complete { .. }) => {
                return Err(UpstreamError::Protocol(format!(
                    "node {} answered a stream whole",
                    self.node
                )));
            }
        };
        let pulling = Pulling {
            node: self.node,
            guard: CancelOnDrop {
                agent,
                call,
                armed: true,
            },
            buffer: VecDeque::new(),
            finished: false,
            first: true,
            last_event: Instant::now(),
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

/// Calls other nodes have forwarded to this node since it started.
pub fn served_total() -> u64 {
    SERVED.load(std::sync::atomic::Ordering::Relaxed)
}

static FORWARDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
                })
            }));
            if let Some(e) = pulled.error {
                self.buffer.push_back(Err(e.into()));
            }
            if pulled.done {
                self.finished = true;
                self.guard.armed = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::GatewayConfig;
    use crate::provider::{ModelRoute, ProviderSpec};
    use crate::upstream::DemoModel;
    use meridian_proto::ErrorKind;
    use meridian_proto::openai::RequestLimits;

    #[test]
    fn mesh_addresses_name_their_node() {
        assert_eq!(mesh_node(&mesh_url(7)), Some(7));
        assert_eq!(mesh_node("mesh://node-x"), None);
        assert_eq!(mesh_node("http://10.0.0.1:8100/v1"), None);
    }

    #[test]
    fn errors_cross_the_mesh_unchanged() {
        let info = UpstreamErrorInfo {
            message: "busy".into(),
            r#type: Some("overloaded_error".into()),
            code: Some("x".into()),
        };
        let mut rejected = ApiError::new(ErrorKind::InvalidRequest, "bad n");
        rejected.param = Some("n".into());
        rejected.code = Some("invalid_n".into());
        for e in [
            UpstreamError::Connect("refused".into()),
            UpstreamError::Timeout(Phase::Idle),
            UpstreamError::Status {
                status: 529,
                info: info.clone(),
                retry_after: Some(Duration::from_millis(1500)),
            },
            UpstreamError::InStream(info),
            UpstreamError::Closed("eof".into()),
            UpstreamError::Protocol("junk".into()),
            UpstreamError::Rejected(rejected),
        ] {
            let wire = serde_json::to_vec(&WireError::from(e.clone())).unwrap();
            let back = UpstreamError::from(serde_json::from_slice::<WireError>(&wire).unwrap());
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
            assert_eq!(back.retryable(), e.retryable());
        }
    }

    #[test]
    fn a_refusal_at_the_owner_is_retriable_where_the_refusal_is() {
        let full = ApiError::new(ErrorKind::Unavailable, "queue full")
            .with_code("queue_full")
            .with_retry_after(Duration::from_secs(2));
        let e = UpstreamError::from(refusal(full));
        assert!(e.retryable());
        assert!(matches!(
            e,
            UpstreamError::Status { status: 503, retry_after: Some(d), .. } if d == Duration::from_secs(2)
        ));
        let bad = UpstreamError::from(refusal(ApiError::new(ErrorKind::InvalidRequest, "no")));
        assert!(!bad.retryable());
    }

    fn demo(max_concurrency: u32) -> ProviderSpec {
        ProviderSpec {
            id: "1/demo-0".into(),
            region: "local".into(),
            models: vec![ModelRoute {
                name: "demo".into(),
                upstream_name: "demo".into(),
            }],
            upstream: Upstream::Demo(DemoModel {
                word_delay: Duration::from_millis(2),
            }),
            max_concurrency,
            queue_capacity: 4,
            queue_timeout: Duration::from_secs(5),
            timeouts: Timeouts::default(),
            tokenizer: Default::default(),
            prefix_affinity: false,
            weight: 1,
            price: Default::default(),
        }
    }

    fn request(call: &str, stream: bool, wait_ms: u64) -> Vec<u8> {
        let body = serde_json::json!({
            "model": "demo",
            "stream": stream,
            "messages": [{"role": "user", "content": "one two three four five"}],
        });
        encode(&CallRequest {
            call: call.to_owned(),
            provider: "1/demo-0".to_owned(),
            model: "demo".to_owned(),
            stream,
            wait_ms,
            body,
        })
    }

    fn answer(bytes: &[u8]) -> CallAnswer {
        serde_json::from_slice(bytes).unwrap()
    }

    async fn pull(served: &Served, call: &str) -> Pulled {
        serde_json::from_slice(&served.pull(call).await).unwrap()
    }

    /// What the demo model streams for the test request, called directly.
    async fn direct_chunks(gateway: &Gateway) -> Vec<String> {
        let provider = gateway.provider_by_id("1/demo-0").unwrap();
        let req = ChatRequest::from_json(
            &serde_json::to_vec(&serde_json::json!({
                "model": "demo",
                "stream": true,
                "messages": [{"role": "user", "content": "one two three four five"}],
            }))
            .unwrap(),
            &RequestLimits::default(),
        )
        .unwrap();
        let stream = provider
            .spec
            .upstream
            .stream(&req, "demo", &Timeouts::default())
            .await
            .unwrap();
        stream
            .map(|c| String::from_utf8(c.unwrap().json.to_vec()).unwrap())
            .collect()
            .await
    }

    #[tokio::test]
    async fn the_owner_streams_a_forwarded_call_in_pulls_and_frees_its_slot() {
        let gateway = Gateway::start(GatewayConfig::standalone(vec![demo(1)]))
            .await
            .unwrap();
        let served = Served::new(gateway.clone());
        let provider = gateway.provider_by_id("1/demo-0").unwrap();

        // A whole answer comes back in the reply.
        match answer(&served.call(&request("w", false, 1000)).await) {
            CallAnswer::Complete { body, usage } => {
                assert!(body.contains("chat.completion"), "{body}");
                assert!(usage.is_some_and(|u| u.completion_tokens > 0));
            }
            _ => panic!("expected a whole answer"),
        }

        // A stream: pulled until done, the same chunks as a direct call, in order.
        assert!(matches!(
            answer(&served.call(&request("s", true, 1000)).await),
            CallAnswer::Opened
        ));
        assert_eq!(provider.in_flight(), 1, "the forwarded call holds a slot");
        let mut chunks = Vec::new();
        loop {
            let p = pull(&served, "s").await;
            assert!(p.error.is_none());
            chunks.extend(p.chunks.into_iter().map(|c| c.json));
            if p.done {
                break;
            }
        }
        // Equal but for the per-call id.
        let without_id = |chunks: Vec<String>| -> Vec<Value> {
            chunks
                .iter()
                .map(|c| {
                    let mut v: Value = serde_json::from_str(c).unwrap();
                    v.as_object_mut().unwrap().remove("id");
                    v.as_object_mut().unwrap().remove("created");
                    v
                })
                .collect()
        };
        let direct = direct_chunks(&gateway).await;
        assert!(direct.len() > 10);
        assert_eq!(without_id(chunks), without_id(direct));
        assert_eq!(served.open_streams(), 0);
        assert_eq!(provider.in_flight(), 0);
        // Pulling an ended stream says so.
        let p = pull(&served, "s").await;
        assert!(p.done && matches!(p.error, Some(WireError::Closed { .. })));

        // Cancelled mid-stream: the slot is free at once, and a queued call gets it.
        assert!(matches!(
            answer(&served.call(&request("c", true, 1000)).await),
            CallAnswer::Opened
        ));
        assert!(!pull(&served, "c").await.chunks.is_empty());
        served.cancel("c");
        assert_eq!(served.open_streams(), 0);
        tokio::time::timeout(Duration::from_secs(1), async {
            while provider.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the cancelled call's slot is freed");

        // A call cancelled before it opened is dropped when it opens.
        served.cancel("early");
        assert!(matches!(
            answer(&served.call(&request("early", true, 1000)).await),
            CallAnswer::Failed {
                error: WireError::Closed { .. }
            }
        ));
        assert_eq!(served.open_streams(), 0);

        // The slot taken: a call that may wait only 50 ms is refused, retriably.
        assert!(matches!(
            answer(&served.call(&request("hold", true, 1000)).await),
            CallAnswer::Opened
        ));
        match answer(&served.call(&request("late", true, 50)).await) {
            CallAnswer::Failed { error } => {
                let e = UpstreamError::from(error);
                assert!(e.retryable(), "{e:?}");
            }
            _ => panic!("expected a refusal"),
        }
        served.close_all();

        // A provider this node does not serve.
        let mut other = request("x", false, 1000);
        other = String::from_utf8(other)
            .unwrap()
            .replace("1/demo-0", "2/elsewhere")
            .into_bytes();
        assert!(matches!(
            answer(&served.call(&other).await),
            CallAnswer::Failed {
                error: WireError::Connect { .. }
            }
        ));
    }
}
