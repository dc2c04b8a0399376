//! ProviderActor: one per upstream endpoint (a vLLM replica, an API endpoint, the demo model).
//!
//! Supervised by the [`NodeSupervisor`](crate::supervisor::NodeSupervisor), which restarts it
//! after a crash (within a restart budget). It owns the provider's wait queue and hands out
//! concurrency slots ([`Permit`]s). The slot count itself lives in the shared [`Provider`]
//! (atomics), not in the actor, so it survives a restart: requests holding a slot when the actor
//! crashed keep it, and queued requests re-join the queue of the next incarnation.
//!
//! Hot path: when nobody is queued and a slot is free, [`Provider::acquire`] takes it with one
//! compare-and-swap and never touches the mailbox. Only saturation goes through the actor.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use meridian_proto::cluster::ProviderKind;
use meridian_proto::{ApiError, ErrorKind};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, rpc::CallResult};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::upstream::{Timeouts, Upstream};

pub mod replica;
pub use replica::remote_replica_spec;

/// A model name as clients say it, and the upstream's own name for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    pub name: String,
    pub upstream_name: String,
}

/// What a provider is, as configured.
#[derive(Debug, Clone)]
pub struct ProviderSpec {
    pub id: String,
    pub region: String,
    pub models: Vec<ModelRoute>,
    pub upstream: Upstream,
    /// Calls in flight at once; more wait in the queue.
    pub max_concurrency: u32,
    /// Requests that may wait for a slot; beyond that, 503.
    pub queue_capacity: u32,
    /// Longest wait for a slot; beyond that, 504.
    pub queue_timeout: Duration,
    pub timeouts: Timeouts,
    /// Counts its models' prompts for admission.
    pub tokenizer: crate::estimate::Tokenizer,
    /// A request naming no output cap is reserved, and capped upstream, at this many tokens a
    /// choice.
    pub default_max_tokens: u32,
    /// Keep a conversation on the same provider (vLLM replicas with prefix caching): see
    /// [`meridian_policy::route::plan`].
    pub prefix_affinity: bool,
    /// Share of traffic relative to others at equal load: its capacity counts `weight` times.
    pub weight: u32,
    /// What it charges; cheaper providers go first at equal load.
    pub price: meridian_proto::cluster::ProviderPrice,
}

impl ProviderSpec {
    /// Its price list, if it has one: calls it answers are billed at it.
    pub fn rates(&self) -> Option<meridian_policy::cost::Rates> {
        let p = self.price;
        let rates = meridian_policy::cost::Rates {
            input: p.input,
            cached_input: (p.cached_input > 0).then_some(p.cached_input),
            output: p.output,
            ..Default::default()
        };
        rates.is_priced().then_some(rates)
    }
}

/// A provider's shared state: its spec, live counters, and the current actor incarnation.
#[derive(Debug)]
pub struct Provider {
    pub spec: ProviderSpec,
    /// `spec.id`, shared (metrics labels, relays): made once, cloned per request.
    pub name: Arc<str>,
    in_flight: AtomicU32,
    queued: AtomicU32,
    requests_total: AtomicU64,
    failures_total: AtomicU64,
    restarts: AtomicU64,
    /// Moving average of how long a call holds its slot, in µs (0: no sample yet).
    service_us: AtomicU64,
    /// Taken out of routing for good (a vLLM replica that stopped or was drained): no new
    /// slots, waiters are sent elsewhere, the actor stops.
    withdrawn: AtomicBool,
    /// Load reported by the upstream itself (a vLLM replica's `/metrics`), for routing.
    upstream_load: UpstreamLoad,
    /// The models it serves now: `spec.models` at first; a vLLM replica's change as LoRA
    /// adapters are loaded and unloaded.
    models: std::sync::RwLock<Arc<Vec<ModelRoute>>>,
    /// The live actor; replaced by each incarnation when it starts. A watch so that a request
    /// whose actor died can wait for the next one.
    actor: watch::Sender<Option<ActorRef<ProviderMsg>>>,
}

/// A provider's own report of its load (a vLLM replica's `/metrics`, scraped by its
/// supervisor): requests running and waiting inside the engine, and KV-cache use.
#[derive(Debug, Default)]
pub struct UpstreamLoad {
    running: AtomicU32,
    waiting: AtomicU32,
    /// KV-cache use in thousandths (0–1000).
    kv_permille: AtomicU32,
}

impl UpstreamLoad {
    pub fn set(&self, running: u32, waiting: u32, kv_cache_usage: f64) {
        self.running.store(running, SeqCst);
        self.waiting.store(waiting, SeqCst);
        let kv = (kv_cache_usage.clamp(0.0, 1.0) * 1000.0).round() as u32;
        self.kv_permille.store(kv, SeqCst);
    }

