//! The OpenAI APIs beside chat — text completions and embeddings — through the one pipeline:
//! a real node on loopback in front of the mock (OpenAI and vLLM wire formats), an Anthropic
//! mock that has neither API, and the built-in demo model.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use base64::Engine;
use meridian_policy::clock::WallClock;
use meridian_tests::json_api::error_saying;
use meridian_tests::mock::{Flavor, MockUpstream};
use meridian_tests::{TestNode, limit, provider_toml, provider_toml_kind, sse_chunks};
use serde_json::{Value, json};

/// A node serving `mock` from a mock of `flavor`, `claude` from an Anthropic mock and `demo`.
async fn node(flavor: Flavor) -> (MockUpstream, MockUpstream, TestNode) {
    node_on(flavor, WallClock::system()).await
}

/// A [`node`] of each OpenAI-style flavour (OpenAI's, vLLM's): the flavour, its mock, the
/// Anthropic mock (kept running as long as the node) and the node.
async fn openai_style_nodes() -> Vec<(Flavor, MockUpstream, MockUpstream, TestNode)> {
    let mut nodes = Vec::new();
    for flavor in [Flavor::OpenAi, Flavor::Vllm] {
        let (mock, anthropic, node) = node(flavor).await;
        nodes.push((flavor, mock, anthropic, node));
    }
    nodes
}

/// [`node`] on `clock` (see `TestNode::start_on`).
async fn node_on(flavor: Flavor, clock: WallClock) -> (MockUpstream, MockUpstream, TestNode) {
    let mock = MockUpstream::with_flavor(flavor).await.expect("mock");
    let anthropic = MockUpstream::with_flavor(Flavor::Anthropic)
        .await
        .expect("anthropic mock");
    let toml = format!(
        "{}{}[[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
        provider_toml(
            "mock",
            &mock.base_url(),
            &[
                "mock",
                "flaky=mock@fail_after:2",
                "down=mock@fail:503",
                "tooly=mock@tool:lookup",
            ],
            ""
        ),
        provider_toml_kind(
            "claude",
            "anthropic",
            &anthropic.base_url(),
            &["claude"],
            "api_key_env = \"UPSTREAM_KEY\""
        ),
    );
    let env = vec![("UPSTREAM_KEY".into(), "sk-ant-test".into())];
    let node = TestNode::start_on(&toml, env, clock).await.expect("node");
    (mock, anthropic, node)
}

async fn post(node: &TestNode, path: &str, body: &Value) -> reqwest::Response {
    node.post_json(path, body).await.expect("request sent")
}

/// `POST /v1/completions` of `body`.
async fn complete(node: &TestNode, body: Value) -> reqwest::Response {
    post(node, "/v1/completions", &body).await
}

/// `POST /v1/embeddings` of `body`.
async fn embed(node: &TestNode, body: Value) -> reqwest::Response {
    post(node, "/v1/embeddings", &body).await
}

/// The JSON body of the answer to [`post`].
async fn answer_json(node: &TestNode, path: &str, body: &Value) -> Value {
    post(node, path, body).await.json().await.expect("json")
}

