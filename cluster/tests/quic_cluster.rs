//! Three Raft members over the real QUIC + mutual-TLS transport on loopback: the cluster forms
//! with the peers' addresses taken from the membership alone, a follower's write is forwarded and replicated, losing the leader elects another, and a node
//! certified by a foreign CA cannot talk to the cluster; and a follower cut off while the leader
//! commits more usage flushes than one 16 MiB frame may carry catches up once reachable again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{has_member, leader_of, member, wait_until};
use meridian_cluster::certs;
use meridian_cluster::raft::faults::Faults;
use meridian_cluster::raft::quic::QuicTransport;
use meridian_cluster::raft::{ClusterError, ClusterNode, MAX_ENTRY_BYTES, RaftTimings, Transport};
use meridian_proto::cluster::{Applied, Command, NodeId, UsageTotals};
use openraft::Vote;
use openraft::raft::VoteRequest;

/// Members `ids` over QUIC with mutual TLS on loopback, not yet initialized: each sends
/// through `faults` and answers RPCs within `rpc_timeout`. No node is told its peers'
/// addresses: they travel in the initial membership (`voters`).
struct QuicCluster {
    nodes: Vec<ClusterNode>,
    transports: Vec<Arc<QuicTransport>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    voters: Vec<(NodeId, String)>,
    _dirs: (tempfile::TempDir, Vec<tempfile::TempDir>),
}

async fn quic_cluster(
    ids: &[NodeId],
    timings: RaftTimings,
    rpc_timeout: Duration,
    faults: &Arc<Faults>,
) -> QuicCluster {
    let pki = tempfile::tempdir().unwrap();
    certs::init_ca(pki.path(), &pki.path().join("issuer/ca.key")).unwrap();
    let mut transports = Vec::new();
    for &id in ids {
        certs::issue(pki.path(), &pki.path().join("issuer/ca.key"), id, &[]).unwrap();
        transports.push(
            QuicTransport::bind("127.0.0.1:0".parse().unwrap(), pki.path(), id, rpc_timeout)
                .unwrap(),
        );
    }
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
        let node = ClusterNode::start(id, data[i].path(), timings, faults.wrap(id, transport))
            .await
            .unwrap();
        servers.push(transports[i].serve(node.clone()));
        nodes.push(node);
    }
    QuicCluster {
        nodes,
        transports,
        servers,
        voters,
        _dirs: (pki, data),
    }
}

/// A transport on loopback that speaks as node `id` with the certificates in `pki` (answering
/// RPCs within 300 ms), and knows node `target` at `target_addr`.
fn speaking_as(
    id: NodeId,
    pki: &std::path::Path,
    target: NodeId,
    target_addr: &str,
) -> Arc<QuicTransport> {
    let transport = QuicTransport::bind(
        "127.0.0.1:0".parse().unwrap(),
        pki,
        id,
        Duration::from_millis(300),
    )
    .unwrap();
    transport.set_peer(target, target_addr.to_owned());
    transport
}

#[tokio::test]
async fn a_cluster_over_quic_with_mutual_tls() {
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let QuicCluster {
        nodes,
        transports,
        servers,
        voters,
        _dirs: dirs,
    } = quic_cluster(
        &ids,
        RaftTimings::fast(),
        Duration::from_millis(300),
        &Faults::new(),
    )
    .await;
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
    // Within 3 election timeouts (the silence noticed, a split vote's second round), and the
    // polling on top.
    let bound = RaftTimings::fast().election_max * 3 + Duration::from_millis(100);
    wait_until("a new leader", bound, || {
        leader_of(&survivors).is_some_and(|l| l != leader)
    })
    .await;
    println!(
        "quic: failover, new leader after {:?} (bound {bound:?})",
        t0.elapsed()
    );
    assert_eq!(
        survivors[0].propose(member(43)).await.unwrap(),
        Applied::Changed
    );

    // A node certified by another CA is refused by the cluster's nodes. It trusts the
    // cluster's CA, so it accepts the server: only the server's check of its certificate can
    // refuse it.
    let foreign = tempfile::tempdir().unwrap();
    certs::init_ca(foreign.path(), &foreign.path().join("issuer/ca.key")).unwrap();
    certs::issue(
        foreign.path(),
        &foreign.path().join("issuer/ca.key"),
        9,
        &[],
    )
    .unwrap();
    std::fs::copy(dirs.0.path().join("ca.crt"), foreign.path().join("ca.crt")).unwrap();
    let target = survivors[0].id;
    let target_addr = transports[ids.iter().position(|&i| i == target).unwrap()]
        .local_addr()
        .unwrap()
        .to_string();
    let intruder = speaking_as(9, foreign.path(), target, &target_addr);
    let vote = VoteRequest::new(Vote::new(99, 9), None);
    let answer = Transport::vote(&intruder, target, vote).await;
    let refused = answer.expect_err("a foreign certificate gets no answer");
    println!("quic: the impostor was refused: {}", refused.reason);
    // The impostor's client accepted the server (no certificate error of its own) and then
    // lost the connection: the server closed it on checking the impostor's certificate.
    assert!(
        refused.reason.contains("connection lost") && !refused.reason.contains("certificate"),
        "refused by the server, not by the impostor's own check: {}",
        refused.reason
    );

    // A node with a certificate of the cluster's own CA is still refused when it speaks for a
    // node its certificate does not name, or for a node that is not a member.
    certs::issue(dirs.0.path(), &dirs.0.path().join("issuer/ca.key"), 9, &[]).unwrap();
    let stranger = speaking_as(9, dirs.0.path(), target, &target_addr);
    let member = survivors
        .iter()
        .map(|n| n.id)
        .find(|&i| i != target)
        .unwrap();
    for (claim, why) in [
        (member, "a member its certificate does not name"),
        (9, "itself, not a member"),
    ] {
        let vote = VoteRequest::new(Vote::new(99, claim), None);
        let answer = Transport::vote(&stranger, target, vote).await;
        assert!(answer.is_err(), "a vote for {why} got an answer");
    }
    let term = survivors[0].status().term;
    assert!(term < 99, "no forged vote moved the term: {term}");

    // A second certificate of a member (an old or stolen one) is answered like the member's
    // own until it is revoked; then it is refused, and the member goes on with its own.
    let second = tempfile::tempdir().unwrap();
    std::fs::copy(dirs.0.path().join("ca.crt"), second.path().join("ca.crt")).unwrap();
    certs::issue(
        second.path(),
        &dirs.0.path().join("issuer/ca.key"),
        member,
        &[],
    )
    .unwrap();
    let twin = speaking_as(member, second.path(), target, &target_addr);
    // A stale term: answered (and refused) without changing anything.
    let stale = || VoteRequest::new(Vote::new(0, member), None);
    assert!(
        Transport::vote(&twin, target, stale()).await.is_ok(),
        "a member's certificate is answered"
    );
    let fingerprint =
        certs::fingerprint_file(&second.path().join(format!("node-{member}.crt"))).unwrap();
    assert_eq!(
        survivors[0]
            .propose(Command::RevokeCertificate {
                fingerprint: fingerprint.clone(),
                node: member,
            })
            .await
            .unwrap(),
        Applied::Changed
    );
    wait_until("the revocation applied", Duration::from_secs(5), || {
        survivors
            .iter()
            .all(|n| n.state().borrow().revoked_certs.contains_key(&fingerprint))
    })
    .await;
    assert!(
        Transport::vote(&twin, target, stale()).await.is_err(),
        "a revoked certificate gets no answer"
    );
    assert_eq!(
        survivors[0].propose(common::member(44)).await.unwrap(),
        Applied::Changed,
        "the member itself goes on"
    );

    for n in &survivors {
        n.shutdown().await;
    }
    for (t, s) in transports.iter().zip(servers) {
        t.close();
        s.abort();
    }
}

