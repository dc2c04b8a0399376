//! Configuration: TOML (unknown keys rejected) → `MERIDIAN_…` environment overrides →
//! [`RawConfig`] → validated [`Config`] of checked types.
//!
//! Every violation is reported with its field path (`providers[1].base_url`), all at once.
//! Secrets (provider API keys) are read from the environment variable a provider names, and
//! never reach `Debug`, logs or errors.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_actors::auth::jwt::{JwtSettings, JwtVerifier};
use meridian_actors::breaker::BreakerConfig;
use meridian_actors::cache::CacheConfig;
use meridian_actors::estimate::{Price, Tokenizer};
use meridian_actors::policy::{Alias, Complexity, ComplexityRules};
use meridian_actors::quota::{LimitKind, NoQuorum, QuotaConfig};
use meridian_actors::{
    ApiAdapter, DemoModel, Dialect, ModelRoute, ProviderSpec, Timeouts, Upstream,
};
use meridian_cluster::raft::RaftTimings;
use meridian_proto::cluster::ProviderPrice;
use meridian_proto::openai::RequestLimits;
use serde::Deserialize;

/// Prefix of environment variables that override configuration fields. Only names of the form
/// `MERIDIAN_SECTION__FIELD` are overrides; others with the prefix (`MERIDIAN_LOG`) are not.
pub const ENV_PREFIX: &str = "MERIDIAN_";

// ---------------------------------------------------------------------------------------------
// Raw (as written)
// ---------------------------------------------------------------------------------------------

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
    pub vllm: Vec<vllm::RawVllm>,
    #[serde(default)]
    pub gpus: vllm::RawGpus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// The model name clients use.
    pub model: Option<String>,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_timeout: Option<String>,
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
    /// Anthropic only: `max_tokens` for requests that set none (Anthropic requires one).
    pub default_max_tokens: Option<i64>,
    /// The tokenizer that counts prompts for admission: `o200k_base` (default) or `cl100k_base`.
    pub tokenizer: Option<String>,
    /// Keep each conversation on one of the providers that set this (vLLM replicas with prefix
    /// caching): consistent hashing of the prompt's start, with bounded load.
    pub prefix_affinity: Option<bool>,
    /// Share of traffic relative to others at equal load (default 1).
    pub weight: Option<i64>,
    /// USD per million tokens: input, output, cached input (optional; cheaper goes first at
    /// equal load, and the registry shows them).
    pub price_input: Option<f64>,
    pub price_output: Option<f64>,
    pub price_cached_input: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// Validated
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub node: NodeConfig,
    pub http: HttpConfig,
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The admin token from `admin.token_env`; `None`: `<data_dir>/admin.token`.
    pub admin_token: Option<Secret>,
    pub auth: AuthConfig,
    pub quota: QuotaConfig,
    /// JWT callers, when `[jwt]` is configured.
    pub jwt: Option<Arc<JwtVerifier>>,
    /// Prices by model.
    pub prices: std::collections::HashMap<String, Price>,
    /// The response cache, when on.
    pub cache: Option<CacheConfig>,
    pub breaker: BreakerConfig,
    pub limits: RequestLimits,
    pub drain_timeout: Duration,
    pub providers: Vec<ProviderConfig>,
    pub aliases: HashMap<String, Alias>,
    pub raft: RaftTimings,
    /// Set when the node has peers; `None` runs a single-node cluster.
    pub cluster: Option<ClusterPeers>,
    /// The vLLM groups this node supervises.
    pub vllm: Vec<meridian_actors::vllm::VllmGroup>,
    /// The GPU discovery command.
    pub nvidia_smi: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    pub enabled: bool,
    pub dev_key: bool,
}

/// A multi-node cluster's wiring.
#[derive(Debug, Clone)]
pub struct ClusterPeers {
    pub listen: SocketAddr,
    /// Where peers reach this node (`listen` unless `advertise` is set).
    pub advertise: SocketAddr,
    pub certs_dir: PathBuf,
    /// The other initial voters (a joining node may list none).
    pub peers: Vec<(u64, SocketAddr)>,
    /// Joins a running cluster instead of bootstrapping one.
    pub join: bool,
    /// The actor mesh's listener, and where peers reach it.
    pub mesh_listen: SocketAddr,
    pub mesh_advertise: SocketAddr,
    /// From `mesh_cookie_env`; `None`: derived from the CA certificate (not a secret).
    pub mesh_cookie: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub region: String,
    /// Raft log, vote and snapshots live here.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub sse_heartbeat: Duration,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub id: String,
    pub region: String,
    pub kind: ProviderKind,
    pub models: Vec<ModelRoute>,
    pub max_concurrency: u32,
    pub queue_capacity: u32,
    pub queue_timeout: Duration,
    pub timeouts: Timeouts,
    pub tokenizer: Tokenizer,
    pub prefix_affinity: bool,
    pub weight: u32,
    pub price: ProviderPrice,
}

