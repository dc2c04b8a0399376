//! VllmActor: one replica's process, from launch to stop (see the state diagram in
//! [`crate::vllm`]). The actor decides; small tasks do the waiting and report back with the
//! incarnation they belong to, so a late report about an earlier process is ignored:
//!
//! - a waiter per process: its exit status, the moment it exits;
//! - a watcher per process: readiness (`/health` 200 and the model in `/v1/models`, within
//!   the startup budget), then liveness (`/health`), load (`/metrics` into the routing signals)
//!   and progress (requests running but no token generated for `hang_timeout`: a hang);
//! - a stopper per stop: let in-flight requests finish (drain), SIGTERM the group, SIGKILL it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::board::{Board, VllmStats};
pub use super::messages::{Control, VllmMsg};
use super::metrics::EngineMetrics;
use super::process::{self, LogRing};
use super::tasks::{Drain, Watch, terminate, watch};
use super::{ControlError, ReplicaState, ReplicaStatus, VllmGroup, probe};
use crate::provider::ModelRoute;
use crate::registry::Registry;

/// Who a replica is and where it runs.
#[derive(Clone)]
pub struct ReplicaArgs {
    pub group: Arc<VllmGroup>,
    pub name: String,
    /// Its id in routing and in the cluster registry.
    pub provider_id: String,
    pub port: u16,
    pub gpus: Vec<u32>,
    pub registry: Registry,
    pub board: Board,
    pub stats: Arc<VllmStats>,
}

pub struct VllmActor;

pub struct Replica {
    a: ReplicaArgs,
    state: ReplicaState,
    since: Instant,
    ready_since: Option<Instant>,
    incarnation: u64,
    epoch: u64,
    /// The running process's pid, which is also its process group id.
    pid: Option<u32>,
    /// The previous process's group, until it is seen empty.
    last_group: Option<u32>,
    watcher: Option<JoinHandle<()>>,
    crashes: VecDeque<Instant>,
    /// Crashes since it was last Ready for `reset_after` (the backoff exponent).
    consecutive: u32,
    restarts: u64,
    last_exit: Option<String>,
    /// Why we are killing the current process (Restarting).
    killing_for: Option<String>,
    /// Launch again once stopped (a restart).
    relaunch: bool,
    logs: Arc<LogRing>,
    metrics: EngineMetrics,
    models: Vec<ModelRoute>,
}

impl Actor for VllmActor {
    type Msg = VllmMsg;
    type State = Replica;
    type Arguments = ReplicaArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<VllmMsg>,
        a: ReplicaArgs,
    ) -> Result<Replica, ActorProcessingErr> {
        let models = a.group.models();
        let r = Replica {
            a,
            state: ReplicaState::Stopped,
            since: Instant::now(),
            ready_since: None,
            incarnation: 0,
            epoch: 0,
            pid: None,
            last_group: None,
            watcher: None,
            crashes: VecDeque::new(),
            consecutive: 0,
            restarts: 0,
            last_exit: None,
            killing_for: None,
            relaunch: false,
            logs: Arc::new(LogRing::new(500)),
            metrics: EngineMetrics::default(),
            models,
        };
        r.publish();
        Ok(r)
    }

    async fn post_start(
        &self,
        myself: ActorRef<VllmMsg>,
        r: &mut Replica,
    ) -> Result<(), ActorProcessingErr> {
        r.launch(&myself).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<VllmMsg>,
        r: &mut Replica,
    ) -> Result<(), ActorProcessingErr> {
        // The last line of defence (node shutdown drains first): nothing outlives the actor.
        if let Some(w) = r.watcher.take() {
            w.abort();
        }
        if r.state == ReplicaState::Ready {
            r.a.registry.deregister_replica(&r.a.provider_id);
        }
        for group in [r.pid.take(), r.last_group.take()].into_iter().flatten() {
            process::signal_group(group, Signal::SIGKILL);
        }
        r.a.board.lock().remove(&r.a.name);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<VllmMsg>,
        msg: VllmMsg,
        r: &mut Replica,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VllmMsg::Launch { epoch } if epoch == r.epoch && r.state == ReplicaState::Backoff => {
                r.launch(&myself).await;
            }
            VllmMsg::Exited {
                incarnation,
                status,
            } if incarnation == r.incarnation => r.exited(status, &myself).await,
            VllmMsg::Ready { incarnation, after }
                if incarnation == r.incarnation && r.state == ReplicaState::Starting =>
            {
                r.ready(after).await;
            }
            VllmMsg::Unhealthy {
                incarnation,
                reason,
            } if incarnation == r.incarnation => r.unhealthy(reason),
            VllmMsg::Scraped {
                incarnation,
                metrics,
            } if incarnation == r.incarnation => {
                r.metrics = metrics;
                r.publish();
            }
            VllmMsg::Control(control, reply) => {
                let answer = r.control(control, &myself).await;
                let _ = reply.send(answer);
            }
            VllmMsg::Lora { name, path, reply } => r.lora(name, path, reply, &myself),
            VllmMsg::LoraDone {
                incarnation,
                name,
                path,
                answer,
                reply,
            } => {
                let answer = match answer {
                    Ok(text) if incarnation == r.incarnation && r.state == ReplicaState::Ready => {
                        r.lora_applied(name, path.is_some()).await.map(|()| text)
                    }
                    Ok(_) => Err(ControlError::Refused(format!(
                        "{} restarted or stopped meanwhile; its adapters are those it launched with",
                        r.a.name
                    ))),
                    Err(e) => Err(e),
                };
                let _ = reply.send(answer);
            }
            // A report about an earlier process, or one that no longer matters.
            _ => {}
        }
        Ok(())
    }
}

