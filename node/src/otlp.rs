//! Where the node sends OpenTelemetry data (traces, and per-call records as log records), and
//! how: an endpoint and a protocol, OTLP over gRPC or over HTTP with protobuf bodies, as the
//! config or the standard `OTEL_EXPORTER_OTLP_*` variables name them. The call records' exporter
//! is here; the traces' is in `traces.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_actors::calllog::{CallEntry, CallLog};
use opentelemetry::logs::{AnyValue, LogRecord, Logger, LoggerProvider, Severity};
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::log_processor_with_async_runtime::BatchLogProcessor;
use opentelemetry_sdk::logs::{LogBatch, LogExporter, SdkLogger, SdkLoggerProvider};

/// How OTLP travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (a collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318), posted to `/v1/traces` and `/v1/logs`.
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            _ => None,
        }
    }
}

/// One signal's collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub endpoint: String,
    pub protocol: Protocol,
}

impl Target {
    /// Where an HTTP exporter posts the signal: an endpoint with no path gets the signal's
    /// (`/v1/traces`, `/v1/logs`), as `OTEL_EXPORTER_OTLP_ENDPOINT` does; one with a path is
    /// used as written.
    pub fn http_url(&self, signal_path: &str) -> String {
        let after_scheme = self.endpoint.split_once("://").map_or("", |(_, rest)| rest);
        if after_scheme.trim_end_matches('/').contains('/') {
            self.endpoint.clone()
        } else {
            format!("{}{signal_path}", self.endpoint.trim_end_matches('/'))
        }
    }
}

/// The collector of `signal` (`TRACES`, `LOGS`): the configured endpoint, else
/// `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` (none with
/// `OTEL_SDK_DISABLED=true`); the protocol likewise from `…_PROTOCOL` (default gRPC). `Err`
/// names what is wrong with the protocol.
pub fn target(
    endpoint: Option<&str>,
    protocol: Option<&str>,
    signal: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Target>, String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let Some(endpoint) = endpoint
        .map(str::to_owned)
        .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .filter(|e| !e.is_empty())
    else {
        return Ok(None);
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(format!(
            "{endpoint:?} is not an http:// or https:// URL of an OTLP collector"
        ));
    }
    let name = protocol
        .map(str::to_owned)
        .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "grpc".into());
    let protocol =
        Protocol::parse(&name).ok_or_else(|| format!("{name:?} is not grpc or http/protobuf"))?;
    Ok(Some(Target { endpoint, protocol }))
}

/// The resource every signal of this node is sent with.
pub fn resource(node: u64, region: &str) -> Resource {
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "meridian".into());
    Resource::builder()
        .with_service_name(service)
        .with_attributes([
            KeyValue::new("service.instance.id", node.to_string()),
            KeyValue::new("cloud.region", region.to_owned()),
        ])
        .build()
}

/// Why an OTLP exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("the OTLP exporter for {signal} cannot be built: {source}")]
pub struct ExportError {
    pub signal: &'static str,
    #[source]
    pub source: opentelemetry_otlp::ExporterBuildError,
}

/// Builds the OTLP exporter `$exporter` (`opentelemetry_otlp::SpanExporter` or `LogExporter`)
/// for a [`Target`], over gRPC or over HTTP/protobuf (posting to `$path` when the endpoint has
/// none). A macro: the two exporters' builders share no trait a function could take.
macro_rules! exporter {
    ($exporter:ty, $target:expr, $path:literal, $signal:literal) => {{
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        let target: &$crate::otlp::Target = $target;
        match target.protocol {
            $crate::otlp::Protocol::Grpc => <$exporter>::builder()
                .with_tonic()
                .with_endpoint(&target.endpoint)
                .build(),
            $crate::otlp::Protocol::HttpProtobuf => <$exporter>::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(target.http_url($path))
                .with_http_client(reqwest::Client::new())
                .build(),
        }
        .map_err(|source| $crate::otlp::ExportError {
            signal: $signal,
            source,
        })
    }};
}
pub(crate) use exporter;

