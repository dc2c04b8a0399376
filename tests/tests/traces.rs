//! Traces: a node exporting to an OTLP/gRPC collector (here one in the test, on loopback) sends
//! a server span per request, joined to the client's `traceparent`, with the GenAI attributes,
//! and a client span per attempt at a provider, whose `traceparent` the provider receives; the
//! per-call records go to the collector too, as OTLP log records; over gRPC and over
//! HTTP/protobuf.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use meridian_tests::mock::{Flavor, MockUpstream};
use meridian_tests::otlp::{Collector, attribute, hex, log_attribute};
use meridian_tests::{TestNode, chat_body, metric, node_with_mock, wait_until};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A node (serving `m` from a mock vLLM) that sends its spans, and with `records` its call
/// records, to a collector started here over OTLP/gRPC.
async fn traced_node(records: bool) -> (Collector, MockUpstream, TestNode) {
    let (collector, addr) = Collector::start().await.unwrap();
    let records = if records {
        format!("[calls]\notlp_endpoint = \"http://{addr}\"\n")
    } else {
        String::new()
    };
    let (mock, node) = node_with_mock(
        Flavor::Vllm,
        &["m"],
        "",
        &format!("[traces]\nendpoint = \"http://{addr}\"\n{records}"),
    )
    .await
    .unwrap();
    (collector, mock, node)
}

