//! The Anthropic Messages dialect: OpenAI chat requests become `POST /v1/messages` bodies, and
//! Anthropic's answers (whole, or its named stream events) become OpenAI chat completions and
//! chunks, so that clients see one wire format whichever provider served them.
//!
//! Request mapping: system and developer messages → `system`; consecutive messages of one role
//! are merged (tool results become `tool_result` blocks of a user turn, assistant `tool_calls`
//! become `tool_use` blocks); `max_tokens` (required by Anthropic) comes from
//! `max_completion_tokens`, `max_tokens` or the provider's default; `stop` →
//! `stop_sequences`; `temperature` is clamped to Anthropic's 0–1; `user` →
//! `metadata.user_id`; OpenAI `tools` / `tool_choice` are translated. `n > 1` has no
//! equivalent and is refused with a 400 that names `n`.
//!
//! Usage: Anthropic's `input_tokens` excludes cached tokens, so `prompt_tokens` =
//! `input_tokens + cache_creation_input_tokens + cache_read_input_tokens`, and
//! `cached_tokens` = `cache_read_input_tokens`.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meridian_proto::openai::{ChatRequest, MessageContent, PromptTokensDetails, Role, Usage};
use meridian_proto::{ApiError, ErrorKind};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Chunk, Completion, UpstreamError};
use meridian_proto::openai::UpstreamErrorInfo;

/// The API version this adapter speaks (`anthropic-version`).
pub const API_VERSION: &str = "2023-06-01";

fn refused(param: &str, message: String) -> UpstreamError {
    UpstreamError::Rejected(ApiError::new(ErrorKind::InvalidRequest, message).with_param(param))
}

