//! Real clients: the official `openai` and `anthropic` Python SDKs against a running node.
//!
//! The interpreter comes from `MERIDIAN_TEST_PYTHON` (what `.ci/run` sets up), else a virtualenv
//! this test creates once under `target/py-venv` with `pip install openai anthropic`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::{Path, PathBuf};

use meridian_tests::installs::python_venv;
use meridian_tests::mock::{Flavor, MockUpstream};
use meridian_tests::{TestNode, provider_toml, python_json};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn python_with_openai() -> PathBuf {
    if let Ok(p) = std::env::var("MERIDIAN_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    python_venv("py-venv", "openai, anthropic", &["openai", "anthropic"]).unwrap_or_else(|e| {
        panic!("the SDKs: {e:#}; or set MERIDIAN_TEST_PYTHON to a python that has them")
    })
}

/// What the mocks answer a request for model `mock`: eight tokens.
const EXPECTED: &str = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 ";

/// What `script` (in `tests/python`) printed, its JSON, run with the SDKs against a node in
/// front of an OpenAI-flavoured mock, then against one in front of a vLLM-flavoured mock; each
/// mock serves model `mock`, and `tool_model` (`tooly=…`, the one whose answers call a tool).
/// The script is given the node's URL (`…/v1`), `mock`, `tooly` and the node's API key.
async fn sdk_checks(script: &str, tool_model: &str) -> Vec<(Flavor, serde_json::Value)> {
    // Made on first use, waiting out another test's install: off the runtime's threads.
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .expect("the SDKs");
    let script = workspace().join("tests/python").join(script);
    let script = script.to_str().expect("a UTF-8 path");
    let mut seen = Vec::new();
    for flavor in [Flavor::OpenAi, Flavor::Vllm] {
        let mock = MockUpstream::with_flavor(flavor).await.expect("mock");
        let models = ["mock", tool_model];
        let node = TestNode::start(&provider_toml("mock", &mock.base_url(), &models, ""))
            .await
            .expect("node");
        let base_url = node.url("/v1");
        let key = node.api_key.as_deref().expect("auth is on by default");
        let v = python_json(&python, &[script, &base_url, "mock", "tooly", key])
            .await
            .unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
        seen.push((flavor, v));
    }
    seen
}

#[tokio::test]
async fn the_official_openai_sdk_parses_our_answers() {
    for (flavor, v) in sdk_checks("sdk_check.py", "tooly=mock@tool:lookup").await {
        assert_eq!(v["unary_content"], EXPECTED, "{flavor:?}: {v}");
        assert_eq!(v["unary_finish"], "stop");
        assert_eq!(v["unary_usage"]["completion_tokens"], 8);
        assert_eq!(v["stream_content"], EXPECTED, "{flavor:?}: {v}");
        assert_eq!(v["stream_finish"], "stop");
        assert_eq!(v["stream_usage"]["completion_tokens"], 8, "{flavor:?}: {v}");
        assert_eq!(
            v["stream_usage"]["total_tokens"],
            v["stream_usage"]["prompt_tokens"].as_u64().unwrap() + 8
        );
        // Text completions: `echo` gives the prompt back first; five tokens asked for.
        assert_eq!(
            v["text"], "Once upon a timetok0 tok1 tok2 tok3 tok4 ",
            "{v}"
        );
        assert_eq!(
            v["text_logprobs"]["tokens"].as_array().map(Vec::len),
            Some(5)
        );
        assert_eq!(v["text_usage"]["completion_tokens"], 5, "{flavor:?}: {v}");
        assert_eq!(v["text_stream"], "tok0 tok1 tok2 tok3 ", "{flavor:?}: {v}");
        assert_eq!(v["text_stream_usage"]["completion_tokens"], 4, "{v}");
        // Embeddings: base64 decoded by the SDK into the mock's 8 floats; floats cut to 4.
        let vectors = v["embeddings"].as_array().expect("embeddings");
        assert_eq!(vectors.len(), 2);
        assert!(
            vectors
                .iter()
                .all(|e| e.as_array().map(Vec::len) == Some(8)),
            "{v}"
        );
        assert_eq!(v["embeddings_usage"]["prompt_tokens"], 4, "{v}");
        assert_eq!(
            v["embeddings_floats"][0].as_array().map(Vec::len),
            Some(4),
            "{v}"
        );
        // The Responses API, whole and streamed, through the SDK's own types.
        assert_eq!(v["responses_text"], EXPECTED, "{flavor:?}: {v}");
        assert_eq!(v["responses_status"], "completed");
        assert_eq!(v["responses_usage"]["output_tokens"], 8);
        assert_eq!(v["responses_stream_text"], EXPECTED, "{v}");
        assert_eq!(v["responses_stream_usage"]["output_tokens"], 8, "{v}");
        assert_eq!(v["responses_helper_text"], EXPECTED, "{v}");
        let events = v["responses_events"].as_array().expect("events");
        assert_eq!(events.first(), Some(&"response.created".into()), "{v}");
        assert_eq!(events.last(), Some(&"response.completed".into()), "{v}");
        assert_eq!(v["responses_calls"][0]["name"], "lookup", "{v}");
        assert_eq!(v["responses_calls"][0]["call_id"], "call_mock0");
        assert_eq!(v["responses_answered"], EXPECTED, "{v}");
        assert_eq!(v["responses_refused_param"], "store", "{v}");
    }
}

