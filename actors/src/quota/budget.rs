//! This node's budgets: one per limit key it admits against, with what it charged and what the
//! ledger has heard of, kept so that a flush and the forgetting of ended windows cost what
//! changed since the last pass, not how many budgets (end users) the node has seen.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::time::Instant;

use super::{LimitKind, ledger_key};

/// A budget's identity: its scope and limit (its ledger key is made once, with it).
#[derive(Debug, Clone)]
pub(super) struct BudgetKey {
    pub(super) scope: Arc<str>,
    pub(super) kind: LimitKind,
    pub(super) ledger: Arc<str>,
}

impl BudgetKey {
    pub(super) fn new(scope: &str, kind: LimitKind) -> Self {
        Self {
            scope: scope.into(),
            kind,
            ledger: ledger_key(scope, kind).into(),
        }
    }
}

impl PartialEq for BudgetKey {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.scope == other.scope
    }
}

impl Eq for BudgetKey {}

impl std::hash::Hash for BudgetKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        ScopeKind(&self.scope, self.kind).hash(h);
    }
}

/// A budget looked up by a request's scope, without making its key.
#[derive(Hash)]
pub(super) struct ScopeKind<'a>(pub(super) &'a str, pub(super) LimitKind);

impl From<&ScopeKind<'_>> for BudgetKey {
    fn from(probe: &ScopeKind<'_>) -> Self {
        Self::new(probe.0, probe.1)
    }
}

impl hashbrown::Equivalent<BudgetKey> for ScopeKind<'_> {
    fn equivalent(&self, key: &BudgetKey) -> bool {
        self.1 == key.kind && self.0 == &*key.scope
    }
}

/// This node's account of one limit key in the current window.
#[derive(Debug)]
pub(super) struct Budget {
    pub(super) kind: LimitKind,
    pub(super) limit: u64,
    pub(super) window_start: u64,
    /// What this node may charge in the window: what the ledger has seen from it plus its
    /// current slice.
    pub(super) allowance: u64,
    /// Charged in the window (admitted, adjusted as reservations settle).
    pub(super) charged: i64,
    /// Of `charged`, what the ledger has been told.
    pub(super) reported: i64,
    /// The slice's local expiry (from when it was asked for, shortened by a margin).
    pub(super) expires: Option<Instant>,
    /// A renewal is under way.
    pub(super) renewing: bool,
    /// Admitted since the last renewal, and since when (demand for the next slice).
    pub(super) demand: u64,
    pub(super) demand_since: Instant,
    /// The last slice's size.
    pub(super) last_slice: u64,
    /// Working from a local share (no quorum).
    pub(super) local_share: bool,
    /// The last renewal found no quorum.
    pub(super) no_quorum: bool,
    /// The largest admission waiting for a slice (the next slice covers at least this).
    pub(super) need: u64,
    /// The ledger lately gave less than needed: until then, do not ask again for more.
    pub(super) dry_until: Option<Instant>,
    /// This node's static share of the window (0: none), of `share_nodes` shares in all.
    pub(super) share: u64,
    pub(super) share_nodes: u64,
    pub(super) share_mode: ShareMode,
    /// Listed in [`Budgets::touched`].
    queued: bool,
}

/// Where a budget's window stands with this node's static share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShareMode {
    /// Admitting from the share: nothing is reported, the ledger holds no entry for it.
    Open,
    /// Given up having admitted this much from it (sent with a grant request or a release,
    /// again with each retry until one commits); admissions wait for a grant.
    Releasing(u64),
    /// Released (or there was none): the window goes through the ledger like any other.
    Released,
}

impl Budget {
    /// A budget first seen now: no slice yet.
    pub(super) fn new(kind: LimitKind, limit: u64, window_start: u64, now: Instant) -> Self {
        Self {
            kind,
            limit,
            window_start,
            allowance: 0,
            charged: 0,
            reported: 0,
            expires: None,
            renewing: false,
            demand: 0,
            demand_since: now,
            last_slice: 0,
            local_share: false,
            no_quorum: false,
            need: 0,
            dry_until: None,
            share: 0,
            share_nodes: 0,
            share_mode: ShareMode::Released,
            queued: false,
        }
    }

    /// Starts the window with this node's share: `share` of `nodes` shares; `open` when this
    /// node can vouch for everything it admitted in the window (it has run since the window
    /// began), else the share counts as used up and is released at once.
    pub(super) fn start_share(&mut self, share: u64, nodes: u64, open: bool) {
        self.share = share;
        self.share_nodes = nodes;
        self.share_mode = match (share, open) {
            (0, _) => ShareMode::Released,
            (_, true) => {
                self.allowance = share;
                ShareMode::Open
            }
            (_, false) => ShareMode::Releasing(share),
        };
    }

    /// Gives an open share up, having admitted what was charged from it: admissions wait for a
    /// grant from then on. Nothing changes if the share is not open.
    pub(super) fn give_up_share(&mut self) {
        if self.share_mode == ShareMode::Open {
            self.share_mode = ShareMode::Releasing(self.charged.max(0) as u64);
            self.allowance = 0;
        }
    }

