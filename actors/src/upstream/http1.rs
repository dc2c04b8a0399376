//! The upstream HTTP/1.1 client: hyper's HTTP/1 codec over our own connection pool, driven by
//! the task that reads the response.
//!
//! Why not a client that runs each connection as a background task (reqwest, hyper's pool):
//! such a task hands the response body over one frame at a time through a channel, so a stream
//! whose whole burst of SSE events arrived in one read still crosses tasks once per event, and
//! the relay writes once per event. Here the caller polls the connection itself: one poll
//! decodes every frame already buffered, and the relay writes them together.
//!
//! An idle pooled connection is not polled; before reuse it is checked (one non-blocking poll
//! notices a peer that closed it) and dropped if it has been idle longer than the keep-alive
//! window upstream servers use.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::Request;
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use super::EndpointError;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{Phase, UpstreamError};

/// Idle connections older than this are not reused (vLLM's uvicorn closes them after 5 s).
const IDLE_REUSE: Duration = Duration::from_secs(4);
/// Most idle connections kept per upstream.
const MAX_IDLE: usize = 256;

/// Where a pool connects: parsed from a provider's `base_url`.
#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// Keep-alive connections to one upstream endpoint.
pub struct Pool {
    target: Target,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("authority", &self.target.authority)
            .field("tls", &self.target.tls.is_some())
            .finish_non_exhaustive()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One HTTP/1.1 connection: the request sender and the connection state machine that the
/// caller drives.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: Connection<TokioIo<Io>, Full<Bytes>>,
    closed: bool,
}

impl Conn {
    /// Moves the connection forward as far as it can go now.
    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Result<(), UpstreamError> {
        if self.closed {
            return Ok(());
        }
        match Pin::new(&mut self.driver).poll(cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(())) => {
                self.closed = true;
                Ok(())
            }
            Poll::Ready(Err(e)) => {
                self.closed = true;
                Err(UpstreamError::Closed(error_chain(&e)))
            }
        }
    }

    /// Whether the peer has closed the connection, without waiting.
    fn is_stale(&mut self) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let _ = self.poll_drive(&mut cx);
        self.closed || self.sender.is_closed()
    }
}

impl Pool {
    /// A pool for `base_url` (`http://host:port/...` or `https://...`). The path part is the
    /// caller's business.
    pub fn new(base_url: &str, connect_timeout: Duration) -> Result<Self, EndpointError> {
        let uri = EndpointError::parse(base_url)?;
        let host = uri
            .host()
            .ok_or_else(|| EndpointError::NoHost {
                url: base_url.into(),
            })?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            other => {
                return Err(EndpointError::Scheme {
                    url: base_url.into(),
                    scheme: other.map(str::to_owned),
                });
            }
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| host.clone());
        let tls = if tls {
            use rustls_platform_verifier::ConfigVerifierExt;
            let mut config = rustls::ClientConfig::with_platform_verifier()
                .map_err(|e| EndpointError::Tls(e.to_string()))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|_| EndpointError::ServerName { host: host.clone() })?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            target: Target {
                host,
                port,
                authority,
                tls,
            },
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The `Host` header for requests to this pool.
    pub fn authority(&self) -> &str {
        &self.target.authority
    }