    pub fn running(&self) -> u32 {
        self.running.load(SeqCst)
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(SeqCst)
    }

    /// KV-cache use, 0.0–1.0.
    pub fn kv_cache_usage(&self) -> f64 {
        f64::from(self.kv_permille.load(SeqCst)) / 1000.0
    }
}

/// A counters snapshot, for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    pub id: String,
    pub kind: ProviderKind,
    pub region: String,
    pub models: Vec<String>,
    pub max_concurrency: u32,
    pub in_flight: u32,
    pub queued: u32,
    pub queue_capacity: u32,
    pub requests_total: u64,
    pub failures_total: u64,
    pub restarts: u64,
}

impl Provider {
    pub fn new(spec: ProviderSpec) -> Arc<Self> {
        let models = std::sync::RwLock::new(Arc::new(spec.models.clone()));
        Arc::new(Self {
            name: spec.id.as_str().into(),
            spec,
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            requests_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            service_us: AtomicU64::new(0),
            withdrawn: AtomicBool::new(false),
            upstream_load: UpstreamLoad::default(),
            models,
            actor: watch::Sender::new(None),
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(SeqCst)
    }

    pub fn queued(&self) -> u32 {
        self.queued.load(SeqCst)
    }

    pub fn status(&self) -> ProviderStatus {
        ProviderStatus {
            id: self.spec.id.clone(),
            kind: self.spec.upstream.kind(),
            region: self.spec.region.clone(),
            models: self.models().iter().map(|m| m.name.clone()).collect(),
            max_concurrency: self.spec.max_concurrency,
            in_flight: self.in_flight(),
            queued: self.queued(),
            queue_capacity: self.spec.queue_capacity,
            requests_total: self.requests_total.load(SeqCst),
            failures_total: self.failures_total.load(SeqCst),
            restarts: self.restarts.load(SeqCst),
        }
    }

    /// Takes the provider out of service for good: new requests get a retriable 503
    /// (`provider_withdrawn`) and go to the next candidate, queued ones too; calls holding a
    /// slot finish. Its actor stops.
    pub fn withdraw(&self) {
        self.withdrawn.store(true, SeqCst);
        if let Some(actor) = self.actor.borrow().as_ref() {
            let _ = actor.cast(ProviderMsg::Withdraw);
        }
    }

    /// The models it serves now.
    pub fn models(&self) -> Arc<Vec<ModelRoute>> {
        Arc::clone(
            &self
                .models
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Changes the models it serves (the routing table must be rebuilt to route by them).
    pub fn set_models(&self, models: Vec<ModelRoute>) {
        *self
            .models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(models);
    }

    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(SeqCst)
    }

    /// What the upstream last reported about its own load (zeros when nobody reports).
    pub fn upstream_load(&self) -> &UpstreamLoad {
        &self.upstream_load
    }

    /// Counts one finished call.
    pub fn record(&self, ok: bool) {
        self.requests_total.fetch_add(1, SeqCst);
        if !ok {
            self.failures_total.fetch_add(1, SeqCst);
        }
    }

    pub(crate) fn record_restart(&self) {
        self.restarts.fetch_add(1, SeqCst);
    }

    /// How long a request queued now would wait for a slot, from the moving average of slot
    /// holding times (`None` until there is a sample, or while slots are free).
    pub fn predicted_wait(&self) -> Option<Duration> {
        let service = self.service_us.load(SeqCst);
        if service == 0 || self.in_flight() < self.spec.max_concurrency {
            return None;
        }
        let ahead = u64::from(self.queued()) + 1;
        let per_slot = u64::from(self.spec.max_concurrency.max(1));
        Some(Duration::from_micros(service * ahead / per_slot))
    }

    /// A concurrency slot, waiting in the provider's queue until `deadline` if none is free.
    /// Waiters are served by weighted round-robin across tenants (`tenant`, with its `weight`:
    /// that many of its waiters per turn), and one tenant may hold at most half the queue.
    /// Queue full → 503 with Retry-After; a predicted wait past `deadline` → 504 at once;
    /// deadline passed → 504.
    pub async fn acquire(
        self: &Arc<Self>,
        deadline: Instant,
        tenant: Option<Arc<str>>,
        weight: u32,
    ) -> Result<Permit, ApiError> {
        if self.is_withdrawn() {
            return Err(self.withdrawn_error());
        }
        if self.queued() == 0
            && let Some(permit) = self.try_take_slot()
        {
            return Ok(permit);
        }
        if let Some(wait) = self.predicted_wait()
            && Instant::now() + wait > deadline
        {
            return Err(ApiError::new(
                ErrorKind::Timeout,
                format!(
                    "provider {} would take about {} ms to start this request, past its deadline",
                    self.spec.id,
                    wait.as_millis()
                ),
            )
            .with_code("deadline_unreachable")
            .with_retry_after(wait.max(Duration::from_secs(1))));
        }
        let mut incarnations = self.actor.subscribe();
        loop {
            if self.is_withdrawn() {
                return Err(self.withdrawn_error());
            }
            let actor = incarnations.borrow_and_update().clone();
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.queue_timeout_error());
            }
            if let Some(actor) = actor {
                match actor
                    .call(
                        |reply| ProviderMsg::Acquire {
                            deadline,
                            tenant: tenant.clone(),
                            weight,
                            reply,
                        },
                        Some(remaining),
                    )
                    .await
                {
                    Ok(CallResult::Success(result)) => return result,
                    Ok(CallResult::Timeout) => return Err(self.queue_timeout_error()),
                    // The actor died while we were queued: ask its next incarnation.
                    Ok(CallResult::SenderError) | Err(_) => {}
                }
            }
            // Wait for the supervisor to start a new incarnation (or our deadline).
            if tokio::time::timeout_at(deadline, incarnations.changed())
                .await
                .is_err()
            {
                return Err(self.queue_timeout_error());
            }
        }
    }

    fn try_take_slot(self: &Arc<Self>) -> Option<Permit> {
        self.in_flight
            .fetch_update(SeqCst, SeqCst, |n| {
                (n < self.spec.max_concurrency).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit {
                provider: Arc::clone(self),
                since: Instant::now(),
            })
    }

    fn release(&self, held: Duration) {
        // An exponentially weighted average (1/8 per sample) of how long calls hold a slot.
        let sample = held.as_micros().min(u128::from(u32::MAX)) as u64;
        let _ = self.service_us.fetch_update(SeqCst, SeqCst, |old| {
            Some(if old == 0 {
                sample
            } else {
                (old * 7 + sample) / 8
            })
        });
        self.in_flight.fetch_sub(1, SeqCst);
        // Order matters: the slot is freed before we look for waiters, and the actor counts a
        // waiter as queued before it looks for a free slot, so one of us always sees the other.
        if self.queued() > 0
            && let Some(actor) = self.actor.borrow().as_ref()
        {
            // Failing means the actor is restarting; its successor grants on its own.
            let _ = actor.cast(ProviderMsg::Released);
        }
    }

    fn queue_timeout_error(&self) -> ApiError {
        ApiError::new(
            ErrorKind::Timeout,
            format!(
                "provider {} had no free slot within the queue deadline",
                self.spec.id
            ),
        )
        .with_code("queue_timeout")
        .with_retry_after(Duration::from_secs(1))
    }

    fn withdrawn_error(&self) -> ApiError {
        ApiError::new(
            ErrorKind::Unavailable,
            format!("provider {} was taken out of service", self.spec.id),
        )
        .with_code("provider_withdrawn")
        .with_retry_after(Duration::from_secs(1))
    }

    fn queue_full_error(&self) -> ApiError {
        ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "provider {} is at capacity: {} in flight and {} queued",
                self.spec.id,
                self.in_flight(),
                self.queued()
            ),
        )
        .with_code("queue_full")
        .with_retry_after(Duration::from_secs(1))
    }
}

