//! Three Raft members over the real QUIC + mutual-TLS transport on loopback: the cluster forms
//! with the peers' addresses taken from the membership alone, a follower's write is forwarded and replicated, losing the leader elects another, and a node
//! certified by a foreign CA cannot talk to the cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{has_member, leader_of, member, wait_until};
use meridian_cluster::certs;
use meridian_cluster::raft::quic::QuicTransport;
use meridian_cluster::raft::{ClusterNode, RaftTimings, Transport};
use meridian_proto::cluster::{Applied, NodeId};
use openraft::Vote;
use openraft::raft::VoteRequest;

#[tokio::test]
async fn a_cluster_over_quic_with_mutual_tls() {
    let pki = tempfile::tempdir().unwrap();
    certs::init_ca(pki.path()).unwrap();
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut transports = Vec::new();
    for &id in &ids {
        certs::issue(pki.path(), id, &[]).unwrap();
        transports.push(
            QuicTransport::bind(
                "127.0.0.1:0".parse().unwrap(),
                pki.path(),
                id,
                Duration::from_millis(300),
            )
            .unwrap(),
        );
    }
    // No node is told its peers' addresses: they travel in the initial membership.
    let voters: Vec<(NodeId, String)> = ids
        .iter()
        .zip(&transports)
        .map(|(id, t)| (*id, t.local_addr().unwrap().to_string()))
        .collect();
    let data: Vec<_> = ids.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    let mut servers = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let transport: Arc<dyn Transport> = Arc::new(Arc::clone(&transports[i]));
        let node = ClusterNode::start(id, data[i].path(), RaftTimings::fast(), transport)
            .await
            .unwrap();
        servers.push(transports[i].serve(node.clone()));
        nodes.push(node);
    }
    let started = Instant::now();
    nodes[0].initialize(&voters).await.unwrap();
    wait_until("a leader", Duration::from_secs(10), || {
        leader_of(&nodes).is_some()
    })
    .await;
    println!(
        "quic: leader elected {:?} after initialize",
        started.elapsed()
    );

    let leader = leader_of(&nodes).unwrap();
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    assert_eq!(
        follower.propose(member(42)).await.unwrap(),
        Applied::Changed
    );
    for n in &nodes {
        has_member(n, 42, Duration::from_secs(5), "replicated over QUIC").await;
    }

    // Lose the leader: close its endpoint and stop its Raft member.
    let li = ids.iter().position(|&id| id == leader).unwrap();
    let t0 = Instant::now();
    transports[li].close();
    nodes[li].shutdown().await;
    let survivors: Vec<ClusterNode> = nodes.iter().filter(|n| n.id != leader).cloned().collect();
    wait_until("a new leader", Duration::from_secs(10), || {
        leader_of(&survivors).is_some_and(|l| l != leader)
    })
    .await;
    println!("quic: failover, new leader after {:?}", t0.elapsed());
    assert_eq!(
        survivors[0].propose(member(43)).await.unwrap(),
        Applied::Changed
    );

    // A node certified by another CA is refused by the cluster's nodes.
    let foreign = tempfile::tempdir().unwrap();
    certs::init_ca(foreign.path()).unwrap();
    certs::issue(foreign.path(), 9, &[]).unwrap();
    let intruder = QuicTransport::bind(
        "127.0.0.1:0".parse().unwrap(),
        foreign.path(),
        9,
        Duration::from_millis(300),
    )
    .unwrap();
    let target = survivors[0].id;
    intruder.set_peer(
        target,
        transports[ids.iter().position(|&i| i == target).unwrap()]
            .local_addr()
            .unwrap(),
    );
    let vote = VoteRequest::new(Vote::new(99, 9), None);
    let answer = Transport::vote(&intruder, target, vote).await;
    assert!(answer.is_err(), "a foreign certificate gets no answer");

    for n in &survivors {
        n.shutdown().await;
    }
    for (t, s) in transports.iter().zip(servers) {
        t.close();
        s.abort();
    }
}
