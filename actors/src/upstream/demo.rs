//! The built-in demo model: deterministic, no network, streams word by word. It makes a fresh
//! node answer a curl at once; it is not a language model.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use meridian_proto::ApiError;
use meridian_proto::ids::random_hex;
use meridian_proto::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Choice, ChunkChoice, Delta, ResponseMessage,
    Role, Usage,
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

fn encode(
    c: &ChatCompletionChunk,
    usage: Option<Usage>,
    usage_only: bool,
) -> Result<Chunk, UpstreamError> {
    let json = serde_json::to_vec(c).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    Ok(Chunk {
        json: Bytes::from(json),
        usage,
        usage_only,
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
        let prompt_tokens: usize = req
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
        if let Some(cap) = req.max_output_tokens()
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
