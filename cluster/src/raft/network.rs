//! openraft's network over a [`Transport`] (an AppendEntries cut to what the transport carries),
//! and the transport of a node with no peers.

use super::*;

/// The transport of a node with no peers: a single-node cluster never sends a message, and
/// anything addressed elsewhere is unreachable.
#[derive(Debug, Clone, Copy)]
pub struct NoPeers;

impl NoPeers {
    fn unreached<T: Send + 'static, E: Send + 'static>(target: NodeId) -> Reply<T, E> {
        Box::pin(futures::future::ready(Err(Unreached {
            target,
            reason: "this node has no peers".into(),
        })))
    }
}

impl Transport for NoPeers {
    fn append_entries(
        &self,
        target: NodeId,
        _: AppendEntriesRequest<TypeConfig>,
    ) -> Reply<AppendEntriesResponse<NodeId>> {
        Self::unreached(target)
    }

    fn vote(&self, target: NodeId, _: VoteRequest<NodeId>) -> Reply<VoteResponse<NodeId>> {
        Self::unreached(target)
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        _: InstallSnapshotRequest<TypeConfig>,
    ) -> Reply<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        Self::unreached(target)
    }

    fn forward(&self, target: NodeId, _: Forwarded) -> Reply<Applied, ClusterError> {
        Self::unreached(target)
    }
}

/// openraft's network factory over a [`Transport`].
pub(super) struct Network(pub(super) Arc<dyn Transport>);

pub(super) struct Peer {
    target: NodeId,
    transport: Arc<dyn Transport>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        self.0.learn(target, &node.addr);
        Peer {
            target,
            transport: Arc::clone(&self.0),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let target = self.target;
        let (part, more) = first_part(rpc, MAX_PAYLOAD_BYTES);
        let last = part.entries.last().map(|e| e.log_id);
        match self.transport.append_entries(target, part).await {
            // The follower took this part: the leader goes on from its last entry.
            Ok(Ok(AppendEntriesResponse::Success)) if more => {
                Ok(AppendEntriesResponse::PartialSuccess(last))
            }
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let target = self.target;
        match self.transport.install_snapshot(target, rpc).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let target = self.target;
        match self.transport.vote(target, rpc).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }
}