impl Replica {
    fn set(&mut self, state: ReplicaState) {
        self.state = state;
        self.since = Instant::now();
        self.publish();
    }

    /// Shows the replica as it is now on the board the admin API reads.
    fn publish(&self) {
        let status = ReplicaStatus {
            name: self.a.name.clone(),
            group: self.a.group.id.clone(),
            provider_id: self.a.provider_id.clone(),
            state: self.state,
            state_for: Duration::ZERO,
            uptime: None,
            pid: self.pid,
            port: self.a.port,
            gpus: self.a.gpus.clone(),
            restarts: self.restarts,
            in_flight: 0,
            running: self.metrics.running as u32,
            waiting: self.metrics.waiting as u32,
            kv_cache_usage: self.metrics.kv_cache_usage,
            prefix_cache_hit_rate: self.metrics.prefix_cache_hit_rate(),
            ttft: self.metrics.ttft.clone(),
            last_exit: self.last_exit.clone(),
            models: self.models.iter().map(|m| m.name.clone()).collect(),
        };
        self.a
            .board
            .lock()
            .insert(self.a.name.clone(), (status, self.since, self.ready_since));
    }

    async fn launch(&mut self, myself: &ActorRef<VllmMsg>) {
        self.await_group_gone().await;
        self.incarnation += 1;
        self.metrics = EngineMetrics::default();
        // A new process serves what its launch line loads (adapters loaded at run time into
        // the previous one are gone).
        self.models = self.a.group.models();
        let launch = self.a.group.launch(self.a.port, &self.a.gpus);
        let mut child = match process::spawn(&launch, &self.a.name, &self.logs) {
            Ok(c) => c,
            Err(e) => {
                // Not a crash that a restart can fix (no such program, no permission).
                let why = format!("cannot run {}: {e}", launch.program);
                tracing::error!(replica = %self.a.name, error = %why, "replica cannot be launched; Failed");
                self.last_exit = Some(why);
                self.set(ReplicaState::Failed);
                return;
            }
        };
        self.pid = child.id();
        tracing::info!(replica = %self.a.name, pid = ?self.pid, command = %launch, "replica launched");
        let incarnation = self.incarnation;
        let me = myself.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            let _ = me.cast(VllmMsg::Exited {
                incarnation,
                status,
            });
        });
        self.watcher = Some(tokio::spawn(watch(Watch {
            addr: format!("{}:{}", self.a.group.host_for_probes(), self.a.port),
            group: Arc::clone(&self.a.group),
            incarnation,
            me: myself.clone(),
            provider_id: self.a.provider_id.clone(),
            registry: self.a.registry.clone(),
            served: self
                .models
                .first()
                .map_or_else(|| self.a.group.model.clone(), |m| m.name.clone()),
        })));
        self.set(ReplicaState::Starting);
    }

    /// Waits (up to 5 s) until no process of the previous incarnation's group is left, so a
    /// relaunch never shares GPUs with its predecessor's workers.
    async fn await_group_gone(&mut self) {
        let Some(group) = self.last_group.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process::group_members(group).is_empty() && Instant::now() < deadline {
            process::signal_group(group, Signal::SIGKILL);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Routes the replica with the models it serves now: its provider, registered for the
    /// cluster. Says which step failed.
    async fn route(&self) -> Result<(), String> {
        let spec = (self.a.group)
            .provider_spec(self.a.provider_id.clone(), self.a.port, self.models.clone())
            .map_err(|e| format!("cannot route to it: {e}"))?;
        let api_key = self.a.group.api_key.as_ref().map(|k| k.expose().to_owned());
        (self.a.registry)
            .register_replica(spec, self.a.group.via_mesh, api_key)
            .await
            .map_err(|e| format!("cannot register it: {}", e.message))
    }

    async fn ready(&mut self, after: Duration) {
        if let Err(why) = self.route().await {
            self.unhealthy(why);
            return;
        }
        self.ready_since = Some(Instant::now());
        self.set(ReplicaState::Ready);
        tracing::info!(replica = %self.a.name, ready_after_ms = after.as_millis() as u64, "replica ready; routable");
    }

    fn unhealthy(&mut self, reason: String) {
        if !matches!(self.state, ReplicaState::Starting | ReplicaState::Ready) {
            return;
        }
        if self.state == ReplicaState::Ready {
            self.a.registry.deregister_replica(&self.a.provider_id);
        }
        tracing::warn!(replica = %self.a.name, reason = %reason, "replica unhealthy; deregistered and killing it");
        self.killing_for = Some(reason);
        self.set(ReplicaState::Restarting);
        if let Some(pid) = self.pid {
            tokio::spawn(terminate(pid, self.a.group.stop_grace, None));
        }
    }

    async fn exited(&mut self, status: String, myself: &ActorRef<VllmMsg>) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        let stopping = matches!(self.state, ReplicaState::Draining | ReplicaState::Stopping);
        if let Some(pid) = self.pid.take() {
            if stopping {
                // Stopping on purpose: its engine and workers get the rest of the grace period
                // to exit on their own (the stopper SIGKILLs the group when it runs out).
                let deadline = Instant::now() + self.a.group.stop_grace;
                while !process::group_members(pid).is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
            // A crash: its engine and workers go with it at once.
            process::signal_group(pid, Signal::SIGKILL);
            self.last_group = Some(pid);
        }
        match self.state {
            ReplicaState::Draining | ReplicaState::Stopping => {
                self.last_exit = Some(format!("stopped ({status})"));
                self.await_group_gone().await;
                tracing::info!(replica = %self.a.name, "replica stopped; no process of it is left");
                if std::mem::take(&mut self.relaunch) {
                    self.launch(myself).await;
                } else {
                    self.set(ReplicaState::Stopped);
                }
            }
            ReplicaState::Ready | ReplicaState::Starting | ReplicaState::Restarting => {
                if self.state == ReplicaState::Ready {
                    // No request goes to a dead port from now on.
                    self.a.registry.deregister_replica(&self.a.provider_id);
                }
                let reason = self
                    .killing_for
                    .take()
                    .unwrap_or_else(|| format!("exited unexpectedly ({status})"));
                self.crashed(reason, myself);
            }
            ReplicaState::Backoff | ReplicaState::Stopped | ReplicaState::Failed => {}
        }
    }

    fn crashed(&mut self, reason: String, myself: &ActorRef<VllmMsg>) {
        let policy = self.a.group.restart;
        let now = Instant::now();
        if self
            .ready_since
            .is_some_and(|t| now.duration_since(t) >= policy.reset_after)
        {
            self.consecutive = 0;
        }
        self.ready_since = None;
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            self.crashes.pop_front();
        }
        self.crashes.push_back(now);
        self.a
            .stats
            .crashes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.last_exit = Some(reason.clone());
        if self.crashes.len() > policy.max_restarts as usize {
            tracing::error!(
                replica = %self.a.name,
                reason = %reason,
                crashes = self.crashes.len(),
                window_s = policy.window.as_secs(),
                last_output = ?self.logs.tail(20),
                "ALERT: replica crashed more than {} times in {:?}; Failed, not restarting it",
                policy.max_restarts,
                policy.window,
            );
            self.set(ReplicaState::Failed);
            return;
        }
        self.consecutive += 1;
        self.restarts += 1;
        let wait = policy.backoff(self.consecutive);
        tracing::warn!(
            replica = %self.a.name,
            reason = %reason,
            restart_in_ms = wait.as_millis() as u64,
            last_output = ?self.logs.tail(5),
            "replica crashed; restarting after backoff"
        );
        self.epoch += 1;
        let epoch = self.epoch;
        self.set(ReplicaState::Backoff);
        myself.send_after(wait, move || VllmMsg::Launch { epoch });
    }

    async fn control(
        &mut self,
        control: Control,
        myself: &ActorRef<VllmMsg>,
    ) -> Result<String, ControlError> {
        use ReplicaState as S;
        let name = self.a.name.clone();
        match (control, self.state) {
            (Control::Drain | Control::Stop | Control::Restart, S::Starting | S::Ready) => {
                let drain = control != Control::Stop;
                let in_flight = if self.state == S::Ready {
                    self.a.registry.deregister_replica(&self.a.provider_id)
                } else {
                    None
                };
                self.relaunch = control == Control::Restart;
                self.set(if drain { S::Draining } else { S::Stopping });
                if let Some(pid) = self.pid {
                    let wait = drain.then(|| Drain {
                        provider: in_flight,
                        addr: format!("{}:{}", self.a.group.host_for_probes(), self.a.port),
                        timeout: self.a.group.drain_timeout,
                    });
                    tokio::spawn(terminate(pid, self.a.group.stop_grace, wait));
                }
                tracing::info!(replica = %name, action = control.as_str(), "replica deregistered; stopping it");
                Ok(format!("{name}: {}", self.state.as_str()))
            }
            (Control::Drain | Control::Stop, S::Restarting) => {
                // Already being killed: stay down once it is.
                self.killing_for = None;
                self.set(S::Stopping);
                Ok(format!("{name}: stopping"))
            }
            (Control::Drain | Control::Stop, S::Backoff) => {
                self.epoch += 1;
                self.set(S::Stopped);
                Ok(format!("{name}: stopped"))
            }
            (Control::Drain | Control::Stop, S::Stopped | S::Failed) => {
                Ok(format!("{name}: already {}", self.state.as_str()))
            }
            (Control::Start | Control::Restart, S::Stopped | S::Failed | S::Backoff) => {
                self.crashes.clear();
                self.consecutive = 0;
                self.epoch += 1;
                self.launch(myself).await;
                Ok(format!("{name}: {}", self.state.as_str()))
            }
            (Control::Restart, S::Draining | S::Stopping) => {
                self.relaunch = true;
                Ok(format!("{name}: restarts once stopped"))
            }
            (Control::Start, _) | (Control::Restart, S::Restarting) => {
                Err(ControlError::Refused(format!(
                    "{name} is {} already; drain or stop it first",
                    self.state.as_str()
                )))
            }
            (Control::Drain | Control::Stop, S::Draining | S::Stopping) => {
                Ok(format!("{name}: {} already", self.state.as_str()))
            }
        }
    }

    /// Loads (`path: Some`) or unloads an adapter through vLLM's runtime LoRA endpoints; the
    /// call runs off the actor and comes back as [`VllmMsg::LoraDone`].
    fn lora(
        &mut self,
        name: String,
        path: Option<String>,
        reply: RpcReplyPort<Result<String, ControlError>>,
        myself: &ActorRef<VllmMsg>,
    ) {
        if !self.a.group.lora_runtime {
            let _ = reply.send(Err(ControlError::Refused(format!(
                "group {} does not allow runtime LoRA updates (set lora_runtime = true)",
                self.a.group.id
            ))));
            return;
        }
        if self.state != ReplicaState::Ready {
            let _ = reply.send(Err(ControlError::Refused(format!(
                "{} is {}, not ready",
                self.a.name,
                self.state.as_str()
            ))));
            return;
        }
        let addr = format!("{}:{}", self.a.group.host_for_probes(), self.a.port);
        let key = self.a.group.api_key.clone();
        let (incarnation, me) = (self.incarnation, myself.clone());
        tokio::spawn(async move {
            let (endpoint, body) = match &path {
                Some(p) => (
                    "/v1/load_lora_adapter",
                    serde_json::json!({"lora_name": name, "lora_path": p}),
                ),
                None => (
                    "/v1/unload_lora_adapter",
                    serde_json::json!({"lora_name": name}),
                ),
            };
            let answer = match probe::post_json(
                &addr,
                endpoint,
                body.to_string().as_bytes(),
                key.as_ref().map(|k| k.expose()),
                Duration::from_secs(120),
            )
            .await
            {
                Ok(a) if a.status == 200 => Ok(String::from_utf8_lossy(&a.body).into_owned()),
                Ok(a) => Err(ControlError::Refused(format!(
                    "{endpoint} answered {}: {}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                ))),
                Err(e) => Err(ControlError::Refused(format!("{endpoint}: {e}"))),
            };
            let _ = me.cast(VllmMsg::LoraDone {
                incarnation,
                name,
                path,
                answer,
                reply,
            });
        });
    }

    /// Routes an adapter the replica loaded (or no longer routes one it unloaded).
    async fn lora_applied(&mut self, name: String, loaded: bool) -> Result<(), ControlError> {
        self.models.retain(|m| m.name != name);
        if loaded {
            self.models.push(ModelRoute {
                name: name.clone(),
                upstream_name: name,
            });
        }
        self.route().await.map_err(ControlError::Refused)?;
        self.publish();
        Ok(())
    }
}
