//! The mesh's links: TLS connections whose peer is bound to the node its certificate names.
//!
//! ractor's own listener and dialler would hand the node server a TLS stream and forget the
//! certificate, so a member's certificate could then announce itself as any other member in
//! ractor's handshake. Here the node accepts and dials itself, and hands ractor a stream whose
//! reading side holds back the peer's handshake until the name in it has been checked against
//! the certificate (and the revocations and member table, through the node's [`Vouch`]): a
//! peer naming a node its certificate does not vouch for is cut off before ractor reads its
//! name, so it can neither pose as that node nor disturb a session of the real one. The node id
//! of every authenticated session is kept ([`session_peer`]) so that an actor found in a
//! process group is trusted to speak for a node only if it lives behind that node's session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use prost::Message;
use ractor::ActorRef;
use ractor_cluster::node::{NodeEventSubscription, NodeServerSessionInformation};
use ractor_cluster::{ClusterBidiStream, NodeServerMessage};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Whether a peer holding certificate `cert` may be node `id` on the mesh (`Err`: why not).
pub type Vouch = Arc<dyn Fn(&CertificateDer<'_>, u64) -> Result<(), Refusal> + Send + Sync>;

/// Why a peer may not be the node it says it is on the mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("a certificate that does not name node {0}")]
    NotNamed(u64),
    #[error("node {0}'s certificate is revoked")]
    Revoked(u64),
    #[error("node {0} is not a member of the cluster")]
    NotAMember(u64),
    #[error("node {peer} (by its certificate) named itself node {claimed}")]
    NamedOther { peer: u64, claimed: u64 },
}

/// Why dialling a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no TLS session within {0:?}")]
    Timeout(Duration),
    #[error("TCP or TLS: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("this node's session server has stopped")]
    ServerGone,
}

/// How long a peer has to finish the TCP and TLS handshakes.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// The largest handshake frame read before the peer has named itself (ractor's are tens of
/// bytes).
const MAX_HELLO: u64 = 64 * 1024;

/// Accepts the mesh's connections on `listener` until the task is aborted.
pub(super) async fn accept(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    vouch: Vouch,
    server: ActorRef<NodeServerMessage>,
) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "mesh: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, vouch, server) = (acceptor.clone(), Arc::clone(&vouch), server.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "mesh: a peer's TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "mesh: a peer did not finish its TLS handshake");
                    return;
                }
            };
            let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
                return;
            };
            let cert = cert.clone().into_owned();
            let check = Box::new(move |claimed: u64| vouch(&cert, claimed));
            let link = Link::new(tls.into(), addr, Side::Accepted, check);
            let _ = server.cast(NodeServerMessage::ConnectionOpenedExternal {
                stream: Box::new(link),
                is_server: true,
            });
        });
    }
}

/// Dials node `peer` at `addr`: its certificate must carry `name` and be vouched for as
/// `peer`, and its handshake must name `peer`.
pub(super) async fn dial(
    server: &ActorRef<NodeServerMessage>,
    connector: tokio_rustls::TlsConnector,
    peer: u64,
    addr: SocketAddr,
    name: ServerName<'static>,
    vouch: Vouch,
) -> Result<(), DialError> {
    let tls = tokio::time::timeout(HANDSHAKE, async {
        let tcp = TcpStream::connect(addr).await?;
        connector.connect(name, tcp).await
    })
    .await
    .map_err(|_| DialError::Timeout(HANDSHAKE))??;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(DialError::NoCertificate)?
        .clone()
        .into_owned();
    vouch(&cert, peer)?;
    let check = Box::new(move |claimed: u64| {
        if claimed == peer {
            Ok(())
        } else {
            Err(Refusal::NamedOther { peer, claimed })
        }
    });
    let link = Link::new(tls.into(), addr, Side::Dialled, check);
    server
        .cast(NodeServerMessage::ConnectionOpenedExternal {
            stream: Box::new(link),
            is_server: false,
        })
        .map_err(|_| DialError::ServerGone)
}

/// Which side of the connection this node is: which of the peer's handshake frames names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The peer dialled: its first frame is its name.
    Accepted,
    /// This node dialled: the peer's status, then its challenge, which carries its name.
    Dialled,
}

type Check = Box<dyn Fn(u64) -> Result<(), Refusal> + Send + Sync>;

/// A checked TLS connection, as ractor's node server takes it.
struct Link {
    tls: tokio_rustls::TlsStream<TcpStream>,
    addr: SocketAddr,
    gate: Gate,
}

impl Link {
    fn new(
        tls: tokio_rustls::TlsStream<TcpStream>,
        addr: SocketAddr,
        side: Side,
        check: Check,
    ) -> Self {
        Self {
            tls,
            addr,
            gate: Gate {
                side,
                check,
                buf: Vec::new(),
                checked: 0,
                open: false,
            },
        }
    }
}

