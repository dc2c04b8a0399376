//! The configuration as written: TOML sections and fields as they parse, every field optional
//! and unknown ones refused. [`super::validate`] turns this into a [`super::Config`].

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub node: RawNode,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub grpc: RawListen,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub quota: RawQuota,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub breaker: RawBreaker,
    pub jwt: Option<RawJwt>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub calls: RawCalls,
    #[serde(default)]
    pub traces: RawTraces,
    #[serde(default)]
    pub alerts: RawAlerts,
    #[serde(default)]
    pub cluster: RawCluster,
    #[serde(default)]
    pub providers: Vec<RawProvider>,
    /// Virtual models (e.g. `auto`): per complexity, the models to use.
    #[serde(default)]
    pub aliases: Vec<RawAlias>,
    /// Model prices, for cost limits and roll-ups.
    #[serde(default)]
    pub prices: Vec<RawPrice>,
    /// vLLM replicas this node launches and supervises.
    #[serde(default)]
    pub vllm: Vec<super::vllm::RawVllm>,
    #[serde(default)]
    pub gpus: super::vllm::RawGpus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// The model name clients use.
    pub model: Option<String>,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
    /// Input served from the provider's prompt cache (default: the input price).
    pub cached_input_usd_per_mtok: Option<f64>,
    /// Input written into the provider's prompt cache (default: the input price).
    pub cache_write_usd_per_mtok: Option<f64>,
    /// Reasoning tokens (default: the output price).
    pub reasoning_usd_per_mtok: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub id: Option<i64>,
    pub region: Option<String>,
    pub data_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub heartbeat: Option<String>,
    pub election_timeout_min: Option<String>,
    pub election_timeout_max: Option<String>,
    pub snapshot_every: Option<i64>,
    pub keep_after_snapshot: Option<i64>,
    /// Where this node's QUIC (Raft) endpoint listens, when it has peers.
    pub listen: Option<String>,
    /// The cluster PKI (`meridian certs init|issue`), when it has peers.
    pub certs_dir: Option<String>,
    /// The address peers reach this node's QUIC endpoint at, when `listen` is a wildcard.
    pub advertise: Option<String>,
    /// The other initial voters, as `ID@HOST:PORT`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Start without bootstrapping: wait to be added to a running cluster as a learner.
    #[serde(default)]
    pub join: bool,
    /// Where the actor mesh (ractor_cluster, TLS) listens; default: `listen`'s IP, port + 1.
    pub mesh_listen: Option<String>,
    /// The environment variable holding the mesh's shared cookie (optional; mutual TLS is the
    /// authentication, the cookie a second factor).
    pub mesh_cookie_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub listen: Option<String>,
    pub max_body_bytes: Option<i64>,
    pub header_read_timeout: Option<String>,
    pub sse_heartbeat: Option<String>,
    pub body_timeout: Option<String>,
    pub min_body_rate: Option<i64>,
    pub max_connections: Option<i64>,
    pub max_connections_per_client: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    /// The environment variable holding the admin token; without it the node makes one in
    /// `<data_dir>/admin.token` on first start.
    pub token_env: Option<String>,
    /// Serve the admin API over TLS with this certificate chain and key (PEM files) ...
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// ... or with the node's cluster certificate (`node-<id>.crt`/`.key` in
    /// `cluster.certs_dir`), which operators verify against the cluster CA.
    pub tls_from_cluster: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Requests must carry an API key (default true).
    pub enabled: Option<bool>,
    /// On a fresh single-node cluster, create tenant `dev` and print an API key for it
    /// (default true).
    pub dev_key: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// The exact response cache (default true).
    pub enabled: Option<bool>,
    /// Most answers kept (default 10000).
    pub max_entries: Option<i64>,
    /// How long an answer is kept (default 5m).
    pub ttl: Option<String>,
    /// Most bytes of answers kept in all (default 256 MiB).
    pub max_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlias {
    pub name: Option<String>,
    #[serde(default)]
    pub trivial: Vec<String>,
    #[serde(default)]
    pub moderate: Vec<String>,
    #[serde(default)]
    pub hard: Vec<String>,
    /// A prompt shorter than this (tokens), without code or tools, is trivial (default 256).
    pub trivial_below_tokens: Option<i64>,
    /// A prompt at least this long is hard (default 4000).
    pub hard_from_tokens: Option<i64>,
    /// At least this complex when the prompt holds a code block (default "moderate").
    pub code: Option<String>,
    /// At least this complex when the request offers tools (default "hard").
    pub tools: Option<String>,
}

