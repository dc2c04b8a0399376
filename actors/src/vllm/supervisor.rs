//! VllmSupervisor: owns this node's `[[vllm]]` groups. It gives each replica a slot (its port
//! and GPUs), starts one VllmActor per replica, scales groups between their minimum and
//! maximum on in-flight load (only onto free GPUs, with a cool-down), and answers the admin
//! API ([`Vllm`] is its handle).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent};
use tokio::time::Instant;

use super::actor::{Control, ReplicaArgs, VllmActor, VllmMsg};
use super::board::{Board, VllmStats};
use super::gpu::{self, Discovery};
use super::{ControlError, ReplicaState, ReplicaStatus, VllmGroup};
use crate::registry::Registry;

/// The supervisor's vocabulary. Local only.
#[derive(Debug)]
pub enum VllmSupervisorMsg {
    /// Hand `request` to the replica named `replica`; it answers the caller itself.
    ToReplica {
        replica: String,
        request: ReplicaRequest,
        reply: RpcReplyPort<Result<String, ControlError>>,
    },
    /// Look at load and scale (a timer sends it every group's `autoscale.interval`).
    Autoscale,
}

impl ractor::Message for VllmSupervisorMsg {}

/// What the admin API asks of one replica.
#[derive(Debug)]
pub enum ReplicaRequest {
    Control(Control),
    /// Load (`path: Some`) or unload a LoRA adapter.
    Lora {
        name: String,
        path: Option<String>,
    },
}

/// Why another replica of a group could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("group {group} is at its maximum of {max} replicas")]
    AtMaximum { group: String, max: u32 },
    #[error("group {group} needs {need} free GPUs for another replica; {free} are")]
    NotEnoughGpus {
        group: String,
        need: u32,
        free: usize,
    },
    #[error("no port left in the range of group {group}")]
    NoPort { group: String },
    #[error("cannot start the actor of {replica}: {source}")]
    Actor {
        replica: String,
        source: ractor::SpawnErr,
    },
}

pub struct VllmSupervisor;

pub struct VllmSupervisorArgs {
    pub groups: Vec<VllmGroup>,
    pub registry: Registry,
    pub node_id: u64,
    pub discovery: Discovery,
    /// Re-run before each scale-up when discovery found GPUs (`None`: never).
    pub nvidia_smi: Option<String>,
    pub board: Board,
    pub stats: Arc<VllmStats>,
}

struct Slot {
    actor: ActorRef<VllmMsg>,
    name: String,
    gpus: Vec<u32>,
    /// Drained by the autoscaler; removed once stopped.
    retiring: bool,
}

struct GroupState {
    group: Arc<VllmGroup>,
    slots: BTreeMap<u32, Slot>,
    last_scale: Option<Instant>,
}

pub struct SupervisorState {
    groups: Vec<GroupState>,
    registry: Registry,
    node_id: u64,
    nvidia_smi: Option<String>,
    board: Board,
    stats: Arc<VllmStats>,
}

