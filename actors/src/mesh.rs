//! The actor mesh: the nodes' ractor systems joined with `ractor_cluster`, so an actor on one
//! node can message an actor on another.
//!
//! Each node runs a `NodeServer` and one [`MeshAgent`] that joins the process group
//! [`NODES_GROUP`] and its own node's group ([`wire::node_group`]). Peers find each other's
//! agents through the groups (ractor syncs group membership across connected nodes) and ask them
//! with RPCs. A node's providers are reached through its agent: their own messages carry local
//! streams and reply channels that cannot cross a process boundary. [`forward`] uses this to
//! call replicas only their owner can reach.
//!
//! Security: the TCP links are TLS with the cluster's certificates on both sides (the same
//! mutual TLS as Raft: a peer without a certificate from the cluster CA cannot connect, and the
//! dialler checks the server's name `node-<id>.meridian`), and the node a peer names itself in
//! ractor's handshake must be the one its certificate vouches for ([`link`]: a member cannot
//! pose as another, and an actor in a node's process group is believed only behind that node's
//! session). On top of that ractor's cookie
//! handshake (a SHA-256 challenge-response; the cookie itself never crosses the wire) must pass
//! before any actor message is accepted. What this does **not** protect: any node with a valid
//! certificate and the cookie is fully trusted and can message every remotable actor by id, not
//! only the agents; the cookie handshake alone (without TLS) would give neither secrecy nor
//! integrity, and a captured challenge allows offline guessing of a weak cookie, so the mesh
//! never runs without TLS here. Inbound frames are capped at [`MAX_FRAME`] bytes before they are
//! read into memory, authenticated or not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, pg};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{IncomingEncryptionMode, NodeServer, NodeServerMessage};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;

use crate::registry::Registry;

pub mod caller;
pub mod forward;
pub mod link;
pub mod wire;

pub use link::{DialError, Refusal, Vouch, peer_id, remote_session, session_peer};
pub use wire::{MAX_FRAME, MeshMsg};

use forward::Served;

/// The process group every node's agent joins.
pub const NODES_GROUP: &str = "meridian.nodes";
/// What an agent answers to [`MeshMsg::Describe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDescription {
    pub node_id: u64,
    pub region: String,
    pub providers: Vec<ProviderLoad>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderLoad {
    pub id: String,
    pub models: Vec<String>,
    pub in_flight: u32,
    pub queued: u32,
}

/// A node's agent on the mesh.
pub struct MeshAgent {
    node_id: u64,
    region: String,
    registry: Registry,
    served: Arc<Served>,
}

