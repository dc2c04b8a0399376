//! Exporting traces: an OTLP/gRPC exporter and a tracer provider, installed for the process when
//! traces are on — `[traces] endpoint` in the config, or the standard `OTEL_EXPORTER_OTLP_
//! ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variables (`OTEL_SDK_DISABLED=true` turns
//! them off). The sampler follows `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default:
//! every trace, or as the caller's `traceparent` says), the service `OTEL_SERVICE_NAME` (default
//! `meridian`) and `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! Export never holds up a request: spans are batched on the runtime and sent in the
//! background; when the collector is slow or gone, the batch queue (2,048 spans) fills and
//! further spans are dropped, not waited for. Spans in batches the collector did not take are
//! counted ([`SpanCounts`], `meridian_trace_spans_total{result}` in `/metrics`); spans the SDK
//! dropped from a full queue are only logged by it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("traces: the OTLP exporter cannot be built: {0}")]
pub struct TracesError(#[from] opentelemetry_otlp::ExporterBuildError);

/// Where traces go, if anywhere: the configured endpoint, else the standard variables'.
pub fn endpoint(configured: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    configured
        .map(str::to_owned)
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .filter(|e| !e.is_empty())
}

/// Spans handed to the collector, and spans in batches it did not take.
#[derive(Debug, Default)]
pub struct SpanCounts {
    pub exported: AtomicU64,
    pub failed: AtomicU64,
}

/// An exporter that counts what its batches came to.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counts: Arc<SpanCounts>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let sent = self.inner.export(batch).await;
        let counter = match &sent {
            Ok(()) => &self.counts.exported,
            Err(_) => &self.counts.failed,
        };
        counter.fetch_add(n, Ordering::Relaxed);
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
    counts: Arc<SpanCounts>,
}

impl Traces {
    /// Builds the exporter for `endpoint` (OTLP over gRPC) and installs the provider and the
    /// W3C trace-context propagator for the process. Call inside the Tokio runtime.
    pub fn start(endpoint: &str, node: u64, region: &str) -> Result<Self, TracesError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        let counts = Arc::new(SpanCounts::default());
        let exporter = Counted {
            inner: exporter,
            counts: Arc::clone(&counts),
        };
        let batches =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "meridian".into());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_resource(
                Resource::builder()
                    .with_service_name(service)
                    .with_attributes([
                        KeyValue::new("service.instance.id", node.to_string()),
                        KeyValue::new("cloud.region", region.to_owned()),
                    ])
                    .build(),
            )
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Self { provider, counts })
    }

    /// What the exporter's batches came to.
    pub fn counts(&self) -> &Arc<SpanCounts> {
        &self.counts
    }

    /// Sends the spans still batched and stops exporting.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces could not all be sent at shutdown");
        }
    }
}