/// Asserts that the node's metrics show calls of `operation` (`gen_ai_operation_name`).
async fn assert_recorded_as(node: &TestNode, operation: &str) {
    let metrics = node.metrics().await;
    assert!(
        metrics.contains(&format!(r#"gen_ai_operation_name="{operation}""#)),
        "{metrics}"
    );
}

fn last_request(m: &MockUpstream) -> Value {
    m.stats
        .last_request
        .lock()
        .unwrap()
        .clone()
        .expect("the mock got a request")
}

#[tokio::test]
async fn text_completions_reach_openai_and_vllm_providers_stream_and_not() {
    for (flavor, m, _a, n) in openai_style_nodes().await {
        let resp = complete(
            &n,
            json!({"model": "mock", "prompt": "Say this", "max_tokens": 3, "echo": true,
                    "logprobs": 2, "suffix": " the end", "temperature": 0.5}),
        )
        .await;
        assert_eq!(resp.status(), 200, "{flavor:?}");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["object"], "text_completion", "{flavor:?}: {v}");
        assert_eq!(v["choices"][0]["text"], "Say thistok0 tok1 tok2 ", "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["logprobs"]["tokens"][2], "tok2 ");
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        let sent = last_request(&m);
        assert_eq!(
            (&sent["suffix"], &sent["echo"], &sent["logprobs"]),
            (&json!(" the end"), &json!(true), &json!(2)),
            "passed to the provider as the client wrote them"
        );
        assert_eq!(sent["stream"], false);

        // Streamed, without asking for usage: the provider is asked (every stream is
        // metered) and the usage chunk is kept from the client.
        let resp = complete(
            &n,
            json!({"model": "mock", "prompt": ["Go on"], "max_tokens": 4, "stream": true}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let (events, done) = sse_chunks(&resp.bytes().await.expect("body"));
        assert!(done, "{flavor:?}: ends with [DONE]");
        assert!(events.iter().all(|c| c["object"] == "text_completion"));
        let text: String = events
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, "tok0 tok1 tok2 tok3 ");
        assert!(
            events
                .iter()
                .all(|c| !c["choices"].as_array().unwrap().is_empty()),
            "{flavor:?}: no usage chunk unless asked: {events:?}"
        );
        assert_eq!(last_request(&m)["stream_options"]["include_usage"], true);

        // Asked for: the last chunk carries it.
        let resp = complete(
            &n,
            json!({"model": "mock", "prompt": [1, 2, 3], "max_tokens": 2, "stream": true,
                    "stream_options": {"include_usage": true}}),
        )
        .await;
        let (events, done) = sse_chunks(&resp.bytes().await.expect("body"));
        assert!(done);
        let usage = &events.last().expect("chunks")["usage"];
        assert_eq!(
            usage["prompt_tokens"], 3,
            "token ids count as tokens: {usage}"
        );
        assert_eq!(usage["completion_tokens"], 2);

        // Recorded as its own operation.
        assert_recorded_as(&n, "text_completion").await;
    }
}

#[tokio::test]
async fn embeddings_are_served_metered_and_cached() {
    for (flavor, m, _a, n) in openai_style_nodes().await {
        let resp = embed(
            &n,
            json!({"model": "mock", "input": ["one two three", "four"]}),
        )
        .await;
        assert_eq!(resp.status(), 200, "{flavor:?}");
        assert_eq!(resp.headers()["x-meridian-cache"], "miss");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(8));
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        let sent = last_request(&m);
        assert!(
            sent.get("stream").is_none() && sent.get("stream_options").is_none(),
            "nothing of chat's added: {sent}"
        );

        // The same input again: an embedding is deterministic, so it comes from the cache.
        let served = m.stats.completed.load(SeqCst);
        let again = embed(
            &n,
            json!({"model": "mock", "input": ["one two three", "four"]}),
        )
        .await;
        assert_eq!(again.headers()["x-meridian-cache"], "hit");
        assert_eq!(again.json::<Value>().await.expect("json"), v);
        assert_eq!(m.stats.completed.load(SeqCst), served, "no provider call");

        // base64 (what the official SDKs ask for), token ids, and fewer dimensions.
        let resp = embed(
            &n,
            json!({"model": "mock", "input": [[5, 6, 7, 8]], "encoding_format": "base64",
                    "dimensions": 3}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.expect("json");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["embedding"].as_str().expect("base64 text"))
            .expect("base64");
        assert_eq!(bytes.len(), 3 * 4, "three little-endian f32s");
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(last_request(&m)["dimensions"], 3);
        assert_recorded_as(&n, "embeddings").await;
    }
}

#[tokio::test]
async fn embeddings_are_admitted_on_their_input_tokens() {
    let clock = meridian_tests::clock_inside_one_minute(Duration::from_secs(15));
    let (m, _a, n) = node_on(Flavor::Vllm, clock).await;
    let key = n
        .tenant_in_tier("rag", "small", limit::tokens_per_minute(40))
        .await
        .expect("tier, tenant and key");
    let embed_words = |words: usize, tag: &str| {
        let text = format!("{tag} {}", "word ".repeat(words));
        reqwest::Client::new()
            .post(n.url("/v1/embeddings"))
            .bearer_auth(&key)
            .json(&json!({"model": "mock", "input": text}))
            .send()
    };
    let first = embed_words(25, "a").await.expect("sent");
    assert_eq!(first.status(), 200, "{:?}", first.text().await);
    // No output is reserved for an embedding: 26 of 40 tokens used, 26 more do not fit.
    let second = embed_words(25, "b").await.expect("sent");
    assert_eq!(second.status(), 429, "{:?}", second.text().await);
    error_saying(second, "tokens").await;
    assert_eq!(
        m.stats.completed.load(SeqCst),
        1,
        "the refused call never left"
    );
    // A small one still fits.
    assert_eq!(embed_words(5, "c").await.expect("sent").status(), 200);
}

#[tokio::test]
async fn the_other_apis_refuse_what_they_cannot_serve_naming_the_field() {
    let (_m, a, n) = node(Flavor::OpenAi).await;
    let cases = [
        (
            "/v1/completions",
            json!({"model": "mock", "prompt": ""}),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model": "mock", "prompt": []}),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model": "mock", "prompt": {"x": 1}}),
            400,
            "prompt",
        ),
        ("/v1/completions", json!({"model": "mock"}), 400, "prompt"),
        (
            "/v1/completions",
            json!({"model": "mock", "prompt": "x", "logprobs": 6}),
            400,
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"model": "mock", "prompt": "x", "n": 3, "best_of": 2}),
            400,
            "best_of",
        ),
        (
            "/v1/completions",
            json!({"model": "mock", "prompt": "x", "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock", "input": ""}),
            400,
            "input",
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock", "input": "x", "encoding_format": "hex"}),
            400,
            "encoding_format",
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock", "input": "x", "dimensions": 0}),
            400,
            "dimensions",
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock", "input": "x", "stream": true}),
            400,
            "stream",
        ),
        (
            "/v1/embeddings",
            json!({"model": "nope", "input": "x"}),
            404,
            "model",
        ),
        (
            "/v1/embeddings",
            json!({"model": "claude", "input": "x"}),
            400,
            "model",
        ),
        (
            "/v1/completions",
            json!({"model": "claude", "prompt": "x"}),
            400,
            "model",
        ),
    ];
    for (path, body, status, param) in cases {
        let resp = post(&n, path, &body).await;
        assert_eq!(resp.status(), status, "{path} {body}");
        let v: Value = resp.json().await.expect("an OpenAI error body");
        assert_eq!(v["error"]["param"], param, "{path} {body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    assert_eq!(
        a.stats.requests.load(SeqCst),
        0,
        "Anthropic is never asked for an API it does not have"
    );
    let v = answer_json(
        &n,
        "/v1/embeddings",
        &json!({"model": "claude", "input": "x"}),
    )
    .await;
    assert_eq!(v["error"]["code"], "unsupported_api", "{v}");
}

