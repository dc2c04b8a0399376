//! A minimal HTTP/1.1 client for the supervisor's own calls to a local replica (`/health`,
//! `/v1/models`, `/metrics`, the LoRA endpoints): one request per connection, and a refused
//! connection told apart from other failures (while vLLM loads, nothing listens).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    call(addr, "GET", path, None, timeout).await
}

/// `POST path` with a JSON body.
pub async fn post_json(
    addr: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    call(addr, "POST", path, Some(body), timeout).await
}

async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    tokio::time::timeout(timeout, exchange(addr, method, path, body))
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Answer, ProbeError> {
    let mut conn = TcpStream::connect(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            ProbeError::Refused
        } else {
            ProbeError::Failed(format!("cannot connect: {e}"))
        }
    })?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n");
    if let Some(b) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    request.push_str("\r\n");
    let io = |e: std::io::Error| ProbeError::Failed(e.to_string());
    conn.write_all(request.as_bytes()).await.map_err(io)?;
    if let Some(b) = body {
        conn.write_all(b).await.map_err(io)?;
    }
    let mut raw = Vec::new();
    conn.take(MAX_BODY as u64 + 16 * 1024)
        .read_to_end(&mut raw)
        .await
        .map_err(io)?;
    parse_response(&raw)
}

/// Status and body of a whole HTTP/1.1 response (`Content-Length`, chunked, or to the end).
fn parse_response(raw: &[u8]) -> Result<Answer, ProbeError> {
    let bad = |why: &str| ProbeError::Failed(format!("bad HTTP response: {why}"));
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("broken chunked body"))?
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            Some(_) => return Err(bad("body shorter than its Content-Length")),
            None => rest.to_vec(),
        }
    };
    Ok(Answer { status, body })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lengths_chunks_and_bodies_to_the_end() {
        let a = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
        let a = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(a.body, b"abcde");
        let a = parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").unwrap();
        assert_eq!((a.status, a.body.len()), (503, 0));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
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
