//! What a request will cost before it runs: the prompt counted with a real tokenizer, plus the
//! completion tokens it may generate.

use meridian_proto::openai::{ChatRequest, MessageContent};

/// A model family's tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tokenizer {
    /// GPT-4o, GPT-4.1, o-series.
    #[default]
    O200kBase,
    /// GPT-4, GPT-3.5, and a fair stand-in for many open models.
    Cl100kBase,
}

impl Tokenizer {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "o200k_base" => Some(Self::O200kBase),
            "cl100k_base" => Some(Self::Cl100kBase),
            _ => None,
        }
    }

    pub fn count(self, text: &str) -> u64 {
        let bpe = match self {
            Self::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Self::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        };
        bpe.encode_ordinary(text).len() as u64
    }
}

/// A model's price, in US dollars per million tokens (which is millionths of a dollar per
/// token).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

impl Price {
    /// What `prompt` and `completion` tokens cost, in millionths of a dollar (rounded up).
    pub fn micro_usd(&self, prompt: u64, completion: u64) -> u64 {
        (prompt as f64 * self.input_usd_per_mtok + completion as f64 * self.output_usd_per_mtok)
            .ceil()
            .max(0.0) as u64
    }
}

/// Completion tokens reserved for a request that sets no `max_tokens`.
pub const DEFAULT_COMPLETION_RESERVE: u64 = 1024;

/// Prompt tokens: every message's text, plus OpenAI's framing overhead (about 3 tokens a
/// message and 3 to prime the reply).
pub fn prompt_tokens(request: &ChatRequest, tokenizer: Tokenizer) -> u64 {
    let mut tokens = 3;
    for m in &request.params.messages {
        tokens += 3;
        match &m.content {
            Some(MessageContent::Text(t)) => tokens += tokenizer.count(t),
            Some(MessageContent::Parts(parts)) => {
                for p in parts {
                    if let Some(t) = &p.text {
                        tokens += tokenizer.count(t);
                    }
                }
            }
            None => {}
        }
        if let Some(name) = &m.name {
            tokens += 1 + tokenizer.count(name);
        }
    }
    tokens
}

/// The most completion tokens the request may generate (`n` choices each).
pub fn completion_reserve(request: &ChatRequest) -> u64 {
    let per_choice = request
        .params
        .max_completion_tokens
        .or(request.params.max_tokens)
        .map_or(DEFAULT_COMPLETION_RESERVE, u64::from);
    per_choice * u64::from(request.params.n.unwrap_or(1).max(1))
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
        assert_eq!(prompt_tokens(&r, t), 3 + 3 + 4 + 3 + user);
        assert_eq!(completion_reserve(&r), 100);
        let none = ChatRequest::from_json(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            &RequestLimits::default(),
        )
        .expect("valid");
        assert_eq!(completion_reserve(&none), DEFAULT_COMPLETION_RESERVE);
    }
}
