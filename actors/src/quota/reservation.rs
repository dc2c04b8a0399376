//! What a request costs before it runs ([`Estimate`]) and the charge an admitted request
//! holds until it settles ([`Reservation`]).

use super::*;

/// What a request costs before it runs.
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    /// Prompt tokens (tokenizer count).
    pub prompt: u64,
    /// The completion tokens it may generate (`max_tokens`, or a default reserve).
    pub completion: u64,
    /// The model's price, when it has one (for `cost_per_day`).
    pub price: Option<Rates>,
}

impl Estimate {
    pub fn tokens(&self) -> u64 {
        self.prompt + self.completion
    }

    pub(super) fn cost(&self, kind: LimitKind) -> u64 {
        match kind.unit() {
            Unit::Requests => 1,
            Unit::Tokens => self.tokens(),
            Unit::MicroUsd => self.price.map_or(0, |p| {
                p.micro_usd(&Billable::plain(self.prompt, self.completion))
            }),
        }
    }
}

/// An admitted request's charge; settle it with the actual usage. Dropped unsettled (the
/// request never reached a provider), it gives its tokens back and keeps the request count.
#[derive(Debug)]
pub struct Reservation {
    pub(super) quota: Quota,
    pub(super) prompt_estimate: u64,
    pub(super) price: Option<Rates>,
    pub(super) entries: Charges,
    pub(super) settled: bool,
    pub rate_limits: Vec<RateLimitState>,
}

impl Reservation {
    /// The call is billed at `rates` (the provider that answered has a price list of its own)
    /// rather than at the model's.
    pub fn bill_at(&mut self, rates: Rates) {
        self.price = Some(rates);
    }

    /// The prompt's tokens as estimated before the call (what a call cut short is charged for
    /// its prompt).
    pub fn prompt_estimate(&self) -> u64 {
        self.prompt_estimate
    }

    /// Whether a limit on tokens or cost was charged: the output must then stay within what
    /// was reserved for it.
    pub fn limits_output(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.key.kind != LimitKind::RequestsPerMinute)
    }

    /// Replaces the estimate with what the request actually used. (The tenant's daily roll-up
    /// is written where the call is recorded, with its per-call record.)
    pub fn settle(mut self, usage: &Billable) {
        self.settled = true;
        let actual = usage.input + usage.output;
        let cost = self.price.map_or(0, |p| p.micro_usd(usage));
        self.quota.settle(&self.entries, actual, cost);
    }

    /// The request ended without a usage report: the estimate stands.
    pub fn keep(mut self) {
        self.settled = true;
    }

    /// The request was cut short after `generated` completion tokens (client gone, upstream
    /// failure): it is charged what was generated, and its prompt once it was `sent` to a
    /// provider (the provider read it, whether or not it answered).
    pub fn settle_partial(self, generated: u64, sent: bool) {
        let prompt = if sent || generated > 0 {
            self.prompt_estimate
        } else {
            0
        };
        self.settle(&Billable::plain(prompt, generated));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.quota.settle(&self.entries, 0, 0);
        }
    }
}
