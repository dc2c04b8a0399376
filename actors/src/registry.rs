//! [`Registry`]: where requests can go, and the lifecycle of every provider behind it — the
//! configured ones, this node's vLLM replicas as they become ready, and the replicas other
//! nodes register in the cluster's provider registry (followed here). The gateway routes from
//! its table; the vLLM supervisor and the actor mesh are given the registry, not the gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use meridian_proto::cluster::{ClusterState, Command, NodeId, ProviderKind, ProviderRecord, Reach};
use meridian_proto::{ApiError, ErrorKind};
use ractor::ActorRef;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::breaker::{Breaker, BreakerConfig, BreakerMsg};
use crate::connection::Route;
use crate::provider::{Provider, ProviderSpec, ProviderStatus};
use crate::replicated::Replicated;
use crate::supervisor::SupervisorMsg;
use meridian_policy::clock::WallClock;
use meridian_policy::route::Alias;

/// A handle to the routing table and the providers behind it. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Shared>,
}

struct Shared {
    /// Where requests can go now; replaced whole when a provider comes or goes.
    table: RwLock<Arc<Table>>,
    /// Serialises changes to `table`.
    changing: Mutex<()>,
    /// The breaker of every provider in the table (cluster only).
    breakers: Option<Breakers>,
    /// Registry writes under way for this node's replicas, by provider id (a newer one for the
    /// same id replaces an older).
    registering: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Follows replicas other nodes register.
    follower: Mutex<Option<JoinHandle<()>>>,
    /// Publishes this node's configured providers to the replicated registry until it succeeds.
    publisher: Option<JoinHandle<()>>,
    /// Starts and restarts the providers' actors.
    supervisor: ActorRef<SupervisorMsg>,
    cluster: Option<Replicated>,
    /// Virtual models; the table holds them too (replaced by a reload).
    aliases: Mutex<Arc<HashMap<String, Alias>>>,
    awaited_models: Vec<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("models", &self.table().models)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// The table of `providers` (whose actors `supervisor` runs), with virtual models `aliases`
    /// and the models of replicas still starting; in a cluster, publishes the configured
    /// providers and follows the replicas other nodes register.
    pub(crate) fn start(
        providers: Vec<Arc<Provider>>,
        supervisor: ActorRef<SupervisorMsg>,
        breakers: Option<Breakers>,
        cluster: Option<Replicated>,
        aliases: HashMap<String, Alias>,
        awaited_models: Vec<String>,
    ) -> Self {
        let table = Table::build(
            providers.clone(),
            Arc::new(aliases.clone()),
            &awaited_models,
            breakers.as_ref(),
        );
        let publisher = cluster.as_ref().map(|c| {
            tokio::spawn(publish_providers(
                c.clone(),
                registry_records(c.node_id, &providers),
            ))
        });
        let registry = Registry {
            inner: Arc::new(Shared {
                table: RwLock::new(Arc::new(table)),
                changing: Mutex::new(()),
                breakers,
                registering: Mutex::new(HashMap::new()),
                follower: Mutex::new(None),
                publisher,
                supervisor,
                cluster,
                aliases: Mutex::new(Arc::new(aliases)),
                awaited_models,
            }),
        };
        if let Some(c) = &registry.inner.cluster {
            let follower = tokio::spawn(follow_registry(
                Arc::downgrade(&registry.inner),
                c.state.clone(),
                c.node_id,
            ));
            *lock(&registry.inner.follower) = Some(follower);
        }
        registry
    }