#[tokio::test]
async fn the_demo_model_answers_chat_text_completions_and_embeddings() {
    let (_m, _a, n) = node(Flavor::Vllm).await;
    let chat = json!({"model": "demo", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hi"}]});
    let v = answer_json(&n, "/v1/chat/completions", &chat).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    let mut streamed = chat.clone();
    streamed["stream"] = true.into();
    let resp = post(&n, "/v1/chat/completions", &streamed).await;
    let (events, done) = sse_chunks(&resp.bytes().await.expect("body"));
    assert!(
        done && events
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let v = answer_json(
        &n,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "hi there"}),
    )
    .await;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"][0]["finish_reason"], "length",
        "16 words by default: {v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 16);
    let resp = complete(
        &n,
        json!({"model": "demo", "prompt": "hi", "max_tokens": 3, "stream": true,
                "stream_options": {"include_usage": true}}),
    )
    .await;
    let (events, done) = sse_chunks(&resp.bytes().await.expect("body"));
    assert!(done);
    assert_eq!(
        events.last().expect("chunks")["usage"]["completion_tokens"],
        3
    );
    let floats = answer_json(
        &n,
        "/v1/embeddings",
        &json!({"model": "demo", "input": "same"}),
    )
    .await;
    let vector = floats["data"][0]["embedding"].as_array().expect("floats");
    assert_eq!(vector.len(), 16);
    let norm: f64 = vector.iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
    assert!((norm - 1.0).abs() < 1e-3, "unit length: {norm}");
    let encoded = answer_json(
        &n,
        "/v1/embeddings",
        &json!({"model": "demo", "input": "same", "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().expect("text"))
        .expect("base64");
    let decoded: Vec<f64> = bytes
        .chunks(4)
        .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
        .collect();
    let same = decoded
        .iter()
        .zip(vector)
        .all(|(a, b)| (a - b.as_f64().unwrap()).abs() < 1e-6);
    assert!(same, "the same input, the same vector in either encoding");
}

/// The Anthropic SSE events of a body: (name, data).
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|frame| !frame.trim().is_empty())
        .map(|frame| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).expect("event data is JSON");
                }
            }
            (name, data)
        })
        .collect()
}

