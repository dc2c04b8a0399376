//! Routing decisions as pure functions: no async, no mailbox, table-tested.

/// What the policy sees of one candidate provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub in_flight: u32,
    pub queued: u32,
    pub max_concurrency: u32,
}

/// The candidate to send a request to: the least loaded relative to its capacity, counting
/// queued requests as load; ties go to the earlier candidate (configuration order). `None` only
/// for an empty list.
pub fn pick_least_loaded(candidates: impl IntoIterator<Item = Load>) -> Option<usize> {
    candidates
        .into_iter()
        .enumerate()
        .min_by(|(_, a), (_, b)| {
            // Compare (in_flight + queued) / max without floating point: cross-multiply.
            let lhs = u64::from(a.in_flight + a.queued) * u64::from(b.max_concurrency.max(1));
            let rhs = u64::from(b.in_flight + b.queued) * u64::from(a.max_concurrency.max(1));
            lhs.cmp(&rhs)
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests;
