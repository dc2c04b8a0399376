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

#[cfg(test)]
mod tests;
