//! OpenAI's Responses API as clients speak it (`POST /v1/responses`, the official SDKs'
//! `responses.create`), translated to and from the chat format the pipeline runs, so that every
//! provider can serve it. Meridian keeps no conversation state: a request is answered on its
//! own, so `store: true`, `previous_response_id`, `conversation` and `background` are refused
//! with a 400 naming the field (leaving `store` out is accepted: nothing is stored, and the
//! answer says `"store": false`). Built-in tools (web and file search, code interpreter,
//! computer use, …) are refused the same way: only function tools translate.
//!
//! - [`responses_request`]: `instructions` → a system message; `input` (a string, or items:
//!   messages with `input_text` / `input_image` / `output_text` parts, `function_call` and
//!   `function_call_output`) → chat messages; function tools and `tool_choice` translated;
//!   `max_output_tokens` → `max_completion_tokens`; `text.format` → `response_format`.
//! - [`response_from_completion`]: a whole `chat.completion` → a `response` object (a
//!   `message` output item with `output_text`, then `function_call` items; `status`
//!   `incomplete` when the output cap cut it short).
//! - [`ResponseStream`]: chat chunks → the semantic events, from `response.created` to
//!   `response.completed` (or `response.incomplete`) with usage, each with its
//!   `sequence_number`.

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::openai::{Api, ChatRequest, RequestLimits, function_tools};

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// What the answer repeats of the request (OpenAI's response object echoes its parameters).
#[derive(Debug, Clone, Default)]
pub struct Echo {
    pub model: String,
    pub instructions: Value,
    pub max_output_tokens: Value,
    pub temperature: Value,
    pub top_p: Value,
    pub tools: Value,
    pub tool_choice: Value,
    pub parallel_tool_calls: Value,
    pub metadata: Value,
    pub text: Value,
    pub user: Value,
}

impl Echo {
    fn of(body: &Map<String, Value>) -> Self {
        let get = |k: &str| body.get(k).cloned().unwrap_or(Value::Null);
        Self {
            model: body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            instructions: get("instructions"),
            max_output_tokens: get("max_output_tokens"),
            temperature: body.get("temperature").cloned().unwrap_or(json!(1.0)),
            top_p: body.get("top_p").cloned().unwrap_or(json!(1.0)),
            tools: body.get("tools").cloned().unwrap_or(json!([])),
            tool_choice: body.get("tool_choice").cloned().unwrap_or(json!("auto")),
            parallel_tool_calls: body
                .get("parallel_tool_calls")
                .cloned()
                .unwrap_or(json!(true)),
            metadata: body.get("metadata").cloned().unwrap_or(json!({})),
            text: body
                .get("text")
                .cloned()
                .unwrap_or(json!({"format": {"type": "text"}})),
            user: get("user"),
        }
    }
}

/// Reads a Responses body as the chat request the pipeline runs, with what its answer echoes.
/// Errors name the Responses field at fault.
pub fn responses_request(
    bytes: &[u8],
    limits: &RequestLimits,
) -> Result<(ChatRequest, Echo), ApiError> {
    let body = crate::openai::json_object(bytes)?;
    for (field, refused) in [
        ("store", body.get("store") == Some(&Value::Bool(true))),
        (
            "previous_response_id",
            body.get("previous_response_id")
                .is_some_and(|v| !v.is_null()),
        ),
        (
            "conversation",
            body.get("conversation").is_some_and(|v| !v.is_null()),
        ),
        (
            "background",
            body.get("background") == Some(&Value::Bool(true)),
        ),
    ] {
        if refused {
            return Err(invalid(
                field,
                format!(
                    "{field}: Meridian keeps no response state; send the whole conversation as `input` with `store: false`"
                ),
            )
            .with_code("unsupported_parameter"));
        }
    }
    let model = crate::openai::model_of(&body)?;
    let mut chat = Map::new();
    chat.insert("model".into(), model.into());
    let mut messages = Vec::new();
    if let Some(i) = body.get("instructions").filter(|v| !v.is_null()) {
        let text = i
            .as_str()
            .ok_or_else(|| invalid("instructions", "instructions: a string is required"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    match body.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                translate_item(item, i, &mut messages)?;
            }
        }
        _ => {
            return Err(invalid(
                "input",
                "input: a string or a non-empty array of input items is required",
            ));
        }
    }
    chat.insert("messages".into(), messages.into());
    if let Some(n) = body.get("max_output_tokens").filter(|v| !v.is_null()) {
        if n.as_u64().is_none_or(|n| n == 0) {
            return Err(invalid(
                "max_output_tokens",
                "max_output_tokens: a whole number of at least 1 is required",
            ));
        }
        chat.insert("max_completion_tokens".into(), n.clone());
    }
    for key in ["temperature", "top_p", "user", "parallel_tool_calls"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            chat.insert(key.into(), v.clone());
        }
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        chat.insert("tools".into(), translate_tools(tools)?);
    }
    if let Some(choice) = body.get("tool_choice").filter(|t| !t.is_null()) {
        chat.insert("tool_choice".into(), translate_tool_choice(choice)?);
    }
    if let Some(format) = body.get("text").and_then(|t| t.get("format"))
        && let Some(f) = translate_format(format)?
    {
        chat.insert("response_format".into(), f);
    }
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let request = ChatRequest::translated(
        Api::Responses,
        chat,
        stream,
        limits,
        &[("max_completion_tokens", "max_output_tokens")],
    )?;
    Ok((request, Echo::of(&body)))
}