/// Records in batches the collector took, in batches it did not, and records dropped before
/// export because the queue was full (the collector slow or gone).
#[derive(Debug, Default)]
pub struct ExportCounts {
    pub exported: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

impl ExportCounts {
    pub fn count(&self, n: usize, sent: &OTelSdkResult) {
        let counter = match sent {
            Ok(()) => &self.exported,
            Err(_) => &self.failed,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A log exporter that counts what its batches came to.
#[derive(Debug)]
struct CountedLogs {
    inner: opentelemetry_otlp::LogExporter,
    counts: Arc<ExportCounts>,
}

impl LogExporter for CountedLogs {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count();
        let sent = self.inner.export(batch).await;
        self.counts.count(n, &sent);
        sent
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The per-call records as OTLP log records (event `meridian.call`, one attribute per field of
/// the call log), batched on the runtime and sent in the background: a record is handed over
/// without waiting, and a full batch queue (2,048 records) drops rather than waits.
#[derive(Debug)]
pub struct OtlpCalls {
    provider: SdkLoggerProvider,
    logger: SdkLogger,
    counts: Arc<ExportCounts>,
}

impl OtlpCalls {
    /// Builds the exporter for `target`. Call inside the Tokio runtime.
    pub fn start(target: &Target, node: u64, region: &str) -> Result<Self, ExportError> {
        let exporter = exporter!(
            opentelemetry_otlp::LogExporter,
            target,
            "/v1/logs",
            "call records"
        )?;
        let counts = Arc::new(ExportCounts::default());
        let exporter = CountedLogs {
            inner: exporter,
            counts: Arc::clone(&counts),
        };
        let batches =
            BatchLogProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let provider = SdkLoggerProvider::builder()
            .with_log_processor(batches)
            .with_resource(resource(node, region))
            .build();
        let logger = provider.logger("meridian");
        Ok(Self {
            provider,
            logger,
            counts,
        })
    }

    pub fn counts(&self) -> &Arc<ExportCounts> {
        &self.counts
    }

    /// Sends the records still batched and stops exporting.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "call records could not all be sent at shutdown");
        }
    }
}

impl Drop for OtlpCalls {
    /// Dropped without [`OtlpCalls::shutdown`] (a node stopped before its drain ran, a test's
    /// runtime ending): the SDK's own drop would shut the provider down by blocking this thread
    /// until its batch task answers — on a runtime thread, possibly the thread that task needs.
    /// The shutdown runs on a thread of its own instead (after a shutdown, it returns at once).
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let _ = std::thread::Builder::new()
            .name("otlp-calls-stop".into())
            .spawn(move || {
                let _ = provider.shutdown();
            });
    }
}

impl CallLog for OtlpCalls {
    fn write(&self, e: CallEntry) {
        let mut r = self.logger.create_log_record();
        r.set_event_name("meridian.call");
        r.set_timestamp(UNIX_EPOCH + Duration::from_millis(e.at_unix_ms));
        r.set_observed_timestamp(SystemTime::now());
        let ok = matches!(&*e.code, "ok" | "cached" | "cancelled");
        r.set_severity_number(if ok { Severity::Info } else { Severity::Warn });
        r.set_severity_text(if ok { "INFO" } else { "WARN" });
        r.set_body(AnyValue::from(format!("{} {} {}", e.api, e.model, e.code)));
        let text = |v: &str| AnyValue::from(v.to_owned());
        let mut attributes: Vec<(Key, AnyValue)> = vec![
            ("meridian.request_id".into(), text(e.request_id.as_str())),
            ("meridian.edge".into(), text(e.edge.as_str())),
            ("meridian.api".into(), text(e.api)),
            ("gen_ai.request.model".into(), text(&e.model)),
            (
                "meridian.attempts".into(),
                AnyValue::from(i64::from(e.attempts)),
            ),
            ("meridian.code".into(), text(&e.code)),
            ("meridian.duration_ms".into(), AnyValue::from(e.duration_ms)),
            (
                "meridian.cost_micro_usd".into(),
                AnyValue::from(e.cost_micro_usd as i64),
            ),
            ("meridian.cache_hit".into(), AnyValue::from(e.cache_hit)),
            ("gen_ai.request.stream".into(), AnyValue::from(e.stream)),
            ("meridian.cancelled".into(), AnyValue::from(e.cancelled)),
        ];
        let named = [
            ("meridian.tenant", e.tenant.as_deref()),
            ("meridian.key_id", e.key_id.as_deref()),
            ("meridian.user", e.user.as_deref()),
            ("meridian.feature", e.feature.as_deref()),
            ("gen_ai.response.model", e.served_model.as_deref()),
            ("meridian.provider", e.provider.as_deref()),
        ];
        for (key, value) in named {
            if let Some(v) = value {
                attributes.push((key.into(), text(v)));
            }
        }
        if let Some(t) = e.tokens {
            attributes.push((
                "gen_ai.usage.input_tokens".into(),
                AnyValue::from(t.input as i64),
            ));
            attributes.push((
                "gen_ai.usage.output_tokens".into(),
                AnyValue::from(t.output as i64),
            ));
            attributes.push((
                "gen_ai.usage.cache_read.input_tokens".into(),
                AnyValue::from(t.cached_input as i64),
            ));
        }
        for (key, value) in [
            ("meridian.ttft_ms", e.ttft_ms),
            ("meridian.queue_wait_ms", e.queue_wait_ms),
        ] {
            if let Some(v) = value {
                attributes.push((key.into(), AnyValue::from(v)));
            }
        }
        r.add_attributes(attributes);
        self.logger.emit(r);
    }
}

/// Several places each call record goes (the SQLite log and the OTLP exporter).
#[derive(Debug)]
pub struct CallSinks(pub Vec<Arc<dyn CallLog>>);

impl CallLog for CallSinks {
    fn write(&self, entry: CallEntry) {
        if let Some((last, rest)) = self.0.split_last() {
            for sink in rest {
                sink.write(entry.clone());
            }
            last.write(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn targets_come_from_the_config_then_the_standard_variables() {
        let none = env(&[]);
        assert_eq!(target(None, None, "LOGS", &none), Ok(None));
        let t = target(Some("http://c:4318"), Some("http/protobuf"), "LOGS", &none)
            .unwrap()
            .unwrap();
        assert_eq!(t.protocol, Protocol::HttpProtobuf);
        assert_eq!(t.http_url("/v1/logs"), "http://c:4318/v1/logs");
        let exact = Target {
            endpoint: "http://c:4318/custom/logs".into(),
            protocol: Protocol::HttpProtobuf,
        };
        assert_eq!(exact.http_url("/v1/logs"), "http://c:4318/custom/logs");
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base:4317"),
            ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        let t = target(None, None, "LOGS", &vars).unwrap().unwrap();
        assert_eq!(
            (t.endpoint.as_str(), t.protocol),
            ("http://base:4317", Protocol::HttpProtobuf)
        );
        let t = target(None, None, "TRACES", &vars).unwrap().unwrap();
        assert_eq!(t.protocol, Protocol::Grpc);
        assert!(target(Some("c:4317"), None, "LOGS", &none).is_err());
        assert!(target(Some("http://c"), Some("http/json"), "LOGS", &none).is_err());
        let off = env(&[
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
        ]);
        assert_eq!(target(None, None, "TRACES", &off), Ok(None));
    }
}
