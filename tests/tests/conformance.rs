//! One conformance suite that every provider adapter passes: the same requests through a node
//! in front of an OpenAI-flavoured, a vLLM-flavoured and an Anthropic mock upstream must give
//! the client the same OpenAI-compatible answers: bodies, chunk sequences, usage, statuses,
//! `Retry-After`, and in-stream failures. The mocks validate what the real servers validate
//! (the Anthropic one refuses a request without `max_tokens`, a `system` role in `messages`,
//! a temperature above 1, unknown fields or a missing `x-api-key`), so a mistranslated
//! request fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use meridian_tests::json_api::error_saying;
use meridian_tests::mock::{Flavor, MockUpstream};
use meridian_tests::{TestNode, provider_toml_kind, sse_events};
use serde_json::{Value, json};

/// Everything about an answer that must not depend on the adapter.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    status: u16,
    retry_after: bool,
    /// The whole text (unary) or the concatenated deltas (stream).
    content: String,
    finish_reason: Option<String>,
    /// prompt, completion, total, cached.
    usage: Option<(u64, u64, u64, u64)>,
    /// Stream only: the first delta's role, whether an error event came last, whether the
    /// stream ended with `[DONE]`, and whether a usage-only chunk came before it.
    role_first: bool,
    error_event: bool,
    done: bool,
    /// The error's `message` contains this (the upstream's words survive the mapping).
    error_code: Option<String>,
}

fn usage_of(v: &Value) -> Option<(u64, u64, u64, u64)> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    Some((
        u["prompt_tokens"].as_u64()?,
        u["completion_tokens"].as_u64()?,
        u["total_tokens"].as_u64()?,
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    ))
}

async fn observe(node: &TestNode, body: Value) -> Seen {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let resp = node
        .post_json("/v1/chat/completions", &body)
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    let retry_after = resp.headers().contains_key("retry-after");
    let mut seen = Seen {
        status,
        retry_after,
        ..Seen::default()
    };
    let bytes = resp.bytes().await.expect("the answer ends, never hangs");
    if status != 200 {
        let v: Value = serde_json::from_slice(&bytes).expect("an error body is JSON");
        assert!(v["error"]["message"].is_string(), "{v}");
        seen.error_code = v["error"]["code"].as_str().map(str::to_owned);
        return seen;
    }
    if !stream {
        let v: Value = serde_json::from_slice(&bytes).expect("a completion is JSON");
        assert_eq!(v["object"], "chat.completion", "{v}");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant", "{v}");
        seen.content = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        seen.finish_reason = v["choices"][0]["finish_reason"].as_str().map(str::to_owned);
        seen.usage = usage_of(&v);
        return seen;
    }
    let events = sse_events(&bytes);
    seen.done = events.last().is_some_and(|e| &e.data[..] == b"[DONE]");
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| &e.data[..] != b"[DONE]")
        .map(|e| serde_json::from_slice(&e.data).expect("every event is JSON"))
        .collect();
    seen.role_first = chunks
        .first()
        .is_some_and(|c| c["choices"][0]["delta"]["role"] == "assistant");
    for c in &chunks {
        if c.get("error").is_some() {
            seen.error_event = true;
            assert!(c["error"]["message"].is_string(), "{c}");
            continue;
        }
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            seen.content.push_str(t);
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            seen.finish_reason = Some(f.to_owned());
        }
        if let Some(u) = usage_of(c) {
            assert_eq!(c["choices"], json!([]), "usage comes in its own chunk: {c}");
            seen.usage = Some(u);
        }
    }
    if seen.error_event {
        assert!(
            chunks.last().is_some_and(|c| c.get("error").is_some()),
            "the error event is the last"
        );
    }
    seen
}

fn ok(content: &str, usage: Option<(u64, u64, u64, u64)>, stream: bool) -> Seen {
    Seen {
        status: 200,
        content: content.into(),
        finish_reason: Some("stop".into()),
        usage,
        role_first: stream,
        done: stream,
        ..Seen::default()
    }
}

fn failed(status: u16, retry_after: bool, code: &str) -> Seen {
    Seen {
        status,
        retry_after,
        error_code: Some(code.into()),
        ..Seen::default()
    }
}

fn cut(content: &str) -> Seen {
    Seen {
        status: 200,
        content: content.into(),
        role_first: true,
        error_event: true,
        ..Seen::default()
    }
}

const MODELS: &[&str] = &[
    "mock@tokens:3",
    "mock@fail:400",
    "mock@fail:429",
    "mock@fail:529",
    "mock@fail:500",
    "mock@fail_after:2;itl_ms:10",
    "mock@close_after:2;itl_ms:10",
];

fn user(model: &str, extra: Value) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": "say something"}]});
    for (k, x) in extra.as_object().into_iter().flatten() {
        v[k] = x.clone();
    }
    v
}

