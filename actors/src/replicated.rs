//! The actors' view of the replicated state, at the bottom of the crate: what every layer that
//! reads the cluster's state or changes it is given.

use std::sync::Arc;

use futures::future::BoxFuture;
use meridian_proto::cluster::{Applied, ClusterState, Command, NodeId};
use tokio::sync::watch;

/// Proposes commands to the cluster (the node's Raft member; a follower forwards to the leader).
pub trait Proposer: Send + Sync + 'static {
    /// Resolves once the command is committed and applied, or with why it was not.
    fn propose(&self, command: Command) -> BoxFuture<'static, Result<Applied, ProposeError>>;
}

/// Why a proposal has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader, no quorum, or no answer in time: it may or may not commit (a retry of the
    /// same command, with the same sequence number where it has one, is safe).
    #[error("the cluster did not answer: {0}")]
    Unavailable(String),
    /// The cluster refused it (too large for a log entry, say): the same again will not do.
    #[error("the cluster refused the command: {0}")]
    Refused(String),
}

/// The actors' view of the replicated state: they read the applied state from a `watch` (the
/// hot path never waits on Raft) and change it only by proposing commands.
#[derive(Clone)]
pub struct Replicated {
    pub node_id: NodeId,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub proposer: Arc<dyn Proposer>,
}

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}