/// Waits up to 10 s for `node`'s metric `series` to reach `at_least`; `what` names it in the
/// failure.
async fn wait_for_count(node: &TestNode, what: &str, series: &str, at_least: f64) {
    wait_until(what, Duration::from_secs(10), || async {
        metric(&node.url(""), series)
            .await
            .is_some_and(|n| n >= at_least)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_streamed_call_is_one_trace_with_the_client_and_the_provider() {
    let (collector, mock, node) = traced_node(true).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let resp = node
        .post_chat_with_header(
            "traceparent",
            &format!("00-{trace_id}-{client_span}-01"),
            chat_body("m", true, r#""stream_options":{"include_usage":true}"#),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let _ = resp.bytes().await.unwrap();

    wait_until(
        "the server and client spans",
        Duration::from_secs(15),
        || {
            let collector = collector.clone();
            async move {
                let spans = collector.spans();
                spans.iter().any(|s| s.kind == SpanKind::Server as i32)
                    && spans.iter().any(|s| s.kind == SpanKind::Client as i32)
            }
        },
    )
    .await
    .unwrap();
    let spans = collector.spans();
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(
        hex(&server.trace_id),
        trace_id,
        "joined to the client's trace"
    );
    assert_eq!(hex(&server.parent_span_id), client_span);
    assert_eq!(server.name, "chat m");
    for (key, want) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "m"),
        ("gen_ai.response.model", "m"),
        ("gen_ai.provider.name", "vllm"),
        ("meridian.provider", "mock"),
        ("meridian.tenant", "dev"),
        ("meridian.code", "ok"),
        ("meridian.attempts", "1"),
        ("gen_ai.request.stream", "true"),
    ] {
        assert_eq!(
            attribute(server, key).as_deref(),
            Some(want),
            "{key}: {server:?}"
        );
    }
    for key in [
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.time_to_first_chunk",
    ] {
        assert!(attribute(server, key).is_some(), "{key}: {server:?}");
    }
    assert!(
        attribute(server, "gen_ai.response.finish_reasons").is_some_and(|r| r.contains("\"stop\"")),
        "{server:?}"
    );
    let client = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    assert_eq!(hex(&client.trace_id), trace_id);
    assert_eq!(
        client.parent_span_id, server.span_id,
        "an attempt is the request's child"
    );
    assert_eq!(client.name, "chat m");
    // The node counts what it exported.
    wait_for_count(
        &node,
        "the export counted",
        r#"meridian_trace_spans_total{result="exported"}"#,
        2.0,
    )
    .await;
    // The provider was sent the attempt's own traceparent.
    let sent = mock.traceparents();
    assert_eq!(
        sent,
        [format!("00-{trace_id}-{}-01", hex(&client.span_id))],
        "the traceparent the provider received"
    );
    // The call's record, as an OTLP log record.
    let of_call = || {
        collector
            .logs()
            .into_iter()
            .map(|(_, r)| r)
            .find(|r| log_attribute(r, "meridian.request_id").as_deref() == Some(&request_id))
    };
    wait_until("the call's log record", Duration::from_secs(15), || async {
        of_call().is_some()
    })
    .await
    .unwrap();
    let record = of_call().unwrap();
    for (key, want) in [
        ("meridian.code", "ok"),
        ("meridian.tenant", "dev"),
        ("meridian.provider", "mock"),
        ("gen_ai.request.model", "m"),
        ("gen_ai.request.stream", "true"),
        ("meridian.edge", "http"),
    ] {
        assert_eq!(
            log_attribute(&record, key).as_deref(),
            Some(want),
            "{key}: {record:?}"
        );
    }
    assert!(log_attribute(&record, "gen_ai.usage.output_tokens").is_some());
    // The node counts the records it exported.
    wait_for_count(
        &node,
        "the records' export counted",
        r#"meridian_call_records_exported_total{result="exported"}"#,
        1.0,
    )
    .await;
}

/// The same over OTLP/HTTP with protobuf bodies: spans to `/v1/traces`, call records to
/// `/v1/logs` (the collector refuses anything but `application/x-protobuf`).
#[tokio::test]
async fn spans_and_call_records_go_over_http_protobuf_too() {
    let (collector, addr) = Collector::start_http().await.unwrap();
    let (_mock, node) = node_with_mock(
        Flavor::Vllm,
        &["m"],
        "",
        &format!(
            "[traces]\nendpoint = \"http://{addr}\"\nprotocol = \"http/protobuf\"\n\
             [calls]\notlp_endpoint = \"http://{addr}\"\notlp_protocol = \"http/protobuf\"\n"
        ),
    )
    .await
    .unwrap();
    let resp = node.post_chat(chat_body("m", false, "")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    wait_until(
        "a span and the call's record",
        Duration::from_secs(15),
        || async {
            let span = collector
                .spans()
                .iter()
                .any(|s| s.kind == SpanKind::Server as i32 && s.name == "chat m");
            let record = collector.logs().iter().any(|(_, r)| {
                log_attribute(r, "meridian.request_id").as_deref() == Some(&request_id)
            });
            span && record
        },
    )
    .await
    .unwrap();
    let (node_id, _) = &collector.logs()[0];
    assert!(!node_id.is_empty(), "records carry the node's resource");
}

#[tokio::test]
async fn a_trace_the_client_did_not_sample_is_carried_on_and_nothing_of_it_recorded() {
    let (collector, mock, node) = traced_node(false).await;
    let send = async |trace_id: &str, flags: &str| {
        let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-{flags}");
        node.post_chat_with_header("traceparent", &traceparent, chat_body("m", false, ""))
            .await
    };
    let unsampled = "11111111111111111111111111111111";
    let sampled = "22222222222222222222222222222222";
    assert_eq!(send(unsampled, "00").await.unwrap().status(), 200);
    // The provider is told of the trace, still not sampled.
    let sent = mock.traceparents();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0].starts_with(&format!("00-{unsampled}-")) && sent[0].ends_with("-00"),
        "{sent:?}"
    );
    // A sampled call after it: once its spans are in, the unsampled one's would have been.
    assert_eq!(send(sampled, "01").await.unwrap().status(), 200);
    wait_until("the sampled call's spans", Duration::from_secs(15), || {
        let collector = collector.clone();
        async move {
            let spans = collector.spans();
            let of = |kind: SpanKind| {
                spans
                    .iter()
                    .any(|s| s.kind == kind as i32 && hex(&s.trace_id) == sampled)
            };
            of(SpanKind::Server) && of(SpanKind::Client)
        }
    })
    .await
    .unwrap();
    let recorded: Vec<_> = (collector.spans().iter())
        .filter(|s| hex(&s.trace_id) == unsampled)
        .map(|s| s.name.clone())
        .collect();
    assert!(
        recorded.is_empty(),
        "spans of the unsampled trace: {recorded:?}"
    );
}
