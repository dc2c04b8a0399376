//! Streamed chat-completion fixtures shared by the unit tests of the API translators that turn
//! an OpenAI chat stream into another API's events (Anthropic Messages, OpenAI Responses).

use serde_json::{Value, json};

/// An event a translator emits: its name and its data.
pub(crate) type Event = (&'static str, Value);

/// A translator fed chat-completion chunks one at a time.
pub(crate) trait ChunkStream {
    fn on_chunk(&mut self, chunk: &[u8]) -> Vec<Event>;
    fn finish(&mut self) -> Vec<Event>;
}

impl ChunkStream for crate::anthropic::MessageStream {
    fn on_chunk(&mut self, chunk: &[u8]) -> Vec<Event> {
        crate::anthropic::MessageStream::on_chunk(self, chunk)
    }
    fn finish(&mut self) -> Vec<Event> {
        crate::anthropic::MessageStream::finish(self)
    }
}

impl ChunkStream for crate::responses::ResponseStream {
    fn on_chunk(&mut self, chunk: &[u8]) -> Vec<Event> {
        crate::responses::ResponseStream::on_chunk(self, chunk)
    }
    fn finish(&mut self) -> Vec<Event> {
        crate::responses::ResponseStream::finish(self)
    }
}

/// One chunk of chat completion `c1` with a single choice.
fn chunk(delta: Value, finish: Value) -> String {
    json!({"id": "c1", "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

/// The chunks of a reply that writes `text` (in pieces), then calls tool `f` as `call_id` with
/// `arguments` (in pieces), finishes with `tool_calls` and reports the usage
/// `(prompt_tokens, completion_tokens)` in a last, choice-less chunk.
pub(crate) fn text_then_tool_call(
    text: &[&str],
    call_id: &str,
    arguments: &[&str],
    (prompt_tokens, completion_tokens): (u64, u64),
) -> Vec<String> {
    let mut chunks = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    chunks.extend(
        text.iter()
            .map(|t| chunk(json!({"content": t}), Value::Null)),
    );
    chunks.push(chunk(
        json!({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                               "function": {"name": "f", "arguments": ""}}]}),
        Value::Null,
    ));
    chunks.extend(arguments.iter().map(|a| {
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}),
            Value::Null,
        )
    }));
    chunks.push(chunk(json!({}), json!("tool_calls")));
    chunks.push(
        json!({"id": "c1", "choices": [],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}})
        .to_string(),
    );
    chunks
}

/// Feeds `chunks` to `stream` in order, then finishes it; returns every event emitted.
pub(crate) fn stream_events(stream: &mut impl ChunkStream, chunks: &[String]) -> Vec<Event> {
    let mut events = Vec::new();
    for c in chunks {
        events.extend(stream.on_chunk(c.as_bytes()));
    }
    events.extend(stream.finish());
    events
}

/// The names of `events`, in order.
pub(crate) fn event_names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|(n, _)| *n).collect()
}