impl Actor for VllmSupervisor {
    type Msg = VllmSupervisorMsg;
    type State = SupervisorState;
    type Arguments = VllmSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        a: VllmSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        match &a.discovery {
            Discovery::Found(gpus) => {
                tracing::info!(
                    count = gpus.len(),
                    free = gpus.iter().filter(|g| g.is_free()).count(),
                    "GPUs discovered"
                );
            }
            Discovery::Unavailable(why) => tracing::info!("GPU discovery: {why}"),
        }
        for g in &a.groups {
            for &index in &g.gpus {
                match a.discovery.gpu(index) {
                    Some(gpu) if !gpu.is_free() => tracing::warn!(
                        group = %g.id, gpu = index, used_mib = gpu.memory_used_mib,
                        "a GPU of this group is already in use by another process"
                    ),
                    None if matches!(a.discovery, Discovery::Found(_)) => tracing::warn!(
                        group = %g.id, gpu = index, "nvidia-smi does not list this GPU"
                    ),
                    _ => {}
                }
            }
        }
        let mut s = SupervisorState {
            groups: a
                .groups
                .into_iter()
                .map(|g| GroupState {
                    group: Arc::new(g),
                    slots: BTreeMap::new(),
                    last_scale: None,
                })
                .collect(),
            registry: a.registry,
            node_id: a.node_id,
            nvidia_smi: a
                .nvidia_smi
                .filter(|_| matches!(a.discovery, Discovery::Found(_))),
            board: a.board,
            stats: a.stats,
        };
        // Every replica is on the board by the time the supervisor has started.
        for gi in 0..s.groups.len() {
            for _ in 0..s.groups[gi].group.min_replicas {
                if let Err(e) = s.add_replica(gi, &myself, false).await {
                    tracing::error!(group = %s.groups[gi].group.id, error = %e, "cannot start a replica");
                }
            }
        }
        Ok(s)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let scaling = s
            .groups
            .iter()
            .filter(|g| g.group.max_replicas > g.group.min_replicas);
        if let Some(every) = scaling.map(|g| g.group.autoscale.interval).min() {
            myself.send_interval(every, || VllmSupervisorMsg::Autoscale);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VllmSupervisorMsg::ToReplica {
                replica,
                request,
                reply,
            } => match s.slot(&replica) {
                // The replica answers the caller itself: a slow stop never holds up the
                // supervisor (autoscaling, other replicas' commands).
                Some(slot) => {
                    let actor = slot.actor.clone();
                    tokio::spawn(async move {
                        let answer = ask(&actor, |r| match request {
                            ReplicaRequest::Control(c) => VllmMsg::Control(c, r),
                            ReplicaRequest::Lora { name, path } => VllmMsg::Lora {
                                name,
                                path,
                                reply: r,
                            },
                        })
                        .await;
                        let _ = reply.send(answer);
                    });
                }
                None => {
                    let _ = reply.send(Err(s.unknown(&replica)));
                }
            },
            VllmSupervisorMsg::Autoscale => s.autoscale(&myself).await,
        }
        Ok(())
    }

    /// The last line of defence: a replica actor stopped with the supervisor may not run its
    /// own cleanup, so every process group still on the board is SIGKILLed.
    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for (status, ..) in s.board.lock().values() {
            if let Some(pid) = status.pid {
                super::process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        Ok(())
    }

    /// A replica's actor that stops (scaled down) is already out of its slot. One that
    /// crashed is replaced in the same slot, after its process group is killed (a crashed
    /// actor's own cleanup may not have run).
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, err) = event else {
            return Ok(());
        };
        let found = s.groups.iter_mut().enumerate().find_map(|(gi, g)| {
            let slot = *g
                .slots
                .iter()
                .find(|(_, slot)| slot.actor.get_id() == cell.get_id())?
                .0;
            g.slots.remove(&slot).map(|old| (gi, slot, old))
        });
        let Some((gi, slot, old)) = found else {
            return Ok(());
        };
        tracing::error!(replica = %old.name, error = %err, "replica actor crashed; killing its process and starting it over");
        let stale = s.board.lock().remove(&old.name);
        if let Some(pid) = stale.and_then(|(status, ..)| status.pid) {
            super::process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
        s.registry
            .deregister_replica(&format!("{}/{}", s.node_id, old.name));
        if let Err(e) = s.start_in(gi, slot, old.gpus, &myself).await {
            tracing::error!(replica = %old.name, error = %e, "cannot restart the replica's actor");
        }
        Ok(())
    }
}

async fn ask(
    actor: &ActorRef<VllmMsg>,
    msg: impl FnOnce(RpcReplyPort<Result<String, ControlError>>) -> VllmMsg,
) -> Result<String, ControlError> {
    match actor.call(msg, Some(Duration::from_secs(150))).await {
        Ok(ractor::rpc::CallResult::Success(answer)) => answer,
        Ok(_) | Err(_) => Err(ControlError::NoAnswer("the replica's actor")),
    }
}