impl ClusterBidiStream for Link {
    fn split(self: Box<Self>) -> (ractor_cluster::BoxRead, ractor_cluster::BoxWrite) {
        let (read, write) = tokio::io::split(self.tls);
        let read = Gated {
            inner: read,
            gate: Some(self.gate),
        };
        (Box::new(read), Box::new(write))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.addr.to_string())
    }
}

/// What the reading side holds back until the peer has named itself.
struct Gate {
    side: Side,
    check: Check,
    /// Bytes read from the peer and not yet passed on.
    buf: Vec<u8>,
    /// How many of `buf`'s first bytes are whole frames found acceptable.
    checked: usize,
    /// The peer's name passed: everything in `buf` may go.
    open: bool,
}

impl Gate {
    /// Checks the whole frames in `buf` past `checked`.
    fn inspect(&mut self) -> std::io::Result<()> {
        while !self.open {
            let rest = &self.buf[self.checked..];
            let Some(&len) = rest.first_chunk::<8>() else {
                return Ok(());
            };
            let len = u64::from_be_bytes(len);
            if len > MAX_HELLO {
                return Err(refused(format!(
                    "a {len}-byte handshake frame (at most {MAX_HELLO})"
                )));
            }
            let Some(frame) = rest.get(8..8 + len as usize) else {
                return Ok(());
            };
            let auth = Hello::decode(frame)
                .ok()
                .and_then(|h| h.auth)
                .ok_or_else(|| refused("the peer spoke before naming itself".into()))?;
            let name = match self.side {
                Side::Accepted => auth.name,
                Side::Dialled => auth.challenge,
            };
            match name {
                Some(Named { name }) => {
                    let claimed = peer_id(&name)
                        .ok_or_else(|| refused(format!("the peer named itself {name:?}")))?;
                    (self.check)(claimed).map_err(|r| refused(r.to_string()))?;
                    self.open = true;
                }
                // The server's status before its challenge.
                None if self.side == Side::Dialled => self.checked += 8 + len as usize,
                None => return Err(refused("the peer spoke before naming itself".into())),
            }
        }
        self.checked = self.buf.len();
        Ok(())
    }
}

fn refused(why: String) -> std::io::Error {
    tracing::warn!("mesh: refused a peer: {why}");
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)
}

/// The reading side of a [`Link`]: bytes pass only as far as the gate has checked them.
struct Gated<R> {
    inner: R,
    /// `None` once the peer's name passed and the held bytes went on.
    gate: Option<Gate>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Gated<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            let Some(gate) = &mut this.gate else {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            };
            if gate.checked > 0 {
                let n = gate.checked.min(out.remaining());
                out.put_slice(&gate.buf[..n]);
                gate.buf.drain(..n);
                gate.checked -= n;
                if gate.open && gate.buf.is_empty() {
                    this.gate = None;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The peer left before naming itself.
                return Poll::Ready(Ok(()));
            }
            gate.buf.extend_from_slice(read.filled());
            gate.inspect()?;
        }
    }
}

// The two frames of ractor's handshake that carry a node's name, decoded alone (its protocol
// types are private to it): `NetworkMessage.auth` (1) → `AuthenticationMessage.name` (1, the
// dialler's `NameMessage`) or `.server_challenge` (4, the server's `Challenge`), each with the
// name as field 1. Other fields are skipped.

#[derive(Clone, PartialEq, prost::Message)]
struct Hello {
    #[prost(message, optional, tag = "1")]
    auth: Option<Auth>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Auth {
    #[prost(message, optional, tag = "1")]
    name: Option<Named>,
    #[prost(message, optional, tag = "4")]
    challenge: Option<Named>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

/// The node id in a session's peer name (`node-<id>@<host>`).
pub fn peer_id(peer_name: &str) -> Option<u64> {
    let name = peer_name.split_once('@').map_or(peer_name, |(n, _)| n);
    name.strip_prefix("node-")?.parse().ok()
}

/// ractor's id of the session a remote actor lives behind (`None`: a local actor).
pub fn remote_session(cell: &ractor::ActorCell) -> Option<u64> {
    match cell.get_id() {
        ractor::ActorId::Remote { node_id, .. } => Some(node_id),
        ractor::ActorId::Local(_) => None,
    }
}

/// Node ids of the authenticated sessions, by ractor's id of the session (the `node_id` of
/// the remote actors behind it). Process-wide, as ractor's actor registry and process groups
/// are: a process runs one mesh.
static SESSIONS: LazyLock<RwLock<HashMap<u64, u64>>> = LazyLock::new(Default::default);

/// The node behind ractor's session `session` (an `ActorId::Remote`'s `node_id`), if it is an
/// authenticated one.
pub fn session_peer(session: u64) -> Option<u64> {
    SESSIONS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&session)
        .copied()
}

/// Keeps [`SESSIONS`] as ractor's node server reports sessions.
pub(super) struct Track;

impl NodeEventSubscription for Track {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        SESSIONS
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ses.node_id);
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if let Some(peer) = ses.peer_name.as_ref().and_then(|n| peer_id(&n.name)) {
            SESSIONS
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ses.node_id, peer);
        }
    }
}

