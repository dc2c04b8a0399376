//! [`Gateway`]: what the node's edges (HTTP, gRPC, admin) call. It owns the actor tree and the
//! read-only routing table built from configuration, and (in a node) holds the actors' view of
//! the replicated state: [`Replicated`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_proto::cluster::{ClusterState, Limits};
use meridian_proto::openai::{ChatRequest, Input, RequestLimits, Role};
use meridian_proto::{ApiError, ErrorKind, RequestId};
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::Credentials;
use crate::auth::jwt::JwtVerifier;
use crate::auth::{self, Principal};
use crate::breaker::{BreakerActor, BreakerArgs, BreakerConfig, BreakerStats};
use crate::cache::{CacheConfig, CacheKey, ResponseCache};
use crate::calllog::{CallLog, Recorder};
use crate::connection::RetryBudget;
use crate::connection::{ConnectionActor, ConnectionArgs, RequestContext, Route, Routed, Via};
use crate::estimate;
use crate::estimate::Tokenizer;
use crate::metrics::{LabelCaps, Metrics};
use crate::provider::{Provider, ProviderSpec, ProviderStatus};
use crate::quota::{Estimate, Quota, QuotaConfig, Reservation, Scope};
use crate::registry::{Breakers, Registry};
use crate::replicated::Replicated;
use crate::supervisor::{
    ConnectionSupervisor, NodeSupervisor, NodeSupervisorArgs, RestartBudget, SupervisorMsg,
};
use meridian_policy::clock::WallClock;
use meridian_policy::cost::Rates;
use meridian_policy::route::{self, Alias, Candidate, Complexity, Gate, Load, NoRoute, Signals};

mod routing;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub providers: Vec<ProviderSpec>,
    pub limits: RequestLimits,
    pub restart_budget: RestartBudget,
    /// The replicated state; `None` runs the actors without a cluster (unit tests).
    pub cluster: Option<Replicated>,
    /// Whether requests must authenticate (an API key from the replicated key table).
    pub auth: bool,
    /// Cluster-wide limits (needs `cluster` and `auth`: limits belong to tenants).
    pub quota: Option<QuotaConfig>,
    /// Accepts JWTs besides API keys, when set.
    pub jwt: Option<Arc<JwtVerifier>>,
    /// Prices per model (client-facing name), for `cost_per_day`.
    pub prices: HashMap<String, Rates>,
    /// The exact response cache (`None`: off).
    pub cache: Option<CacheConfig>,
    /// Circuit breakers (they need `cluster`: a trip is a replicated decision).
    pub breaker: BreakerConfig,
    /// The node's clock: breaker windows and open periods are read on it, and calls are dated
    /// by it (quota windows read `QuotaConfig::clock`, which a node sets to the same).
    pub clock: WallClock,
    /// How many tenants and features the request metrics name (the rest are `other`).
    pub label_caps: LabelCaps,
    /// Where each request's record goes (`None`: no per-call log).
    pub call_log: Option<Arc<dyn CallLog>>,
    /// Trace requests (the node has installed a tracer provider and the W3C propagator).
    pub traces: bool,
    /// This node's region: its providers there are preferred.
    pub region: String,
    /// Virtual models (`auto`) by name.
    pub aliases: HashMap<String, Alias>,
    /// Models this node's vLLM replicas will serve once ready: until one is routable, a request
    /// for one gets 503 with Retry-After (not 404), and `/v1/models` lists them.
    pub awaited_models: Vec<String>,
}

impl GatewayConfig {
    /// `providers` alone on this node: default request limits, no cluster, no authentication,
    /// no quotas, no cache.
    pub fn standalone(providers: Vec<ProviderSpec>) -> Self {
        Self {
            providers,
            limits: RequestLimits::default(),
            restart_budget: RestartBudget::default(),
            cluster: None,
            auth: false,
            quota: None,
            jwt: None,
            prices: HashMap::new(),
            cache: None,
            breaker: BreakerConfig::default(),
            clock: WallClock::system(),
            label_caps: LabelCaps::default(),
            call_log: None,
            traces: false,
            region: String::new(),
            aliases: HashMap::new(),
            awaited_models: Vec::new(),
        }
    }
}

