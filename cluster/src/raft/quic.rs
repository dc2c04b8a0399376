//! The node-to-node [`Transport`] over QUIC (quinn) with mutual TLS from the cluster PKI
//! ([`crate::certs`]): a peer must present a certificate from the cluster CA, and a client
//! checks that the server's certificate names the node it meant to reach (`node-<id>.meridian`).
//!
//! One bidirectional stream per RPC: the request as one frame, then the reply. A frame is JSON,
//! except that a snapshot chunk's bytes follow its JSON raw, after a NUL byte (see [`encode`]).
//! Frames are capped at [`MAX_FRAME`] bytes, so a peer cannot make us allocate without bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use meridian_proto::cluster::{Applied, NodeId};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{ClusterError, ClusterNode, Forwarded, Reply, Transport, Unreached};
use crate::TypeConfig;
use crate::certs;
use rustls::pki_types::CertificateDer;

/// Largest request or reply frame accepted (snapshots travel in chunks below this).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// A connection silent this long (keep-alives included) is considered dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
enum Rpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    Forward(Forwarded),
}

#[derive(Serialize, Deserialize)]
enum RpcReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The leader's answer, or why it refused (as text: the wire shape earlier versions
    /// read, which a typed error would change).
    Forward(Result<Applied, String>),
    /// A forwarded request reached a node that no longer leads (it names the leader it knows).
    /// A variant of its own, so that the `Forward` answer keeps its shape between versions: a
    /// node that does not know this one reads it as an unreadable reply (unreached) and
    /// forwards again, as it would after losing the leader.
    ForwardNotLeader(Option<NodeId>),
    /// The leader could not commit the forwarded write: it had no quorum for this many
    /// milliseconds. Its own variant, so that `Forward` keeps its shape. An older node reads
    /// it as unreached and waits for another leader; if none comes it forwards again to the
    /// same one, whose log then holds the write twice (the commands nodes retry by themselves
    /// are safe to apply twice).
    ForwardNoQuorum(u64),
}

impl RpcReply {
    /// The answer to a forwarded request.
    fn forward(answer: Result<Applied, ClusterError>) -> Self {
        match answer {
            Err(ClusterError::NotLeader { leader }) => Self::ForwardNotLeader(leader),
            Err(ClusterError::NoQuorum(after)) => Self::ForwardNoQuorum(after.as_millis() as u64),
            answer => Self::Forward(answer.map_err(|e| e.to_string())),
        }
    }
}

pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    /// Deadline of one Raft RPC; a forwarded proposal gets ten times this.
    rpc_timeout: Duration,
    /// Where each peer is reached: `HOST:PORT`, resolved each time it is dialled.
    peers: Mutex<HashMap<NodeId, String>>,
    connections: Mutex<HashMap<NodeId, quinn::Connection>>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport").finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// Binds node `id`'s QUIC endpoint on `listen`, with its certificate from `certs_dir`.
    /// `rpc_timeout` bounds each Raft RPC (an election timeout is a good value: a slower answer
    /// is useless anyway).
    pub fn bind(
        listen: SocketAddr,
        certs_dir: &Path,
        id: NodeId,
        rpc_timeout: Duration,
    ) -> Result<Arc<Self>, ClusterError> {
        let socket = std::net::UdpSocket::bind(listen)
            .map_err(|e| ClusterError::Fatal(format!("cannot bind {listen}: {e}")))?;
        Self::on_socket(socket, certs_dir, id, rpc_timeout)
    }

    /// As [`Self::bind`], on a UDP socket already bound (one handed over by whoever started
    /// the node).
    pub fn on_socket(
        socket: std::net::UdpSocket,
        certs_dir: &Path,
        id: NodeId,
        rpc_timeout: Duration,
    ) -> Result<Arc<Self>, ClusterError> {
        let fatal = |e: &dyn std::fmt::Display| ClusterError::Fatal(e.to_string());
        let (server, client) = certs::mtls_configs(certs_dir, id).map_err(|e| fatal(&e))?;
        let server = QuicServerConfig::try_from(server).map_err(|e| fatal(&e))?;
        let client = QuicClientConfig::try_from(client).map_err(|e| fatal(&e))?;
        // Keep-alives and a short idle timeout, so a dead peer's connection is noticed in
        // seconds rather than quinn's default 30 s.
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(1)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|e| fatal(&e))?,
        ));
        let transport = Arc::new(transport);
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server));
        server_config.transport_config(Arc::clone(&transport));
        let mut client_config = quinn::ClientConfig::new(Arc::new(client));
        client_config.transport_config(transport);
        socket.set_nonblocking(true).map_err(|e| fatal(&e))?;
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| fatal(&e))?;
        endpoint.set_default_client_config(client_config);
        Ok(Arc::new(Self {
            endpoint,
            rpc_timeout,
            peers: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
        }))
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ClusterError> {
        self.endpoint
            .local_addr()
            .map_err(|e| ClusterError::Fatal(e.to_string()))
    }

    /// Where node `id` listens.
    pub fn set_peer(&self, id: NodeId, addr: String) {
        lock(&self.peers).insert(id, addr);
    }

    /// Answers peers' RPCs with `node`'s Raft until the endpoint closes. Each connection and
    /// each stream is a task owned by this one, so aborting it stops them all.
    pub fn serve(self: &Arc<Self>, node: ClusterNode) -> JoinHandle<()> {
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(incoming) = endpoint.accept().await {
                let node = node.clone();
                tasks.spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    // The handshake checked the chain; which node it speaks for is checked
                    // against each message's claim.
                    let Some(cert) = peer_certificate(&conn) else {
                        conn.close(1u32.into(), b"no certificate");
                        return;
                    };
                    let cert = Arc::new(Peer {
                        fingerprint: certs::fingerprint(&cert),
                        cert,
                        named: AtomicU64::new(NO_NODE),
                    });
                    let mut streams = tokio::task::JoinSet::new();
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        streams.spawn(answer(node.clone(), Arc::clone(&cert), send, recv));
                        while streams.try_join_next().is_some() {}
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
        })
    }

    /// Closes the endpoint: in-flight RPCs fail, peers see the connection close.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    async fn connection(&self, target: NodeId) -> Result<quinn::Connection, Unreached> {
        let unreached = |reason: String| Unreached { target, reason };
        if let Some(c) = lock(&self.connections).get(&target)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let name = lock(&self.peers)
            .get(&target)
            .cloned()
            .ok_or_else(|| unreached("no address known".into()))?;
        // A DNS name is resolved at each dial (a restarted pod has a new address); of what it
        // resolves to, the first address of this endpoint's family.
        let ipv4 = self.endpoint.local_addr().is_ok_and(|a| a.is_ipv4());
        let addr = tokio::net::lookup_host(name.as_str())
            .await
            .map_err(|e| unreached(format!("cannot resolve {name}: {e}")))?
            .find(|a| a.is_ipv4() == ipv4)
            .ok_or_else(|| unreached(format!("{name} has no address of this endpoint's family")))?;
        let conn = self
            .endpoint
            .connect(addr, &certs::node_name(target))
            .map_err(|e| unreached(e.to_string()))?
            .await
            .map_err(|e| unreached(e.to_string()))?;
        lock(&self.connections).insert(target, conn.clone());
        Ok(conn)
    }

    /// One RPC within `deadline`. A failed or late call drops the cached connection, so the next
    /// call reconnects (the peer may have restarted).
    async fn call(
        &self,
        target: NodeId,
        rpc: Rpc,
        deadline: Duration,
    ) -> Result<RpcReply, Unreached> {
        match tokio::time::timeout(deadline, self.call_once(target, rpc)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                lock(&self.connections).remove(&target);
                Err(e)
            }
            Err(_) => {
                lock(&self.connections).remove(&target);
                Err(Unreached {
                    target,
                    reason: format!("no answer within {deadline:?}"),
                })
            }
        }
    }

    async fn call_once(&self, target: NodeId, rpc: Rpc) -> Result<RpcReply, Unreached> {
        let unreached = |reason: String| Unreached { target, reason };
        let conn = self.connection(target).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreached(e.to_string()))?;
        let frame = encode(rpc).map_err(|e| unreached(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| unreached(e.to_string()))?;
        send.finish().map_err(|e| unreached(e.to_string()))?;
        let reply = recv
            .read_to_end(MAX_FRAME)
            .await
            .map_err(|e| unreached(e.to_string()))?;
        serde_json::from_slice(&reply).map_err(|e| unreached(format!("bad reply: {e}")))
    }
}

/// Short lock, never held across an await.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn answer(
    node: ClusterNode,
    cert: Arc<Peer>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(frame) = recv.read_to_end(MAX_FRAME).await else {
        return;
    };
    let Ok(rpc) = decode(frame) else {
        return;
    };
    if let Err(why) = may_speak_for(&node, &cert, &rpc) {
        // No answer at all: an impostor learns nothing.
        tracing::warn!("refused a peer's message: {why}");
        let _ = send.reset(1u32.into());
        return;
    }
    let raft = node.raft();
    let reply = match rpc {
        Rpc::AppendEntries(r) => RpcReply::AppendEntries(raft.append_entries(r).await),
        Rpc::Vote(r) => RpcReply::Vote(raft.vote(r).await),
        Rpc::InstallSnapshot(r) => RpcReply::InstallSnapshot(raft.install_snapshot(r).await),
        Rpc::Forward(request) => RpcReply::forward(node.execute(&request).await),
    };
    if let Ok(bytes) = serde_json::to_vec(&reply) {
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        // Wait until the peer has the reply before the stream is dropped.
        let _ = send.stopped().await;
    }
}

