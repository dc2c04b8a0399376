//! Meridian's actors, request pipeline and provider adapters.
//!
//! Supervision tree (one per node):
//!
//! ```text
//! NodeSupervisor                 restarts a crashed ProviderActor (budget: 10 per 60 s each)
//!  ├─ ProviderActor × N          one per upstream endpoint: wait queue, concurrency slots
//!  ├─ BreakerActor               proposes this node's breaker trips and closes to Raft
//!  └─ ConnectionSupervisor       observes; logs crashes, never restarts
//!       └─ ConnectionActor × in-flight requests   admission to last byte; owns the client sink
//! ```
//!
//! Bytes never queue behind an actor: a ProviderActor grants a slot (a mailbox round trip only
//! when the provider is saturated), then the client's response pulls the upstream stream
//! directly, while the ConnectionActor holds the slot and can cancel the call.
//!
//! Map:
//! - [`gateway`]: the [`Gateway`] handle the node's edges call;
//! - [`connection`], [`provider`], [`supervisor`], [`breaker`]: the actors;
//! - the pure decisions (routing plan, breaker gate and windows, retry budget, limit windows)
//!   live in the `meridian-policy` crate below this one, which no async code can reach;
//! - [`upstream`]: the only outbound calls to LLM providers (OpenAI-compatible, Anthropic,
//!   demo).
//!
//! This crate never knows about HTTP listeners or the cluster: the node wires it up.

pub mod auth;
pub mod breaker;
pub mod cache;
pub mod calllog;
pub mod connection;
pub mod estimate;
pub mod gateway;
pub mod mesh;
pub mod metrics;
pub mod pipeline;
pub mod provider;
pub mod quota;
pub mod registry;
pub mod replicated;
pub mod supervisor;
pub mod trace;
pub mod upstream;
pub mod vllm;

pub use connection::{ChatReply, RelayStream, RequestContext, StreamEnd, StreamPiece};
pub use gateway::{Gateway, GatewayConfig};
pub use pipeline::{
    Answer, CacheHit, CacheOutcome, Call, CallOptions, Credentials, Incoming, Served, ServedStream,
};
pub use provider::{ModelRoute, ProviderSpec, ProviderStatus};
pub use supervisor::RestartBudget;
pub use upstream::{ApiAdapter, DemoModel, Dialect, Timeouts, Upstream};
