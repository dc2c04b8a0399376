//! `[[vllm]]` sections: the vLLM replicas this node launches and supervises, and `[gpus]`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use meridian_actors::Timeouts;
use meridian_actors::vllm::{Autoscale, LoraModule, RestartPolicy, VllmGroup};
use serde::Deserialize;

use super::{Entry, Errors, int};

/// One `[[vllm]]` section as written. Only `id` and `model` are required.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVllm {
    /// The group's name; its replicas are `<id>-0`, `<id>-1`, …
    pub id: Option<String>,
    /// What `vllm serve` loads: a Hugging Face id or a local path.
    pub model: Option<String>,
    /// Names clients call it by (`--served-model-name`; default: `model`).
    #[serde(default)]
    pub served_model_names: Vec<String>,
    /// The vLLM program, with leading arguments if any (default `vllm`).
    pub command: Option<String>,
    /// More flags for `vllm serve`, as given.
    #[serde(default)]
    pub args: Vec<String>,
    /// More environment for the process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// GPU indices this group may use (`CUDA_VISIBLE_DEVICES` of its replicas).
    #[serde(default)]
    pub gpus: Vec<i64>,
    /// GPUs per replica (default: the tensor parallel size, or 0 when `gpus` is empty).
    pub gpus_per_replica: Option<i64>,
    pub tensor_parallel_size: Option<i64>,
    pub max_num_seqs: Option<i64>,
    pub gpu_memory_utilization: Option<f64>,
    /// Default true (vLLM's V1 default); replicas with it take part in prefix affinity.
    pub enable_prefix_caching: Option<bool>,
    /// Adapters loaded at startup, `name=path` each.
    #[serde(default)]
    pub lora_modules: Vec<String>,
    /// Allow loading and unloading adapters at run time.
    pub lora_runtime: Option<bool>,
    /// Where replicas listen (default 127.0.0.1), and the host other nodes reach them at. Without
    /// `advertise_host` in a multi-node cluster, other nodes call the replicas through this node
    /// on the actor mesh; this node calls them at `host` (127.0.0.1 when it is a wildcard).
    pub host: Option<String>,
    pub advertise_host: Option<String>,
    /// The first replica's port; replica `i` listens on `port + i` (default 8100).
    pub port: Option<i64>,
    pub min_replicas: Option<i64>,
    pub max_replicas: Option<i64>,
    pub startup_budget: Option<String>,
    pub health_interval: Option<String>,
    pub health_failures: Option<i64>,
    pub scrape_interval: Option<String>,
    pub hang_timeout: Option<String>,
    pub restart_backoff: Option<String>,
    pub restart_backoff_max: Option<String>,
    pub restart_reset_after: Option<String>,
    pub max_restarts: Option<i64>,
    pub restart_window: Option<String>,
    pub drain_timeout: Option<String>,
    pub stop_grace: Option<String>,
    /// In-flight requests per replica above which the group scales up (default 32).
    pub autoscale_target: Option<i64>,
    pub autoscale_cooldown: Option<String>,
    pub autoscale_interval: Option<String>,
    /// Calls this node sends one replica at once (default: `max_num_seqs`, else 256).
    pub max_concurrency: Option<i64>,
    /// Output tokens a request that sets no cap is reserved and capped at (default 1,024).
    pub default_max_tokens: Option<i64>,
    pub queue_capacity: Option<i64>,
    pub queue_timeout: Option<String>,
    pub first_byte_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub total_timeout: Option<String>,
    pub weight: Option<i64>,
}

/// `[gpus]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGpus {
    /// The discovery command (default `nvidia-smi`).
    pub nvidia_smi: Option<String>,
}

