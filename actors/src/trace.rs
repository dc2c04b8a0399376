//! Traces of requests, through the OpenTelemetry API: a server span per request (the pipeline
//! starts it when the request arrives and ends it where the request is recorded), joined to the
//! client's W3C `traceparent`, and a client span per attempt at a provider, whose
//! `traceparent` the upstream call carries (a vLLM that exports traces joins the trace). A call
//! forwarded over the actor mesh carries its attempt's `traceparent` too: the owner's span of it
//! is that attempt's child.
//!
//! The node installs the tracer provider and the W3C propagator when traces are on; without
//! them the gateway makes no span of its own. A forwarded call that carries a `traceparent` still
//! gets a span on a node with traces off: the global provider's, which records nothing.

use std::borrow::Cow;
use std::sync::Arc;

use opentelemetry::global::{self, BoxedSpan, BoxedTracer};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanBuilder, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

/// The W3C trace headers a request came with (HTTP headers or gRPC metadata).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceHeaders<'a> {
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

impl Extractor for TraceHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"]
            .into_iter()
            .filter(|k| self.get(k).is_some())
            .collect()
    }
}

/// The tracer spans are made with: the one [`install`] was given, else the global provider's.
static TRACER: std::sync::RwLock<Option<BoxedTracer>> = std::sync::RwLock::new(None);

/// Makes spans with `tracer` from now on: the node calls it with the tracer of the provider it
/// has just installed as the global one. (Asking the global provider for a tracer at every
/// span built a boxed tracer each time: starting the two spans of a traced request cost about
/// 630 instructions more that way in the gateway bench.)
pub fn install(tracer: BoxedTracer) {
    *TRACER.write().unwrap_or_else(|e| e.into_inner()) = Some(tracer);
}

/// Starts the span `builder` describes under `parent`, with the tracer [`install`] was given
/// (built under the read lock: no clone of it per span), else the global provider's.
fn start(builder: SpanBuilder, parent: &opentelemetry::Context) -> BoxedSpan {
    let installed = TRACER.read().unwrap_or_else(|e| e.into_inner());
    match &*installed {
        Some(tracer) => tracer.build_with_context(builder, parent),
        None => global::tracer("meridian").build_with_context(builder, parent),
    }
}

/// Starts a request's server span, a child of the client's trace when it sent one.
pub fn server_span(headers: TraceHeaders<'_>, operation: &'static str) -> BoxedSpan {
    let parent = global::get_text_map_propagator(|p| p.extract(&headers));
    start(
        SpanBuilder::from_name(operation)
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("gen_ai.operation.name", operation)]),
        &parent,
    )
}

/// The context a span's children are made in.
pub fn context_of(span: &BoxedSpan) -> Context {
    use opentelemetry::trace::Span;
    Context::new().with_remote_span_context(span.span_context().clone())
}

/// Starts the client span of one attempt at `provider` (`{operation} {model}`, as the GenAI
/// conventions name it), and the `traceparent` the upstream call carries. A trace the sampler
/// left out gets no client span (nothing of it is recorded): the upstream call carries the
/// request's own span context, still marked not sampled, so the trace goes on unrecorded
/// downstream too.
pub fn client_span(
    parent: &Context,
    operation: &'static str,
    provider: &Arc<str>,
    model: &Arc<str>,
    attempt: u32,
) -> (Option<BoxedSpan>, Option<String>) {
    use opentelemetry::trace::TraceContextExt;
    let request = parent.span();
    let sc = request.span_context();
    if sc.is_valid() && !sc.is_sampled() {
        return (None, Some(traceparent(sc)));
    }
    let span = start(
        SpanBuilder::from_name(span_name(operation, model))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("gen_ai.request.model", Arc::clone(model)),
                KeyValue::new("meridian.provider", Arc::clone(provider)),
                KeyValue::new("meridian.attempt", i64::from(attempt)),
            ]),
        parent,
    );
    let traceparent = traceparent_of(&span);
    (Some(span), traceparent)
}

/// Starts the server span of a call another node forwarded here over the actor mesh, a child of
/// the forwarder's attempt (its `traceparent`), and the `traceparent` this node's upstream call
/// carries: a forwarded call is one trace over both nodes (and the provider).
pub fn forwarded_span(
    traceparent: &str,
    operation: &'static str,
    provider: &str,
    model: &str,
    stream: bool,
) -> (BoxedSpan, Option<String>) {
    let headers = TraceHeaders {
        traceparent: Some(traceparent),
        tracestate: None,
    };
    let parent = global::get_text_map_propagator(|p| p.extract(&headers));
    let span = start(
        SpanBuilder::from_name(span_name(operation, model))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
                KeyValue::new("gen_ai.request.stream", stream),
                KeyValue::new("meridian.provider", provider.to_owned()),
                KeyValue::new("meridian.forwarded", true),
            ]),
        &parent,
    );
    let traceparent = traceparent_of(&span);
    (span, traceparent)
}

/// A GenAI span's name, `{operation} {model}`. (Not `format!`: every traced request names
/// two or three spans, and its machinery costs more than the copy.)
pub fn span_name(operation: &str, model: &str) -> String {
    let mut name = String::with_capacity(operation.len() + 1 + model.len());
    name.push_str(operation);
    name.push(' ');
    name.push_str(model);
    name
}

/// `span`'s W3C `traceparent`, written directly (the propagator would go through a map of
/// headers, and `format!` through its machinery); none for a span that is not recorded.
fn traceparent_of(span: &BoxedSpan) -> Option<String> {
    use opentelemetry::trace::Span;
    let sc = span.span_context();
    sc.is_valid().then(|| traceparent(sc))
}

/// `sc` as a W3C `traceparent`.
fn traceparent(sc: &opentelemetry::trace::SpanContext) -> String {
    use meridian_proto::ids::push_hex;
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, &sc.trace_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &sc.span_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &[sc.trace_flags().to_u8()]);
    out
}

tokio::task_local! {
    /// The `traceparent` the upstream call being made carries (set around the call).
    pub static TRACEPARENT: Option<String>;
}

/// The `traceparent` of the upstream call being made, if it is traced.
pub fn outgoing_traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok().flatten()
}

/// A string attribute.
pub fn text(key: &'static str, value: impl Into<Cow<'static, str>>) -> KeyValue {
    KeyValue::new(key, value.into())
}