/// A handle to the node's actors. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where requests can go, and the providers behind it.
    registry: Registry,
    /// Replaced by a configuration reload.
    limits: std::sync::RwLock<RequestLimits>,
    supervisor: ActorRef<SupervisorMsg>,
    connections: ActorCell,
    draining: AtomicBool,
    /// Set when the drain has run out of time: every stream still open ends with an error
    /// event (see [`Gateway::cut_streams`]).
    cut: tokio::sync::watch::Sender<bool>,
    cluster: Option<Replicated>,
    auth: bool,
    retries: Arc<RetryBudget>,
    jwt: Option<Arc<JwtVerifier>>,
    keys: auth::KeyTable,
    /// Looked up on every admission, with the fast hash (the keys come from the config).
    /// Prices by model; replaced whole by a configuration reload.
    prices: std::sync::RwLock<Arc<hashbrown::HashMap<String, Rates>>>,
    cache: Option<ResponseCache>,
    quota: Option<(Quota, JoinHandle<()>)>,
    breaker_stats: Arc<BreakerStats>,
    recorder: Arc<Recorder>,
    traces: bool,
    /// The label of a model this node does not serve (a client may name any).
    unknown_model: Arc<str>,
    region: String,
    draws: AtomicU64,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("registry", &self.inner.registry)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts the supervision tree.
    pub async fn start(config: GatewayConfig) -> Result<Self, SpawnErr> {
        let providers: Vec<Arc<Provider>> =
            config.providers.into_iter().map(Provider::new).collect();
        let (supervisor, _) = Actor::spawn(
            None,
            NodeSupervisor,
            NodeSupervisorArgs {
                providers: providers.clone(),
                budget: config.restart_budget,
            },
        )
        .await?;
        let breaker_stats = Arc::new(BreakerStats::default());
        let breakers = match &config.cluster {
            Some(cluster) => {
                let breaker_config = Arc::new(config.breaker);
                let (actor, _) = Actor::spawn_linked(
                    None,
                    BreakerActor,
                    BreakerArgs {
                        cluster: cluster.clone(),
                        config: Arc::clone(&breaker_config),
                        stats: Arc::clone(&breaker_stats),
                        clock: config.clock.clone(),
                    },
                    supervisor.get_cell(),
                )
                .await?;
                Some(Breakers {
                    cluster: cluster.clone(),
                    config: breaker_config,
                    clock: config.clock.clone(),
                    actor,
                    by_id: Mutex::new(HashMap::new()),
                })
            }
            None => None,
        };
        let (connections, _) =
            Actor::spawn_linked(None, ConnectionSupervisor, (), supervisor.get_cell()).await?;
        let quota = match (&config.cluster, config.quota, config.auth) {
            (Some(c), Some(q), true) => Some(Quota::start(c.node_id, q, c.clone())),
            _ => None,
        };
        if quota.is_some() {
            // Every admitted request is estimated with its model's tokenizer: they are loaded
            // before the node serves (off the runtime), not by its first requests (o200k took
            // 0.2 s optimized, 0.9 s unoptimized, on the development machine).
            let mut tokenizers: Vec<Tokenizer> = Vec::new();
            for p in providers.iter() {
                if !tokenizers.contains(&p.spec.tokenizer) {
                    tokenizers.push(p.spec.tokenizer.clone());
                }
            }
            let loaded = tokio::task::spawn_blocking(move || {
                tokenizers.into_iter().for_each(Tokenizer::load);
            })
            .await;
            if let Err(e) = loaded {
                tracing::warn!(error = %e, "tokenizers not loaded at start; the first requests load them");
            }
        }
        let registry = Registry::start(
            providers,
            supervisor.clone(),
            breakers,
            config.cluster.clone(),
            config.aliases,
            config.awaited_models,
        );
        let usage_rollup = quota.as_ref().map(|(q, _)| q.clone());
        let gateway = Self {
            inner: Arc::new(Inner {
                registry,
                limits: std::sync::RwLock::new(config.limits),
                supervisor,
                connections: connections.get_cell(),
                draining: AtomicBool::new(false),
                cut: tokio::sync::watch::Sender::new(false),
                cluster: config.cluster,
                auth: config.auth,
                retries: Arc::new(RetryBudget::new(std::time::Instant::now())),
                jwt: config.jwt,
                keys: auth::KeyTable::default(),
                prices: std::sync::RwLock::new(Arc::new(config.prices.into_iter().collect())),
                cache: config.cache.map(ResponseCache::new),
                quota,
                breaker_stats,
                recorder: Arc::new(Recorder {
                    metrics: Metrics::new(config.label_caps),
                    calls: config.call_log,
                    usage: usage_rollup,
                    clock: config.clock.clone(),
                }),
                unknown_model: "other".into(),
                traces: config.traces,
                region: config.region,
                draws: AtomicU64::new(0),
            }),
        };
        Ok(gateway)
    }

    /// Who the request is from: `Ok(None)` when authentication is off, else the key's tenant or
    /// a 401 that says what is wrong. Reads the applied key table; never waits on Raft.
    pub(crate) fn authenticate(
        &self,
        credentials: Credentials<'_>,
    ) -> Result<Option<Principal>, ApiError> {
        if !self.inner.auth {
            return Ok(None);
        }
        let Some(cluster) = &self.inner.cluster else {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "authentication is on but this node has no key table",
            ));
        };
        let presented = auth::bearer(credentials.authorization, credentials.api_key);
        if let (Some(jwt), Some(token)) = (&self.inner.jwt, presented)
            && auth::jwt::looks_like_jwt(token)
        {
            return jwt.verify(token).map(Some);
        }
        self.inner.keys.check(&cluster.state, presented).map(Some)
    }

    /// Admits `request` from `principal` against every limit that applies: its tenant's (tier
    /// defaults with the tenant's overrides), its end user's (the request's `user` or the JWT's
    /// `sub`; the tier's per-user limits with the tenant's overrides) and its feature's
    /// (`feature`, from `X-Meridian-Feature`, if the tenant limits it). `Ok(None)` without
    /// quotas or a caller; else the reservation to hand the request (also for a caller with no
    /// limit: settling it records the usage), or a 429 naming the limit. The
    /// prompt is counted with the model's tokenizer; `max_tokens` (or a default reserve) is
    /// added, and priced when the model has a price.
    pub(crate) async fn admit(
        &self,
        principal: Option<&Principal>,
        request: &ChatRequest,
        feature: Option<&str>,
        cache_hit: bool,
    ) -> Result<Option<Reservation>, ApiError> {
        let (Some((quota, _)), Some(principal), Some(cluster)) =
            (&self.inner.quota, principal, &self.inner.cluster)
        else {
            return Ok(None);
        };
        let tenant = &principal.tenant;
        let user = principal.user.as_deref().or(request.params.user.as_deref());
        let (scopes, kept) = {
            let state = cluster.state.borrow();
            let tier_claim = principal.tier.as_deref().and_then(|t| state.tiers.get(t));
            // A JWT caller whose tenant is not in the table is limited by its tier claim.
            let Some(limits) = state
                .limits_of(tenant)
                .or_else(|| tier_claim.map(|t| t.limits))
            else {
                return Err(if principal.key_id.is_some() {
                    ApiError::new(
                        ErrorKind::Unauthenticated,
                        "the key's tenant no longer exists",
                    )
                    .with_code("revoked_api_key")
                } else {
                    ApiError::new(
                        ErrorKind::PermissionDenied,
                        format!(
                            "tenant {tenant:?} is not known to this cluster and the token names no known tier"
                        ),
                    )
                    .with_code("unknown_tenant")
                });
            };
            // At most three scopes, on the stack; only those with a limit are kept (and their
            // keys only then written).
            let mut scopes: [Scope; 3] = Default::default();
            let mut kept = 0;
            let mut scope = |limits: Limits, parts: &[&str]| {
                if limits != Limits::default() {
                    let key = &mut scopes[kept].key;
                    key.reserve(parts.iter().map(|p| p.len()).sum());
                    parts.iter().for_each(|p| key.push_str(p));
                    scopes[kept].limits = limits;
                    kept += 1;
                }
            };
            scope(limits, &["tenant/", tenant]);
            if let Some(user) = user {
                let per_user = state
                    .user_limits_of(tenant)
                    .or_else(|| tier_claim.map(|t| t.per_user))
                    .unwrap_or_default();
                if per_user != Limits::default() {
                    scope(per_user, &["tenant/", tenant, "/user/", &scope_part(user)]);
                }
            }
            if let Some(f) = feature
                && let Some(limits) = state.feature_limits_of(tenant, f)
            {
                scope(limits, &["tenant/", tenant, "/feature/", f]);
            }
            (scopes, kept)
        };
        // A caller with no limit still gets a reservation (with nothing to charge): it carries
        // the prompt's estimate, which a call cut short is billed for in its record.
        let tokenizer = self.tokenizer_of(request.model());
        let price = self.price_of(request.model());
        let estimate = if cache_hit {
            // Answered from the cache: a request, no tokens, no cost.
            Estimate {
                prompt: 0,
                completion: 0,
                price: None,
            }
        } else {
            Estimate {
                prompt: estimate::prompt_tokens(request, &tokenizer, quota.image_tokens()),
                completion: estimate::completion_reserve(
                    request,
                    self.default_max_tokens_of(request.model()),
                ),
                price,
            }
        };
        quota.admit(&scopes[..kept], estimate).await.map(Some)
    }

    /// What `f` reads from the spec of `model`'s first provider (`None`: a model not served).
    fn first_spec_of<T>(&self, model: &str, f: impl FnOnce(&ProviderSpec) -> T) -> Option<T> {
        self.inner.registry.with_table(|t| {
            t.routes
                .get(model)
                .and_then(|r| r.first())
                .map(|r| f(&r.provider.spec))
        })
    }

    /// The tokenizer of the first provider of `model` (the default for a model not served).
    fn tokenizer_of(&self, model: &str) -> estimate::Tokenizer {
        self.first_spec_of(model, |s| s.tokenizer.clone())
            .unwrap_or_default()
    }

    /// Output tokens a request for `model` that names no cap is reserved and capped at: its
    /// first provider's `default_max_tokens` (the one whose tokenizer counts its prompt).
    pub(crate) fn default_max_tokens_of(&self, model: &str) -> u32 {
        self.first_spec_of(model, |s| s.default_max_tokens)
            .unwrap_or(estimate::DEFAULT_COMPLETION_RESERVE as u32)
    }

    /// The prompt's tokens as admission counts them.
    pub(crate) fn prompt_estimate(&self, request: &ChatRequest) -> u64 {
        let images = self
            .quota()
            .map_or(estimate::DEFAULT_IMAGE_TOKENS, Quota::image_tokens);
        estimate::prompt_tokens(request, &self.tokenizer_of(request.model()), images)
    }

    /// The cache key of `request` from `principal`, if the cache is on and the request may be
    /// cached (see [`ResponseCache::key`]).
    pub(crate) fn cache_key(
        &self,
        principal: Option<&Principal>,
        request: &ChatRequest,
        opt_in: bool,
        complexity: Option<Complexity>,
    ) -> Option<CacheKey> {
        self.inner.cache.as_ref()?;
        let tenant = principal.map_or("", |p| &p.tenant);
        ResponseCache::key(tenant, request, opt_in, complexity.map(Complexity::as_str))
    }

    /// A cached answer, if there is one (recorded as a free request: no tokens, no cost).
    pub(crate) fn cache_get(&self, key: CacheKey) -> Option<bytes::Bytes> {
        self.inner.cache.as_ref()?.get(key)
    }

    pub(crate) fn cache_put(&self, key: CacheKey, body: bytes::Bytes) {
        if let Some(c) = &self.inner.cache {
            c.put(key, body);
        }
    }

    /// Cache (hits, misses), when the cache is on.
    pub fn cache_counts(&self) -> Option<(u64, u64)> {
        self.inner.cache.as_ref().map(ResponseCache::counts)
    }

    /// The quota account (`None` when limits are not enforced).
    pub fn quota(&self) -> Option<&Quota> {
        self.inner.quota.as_ref().map(|(q, _)| q)
    }

    /// The replicated state as last applied on this node (`None` without a cluster).
    pub fn cluster_state(&self) -> Option<Arc<ClusterState>> {
        self.inner
            .cluster
            .as_ref()
            .map(|c| c.state.borrow().clone())
    }

    /// The request limits in force now.
    pub fn limits(&self) -> RequestLimits {
        *self.inner.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies reloaded request limits from the next request on.
    pub fn set_limits(&self, limits: RequestLimits) {
        *self.inner.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// Every model this node routes: configured ones in configuration order, then those of
    /// replicas as they joined, then virtual models.
    pub fn models(&self) -> Vec<String> {
        self.inner.registry.models()
    }

    /// [`Gateway::models`], for a caller with these credentials (a 401 if it is not let in).
    pub fn list_models(&self, credentials: Credentials<'_>) -> Result<Vec<String>, ApiError> {
        self.authenticate(credentials)?;
        Ok(self.models())
    }

    pub fn providers(&self) -> Vec<ProviderStatus> {
        self.inner.registry.providers()
    }

    /// Where requests can go, and the providers behind it.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// A provider in the routing table, by id.
    pub fn provider_by_id(&self, id: &str) -> Option<Arc<Provider>> {
        self.inner.registry.provider_by_id(id)
    }

    /// Requests holding or waiting for a provider slot.
    pub fn in_flight(&self) -> u64 {
        self.inner
            .registry
            .table()
            .providers
            .iter()
            .map(|p| u64::from(p.in_flight()) + u64::from(p.queued()))
            .sum()
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Refuses new requests from now on (503); requests already admitted finish.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// The drain is out of time: every stream still open ends now with an error event that
    /// says so (and is charged what it generated), rather than its connection being dropped
    /// mid-stream.
    pub fn cut_streams(&self) {
        self.inner.cut.send_replace(true);
    }

    /// Turns true once [`Self::cut_streams`] is called.
    pub(crate) fn streams_cut(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.cut.subscribe()
    }

    /// Routes and runs one request. Resolves when the upstream has answered (unary) or accepted
    /// the request (stream); failures before that are returned here, with their status.
    pub(crate) async fn chat(&self, request: ChatRequest, mut ctx: RequestContext) -> Routed {
        let unrouted = |e: ApiError| Routed {
            answer: Err(e),
            via: Via::default(),
        };
        if self.is_draining() {
            return unrouted(
                ApiError::new(ErrorKind::Unavailable, "this node is shutting down")
                    .with_code("node_draining")
                    .with_retry_after(Duration::from_secs(1)),
            );
        }
        let tenant = self.tenant_rules(ctx.principal.as_ref());
        ctx.weight = tenant.weight;
        let (routes, ejected) = match self.route(&request, ctx.complexity, &ctx.request_id, &tenant)
        {
            Ok(r) => r,
            Err(e) => return unrouted(e),
        };
        self.inner
            .retries
            .count_request(tokio::time::Instant::now().into_std());
        let (reply, answer) = oneshot::channel();
        let args = ConnectionArgs {
            request,
            ctx,
            routes,
            ejected,
            retries: Arc::clone(&self.inner.retries),
            reply,
        };
        if let Err(e) =
            Actor::spawn_linked(None, ConnectionActor, args, self.inner.connections.clone()).await
        {
            return unrouted(ApiError::new(
                ErrorKind::Internal,
                format!("could not start the request: {e}"),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            unrouted(ApiError::new(
                ErrorKind::Internal,
                "the request's actor stopped without answering",
            ))
        })
    }

    /// Breaker counters, for metrics.
    pub fn breaker_stats(&self) -> &BreakerStats {
        &self.inner.breaker_stats
    }

    /// The request metrics, counted by the pipeline.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.recorder.metrics
    }

    /// Whether requests are traced.
    pub(crate) fn traces(&self) -> bool {
        self.inner.traces
    }

    /// Where the pipeline records each request's outcome.
    pub(crate) fn recorder(&self) -> &Arc<Recorder> {
        &self.inner.recorder
    }

    /// `model` as a metrics label: its name if this node serves it (or will, or it is a
    /// virtual model), else `other` — a client may name any model, and labels stay bounded.
    pub(crate) fn model_label(&self, model: &str) -> Arc<str> {
        let table = self.inner.registry.table();
        Arc::clone(table.labels.get(model).unwrap_or(&self.inner.unknown_model))
    }

    /// The label of a model this node does not serve (and of a request not yet read).
    pub(crate) fn unknown_model(&self) -> Arc<str> {
        Arc::clone(&self.inner.unknown_model)
    }

    /// What `model` costs, if it is priced.
    pub(crate) fn price_of(&self, model: &str) -> Option<Rates> {
        self.inner
            .prices
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .copied()
    }

    /// Replaces the price list (a configuration reload): calls admitted from now on are
    /// estimated and billed at it.
    pub fn set_prices(&self, prices: HashMap<String, Rates>) {
        *self
            .inner
            .prices
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(prices.into_iter().collect());
    }

    /// Stops the actor tree (after the edges have drained).
    pub async fn stop(&self, timeout: Duration) {
        self.inner.registry.stop_following();
        if let Some((quota, task)) = &self.inner.quota {
            task.abort();
            quota.flush_before_stop(Duration::from_secs(2)).await;
            quota.save_shares();
        }
        let _ = self
            .inner
            .supervisor
            .stop_and_wait(None, Some(timeout))
            .await;
    }

    /// For the supervision tests: the live actor of a provider.
    #[cfg(test)]
    pub(crate) fn provider(&self, id: &str) -> Option<Arc<Provider>> {
        self.provider_by_id(id)
    }
}

/// A user id as one ledger key segment: up to 64 bytes, `/` replaced (it separates segments).
fn scope_part(id: &str) -> String {
    let mut end = id.len().min(64);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id[..end].replace('/', "_")
}
