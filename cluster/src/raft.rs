//! A node's Raft member: openraft over our storage, with the network behind [`Transport`].
//!
//! The transport trait is the seam between Raft and the network: [`quic`] is the real one (QUIC
//! with mutual TLS), [`local`] connects nodes inside one process for tests, and [`faults`] wraps
//! any transport to add delay, drop messages and partition nodes.
//!
//! Membership: a cluster boots from its initial voters; a new node joins as a learner
//! ([`ClusterNode::add_learner`]), is promoted ([`ClusterNode::promote`]) and can be removed
//! ([`ClusterNode::remove`]). Every node's Raft address travels in the membership itself, so any
//! future leader can reach every member. Writes and membership changes made on a follower are
//! forwarded to the leader.

pub mod faults;
pub mod local;
mod network;
pub mod quic;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use meridian_policy::clock::WallClock;
use meridian_proto::cluster::{Applied, ClusterState, Command, NodeId, Proposal};
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InstallSnapshotError,
    NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ChangeMembers, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::TypeConfig;
use crate::state_machine::{SpareCounts, StateMachine};
use crate::store::LogStore;
use network::Network;
pub use network::NoPeers;

pub type Raft = openraft::Raft<TypeConfig>;

/// Raft timing. The defaults survive cross-region round trips; tests use [`RaftTimings::fast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTimings {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Take a snapshot every this many applied entries ...
    pub snapshot_every: u64,
    /// ... then purge the log up to this many entries before it (kept for slow followers).
    pub keep_after_snapshot: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(250),
            election_min: Duration::from_millis(1000),
            election_max: Duration::from_millis(2000),
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
        }
    }
}

impl RaftTimings {
    /// Loopback timings for tests.
    pub fn fast() -> Self {
        Self {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(150),
            election_max: Duration::from_millis(300),
            snapshot_every: 1_000,
            keep_after_snapshot: 100,
        }
    }
}

/// A message could not reach its target (the sender's view: retry later or elsewhere).
#[derive(Debug, Clone, thiserror::Error)]
#[error("node {target} is unreachable: {reason}")]
pub struct Unreached {
    pub target: NodeId,
    pub reason: String,
}

/// What the cluster answers when a proposal fails.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is known; the cluster may have lost quorum")]
    NoLeader,
    #[error(transparent)]
    Unreached(#[from] Unreached),
    #[error("the proposal was rejected: {0}")]
    Rejected(String),
    /// The node a request was forwarded to had stopped leading before it got there (the
    /// request was not carried out); `leader` is the leader that node knew of.
    #[error("the node the request was forwarded to no longer leads (leader now: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("raft failed: {0}")]
    Fatal(String),
    /// A linearizable read: this node did not apply the log up to the leader's read index in
    /// time.
    #[error("this node did not catch up with the leader's read index {index} in time")]
    Behind { index: u64 },
    /// A linearizable read: no leader gave its read index in time (none known, no quorum to
    /// confirm it, or the forward stalled).
    #[error("no leader gave its read index within {0:?}")]
    NoReadIndex(Duration),
    /// The node that took a write lost its quorum before the write was committed: it leads
    /// but no quorum has acknowledged it for longer than the given time, or it stopped
    /// leading and the write has been waiting that long. The entry stays in that node's log
    /// and may still be committed (by it, or by a later leader that holds the entry), so a
    /// caller retrying must be able to see its own write twice (the grant and flush commands
    /// are).
    #[error(
        "the write was not committed: the node that took it has had no quorum for over \
         {0:?} (it may still be committed, if a quorum returns)"
    )]
    NoQuorum(Duration),
}

/// How many times one request is forwarded, to successive leaders, before its last answer stands.
pub const MAX_FORWARDS: u32 = 3;

