//! vLLM supervision: each node can own the vLLM server processes on its machine.
//!
//! A `[[vllm]]` section of the node's configuration is a [`VllmGroup`]: one model served by
//! `min_replicas`–`max_replicas` replicas, each a `vllm serve` process on its own port and
//! GPUs. The [`supervisor::VllmSupervisor`] owns the groups: it hands out ports and GPUs,
//! starts one [`actor::VllmActor`] per replica, scales on load and answers the admin API. A
//! VllmActor owns one replica's process from launch to stop:
//!
//! ```text
//!  Starting ──/health 200 + /v1/models lists it──▶ Ready (registered, routable)
//!     │ exit, budget spent                           │ exit, /health failing, hang
//!     ▼                                              ▼
//!  Restarting/Backoff ──after backoff──▶ Starting     (deregistered at once)
//!     │ more than max_restarts crashes in the window
//!     ▼
//!   Failed (no more restarts; alert)      drain/stop: Draining/Stopping ──▶ Stopped
//! ```
//!
//! A ready replica joins this node's routing table at once and the cluster's provider registry
//! through Raft, so every node routes to it; it leaves both the moment it is seen dead.

pub mod actor;
pub mod board;
pub mod gpu;
pub mod messages;
pub mod metrics;
pub mod probe;
pub mod process;
pub mod supervisor;
mod tasks;

use std::time::Duration;

use crate::provider::replica::{REPLICA_CONNECT_TIMEOUT, replica_spec};
use crate::provider::{ModelRoute, ProviderSpec};
use crate::upstream::{ApiAdapter, Dialect, EndpointError, Timeouts, Upstream};
use process::Launch;

/// One `[[vllm]]` section: a model served by a group of replicas on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct VllmGroup {
    /// The key its replicas are started with and called with (see [`ReplicaKey`]); set when the
    /// supervisor starts.
    pub api_key: Option<ReplicaKey>,
    /// A request naming no output cap is reserved, and capped upstream, at this many tokens.
    pub default_max_tokens: u32,
    /// The group's name; replicas are `<id>-<slot>`.
    pub id: String,
    /// What `vllm serve` loads (a Hugging Face id or a path).
    pub model: String,
    /// Names clients use (`--served-model-name`); the first is what vLLM echoes.
    pub served_names: Vec<String>,
    /// The program (and leading arguments) that is vLLM: `vllm` by default; tests point it
    /// at the mock.
    pub command: Vec<String>,
    /// Appended to the launch line as given.
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The GPUs this group may use (indices), and how many each replica takes.
    pub gpus: Vec<u32>,
    pub gpus_per_replica: u32,
    pub tensor_parallel_size: u32,
    pub max_num_seqs: Option<u32>,
    pub gpu_memory_utilization: Option<f64>,
    pub enable_prefix_caching: bool,
    /// Adapters loaded at startup (`--enable-lora --lora-modules name=path…`).
    pub lora_modules: Vec<LoraModule>,
    /// Lets adapters be loaded and unloaded at run time (vLLM's runtime LoRA endpoints).
    pub lora_runtime: bool,
    /// Where replicas listen, and the host this node (and, unless `via_mesh`, every node)
    /// calls them at.
    pub host: String,
    pub advertise_host: String,
    /// Other nodes cannot reach the replicas at `advertise_host`: they call them through this
    /// node on the actor mesh (the registry records them as `mesh://node-<id>`).
    pub via_mesh: bool,
    /// Replica slot `i` listens on `ports.0 + i`; the range is inclusive.
    pub ports: (u16, u16),
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// From launch to ready, at most; beyond it the process is killed and counted as a crash.
    pub startup_budget: Duration,
    /// `/health` is polled this often (while starting too); `/metrics` every `scrape_interval`.
    pub health_interval: Duration,
    pub scrape_interval: Duration,
    /// Consecutive failed health checks that mean dead (a 503 is dead at once).
    pub health_failures: u32,
    /// Requests in flight and no token generated for this long: a hang.
    pub hang_timeout: Duration,
    pub restart: RestartPolicy,
    /// How long a drain lets in-flight requests finish before SIGTERM, and how long SIGTERM
    /// has before SIGKILL.
    pub drain_timeout: Duration,
    pub stop_grace: Duration,
    pub autoscale: Autoscale,
    /// Calls this node sends a replica at once (default: `max_num_seqs`, else 256).
    pub max_concurrency: u32,
    pub queue_capacity: u32,
    pub queue_timeout: Duration,
    pub timeouts: Timeouts,
    /// The region replicas are registered in (the node's).
    pub region: String,
    pub weight: u32,
}