/// The official `anthropic` SDK against `/v1/messages`, served by OpenAI-style providers
/// through translation: a plain and a streamed message, a tool-use loop of three turns (two
/// calls, then text), a streamed tool call, token counting, and errors in Anthropic's shape.
#[tokio::test]
async fn the_official_anthropic_sdk_speaks_messages_to_openai_style_providers() {
    for (flavor, v) in sdk_checks("anthropic_check.py", "tooly=mock@tool:lookup,rounds:2").await {
        assert_eq!(v["plain"]["text"], EXPECTED, "{flavor:?}: {v}");
        assert_eq!(v["plain"]["model"], "mock");
        assert!(v["plain"]["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(v["plain"]["stop_reason"], "end_turn");
        assert_eq!(v["plain"]["usage"]["output_tokens"], 8);
        assert!(v["plain"]["usage"]["input_tokens"].as_u64().unwrap() > 0);
        assert_eq!(v["stream"]["text"], EXPECTED, "{flavor:?}: {v}");
        assert_eq!(v["stream"]["final_text"], EXPECTED);
        assert_eq!(v["stream"]["stop_reason"], "end_turn");
        assert_eq!(v["stream"]["usage"]["output_tokens"], 8, "{v}");
        // Two tool calls, each answered, then a text answer: three turns.
        assert_eq!(v["loop"]["turns"], 3, "{flavor:?}: {v}");
        let calls = v["loop"]["calls"].as_array().expect("calls");
        assert_eq!(calls.len(), 2);
        assert!(
            calls
                .iter()
                .all(|c| c["name"] == "lookup" && c["input"]["q"] == "x"),
            "{v}"
        );
        assert_ne!(calls[0]["id"], calls[1]["id"]);
        assert_eq!(v["loop"]["last_stop_reason"], "end_turn");
        assert_eq!(v["loop"]["last_text"], EXPECTED);
        assert_eq!(v["stream_tool"]["stop_reason"], "tool_use", "{v}");
        let block = &v["stream_tool"]["content"][0];
        assert_eq!(
            (&block["type"], &block["name"]),
            (&"tool_use".into(), &"lookup".into())
        );
        assert_eq!(
            block["input"]["q"], "x",
            "input_json_delta pieces assembled: {v}"
        );
        assert!(v["count_tokens"].as_u64().unwrap() > 3, "{v}");
        assert_eq!(v["error"]["status"], 404, "{v}");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["auth_error"]["status"], 401, "{v}");
        assert_eq!(v["auth_error"]["type"], "authentication_error");
    }
}
