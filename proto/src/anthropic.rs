//! Anthropic's Messages API as clients speak it to Meridian (`POST /v1/messages`, the
//! official `anthropic` SDKs, Claude Code), translated to and from the OpenAI chat format the
//! pipeline runs, so that every provider can serve it:
//!
//! - [`messages_request`]: a Messages body → a chat request ([`Api::Messages`]): `system` → a
//!   system message; user `text` and `image` blocks → content parts; `tool_result` blocks → tool
//!   messages (before the rest of their turn, which OpenAI requires); assistant `tool_use`
//!   blocks → `tool_calls`; `thinking` blocks of earlier turns are dropped (only Anthropic reads
//!   them); `stop_sequences` → `stop`, `metadata.user_id` → `user`, tools and `tool_choice`
//!   translated; streams always ask for usage (the last events carry it).
//! - [`message_from_completion`]: a whole `chat.completion` → a `message` (`reasoning_content`,
//!   which reasoning engines send, becomes a `thinking` block).
//! - [`MessageStream`]: chat chunks → Anthropic's named events (`message_start`,
//!   `content_block_start` / `_delta` / `_stop` for text, thinking and tool use, `message_delta`
//!   with the stop reason and usage, `message_stop`).
//! - [`error_body`]: Anthropic's error shape, on this route.
//!
//! Usage: Anthropic's `input_tokens` excludes tokens read from the prompt cache, which are
//! `cache_read_input_tokens`; OpenAI's `prompt_tokens` includes them.

use serde_json::{Map, Value, json};

use crate::error::{ApiError, ErrorKind};
use crate::openai::{Api, ChatRequest, MAX_STOP_SEQUENCES, RequestLimits, function_tools};

/// The API version Meridian answers as (`anthropic-version`).
pub const API_VERSION: &str = "2023-06-01";

/// A Messages request as the client sent it, for an Anthropic provider, which gets it as it is
/// (only `model` and `stream` set), with the client's `anthropic-version` and `anthropic-beta`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Native {
    /// The body's bytes as the client sent them.
    pub raw: Vec<u8>,
    pub body: Map<String, Value>,
    pub version: Option<String>,
    pub beta: Option<String>,
}