    /// The routing table as it is now.
    pub(crate) fn table(&self) -> Arc<Table> {
        Arc::clone(
            &self
                .inner
                .table
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// `f` of the table as it is now, read in place (no reference taken: the admission path
    /// looks up a model's tokenizer here on every request).
    pub(crate) fn with_table<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        f(&self
            .inner
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// Rebuilds the table with `change` applied to its providers.
    fn change_providers(&self, change: impl FnOnce(&mut Vec<Arc<Provider>>)) {
        let _one_at_a_time = lock(&self.inner.changing);
        let mut providers = self.table().providers.clone();
        change(&mut providers);
        let aliases = Arc::clone(&lock(&self.inner.aliases));
        let table = Table::build(
            providers,
            aliases,
            &self.inner.awaited_models,
            self.inner.breakers.as_ref(),
        );
        *self
            .inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
    }

    /// Starts routing to a provider that was not configured (a vLLM replica that became ready,
    /// here or on another node): its ProviderActor starts under the node supervisor, then the
    /// provider joins the routing table. One with the same id is withdrawn first.
    pub async fn add_provider(&self, spec: ProviderSpec) -> Result<Arc<Provider>, ApiError> {
        let id = spec.id.clone();
        // The same endpoint with other models (a LoRA adapter loaded or unloaded): keep the
        // provider, so its queue, its calls in flight and its concurrency limit carry on.
        if let Some(same) = self.provider_by_id(&id).filter(|p| {
            p.spec.upstream.base_url() == spec.upstream.base_url()
                && p.spec.max_concurrency == spec.max_concurrency
                && p.spec.region == spec.region
        }) {
            same.set_models(spec.models);
            self.change_providers(|_| {});
            return Ok(same);
        }
        let provider = Provider::new(spec);
        self.inner
            .supervisor
            .call(
                |reply| SupervisorMsg::Adopt(Arc::clone(&provider), reply),
                Some(Duration::from_secs(5)),
            )
            .await
            .ok()
            .and_then(|r| match r {
                ractor::rpc::CallResult::Success(()) => Some(()),
                _ => None,
            })
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("could not start the actor of provider {id}"),
                )
            })?;
        let mut old = None;
        self.change_providers(|ps| {
            if let Some(i) = ps.iter().position(|p| p.spec.id == id) {
                old = Some(ps.remove(i));
            }
            ps.push(Arc::clone(&provider));
        });
        if let Some(old) = old {
            old.withdraw();
        }
        Ok(provider)
    }

    /// Adds or replaces a configured provider (a configuration reload) and, in a cluster,
    /// records it in the replicated registry as this node's.
    pub async fn add_configured(&self, spec: ProviderSpec) -> Result<Arc<Provider>, ApiError> {
        let provider = self.add_provider(spec).await?;
        if let Some(c) = &self.inner.cluster {
            let records = registry_records(c.node_id, std::slice::from_ref(&provider));
            let id = records[0].id.clone();
            let task = tokio::spawn(keep_published(c.clone(), records[0].clone()));
            self.replace_registration(&id, task);
        }
        Ok(provider)
    }

    /// Withdraws a configured provider (see [`Self::withdraw_provider`]; a configuration
    /// reload) and, in a cluster, removes this node's record of it.
    pub fn withdraw_configured(&self, id: &str) -> Option<Arc<Provider>> {
        let gone = self.withdraw_provider(id);
        if let Some(c) = &self.inner.cluster {
            let record = format!("{}/{id}", c.node_id);
            let task = tokio::spawn(unpublish_provider(c.clone(), record.clone()));
            self.replace_registration(&record, task);
        }
        gone
    }

    /// Stops routing to a provider at once: it leaves the routing table, requests waiting for
    /// it go to their next candidate, calls in flight finish. Returns it (its counters say
    /// what is still in flight), or `None` if it was not in the table.
    pub fn withdraw_provider(&self, id: &str) -> Option<Arc<Provider>> {
        let mut gone = None;
        self.change_providers(|ps| {
            if let Some(i) = ps.iter().position(|p| p.spec.id == id) {
                gone = Some(ps.remove(i));
            }
        });
        if let Some(p) = &gone {
            p.withdraw();
        }
        gone
    }

    /// A provider in the routing table, by id.
    pub fn provider_by_id(&self, id: &str) -> Option<Arc<Provider>> {
        self.table()
            .providers
            .iter()
            .find(|p| p.spec.id == id)
            .cloned()
    }

