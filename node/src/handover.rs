//! Sockets handed over by whoever started the node, by systemd's socket-activation protocol
//! (`LISTEN_FDS` descriptors from 3 on; `LISTEN_PID`, when set, must name this process). A UDP
//! socket among them is the cluster's QUIC socket: the starter holds the Raft port across the
//! node's restarts, and picks it before the node starts (peers must know it), so nothing else
//! can take it in between.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Mutex, MutexGuard};

use listenfd::ListenFd;

/// The UDP sockets handed over, not yet taken.
static HANDED: Mutex<Vec<UdpSocket>> = Mutex::new(Vec::new());

fn handed() -> MutexGuard<'static, Vec<UdpSocket>> {
    HANDED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the handed-over descriptors from the environment and clears its variables (so the
/// processes the node starts do not see them). UDP sockets are kept for [`udp_socket`]; TCP
/// and Unix sockets, which the node does not take this way, are closed (so they leak into no
/// process it starts). Changes the environment: call it before any thread starts.
pub fn capture() {
    let mut fds = ListenFd::from_env();
    let mut udp = Vec::new();
    for i in 0..fds.len() {
        if let Ok(Some(socket)) = fds.take_udp_socket(i) {
            udp.push(socket);
        } else if !matches!(fds.take_tcp_listener(i), Ok(Some(_)))
            && !matches!(fds.take_unix_listener(i), Ok(Some(_)))
        {
            let _ = fds.take_unix_datagram(i);
        }
    }
    *handed() = udp;
}

/// Why a handed-over socket cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{field} is {configured}, but the UDP socket handed over (LISTEN_FDS) is bound to {bound}")]
pub struct Mismatch {
    field: &'static str,
    configured: SocketAddr,
    bound: String,
}

/// The UDP socket handed over for `listen` (the address configured in `field`), if one was:
/// the first UDP socket among the descriptors. One bound to another address is an error.
pub fn udp_socket(listen: SocketAddr, field: &'static str) -> Result<Option<UdpSocket>, Mismatch> {
    let mut handed = handed();
    if handed.is_empty() {
        return Ok(None);
    }
    let socket = handed.remove(0);
    match socket.local_addr() {
        Ok(bound) if serves(bound, listen) => Ok(Some(socket)),
        bound => Err(Mismatch {
            field,
            configured: listen,
            bound: bound.map_or_else(|e| format!("an unknown address ({e})"), |a| a.to_string()),
        }),
    }
}

/// Whether a socket bound to `bound` serves `listen`: the same address; any port where the
/// configuration asks for any (`:0`); or, for "any address" on the same port, a dual-stack
/// IPv6 socket (what `ListenDatagram=7000` binds) for `0.0.0.0`.
fn serves(bound: SocketAddr, listen: SocketAddr) -> bool {
    let port = listen.port() == 0 || bound.port() == listen.port();
    let ip =
        bound.ip() == listen.ip() || (bound.ip().is_unspecified() && listen.ip().is_unspecified());
    port && ip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_socket_serves_its_own_address_any_port_asked_for_and_dual_stack_any() {
        let a = |s: &str| {
            s.parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("{s}: {e}"))
        };
        assert!(serves(a("127.0.0.2:7000"), a("127.0.0.2:7000")));
        assert!(serves(a("127.0.0.2:41234"), a("127.0.0.2:0")));
        assert!(serves(a("[::]:7000"), a("0.0.0.0:7000")));
        assert!(!serves(a("127.0.0.2:7000"), a("127.0.0.3:7000")));
        assert!(!serves(a("127.0.0.2:7001"), a("127.0.0.2:7000")));
        assert!(!serves(a("[::]:7001"), a("0.0.0.0:7000")));
        assert!(!serves(a("[::1]:7000"), a("0.0.0.0:7000")));
    }
}
