//! OpenAI-compatible JSON: the chat request our edge accepts (validated, field by field), and the
//! response, chunk, usage and error shapes that OpenAI-style upstreams (OpenAI, vLLM) send.
//!
//! Rule from the upstream reference: parse leniently (unknown fields ignored, absent or `null`
//! both accepted, both vLLM error shapes), emit strictly (exactly OpenAI's shapes).

use serde::de::Deserializer;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorKind};

/// Bounds on what a request may ask for. Configured per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most messages in one request.
    pub max_messages: usize,
    /// Largest `max_tokens` / `max_completion_tokens` accepted.
    pub max_output_tokens: u32,
    /// Largest `n` (choices per request).
    pub max_n: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_messages: 4096,
            max_output_tokens: 262_144,
            max_n: 8,
        }
    }
}

/// Most stop sequences OpenAI accepts.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The typed view of `POST /v1/chat/completions`. Unknown fields are not kept here; they stay
/// in [`ChatRequest::body`] and reach the upstream untouched.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn as_slice(&self) -> &[String] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Developer => "developer",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Assistant tool calls, kept opaque: only providers interpret them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
}

/// A message's content: plain text, or typed parts (`text`, `image_url`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl ChatMessage {
    /// The text of this message (text parts joined); non-text parts are skipped.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// A validated chat request: the typed view plus the client's JSON object, which is what an
/// OpenAI-compatible upstream receives (with `model` and the stream options rewritten), so fields
/// we do not model (tools, response_format, logprobs, vLLM extras) pass through untouched.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The API it came in by (chat unless said otherwise; see [`apis`]).
    pub api: Api,
    pub params: ChatCompletionRequest,
    pub body: Map<String, Value>,
    /// A text completion's prompts or an embeddings request's inputs (a chat request's prompt
    /// is its messages).
    pub inputs: Vec<Input>,
    /// The request as the client wrote it, for a provider that speaks its API natively
    /// (Anthropic's Messages to an Anthropic provider: sent as it is, not as the translation).
    pub native: Option<Box<crate::anthropic::Native>>,
}

impl ChatRequest {
    /// Parses and validates a JSON body. Errors name the field at fault.
    pub fn from_json(bytes: &[u8], limits: &RequestLimits) -> Result<Self, ApiError> {
        let body = json_object(bytes)?;
        fields::check_known(Api::Chat, &body)?;
        let params: ChatCompletionRequest =
            serde_path_to_error::deserialize(&body).map_err(schema_error)?;
        validate(&params, limits)?;
        validate_passed_through(&body)?;
        Ok(Self {
            api: Api::Chat,
            params,
            body,
            inputs: Vec::new(),
            native: None,
        })
    }