/// `body` sent to `path` as a stream (`"stream": true` added): the whole SSE text, and its
/// events.
async fn streamed(n: &TestNode, path: &str, body: &Value) -> (String, Vec<(String, Value)>) {
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    sse_answer(n.post_json(path, &streamed)).await
}

/// The whole SSE text of the answer to `request` (sent by awaiting it), and its events.
async fn sse_answer(
    request: impl Future<Output = reqwest::Result<reqwest::Response>>,
) -> (String, Vec<(String, Value)>) {
    let text = request.await.expect("sent").text().await.expect("body");
    let seen = events(&text);
    (text, seen)
}

#[tokio::test]
async fn messages_and_responses_are_served_by_anthropic_and_demo_providers_too() {
    let (_m, a, n) = node(Flavor::Vllm).await;
    for model in ["claude", "demo"] {
        let message = json!({"model": model, "max_tokens": 5,
                             "messages": [{"role": "user", "content": "hello there"}]});
        let resp = n
            .client()
            .post(n.url("/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .json(&message)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200, "{model}");
        assert!(resp.headers().contains_key("request-id"));
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["type"], "message", "{model}: {v}");
        assert_eq!(v["model"], model);
        assert_eq!(v["content"][0]["type"], "text");
        assert!(v["usage"]["output_tokens"].as_u64().unwrap() > 0, "{v}");

        let (body, seen) = streamed(&n, "/v1/messages", &message).await;
        let names: Vec<String> = seen.into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.first().map(String::as_str),
            Some("message_start"),
            "{body}"
        );
        assert_eq!(
            &names[names.len() - 3..],
            ["content_block_stop", "message_delta", "message_stop"],
            "{model}: {body}"
        );
        assert!(names.iter().any(|n| n == "content_block_delta"));

        // The Responses API, whole and streamed.
        let asked = json!({"model": model, "input": "hello there", "max_output_tokens": 5});
        let v = answer_json(&n, "/v1/responses", &asked).await;
        assert_eq!(v["object"], "response", "{model}: {v}");
        assert!(
            v["output"][0]["content"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        );
        let (body, seen) = streamed(&n, "/v1/responses", &asked).await;
        assert_eq!(
            seen.first().map(|(n, _)| n.as_str()),
            Some("response.created"),
            "{body}"
        );
        let (last, data) = seen.last().expect("events");
        assert!(
            last == "response.completed" || last == "response.incomplete",
            "{model}: {body}"
        );
        assert!(
            data["response"]["usage"]["output_tokens"]
                .as_u64()
                .is_some_and(|n| n > 0)
        );
    }
    assert!(
        a.stats.requests.load(SeqCst) >= 2,
        "the Anthropic provider served its share"
    );
}

#[tokio::test]
async fn the_messages_route_answers_in_anthropics_shape_even_when_things_fail() {
    let (_m, _a, n) = node(Flavor::Vllm).await;
    let send = |body: Value, key: Option<&str>| {
        let mut req = reqwest::Client::new()
            .post(n.url("/v1/messages"))
            .json(&body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send()
    };
    let key = n.api_key.clone().expect("auth on");
    let hi = json!([{"role": "user", "content": "hi"}]);
    // x-api-key is Anthropic's credential header; a wrong one is authentication_error.
    let ok = send(
        json!({"model": "mock", "max_tokens": 3, "messages": hi}),
        Some(&key),
    )
    .await
    .expect("sent");
    assert_eq!(ok.status(), 200);
    for (body, key, status, kind) in [
        (
            json!({"model": "mock", "messages": hi}),
            Some(key.as_str()),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "mock", "max_tokens": 3, "messages": hi}),
            Some("mk_wrong_key"),
            401,
            "authentication_error",
        ),
        (
            json!({"model": "mock", "max_tokens": 3, "messages": hi}),
            None,
            401,
            "authentication_error",
        ),
        (
            json!({"model": "nope", "max_tokens": 3, "messages": hi}),
            Some(key.as_str()),
            404,
            "not_found_error",
        ),
        (
            json!({"model": "down", "max_tokens": 3, "messages": hi}),
            Some(key.as_str()),
            503,
            "overloaded_error",
        ),
    ] {
        let resp = send(body.clone(), key).await.expect("sent");
        assert_eq!(resp.status(), status, "{body}");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{body}: {v}");
        assert!(v["request_id"].is_string());
    }
    // Cut short after the first byte: an error event, and no message_stop.
    let failing = json!({"model": "flaky", "max_tokens": 30, "stream": true, "messages": hi});
    let (body, seen) = sse_answer(send(failing, Some(&key))).await;
    let (last, data) = seen.last().expect("events");
    assert_eq!(last, "error", "{body}");
    assert_eq!(data["type"], "error");
    assert!(
        data["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(
        seen.iter().all(|(n, _)| n != "message_stop"),
        "a failed stream never says it stopped: {body}"
    );
    assert!(
        seen.iter().any(|(n, _)| n == "content_block_delta"),
        "{body}"
    );
}

/// Posts the chat request `body`; the answer must say it was a cache `hit` or `miss`.
async fn chat_from_cache(n: &TestNode, body: &Value, cache: &str) -> reqwest::Response {
    let resp = post(n, "/v1/chat/completions", body).await;
    assert_eq!(resp.headers()["x-meridian-cache"], cache, "{body}");
    resp
}

/// The content of a streamed chat answer, which must end with `[DONE]`.
async fn streamed_content(resp: reqwest::Response) -> String {
    let (events, done) = sse_chunks(&resp.bytes().await.expect("body"));
    assert!(done);
    events
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn a_streamed_answer_is_cached_and_replayed_whole_or_streamed() {
    let (m, _a, n) = node(Flavor::OpenAi).await;
    let ask = |model: &str, stream: bool| {
        json!({"model": model, "temperature": 0, "stream": stream,
               "messages": [{"role": "user", "content": "cache me"}]})
    };
    // First as a stream (the usage chunk not asked for): a miss, and stored once it ends.
    let first = chat_from_cache(&n, &ask("mock", true), "miss").await;
    let streamed = streamed_content(first).await;
    let served = m.stats.completed.load(SeqCst);
    // Then whole: the same answer from the cache, with the provider's usage.
    let whole = chat_from_cache(&n, &ask("mock", false), "hit").await;
    let v: Value = whole.json().await.expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], streamed.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    // And streamed again, from the cache.
    let again = chat_from_cache(&n, &ask("mock", true), "hit").await;
    assert_eq!(streamed_content(again).await, streamed);
    assert_eq!(
        m.stats.completed.load(SeqCst),
        served,
        "no provider call for hits"
    );

    // A streamed tool call is kept whole: its id, name and the arguments' pieces joined.
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    let mut call = ask("tooly", true);
    call["tools"] = tools.clone();
    let resp = chat_from_cache(&n, &call, "miss").await;
    let _ = resp.bytes().await.expect("body");
    call["stream"] = false.into();
    let hit = chat_from_cache(&n, &call, "hit").await;
    let v: Value = hit.json().await.expect("json");
    let tool_call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(tool_call["id"], "call_mock0", "{v}");
    assert_eq!(tool_call["function"]["name"], "lookup");
    assert_eq!(tool_call["function"]["arguments"], r#"{"q": "x"}"#);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    // Replayed as a stream, the tool call is there too.
    call["stream"] = true.into();
    let replay = post(&n, "/v1/chat/completions", &call).await;
    let (events, _) = sse_chunks(&replay.bytes().await.expect("body"));
    assert!(
        events
            .iter()
            .any(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "lookup"),
        "{events:?}"
    );

    // A stream that fails is not stored.
    let failing = ask("flaky", true);
    let _ = post(&n, "/v1/chat/completions", &failing)
        .await
        .bytes()
        .await;
    chat_from_cache(&n, &failing, "miss").await;
}

#[tokio::test]
async fn an_anthropic_provider_gets_the_clients_own_messages_and_its_answer_passes_as_it_is() {
    let (_m, a, n) = node(Flavor::Vllm).await;
    // Fields the translation to chat has no place for: thinking, top_k, a cache_control mark,
    // a beta header.
    let message = json!({
        "model": "claude", "max_tokens": 50, "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hello there"}],
    });
    let send = |body: &Value| {
        n.client()
            .post(n.url("/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "interleaved-thinking-2025-05-14")
            .json(body)
            .send()
    };
    let v: Value = send(&message)
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let seen = last_request(&a);
    assert_eq!(seen["thinking"], message["thinking"], "{seen}");
    assert_eq!(seen["top_k"], 5);
    assert_eq!(
        seen["system"], message["system"],
        "cache_control kept: {seen}"
    );
    assert_eq!(seen["(anthropic-beta)"], "interleaved-thinking-2025-05-14");
    // The mock's own message, as it wrote it: its id, its usage fields.
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_mock")),
        "{v}"
    );
    assert_eq!(v["type"], "message");
    assert!(v["usage"]["cache_read_input_tokens"].is_number(), "{v}");

    // Streamed: the provider's events, each named by its type, ending with its message_stop.
    let mut streamed = message.clone();
    streamed["stream"] = true.into();
    let (body, seen_events) = sse_answer(send(&streamed)).await;
    assert_eq!(
        seen_events.first().map(|(n, _)| n.as_str()),
        Some("message_start")
    );
    assert_eq!(
        seen_events.last().map(|(n, _)| n.as_str()),
        Some("message_stop"),
        "{body}"
    );
    assert!(
        seen_events
            .iter()
            .all(|(name, data)| data["type"] == name.as_str())
    );
    assert!(
        seen_events[0].1["message"]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_mock")),
        "{body}"
    );
    assert_eq!(last_request(&a)["stream"], true);
    // Metered like any call: the tenant's usage shows both calls with the mock's token counts.
    let metrics = n.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meridian_tokens_total")
                && l.contains("provider=\"claude\"")
                && l.contains("type=\"output\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
}