/// The `/v1/messages` body for `req`, sent to `model`.
pub fn request_body(
    req: &ChatRequest,
    model: &str,
    stream: bool,
    default_max_tokens: u32,
) -> Result<Vec<u8>, UpstreamError> {
    let p = &req.params;
    if p.n.is_some_and(|n| n > 1) {
        return Err(refused(
            "n",
            "n > 1 is not supported by Anthropic providers; send one request per choice".into(),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in p.messages.iter().enumerate() {
        let (role, blocks) = match m.role {
            Role::System | Role::Developer => {
                system.push(m.text());
                continue;
            }
            Role::User => ("user", content_blocks(m.content.as_ref(), i)?),
            Role::Assistant => {
                let mut blocks = content_blocks(m.content.as_ref(), i)?;
                blocks.retain(|b| b["type"] != "text" || b["text"] != "");
                blocks.extend(tool_uses(m.tool_calls.as_ref(), i)?);
                ("assistant", blocks)
            }
            Role::Tool => {
                let Some(id) = m.tool_call_id.clone() else {
                    return Err(refused(
                        &format!("messages[{i}].tool_call_id"),
                        format!("messages[{i}]: a tool message needs tool_call_id"),
                    ));
                };
                (
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": m.text()})],
                )
            }
        };
        match messages.last_mut() {
            Some((last, b)) if *last == role => b.extend(blocks),
            _ => messages.push((role, blocks)),
        }
    }
    let max_tokens = req.max_output_tokens().unwrap_or(default_max_tokens).max(1);
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("max_tokens".into(), max_tokens.into());
    body.insert(
        "messages".into(),
        messages
            .into_iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect::<Vec<_>>()
            .into(),
    );
    if !system.is_empty() {
        body.insert("system".into(), system.join("\n\n").into());
    }
    if let Some(stop) = &p.stop {
        body.insert("stop_sequences".into(), stop.as_slice().to_vec().into());
    }
    if let Some(t) = p.temperature {
        body.insert("temperature".into(), t.clamp(0.0, 1.0).into());
    }
    if let Some(top_p) = p.top_p {
        body.insert("top_p".into(), top_p.into());
    }
    if let Some(user) = &p.user {
        body.insert("metadata".into(), json!({ "user_id": user }));
    }
    if let Some(tools) = req.body.get("tools").filter(|t| !t.is_null()) {
        body.insert("tools".into(), translate_tools(tools)?);
    }
    if let Some(choice) = req.body.get("tool_choice").filter(|t| !t.is_null()) {
        body.insert("tool_choice".into(), translate_tool_choice(choice)?);
    }
    if stream {
        body.insert("stream".into(), true.into());
    }
    serde_json::to_vec(&body).map_err(|e| UpstreamError::Protocol(e.to_string()))
}

fn content_blocks(content: Option<&MessageContent>, i: usize) -> Result<Vec<Value>, UpstreamError> {
    let parts = match content {
        None => return Ok(Vec::new()),
        Some(MessageContent::Text(t)) => return Ok(vec![json!({"type": "text", "text": t})]),
        Some(MessageContent::Parts(parts)) => parts,
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        match part.kind.as_str() {
            "text" => {
                blocks.push(json!({"type": "text", "text": part.text.clone().unwrap_or_default()}))
            }
            "image_url" => {
                let url = part
                    .rest
                    .get("image_url")
                    .and_then(|u| u.get("url").or(Some(u)))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                blocks.push(image_block(url).ok_or_else(|| {
                    refused(
                        &format!("messages[{i}].content[{j}].image_url"),
                        format!("messages[{i}].content[{j}]: the image URL must be http(s) or a base64 data URL"),
                    )
                })?);
            }
            other => {
                return Err(refused(
                    &format!("messages[{i}].content[{j}].type"),
                    format!(
                        "messages[{i}].content[{j}]: content parts of type {other:?} are not supported by Anthropic providers"
                    ),
                ));
            }
        }
    }
    Ok(blocks)
}

fn image_block(url: &str) -> Option<Value> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest.split_once(";base64,")?;
        return Some(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    (url.starts_with("https://") || url.starts_with("http://"))
        .then(|| json!({"type": "image", "source": {"type": "url", "url": url}}))
}

fn tool_uses(calls: Option<&Value>, i: usize) -> Result<Vec<Value>, UpstreamError> {
    let Some(calls) = calls.and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    calls
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let at = format!("messages[{i}].tool_calls[{j}]");
            let f = &call["function"];
            let (Some(id), Some(name)) = (call["id"].as_str(), f["name"].as_str()) else {
                return Err(refused(&at, format!("{at}: needs an id and function.name")));
            };
            let args = f["arguments"].as_str().unwrap_or("");
            let input: Value = if args.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(args).map_err(|e| {
                    refused(
                        &format!("{at}.function.arguments"),
                        format!("{at}.function.arguments is not JSON: {e}"),
                    )
                })?
            };
            Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
        })
        .collect()
}

fn translate_tools(tools: &Value) -> Result<Value, UpstreamError> {
    let Some(tools) = tools.as_array() else {
        return Err(refused("tools", "tools must be an array".into()));
    };
    tools
        .iter()
        .enumerate()
        .map(|(j, t)| {
            let f = &t["function"];
            let Some(name) = f["name"].as_str() else {
                return Err(refused(
                    &format!("tools[{j}].function.name"),
                    format!("tools[{j}]: function.name is required"),
                ));
            };
            let mut tool = json!({
                "name": name,
                "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
            });
            if let Some(d) = f["description"].as_str() {
                tool["description"] = d.into();
            }
            Ok(tool)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::from)
}

fn translate_tool_choice(choice: &Value) -> Result<Value, UpstreamError> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({"type": "auto"})),
            "required" => Ok(json!({"type": "any"})),
            "none" => Ok(json!({"type": "none"})),
            other => Err(refused(
                "tool_choice",
                format!("tool_choice {other:?} is not one of auto, required, none"),
            )),
        },
        _ => match choice["function"]["name"].as_str() {
            Some(name) => Ok(json!({"type": "tool", "name": name})),
            None => Err(refused(
                "tool_choice",
                "tool_choice must be a string or {\"type\":\"function\",\"function\":{\"name\":…}}"
                    .into(),
            )),
        },
    }
}

