//! Exporting traces: an OTLP exporter (gRPC or HTTP/protobuf) and a tracer provider, installed
//! for the process when traces are on — `[traces] endpoint` (and `protocol`) in the config, or
//! the standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` / `…_PROTOCOL` variables
//! (`OTEL_SDK_DISABLED=true` turns them off; see [`crate::otlp::target`]). The sampler follows `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default:
//! every trace, or as the caller's `traceparent` says), the service `OTEL_SERVICE_NAME` (default
//! `meridian`) and `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! Export never holds up a request: spans are batched on the runtime and sent in the
//! background; when the collector is slow or gone, the batch queue (2,048 spans) fills and
//! further spans are dropped, not waited for. Spans in batches the collector did not take are
//! counted ([`ExportCounts`], `meridian_trace_spans_total{result}` in `/metrics`); spans the SDK
//! dropped from a full queue are only logged by it.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

use crate::otlp::{ExportCounts, ExportError, Protocol, Target};

/// An exporter that counts what its batches came to.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counts: Arc<ExportCounts>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let sent = self.inner.export(batch).await;
        self.counts.count(n, &sent);
        sent
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The installed tracer provider; [`Traces::shutdown`] sends what is still batched.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    counts: Arc<ExportCounts>,
}

impl Traces {
    /// Builds the exporter for `target` and installs the provider and the W3C trace-context
    /// propagator for the process. Call inside the Tokio runtime.
    pub fn start(target: &Target, node: u64, region: &str) -> Result<Self, ExportError> {
        let built = match target.protocol {
            Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&target.endpoint)
                .build(),
            Protocol::HttpProtobuf => {
                use opentelemetry_otlp::WithHttpConfig as _;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(target.http_url("/v1/traces"))
                    .with_http_client(reqwest::Client::new())
                    .build()
            }
        };
        let exporter = built.map_err(|source| ExportError {
            signal: "traces",
            source,
        })?;
        let counts = Arc::new(ExportCounts::default());
        let exporter = Counted {
            inner: exporter,
            counts: Arc::clone(&counts),
        };
        let batches =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_resource(crate::otlp::resource(node, region))
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Self { provider, counts })
    }

    /// What the exporter's batches came to.
    pub fn counts(&self) -> &Arc<ExportCounts> {
        &self.counts
    }

    /// Sends the spans still batched and stops exporting.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces could not all be sent at shutdown");
        }
    }
}