/// A server config that completes no handshake, for ractor's own listener (the node accepts
/// the mesh's connections itself).
pub(super) fn refuse_all() -> Arc<rustls::ServerConfig> {
    #[derive(Debug)]
    struct NoCertificate;
    impl rustls::server::ResolvesServerCert for NoCertificate {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
    Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCertificate)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &impl Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = (body.len() as u64).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    fn name_frame(name: &str) -> Vec<u8> {
        frame(&Hello {
            auth: Some(Auth {
                name: Some(Named { name: name.into() }),
                challenge: None,
            }),
        })
    }

    fn challenge_frame(name: &str) -> Vec<u8> {
        frame(&Hello {
            auth: Some(Auth {
                name: None,
                challenge: Some(Named { name: name.into() }),
            }),
        })
    }

    /// A status frame: an `AuthenticationMessage` with field 2 only.
    fn status_frame() -> Vec<u8> {
        // NetworkMessage{auth (1): AuthenticationMessage{server_status (2): ServerStatus{}}}
        let auth = [0x12, 0x00];
        let mut body = vec![0x0a, auth.len() as u8];
        body.extend(auth);
        let mut out = (body.len() as u64).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    async fn read_through(side: Side, only: u64, bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let check: Check = Box::new(move |claimed| {
            (claimed == only).then_some(()).ok_or(Refusal::NamedOther {
                peer: only,
                claimed,
            })
        });
        let mut gated = Gated {
            inner: std::io::Cursor::new(bytes),
            gate: Some(Gate {
                side,
                check,
                buf: Vec::new(),
                checked: 0,
                open: false,
            }),
        };
        let mut out = Vec::new();
        gated.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_peer_naming_the_node_its_certificate_vouches_for_passes_byte_for_byte() {
        let mut bytes = name_frame("node-2@10.0.0.2");
        bytes.extend(b"rest of the session".repeat(1_000));
        let out = read_through(Side::Accepted, 2, bytes.clone())
            .await
            .unwrap();
        assert_eq!(out, bytes);

        let mut bytes = status_frame();
        bytes.extend(challenge_frame("node-3@h"));
        bytes.extend(b"more");
        let out = read_through(Side::Dialled, 3, bytes.clone()).await.unwrap();
        assert_eq!(out, bytes);
    }

    #[tokio::test]
    async fn a_peer_naming_another_node_is_cut_off_before_its_name_is_read() {
        let err = read_through(Side::Accepted, 2, name_frame("node-1@10.0.0.2"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("named itself node 1"), "{err}");

        let mut bytes = status_frame();
        bytes.extend(challenge_frame("node-1@h"));
        let err = read_through(Side::Dialled, 3, bytes).await.unwrap_err();
        assert!(err.to_string().contains("named itself node 1"), "{err}");
    }

    #[tokio::test]
    async fn a_peer_that_speaks_before_naming_itself_or_sends_a_huge_frame_is_cut_off() {
        // The dialler's first frame must be its name; a status is not.
        let err = read_through(Side::Accepted, 2, status_frame())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("before naming"), "{err}");
        let err = read_through(Side::Accepted, 2, b"\0\0\0\0\0\0\0\x04junk".to_vec())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("before naming"), "{err}");
        let err = read_through(Side::Accepted, 2, u64::MAX.to_be_bytes().to_vec())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("handshake frame"), "{err}");
        let err = read_through(Side::Accepted, 2, name_frame("someone@h"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("named itself"), "{err}");
    }

    #[tokio::test]
    async fn a_name_split_across_reads_passes_once_whole() {
        // One byte at a time: the gate gathers the frame across reads before it checks it.
        let bytes = name_frame("node-2@x");
        let (mut tx, rx) = tokio::io::duplex(1);
        let check: Check = Box::new(|c| (c == 2).then_some(()).ok_or(Refusal::NotAMember(c)));
        let mut gated = Gated {
            inner: rx,
            gate: Some(Gate {
                side: Side::Accepted,
                check,
                buf: Vec::new(),
                checked: 0,
                open: false,
            }),
        };
        let sent = bytes.clone();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in sent {
                tx.write_all(&[b]).await.unwrap();
            }
        });
        let mut out = vec![0u8; bytes.len()];
        tokio::io::AsyncReadExt::read_exact(&mut gated, &mut out)
            .await
            .unwrap();
        assert_eq!(out, bytes);
        writer.await.unwrap();
    }
}
