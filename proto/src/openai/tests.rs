use super::*;

/// Parses `body` and expects either success or a 400 naming `param`.
fn check(body: &str, expected_param: Option<&str>) {
    let got = ChatRequest::from_json(body.as_bytes(), &RequestLimits::default());
    match (got, expected_param) {
        (Ok(_), None) => {}
        (Err(e), Some(param)) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest, "{body}: {e:?}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(
                e.message.contains(param),
                "{body}: message must name the field: {e:?}"
            );
        }
        (got, want) => panic!("{body}: got {got:?}, expected error on {want:?}"),
    }
}

#[test]
fn request_validation_names_the_field() {
    let ok = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    check(ok, None);
    check(
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true,"stream_options":{"include_usage":true},"temperature":0,"top_p":1,"n":1,"stop":["a","b"],"seed":1,"user":"u","tools":[],"top_k":4}"#,
        None,
    );
    // A field no OpenAI-compatible provider takes is refused, named (OpenAI refuses it too).
    check(
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"unknown_field":{"x":1}}"#,
        Some("unknown_field"),
    );
    check(
        r#"{"model":"m","messages":[],"max_tokens":null}"#,
        Some("messages"),
    );
    check(r#"{"model":"m"}"#, Some("messages"));
    check(
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
        Some("model"),
    );
    check(
        r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#,
        Some("model"),
    );
    check(
        r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
        Some("messages[0].role"),
    );
    check(
        r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"user"}]}"#,
        Some("messages[1].content"),
    );
    check(
        r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
        Some("messages[0].content"),
    );
    check(
        r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#,
        Some("messages[0].tool_call_id"),
    );
    let msg = r#""messages":[{"role":"user","content":"x"}]"#;
    for (extra, param) in [
        (r#""temperature":"hot""#, "temperature"),
        (r#""temperature":2.5"#, "temperature"),
        (r#""top_p":-0.1"#, "top_p"),
        (r#""max_tokens":0"#, "max_tokens"),
        (r#""max_tokens":-5"#, "max_tokens"),
        (
            r#""max_completion_tokens":999999999"#,
            "max_completion_tokens",
        ),
        (r#""n":0"#, "n"),
        (r#""n":100"#, "n"),
        (r#""stop":["a","b","c","d","e"]"#, "stop"),
        (r#""stop":[""]"#, "stop"),
        (r#""stop":7"#, "stop"),
        (r#""stream":"yes""#, "stream"),
        (
            r#""stream_options":{"include_usage":true}"#,
            "stream_options",
        ),
    ] {
        check(&format!(r#"{{"model":"m",{msg},{extra}}}"#), Some(param));
    }
}

#[test]
fn non_json_and_non_objects_are_rejected() {
    for body in ["", "{", "[1,2]", "\"x\"", "null"] {
        let e = ChatRequest::from_json(body.as_bytes(), &RequestLimits::default()).expect_err(body);
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert_eq!(e.code.as_deref(), Some("invalid_json"), "{body}");
    }
}

#[test]
fn upstream_body_keeps_unknown_fields_and_forces_usage() {
    let req = ChatRequest::from_json(
        br#"{"model":"alias","messages":[{"role":"user","content":"x"}],"stream":true,"top_k":5,"stream_options":{"include_usage":false}}"#,
        &RequestLimits::default(),
    )
    .expect("valid");
    assert!(!req.include_usage());
    let body: Value = serde_json::from_slice(&req.upstream_body("real-model", true)).expect("json");
    assert_eq!(body["model"], "real-model");
    assert_eq!(body["top_k"], 5);
    assert_eq!(body["stream_options"]["include_usage"], true);
    let body: Value =
        serde_json::from_slice(&req.upstream_body("real-model", false)).expect("json");
    assert_eq!(body["stream"], false);
    assert!(body.get("stream_options").is_none());
}

#[test]
fn usage_and_chunks_parse_leniently() {
    let u: Usage = serde_json::from_str(
        r#"{"prompt_tokens":9,"completion_tokens":null,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":4},"extra":1}"#,
    )
    .expect("usage");
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens()),
        (9, 0, 4)
    );

    let vllm_mid: ChunkProbe =
        serde_json::from_str(r#"{"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}"#)
            .expect("chunk");
    assert!(!vllm_mid.is_usage_only() && vllm_mid.usage.is_none());
    let openai_mid: ChunkProbe =
        serde_json::from_str(r#"{"choices":[{"delta":{}}],"usage":null}"#).expect("chunk");
    assert!(!openai_mid.is_usage_only());
    let last: ChunkProbe = serde_json::from_str(
        r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
    )
    .expect("chunk");
    assert!(last.is_usage_only());
    let err: ChunkProbe =
        serde_json::from_str(r#"{"error":{"message":"boom","code":500}}"#).expect("chunk");
    assert!(err.error.is_some());

    // What a stream cut short is charged for: chunks with output, not the role or finish ones.
    for (chunk, generates) in [
        (
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            false,
        ),
        (
            r#"{"choices":[{"delta":{"role":"assistant","content":"","refusal":null}}]}"#,
            false,
        ),
        (
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            false,
        ),
        (
            r#"{"choices":[{"delta":{"content":null,"tool_calls":[]}}]}"#,
            false,
        ),
        (
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
            false,
        ),
        (r#"{"choices":[{"delta":{"content":"a\nb \"c\""}}]}"#, true),
        (
            r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#,
            true,
        ),
        (
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
            true,
        ),
        (
            r#"{"choices":[{"text":"word","finish_reason":null}]}"#,
            true,
        ),
        (
            r#"{"choices":[{"text":"","finish_reason":"length"}]}"#,
            false,
        ),
        (r#"{"choices":[null]}"#, false),
        (
            r#"{"choices":[{"delta":{"function_call":{"arguments":"{"}}}]}"#,
            true,
        ),
    ] {
        let probe: ChunkProbe = serde_json::from_str(chunk).expect("chunk");
        assert_eq!(probe.generates(), generates, "{chunk}");
    }
}

#[test]
fn upstream_errors_in_every_shape() {
    let cases: [(&str, &str, Option<&str>, Option<&str>); 4] = [
        (
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            "bad",
            Some("invalid_request_error"),
            Some("model_not_found"),
        ),
        (
            r#"{"error":{"message":"bad","type":"BadRequestError","param":null,"code":400}}"#,
            "bad",
            Some("BadRequestError"),
            Some("400"),
        ),
        (
            r#"{"object":"error","message":"old","type":"NotFoundError","param":null,"code":404}"#,
            "old",
            Some("NotFoundError"),
            Some("404"),
        ),
        (r#"{"error":"Unauthorized"}"#, "Unauthorized", None, None),
    ];
    for (body, message, ty, code) in cases {
        let e = UpstreamErrorInfo::parse(body.as_bytes()).expect(body);
        assert_eq!(
            (e.message.as_str(), e.r#type.as_deref(), e.code.as_deref()),
            (message, ty, code),
            "{body}"
        );
    }
    assert!(UpstreamErrorInfo::parse(b"<html>").is_none());
}

#[test]
fn fields_passed_through_must_have_their_documented_shape() {
    let with = |extra: &str| {
        format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
    };
    let good_tools = r#","tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],"tool_choice":{"type":"function","function":{"name":"get_weather"}},"response_format":{"type":"json_schema","json_schema":{"name":"w","schema":{}}}"#;
    check(&with(good_tools), None);
    check(
        &with(r#","tool_choice":"auto","response_format":{"type":"json_object"}"#),
        None,
    );
    for (extra, param) in [
        (r#","tools":{"type":"function"}"#, "tools"),
        (r#","tools":["get_weather"]"#, "tools[0]"),
        (
            r#","tools":[{"type":"function","function":{"name":"bad name!"}}]"#,
            "tools[0].function.name",
        ),
        (
            r#","tools":[{"type":"function","function":{"name":"f","parameters":"any"}}]"#,
            "tools[0].function.parameters",
        ),
        (r#","tool_choice":"sometimes""#, "tool_choice"),
        (r#","response_format":{"type":"xml"}"#, "response_format"),
        (
            r#","response_format":{"type":"json_schema"}"#,
            "response_format",
        ),
    ] {
        check(&with(extra), Some(param));
    }
    check(
        r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":{"city":"x"}}}]}]}"#,
        Some("messages[0].tool_calls"),
    );
    check(
        r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"ok"}]}"#,
        None,
    );
}

#[test]
fn the_restricted_fields_are_sorted_for_their_binary_search() {
    assert!(RESTRICTED_FIELDS.is_sorted());
}
