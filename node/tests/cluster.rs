//! Real processes: three `meridian` nodes on 127.0.0.1-3, each with its own data directory,
//! talking Raft over QUIC with mutual TLS. The cluster forms and every node records itself;
//! `kill -9` of the leader elects another; the killed node restarts from its disk and catches
//! up. Figures are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use meridian_proto::pb::admin::ClusterStatusRequest;
use meridian_proto::pb::admin::ClusterStatusResponse;
use meridian_proto::pb::admin::admin_client::AdminClient;

mod common;

use common::BIN;

struct Node {
    id: u64,
    child: Child,
    admin: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(id: u64, config: &Path) -> Node {
    let started = common::start(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("MERIDIAN_LOG", "warn"),
    );
    Node {
        id,
        admin: format!("http://{}", started.addr("admin")),
        child: started.child,
    }
}

async fn status(node: &Node) -> Option<ClusterStatusResponse> {
    let mut client = AdminClient::connect(node.admin.clone()).await.ok()?;
    Some(
        client
            .cluster_status(ClusterStatusRequest {})
            .await
            .ok()?
            .into_inner(),
    )
}

/// Polls until every node in `nodes` reports the same leader (not `not`) and `members` members.
async fn agreed_leader(
    nodes: &[&Node],
    not: Option<u64>,
    members: usize,
    timeout: Duration,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let mut leaders = Vec::new();
        for n in nodes {
            if let Some(s) = status(n).await
                && s.members.len() >= members
            {
                leaders.push(s.leader);
            }
        }
        if leaders.len() == nodes.len()
            && let Some(Some(l)) = leaders.first().copied()
            && leaders.iter().all(|x| *x == Some(l))
            && Some(l) != not
        {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no agreed leader within {timeout:?}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn three_processes_form_a_cluster_and_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    meridian_cluster::certs::init_ca(&pki).unwrap();
    let ids = [1u64, 2, 3];
    let quic: Vec<String> = ids
        .iter()
        .map(|id| {
            let s = std::net::UdpSocket::bind(format!("127.0.0.{id}:0")).unwrap();
            s.local_addr().unwrap().to_string()
        })
        .collect();
    let mut configs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        meridian_cluster::certs::issue(&pki, *id, &[]).unwrap();
        let peers: Vec<String> = ids
            .iter()
            .zip(&quic)
            .filter(|(p, _)| *p != id)
            .map(|(p, a)| format!("\"{p}@{a}\""))
            .collect();
        let text = format!(
            "[node]\nid = {id}\ndata_dir = {data:?}\n\
             [http]\nlisten = \"127.0.0.{id}:0\"\n[grpc]\nlisten = \"127.0.0.{id}:0\"\n[admin]\nlisten = \"127.0.0.{id}:0\"\n\
             [cluster]\nlisten = \"{listen}\"\ncerts_dir = {pki:?}\npeers = [{peers}]\n\
             heartbeat = \"50ms\"\nelection_timeout_min = \"300ms\"\nelection_timeout_max = \"600ms\"\n\
             [[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
            data = tmp.path().join(format!("node-{id}")),
            listen = quic[i],
            peers = peers.join(", "),
        );
        let path = tmp.path().join(format!("node-{id}.toml"));
        std::fs::write(&path, text).unwrap();
        configs.push(path);
    }
    let mut nodes: Vec<Node> = ids
        .iter()
        .zip(&configs)
        .map(|(id, c)| spawn(*id, c))
        .collect();

    let started = Instant::now();
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = agreed_leader(&all, None, 3, Duration::from_secs(30)).await;
    println!(
        "cluster formed: leader {leader}, all 3 members recorded, after {:?}",
        started.elapsed()
    );

    // kill -9 the leader.
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    nodes[li].child.kill().unwrap();
    nodes[li].child.wait().unwrap();
    let killed_at = Instant::now();
    let survivors: Vec<&Node> = nodes.iter().filter(|n| n.id != leader).collect();
    let new_leader = agreed_leader(&survivors, Some(leader), 3, Duration::from_secs(30)).await;
    println!(
        "kill -9 of leader {leader}: new leader {new_leader} after {:?}",
        killed_at.elapsed()
    );

    // Restart the killed node from its disk: it rejoins under the new leader and catches up.
    let restarted = spawn(leader, &configs[li]);
    nodes[li] = restarted;
    let restarted_at = Instant::now();
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_now = agreed_leader(&all, None, 3, Duration::from_secs(30)).await;
    // Catch-up: the restarted node applies everything the others have.
    let deadline = Instant::now() + Duration::from_secs(30);
    let applied = loop {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(status(n).await.and_then(|s| s.applied_index));
        }
        if v.iter().all(Option::is_some) && v.iter().all(|a| *a == v[0]) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "node {leader} did not catch up: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "node {leader} restarted from disk, agrees on leader {leader_now} and caught up after {:?}; applied {applied:?}",
        restarted_at.elapsed()
    );

    // kill -9 every node at once, restart them all: nothing acknowledged is lost, and the
    // persisted vote keeps the term from going back (a wiped disk would start over at term 0).
    let before = applied[0].unwrap();
    let term_before = status(&nodes[0]).await.unwrap().term;
    for n in &mut nodes {
        n.child.kill().unwrap();
        n.child.wait().unwrap();
    }
    nodes.clear();
    let nodes: Vec<Node> = ids
        .iter()
        .zip(&configs)
        .map(|(id, c)| spawn(*id, c))
        .collect();
    let all: Vec<&Node> = nodes.iter().collect();
    let again = Instant::now();
    let leader_after = agreed_leader(&all, None, 3, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(status(n).await.and_then(|s| s.applied_index).unwrap_or(0));
        }
        if v.iter().all(|a| *a >= before) {
            let term_after = status(&nodes[0]).await.unwrap().term;
            // openraft resumes a committed vote from disk without a new election, so the term
            // stays; it must never go back.
            assert!(
                term_after >= term_before,
                "term went back from {term_before} to {term_after}"
            );
            println!(
                "kill -9 of all three, restart: leader {leader_after} after {:?}; applied {v:?} (was {before}); term {term_before} -> {term_after}",
                again.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged entries lost: applied {v:?} < {before}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