/// One concurrency slot at a provider; dropping it frees the slot and wakes the next waiter.
#[derive(Debug)]
pub struct Permit {
    provider: Arc<Provider>,
    since: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.provider.release(self.since.elapsed());
    }
}

/// The ProviderActor's vocabulary.
#[derive(Debug)]
pub enum ProviderMsg {
    /// Grant a slot now, or queue until one frees or `deadline` passes.
    Acquire {
        deadline: Instant,
        /// Whose request it is, for fair queueing (`None`: the anonymous share).
        tenant: Option<Arc<str>>,
        /// The tenant's share: waiters served per turn (0 counts as 1).
        weight: u32,
        reply: RpcReplyPort<Result<Permit, ApiError>>,
    },
    /// A slot was freed; hand it to the oldest live waiter.
    Released,
    /// The provider was withdrawn: turn every waiter away and stop.
    Withdraw,
    /// Fault injection for the supervision tests.
    #[cfg(test)]
    Crash,
}

/// Local only: it carries channels and streams that cannot leave the process.
impl ractor::Message for ProviderMsg {}

pub struct ProviderActor;

pub struct ProviderState {
    provider: Arc<Provider>,
    /// Waiters per tenant, each queue oldest first, with the tenant's weight.
    queues: HashMap<Option<Arc<str>>, (VecDeque<Waiter>, u32)>,
    /// Tenants with waiters, in turn order, each with what is left of its turn: slots go
    /// round-robin across tenants, `weight` waiters of a tenant per turn.
    turns: VecDeque<(Option<Arc<str>>, u32)>,
    waiting: usize,
}

struct Waiter {
    deadline: Instant,
    reply: RpcReplyPort<Result<Permit, ApiError>>,
}

