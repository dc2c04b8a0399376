//! Circuit breakers, decided locally and held cluster-wide.
//!
//! Each node watches the outcomes of its own calls to each provider ([`Breaker::observe`]):
//! consecutive failures, the error rate over a sliding window (with a minimum number of
//! calls), and the share of slow calls (time to the first byte over `slow_call`). When one of
//! them trips, the node's [`BreakerActor`] proposes `SetBreaker { Open { until } }` to Raft, and
//! every node stops routing there as soon as it applies the entry ([`Breaker::admits`] reads
//! the applied state; no round trip on the request path).
//!
//! Open periods back off exponentially with consecutive trips (`open_base` × 2^(trips−1), at
//! most `open_max`). When the period ends the breaker is half-open: the node that tripped it
//! (or, once `probe_grace` has passed without a verdict, any node) lets `probes` requests
//! through; that many successes close it, one failure opens it again for longer. Automatic
//! trips never eject more than half of a model's providers (the panic threshold, checked when
//! the entry is applied, so two nodes tripping two providers at once cannot both pass it).
//! Operators can force a breaker open or closed, or reset it; detection leaves a forced breaker
//! alone.
//!
//! Which failures count: connect errors, timeouts, 5xx, 429/529 overload and failures in the
//! middle of a stream. A client's own mistake (400, 404, …), a full local queue or a client
//! that went away say nothing about the provider and are not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use meridian_policy::breaker::BreakerConfig;
use meridian_policy::breaker::{self, Callers, Window, verdict};
use meridian_policy::clock::WallClock;
use meridian_policy::route::Gate;
use meridian_proto::cluster::{
    Applied, BreakerRecord, BreakerState, ClusterState, Command, NodeId,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;

use crate::replicated::Replicated;

/// The gate for `record` at `now` on node `me` (see [`meridian_policy::breaker::gate`]).
pub fn gate(record: Option<&BreakerRecord>, me: NodeId, now_ms: u64, grace: Duration) -> Gate {
    let view = record.map(|r| breaker::Record {
        open_until_ms: match r.state {
            BreakerState::Closed => None,
            BreakerState::Open { until_unix_ms } => Some(until_unix_ms),
        },
        forced: r.forced,
        by: r.by,
    });
    breaker::gate(view, me, now_ms, grace)
}

#[derive(Debug)]
struct Local {
    window: Window,
    consecutive: u32,
    /// Who the window's calls came from (one tenant's failures alone trip nothing).
    callers: Callers,
    /// The record version this node last asked to change, and when (it asks once per version,
    /// or again after a second if nothing changed, e.g. when the panic threshold refused).
    asked: Option<(u64, u64)>,
    /// Probing a half-open breaker: the record version, requests let through, successes.
    probe: Option<(u64, u32, u32)>,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct BreakerStats {
    pub trips_proposed: AtomicU64,
    pub trips_refused_panic: AtomicU64,
    pub closes_proposed: AtomicU64,
}

/// One provider's breaker on this node.
pub struct Breaker {
    /// The provider id (the same on every node that configures the provider).
    pub key: String,
    /// Per model the provider serves, every provider id serving it (the panic threshold).
    /// Changes as replicas come and go.
    groups: std::sync::RwLock<Vec<Vec<String>>>,
    config: Arc<BreakerConfig>,
    clock: WallClock,
    node: NodeId,
    state: watch::Receiver<Arc<ClusterState>>,
    actor: ActorRef<BreakerMsg>,
    local: Mutex<Local>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Local>) -> MutexGuard<'_, Local> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Breaker {
    pub fn new(
        key: String,
        groups: Vec<Vec<String>>,
        config: Arc<BreakerConfig>,
        clock: WallClock,
        cluster: &Replicated,
        actor: ActorRef<BreakerMsg>,
    ) -> Self {
        Self {
            local: Mutex::new(Local {
                window: Window::new(config.window),
                consecutive: 0,
                callers: Callers::default(),
                asked: None,
                probe: None,
            }),
            key,
            groups: std::sync::RwLock::new(groups),
            config,
            clock,
            node: cluster.node_id,
            state: cluster.state.clone(),
            actor,
        }
    }

    /// What routing may do with this provider now: [`Gate::Probe`] means a half-open probe
    /// slot was taken for this request (when none is left, it is [`Gate::Open`]).
    pub fn gate(&self, state: &ClusterState) -> Gate {
        let record = state.breakers.get(&self.key);
        match gate(
            record,
            self.node,
            self.clock.now_ms(),
            self.config.probe_grace,
        ) {
            g @ (Gate::Closed | Gate::Open) => g,
            Gate::Probe => {
                let version = record.map_or(0, |r| r.version);
                let mut local = lock(&self.local);
                let probe = match &mut local.probe {
                    Some(p) if p.0 == version => p,
                    slot => slot.insert((version, 0, 0)),
                };
                if probe.1 < self.config.probes {
                    probe.1 += 1;
                    Gate::Probe
                } else {
                    Gate::Open
                }
            }
        }
    }

    /// How long a call took to its first byte (slow calls can trip the breaker).
    pub fn first_byte(&self, took: Duration) {
        let now = self.clock.now_ms();
        let mut local = lock(&self.local);
        local
            .window
            .record_latency(now, took > self.config.slow_call);
        let consecutive = local.consecutive;
        if let Some(reason) = verdict(&self.config, &local.window, consecutive, now) {
            drop(local);
            self.ask_trip(reason);
        }
    }

    fn ask_trip(&self, reason: String) {
        let (version, open) = self.record_now();
        if !open {
            let trip = self.trip(reason, version);
            self.send_once(&mut lock(&self.local), version, trip);
        }
    }

    /// The record's version and whether it is open.
    fn record_now(&self) -> (u64, bool) {
        let state = self.state.borrow();
        let r = state.breakers.get(&self.key);
        (r.map_or(0, |r| r.version), r.is_some_and(|r| r.is_open()))
    }

    fn trip(&self, reason: String, version: u64) -> BreakerMsg {
        BreakerMsg::Trip {
            key: self.key.clone(),
            reason,
            version,
            groups: self
                .groups
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }

    /// The providers serving each of this one's models, now (replicas came or went).
    pub fn set_groups(&self, groups: Vec<Vec<String>>) {
        *self
            .groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = groups;
    }

    /// Asks the actor once per record version (again after a second if nothing changed, e.g.
    /// when the panic threshold refused), and starts counting afresh.
    fn send_once(&self, local: &mut Local, version: u64, msg: BreakerMsg) {
        let now = self.clock.now_ms();
        if local
            .asked
            .is_some_and(|(v, at)| v == version && now < at + 1_000)
        {
            return;
        }
        local.asked = Some((version, now));
        local.window.clear();
        local.consecutive = 0;
        local.callers.clear();
        let _ = self.actor.cast(msg);
    }

    /// One call's outcome: `ok` or a failure of the provider's own (see the module docs), for
    /// `tenant` (none with authentication off). Failures of one tenant alone, while another
    /// tenant's calls succeed, do not trip it.
    pub fn observe(&self, ok: bool, tenant: Option<&str>) {
        let now = self.clock.now_ms();
        let (version, open) = self.record_now();
        let mut local = lock(&self.local);
        let msg = if open {
            // Half-open probing (outcomes of calls started before the trip land here too, and
            // count as evidence all the same).
            match &mut local.probe {
                Some((v, _, good)) if *v == version => {
                    if ok {
                        *good += 1;
                        (*good >= self.config.probes).then(|| BreakerMsg::Close {
                            key: self.key.clone(),
                            version,
                        })
                    } else {
                        Some(self.trip("a half-open probe failed".into(), version))
                    }
                }
                _ => None,
            }
        } else {
            local.window.record(now, ok);
            local.consecutive = if ok { 0 } else { local.consecutive + 1 };
            local
                .callers
                .record(now, caller_of(tenant), ok, self.config.window);
            verdict(&self.config, &local.window, local.consecutive, now)
                .filter(|reason| {
                    let alone = local.callers.one_callers_alone(self.config.lone_tenant_share);
                    if alone {
                        tracing::debug!(provider = %self.key, %reason, "one tenant's failures alone: not tripped");
                    }
                    !alone
                })
                .map(|reason| self.trip(reason, version))
        };
        if let Some(msg) = msg {
            self.send_once(&mut local, version, msg);
        }
    }
}

/// A tenant as a breaker's [`Callers`] count it (one number for callers without a tenant): a
/// fixed-key hash, the same on every call.
fn caller_of(tenant: Option<&str>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    tenant.map_or(0, |t| {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(t)
    })
}

/// What the BreakerActor is asked to propose.
#[derive(Debug)]
pub enum BreakerMsg {
    /// Open `key` (again), decided on record version `version`.
    Trip {
        key: String,
        reason: String,
        version: u64,
        groups: Vec<Vec<String>>,
    },
    /// Close `key` after successful probes.
    Close { key: String, version: u64 },
}

impl ractor::Message for BreakerMsg {}

/// Turns this node's breaker decisions into Raft proposals, one at a time.
pub struct BreakerActor;

pub struct BreakerArgs {
    pub cluster: Replicated,
    pub config: Arc<BreakerConfig>,
    pub stats: Arc<BreakerStats>,
    /// What open periods are counted on.
    pub clock: WallClock,
}

impl Actor for BreakerActor {
    type Msg = BreakerMsg;
    type State = BreakerArgs;
    type Arguments = BreakerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: BreakerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = s.clock.now_ms();
        let (command, key) = match msg {
            BreakerMsg::Trip {
                key,
                reason,
                version,
                groups,
            } => {
                let trips = {
                    let state = s.cluster.state.borrow();
                    state.breakers.get(&key).map_or(0, |r| r.trips) + 1
                };
                let open_for = s.config.open_for(trips);
                tracing::warn!(provider = %key, %reason, trips, ?open_for, "breaker: tripping");
                s.stats.trips_proposed.fetch_add(1, Ordering::Relaxed);
                (
                    Command::SetBreaker {
                        provider: key.clone(),
                        state: BreakerState::Open {
                            until_unix_ms: now + open_for.as_millis() as u64,
                        },
                        reason,
                        trips,
                        forced: false,
                        expect_version: Some(version),
                        groups,
                    },
                    key,
                )
            }
            BreakerMsg::Close { key, version } => {
                tracing::info!(provider = %key, "breaker: probes succeeded, closing");
                s.stats.closes_proposed.fetch_add(1, Ordering::Relaxed);
                (
                    Command::SetBreaker {
                        provider: key.clone(),
                        state: BreakerState::Closed,
                        reason: "half-open probes succeeded".into(),
                        trips: 0,
                        forced: false,
                        expect_version: Some(version),
                        groups: Vec::new(),
                    },
                    key,
                )
            }
        };
        match s.cluster.proposer.propose(command).await {
            Ok(Applied::Refused) => {
                s.stats.trips_refused_panic.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    provider = %key,
                    "breaker: not tripped: half of a model's providers are already ejected (panic threshold)"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(provider = %key, error = %e, "breaker: proposal failed"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
