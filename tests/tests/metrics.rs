//! `/metrics` on a live node: every request counted once with its outcome, latency, tokens and
//! cost, in both exposition formats, and accepted by `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use meridian_tests::{chat_body, node_with_priced_mock, run_tool};

/// The value of the one series whose line starts with `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn every_request_is_counted_with_its_outcome_latency_tokens_and_cost() {
    let (_mock, node) = node_with_priced_mock("").await.unwrap();
    // A whole answer, a stream, a model nobody serves (its name is not a label), and a
    // request no key lets in.
    let whole = node.post_chat(chat_body("m", false, "")).await.unwrap();
    assert_eq!(whole.status(), 200);
    let whole: serde_json::Value = whole.json().await.unwrap();
    let streamed = node
        .post_chat(chat_body(
            "m",
            true,
            r#""stream_options":{"include_usage":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let _ = streamed.bytes().await.unwrap();
    let unknown = node
        .post_chat(chat_body("made-up-model-123", false, ""))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let refused = node
        .post_chat_without_key(chat_body("m", false, ""))
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let text = node.get("/metrics").await.unwrap().text().await.unwrap();
    let requests = |model: &str, provider: &str, code: &str, class: &str| {
        value(
            &text,
            &format!(
                r#"meridian_requests_total{{edge="http",gen_ai_operation_name="chat",gen_ai_request_model="{model}",provider="{provider}",code="{code}",status_class="{class}"}}"#
            ),
        )
    };
    assert_eq!(requests("m", "mock", "ok", "2xx"), Some(2.0), "{text}");
    assert_eq!(
        requests("other", "none", "model_not_found", "4xx"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        requests("other", "none", "missing_api_key", "4xx"),
        Some(1.0),
        "{text}"
    );
    assert!(
        !text.contains("made-up-model-123"),
        "a client's model name became a label"
    );
    let model = r#"{gen_ai_operation_name="chat",gen_ai_request_model="m"}"#;
    assert_eq!(
        value(
            &text,
            &format!("gen_ai_server_request_duration_seconds_count{model}")
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("gen_ai_server_time_to_first_token_seconds_count{model}")
        ),
        Some(1.0),
        "only the stream has a first token of its own"
    );
    // Tokens and cost add up to what the provider reported for the two calls.
    let prompt = whole["usage"]["prompt_tokens"].as_f64().unwrap();
    let completion = whole["usage"]["completion_tokens"].as_f64().unwrap();
    let spend = r#"model="m",provider="mock",tenant="dev",feature="""#;
    let input = value(
        &text,
        &format!(r#"meridian_tokens_total{{{spend},type="input"}}"#),
    );
    let output = value(
        &text,
        &format!(r#"meridian_tokens_total{{{spend},type="output"}}"#),
    );
    assert_eq!(input, Some(2.0 * prompt), "{text}");
    assert_eq!(output, Some(2.0 * completion), "{text}");
    let cost = value(&text, &format!("meridian_cost_micro_usd_total{{{spend}}}")).unwrap();
    let per_call = (prompt * 2.0 + completion * 8.0).ceil();
    assert_eq!(cost, 2.0 * per_call, "{text}");
    assert_eq!(
        value(
            &text,
            r#"meridian_queue_wait_seconds_count{provider="mock"}"#
        ),
        Some(2.0)
    );

    // OpenMetrics for a scraper that asks for it.
    let open = node
        .client()
        .get(node.url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(open.text().await.unwrap().ends_with("# EOF\n"));

    // promtool lints the Prometheus text.
    run_tool(
        "promtool",
        "prometheus",
        &["check", "metrics"],
        None,
        Some(text.as_bytes()),
    );
}
