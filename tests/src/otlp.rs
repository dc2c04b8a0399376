//! An OTLP/gRPC trace collector on loopback, for tests: it keeps every span it is sent, with
//! the node that sent it (the resource's `service.instance.id`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Every span sent so far, with the node that sent it.
#[derive(Default, Clone)]
pub struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

impl Collector {
    /// A collector serving on a free loopback port, and its address.
    pub async fn start() -> std::io::Result<(Self, SocketAddr)> {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Ok((collector, addr))
    }

    pub fn spans(&self) -> Vec<Span> {
        self.by_node().into_iter().map(|(_, s)| s).collect()
    }

    /// The spans with the `service.instance.id` of the node that sent each.
    pub fn by_node(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for r in request.into_inner().resource_spans {
            let node = r
                .resource
                .as_ref()
                .and_then(|res| value(&res.attributes, "service.instance.id"))
                .unwrap_or_default();
            for span in r.scope_spans.into_iter().flat_map(|s| s.spans) {
                kept.push((node.clone(), span));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn value(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|a| a.key == key)?.value.as_ref()?;
    Some(match value.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

/// The value of attribute `key` of `span`, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    value(&span.attributes, key)
}

/// Lowercase hex of a trace or span id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
