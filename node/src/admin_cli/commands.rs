//! The `meridian admin` subcommands and their arguments (clap), and the limits they take.

use std::path::PathBuf;

use clap::Subcommand;
use meridian_proto::pb::admin as admin_pb;

use super::UsageCommand;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// The node's identity, addresses, uptime and load.
    Status,
    /// The providers the node routes to, with their live load.
    Providers,
    /// Read the node's configuration file again (as SIGHUP does): providers are applied at
    /// once; other changed sections are named as taking a restart.
    Reload,
    /// The Raft cluster: status (the default), state, and membership changes.
    Cluster {
        #[command(subcommand)]
        command: Option<ClusterCommand>,
    },
    /// Tiers: named sets of default limits.
    Tier {
        #[command(subcommand)]
        command: TierCommand,
    },
    /// Tenants: who may call, on which tier, with which overrides.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// API keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Circuit breakers: list (the default), force open, force closed, reset.
    Breaker {
        #[command(subcommand)]
        command: Option<BreakerCommand>,
    },
    /// The vLLM replicas this node supervises: list (the default), drain, stop, start,
    /// restart, LoRA adapters.
    Vllm {
        #[command(subcommand)]
        command: Option<VllmCommand>,
    },
    /// Usage: the calls this node served, and cluster-wide reports of what calls cost.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
}

#[derive(Subcommand)]
pub enum VllmCommand {
    /// Each replica: state (and for how long), GPUs, port, uptime, restarts, in-flight
    /// requests, engine load and KV-cache use.
    List,
    /// Deregister REPLICA, let its in-flight requests finish, then stop it (it stays stopped).
    Drain { replica: String },
    /// Deregister REPLICA and stop it now.
    Stop { replica: String },
    /// Launch a stopped or failed REPLICA.
    Start { replica: String },
    /// Drain REPLICA, then launch it again.
    Restart { replica: String },
    /// Load the LoRA adapter NAME from PATH on REPLICA (its group needs lora_runtime = true).
    LoraLoad {
        replica: String,
        name: String,
        path: String,
    },
    /// Unload the LoRA adapter NAME from REPLICA.
    LoraUnload { replica: String, name: String },
}

#[derive(Subcommand)]
pub enum BreakerCommand {
    /// Every breaker with a record: state, open period, trips, reason.
    List,
    /// Stop all traffic to PROVIDER on every node until closed or reset.
    Open {
        provider: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Keep PROVIDER routable whatever detection sees.
    Close {
        provider: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Closed again and back under automatic detection, trip count cleared.
    Reset { provider: String },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a key for TENANT; the key is printed this once.
    Create {
        tenant: String,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List keys (ids only, never secrets).
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Revoke a key by id: refused on every node once applied.
    Revoke { key_id: String },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Leader, term, commit and applied indexes, voters, learners, members.
    Status,
    /// The node's applied replicated state: a summary (record counts, members, tiers,
    /// providers, breakers), or one section's records as JSON, one page per line.
    State {
        /// members, providers, tiers, tenants, api_keys, ledger, breakers, usage, alerts,
        /// revoked_certs, applied_seq.
        section: Option<String>,
        /// Only records whose key starts with this, e.g. "tenant/acme/" in the ledger.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many records (default: all, fetched page by page).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// The actor mesh: connected peers, and each peer's answer when asked through it.
    Mesh,
    /// Add a node started with `cluster.join = true` as a learner.
    AddLearner {
        node: u64,
        /// Its Raft (QUIC) address, HOST:PORT.
        raft_addr: String,
    },
    /// Make a learner a voter.
    Promote { node: u64 },
    /// Take a voter or learner out of the cluster.
    Remove { node: u64 },
    /// Refuse the cluster certificate in the PEM file CERT on every node from now on (a node's
    /// old or stolen certificate; the node may stay a member with a new one).
    RevokeCert {
        cert: PathBuf,
        /// The node it was issued to.
        #[arg(long)]
        node: u64,
    },
}

/// Limits as command-line flags (unset: no limit on a tier, the tier's on a tenant).
#[derive(clap::Args)]
pub struct LimitArgs {
    #[arg(long)]
    requests_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_day: Option<u64>,
    #[arg(long)]
    tokens_per_month: Option<u64>,
    /// US dollars per day, e.g. 12.50.
    #[arg(long)]
    cost_per_day_usd: Option<f64>,
}

impl LimitArgs {
    pub(super) fn into_pb(self) -> anyhow::Result<admin_pb::Limits> {
        let cost = match self.cost_per_day_usd {
            Some(usd) if !(0.0..=1e9).contains(&usd) => {
                anyhow::bail!("--cost-per-day-usd must be between 0 and 1e9, got {usd}")
            }
            Some(usd) => Some((usd * 1e6).round() as u64),
            None => None,
        };
        Ok(admin_pb::Limits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            tokens_per_month: self.tokens_per_month,
            cost_per_day_micro_usd: cost,
        })
    }
}

#[derive(Subcommand)]
pub enum TierCommand {
    /// Create or replace a tier.
    Put {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Limits of each end user of a tenant on the tier, e.g. "tokens_per_minute=2000".
        #[arg(long)]
        per_user: Option<String>,
    },
}

#[allow(clippy::large_enum_variant)] // parsed once per run: size is irrelevant
#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create or update a tenant.
    Put {
        id: String,
        #[arg(long)]
        tier: String,
        #[command(flatten)]
        overrides: LimitArgs,
        /// Limits of each end user, e.g. "tokens_per_minute=2000,requests_per_minute=20".
        #[arg(long)]
        per_user: Option<String>,
        /// Limits of a feature (X-Meridian-Feature), e.g. "search:tokens_per_day=50000"
        /// (repeatable).
        #[arg(long = "feature")]
        features: Vec<String>,
        /// Data residency: only providers in these regions serve the tenant, e.g. "eu-west,eu-central".
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        /// The only models the tenant may call.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Share of provider queues when tenants wait: this many of its requests per turn.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Engine-specific request fields the tenant may send, e.g. "priority,chat_template".
        #[arg(long, value_delimiter = ',')]
        engine_fields: Vec<String>,
    },
    /// Tiers and tenants, as this node has applied them.
    List,
}

/// How the CLI checks an `https://` admin API.
pub struct Tls {
    pub ca_cert: Option<PathBuf>,
    pub tls_name: Option<String>,
}
