//! Sockets handed over by whoever started the node, by systemd's socket-activation protocol
//! (`LISTEN_FDS` descriptors from 3 on; `LISTEN_PID`, when set, must name this process). A UDP
//! socket among them is the cluster's QUIC socket: the starter holds the Raft port across the
//! node's restarts, and picks it before the node starts (peers must know it), so nothing else
//! can take it in between.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Mutex, MutexGuard};

use listenfd::ListenFd;

static HANDED: Mutex<Option<ListenFd>> = Mutex::new(None);

fn handed() -> MutexGuard<'static, Option<ListenFd>> {
    HANDED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the handed-over descriptors from the environment and clears its variables (so the
/// processes the node starts do not see them). Changes the environment: call it before any
/// thread starts.
pub fn capture() {
    *handed() = Some(ListenFd::from_env());
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
    let mut guard = handed();
    let Some(fds) = guard.as_mut() else {
        return Ok(None);
    };
    let Some(socket) = (0..fds.len()).find_map(|i| fds.take_udp_socket(i).ok().flatten()) else {
        return Ok(None);
    };
    match socket.local_addr() {
        Ok(bound) if bound == listen || (listen.port() == 0 && bound.ip() == listen.ip()) => {
            Ok(Some(socket))
        }
        bound => Err(Mismatch {
            field,
            configured: listen,
            bound: bound.map_or_else(|e| format!("an unknown address ({e})"), |a| a.to_string()),
        }),
    }
}
