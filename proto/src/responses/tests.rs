use serde_json::{Value, json};

use super::*;
use crate::chat_stream_fixtures::{event_names, stream_events, text_then_tool_call};

fn read(body: Value) -> Result<(ChatRequest, Echo), ApiError> {
    responses_request(body.to_string().as_bytes(), &RequestLimits::default())
}

#[test]
fn input_items_with_function_calls_become_chat_turns() {
    let (r, echo) = read(json!({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "store": false,
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "lookup"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "find x"},
                                         {"type": "input_image", "image_url": "https://e.com/a.png"}]},
            {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{\"q\":\"x\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "lookup", "arguments": "{\"q\":\"y\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "X"},
            {"type": "function_call_output", "call_id": "call_2", "output": "Y"},
        ],
    }))
    .expect("valid");
    assert_eq!(r.api, Api::Responses);
    assert_eq!(echo.model, "m");
    let b = Value::Object(r.body.clone());
    assert_eq!(b["max_completion_tokens"], 50);
    assert_eq!(b["tools"][0]["function"]["name"], "lookup");
    assert_eq!(b["tool_choice"]["function"]["name"], "lookup");
    assert_eq!(b["response_format"]["json_schema"]["name"], "out");
    let m = b["messages"].as_array().expect("messages");
    assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(
        m[1]["content"][1]["image_url"]["url"],
        "https://e.com/a.png"
    );
    assert_eq!(
        m[2]["tool_calls"].as_array().map(Vec::len),
        Some(2),
        "one turn, two calls"
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "X"})
    );
    assert_eq!(m.len(), 5);
}

#[test]
fn state_and_built_in_tools_are_refused_naming_the_field() {
    let base = || json!({"model": "m", "input": "hi"});
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut b = base();
                b["store"] = true.into();
                b
            },
            "store",
        ),
        (
            {
                let mut b = base();
                b["previous_response_id"] = "resp_1".into();
                b
            },
            "previous_response_id",
        ),
        (
            {
                let mut b = base();
                b["background"] = true.into();
                b
            },
            "background",
        ),
        (
            {
                let mut b = base();
                b["tools"] = json!([{"type": "web_search"}]);
                b
            },
            "tools[0].type",
        ),
        (
            {
                let mut b = base();
                b["input"] = json!([]);
                b
            },
            "input",
        ),
        (
            {
                let mut b = base();
                b["input"] = json!([{"type": "file_search_call"}]);
                b
            },
            "input[0].type",
        ),
        (
            {
                let mut b = base();
                b["max_output_tokens"] = 0.into();
                b
            },
            "max_output_tokens",
        ),
    ];
    for (body, param) in cases {
        let e = read(body.clone()).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
    }
    let (r, _) = read(base()).expect("no store field: nothing is stored, nothing refused");
    assert!(!r.stream());
}

#[test]
fn a_whole_completion_becomes_a_response() {
    let completion = json!({
        "id": "c1", "created": 7, "choices": [{"index": 0, "finish_reason": "length",
            "message": {"role": "assistant", "content": "Hello",
                        "tool_calls": [{"id": "call_1", "type": "function",
                                        "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    });
    let echo = Echo {
        model: "m".into(),
        ..Echo::default()
    };
    let r: Value = serde_json::from_slice(
        &response_from_completion(completion.to_string().as_bytes(), &echo).expect("ok"),
    )
    .expect("json");
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "incomplete");
    assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(r["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(r["output"][1]["type"], "function_call");
    assert_eq!(r["output"][1]["call_id"], "call_1");
    assert_eq!(r["usage"]["total_tokens"], 11);
    assert_eq!(r["store"], false);
}

#[test]
fn chat_chunks_become_semantic_events_numbered_in_order() {
    let mut s = ResponseStream::new(Echo {
        model: "m".into(),
        ..Echo::default()
    });
    let events = stream_events(
        &mut s,
        &text_then_tool_call(&["Hi", " there"], "call_1", &["{}"], (3, 4)),
    );
    assert_eq!(
        event_names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], *name);
        assert_eq!(data["sequence_number"], i, "numbered from 0 in order");
    }
    assert_eq!(events[6].1["text"], "Hi there");
    let done = &events[13].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][1]["arguments"], "{}");
    assert_eq!(done["usage"]["output_tokens"], 4);
}