/// The most a proposal may weigh, JSON-encoded as it travels: a larger one is refused with
/// [`ClusterError::Rejected`] before it reaches the log. Usage flushes split themselves well
/// under it.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// The entries of one AppendEntries message weigh at most this, encoded, beyond its first
/// entry (which [`MAX_ENTRY_BYTES`] bounds): a longer backlog goes a part at a time, each
/// answered as a partial success so that the leader sends the next. So every message fits the
/// transport's 16 MiB frame, and is sent and stored well within the heartbeat interval that
/// bounds each AppendEntries call (a whole backlog of large entries in one message never would
/// be, and the follower would never catch up).
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The first part of `rpc` whose entries weigh at most `max` bytes encoded (at least one
/// entry), and whether entries were left out. The part announces no commit beyond its own last
/// entry (a follower may only mark committed what it holds; whatever the leader committed up
/// to there is committed).
fn first_part(
    mut rpc: AppendEntriesRequest<TypeConfig>,
    max: usize,
) -> (AppendEntriesRequest<TypeConfig>, bool) {
    // Entries are at most MAX_ENTRY_BYTES each: this many always fit without measuring.
    if rpc.entries.len() <= (max / MAX_ENTRY_BYTES).max(1) && max >= MAX_ENTRY_BYTES {
        return (rpc, false);
    }
    let mut bytes = 0;
    let mut keep = 0;
    for entry in &rpc.entries {
        let size = serde_json::to_vec(entry).map_or(MAX_ENTRY_BYTES, |v| v.len());
        if keep > 0 && bytes + size > max {
            break;
        }
        bytes += size;
        keep += 1;
    }
    if keep == rpc.entries.len() {
        return (rpc, false);
    }
    rpc.entries.truncate(keep);
    if let (Some(last), Some(commit)) = (rpc.entries.last(), rpc.leader_commit)
        && commit.index > last.log_id.index
    {
        rpc.leader_commit = Some(last.log_id);
    }
    (rpc, true)
}

/// What a node hands to the leader because only the leader can do it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forwarded {
    Propose(Box<Proposal>),
    /// Adds node `id`, reachable at `raft_addr`, as a learner: it receives the log but does not
    /// vote.
    AddLearner {
        id: NodeId,
        raft_addr: String,
    },
    /// Makes learner `id` a voter.
    Promote {
        id: NodeId,
    },
    /// Takes node `id` (voter or learner) out of the cluster and out of the member table.
    Remove {
        id: NodeId,
    },
    /// Asks the leader for its read index ([`Applied::ReadIndex`]), confirming with a quorum
    /// that it still leads: what a linearizable read waits to have applied.
    ReadIndex,
}

/// Why this node did not carry out a request itself.
enum Declined {
    /// It does not lead; `leader` is the leader it knows of.
    Forward(Option<NodeId>),
    Failed(ClusterError),
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> for Declined {
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Self {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                Declined::Forward(f.leader_id)
            }
            RaftError::APIError(e) => Declined::Failed(ClusterError::Rejected(e.to_string())),
            RaftError::Fatal(e) => Declined::Failed(ClusterError::Fatal(e.to_string())),
        }
    }
}

impl From<RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>> for Declined {
    fn from(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> Self {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
                Declined::Forward(f.leader_id)
            }
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => Declined::Failed(
                ClusterError::Rejected(format!("no quorum confirmed the leader: {q}")),
            ),
            RaftError::Fatal(e) => Declined::Failed(ClusterError::Fatal(e.to_string())),
        }
    }
}

/// A transport call's result: the remote node's answer, or why the message did not get there.
pub type Reply<T, E = RaftError<NodeId>> = BoxFuture<'static, Result<Result<T, E>, Unreached>>;

/// How Raft messages (and proposals forwarded to the leader) reach other nodes.
pub trait Transport: Send + Sync + 'static {
    fn append_entries(
        &self,
        target: NodeId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Reply<AppendEntriesResponse<NodeId>>;

    fn vote(&self, target: NodeId, rpc: VoteRequest<NodeId>) -> Reply<VoteResponse<NodeId>>;

    fn install_snapshot(
        &self,
        target: NodeId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Reply<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

    /// Hands a request to `target` (the leader) to carry out ([`ClusterNode::execute`]).
    fn forward(&self, target: NodeId, request: Forwarded) -> Reply<Applied, ClusterError>;

    /// Tells the transport where node `id`'s Raft endpoint is (from the membership). Transports
    /// that route by id alone ignore it.
    fn learn(&self, _id: NodeId, _raft_addr: &str) {}
}

/// Where the cluster stands, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    /// Known committed (this node's view: a follower learns it with the next append).
    pub commit_index: Option<u64>,
    /// Applied to the state machine.
    pub applied_index: Option<u64>,
    /// The log up to here is in the snapshot ...
    pub snapshot_index: Option<u64>,
    /// ... and up to here it has been purged from disk.
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// On the leader: milliseconds since a quorum last acknowledged it (`None` elsewhere, or
    /// when no quorum has answered yet).
    pub millis_since_quorum_ack: Option<u64>,
    /// Whether this node is in touch with a quorum: it follows a known leader, or it leads and
    /// a quorum acknowledged it within two election timeouts. Without quorum the node keeps
    /// serving from its last applied state, and writes wait or fail.
    pub quorum: bool,
}