    /// Routes to one of this node's vLLM replicas from now on (it became ready), and records
    /// it in the cluster's provider registry so that other nodes route to it too: directly at
    /// its address, or through this node on the actor mesh when `via_mesh`.
    pub async fn register_replica(
        &self,
        spec: ProviderSpec,
        via_mesh: bool,
        api_key: Option<String>,
    ) -> Result<(), ApiError> {
        let node = self.inner.cluster.as_ref().map_or(0, |c| c.node_id);
        let record = ProviderRecord {
            id: spec.id.clone(),
            kind: ProviderKind::Vllm,
            region: spec.region.clone(),
            reach: if via_mesh {
                Reach::Through(node)
            } else {
                Reach::Direct(spec.upstream.base_url().into())
            },
            models: spec.models.iter().map(|m| m.name.clone()).collect(),
            owner: node,
            weight: spec.weight,
            max_concurrency: spec.max_concurrency,
            price: spec.price,
            replica: true,
            updated_at_unix_ms: 0,
            default_max_tokens: spec.default_max_tokens,
            // Only a node calling it directly needs it; through the mesh, its owner calls it.
            api_key: if via_mesh {
                String::new()
            } else {
                api_key.unwrap_or_default()
            },
        };
        self.add_provider(spec).await?;
        if let Some(c) = &self.inner.cluster {
            let task = tokio::spawn(keep_published(c.clone(), record.clone()));
            self.replace_registration(&record.id, task);
        }
        Ok(())
    }

    /// Stops routing to one of this node's replicas at once (see
    /// [`Self::withdraw_provider`]) and removes it from the cluster's registry.
    pub fn deregister_replica(&self, id: &str) -> Option<Arc<Provider>> {
        let gone = self.withdraw_provider(id);
        if let Some(c) = &self.inner.cluster {
            let task = tokio::spawn(unpublish_provider(c.clone(), id.to_owned()));
            self.replace_registration(id, task);
        }
        gone
    }

    fn replace_registration(&self, id: &str, task: JoinHandle<()>) {
        if let Some(old) = lock(&self.inner.registering).insert(id.to_owned(), task) {
            old.abort();
        }
    }

    /// Every model this node routes: configured ones in configuration order, then those of
    /// replicas as they joined, then virtual models.
    pub fn models(&self) -> Vec<String> {
        self.table().models.clone()
    }

    pub fn providers(&self) -> Vec<ProviderStatus> {
        self.table().providers.iter().map(|p| p.status()).collect()
    }

    /// Replaces the virtual models (a configuration reload): requests read the new ones from
    /// the next table on.
    pub fn set_aliases(&self, aliases: HashMap<String, Alias>) {
        *lock(&self.inner.aliases) = Arc::new(aliases);
        self.change_providers(|_| {});
    }

    /// Models this node's replicas will serve once one is ready.
    pub(crate) fn awaited_models(&self) -> &[String] {
        &self.inner.awaited_models
    }

