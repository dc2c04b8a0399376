//! The exact response cache of a node: bounded in entries and in bytes, with a TTL, keyed by
//! tenant + model + the normalised request (+ the complexity a virtual model was asked with).
//! Only deterministic requests are cached (temperature 0, or a seed, or the client opts in), only
//! whole (non-streamed) answers are stored, and a tenant never sees another tenant's entries
//! (the tenant is part of the key). A hit is still admitted (see the pipeline): the tenant must
//! still be allowed the model, and it counts against its request limits.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use meridian_proto::openai::{Api, ChatRequest};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    pub max_entries: usize,
    pub ttl: Duration,
    /// Answers larger than this are not kept.
    pub max_body_bytes: usize,
    /// Most bytes of answers kept in all (the oldest go first).
    pub max_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            ttl: Duration::from_secs(300),
            max_body_bytes: 1 << 20,
            max_bytes: 256 << 20,
        }
    }
}

#[derive(Debug)]
pub struct ResponseCache {
    config: CacheConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<[u8; 32], (Instant, Bytes)>,
    /// Insertion order, for eviction when full.
    order: VecDeque<[u8; 32]>,
    /// Bytes of the answers kept.
    bytes: usize,
    hits: u64,
    misses: u64,
}

/// A request's cache key (present only for cacheable requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey([u8; 32]);

impl ResponseCache {
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The key of `request` from `tenant`, if it may be cached: deterministic (temperature 0 or
    /// a seed) or `opt_in`, and one choice. Streaming flags are not part of the key, so a
    /// stream can be answered from a whole answer; nor are the end user's identifiers (`user`,
    /// `safety_identifier`), which do not change the answer, so users of one tenant asking the
    /// same share it (each is still admitted, and counted, as itself).
    pub fn key(
        tenant: &str,
        request: &ChatRequest,
        opt_in: bool,
        complexity: Option<&str>,
    ) -> Option<CacheKey> {
        let p = &request.params;
        // An embedding is a function of its input.
        let deterministic =
            request.api == Api::Embeddings || p.temperature == Some(0.0) || p.seed.is_some();
        if !(deterministic || opt_in) || p.n.unwrap_or(1) != 1 {
            return None;
        }
        // Only a chat answer can be replayed as a stream today (`as_chunks`).
        if request.api.upstream() != Api::Chat && request.stream() {
            return None;
        }
        // The body without its streaming flags and user identifiers, by reference (no copy),
        // with sorted keys: the encoding is canonical.
        let body: std::collections::BTreeMap<&String, &Value> = request
            .body
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "stream" | "stream_options" | "user" | "safety_identifier"
                )
            })
            .collect();
        let normalised = serde_json::to_vec(&body).ok()?;
        let mut h = Sha256::new();
        h.update((tenant.len() as u64).to_be_bytes());
        h.update(tenant.as_bytes());
        // The complexity a client names picks the model behind a virtual one.
        let complexity = complexity.unwrap_or("");
        h.update((complexity.len() as u64).to_be_bytes());
        h.update(complexity.as_bytes());
        h.update([request.api as u8]);
        h.update(normalised);
        Some(CacheKey(h.finalize().into()))
    }

    pub fn get(&self, key: CacheKey) -> Option<Bytes> {
        let mut inner = self.lock();
        let now = Instant::now();
        let found = match inner.entries.get(&key.0) {
            Some((expires, body)) if *expires > now => Some(body.clone()),
            _ => None,
        };
        if found.is_some() {
            inner.hits += 1;
        } else {
            inner.misses += 1;
            if let Some((_, gone)) = inner.entries.remove(&key.0) {
                inner.bytes -= gone.len();
            }
        }
        found
    }

    pub fn put(&self, key: CacheKey, body: Bytes) {
        let size = body.len();
        if size > self.config.max_body_bytes.min(self.config.max_bytes)
            || self.config.max_entries == 0
        {
            return;
        }
        let mut inner = self.lock();
        let expires = Instant::now() + self.config.ttl;
        inner.bytes += size;
        match inner.entries.insert(key.0, (expires, body)) {
            None => inner.order.push_back(key.0),
            Some((_, old)) => inner.bytes -= old.len(),
        }
        while inner.entries.len() > self.config.max_entries || inner.bytes > self.config.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some((_, gone)) = inner.entries.remove(&oldest) {
                inner.bytes -= gone.len();
            }
        }
        // Keep the order queue from growing with entries that expired and were removed.
        if inner.order.len() > 2 * self.config.max_entries {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|k| entries.contains_key(k));
        }
    }

    /// (hits, misses) so far.
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.hits, inner.misses)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A stream's chat chunks gathered into the whole `chat.completion` they make, so that a
/// streamed answer is cached like a whole one (and replayed either way). One choice: a request
/// with `n > 1` is never cached.
#[derive(Debug, Default)]
pub struct StreamCollector {
    first: Option<Value>,
    content: String,
    /// Tool calls by their index: id, name and the arguments' pieces joined.
    tool_calls: Vec<Value>,
    finish_reason: Option<Value>,
    usage: Option<Value>,
    /// A chunk that was not JSON: the answer is not kept.
    broken: bool,
}