#[derive(Debug, Clone)]
pub enum ProviderKind {
    /// An HTTP API in the given dialect (`openai` or `anthropic`).
    Api {
        dialect: Dialect,
        base_url: String,
        api_key: Option<Secret>,
    },
    Demo {
        word_delay: Duration,
    },
}

/// A secret value; `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl ProviderConfig {
    /// The actor-side spec, with its upstream client built.
    pub fn to_spec(&self) -> Result<ProviderSpec, ConfigError> {
        let upstream = match &self.kind {
            ProviderKind::Api {
                dialect,
                base_url,
                api_key,
            } => Upstream::Api(
                ApiAdapter::new(
                    *dialect,
                    base_url,
                    api_key.as_ref().map(|k| k.expose().to_owned()),
                    self.timeouts.connect,
                )
                .map_err(|e| {
                    ConfigError::one(
                        format!("providers.{}", self.id),
                        format!("cannot build the HTTP client: {e}"),
                    )
                })?,
            ),
            ProviderKind::Demo { word_delay } => Upstream::Demo(DemoModel {
                word_delay: *word_delay,
            }),
        };
        Ok(ProviderSpec {
            id: self.id.clone(),
            region: self.region.clone(),
            models: self.models.clone(),
            upstream,
            max_concurrency: self.max_concurrency,
            queue_capacity: self.queue_capacity,
            queue_timeout: self.queue_timeout,
            timeouts: self.timeouts,
            tokenizer: self.tokenizer,
            prefix_affinity: self.prefix_affinity,
            weight: self.weight,
            price: self.price,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One bad field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub errors: Vec<FieldError>,
}

impl ConfigError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.errors.len()
        )?;
        for e in &self.errors {
            writeln!(f, "  {}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Which variables the process environment holds; tests pass a plain list instead.
pub trait Env {
    /// Every `(name, value)` pair.
    fn vars(&self) -> Vec<(String, String)>;

    fn get(&self, name: &str) -> Option<String> {
        self.vars()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }

    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for Vec<(String, String)> {
    fn vars(&self) -> Vec<(String, String)> {
        self.clone()
    }
}

/// Loads a configuration file's text, or the embedded default when `text` is `None`.
pub fn load(text: Option<&str>, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut table: toml::Table = match text {
        Some(t) => t
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::one("(file)", e.to_string()))?,
        None => embedded_default(env),
    };
    let mut typed = apply_env_overrides(&mut table, env)?;
    let raw: RawConfig = loop {
        match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
            Ok(raw) => break raw,
            Err(e) => {
                // An override read as a number, boolean or list where the field takes text
                // (a region `2024`) is the text it was written as.
                let at: Vec<String> = e
                    .path()
                    .iter()
                    .filter_map(|segment| match segment {
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        _ => None,
                    })
                    .collect();
                match typed.iter().position(|(path, _)| *path == at) {
                    Some(i) => {
                        let (path, text) = typed.swap_remove(i);
                        set_path(&mut table, &path, toml::Value::String(text))
                            .map_err(|msg| ConfigError::one(path.join("."), msg))?;
                    }
                    None => {
                        let path = e.path().to_string();
                        return Err(ConfigError::one(path, e.into_inner().to_string()));
                    }
                }
            }
        }
    };
    validate(raw, env)
}

/// The embedded default: one node on loopback serving the demo model, plus OpenAI when
/// `OPENAI_API_KEY` is set and Anthropic when `ANTHROPIC_API_KEY` is set.
fn embedded_default(env: &dyn Env) -> toml::Table {
    let mut text = String::from(
        r#"
[[providers]]
id = "demo"
kind = "demo"
models = ["demo"]
"#,
    );
    if env.get("OPENAI_API_KEY").is_some_and(|k| !k.is_empty()) {
        text.push_str(
            r#"
[[providers]]
id = "openai"
kind = "openai"
region = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini"]
"#,
        );
    }
    if env.get("ANTHROPIC_API_KEY").is_some_and(|k| !k.is_empty()) {
        text.push_str(
            r#"
[[providers]]
id = "anthropic"
kind = "anthropic"
region = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "ANTHROPIC_API_KEY"
models = ["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"]
"#,
        );
    }
    text.parse().unwrap_or_default()
}

/// Maps whose keys are the user's own, kept as written in an override's name (`*`: any list
/// index): `MERIDIAN_VLLM__0__ENV__HF_HOME` sets `vllm[0].env.HF_HOME`. Every other name is a
/// field, written lowercase.
const VERBATIM_KEYS: &[&[&str]] = &[&["vllm", "*", "env"]];

/// `MERIDIAN_HTTP__LISTEN=0.0.0.0:8080` sets `http.listen`; `MERIDIAN_PROVIDERS__0__BASE_URL`
/// sets `providers[0].base_url`. Values are read as TOML values when they parse as one (numbers,
/// booleans, arrays), else as strings; the overrides read as TOML values are returned (path and
/// text), so that one landing on a text field can be taken as its text. An override that names
/// no field is an error.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &dyn Env,
) -> Result<Vec<(Vec<String>, String)>, ConfigError> {
    let mut typed = Vec::new();
    let mut errors = Errors::default();
    let mut vars: Vec<_> = env
        .vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    for (name, value) in vars {
        let mut path: Vec<String> = Vec::new();
        for segment in name[ENV_PREFIX.len()..].split("__") {
            let verbatim = VERBATIM_KEYS.iter().any(|map| {
                map.len() == path.len() && map.iter().zip(&path).all(|(m, p)| *m == "*" || m == p)
            });
            path.push(if verbatim {
                segment.to_owned()
            } else {
                segment.to_ascii_lowercase()
            });
        }
        if path.iter().any(String::is_empty) {
            errors.push(&name, "malformed override: use MERIDIAN_SECTION__FIELD");
            continue;
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"));
        let parsed = match parsed {
            Some(v) if v.is_str() => v,
            Some(v) => {
                typed.push((path.clone(), value));
                v
            }
            None => toml::Value::String(value),
        };
        if let Err(msg) = set_path(table, &path, parsed) {
            errors.push(&name, msg);
        }
    }
    if errors.0.is_empty() {
        Ok(typed)
    } else {
        Err(ConfigError { errors: errors.0 })
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty path")?;
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => set_path(t, rest, value),
        toml::Value::Array(items) => {
            let (index, rest) = rest.split_first().ok_or("empty path")?;
            let i: usize = index
                .parse()
                .map_err(|_| format!("{first} is a list; expected an index, got {index}"))?;
            match items.get_mut(i) {
                Some(toml::Value::Table(t)) if !rest.is_empty() => set_path(t, rest, value),
                Some(slot) if rest.is_empty() => {
                    *slot = value;
                    Ok(())
                }
                _ => Err(format!("{first}[{i}] does not exist")),
            }
        }
        _ => Err(format!("{first} is not a section")),
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m or h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 30s, 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A duration field (`"30s"`, `"500ms"`): `default` when absent; zero or unreadable is an error.
fn duration(e: &mut Errors, path: &str, v: Option<&String>, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if d.is_zero() => {
                e.push(path, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(msg) => {
                e.push(path, msg);
                default
            }
        },
    }
}

/// An integer field within `min..=max`: `default` when absent.
fn int(e: &mut Errors, path: &str, v: Option<i64>, default: u32, min: i64, max: i64) -> u32 {
    match v {
        None => default,
        Some(n) if (min..=max).contains(&n) => u32::try_from(n).unwrap_or(default),
        Some(n) => {
            e.push(path, format!("must be between {min} and {max}, got {n}"));
            default
        }
    }
}

fn validate(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut e = Errors::default();

    let addr = |e: &mut Errors, path: &str, v: Option<&String>, default: &str| {
        let s = v.map_or(default, String::as_str);
        s.parse::<SocketAddr>().unwrap_or_else(|_| {
            e.push(
                path,
                format!("{s:?} is not a socket address like 127.0.0.1:8080"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    };

    let node = NodeConfig {
        id: match raw.node.id {
            None => 1,
            Some(id) if id >= 1 => id as u64,
            Some(id) => {
                e.push("node.id", format!("must be a positive integer, got {id}"));
                1
            }
        },
        region: raw.node.region.unwrap_or_else(|| "local".into()),
        data_dir: PathBuf::from(
            raw.node
                .data_dir
                .unwrap_or_else(|| "./meridian-data".into()),
        ),
    };
    if node.region.is_empty() {
        e.push("node.region", "must not be empty");
    }
    let rd = RaftTimings::default();
    let c = &raw.cluster;
    let raft = RaftTimings {
        heartbeat: duration(
            &mut e,
            "cluster.heartbeat",
            c.heartbeat.as_ref(),
            rd.heartbeat,
        ),
        election_min: duration(
            &mut e,
            "cluster.election_timeout_min",
            c.election_timeout_min.as_ref(),
            rd.election_min,
        ),
        election_max: duration(
            &mut e,
            "cluster.election_timeout_max",
            c.election_timeout_max.as_ref(),
            rd.election_max,
        ),
        snapshot_every: u64::from(int(
            &mut e,
            "cluster.snapshot_every",
            c.snapshot_every,
            10_000,
            10,
            100_000_000,
        )),
        keep_after_snapshot: u64::from(int(
            &mut e,
            "cluster.keep_after_snapshot",
            c.keep_after_snapshot,
            1_000,
            0,
            100_000_000,
        )),
    };
    if raft.election_min <= raft.heartbeat {
        e.push(
            "cluster.election_timeout_min",
            "must be longer than cluster.heartbeat",
        );
    }
    if raft.election_max <= raft.election_min {
        e.push(
            "cluster.election_timeout_max",
            "must be longer than cluster.election_timeout_min",
        );
    }
    let cluster = if c.peers.is_empty() && !c.join {
        None
    } else {
        let mut peers = Vec::new();
        for (i, p) in c.peers.iter().enumerate() {
            let parsed = p.split_once('@').and_then(|(id, addr)| {
                Some((id.parse::<u64>().ok()?, addr.parse::<SocketAddr>().ok()?))
            });
            match parsed {
                Some((id, _)) if id == node.id => {
                    e.push(format!("cluster.peers[{i}]"), "lists this node itself");
                }
                Some(peer) => peers.push(peer),
                None => e.push(
                    format!("cluster.peers[{i}]"),
                    format!("{p:?} is not ID@HOST:PORT (e.g. 2@10.0.0.2:7000)"),
                ),
            }
        }
        let listen = addr(
            &mut e,
            "cluster.listen",
            c.listen.as_ref(),
            "127.0.0.1:7000",
        );
        let advertise = match &c.advertise {
            Some(_) => addr(&mut e, "cluster.advertise", c.advertise.as_ref(), ""),
            None => listen,
        };
        if advertise.ip().is_unspecified() {
            e.push(
                if c.advertise.is_some() {
                    "cluster.advertise"
                } else {
                    "cluster.listen"
                },
                format!(
                    "{advertise} is not an address peers can reach; set cluster.advertise to this node's address"
                ),
            );
        }
        let certs_dir = PathBuf::from(
            c.certs_dir
                .clone()
                .unwrap_or_else(|| "./meridian-certs".into()),
        );
        for file in [
            "ca.crt".to_owned(),
            format!("node-{}.crt", node.id),
            format!("node-{}.key", node.id),
        ] {
            if !certs_dir.join(&file).exists() {
                e.push(
                    "cluster.certs_dir",
                    format!(
                        "{} has no {file} (create it with `meridian certs init` and `meridian certs issue {}`)",
                        certs_dir.display(),
                        node.id
                    ),
                );
            }
        }
        let mesh_listen = match &c.mesh_listen {
            Some(_) => addr(&mut e, "cluster.mesh_listen", c.mesh_listen.as_ref(), ""),
            None => SocketAddr::new(listen.ip(), listen.port().wrapping_add(1)),
        };
        let mesh_advertise = SocketAddr::new(advertise.ip(), mesh_listen.port());
        let mesh_cookie = match &c.mesh_cookie_env {
            None => None,
            Some(var) => match env.get(var) {
                Some(v) if v.len() >= 16 => Some(Secret(v)),
                Some(_) => {
                    e.push(
                        "cluster.mesh_cookie_env",
                        format!("${var} must hold at least 16 characters"),
                    );
                    None
                }
                None => {
                    e.push("cluster.mesh_cookie_env", format!("${var} is not set"));
                    None
                }
            },
        };
        Some(ClusterPeers {
            listen,
            advertise,
            certs_dir,
            peers,
            join: c.join,
            mesh_listen,
            mesh_advertise,
            mesh_cookie,
        })
    };
    let http = HttpConfig {
        listen: addr(
            &mut e,
            "http.listen",
            raw.http.listen.as_ref(),
            "127.0.0.1:8080",
        ),
        max_body_bytes: int(
            &mut e,
            "http.max_body_bytes",
            raw.http.max_body_bytes,
            4 * 1024 * 1024,
            1024,
            i64::from(u32::MAX),
        ) as usize,
        header_read_timeout: duration(
            &mut e,
            "http.header_read_timeout",
            raw.http.header_read_timeout.as_ref(),
            Duration::from_secs(10),
        ),
        sse_heartbeat: duration(
            &mut e,
            "http.sse_heartbeat",
            raw.http.sse_heartbeat.as_ref(),
            Duration::from_secs(15),
        ),
    };
    let grpc_listen = addr(
        &mut e,
        "grpc.listen",
        raw.grpc.listen.as_ref(),
        "127.0.0.1:50051",
    );
    let admin_listen = addr(
        &mut e,
        "admin.listen",
        raw.admin.listen.as_ref(),
        "127.0.0.1:50052",
    );
    let admin_token = match &raw.admin.token_env {
        None => None,
        Some(var) => match env.get(var) {
            Some(v) if v.len() >= 32 => Some(Secret(v)),
            Some(_) => {
                e.push(
                    "admin.token_env",
                    format!("${var} must hold at least 32 characters"),
                );
                None
            }
            None => {
                e.push("admin.token_env", format!("${var} is not set"));
                None
            }
        },
    };
    let mut quota = QuotaConfig::default();
    let quota_duration = |e: &mut Errors, field: &str, v: Option<&String>, into: &mut Duration| {
        if let Some(v) = v {
            match parse_duration(v) {
                Ok(d) if !d.is_zero() => *into = d,
                Ok(_) => e.push(format!("quota.{field}"), "must be longer than 0"),
                Err(m) => e.push(format!("quota.{field}"), m),
            }
        }
    };
    quota_duration(
        &mut e,
        "flush_every",
        raw.quota.flush_every.as_ref(),
        &mut quota.flush_every,
    );
    quota_duration(
        &mut e,
        "grant_ttl",
        raw.quota.grant_ttl.as_ref(),
        &mut quota.grant_ttl,
    );
    quota_duration(
        &mut e,
        "grant_wait",
        raw.quota.grant_wait.as_ref(),
        &mut quota.grant_wait,
    );
    quota.state_dir = Some(node.data_dir.clone());
    // Shares are split among at least the initial voters, even before all have registered.
    quota.min_nodes = raw.cluster.peers.len() as u64 + 1;
    match raw.quota.static_share {
        None => {}
        Some(f) if (0.0..=1.0).contains(&f) => quota.static_share = f,
        Some(f) => e.push("quota.static_share", format!("{f} is not between 0 and 1")),
    }
    match raw.quota.usage_retention_days {
        None => {}
        Some(days @ 1..=3660) => quota.usage_retention_days = days as u64,
        Some(days) => e.push(
            "quota.usage_retention_days",
            format!("{days} is not between 1 and 3660"),
        ),
    }
    for (limit, policy) in &raw.quota.no_quorum {
        let path = format!("quota.no_quorum.{limit}");
        let Some(kind) = LimitKind::ALL.into_iter().find(|k| k.code() == limit) else {
            e.push(
                path,
                "is not a limit (requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month)",
            );
            continue;
        };
        match policy.as_str() {
            "deny" => {
                quota.no_quorum.insert(kind, NoQuorum::Deny);
            }
            "local_share" => {
                quota.no_quorum.insert(kind, NoQuorum::LocalShare);
            }
            other => e.push(
                path,
                format!("{other:?} is not \"deny\" or \"local_share\""),
            ),
        }
    }
    let jwt = raw.jwt.as_ref().and_then(|j| {
        let mut required = |field: &str, v: &Option<String>| match v {
            Some(s) if !s.is_empty() => s.clone(),
            _ => {
                e.push(format!("jwt.{field}"), "is required when [jwt] is set");
                String::new()
            }
        };
        let issuer = required("issuer", &j.issuer);
        let audience = required("audience", &j.audience);
        let leeway = match j.leeway.as_deref().map(parse_duration) {
            None => Duration::from_secs(30),
            Some(Ok(d)) => d,
            Some(Err(m)) => {
                e.push("jwt.leeway", m);
                Duration::from_secs(30)
            }
        };
        let hs256_secret = match &j.hs256_secret_env {
            None => None,
            Some(var) => match env.get(var) {
                Some(v) if v.len() >= 32 => Some(v.into_bytes()),
                Some(_) => {
                    e.push(
                        "jwt.hs256_secret_env",
                        format!("${var} must hold at least 32 bytes"),
                    );
                    None
                }
                None => {
                    e.push("jwt.hs256_secret_env", format!("${var} is not set"));
                    None
                }
            },
        };
        let jwks = match &j.jwks_file {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some(text),
                Err(err) => {
                    e.push("jwt.jwks_file", format!("cannot read {path}: {err}"));
                    None
                }
            },
        };
        let settings = JwtSettings {
            issuer,
            audience,
            leeway,
            hs256_secret,
            jwks,
            tenant_claim: j.tenant_claim.clone().unwrap_or_else(|| "tenant".into()),
            tier_claim: j.tier_claim.clone(),
        };
        match JwtVerifier::new(settings) {
            Ok(v) => Some(Arc::new(v)),
            Err(m) => {
                let field = if j.jwks_file.is_some() {
                    "jwt.jwks_file"
                } else {
                    "jwt"
                };
                e.push(field, m);
                None
            }
        }
    });
    let mut prices = std::collections::HashMap::new();
    for (i, p) in raw.prices.iter().enumerate() {
        let at = |f: &str| format!("prices[{i}].{f}");
        let usd = |e: &mut Errors, f: &str, v: Option<f64>| match v {
            Some(x) if x.is_finite() && (0.0..=1e6).contains(&x) => x,
            Some(x) => {
                e.push(
                    at(f),
                    format!("{x} is not a price between 0 and 1000000 USD per million tokens"),
                );
                0.0
            }
            None => {
                e.push(at(f), "is required");
                0.0
            }
        };
        let price = Price {
            input_usd_per_mtok: usd(&mut e, "input_usd_per_mtok", p.input_usd_per_mtok),
            output_usd_per_mtok: usd(&mut e, "output_usd_per_mtok", p.output_usd_per_mtok),
        };
        match p.model.as_deref() {
            Some(m) if !m.is_empty() => {
                if prices.insert(m.to_owned(), price).is_some() {
                    e.push(at("model"), format!("{m:?} is priced twice"));
                }
            }
            _ => e.push(at("model"), "is required"),
        }
    }
    let cache = if raw.cache.enabled.unwrap_or(true) {
        let mut c = CacheConfig::default();
        match raw.cache.max_entries {
            None => {}
            Some(n) if (0..=10_000_000).contains(&n) => c.max_entries = n as usize,
            Some(n) => e.push(
                "cache.max_entries",
                format!("must be between 0 and 10000000, got {n}"),
            ),
        }
        if let Some(t) = &raw.cache.ttl {
            match parse_duration(t) {
                Ok(d) if !d.is_zero() => c.ttl = d,
                Ok(_) => e.push("cache.ttl", "must be longer than 0"),
                Err(m) => e.push("cache.ttl", m),
            }
        }
        Some(c)
    } else {
        None
    };
    let breaker = {
        let b = &raw.breaker;
        let d = BreakerConfig::default();
        let rate = |e: &mut Errors, path: &str, v: Option<f64>, default: f64| match v {
            None => default,
            Some(r) if (0.0..=1.0).contains(&r) && r > 0.0 => r,
            Some(r) => {
                e.push(path, format!("must be in (0, 1], got {r}"));
                default
            }
        };
        let c = BreakerConfig {
            consecutive_failures: int(
                &mut e,
                "breaker.consecutive_failures",
                b.consecutive_failures,
                d.consecutive_failures,
                1,
                1_000_000,
            ),
            error_rate: rate(&mut e, "breaker.error_rate", b.error_rate, d.error_rate),
            min_calls: int(
                &mut e,
                "breaker.min_calls",
                b.min_calls,
                d.min_calls,
                1,
                1_000_000,
            ),
            window: duration(&mut e, "breaker.window", b.window.as_ref(), d.window),
            slow_call: duration(
                &mut e,
                "breaker.slow_call",
                b.slow_call.as_ref(),
                d.slow_call,
            ),
            slow_rate: rate(&mut e, "breaker.slow_rate", b.slow_rate, d.slow_rate),
            open_base: duration(
                &mut e,
                "breaker.open_base",
                b.open_base.as_ref(),
                d.open_base,
            ),
            open_max: duration(&mut e, "breaker.open_max", b.open_max.as_ref(), d.open_max),
            probes: int(&mut e, "breaker.probes", b.probes, d.probes, 1, 1_000),
            probe_grace: duration(
                &mut e,
                "breaker.probe_grace",
                b.probe_grace.as_ref(),
                d.probe_grace,
            ),
        };
        if c.open_max < c.open_base {
            e.push(
                "breaker.open_max",
                "must not be shorter than breaker.open_base",
            );
        }
        c
    };
    let auth = AuthConfig {
        enabled: raw.auth.enabled.unwrap_or(true),
        dev_key: raw.auth.dev_key.unwrap_or(true),
    };
    let mut seen = HashSet::new();
    for (path, a) in [
        ("http.listen", http.listen),
        ("grpc.listen", grpc_listen),
        ("admin.listen", admin_listen),
    ] {
        if a.port() != 0 && !seen.insert(a) {
            e.push(path, format!("{a} is already used by another listener"));
        }
    }
    let defaults = RequestLimits::default();
    let limits = RequestLimits {
        max_messages: int(
            &mut e,
            "limits.max_messages",
            raw.limits.max_messages,
            u32::try_from(defaults.max_messages).unwrap_or(u32::MAX),
            1,
            1_000_000,
        ) as usize,
        max_output_tokens: int(
            &mut e,
            "limits.max_output_tokens",
            raw.limits.max_output_tokens,
            defaults.max_output_tokens,
            1,
            10_000_000,
        ),
        max_n: int(
            &mut e,
            "limits.max_n",
            raw.limits.max_n,
            defaults.max_n,
            1,
            128,
        ),
    };
    let drain_timeout = duration(
        &mut e,
        "shutdown.drain_timeout",
        raw.shutdown.drain_timeout.as_ref(),
        Duration::from_secs(30),
    );

    if raw.providers.is_empty() && raw.vllm.is_empty() {
        e.push(
            "providers",
            "at least one provider (or a [[vllm]] section) is required",
        );
    }
    let mut ids = HashSet::new();
    let mut providers = Vec::new();
    for (i, p) in raw.providers.into_iter().enumerate() {
        let at = |field: &str| format!("providers[{i}].{field}");
        let id = p.id.clone().unwrap_or_default();
        if id.is_empty() {
            e.push(at("id"), "is required");
        } else if !ids.insert(id.clone()) {
            e.push(at("id"), format!("{id:?} is used by another provider"));
        }
        let kind = match p.kind.as_deref() {
            Some(name @ ("openai" | "anthropic")) => {
                let dialect = if name == "openai" {
                    Dialect::OpenAi
                } else {
                    Dialect::Anthropic {
                        default_max_tokens: int(
                            &mut e,
                            &at("default_max_tokens"),
                            p.default_max_tokens,
                            4096,
                            1,
                            1_000_000,
                        ),
                    }
                };
                let default_base = match dialect {
                    Dialect::OpenAi => None,
                    Dialect::Anthropic { .. } => Some("https://api.anthropic.com/v1"),
                };
                let base_url = p
                    .base_url
                    .clone()
                    .or(default_base.map(str::to_owned))
                    .unwrap_or_default();
                if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                    e.push(
                        at("base_url"),
                        format!("{base_url:?} must be an http:// or https:// URL"),
                    );
                }
                let api_key = match &p.api_key_env {
                    None => None,
                    Some(var) => match env.get(var) {
                        Some(v) if !v.is_empty() => Some(Secret(v)),
                        _ => {
                            e.push(
                                at("api_key_env"),
                                format!("environment variable {var} is not set"),
                            );
                            None
                        }
                    },
                };
                ProviderKind::Api {
                    dialect,
                    base_url,
                    api_key,
                }
            }
            Some("demo") => {
                for (field, set) in [
                    ("base_url", p.base_url.is_some()),
                    ("api_key_env", p.api_key_env.is_some()),
                ] {
                    if set {
                        e.push(at(field), "does not apply to a demo provider");
                    }
                }
                ProviderKind::Demo {
                    word_delay: match &p.word_delay {
                        None => Duration::from_millis(20),
                        Some(s) => parse_duration(s).unwrap_or_else(|m| {
                            e.push(at("word_delay"), m);
                            Duration::ZERO
                        }),
                    },
                }
            }
            Some(other) => {
                e.push(
                    at("kind"),
                    format!(
                        "unknown kind {other:?} (expected \"openai\", \"anthropic\" or \"demo\")"
                    ),
                );
                continue;
            }
            None => {
                e.push(
                    at("kind"),
                    "is required (\"openai\", \"anthropic\" or \"demo\")",
                );
                continue;
            }
        };
        if p.word_delay.is_some() && !matches!(kind, ProviderKind::Demo { .. }) {
            e.push(at("word_delay"), "applies only to a demo provider");
        }
        if p.default_max_tokens.is_some() && p.kind.as_deref() != Some("anthropic") {
            e.push(
                at("default_max_tokens"),
                "applies only to an anthropic provider",
            );
        }
        if p.models.is_empty() {
            e.push(at("models"), "must list at least one model");
        }
        let mut models = Vec::new();
        for (j, m) in p.models.iter().enumerate() {
            let (name, upstream) = m.split_once('=').unwrap_or((m, m));
            let (name, upstream) = (name.trim(), upstream.trim());
            if name.is_empty() || upstream.is_empty() {
                e.push(
                    at(&format!("models[{j}]")),
                    format!("{m:?} must be \"name\" or \"name=upstream_name\""),
                );
                continue;
            }
            models.push(ModelRoute {
                name: name.to_owned(),
                upstream_name: upstream.to_owned(),
            });
        }
        let d = Timeouts::default();
        let timeouts = Timeouts {
            connect: duration(
                &mut e,
                &at("connect_timeout"),
                p.connect_timeout.as_ref(),
                d.connect,
            ),
            first_byte: duration(
                &mut e,
                &at("first_byte_timeout"),
                p.first_byte_timeout.as_ref(),
                d.first_byte,
            ),
            idle: duration(&mut e, &at("idle_timeout"), p.idle_timeout.as_ref(), d.idle),
            total: duration(
                &mut e,
                &at("total_timeout"),
                p.total_timeout.as_ref(),
                d.total,
            ),
        };
        let tokenizer = match p.tokenizer.as_deref() {
            None => Tokenizer::default(),
            Some(name) => Tokenizer::parse(name).unwrap_or_else(|| {
                e.push(
                    at("tokenizer"),
                    format!("{name:?} is not a known tokenizer (o200k_base, cl100k_base)"),
                );
                Tokenizer::default()
            }),
        };
        let mut usd = |field: &str, v: Option<f64>| match v {
            None => 0,
            Some(x) if x.is_finite() && (0.0..=1_000_000.0).contains(&x) => {
                (x * 1_000_000.0).round() as u64
            }
            Some(x) => {
                e.push(
                    at(field),
                    format!("must be between 0 and 1000000 USD, got {x}"),
                );
                0
            }
        };
        let price = ProviderPrice {
            input: usd("price_input", p.price_input),
            output: usd("price_output", p.price_output),
            cached_input: usd("price_cached_input", p.price_cached_input),
        };
        providers.push(ProviderConfig {
            tokenizer,
            prefix_affinity: p.prefix_affinity.unwrap_or(false),
            weight: int(&mut e, &at("weight"), p.weight, 1, 1, 1_000),
            price,
            id,
            region: p.region.clone().unwrap_or_else(|| node.region.clone()),
            kind,
            models,
            max_concurrency: int(
                &mut e,
                &at("max_concurrency"),
                p.max_concurrency,
                64,
                1,
                1_000_000,
            ),
            queue_capacity: int(
                &mut e,
                &at("queue_capacity"),
                p.queue_capacity,
                256,
                0,
                1_000_000,
            ),
            queue_timeout: duration(
                &mut e,
                &at("queue_timeout"),
                p.queue_timeout.as_ref(),
                Duration::from_secs(10),
            ),
            timeouts,
        });
    }
    let listeners: Vec<(String, u16)> = [
        ("http.listen", http.listen),
        ("grpc.listen", grpc_listen),
        ("admin.listen", admin_listen),
    ]
    .iter()
    .filter(|(_, a)| a.port() != 0)
    .map(|(name, a)| ((*name).to_owned(), a.port()))
    .collect();
    let vllm = vllm::validate(
        &mut e,
        &raw.vllm,
        &node.region,
        &listeners,
        cluster.is_some(),
    );
    let served: HashSet<&str> = providers
        .iter()
        .flat_map(|p| p.models.iter().map(|m| m.name.as_str()))
        .chain(vllm.iter().flat_map(|g| {
            g.served_names
                .iter()
                .chain(g.lora_modules.iter().map(|l| &l.name))
                .map(String::as_str)
        }))
        .collect();
    let mut aliases = HashMap::new();
    for (i, a) in raw.aliases.iter().enumerate() {
        let at = |field: &str| format!("aliases[{i}].{field}");
        let name = a.name.clone().unwrap_or_default();
        if name.is_empty() {
            e.push(at("name"), "is required");
        } else if served.contains(name.as_str()) {
            e.push(
                at("name"),
                format!("{name:?} is already a model a provider serves"),
            );
        }
        for (tier, list) in [
            ("trivial", &a.trivial),
            ("moderate", &a.moderate),
            ("hard", &a.hard),
        ] {
            for (j, m) in list.iter().enumerate() {
                if !served.contains(m.as_str()) {
                    e.push(
                        at(&format!("{tier}[{j}]")),
                        format!("{m:?} is not a model any provider serves"),
                    );
                }
            }
        }
        if a.trivial.is_empty() && a.moderate.is_empty() && a.hard.is_empty() {
            e.push(at("hard"), "an alias needs at least one model in some tier");
        }
        let d = ComplexityRules::default();
        let tokens = |e: &mut Errors, field: &str, v: Option<i64>, default: u64| match v {
            None => default,
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                e.push(at(field), format!("must not be negative, got {n}"));
                default
            }
        };
        let tier = |e: &mut Errors, field: &str, v: &Option<String>, default: Complexity| match v {
            None => default,
            Some(s) => Complexity::parse(s).unwrap_or_else(|| {
                e.push(at(field), format!("{s:?} is not trivial, moderate or hard"));
                default
            }),
        };
        let rules = ComplexityRules {
            trivial_below_tokens: tokens(
                &mut e,
                "trivial_below_tokens",
                a.trivial_below_tokens,
                d.trivial_below_tokens,
            ),
            hard_from_tokens: tokens(
                &mut e,
                "hard_from_tokens",
                a.hard_from_tokens,
                d.hard_from_tokens,
            ),
            code: tier(&mut e, "code", &a.code, d.code),
            tools: tier(&mut e, "tools", &a.tools, d.tools),
        };
        if rules.trivial_below_tokens > rules.hard_from_tokens {
            e.push(
                at("trivial_below_tokens"),
                "must not be above hard_from_tokens",
            );
        }
        if aliases
            .insert(
                name.clone(),
                Alias {
                    trivial: a.trivial.clone(),
                    moderate: a.moderate.clone(),
                    hard: a.hard.clone(),
                    rules,
                },
            )
            .is_some()
        {
            e.push(at("name"), format!("{name:?} is defined twice"));
        }
    }

    if !e.0.is_empty() {
        return Err(ConfigError { errors: e.0 });
    }
    Ok(Config {
        aliases,
        node,
        http,
        grpc_listen,
        admin_listen,
        admin_token,
        auth,
        quota,
        jwt,
        prices,
        cache,
        breaker,
        limits,
        drain_timeout,
        providers,
        raft,
        cluster,
        vllm,
        nvidia_smi: raw
            .gpus
            .nvidia_smi
            .clone()
            .unwrap_or_else(|| "nvidia-smi".into()),
    })
}

#[cfg(test)]
mod tests;
mod vllm;
