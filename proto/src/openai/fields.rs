//! The request fields an OpenAI-compatible provider is sent, by API: an allowlist. A client's
//! body reaches such a provider as it was written (so that parameters this gateway does not
//! model still work), but only fields on these lists: OpenAI's own, and the sampling and
//! prompt options vLLM's OpenAI-compatible server adds. Anything else is refused at the edge
//! with 400 `unknown_parameter` naming it, as OpenAI refuses it — never passed to an engine
//! that might act on it, and never dropped without a word. The engine-specific fields that
//! change scheduling, templates or cost are taken too, but pass only for tenants granted them
//! ([`RESTRICTED_FIELDS`], checked with the tenant's record). Anthropic providers are sent a
//! body built from the typed request, so only what the translation knows reaches them.
//!
//! Each list is sorted (a test checks), so a request's few keys are looked up by binary search.

use serde_json::{Map, Value};

use super::{Api, RESTRICTED_FIELDS};
use crate::error::ApiError;

/// What chat and text completions both take: OpenAI's common parameters and vLLM's sampling
/// and prompt options.
const SAMPLING: &[&str] = &[
    "add_special_tokens",
    "allowed_token_ids",
    "bad_words",
    "best_of",
    "cache_salt",
    "echo",
    "frequency_penalty",
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
    "temperature",
    "top_k",
    "top_p",
    "truncate_prompt_tokens",
    "use_beam_search",
    "user",
];

/// Chat's own: OpenAI's chat parameters and vLLM's chat-template options.
const CHAT: &[&str] = &[
    "add_generation_prompt",
    "audio",
    "continue_final_message",
    "documents",
    "function_call",
    "functions",
    "max_completion_tokens",
    "messages",
    "metadata",
    "modalities",
    "parallel_tool_calls",
    "prediction",
    "prompt_cache_key",
    "reasoning_effort",
    "safety_identifier",
    "tool_choice",
    "tools",
    "top_logprobs",
    "verbosity",
    "web_search_options",
];

/// Text completions' own.
const COMPLETIONS: &[&str] = &["prompt", "suffix"];

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

/// The lists of fields a request of `api`, as a client writes it, may hold (`None`: the API is
/// read into a chat request by translation, which knows its own fields). The engine-specific
/// fields ([`RESTRICTED_FIELDS`]) are checked apart, against the tenant's grant.
fn allowed(api: Api) -> Option<&'static [&'static [&'static str]]> {
    match api {
        Api::Chat => Some(&[SAMPLING, CHAT, &RESTRICTED_FIELDS]),
        Api::Completions => Some(&[SAMPLING, COMPLETIONS, &RESTRICTED_FIELDS]),
        Api::Embeddings => Some(&[EMBEDDINGS]),
        Api::Messages | Api::Responses => None,
    }
}

/// Refuses the first field of `body` that a request of `api` does not take.
pub(crate) fn check_known(api: Api, body: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(lists) = allowed(api) else {
        return Ok(());
    };
    let known = |k: &str| lists.iter().any(|l| l.binary_search(&k).is_ok());
    match body.keys().find(|k| !known(k)) {
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
    fn the_lists_are_sorted() {
        for list in [SAMPLING, CHAT, COMPLETIONS, EMBEDDINGS, &RESTRICTED_FIELDS] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
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