impl Actor for MeshAgent {
    type Msg = MeshMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, me: ActorRef<MeshMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        pg::join(NODES_GROUP.to_owned(), vec![me.get_cell()]);
        pg::join(wire::node_group(self.node_id), vec![me.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _me: ActorRef<MeshMsg>,
        msg: MeshMsg,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MeshMsg::Describe(asker, reply) => {
                tracing::debug!(%asker, "mesh: describe");
                let description = NodeDescription {
                    node_id: self.node_id,
                    region: self.region.clone(),
                    providers: self
                        .registry
                        .providers()
                        .into_iter()
                        .map(|p| ProviderLoad {
                            id: p.id,
                            models: p.models,
                            in_flight: p.in_flight,
                            queued: p.queued,
                        })
                        .collect(),
                };
                let _ = reply.send(serde_json::to_string(&description)?);
            }
            // Calls and pulls wait (on the upstream, or for chunks): never in the mailbox.
            MeshMsg::Call(request, reply) => self.served.call(request, reply),
            MeshMsg::Pull(call, reply) => {
                let served = Arc::clone(&self.served);
                tokio::spawn(async move {
                    let _ = reply.send(served.pull(&call).await);
                });
            }
            MeshMsg::Cancel(call) => self.served.cancel(&call),
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("the mesh could not start: {0}")]
    Start(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
}

/// Where and how this node joins the mesh.
pub struct MeshConfig {
    pub node_id: u64,
    pub region: String,
    pub listen: SocketAddr,
    /// ractor's shared cookie (a second factor behind mutual TLS).
    pub cookie: String,
    /// This node's mutual-TLS configs from the cluster PKI.
    pub server_tls: Arc<rustls::ServerConfig>,
    pub client_tls: Arc<rustls::ClientConfig>,
    /// Whether a peer's certificate may be the node it names itself (revocations, members).
    pub vouch: Vouch,
}

/// This node's place in the mesh.
pub struct Mesh {
    node_id: u64,
    server: ActorRef<NodeServerMessage>,
    agent: ActorRef<MeshMsg>,
    served: Arc<Served>,
    client_tls: Arc<rustls::ClientConfig>,
    vouch: Vouch,
    accept: AbortHandle,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// The mesh name of node `id`.
pub fn mesh_name(id: u64) -> String {
    format!("node-{id}")
}

/// Why a peer's agent did not describe itself.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    #[error("bad description: {0}")]
    Unreadable(serde_json::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent dropped the question")]
    Dropped,
    /// The question could not be sent (the session is gone); the messaging error's text.
    #[error("not sent: {0}")]
    Unsent(String),
    #[error("an agent behind node {session}'s session described node {answered}")]
    Impostor { session: u64, answered: u64 },
}

impl Mesh {
    /// Starts the node server on `config.listen` and this node's agent.
    pub async fn start(config: MeshConfig, registry: Registry) -> Result<Self, MeshError> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| MeshError::Start(format!("cannot listen on {}: {e}", config.listen)))?;
        // ractor's node server always runs a listener of its own: it gets a loopback port and
        // a TLS config that completes no handshake; the mesh's connections are accepted by
        // `link::accept`, which binds each peer to its certificate.
        let server = NodeServer::new(
            0,
            config.cookie,
            mesh_name(config.node_id),
            config.listen.ip().to_string(),
            Some(IncomingEncryptionMode::Tls(
                tokio_rustls::TlsAcceptor::from(link::refuse_all()),
            )),
            // Peers are dialled explicitly (over TLS); never auto-connect to advertised
            // addresses, which ractor would do without TLS.
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into())
        .with_max_inbound_frame_size(MAX_FRAME);
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| MeshError::Start(e.to_string()))?;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "meridian.sessions".into(),
                subscription: Box::new(link::Track),
            })
            .map_err(|e| MeshError::Start(e.to_string()))?;
        let accept = tokio::spawn(link::accept(
            listener,
            tokio_rustls::TlsAcceptor::from(config.server_tls),
            Arc::clone(&config.vouch),
            server.clone(),
        ))
        .abort_handle();
        let served = Served::new(registry.clone());
        let (agent, _) = Actor::spawn(
            None,
            MeshAgent {
                node_id: config.node_id,
                region: config.region,
                registry,
                served: Arc::clone(&served),
            },
            (),
        )
        .await
        .map_err(|e| MeshError::Start(e.to_string()))?;
        Ok(Self {
            node_id: config.node_id,
            server,
            agent,
            served,
            client_tls: config.client_tls,
            vouch: config.vouch,
            accept,
        })
    }

    /// Dials node `peer` at `addr` over mutual TLS (its certificate must carry `server_name`
    /// and be vouched for as `peer`). The session authenticates in the background;
    /// [`Mesh::connected`] lists it once it has.
    pub async fn connect(
        &self,
        peer: u64,
        addr: SocketAddr,
        server_name: ServerName<'static>,
    ) -> Result<(), MeshError> {
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.client_tls));
        let vouch = Arc::clone(&self.vouch);
        link::dial(&self.server, connector, peer, addr, server_name, vouch)
            .await
            .map_err(|e| MeshError::Connect {
                addr,
                reason: format!("node {peer}: {e}"),
            })
    }

    /// The names (`node-<id>@<host>`) of the peers with an authenticated session.
    pub async fn connected(&self) -> Vec<String> {
        let sessions = ractor::call_t!(self.server, NodeServerMessage::GetSessions, 2_000)
            .unwrap_or_else(|_| HashMap::new());
        sessions
            .into_values()
            .filter_map(|s| s.peer_name.map(|n| n.name))
            .collect()
    }

    /// Asks every other node's agent to describe itself, through the mesh. An agent that does
    /// not answer within `timeout` is reported with its error.
    pub async fn describe_peers(
        &self,
        timeout: Duration,
    ) -> Vec<Result<NodeDescription, DescribeError>> {
        let asker = mesh_name(self.node_id);
        // Only an agent behind an authenticated session is asked, and its answer must be for
        // the node of that session.
        let remote = pg::get_members(&NODES_GROUP.to_owned())
            .into_iter()
            .filter_map(|cell| Some((session_peer(remote_session(&cell)?)?, cell)));
        let mut out = Vec::new();
        for (peer, cell) in remote {
            let agent: ActorRef<MeshMsg> = cell.into();
            let answer = agent
                .call(
                    |reply| MeshMsg::Describe(asker.clone(), reply),
                    Some(timeout),
                )
                .await;
            out.push(match answer {
                Ok(ractor::rpc::CallResult::Success(json)) => {
                    match serde_json::from_str::<NodeDescription>(&json) {
                        Ok(d) if d.node_id != peer => Err(DescribeError::Impostor {
                            session: peer,
                            answered: d.node_id,
                        }),
                        answer => answer.map_err(DescribeError::Unreadable),
                    }
                }
                Ok(ractor::rpc::CallResult::Timeout) => Err(DescribeError::Timeout(timeout)),
                Ok(ractor::rpc::CallResult::SenderError) => Err(DescribeError::Dropped),
                Err(e) => Err(DescribeError::Unsent(e.to_string())),
            });
        }
        out
    }

    /// Streams other nodes are pulling from this node's providers now.
    pub fn forwarded_streams(&self) -> usize {
        self.served.open_streams()
    }

    /// Stops the agent and the node server (closing every session), and drops the calls other
    /// nodes forwarded here.
    pub fn stop(&self) {
        self.served.close_all();
        self.accept.abort();
        self.agent.stop(None);
        self.server.stop(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_give_node_ids() {
        assert_eq!(peer_id("node-12@10.0.0.3"), Some(12));
        assert_eq!(peer_id(&mesh_name(7)), Some(7));
        assert_eq!(peer_id("other@host"), None);
        assert_eq!(peer_id("node-x@host"), None);
    }
}
