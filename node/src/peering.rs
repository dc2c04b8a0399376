//! A node's links to its peers: its Raft member (alone, or over QUIC with its peers), the
//! proposer the actors write through, and the actor mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use meridian_actors::Gateway;
use meridian_actors::mesh::{Mesh, MeshConfig, Refusal, Vouch, peer_id};
use meridian_actors::replicated::{ProposeError, Proposer};
use meridian_cluster::certs;
use meridian_cluster::raft::quic::QuicTransport;
use meridian_cluster::raft::{ClusterError, ClusterNode, NoPeers};
use meridian_proto::cluster::{Applied, ClusterState, Command, Member};
use prometheus_client::metrics::histogram::Histogram;
use tokio::task::JoinHandle;

use crate::app::AppError;
use crate::config::{ClusterPeers, Config};

/// The QUIC endpoint and its tasks, before the mesh joins them.
pub(crate) type Quic = Option<(Arc<QuicTransport>, Vec<JoinHandle<()>>)>;

/// A multi-node member's links to its peers.
pub(crate) struct Peering {
    pub(crate) transport: Arc<QuicTransport>,
    pub(crate) mesh: Arc<Mesh>,
    pub(crate) tasks: Vec<JoinHandle<()>>,
}

/// Starts this node's Raft member on its data directory.
///
/// Alone (no `cluster.peers`): it initializes a single-voter cluster on first start, waits to
/// lead, and records itself in the member table before serving.
///
/// With peers: it talks QUIC with mutual TLS, every node initializes the same initial voter set
/// (openraft accepts that), and the node serves at once. A task records it in the member table
/// as soon as some leader accepts the write.
///
/// Joining (`cluster.join`): it initializes nothing and waits for an operator to add it as a
/// learner (`meridian admin cluster add-learner`); it records itself once it is in.
pub(crate) async fn start_cluster(
    config: &Config,
    http_addr: Option<SocketAddr>,
    started_unix_ms: u64,
) -> Result<(ClusterNode, Quic), AppError> {
    let node = &config.node;
    let failed = |e: &dyn std::fmt::Display| {
        AppError::Cluster(format!("in {}: {e}", node.data_dir.display()))
    };
    let dir = node.data_dir.join("raft");
    let mut me = Member {
        id: node.id,
        region: node.region.clone(),
        raft_addr: String::new(),
        http_addr: http_addr.map(|a| a.to_string()).unwrap_or_default(),
        mesh_addr: String::new(),
        started_unix_ms,
        snapshot_format: meridian_cluster::state_machine::SNAPSHOT_FORMAT,
    };
    let Some(peers) = &config.cluster else {
        let cluster = ClusterNode::start(node.id, &dir, config.raft, Arc::new(NoPeers))
            .await
            .map_err(|e| failed(&e))?
            .with_clock(config.quota.clock.clone());
        cluster
            .initialize(&[(node.id, String::new())])
            .await
            .map_err(|e| failed(&e))?;
        cluster
            .wait_for_leader(
                node.id,
                config.raft.election_max * 5 + Duration::from_secs(5),
            )
            .await
            .map_err(|_| {
                AppError::Cluster(format!(
                    "node {} did not become leader of its single-node cluster",
                    node.id
                ))
            })?;
        cluster
            .propose(Command::UpsertMember(me))
            .await
            .map_err(|e| failed(&e))?;
        return Ok((cluster, None));
    };
    if peers
        .certs_dir
        .join(meridian_cluster::certs::CA_KEY_IN_CERTS_DIR)
        .exists()
    {
        tracing::warn!(
            certs_dir = %peers.certs_dir.display(),
            "the cluster CA's private key is in this node's certs directory: whoever reads this \
             node can mint a certificate for any node id. Move it off the nodes (`meridian \
             certs` keeps it apart, beside the directory)"
        );
    }
    let transport = match crate::handover::udp_socket(peers.listen, "cluster.listen")
        .map_err(|e| AppError::Cluster(e.to_string()))?
    {
        Some(socket) => {
            QuicTransport::on_socket(socket, &peers.certs_dir, node.id, config.raft.election_min)
        }
        None => QuicTransport::bind(
            peers.listen,
            &peers.certs_dir,
            node.id,
            config.raft.election_min,
        ),
    }
    .map_err(|e| failed(&e))?;
    for (id, addr) in &peers.peers {
        transport.set_peer(*id, addr.clone());
    }
    me.raft_addr = peers.advertise.clone();
    me.mesh_addr = peers.mesh_advertise.clone();
    let cluster = ClusterNode::start(node.id, &dir, config.raft, Arc::new(Arc::clone(&transport)))
        .await
        .map_err(|e| failed(&e))?
        .with_clock(config.quota.clock.clone());
    let server = transport.serve(cluster.clone());
    if !peers.join {
        let mut voters: Vec<(u64, String)> = peers
            .peers
            .iter()
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        voters.push((node.id, me.raft_addr.clone()));
        cluster.initialize(&voters).await.map_err(|e| failed(&e))?;
    }
    let register = tokio::spawn({
        let cluster = cluster.clone();
        async move {
            let mut state = cluster.state();
            loop {
                if let Err(e) = cluster.propose(Command::UpsertMember(me.clone())).await {
                    tracing::debug!(error = %e, "registering this node in the member table; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                // A leader of an earlier version records only the fields it knows (a rolling
                // upgrade goes followers first): this node proposes its record again, every
                // 5 s, until it is recorded whole, which a leader of this version does. It stops
                // if its record is taken out of the table meanwhile (the node was removed).
                let recorded = |s: &Arc<ClusterState>| s.members.contains_key(&me.id);
                let seen = tokio::time::timeout(Duration::from_secs(5), state.wait_for(recorded));
                if !seen.await.is_ok_and(|r| r.is_ok()) {
                    continue;
                }
                if state.borrow().members.get(&me.id) == Some(&me) {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
                if !state.borrow().members.contains_key(&me.id) {
                    return;
                }
            }
        }
    });
    Ok((cluster, Some((transport, vec![server, register]))))
}

/// The actors' proposer: the node's Raft member.
pub(crate) struct RaftProposer {
    pub(crate) cluster: ClusterNode,
    /// How long each proposal took to be committed and applied here (`/metrics`).
    pub(crate) took: Histogram,
}

impl Proposer for RaftProposer {
    fn propose(&self, command: Command) -> BoxFuture<'static, Result<Applied, ProposeError>> {
        let (cluster, took) = (self.cluster.clone(), self.took.clone());
        Box::pin(async move {
            let started = Instant::now();
            let applied = cluster.propose(command).await;
            if applied.is_ok() {
                took.observe(started.elapsed().as_secs_f64());
            }
            applied.map_err(|e| match e {
                ClusterError::Rejected(why) => ProposeError::Refused(why),
                other => ProposeError::Unavailable(other.to_string()),
            })
        })
    }
}

/// Joins the actor mesh on `cluster.mesh_listen`, with the node's cluster certificates.
pub(crate) async fn start_mesh(
    config: &Config,
    peers: &ClusterPeers,
    gateway: &Gateway,
) -> Result<Mesh, AppError> {
    let failed = |e: &dyn std::fmt::Display| AppError::Cluster(format!("actor mesh: {e}"));
    // In the mesh's handshake, beyond the CA: a certificate revoked in the replicated state is
    // refused, and so is one that names no node of the member table (a removed node's).
    let refuse: certs::Refuse = {
        let gateway = gateway.clone();
        Arc::new(move |cert: &certs::CertificateDer<'_>| {
            let state = gateway.cluster_state()?;
            if state.revoked_certs.contains_key(&certs::fingerprint(cert)) {
                return Some("a revoked certificate".into());
            }
            let member = state.members.keys().any(|id| certs::names_node(cert, *id));
            (!state.members.is_empty() && !member)
                .then(|| "a certificate that names no member of the cluster".into())
        })
    };
    let (server_tls, client_tls) =
        certs::mtls_configs_refusing(&peers.certs_dir, config.node.id, refuse)
            .map_err(|e| failed(&e))?;
    let cookie = match &peers.mesh_cookie {
        Some(c) => c.expose().to_owned(),
        None => {
            // Not a secret (anyone with the CA certificate can compute it): mutual TLS is what
            // keeps strangers out; `cluster.mesh_cookie_env` adds a real shared secret.
            let ca = std::fs::read(peers.certs_dir.join("ca.crt")).map_err(|e| failed(&e))?;
            meridian_actors::auth::sha256_hex(&ca)
        }
    };
    // Who a peer may be: the node its certificate names, a member (once members are known),
    // with a certificate not revoked.
    let vouch: Vouch = {
        let gateway = gateway.clone();
        Arc::new(move |cert: &certs::CertificateDer<'_>, id: u64| {
            if !certs::names_node(cert, id) {
                return Err(Refusal::NotNamed(id));
            }
            let Some(state) = gateway.cluster_state() else {
                return Ok(());
            };
            if state.revoked_certs.contains_key(&certs::fingerprint(cert)) {
                return Err(Refusal::Revoked(id));
            }
            if !state.members.is_empty() && !state.members.contains_key(&id) {
                return Err(Refusal::NotAMember(id));
            }
            Ok(())
        })
    };
    Mesh::start(
        MeshConfig {
            node_id: config.node.id,
            region: config.node.region.clone(),
            listen: peers.mesh_listen,
            cookie,
            server_tls,
            client_tls,
            vouch,
        },
        gateway.registry().clone(),
    )
    .await
    .map_err(|e| failed(&e))
}

