//! The HTTP edge's accept loop: hyper with an explicit timer (so the HTTP/1 header-read timeout,
//! the slow-loris guard, is armed), the connection caps, and a stop that answers every
//! connection already made.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::H2_MAX_STREAMS;

/// How long a connection taken just before a stop has to send its first bytes before it is
/// shut down: hyper drops a connection that has not yet read enough to tell HTTP/1 from HTTP/2
/// without an answer, which for a client that connected in that instant is a reset request.
const FIRST_BYTES_GRACE: Duration = Duration::from_secs(1);

/// The HTTP accept loop: hyper with an explicit timer, so the HTTP/1 header-read timeout
/// (slow-loris guard) is actually armed. At a stop, every connection is shut down gracefully —
/// in-flight requests finish, HTTP/1 closes after its current response, HTTP/2 sends `GOAWAY` —
/// once it is [`FIRST_BYTES_GRACE`] old; the connections the kernel completed before the
/// listener closes are taken and answered too, rather than reset by the close (a request after
/// the drain began gets a 503 `node_draining` with `Retry-After`). One that completes between
/// the last accept and the close is still reset: nothing closes a listener atomically.
pub(crate) async fn serve_http(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    limits: Arc<crate::conns::ConnLimits>,
    stop: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS);
    let (stopping, stopped) = watch::channel(false);
    // Every connection task is tracked here and reaped as it ends.
    let mut connections = JoinSet::new();
    let serve = |connections: &mut JoinSet<()>, stream: tokio::net::TcpStream, peer: SocketAddr| {
        let admitted = match limits.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(limit) => return limits.refuse(stream, limit),
        };
        let accepted = tokio::time::Instant::now();
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let _admitted = admitted;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopped.wait_for(|s| *s) => {}
            }
            tokio::select! {
                _ = conn.as_mut() => return,
                () = tokio::time::sleep_until(accepted + FIRST_BYTES_GRACE) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve(&mut connections, stream, peer),
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut stop => break,
        }
    }
    let _ = stopping.send(true);
    // Taken with accept(2) itself until it would block: the runtime's readiness for the listener
    // may not have caught up with connections the kernel has already completed.
    match listener.into_std() {
        Ok(listener) => loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let stream = stream
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpStream::from_std(stream));
                    match stream {
                        Ok(stream) => serve(&mut connections, stream, peer),
                        Err(e) => tracing::warn!(error = %e, "a connection taken at the stop"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed at the stop");
                    break;
                }
            }
        },
        Err(e) => tracing::warn!(error = %e, "the listener could not be drained at the stop"),
    }
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Connections that reached the listener before a stop — one the kernel had queued with its
    /// request already sent, one whose client writes a moment after the stop — are answered,
    /// not reset by the listener's close or dropped before their first bytes are read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_made_before_a_stop_are_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
        let request = "GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        // Queued by the kernel before the server takes anything: the request already sent.
        let mut sent = std::net::TcpStream::connect(addr).expect("connect");
        sent.write_all(request.as_bytes()).expect("write");
        // Queued too, its request sent only after the stop.
        let late = std::net::TcpStream::connect(addr).expect("connect");
        let writer = std::thread::spawn(move || {
            let mut late = late;
            std::thread::sleep(Duration::from_millis(300));
            late.write_all(request.as_bytes()).expect("write");
            let mut answer = String::new();
            let _ = late.read_to_string(&mut answer);
            answer
        });
        // The stop has already come when the accept loop starts.
        let limits = crate::conns::ConnLimits::new(100, 100);
        serve_http(listener, router, Duration::from_secs(10), limits, async {}).await;
        let mut answer = String::new();
        let _ = sent.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("pong"),
            "the queued request: {answer:?}"
        );
        let answer = writer.join().expect("late client");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("pong"),
            "the request sent after the stop: {answer:?}"
        );
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the listener is closed"
        );
    }
}