/// A usage flush of about `bytes` encoded: roll-ups of many tenants with long names.
fn flush(round: u64, bytes: usize) -> Command {
    let rollup = |i: usize| Command::RecordUsage {
        tenant: format!("tenant-{round:06}-{i:06}-{}", "x".repeat(60)),
        model: "llama-3.1-8b-instruct".into(),
        totals: UsageTotals {
            requests: 1,
            prompt_tokens: 1_000,
            completion_tokens: 500,
            ..UsageTotals::default()
        },
        retain_days: 90,
        provider: "vllm-a".into(),
        feature: "search".into(),
        user: format!("user-{i:06}"),
        max_users: 1_000,
        day: None,
    };
    let per = serde_json::to_vec(&rollup(0)).unwrap().len() + 1;
    Command::Batch {
        commands: (0..bytes.div_ceil(per)).map(rollup).collect(),
    }
}

/// How many tenants' roll-ups `node` holds.
fn rollups(node: &ClusterNode) -> usize {
    node.state()
        .borrow()
        .usage
        .values()
        .map(|day| day.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_under_large_flushes_catches_up_over_quic() {
    let faults = Faults::new();
    let QuicCluster {
        nodes,
        transports,
        servers,
        voters,
        _dirs,
    } = quic_cluster(
        &[1, 2, 3],
        // openraft bounds each AppendEntries call by the heartbeat interval: a debug build on
        // a busy 2-core machine needs more than 250 ms to encode, send and store a 1 MiB part.
        RaftTimings {
            heartbeat: Duration::from_secs(1),
            election_min: Duration::from_secs(3),
            election_max: Duration::from_secs(5),
            ..RaftTimings::default()
        },
        Duration::from_secs(5),
        &faults,
    )
    .await;
    nodes[0].initialize(&voters).await.unwrap();
    nodes[0]
        .wait_for_leader(1, Duration::from_secs(10))
        .await
        .unwrap();

    // An entry over the limit is refused with its size, before it reaches the log.
    match nodes[0].propose(flush(0, MAX_ENTRY_BYTES + 4_096)).await {
        Err(ClusterError::Rejected(why)) => assert!(why.contains("one log entry"), "{why}"),
        other => panic!("an oversized entry was not refused: {other:?}"),
    }

    // Node 3 is cut off while 20 flushes of ~900 kB commit (~18 MB: more than one 16 MiB
    // frame may carry).
    faults.isolate(3);
    let started = Instant::now();
    for round in 1..=20 {
        nodes[0].propose(flush(round, 900_000)).await.unwrap();
    }
    let target = nodes[0].status().applied_index.unwrap();
    let behind = nodes[2].status().applied_index.unwrap_or(0);
    println!(
        "20 flushes of ~900 kB committed in {:.1} s; node 3 applied {behind}, the leader {target}",
        started.elapsed().as_secs_f64()
    );
    assert!(behind < target, "node 3 was cut off");

    faults.heal(3);
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(150);
    // Caught up: the same state as the leader's (every flush applied).
    let expected = rollups(&nodes[0]);
    assert!(expected > 20 * 2_000, "every flush applied on the leader");
    while rollups(&nodes[2]) < expected {
        assert!(
            Instant::now() < deadline,
            "node 3 did not catch up: applied {:?} of {target}",
            nodes[2].status().applied_index
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "node 3 caught up with {target} entries in {:.1} s",
        healed.elapsed().as_secs_f64()
    );
    assert_eq!(rollups(&nodes[2]), expected, "the same state");
    for n in &nodes {
        n.shutdown().await;
    }
    for (t, s) in transports.iter().zip(servers) {
        t.close();
        s.abort();
    }
}
