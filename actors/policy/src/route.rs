//! Routing decisions: the order to try providers in, complexity classes, model aliases and
//! session affinity.

/// What the policy sees of one candidate provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// This node's calls holding a slot there.
    pub in_flight: u32,
    /// This node's requests waiting for a slot.
    pub queued: u32,
    pub max_concurrency: u32,
    /// Its capacity counts this many times (1: normal; 0 is taken as 1).
    pub weight: u32,
    /// Input + output price per million tokens (µ$; 0: unpriced, e.g. self-hosted).
    pub price: u64,
    /// What the engine itself reports (a local vLLM replica's `/metrics`; 0 when unknown):
    /// requests running, from every node, and waiting in its own queue.
    pub engine_running: u32,
    pub engine_waiting: u32,
    /// The engine's KV-cache use in thousandths: at equal load, the emptier cache first.
    pub kv_permille: u32,
}

impl Load {
    fn capacity(&self) -> u64 {
        u64::from(self.max_concurrency.max(1)) * u64::from(self.weight.max(1))
    }

    /// Requests running there (ours, or the engine's count when it reports more: other nodes
    /// send there too) plus those waiting, in our queue and in the engine's.
    fn used(&self) -> u64 {
        u64::from(self.in_flight.max(self.engine_running))
            + u64::from(self.queued)
            + u64::from(self.engine_waiting)
    }

    /// Less loaded relative to capacity (weighted) first; at equal load, the emptier KV cache,
    /// then the cheaper first.
    fn cmp_load(&self, other: &Load) -> std::cmp::Ordering {
        // Compare used / capacity without floating point: cross-multiply.
        (self.used() * other.capacity())
            .cmp(&(other.used() * self.capacity()))
            .then(self.kv_permille.cmp(&other.kv_permille))
            .then(self.price.cmp(&other.price))
    }
}

/// The order to try candidates in: least loaded relative to its (weighted) capacity first,
/// counting queued requests as load; at equal load the cheaper first; ties keep configuration
/// order. The first is where a request goes; the rest are its fallbacks.
pub fn rank_by_load(candidates: impl IntoIterator<Item = Load>) -> Vec<usize> {
    let loads: Vec<Load> = candidates.into_iter().collect();
    let mut order: Vec<usize> = (0..loads.len()).collect();
    // The sort is stable, so ties stay in configuration order.
    order.sort_by(|&i, &j| loads[i].cmp_load(&loads[j]));
    order
}

/// What routing knows of one candidate provider for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub region: &'a str,
    pub load: Load,
    pub breaker: Gate,
    /// The provider's id (its place in consistent hashing) when it takes part in prefix
    /// affinity; `None` otherwise.
    pub affinity: Option<&'a str>,
}

/// What a breaker's replicated record means for one node's routing right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Route normally.
    Closed,
    /// Do not route here.
    Open,
    /// Half-open and this node is a prober: a few requests may go, to test it.
    Probe,
}

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
/// (which is what detects a bad one early). When every provider of that group takes part in
/// prefix affinity and the request has a `prefix` (a hash of its prompt's start), the first
/// choice is instead [`affine`]'s: the same conversation keeps going to the replica that has
/// its prefix cached. The rest keep their order as fallbacks.
pub fn plan(
    candidates: &[Candidate<'_>],
    own_region: &str,
    regions: &[String],
    random: u64,
    prefix: Option<u64>,
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
    let members: Vec<(&str, Load)> = ranked[..group]
        .iter()
        .filter_map(|&i| Some((candidates[i].affinity?, candidates[i].load)))
        .collect();
    if let Some(key) = prefix
        && group >= 2
        && members.len() == group
    {
        let first = affine(key, &members);
        let chosen = ranked.remove(first);
        ranked.insert(0, chosen);
    } else if group >= 2 {
        let n = group as u64;
        let a = (random % n) as usize;
        let mut b = ((random / n) % (n - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let (la, lb) = (candidates[ranked[a]].load, candidates[ranked[b]].load);
        let first = if lb.cmp_load(&la).is_lt() { b } else { a };
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

/// Consistent hashing with bounded load (rendezvous form): every member scores `key` by a hash
/// of (key, member id) and the request goes to the best-scoring member whose load is within
/// 1.25 × the average (plus one request), so a conversation sticks to one replica unless that
/// one is busy beyond its share; when a member joins or leaves, only the keys it wins or held
/// move. Returns an index into `members`.
pub fn affine(key: u64, members: &[(&str, Load)]) -> usize {
    let ratio = |l: &Load| l.used() as f64 / l.capacity() as f64;
    let n = members.len().max(1) as f64;
    let mean = members.iter().map(|(_, l)| ratio(l)).sum::<f64>() / n;
    let one = members
        .iter()
        .map(|(_, l)| 1.0 / l.capacity() as f64)
        .fold(0.0, f64::max);
    let bound = 1.25 * mean + one;
    let mut order: Vec<(u64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (mix(key ^ fnv1a(id.as_bytes())), i))
        .collect();
    order.sort_unstable_by(|a, b| b.cmp(a));
    order
        .iter()
        .map(|&(_, i)| i)
        .find(|&i| ratio(&members[i].1) <= bound)
        .unwrap_or(order[0].1)
}

/// FNV-1a: a stable hash (the same on every node and every build), for affinity keys.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads a hash's bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