/// A LoRA adapter: the model name clients use, and where its weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraModule {
    pub name: String,
    pub path: String,
}

/// Restarts after crashes: exponential backoff, and an OTP-style intensity limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Ready this long without a crash: the backoff starts over.
    pub reset_after: Duration,
    /// More crashes than this within `window` → Failed (no more restarts).
    pub max_restarts: u32,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
            max_restarts: 3,
            window: Duration::from_secs(1800),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `n` (1 = the first restart after a crash).
    pub fn backoff(&self, n: u32) -> Duration {
        meridian_policy::retry::doubling(self.backoff_initial, n, self.backoff_max)
    }
}

/// Local autoscaling on in-flight requests per ready replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscale {
    /// Scale up above this many per replica; down below half of it.
    pub target_in_flight: u32,
    /// At least this long between two scale decisions of a group.
    pub cooldown: Duration,
    /// How often load is looked at.
    pub interval: Duration,
}

impl Default for Autoscale {
    fn default() -> Self {
        Self {
            target_in_flight: 32,
            cooldown: Duration::from_secs(120),
            interval: Duration::from_secs(5),
        }
    }
}

impl VllmGroup {
    /// Where the node itself reaches its replicas (loopback when they listen everywhere).
    pub fn host_for_probes(&self) -> &str {
        match self.host.as_str() {
            "0.0.0.0" | "::" | "[::]" | "" => "127.0.0.1",
            h => h,
        }
    }

    /// The name of the replica in `slot`.
    pub fn replica_name(&self, slot: u32) -> String {
        format!("{}-{slot}", self.id)
    }

    /// The port of the replica in `slot`.
    pub fn port(&self, slot: u32) -> Option<u16> {
        let port = u32::from(self.ports.0) + slot;
        u16::try_from(port).ok().filter(|p| *p <= self.ports.1)
    }

    /// Model names a replica serves: the served names, then its startup adapters.
    pub fn models(&self) -> Vec<ModelRoute> {
        self.served_names
            .iter()
            .chain(self.lora_modules.iter().map(|l| &l.name))
            .map(|n| ModelRoute {
                name: n.clone(),
                upstream_name: n.clone(),
            })
            .collect()
    }

    /// The command line and environment of a replica on `port` with `gpus`.
    pub fn launch(&self, port: u16, gpus: &[u32]) -> Launch {
        let mut command = self.command.iter();
        let program = command.next().cloned().unwrap_or_else(|| "vllm".into());
        let mut args: Vec<String> = command.cloned().collect();
        args.extend(["serve".into(), self.model.clone()]);
        args.extend(["--host".into(), self.host.clone()]);
        args.extend(["--port".into(), port.to_string()]);
        if !self.served_names.is_empty() {
            args.push("--served-model-name".into());
            args.extend(self.served_names.iter().cloned());
        }
        args.extend([
            "--tensor-parallel-size".into(),
            self.tensor_parallel_size.max(1).to_string(),
        ]);
        if let Some(n) = self.max_num_seqs {
            args.extend(["--max-num-seqs".into(), n.to_string()]);
        }
        if let Some(u) = self.gpu_memory_utilization {
            args.extend(["--gpu-memory-utilization".into(), u.to_string()]);
        }
        args.push(if self.enable_prefix_caching {
            "--enable-prefix-caching".into()
        } else {
            "--no-enable-prefix-caching".into()
        });
        if !self.lora_modules.is_empty() || self.lora_runtime {
            args.push("--enable-lora".into());
        }
        if !self.lora_modules.is_empty() {
            args.push("--lora-modules".into());
            args.extend(
                self.lora_modules
                    .iter()
                    .map(|l| format!("{}={}", l.name, l.path)),
            );
        }
        args.extend(self.extra_args.iter().cloned());
        let mut env = vec![(
            "CUDA_VISIBLE_DEVICES".to_owned(),
            gpus.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )];
        if self.lora_runtime {
            env.push(("VLLM_ALLOW_RUNTIME_LORA_UPDATING".into(), "True".into()));
        }
        env.extend(self.env.iter().cloned());
        // In the environment, not on the command line, where any local user could read it.
        if let Some(key) = &self.api_key
            && !env.iter().any(|(k, _)| k == "VLLM_API_KEY")
        {
            env.push(("VLLM_API_KEY".into(), key.expose().to_owned()));
        }
        Launch { program, args, env }
    }

