//! The replicated state: commands that go through the Raft log and the state they build.
//!
//! Applying is deterministic: a [`Proposal`] carries its proposer's timestamp, and
//! [`ClusterState::apply`] reads no clock, does no IO and draws no randomness, so every node
//! that applies the same log reaches the same state.
//!
//! What is here: members, the provider registry, tenants and tiers with their limits, API keys
//! (SHA-256 hashes only), the quota ledger with per-node grants, breaker states and daily usage
//! roll-ups. The admission and routing layers decide *when* to propose these commands; this
//! module defines what applying them means.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod alerts;
mod apply;
mod ledger_table;
mod node_map;
mod reach;
mod usage;
pub use alerts::SpendAlert;
pub use ledger_table::{LedgerKey, LedgerTable};
pub use node_map::NodeMap;
pub use reach::Reach;
pub use usage::{
    DEFAULT_MAX_USERS, OTHER_USERS, ReportRow, TenantDay, UsageDimension, UsageKey, day_of, report,
    utc_date,
};

/// A node's id in the cluster (Raft's node id).
pub type NodeId = u64;

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Proposer's wall clock (Unix ms) when it proposed; the only time apply ever sees.
    pub at_unix_ms: u64,
    pub proposer: NodeId,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    UpsertMember(Member),
    RemoveMember {
        id: NodeId,
    },
    UpsertProvider(ProviderRecord),
    RemoveProvider {
        id: String,
    },
    UpsertTier(Tier),
    /// Refused with [`Applied::NotFound`] when the tier does not exist.
    UpsertTenant(Tenant),
    RemoveTenant {
        id: String,
    },
    /// Refused with [`Applied::NotFound`] when the tenant does not exist. A key id already
    /// taken is [`Applied::Unchanged`] for the same record (a retried proposal) and
    /// [`Applied::Refused`] for any other (keys never change; a revoked one stays revoked).
    CreateApiKey(ApiKeyRecord),
    RevokeApiKey {
        id: String,
    },
    /// Refuses, from now on, the cluster certificate whose DER encoding hashes (SHA-256, hex) to
    /// `fingerprint` — a node's old or stolen certificate — while its node id may stay a
    /// member with another one. Never undone.
    RevokeCertificate {
        fingerprint: String,
        node: NodeId,
    },
    /// Asks for a slice of a quota window's remaining budget for `node`; answered with
    /// [`Applied::Granted`]. What the node's previous grant on this key still promised stays
    /// with it (the node goes on charging against it until it hears the answer); the new slice
    /// comes on top, from what is available.
    RequestGrant(GrantRequest),
    /// `node` gives up its static share of `key`'s window, having admitted `used` from it (asked
    /// by [`Ledger::wanted`]); from then on it admits the scope only through grants.
    ReleaseShare {
        key: String,
        node: NodeId,
        limit: u64,
        window_ms: u64,
        window_start_unix_ms: u64,
        share: u64,
        share_nodes: u64,
        used: u64,
    },
    /// Usage charged by `node` on `key` in the window starting at `window_start_unix_ms`:
    /// positive when admitted, negative when a reservation is settled for less. Usage for a
    /// window that has already rolled over is dropped. A key with no entry yet (usage a node
    /// admitted on its own, without quorum) gets one from `limit` and `window_ms`, unless the
    /// window is long over; reports from before these fields (0) only add to an entry.
    ReportUsage {
        key: String,
        node: NodeId,
        window_start_unix_ms: u64,
        delta: i64,
        #[serde(default)]
        limit: u64,
        #[serde(default)]
        window_ms: u64,
    },
    /// Moves a provider's breaker (keyed by the provider id every node configures it under).
    SetBreaker {
        provider: String,
        state: BreakerState,
        reason: String,
        /// Consecutive trips so far (sets how long the next open period lasts); 0 when closed.
        #[serde(default)]
        trips: u32,
        /// An operator's decision: automatic changes leave a forced breaker alone.
        #[serde(default)]
        forced: bool,
        /// For automatic changes: apply only if the record is still at this version (0: no
        /// record), so that two nodes deciding from the same state do not both apply.
        #[serde(default)]
        expect_version: Option<u64>,
        /// The panic threshold, for trips: per model the provider serves, the ids of every
        /// provider serving it (this one included). A trip that would leave more than half of
        /// any group open is refused.
        #[serde(default)]
        groups: Vec<Vec<String>>,
    },
    /// Adds to the roll-up of day `day` (the calls' own, dated by the node that served them;
    /// absent, as older nodes send it, or later than the proposal's day: the proposal's day)
    /// for `tenant`, by model, provider, feature and end user (the first `max_users` of the
    /// tenant's day by name, the rest as one), and drops the days older than `retain_days`
    /// (the proposer's settings).
    RecordUsage {
        tenant: String,
        model: String,
        totals: UsageTotals,
        #[serde(default = "default_retain_days")]
        retain_days: u64,
        #[serde(default)]
        provider: String,
        #[serde(default)]
        feature: String,
        #[serde(default)]
        user: String,
        #[serde(default = "usage::default_max_users")]
        max_users: u64,
        /// Days since the Unix epoch (UTC).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        day: Option<u64>,
    },
    /// Records a spend alert unless one with its id exists: [`Applied::Changed`] once for the
    /// whole cluster (that proposer delivers it), [`Applied::Unchanged`] for any repeat.
    /// Alerts of days before the alert's previous day are dropped.
    FireAlert(SpendAlert),
    /// Marks alert `id` delivered ([`Applied::NotFound`] if it is not kept).
    AlertDelivered {
        id: String,
    },
    /// `command`, applied only if `seq` is above the last `seq` applied for `node`: a proposal
    /// that is retried after an indeterminate failure (its leader died) is applied once.
    Once {
        node: NodeId,
        seq: u64,
        command: Box<Command>,
    },
    /// Several commands applied in order as one log entry (usage flushes, bulk writes).
    /// Answered with [`Applied::Changed`] if any of them changed the state.
    Batch {
        commands: Vec<Command>,
    },
}

