//! The OpenAI APIs beside chat that the edge accepts — legacy text completions
//! (`POST /v1/completions`) and embeddings (`POST /v1/embeddings`) — read into the same
//! [`ChatRequest`] the pipeline runs: the common parameters in its typed view (no messages),
//! the prompt or input as [`Input`]s for counting, and the client's body, which reaches an
//! OpenAI-compatible upstream as written (with `model` and the stream options rewritten).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ChatCompletionRequest, ChatRequest, RequestLimits, Stop, StreamOptions};
use crate::error::{ApiError, ErrorKind};

/// The OpenAI-style API a request came in by, and the one its upstream is asked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST /v1/chat/completions`.
    #[default]
    Chat,
    /// `POST /v1/completions` (text in, text out).
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// Anthropic's `POST /v1/messages`, read as a chat request (see [`crate::anthropic`]).
    Messages,
    /// OpenAI's `POST /v1/responses`, read as a chat request (see [`crate::responses`]).
    Responses,
}

impl Api {
    /// The API a provider is asked on: a Messages request is a chat request once read.
    pub fn upstream(self) -> Self {
        match self {
            Self::Messages | Self::Responses => Self::Chat,
            other => other,
        }
    }

    /// The endpoint of [`Api::upstream`] under an OpenAI-style API root that ends in `/v1`.
    pub fn path(self) -> &'static str {
        match self.upstream() {
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Chat | Self::Messages | Self::Responses => "chat/completions",
        }
    }

    /// As the per-call record and the usage reports name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat.completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
            Self::Responses => "responses",
        }
    }

    /// The GenAI semantic conventions' `gen_ai.operation.name`.
    pub fn operation(self) -> &'static str {
        match self {
            Self::Chat | Self::Messages | Self::Responses => "chat",
            Self::Completions => "text_completion",
            Self::Embeddings => "embeddings",
        }
    }
}

/// One prompt (completions) or input (embeddings): text, or a list of token ids already
/// tokenized for the model (kept as their count: only providers read the ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Text(String),
    Tokens(u64),
}

/// The output cap OpenAI and vLLM apply to a text completion that sets no `max_tokens`.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// Most entries in an embeddings `input` array (OpenAI's bound).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Most log probabilities per token a text completion may ask for (OpenAI's bound).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// `prompt` / `input` in any of the four shapes OpenAI accepts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl Prompt {
    fn into_inputs(self, field: &str) -> Result<Vec<Input>, ApiError> {
        let empty = || ApiError::invalid(field, format!("{field} must not be empty"));
        let inputs = match self {
            Self::Text(t) => vec![Input::Text(t)],
            Self::Texts(list) => list.into_iter().map(Input::Text).collect(),
            Self::Tokens(ids) if ids.is_empty() => return Err(empty()),
            Self::Tokens(ids) => vec![Input::Tokens(ids.len() as u64)],
            Self::TokenLists(lists) => {
                if lists.iter().any(Vec::is_empty) {
                    return Err(empty());
                }
                lists
                    .into_iter()
                    .map(|ids| Input::Tokens(ids.len() as u64))
                    .collect()
            }
        };
        if inputs.is_empty() {
            return Err(empty());
        }
        // Engines refuse an empty prompt (vLLM) or answer it with nothing of use.
        if inputs
            .iter()
            .any(|i| matches!(i, Input::Text(t) if t.is_empty()))
        {
            return Err(ApiError::invalid(
                field,
                format!("{field} must not be an empty string"),
            ));
        }
        Ok(inputs)
    }
}

/// The typed view of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
struct CompletionParams {
    model: String,
    prompt: Prompt,
    // Read for their types only: the body carries them to the provider.
    #[allow(dead_code)]
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    user: Option<String>,
    #[allow(dead_code)]
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    logprobs: Option<u32>,
}

/// The typed view of `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
struct EmbeddingParams {
    model: String,
    input: Prompt,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    #[serde(default)]
    user: Option<String>,
}

