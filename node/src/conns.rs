//! Caps on the HTTP edge's open connections: in all, and from one client address. A connection
//! beyond either is answered 503 with `Retry-After` and closed before any of its bytes are read,
//! and counted (`meridian_http_connections_refused_total{limit}`), so that one client cannot
//! take every socket and task of a node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_proto::{ApiError, ErrorKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    /// `node` (all connections) or `client` (one address).
    limit: &'static str,
}

/// Refused connections still being answered at most: past it, a refused one is closed at once.
const MAX_REFUSING: usize = 1024;

#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    /// 0: no cap per address.
    max_per_client: usize,
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    refusing: AtomicUsize,
    open: Gauge<i64, AtomicI64>,
    refused: Family<LimitLabel, Counter>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<ConnLimits>,
    client: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let l = &self.limits;
        l.total.fetch_sub(1, Ordering::Relaxed);
        l.open.dec();
        if l.max_per_client > 0 {
            let mut per = l.per_client.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per.get_mut(&self.client) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&self.client);
                }
            }
        }
    }
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_client,
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            refusing: AtomicUsize::new(0),
            open: Gauge::default(),
            refused: Family::default(),
        })
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meridian_http_connections",
            "Connections the HTTP edge holds open",
            self.open.clone(),
        );
        registry.register(
            "meridian_http_connections_refused",
            "Connections answered 503 and closed at once: over the node's cap (limit=\"node\") or one address's (limit=\"client\")",
            self.refused.clone(),
        );
    }

    /// Takes a place for a connection from `client`, or says which cap it is over.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, &'static str> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err("node");
        }
        if self.max_per_client > 0 {
            let mut per = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
            let n = per.entry(client).or_insert(0);
            if *n >= self.max_per_client {
                drop(per);
                self.total.fetch_sub(1, Ordering::Relaxed);
                return Err("client");
            }
            *n += 1;
        }
        self.open.inc();
        Ok(Admitted {
            limits: Arc::clone(self),
            client,
        })
    }

    /// Answers a connection over `limit` with a 503 and closes it (at once, when too many
    /// refusals are already being answered).
    pub fn refuse(self: &Arc<Self>, mut stream: TcpStream, limit: &'static str) {
        self.refused.get_or_create(&LimitLabel { limit }).inc();
        if self.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let limits = Arc::clone(self);
        tokio::spawn(async move {
            let from = if limit == "client" {
                " from your address"
            } else {
                ""
            };
            let body = ApiError::new(
                ErrorKind::Unavailable,
                format!("this node holds as many connections as it allows{from}; retry shortly"),
            )
            .with_code("too_many_connections")
            .body()
            .to_json();
            let mut answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            answer.extend_from_slice(&body);
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(&answer).await?;
                stream.shutdown().await?;
                // Read what the client sent until it closes, so that the close does not reset
                // the answer away; bounded in time and bytes.
                let mut sink = [0u8; 4096];
                let mut left = 64 * 1024;
                while left > 0 {
                    match stream.read(&mut sink).await? {
                        0 => break,
                        n => left -= n.min(left),
                    }
                }
                std::io::Result::Ok(())
            })
            .await;
            limits.refusing.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_per_node_and_per_address_and_freed_on_drop() {
        let limits = ConnLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = limits.admit(a).expect("a 1");
        let _second = limits.admit(a).expect("a 2");
        assert_eq!(limits.admit(a).err(), Some("client"));
        let _third = limits.admit(b).expect("b 1");
        assert_eq!(limits.admit(b).err(), Some("node"));
        drop(first);
        let again = limits.admit(b);
        assert!(again.is_ok(), "a freed place is taken again");
        assert_eq!(limits.open.get(), 3);
        drop(again);
        assert_eq!(limits.open.get(), 2);
    }
}
