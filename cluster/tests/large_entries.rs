//! Entries near the size limit over the real transport (QUIC + mutual TLS, 16 MiB frames): a
//! follower cut off while the leader commits tens of megabytes of usage flushes catches up once
//! it is reachable again, though the backlog is several times what one frame may carry.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_cluster::certs;
use meridian_cluster::raft::faults::Faults;
use meridian_cluster::raft::quic::QuicTransport;
use meridian_cluster::raft::{ClusterError, ClusterNode, MAX_ENTRY_BYTES, RaftTimings, Transport};
use meridian_proto::cluster::{Command, NodeId, UsageTotals};

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
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    certs::init_ca(&pki).unwrap();
    let faults = Faults::new();
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut transports = Vec::new();
    for &id in &ids {
        certs::issue(&pki, id, &[]).unwrap();
        transports.push(
            QuicTransport::bind(
                "127.0.0.1:0".parse().unwrap(),
                &pki,
                id,
                Duration::from_secs(5),
            )
            .unwrap(),
        );
    }
    let voters: Vec<(NodeId, String)> = ids
        .iter()
        .zip(&transports)
        .map(|(id, t)| (*id, t.local_addr().unwrap().to_string()))
        .collect();
    let mut nodes = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let inner: Arc<dyn Transport> = Arc::new(Arc::clone(&transports[i]));
        let node = ClusterNode::start(
            id,
            &tmp.path().join(format!("node-{id}")),
            RaftTimings::default(),
            faults.wrap(id, inner),
        )
        .await
        .unwrap();
        transports[i].serve(node.clone());
        nodes.push(node);
    }
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
    let deadline = healed + Duration::from_secs(90);
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
}