impl StreamCollector {
    pub fn push(&mut self, chunk: &[u8]) {
        let Ok(c) = serde_json::from_slice::<Value>(chunk) else {
            self.broken = true;
            return;
        };
        if let Some(u) = c.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str() {
            self.content.push_str(t);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = call["index"].as_u64().unwrap_or(0) as usize;
            while self.tool_calls.len() <= i {
                self.tool_calls.push(serde_json::json!({
                    "id": null, "type": "function", "function": {"name": null, "arguments": ""}}));
            }
            let into = &mut self.tool_calls[i];
            if call["id"].is_string() {
                into["id"] = call["id"].clone();
            }
            if call["function"]["name"].is_string() {
                into["function"]["name"] = call["function"]["name"].clone();
            }
            if let Some(a) = call["function"]["arguments"].as_str() {
                let joined = format!(
                    "{}{a}",
                    into["function"]["arguments"].as_str().unwrap_or("")
                );
                into["function"]["arguments"] = joined.into();
            }
        }
        if !choice["finish_reason"].is_null() && choice.get("finish_reason").is_some() {
            self.finish_reason = Some(choice["finish_reason"].clone());
        }
        if self.first.is_none() {
            self.first = Some(c);
        }
    }

    /// The usage as the provider reported it (when the client did not ask for the usage
    /// chunk, it never passes through [`StreamCollector::push`]).
    pub fn set_usage(&mut self, usage: &meridian_proto::openai::Usage) {
        self.usage = serde_json::to_value(usage).ok();
    }

    /// The whole answer, once the stream ran to its end.
    pub fn completion(self) -> Option<Bytes> {
        if self.broken {
            return None;
        }
        let first = self.first?;
        let mut message = serde_json::json!({"role": "assistant", "content": self.content});
        if !self.tool_calls.is_empty() {
            message["tool_calls"] = self.tool_calls.into();
            if self.content.is_empty() {
                message["content"] = Value::Null;
            }
        }
        let completion = serde_json::json!({
            "id": first["id"], "object": "chat.completion", "created": first["created"],
            "model": first["model"],
            "choices": [{"index": 0, "message": message, "logprobs": null,
                         "finish_reason": self.finish_reason.unwrap_or(Value::Null)}],
            "usage": self.usage.unwrap_or(Value::Null),
        });
        serde_json::to_vec(&completion).ok().map(Bytes::from)
    }
}

