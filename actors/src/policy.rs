//! Routing decisions as pure functions: no async, no mailbox, table-tested.

/// What the policy sees of one candidate provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub in_flight: u32,
    pub queued: u32,
    pub max_concurrency: u32,
}

/// The order to try candidates in: least loaded relative to its capacity first, counting
/// queued requests as load; ties keep configuration order. The first is where a request goes;
/// the rest are its fallbacks.
pub fn rank_by_load(candidates: impl IntoIterator<Item = Load>) -> Vec<usize> {
    let loads: Vec<Load> = candidates.into_iter().collect();
    let mut order: Vec<usize> = (0..loads.len()).collect();
    // Compare (in_flight + queued) / max without floating point: cross-multiply. The sort is
    // stable, so ties stay in configuration order.
    order.sort_by(|&i, &j| {
        let (a, b) = (loads[i], loads[j]);
        let lhs = u64::from(a.in_flight + a.queued) * u64::from(b.max_concurrency.max(1));
        let rhs = u64::from(b.in_flight + b.queued) * u64::from(a.max_concurrency.max(1));
        lhs.cmp(&rhs)
    });
    order
}

/// What routing knows of one candidate provider for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub region: &'a str,
    pub load: Load,
    pub breaker: Gate,
}

pub use crate::breaker::Gate;

/// Why no provider may serve a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// None of the model's providers is in a region the tenant allows.
    Residency,
    /// Every allowed provider is ejected by its breaker.
    AllEjected,
}

/// The order to try candidates in, for a tenant allowed `regions` (empty: any) on a node in
/// `own_region`: providers outside the allowed regions are never candidates (a fallback cannot
/// break residency), open breakers are skipped, a half-open one this node probes goes first
/// (so its probe is actually sent), then the node's own region before others, then the least
/// loaded. The first choice among the best group (same probe and locality class) is made by
/// the power of two choices: two of them drawn with `random`, the less loaded first, so that
/// equally idle providers share the traffic instead of all of it going to the first listed
/// (which is what detects a bad one early). The rest keep their order as fallbacks.
pub fn plan(
    candidates: &[Candidate<'_>],
    own_region: &str,
    regions: &[String],
    random: u64,
) -> Result<Vec<usize>, NoRoute> {
    let allowed: Vec<usize> = (0..candidates.len())
        .filter(|&i| regions.is_empty() || regions.iter().any(|r| r == candidates[i].region))
        .collect();
    if allowed.is_empty() {
        return Err(NoRoute::Residency);
    }
    let open: Vec<usize> = allowed
        .into_iter()
        .filter(|&i| candidates[i].breaker != Gate::Open)
        .collect();
    if open.is_empty() {
        return Err(NoRoute::AllEjected);
    }
    let by_load = rank_by_load(open.iter().map(|&i| candidates[i].load));
    let mut ranked: Vec<usize> = by_load.into_iter().map(|k| open[k]).collect();
    let class = |i: usize| {
        (
            candidates[i].breaker != Gate::Probe,
            candidates[i].region != own_region,
        )
    };
    ranked.sort_by_key(|&i| class(i));
    let group = ranked
        .iter()
        .take_while(|&&i| class(i) == class(ranked[0]))
        .count();
    if group >= 2 {
        let n = group as u64;
        let a = (random % n) as usize;
        let mut b = ((random / n) % (n - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let ratio = |i: usize| {
            let l = candidates[ranked[i]].load;
            (
                u64::from(l.in_flight + l.queued),
                u64::from(l.max_concurrency.max(1)),
            )
        };
        let ((la, ca), (lb, cb)) = (ratio(a), ratio(b));
        let first = if lb * ca < la * cb { b } else { a };
        let chosen = ranked.remove(first);
        ranked.insert(0, chosen);
    }
    Ok(ranked)
}

/// How hard a request is, for a virtual model such as `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Complexity {
    Trivial,
    Moderate,
    Hard,
}

impl Complexity {
    pub const ALL: [Complexity; 3] = [Self::Trivial, Self::Moderate, Self::Hard];

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "trivial" => Some(Self::Trivial),
            "moderate" => Some(Self::Moderate),
            "hard" => Some(Self::Hard),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trivial => "trivial",
            Self::Moderate => "moderate",
            Self::Hard => "hard",
        }
    }
}

/// The rules that decide a request's complexity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComplexityRules {
    /// A prompt shorter than this (in tokens), with no code or tools, is trivial.
    pub trivial_below_tokens: u64,
    /// A prompt at least this long is hard.
    pub hard_from_tokens: u64,
    /// At least this complex when the prompt holds code (a fenced block).
    pub code: Complexity,
    /// At least this complex when the request offers tools.
    pub tools: Complexity,
}

impl Default for ComplexityRules {
    fn default() -> Self {
        Self {
            trivial_below_tokens: 256,
            hard_from_tokens: 4_000,
            code: Complexity::Moderate,
            tools: Complexity::Hard,
        }
    }
}

/// What classification looks at in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signals {
    pub prompt_tokens: u64,
    pub has_code: bool,
    pub has_tools: bool,
    /// `X-Meridian-Complexity`, which overrides the rules.
    pub explicit: Option<Complexity>,
}

/// The request's complexity: the explicit one if given, else the rules.
pub fn classify(rules: &ComplexityRules, s: Signals) -> Complexity {
    if let Some(c) = s.explicit {
        return c;
    }
    let by_length = if s.prompt_tokens >= rules.hard_from_tokens {
        Complexity::Hard
    } else if s.prompt_tokens < rules.trivial_below_tokens {
        Complexity::Trivial
    } else {
        Complexity::Moderate
    };
    let mut c = by_length;
    if s.has_code {
        c = c.max(rules.code);
    }
    if s.has_tools {
        c = c.max(rules.tools);
    }
    c
}

/// A virtual model: per complexity, the models to use, best first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Alias {
    pub trivial: Vec<String>,
    pub moderate: Vec<String>,
    pub hard: Vec<String>,
    pub rules: ComplexityRules,
}

impl Alias {
    /// The models for `c`; a tier with no models borrows the next harder one (then easier).
    pub fn models(&self, c: Complexity) -> &[String] {
        let order: [&Vec<String>; 3] = match c {
            Complexity::Trivial => [&self.trivial, &self.moderate, &self.hard],
            Complexity::Moderate => [&self.moderate, &self.hard, &self.trivial],
            Complexity::Hard => [&self.hard, &self.moderate, &self.trivial],
        };
        order
            .into_iter()
            .find(|m| !m.is_empty())
            .map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests;