    /// Stops publishing and following the cluster's registry (the node is stopping).
    pub(crate) fn stop_following(&self) {
        if let Some(p) = &self.inner.publisher {
            p.abort();
        }
        if let Some(f) = lock(&self.inner.follower).take() {
            f.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where requests can go: every provider this node routes to (configured ones, its own vLLM
/// replicas that are ready, replicas other nodes registered), by model.
pub(crate) struct Table {
    /// Looked up once or twice per request (the fast hash: the keys are configured models).
    pub(crate) routes: hashbrown::HashMap<String, Vec<Route>>,
    /// Model names: providers' in order of arrival, then awaited ones (replicas still
    /// starting), then virtual models (sorted).
    pub(crate) models: Vec<String>,
    /// Each of `models` as a metrics label, shared by every request that names it.
    pub(crate) labels: hashbrown::HashMap<String, Arc<str>>,
    pub(crate) providers: Vec<Arc<Provider>>,
    /// Some provider takes part in prefix affinity (else no request is hashed).
    pub(crate) affinity: bool,
    /// Virtual models (`auto`) by name.
    pub(crate) aliases: Arc<HashMap<String, Alias>>,
}

impl Table {
    fn build(
        providers: Vec<Arc<Provider>>,
        aliases: Arc<HashMap<String, Alias>>,
        awaited: &[String],
        breakers: Option<&Breakers>,
    ) -> Self {
        let breakers = breakers
            .map(|b| b.for_providers(&providers))
            .unwrap_or_default();
        let mut routes = hashbrown::HashMap::<String, Vec<Route>>::new();
        let mut models = Vec::new();
        for p in &providers {
            for m in p.models().iter() {
                let entry = routes.entry(m.name.clone()).or_default();
                if entry.is_empty() {
                    models.push(m.name.clone());
                }
                entry.push(Route {
                    provider: Arc::clone(p),
                    upstream_model: m.upstream_name.as_str().into(),
                    breaker: breakers.get(&p.spec.id).cloned(),
                });
            }
        }
        for m in awaited {
            if !routes.contains_key(m) && !models.contains(m) {
                models.push(m.clone());
            }
        }
        let mut virtual_models: Vec<&String> = aliases.keys().collect();
        virtual_models.sort();
        models.extend(virtual_models.into_iter().cloned());
        let affinity = providers.iter().any(|p| p.spec.prefix_affinity);
        let labels = models
            .iter()
            .map(|m| (m.clone(), Arc::from(m.as_str())))
            .collect();
        Self {
            routes,
            models,
            labels,
            providers,
            affinity,
            aliases,
        }
    }
}

/// Every provider's breaker on this node.
pub(crate) struct Breakers {
    pub(crate) cluster: Replicated,
    pub(crate) config: Arc<BreakerConfig>,
    pub(crate) clock: WallClock,
    pub(crate) actor: ActorRef<BreakerMsg>,
    pub(crate) by_id: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    /// One breaker per provider (a provider that stays keeps its breaker and what it has
    /// seen), each knowing, per model it serves, every provider id serving that model (for the
    /// panic threshold).
    fn for_providers(&self, providers: &[Arc<Provider>]) -> HashMap<String, Arc<Breaker>> {
        let serving = |model: &str| -> Vec<String> {
            providers
                .iter()
                .filter(|p| p.models().iter().any(|m| m.name == model))
                .map(|p| p.spec.id.clone())
                .collect()
        };
        let mut by_id = lock(&self.by_id);
        by_id.retain(|id, _| providers.iter().any(|p| &p.spec.id == id));
        for p in providers {
            let groups: Vec<Vec<String>> = p.models().iter().map(|m| serving(&m.name)).collect();
            match by_id.get(&p.spec.id) {
                Some(b) => b.set_groups(groups),
                None => {
                    let breaker = Breaker::new(
                        p.spec.id.clone(),
                        groups,
                        Arc::clone(&self.config),
                        self.clock.clone(),
                        &self.cluster,
                        self.actor.clone(),
                    );
                    by_id.insert(p.spec.id.clone(), Arc::new(breaker));
                }
            }
        }
        by_id.clone()
    }
}

/// This node's providers as registry records: ids are `<node id>/<provider id>`, so nodes that
/// configure the same provider name never overwrite each other's records.
fn registry_records(node: NodeId, providers: &[Arc<Provider>]) -> Vec<ProviderRecord> {
    providers
        .iter()
        .map(|p| ProviderRecord {
            id: format!("{node}/{}", p.spec.id),
            kind: p.spec.upstream.kind(),
            region: p.spec.region.clone(),
            reach: Reach::parse(p.spec.upstream.base_url()),
            models: p.spec.models.iter().map(|m| m.name.clone()).collect(),
            owner: node,
            weight: p.spec.weight,
            max_concurrency: p.spec.max_concurrency,
            price: p.spec.price,
            replica: false,
            updated_at_unix_ms: 0,
            default_max_tokens: p.spec.default_max_tokens,
            api_key: String::new(),
        })
        .collect()
}

/// Records `records` in the replicated provider registry, retrying each until it commits (the
/// cluster may still be electing its first leader).
async fn publish_providers(cluster: Replicated, records: Vec<ProviderRecord>) {
    for record in records {
        let mut backoff = Duration::from_millis(100);
        loop {
            let already = cluster
                .state
                .borrow()
                .providers
                .get(&record.id)
                .is_some_and(|r| {
                    *r == ProviderRecord {
                        updated_at_unix_ms: r.updated_at_unix_ms,
                        ..record.clone()
                    }
                });
            if already {
                break;
            }
            match cluster
                .proposer
                .propose(Command::UpsertProvider(record.clone()))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(provider = %record.id, error = %e, "registering a provider; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Keeps one of this node's records in the replicated registry for as long as it stands (the
/// task is aborted when the record is replaced or removed): published until it commits, and
/// again whenever it goes missing — a removal proposed before it may commit after it (a
/// restarted node clearing the record it left from before, while the same replica registers
/// anew: the old record looked like the new one, the removal landed last, and the live replica
/// was left unregistered).
async fn keep_published(cluster: Replicated, record: ProviderRecord) {
    let mut state = cluster.state.clone();
    loop {
        publish_providers(cluster.clone(), vec![record.clone()]).await;
        // Only this node writes its records: once committed, it changes only by going missing.
        // Each apply wakes this task, which then only looks the record up.
        loop {
            if state.changed().await.is_err() {
                return;
            }
            if !state.borrow().providers.contains_key(&record.id) {
                break;
            }
        }
    }
}

/// Removes a provider from the replicated registry, retrying until it is gone (and again if an
/// earlier registration of it lands late).
async fn unpublish_provider(cluster: Replicated, id: String) {
    let mut backoff = Duration::from_millis(100);
    let mut absent_since: Option<tokio::time::Instant> = None;
    loop {
        let present = cluster.state.borrow().providers.contains_key(&id);
        if !present {
            // Watch a little longer: a registration proposed before this removal may still
            // commit after it.
            let since = *absent_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() > Duration::from_secs(5) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        absent_since = None;
        if let Err(e) = cluster
            .proposer
            .propose(Command::RemoveProvider { id: id.clone() })
            .await
        {
            tracing::debug!(provider = %id, error = %e, "deregistering a provider; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Keeps the routing table in step with the replicas other nodes register: one that appears
/// in the replicated registry is routed to directly, one that leaves it (or changes address or
/// models) is withdrawn at once. Also removes this node's own replica records left from before
/// it restarted.
async fn follow_registry(
    registry: Weak<Shared>,
    mut state: watch::Receiver<Arc<ClusterState>>,
    me: NodeId,
) {
    let mut known: HashMap<String, ProviderRecord> = HashMap::new();
    loop {
        let (records, own): (HashMap<String, ProviderRecord>, Vec<String>) = {
            let state = state.borrow_and_update();
            let replicas = || state.providers.values().filter(|r| r.replica);
            (
                replicas()
                    .filter(|r| r.owner != me)
                    .map(|r| (r.id.clone(), r.clone()))
                    .collect(),
                replicas()
                    .filter(|r| r.owner == me)
                    .map(|r| r.id.clone())
                    .collect(),
            )
        };
        let Some(inner) = registry.upgrade() else {
            return;
        };
        let live = Registry { inner };
        // Records of this node's replicas that this run of the node never registered are left
        // from before a restart (their processes died with the node): remove them.
        for id in own {
            if !lock(&live.inner.registering).contains_key(&id) {
                tracing::info!(provider = %id, "removing a replica record left from before this node restarted");
                live.deregister_replica(&id);
            }
        }
        // Another address (or capacity) is another provider; other models alone are not
        // (adding it again updates them in place).
        let same = |a: &ProviderRecord, b: &ProviderRecord| {
            (&a.reach, &a.region, a.max_concurrency, a.weight)
                == (&b.reach, &b.region, b.max_concurrency, b.weight)
        };
        let gone: Vec<String> = known
            .iter()
            .filter(|(id, old)| records.get(*id).is_none_or(|new| !same(old, new)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            known.remove(&id);
            live.withdraw_provider(&id);
            tracing::info!(provider = %id, "a remote replica left the registry; no longer routed to");
        }
        for (id, record) in records {
            if known.get(&id).is_some_and(|k| k.models == record.models) {
                continue;
            }
            match crate::provider::remote_replica_spec(&record) {
                Ok(spec) => match live.add_provider(spec).await {
                    Ok(_) => {
                        tracing::info!(provider = %id, reach = %record.reach, "routing to a replica another node registered");
                        known.insert(id, record);
                    }
                    Err(e) => {
                        tracing::warn!(provider = %id, error = %e, "cannot route to a registered replica")
                    }
                },
                Err(e) => {
                    tracing::warn!(provider = %id, error = %e, "cannot route to a registered replica");
                    known.insert(id, record);
                }
            }
        }
        drop(live);
        if state.changed().await.is_err() {
            return;
        }
    }
}