    /// Validates a request built in code (the gRPC edge). Its JSON form becomes the body.
    pub fn from_params(
        params: ChatCompletionRequest,
        limits: &RequestLimits,
    ) -> Result<Self, ApiError> {
        validate(&params, limits)?;
        let body = match serde_json::to_value(&params) {
            Ok(Value::Object(map)) => map,
            _ => {
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    "the request could not be encoded as JSON",
                ));
            }
        };
        Ok(Self {
            api: Api::Chat,
            params,
            body,
            inputs: Vec::new(),
            native: None,
        })
    }

    pub fn model(&self) -> &str {
        &self.params.model
    }

    pub fn stream(&self) -> bool {
        self.params.stream.unwrap_or(false)
    }

    /// Whether the client asked for the final usage chunk of a stream.
    pub fn include_usage(&self) -> bool {
        self.params
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The output cap the client asked for (`max_completion_tokens` wins over `max_tokens`).
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.params.max_completion_tokens.or(self.params.max_tokens)
    }

    /// Caps the output at `tokens` per choice when the client set no cap
    /// (`max_completion_tokens`, which OpenAI, vLLM and Anthropic's translation all read).
    /// A text completion is already capped by its engine's default
    /// ([`apis::DEFAULT_COMPLETION_MAX_TOKENS`]); an embedding generates nothing.
    pub fn cap_output(&mut self, tokens: u32) {
        if self.api.upstream() == Api::Chat && self.max_output_tokens().is_none() {
            self.params.max_completion_tokens = Some(tokens);
            self.body
                .insert("max_completion_tokens".into(), Value::from(tokens));
        }
    }

    /// The JSON body for an OpenAI-compatible upstream: the client's body with `model` set to the
    /// upstream's name for it, and, when streaming, usage always requested (we meter every
    /// stream, whatever the client asked).
    pub fn upstream_body(&self, upstream_model: &str, stream: bool) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(upstream_model.to_owned()));
        if self.api == Api::Embeddings {
            return serde_json::to_vec(&body).unwrap_or_default();
        }
        body.insert("stream".into(), Value::Bool(stream));
        if stream {
            let mut opts = match body.remove("stream_options") {
                Some(Value::Object(o)) => o,
                _ => Map::new(),
            };
            opts.insert("include_usage".into(), Value::Bool(true));
            body.insert("stream_options".into(), Value::Object(opts));
        } else {
            body.remove("stream_options");
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl ChatRequest {
    /// The chat request an API served by translation (Messages, Responses) was read as:
    /// `chat`, a chat body, validated like any, tagged `api`. A stream asks for the usage (the
    /// API's last events carry it); an error naming a chat field names it as the client wrote
    /// it (`renamed`: chat name → the API's).
    pub(crate) fn translated(
        api: Api,
        mut chat: Map<String, Value>,
        stream: bool,
        limits: &RequestLimits,
        renamed: &[(&str, &str)],
    ) -> Result<Self, ApiError> {
        if stream {
            chat.insert("stream".into(), true.into());
            chat.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
        // Read and checked as `from_json` does, from the map itself (not written out and
        // parsed again).
        let checked = serde_path_to_error::deserialize(&chat)
            .map_err(schema_error)
            .and_then(|params: ChatCompletionRequest| {
                validate(&params, limits)?;
                validate_passed_through(&chat)?;
                Ok(params)
            });
        let params = checked.map_err(|mut e| {
            if let Some((_, theirs)) = renamed
                .iter()
                .find(|(ours, _)| e.param.as_deref() == Some(*ours))
            {
                e.param = Some((*theirs).to_owned());
            }
            e
        })?;
        Ok(Self {
            api,
            params,
            body: chat,
            inputs: Vec::new(),
            native: None,
        })
    }
}

/// A provider's whole `chat.completion`, read to be written back in another API's shape.
pub(crate) fn completion_json(completion: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(completion).map_err(|e| {
        ApiError::new(
            ErrorKind::Upstream,
            format!("the provider's answer is not JSON: {e}"),
        )
    })
}

/// The `model` a body names, required.
pub(crate) fn model_of(body: &Map<String, Value>) -> Result<String, ApiError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => Ok(m.clone()),
        _ => Err(ApiError::invalid(
            "model",
            "model: a model name is required",
        )),
    }
}

/// A request body: JSON, and an object.
pub(crate) fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorKind::InvalidRequest,
            format!("the request body is not valid JSON: {e}"),
        )
        .with_code("invalid_json")
    })?;
    match value {
        Value::Object(body) => Ok(body),
        _ => Err(ApiError::new(
            ErrorKind::InvalidRequest,
            "the request body must be a JSON object",
        )
        .with_code("invalid_json")),
    }
}

fn schema_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner().to_string();
    // serde reports a missing field at its parent's path; name the field itself.
    let param = match inner
        .strip_prefix("missing field `")
        .and_then(|s| s.split('`').next())
    {
        Some(field) if path == "." => field.to_owned(),
        Some(field) => format!("{path}.{field}"),
        None => path,
    };
    let message = if inner.contains("did not match any variant of untagged enum MessageContent") {
        format!("{param}: content must be a string or an array of content parts")
    } else if inner.contains("did not match any variant of untagged enum Stop") {
        format!("{param}: stop must be a string or an array of strings")
    } else {
        format!("{param}: {inner}")
    };
    ApiError::new(ErrorKind::InvalidRequest, message)
        .with_param(param)
        .with_code("invalid_type")
}

