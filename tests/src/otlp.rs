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
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                collector.http_export::<ExportTraceServiceRequest>(),
            )
            .route(
                "/v1/logs",
                collector.http_export::<ExportLogsServiceRequest>(),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((collector, addr))
    }

    /// The OTLP/HTTP handler of export requests `R`: it keeps what a protobuf body carries and
    /// refuses anything else.
    fn http_export<R: Export>(&self) -> axum::routing::MethodRouter {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode, header};
        let collector = self.clone();
        axum::routing::post(move |headers: HeaderMap, body: Bytes| async move {
            let protobuf = headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v == "application/x-protobuf");
            match R::decode(body) {
                Ok(r) if protobuf => {
                    r.keep(&collector);
                    StatusCode::OK
                }
                _ => StatusCode::BAD_REQUEST,
            }
        })
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

    /// Keeps each batch's items with the node its resource names.
    fn keep_by_node<T, I: IntoIterator<Item = T>>(
        kept: &Mutex<Vec<(String, T)>>,
        batches: impl IntoIterator<Item = (Option<Resource>, I)>,
    ) {
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        for (resource, items) in batches {
            let node = node_of(resource.as_ref());
            kept.extend(items.into_iter().map(|item| (node.clone(), item)));
        }
    }

    /// Keeps what `request` carries and answers the exporter.
    fn accept<R: Export, A: Default>(&self, request: tonic::Request<R>) -> ExportResult<A> {
        request.into_inner().keep(self);
        Ok(tonic::Response::new(A::default()))
    }
}

type ExportResult<A> = Result<tonic::Response<A>, tonic::Status>;

/// An OTLP export request: the spans or the log records the collector keeps of it.
trait Export: Message + Default + Send + 'static {
    fn keep(self, collector: &Collector);
}

impl Export for ExportTraceServiceRequest {
    fn keep(self, collector: &Collector) {
        Collector::keep_by_node(
            &collector.spans,
            self.resource_spans
                .into_iter()
                .map(|r| (r.resource, r.scope_spans.into_iter().flat_map(|s| s.spans))),
        );
    }
}

impl Export for ExportLogsServiceRequest {
    fn keep(self, collector: &Collector) {
        Collector::keep_by_node(
            &collector.logs,
            self.resource_logs.into_iter().map(|r| {
                (
                    r.resource,
                    r.scope_logs.into_iter().flat_map(|s| s.log_records),
                )
            }),
        );
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> ExportResult<ExportTraceServiceResponse> {
        self.accept(request)
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> ExportResult<ExportLogsServiceResponse> {
        self.accept(request)
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
