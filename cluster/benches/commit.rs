//! Commit throughput and latency of a 3-node cluster on loopback: real QUIC with mutual TLS,
//! real redb stores with fsync, production Raft timings. Each proposal is one log entry holding a
//! batch of 100 commands (the shape of a quota usage flush). Prints proposals/s, commands/s and
//! the p50/p99/max commit latency seen by the proposer, for several numbers of concurrent
//! proposers.
//!
//! `cargo bench -p meridian-cluster --bench commit` (options: `--seconds N`, `--batch N`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use meridian_cluster::certs;
use meridian_cluster::raft::quic::QuicTransport;
use meridian_cluster::raft::{ClusterNode, RaftTimings, Transport};
use meridian_proto::cluster::{Command, GrantRequest, NodeId};

mod common;
use common::arg;

/// A usage flush: `batch` usage reports over as many limit keys.
fn flush(node: NodeId, round: u64, batch: u64) -> Command {
    Command::Batch {
        commands: (0..batch)
            .map(|i| Command::ReportUsage {
                key: format!("tenant/t{}/tokens_per_minute", (round * batch + i) % 1_000),
                node,
                window_start_unix_ms: 0,
                delta: 1 + i as i64,
                limit: 0,
                window_ms: 0,
            })
            .collect(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds = arg("--seconds", 5);
    let batch = arg("--batch", 100);
    let tmp = tempfile::tempdir()?;
    let pki = tmp.path().join("pki");
    certs::init_ca(&pki, &meridian_cluster::certs::ca_key_beside(&pki))?;
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut transports = Vec::new();
    for &id in &ids {
        certs::issue(&pki, &meridian_cluster::certs::ca_key_beside(&pki), id, &[])?;
        transports.push(QuicTransport::bind(
            "127.0.0.1:0".parse()?,
            &pki,
            id,
            Duration::from_secs(1),
        )?);
    }
    let voters: Vec<(NodeId, String)> = ids
        .iter()
        .zip(&transports)
        .map(|(id, t)| Ok((*id, t.local_addr()?.to_string())))
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    let mut nodes = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let transport: Arc<dyn Transport> = Arc::new(Arc::clone(&transports[i]));
        let node = ClusterNode::start(
            id,
            &tmp.path().join(format!("node-{id}")),
            RaftTimings::default(),
            transport,
        )
        .await?;
        transports[i].serve(node.clone());
        nodes.push(node);
    }
    nodes[0].initialize(&voters).await?;
    nodes[0].wait_for_leader(1, Duration::from_secs(10)).await?;
    // Seed the ledger keys the flushes report against.
    for t in 0..1_000 {
        nodes[0]
            .propose(Command::RequestGrant(GrantRequest {
                key: format!("tenant/t{t}/tokens_per_minute"),
                node: 1,
                limit: u64::MAX / 2,
                window_ms: 3_600_000_000,
                window_start_unix_ms: 0,
                amount: 1,
                ttl_ms: 3_600_000_000,
                ..GrantRequest::default()
            }))
            .await?;
    }
    println!(
        "3 nodes on loopback (QUIC + mTLS, redb with fsync); proposals of {batch} commands, {seconds} s per row"
    );
    println!(
        "{:>28} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "proposers", "proposals/s", "commands/s", "p50 ms", "p99 ms", "max ms"
    );
    // Node 1 leads. A proposal made on a follower is forwarded to it (one more round trip).
    let scenarios: [(&str, Vec<usize>); 5] = [
        ("1 on the leader", vec![0]),
        ("4 on the leader", vec![0; 4]),
        ("16 on the leader", vec![0; 16]),
        ("1 on a follower", vec![1]),
        ("1 on each node", vec![0, 1, 2]),
    ];
    for (label, on) in scenarios {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for (p, &at) in on.iter().enumerate() {
            let leader = nodes[at].clone();
            let p = p as u64;
            tasks.spawn(async move {
                let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
                let mut round = p * 1_000_000;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    leader
                        .propose(flush(1, round, batch))
                        .await
                        .map_err(|e| e.to_string())?;
                    h.record(started.elapsed().as_micros() as u64)
                        .map_err(|e| e.to_string())?;
                    round += 1;
                }
                Ok::<_, String>(h)
            });
        }
        let started = Instant::now();
        let mut all = Histogram::<u64>::new(3)?;
        while let Some(h) = tasks.join_next().await {
            all.add(h??)?;
        }
        let secs = started.elapsed().as_secs_f64();
        let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{label:>28} {:>12.0} {:>12.0} {:>10.2} {:>10.2} {:>10.2}",
            all.len() as f64 / secs,
            (all.len() * batch) as f64 / secs,
            ms(0.5),
            ms(0.99),
            all.max() as f64 / 1000.0
        );
    }
    for n in &nodes {
        n.shutdown().await;
    }
    Ok(())
}
