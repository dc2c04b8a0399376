//! The supervisor's own calls to a local replica (`/health`, `/v1/models`, `/metrics`, the LoRA
//! endpoints): hyper's HTTP/1.1 client, one request per connection, with a refused connection
//! told apart from other failures (while vLLM loads, nothing listens).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Nothing listens there (yet).
    #[error("connection refused")]
    Refused,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Biggest body read (a `/metrics` page is tens of KiB).
const MAX_BODY: usize = 4 << 20;

/// `GET path` at `addr` (`host:port`).
pub async fn get(addr: &str, path: &str, timeout: Duration) -> Result<Answer, ProbeError> {
    call(addr, "GET", path, None, None, timeout).await
}

/// `GET path` of vLLM's API (under `/v1`), with the replica's key when it has one.
pub async fn get_api(
    addr: &str,
    path: &str,
    key: Option<&str>,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    call(addr, "GET", path, None, key, timeout).await
}

/// `POST path` of vLLM's API with a JSON body, with the replica's key when it has one.
pub async fn post_json(
    addr: &str,
    path: &str,
    body: &[u8],
    key: Option<&str>,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    call(addr, "POST", path, Some(body), key, timeout).await
}

/// One request on a connection of its own, all of it within `timeout`.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    key: Option<&str>,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    let exchange = async {
        let failed =
            |what: &str, e: &dyn std::fmt::Display| ProbeError::Failed(format!("{what}: {e}"));
        let conn = TcpStream::connect(addr).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                ProbeError::Refused
            } else {
                failed("cannot connect", &e)
            }
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(|e| failed("HTTP handshake", &e))?;
        // The connection is driven here until the answer is read, then dropped (closed).
        let driver = tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr)
            .header(http::header::ACCEPT, "*/*");
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = key {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|e| failed("bad request", &e))?;
        let answer = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| failed("no answer", &e))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| failed("body not read", &e))?
                .to_bytes()
                .to_vec();
            Ok(Answer { status, body })
        }
        .await;
        driver.abort();
        answer
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot server on loopback that answers `response` as written.
    async fn serve_once(response: &'static [u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 4096];
            let _ = conn.read(&mut head).await;
            conn.write_all(response).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn reads_lengths_chunks_and_statuses() {
        let t = Duration::from_secs(5);
        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let a = get(&addr, "/health", t).await.unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await;
        let a = post_json(&addr, "/v1/load_lora_adapter", b"{}", None, t)
            .await
            .unwrap();
        assert_eq!(a.body, b"abcde");
        let addr =
            serve_once(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let a = get(&addr, "/health", t).await.unwrap();
        assert_eq!((a.status, a.body.len()), (503, 0));
        let addr = serve_once(b"garbage\r\n\r\n").await;
        assert!(matches!(
            get(&addr, "/health", t).await,
            Err(ProbeError::Failed(_))
        ));
        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").await;
        assert!(matches!(
            get(&addr, "/metrics", t).await,
            Err(ProbeError::Failed(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        // Bound (so the port is no one else's) but not listening: connections are refused.
        let held =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        held.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let port = held.local_addr().unwrap().as_socket().unwrap().port();
        let e = get(
            &format!("127.0.0.1:{port}"),
            "/health",
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(e, ProbeError::Refused);
    }
}