    /// The routing spec of the replica `provider_id` listening on `port`, serving `models`.
    pub fn provider_spec(
        &self,
        provider_id: String,
        port: u16,
        models: Vec<ModelRoute>,
    ) -> Result<ProviderSpec, EndpointError> {
        let base_url = format!("http://{}:{port}/v1", self.advertise_host);
        let key = self.api_key.as_ref().map(|k| k.expose().to_owned());
        let adapter = ApiAdapter::new(Dialect::Vllm, &base_url, key, REPLICA_CONNECT_TIMEOUT)?;
        let mut spec = replica_spec(
            provider_id,
            self.region.clone(),
            Upstream::Api(adapter),
            models,
            self.max_concurrency,
            self.weight,
        );
        spec.queue_capacity = self.queue_capacity;
        spec.queue_timeout = self.queue_timeout;
        spec.timeouts = self.timeouts;
        spec.prefix_affinity = self.enable_prefix_caching;
        spec.default_max_tokens = self.default_max_tokens;
        Ok(spec)
    }
}

/// The key a node's replicas are started with (vLLM's API key, `VLLM_API_KEY`), made at random
/// when the supervisor starts (or the group's own `VLLM_API_KEY`, if its `[vllm.env]` sets
/// one): vLLM then refuses any `/v1` call without it, so nothing else on the network can call
/// the replicas or load adapters into them. The nodes that route to a replica directly have it
/// from its registry record. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicaKey(String);

impl ReplicaKey {
    pub fn new(key: String) -> Self {
        Self(key)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaKey(<redacted>)")
    }
}

/// Why a command to a replica was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No replica by that name on this node.
    #[error("no replica {name:?} on this node (replicas: {known})")]
    NoSuchReplica { name: String, known: String },
    /// Not possible in the replica's state or configuration, or the engine refused it.
    #[error("{0}")]
    Refused(String),
    /// The actor that should have answered did not (it stopped, or took too long).
    #[error("{0} did not answer")]
    NoAnswer(&'static str),
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Launched; waiting for `/health` and `/v1/models`.
    Starting,
    /// Routable.
    Ready,
    /// Seen unhealthy (or over its startup budget); being killed before a restart.
    Restarting,
    /// Waiting out the backoff before the next launch.
    Backoff,
    /// Deregistered, letting in-flight requests finish before it is stopped.
    Draining,
    /// Deregistered, being stopped (SIGTERM, then SIGKILL).
    Stopping,
    /// Not running, by an operator's (or the autoscaler's) decision.
    Stopped,
    /// Crashed too often: no more restarts until an operator starts it.
    Failed,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Restarting => "restarting",
            Self::Backoff => "backoff",
            Self::Draining => "draining",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    /// A process is (or may still be) running.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Ready | Self::Restarting | Self::Draining | Self::Stopping
        )
    }
}

/// A replica as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    pub name: String,
    pub group: String,
    /// Its id in routing and the cluster registry (`<node>/<name>`).
    pub provider_id: String,
    pub state: ReplicaState,
    /// How long it has been in `state` (while Starting: how long it has been loading).
    pub state_for: Duration,
    /// Since it last became Ready (`None` unless Ready).
    pub uptime: Option<Duration>,
    pub pid: Option<u32>,
    pub port: u16,
    pub gpus: Vec<u32>,
    pub restarts: u64,
    /// This node's calls in flight there.
    pub in_flight: u32,
    /// From its `/metrics`.
    pub running: u32,
    pub waiting: u32,
    pub kv_cache_usage: f64,
    pub prefix_cache_hit_rate: f64,
    /// The engine's own time to first token since its process started, with the engine's
    /// buckets.
    pub ttft: metrics::EngineHistogram,
    /// Why its process last ended (or was killed).
    pub last_exit: Option<String>,
    pub models: Vec<String>,
}

#[cfg(test)]
mod tests;
