use meridian_proto::openai::{ChatRequest, RequestLimits};
use serde_json::{Value, json};

use super::*;

fn request(body: Value) -> ChatRequest {
    ChatRequest::from_json(body.to_string().as_bytes(), &RequestLimits::default()).unwrap()
}

fn translated(body: Value, stream: bool) -> Value {
    let bytes = request_body(&request(body), "claude-haiku-4-5", stream, 1024).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn system_messages_roles_stops_and_limits_map_to_the_messages_api() {
    let out = translated(
        json!({
            "model": "c", "max_tokens": 50, "temperature": 1.7, "top_p": 0.9,
            "stop": ["END", "STOP"], "user": "u-7",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]},
                {"role": "assistant", "content": "Bonjour"},
                {"role": "user", "content": "Why?"}
            ]
        }),
        true,
    );
    assert_eq!(
        out,
        json!({
            "model": "claude-haiku-4-5",
            "max_tokens": 50,
            "system": "Be brief.\n\nAnswer in French.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "again"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
                {"role": "user", "content": [{"type": "text", "text": "Why?"}]}
            ],
            "stop_sequences": ["END", "STOP"],
            "temperature": 1.0,
            "top_p": 0.9,
            "metadata": {"user_id": "u-7"},
            "stream": true
        })
    );
}

#[test]
fn max_tokens_is_always_sent() {
    let out = translated(
        json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
        false,
    );
    assert_eq!(out["max_tokens"], 1024, "the provider's default");
    assert!(out.get("stream").is_none());
    let out = translated(
        json!({"model": "c", "max_completion_tokens": 7, "max_tokens": 9,
               "messages": [{"role": "user", "content": "hi"}]}),
        false,
    );
    assert_eq!(out["max_tokens"], 7, "max_completion_tokens wins");
}

#[test]
fn tools_tool_calls_and_tool_results_are_translated() {
    let out = translated(
        json!({
            "model": "c",
            "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required",
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}
            ]
        }),
        false,
    );
    assert_eq!(
        out["tools"],
        json!([{"name": "weather", "description": "Weather now",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    );
    assert_eq!(out["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        out["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}}
        ]})
    );
    assert_eq!(
        out["messages"][2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "-3 C"}
        ]})
    );
    let named = translated(
        json!({"model": "c", "tool_choice": {"type": "function", "function": {"name": "weather"}},
               "messages": [{"role": "user", "content": "x"}]}),
        false,
    );
    assert_eq!(
        named["tool_choice"],
        json!({"type": "tool", "name": "weather"})
    );
}

#[test]
fn images_become_image_blocks() {
    let out = translated(
        json!({"model": "c", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
        ]}]}),
        false,
    );
    assert_eq!(
        out["messages"][0]["content"],
        json!([
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
        ])
    );
}

#[test]
fn what_anthropic_cannot_do_is_refused_naming_the_field() {
    let cases = [
        (
            json!({"model": "c", "n": 2, "messages": [{"role": "user", "content": "x"}]}),
            "n",
        ),
        (
            json!({"model": "c", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "ftp://example.com/cat.jpg"}}]}]}),
            "messages[0].content[0].image_url",
        ),
        (
            json!({"model": "c", "messages": [{"role": "assistant", "content": null, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            json!({"model": "c", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
            "messages[0].content[0].type",
        ),
        (
            // A shape the edge accepts (an object with a type) that Anthropic has no match for.
            json!({"model": "c", "tool_choice": {"type": "allowed_tools"}, "messages": [{"role": "user", "content": "x"}]}),
            "tool_choice",
        ),
    ];
    for (body, param) in cases {
        match request_body(&request(body.clone()), "m", false, 16) {
            Err(UpstreamError::Rejected(e)) => {
                assert_eq!(e.param.as_deref(), Some(param), "{body}");
                assert_eq!(e.kind, ErrorKind::InvalidRequest);
            }
            other => panic!("{body}: expected a refusal naming {param}, got {other:?}"),
        }
    }
}

#[test]
fn a_whole_message_becomes_a_chat_completion_with_cache_aware_usage() {
    let body = json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"},
                    {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 21, "output_tokens": 40, "cache_creation_input_tokens": 4,
                  "cache_read_input_tokens": 100, "service_tier": "standard"}
    });
    let c = completion(body.to_string().as_bytes()).unwrap();
    let usage = c.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.cached_tokens()
        ),
        (125, 40, 165, 100)
    );
    let v: Value = serde_json::from_slice(&c.body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "msg_01");
    assert_eq!(v["choices"][0]["message"]["content"], "Hi there");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0],
        json!({"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}})
    );
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ] {
        assert_eq!(finish_reason(stop), finish, "{stop}");
    }
}

fn run(events: &[Value]) -> (Vec<Value>, Result<bool, UpstreamError>) {
    let mut state = StreamState::default();
    let mut out = Vec::new();
    for e in events {
        match state.on_event(e.to_string().as_bytes()) {
            Ok(Step::Chunks(c)) => out.extend(c),
            Ok(Step::Done(c)) => {
                out.extend(c);
                return (chunks_json(&out), Ok(true));
            }
            Err(e) => return (chunks_json(&out), Err(e)),
        }
    }
    (chunks_json(&out), Ok(false))
}

fn chunks_json(chunks: &[Chunk]) -> Vec<Value> {
    chunks
        .iter()
        .map(|c| serde_json::from_slice(&c.json).unwrap())
        .collect()
}

#[test]
fn the_event_sequence_becomes_openai_chunks_ending_with_usage() {
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant",
               "model": "claude-haiku-4-5", "content": [], "stop_reason": null, "stop_sequence": null,
               "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {}}}),
        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "some_future_event", "x": 1}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 12}}),
        json!({"type": "message_stop"}),
    ];
    let (chunks, done) = run(&events);
    assert!(done.unwrap(), "message_stop ends the stream");
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    assert_eq!(deltas[0], &json!({"role": "assistant", "content": ""}));
    assert_eq!(deltas[1], &json!({"content": "Hello"}));
    assert_eq!(deltas[2], &json!({"content": " world"}));
    assert_eq!(
        deltas[3],
        &json!({"tool_calls": [{"index": 0, "id": "toolu_9", "type": "function", "function": {"name": "f", "arguments": ""}}]})
    );
    assert_eq!(
        deltas[4],
        &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]})
    );
    assert_eq!(
        deltas[5],
        &json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})
    );
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "tool_calls");
    let usage = &chunks[7];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42,
               "prompt_tokens_details": {"cached_tokens": 5}})
    );
    assert_eq!(chunks.len(), 8);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], "msg_01");
        assert_eq!(c["model"], "claude-haiku-4-5");
    }
}

#[test]
fn an_error_event_fails_the_stream_with_its_message() {
    let (chunks, end) = run(&[
        json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ]);
    assert_eq!(chunks.len(), 2);
    match end {
        Err(UpstreamError::InStream(info)) => {
            assert_eq!(info.message, "Overloaded");
            assert_eq!(info.r#type.as_deref(), Some("overloaded_error"));
        }
        other => panic!("expected an in-stream error, got {other:?}"),
    }
}
