//! An in-process [`Transport`]: nodes in one process call each other's Raft directly. Tests use
//! it to build clusters cheaply; every node's transport goes through the router's [`Faults`], so
//! tests can partition nodes, cut links, delay and drop messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use meridian_proto::cluster::{Applied, NodeId};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::faults::Faults;
use super::{ClusterError, ClusterNode, Forwarded, Reply, Transport, Unreached};
use crate::TypeConfig;

/// Connects the nodes of one in-process cluster.
#[derive(Default)]
pub struct LocalRouter {
    nodes: Mutex<HashMap<NodeId, ClusterNode>>,
    faults: Arc<Faults>,
}

impl LocalRouter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The transport a node with id `from` sends through.
    pub fn transport(self: &Arc<Self>, from: NodeId) -> Arc<dyn Transport> {
        self.faults.wrap(
            from,
            Arc::new(LocalTransport {
                router: Arc::clone(self),
            }),
        )
    }

    /// The faults every node's transport is subject to.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn add(&self, node: ClusterNode) {
        self.lock_nodes().insert(node.id, node);
    }

    pub fn remove(&self, id: NodeId) -> Option<ClusterNode> {
        self.lock_nodes().remove(&id)
    }

    // Short locks, never held across an await.
    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, ClusterNode>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reach(&self, to: NodeId) -> Result<ClusterNode, Unreached> {
        self.lock_nodes()
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreached {
                target: to,
                reason: "no such node".into(),
            })
    }
}

struct LocalTransport {
    router: Arc<LocalRouter>,
}

impl Transport for LocalTransport {
    fn append_entries(
        &self,
        target: NodeId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Reply<AppendEntriesResponse<NodeId>> {
        let node = self.router.reach(target);
        async move { Ok(node?.raft().append_entries(rpc).await) }.boxed()
    }

    fn vote(&self, target: NodeId, rpc: VoteRequest<NodeId>) -> Reply<VoteResponse<NodeId>> {
        let node = self.router.reach(target);
        async move { Ok(node?.raft().vote(rpc).await) }.boxed()
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Reply<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let node = self.router.reach(target);
        async move { Ok(node?.raft().install_snapshot(rpc).await) }.boxed()
    }

    fn forward(&self, target: NodeId, request: Forwarded) -> Reply<Applied, ClusterError> {
        let node = self.router.reach(target);
        async move { Ok(node?.execute(&request).await) }.boxed()
    }
}