/// A cached whole answer replayed as the chunks a stream would have carried: the role, the
/// content, the tool calls, the finish reason, and (if asked) the usage, each as one
/// `chat.completion.chunk`.
pub fn as_chunks(completion: &[u8], include_usage: bool) -> Option<Vec<String>> {
    let c: Value = serde_json::from_slice(completion).ok()?;
    let choice = c.get("choices")?.get(0)?;
    let base = |choices: Value| {
        serde_json::json!({
            "id": c.get("id").cloned().unwrap_or(Value::Null),
            "object": "chat.completion.chunk",
            "created": c.get("created").cloned().unwrap_or(Value::Null),
            "model": c.get("model").cloned().unwrap_or(Value::Null),
            "choices": choices,
        })
    };
    let content = choice
        .get("message")
        .and_then(|m| m.get("content"))
        .cloned()
        .unwrap_or(Value::String(String::new()));
    let mut chunks = vec![
        base(
            serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        ),
        base(
            serde_json::json!([{"index": 0, "delta": {"content": content}, "finish_reason": null}]),
        ),
    ];
    if let Some(calls) = choice
        .get("message")
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
    {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                c["index"] = i.into();
                c
            })
            .collect();
        chunks.push(base(
            serde_json::json!([{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": null}]),
        ));
    }
    chunks.extend([
        base(
            serde_json::json!([{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason").cloned().unwrap_or(Value::Null)}]),
        ),
    ]);
    if include_usage {
        let mut last = base(serde_json::json!([]));
        last["usage"] = c.get("usage").cloned().unwrap_or(Value::Null);
        chunks.push(last);
    }
    Some(chunks.iter().map(Value::to_string).collect())
}

#[cfg(test)]
mod tests {
    use meridian_proto::openai::RequestLimits;

    use super::*;

    fn request(body: &str) -> ChatRequest {
        ChatRequest::from_json(body.as_bytes(), &RequestLimits::default()).expect("valid")
    }

    #[test]
    fn only_deterministic_requests_have_keys_and_tenants_never_share_them() {
        let det =
            request(r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"x"}]}"#);
        let streamed = request(
            r#"{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"x"}]}"#,
        );
        let random = request(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#);
        assert!(ResponseCache::key("a", &random, false, None).is_none());
        assert!(ResponseCache::key("a", &random, true, None).is_some());
        assert_eq!(
            ResponseCache::key("a", &det, false, None),
            ResponseCache::key("a", &streamed, false, None),
            "streaming does not change the answer"
        );
        let by_user = |user: &str| {
            let body = format!(
                r#"{{"model":"m","temperature":0,"user":"{user}","safety_identifier":"{user}","messages":[{{"role":"user","content":"x"}}]}}"#
            );
            ResponseCache::key("a", &request(&body), false, None)
        };
        assert_eq!(by_user("u1"), by_user("u2"), "nor does the end user's id");
        assert_eq!(by_user("u1"), ResponseCache::key("a", &det, false, None));
        assert_ne!(
            ResponseCache::key("a", &det, false, None),
            ResponseCache::key("b", &det, false, None)
        );
        let cache = ResponseCache::new(CacheConfig {
            max_entries: 1,
            ..CacheConfig::default()
        });
        let (ka, kb) = (
            ResponseCache::key("a", &det, false, None).expect("key"),
            ResponseCache::key("b", &det, false, None).expect("key"),
        );
        cache.put(ka, Bytes::from_static(b"A"));
        assert_eq!(cache.get(ka).as_deref(), Some(&b"A"[..]));
        assert_eq!(cache.get(kb), None, "never another tenant's answer");
        cache.put(kb, Bytes::from_static(b"B"));
        assert_eq!(cache.get(ka), None, "bounded: the oldest went");
        assert_eq!(cache.counts(), (1, 2));
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_and_keyed_by_the_complexity_asked() {
        let det = request(
            r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"x"}]}"#,
        );
        assert_ne!(
            ResponseCache::key("a", &det, false, Some("hard")),
            ResponseCache::key("a", &det, false, Some("easy")),
            "another complexity, another model behind `auto`"
        );
        let cache = ResponseCache::new(CacheConfig {
            max_bytes: 10,
            ..CacheConfig::default()
        });
        let key = |n: &str| ResponseCache::key("a", &det, false, Some(n)).expect("a key");
        cache.put(key("1"), Bytes::from_static(b"12345"));
        cache.put(key("2"), Bytes::from_static(b"12345"));
        cache.put(key("3"), Bytes::from_static(b"123"));
        assert_eq!(cache.get(key("1")), None, "over 10 bytes: the oldest went");
        assert!(cache.get(key("2")).is_some() && cache.get(key("3")).is_some());
        cache.put(key("4"), Bytes::from_static(b"12345678901"));
        assert_eq!(
            cache.get(key("4")),
            None,
            "larger than the whole cache: not kept"
        );
        // Replacing an entry counts its new size only.
        cache.put(key("3"), Bytes::from_static(b"1"));
        assert!(cache.get(key("2")).is_some() && cache.get(key("3")).is_some());
    }

    #[test]
    fn a_whole_answer_replays_as_chunks() {
        let body = br#"{"id":"c1","object":"chat.completion","created":5,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let chunks = as_chunks(body, true).expect("chunks");
        assert_eq!(chunks.len(), 4);
        let content: Value = serde_json::from_str(&chunks[1]).expect("json");
        assert_eq!(content["choices"][0]["delta"]["content"], "hi there");
        let last: Value = serde_json::from_str(&chunks[3]).expect("json");
        assert_eq!(last["usage"]["total_tokens"], 5);
        assert_eq!(as_chunks(body, false).expect("chunks").len(), 3);
    }
}
