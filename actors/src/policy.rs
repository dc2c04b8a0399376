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
/// loaded; ties keep configuration order.
pub fn plan(
    candidates: &[Candidate<'_>],
    own_region: &str,
    regions: &[String],
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
    ranked.sort_by_key(|&i| {
        (
            candidates[i].breaker != Gate::Probe,
            candidates[i].region != own_region,
        )
    });
    Ok(ranked)
}

#[cfg(test)]
mod tests;
