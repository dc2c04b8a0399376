//! The built-in demo model: deterministic, no network, streams word by word. It makes a fresh
//! node answer a curl at once; it is not a language model.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use meridian_proto::ApiError;
use meridian_proto::ids::random_hex;
use meridian_proto::openai::{
    Api, ChatCompletion, ChatCompletionChunk, ChatRequest, Choice, ChunkChoice,
    DEFAULT_COMPLETION_MAX_TOKENS, Delta, Input, ResponseMessage, Role, Usage,
};

use super::{Chunk, ChunkStream, Completion, UpstreamError};

/// How many words of the user's message the demo repeats back.
const ECHO_WORDS: usize = 12;

#[derive(Debug, Clone)]
pub struct DemoModel {
    /// Pause before each streamed word, so a terminal shows tokens arriving.
    pub word_delay: Duration,
}

impl DemoModel {
    pub fn complete(&self, req: &ChatRequest, model: &str) -> Result<Completion, UpstreamError> {
        match req.api.upstream() {
            Api::Chat | Api::Messages | Api::Responses => {}
            Api::Completions => return text_completion(req, model),
            Api::Embeddings => return embeddings(req, model),
        }
        let answer = Answer::for_request(req)?;
        let body = ChatCompletion {
            id: format!("chatcmpl-{}", random_hex()),
            object: "chat.completion".into(),
            created: now(),
            model: model.to_owned(),
            choices: vec![Choice {
                index: 0,
                message: ResponseMessage {
                    role: "assistant".into(),
                    content: Some(answer.words.join(" ")),
                },
                logprobs: None,
                finish_reason: Some(answer.finish_reason.into()),
            }],
            usage: Some(answer.usage),
        };
        let body = serde_json::to_vec(&body).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        Ok(Completion {
            body: body.into(),
            usage: Some(answer.usage),
        })
    }

    pub fn stream(&self, req: &ChatRequest, model: &str) -> Result<ChunkStream, UpstreamError> {
        let answer = Answer::for_request(req)?;
        let events = match req.api.upstream() {
            Api::Chat | Api::Messages | Api::Responses => chat_chunks(&answer, model),
            Api::Completions => text_chunks(&answer, model),
            Api::Embeddings => {
                return Err(UpstreamError::Rejected(ApiError::invalid(
                    "stream",
                    "embeddings are answered whole",
                )));
            }
        };
        let delay = self.word_delay;
        let stream =
            futures::stream::iter(events.into_iter().enumerate()).then(move |(i, ev)| async move {
                // The role chunk and the closing chunks go out at once; words are paced.
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                ev
            });
        Ok(stream.boxed())
    }
}

/// A chat answer's chunks: the role, a word each, the finish reason, the usage.
fn chat_chunks(answer: &Answer, model: &str) -> Vec<Result<Chunk, UpstreamError>> {
    let base = ChatCompletionChunk {
        id: format!("chatcmpl-{}", random_hex()),
        object: "chat.completion.chunk".into(),
        created: now(),
        model: model.to_owned(),
        choices: Vec::new(),
        usage: None,
    };
    let chunk = |delta: Delta, finish: Option<&str>| {
        let mut c = base.clone();
        c.choices.push(ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish.map(Into::into),
        });
        encode(&c, None, false)
    };
    let mut events = Vec::with_capacity(answer.words.len() + 3);
    events.push(chunk(
        Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        },
        None,
    ));
    for (i, w) in answer.words.iter().enumerate() {
        let text = if i == 0 { w.clone() } else { format!(" {w}") };
        events.push(chunk(
            Delta {
                role: None,
                content: Some(text),
            },
            None,
        ));
    }
    events.push(chunk(Delta::default(), Some(answer.finish_reason)));
    let mut last = base.clone();
    last.usage = Some(answer.usage);
    events.push(encode(&last, Some(answer.usage), true));
    events
}

/// A text completion's chunks (`text_completion` objects, as OpenAI and vLLM stream them): a
/// word each, the finish reason, the usage.
fn text_chunks(answer: &Answer, model: &str) -> Vec<Result<Chunk, UpstreamError>> {
    let id = format!("cmpl-{}", random_hex());
    let created = now();
    let chunk = |text: &str, finish: Option<&str>, usage: Option<Usage>| {
        let choices = if usage.is_some() {
            serde_json::json!([])
        } else {
            serde_json::json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}])
        };
        let json = serde_json::json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage,
        });
        Ok(Chunk {
            json: Bytes::from(json.to_string()),
            usage,
            usage_only: usage.is_some(),
            generated: !text.is_empty(),
        })
    };
    let mut events = Vec::with_capacity(answer.words.len() + 2);
    for (i, w) in answer.words.iter().enumerate() {
        let text = if i == 0 { w.clone() } else { format!(" {w}") };
        events.push(chunk(&text, None, None));
    }
    events.push(chunk("", Some(answer.finish_reason), None));
    events.push(chunk("", None, Some(answer.usage)));
    events
}

