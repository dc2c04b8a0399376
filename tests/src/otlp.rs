//! An OTLP collector on loopback, for tests: over gRPC or HTTP/protobuf, it keeps every span and
//! every log record it is sent, with the node that sent each (the resource's
//! `service.instance.id`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// Every span and log record sent so far, with the node that sent it.
#[derive(Default, Clone)]
pub struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    logs: Arc<Mutex<Vec<(String, LogRecord)>>>,
}

fn node_of(resource: Option<&Resource>) -> String {
    resource
        .and_then(|r| value(&r.attributes, "service.instance.id"))
        .unwrap_or_default()
}

impl Collector {
    /// A collector serving OTLP/gRPC on a free loopback port, and its address.
    pub async fn start() -> std::io::Result<(Self, SocketAddr)> {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .add_service(LogsServiceServer::new(collector.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Ok((collector, addr))
    }

    /// A collector serving OTLP/HTTP with protobuf bodies (`POST /v1/traces`, `/v1/logs`) on
    /// a free loopback port, and its address.
    pub async fn start_http() -> std::io::Result<(Self, SocketAddr)> {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode, header};
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let protobuf = |headers: &HeaderMap| {
            headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v == "application/x-protobuf")
        };
        let (traces, logs) = (collector.clone(), collector.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(r) if protobuf(&headers) => {
                            traces.keep_spans(r);
                            StatusCode::OK
                        }
                        _ => StatusCode::BAD_REQUEST,
                    }
                }),
            )
            .route(
                "/v1/logs",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| async move {
                    match ExportLogsServiceRequest::decode(body) {
                        Ok(r) if protobuf(&headers) => {
                            logs.keep_logs(r);
                            StatusCode::OK
                        }
                        _ => StatusCode::BAD_REQUEST,
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((collector, addr))
    }

    pub fn spans(&self) -> Vec<Span> {
        self.by_node().into_iter().map(|(_, s)| s).collect()
    }

    /// The spans with the `service.instance.id` of the node that sent each.
    pub fn by_node(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The log records with the node that sent each.
    pub fn logs(&self) -> Vec<(String, LogRecord)> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn keep_spans(&self, request: ExportTraceServiceRequest) {
        let mut kept = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for r in request.resource_spans {
            let node = node_of(r.resource.as_ref());
            for span in r.scope_spans.into_iter().flat_map(|s| s.spans) {
                kept.push((node.clone(), span));
            }
        }
    }

    fn keep_logs(&self, request: ExportLogsServiceRequest) {
        let mut kept = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        for r in request.resource_logs {
            let node = node_of(r.resource.as_ref());
            for record in r.scope_logs.into_iter().flat_map(|s| s.log_records) {
                kept.push((node.clone(), record));
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.keep_spans(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.keep_logs(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
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

/// The value of attribute `key` of log record `record`, as text.
pub fn log_attribute(record: &LogRecord, key: &str) -> Option<String> {
    value(&record.attributes, key)
}

/// Lowercase hex of a trace or span id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
