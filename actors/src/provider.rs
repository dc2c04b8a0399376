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

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use meridian_proto::{ApiError, ErrorKind};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, rpc::CallResult};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::upstream::{Timeouts, Upstream};

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
}

/// A provider's shared state: its spec, live counters, and the current actor incarnation.
#[derive(Debug)]
pub struct Provider {
    pub spec: ProviderSpec,
    in_flight: AtomicU32,
    queued: AtomicU32,
    requests_total: AtomicU64,
    failures_total: AtomicU64,
    restarts: AtomicU64,
    /// The live actor; replaced by each incarnation when it starts. A watch so that a request
    /// whose actor died can wait for the next one.
    actor: watch::Sender<Option<ActorRef<ProviderMsg>>>,
}

/// A counters snapshot, for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    pub id: String,
    pub kind: &'static str,
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
        Arc::new(Self {
            spec,
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            requests_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
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
            models: self.spec.models.iter().map(|m| m.name.clone()).collect(),
            max_concurrency: self.spec.max_concurrency,
            in_flight: self.in_flight(),
            queued: self.queued(),
            queue_capacity: self.spec.queue_capacity,
            requests_total: self.requests_total.load(SeqCst),
            failures_total: self.failures_total.load(SeqCst),
            restarts: self.restarts.load(SeqCst),
        }
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

    /// A concurrency slot, waiting in the provider's queue until `deadline` if none is free.
    /// Queue full → 503 with Retry-After; deadline passed → 504.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Permit, ApiError> {
        if self.queued() == 0
            && let Some(permit) = self.try_take_slot()
        {
            return Ok(permit);
        }
        let mut incarnations = self.actor.subscribe();
        loop {
            let actor = incarnations.borrow_and_update().clone();
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.queue_timeout_error());
            }
            if let Some(actor) = actor {
                match actor
                    .call(
                        |reply| ProviderMsg::Acquire { deadline, reply },
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
            })
    }

    fn release(&self) {
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
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.provider.release();
    }
}

/// The ProviderActor's vocabulary.
#[derive(Debug)]
pub enum ProviderMsg {
    /// Grant a slot now, or queue until one frees or `deadline` passes.
    Acquire {
        deadline: Instant,
        reply: RpcReplyPort<Result<Permit, ApiError>>,
    },
    /// A slot was freed; hand it to the oldest live waiter.
    Released,
    /// Fault injection for the supervision tests.
    #[cfg(test)]
    Crash,
}

/// Local only: it carries channels and streams that cannot leave the process.
impl ractor::Message for ProviderMsg {}

pub struct ProviderActor;

pub struct ProviderState {
    provider: Arc<Provider>,
    waiters: VecDeque<Waiter>,
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
            waiters: VecDeque::new(),
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

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProviderMsg::Acquire { deadline, reply } => state.enqueue(deadline, reply),
            ProviderMsg::Released => state.grant(),
            #[cfg(test)]
            ProviderMsg::Crash => panic!("injected ProviderActor crash"),
        }
        Ok(())
    }
}

impl ProviderState {
    fn enqueue(&mut self, deadline: Instant, reply: RpcReplyPort<Result<Permit, ApiError>>) {
        self.grant();
        if self.waiters.is_empty()
            && let Some(permit) = self.provider.try_take_slot()
        {
            // If the caller already gave up, the permit is dropped with the message: no leak.
            let _ = reply.send(Ok(permit));
            return;
        }
        if self.waiters.len() >= self.provider.spec.queue_capacity as usize {
            let _ = reply.send(Err(self.provider.queue_full_error()));
            return;
        }
        self.waiters.push_back(Waiter { deadline, reply });
        self.provider.queued.fetch_add(1, SeqCst);
        // A slot may have been freed between our check and the queued count going up.
        self.grant();
    }

    /// Hands free slots to waiters, oldest first, dropping those that gave up or expired.
    fn grant(&mut self) {
        let now = Instant::now();
        while let Some(front) = self.waiters.front() {
            let gone = front.reply.is_closed() || front.deadline <= now;
            let permit = if gone {
                None
            } else {
                match self.provider.try_take_slot() {
                    Some(p) => Some(p),
                    None => break,
                }
            };
            let Some(waiter) = self.waiters.pop_front() else {
                break;
            };
            self.provider.queued.fetch_sub(1, SeqCst);
            match permit {
                Some(p) => {
                    let _ = waiter.reply.send(Ok(p));
                }
                None => {
                    let _ = waiter.reply.send(Err(self.provider.queue_timeout_error()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