/// This node's Raft member.
#[derive(Clone)]
pub struct ClusterNode {
    pub id: NodeId,
    raft: Raft,
    /// How long a proposal waits for a leader to become known (two election timeouts).
    leader_wait: Duration,
    /// How often a write that has not come back looks whether it still can (a heartbeat).
    write_check: Duration,
    state: watch::Receiver<Arc<ClusterState>>,
    transport: Arc<dyn Transport>,
    /// Committed index + 1 (0: nothing committed yet), as the log store last saved it.
    committed: Arc<AtomicU64>,
    /// The wall clock its proposals are stamped with (the node's: see [`ClusterNode::with_clock`]).
    clock: WallClock,
    spares: Arc<SpareCounts>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Opens the node's storage in `dir` and starts its Raft member.
    pub async fn start(
        id: NodeId,
        dir: &Path,
        timings: RaftTimings,
        transport: Arc<dyn Transport>,
    ) -> Result<Self, ClusterError> {
        let fatal = |e: &dyn std::fmt::Display| ClusterError::Fatal(e.to_string());
        std::fs::create_dir_all(dir).map_err(|e| fatal(&e))?;
        let log = LogStore::open(&dir.join("raft.redb")).map_err(|e| fatal(&e))?;
        let committed = log.committed_index();
        let sm = StateMachine::open(&dir.join("state")).map_err(|e| fatal(&e))?;
        let state = sm.subscribe();
        let spares = sm.spares();
        let config = Config {
            cluster_name: "meridian".into(),
            heartbeat_interval: timings.heartbeat.as_millis() as u64,
            election_timeout_min: timings.election_min.as_millis() as u64,
            election_timeout_max: timings.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(timings.snapshot_every),
            max_in_snapshot_log_to_keep: timings.keep_after_snapshot,
            ..Config::default()
        }
        .validate()
        .map_err(|e| fatal(&e))?;
        let raft = Raft::new(
            id,
            Arc::new(config),
            Network(Arc::clone(&transport)),
            log,
            sm,
        )
        .await
        .map_err(|e| fatal(&e))?;
        Ok(Self {
            id,
            raft,
            leader_wait: timings.election_max * 2,
            write_check: timings.heartbeat,
            state,
            transport,
            committed,
            clock: WallClock::system(),
            spares,
        })
    }

