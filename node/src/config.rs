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
use meridian_actors::estimate::Tokenizer;
use meridian_actors::metrics::LabelCaps;
use meridian_actors::quota::{LimitKind, NoQuorum, QuotaConfig};
use meridian_actors::{
    ApiAdapter, DemoModel, Dialect, ModelRoute, ProviderSpec, Timeouts, Upstream,
};
use meridian_cluster::raft::RaftTimings;
use meridian_policy::cost::Rates;
use meridian_policy::route::{Alias, Complexity, ComplexityRules};
use meridian_proto::cluster::ProviderPrice;
use meridian_proto::openai::RequestLimits;

/// Output tokens a request that names no cap is reserved and capped at, unless its provider
/// (or vLLM group) says otherwise (`default_max_tokens`).
pub const DEFAULT_MAX_TOKENS: u32 = meridian_actors::estimate::DEFAULT_COMPLETION_RESERVE as u32;

/// Prefix of environment variables that override configuration fields. Only names of the form
/// `MERIDIAN_SECTION__FIELD` are overrides; others with the prefix (`MERIDIAN_LOG`) are not.
pub const ENV_PREFIX: &str = "MERIDIAN_";

mod providers;
mod raw;
mod validate;

pub use raw::*;
use validate::validate;

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
    /// The admin API's TLS identity (`None`: plain HTTP/2).
    pub admin_tls: Option<AdminTls>,
    pub auth: AuthConfig,
    pub quota: QuotaConfig,
    /// JWT callers, when `[jwt]` is configured.
    pub jwt: Option<Arc<JwtVerifier>>,
    /// Prices by model.
    pub prices: std::collections::HashMap<String, Rates>,
    /// The response cache, when on.
    pub cache: Option<CacheConfig>,
    pub breaker: BreakerConfig,
    pub limits: RequestLimits,
    /// How many tenants and features the request metrics name (`[metrics]`).
    pub label_caps: LabelCaps,
    /// How long the per-call log keeps a call (`None`: no per-call log).
    pub calls_retention: Option<Duration>,
    /// Where spans are exported (`None`: traces off).
    pub traces: Option<crate::otlp::Target>,
    /// Where per-call records also go as OTLP log records (`None`: only the SQLite log).
    pub calls_otlp: Option<crate::otlp::Target>,
    pub alerts: crate::alerts::AlertsConfig,
    pub drain_timeout: Duration,
    /// On a stop, how long the node keeps serving with `/readyz` failing before it drains, so
    /// that load balancers take it out of rotation first (`[shutdown] unready_period`, 0 s by
    /// default).
    pub unready_period: Duration,
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

/// The certificate chain and key the admin API serves TLS with (PEM).
#[derive(Clone)]
pub struct AdminTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Secret,
}