impl Actor for ProviderActor {
    type Msg = ProviderMsg;
    type State = ProviderState;
    type Arguments = Arc<Provider>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        provider: Arc<Provider>,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Waiters of a crashed predecessor re-queue here; none are ours yet.
        provider.queued.store(0, SeqCst);
        Ok(ProviderState {
            provider,
            queues: HashMap::new(),
            turns: VecDeque::new(),
            waiting: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.provider.actor.send_replace(Some(myself));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.provider.is_withdrawn() {
            // Wakes requests waiting for a next incarnation: there will be none.
            state.provider.actor.send_replace(None);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProviderMsg::Acquire {
                deadline,
                tenant,
                weight,
                reply,
            } => state.enqueue(deadline, tenant, weight.max(1), reply),
            ProviderMsg::Released => state.grant(),
            ProviderMsg::Withdraw => {
                state.turn_away();
                myself.stop(Some("withdrawn".into()));
            }
            #[cfg(test)]
            ProviderMsg::Crash => panic!("injected ProviderActor crash"),
        }
        Ok(())
    }
}

impl ProviderState {
    fn enqueue(
        &mut self,
        deadline: Instant,
        tenant: Option<Arc<str>>,
        weight: u32,
        reply: RpcReplyPort<Result<Permit, ApiError>>,
    ) {
        if self.provider.is_withdrawn() {
            let _ = reply.send(Err(self.provider.withdrawn_error()));
            return;
        }
        self.grant();
        if self.waiting == 0
            && let Some(permit) = self.provider.try_take_slot()
        {
            // If the caller already gave up, the permit is dropped with the message: no leak.
            let _ = reply.send(Ok(permit));
            return;
        }
        let capacity = self.provider.spec.queue_capacity as usize;
        if self.waiting >= capacity {
            let _ = reply.send(Err(self.provider.queue_full_error()));
            return;
        }
        let mine = self.queues.get(&tenant).map_or(0, |(q, _)| q.len());
        if tenant.is_some() && mine >= (capacity / 2).max(1) {
            let _ = reply.send(Err(self
                .provider
                .queue_full_error()
                .with_code("tenant_queue_full")));
            return;
        }
        let (queue, w) = self
            .queues
            .entry(tenant.clone())
            .or_insert_with(|| (VecDeque::new(), weight));
        // The latest request's weight holds (an operator may have changed it).
        *w = weight;
        if queue.is_empty() {
            self.turns.push_back((tenant, weight));
        }
        queue.push_back(Waiter { deadline, reply });
        self.waiting += 1;
        self.provider.queued.fetch_add(1, SeqCst);
        // A slot may have been freed between our check and the queued count going up.
        self.grant();
    }

    /// Sends every waiter away with a retriable error (the provider was withdrawn).
    fn turn_away(&mut self) {
        for (_, (queue, _)) in self.queues.drain() {
            for w in queue {
                self.provider.queued.fetch_sub(1, SeqCst);
                let _ = w.reply.send(Err(self.provider.withdrawn_error()));
            }
        }
        self.turns.clear();
        self.waiting = 0;
    }

    /// Hands free slots to waiters, one tenant after another (weighted round-robin: up to
    /// `weight` waiters of a tenant per turn), each tenant's oldest first; waiters that gave up
    /// or expired are dropped on the way.
    fn grant(&mut self) {
        let now = Instant::now();
        while let Some((tenant, left)) = self.turns.pop_front() {
            let Some((queue, weight)) = self.queues.get_mut(&tenant) else {
                continue;
            };
            let weight = *weight;
            // Drop the dead at the head of this tenant's queue.
            while let Some(front) = queue.front() {
                if !(front.reply.is_closed() || front.deadline <= now) {
                    break;
                }
                if let Some(w) = queue.pop_front() {
                    self.waiting -= 1;
                    self.provider.queued.fetch_sub(1, SeqCst);
                    let _ = w.reply.send(Err(self.provider.queue_timeout_error()));
                }
            }
            if queue.is_empty() {
                self.queues.remove(&tenant);
                continue;
            }
            let Some(permit) = self.provider.try_take_slot() else {
                // No slot: this tenant keeps its turn.
                self.turns.push_front((tenant, left));
                break;
            };
            if let Some(w) = queue.pop_front() {
                self.waiting -= 1;
                self.provider.queued.fetch_sub(1, SeqCst);
                let _ = w.reply.send(Ok(permit));
            }
            if queue.is_empty() {
                self.queues.remove(&tenant);
            } else if left > 1 {
                // The rest of this tenant's turn.
                self.turns.push_front((tenant, left - 1));
            } else {
                self.turns.push_back((tenant, weight));
            }
        }
    }
}

#[cfg(test)]
mod tests;