/// Anthropic's usage object (every count optional; the stream's counts are cumulative).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl AnthropicUsage {
    /// Later (cumulative) counts replace earlier ones.
    fn update(&mut self, later: AnthropicUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
    }

    fn to_openai(self) -> Usage {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let prompt =
            self.input_tokens.unwrap_or(0) + self.cache_creation_input_tokens.unwrap_or(0) + cached;
        let completion = self.output_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: cached,
            }),
            completion_tokens_details: None,
            cache_write_tokens: self.cache_creation_input_tokens.unwrap_or(0),
        }
    }
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn, and any reason added later.
        _ => "stop",
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage_json(u: Usage) -> Value {
    serde_json::to_value(u).unwrap_or(Value::Null)
}

/// A whole Anthropic message as an OpenAI `chat.completion`.
pub fn completion(body: &[u8]) -> Result<Completion, UpstreamError> {
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        id: String,
        #[serde(default)]
        model: String,
        #[serde(default)]
        content: Vec<Value>,
        #[serde(default)]
        stop_reason: Option<String>,
        #[serde(default)]
        usage: AnthropicUsage,
    }
    let m: Message = serde_json::from_slice(body).map_err(|e| {
        UpstreamError::Protocol(format!("the message is not an Anthropic message: {e}"))
    })?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in &m.content {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => tool_calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            // Thinking and server-tool blocks have no place in a chat completion.
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": (!text.is_empty() || tool_calls.is_empty()).then_some(text)});
    if !tool_calls.is_empty() {
        message["tool_calls"] = tool_calls.into();
    }
    let usage = m.usage.to_openai();
    let out = json!({
        "id": m.id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": m.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(m.stop_reason.as_deref().unwrap_or("end_turn")),
        }],
        "usage": usage_json(usage),
    });
    Ok(Completion {
        body: Bytes::from(out.to_string()),
        usage: Some(usage),
    })
}

/// A whole message passed on as Anthropic sent it (the client asked in Messages too); its
/// usage is read for metering.
pub fn native_completion(body: Bytes) -> Result<Completion, UpstreamError> {
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        usage: AnthropicUsage,
    }
    let m: Message = serde_json::from_slice(&body).map_err(|e| {
        UpstreamError::Protocol(format!("the message is not an Anthropic message: {e}"))
    })?;
    Ok(Completion {
        body,
        usage: Some(m.usage.to_openai()),
    })
}

/// Translates Anthropic's stream events, one at a time, into OpenAI chunks.
#[derive(Debug, Default)]
pub struct StreamState {
    id: String,
    model: String,
    created: u64,
    usage: AnthropicUsage,
    stop_reason: Option<String>,
    /// Content block index → OpenAI tool call index, for tool_use blocks.
    tools: HashMap<u64, usize>,
}

/// What one event means for the stream.
#[derive(Debug)]
pub enum Step {
    /// Chunks for the client (possibly none).
    Chunks(Vec<Chunk>),
    /// The message is complete: these chunks end the stream.
    Done(Vec<Chunk>),
}

impl StreamState {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Chunk {
        let generated = delta.get("tool_calls").is_some()
            || delta["content"].as_str().is_some_and(|t| !t.is_empty());
        let v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        Chunk {
            json: Bytes::from(v.to_string()),
            usage: None,
            usage_only: false,
            generated,
        }
    }

    /// One event's `data` (its JSON repeats the event name in `type`).
    /// One event passed on as Anthropic sent it, for a client that asked in Messages too: its
    /// usage is read (for metering, carried by the last events), and only content deltas count
    /// as generated (the others are marked as carrying no content).
    pub fn on_native_event(&mut self, data: Bytes) -> Result<Step, UpstreamError> {
        let v: Value = serde_json::from_slice(&data).map_err(|e| {
            UpstreamError::Protocol(format!("an Anthropic stream event is not JSON: {e}"))
        })?;
        let kind = v["type"].as_str().unwrap_or_default();
        let usage = match kind {
            "message_start" => &v["message"]["usage"],
            "message_delta" => &v["usage"],
            "error" => {
                return Err(UpstreamError::InStream(
                    UpstreamErrorInfo::from_value(&v).unwrap_or_default(),
                ));
            }
            _ => &Value::Null,
        };
        if let Ok(u) = AnthropicUsage::deserialize(usage) {
            self.usage.update(u);
        }
        // A newline inside a relayed `data:` field would break the client's framing.
        let json = if memchr::memchr2(b'\n', b'\r', &data).is_some() {
            Bytes::from(v.to_string())
        } else {
            data
        };
        let chunk = Chunk {
            json,
            usage: matches!(kind, "message_delta" | "message_stop").then(|| self.usage.to_openai()),
            usage_only: kind != "content_block_delta",
            generated: kind == "content_block_delta",
        };
        Ok(if kind == "message_stop" {
            Step::Done(vec![chunk])
        } else {
            Step::Chunks(vec![chunk])
        })
    }