/// (what, request, what the client must see). The mocks count a prompt as its words plus one
/// per message: "say something" is 3 tokens.
fn cases() -> Vec<(String, Value, Seen)> {
    let three = "tok0 tok1 tok2 ";
    let usage = Some((3, 3, 6, 0));
    let answered = [
        (
            "unary",
            user("mock@tokens:3", json!({"max_tokens": 16})),
            ok(three, usage, false),
        ),
        (
            "unary without max_tokens",
            user("mock@tokens:3", json!({})),
            ok(three, usage, false),
        ),
        (
            "stream with usage",
            user(
                "mock@tokens:3",
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
            ok(three, usage, true),
        ),
        (
            "stream without usage",
            user("mock@tokens:3", json!({"stream": true})),
            ok(three, None, true),
        ),
        (
            "system prompt, stop sequences, temperature above 1, user id",
            json!({"model": "mock@tokens:3", "temperature": 1.5, "stop": ["\n\n"], "user": "u1",
                   "messages": [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "say something"}]}),
            // The system prompt is counted too: 2 words + 1.
            ok(three, Some((6, 3, 9, 0)), false),
        ),
        (
            "a multi-turn conversation",
            json!({"model": "mock@tokens:3", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello there"},
                                {"role": "user", "content": "say something"}]}),
            ok(three, Some((8, 3, 11, 0)), true),
        ),
    ];
    let mut cases: Vec<(String, Value, Seen)> = answered
        .into_iter()
        .map(|(what, request, seen)| (what.to_owned(), request, seen))
        .collect();
    // The upstream answers with an error status: (its status, more of the request, what the
    // client sees). A 400 is the client's; 429 and 529 are overload, retry later.
    let overloaded = || failed(503, true, "upstream_overloaded");
    for (upstream, extra, seen) in [
        (400, json!({}), failed(400, false, "?")),
        (429, json!({}), overloaded()),
        (529, json!({"stream": true}), overloaded()),
        (500, json!({}), failed(502, false, "upstream_error")),
    ] {
        let request = user(&format!("mock@fail:{upstream}"), extra);
        cases.push((format!("upstream {upstream}"), request, seen));
    }
    // Cut short after two tokens: the stream ends in an error event.
    for (what, directive) in [
        ("an in-stream error", "fail_after"),
        ("a connection cut", "close_after"),
    ] {
        let request = user(
            &format!("mock@{directive}:2;itl_ms:10"),
            json!({"stream": true}),
        );
        cases.push((
            format!("{what} after two tokens"),
            request,
            cut("tok0 tok1 "),
        ));
    }
    cases
}

#[tokio::test]
async fn every_adapter_gives_clients_the_same_answers() {
    let adapters = [
        ("openai", Flavor::OpenAi),
        ("vllm", Flavor::Vllm),
        ("anthropic", Flavor::Anthropic),
    ];
    for (kind, flavor) in adapters {
        let mock = MockUpstream::with_flavor(flavor).await.unwrap();
        let extra = if kind == "anthropic" {
            "api_key_env = \"UPSTREAM_KEY\""
        } else {
            ""
        };
        let toml = provider_toml_kind("p", kind, &mock.base_url(), MODELS, extra);
        let node = TestNode::start_with_env(
            &toml,
            vec![("UPSTREAM_KEY".into(), "sk-upstream-test".into())],
        )
        .await
        .unwrap();
        for (what, request, expected) in cases() {
            let mut expected = expected;
            if expected.error_code.as_deref() == Some("?") {
                // A 400 keeps the upstream's own code, which differs by upstream.
                expected.error_code = observe(&node, request.clone()).await.error_code;
            }
            let seen = observe(&node, request.clone()).await;
            assert_eq!(seen, expected, "{flavor:?}: {what}: {request}");
        }
        println!(
            "{flavor:?} ({kind} adapter): {} cases conform",
            cases().len()
        );
    }
}

#[tokio::test]
async fn anthropic_cache_reads_and_tool_calls_come_back_in_openai_form() {
    let mock = MockUpstream::with_flavor(Flavor::Anthropic).await.unwrap();
    let toml = provider_toml_kind(
        "claude",
        "anthropic",
        &mock.base_url(),
        &["mock@tokens:2;cached:2;tool:lookup"],
        "api_key_env = \"UPSTREAM_KEY\"",
    );
    let node = TestNode::start_with_env(
        &toml,
        vec![("UPSTREAM_KEY".into(), "sk-upstream-test".into())],
    )
    .await
    .unwrap();
    let model = "mock@tokens:2;cached:2;tool:lookup";
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    let v: Value = node
        .post_json(
            "/v1/chat/completions",
            &user(model, json!({"tools": tools})),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"],
        json!({"name": "lookup", "arguments": "{\"q\":\"x\"}"})
    );
    // 3 prompt tokens of which 2 were read from the cache.
    assert_eq!(usage_of(&v), Some((3, 2, 5, 2)), "{v}");

    let body = node
        .post_json(
            "/v1/chat/completions",
            &user(
                model,
                json!({"tools": tools, "stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let chunks: Vec<Value> = sse_events(&body)
        .iter()
        .filter(|e| &e.data[..] != b"[DONE]")
        .map(|e| serde_json::from_slice(&e.data).unwrap())
        .collect();
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"q\":\"x\"}");
    let named = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"].as_str());
    assert_eq!(named, Some("lookup"));
    assert_eq!(
        chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str()),
        Some("tool_calls")
    );
    assert_eq!(usage_of(chunks.last().unwrap()), Some((3, 2, 5, 2)));

    // Without the key, the upstream's 401 is an upstream failure, not the client's: 502.
    let toml = provider_toml_kind("claude", "anthropic", &mock.base_url(), &[model], "");
    let keyless = TestNode::start(&toml).await.unwrap();
    let resp = keyless
        .post_json("/v1/chat/completions", &user(model, json!({})))
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    error_saying(resp, "x-api-key").await;
}
