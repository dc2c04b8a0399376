//! In-process clusters over the local transport: forming, replication, follower forwarding,
//! leader loss, membership changes, delayed and lost messages, restart from disk, and a log that
//! stays bounded on disk under steady writes. (Real processes over QUIC: `tests/tests/cluster.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{has_member, leader_of, member, wait_until};
use meridian_cluster::raft::local::LocalRouter;
use meridian_cluster::raft::{ClusterError, ClusterNode, Forwarded, RaftTimings};
use meridian_proto::cluster::{Applied, Command, Member, NodeId, Proposal};

struct Cluster {
    router: Arc<LocalRouter>,
    nodes: Vec<ClusterNode>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// The leader's id, once there is one (within 5 s).
    async fn leader(&self) -> NodeId {
        wait_until("a leader", Duration::from_secs(5), || {
            leader_of(&self.nodes).is_some()
        })
        .await;
        leader_of(&self.nodes).unwrap()
    }

    /// The leader, once there is one (within 5 s).
    async fn leader_node(&self) -> &ClusterNode {
        let id = self.leader().await;
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    /// Shuts every node down.
    async fn shutdown(&self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}

/// Node 1's disk and transport, which outlive its restarts.
struct LoneNode {
    dir: tempfile::TempDir,
    router: Arc<LocalRouter>,
    timings: RaftTimings,
}

impl LoneNode {
    fn new(timings: RaftTimings) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            router: LocalRouter::new(),
            timings,
        }
    }

    /// Starts node 1 on its disk: see [`lead_alone`].
    async fn lead(&self) -> ClusterNode {
        lead_alone(self.dir.path(), self.timings, &self.router).await
    }
}

/// The fast timings, with a snapshot every `every` log entries and `keep` entries kept in the
/// log behind each.
fn snapshotting(every: u64, keep: u64) -> RaftTimings {
    RaftTimings {
        snapshot_every: every,
        keep_after_snapshot: keep,
        ..RaftTimings::fast()
    }
}

