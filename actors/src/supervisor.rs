//! The top of the supervision tree.
//!
//! [`NodeSupervisor`] spawns one ProviderActor per provider; the [`ConnectionSupervisor`] is
//! linked under it too. A crashed ProviderActor is restarted at once with the same shared [`Provider`]
//! (so its slot counts survive), at most [`RestartBudget::max_restarts`] times per
//! [`RestartBudget::window`]; past that the provider is left down (its requests get 503 or 504)
//! and an error is logged, rather than spinning. A crash never takes the node down.
//!
//! The [`ConnectionSupervisor`] only observes: a ConnectionActor that crashes is logged, not
//! restarted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::time::Instant;

use crate::provider::{Provider, ProviderActor};

/// OTP-style restart intensity for ProviderActors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBudget {
    pub max_restarts: usize,
    pub window: Duration,
}

impl Default for RestartBudget {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// What the node supervisor is asked to do (the connection supervisor takes no commands).
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start (and from now on supervise) the ProviderActor of a provider that joins at run
    /// time; answers once it has started.
    Adopt(Arc<Provider>, RpcReplyPort<()>),
}

/// Local only: it carries channels and streams that cannot leave the process.
impl ractor::Message for SupervisorMsg {}

pub struct NodeSupervisor;

pub struct NodeSupervisorArgs {
    pub providers: Vec<Arc<Provider>>,
    pub budget: RestartBudget,
}

pub struct NodeSupervisorState {
    budget: RestartBudget,
    providers: HashMap<ActorId, Arc<Provider>>,
    restarts: HashMap<String, VecDeque<Instant>>,
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = NodeSupervisorState;
    type Arguments = NodeSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: NodeSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut providers = HashMap::new();
        for p in args.providers {
            supervise(&myself, &mut providers, p).await?;
        }
        Ok(NodeSupervisorState {
            budget: args.budget,
            providers,
            restarts: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Adopt(provider, reply) => {
                supervise(&myself, &mut state.providers, provider).await?;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, err) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err),
            SupervisionEvent::ActorTerminated(cell, ..) => {
                // A withdrawn provider's actor stopped: nothing to restart.
                state.providers.remove(&cell.get_id());
                return Ok(());
            }
            _ => return Ok(()),
        };
        let Some(provider) = state.providers.remove(&cell.get_id()) else {
            // The ConnectionSupervisor only observes; if it fails, the node cannot serve.
            return Err(format!("connection supervisor failed: {err}").into());
        };
        if provider.is_withdrawn() {
            return Ok(());
        }
        let id = provider.spec.id.clone();
        let now = Instant::now();
        let log = state.restarts.entry(id.clone()).or_default();
        while log
            .front()
            .is_some_and(|t| now.duration_since(*t) > state.budget.window)
        {
            log.pop_front();
        }
        if log.len() >= state.budget.max_restarts {
            tracing::error!(provider = %id, error = %err, restarts = log.len(),
                "provider actor crashed too often; leaving it down");
            return Ok(());
        }
        log.push_back(now);
        tracing::warn!(provider = %id, error = %err, "provider actor crashed; restarting");
        provider.record_restart();
        supervise(&myself, &mut state.providers, provider).await
    }
}

/// Starts `provider`'s actor linked under the node supervisor, and remembers whose it is.
async fn supervise(
    supervisor: &ActorRef<SupervisorMsg>,
    providers: &mut HashMap<ActorId, Arc<Provider>>,
    provider: Arc<Provider>,
) -> Result<(), ActorProcessingErr> {
    let (actor, _) = Actor::spawn_linked(
        None,
        ProviderActor,
        Arc::clone(&provider),
        supervisor.get_cell(),
    )
    .await?;
    providers.insert(actor.get_id(), provider);
    Ok(())
}

/// Parent of every ConnectionActor. Logs their crashes; never restarts them.
pub struct ConnectionSupervisor;

impl Actor for ConnectionSupervisor {
    type Msg = SupervisorMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (): (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, err) = event {
            tracing::error!(error = %err, "connection actor crashed; its client got an error");
        }
        Ok(())
    }
}
