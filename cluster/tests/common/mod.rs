//! Helpers shared by the cluster's integration tests.

use std::time::{Duration, Instant};

use meridian_cluster::raft::ClusterNode;
use meridian_proto::cluster::{Command, Member, NodeId};

/// A member-table write, the command these tests replicate.
pub fn member(id: NodeId) -> Command {
    Command::UpsertMember(Member {
        id,
        region: "eu".into(),
        raft_addr: format!("127.0.0.1:{}", 7000 + id),
        http_addr: format!("127.0.0.1:{}", 8000 + id),
        mesh_addr: String::new(),
        started_unix_ms: 0,
        snapshot_format: 0,
    })
}

/// The node among `nodes` that believes it leads, if any.
pub fn leader_of(nodes: &[ClusterNode]) -> Option<NodeId> {
    nodes.iter().find_map(|n| {
        let s = n.status();
        (s.leader == Some(s.id)).then_some(s.id)
    })
}

/// Polls `cond` until it holds; panics after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `node` has applied member `id` (a write made elsewhere); panics with `what`
/// after `timeout`.
pub async fn has_member(node: &ClusterNode, id: NodeId, timeout: Duration, what: &str) {
    let mut state = node.state();
    tokio::time::timeout(timeout, state.wait_for(|s| s.members.contains_key(&id)))
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}