impl Native {
    /// The body for `model` (the provider's name for it), streamed or not: the client's own
    /// bytes when they already say so, else its JSON with `model` and `stream` set.
    pub fn body_for(&self, model: &str, stream: bool) -> Vec<u8> {
        let asked_stream = self.body.get("stream").and_then(Value::as_bool) == Some(true);
        if self.body.get("model").and_then(Value::as_str) == Some(model) && asked_stream == stream {
            return self.raw.clone();
        }
        let mut body = self.body.clone();
        body.insert("model".into(), model.into());
        if stream {
            body.insert("stream".into(), true.into());
        } else {
            body.remove("stream");
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// Reads a Messages body (`count_only`: a `count_tokens` body, which has no `max_tokens`) as
/// the chat request the pipeline runs. Errors name the Anthropic field at fault.
pub fn messages_request(
    bytes: &[u8],
    limits: &RequestLimits,
    count_only: bool,
) -> Result<ChatRequest, ApiError> {
    let body = crate::openai::json_object(bytes)?;
    let model = crate::openai::model_of(&body)?;
    let mut chat = Map::new();
    chat.insert("model".into(), model.into());
    match body.get("max_tokens") {
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {
            chat.insert("max_tokens".into(), v.clone());
        }
        None if count_only => {}
        _ => {
            return Err(invalid(
                "max_tokens",
                "max_tokens: a whole number of at least 1 is required",
            ));
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
        let text = text_of(system, "system")?;
        messages.push(json!({"role": "system", "content": text}));
    }
    let Some(turns) = body.get("messages").and_then(Value::as_array) else {
        return Err(invalid(
            "messages",
            "messages: an array of messages is required",
        ));
    };
    if turns.is_empty() {
        return Err(invalid(
            "messages",
            "messages: at least one message is required",
        ));
    }
    for (i, turn) in turns.iter().enumerate() {
        translate_turn(turn, i, &mut messages)?;
    }
    chat.insert("messages".into(), messages.into());
    if let Some(stops) = body.get("stop_sequences").filter(|s| !s.is_null()) {
        let list = stops.as_array().filter(|l| l.iter().all(Value::is_string));
        match list {
            Some(l) if l.len() <= MAX_STOP_SEQUENCES => {
                if !l.is_empty() {
                    chat.insert("stop".into(), stops.clone());
                }
            }
            Some(l) => {
                return Err(invalid(
                    "stop_sequences",
                    format!(
                        "stop_sequences: at most {MAX_STOP_SEQUENCES} are supported, got {}",
                        l.len()
                    ),
                ));
            }
            None => {
                return Err(invalid(
                    "stop_sequences",
                    "stop_sequences: an array of strings is required",
                ));
            }
        }
    }
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            if !v.is_number() {
                return Err(invalid(key, format!("{key}: a number is required")));
            }
            chat.insert(key.into(), v.clone());
        }
    }
    if let Some(t) = body.get("temperature").and_then(Value::as_f64)
        && !(0.0..=1.0).contains(&t)
    {
        return Err(invalid(
            "temperature",
            format!("temperature: must be between 0 and 1, got {t}"),
        ));
    }
    if let Some(user) = body
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        chat.insert("user".into(), user.into());
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        chat.insert("tools".into(), translate_tools(tools)?);
    }
    if let Some(choice) = body.get("tool_choice").filter(|t| !t.is_null()) {
        let (choice, parallel) = translate_tool_choice(choice)?;
        chat.insert("tool_choice".into(), choice);
        if let Some(p) = parallel {
            chat.insert("parallel_tool_calls".into(), p.into());
        }
    }
    if let Some(thinking) = body.get("thinking").filter(|t| !t.is_null()) {
        match thinking.get("type").and_then(Value::as_str) {
            Some("enabled" | "disabled" | "adaptive") => {}
            _ => {
                return Err(invalid(
                    "thinking.type",
                    "thinking.type: one of enabled, disabled, adaptive is required",
                ));
            }
        }
    }
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let mut request = ChatRequest::translated(
        Api::Messages,
        chat,
        stream,
        limits,
        &[("stop", "stop_sequences")],
    )?;
    request.native = Some(Box::new(Native {
        raw: bytes.to_vec(),
        body,
        ..Native::default()
    }));
    Ok(request)
}

/// The text of a `system` prompt or a `tool_result`'s content: a string, or text blocks.
fn text_of(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                match (b["type"].as_str(), b["text"].as_str()) {
                    (Some("text"), Some(t)) => out.push(t),
                    _ => {
                        return Err(invalid(
                            format!("{at}[{j}]"),
                            format!("{at}[{j}]: only text blocks are supported here"),
                        ));
                    }
                }
            }
            Ok(out.join("\n"))
        }
        _ => Err(invalid(at, format!("{at}: a string or text blocks"))),
    }
}