    /// Charges not yet reported that the ledger must hear of (share usage never is).
    pub(super) fn unreported(&self) -> i64 {
        match self.share_mode {
            ShareMode::Released => self.charged - self.reported,
            ShareMode::Open | ShareMode::Releasing(_) => 0,
        }
    }
}

/// Budgets forgotten per pass at most, so that the end of a day with a million end users does
/// not hold admissions up for one long pass (the rest go with the next passes).
const FORGET_PER_PASS: usize = 4_096;

/// When a budget whose window ended could not be forgotten yet (charges not yet reported, a
/// renewal under way) it is looked at again this much later.
const FORGET_RETRY_MS: u64 = 1_000;

/// The node's budgets, and two lists that keep the flusher's passes to what changed: the
/// budgets touched since the last flush, and the budgets by the end of their window.
#[derive(Debug, Default)]
pub(super) struct Budgets {
    /// Boxed: a table of a million budgets is about half empty slots, and a slot of a boxed
    /// budget is 48 bytes, not 280 (about 450 MB less at a million end users).
    pub(super) map: hashbrown::HashMap<BudgetKey, Box<Budget>>,
    /// Budgets whose charge or share changed since the flusher last looked, each once.
    pub(super) touched: Vec<BudgetKey>,
    /// Budgets by the end of their window. A budget that moves on to a later window is listed
    /// again under the new end; its earlier listing is passed over when it comes up.
    pub(super) ends: BTreeMap<u64, Vec<BudgetKey>>,
}

impl Budgets {
    /// Marks `key`'s budget as having charges the ledger may need to hear of.
    pub(super) fn touch(&mut self, key: &BudgetKey) {
        if let Some(b) = self.map.get_mut(key) {
            Self::touch_one(&mut self.touched, key, b);
        }
    }

    /// [`Self::touch`] for a budget already in hand (the caller holds `map` borrowed).
    pub(super) fn touch_one(touched: &mut Vec<BudgetKey>, key: &BudgetKey, b: &mut Budget) {
        if !b.queued {
            b.queued = true;
            touched.push(key.clone());
        }
    }

    /// Lists `key` under the end of the window that begins at `window_start`.
    pub(super) fn list_end(
        ends: &mut BTreeMap<u64, Vec<BudgetKey>>,
        key: &BudgetKey,
        window_start: u64,
    ) {
        ends.entry(window_start + key.kind.window_len(window_start))
            .or_default()
            .push(key.clone());
    }

    /// Takes a budget into the table (one kept over a restart), listed under its window's end
    /// and touched.
    pub(super) fn insert(&mut self, key: BudgetKey, budget: Budget) {
        Self::list_end(&mut self.ends, &key, budget.window_start);
        self.map.insert(key.clone(), Box::new(budget));
        self.touch(&key);
    }

    /// The unreported charges of the touched budgets, each as (budget, window, delta, limit),
    /// as many as `fits` lets in; the budgets left out stay touched for the next flush.
    pub(super) fn unreported(
        &mut self,
        mut fits: impl FnMut(&BudgetKey) -> bool,
    ) -> Vec<(BudgetKey, u64, i64, u64)> {
        let mut sent = Vec::new();
        let mut left = Vec::new();
        for key in std::mem::take(&mut self.touched) {
            let Some(b) = self.map.get_mut(&key) else {
                continue;
            };
            b.queued = false;
            let delta = b.unreported();
            if delta == 0 {
                continue;
            }
            if fits(&key) {
                sent.push((key, b.window_start, delta, b.limit));
            } else {
                b.queued = true;
                left.push(key);
            }
        }
        self.touched = left;
        sent
    }

    /// Forgets the budgets whose window ended before `unix` with everything reported: a
    /// request in a later window starts a fresh one anyway, and per-user budgets would
    /// otherwise pile up with every user ever seen. Looks only at budgets whose window ended,
    /// at most [`FORGET_PER_PASS`] of them.
    pub(super) fn forget_ended(&mut self, unix: u64) {
        let mut looked = 0;
        let mut again = Vec::new();
        while looked < FORGET_PER_PASS {
            let Some(mut due) = self.ends.first_entry() else {
                break;
            };
            if *due.key() > unix {
                break;
            }
            let keys = due.get_mut();
            let take = keys.len().min(FORGET_PER_PASS - looked);
            let batch: Vec<BudgetKey> = keys.drain(keys.len() - take..).collect();
            if keys.is_empty() {
                due.remove();
            }
            looked += take;
            for key in batch {
                let Some(b) = self.map.get(&key) else {
                    continue;
                };
                let ended = b.window_start + b.kind.window_len(b.window_start) <= unix;
                if !ended {
                    continue; // moved on to a later window, listed under its end
                }
                if b.unreported() == 0 && !b.renewing {
                    self.map.remove(&key);
                } else {
                    again.push(key);
                }
            }
        }
        if !again.is_empty() {
            self.ends
                .entry(unix + FORGET_RETRY_MS)
                .or_default()
                .extend(again);
        }
    }
}
