//! Exporting traces: an OTLP exporter (gRPC or HTTP/protobuf) and a tracer provider, installed
//! for the process when traces are on — `[traces] endpoint` (and `protocol`) in the config, or
//! the standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` / `…_PROTOCOL` variables
//! (`OTEL_SDK_DISABLED=true` turns them off; see [`crate::otlp::target`]). The sampler follows `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default:
//! every trace, or as the caller's `traceparent` says), the service `OTEL_SERVICE_NAME` (default
//! `meridian`) and `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! Export never holds up a request: spans are batched on the runtime and sent in the
//! background; when the collector is slow or gone, the batch queue (2,048 spans) fills and
//! further spans are dropped, not waited for. Spans exported, spans in batches the collector did
//! not take, and spans dropped from the full queue are counted ([`ExportCounts`],
//! `meridian_trace_spans_total{result}` in `/metrics`): the SDK's batch processor only logs its
//! drops, so [`Bounded`] keeps the queue's bound in front of it and counts them itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SpanData, SpanExporter, SpanProcessor};

use crate::otlp::{ExportCounts, ExportError, Target};

/// Spans handed to the batch processor and not yet through an export.
#[derive(Debug, Default)]
struct Queue {
    held: AtomicUsize,
}

/// An exporter that counts what its batches came to (and lets the [`Queue`] know).
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counts: Arc<ExportCounts>,
    queue: Arc<Queue>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let sent = self.inner.export(batch).await;
        self.counts.count(n, &sent);
        self.queue.held.fetch_sub(n, Ordering::Relaxed);
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

/// The batch processor behind a bound of its own: a span that finds `limit` spans queued (or
/// being exported) is dropped and counted. The processor's own queue is twice as long, so it
/// never drops first.
#[derive(Debug)]
struct Bounded<P> {
    inner: P,
    queue: Arc<Queue>,
    limit: usize,
    counts: Arc<ExportCounts>,
}

impl<P: SpanProcessor> SpanProcessor for Bounded<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queue.held.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.queue.held.fetch_sub(1, Ordering::Relaxed);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
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
        let exporter = crate::otlp::exporter!(
            opentelemetry_otlp::SpanExporter,
            target,
            "/v1/traces",
            "traces"
        )?;
        let counts = Arc::new(ExportCounts::default());
        let queue = Arc::new(Queue::default());
        let exporter = Counted {
            inner: exporter,
            counts: Arc::clone(&counts),
            queue: Arc::clone(&queue),
        };
        // The standard variable's bound (or the SDK's default), kept by `Bounded`.
        let limit = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(2_048);
        let batches = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(limit * 2)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batches,
                queue,
                limit,
                counts: Arc::clone(&counts),
            })
            .with_resource(crate::otlp::resource(node, region))
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        // This provider's own tracer (not the global one read back: another node in the same
        // process may have installed its provider in between).
        meridian_actors::trace::install(opentelemetry::global::BoxedTracer::new(Box::new(
            provider.tracer("meridian"),
        )));
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::{SpanContext, SpanKind, Status};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};

    use super::*;

    /// A processor that keeps what it is handed (and never exports).
    #[derive(Debug, Default)]
    struct Keeps(Mutex<usize>);

    impl SpanProcessor for Keeps {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
        fn on_end(&self, _: SpanData) {
            *self.0.lock().unwrap() += 1;
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    fn span() -> SpanData {
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "chat m".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[test]
    fn spans_past_the_queues_bound_are_dropped_and_counted() {
        let counts = Arc::new(ExportCounts::default());
        let queue = Arc::new(Queue::default());
        let bounded = Bounded {
            inner: Keeps::default(),
            queue: Arc::clone(&queue),
            limit: 3,
            counts: Arc::clone(&counts),
        };
        for _ in 0..5 {
            bounded.on_end(span());
        }
        assert_eq!(*bounded.inner.0.lock().unwrap(), 3);
        assert_eq!(counts.dropped.load(Ordering::Relaxed), 2);
        // An export that went through (or failed) makes room again.
        queue.held.fetch_sub(3, Ordering::Relaxed);
        bounded.on_end(span());
        assert_eq!(*bounded.inner.0.lock().unwrap(), 4);
        assert_eq!(counts.dropped.load(Ordering::Relaxed), 2);
    }
}