/// One Messages turn as chat messages (a user turn with tool results becomes one tool
/// message per result, then the rest of the turn).
fn translate_turn(turn: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let at = format!("messages[{i}]");
    let role = match turn.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        _ => {
            return Err(invalid(
                format!("{at}.role"),
                format!("{at}.role: must be user or assistant"),
            ));
        }
    };
    let blocks = match turn.get("content") {
        Some(Value::String(text)) => {
            out.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(invalid(
                format!("{at}.content"),
                format!("{at}.content: a string or an array of content blocks is required"),
            ));
        }
    };
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let bat = format!("{at}.content[{j}]");
        let kind = block
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match (role, kind) {
            (_, "text") => {
                let t = block["text"].as_str().ok_or_else(|| {
                    invalid(
                        format!("{bat}.text"),
                        format!("{bat}.text: a string is required"),
                    )
                })?;
                if role == "assistant" {
                    text.push_str(t);
                } else {
                    parts.push(json!({"type": "text", "text": t}));
                }
            }
            ("user", "image") => parts.push(image_part(&block["source"], &bat)?),
            ("user", "tool_result") => {
                let id = block["tool_use_id"].as_str().ok_or_else(|| {
                    invalid(
                        format!("{bat}.tool_use_id"),
                        format!("{bat}.tool_use_id: a string is required"),
                    )
                })?;
                let content = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => text_of(c, &format!("{bat}.content"))?,
                };
                let content = if block["is_error"] == true {
                    format!("Error: {content}")
                } else {
                    content
                };
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            ("assistant", "tool_use") => {
                let (Some(id), Some(name)) = (block["id"].as_str(), block["name"].as_str()) else {
                    return Err(invalid(
                        bat.clone(),
                        format!("{bat}: a tool_use block needs an id and a name"),
                    ));
                };
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                tool_calls.push(json!({
                    "id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()},
                }));
            }
            // Earlier turns' reasoning: only Anthropic's own models read it back.
            ("assistant", "thinking" | "redacted_thinking") => {}
            _ => {
                return Err(invalid(
                    format!("{bat}.type"),
                    format!("{bat}.type: {kind:?} blocks are not supported in a {role} turn"),
                ));
            }
        }
    }
    if role == "assistant" {
        let mut m = json!({"role": "assistant", "content": text});
        if !tool_calls.is_empty() {
            m["tool_calls"] = tool_calls.into();
            if text.is_empty() {
                m["content"] = Value::Null;
            }
        }
        if !text.is_empty() || m.get("tool_calls").is_some() {
            out.push(m);
        }
    } else if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_part(source: &Value, at: &str) -> Result<Value, ApiError> {
    let url = match source["type"].as_str() {
        Some("base64") => match (source["media_type"].as_str(), source["data"].as_str()) {
            (Some(media), Some(data)) => format!("data:{media};base64,{data}"),
            _ => {
                return Err(invalid(
                    format!("{at}.source"),
                    format!("{at}.source: a base64 image needs media_type and data"),
                ));
            }
        },
        Some("url") => source["url"]
            .as_str()
            .ok_or_else(|| {
                invalid(
                    format!("{at}.source.url"),
                    format!("{at}.source.url: a string is required"),
                )
            })?
            .to_owned(),
        _ => {
            return Err(invalid(
                format!("{at}.source.type"),
                format!("{at}.source.type: base64 or url"),
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn translate_tools(tools: &Value) -> Result<Value, ApiError> {
    function_tools(
        tools,
        |j, t| match t["type"].as_str().filter(|k| *k != "custom") {
            // Server tools (web search, code execution, …) have a versioned `type`; a custom
            // tool has none, or `custom`.
            Some(kind) => Err(invalid(
                format!("tools[{j}].type"),
                format!(
                    "tools[{j}].type: Anthropic's server tools ({kind}) are served by Anthropic only"
                ),
            )),
            None => Ok(()),
        },
        |t, function| {
            function["parameters"] = t
                .get("input_schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            if let Some(d) = t["description"].as_str() {
                function["description"] = d.into();
            }
        },
    )
}

/// `tool_choice` and, when it says so, whether tools may be called in parallel.
fn translate_tool_choice(choice: &Value) -> Result<(Value, Option<bool>), ApiError> {
    let parallel = choice["disable_parallel_tool_use"].as_bool().map(|d| !d);
    let openai = match choice["type"].as_str() {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match choice["name"].as_str() {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => return Err(invalid("tool_choice.name", "tool_choice.name is required")),
        },
        _ => {
            return Err(invalid(
                "tool_choice.type",
                "tool_choice.type: one of auto, any, tool, none",
            ));
        }
    };
    Ok((openai, parallel))
}

/// Anthropic's `stop_reason` for OpenAI's `finish_reason`.
pub fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage object from OpenAI's.
fn usage(u: &Value) -> Value {
    let prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(prompt);
    json!({
        "input_tokens": prompt - cached,
        "output_tokens": u["completion_tokens"].as_u64().unwrap_or(0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    })
}

/// A message id from a completion's (Anthropic's ids start `msg_`).
fn message_id(id: &Value) -> String {
    match id.as_str() {
        Some(id) if id.starts_with("msg_") => id.to_owned(),
        Some(id) if !id.is_empty() => format!("msg_{id}"),
        _ => format!("msg_{}", crate::ids::random_hex()),
    }
}

/// A tool call's arguments as the `input` object (arguments that are not JSON are kept as a
/// string under `_raw`: the client should see what the model produced).
fn tool_input(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({ "_raw": arguments }))
}

/// A whole `chat.completion` as a Messages `message`, named `model` as the client asked.
pub fn message_from_completion(completion: &[u8], model: &str) -> Result<Vec<u8>, ApiError> {
    let c = crate::openai::completion_json(completion)?;
    let choice = &c["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(thinking) = message["reasoning_content"]
        .as_str()
        .or(message["reasoning"].as_str())
        .filter(|t| !t.is_empty())
    {
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
    }
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        content.push(json!({
            "type": "tool_use",
            "id": call["id"],
            "name": call["function"]["name"],
            "input": tool_input(call["function"]["arguments"].as_str().unwrap_or("")),
        }));
    }
    let out = json!({
        "id": message_id(&c["id"]),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str().unwrap_or("stop")),
        "stop_sequence": null,
        "usage": usage(&c["usage"]),
    });
    Ok(out.to_string().into_bytes())
}

/// Which content block is open in a [`MessageStream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    /// A tool call, by its index among the chunk's `tool_calls`.
    Tool(u64),
}

/// Turns a chat stream's chunks into Anthropic's named events, one chunk at a time.
#[derive(Debug)]
pub struct MessageStream {
    model: String,
    started: bool,
    /// The open block and its index.
    open: Option<(Block, u64)>,
    next_index: u64,
    stop_reason: Option<&'static str>,
    usage: Option<Value>,
}

/// One event: its name and its data.
pub type Event = (&'static str, Value);

impl MessageStream {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            started: false,
            open: None,
            next_index: 0,
            stop_reason: None,
            usage: None,
        }
    }

    fn start(&mut self, id: &Value, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        out.push((
            "message_start",
            json!({"type": "message_start", "message": {
                "id": message_id(id), "type": "message", "role": "assistant",
                "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        ));
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((_, index)) = self.open.take() {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// Opens `block` (closing another) unless it is the open one; its index.
    fn open(&mut self, block: Block, start: Value, out: &mut Vec<Event>) -> u64 {
        if let Some((open, index)) = self.open
            && open == block
        {
            return index;
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((block, index));
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        index
    }

    /// The events one chat chunk (its JSON) makes.
    pub fn on_chunk(&mut self, chunk: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        let Ok(c) = serde_json::from_slice::<Value>(chunk) else {
            return out;
        };
        self.start(&c["id"], &mut out);
        if c["usage"].is_object() {
            self.usage = Some(usage(&c["usage"]));
        }
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        if let Some(t) = delta["reasoning_content"]
            .as_str()
            .or(delta["reasoning"].as_str())
            .filter(|t| !t.is_empty())
        {
            let start = json!({"type": "thinking", "thinking": "", "signature": ""});
            let index = self.open(Block::Thinking, start, &mut out);
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                       "delta": {"type": "thinking_delta", "thinking": t}}),
            ));
        }
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let start = json!({"type": "text", "text": ""});
            let index = self.open(Block::Text, start, &mut out);
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                       "delta": {"type": "text_delta", "text": t}}),
            ));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let n = call["index"].as_u64().unwrap_or(0);
            let start = json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": {}});
            let index = self.open(Block::Tool(n), start, &mut out);
            if let Some(args) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": args}}),
                ));
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.stop_reason = Some(stop_reason(f));
        }
        out
    }

    /// The events that end a stream that ran to its end.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        self.start(&Value::Null, &mut out);
        self.close(&mut out);
        let usage = self.usage.take().unwrap_or_else(|| usage(&Value::Null));
        out.push((
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
                   "usage": usage}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// Anthropic's `error.type` for a kind of failure.
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "invalid_request_error",
        ErrorKind::PayloadTooLarge => "request_too_large",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::Unauthenticated => "authentication_error",
        ErrorKind::PermissionDenied => "permission_error",
        ErrorKind::RateLimited => "rate_limit_error",
        ErrorKind::Unavailable => "overloaded_error",
        ErrorKind::RequestTimeout
        | ErrorKind::Timeout
        | ErrorKind::Upstream
        | ErrorKind::Internal => "api_error",
    }
}

/// Anthropic's error body: `{"type":"error","error":{"type","message"},"request_id"}`.
pub fn error_body(e: &ApiError, request_id: Option<&str>) -> Value {
    let mut body =
        json!({"type": "error", "error": {"type": error_type(e.kind), "message": e.message}});
    if let Some(id) = request_id {
        body["request_id"] = id.into();
    }
    body
}

#[cfg(test)]
mod tests;
