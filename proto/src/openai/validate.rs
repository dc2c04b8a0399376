//! What a request must be before it goes anywhere: the engine-specific fields only granted
//! tenants may send, the documented shape of the fields passed through as written, and the
//! typed request's bounds.

use serde_json::{Map, Value};

use super::*;

/// Request fields of particular engines that change scheduling, prompt templates, decoding or
/// cost: only a tenant granted them (`Tenant::engine_fields`) may send them. Sorted: a
/// request's keys are looked up in it by binary search.
pub const RESTRICTED_FIELDS: [&str; 15] = [
    "chat_template",
    "chat_template_kwargs",
    "guided_choice",
    "guided_decoding_backend",
    "guided_grammar",
    "guided_json",
    "guided_regex",
    "guided_whitespace_pattern",
    "mm_processor_kwargs",
    "priority",
    "prompt_logprobs",
    "service_tier",
    "store",
    "structured_outputs",
    "vllm_xargs",
];

impl ChatRequest {
    /// The first engine-specific field this request sends that `granted` does not list. Walks
    /// the request's own keys (a few), not the list.
    pub fn restricted_field(&self, granted: &[String]) -> Option<&'static str> {
        self.body
            .keys()
            .filter_map(|k| RESTRICTED_FIELDS.binary_search(&k.as_str()).ok())
            .map(|i| RESTRICTED_FIELDS[i])
            .find(|f| !granted.iter().any(|g| g == f))
    }
}

/// The fields passed to providers as the client wrote them (not modelled here) must at least
/// have their documented shape: a malformed one is the client's 400 here, not a provider's
/// failure (which would count against the provider's breaker).
pub(super) fn validate_passed_through(body: &Map<String, Value>) -> Result<(), ApiError> {
    let is_name = |v: &Value| {
        v.as_str().is_some_and(|s| {
            (1..=64).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        })
    };
    let typed = |v: &Value| v.get("type").is_some_and(Value::is_string);
    if let Some(tools) = body.get("tools").filter(|v| !v.is_null()) {
        let Some(list) = tools.as_array() else {
            return Err(ApiError::invalid(
                "tools",
                "tools must be an array of tool objects",
            ));
        };
        for (i, t) in list.iter().enumerate() {
            if !t.is_object() || !typed(t) {
                return Err(ApiError::invalid(
                    format!("tools[{i}]"),
                    format!("tools[{i}] must be an object with a string `type`"),
                ));
            }
            if t["type"] == "function" {
                let f = &t["function"];
                if !f.is_object() || !is_name(&f["name"]) {
                    return Err(ApiError::invalid(
                        format!("tools[{i}].function.name"),
                        format!(
                            "tools[{i}].function.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"
                        ),
                    ));
                }
                if !(f["parameters"].is_null() || f["parameters"].is_object()) {
                    return Err(ApiError::invalid(
                        format!("tools[{i}].function.parameters"),
                        format!("tools[{i}].function.parameters must be a JSON Schema object"),
                    ));
                }
            }
        }
    }
    if let Some(choice) = body.get("tool_choice").filter(|v| !v.is_null()) {
        let ok = match choice {
            Value::String(s) => matches!(s.as_str(), "none" | "auto" | "required"),
            Value::Object(_) => typed(choice),
            _ => false,
        };
        if !ok {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice must be \"none\", \"auto\", \"required\" or an object with a `type`",
            ));
        }
    }
    if let Some(format) = body.get("response_format").filter(|v| !v.is_null()) {
        let ok = match format["type"].as_str() {
            Some("text" | "json_object") => true,
            Some("json_schema") => {
                format["json_schema"].is_object() && is_name(&format["json_schema"]["name"])
            }
            _ => false,
        };
        if !ok {
            return Err(ApiError::invalid(
                "response_format",
                "response_format must be {\"type\":\"text\"}, {\"type\":\"json_object\"} or {\"type\":\"json_schema\",\"json_schema\":{\"name\":…,\"schema\":…}}",
            ));
        }
    }
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for (i, m) in messages.iter().enumerate() {
            let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) else {
                continue;
            };
            let well_formed = calls.as_array().is_some_and(|list| {
                list.iter().all(|c| {
                    c["id"].is_string()
                        && typed(c)
                        && (c["type"] != "function"
                            || (is_name(&c["function"]["name"])
                                && c["function"]["arguments"].is_string()))
                })
            });
            if !well_formed {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    format!(
                        "messages[{i}].tool_calls must be an array of {{id, type, function: {{name, arguments (a string)}}}}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A list field `param` may hold at most `max` items (`what` names them in the error).
pub(super) fn at_most(param: &str, what: &str, count: usize, max: usize) -> Result<(), ApiError> {
    if count > max {
        return Err(ApiError::invalid(
            param,
            format!("{param} has {count} {what}; at most {max} are accepted"),
        ));
    }
    Ok(())
}

pub(super) fn validate(p: &ChatCompletionRequest, limits: &RequestLimits) -> Result<(), ApiError> {
    if p.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    at_most("messages", "entries", p.messages.len(), limits.max_messages)?;
    for (i, m) in p.messages.iter().enumerate() {
        let content_missing = match &m.content {
            None => true,
            Some(MessageContent::Parts(parts)) => parts.is_empty(),
            Some(MessageContent::Text(_)) => false,
        };
        if content_missing && !(m.role == Role::Assistant && m.tool_calls.is_some()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                format!(
                    "messages[{i}].content is required for a {} message",
                    m.role.as_str()
                ),
            ));
        }
        if m.role == Role::Tool && m.tool_call_id.is_none() {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_call_id"),
                format!("messages[{i}].tool_call_id is required for a tool message"),
            ));
        }
    }
    validate_common(p, limits)
}

/// What a chat request and a text completion check alike: the model, the output caps and the
/// sampling parameters.
pub(super) fn validate_common(
    p: &ChatCompletionRequest,
    limits: &RequestLimits,
) -> Result<(), ApiError> {
    if p.model.trim().is_empty() {
        return Err(ApiError::invalid("model", "model must not be empty"));
    }
    for (field, value) in [
        ("max_tokens", p.max_tokens),
        ("max_completion_tokens", p.max_completion_tokens),
    ] {
        if let Some(v) = value
            && (v == 0 || v > limits.max_output_tokens)
        {
            return Err(ApiError::invalid(
                field,
                format!(
                    "{field} must be between 1 and {}, got {v}",
                    limits.max_output_tokens
                ),
            ));
        }
    }
    if let Some(t) = p.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {t}"),
        ));
    }
    if let Some(t) = p.top_p
        && !(0.0..=1.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be between 0 and 1, got {t}"),
        ));
    }
    if let Some(n) = p.n
        && (n == 0 || n > limits.max_n)
    {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {}, got {n}", limits.max_n),
        ));
    }
    if let Some(stop) = &p.stop {
        let stops = stop.as_slice();
        at_most("stop", "sequences", stops.len(), MAX_STOP_SEQUENCES)?;
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "stop sequences must not be empty",
            ));
        }
    }
    if p.stream_options.is_some() && p.stream != Some(true) {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok(())
}