/// One input item as chat messages.
fn translate_item(item: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let at = format!("input[{i}]");
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    match kind {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some(r @ ("user" | "assistant" | "system" | "developer")) => r,
                _ => {
                    return Err(invalid(
                        format!("{at}.role"),
                        format!("{at}.role: one of user, assistant, system, developer"),
                    ));
                }
            };
            let content = match item.get("content") {
                Some(Value::String(t)) => json!(t),
                Some(Value::Array(parts)) => content_parts(parts, role, &at)?,
                _ => {
                    return Err(invalid(
                        format!("{at}.content"),
                        format!("{at}.content: a string or an array of content parts"),
                    ));
                }
            };
            out.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let (Some(call_id), Some(name)) = (item["call_id"].as_str(), item["name"].as_str())
            else {
                return Err(invalid(
                    at.clone(),
                    format!("{at}: a function_call needs call_id and name"),
                ));
            };
            let call = json!({"id": call_id, "type": "function",
                              "function": {"name": name, "arguments": item["arguments"].as_str().unwrap_or("{}")}});
            // Calls of one turn go together, on the assistant message before them.
            match out.last_mut() {
                Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                    if let Some(calls) = last["tool_calls"].as_array_mut() {
                        calls.push(call);
                    }
                }
                Some(last) if last["role"] == "assistant" => last["tool_calls"] = json!([call]),
                _ => out.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let call_id = item["call_id"].as_str().ok_or_else(|| {
                invalid(
                    format!("{at}.call_id"),
                    format!("{at}.call_id: a string is required"),
                )
            })?;
            let output = match &item["output"] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            out.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        // Reasoning items of earlier turns: only the model that wrote them reads them.
        "reasoning" => {}
        other => {
            return Err(invalid(
                format!("{at}.type"),
                format!("{at}.type: {other:?} items are not supported"),
            ));
        }
    }
    Ok(())
}

fn content_parts(parts: &[Value], role: &str, at: &str) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let pat = format!("{at}.content[{j}]");
        match p["type"].as_str() {
            Some("input_text" | "output_text" | "text") => {
                let text = p["text"].as_str().ok_or_else(|| {
                    invalid(
                        format!("{pat}.text"),
                        format!("{pat}.text: a string is required"),
                    )
                })?;
                out.push(json!({"type": "text", "text": text}));
            }
            Some("input_image") if role == "user" => {
                let url = p["image_url"].as_str().ok_or_else(|| {
                    invalid(
                        format!("{pat}.image_url"),
                        format!("{pat}.image_url: a URL is required (file ids are not served)"),
                    )
                })?;
                let mut image = json!({"url": url});
                if let Some(detail) = p["detail"].as_str() {
                    image["detail"] = detail.into();
                }
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            other => {
                return Err(invalid(
                    format!("{pat}.type"),
                    format!("{pat}.type: {other:?} parts are not supported in a {role} message"),
                ));
            }
        }
    }
    // Assistant and system turns are plain text in chat.
    if role != "user" {
        let text: Vec<&str> = out.iter().filter_map(|p| p["text"].as_str()).collect();
        return Ok(json!(text.join("")));
    }
    Ok(out.into())
}

fn translate_tools(tools: &Value) -> Result<Value, ApiError> {
    function_tools(
        tools,
        |j, t| match t["type"].as_str() {
            Some("function") => Ok(()),
            other => Err(invalid(
                format!("tools[{j}].type"),
                format!(
                    "tools[{j}].type: only function tools are served, not built-in tools ({})",
                    other.unwrap_or("no type")
                ),
            )
            .with_code("unsupported_parameter")),
        },
        |t, function| {
            function["parameters"] = t
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            for key in ["description", "strict"] {
                if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                    function[key] = v.clone();
                }
            }
        },
    )
}

