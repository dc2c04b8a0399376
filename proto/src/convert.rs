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

impl From<openai::Choice> for pb::ChatChoice {
    fn from(ch: openai::Choice) -> Self {
        Self {
            index: ch.index,
            message: Some(pb::ChatMessage {
                role: role(&ch.message.role) as i32,
                content: ch.message.content.unwrap_or_default(),
                name: None,
                tool_call_id: None,
            }),
            finish_reason: finish_reason(ch.finish_reason.as_deref()) as i32,
        }
    }
}

impl From<openai::ChunkChoice> for pb::ChunkChoice {
    fn from(ch: openai::ChunkChoice) -> Self {
        Self {
            index: ch.index,
            delta: Some(pb::ChatDelta {
                role: ch.delta.role.as_deref().map(|r| role(r) as i32),
                content: ch.delta.content.unwrap_or_default(),
            }),
            finish_reason: finish_reason(ch.finish_reason.as_deref()) as i32,
        }
    }
}

/// gRPC's answer and chunk from OpenAI's: the same envelope around different choices.
macro_rules! from_completion_object {
    ($($from:ty => $to:ty),*) => {$(
        impl From<$from> for $to {
            fn from(c: $from) -> Self {
                Self {
                    id: c.id,
                    model: c.model,
                    created: c.created,
                    choices: c.choices.into_iter().map(Into::into).collect(),
                    usage: c.usage.map(Into::into),
                }
            }
        }
    )*};
}

from_completion_object!(ChatCompletion => pb::ChatResponse, ChatCompletionChunk => pb::ChatChunk);

/// Admin API ↔ replicated state.
mod admin {
    use crate::cluster;
    use crate::pb::admin as pb;

    impl From<pb::Limits> for cluster::Limits {
        fn from(l: pb::Limits) -> Self {
            cluster::Limits {
                requests_per_minute: l.requests_per_minute,
                tokens_per_minute: l.tokens_per_minute,
                tokens_per_day: l.tokens_per_day,
                tokens_per_month: l.tokens_per_month,
                cost_per_day_micro_usd: l.cost_per_day_micro_usd,
            }
        }
    }

    impl From<cluster::Limits> for pb::Limits {
        fn from(l: cluster::Limits) -> Self {
            pb::Limits {
                requests_per_minute: l.requests_per_minute,
                tokens_per_minute: l.tokens_per_minute,
                tokens_per_day: l.tokens_per_day,
                tokens_per_month: l.tokens_per_month,
                cost_per_day_micro_usd: l.cost_per_day_micro_usd,
            }
        }
    }

    impl From<&cluster::Tier> for pb::Tier {
        fn from(t: &cluster::Tier) -> Self {
            pb::Tier {
                name: t.name.clone(),
                limits: Some(t.limits.into()),
                per_user: Some(t.per_user.into()),
            }
        }
    }

    impl From<&cluster::Tenant> for pb::Tenant {
        fn from(t: &cluster::Tenant) -> Self {
            pb::Tenant {
                id: t.id.clone(),
                tier: t.tier.clone(),
                overrides: Some(t.overrides.into()),
                created_at_unix_ms: t.created_at_unix_ms,
                updated_at_unix_ms: t.updated_at_unix_ms,
                per_user: Some(t.per_user.into()),
                features: t
                    .features
                    .iter()
                    .map(|(k, v)| (k.clone(), (*v).into()))
                    .collect(),
                regions: t.regions.clone(),
                models: t.models.clone(),
                weight: t.weight,
                engine_fields: t.engine_fields.clone(),
            }
        }
    }

    /// Why `name` cannot be an id of a tier or tenant, if it cannot: 1 to 64 of `A-Z a-z 0-9 _ . -`.
    pub fn invalid_name(name: &str) -> Option<String> {
        let ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        (!ok).then(|| format!("{name:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"))
    }
}

pub use admin::invalid_name;