impl SupervisorState {
    fn slot(&self, name: &str) -> Option<&Slot> {
        self.groups
            .iter()
            .flat_map(|g| g.slots.values())
            .find(|s| s.name == name)
    }

    fn unknown(&self, name: &str) -> ControlError {
        let known: Vec<&str> = self
            .groups
            .iter()
            .flat_map(|g| g.slots.values().map(|s| s.name.as_str()))
            .collect();
        ControlError::NoSuchReplica {
            name: name.to_owned(),
            known: known.join(", "),
        }
    }

    /// Starts a replica of group `gi` in its lowest free slot, on GPUs no other replica of the
    /// group holds (and, when `only_free` and nvidia-smi is there, that it reports free).
    async fn add_replica(
        &mut self,
        gi: usize,
        myself: &ActorRef<VllmSupervisorMsg>,
        only_free: bool,
    ) -> Result<String, StartError> {
        let discovery = match (&self.nvidia_smi, only_free) {
            (Some(cmd), true) => Some(gpu::discover(cmd).await),
            _ => None,
        };
        let g = &mut self.groups[gi];
        let group = Arc::clone(&g.group);
        let slot = (0..group.max_replicas)
            .find(|i| !g.slots.contains_key(i))
            .ok_or_else(|| StartError::AtMaximum {
                group: group.id.clone(),
                max: group.max_replicas,
            })?;
        let taken: Vec<u32> = g
            .slots
            .values()
            .flat_map(|s| s.gpus.iter().copied())
            .collect();
        let gpus: Vec<u32> = group
            .gpus
            .iter()
            .copied()
            .filter(|i| !taken.contains(i))
            .filter(|i| {
                discovery
                    .as_ref()
                    .is_none_or(|d| d.gpu(*i).is_some_and(gpu::Gpu::is_free))
            })
            .take(group.gpus_per_replica as usize)
            .collect();
        if gpus.len() < group.gpus_per_replica as usize {
            return Err(StartError::NotEnoughGpus {
                group: group.id.clone(),
                need: group.gpus_per_replica,
                free: gpus.len(),
            });
        }
        self.start_in(gi, slot, gpus, myself).await
    }

    /// Starts the actor of group `gi`'s replica in `slot`, on `gpus`.
    async fn start_in(
        &mut self,
        gi: usize,
        slot: u32,
        gpus: Vec<u32>,
        myself: &ActorRef<VllmSupervisorMsg>,
    ) -> Result<String, StartError> {
        let g = &mut self.groups[gi];
        let group = Arc::clone(&g.group);
        let port = group.port(slot).ok_or_else(|| StartError::NoPort {
            group: group.id.clone(),
        })?;
        let name = group.replica_name(slot);
        let args = ReplicaArgs {
            group: Arc::clone(&group),
            name: name.clone(),
            provider_id: format!("{}/{name}", self.node_id),
            port,
            gpus: gpus.clone(),
            registry: self.registry.clone(),
            board: self.board.clone(),
            stats: Arc::clone(&self.stats),
        };
        let (actor, _) = Actor::spawn_linked(None, VllmActor, args, myself.get_cell())
            .await
            .map_err(|e| StartError::Actor {
                replica: name.clone(),
                source: e,
            })?;
        g.slots.insert(
            slot,
            Slot {
                actor,
                name: name.clone(),
                gpus,
                retiring: false,
            },
        );
        Ok(name)
    }