/// Node 1 alone in `dir`, initialized (a repeat is refused quietly) and leading.
async fn lead_alone(
    dir: &std::path::Path,
    timings: RaftTimings,
    router: &Arc<LocalRouter>,
) -> ClusterNode {
    let node = ClusterNode::start(1, dir, timings, router.transport(1))
        .await
        .unwrap();
    router.add(node.clone());
    node.initialize(&[(1, String::new())]).await.unwrap();
    wait_until("leadership", Duration::from_secs(5), || {
        node.status().leader == Some(1)
    })
    .await;
    node
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
    let leader = c.leader().await;
    let follower = c.nodes.iter().find(|n| n.id != leader).unwrap();

    // A write proposed on a follower is forwarded to the leader and reaches every node.
    assert_eq!(follower.propose(member(7)).await.unwrap(), Applied::Changed);
    for n in &c.nodes {
        has_member(n, 7, Duration::from_secs(5), "replicated in time").await;
    }

    // Lose the leader: the others elect a new one and keep accepting writes.
    let started = Instant::now();
    c.router.faults().isolate(leader);
    let survivors: Vec<ClusterNode> = c.nodes.iter().filter(|n| n.id != leader).cloned().collect();
    // Within 3 election timeouts (the silence noticed, a split vote's second round), and the
    // polling on top.
    let bound = RaftTimings::fast().election_max * 3 + Duration::from_millis(100);
    wait_until("a new leader", bound, || {
        leader_of(&survivors).is_some_and(|l| l != leader)
    })
    .await;
    let failover = started.elapsed();
    println!("failover: new leader after {failover:?} (bound {bound:?})");
    // The cut-off leader notices it lost its quorum; the new leader has one.
    let old = c.nodes.iter().find(|n| n.id == leader).unwrap();
    wait_until(
        "the isolated leader to report no quorum",
        Duration::from_secs(10),
        || !old.status().quorum,
    )
    .await;
    // A write on the cut-off leader fails, saying that its quorum is gone, instead of waiting
    // for the quorum to come back (openraft's leader does not step down on its own).
    let asked = Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), old.propose(member(9))).await {
        Ok(Err(ClusterError::NoQuorum(_))) => {}
        other => panic!("a write on a leader without quorum answered {other:?}"),
    }
    println!(
        "a write on the cut-off leader failed after {:?}",
        asked.elapsed()
    );
    assert!(
        asked.elapsed() <= Duration::from_secs(5),
        "a write on a leader without quorum took {:?} to fail",
        asked.elapsed()
    );
    // So does a membership change there.
    match tokio::time::timeout(Duration::from_secs(10), old.add_learner(9, String::new())).await {
        Ok(Err(ClusterError::NoQuorum(_))) => {}
        other => panic!("a membership change on a leader without quorum answered {other:?}"),
    }
    wait_until(
        "the new leader to report a quorum",
        Duration::from_secs(10),
        || {
            survivors.iter().any(|n| {
                let s = n.status();
                s.leader == Some(s.id) && s.quorum
            })
        },
    )
    .await;
    assert_eq!(
        survivors[0].propose(member(8)).await.unwrap(),
        Applied::Changed
    );
    for n in &survivors {
        has_member(n, 8, Duration::from_secs(5), "replicated after failover").await;
    }

    // The old leader rejoins and catches up.
    c.router.faults().heal(leader);
    let old = c.nodes.iter().find(|n| n.id == leader).unwrap();
    has_member(old, 8, Duration::from_secs(10), "the old leader catches up").await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_restarted_single_node_keeps_its_state_and_compacts_its_log() {
    let lone = LoneNode::new(snapshotting(50, 10));
    {
        let node = lone.lead().await;
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
        lone.router.remove(1);
    }
    // Restarted on its disk (initializing again is refused quietly).
    let node = lone.lead().await;
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

#[tokio::test]
async fn a_learner_joins_is_promoted_and_removed_through_any_node() {
    let mut c = cluster(3).await;
    let leader = c.leader().await;
    c.nodes[0].propose(member(7)).await.unwrap();

    // Node 4 starts empty and bootstraps nothing; an operator adds it through a follower.
    let dir = tempfile::tempdir().unwrap();
    let four = ClusterNode::start(4, dir.path(), RaftTimings::fast(), c.router.transport(4))
        .await
        .unwrap();
    c.router.add(four.clone());
    let follower = c.nodes.iter().find(|n| n.id != leader).unwrap().clone();
    assert_eq!(
        follower.add_learner(4, String::new()).await.unwrap(),
        Applied::Changed
    );
    assert_eq!(
        follower.add_learner(4, String::new()).await.unwrap(),
        Applied::Unchanged
    );
    has_member(
        &four,
        7,
        Duration::from_secs(5),
        "the learner receives the log",
    )
    .await;
    let s = c.nodes[0].status();
    assert!(s.learners.contains(&4) && !s.voters.contains(&4), "{s:?}");

    assert_eq!(follower.promote(4).await.unwrap(), Applied::Changed);
    assert_eq!(follower.promote(99).await.unwrap(), Applied::NotFound);
    wait_until("node 4 votes", Duration::from_secs(5), || {
        c.nodes.iter().all(|n| n.status().voters.contains(&4))
    })
    .await;
    // With four voters, a write needs three: it still commits with one node cut off.
    let other = c
        .nodes
        .iter()
        .find(|n| n.id != leader && n.id != follower.id)
        .unwrap();
    c.router.faults().isolate(other.id);
    assert_eq!(four.propose(member(8)).await.unwrap(), Applied::Changed);
    c.router.faults().heal(other.id);

    four.propose(Command::UpsertMember(Member {
        id: 4,
        region: "eu".into(),
        raft_addr: String::new(),
        http_addr: String::new(),
        mesh_addr: String::new(),
        started_unix_ms: 0,
        snapshot_format: 0,
    }))
    .await
    .unwrap();
    assert_eq!(follower.remove(4).await.unwrap(), Applied::Changed);
    wait_until("node 4 is gone", Duration::from_secs(5), || {
        c.nodes.iter().all(|n| {
            let s = n.status();
            !s.voters.contains(&4)
                && !s.learners.contains(&4)
                && !n.state().borrow().members.contains_key(&4)
        })
    })
    .await;
    assert_eq!(follower.remove(4).await.unwrap(), Applied::NotFound);
    four.shutdown().await;
    c.nodes.push(four);
    c.shutdown().await;
}

#[tokio::test]
async fn a_request_forwarded_to_a_node_that_no_longer_leads_is_sent_on_to_the_leader() {
    let c = cluster(3).await;
    let leader = c.leader().await;
    let followers: Vec<&ClusterNode> = c.nodes.iter().filter(|n| n.id != leader).collect();
    let (from, stale) = (followers[0], followers[1]);
    // A node that does not lead says so, and carries out nothing.
    let proposal = Forwarded::Propose(Box::new(Proposal {
        at_unix_ms: 0,
        proposer: from.id,
        command: member(9),
    }));
    match stale.execute(&proposal).await {
        Err(ClusterError::NotLeader { leader: known }) => {
            assert!(known.is_none_or(|l| l == leader), "{known:?}");
        }
        other => panic!("a follower carried out a forwarded proposal: {other:?}"),
    }
    // The sender's view of the leader is out of date: its forward lands on a follower first,
    // and is sent on to the leader rather than failing.
    c.router.faults().misdirect_next_forward(leader, stale.id);
    assert_eq!(from.propose(member(8)).await.unwrap(), Applied::Changed);
    assert_eq!(
        c.router.faults().misdirected(),
        1,
        "the forward went astray first"
    );
    for n in &c.nodes {
        has_member(n, 8, Duration::from_secs(5), "replicated in time").await;
        assert!(!n.state().borrow().members.contains_key(&9));
    }
    c.shutdown().await;
}

#[tokio::test]
async fn writes_commit_through_delayed_and_lost_messages_and_a_cut_link() {
    let c = cluster(3).await;
    let leader = c.leader_node().await;
    c.router.faults().set_delay(Duration::from_millis(5));
    c.router.faults().set_drop_rate(100);
    // Lost heartbeats can cost the leader its term, and a lost forward fails a write: a client
    // retries, as it would against any cluster. Every write must get through, and stay.
    let started = Instant::now();
    let mut retries = 0;
    for i in 0..50 {
        let mut attempts = 0;
        while let Err(e) = leader.propose(member(1_000 + i)).await {
            attempts += 1;
            assert!(attempts < 20, "write {i} keeps failing: {e}");
        }
        retries += attempts;
    }
    println!(
        "50 writes with 5 ms delay and 10 % loss: {:?} ({:?} each), {retries} client retries",
        started.elapsed(),
        started.elapsed() / 50
    );
    c.router.faults().heal_all();
    for n in &c.nodes {
        let mut state = n.state();
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| (1_000..1_050).all(|id| s.members.contains_key(&id))),
        )
        .await
        .expect("every write reaches every node")
        .unwrap();
    }
    let leader_id = leader_of(&c.nodes).unwrap();
    let leader = c.nodes.iter().find(|n| n.id == leader_id).unwrap();

    // Cut the leader from one follower: the other one still makes a quorum.
    let cut = c.nodes.iter().find(|n| n.id != leader_id).unwrap();
    c.router.faults().cut(leader_id, cut.id);
    assert_eq!(
        leader.propose(member(2_000)).await.unwrap(),
        Applied::Changed
    );
    assert!(!cut.state().borrow().members.contains_key(&2_000));
    c.router.faults().heal_all();
    has_member(
        cut,
        2_000,
        Duration::from_secs(5),
        "the cut follower catches up once the link heals",
    )
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn snapshots_and_purging_keep_the_disk_bounded_under_steady_writes() {
    let lone = LoneNode::new(snapshotting(200, 50));
    let node = lone.lead().await;
    let size = || {
        std::fs::metadata(lone.dir.path().join("raft.redb"))
            .unwrap()
            .len()
    };
    // Steady writes that overwrite the same record, so the state itself does not grow: whatever
    // grows on disk would be log.
    let write_rounds = |from: u64, to: u64| {
        let node = node.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..16 {
                let node = node.clone();
                tasks.spawn(async move {
                    for i in (from + w..to).step_by(16) {
                        node.propose(Command::UpsertMember(Member {
                            id: 1,
                            region: "eu".into(),
                            raft_addr: String::new(),
                            http_addr: format!("10.0.0.1:{i}"),
                            mesh_addr: String::new(),
                            started_unix_ms: 0,
                            snapshot_format: 0,
                        }))
                        .await
                        .unwrap();
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        }
    };
    write_rounds(0, 1_000).await;
    let after_1k = size();
    let mut max_kept = 0;
    for round in 1..4 {
        write_rounds(round * 1_000, (round + 1) * 1_000).await;
        let s = node.status();
        let kept = s.last_log_index.unwrap() - s.purged_index.unwrap_or(0);
        max_kept = max_kept.max(kept);
    }
    let after_4k = size();
    println!(
        "raft.redb: {after_1k} bytes after 1,000 writes, {after_4k} after 4,000; at most {max_kept} entries on disk"
    );
    assert!(
        max_kept <= 200 + 50 + 200,
        "the log on disk stays within a snapshot interval plus what is kept: {max_kept}"
    );
    assert!(
        after_4k <= after_1k * 2,
        "four times the writes must not grow the file with them: {after_1k} -> {after_4k}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_linearizable_read_never_answers_without_a_committed_write() {
    let c = cluster(3).await;
    let leader = c.leader_node().await;
    let follower = c.nodes.iter().find(|n| n.id != leader.id).unwrap();
    for n in &c.nodes {
        let (_, index) = n.read_linearizable().await.unwrap();
        assert!(index > 0, "node {} read at index {index}", n.id);
    }
    // The follower stops getting the leader's log (it still follows the leader and forwards
    // to it), and a write commits without it.
    c.router.faults().hold_entries(leader.id, follower.id);
    assert_eq!(
        leader.propose(member(3_000)).await.unwrap(),
        Applied::Changed
    );
    assert!(
        !follower.state().borrow().members.contains_key(&3_000),
        "the follower has not seen the write"
    );
    // A read there gets the leader's read index, which covers the write, and cannot answer
    // until the follower has applied that far: it waits, then says it is behind. (A read
    // answered from the follower's own state would come back at once, without the write.)
    // While it waits the follower may also stop hearing heartbeats (openraft sends them on
    // the replication stream, which backs off after a lost append) and start an election; it
    // may then fail otherwise, or answer once another leader has sent it the write.
    assert_eq!(follower.status().leader, Some(leader.id));
    let read = Instant::now();
    match tokio::time::timeout(Duration::from_secs(5), follower.read_linearizable()).await {
        Ok(Ok((state, index))) => {
            assert!(
                state.members.contains_key(&3_000),
                "a follower without the write answered a linearizable read at index {index}"
            );
            println!("the follower's read answered with the write, from another leader");
        }
        Ok(Err(e)) => {
            println!(
                "behind the leader's log, the follower's read failed after {:?}: {e}",
                read.elapsed()
            );
        }
        Err(_) => panic!("the follower's read did not end within 5 s"),
    }
    c.router.faults().heal_all();
    let started = Instant::now();
    let state = loop {
        match follower.read_linearizable().await {
            Ok((state, _)) => break state,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "no read after the link healed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(state.members.contains_key(&3_000));
    c.shutdown().await;
}

/// The body of the snapshot in `dir` (its meta is length-prefixed JSON before it).
fn snapshot_body(dir: &std::path::Path) -> Vec<u8> {
    let file = std::fs::read(dir.join("state").join("snapshot.bin")).unwrap();
    let meta_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    file[8 + meta_len..].to_vec()
}

#[tokio::test]
async fn a_fresh_node_installs_the_leaders_compressed_snapshot() {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    let router = LocalRouter::new();
    let timings = snapshotting(50, 0);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let one = lead_alone(dirs[0].path(), timings, &router).await;
    // Node 1 says it reads compressed snapshots, as a node of this version does at start; then
    // enough writes that the log before them is purged behind a snapshot.
    let mut me = Member {
        id: 1,
        region: "eu".into(),
        raft_addr: String::new(),
        http_addr: String::new(),
        mesh_addr: String::new(),
        started_unix_ms: 0,
        snapshot_format: meridian_cluster::state_machine::SNAPSHOT_FORMAT,
    };
    for i in 0..120 {
        me.http_addr = format!("10.0.0.1:{i}");
        one.propose(Command::UpsertMember(me.clone()))
            .await
            .unwrap();
    }
    wait_until(
        "a snapshot with the log purged behind it",
        Duration::from_secs(5),
        || {
            let s = one.status();
            s.snapshot_index.is_some() && s.purged_index.is_some()
        },
    )
    .await;
    assert!(
        snapshot_body(dirs[0].path()).starts_with(&ZSTD_MAGIC),
        "every member reads compressed snapshots: the snapshot is compressed"
    );
    // Node 2 starts empty; the log it would need is gone, so it is sent the snapshot.
    let two = ClusterNode::start(2, dirs[1].path(), timings, router.transport(2))
        .await
        .unwrap();
    router.add(two.clone());
    one.add_learner(2, String::new()).await.unwrap();
    let target = one.status().applied_index;
    wait_until("node 2 caught up", Duration::from_secs(5), || {
        two.status().applied_index >= target
    })
    .await;
    assert_eq!(*two.state().borrow(), *one.state().borrow());
    assert!(
        snapshot_body(dirs[1].path()).starts_with(&ZSTD_MAGIC),
        "node 2 installed the compressed snapshot"
    );
    for n in [one, two] {
        n.shutdown().await;
    }
}