    /// Sends `req` on a pooled or new connection; resolves to the exchange once the request is
    /// queued (the response head arrives through [`Exchange::head`]).
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Full<Bytes>>,
    ) -> Result<Exchange, UpstreamError> {
        let mut conn = match self.checkout() {
            Some(c) => c,
            None => self.connect().await?,
        };
        // A new connection becomes ready once its driver has run; a pooled one already is.
        futures::future::poll_fn(|cx| {
            conn.poll_drive(cx)?;
            conn.sender
                .poll_ready(cx)
                .map_err(|e| UpstreamError::Closed(error_chain(&e)))
        })
        .await?;
        let response = Box::pin(conn.sender.send_request(req));
        Ok(Exchange {
            pool: Arc::clone(self),
            conn: Some(conn),
            state: State::Head(response),
        })
    }

    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut entry) = idle.pop() {
            if now.duration_since(entry.since) < IDLE_REUSE && !entry.conn.is_stale() {
                return Some(entry.conn);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Conn) {
        if conn.is_stale() || !conn.sender.is_ready() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let t = &self.target;
        let io = timeout(self.connect_timeout, async {
            let tcp = TcpStream::connect((t.host.as_str(), t.port))
                .await
                .map_err(|e| UpstreamError::Connect(format!("{}: {e}", t.authority)))?;
            let _ = tcp.set_nodelay(true);
            match &t.tls {
                None => Ok(Io::Plain(tcp)),
                Some((connector, name)) => connector
                    .connect(name.clone(), tcp)
                    .await
                    .map(|s| Io::Tls(Box::new(s)))
                    .map_err(|e| {
                        UpstreamError::Connect(format!("{}: TLS handshake: {e}", t.authority))
                    }),
            }
        })
        .await
        .map_err(|_| UpstreamError::Timeout(Phase::Connect))??;
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
        Ok(Conn {
            sender,
            driver,
            closed: false,
        })
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = hyper::Result<http::Response<Incoming>>> + Send>>;

enum State {
    Head(ResponseFuture),
    Body(Incoming),
    Done,
}

/// One request/response on a connection. Reading the body to its end returns the connection
/// to the pool; dropping the exchange earlier closes it (which is how a call is cancelled).
pub struct Exchange {
    pool: Arc<Pool>,
    conn: Option<Conn>,
    state: State,
}

impl Exchange {
    /// The response head.
    pub async fn head(&mut self) -> Result<http::response::Parts, UpstreamError> {
        futures::future::poll_fn(|cx| self.poll_head(cx)).await
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<http::response::Parts, UpstreamError>> {
        let State::Head(response) = &mut self.state else {
            return Poll::Ready(Err(UpstreamError::Protocol(
                "response head read twice".into(),
            )));
        };
        if let Some(conn) = self.conn.as_mut() {
            conn.poll_drive(cx)?;
        }
        match response.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                self.state = State::Done;
                self.conn = None;
                Poll::Ready(Err(classify(&e)))
            }
            Poll::Ready(Ok(resp)) => {
                let (parts, body) = resp.into_parts();
                self.state = State::Body(body);
                Poll::Ready(Ok(parts))
            }
        }
    }

    /// The whole body, each read within `idle`, at most `limit` bytes.
    pub async fn read_to_end(
        &mut self,
        idle: Duration,
        limit: usize,
    ) -> Result<Bytes, UpstreamError> {
        // A body that arrives in one frame (the usual case) is returned without a copy.
        let mut first: Option<Bytes> = None;
        let mut rest = bytes::BytesMut::new();
        let mut len = 0;
        loop {
            let next = timeout(idle, futures::future::poll_fn(|cx| self.poll_data(cx)))
                .await
                .map_err(|_| UpstreamError::Timeout(Phase::Idle))?;
            match next {
                None => {
                    return Ok(match first {
                        None => Bytes::new(),
                        Some(b) if rest.is_empty() => b,
                        Some(_) => rest.freeze(),
                    });
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => {
                    len += b.len();
                    if len > limit {
                        return Err(UpstreamError::Protocol(format!(
                            "the upstream's body exceeds {limit} bytes"
                        )));
                    }
                    match &first {
                        None => first = Some(b),
                        Some(f) => {
                            if rest.is_empty() {
                                rest.extend_from_slice(f);
                            }
                            rest.extend_from_slice(&b);
                        }
                    }
                }
            }
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            let State::Body(body) = &mut self.state else {
                return Poll::Ready(None);
            };
            if let Some(conn) = self.conn.as_mut()
                && let Err(e) = conn.poll_drive(cx)
            {
                self.state = State::Done;
                self.conn = None;
                return Poll::Ready(Some(Err(e)));
            }
            if body.is_end_stream() {
                self.finish();
                return Poll::Ready(None);
            }
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.state = State::Done;
                    self.conn = None;
                    return Poll::Ready(Some(Err(classify(&e))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Poll::Ready(Some(Ok(data)));
                    }
                    // Trailers or an empty frame: keep reading.
                }
            }
        }
    }

    /// Reads what is left of the body if it has already arrived (typically the chunked
    /// terminator after `[DONE]`), so the connection goes back to the pool; otherwise gives up
    /// without waiting, and the connection is closed when the exchange is dropped.
    pub fn drain_ready(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(Ok(_))) = self.poll_data(cx) {}
    }

    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }
}

/// The body as a stream of byte chunks.
impl Stream for Exchange {
    type Item = Result<Bytes, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_data(cx)
    }
}

fn classify(e: &hyper::Error) -> UpstreamError {
    UpstreamError::Closed(error_chain(e))
}

/// hyper's top-level messages hide the cause; keep the chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// A plain or TLS connection.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