/// Circuit breakers (see `meridian_actors::breaker`); every field has a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub consecutive_failures: Option<i64>,
    /// 0–1.
    pub error_rate: Option<f64>,
    pub min_calls: Option<i64>,
    pub window: Option<String>,
    pub slow_call: Option<String>,
    /// 0–1.
    pub slow_rate: Option<f64>,
    pub open_base: Option<String>,
    pub open_max: Option<String>,
    pub probes: Option<i64>,
    pub probe_grace: Option<String>,
    /// 0–1.
    pub lone_tenant_share: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`/`nbf` (default 30s).
    pub leeway: Option<String>,
    /// The environment variable holding the HS256 secret (≥ 32 bytes).
    pub hs256_secret_env: Option<String>,
    /// A JWKS file with the RS256 / EdDSA public keys.
    pub jwks_file: Option<String>,
    /// The claim naming the tenant (default "tenant").
    pub tenant_claim: Option<String>,
    /// The claim naming the tier, if tokens carry one.
    pub tier_claim: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    /// How often charged usage is reported to the replicated ledger (default 50ms).
    pub flush_every: Option<String>,
    /// How long a node's slice of a window's budget is valid (default 5s).
    pub grant_ttl: Option<String>,
    /// Longest an admission waits for a slice already asked for (default 1s).
    pub grant_wait: Option<String>,
    /// Days of daily usage roll-ups the cluster keeps (default 90; set it alike on every node:
    /// each usage report drops the days older than its proposer's setting).
    pub usage_retention_days: Option<i64>,
    /// End users a tenant's daily roll-up keeps by name (default 1000); the day's other users
    /// are counted as one, "(other users)". Per-call records keep every user.
    pub usage_users_per_day: Option<i64>,
    /// Prompt tokens an image in a request is estimated at for admission (default 765).
    pub image_tokens: Option<i64>,
    /// The share of each limit that nodes admit from on their own, split evenly among them,
    /// with no Raft round trip (default 0.5; 0: every scope through the ledger).
    pub static_share: Option<f64>,
    /// Per limit, what to do without quorum once the node's slice is spent or lapsed:
    /// "deny" (default) or "local_share" (limit ÷ number of nodes, on this node alone).
    #[serde(default)]
    pub no_quorum: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_messages: Option<i64>,
    pub max_output_tokens: Option<i64>,
    pub max_n: Option<i64>,
}

/// `[traces]`: where spans are exported (OTLP over gRPC).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTraces {
    pub endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`.
    pub protocol: Option<String>,
}

/// `[alerts]`: spend alerts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Where alerts are POSTed (JSON with a Slack-compatible `text`); none: logged and counted.
    pub webhook: Option<String>,
    /// Fractions of each tenant's and feature's daily cost cap that alert (default
    /// [0.5, 0.8, 1.0]).
    pub cap_fractions: Option<Vec<f64>>,
    /// A tenant's daily spend in dollars that alerts whatever its cap (default none).
    pub daily_usd: Option<Vec<f64>>,
    /// How often the leader looks at the day's spend (default 1s).
    pub check_every: Option<String>,
}

/// `[calls]`: the per-call log.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCalls {
    pub enabled: Option<bool>,
    pub retention_days: Option<i64>,
    /// Where the records also go as OTLP log records (else `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`; none: only the SQLite log).
    pub otlp_endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`.
    pub otlp_protocol: Option<String>,
}

/// `[metrics]`: how many tenants and features name their own series.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub tenant_labels: Option<i64>,
    pub feature_labels: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_timeout: Option<String>,
    pub unready_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub id: Option<String>,
    pub kind: Option<String>,
    pub region: Option<String>,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    pub max_concurrency: Option<i64>,
    pub queue_capacity: Option<i64>,
    pub queue_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub first_byte_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub total_timeout: Option<String>,
    /// Demo only: pause before each streamed word.
    pub word_delay: Option<String>,
    /// Output tokens a request that sets no cap is reserved and capped at, a choice (default
    /// 1,024; Anthropic, which requires a cap: 4,096).
    pub default_max_tokens: Option<i64>,
    /// The tokenizer that counts prompts for admission: `o200k_base` (default), `cl100k_base`,
    /// or the path of the model's own `tokenizer.json`.
    pub tokenizer: Option<String>,
    /// Keep each conversation on one of the providers that set this (vLLM replicas with prefix
    /// caching): consistent hashing of the prompt's start, with bounded load.
    pub prefix_affinity: Option<bool>,
    /// Share of traffic relative to others at equal load (default 1).
    pub weight: Option<i64>,
    /// `base_url` names many servers (a Kubernetes headless Service): one provider per
    /// address its host resolves to, looked up again every `discover_every` (default 10s).
    pub discover: Option<bool>,
    pub discover_every: Option<String>,
    /// USD per million tokens: input, output, cached input (optional; cheaper goes first at
    /// equal load, and the registry shows them).
    pub price_input: Option<f64>,
    pub price_output: Option<f64>,
    pub price_cached_input: Option<f64>,
}
