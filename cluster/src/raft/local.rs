//! An in-process [`Transport`]: nodes in one process call each other's Raft directly. Tests use
//! it to build clusters cheaply, and to cut nodes off ([`LocalRouter::isolate`]) to simulate
//! partitions and dead nodes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use meridian_proto::cluster::{Applied, NodeId, Proposal};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{ClusterError, ClusterNode, Reply, Transport, Unreached};
use crate::TypeConfig;

/// Connects the nodes of one in-process cluster.
#[derive(Default)]
pub struct LocalRouter {
    nodes: Mutex<HashMap<NodeId, ClusterNode>>,
    isolated: Mutex<HashSet<NodeId>>,
}

impl LocalRouter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The transport a node with id `from` sends through.
    pub fn transport(self: &Arc<Self>, from: NodeId) -> Arc<dyn Transport> {
        Arc::new(LocalTransport {
            router: Arc::clone(self),
            from,
        })
    }

    pub fn add(&self, node: ClusterNode) {
        self.lock_nodes().insert(node.id, node);
    }

    pub fn remove(&self, id: NodeId) -> Option<ClusterNode> {
        self.lock_nodes().remove(&id)
    }

    /// Drops every message to or from `id` until [`LocalRouter::heal`].
    pub fn isolate(&self, id: NodeId) {
        self.lock_isolated().insert(id);
    }

    pub fn heal(&self, id: NodeId) {
        self.lock_isolated().remove(&id);
    }

    // Short locks, never held across an await.
    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, ClusterNode>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_isolated(&self) -> std::sync::MutexGuard<'_, HashSet<NodeId>> {
        self.isolated.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reach(&self, from: NodeId, to: NodeId) -> Result<ClusterNode, Unreached> {
        let unreached = |reason: &str| Unreached {
            target: to,
            reason: reason.into(),
        };
        {
            let cut = self.lock_isolated();
            if cut.contains(&from) || cut.contains(&to) {
                return Err(unreached("partitioned"));
            }
        }
        self.lock_nodes()
            .get(&to)
            .cloned()
            .ok_or_else(|| unreached("no such node"))
    }
}

struct LocalTransport {
    router: Arc<LocalRouter>,
    from: NodeId,
}

impl Transport for LocalTransport {
    fn append_entries(
        &self,
        target: NodeId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Reply<AppendEntriesResponse<NodeId>> {
        let node = self.router.reach(self.from, target);
        async move { Ok(node?.raft().append_entries(rpc).await) }.boxed()
    }

    fn vote(&self, target: NodeId, rpc: VoteRequest<NodeId>) -> Reply<VoteResponse<NodeId>> {
        let node = self.router.reach(self.from, target);
        async move { Ok(node?.raft().vote(rpc).await) }.boxed()
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Reply<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let node = self.router.reach(self.from, target);
        async move { Ok(node?.raft().install_snapshot(rpc).await) }.boxed()
    }

    fn forward(&self, target: NodeId, proposal: Proposal) -> Reply<Applied, ClusterError> {
        let node = self.router.reach(self.from, target);
        async move {
            let node = node?;
            // The leader commits it itself; one hop only, no forwarding chains.
            Ok(match node.raft().client_write(proposal).await {
                Ok(resp) => Ok(resp.data),
                Err(e) => Err(ClusterError::Rejected(e.to_string())),
            })
        }
        .boxed()
    }
}