// ---------------------------------------------------------------------------------------------
// Responses, chunks, usage, errors (lenient in, strict out)
// ---------------------------------------------------------------------------------------------

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Token usage as OpenAI reports it. `prompt_tokens` includes `cached_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default, deserialize_with = "null_as_default")]
    pub prompt_tokens: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub completion_tokens: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub total_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    /// Prompt tokens written into the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`, a part of `prompt_tokens`). Meridian's own: billed at
    /// the cache-write price, never sent to a client.
    #[serde(skip)]
    pub cache_write_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    /// Tokens the model spent reasoning (a part of `completion_tokens`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub reasoning_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default, deserialize_with = "null_as_default")]
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 0 }),
            completion_tokens_details: None,
            cache_write_tokens: 0,
        }
    }

    pub fn cached_tokens(&self) -> u32 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }

    pub fn reasoning_tokens(&self) -> u32 {
        self.completion_tokens_details
            .map_or(0, |d| d.reasoning_tokens)
    }
}

/// The object OpenAI answers a completion with, whole (`chat.completion`, choices
/// [`Choice`]) or one streamed event at a time (`chat.completion.chunk`, choices
/// [`ChunkChoice`]). `usage` is always serialised (`null` until a stream's usage chunk), as
/// OpenAI does with `include_usage`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(bound(deserialize = "C: Deserialize<'de>"))]
pub struct CompletionObject<C> {
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub object: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub created: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub model: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub choices: Vec<C>,
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// `chat.completion` (non-streaming response).
pub type ChatCompletion = CompletionObject<Choice>;

/// `chat.completion.chunk` (one streaming event).
pub type ChatCompletionChunk = CompletionObject<ChunkChoice>;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Choice {
    #[serde(default, deserialize_with = "null_as_default")]
    pub index: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub message: ResponseMessage,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ResponseMessage {
    #[serde(default = "assistant", deserialize_with = "null_as_default")]
    pub role: String,
    pub content: Option<String>,
}

fn assistant() -> String {
    "assistant".into()
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChunkChoice {
    #[serde(default, deserialize_with = "null_as_default")]
    pub index: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub delta: Delta,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// What the relay needs to know of a chunk, without materialising its text: whether it is the
/// usage-only chunk, whether it carries generated output, its usage, and whether it is an
/// in-band error.
#[derive(Debug, Deserialize)]
pub struct ChunkProbe {
    #[serde(default)]
    choices: Option<ChoicesProbe>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub error: Option<Value>,
}

/// A chunk's `choices`, folded as they are read: how many, and whether any carries output.
/// (No vector is made: this runs for every streamed chunk.)
#[derive(Debug, Clone, Copy, Default)]
struct ChoicesProbe {
    len: usize,
    generates: bool,
}

impl<'de> Deserialize<'de> for ChoicesProbe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fold;
        impl<'de> serde::de::Visitor<'de> for Fold {
            type Value = ChoicesProbe;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of choices")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ChoicesProbe, A::Error> {
                let mut probe = ChoicesProbe::default();
                while let Some(choice) = seq.next_element::<Option<ChoiceProbe<'de>>>()? {
                    probe.len += 1;
                    probe.generates |= choice.is_some_and(|c| c.generates());
                }
                Ok(probe)
            }
        }
        d.deserialize_seq(Fold)
    }
}

