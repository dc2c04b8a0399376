//! The request fields an OpenAI-compatible provider is sent, by API: an allowlist. A client's
//! body reaches such a provider as it was written (so that parameters this gateway does not
//! model still work), but only fields on these lists: OpenAI's own, and the sampling and
//! prompt options vLLM's OpenAI-compatible server adds. Anything else is refused at the edge
//! with 400 `unknown_parameter` naming it, as OpenAI refuses it — never passed to an engine
//! that might act on it, and never dropped without a word. The engine-specific fields that
//! change scheduling, templates or cost are on the lists too, but pass only for tenants granted
//! them ([`super::RESTRICTED_FIELDS`]). Anthropic providers are sent a body built from the
//! typed request, so only what the translation knows reaches them.
//!
//! Each list is sorted (a test checks), so a request's few keys are looked up by binary search.

use serde_json::{Map, Value};

use super::Api;
use crate::error::ApiError;

/// OpenAI's chat completions parameters, and vLLM's additions to them.
const CHAT: &[&str] = &[
    "add_generation_prompt",
    "add_special_tokens",
    "allowed_token_ids",
    "audio",
    "bad_words",
    "best_of",
    "cache_salt",
    "chat_template",
    "chat_template_kwargs",
    "continue_final_message",
    "documents",
    "echo",
    "frequency_penalty",
    "function_call",
    "functions",
    "guided_choice",
    "guided_decoding_backend",
    "guided_grammar",
    "guided_json",
    "guided_regex",
    "guided_whitespace_pattern",
    "ignore_eos",
    "include_stop_str_in_output",
    "length_penalty",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "messages",
    "metadata",
    "min_p",
    "min_tokens",
    "mm_processor_kwargs",
    "modalities",
    "model",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "priority",
    "prompt_cache_key",
    "prompt_logprobs",
    "reasoning_effort",
    "repetition_penalty",
    "request_id",
    "response_format",
    "return_tokens_as_token_ids",
    "safety_identifier",
    "seed",
    "service_tier",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "stop",
    "stop_token_ids",
    "store",
    "stream",
    "stream_options",
    "structured_outputs",
    "temperature",
    "tool_choice",
    "tools",
    "top_k",
    "top_logprobs",
    "top_p",
    "truncate_prompt_tokens",
    "use_beam_search",
    "user",
    "verbosity",
    "vllm_xargs",
    "web_search_options",
];

/// OpenAI's (legacy) text completions parameters, and vLLM's additions to them.
const COMPLETIONS: &[&str] = &[
    "add_special_tokens",
    "allowed_token_ids",
    "bad_words",
    "best_of",
    "cache_salt",
    "echo",
    "frequency_penalty",
    "guided_choice",
    "guided_decoding_backend",
    "guided_grammar",
    "guided_json",
    "guided_regex",
    "guided_whitespace_pattern",
    "ignore_eos",
    "include_stop_str_in_output",
    "length_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "min_p",
    "min_tokens",
    "model",
    "n",
    "presence_penalty",
    "priority",
    "prompt",
    "prompt_logprobs",
    "repetition_penalty",
    "request_id",
    "response_format",
    "return_tokens_as_token_ids",
    "seed",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "stop",
    "stop_token_ids",
    "stream",
    "stream_options",
    "structured_outputs",
    "suffix",
    "temperature",
    "top_k",
    "top_p",
    "truncate_prompt_tokens",
    "use_beam_search",
    "user",
    "vllm_xargs",
];

/// OpenAI's embeddings parameters, and vLLM's additions to them.
const EMBEDDINGS: &[&str] = &[
    "add_special_tokens",
    "dimensions",
    "encoding_format",
    "input",
    "model",
    "priority",
    "request_id",
    "truncate_prompt_tokens",
    "user",
];

/// The fields a request of `api`, as a client writes it, may hold (`None`: the API is read
/// into a chat request by translation, which knows its own fields).
fn allowed(api: Api) -> Option<&'static [&'static str]> {
    match api {
        Api::Chat => Some(CHAT),
        Api::Completions => Some(COMPLETIONS),
        Api::Embeddings => Some(EMBEDDINGS),
        Api::Messages | Api::Responses => None,
    }
}

/// Refuses the first field of `body` that a request of `api` does not take.
pub(crate) fn check_known(api: Api, body: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(list) = allowed(api) else {
        return Ok(());
    };
    match body
        .keys()
        .find(|k| list.binary_search(&k.as_str()).is_err())
    {
        None => Ok(()),
        Some(field) => Err(ApiError::invalid(
            field.clone(),
            format!("Unrecognized request argument supplied: {field}"),
        )
        .with_code("unknown_parameter")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_are_sorted_and_hold_every_restricted_field() {
        for list in [CHAT, COMPLETIONS, EMBEDDINGS] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        }
        for f in super::super::RESTRICTED_FIELDS {
            assert!(
                CHAT.binary_search(&f).is_ok(),
                "{f}: restricted, so a chat request may name it"
            );
        }
    }

    #[test]
    fn an_unknown_field_is_named() {
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"model":"m","messages":[],"top_k":3,"temprature":1}"#)
                .expect("json");
        let e = check_known(Api::Chat, &body).expect_err("a typo");
        assert_eq!(e.param.as_deref(), Some("temprature"));
        assert_eq!(e.code.as_deref(), Some("unknown_parameter"));
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"model":"m","input":"x","suffix":"y"}"#).expect("json");
        assert!(check_known(Api::Embeddings, &body).is_err());
        assert!(
            check_known(Api::Messages, &body).is_ok(),
            "its translation's own"
        );
    }
}