impl Command {
    /// How many commands this is: a batch's, or one.
    pub fn commands(&self) -> usize {
        match self {
            Command::Batch { commands } => commands.len(),
            _ => 1,
        }
    }
}

/// Limits of a tier, or a tenant's overrides of them (`None`: no limit / not overridden).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
    /// Millionths of a US dollar per day.
    pub cost_per_day_micro_usd: Option<u64>,
}

impl Limits {
    /// These limits with every field that `overrides` sets replaced.
    pub fn overlay(&self, overrides: &Limits) -> Limits {
        Limits {
            requests_per_minute: overrides.requests_per_minute.or(self.requests_per_minute),
            tokens_per_minute: overrides.tokens_per_minute.or(self.tokens_per_minute),
            tokens_per_day: overrides.tokens_per_day.or(self.tokens_per_day),
            tokens_per_month: overrides.tokens_per_month.or(self.tokens_per_month),
            cost_per_day_micro_usd: overrides
                .cost_per_day_micro_usd
                .or(self.cost_per_day_micro_usd),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    /// Limits of each tenant on the tier, all its users and features together.
    pub limits: Limits,
    /// Limits of each end user of such a tenant.
    #[serde(default)]
    pub per_user: Limits,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub tier: String,
    /// Overrides of the tier's tenant-wide limits.
    #[serde(default)]
    pub overrides: Limits,
    /// Overrides of the tier's per-user limits.
    #[serde(default)]
    pub per_user: Limits,
    /// Limits of named features (`X-Meridian-Feature`), each on its own.
    #[serde(default)]
    pub features: BTreeMap<String, Limits>,
    /// Data residency: the only regions whose providers may serve this tenant (empty: any).
    /// Never broken, not even by a fallback.
    #[serde(default)]
    pub regions: Vec<String>,
    /// The only models this tenant may call (empty: any).
    #[serde(default)]
    pub models: Vec<String>,
    /// Its share of provider queues against other tenants' (waiters served per turn; 0 and 1
    /// are the same).
    #[serde(default)]
    pub weight: u32,
    /// Set by apply from the proposal's timestamp.
    #[serde(default)]
    pub created_at_unix_ms: u64,
    #[serde(default)]
    pub updated_at_unix_ms: u64,
    /// Engine-specific request fields this tenant may send (see
    /// [`crate::openai::RESTRICTED_FIELDS`]; last, so records kept before it still read).
    #[serde(default)]
    pub engine_fields: Vec<String>,
}

/// An API key as the cluster stores it: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public id of the key (safe to show and log).
    pub id: String,
    pub tenant: String,
    /// Lowercase hex SHA-256 of the whole secret.
    pub sha256_hex: String,
    #[serde(default)]
    pub label: String,
    /// Set by apply from the proposal's timestamp.
    #[serde(default)]
    pub created_at_unix_ms: u64,
    #[serde(default)]
    pub revoked_at_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GrantRequest {
    /// The limit this budget belongs to, e.g. `tenant/acme/tokens_per_minute`.
    pub key: String,
    pub node: NodeId,
    /// The limit over the window (the ledger follows changes to it).
    pub limit: u64,
    /// Windows are aligned to multiples of this length since the Unix epoch.
    pub window_ms: u64,
    /// The window the requester is admitting in; a request for a window the ledger has already
    /// left is granted nothing, one for a later window rolls the ledger over.
    pub window_start_unix_ms: u64,
    /// How much the node asks for.
    pub amount: u64,
    /// The grant lapses this long after the proposal (so a dead node's slice comes back).
    pub ttl_ms: u64,
    /// Static shares (0: none): each of `share_nodes` nodes may admit up to `share` in the
    /// window on its own, with no ledger entry; the ledger keeps that much aside for every node
    /// that has not released its share. A request releases the requester's share.
    #[serde(default)]
    pub share: u64,
    #[serde(default)]
    pub share_nodes: u64,
    /// What the requester admitted from its share in the window (counted as its usage).
    #[serde(default)]
    pub share_used: u64,
    /// What the requester has charged in the window in all, reported or not (a report may
    /// still be on its way when its grant lapses: the ledger holds that much for it).
    #[serde(default)]
    pub charged: u64,
}

/// One quota window's account.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// The limit key it accounts for (the table's key; not serialized with the entry). Set by
    /// the table, never changed: see [`Ledger::key`].
    #[serde(skip)]
    key: LedgerKey,
    pub window_start_unix_ms: u64,
    pub window_ms: u64,
    pub limit: u64,
    /// Usage reported in this window.
    pub used: u64,
    /// Of `used`, what each node reported.
    #[serde(default)]
    pub used_by: NodeMap<u64>,
    pub grants: NodeMap<Grant>,
    /// Each node's static share of the window, and how many nodes hold one (see
    /// [`GrantRequest::share`]).
    #[serde(default)]
    pub share: u64,
    #[serde(default)]
    pub share_nodes: u64,
    /// Nodes that released their share, with what they had admitted from it (in `used`).
    #[serde(default)]
    pub released: NodeMap<u64>,
    /// A grant got less than it asked for while shares were still held: the nodes holding one
    /// are asked (by this flag) to release it.
    #[serde(default)]
    pub wanted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Grant {
    pub amount: u64,
    /// Usage reported against this grant.
    pub used: u64,
    pub expires_at_unix_ms: u64,
}

impl Grant {
    /// The part of the grant not yet reported as used.
    pub fn outstanding(&self) -> u64 {
        self.amount.saturating_sub(self.used)
    }
}

impl Ledger {
    /// The limit key this entry accounts for.
    pub fn key(&self) -> &LedgerKey {
        &self.key
    }

    /// Budget neither used, nor promised to a node, nor kept aside as a share not released.
    pub fn available(&self) -> u64 {
        let promised: u64 = self.grants.values().map(Grant::outstanding).sum();
        self.limit
            .saturating_sub(self.used)
            .saturating_sub(promised)
            .saturating_sub(self.shares_held())
    }

    /// What the shares not yet released may still admit, at most.
    pub fn shares_held(&self) -> u64 {
        let holders = self.share_nodes.saturating_sub(self.released.len() as u64);
        self.share.saturating_mul(holders)
    }

    /// Records `node`'s release of its share, having admitted `used` from it (once).
    fn release(&mut self, node: NodeId, share: u64, share_nodes: u64, used: u64) {
        self.share = self.share.max(share);
        self.share_nodes = self.share_nodes.max(share_nodes);
        if self.released.contains_key(&node) {
            return;
        }
        self.released.insert(node, used);
        self.used = self.used.saturating_add(used);
        let mine = self.used_by.entry_or_default(node);
        *mine = mine.saturating_add(used);
        if self.shares_held() == 0 {
            self.wanted = false;
        }
    }

    /// Moves the ledger to the window starting at `start` (if later) and to time `at`: a new
    /// window starts empty, lapsed grants go back.
    fn advance(&mut self, at: u64, start: u64, window_ms: u64) {
        let window_ms = window_ms.max(1);
        if self.window_ms != window_ms || start > self.window_start_unix_ms {
            *self = Ledger {
                key: std::mem::take(&mut self.key),
                window_start_unix_ms: start,
                window_ms,
                limit: self.limit,
                ..Ledger::default()
            };
        }
        self.grants.retain(|_, g| g.expires_at_unix_ms > at);
    }
}

/// A breaker's replicated state. An open breaker whose `until` has passed is half-open: the
/// node that tripped it lets a few probes through (see `actors::breaker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open { until_unix_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerRecord {
    pub state: BreakerState,
    pub reason: String,
    /// When it entered this state (the proposal's timestamp) and which node decided it.
    pub since_unix_ms: u64,
    pub by: NodeId,
    #[serde(default)]
    pub trips: u32,
    #[serde(default)]
    pub forced: bool,
    /// Bumped by every change.
    #[serde(default)]
    pub version: u64,
}

impl BreakerRecord {
    /// Open (possibly half-open) at all, i.e. ejected from routing.
    pub fn is_open(&self) -> bool {
        matches!(self.state, BreakerState::Open { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageTotals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from a prefix cache (counted apart, also inside `prompt_tokens`).
    pub cached_tokens: u64,
    pub cost_micro_usd: u64,
    /// Requests answered from a node's response cache (counted in `requests`, free: no tokens,
    /// no cost).
    pub cache_hits: u64,
}

impl UsageTotals {
    /// Adds `other` to these totals (saturating).
    pub fn add(&mut self, other: &UsageTotals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(other.cached_tokens);
        self.cost_micro_usd = self.cost_micro_usd.saturating_add(other.cost_micro_usd);
        self.cache_hits = self.cache_hits.saturating_add(other.cache_hits);
    }
}

/// Days of usage roll-ups kept unless configured otherwise; older days are dropped as new ones
/// are written.
pub const DEFAULT_RETAIN_DAYS: u64 = 90;

fn default_retain_days() -> u64 {
    DEFAULT_RETAIN_DAYS
}
const DAY_MS: u64 = 86_400_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub region: String,
    /// Where peers reach this node's Raft endpoint.
    pub raft_addr: String,
    /// This node's client-facing HTTP address.
    pub http_addr: String,
    /// Where peers reach this node's actor mesh (empty on a single node).
    #[serde(default)]
    pub mesh_addr: String,
    /// When this run of the node started (Unix ms; 0 in records of earlier versions). Each run
    /// records itself anew, and is ready once it has applied that record: it has then applied
    /// everything the cluster committed before it started.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// The newest snapshot form this run reads (0 in records of earlier versions, which read
    /// only uncompressed snapshots). A leader compresses its snapshots only once every member
    /// says it reads them.
    #[serde(default)]
    pub snapshot_format: u32,
}

/// What kind of upstream a provider is. Recorded as its name (`openai`, `anthropic`, `demo`,
/// `mesh`, `vllm`), as earlier versions wrote it; a name this version does not know is kept as
/// it was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ProviderKind {
    /// Any OpenAI-compatible endpoint.
    OpenAi,
    Anthropic,
    /// The built-in demo model.
    Demo,
    /// Another node's provider, reached through the actor mesh.
    Mesh,
    /// A vLLM replica a node launched.
    Vllm,
    Other(String),
}

impl ProviderKind {
    pub fn as_str(&self) -> &str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Demo => "demo",
            Self::Mesh => "mesh",
            Self::Vllm => "vllm",
            Self::Other(name) => name,
        }
    }
}