/// A connected peer's certificate, and its fingerprint (what a revocation names).
struct Peer {
    cert: CertificateDer<'static>,
    fingerprint: String,
    /// The last node id the certificate was found to name ([`NO_NODE`]: none yet), so that a
    /// connection's stream of messages for one node parses the certificate once.
    named: AtomicU64,
}

const NO_NODE: u64 = u64::MAX;

impl Peer {
    fn names(&self, id: NodeId) -> bool {
        if self.named.load(Ordering::Relaxed) == id {
            return true;
        }
        let names = certs::names_node(&self.cert, id);
        if names {
            self.named.store(id, Ordering::Relaxed);
        }
        names
    }
}

/// The certificate a peer presented (its chain was checked by the handshake).
fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

/// Why a peer's message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Refused {
    #[error("a revoked certificate")]
    Revoked,
    #[error("a message for node {0} from a certificate that does not name it")]
    NotNamed(NodeId),
    #[error("node {0} is not a member of this cluster")]
    NotAMember(NodeId),
    #[error("a forwarded request from a certificate that names no member")]
    NoMember,
}

/// Whether the peer whose certificate is `cert` may send `rpc`: the node the message speaks
/// for (the leader of an append or a snapshot, the candidate of a vote, the proposer of a
/// forwarded proposal) must be the one its certificate names, and a member of the cluster as
/// this node knows it (a node taken out of the cluster is refused, whatever certificate it
/// holds), and the certificate must not be revoked. Before this node knows any membership (a
/// node waiting to join), the certificate's name alone is checked.
fn may_speak_for(node: &ClusterNode, peer: &Peer, rpc: &Rpc) -> Result<(), Refused> {
    let claimed = match rpc {
        Rpc::AppendEntries(r) => r.vote.leader_id().voted_for(),
        Rpc::Vote(r) => r.vote.leader_id().voted_for(),
        Rpc::InstallSnapshot(r) => r.vote.leader_id().voted_for(),
        Rpc::Forward(Forwarded::Propose(p)) => Some(p.proposer),
        // Membership changes and read indexes: any member may ask the leader (the operator's
        // request reached it).
        Rpc::Forward(_) => None,
    };
    if node
        .state()
        .borrow()
        .revoked_certs
        .contains_key(&peer.fingerprint)
    {
        return Err(Refused::Revoked);
    }
    node.with_membership(|membership| {
        let mut members = membership.nodes().map(|(id, _)| *id).peekable();
        let known = members.peek().is_some();
        match claimed {
            Some(id) if !peer.names(id) => Err(Refused::NotNamed(id)),
            Some(id) if known && membership.get_node(&id).is_none() => Err(Refused::NotAMember(id)),
            None if known && !members.any(|id| peer.names(id)) => Err(Refused::NoMember),
            _ => Ok(()),
        }
    })
}

/// A request's frame. A snapshot chunk (openraft's, up to its `snapshot_max_chunk_size`) would
/// be a JSON array of numbers, three to four bytes a byte: its bytes go raw after the JSON
/// instead, behind a NUL, which JSON text never holds (control characters in strings are
/// escaped).
fn encode(rpc: Rpc) -> serde_json::Result<Vec<u8>> {
    match rpc {
        Rpc::InstallSnapshot(mut request) => {
            let data = std::mem::take(&mut request.data);
            let mut frame = serde_json::to_vec(&Rpc::InstallSnapshot(request))?;
            frame.reserve_exact(1 + data.len());
            frame.push(0);
            frame.extend_from_slice(&data);
            Ok(frame)
        }
        rpc => serde_json::to_vec(&rpc),
    }
}

/// The request in a frame made by [`encode`] (a snapshot chunk's bytes are moved, not copied).
fn decode(mut frame: Vec<u8>) -> serde_json::Result<Rpc> {
    let Some(nul) = frame.iter().position(|b| *b == 0) else {
        return serde_json::from_slice(&frame);
    };
    let data = frame.split_off(nul + 1);
    let mut rpc: Rpc = serde_json::from_slice(&frame[..nul])?;
    if let Rpc::InstallSnapshot(request) = &mut rpc {
        request.data = data;
    }
    Ok(rpc)
}

fn mismatch(target: NodeId) -> Unreached {
    Unreached {
        target,
        reason: "the peer answered a different RPC".into(),
    }
}