    /// Stamps its proposals with `clock` instead of the system's: the clock the rest of the
    /// node places windows by, so that the ledger and the node agree on the time.
    pub fn with_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// Now on the clock its proposals are stamped with, in Unix ms (what "today" is for the
    /// roll-ups it keeps).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The Raft handle, for the transport's receiving side.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Makes `voters` (this node among them), with their Raft addresses, the initial cluster:
    /// once, on a fresh cluster; later calls are refused by openraft and ignored here.
    pub async fn initialize(&self, voters: &[(NodeId, String)]) -> Result<(), ClusterError> {
        let members: BTreeMap<NodeId, BasicNode> = voters
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ClusterError::Fatal(e.to_string())),
        }
    }

    /// Waits until `leader` is the known leader, or `timeout` passes.
    pub async fn wait_for_leader(
        &self,
        leader: NodeId,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        self.raft
            .wait(Some(timeout))
            .current_leader(leader, "waiting for a leader")
            .await
            .map(|_| ())
            .map_err(|_| ClusterError::NoLeader)
    }

    /// The applied state; the hot path reads this, never Raft.
    pub fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    /// Proposes a command, stamped with this node's clock; a follower forwards it to the leader.
    /// Resolves once it is committed and applied on the leader.
    pub async fn propose(&self, command: Command) -> Result<Applied, ClusterError> {
        let proposal = Proposal {
            at_unix_ms: self.clock.now_ms(),
            proposer: self.id,
            command,
        };
        let size = serde_json::to_vec(&proposal).map_or(0, |v| v.len());
        if size > MAX_ENTRY_BYTES {
            return Err(ClusterError::Rejected(format!(
                "the command encodes to {size} bytes, over the {MAX_ENTRY_BYTES} one log entry may hold"
            )));
        }
        self.submit(Forwarded::Propose(Box::new(proposal))).await
    }

    /// The replicated state for a linearizable read: the leader's read index (forwarded to the
    /// leader if this node does not lead; the leader confirms with a quorum that it still
    /// leads; the whole ask bounded by three times two election timeouts), then this node's
    /// state once it has applied the log that far (waiting up to two election timeouts). So a
    /// read that starts after a write was acknowledged, on any node, sees that write. Returns
    /// the state and the read index (the state is at least there).
    pub async fn read_linearizable(&self) -> Result<(Arc<ClusterState>, u64), ClusterError> {
        let within = self.leader_wait * 3;
        let asked = tokio::time::timeout(within, self.submit(Forwarded::ReadIndex));
        let index = match asked
            .await
            .map_err(|_| ClusterError::NoReadIndex(within))??
        {
            Applied::ReadIndex { index } => index,
            other => {
                return Err(ClusterError::Rejected(format!(
                    "asked for a read index, the leader answered {other:?}"
                )));
            }
        };
        (self.raft.wait(Some(self.leader_wait)))
            .applied_index_at_least(Some(index), "the read index")
            .await
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => ClusterError::Behind { index },
                e @ openraft::metrics::WaitError::ShuttingDown => {
                    ClusterError::Fatal(e.to_string())
                }
            })?;
        Ok((self.state().borrow().clone(), index))
    }

    /// Adds node `id` as a learner (see [`Forwarded::AddLearner`]).
    pub async fn add_learner(
        &self,
        id: NodeId,
        raft_addr: String,
    ) -> Result<Applied, ClusterError> {
        self.submit(Forwarded::AddLearner { id, raft_addr }).await
    }

    /// Makes learner `id` a voter.
    pub async fn promote(&self, id: NodeId) -> Result<Applied, ClusterError> {
        self.submit(Forwarded::Promote { id }).await
    }

    /// Takes node `id` out of the cluster.
    pub async fn remove(&self, id: NodeId) -> Result<Applied, ClusterError> {
        self.submit(Forwarded::Remove { id }).await
    }

    /// Carries out `request` here if this node leads, else forwards it to the leader. While no
    /// leader is known (an election is under way) it waits up to two election timeouts. If the
    /// leader it forwarded to fails, no longer leads when the request arrives, or another node
    /// takes over meanwhile, it forwards again to the new leader (at most [`MAX_FORWARDS`] times
    /// in all): a forwarded request is applied at least once, so a request whose first leader
    /// died after committing it may be applied twice (as with any client retry).
    pub async fn submit(&self, request: Forwarded) -> Result<Applied, ClusterError> {
        let mut waited = false;
        let mut forwards = 0;
        loop {
            let leader = match self.execute_here(&request).await {
                Ok(applied) => return Ok(applied),
                Err(Declined::Forward(leader)) => leader,
                Err(Declined::Failed(e)) => return Err(e),
            };
            match leader {
                Some(leader) if leader != self.id => {
                    if let Some(node) = self.membership_node(leader) {
                        self.transport.learn(leader, &node.addr);
                    }
                    let forwarded = self.transport.forward(leader, request.clone());
                    forwards += 1;
                    if forwards == MAX_FORWARDS {
                        return forwarded.await?;
                    }
                    let mut metrics = self.raft.metrics();
                    let replaced = async move {
                        let replaced = metrics
                            .wait_for(|m| m.current_leader.is_some_and(|l| l != leader))
                            .await
                            .is_ok();
                        if !replaced {
                            // The Raft member is shutting down: let the forward finish.
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        reply = forwarded => match reply {
                            Ok(Err(ClusterError::NotLeader { leader: next })) => {
                                // Not carried out there. Unless that node still names the one
                                // this node forwarded to (a stale view; try again at once), wait
                                // until this node knows of another leader (an election may be
                                // under way).
                                tracing::debug!(?next, "the node forwarded to does not lead");
                                if next != Some(leader) {
                                    self.wait_for_another_leader(leader).await;
                                }
                            }
                            Ok(reply) => return reply,
                            Err(unreached) => {
                                tracing::debug!(%unreached, "forwarding to the leader failed; waiting for another");
                                self.wait_for_another_leader(leader).await;
                            }
                        },
                        () = replaced => {}
                    }
                }
                _ if waited => return Err(ClusterError::NoLeader),
                _ => {
                    waited = true;
                    let _ = self
                        .raft
                        .wait(Some(self.leader_wait))
                        .metrics(|m| m.current_leader.is_some(), "a known leader")
                        .await;
                }
            }
        }
    }

    /// Waits (up to two election timeouts) until this node knows of a leader other than
    /// `leader`.
    async fn wait_for_another_leader(&self, leader: NodeId) {
        let _ = self
            .raft
            .wait(Some(self.leader_wait))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != leader),
                "another leader",
            )
            .await;
    }

    /// Carries out a request forwarded by a peer (one hop: it is not forwarded again; if this
    /// node no longer leads, it says so and the sender forwards to the next leader).
    pub async fn execute(&self, request: &Forwarded) -> Result<Applied, ClusterError> {
        self.execute_here(request).await.map_err(|e| match e {
            Declined::Forward(leader) => ClusterError::NotLeader { leader },
            Declined::Failed(e) => e,
        })
    }

    async fn execute_here(&self, request: &Forwarded) -> Result<Applied, Declined> {
        match request {
            Forwarded::Propose(p) => Ok(self.write((**p).clone()).await?.data),
            Forwarded::ReadIndex => {
                let (read, _applied) = self.raft.get_read_log_id().await?;
                Ok(Applied::ReadIndex {
                    index: read.map_or(0, |l| l.index),
                })
            }
            Forwarded::AddLearner { id, raft_addr } => {
                if self.membership_node(*id).is_some() {
                    return Ok(Applied::Unchanged);
                }
                let node = BTreeMap::from([(*id, BasicNode::new(raft_addr))]);
                self.change_membership(ChangeMembers::AddNodes(node))
                    .await?;
                Ok(Applied::Changed)
            }
            Forwarded::Promote { id } => {
                let m = self.raft.metrics().borrow().membership_config.clone();
                match promotion(m.membership(), *id) {
                    Promotion::Done => Ok(Applied::Unchanged),
                    Promotion::NotFound => Ok(Applied::NotFound),
                    Promotion::Change(change) => {
                        self.change_membership(change).await?;
                        Ok(Applied::Changed)
                    }
                }
            }
            Forwarded::Remove { id } => {
                let m = self.raft.metrics().borrow().membership_config.clone();
                let change = if m.membership().voter_ids().any(|v| v == *id) {
                    Some(ChangeMembers::RemoveVoters(BTreeSet::from([*id])))
                } else if m.membership().get_node(id).is_some() {
                    Some(ChangeMembers::RemoveNodes(BTreeSet::from([*id])))
                } else {
                    None
                };
                match change {
                    Some(change) => self.change_membership(change).await?,
                    // Out of the membership but still in the member table: an earlier try
                    // (forwarded again after a leader change) got halfway. Finish it.
                    None if self.state().borrow().members.contains_key(id) => {}
                    None => return Ok(Applied::NotFound),
                }
                self.write(Proposal {
                    at_unix_ms: self.clock.now_ms(),
                    proposer: self.id,
                    command: Command::RemoveMember { id: *id },
                })
                .await?;
                Ok(Applied::Changed)
            }
        }
    }

    /// Appends `proposal` on this node and waits until it is committed and applied (see
    /// [`Self::unless_quorum_lost`]).
    async fn write(
        &self,
        proposal: Proposal,
    ) -> Result<openraft::raft::ClientWriteResponse<TypeConfig>, Declined> {
        Ok(self
            .unless_quorum_lost(self.raft.client_write(proposal))
            .await??)
    }

    /// `write`'s answer, or [`ClusterError::NoQuorum`] once the write has waited
    /// `leader_wait` and this node leads but no quorum has acknowledged it for as long, or
    /// the write has waited twice that on a node deposed meanwhile. openraft's leader
    /// does not step down when its followers go away, and a deposed one that hears from no
    /// new leader keeps its writes; either would wait for as long as the others stay away.
    /// Looked at every heartbeat, so a write fails about `leader_wait` after its sending or
    /// after the last acknowledgement, whichever is later: well before a forwarding
    /// follower gives up on it. Every write gets `leader_wait` to commit, so a leader whose
    /// acknowledgements come late under load does not fail writes that would commit. (A
    /// write that a leader with a quorum does not commit, e.g. because a follower's disk
    /// fails every append, still waits.)
    async fn unless_quorum_lost<T>(
        &self,
        write: impl std::future::Future<Output = T>,
    ) -> Result<T, Declined> {
        let sent = tokio::time::Instant::now();
        tokio::pin!(write);
        loop {
            if let Ok(written) = tokio::time::timeout(self.write_check, &mut write).await {
                return Ok(written);
            }
            if self.lost_quorum(sent.elapsed()) {
                return Err(Declined::Failed(ClusterError::NoQuorum(self.leader_wait)));
            }
        }
    }

    /// Whether a write this node took `waited` ago is given up for want of a quorum.
    fn lost_quorum(&self, waited: Duration) -> bool {
        if waited < self.leader_wait {
            return false;
        }
        let status = self.status();
        if status.leader == Some(self.id) {
            !status.quorum
        } else {
            // Deposed while the write waited: the new leader's log settles it (committed, or
            // cut off here, and then forwarded to that leader) within an election or two. Only
            // a node that hears from no new leader for twice as long gives it up.
            waited >= self.leader_wait * 2
        }
    }

    /// Makes a membership change on this node (the leader) and waits until it is committed. A
    /// change that arrives while another is still being committed waits for that one first
    /// (up to two election timeouts). Removed voters do not stay on as learners.
    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, BasicNode>,
    ) -> Result<(), Declined> {
        let deadline = tokio::time::Instant::now() + self.leader_wait;
        loop {
            match (self.unless_quorum_lost(self.raft.change_membership(change.clone(), false)))
                .await?
            {
                Ok(resp) => {
                    while self.committed.load(Ordering::Relaxed) <= resp.log_id.index
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    return Ok(());
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The change in progress is one this leader could not commit for want of a
                // quorum (an earlier try that failed so): say that, not that one is in progress.
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if self.lost_quorum(self.leader_wait) => {
                    return Err(Declined::Failed(ClusterError::NoQuorum(self.leader_wait)));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `f` of the members (voters and learners) as this node knows them now, read in place.
    pub(crate) fn with_membership<R>(
        &self,
        f: impl FnOnce(&openraft::Membership<NodeId, BasicNode>) -> R,
    ) -> R {
        f(self.raft.metrics().borrow().membership_config.membership())
    }

    /// Node `id` as the current membership records it (its Raft address).
    fn membership_node(&self, id: NodeId) -> Option<BasicNode> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// What became of the state versions its applies replaced (see
    /// [`crate::state_machine`]).
    pub fn spares(&self) -> &SpareCounts {
        &self.spares
    }

    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        ClusterStatus {
            id: self.id,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            commit_index: self.committed.load(Ordering::Relaxed).checked_sub(1),
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            quorum: match m.current_leader {
                Some(l) if l == self.id => m
                    .millis_since_quorum_ack
                    .is_some_and(|ms| u128::from(ms) <= self.leader_wait.as_millis()),
                Some(_) => true,
                None => false,
            },
        }
    }

    /// Stops the Raft member (its storage stays on disk).
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// What promoting a node to voter takes, given the membership now.
#[derive(Debug, PartialEq, Eq)]
enum Promotion {
    /// A voter already, in a settled (uniform) config.
    Done,
    /// Neither a voter nor a learner.
    NotFound,
    Change(ChangeMembers<NodeId, BasicNode>),
}

fn promotion(m: &openraft::Membership<NodeId, BasicNode>, id: NodeId) -> Promotion {
    let configs = m.get_joint_config();
    let settled = configs.len() <= 1;
    if settled && m.voter_ids().any(|v| v == id) {
        return Promotion::Done;
    }
    if m.get_node(&id).is_none() {
        return Promotion::NotFound;
    }
    // A change cut off between its joint and its final config (its leader died in between)
    // leaves the joint config, in which `id` already counts as a voter; openraft does not
    // finish it by itself. When the last set holds `id` (a promotion was under way), adding
    // `id` to it is that set, reached from the joint config in one step: the change is
    // finished. Otherwise it is a promotion like any other, from the last set.
    Promotion::Change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
}

#[cfg(test)]
mod promotion_tests {
    use super::*;

    fn membership(
        configs: Vec<BTreeSet<NodeId>>,
        nodes: &[NodeId],
    ) -> openraft::Membership<NodeId, BasicNode> {
        let nodes: BTreeMap<NodeId, BasicNode> =
            nodes.iter().map(|id| (*id, BasicNode::new(""))).collect();
        openraft::Membership::new(configs, nodes)
    }

    #[test]
    fn a_promotion_cut_off_in_its_joint_config_is_finished_not_called_done() {
        let old = BTreeSet::from([1, 2, 3]);
        let new = BTreeSet::from([1, 2, 3, 4]);
        let joint = membership(vec![old.clone(), new.clone()], &[1, 2, 3, 4]);
        assert!(
            joint.voter_ids().any(|v| v == 4),
            "4 counts as a voter already"
        );
        assert_eq!(
            promotion(&joint, 4),
            Promotion::Change(ChangeMembers::AddVoterIds(BTreeSet::from([4])))
        );
        // Settled with 4 in it: nothing to do. A learner: promoted. Unknown: not found.
        assert_eq!(
            promotion(&membership(vec![new], &[1, 2, 3, 4]), 4),
            Promotion::Done
        );
        let with_learner = membership(vec![old], &[1, 2, 3, 4]);
        assert_eq!(
            promotion(&with_learner, 4),
            Promotion::Change(ChangeMembers::AddVoterIds(BTreeSet::from([4])))
        );
        assert_eq!(promotion(&with_learner, 9), Promotion::NotFound);
    }
}

#[cfg(test)]
mod size_tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

    use super::*;

    fn entry(index: u64, bytes: usize) -> openraft::Entry<TypeConfig> {
        openraft::Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                at_unix_ms: index,
                proposer: 1,
                command: Command::RemoveTenant {
                    id: "x".repeat(bytes),
                },
            }),
        }
    }

    #[test]
    fn a_large_append_goes_a_part_at_a_time_and_every_part_fits() {
        let log = |i| Some(LogId::new(CommittedLeaderId::new(1, 1), i));
        // As the leader does with partial successes: send the first part, go on after it.
        let mut prev = log(9);
        let mut next = 10;
        let mut sent = Vec::new();
        while next < 40 {
            let rpc = AppendEntriesRequest::<TypeConfig> {
                vote: Vote::new_committed(1, 1),
                prev_log_id: prev,
                entries: (next..40).map(|i| entry(i, 400_000)).collect(),
                leader_commit: log(35),
            };
            let (part, more) = first_part(rpc, MAX_PAYLOAD_BYTES);
            let bytes: usize = part
                .entries
                .iter()
                .map(|e| serde_json::to_vec(e).expect("encodes").len())
                .sum();
            assert!(bytes <= MAX_PAYLOAD_BYTES, "a part weighs {bytes}");
            assert!(!part.entries.is_empty());
            assert_eq!(part.prev_log_id, prev, "each part follows the one before");
            let last = part.entries.last().expect("not empty").log_id;
            let commit = part.leader_commit.expect("a commit").index;
            if more {
                assert!(commit <= last.index, "a part commits only what it holds");
            } else {
                assert_eq!(commit, 35, "the last part carries the leader's commit");
            }
            sent.extend(part.entries.iter().map(|e| e.log_id.index));
            prev = Some(last);
            next = last.index + 1;
        }
        assert_eq!(
            sent,
            (10..40).collect::<Vec<_>>(),
            "every entry once, in order"
        );
        // A few small entries go as they came.
        let small = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: log(9),
            entries: (10..14).map(|i| entry(i, 100)).collect(),
            leader_commit: log(12),
        };
        let (part, more) = first_part(small, MAX_PAYLOAD_BYTES);
        assert!(!more);
        assert_eq!(part.entries.len(), 4);
        // An entry as large as allowed goes alone.
        let big = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: log(9),
            entries: (10..12).map(|i| entry(i, MAX_ENTRY_BYTES - 200)).collect(),
            leader_commit: log(11),
        };
        let (part, more) = first_part(big, MAX_PAYLOAD_BYTES);
        assert!(more);
        assert_eq!(part.entries.len(), 1);
    }

    #[tokio::test]
    async fn a_command_over_the_entry_limit_is_refused_with_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = ClusterNode::start(1, dir.path(), RaftTimings::default(), Arc::new(NoPeers))
            .await
            .expect("a node");
        let big = Command::RemoveTenant {
            id: "x".repeat(MAX_ENTRY_BYTES),
        };
        match node.propose(big).await {
            Err(ClusterError::Rejected(why)) => assert!(why.contains("one log entry"), "{why}"),
            other => panic!("not refused: {other:?}"),
        }
    }
}
