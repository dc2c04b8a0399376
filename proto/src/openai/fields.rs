//! The request fields an OpenAI-compatible provider is sent, by API: an allowlist. A client's
//! body reaches such a provider as it was written (so that parameters this gateway does not
//! model still work), but only fields on these lists: OpenAI's own, and the sampling and
//! prompt options vLLM's OpenAI-compatible server adds. Anything else is refused at the edge
//! with 400 `unknown_parameter` naming it, as OpenAI refuses it — never passed to an engine
//! that might act on it, and never dropped without a word. vLLM's own fields reach only
//! providers that speak vLLM's dialect ([`is_vllm_field`]; routing leaves the others out). The engine-specific fields that
//! change scheduling, templates or cost are taken too, but pass only for tenants granted them
//! ([`RESTRICTED_FIELDS`], checked with the tenant's record). Anthropic providers are sent a
//! body built from the typed request, so only what the translation knows reaches them.
//!
//! Each list is sorted (a test checks), so a request's few keys are looked up by binary search.

use serde_json::{Map, Value};

use super::{Api, ChatRequest, RESTRICTED_FIELDS};
use crate::error::ApiError;

/// What chat and text completions both take, in OpenAI's API.
const SAMPLING: &[&str] = &[
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "model",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "user",
];

/// vLLM's sampling and prompt options, for chat and text completions: they reach only
/// providers that speak vLLM's dialect (see [`ChatRequest::engine_field`]).
const VLLM_SAMPLING: &[&str] = &[
    "add_special_tokens",
    "allowed_token_ids",
    "bad_words",
    "cache_salt",
    "ignore_eos",
    "include_stop_str_in_output",
    "length_penalty",
    "min_p",
    "min_tokens",
    "repetition_penalty",
    "request_id",
    "return_tokens_as_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "stop_token_ids",
    "top_k",
    "truncate_prompt_tokens",
    "use_beam_search",
];

/// Chat's own, in OpenAI's API.
const CHAT: &[&str] = &[
    "audio",
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

/// vLLM's chat-template options.
const VLLM_CHAT: &[&str] = &[
    "add_generation_prompt",
    "continue_final_message",
    "documents",
];

/// Text completions' own.
const COMPLETIONS: &[&str] = &["prompt", "suffix"];

/// OpenAI's embeddings parameters.
const EMBEDDINGS: &[&str] = &["dimensions", "encoding_format", "input", "model", "user"];

/// vLLM's additions to them (its `priority` is among [`RESTRICTED_FIELDS`]).
const VLLM_EMBEDDINGS: &[&str] = &[
    "add_special_tokens",
    "priority",
    "request_id",
    "truncate_prompt_tokens",
];

/// The engine-specific fields that are OpenAI's own (the rest of [`RESTRICTED_FIELDS`] are
/// vLLM's).
const OPENAI_RESTRICTED: &[&str] = &["service_tier", "store"];

/// vLLM's own fields, from the lists above, in one sorted list (looked up once per request
/// key on the routing path).
static VLLM_FIELDS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut all: Vec<&'static str> = [
        VLLM_SAMPLING,
        VLLM_CHAT,
        VLLM_EMBEDDINGS,
        &RESTRICTED_FIELDS,
    ]
    .concat()
    .into_iter()
    .filter(|f| OPENAI_RESTRICTED.binary_search(f).is_err())
    .collect();
    all.sort_unstable();
    all.dedup();
    all
});

/// Whether `field` is one of vLLM's own (not OpenAI's): a provider that does not speak vLLM's
/// dialect is never sent it.
pub fn is_vllm_field(field: &str) -> bool {
    VLLM_FIELDS.binary_search(&field).is_ok()
}

/// The lists of fields a request of `api`, as a client writes it, may hold (`None`: the API is
/// read into a chat request by translation, which knows its own fields). The engine-specific
/// fields ([`RESTRICTED_FIELDS`]) are checked apart, against the tenant's grant.
fn allowed(api: Api) -> Option<&'static [&'static [&'static str]]> {
    match api {
        // OpenAI's first: most requests' keys are found there.
        Api::Chat => Some(&[SAMPLING, CHAT, VLLM_SAMPLING, VLLM_CHAT, &RESTRICTED_FIELDS]),
        Api::Completions => Some(&[SAMPLING, VLLM_SAMPLING, COMPLETIONS, &RESTRICTED_FIELDS]),
        Api::Embeddings => Some(&[EMBEDDINGS, VLLM_EMBEDDINGS]),
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

impl ChatRequest {
    /// The first of vLLM's own fields this request sends (`None`: OpenAI's only). Walks the
    /// request's own keys.
    pub fn engine_field(&self) -> Option<&str> {
        self.body
            .keys()
            .map(String::as_str)
            .find(|k| is_vllm_field(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_are_sorted() {
        for list in [
            SAMPLING,
            VLLM_SAMPLING,
            CHAT,
            VLLM_CHAT,
            COMPLETIONS,
            EMBEDDINGS,
            VLLM_EMBEDDINGS,
            OPENAI_RESTRICTED,
            &RESTRICTED_FIELDS,
        ] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        }
    }

    #[test]
    fn vllms_fields_are_told_from_openais() {
        for f in [
            "top_k",
            "min_p",
            "ignore_eos",
            "priority",
            "chat_template",
            "documents",
        ] {
            assert!(is_vllm_field(f), "{f}");
        }
        for f in [
            "temperature",
            "store",
            "service_tier",
            "tools",
            "messages",
            "dimensions",
        ] {
            assert!(!is_vllm_field(f), "{f}");
        }
        // No field is on both sides.
        for list in [SAMPLING, CHAT, COMPLETIONS, EMBEDDINGS, OPENAI_RESTRICTED] {
            assert!(list.iter().all(|f| !is_vllm_field(f)), "{list:?}");
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