/// A streamed choice's output, as raw JSON (borrowed from the chunk: nothing is unescaped or
/// copied).
#[derive(Debug, Deserialize)]
struct ChoiceProbe<'a> {
    /// A chat chunk's delta.
    #[serde(default, borrow)]
    delta: Option<DeltaProbe<'a>>,
    /// A text completion chunk's text.
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct DeltaProbe<'a> {
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    reasoning_content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    reasoning: Option<&'a RawValue>,
    #[serde(default, borrow)]
    refusal: Option<&'a RawValue>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
    /// The legacy single function call, and audio output.
    #[serde(default, borrow)]
    function_call: Option<&'a RawValue>,
    #[serde(default, borrow)]
    audio: Option<&'a RawValue>,
}

/// A raw value that holds something: not absent, `null`, `""` or `[]`.
fn holds(v: Option<&RawValue>) -> bool {
    v.is_some_and(|v| !matches!(v.get(), "null" | "\"\"" | "[]"))
}

impl ChoiceProbe<'_> {
    fn generates(&self) -> bool {
        holds(self.text)
            || self.delta.as_ref().is_some_and(|d| {
                [
                    d.content,
                    d.reasoning_content,
                    d.reasoning,
                    d.refusal,
                    d.tool_calls,
                    d.function_call,
                    d.audio,
                ]
                .into_iter()
                .any(holds)
            })
    }
}

impl ChunkProbe {
    /// The final chunk OpenAI sends for `include_usage`: no choices, a usage object.
    pub fn is_usage_only(&self) -> bool {
        self.usage.is_some() && self.choices.is_none_or(|c| c.len == 0)
    }

    /// Whether the chunk carries generated output (text, reasoning, a refusal, a tool call):
    /// the role chunk that opens a stream and the one that gives its finish reason do not.
    pub fn generates(&self) -> bool {
        self.choices.is_some_and(|c| c.generates)
    }
}

/// An error body from an OpenAI-style upstream, in any of the shapes seen in the wild:
/// `{"error":{"message",...}}` (OpenAI, current vLLM, with `code` a string or an integer),
/// `{"object":"error","message",...}` (older vLLM), `{"error":"Unauthorized"}` (vLLM api-key).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamErrorInfo {
    pub message: String,
    pub r#type: Option<String>,
    pub code: Option<String>,
}

impl UpstreamErrorInfo {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        Self::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Option<Self> {
        let obj = match v.get("error") {
            Some(Value::String(s)) => {
                return Some(Self {
                    message: s.clone(),
                    ..Self::default()
                });
            }
            Some(inner @ Value::Object(_)) => inner,
            _ if v.get("message").is_some() => v,
            _ => return None,
        };
        let text = |key: &str| match obj.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Some(Self {
            message: text("message").unwrap_or_else(|| "upstream error".into()),
            r#type: text("type"),
            code: text("code"),
        })
    }
}

/// OpenAI's `tools` list from another API's (`tools` as the client sent it): each entry
/// passes `check` (a tool this route cannot serve is refused, naming its index) and must name
/// itself; `fill` adds the function's `parameters` and whatever else it carries over.
pub(crate) fn function_tools(
    tools: &Value,
    check: impl Fn(usize, &Value) -> Result<(), ApiError>,
    fill: impl Fn(&Value, &mut Value),
) -> Result<Value, ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "tools: an array of tools is required"))?;
    list.iter()
        .enumerate()
        .map(|(j, t)| {
            check(j, t)?;
            let name = t["name"].as_str().ok_or_else(|| {
                ApiError::invalid(
                    format!("tools[{j}].name"),
                    format!("tools[{j}].name is required"),
                )
            })?;
            let mut function = serde_json::json!({ "name": name });
            fill(t, &mut function);
            Ok(serde_json::json!({"type": "function", "function": function}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::from)
}

mod apis;
mod fields;
mod validate;
pub use apis::{Api, Input};
pub use apis::{DEFAULT_COMPLETION_MAX_TOKENS, MAX_EMBEDDING_INPUTS};
pub use validate::RESTRICTED_FIELDS;
use validate::{validate, validate_common, validate_passed_through};

#[cfg(test)]
mod tests;
