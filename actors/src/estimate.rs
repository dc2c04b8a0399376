//! What a request will cost before it runs: the prompt counted with a real tokenizer, plus the
//! completion tokens it may generate.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use meridian_proto::openai::{
    Api, ChatRequest, DEFAULT_COMPLETION_MAX_TOKENS, Input, MessageContent,
};

/// A model family's tokenizer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Tokenizer {
    /// GPT-4o, GPT-4.1, o-series.
    #[default]
    O200kBase,
    /// GPT-4, GPT-3.5, and a fair stand-in for many open models.
    Cl100kBase,
    /// A model's own `tokenizer.json` (Llama, Qwen, SmolLM and the other open models engines
    /// serve), read with Hugging Face's `tokenizers`: prompts are counted as the engine bills
    /// them.
    File(Arc<TokenizerFile>),
}

/// A `tokenizer.json`, loaded once per node and shared by the providers that name it, with
/// the model's chat template when one is beside it.
pub struct TokenizerFile {
    path: String,
    /// Tells its counts apart from other tokenizers' in the memo.
    tag: u64,
    tokenizer: tokenizers::Tokenizer,
    /// The chat template the engine wraps messages in (`chat_template.jinja` in the same
    /// folder, else `chat_template` in `tokenizer_config.json`), with the special tokens it
    /// names.
    template: Option<ChatTemplate>,
}

struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The template beside `tokenizer.json`, if there is one that parses.
    fn beside(path: &str) -> Option<Self> {
        let folder = std::path::Path::new(path).parent()?;
        let config: serde_json::Value = std::fs::read(folder.join("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let source = std::fs::read_to_string(folder.join("chat_template.jinja"))
            .ok()
            .or_else(|| match &config["chat_template"] {
                serde_json::Value::String(t) => Some(t.clone()),
                // Named templates: the default one.
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_owned),
                _ => None,
            })?;
        let special = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_owned(),
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned("chat", source).ok()?;
        Some(Self {
            env,
            bos: special("bos_token"),
            eos: special("eos_token"),
        })
    }

    /// The template's text around messages of these roles with no content, ready for the
    /// reply; `None` if the template refuses them.
    fn scaffold(&self, roles: &[&str]) -> Option<String> {
        let messages: Vec<_> = roles
            .iter()
            .map(|role| minijinja::context! { role => *role, content => "" })
            .collect();
        self.env
            .get_template("chat")
            .ok()?
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .ok()
    }
}

impl std::fmt::Debug for TokenizerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TokenizerFile").field(&self.path).finish()
    }
}

impl PartialEq for TokenizerFile {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}

impl Eq for TokenizerFile {}

impl std::hash::Hash for TokenizerFile {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.path.hash(state);
    }
}

/// Why a model's `tokenizer.json` cannot be used (what the tokenizer library says).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerFileError(tokenizers::Error);