impl ChatRequest {
    /// Reads a JSON body of `api` (a chat request, a text completion or an embeddings request)
    /// and validates it. Errors name the field at fault.
    pub fn from_json_as(api: Api, bytes: &[u8], limits: &RequestLimits) -> Result<Self, ApiError> {
        match api {
            Api::Chat => Self::from_json(bytes, limits),
            Api::Messages => crate::anthropic::messages_request(bytes, limits, false),
            Api::Responses => crate::responses::responses_request(bytes, limits).map(|(r, _)| r),
            Api::Completions | Api::Embeddings => {
                let body = super::json_object(bytes)?;
                super::fields::check_known(api, &body)?;
                Self::from_body(api, body, limits)
            }
        }
    }

    /// Rebuilds the typed view of a body of `api` that was validated before (by the node
    /// that forwarded it here).
    pub fn from_body(
        api: Api,
        body: serde_json::Map<String, Value>,
        limits: &RequestLimits,
    ) -> Result<Self, ApiError> {
        let (params, inputs) = match api {
            Api::Chat | Api::Messages | Api::Responses => {
                let params: ChatCompletionRequest =
                    serde_path_to_error::deserialize(&body).map_err(super::schema_error)?;
                (params, Vec::new())
            }
            Api::Completions => completion(&body, limits)?,
            Api::Embeddings => embedding(&body)?,
        };
        Ok(Self {
            api,
            params,
            body,
            inputs,
            native: None,
        })
    }
}

fn completion(
    body: &serde_json::Map<String, Value>,
    limits: &RequestLimits,
) -> Result<(ChatCompletionRequest, Vec<Input>), ApiError> {
    let p: CompletionParams = serde_path_to_error::deserialize(body).map_err(prompt_error)?;
    let inputs = p.prompt.into_inputs("prompt")?;
    if let Some(k) = p.logprobs
        && k > MAX_COMPLETION_LOGPROBS
    {
        return Err(ApiError::invalid(
            "logprobs",
            format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {k}"),
        ));
    }
    if let Some(best_of) = p.best_of {
        let n = p.n.unwrap_or(1);
        if best_of < n || best_of > limits.max_n {
            return Err(ApiError::invalid(
                "best_of",
                format!(
                    "best_of must be at least n ({n}) and at most {}, got {best_of}",
                    limits.max_n
                ),
            ));
        }
        if p.stream == Some(true) && best_of > 1 {
            return Err(ApiError::invalid(
                "best_of",
                "best_of cannot be used with stream",
            ));
        }
    }
    // The prompt is carried as inputs, not messages.
    let params = ChatCompletionRequest {
        model: p.model,
        stream: p.stream,
        stream_options: p.stream_options,
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        n: p.n,
        stop: p.stop,
        seed: p.seed,
        user: p.user,
        ..ChatCompletionRequest::default()
    };
    super::validate_common(&params, limits)?;
    Ok((params, inputs))
}

fn embedding(
    body: &serde_json::Map<String, Value>,
) -> Result<(ChatCompletionRequest, Vec<Input>), ApiError> {
    if body.get("stream").is_some_and(|s| s != &Value::Bool(false)) {
        return Err(ApiError::invalid(
            "stream",
            "embeddings are answered whole: stream is not supported",
        ));
    }
    let p: EmbeddingParams = serde_path_to_error::deserialize(body).map_err(prompt_error)?;
    if p.model.trim().is_empty() {
        return Err(ApiError::invalid("model", "model must not be empty"));
    }
    let inputs = p.input.into_inputs("input")?;
    super::validate::at_most("input", "entries", inputs.len(), MAX_EMBEDDING_INPUTS)?;
    if let Some(f) = p.encoding_format.as_deref()
        && !matches!(f, "float" | "base64")
    {
        return Err(ApiError::invalid(
            "encoding_format",
            format!("encoding_format must be `float` or `base64`, got `{f}`"),
        ));
    }
    if p.dimensions == Some(0) {
        return Err(ApiError::invalid(
            "dimensions",
            "dimensions must be at least 1",
        ));
    }
    let params = ChatCompletionRequest {
        model: p.model,
        user: p.user,
        ..ChatCompletionRequest::default()
    };
    Ok((params, inputs))
}

/// A schema error, said in the prompt's own terms when the prompt is what did not fit.
fn prompt_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let error = super::schema_error(e);
    if error.message.contains("untagged enum Prompt") {
        let field = error.param.clone().unwrap_or_default();
        return ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "{field} must be a string, an array of strings, an array of token ids or an array of arrays of token ids"
            ),
        )
        .with_param(field)
        .with_code("invalid_type");
    }
    error
}
