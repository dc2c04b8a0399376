use serde_json::{Value, json};

use super::*;
use crate::chat_stream_fixtures::{event_names, stream_events, text_then_tool_call};

fn read(body: Value) -> Result<ChatRequest, ApiError> {
    messages_request(
        body.to_string().as_bytes(),
        &RequestLimits::default(),
        false,
    )
}

#[test]
fn a_tool_use_loop_becomes_the_chat_turns_openai_expects() {
    let r = read(json!({
        "model": "m", "max_tokens": 100, "system": [{"type": "text", "text": "Be brief."}],
        "stop_sequences": ["END"], "metadata": {"user_id": "u1"}, "temperature": 0.2,
        "tools": [{"name": "weather", "description": "Weather now",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "need the tool", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And tomorrow?"}]},
        ],
    }))
    .expect("valid");
    assert_eq!(r.api, Api::Messages);
    let b = Value::Object(r.body.clone());
    assert_eq!(b["max_tokens"], 100);
    assert_eq!(b["stop"], json!(["END"]));
    assert_eq!(b["user"], "u1");
    assert_eq!(b["tool_choice"], "required");
    assert_eq!(b["parallel_tool_calls"], false);
    assert_eq!(b["tools"][0]["function"]["name"], "weather");
    assert_eq!(
        b["tools"][0]["function"]["parameters"]["properties"]["city"]["type"],
        "string"
    );
    let m = &b["messages"];
    assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(m[1]["role"], "user");
    assert_eq!(m[2]["content"], "Checking.", "thinking is left out");
    assert_eq!(
        m[2]["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Paris"}"#
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}),
        "the tool result comes first, right after the call"
    );
    assert_eq!(m[4]["content"][0]["text"], "And tomorrow?");
    assert_eq!(m.as_array().map(Vec::len), Some(5));
}

#[test]
fn bad_messages_requests_name_the_anthropic_field() {
    let base =
        || json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut b = base();
                b.as_object_mut().unwrap().remove("max_tokens");
                b
            },
            "max_tokens",
        ),
        (
            {
                let mut b = base();
                b["messages"] = json!([]);
                b
            },
            "messages",
        ),
        (
            {
                let mut b = base();
                b["messages"][0]["role"] = "system".into();
                b
            },
            "messages[0].role",
        ),
        (
            {
                let mut b = base();
                b["messages"][0]["content"] = json!([{"type": "document"}]);
                b
            },
            "messages[0].content[0].type",
        ),
        (
            {
                let mut b = base();
                b["stop_sequences"] = json!(["a", "b", "c", "d", "e"]);
                b
            },
            "stop_sequences",
        ),
        (
            {
                let mut b = base();
                b["temperature"] = json!(1.5);
                b
            },
            "temperature",
        ),
        (
            {
                let mut b = base();
                b["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
                b
            },
            "tools[0].type",
        ),
        (
            {
                let mut b = base();
                b["tool_choice"] = json!({"type": "tool"});
                b
            },
            "tool_choice.name",
        ),
    ];
    for (body, param) in cases {
        let e = read(body.clone()).expect_err("refused");
        assert_eq!(e.kind, ErrorKind::InvalidRequest, "{body}");
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
    }
    // count_tokens needs no max_tokens.
    let mut count = base();
    count.as_object_mut().unwrap().remove("max_tokens");
    assert!(
        messages_request(
            count.to_string().as_bytes(),
            &RequestLimits::default(),
            true
        )
        .is_ok()
    );
}

#[test]
fn a_whole_completion_becomes_a_message() {
    let completion = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "upstream-name",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Let me look.", "reasoning_content": "hmm",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37,
                  "prompt_tokens_details": {"cached_tokens": 10}},
    });
    let m: Value = serde_json::from_slice(
        &message_from_completion(completion.to_string().as_bytes(), "claude-x").expect("ok"),
    )
    .expect("json");
    assert_eq!(m["id"], "msg_chatcmpl-1");
    assert_eq!(
        (m["type"].as_str(), m["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert_eq!(m["model"], "claude-x", "the model the client asked for");
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["content"][0]["type"], "thinking");
    assert_eq!(
        m["content"][1],
        json!({"type": "text", "text": "Let me look."})
    );
    assert_eq!(m["content"][2]["input"], json!({"city": "Oslo"}));
    assert_eq!(
        m["usage"]["input_tokens"], 20,
        "cached tokens are not input tokens"
    );
    assert_eq!(m["usage"]["cache_read_input_tokens"], 10);
    assert_eq!(m["usage"]["output_tokens"], 7);
}

#[test]
fn chat_chunks_become_anthropic_events_in_order() {
    let mut s = MessageStream::new("claude-x");
    let events = stream_events(
        &mut s,
        &text_then_tool_call(&["Hel", "lo"], "call_9", &["{\"a\":", "1}"], (5, 4)),
    );
    assert_eq!(
        event_names(&events),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for (name, data) in &events {
        assert_eq!(data["type"], *name, "each event's data names it");
    }
    assert_eq!(events[0].1["message"]["id"], "msg_c1");
    assert_eq!(
        events[2].1["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(events[5].1["index"], 1);
    assert_eq!(events[5].1["content_block"]["id"], "call_9");
    assert_eq!(events[7].1["delta"]["partial_json"], "1}");
    assert_eq!(events[9].1["delta"]["stop_reason"], "tool_use");
    assert_eq!(events[9].1["usage"]["output_tokens"], 4);
}

#[test]
fn errors_have_anthropics_shape() {
    let e = ApiError::new(ErrorKind::RateLimited, "slow down");
    assert_eq!(
        error_body(&e, Some("req_1")),
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"},
               "request_id": "req_1"})
    );
}

#[test]
fn an_anthropic_provider_gets_the_clients_own_bytes_when_they_already_fit() {
    let sent = br#"{"stream":true,  "model":"claude-x","max_tokens":9,"messages":[{"role":"user","content":"hi"}],"thinking":{"type":"enabled","budget_tokens":1024}}"#;
    let r = messages_request(sent, &RequestLimits::default(), false).expect("valid");
    let native = r.native.as_ref().expect("kept");
    assert_eq!(
        native.body_for("claude-x", true),
        sent.to_vec(),
        "byte for byte"
    );
    // Another name upstream, or not streamed: the same JSON with those two set.
    let renamed: Value =
        serde_json::from_slice(&native.body_for("claude-x-20250101", false)).expect("json");
    assert_eq!(renamed["model"], "claude-x-20250101");
    assert!(renamed.get("stream").is_none());
    assert_eq!(renamed["thinking"]["budget_tokens"], 1024);
}

#[test]
fn images_become_image_parts() {
    let r = read(
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
        {"type": "image", "source": {"type": "url", "url": "https://e.com/cat.jpg"}},
        {"type": "text", "text": "What are these?"}]}]}),
    )
    .expect("valid");
    let parts = &Value::Object(r.body.clone())["messages"][0]["content"];
    assert_eq!(parts[0]["image_url"]["url"], "data:image/png;base64,iVBOR");
    assert_eq!(parts[1]["image_url"]["url"], "https://e.com/cat.jpg");
    assert_eq!(parts[2]["text"], "What are these?");
    let bad = read(
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}),
    );
    assert_eq!(
        bad.expect_err("refused").param.as_deref(),
        Some("messages[0].content[0].source.type")
    );
}