fn translate_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        _ if choice["type"] == "function" => match choice["name"].as_str() {
            Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
            None => Err(invalid("tool_choice.name", "tool_choice.name is required")),
        },
        _ => Err(invalid(
            "tool_choice",
            "tool_choice: auto, none, required or {\"type\": \"function\", \"name\": …}",
        )),
    }
}

fn translate_format(format: &Value) -> Result<Option<Value>, ApiError> {
    match format["type"].as_str() {
        Some("text") | None => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), v.clone());
                }
            }
            if !schema.contains_key("name") || !schema.contains_key("schema") {
                return Err(invalid(
                    "text.format",
                    "text.format: a json_schema format needs name and schema",
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(other) => Err(invalid(
            "text.format.type",
            format!("text.format.type: {other:?} is not text, json_object or json_schema"),
        )),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The Responses API's usage object from a chat completion's.
fn usage(u: &Value) -> Value {
    let input = u["prompt_tokens"].as_u64().unwrap_or(0);
    let output = u["completion_tokens"].as_u64().unwrap_or(0);
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap_or(0)},
        "total_tokens": input + output,
    })
}

/// The response object around `output`, as OpenAI writes it.
fn response_object(
    id: &str,
    created_at: u64,
    echo: &Echo,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "background": false, "error": null, "incomplete_details": incomplete,
        "instructions": echo.instructions, "max_output_tokens": echo.max_output_tokens,
        "model": echo.model, "output": output, "parallel_tool_calls": echo.parallel_tool_calls,
        "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
        "store": false, "temperature": echo.temperature, "text": echo.text,
        "tool_choice": echo.tool_choice, "tools": echo.tools, "top_p": echo.top_p,
        "truncation": "disabled", "usage": usage, "user": echo.user, "metadata": echo.metadata,
    })
}

fn status_of(finish_reason: Option<&str>) -> &'static str {
    if finish_reason == Some("length") {
        "incomplete"
    } else {
        "completed"
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", crate::ids::random_hex())
}

fn message_item(id: &str, status: &str, text: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, status: &str, call_id: &Value, name: &Value, arguments: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
           "arguments": arguments, "status": status})
}

/// A whole `chat.completion` as a `response` object.
pub fn response_from_completion(completion: &[u8], echo: &Echo) -> Result<Vec<u8>, ApiError> {
    let c = crate::openai::completion_json(completion)?;
    let choice = &c["choices"][0];
    let message = &choice["message"];
    let mut output = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        output.push(message_item(&new_id("msg"), "completed", text));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        output.push(call_item(
            &new_id("fc"),
            "completed",
            &call["id"],
            &call["function"]["name"],
            call["function"]["arguments"].as_str().unwrap_or(""),
        ));
    }
    let status = status_of(choice["finish_reason"].as_str());
    let out = response_object(
        &new_id("resp"),
        c["created"].as_u64().unwrap_or_else(now),
        echo,
        status,
        output,
        usage(&c["usage"]),
    );
    Ok(out.to_string().into_bytes())
}

/// An output item being streamed.
#[derive(Debug)]
enum Item {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: Value,
        name: Value,
        arguments: String,
        index: u64,
    },
}

/// Turns a chat stream's chunks into the Responses API's semantic events.
#[derive(Debug)]
pub struct ResponseStream {
    id: String,
    created_at: u64,
    echo: Echo,
    started: bool,
    sequence: u64,
    /// Items done, then the open one (last).
    items: Vec<(Item, bool)>,
    finish_reason: Option<String>,
    usage: Value,
}

