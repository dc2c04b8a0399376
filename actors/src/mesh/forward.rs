//! Calls forwarded through the actor mesh. A replica that only its own node can reach (it
//! listens on that node's loopback or private network) is registered as reached through its owner (`Reach::Through`);
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
//! pulling gives back-pressure: the owner buffers at most [`BUFFER`] chunks per stream. A call is
//! registered at the owner as soon as its `Call` arrives, and the forwarder sends `Cancel` for
//! every call it gives up on, so a cancelled call frees its slot whether it is queued, waiting
//! for the upstream, or streaming.
//!
//! Quotas, breakers and fallbacks are the forwarder's business, as for any provider: the owner
//! only makes the call. What is not carried: the tenant, so the owner's queue treats forwarded
//! calls as one anonymous tenant of weight 1 for its fair share.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use meridian_proto::openai::{ChatRequest, RequestLimits};
use ractor::RpcReplyPort;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::{Instant, timeout, timeout_at};

use super::wire::*;
use crate::registry::Registry;
use crate::trace;
use crate::upstream::{Chunk, Phase, Upstream, UpstreamError};

// ---------------------------------------------------------------------------------------------
// The owner's side.

/// Calls this node makes for other nodes, from the moment each arrives until it ends.
pub(crate) struct Served {
    registry: Registry,
    calls: DashMap<String, ForwardedCall>,
}

/// One forwarded call at its owner.
enum ForwardedCall {
    /// Waiting for a slot or for the upstream to answer. Dropping the sender (a `Cancel`)
    /// stops the wait, which frees the slot and closes the upstream connection.
    Opening {
        /// Held only to be dropped.
        _cancel: oneshot::Sender<()>,
    },
    /// A stream being pulled.
    Open(Arc<OpenStream>),
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
    pub(crate) fn new(registry: Registry) -> Arc<Self> {
        let served = Arc::new(Self {
            registry,
            calls: DashMap::new(),
        });
        tokio::spawn(expire(Arc::downgrade(&served)));
        served
    }

    /// Handles a `Call` (a JSON [`CallRequest`]): registered at once, so that a `Cancel` sent
    /// after it (the same session keeps them in order) always finds it; read and made in a task,
    /// so a large body never holds up the mesh agent's mailbox; the JSON [`CallAnswer`] goes
    /// to `reply`.
    pub(crate) fn call(self: &Arc<Self>, bytes: Vec<u8>, reply: RpcReplyPort<Vec<u8>>) {
        /// Only the call's id, skipping the rest (no tree is built here).
        #[derive(Deserialize)]
        struct CallId {
            call: String,
        }
        let unreadable = |e: serde_json::Error| CallAnswer::Failed {
            error: WireError::Protocol {
                message: format!("a forwarded call this node cannot read: {e}"),
            },
        };
        let id = match serde_json::from_slice::<CallId>(&bytes) {
            Ok(c) => c.call,
            Err(e) => {
                let _ = reply.send(encode_answer(&unreadable(e)));
                return;
            }
        };
        let (cancel, cancelled) = oneshot::channel::<()>();
        self.calls
            .insert(id.clone(), ForwardedCall::Opening { _cancel: cancel });
        let served = Arc::clone(self);
        tokio::spawn(async move {
            let answer = match serde_json::from_slice::<CallRequest<Map<String, Value>>>(&bytes) {
                Err(e) => unreadable(e),
                Ok(req) => tokio::select! {
                    biased;
                    answer = served.open(req) => answer,
                    _ = cancelled => CallAnswer::Failed {
                        error: WireError::Closed { message: "cancelled by the forwarder".into() },
                    },
                },
            };
            if !matches!(answer, CallAnswer::Opened) {
                served
                    .calls
                    .remove_if(&id, |_, c| matches!(c, ForwardedCall::Opening { .. }));
            }
            let _ = reply.send(encode_answer(&answer));
        });
    }