/// Keeps a mesh session to every member in the replicated member table. Each pair is dialled
/// by its lower id only, so two nodes never race to open duplicate sessions.
pub(crate) async fn keep_mesh_connected(mesh: Arc<Mesh>, cluster: ClusterNode, me: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let connected: Vec<u64> = mesh
            .connected()
            .await
            .iter()
            .filter_map(|n| peer_id(n))
            .collect();
        let peers: Vec<(u64, String)> = cluster
            .state()
            .borrow()
            .members
            .values()
            .filter(|m| m.id > me && !m.mesh_addr.is_empty())
            .map(|m| (m.id, m.mesh_addr.clone()))
            .collect();
        for (id, addr) in peers {
            if connected.contains(&id) {
                continue;
            }
            // A name is resolved each time (a restarted pod has a new address); each address
            // it resolves to is tried in turn.
            let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr.as_str())
                .await
                .map(Iterator::collect)
                .unwrap_or_default();
            let (false, Ok(name)) = (resolved.is_empty(), certs::server_name(id)) else {
                tracing::warn!(node = id, %addr, "member has an unusable mesh address");
                continue;
            };
            for to in resolved {
                match mesh.connect(id, to, name.clone()).await {
                    Ok(()) => break,
                    Err(e) => tracing::debug!(error = %e, "mesh: dialling a peer failed; retrying"),
                }
            }
        }
    }
}