/// One event: its name and its data.
pub type Event = (&'static str, Value);

impl ResponseStream {
    pub fn new(echo: Echo) -> Self {
        Self {
            id: new_id("resp"),
            created_at: now(),
            echo,
            started: false,
            sequence: 0,
            items: Vec::new(),
            finish_reason: None,
            usage: usage(&Value::Null),
        }
    }

    fn push(&mut self, out: &mut Vec<Event>, name: &'static str, mut data: Value) {
        data["type"] = name.into();
        data["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        out.push((name, data));
    }

    fn snapshot(&self, status: &str, output: Vec<Value>) -> Value {
        response_object(
            &self.id,
            self.created_at,
            &self.echo,
            status,
            output,
            if status == "in_progress" {
                Value::Null
            } else {
                self.usage.clone()
            },
        )
    }

    fn start(&mut self, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        let r = self.snapshot("in_progress", Vec::new());
        self.push(out, "response.created", json!({"response": r}));
        let r = self.snapshot("in_progress", Vec::new());
        self.push(out, "response.in_progress", json!({"response": r}));
    }

    /// The finished form of an item.
    fn done_item(item: &Item) -> Value {
        match item {
            Item::Message { id, text } => message_item(id, "completed", text),
            Item::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => call_item(id, "completed", call_id, name, arguments),
        }
    }

    /// Closes the open item, if any.
    fn close(&mut self, out: &mut Vec<Event>) {
        let Some(at) = self.items.iter().position(|(_, open)| *open) else {
            return;
        };
        self.items[at].1 = false;
        let item = Self::done_item(&self.items[at].0);
        match &self.items[at].0 {
            Item::Message { id, text } => {
                let (id, text) = (id.clone(), text.clone());
                let common = json!({"item_id": id, "output_index": at, "content_index": 0});
                let mut done = common.clone();
                done["text"] = text.clone().into();
                done["logprobs"] = json!([]);
                self.push(out, "response.output_text.done", done);
                let mut part = common;
                part["part"] =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                self.push(out, "response.content_part.done", part);
            }
            Item::Call { id, arguments, .. } => {
                let data = json!({"item_id": id, "output_index": at, "arguments": arguments});
                self.push(out, "response.function_call_arguments.done", data);
            }
        }
        self.push(
            out,
            "response.output_item.done",
            json!({"output_index": at, "item": item}),
        );
    }

    /// The events one chat chunk (its JSON) makes.
    pub fn on_chunk(&mut self, chunk: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        let Ok(c) = serde_json::from_slice::<Value>(chunk) else {
            return out;
        };
        self.start(&mut out);
        if c["usage"].is_object() {
            self.usage = usage(&c["usage"]);
        }
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let open_message = matches!(self.items.last(), Some((Item::Message { .. }, true)));
            if !open_message {
                self.close(&mut out);
                let id = new_id("msg");
                let at = self.items.len();
                let added = json!({"output_index": at, "item": {"type": "message", "id": id,
                    "status": "in_progress", "role": "assistant", "content": []}});
                self.push(&mut out, "response.output_item.added", added);
                let part = json!({"item_id": id, "output_index": at, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}});
                self.push(&mut out, "response.content_part.added", part);
                self.items.push((
                    Item::Message {
                        id,
                        text: String::new(),
                    },
                    true,
                ));
            }
            let at = self.items.len() - 1;
            if let Some((Item::Message { id, text }, _)) = self.items.last_mut() {
                text.push_str(t);
                let data = json!({"item_id": id, "output_index": at, "content_index": 0,
                                  "delta": t, "logprobs": []});
                self.push(&mut out, "response.output_text.delta", data);
            }
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0);
            let open_call = matches!(self.items.last(), Some((Item::Call { index: i, .. }, true)) if *i == index);
            if !open_call {
                self.close(&mut out);
                let id = new_id("fc");
                let (call_id, name) = (call["id"].clone(), call["function"]["name"].clone());
                let at = self.items.len();
                let added = json!({"output_index": at,
                    "item": call_item(&id, "in_progress", &call_id, &name, "")});
                self.push(&mut out, "response.output_item.added", added);
                self.items.push((
                    Item::Call {
                        id,
                        call_id,
                        name,
                        arguments: String::new(),
                        index,
                    },
                    true,
                ));
            }
            let at = self.items.len() - 1;
            if let Some(args) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
                && let Some((Item::Call { id, arguments, .. }, _)) = self.items.last_mut()
            {
                arguments.push_str(args);
                let data = json!({"item_id": id, "output_index": at, "delta": args});
                self.push(&mut out, "response.function_call_arguments.delta", data);
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(f.to_owned());
        }
        out
    }

    /// The events that end a stream that ran to its end.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        self.start(&mut out);
        self.close(&mut out);
        let status = status_of(self.finish_reason.as_deref());
        let output = self.items.iter().map(|(i, _)| Self::done_item(i)).collect();
        let r = self.snapshot(status, output);
        let name = if status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.push(&mut out, name, json!({"response": r}));
        out
    }

    /// The event that ends a stream that failed after it began.
    pub fn error(&mut self, e: &ApiError) -> Vec<Event> {
        let mut out = Vec::new();
        let data = json!({"code": e.code, "message": e.message, "param": e.param});
        self.push(&mut out, "error", data);
        out
    }
}

#[cfg(test)]
mod tests;
