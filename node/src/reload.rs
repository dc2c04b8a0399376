//! Hot reload: on SIGHUP (and the admin API's `ReloadConfig`) the node reads its configuration
//! file again and validates it like at start — a bad file is refused with the same field-named
//! errors and the running configuration stays. Applied without a restart: the providers (one
//! no longer listed leaves routing while its calls in flight, streams included, finish; a new
//! or changed one starts, a changed one replacing the old under its id; an unchanged one keeps
//! its queue and counters; in a cluster the replicated registry's record of this node's
//! providers follows), the price list, the virtual models (aliases), the request limits
//! (`[limits]`) and the quota's settings (`[quota]`, but for its static share, which every node
//! must split alike: that takes a restart of each). Every other section that changed is named in
//! the answer as applied at the next restart only.

use std::path::PathBuf;
use std::sync::Arc;

use meridian_actors::Gateway;
use meridian_proto::pb::admin as pb;
use tokio::sync::Mutex;

use crate::config::{self, Config, ConfigError, ProcessEnv, ProviderConfig};

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// The price list or the virtual models changed and were applied.
    pub prices: bool,
    pub aliases: bool,
    /// `[limits]` changed and was applied.
    pub limits: bool,
    /// `[quota]` changed and was applied (but for `static_share`, named under `restart_only`).
    pub quota: bool,
    /// Sections that differ from the running configuration but take a restart.
    pub restart_only: Vec<String>,
}

/// What the admin API answers of a reload.
impl From<Reloaded> for pb::ReloadConfigResponse {
    fn from(r: Reloaded) -> Self {
        pb::ReloadConfigResponse {
            providers_added: r.added,
            providers_removed: r.removed,
            providers_changed: r.changed,
            restart_only: r.restart_only,
            prices_applied: r.prices,
            aliases_applied: r.aliases,
            limits_applied: r.limits,
            quota_applied: r.quota,
        }
    }
}

/// A reload as the admin CLI reads it back, to say it as the node's log does.
impl From<pb::ReloadConfigResponse> for Reloaded {
    fn from(r: pb::ReloadConfigResponse) -> Self {
        Reloaded {
            added: r.providers_added,
            removed: r.providers_removed,
            changed: r.providers_changed,
            prices: r.prices_applied,
            aliases: r.aliases_applied,
            limits: r.limits_applied,
            quota: r.quota_applied,
            restart_only: r.restart_only,
        }
    }
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "providers added: {}; removed: {}; changed: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed)
        )?;
        if self.prices {
            write!(f, "; prices applied")?;
        }
        if self.aliases {
            write!(f, "; aliases applied")?;
        }
        if self.limits {
            write!(f, "; request limits applied")?;
        }
        if self.quota {
            write!(f, "; quota settings applied")?;
        }
        if !self.restart_only.is_empty() {
            write!(
                f,
                "; changed but applied only at the next restart: {}",
                self.restart_only.join(", ")
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the node was started without --config: there is no file to reload")]
    NoFile,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}; the running configuration stays")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    Apply(String),
}

/// Reloads the node's configuration file; one reload at a time.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