impl std::fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTls").finish_non_exhaustive()
    }
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
    /// Where peers reach this node (`listen` unless `advertise` is set): `HOST:PORT`, the host
    /// an address or a DNS name (resolved each time a peer dials).
    pub advertise: String,
    pub certs_dir: PathBuf,
    /// The other initial voters (a joining node may list none), at `HOST:PORT` each.
    pub peers: Vec<(u64, String)>,
    /// Joins a running cluster instead of bootstrapping one.
    pub join: bool,
    /// The actor mesh's listener, and where peers reach it.
    pub mesh_listen: SocketAddr,
    pub mesh_advertise: String,
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
    /// An inference request's body: its timeout and the least average rate it must keep.
    pub body_timeout: Duration,
    pub min_body_rate: u64,
    /// Open connections the edge holds at most, in all and from one client address (0: no cap
    /// per address); one more is answered 503 and closed.
    pub max_connections: usize,
    pub max_connections_per_client: usize,
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
    /// A request naming no output cap is reserved, and capped upstream, at this many tokens a
    /// choice.
    pub default_max_tokens: u32,
    pub prefix_affinity: bool,
    pub weight: u32,
    pub price: ProviderPrice,
    /// One provider per address `base_url`'s host resolves to, looked up this often (see
    /// `crate::discover`); `None`: the URL as it is.
    pub discover: Option<Duration>,
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
            tokenizer: self.tokenizer.clone(),
            default_max_tokens: self.default_max_tokens,
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
    fn push(&mut self, path: impl Into<String>, message: impl std::fmt::Display) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.to_string(),
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
                            .map_err(|msg| ConfigError::one(path.join("."), msg.to_string()))?;
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
    // Each hosted API whose key is set: its kind (also its id and region), its URL, the key's
    // variable and the models it is asked for.
    let hosted = [
        (
            "openai",
            "https://api.openai.com/v1",
            "OPENAI_API_KEY",
            r#"["gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini"]"#,
        ),
        (
            "anthropic",
            "https://api.anthropic.com/v1",
            "ANTHROPIC_API_KEY",
            r#"["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"]"#,
        ),
    ];
    for (kind, base_url, key, models) in hosted {
        if env.get(key).is_some_and(|k| !k.is_empty()) {
            text.push_str(&format!(
                r#"
[[providers]]
id = "{kind}"
kind = "{kind}"
region = "{kind}"
base_url = "{base_url}"
api_key_env = "{key}"
models = {models}
"#
            ));
        }
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

/// Why an environment override cannot be placed in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverridePathError {
    #[error("empty path")]
    Empty,
    #[error("{list} is a list; expected an index, got {got}")]
    NotAnIndex { list: String, got: String },
    #[error("{list}[{index}] does not exist")]
    NoSuchItem { list: String, index: usize },
    #[error("{0} is not a section")]
    NotASection(String),
}

fn set_path(
    table: &mut toml::Table,
    path: &[String],
    value: toml::Value,
) -> Result<(), OverridePathError> {
    let (first, rest) = path.split_first().ok_or(OverridePathError::Empty)?;
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
            let (index, rest) = rest.split_first().ok_or(OverridePathError::Empty)?;
            let i: usize = index.parse().map_err(|_| OverridePathError::NotAnIndex {
                list: first.clone(),
                got: index.clone(),
            })?;
            match items.get_mut(i) {
                Some(toml::Value::Table(t)) if !rest.is_empty() => set_path(t, rest, value),
                Some(slot) if rest.is_empty() => {
                    *slot = value;
                    Ok(())
                }
                _ => Err(OverridePathError::NoSuchItem {
                    list: first.clone(),
                    index: i,
                }),
            }
        }
        _ => Err(OverridePathError::NotASection(first.clone())),
    }
}

/// Why a duration (`250ms`, `30s`, `5m`, `1h`) cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} has no unit (use ms, s, m or h)")]
    NoUnit(String),
    #[error("{0:?} is not a duration like 250ms, 30s, 5m")]
    NotANumber(String),
    #[error("{text:?}: unknown unit {unit:?} (use ms, s, m or h)")]
    UnknownUnit { text: String, unit: String },
    #[error("{text:?}: {why}")]
    OutOfRange { text: String, why: String },
}

/// Parses `250ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| DurationError::NoUnit(s.into()))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| DurationError::NotANumber(s.into()))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(DurationError::UnknownUnit {
                text: s.into(),
                unit: unit.into(),
            });
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| DurationError::OutOfRange {
        text: s.into(),
        why: e.to_string(),
    })
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

/// One entry of a list section (`vllm[2]`): its fields' paths, and its required texts,
/// durations and whole numbers read with errors that name them.
struct Entry(String);

impl Entry {
    fn at(&self, field: &str) -> String {
        format!("{}.{field}", self.0)
    }

    /// A text field that must be set and not empty: `""`, with the error, when it is not.
    fn required(&self, e: &mut Errors, field: &str, v: &Option<String>) -> String {
        let text = v.clone().unwrap_or_default();
        if text.is_empty() {
            e.push(self.at(field), "is required");
        }
        text
    }

    fn dur(&self, e: &mut Errors, field: &str, v: &Option<String>, default: Duration) -> Duration {
        duration(e, &self.at(field), v.as_ref(), default)
    }

    fn num(
        &self,
        e: &mut Errors,
        field: &str,
        v: Option<i64>,
        default: u32,
        min: i64,
        max: i64,
    ) -> u32 {
        int(e, &self.at(field), v, default, min, max)
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

#[cfg(test)]
mod tests;
mod vllm;
