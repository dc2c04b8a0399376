//! What nodes say to each other's agents on the actor mesh: the agent's messages and, for
//! calls forwarded to a provider's owner (see [`super::forward`]), the requests, answers,
//! chunks and errors as they cross, with the limits that keep each within a frame.

use std::time::Duration;

use meridian_proto::ApiError;
use meridian_proto::openai::{Api, UpstreamErrorInfo, Usage};
use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::upstream::{Phase, UpstreamError};

/// Largest inbound mesh frame: a forwarded request, a whole answer or a batch of chunks fits.
pub const MAX_FRAME: u64 = 16 * 1024 * 1024;

/// Messages a node's agent answers, from this node or any other.
#[derive(RactorClusterMessage)]
pub enum MeshMsg {
    /// Describes this node ([`NodeDescription`] as JSON); the argument names the asker.
    #[rpc]
    Describe(String, RpcReplyPort<String>),
    /// Opens a call at one of this node's providers for another node (see [`super::forward`]).
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// The next chunks of a forwarded stream, by call id.
    #[rpc]
    Pull(String, RpcReplyPort<Vec<u8>>),
    /// Drops a forwarded call, by id.
    Cancel(String),
}

/// How long the owner holds a pull open waiting for the stream's next chunk.
pub const PULL_WAIT: Duration = Duration::from_millis(500);
/// A stream not pulled for this long is dropped at the owner (longer than the default idle
/// limit, so a slow client is not mistaken for a dead forwarder).
pub const LEASE: Duration = Duration::from_secs(120);
/// Chunks the owner buffers per stream before the upstream waits for a pull.
pub const BUFFER: usize = 64;
/// A pull answer stops taking chunks once it holds this many bytes of them.
pub(super) const BATCH_BYTES: usize = 256 * 1024;
/// The largest chunk a stream may carry through the mesh: a batch (escaped, at most twice its
/// size) then always fits in a frame.
pub(super) const MAX_CHUNK: usize = 4 * 1024 * 1024;
/// Room left in a frame for the envelope around a request or an answer.
pub(super) const ENVELOPE: usize = 16 * 1024;

/// The process group of node `id`'s agent alone.
pub fn node_group(id: u64) -> String {
    format!("meridian.node.{id}")
}

#[derive(Serialize, Deserialize)]
pub(super) struct CallRequest<B> {
    /// Chosen by the forwarder; names the call in `Pull` and `Cancel`.
    pub(super) call: String,
    pub(super) provider: String,
    /// The upstream's name for the model.
    pub(super) model: String,
    pub(super) stream: bool,
    /// How long the forwarder waits for the call to open (queueing at the owner included).
    pub(super) wait_ms: u64,
    /// The API the client called (chat when an older node leaves it out).
    #[serde(default)]
    pub(super) api: Api,
    /// The client's request as the forwarder validated it.
    pub(super) body: B,
    /// The forwarder's attempt, when it is traced (W3C `traceparent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) traceparent: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(super) enum CallAnswer {
    Complete { body: String, usage: Option<Usage> },
    Opened,
    Failed { error: WireError },
}

#[derive(Default, Serialize, Deserialize)]
pub(super) struct Pulled {
    pub(super) chunks: Vec<WireChunk>,
    /// No more chunks will come (after `error`, if any).
    pub(super) done: bool,
    pub(super) error: Option<WireError>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct WireChunk {
    pub(super) json: String,
    pub(super) usage: Option<Usage>,
    pub(super) usage_only: bool,
    /// See [`crate::upstream::Chunk::generated`]. A peer of an earlier version does not send
    /// it: every chunk but the usage one is taken as generated, as that version counted them.
    #[serde(default = "assumed_generated")]
    pub(super) generated: bool,
}

fn assumed_generated() -> bool {
    true
}

/// An [`UpstreamError`] as it crosses the mesh.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub(super) enum WireError {
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
    /// Refused at the owner as it would refuse its own clients (bad request, queue full,
    /// deadline unreachable): passed on as is, so it is retried elsewhere when its kind allows
    /// and never counted against the provider's breaker.
    Rejected {
        kind: meridian_proto::ErrorKind,
        message: String,
        param: Option<String>,
        code: Option<String>,
        retry_after_ms: Option<u64>,
        no_retry: bool,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum WirePhase {
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
            UpstreamError::Rejected(e) => refusal(e),
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
                retry_after_ms,
                no_retry,
            } => {
                let mut e = ApiError::new(kind, message);
                e.param = param;
                e.code = code;
                e.retry_after = retry_after_ms.map(Duration::from_millis);
                e.no_retry = no_retry;
                Self::Rejected(e)
            }
        }
    }
}

/// An error the owner made itself (not the upstream's), as it crosses the mesh.
pub(super) fn refusal(e: ApiError) -> WireError {
    WireError::Rejected {
        kind: e.kind,
        message: e.message,
        param: e.param,
        code: e.code,
        retry_after_ms: e.retry_after.map(|d| d.as_millis() as u64),
        no_retry: e.no_retry,
    }
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}
