//! Fault injection for any [`Transport`]: tests wrap a node's transport to delay messages, drop
//! a share of them, cut the links between two nodes or isolate a node completely. The wrapped
//! transport sees only the messages that get through; a dropped or partitioned message fails
//! the way a lost packet does for the sender (unreachable), never silently.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use meridian_proto::cluster::{Applied, NodeId};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{ClusterError, Forwarded, Reply, Transport, Unreached};
use crate::TypeConfig;

/// The faults in force, shared by every transport wrapped with [`Faults::wrap`].
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    delay: Duration,
    /// Messages dropped per thousand.
    drop_per_mille: u32,
    isolated: HashSet<NodeId>,
    /// Cut links, stored as (lower id, higher id): both directions.
    cut: HashSet<(NodeId, NodeId)>,
    /// (from, to): log entries and snapshots from `from` to `to` are lost; heartbeats, votes
    /// and forwards get through.
    held: HashSet<(NodeId, NodeId)>,
    /// The next request forwarded to this node goes to the other instead.
    misdirect: Option<(NodeId, NodeId)>,
    /// Forwards misdirected so far.
    misdirected: u64,
}

impl Faults {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// `inner`, as node `from` sends through it, subject to these faults.
    pub fn wrap(self: &Arc<Self>, from: NodeId, inner: Arc<dyn Transport>) -> Arc<dyn Transport> {
        Arc::new(Faulty {
            faults: Arc::clone(self),
            from,
            inner,
        })
    }

    /// Delays every message by `delay` (each way of a call counts once: the request waits).
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Drops `per_mille` of every thousand messages, at random.
    pub fn set_drop_rate(&self, per_mille: u32) {
        self.lock().drop_per_mille = per_mille.min(1000);
    }

    /// Drops every message to or from `id` until [`Faults::heal`].
    pub fn isolate(&self, id: NodeId) {
        self.lock().isolated.insert(id);
    }

    pub fn heal(&self, id: NodeId) {
        self.lock().isolated.remove(&id);
    }

    /// Drops every message between `a` and `b`, both ways, until [`Faults::heal_all`].
    pub fn cut(&self, a: NodeId, b: NodeId) {
        self.lock().cut.insert((a.min(b), a.max(b)));
    }

    /// Loses every log entry and snapshot `from` sends `to` until [`Faults::heal_all`], while
    /// the rest gets through: `to` follows `from` (it forwards to it) but falls behind its
    /// log. Heartbeats get through but come late: openraft sends them on the replication
    /// stream, which backs off (half a second) after each lost append, so `to` may start an
    /// election after a while.
    pub fn hold_entries(&self, from: NodeId, to: NodeId) {
        self.lock().held.insert((from, to));
    }

    /// Delivers the next request forwarded to `leader` to `instead`, as if the sender's view of
    /// the leader were out of date (the other node stepped up meanwhile, or this one down).
    pub fn misdirect_next_forward(&self, leader: NodeId, instead: NodeId) {
        self.lock().misdirect = Some((leader, instead));
    }

    /// How many forwards [`Faults::misdirect_next_forward`] has sent astray.
    pub fn misdirected(&self) -> u64 {
        self.lock().misdirected
    }

    /// Removes every fault.
    pub fn heal_all(&self) {
        *self.lock() = State::default();
    }

    /// How long a message from `from` to `to` waits, or why it is lost.
    fn verdict(&self, from: NodeId, to: NodeId) -> Result<Duration, Unreached> {
        let s = self.lock();
        let lost = |reason: &str| Unreached {
            target: to,
            reason: reason.into(),
        };
        if s.isolated.contains(&from) || s.isolated.contains(&to) {
            return Err(lost("partitioned (injected)"));
        }
        if s.cut.contains(&(from.min(to), from.max(to))) {
            return Err(lost("link cut (injected)"));
        }
        if s.drop_per_mille > 0 && fastrand::u32(0..1000) < s.drop_per_mille {
            return Err(lost("message dropped (injected)"));
        }
        Ok(s.delay)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Faulty {
    faults: Arc<Faults>,
    from: NodeId,
    inner: Arc<dyn Transport>,
}

impl Faulty {
    fn holds(&self, target: NodeId) -> bool {
        self.faults.lock().held.contains(&(self.from, target))
    }

    fn lost<T: Send + 'static, E: Send + 'static>(
        &self,
        target: NodeId,
        reason: &str,
    ) -> Reply<T, E> {
        lost(Unreached {
            target,
            reason: reason.into(),
        })
    }

    fn gate<T: Send + 'static, E: Send + 'static>(
        &self,
        target: NodeId,
        call: impl FnOnce(&dyn Transport) -> Reply<T, E>,
    ) -> Reply<T, E> {
        match self.faults.verdict(self.from, target) {
            Err(unreached) => lost(unreached),
            Ok(delay) if delay.is_zero() => call(self.inner.as_ref()),
            Ok(delay) => {
                let reply = call(self.inner.as_ref());
                async move {
                    tokio::time::sleep(delay).await;
                    reply.await
                }
                .boxed()
            }
        }
    }
}

impl Transport for Faulty {
    fn append_entries(
        &self,
        target: NodeId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Reply<AppendEntriesResponse<NodeId>> {
        if !rpc.entries.is_empty() && self.holds(target) {
            return self.lost(target, "entries held back (injected)");
        }
        self.gate(target, |t| t.append_entries(target, rpc))
    }

    fn vote(&self, target: NodeId, rpc: VoteRequest<NodeId>) -> Reply<VoteResponse<NodeId>> {
        self.gate(target, |t| t.vote(target, rpc))
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Reply<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        if self.holds(target) {
            return self.lost(target, "snapshot held back (injected)");
        }
        self.gate(target, |t| t.install_snapshot(target, rpc))
    }

    fn forward(&self, target: NodeId, request: Forwarded) -> Reply<Applied, ClusterError> {
        let target = {
            let mut s = self.faults.lock();
            match s.misdirect {
                Some((leader, instead)) if leader == target => {
                    s.misdirect = None;
                    s.misdirected += 1;
                    instead
                }
                _ => target,
            }
        };
        self.gate(target, |t| t.forward(target, request))
    }

    fn learn(&self, id: NodeId, raft_addr: &str) {
        self.inner.learn(id, raft_addr);
    }
}

/// A message lost on the way: the sender's reply is `unreached` at once.
fn lost<T: Send + 'static, E: Send + 'static>(unreached: Unreached) -> Reply<T, E> {
    futures::future::ready(Err(unreached)).boxed()
}