impl Tokenizer {
    /// A tiktoken encoding by name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "o200k_base" => Some(Self::O200kBase),
            "cl100k_base" => Some(Self::Cl100kBase),
            _ => None,
        }
    }

    /// A model's `tokenizer.json`; the error says why it cannot be used.
    pub fn from_file(path: &str) -> Result<Self, TokenizerFileError> {
        // Special tokens written in a text (`<|im_start|>` in a rendered template) are read
        // as the special tokens, as the engine reads them (the library's default).
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(TokenizerFileError)?;
        let tag = std::collections::hash_map::RandomState::new().hash_one(path) | 2;
        Ok(Self::File(Arc::new(TokenizerFile {
            path: path.to_owned(),
            tag,
            tokenizer,
            template: ChatTemplate::beside(path),
        })))
    }

    /// Whether it counts chat messages with the model's own template.
    pub fn has_chat_template(&self) -> bool {
        matches!(self, Self::File(f) if f.template.is_some())
    }

    /// The tokens a chat template adds around messages of these roles (and to open the reply),
    /// counted with this tokenizer: `None` without a template, or if it refuses them.
    fn template_tokens(&self, roles: &[&str]) -> Option<u64> {
        let Self::File(f) = self else { return None };
        let scaffold = f.template.as_ref()?.scaffold(roles)?;
        Some(self.count(&scaffold))
    }

    /// Tokens in `text`. Counts are remembered per text (see [`Memo`]): system prompts and
    /// conversation history come back with every turn, and only new text is tokenized.
    pub fn count(&self, text: &str) -> u64 {
        let memo = Memo::get();
        let hash = memo.hash(self.tag(), text);
        if let Some(n) = memo.lookup(hash) {
            return n;
        }
        let n = self.count_uncached(text);
        memo.store(hash, n);
        n
    }

    /// Loads the tokenizer's tables (they load on first use otherwise).
    pub fn load(self) {
        self.count_uncached("");
    }

    fn tag(&self) -> u64 {
        match self {
            Self::O200kBase => 0,
            Self::Cl100kBase => 1,
            Self::File(f) => f.tag,
        }
    }

    fn count_uncached(&self, text: &str) -> u64 {
        let bpe = match self {
            Self::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Self::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            // No special tokens: the chat framing is counted apart, as for tiktoken.
            Self::File(f) => {
                return f.tokenizer.encode_fast(text, false).map_or_else(
                    // A text the tokenizer cannot take (it never happens with valid UTF-8):
                    // about four bytes a token, settled from the engine's usage afterwards.
                    |_| text.len().div_ceil(4) as u64,
                    |e| e.len() as u64,
                );
            }
        };
        bpe.encode_ordinary(text).len() as u64
    }
}

/// Token counts of recently seen texts: a direct-mapped table of [`MEMO_SLOTS`] words, each a
/// 40-bit tag of the text's hash and a 24-bit count, read and written with single atomic
/// operations (no lock; a slot holds whichever text was counted there last). The hash is keyed
/// per process, so nobody can craft two texts that share a slot and tag; even then, only the
/// estimate would be off, and the charge is settled from the provider's usage.
struct Memo {
    hasher: std::collections::hash_map::RandomState,
    slots: Box<[AtomicU64]>,
}

const MEMO_SLOTS: usize = 1 << 14;
const COUNT_BITS: u32 = 24;

