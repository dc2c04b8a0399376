//! Conversions between the gRPC messages and the OpenAI-compatible JSON shapes, so both edges
//! share one request path.

use crate::error::ApiError;
use crate::openai::{
    self, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, MessageContent, Stop,
};
use crate::pb::v1 as pb;

impl TryFrom<pb::ChatRequest> for ChatCompletionRequest {
    type Error = ApiError;

    fn try_from(r: pb::ChatRequest) -> Result<Self, ApiError> {
        let messages = r
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match pb::Role::try_from(m.role) {
                    Ok(pb::Role::System) => openai::Role::System,
                    Ok(pb::Role::Developer) => openai::Role::Developer,
                    Ok(pb::Role::User) => openai::Role::User,
                    Ok(pb::Role::Assistant) => openai::Role::Assistant,
                    Ok(pb::Role::Tool) => openai::Role::Tool,
                    Ok(pb::Role::Unspecified) | Err(_) => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].role"),
                            format!("messages[{i}].role must be set to a known role"),
                        ));
                    }
                };
                Ok(openai::ChatMessage {
                    role,
                    content: Some(MessageContent::Text(m.content)),
                    name: m.name,
                    tool_call_id: m.tool_call_id,
                    tool_calls: None,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            model: r.model,
            messages,
            stream: None,
            stream_options: None,
            max_tokens: r.max_tokens,
            max_completion_tokens: None,
            temperature: r.temperature.map(f64::from),
            top_p: r.top_p.map(f64::from),
            n: None,
            stop: (!r.stop.is_empty()).then_some(Stop::Many(r.stop)),
            seed: r.seed,
            user: r.user,
        })
    }
}

/// An OpenAI `finish_reason` as the proto enum.
pub fn finish_reason(reason: Option<&str>) -> pb::FinishReason {
    match reason {
        Some("stop") => pb::FinishReason::Stop,
        Some("length") => pb::FinishReason::Length,
        Some("tool_calls" | "function_call") => pb::FinishReason::ToolCalls,
        Some("content_filter") => pb::FinishReason::ContentFilter,
        _ => pb::FinishReason::Unspecified,
    }
}

fn role(role: &str) -> pb::Role {
    match role {
        "system" => pb::Role::System,
        "developer" => pb::Role::Developer,
        "user" => pb::Role::User,
        "tool" => pb::Role::Tool,
        _ => pb::Role::Assistant,
    }
}

impl From<openai::Usage> for pb::Usage {
    fn from(u: openai::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            cached_tokens: u.cached_tokens(),
        }
    }
}

impl From<ChatCompletion> for pb::ChatResponse {
    fn from(c: ChatCompletion) -> Self {
        Self {
            id: c.id,
            model: c.model,
            created: c.created,
            choices: c
                .choices
                .into_iter()
                .map(|ch| pb::ChatChoice {
                    index: ch.index,
                    message: Some(pb::ChatMessage {
                        role: role(&ch.message.role) as i32,
                        content: ch.message.content.unwrap_or_default(),
                        name: None,
                        tool_call_id: None,
                    }),
                    finish_reason: finish_reason(ch.finish_reason.as_deref()) as i32,
                })
                .collect(),
            usage: c.usage.map(Into::into),
        }
    }
}

impl From<ChatCompletionChunk> for pb::ChatChunk {
    fn from(c: ChatCompletionChunk) -> Self {
        Self {
            id: c.id,
            model: c.model,
            created: c.created,
            choices: c
                .choices
                .into_iter()
                .map(|ch| pb::ChunkChoice {
                    index: ch.index,
                    delta: Some(pb::ChatDelta {
                        role: ch.delta.role.as_deref().map(|r| role(r) as i32),
                        content: ch.delta.content.unwrap_or_default(),
                    }),
                    finish_reason: finish_reason(ch.finish_reason.as_deref()) as i32,
                })
                .collect(),
            usage: c.usage.map(Into::into),
        }
    }
}