    async fn autoscale(&mut self, myself: &ActorRef<VllmSupervisorMsg>) {
        let board: Vec<ReplicaStatus> = list(&self.board, &self.registry);
        for gi in 0..self.groups.len() {
            self.reap(gi, &board);
            let g = &self.groups[gi];
            let group = Arc::clone(&g.group);
            if group.max_replicas <= group.min_replicas {
                continue;
            }
            let now = Instant::now();
            if g.last_scale
                .is_some_and(|t| now.duration_since(t) < group.autoscale.cooldown)
            {
                continue;
            }
            let active: Vec<(&u32, &Slot)> = g.slots.iter().filter(|(_, s)| !s.retiring).collect();
            let status = |name: &str| board.iter().find(|r| r.name == name);
            let ready: Vec<&ReplicaStatus> = active
                .iter()
                .filter_map(|(_, s)| status(&s.name))
                .filter(|r| r.state == ReplicaState::Ready)
                .collect();
            let starting = active
                .iter()
                .filter_map(|(_, s)| status(&s.name))
                .any(|r| r.state == ReplicaState::Starting);
            if ready.is_empty() || starting {
                continue;
            }
            let load: u32 = ready
                .iter()
                .map(|r| r.in_flight.max(r.running) + r.waiting)
                .sum();
            let per_replica = f64::from(load) / ready.len() as f64;
            let target = f64::from(group.autoscale.target_in_flight.max(1));
            let count = active.len() as u32;
            if per_replica > target && count < group.max_replicas {
                match self.add_replica(gi, myself, true).await {
                    Ok(name) => {
                        tracing::info!(group = %group.id, replica = %name, per_replica, target, replicas = count + 1, "autoscale: scaling up");
                        self.stats.scale_ups.fetch_add(1, Ordering::Relaxed);
                        self.groups[gi].last_scale = Some(now);
                    }
                    Err(why) => {
                        tracing::warn!(group = %group.id, per_replica, target, "autoscale: cannot scale up: {why}");
                        self.stats.scale_blocked.fetch_add(1, Ordering::Relaxed);
                        self.groups[gi].last_scale = Some(now);
                    }
                }
            } else if per_replica < target / 2.0 && count > group.min_replicas {
                let g = &mut self.groups[gi];
                let Some((_, slot)) = g.slots.iter_mut().rev().find(|(_, s)| !s.retiring) else {
                    continue;
                };
                slot.retiring = true;
                let _ = ask(&slot.actor, |r| VllmMsg::Control(Control::Drain, r)).await;
                tracing::info!(group = %group.id, replica = %slot.name, per_replica, target, replicas = count - 1, "autoscale: scaling down (draining)");
                self.stats.scale_downs.fetch_add(1, Ordering::Relaxed);
                g.last_scale = Some(now);
            }
        }
    }

    /// Frees the slots of retired replicas once they have stopped.
    fn reap(&mut self, gi: usize, board: &[ReplicaStatus]) {
        let g = &mut self.groups[gi];
        let done: Vec<u32> = g
            .slots
            .iter()
            .filter(|(_, s)| {
                s.retiring
                    && board
                        .iter()
                        .find(|r| r.name == s.name)
                        .is_none_or(|r| !r.state.is_running())
            })
            .map(|(i, _)| *i)
            .collect();
        for i in done {
            if let Some(slot) = g.slots.remove(&i) {
                slot.actor.stop(Some("scaled down".into()));
            }
        }
    }
}

/// Every replica as it is now, with this node's in-flight calls to it.
fn list(board: &Board, registry: &Registry) -> Vec<ReplicaStatus> {
    let now = Instant::now();
    board
        .lock()
        .values()
        .map(|(status, since, ready_since)| {
            let mut s = status.clone();
            s.state_for = now.duration_since(*since);
            s.uptime = ready_since
                .filter(|_| s.state == ReplicaState::Ready)
                .map(|t| now.duration_since(t));
            s.in_flight = registry
                .provider_by_id(&s.provider_id)
                .map_or(0, |p| p.in_flight());
            s
        })
        .collect()
}

/// The node's handle on its vLLM replicas.
#[derive(Clone)]
pub struct Vllm {
    actor: ActorRef<VllmSupervisorMsg>,
    /// The longest drain timeout + stop grace of any group: how long a shutdown may take.
    longest_stop: Duration,
    board: Board,
    registry: Registry,
    stats: Arc<VllmStats>,
}