impl Memo {
    /// The process's table.
    fn get() -> &'static Memo {
        static MEMO: OnceLock<Memo> = OnceLock::new();
        MEMO.get_or_init(Memo::new)
    }

    fn new() -> Memo {
        Memo {
            hasher: std::collections::hash_map::RandomState::new(),
            slots: (0..MEMO_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn hash(&self, tokenizer: u64, text: &str) -> u64 {
        self.hasher.hash_one((tokenizer, text))
    }

    /// The tag is the hash's top 40 bits; the slot comes from its low bits.
    fn slot(&self, hash: u64) -> (&AtomicU64, u64) {
        (
            &self.slots[hash as usize & (MEMO_SLOTS - 1)],
            hash >> COUNT_BITS,
        )
    }

    fn lookup(&self, hash: u64) -> Option<u64> {
        let (slot, tag) = self.slot(hash);
        let word = slot.load(Ordering::Relaxed);
        // An empty slot (0) reads as tag 0, count 0: a miss unless the tag is 0 too (then
        // one text in 2^40 is counted again; no harm either way but a recount).
        (word != 0 && word >> COUNT_BITS == tag).then_some(word & ((1 << COUNT_BITS) - 1))
    }

    fn store(&self, hash: u64, count: u64) {
        if count >= 1 << COUNT_BITS {
            return;
        }
        let (slot, tag) = self.slot(hash);
        slot.store(tag << COUNT_BITS | count, Ordering::Relaxed);
    }
}

/// Completion tokens reserved for a request that sets no `max_tokens`.
pub const DEFAULT_COMPLETION_RESERVE: u64 = 1024;

/// Prompt tokens an image is counted as unless configured otherwise (`[quota] image_tokens`):
/// OpenAI's count for a 1024×1024 image in high detail.
pub const DEFAULT_IMAGE_TOKENS: u64 = 765;

/// Prompt tokens: every message's text, plus the framing around the messages — the model's
/// own chat template when its tokenizer has one (what it adds around messages of these roles,
/// a default system prompt included), else OpenAI's overhead (about 3 tokens a message and 3
/// to prime the reply) — and everything else a provider puts in the prompt: the tool
/// definitions and a response schema (counted as their JSON text), the tool calls of earlier
/// turns, and `image_tokens` per image.
///
/// A text completion's prompts and an embeddings request's inputs are counted as they are (no
/// framing); token arrays by their length.
pub fn prompt_tokens(request: &ChatRequest, tokenizer: &Tokenizer, image_tokens: u64) -> u64 {
    if request.api.upstream() != Api::Chat {
        return request
            .inputs
            .iter()
            .map(|input| match input {
                Input::Text(t) => tokenizer.count(t),
                Input::Tokens(n) => *n,
            })
            .sum();
    }
    let messages = &request.params.messages;
    let roles: Vec<&str> = if tokenizer.has_chat_template() {
        messages.iter().map(|m| m.role.as_str()).collect()
    } else {
        Vec::new()
    };
    let mut tokens = tokenizer
        .template_tokens(&roles)
        .unwrap_or(3 + 3 * messages.len() as u64);
    for m in messages {
        match &m.content {
            Some(MessageContent::Text(t)) => tokens += tokenizer.count(t),
            Some(MessageContent::Parts(parts)) => {
                for p in parts {
                    if let Some(t) = &p.text {
                        tokens += tokenizer.count(t);
                    }
                    if matches!(p.kind.as_str(), "image_url" | "input_image" | "image") {
                        tokens += image_tokens;
                    }
                }
            }
            None => {}
        }
        if let Some(name) = &m.name {
            tokens += 1 + tokenizer.count(name);
        }
        if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) {
            tokens += tokenizer.count(&calls.to_string());
        }
    }
    for key in ["tools", "functions", "response_format"] {
        if let Some(v) = request.body.get(key).filter(|v| !v.is_null()) {
            tokens += tokenizer.count(&v.to_string());
        }
    }
    tokens
}

/// The most completion tokens the request may generate (`n` choices each; a text completion
/// generates `best_of` and returns the best `n`; an embedding generates none). A chat request
/// without a cap is reserved `default_max_tokens` a choice (its provider's setting, which it is
/// also capped at upstream); a text completion without `max_tokens` is capped by its engine at
/// [`DEFAULT_COMPLETION_MAX_TOKENS`].
pub fn completion_reserve(request: &ChatRequest, default_max_tokens: u32) -> u64 {
    let p = &request.params;
    let (default, choices) = match request.api {
        Api::Embeddings => return 0,
        Api::Chat | Api::Messages | Api::Responses => {
            (u64::from(default_max_tokens), p.n.unwrap_or(1))
        }
        Api::Completions => {
            let best_of = request.body.get("best_of").and_then(|b| b.as_u64());
            let n = u64::from(p.n.unwrap_or(1)).max(best_of.unwrap_or(1));
            (
                u64::from(DEFAULT_COMPLETION_MAX_TOKENS),
                u32::try_from(n).unwrap_or(u32::MAX),
            )
        }
    };
    let per_choice = p
        .max_completion_tokens
        .or(p.max_tokens)
        .map_or(default, u64::from);
    per_choice * u64::from(choices.max(1))
}

#[cfg(test)]
mod tests {
    use meridian_proto::openai::RequestLimits;

    use super::*;

    #[test]
    fn prompts_are_counted_with_the_tokenizer() {
        let body = br#"{"model":"m","max_tokens":50,"n":2,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the whole world, please."}]}"#;
        let r = ChatRequest::from_json(body, &RequestLimits::default()).expect("valid");
        let t = Tokenizer::O200kBase;
        assert_eq!(t.count("You are terse."), 4);
        assert_eq!(t.count("hello world"), 2);
        let user = t.count("Say hello to the whole world, please.");
        assert!((8..=10).contains(&user), "{user}");
        // The text, plus 3 to prime the reply and 3 per message.
        assert_eq!(
            prompt_tokens(&r, &t, DEFAULT_IMAGE_TOKENS),
            3 + 3 + 4 + 3 + user
        );
        assert_eq!(completion_reserve(&r, 300), 100, "the client's own cap");
        let none = ChatRequest::from_json(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            &RequestLimits::default(),
        )
        .expect("valid");
        assert_eq!(
            completion_reserve(&none, 300),
            300,
            "its provider's default"
        );
    }

    #[test]
    fn tools_schemas_tool_calls_and_images_count_as_prompt() {
        let t = Tokenizer::O200kBase;
        let plain = br#"{"model":"m","messages":[{"role":"user","content":"weather in Paris?"}]}"#;
        let base = prompt_tokens(
            &ChatRequest::from_json(plain, &RequestLimits::default()).expect("valid"),
            &t,
            DEFAULT_IMAGE_TOKENS,
        );
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Current weather for a city", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let schema = serde_json::json!({"type": "json_schema", "json_schema": {"name": "w",
            "schema": {"type": "object", "properties": {"temp": {"type": "number"}}}}});
        let calls = serde_json::json!([{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]);
        let body = serde_json::json!({"model": "m", "tools": tools, "response_format": schema,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]});
        let r = ChatRequest::from_json(body.to_string().as_bytes(), &RequestLimits::default())
            .expect("valid");
        let json = |v: &serde_json::Value| t.count(&v.to_string());
        let expected = base
            + DEFAULT_IMAGE_TOKENS
            + json(&tools)
            + json(&schema)
            + json(&calls)
            + (3 + 3 + t.count("18 C"));
        assert_eq!(prompt_tokens(&r, &t, DEFAULT_IMAGE_TOKENS), expected);
        assert_eq!(
            prompt_tokens(&r, &t, 100),
            expected - DEFAULT_IMAGE_TOKENS + 100,
            "the configured cost of an image"
        );
    }

    #[test]
    fn remembered_counts_are_the_tokenizers_counts() {
        let texts: Vec<String> = (0..3000)
            .map(|i| format!("message {i}: {}", "lorem ipsum ".repeat(i % 7)))
            .collect();
        for t in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            // Twice: counted, then (where the slot still holds it) remembered.
            for _ in 0..2 {
                for text in &texts {
                    assert_eq!(t.count(text), t.count_uncached(text), "{text:?}");
                }
            }
        }
        // The same text under the two tokenizers is two entries (a text they count differently,
        // so that one entry answering for both would show).
        let text = "Привет, как дела? Всё хорошо.";
        assert_ne!(
            Tokenizer::Cl100kBase.count_uncached(text),
            Tokenizer::O200kBase.count_uncached(text)
        );
        assert_eq!(
            Tokenizer::Cl100kBase.count(text),
            Tokenizer::Cl100kBase.count_uncached(text)
        );
        assert_eq!(
            Tokenizer::O200kBase.count(text),
            Tokenizer::O200kBase.count_uncached(text)
        );
    }

    #[test]
    fn the_memo_keeps_tags_and_counts_apart() {
        // A table of its own: the other tests fill the process's table in parallel.
        let memo = Memo::new();
        let hash = 0xABCD_EF01_2345_6789_u64;
        memo.store(hash, 77);
        assert_eq!(memo.lookup(hash), Some(77));
        // Same slot, another tag: a miss.
        assert_eq!(memo.lookup(hash ^ (1 << 40)), None);
        // Counts that do not fit are not remembered.
        let big = 0x1111_2222_3333_4444_u64;
        memo.store(big, 1 << COUNT_BITS);
        assert_eq!(memo.lookup(big), None);
    }
}