impl From<&str> for ProviderKind {
    fn from(name: &str) -> Self {
        match name {
            "openai" => Self::OpenAi,
            "anthropic" => Self::Anthropic,
            "demo" => Self::Demo,
            "mesh" => Self::Mesh,
            "vllm" => Self::Vllm,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl From<String> for ProviderKind {
    fn from(name: String) -> Self {
        Self::from(name.as_str())
    }
}

impl From<ProviderKind> for String {
    fn from(kind: ProviderKind) -> Self {
        kind.as_str().to_owned()
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider in the cluster-wide registry (e.g. a vLLM replica that became ready).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRecord {
    pub id: String,
    pub kind: ProviderKind,
    pub region: String,
    /// Where it is reached (recorded as its URL, or `mesh://node-<id>`).
    #[serde(rename = "base_url")]
    pub reach: Reach,
    pub models: Vec<String>,
    /// The node that registered it.
    pub owner: NodeId,
    /// Its share of traffic relative to others at equal load (1: normal).
    #[serde(default)]
    pub weight: u32,
    /// Calls it takes at once.
    #[serde(default)]
    pub max_concurrency: u32,
    /// What it charges (none for self-hosted replicas).
    #[serde(default)]
    pub price: ProviderPrice,
    /// A vLLM replica a node launched and registered at run time: every node routes to it
    /// (as `reach` says) while it is registered. (Configured providers are recorded for
    /// inspection only: each node routes to its own configured ones.)
    #[serde(default)]
    pub replica: bool,
    /// Set by apply from the proposal's timestamp.
    #[serde(default)]
    pub updated_at_unix_ms: u64,
    /// Output tokens a request naming no cap is reserved and capped at (0: the default, 1,024).
    #[serde(default)]
    pub default_max_tokens: u32,
    /// The key a replica was started with (vLLM's `--api-key`, given as `VLLM_API_KEY`): the
    /// nodes that call it directly send it. Never shown by the admin API.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_key: String,
}

/// A provider's prices, in millionths of a US dollar per million tokens (0.15 USD → 150,000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProviderPrice {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

/// What applying a proposal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// The state changed.
    #[default]
    Changed,
    /// The command was valid but changed nothing (a repeat).
    Unchanged,
    /// It named something that does not exist.
    NotFound,
    /// A quota grant was recorded: a new slice of `amount` (possibly 0) on top of `held`,
    /// what the node's previous grant still promised (or, once that lapsed, what the node said
    /// it had charged beyond its reports), when the ledger had seen `used` reported by the node
    /// in the window. The node may charge `used + held + amount` in all, whatever of its
    /// reports are still on their way.
    Granted {
        amount: u64,
        #[serde(default)]
        used: u64,
        #[serde(default)]
        held: u64,
    },
    /// Valid, but a guard refused it (a breaker's panic threshold).
    Refused,
    /// The leader's read index, asked for a linearizable read: a node that has applied the log
    /// up to `index` holds every write committed before the leader was asked. Not the outcome
    /// of a command.
    ReadIndex { index: u64 },
}

/// A table of the replicated state: a persistent B-tree. Cloning it is O(1) (the clone shares
/// every node) and a write copies only the nodes on the path to what it changes, so the state
/// machine publishes each applied state without copying what the command did not touch.
pub type Table<K, V> = imbl::OrdMap<K, V>;

/// Everything the cluster agrees on. Cloning it costs a handful of reference counts, whatever
/// it holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterState {
    pub members: Table<NodeId, Member>,
    pub providers: Table<String, ProviderRecord>,
    pub tiers: Table<String, Tier>,
    pub tenants: Table<String, Tenant>,
    /// By key id.
    pub api_keys: Table<String, ApiKeyRecord>,
    /// Quota windows by limit key, each behind its own `Arc`: a write copies the B-tree nodes
    /// on its path (keyed by a hash of the key: see [`LedgerTable`]) and clones only the one
    /// entry it changes.
    pub ledger: LedgerTable,
    /// By provider id.
    pub breakers: Table<String, BreakerRecord>,
    /// Days since the Unix epoch → tenant → the day's roll-up.
    /// (A tenant's day is copied whole when a row of it changes: its rows are a tenant's models,
    /// providers and features by its users, at most `max_users` users.)
    pub usage: Table<u64, Table<String, TenantDay>>,
    /// The last `Once` sequence number applied per node.
    pub applied_seq: Table<NodeId, u64>,
    /// Spend alerts of the last two days, by id.
    pub alerts: Table<String, SpendAlert>,
    /// Where the ledger sweep stopped (see [`ClusterState::sweep_ledger`]).
    pub ledger_sweep_after: LedgerKey,
    /// Cluster certificates refused by every node, by the SHA-256 of their DER encoding (hex).
    pub revoked_certs: Table<String, RevokedCert>,
}

/// A revoked cluster certificate: the node it was issued to, and when it was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RevokedCert {
    pub node: NodeId,
    pub revoked_at_unix_ms: u64,
}

/// Ledger entries each applied entry looks at for removal.
const SWEEP_PER_APPLY: usize = 64;
/// A window's ledger entry is removed this long after the window ends (and only once no grant
/// on it is live); a grant asked for a window that ended longer ago than this is not made.
pub const LEDGER_GRACE_MS: u64 = 120_000;

impl ClusterState {
    /// The limits that apply to `tenant` (its tier's, with its overrides), if it exists.
    pub fn limits_of(&self, tenant: &str) -> Option<Limits> {
        self.overlaid(tenant, |tier| tier.limits, |t| &t.overrides)
    }

    /// The limits of each end user of `tenant` (the tier's per-user limits, with the tenant's
    /// overrides), if the tenant exists.
    pub fn user_limits_of(&self, tenant: &str) -> Option<Limits> {
        self.overlaid(tenant, |tier| tier.per_user, |t| &t.per_user)
    }

    /// One set of `tenant`'s limits: its tier's (none without the tier) with the tenant's own
    /// over them.
    fn overlaid(
        &self,
        tenant: &str,
        of_tier: impl Fn(&Tier) -> Limits,
        own: impl Fn(&Tenant) -> &Limits,
    ) -> Option<Limits> {
        let t = self.tenants.get(tenant)?;
        let tier = self.tiers.get(&t.tier).map(of_tier).unwrap_or_default();
        Some(tier.overlay(own(t)))
    }

    /// The limits of `feature` of `tenant`, if it has any.
    pub fn feature_limits_of(&self, tenant: &str, feature: &str) -> Option<Limits> {
        self.tenants.get(tenant)?.features.get(feature).copied()
    }
}

/// What an upsert of `new` over `old` changes, one `field: old → new` line per top-level field
/// that differs (`skip`: fields apply sets itself, such as timestamps); `created` for a new
/// record. Read from the records' serialized form, so a field added later is never left out.
pub fn changed_fields<T: Serialize>(old: Option<&T>, new: &T, skip: &[&str]) -> Vec<String> {
    let as_map = |v: &T| match serde_json::to_value(v) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let Some(old) = old else {
        return vec!["created".into()];
    };
    let (old, new) = (as_map(old), as_map(new));
    let null = serde_json::Value::Null;
    new.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            let before = old.get(k).unwrap_or(&null);
            (before != v).then(|| format!("{k}: {before} → {v}"))
        })
        .collect()
}

#[cfg(test)]
mod tests;