impl Transport for Arc<QuicTransport> {
    fn append_entries(
        &self,
        target: NodeId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Reply<AppendEntriesResponse<NodeId>> {
        let t = Arc::clone(self);
        async move {
            match t
                .call(target, Rpc::AppendEntries(rpc), t.rpc_timeout)
                .await?
            {
                RpcReply::AppendEntries(r) => Ok(r),
                _ => Err(mismatch(target)),
            }
        }
        .boxed()
    }

    fn vote(&self, target: NodeId, rpc: VoteRequest<NodeId>) -> Reply<VoteResponse<NodeId>> {
        let t = Arc::clone(self);
        async move {
            match t.call(target, Rpc::Vote(rpc), t.rpc_timeout).await? {
                RpcReply::Vote(r) => Ok(r),
                _ => Err(mismatch(target)),
            }
        }
        .boxed()
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Reply<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let t = Arc::clone(self);
        async move {
            // The last chunk is answered once the snapshot is installed (decoded, written with
            // fsync, published): seconds for a large state, not one RPC's time.
            let deadline = if rpc.done {
                t.rpc_timeout * 30
            } else {
                t.rpc_timeout
            };
            match t.call(target, Rpc::InstallSnapshot(rpc), deadline).await? {
                RpcReply::InstallSnapshot(r) => Ok(r),
                _ => Err(mismatch(target)),
            }
        }
        .boxed()
    }

    fn forward(&self, target: NodeId, request: Forwarded) -> Reply<Applied, ClusterError> {
        let t = Arc::clone(self);
        async move {
            match t
                .call(target, Rpc::Forward(request), t.rpc_timeout * 10)
                .await?
            {
                RpcReply::Forward(r) => Ok(r.map_err(ClusterError::Rejected)),
                RpcReply::ForwardNotLeader(leader) => Ok(Err(ClusterError::NotLeader { leader })),
                RpcReply::ForwardNoQuorum(ms) => {
                    Ok(Err(ClusterError::NoQuorum(Duration::from_millis(ms))))
                }
                _ => Err(mismatch(target)),
            }
        }
        .boxed()
    }

    fn learn(&self, id: NodeId, raft_addr: &str) {
        if !raft_addr.is_empty() {
            self.set_peer(id, raft_addr.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(reply: &RpcReply) -> RpcReply {
        serde_json::from_slice(&serde_json::to_vec(reply).expect("encodes")).expect("decodes")
    }

    #[test]
    fn a_snapshot_chunk_travels_as_its_bytes() {
        use openraft::{SnapshotMeta, StoredMembership, Vote};
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let request = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new(3, 1),
            meta: SnapshotMeta {
                last_log_id: None,
                last_membership: StoredMembership::default(),
                snapshot_id: "3-1-42".into(),
            },
            offset: 3 << 20,
            data: data.clone(),
            done: false,
        };
        let frame = encode(Rpc::InstallSnapshot(request)).expect("encodes");
        assert!(
            frame.len() < data.len() + 1_000,
            "{} bytes for {} of data",
            frame.len(),
            data.len()
        );
        match decode(frame).expect("decodes") {
            Rpc::InstallSnapshot(r) => {
                assert_eq!(r.data, data);
                assert_eq!((r.offset, r.done), (3 << 20, false));
                assert_eq!(r.meta.snapshot_id, "3-1-42");
            }
            _ => panic!("another RPC"),
        }
        // Every other RPC is plain JSON.
        let vote = encode(Rpc::Vote(VoteRequest::new(Vote::new(4, 2), None))).expect("encodes");
        assert!(!vote.contains(&0));
        assert!(matches!(decode(vote), Ok(Rpc::Vote(_))));
    }

    #[test]
    fn forward_answers_keep_their_wire_shape() {
        // Applied answers and refusals are encoded as they were before `NotLeader` existed.
        let applied = RpcReply::forward(Ok(Applied::Changed));
        assert_eq!(
            serde_json::to_string(&applied).expect("encodes"),
            r#"{"Forward":{"Ok":"changed"}}"#
        );
        let rejected = RpcReply::forward(Err(ClusterError::Rejected("no".into())));
        assert!(matches!(
            round_trip(&rejected),
            RpcReply::Forward(Err(reason)) if reason.contains("no")
        ));
        // Not leading has its own variant, and names the leader.
        let moved = RpcReply::forward(Err(ClusterError::NotLeader { leader: Some(3) }));
        assert!(matches!(
            round_trip(&moved),
            RpcReply::ForwardNotLeader(Some(3))
        ));
        assert!(matches!(
            round_trip(&RpcReply::forward(Err(ClusterError::NotLeader {
                leader: None
            }))),
            RpcReply::ForwardNotLeader(None)
        ));
        // So has a leader without quorum, with how long it went unacknowledged.
        assert!(matches!(
            round_trip(&RpcReply::forward(Err(ClusterError::NoQuorum(
                Duration::from_millis(1200)
            )))),
            RpcReply::ForwardNoQuorum(1200)
        ));
    }
}