impl Vllm {
    /// Discovers GPUs (with `nvidia_smi`, normally `nvidia-smi`) and starts every group's
    /// minimum of replicas.
    pub async fn start(
        mut groups: Vec<VllmGroup>,
        registry: Registry,
        node_id: u64,
        nvidia_smi: &str,
    ) -> Result<Self, SpawnErr> {
        for g in &mut groups {
            let own = g
                .env
                .iter()
                .find(|(k, _)| k == "VLLM_API_KEY")
                .map(|(_, v)| v.clone());
            let key = own.or_else(|| match crate::auth::random_token(24) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::error!(group = %g.id, error = %e, "no randomness for the replicas' API key: they start without one, callable by anyone who reaches their port");
                    None
                }
            });
            g.api_key = key.map(super::ReplicaKey::new);
        }
        let discovery = if groups.is_empty() {
            Discovery::Unavailable("no [[vllm]] groups".into())
        } else {
            gpu::discover(nvidia_smi).await
        };
        let board = Board::default();
        let stats = Arc::new(VllmStats::default());
        let longest_stop = groups
            .iter()
            .map(|g| g.drain_timeout + g.stop_grace)
            .max()
            .unwrap_or_default();
        let (actor, _) = Actor::spawn(
            None,
            VllmSupervisor,
            VllmSupervisorArgs {
                groups,
                registry: registry.clone(),
                node_id,
                discovery,
                nvidia_smi: Some(nvidia_smi.to_owned()),
                board: board.clone(),
                stats: Arc::clone(&stats),
            },
        )
        .await?;
        Ok(Self {
            actor,
            longest_stop,
            board,
            registry,
            stats,
        })
    }

    /// Every replica on this node, by name.
    pub fn list(&self) -> Vec<ReplicaStatus> {
        list(&self.board, &self.registry)
    }

    pub fn stats(&self) -> &VllmStats {
        &self.stats
    }

    /// Drains, stops, starts or restarts one replica; says what it did, or why not.
    pub async fn control(&self, replica: &str, control: Control) -> Result<String, ControlError> {
        self.to_replica(replica, ReplicaRequest::Control(control))
            .await
    }

    /// Loads (`path: Some`) or unloads a LoRA adapter on one replica.
    pub async fn lora(
        &self,
        replica: &str,
        name: &str,
        path: Option<&str>,
    ) -> Result<String, ControlError> {
        let request = ReplicaRequest::Lora {
            name: name.to_owned(),
            path: path.map(str::to_owned),
        };
        self.to_replica(replica, request).await
    }

    async fn to_replica(
        &self,
        replica: &str,
        request: ReplicaRequest,
    ) -> Result<String, ControlError> {
        let replica = replica.to_owned();
        match self
            .actor
            .call(
                |reply| VllmSupervisorMsg::ToReplica {
                    replica,
                    request,
                    reply,
                },
                Some(Duration::from_secs(180)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(a)) => a,
            _ => Err(ControlError::NoAnswer("the vLLM supervisor")),
        }
    }

    /// Node shutdown: drains every replica (deregistered first, in-flight requests finish up to
    /// each group's drain timeout, then SIGTERM, then SIGKILL after its grace), waits for them
    /// to stop, then stops the actors (which SIGKILL anything left).
    pub async fn shutdown(&self) {
        let timeout = self.longest_stop + Duration::from_secs(5);
        let names: Vec<String> = self
            .list()
            .into_iter()
            .filter(|r| r.state.is_running() || r.state == ReplicaState::Backoff)
            .map(|r| r.name)
            .collect();
        for name in &names {
            let _ = self.control(name, Control::Drain).await;
        }
        let deadline = Instant::now() + timeout;
        while self.list().iter().any(|r| r.state.is_running()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self
            .actor
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
    }
}