/// A whole `text_completion`.
fn text_completion(req: &ChatRequest, model: &str) -> Result<Completion, UpstreamError> {
    let answer = Answer::for_request(req)?;
    let body = serde_json::json!({
        "id": format!("cmpl-{}", random_hex()),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "text": answer.words.join(" "),
            "logprobs": null,
            "finish_reason": answer.finish_reason,
        }],
        "usage": answer.usage,
    });
    Ok(Completion {
        body: Bytes::from(body.to_string()),
        usage: Some(answer.usage),
    })
}

/// Dimensions of the demo model's embeddings, unless `dimensions` asks for fewer.
const DEMO_DIMENSIONS: usize = 16;

/// One embedding per input, derived from its text (the same text, the same vector; not a
/// meaning), unit length, as floats or as base64 of little-endian `f32`s (OpenAI's encoding).
fn embeddings(req: &ChatRequest, model: &str) -> Result<Completion, UpstreamError> {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let dimensions = req
        .body
        .get("dimensions")
        .and_then(serde_json::Value::as_u64)
        .map_or(DEMO_DIMENSIONS, |d| (d as usize).min(DEMO_DIMENSIONS));
    let base64 = req.body.get("encoding_format").and_then(|f| f.as_str()) == Some("base64");
    let mut prompt_tokens = 0u64;
    let mut data = Vec::with_capacity(req.inputs.len());
    for (index, input) in req.inputs.iter().enumerate() {
        let seed = match input {
            Input::Text(t) => {
                prompt_tokens += t.split_whitespace().count().max(1) as u64;
                Sha256::digest(t.as_bytes())
            }
            Input::Tokens(n) => {
                prompt_tokens += n;
                Sha256::digest(n.to_le_bytes())
            }
        };
        let raw: Vec<f32> = (0..dimensions)
            .map(|i| f32::from(seed[i % seed.len()]) - 127.5)
            .collect();
        let norm = raw
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        let vector: Vec<f32> = raw.iter().map(|x| x / norm).collect();
        let embedding = if base64 {
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            serde_json::Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            serde_json::Value::from(vector)
        };
        data.push(
            serde_json::json!({"object": "embedding", "index": index, "embedding": embedding}),
        );
    }
    let tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
    let usage = Usage {
        prompt_tokens: tokens,
        total_tokens: tokens,
        ..Usage::default()
    };
    let body = serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(Completion {
        body: Bytes::from(body.to_string()),
        usage: Some(usage),
    })
}

fn encode(
    c: &ChatCompletionChunk,
    usage: Option<Usage>,
    usage_only: bool,
) -> Result<Chunk, UpstreamError> {
    let json = serde_json::to_vec(c).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    let generated = (c.choices.iter())
        .any(|choice| choice.delta.content.as_ref().is_some_and(|t| !t.is_empty()));
    Ok(Chunk {
        json: Bytes::from(json),
        usage,
        usage_only,
        generated,
    })
}

struct Answer {
    words: Vec<String>,
    finish_reason: &'static str,
    usage: Usage,
}

impl Answer {
    fn for_request(req: &ChatRequest) -> Result<Self, UpstreamError> {
        if req.params.n.unwrap_or(1) != 1 {
            return Err(UpstreamError::Rejected(ApiError::invalid(
                "n",
                "n: the demo model answers with one choice only",
            )));
        }
        let (prompt_tokens, last_user) = if req.api.upstream() == Api::Chat {
            let tokens: usize = req
                .params
                .messages
                .iter()
                .map(|m| m.text().split_whitespace().count() + 1)
                .sum();
            let last_user = req
                .params
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.text())
                .unwrap_or_default();
            (tokens, last_user)
        } else {
            let mut tokens = 0;
            let mut text = String::new();
            for input in &req.inputs {
                match input {
                    Input::Text(t) => {
                        tokens += t.split_whitespace().count() + 1;
                        text = t.clone();
                    }
                    Input::Tokens(n) => tokens += *n as usize,
                }
            }
            (tokens, text)
        };
        let mut echo: Vec<&str> = last_user.split_whitespace().take(ECHO_WORDS).collect();
        if last_user.split_whitespace().count() > ECHO_WORDS {
            echo.push("...");
        }
        let text = format!(
            "Hello from Meridian's built-in demo model. You said: \"{}\". I stream one word at a \
             time so you can watch tokens arrive. Add a provider to node.toml to route to a real model.",
            echo.join(" ")
        );
        let mut words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
        let mut finish_reason = "stop";
        let default_cap = (req.api == Api::Completions).then_some(DEFAULT_COMPLETION_MAX_TOKENS);
        if let Some(cap) = req.max_output_tokens().or(default_cap)
            && (cap as usize) < words.len()
        {
            words.truncate(cap as usize);
            finish_reason = "length";
        }
        let usage = Usage::new(
            u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            u32::try_from(words.len()).unwrap_or(u32::MAX),
        );
        Ok(Self {
            words,
            finish_reason,
            usage,
        })
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
