//! In-process clusters over the local transport: forming, replication, follower forwarding,
//! leader loss, restart from disk, and log compaction. (The multi-process harness over the real
//! network is not built yet.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{leader_of, member, wait_until};
use meridian_cluster::raft::local::LocalRouter;
use meridian_cluster::raft::{ClusterNode, RaftTimings};
use meridian_proto::cluster::{Applied, NodeId};

struct Cluster {
    router: Arc<LocalRouter>,
    nodes: Vec<ClusterNode>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn cluster(n: u64) -> Cluster {
    let router = LocalRouter::new();
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=n {
        let dir = tempfile::tempdir().unwrap();
        let node = ClusterNode::start(id, dir.path(), RaftTimings::fast(), router.transport(id))
            .await
            .unwrap();
        router.add(node.clone());
        nodes.push(node);
        dirs.push(dir);
    }
    let voters: Vec<(NodeId, String)> = (1..=n).map(|id| (id, String::new())).collect();
    nodes[0].initialize(&voters).await.unwrap();
    Cluster {
        router,
        nodes,
        _dirs: dirs,
    }
}

#[tokio::test]
async fn three_nodes_replicate_forward_and_survive_losing_the_leader() {
    let c = cluster(3).await;
    wait_until("a leader", Duration::from_secs(5), || {
        leader_of(&c.nodes).is_some()
    })
    .await;
    let leader = leader_of(&c.nodes).unwrap();
    let follower = c.nodes.iter().find(|n| n.id != leader).unwrap();

    // A write proposed on a follower is forwarded to the leader and reaches every node.
    assert_eq!(follower.propose(member(7)).await.unwrap(), Applied::Changed);
    for n in &c.nodes {
        let mut state = n.state();
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| s.members.contains_key(&7)),
        )
        .await
        .expect("replicated in time")
        .unwrap();
    }

    // Lose the leader: the others elect a new one and keep accepting writes.
    let started = Instant::now();
    c.router.faults().isolate(leader);
    let survivors: Vec<ClusterNode> = c.nodes.iter().filter(|n| n.id != leader).cloned().collect();
    wait_until("a new leader", Duration::from_secs(10), || {
        leader_of(&survivors).is_some_and(|l| l != leader)
    })
    .await;
    let failover = started.elapsed();
    println!("failover: new leader after {failover:?}");
    assert_eq!(
        survivors[0].propose(member(8)).await.unwrap(),
        Applied::Changed
    );
    for n in &survivors {
        let mut state = n.state();
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| s.members.contains_key(&8)),
        )
        .await
        .expect("replicated after failover")
        .unwrap();
    }

    // The old leader rejoins and catches up.
    c.router.faults().heal(leader);
    let old = c.nodes.iter().find(|n| n.id == leader).unwrap();
    let mut state = old.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| s.members.contains_key(&8)),
    )
    .await
    .expect("the old leader catches up")
    .unwrap();
    for n in &c.nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn a_restarted_single_node_keeps_its_state_and_compacts_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let router = LocalRouter::new();
    let timings = RaftTimings {
        snapshot_every: 50,
        keep_after_snapshot: 10,
        ..RaftTimings::fast()
    };
    {
        let node = ClusterNode::start(1, dir.path(), timings, router.transport(1))
            .await
            .unwrap();
        router.add(node.clone());
        node.initialize(&[(1, String::new())]).await.unwrap();
        wait_until("leadership", Duration::from_secs(5), || {
            node.status().leader == Some(1)
        })
        .await;
        for i in 0..120 {
            node.propose(member(100 + i)).await.unwrap();
        }
        wait_until("a snapshot and a purge", Duration::from_secs(10), || {
            let s = node.status();
            s.snapshot_index.is_some() && s.purged_index.is_some()
        })
        .await;
        let s = node.status();
        println!("before restart: {s:?}");
        assert!(s.purged_index.unwrap() > 0, "the log is compacted");
        node.shutdown().await;
        router.remove(1);
    }
    let node = ClusterNode::start(1, dir.path(), timings, router.transport(1))
        .await
        .unwrap();
    router.add(node.clone());
    node.initialize(&[(1, String::new())]).await.unwrap(); // refused quietly: already initialized
    wait_until("leadership again", Duration::from_secs(5), || {
        node.status().leader == Some(1)
    })
    .await;
    let mut state = node.state();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|s| s.members.len() == 120),
    )
    .await
    .expect("state restored from snapshot + log")
    .unwrap();
    assert_eq!(node.propose(member(999)).await.unwrap(), Applied::Changed);
    node.shutdown().await;
}