/// Validates every `[[vllm]]` section; `taken_ports` are the node's own listeners (a replica
/// may not take one).
pub(super) fn validate(
    e: &mut Errors,
    raw: &[RawVllm],
    region: &str,
    taken_ports: &[(String, u16)],
    multi_node: bool,
) -> Vec<VllmGroup> {
    let mut groups: Vec<VllmGroup> = Vec::new();
    // GPU → the group that has it; port → who has it.
    let mut gpu_owner: HashMap<u32, String> = HashMap::new();
    let mut port_owner: HashMap<u16, String> = taken_ports
        .iter()
        .map(|(who, p)| (*p, who.clone()))
        .collect();
    for (i, v) in raw.iter().enumerate() {
        let entry = Entry(format!("vllm[{i}]"));
        let at = |field: &str| entry.at(field);
        let id = entry.required(e, "id", &v.id);
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            e.push(
                at("id"),
                format!("{id:?} may hold only letters, digits, - and _"),
            );
        } else if !id.is_empty() && groups.iter().any(|g| g.id == id) {
            e.push(at("id"), format!("{id:?} names two [[vllm]] sections"));
        }
        let model = v.model.clone().unwrap_or_default();
        if model.is_empty() {
            e.push(
                at("model"),
                "is required (a Hugging Face model id or a path)",
            );
        }
        let served_names = if v.served_model_names.is_empty() {
            vec![model.clone()]
        } else {
            v.served_model_names.clone()
        };
        if served_names.iter().any(String::is_empty) {
            e.push(at("served_model_names"), "must not hold an empty name");
        }
        let command: Vec<String> = v
            .command
            .as_deref()
            .unwrap_or("vllm")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if command.is_empty() {
            e.push(at("command"), "must name a program");
        }
        let tp = entry.num(e, "tensor_parallel_size", v.tensor_parallel_size, 1, 1, 64);
        let mut gpus = Vec::new();
        for (j, &g) in v.gpus.iter().enumerate() {
            match u32::try_from(g) {
                Ok(g) if !gpus.contains(&g) => gpus.push(g),
                Ok(g) => e.push(
                    at(&format!("gpus[{j}]")),
                    format!("GPU {g} is listed twice"),
                ),
                Err(_) => e.push(at(&format!("gpus[{j}]")), format!("{g} is not a GPU index")),
            }
        }
        let per_replica = entry.num(
            e,
            "gpus_per_replica",
            v.gpus_per_replica,
            if gpus.is_empty() { 0 } else { tp },
            0,
            64,
        );
        if per_replica > 0 && tp > per_replica {
            e.push(
                at("tensor_parallel_size"),
                format!(
                    "{tp} is more than the {per_replica} GPUs a replica gets (gpus_per_replica)"
                ),
            );
        } else if per_replica == 0 && tp > 1 {
            e.push(
                at("tensor_parallel_size"),
                format!(
                    "{tp} needs GPUs, but replicas get none (gpus is empty or gpus_per_replica = 0)"
                ),
            );
        }
        if per_replica > 0 && gpus.is_empty() {
            e.push(
                at("gpus"),
                format!("is empty, but each replica needs {per_replica} (gpus_per_replica)"),
            );
        }
        for &g in &gpus {
            if let Some(other) = gpu_owner.insert(g, id.clone()) {
                e.push(
                    at("gpus"),
                    format!("GPU {g} is already given to the [[vllm]] group {other:?}"),
                );
            }
        }
        // Scaling from zero is not built: a group always keeps one replica.
        let min_replicas = entry.num(e, "min_replicas", v.min_replicas, 1, 1, 1024);
        let max_replicas = entry.num(
            e,
            "max_replicas",
            v.max_replicas,
            min_replicas.max(1),
            1,
            1024,
        );
        if max_replicas < min_replicas {
            e.push(
                at("max_replicas"),
                format!("must not be below min_replicas ({min_replicas})"),
            );
        }
        if per_replica > 0 && min_replicas.saturating_mul(per_replica) as usize > gpus.len() {
            e.push(
                at("min_replicas"),
                format!(
                    "{min_replicas} replicas × {per_replica} GPUs need more than the {} GPUs listed in gpus",
                    gpus.len()
                ),
            );
        }
        let first_port = entry.num(e, "port", v.port, 8100, 1, 65535);
        let last_port = first_port + max_replicas.saturating_sub(1);
        if last_port > 65535 {
            e.push(
                at("port"),
                format!("{first_port} + {max_replicas} replicas runs past port 65535"),
            );
        }
        let (first_port, last_port) = (
            u16::try_from(first_port).unwrap_or(8100),
            u16::try_from(last_port.min(65535)).unwrap_or(8100),
        );
        for p in first_port..=last_port {
            if let Some(other) = port_owner.insert(p, format!("the [[vllm]] group {id:?}")) {
                e.push(at("port"), format!("port {p} (one per replica from port up to max_replicas) is already used by {other}"));
                break;
            }
        }
        let gpu_memory_utilization = match v.gpu_memory_utilization {
            Some(u) if !(u > 0.0 && u <= 1.0) => {
                e.push(
                    at("gpu_memory_utilization"),
                    format!("must be in (0, 1], got {u}"),
                );
                None
            }
            other => other,
        };
        let max_num_seqs = v
            .max_num_seqs
            .map(|n| int(e, &at("max_num_seqs"), Some(n), 256, 1, 1_000_000));
        let mut lora_modules = Vec::new();
        for (j, m) in v.lora_modules.iter().enumerate() {
            match m.split_once('=') {
                Some((name, path)) if !name.is_empty() && !path.is_empty() => {
                    lora_modules.push(LoraModule {
                        name: name.into(),
                        path: path.into(),
                    });
                }
                _ => e.push(
                    at(&format!("lora_modules[{j}]")),
                    format!("{m:?} is not name=path"),
                ),
            }
        }
        let host = v.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        // Without an address other machines can use, they go through this node.
        let via_mesh = multi_node && v.advertise_host.is_none();
        let advertise_host = v
            .advertise_host
            .clone()
            .unwrap_or_else(|| match host.as_str() {
                "0.0.0.0" | "::" | "[::]" => "127.0.0.1".into(),
                h => h.into(),
            });
        let dr = RestartPolicy::default();
        let restart = RestartPolicy {
            backoff_initial: entry.dur(
                e,
                "restart_backoff",
                &v.restart_backoff,
                dr.backoff_initial,
            ),
            backoff_max: entry.dur(
                e,
                "restart_backoff_max",
                &v.restart_backoff_max,
                dr.backoff_max,
            ),
            reset_after: entry.dur(
                e,
                "restart_reset_after",
                &v.restart_reset_after,
                dr.reset_after,
            ),
            max_restarts: entry.num(e, "max_restarts", v.max_restarts, dr.max_restarts, 0, 1000),
            window: entry.dur(e, "restart_window", &v.restart_window, dr.window),
        };
        if restart.backoff_max < restart.backoff_initial {
            e.push(
                at("restart_backoff_max"),
                "must not be shorter than restart_backoff",
            );
        }
        let da = Autoscale::default();
        let autoscale = Autoscale {
            target_in_flight: entry.num(
                e,
                "autoscale_target",
                v.autoscale_target,
                da.target_in_flight,
                1,
                1_000_000,
            ),
            cooldown: entry.dur(e, "autoscale_cooldown", &v.autoscale_cooldown, da.cooldown),
            interval: entry.dur(e, "autoscale_interval", &v.autoscale_interval, da.interval),
        };
        let dt = Timeouts::default();
        let timeouts = Timeouts {
            connect: Duration::from_secs(2),
            first_byte: entry.dur(
                e,
                "first_byte_timeout",
                &v.first_byte_timeout,
                dt.first_byte,
            ),
            idle: entry.dur(e, "idle_timeout", &v.idle_timeout, dt.idle),
            total: entry.dur(e, "total_timeout", &v.total_timeout, dt.total),
        };
        let max_concurrency = entry.num(
            e,
            "max_concurrency",
            v.max_concurrency,
            max_num_seqs.unwrap_or(256),
            1,
            1_000_000,
        );
        groups.push(VllmGroup {
            api_key: None,
            default_max_tokens: entry.num(
                e,
                "default_max_tokens",
                v.default_max_tokens,
                crate::config::DEFAULT_MAX_TOKENS,
                1,
                1_000_000,
            ),
            id,
            model,
            served_names,
            command,
            extra_args: v.args.clone(),
            env: v.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            gpus,
            gpus_per_replica: per_replica,
            tensor_parallel_size: tp,
            max_num_seqs,
            gpu_memory_utilization,
            enable_prefix_caching: v.enable_prefix_caching.unwrap_or(true),
            lora_modules,
            lora_runtime: v.lora_runtime.unwrap_or(false),
            host,
            advertise_host,
            via_mesh,
            ports: (first_port, last_port),
            min_replicas,
            max_replicas,
            startup_budget: entry.dur(
                e,
                "startup_budget",
                &v.startup_budget,
                Duration::from_secs(600),
            ),
            health_interval: entry.dur(
                e,
                "health_interval",
                &v.health_interval,
                Duration::from_secs(2),
            ),
            scrape_interval: entry.dur(
                e,
                "scrape_interval",
                &v.scrape_interval,
                Duration::from_secs(5),
            ),
            health_failures: entry.num(e, "health_failures", v.health_failures, 3, 1, 100),
            hang_timeout: entry.dur(e, "hang_timeout", &v.hang_timeout, Duration::from_secs(60)),
            restart,
            drain_timeout: entry.dur(
                e,
                "drain_timeout",
                &v.drain_timeout,
                Duration::from_secs(30),
            ),
            stop_grace: entry.dur(e, "stop_grace", &v.stop_grace, Duration::from_secs(30)),
            autoscale,
            max_concurrency,
            queue_capacity: entry.num(
                e,
                "queue_capacity",
                v.queue_capacity,
                max_concurrency.saturating_mul(2),
                0,
                1_000_000,
            ),
            queue_timeout: entry.dur(
                e,
                "queue_timeout",
                &v.queue_timeout,
                Duration::from_secs(30),
            ),
            timeouts,
            region: region.to_owned(),
            weight: entry.num(e, "weight", v.weight, 1, 1, 1000),
        });
    }
    groups
}