struct Inner {
    path: Option<PathBuf>,
    gateway: Gateway,
    /// The configuration running now (its providers as last applied).
    running: Mutex<Config>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, gateway: Gateway, running: Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                gateway,
                running: Mutex::new(running),
            }),
        }
    }

    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let path = self.inner.path.as_ref().ok_or(ReloadError::NoFile)?;
        let text = std::fs::read_to_string(path).map_err(|source| ReloadError::Read {
            path: path.clone(),
            source,
        })?;
        let new = config::load(Some(&text), &ProcessEnv)?;
        let mut running = self.inner.running.lock().await;
        let mut done = Reloaded {
            restart_only: restart_only(&running, &new),
            ..Reloaded::default()
        };
        let registry = self.inner.gateway.registry();
        // Providers found by DNS are looked up by a task of their own: a change to one takes a
        // restart.
        let discovered = |c: &Config| -> Vec<String> {
            c.providers
                .iter()
                .filter(|p| p.discover.is_some())
                .map(fingerprint)
                .collect()
        };
        if discovered(&running) != discovered(&new) {
            done.restart_only
                .push("providers with discover = true".into());
        }
        for old in running.providers.iter().filter(|p| p.discover.is_none()) {
            if !new.providers.iter().any(|p| p.id == old.id) {
                registry.withdraw_configured(&old.id);
                done.removed.push(old.id.clone());
            }
        }
        for p in new.providers.iter().filter(|p| p.discover.is_none()) {
            let before = running.providers.iter().find(|o| o.id == p.id);
            if before.is_some_and(|b| fingerprint(b) == fingerprint(p)) {
                continue;
            }
            let spec = p.to_spec()?;
            registry
                .add_configured(spec)
                .await
                .map_err(|e| ReloadError::Apply(format!("provider {}: {}", p.id, e.message)))?;
            if before.is_some() {
                done.changed.push(p.id.clone());
            } else {
                done.added.push(p.id.clone());
            }
        }
        if format!("{:?}", sorted(&running.prices)) != format!("{:?}", sorted(&new.prices)) {
            self.inner.gateway.set_prices(new.prices.clone());
            done.prices = true;
        }
        if format!("{:?}", sorted(&running.aliases)) != format!("{:?}", sorted(&new.aliases)) {
            registry.set_aliases(new.aliases.clone());
            done.aliases = true;
        }
        if running.limits != new.limits {
            self.inner.gateway.set_limits(new.limits);
            done.limits = true;
        }
        if quota_settings(&running.quota) != quota_settings(&new.quota) {
            if let Some(quota) = self.inner.gateway.quota() {
                quota.retune(new.quota.clone());
            }
            done.quota = true;
        }
        if running.quota.static_share != new.quota.static_share {
            done.restart_only.push("quota.static_share".into());
        }
        // The discovered providers stay as they started (see above).
        let kept: Vec<ProviderConfig> = running
            .providers
            .iter()
            .filter(|p| p.discover.is_some())
            .cloned()
            .collect();
        running.providers = new
            .providers
            .into_iter()
            .filter(|p| p.discover.is_none())
            .chain(kept)
            .collect();
        running.prices = new.prices;
        running.aliases = new.aliases;
        running.limits = new.limits;
        let (static_share, clock) = (running.quota.static_share, running.quota.clock.clone());
        running.quota = new.quota;
        // What the quota runs with: its static share and its clock stay until a restart.
        running.quota.static_share = static_share;
        running.quota.clock = clock;
        Ok(done)
    }
}

/// What tells two provider configurations apart (the secret included, which `Debug` hides).
fn fingerprint(p: &ProviderConfig) -> String {
    let key = match &p.kind {
        config::ProviderKind::Api {
            api_key: Some(k), ..
        } => k.expose(),
        _ => "",
    };
    format!("{p:?}\u{0}{key}")
}

/// The sections that changed but are not applied without a restart.
fn restart_only(old: &Config, new: &Config) -> Vec<String> {
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let mut names = Vec::new();
    let mut check = |name: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
        if !same(a, b) {
            names.push(name.to_owned());
        }
    };
    check("node (id, region, data_dir)", &old.node, &new.node);
    check("http", &old.http, &new.http);
    check("grpc.listen", &old.grpc_listen, &new.grpc_listen);
    check("admin.listen", &old.admin_listen, &new.admin_listen);
    check("cluster", &old.cluster, &new.cluster);
    check("auth", &old.auth, &new.auth);
    check("cache", &old.cache, &new.cache);
    check("breakers", &old.breaker, &new.breaker);
    check("vllm", &old.vllm, &new.vllm);
    check(
        "shutdown",
        &(old.drain_timeout, old.unready_period),
        &(new.drain_timeout, new.unready_period),
    );
    names
}

/// The `[quota]` settings a reload applies, comparable (the static share apart).
fn quota_settings(q: &meridian_actors::quota::QuotaConfig) -> String {
    let mut no_quorum: Vec<String> = q.no_quorum.iter().map(|e| format!("{e:?}")).collect();
    no_quorum.sort();
    format!(
        "{:?} {:?} {:?} {} {:?} {no_quorum:?} {} {} {}",
        q.flush_every,
        q.grant_ttl,
        q.grant_wait,
        q.max_slice,
        q.slice_horizon,
        q.usage_retention_days,
        q.usage_users_per_day,
        q.image_tokens
    )
}

/// A map's entries in key order (a `HashMap`'s `Debug` order is not stable).
fn sorted<V: std::fmt::Debug>(m: &std::collections::HashMap<String, V>) -> Vec<(&String, &V)> {
    let mut entries: Vec<_> = m.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}
