//! What a call costs: its tokens by how they are billed, at a price per million tokens of each
//! kind, in whole millionths of a US dollar (no floating point between the price list and the
//! bill).

/// What a million tokens of each kind cost, in millionths of a US dollar. A kind without a
/// price of its own is billed as the kind it is part of (cached input and cache writes as
/// input, reasoning as output), as providers bill them when they list no separate price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    pub input: u64,
    pub cached_input: Option<u64>,
    /// Writing a prompt into the provider's cache (Anthropic: 1.25× input for 5 minutes).
    pub cache_write: Option<u64>,
    pub output: u64,
    pub reasoning: Option<u64>,
}

/// A call's tokens, as providers report them: cache reads and writes are part of the input,
/// reasoning is part of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Billable {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Billable {
    /// Input and output with no cache or reasoning parts.
    pub fn plain(input: u64, output: u64) -> Self {
        Self {
            input,
            output,
            ..Self::default()
        }
    }
}

impl Rates {
    /// Whether any kind has a price (an unpriced provider, e.g. one's own vLLM, costs nothing).
    pub fn is_priced(&self) -> bool {
        *self != Rates::default()
    }

    /// What `tokens` cost, in millionths of a dollar, rounded up.
    pub fn micro_usd(&self, tokens: &Billable) -> u64 {
        let cached = tokens.cached_input.min(tokens.input);
        let written = tokens.cache_write.min(tokens.input - cached);
        let plain_input = tokens.input - cached - written;
        let reasoning = tokens.reasoning.min(tokens.output);
        let plain_output = tokens.output - reasoning;
        let parts = [
            (plain_input, self.input),
            (cached, self.cached_input.unwrap_or(self.input)),
            (written, self.cache_write.unwrap_or(self.input)),
            (plain_output, self.output),
            (reasoning, self.reasoning.unwrap_or(self.output)),
        ];
        let total: u128 = parts
            .iter()
            .map(|&(n, rate)| u128::from(n) * u128::from(rate))
            .sum();
        u64::try_from(total.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_token_at_its_own_price() {
        // gpt-4o-like: $2.50 in, $1.25 cached in, $10 out.
        let gpt = Rates {
            input: 2_500_000,
            cached_input: Some(1_250_000),
            output: 10_000_000,
            ..Rates::default()
        };
        // 1,000 prompt tokens of which 400 cached, 200 out: 600×2.5 + 400×1.25 + 200×10 µ$.
        let call = Billable {
            input: 1_000,
            cached_input: 400,
            output: 200,
            ..Billable::default()
        };
        assert_eq!(gpt.micro_usd(&call), 1_500 + 500 + 2_000);
        // Claude-like: $3 in, cache writes $3.75, cache reads $0.30, $15 out.
        let claude = Rates {
            input: 3_000_000,
            cached_input: Some(300_000),
            cache_write: Some(3_750_000),
            output: 15_000_000,
            reasoning: None,
        };
        let call = Billable {
            input: 10_000,
            cached_input: 6_000,
            cache_write: 2_000,
            output: 100,
            reasoning: 0,
        };
        assert_eq!(claude.micro_usd(&call), 6_000 + 1_800 + 7_500 + 1_500);
        // Reasoning at its own price, else as output.
        let o = Rates {
            input: 1_000_000,
            output: 4_000_000,
            reasoning: Some(8_000_000),
            ..Rates::default()
        };
        let call = Billable {
            output: 100,
            reasoning: 60,
            ..Billable::default()
        };
        assert_eq!(o.micro_usd(&call), 40 * 4 + 60 * 8);
        assert_eq!(
            Rates {
                reasoning: None,
                ..o
            }
            .micro_usd(&call),
            100 * 4
        );
    }

    #[test]
    fn fractions_round_up_and_parts_never_exceed_their_whole() {
        let r = Rates {
            input: 150_000, // $0.15 per million
            output: 600_000,
            ..Rates::default()
        };
        assert_eq!(r.micro_usd(&Billable::plain(1, 0)), 1, "0.15 µ$ rounds up");
        assert_eq!(r.micro_usd(&Billable::plain(0, 0)), 0);
        // A report claiming more cached tokens than input is held to the input.
        let odd = Billable {
            input: 10,
            cached_input: 50,
            cache_write: 50,
            ..Billable::default()
        };
        assert_eq!(r.micro_usd(&odd), 2);
        assert_eq!(
            Rates {
                input: u64::MAX,
                ..r
            }
            .micro_usd(&Billable::plain(u64::MAX, 0)),
            u64::MAX,
            "no overflow"
        );
        assert!(!Rates::default().is_priced());
        assert!(r.is_priced());
    }
}
