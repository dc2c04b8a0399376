//! The per-call record: one [`CallEntry`] per request, handed by the pipeline's record step to
//! a [`CallLog`] (the node keeps them in SQLite). Writing must never hold up a request: a log
//! takes an entry and returns at once, and says what it could not keep.

use std::borrow::Cow;
use std::sync::Arc;

use meridian_policy::clock::WallClock;
use meridian_proto::RequestId;

use crate::metrics::{Edge, Metrics, Tokens};
use crate::quota::Quota;

/// One call, as the per-call log keeps it.
#[derive(Debug, Clone)]
pub struct CallEntry {
    /// When the request arrived (Unix ms).
    pub at_unix_ms: u64,
    pub request_id: RequestId,
    pub edge: Edge,
    /// The API called (`chat.completions`).
    pub api: &'static str,
    pub tenant: Option<Arc<str>>,
    /// The API key's id (`None` for JWT callers and with authentication off).
    pub key_id: Option<Arc<str>>,
    /// The end user, as the request or the token named them.
    pub user: Option<Arc<str>>,
    pub feature: Option<String>,
    /// The model as the client asked for it.
    pub model: Arc<str>,
    /// The provider's name for it, at the provider that answered.
    pub served_model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub attempts: u32,
    /// `ok`, `cached`, `cancelled`, or the error's code.
    pub code: Cow<'static, str>,
    pub tokens: Option<Tokens>,
    /// From arrival to the first content sent (streams).
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub queue_wait_ms: Option<f64>,
    pub cost_micro_usd: u64,
    pub cache_hit: bool,
    pub stream: bool,
    /// The client went away before the answer ended.
    pub cancelled: bool,
}

/// Where per-call records go. `write` must return at once (a log queues the entry, or counts it
/// as dropped when it cannot).
pub trait CallLog: Send + Sync + std::fmt::Debug {
    fn write(&self, entry: CallEntry);
}

/// Where a request's outcome is recorded: the request metrics, the per-call log if the node
/// keeps one, and the tenant's daily usage roll-up when the node is in a cluster that admits
/// against limits.
#[derive(Debug)]
pub struct Recorder {
    pub metrics: Metrics,
    pub calls: Option<Arc<dyn CallLog>>,
    pub usage: Option<Quota>,
    /// The node's clock: a call is dated by it (its record's time, its roll-up's day).
    pub clock: WallClock,
}