    pub fn on_event(&mut self, data: &[u8]) -> Result<Step, UpstreamError> {
        let v: Value = serde_json::from_slice(data).map_err(|e| {
            UpstreamError::Protocol(format!("an Anthropic stream event is not JSON: {e}"))
        })?;
        let none = || Ok(Step::Chunks(Vec::new()));
        match v["type"].as_str().unwrap_or_default() {
            "message_start" => {
                let m = &v["message"];
                self.id = m["id"].as_str().unwrap_or_default().to_owned();
                self.model = m["model"].as_str().unwrap_or_default().to_owned();
                self.created = unix_now();
                if let Ok(u) = AnthropicUsage::deserialize(&m["usage"]) {
                    self.usage.update(u);
                }
                Ok(Step::Chunks(vec![
                    self.chunk(json!({"role": "assistant", "content": ""}), None),
                ]))
            }
            "content_block_start" => {
                let block = &v["content_block"];
                match block["type"].as_str() {
                    Some("tool_use") => {
                        let index = self.tools.len();
                        self.tools.insert(v["index"].as_u64().unwrap_or(0), index);
                        let delta = json!({"tool_calls": [{
                            "index": index, "id": block["id"], "type": "function",
                            "function": {"name": block["name"], "arguments": ""},
                        }]});
                        Ok(Step::Chunks(vec![self.chunk(delta, None)]))
                    }
                    Some("text") if block["text"].as_str().is_some_and(|t| !t.is_empty()) => {
                        Ok(Step::Chunks(vec![
                            self.chunk(json!({"content": block["text"]}), None),
                        ]))
                    }
                    _ => none(),
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => Ok(Step::Chunks(vec![
                        self.chunk(json!({"content": d["text"]}), None),
                    ])),
                    Some("input_json_delta") => {
                        let index = v["index"]
                            .as_u64()
                            .and_then(|i| self.tools.get(&i))
                            .copied()
                            .unwrap_or(0);
                        let delta = json!({"tool_calls": [{
                            "index": index, "function": {"arguments": d["partial_json"]},
                        }]});
                        Ok(Step::Chunks(vec![self.chunk(delta, None)]))
                    }
                    // thinking, signature and citation deltas have no chat-completions form.
                    _ => none(),
                }
            }
            "message_delta" => {
                if let Some(r) = v["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(r.to_owned());
                }
                if let Ok(u) = AnthropicUsage::deserialize(&v["usage"]) {
                    self.usage.update(u);
                }
                none()
            }
            "message_stop" => {
                let finish = finish_reason(self.stop_reason.as_deref().unwrap_or("end_turn"));
                let usage = self.usage.to_openai();
                let last = self.chunk(json!({}), Some(finish));
                let usage_chunk = json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage_json(usage),
                });
                Ok(Step::Done(vec![
                    last,
                    Chunk {
                        json: Bytes::from(usage_chunk.to_string()),
                        usage: Some(usage),
                        usage_only: true,
                        generated: false,
                    },
                ]))
            }
            "error" => Err(UpstreamError::InStream(
                UpstreamErrorInfo::from_value(&v).unwrap_or_default(),
            )),
            // ping, content_block_stop, and event types added later.
            _ => none(),
        }
    }
}

#[cfg(test)]
mod tests;
