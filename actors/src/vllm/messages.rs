//! What a replica's actor is told: by operators (a [`Control`]) and by the tasks it leaves the
//! waiting to ([`VllmMsg`]).

use std::time::Duration;

use ractor::RpcReplyPort;

use super::ControlError;
use super::metrics::EngineMetrics;

/// What an operator (or the autoscaler, or node shutdown) asks of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Deregister, let in-flight requests finish (up to `drain_timeout`), then stop.
    Drain,
    /// Deregister and stop now (SIGTERM, then SIGKILL after `stop_grace`).
    Stop,
    /// Launch a stopped or failed replica (its crash count starts over).
    Start,
    /// Drain, then launch again.
    Restart,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Restart => "restart",
        }
    }
}

/// The VllmActor's vocabulary. Local only (it carries reply ports).
#[derive(Debug)]
pub enum VllmMsg {
    /// Launch now (from a backoff timer of `epoch`; a later decision bumps the epoch and so
    /// cancels the timer).
    Launch {
        epoch: u64,
    },
    /// The process of `incarnation` exited.
    Exited {
        incarnation: u64,
        status: String,
    },
    /// It answered `/health` and lists its model, `after` its launch.
    Ready {
        incarnation: u64,
        after: Duration,
    },
    /// It must be restarted: over its startup budget, failing `/health`, or hung.
    Unhealthy {
        incarnation: u64,
        reason: String,
    },
    /// Its `/metrics`.
    Scraped {
        incarnation: u64,
        metrics: EngineMetrics,
    },
    Control(Control, RpcReplyPort<Result<String, ControlError>>),
    /// Load (`path: Some`) or unload a LoRA adapter at run time.
    Lora {
        name: String,
        path: Option<String>,
        reply: RpcReplyPort<Result<String, ControlError>>,
    },
    /// The replica of `incarnation` answered a LoRA call (made off the actor, so a slow load
    /// never delays the handling of an exit or a failed health check): route by it.
    LoraDone {
        incarnation: u64,
        name: String,
        path: Option<String>,
        answer: Result<String, ControlError>,
        reply: RpcReplyPort<Result<String, ControlError>>,
    },
}

impl ractor::Message for VllmMsg {}