    async fn open(&self, req: CallRequest<Map<String, Value>>) -> CallAnswer {
        let failed = |error: WireError| CallAnswer::Failed { error };
        let provider = match self.registry.provider_by_id(&req.provider) {
            // Never forward again: a provider this node reaches through the mesh is not ours.
            Some(p) if !matches!(p.spec.upstream, Upstream::Relayed(_)) => p,
            _ => {
                return failed(WireError::Connect {
                    message: format!("provider {} is not served by this node", req.provider),
                });
            }
        };
        SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The forwarder validated the request; only the typed view is rebuilt here (read from
        // the body in place, not from a copy).
        // The forwarder's own limits held it; none are applied again here.
        let unbounded = RequestLimits {
            max_messages: usize::MAX,
            max_output_tokens: u32::MAX,
            max_n: u32::MAX,
        };
        let request = match ChatRequest::from_body(req.api, req.body, &unbounded) {
            Ok(r) => r,
            Err(e) => {
                return failed(WireError::Protocol {
                    message: format!("a forwarded request this node cannot read: {}", e.message),
                });
            }
        };
        // The forwarder's attempt, when traced: this node's span of the call is its child, and
        // the upstream call carries this span's own traceparent.
        let (mut span, traceparent) = match req.traceparent.as_deref() {
            Some(tp) => {
                let (span, own) = trace::forwarded_span(
                    tp,
                    request.api.operation(),
                    &req.provider,
                    &req.model,
                    req.stream,
                );
                (Some(span), own)
            }
            None => (None, None),
        };
        let spec = &provider.spec;
        let wait = spec.queue_timeout.min(Duration::from_millis(req.wait_ms));
        let permit = match provider.acquire(Instant::now() + wait, None, 1).await {
            Ok(p) => p,
            Err(e) => {
                failed_span(&mut span, || e.to_string());
                return failed(refusal(e));
            }
        };
        let total = Instant::now() + spec.timeouts.total;
        if !req.stream {
            // Built in place, as in `connection.rs`: each move of the upstream's large future is
            // a copy (a shared helper that took it cost about 8,600 instructions a call there).
            let result = trace::TRACEPARENT
                .scope(
                    traceparent,
                    timeout_at(
                        total,
                        spec.upstream.complete(&request, &req.model, &spec.timeouts),
                    ),
                )
                .await
                .unwrap_or(Err(UpstreamError::Timeout(Phase::Total)));
            drop(permit);
            provider.record(result.is_ok());
            return match result {
                Ok(c) => CallAnswer::Complete {
                    body: String::from_utf8_lossy(&c.body).into_owned(),
                    usage: c.usage,
                },
                Err(e) => {
                    failed_span(&mut span, || e.to_string());
                    failed(e.into())
                }
            };
        }
        let opened = trace::TRACEPARENT
            .scope(
                traceparent,
                timeout_at(
                    total,
                    spec.upstream.stream(&request, &req.model, &spec.timeouts),
                ),
            )
            .await
            .unwrap_or(Err(UpstreamError::Timeout(Phase::Total)));
        let mut upstream = match opened {
            Ok(s) => s,
            Err(e) => {
                provider.record(false);
                failed_span(&mut span, || e.to_string());
                return failed(e.into());
            }
        };
        let (tx, rx) = mpsc::channel(BUFFER);
        let counted = Arc::clone(&provider);
        let pump = tokio::spawn(async move {
            let _permit = permit;
            // Ends with the stream (or when the forwarder's pulls stop and it is dropped).
            let mut span = span;
            let mut ok = true;
            loop {
                let next = timeout_at(total, upstream.next())
                    .await
                    .unwrap_or(Some(Err(UpstreamError::Timeout(Phase::Total))));
                let Some(mut item) = next else { break };
                if let Ok(chunk) = &item
                    && chunk.json.len() > MAX_CHUNK
                {
                    item = Err(UpstreamError::Protocol(format!(
                        "a chunk of {} bytes is larger than the actor mesh carries",
                        chunk.json.len()
                    )));
                }
                let failed = item.is_err();
                if let Err(e) = &item {
                    failed_span(&mut span, || e.to_string());
                }
                ok &= !failed;
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
            counted.record(ok);
        });
        let open = Arc::new(OpenStream {
            chunks: tokio::sync::Mutex::new(rx),
            last_pull: Mutex::new(Instant::now()),
            pump: pump.abort_handle(),
        });
        // Still wanted? (A Cancel removed it otherwise; dropping `open` then stops the pump.)
        match self.calls.get_mut(&req.call) {
            Some(mut call) if matches!(*call, ForwardedCall::Opening { .. }) => {
                *call = ForwardedCall::Open(open);
                CallAnswer::Opened
            }
            _ => failed(WireError::Closed {
                message: "cancelled by the forwarder".into(),
            }),
        }
    }

    /// Answers a `Pull` of stream `call` with a JSON [`Pulled`].
    pub(crate) async fn pull(&self, call: &str) -> Vec<u8> {
        let open = match self.calls.get(call).as_deref() {
            Some(ForwardedCall::Open(open)) => Arc::clone(open),
            Some(ForwardedCall::Opening { .. }) => {
                return encode(&Pulled {
                    chunks: Vec::new(),
                    done: true,
                    error: Some(WireError::Protocol {
                        message: "pulled before the stream opened".into(),
                    }),
                });
            }
            None => {
                return encode(&Pulled {
                    chunks: Vec::new(),
                    done: true,
                    error: Some(WireError::Closed {
                        message: "the forwarded stream is gone (cancelled, or not pulled in time)"
                            .into(),
                    }),
                });
            }
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
                            generated: chunk.generated,
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
            self.calls.remove(call);
        }
        encode(&out)
    }

    /// Drops call `call`, open or still opening.
    pub(crate) fn cancel(&self, call: &str) {
        self.calls.remove(call);
    }

    /// Drops every forwarded call (the node is leaving the mesh). A call still opening finds
    /// itself gone when it opens, and drops its stream.
    pub(crate) fn close_all(&self) {
        self.calls.clear();
    }

    /// Forwarded streams open now.
    pub fn open_streams(&self) -> usize {
        self.calls
            .iter()
            .filter(|c| matches!(c.value(), ForwardedCall::Open(_)))
            .count()
    }
}

/// Marks a forwarded call's span failed, for the reason `why` tells.
fn failed_span(span: &mut Option<opentelemetry::global::BoxedSpan>, why: impl FnOnce() -> String) {
    if let Some(span) = span {
        use opentelemetry::trace::Span;
        span.set_status(opentelemetry::trace::Status::error(why()));
    }
}

/// A whole answer that would not fit in a frame (its body travels escaped, inside JSON) is
/// refused: the session would otherwise close, failing every call between the two nodes.
fn encode_answer(answer: &CallAnswer) -> Vec<u8> {
    let bytes = encode(answer);
    if bytes.len() + ENVELOPE <= MAX_FRAME as usize {
        return bytes;
    }
    encode(&CallAnswer::Failed {
        error: WireError::Protocol {
            message: format!(
                "the answer ({} bytes encoded) is larger than the actor mesh carries ({} bytes)",
                bytes.len(),
                MAX_FRAME as usize - ENVELOPE
            ),
        },
    })
}

/// Drops streams nobody pulls any more.
async fn expire(served: Weak<Served>) {
    let mut tick = tokio::time::interval(LEASE / 6);
    loop {
        tick.tick().await;
        let Some(served) = served.upgrade() else {
            return;
        };
        let now = Instant::now();
        served.calls.retain(|call, c| {
            let ForwardedCall::Open(open) = c else {
                return true;
            };
            let idle =
                now.duration_since(*open.last_pull.lock().unwrap_or_else(|e| e.into_inner()));
            if idle > LEASE {
                tracing::info!(%call, "mesh: dropping a forwarded stream nobody pulls");
            }
            idle <= LEASE
        });
    }
}

/// Calls other nodes have forwarded to this node since it started.
pub fn served_total() -> u64 {
    SERVED.load(std::sync::atomic::Ordering::Relaxed)
}

static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use meridian_proto::openai::{RequestLimits, UpstreamErrorInfo};
    use meridian_proto::{ApiError, ErrorKind};

    use super::*;
    use crate::gateway::{Gateway, GatewayConfig};
    use crate::provider::{ModelRoute, ProviderSpec};
    use crate::upstream::{DemoModel, Timeouts};

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
    fn a_refusal_at_the_owner_reaches_the_client_as_the_owner_made_it() {
        let full = ApiError::new(ErrorKind::Unavailable, "queue full")
            .with_code("queue_full")
            .with_retry_after(Duration::from_secs(2));
        let e = UpstreamError::from(refusal(full.clone())).into_api_error("1/llama-0");
        // Retried elsewhere, with its Retry-After, and not an upstream failure (its code is
        // not one the breaker counts).
        assert_eq!(e, full);
        assert!(e.retryable());
        let bad = UpstreamError::from(refusal(ApiError::new(ErrorKind::InvalidRequest, "no")))
            .into_api_error("1/llama-0");
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
            default_max_tokens: 1024,
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
            api: Default::default(),
            body,
            traceparent: None,
        })
    }

    /// Waits (a little) until the provider has no call in flight.
    async fn slot_freed(provider: &crate::provider::Provider) {
        tokio::time::timeout(Duration::from_secs(1), async {
            while provider.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the cancelled call's slot is freed");
    }

    /// Sends `Call` as the agent would, and waits for its answer.
    async fn call(served: &Arc<Served>, bytes: Vec<u8>) -> CallAnswer {
        let (tx, rx) = ractor::concurrency::oneshot();
        served.call(bytes, tx.into());
        serde_json::from_slice(&rx.await.unwrap()).unwrap()
    }

    /// Opens the stream `id` (waiting up to a second for a slot).
    async fn open_stream(served: &Arc<Served>, id: &str) {
        assert!(matches!(
            call(served, request(id, true, 1000)).await,
            CallAnswer::Opened
        ));
    }

    /// No stream is left open, and the provider's slot is free.
    async fn ended(served: &Served, provider: &crate::provider::Provider) {
        assert_eq!(served.open_streams(), 0);
        slot_freed(provider).await;
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
        let served = Served::new(gateway.registry().clone());
        let provider = gateway.provider_by_id("1/demo-0").unwrap();

        // A whole answer comes back in the reply.
        match call(&served, request("w", false, 1000)).await {
            CallAnswer::Complete { body, usage } => {
                assert!(body.contains("chat.completion"), "{body}");
                assert!(usage.is_some_and(|u| u.completion_tokens > 0));
            }
            _ => panic!("expected a whole answer"),
        }

        // A stream: pulled until done, the same chunks as a direct call, in order.
        open_stream(&served, "s").await;
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
        open_stream(&served, "c").await;
        assert!(!pull(&served, "c").await.chunks.is_empty());
        served.cancel("c");
        ended(&served, &provider).await;

        // A call cancelled while it waits for a slot ends at once, and never takes one.
        open_stream(&served, "hold").await;
        let queued = {
            let served = Arc::clone(&served);
            tokio::spawn(async move { call(&served, request("queued", true, 5000)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        served.cancel("queued");
        let refused = tokio::time::timeout(Duration::from_secs(1), queued)
            .await
            .expect("the cancelled call ends at once")
            .unwrap();
        assert!(matches!(
            refused,
            CallAnswer::Failed {
                error: WireError::Closed { .. }
            }
        ));
        served.cancel("hold");
        ended(&served, &provider).await;

        // The slot taken: a call that may wait only 50 ms is refused, retriably.
        open_stream(&served, "hold").await;
        match call(&served, request("late", true, 50)).await {
            CallAnswer::Failed { error } => {
                let e = UpstreamError::from(error).into_api_error("1/demo-0");
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
            call(&served, other).await,
            CallAnswer::Failed {
                error: WireError::Connect { .. }
            }
        ));
    }
}
