//! Admission against limits that hold across the whole cluster, with nothing central on the hot
//! path.
//!
//! Each limit (`requests_per_minute`, `tokens_per_minute`, `tokens_per_day`, `tokens_per_month`,
//! `cost_per_day` in millionths of a dollar) of each scope — the tenant as a whole, one end user
//! of it, one feature of it — is a key in the replicated quota ledger. A node admits locally against
//! its **grant**: a slice of the window's remaining budget that the leader hands out through the
//! Raft log, sized to this node's recent demand, with an expiry. Admission is a short critical
//! section on this node's budgets; it waits on Raft only when a budget is empty and a new slice
//! is already on its way (bounded by `grant_wait`).
//!
//! What a node charged is reported to the ledger every `flush_every` in one batch (a negative
//! delta when a reservation settles for less than estimated). A new slice replaces the node's
//! previous one (whose unused part goes back to the pool) and comes with what the ledger had seen
//! reported by the node: the node may charge that plus the slice, so charges not yet reported
//! come out of the new slice. A slice is used for half its TTL; the other half is the time late
//! reports have to land before the ledger takes it back. A node that dies stops renewing: its
//! slice lapses at expiry and returns to the pool.
//!
//! Without quorum (no slice can be renewed), each limit follows its policy: `deny` refuses with
//! 503 `quota_unavailable`, `local_share` admits up to limit ÷ cluster size on this node alone.
//!
//! Windows are aligned multiples of their length since the Unix epoch (minute, day) and calendar
//! months in UTC (`tokens_per_month`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::hash_map::EntryRef;
use meridian_proto::cluster::{
    Applied, ClusterState, Command, GrantRequest, Limits, NodeId, UsageTotals,
};
use meridian_proto::{ApiError, ErrorKind};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

mod budget;

use budget::{Budget, BudgetKey, Budgets, ScopeKind, ShareMode};

use crate::estimate::Price;
use crate::replicated::Replicated;

/// A limit a tenant can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    TokensPerMonth,
    /// Millionths of a US dollar per day, from the model's price.
    CostPerDay,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Requests,
    Tokens,
    MicroUsd,
}

impl LimitKind {
    pub const ALL: [LimitKind; 5] = [
        Self::RequestsPerMinute,
        Self::TokensPerMinute,
        Self::TokensPerDay,
        Self::TokensPerMonth,
        Self::CostPerDay,
    ];

    /// The name in configs, ledger keys and 429 error codes.
    pub fn code(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::TokensPerDay => "tokens_per_day",
            Self::TokensPerMonth => "tokens_per_month",
            Self::CostPerDay => "cost_per_day",
        }
    }

    /// The suffix of its `x-ratelimit-*` headers (OpenAI's names for the per-minute ones):
    /// `x-ratelimit-limit-<suffix>`, `-remaining-<suffix>`, `-reset-<suffix>`.
    pub fn header_suffix(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests",
            Self::TokensPerMinute => "tokens",
            Self::TokensPerDay => "tokens-day",
            Self::TokensPerMonth => "tokens-month",
            Self::CostPerDay => "cost-day",
        }
    }

    /// The window that holds `unix_ms`: its start and its length, both in ms. Minutes and days
    /// are aligned multiples of their length since the Unix epoch; months are calendar months
    /// in UTC (28 to 31 days).
    pub fn window(self, unix_ms: u64) -> (u64, u64) {
        let fixed = |len: u64| (unix_ms - unix_ms % len, len);
        match self {
            Self::RequestsPerMinute | Self::TokensPerMinute => fixed(60_000),
            Self::TokensPerDay | Self::CostPerDay => fixed(86_400_000),
            Self::TokensPerMonth => calendar_month(unix_ms),
        }
    }

    /// The length of the window that begins at `start` (ms).
    pub fn window_len(self, start: u64) -> u64 {
        self.window(start).1
    }

    fn of(self, limits: &Limits) -> Option<u64> {
        match self {
            Self::RequestsPerMinute => limits.requests_per_minute,
            Self::TokensPerMinute => limits.tokens_per_minute,
            Self::TokensPerDay => limits.tokens_per_day,
            Self::TokensPerMonth => limits.tokens_per_month,
            Self::CostPerDay => limits.cost_per_day_micro_usd,
        }
    }

    fn unit(self) -> Unit {
        match self {
            Self::RequestsPerMinute => Unit::Requests,
            Self::CostPerDay => Unit::MicroUsd,
            _ => Unit::Tokens,
        }
    }

    fn counts_tokens(self) -> bool {
        self.unit() == Unit::Tokens
    }
}

/// What a limit does while no new slice can be had (no quorum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoQuorum {
    /// Refuse with 503 `quota_unavailable` once this node's slice is spent or lapsed.
    Deny,
    /// Admit up to limit ÷ number of nodes per window on this node alone.
    LocalShare,
}

#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// How often charged usage is reported to the ledger.
    pub flush_every: Duration,
    /// How long a slice is valid (the ledger counts from commit, this node from its request).
    pub grant_ttl: Duration,
    /// Longest an admission waits for a slice already on its way.
    pub grant_wait: Duration,
    /// A slice is at most this share of the limit ...
    pub max_slice: f64,
    /// ... and covers about this much of this node's recent demand.
    pub slice_horizon: Duration,
    pub no_quorum: HashMap<LimitKind, NoQuorum>,
    /// Days of daily usage roll-ups the cluster keeps (sent with each report).
    pub usage_retention_days: u64,
    /// The share of each limit set aside as static shares, split evenly among the cluster's
    /// nodes: each node admits up to its part of a window on its own, with no Raft round trip
    /// and no ledger entry, and goes to the ledger only beyond it (0: every scope through the
    /// ledger).
    pub static_share: f64,
    /// Where this node keeps its share counts over a restart (the node's data directory);
    /// `None`: never restarted (tests).
    pub state_dir: Option<std::path::PathBuf>,
    /// Shares are split among at least this many nodes (the configured voters), so that a node
    /// that has not yet seen every member register does not take a larger share than the
    /// others count it for.
    pub min_nodes: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            flush_every: Duration::from_millis(50),
            grant_ttl: Duration::from_secs(5),
            grant_wait: Duration::from_secs(1),
            max_slice: 0.05,
            slice_horizon: Duration::from_secs(2),
            no_quorum: HashMap::new(),
            usage_retention_days: meridian_proto::cluster::DEFAULT_RETAIN_DAYS,
            static_share: 0.5,
            state_dir: None,
            min_nodes: 1,
        }
    }
}

/// Ledger key of `kind` in `scope` (e.g. `tenant/acme`, `tenant/acme/user/u1`).
pub fn ledger_key(scope: &str, kind: LimitKind) -> String {
    format!("{scope}/{}", kind.code())
}

/// One set of limits to admit against, and the ledger scope they are kept under.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// `tenant/<t>`, `tenant/<t>/user/<u>` or `tenant/<t>/feature/<f>`.
    pub key: String,
    pub limits: Limits,
}

/// Admitted charges: the budget, the window, and what was reserved.
type Charges = Vec<Charge>;

/// One limit's charge for an admitted request.
#[derive(Debug)]
struct Charge {
    key: BudgetKey,
    /// The window it was admitted in.
    window_start: u64,
    reserved: u64,
    /// The limit it was admitted under (to charge a later window if the request outlives it).
    limit: u64,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One usage report, kept until the ledger has it.
struct Batch {
    seq: u64,
    commands: Vec<Command>,
    /// What each budget's `reported` advances by once it commits.
    sent: Vec<(BudgetKey, u64, i64)>,
}

/// Charged usage of a window this node has left but not yet reported.
#[derive(Debug)]
struct Late {
    key: BudgetKey,
    window_start: u64,
    delta: i64,
    /// The window's limit (0: not known here, the usage only adds to a ledger entry).
    limit: u64,
}

struct Inner {
    node_id: NodeId,
    config: QuotaConfig,
    cluster: Replicated,
    /// Keyed with a fast seeded hash (foldhash): one lookup per limit per request.
    budgets: Mutex<Budgets>,
    late: Mutex<Vec<Late>>,
    /// Tenant → model → usage not yet reported (names an admin chose: the fast hash is fine).
    rollups: Mutex<hashbrown::HashMap<Arc<str>, hashbrown::HashMap<String, UsageTotals>>>,
    granted: Notify,
    renew: mpsc::UnboundedSender<BudgetKey>,
    /// One flush at a time: two at once would both report the same unreported charges.
    flushing: tokio::sync::Mutex<()>,
    /// A report whose proposal failed (it may or may not have committed).
    pending: Mutex<Option<Batch>>,
    /// The next report's sequence number (see `Command::Once`).
    seq: AtomicU64,
    /// Admissions under a local share, for metrics.
    local_share_admits: AtomicU64,
    /// When this node started: it can vouch for its static share only in windows begun since.
    started_unix_ms: u64,
    denied_no_quorum: AtomicU64,
}

/// The node's quota account. Cheap to clone.
#[derive(Clone)]
pub struct Quota {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota").finish_non_exhaustive()
    }
}

/// What a request costs before it runs.
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    /// Prompt tokens (tokenizer count).
    pub prompt: u64,
    /// The completion tokens it may generate (`max_tokens`, or a default reserve).
    pub completion: u64,
    /// The model's price, when it has one (for `cost_per_day`).
    pub price: Option<Price>,
}

impl Estimate {
    pub fn tokens(&self) -> u64 {
        self.prompt + self.completion
    }

    fn cost(&self, kind: LimitKind) -> u64 {
        match kind.unit() {
            Unit::Requests => 1,
            Unit::Tokens => self.tokens(),
            Unit::MicroUsd => self
                .price
                .map_or(0, |p| p.micro_usd(self.prompt, self.completion)),
        }
    }
}

/// One limit's state as an admission left it: what the edge renders as its `x-ratelimit-*`
/// headers (or whatever its protocol says instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitState {
    pub kind: LimitKind,
    pub limit: u64,
    /// What the cluster may still admit in this window, as far as this node knows.
    pub remaining: u64,
    /// Until the window ends.
    pub reset: Duration,
}

/// `d` in whole seconds, rounded up.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// An admitted request's charge; settle it with the actual usage. Dropped unsettled (the
/// request never reached a provider), it gives its tokens back and keeps the request count.
#[derive(Debug)]
pub struct Reservation {
    quota: Quota,
    tenant: Arc<str>,
    prompt_estimate: u64,
    price: Option<Price>,
    entries: Charges,
    settled: bool,
    pub rate_limits: Vec<RateLimitState>,
}

impl Reservation {
    /// Replaces the estimate with what the request actually used, and records it in the
    /// tenant's daily roll-up.
    pub fn settle(mut self, model: &str, usage: UsageTotals) {
        self.settled = true;
        let actual = usage.prompt_tokens + usage.completion_tokens;
        let mut usage = usage;
        usage.cost_micro_usd = self.price.map_or(0, |p| {
            p.micro_usd(usage.prompt_tokens, usage.completion_tokens)
        });
        self.quota
            .settle(&self.entries, actual, usage.cost_micro_usd);
        self.record(model, usage);
    }

    /// The request ended without a usage report: the estimate stands.
    pub fn keep(mut self, model: &str) {
        self.settled = true;
        let tokens = self
            .entries
            .iter()
            .find(|e| e.key.kind.counts_tokens())
            .map_or(0, |e| e.reserved);
        self.record(
            model,
            UsageTotals {
                requests: 1,
                prompt_tokens: self.prompt_estimate,
                completion_tokens: tokens.saturating_sub(self.prompt_estimate),
                ..UsageTotals::default()
            },
        );
    }

    /// The request was cut short after `generated` completion tokens (client gone, upstream
    /// failure): it is charged its prompt and what was generated.
    pub fn settle_partial(self, model: &str, generated: u64) {
        let usage = UsageTotals {
            requests: 1,
            prompt_tokens: if generated > 0 {
                self.prompt_estimate
            } else {
                0
            },
            completion_tokens: generated,
            ..UsageTotals::default()
        };
        self.settle(model, usage);
    }

    fn record(&self, model: &str, usage: UsageTotals) {
        self.quota.record(&self.tenant, model, usage);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.quota.settle(&self.entries, 0, 0);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Verdict {
    Admitted(Charges, Vec<RateLimitState>),
    /// Some budget is empty but a slice is on its way: wait and try again.
    Wait,
    Refused(ApiError),
}

impl Quota {
    /// Starts the quota account and its background flusher/renewer.
    pub fn start(
        node_id: NodeId,
        config: QuotaConfig,
        cluster: Replicated,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (renew, renewals) = mpsc::unbounded_channel();
        let last_seq = cluster
            .state
            .borrow()
            .applied_seq
            .get(&node_id)
            .copied()
            .unwrap_or(0);
        let first_seq = (last_seq + 1).max(now_unix_ms() * 1000);
        let (started_unix_ms, kept) = match &config.state_dir {
            Some(dir) => shares::restore(dir),
            None => (0, Vec::new()),
        };
        let mut budgets = Budgets::default();
        let now = Instant::now();
        for k in kept {
            let mut b = Budget::new(k.kind, k.limit, k.window_start, now);
            b.charged = k.charged;
            b.start_share(k.share, k.share_nodes, true);
            if let Some(used) = k.released {
                b.share_mode = ShareMode::Releasing(used);
                b.allowance = 0;
            }
            budgets.insert(BudgetKey::new(&k.scope, k.kind), b);
        }
        let quota = Self {
            inner: Arc::new(Inner {
                node_id,
                config,
                cluster,
                budgets: Mutex::new(budgets),
                late: Mutex::new(Vec::new()),
                rollups: Mutex::new(hashbrown::HashMap::new()),
                granted: Notify::new(),
                renew,
                flushing: tokio::sync::Mutex::new(()),
                pending: Mutex::new(None),
                // Above anything this node sent before a restart: the applied state's last
                // number, or the clock in µs, whichever is larger.
                seq: AtomicU64::new(first_seq),
                local_share_admits: AtomicU64::new(0),
                started_unix_ms,
                denied_no_quorum: AtomicU64::new(0),
            }),
        };
        let task = tokio::spawn(background(quota.clone(), renewals));
        (quota, task)
    }

    /// Admissions made under a local share, and refusals for want of quorum.
    pub fn no_quorum_counts(&self) -> (u64, u64) {
        (
            self.inner.local_share_admits.load(Ordering::Relaxed),
            self.inner.denied_no_quorum.load(Ordering::Relaxed),
        )
    }

    /// Admits a request of `tenant` (with `limits`) costing `estimate`, or refuses it with a
    /// 429 naming the limit (or 503 when no quorum and the policy denies).
    pub async fn admit(
        &self,
        tenant: &Arc<str>,
        scopes: &[Scope],
        estimate: Estimate,
    ) -> Result<Reservation, ApiError> {
        if scopes.is_empty() {
            // Nothing to charge (a caller with no limit): no lock, only the usage to record.
            return Ok(Reservation {
                quota: self.clone(),
                tenant: Arc::clone(tenant),
                prompt_estimate: estimate.prompt,
                price: estimate.price,
                entries: Vec::new(),
                settled: false,
                rate_limits: Vec::new(),
            });
        }
        // Read the clock for the wait only when there is one (rarely).
        let mut deadline = None;
        let mut last_look = false;
        loop {
            let waiting = self.inner.granted.notified();
            match self.try_admit(scopes, estimate) {
                Verdict::Admitted(entries, rate_limits) => {
                    return Ok(Reservation {
                        quota: self.clone(),
                        tenant: Arc::clone(tenant),
                        prompt_estimate: estimate.prompt,
                        price: estimate.price,
                        entries,
                        settled: false,
                        rate_limits,
                    });
                }
                Verdict::Refused(e) => return Err(e),
                Verdict::Wait if last_look => return Err(self.no_slice_error()),
                // Past the deadline, one last look: a slice may have landed just now.
                Verdict::Wait => {
                    let until = *deadline
                        .get_or_insert_with(|| Instant::now() + self.inner.config.grant_wait);
                    last_look = tokio::time::timeout_at(until, waiting).await.is_err();
                }
            }
        }
    }

    /// Adds `usage` to `tenant`'s roll-up for `model` (reported with the next flush).
    pub fn record(&self, tenant: &Arc<str>, model: &str, usage: UsageTotals) {
        let mut rollups = lock(&self.inner.rollups);
        let models = rollups.entry_ref(&**tenant).or_default();
        // No allocation once the model has an entry.
        match models.get_mut(model) {
            Some(totals) => totals.add(&usage),
            None => {
                models.insert(model.to_owned(), usage);
            }
        }
    }

    fn no_slice_error(&self) -> ApiError {
        ApiError::new(
            ErrorKind::Unavailable,
            "the cluster could not hand this node a quota slice in time; retry shortly",
        )
        .with_code("quota_unavailable")
        .with_retry_after(Duration::from_secs(1))
    }

    /// The whole admission decision, in one short critical section. Each limit is charged as it
    /// is found to admit (one lookup per limit); if a later one does not, what was charged is
    /// given back before the lock is let go.
    fn try_admit(&self, scopes: &[Scope], estimate: Estimate) -> Verdict {
        let now = Instant::now();
        let unix = now_unix_ms();
        let mut guard = lock(&self.inner.budgets);
        let budgets = &mut *guard;
        let mut charges = Vec::new();
        let mut states = Vec::new();
        let mut local_share_admits = 0;
        // Indexes into `charges` of the budgets to renew early if the request is admitted.
        let mut renew_early = Vec::new();
        let mut wait = false;
        let mut refusal = None;
        let limits = scopes
            .iter()
            .flat_map(|s| LimitKind::ALL.map(|k| (s, k)))
            .filter_map(|(s, k)| Some((&s.key, k, k.of(&s.limits)?)));
        for (scope, kind, limit) in limits {
            let cost = estimate.cost(kind);
            let (window_start, window_ms) = kind.window(unix);
            // One lookup, by the request's scope: a key is made only for a new budget.
            let entry = match budgets.map.entry_ref(&ScopeKind(scope, kind)) {
                EntryRef::Occupied(found) => found,
                EntryRef::Vacant(new) => {
                    let mut budget = Budget::new(kind, limit, window_start, now);
                    let (share, nodes) = self.share_of(limit);
                    budget.start_share(share, nodes, self.vouches_for(window_start));
                    let entry = new.insert_entry(Box::new(budget));
                    Budgets::list_end(&mut budgets.ends, entry.key(), window_start);
                    entry
                }
            };
            let key = entry.key().clone();
            let budget = entry.into_mut();
            budget.limit = limit;
            if budget.window_start != window_start {
                self.enter_window(&mut budgets.ends, &key, budget, window_start);
            }
            if cost > limit {
                refusal = Some(too_big(kind, limit, cost));
                break;
            }
            let open_share = budget.share_mode == ShareMode::Open;
            let lapsed = !open_share && budget.expires.is_none_or(|e| e <= now);
            let left = (budget.allowance as i64 - budget.charged).max(0) as u64;
            let reset = window_reset(window_start, window_ms, unix);
            if (budget.local_share || !lapsed) && left >= cost {
                budget.charged += cost as i64;
                budget.demand += cost;
                // Listed for the flusher with the budget in hand (a refusal by a later limit
                // gives the charge back; the flusher then finds nothing to report).
                Budgets::touch_one(&mut budgets.touched, &key, budget);
                local_share_admits += u64::from(budget.local_share);
                let left = left - cost;
                // Renew early, before the slice runs dry or lapses (once the request is
                // admitted: a request refused by a later limit asks for nothing).
                let low = left < budget.last_slice / 2
                    || budget
                        .expires
                        .is_some_and(|e| e <= now + self.inner.config.grant_ttl / 5);
                // (Never from a static share: a grant request releases it, and it is still in
                // use. A local share, taken for want of quorum, asks again once its time is up:
                // quorum may be back, and the window goes on through grants if it is.)
                let ask = if budget.local_share { lapsed } else { low };
                if ask && !budget.renewing && !open_share {
                    renew_early.push(charges.len());
                }
                // From a share, with no ledger entry: the limit less what this node charged (what
                // others charged from their shares is not known here).
                let cluster_left = match self.cluster_left(&key.ledger) {
                    Some(l) => l,
                    None if open_share => limit,
                    None => left,
                };
                states.push(RateLimitState {
                    kind,
                    limit,
                    remaining: cluster_left.saturating_sub(match budget.share_mode {
                        ShareMode::Open => budget.charged.max(0) as u64,
                        ShareMode::Releasing(_) | ShareMode::Released => {
                            (budget.charged - budget.reported).max(0) as u64
                        }
                    }),
                    reset,
                });
                charges.push(Charge {
                    key,
                    window_start,
                    reserved: cost,
                    limit,
                });
                continue;
            }
            let policy = self
                .inner
                .config
                .no_quorum
                .get(&kind)
                .copied()
                .unwrap_or(NoQuorum::Deny);
            if budget.no_quorum && policy == NoQuorum::Deny {
                // The last renewal found no quorum: refuse at once rather than wait each time.
                if !budget.renewing {
                    budget.renewing = true;
                    let _ = self.inner.renew.send(key.clone());
                }
                self.inner.denied_no_quorum.fetch_add(1, Ordering::Relaxed);
                refusal = Some(self.no_slice_error());
                break;
            }
            // A spent share is given up with the grant request; the window goes through the
            // ledger from here.
            budget.give_up_share();
            // A new slice can help if this one lapsed, or if the ledger has not lately
            // answered with less than was needed (the window's budget is spent or promised).
            let lapsed = lapsed || open_share;
            let dry = budget.dry_until.is_some_and(|d| d > now);
            if budget.local_share {
                // Spent: refused without waiting, but once its time is up a renewal goes out
                // (without quorum it fails fast and the local share is taken again).
                if lapsed && !budget.renewing {
                    budget.renewing = true;
                    let _ = self.inner.renew.send(key.clone());
                }
            } else if lapsed || !dry {
                budget.need = budget.need.max(cost);
                if !budget.renewing {
                    budget.renewing = true;
                    let _ = self.inner.renew.send(key.clone());
                }
                wait = true;
                continue;
            }
            let cluster_left = self.cluster_left(&key.ledger).unwrap_or(0);
            let retry = if budget.local_share {
                // When the local share's time is up and a renewal may find quorum.
                budget
                    .expires
                    .map_or(reset, |e| e.saturating_duration_since(now))
                    .max(Duration::from_secs(1))
                    .min(reset)
            } else if cluster_left >= cost {
                Duration::from_secs(1).min(reset)
            } else {
                reset
            };
            refusal = Some(limited(kind, limit, cluster_left, retry));
            break;
        }
        if wait || refusal.is_some() {
            // Not admitted: give back what the limits that did admit were charged.
            for c in &charges {
                if let Some(b) = budgets.map.get_mut(&c.key) {
                    b.charged -= c.reserved as i64;
                    b.demand = b.demand.saturating_sub(c.reserved);
                }
            }
            return refusal.map_or(Verdict::Wait, Verdict::Refused);
        }
        for i in renew_early {
            let key = &charges[i].key;
            if let Some(b) = budgets.map.get_mut(key)
                && !b.renewing
            {
                b.renewing = true;
                let _ = self.inner.renew.send(key.clone());
            }
        }
        if local_share_admits > 0 {
            self.inner
                .local_share_admits
                .fetch_add(local_share_admits, Ordering::Relaxed);
        }
        Verdict::Admitted(charges, states)
    }

    /// Reports what is still unreported (a clean stop), trying for up to `within`: the
    /// charges of the last flush interval would otherwise never reach the ledger.
    pub async fn flush_before_stop(&self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            loop {
                self.flush().await;
                let empty = lock(&self.inner.pending).is_none()
                    && lock(&self.inner.late).is_empty()
                    && lock(&self.inner.rollups).is_empty()
                    && lock(&self.inner.budgets)
                        .map
                        .values()
                        .all(|b| b.unreported() == 0);
                if empty {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }

    /// Keeps this node's share counts of the windows still running for its next start (a
    /// clean stop): written durably, then the running marker is removed. Without this (a
    /// crash), the next start counts the shares of windows begun before it as spent.
    pub fn save_shares(&self) {
        let Some(dir) = &self.inner.config.state_dir else {
            return;
        };
        let unix = now_unix_ms();
        let kept: Vec<shares::Kept> = lock(&self.inner.budgets)
            .map
            .iter()
            .filter(|(_, b)| b.window_start + b.kind.window_len(b.window_start) > unix)
            .filter_map(|(key, b)| {
                let released = match b.share_mode {
                    ShareMode::Open => None,
                    ShareMode::Releasing(used) => Some(used),
                    ShareMode::Released => return None,
                };
                Some(shares::Kept {
                    scope: key.scope.to_string(),
                    kind: key.kind,
                    limit: b.limit,
                    window_start: b.window_start,
                    charged: b.charged,
                    share: b.share,
                    share_nodes: b.share_nodes,
                    released,
                })
            })
            .collect();
        if let Err(e) = shares::save(dir, &kept) {
            tracing::warn!(error = %e, "quota: could not keep the share counts; the next start counts this window's shares as spent");
        }
    }

    /// This node's static share of `limit`, and how many nodes hold one.
    fn share_of(&self, limit: u64) -> (u64, u64) {
        let members = self.inner.cluster.state.borrow().members.len() as u64;
        let nodes = members.max(self.inner.config.min_nodes).max(1);
        let share = (limit as f64 * self.inner.config.static_share / nodes as f64).floor() as u64;
        (share, nodes)
    }

    /// Whether this node knows everything it admitted in the window that began at `start`
    /// (it has run since then, or it kept its counts over a clean restart).
    fn vouches_for(&self, start: u64) -> bool {
        start >= self.inner.started_unix_ms
    }

    /// What the ledger (as applied here) says is left in the window, not yet promised.
    fn cluster_left(&self, key: &str) -> Option<u64> {
        let state = self.inner.cluster.state.borrow();
        let ledger = state.ledger.get(key)?;
        Some(
            ledger.limit.saturating_sub(ledger.used).saturating_sub(
                ledger
                    .grants
                    .iter()
                    .filter(|(n, _)| **n != self.inner.node_id)
                    .map(|(_, g)| g.outstanding())
                    .sum(),
            ),
        )
    }

    /// Settles `entries` at the actual usage. A request that outlived the window it was
    /// admitted in (a long stream across a minute boundary) is charged what it used beyond its
    /// reserve in the window now running; a refund for a window that has closed is dropped
    /// (nothing in it is left to give back).
    fn settle(&self, entries: &[Charge], actual_tokens: u64, actual_micro_usd: u64) {
        let mut guard = lock(&self.inner.budgets);
        let budgets = &mut *guard;
        for c in entries {
            let actual = match c.key.kind.unit() {
                Unit::Requests => continue,
                Unit::Tokens => actual_tokens,
                Unit::MicroUsd => actual_micro_usd,
            };
            let delta = actual as i64 - c.reserved as i64;
            if delta == 0 {
                continue;
            }
            // The usual case: one lookup, in the window it was admitted in.
            match budgets.map.get_mut(&c.key) {
                Some(b) if b.window_start == c.window_start => {
                    b.charged += delta;
                    Budgets::touch_one(&mut budgets.touched, &c.key, b);
                    continue;
                }
                _ if delta < 0 => continue,
                _ => {}
            }
            let (current, _) = c.key.kind.window(now_unix_ms());
            if !budgets.map.contains_key(&c.key) {
                let mut b = Budget::new(c.key.kind, c.limit, current, Instant::now());
                let (share, nodes) = self.share_of(c.limit);
                b.start_share(share, nodes, self.vouches_for(current));
                budgets.insert(c.key.clone(), b);
            }
            let Some(b) = budgets.map.get_mut(&c.key) else {
                continue;
            };
            if b.window_start != current {
                self.enter_window(&mut budgets.ends, &c.key, b, current);
            }
            b.charged += delta;
            Budgets::touch_one(&mut budgets.touched, &c.key, b);
        }
    }

    /// Moves `budget` on to the window that begins at `window_start`: whatever was charged in
    /// its old window and not yet reported is reported to that window; the new one starts with
    /// no slice, and with this node's share of it.
    fn enter_window(
        &self,
        ends: &mut std::collections::BTreeMap<u64, Vec<BudgetKey>>,
        key: &BudgetKey,
        budget: &mut Budget,
        window_start: u64,
    ) {
        let unreported = budget.unreported();
        if unreported != 0 {
            lock(&self.inner.late).push(Late {
                key: key.clone(),
                window_start: budget.window_start,
                delta: unreported,
                limit: budget.limit,
            });
        }
        budget.window_start = window_start;
        budget.allowance = 0;
        budget.charged = 0;
        budget.reported = 0;
        budget.expires = None;
        budget.local_share = false;
        budget.dry_until = None;
        budget.last_slice = 0;
        let (share, nodes) = self.share_of(budget.limit);
        budget.start_share(share, nodes, self.vouches_for(window_start));
        Budgets::list_end(ends, key, window_start);
    }

    /// Reports every unreported charge (and the day's roll-ups) to the ledger in one batch.
    async fn flush(&self) {
        let _one_at_a_time = self.inner.flushing.lock().await;
        // A batch whose outcome is unknown (its proposal failed) goes again, unchanged and with
        // the same sequence number, so the ledger applies it once whether or not the first try
        // committed. Only then is a new batch made.
        let batch = match lock(&self.inner.pending).take() {
            Some(b) => b,
            None => match self.next_batch() {
                Some(b) => b,
                None => return,
            },
        };
        let command = Command::Once {
            node: self.inner.node_id,
            seq: batch.seq,
            command: Box::new(Command::Batch {
                commands: batch.commands.clone(),
            }),
        };
        match self.inner.cluster.proposer.propose(command).await {
            Ok(_) => {
                let mut budgets = lock(&self.inner.budgets);
                for (key, window_start, delta) in batch.sent {
                    if let Some(b) = budgets.map.get_mut(&key)
                        && b.window_start == window_start
                    {
                        b.reported += delta;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "quota: usage report failed; it goes again");
                *lock(&self.inner.pending) = Some(batch);
            }
        }
    }

    /// What is charged and not yet reported (and the day's roll-ups), as one batch of at most
    /// about [`MAX_FLUSH_BYTES`] encoded: what does not fit goes with the next flush.
    fn next_batch(&self) -> Option<Batch> {
        let mut commands = Vec::new();
        let sent;
        let mut room = Room(MAX_FLUSH_BYTES);
        {
            let mut budgets = lock(&self.inner.budgets);
            budgets.forget_ended(now_unix_ms());
            // What does not fit is reported by a later flush.
            let reports = budgets.unreported(|key| room.take(REPORT_BYTES + key.ledger.len()));
            commands.extend(reports.iter().map(|(key, window_start, delta, limit)| {
                Command::ReportUsage {
                    key: key.ledger.to_string(),
                    node: self.inner.node_id,
                    window_start_unix_ms: *window_start,
                    delta: *delta,
                    limit: *limit,
                    window_ms: key.kind.window_len(*window_start),
                }
            }));
            sent = reports
                .into_iter()
                .map(|(key, window_start, delta, _)| (key, window_start, delta))
                .collect();
        }
        {
            let mut late = lock(&self.inner.late);
            let fits = late
                .iter()
                .take_while(|l| room.take(REPORT_BYTES + l.key.ledger.len()))
                .count();
            for l in late.drain(..fits) {
                commands.push(Command::ReportUsage {
                    key: l.key.ledger.to_string(),
                    node: self.inner.node_id,
                    window_start_unix_ms: l.window_start,
                    delta: l.delta,
                    limit: l.limit,
                    window_ms: l.key.kind.window_len(l.window_start),
                });
            }
        }
        {
            let mut rollups = lock(&self.inner.rollups);
            let tenants: Vec<Arc<str>> = rollups.keys().cloned().collect();
            'tenants: for tenant in tenants {
                let Some(models) = rollups.get_mut(&tenant) else {
                    continue;
                };
                let names: Vec<String> = models.keys().cloned().collect();
                for model in names {
                    if !room.take(ROLLUP_BYTES + tenant.len() + model.len()) {
                        break 'tenants;
                    }
                    if let Some(totals) = models.remove(&model) {
                        commands.push(Command::RecordUsage {
                            tenant: tenant.to_string(),
                            model,
                            totals,
                            retain_days: self.inner.config.usage_retention_days,
                        });
                    }
                }
                rollups.remove(&tenant);
            }
        }
        if commands.is_empty() {
            return None;
        }
        Some(Batch {
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
            commands,
            sent,
        })
    }

    /// Asks the ledger for a new slice of `key`: one Raft round trip.
    ///
    /// The new allowance is what the ledger had seen reported by this node when it granted
    /// (its answer says) plus the slice: whatever this node charged beyond that, reported
    /// later or not yet, comes out of the slice. So no report has to land first, and it does
    /// not matter which of this node's reports and grants complete first here.
    async fn renew(&self, key: BudgetKey) {
        let (request, sent_at) = {
            let mut budgets = lock(&self.inner.budgets);
            let Some(b) = budgets.map.get_mut(&key) else {
                return;
            };
            let now = Instant::now();
            let elapsed = now.duration_since(b.demand_since).as_secs_f64().max(0.05);
            let rate = b.demand as f64 / elapsed;
            let cap = ((b.limit as f64 * self.inner.config.max_slice).ceil() as u64).max(1);
            let want = (rate * self.inner.config.slice_horizon.as_secs_f64()).ceil() as u64;
            let amount = want.clamp((cap / 10).max(1), cap).max(b.need).min(b.limit);
            b.give_up_share();
            b.need = 0;
            b.demand = 0;
            b.demand_since = now;
            (
                GrantRequest {
                    key: key.ledger.to_string(),
                    node: self.inner.node_id,
                    limit: b.limit,
                    window_ms: b.kind.window_len(b.window_start),
                    window_start_unix_ms: b.window_start,
                    amount,
                    ttl_ms: self.inner.config.grant_ttl.as_millis() as u64,
                    share: b.share,
                    share_nodes: b.share_nodes,
                    share_used: match b.share_mode {
                        ShareMode::Releasing(used) => used,
                        ShareMode::Released => 0,
                        // Not asked for from an open share; if it ever is, the request gives
                        // the share up with what it admitted (see below), never as unused.
                        ShareMode::Open => b.charged.max(0) as u64,
                    },
                },
                now,
            )
        };
        let outcome = self
            .inner
            .cluster
            .proposer
            .propose(Command::RequestGrant(request.clone()))
            .await;
        {
            let mut guard = lock(&self.inner.budgets);
            let budgets = &mut *guard;
            if let Some(b) = budgets.map.get_mut(&key) {
                b.renewing = false;
                if b.window_start == request.window_start_unix_ms {
                    match outcome {
                        Ok(Applied::Granted { amount, used }) => {
                            if let ShareMode::Releasing(share_used) = b.share_mode {
                                // The ledger has counted what the share admitted.
                                b.reported = share_used as i64;
                                b.share_mode = ShareMode::Released;
                                // Charges settled since are the ledger's to hear of now.
                                Budgets::touch_one(&mut budgets.touched, &key, b);
                            }
                            b.allowance = used + amount;
                            b.dry_until = (amount < request.amount)
                                .then(|| Instant::now() + Duration::from_secs(1));
                            b.last_slice = amount;
                            b.local_share = false;
                            b.no_quorum = false;
                            // Counted from when it was asked for, and only the first half
                            // is used: the second half is the time this node's last reports
                            // have to reach the ledger before it takes back what they did not
                            // cover (a report that lands after that, e.g. while Raft is slow
                            // under load, would be counted on top of a slice re-granted to
                            // another node).
                            b.expires = Some(sent_at + self.inner.config.grant_ttl / 2);
                        }
                        Ok(other) => {
                            tracing::warn!(?other, key = %key.ledger, "quota: unexpected answer to a grant request");
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, key = %key.ledger, "quota: no slice (no quorum?)");
                            b.no_quorum = true;
                            let lapsed = b.expires.is_none_or(|x| x <= Instant::now());
                            let policy = self
                                .inner
                                .config
                                .no_quorum
                                .get(&b.kind)
                                .copied()
                                .unwrap_or(NoQuorum::Deny);
                            if lapsed {
                                match policy {
                                    NoQuorum::LocalShare => {
                                        let nodes =
                                            self.inner.cluster.state.borrow().members.len().max(1);
                                        b.local_share = true;
                                        b.allowance = b.limit / nodes as u64;
                                        b.expires =
                                            Some(Instant::now() + self.inner.config.grant_ttl);
                                    }
                                    NoQuorum::Deny => {
                                        b.expires = None;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        self.inner.granted.notify_waiters();
    }
}

/// A ledger entry that asks for this node's share.
#[derive(Debug)]
struct Wanted {
    key: String,
    limit: u64,
    window_ms: u64,
    window_start: u64,
}

impl Quota {
    /// The ledger entries that changed from `before` to `after` and now ask for this node's
    /// share (only what changed is looked at: the tables share everything else).
    fn shares_wanted(&self, before: &ClusterState, after: &ClusterState) -> Vec<Wanted> {
        use imbl::ordmap::DiffItem;
        let me = self.inner.node_id;
        before
            .ledger
            .diff(&after.ledger)
            .filter_map(|item| match item {
                DiffItem::Add(key, l) | DiffItem::Update { new: (key, l), .. } => Some((key, l)),
                DiffItem::Remove(..) => None,
            })
            .filter(|(_, l)| l.wanted && l.share > 0 && !l.released.contains_key(&me))
            .map(|(key, l)| Wanted {
                key: key.to_string(),
                limit: l.limit,
                window_ms: l.window_ms,
                window_start: l.window_start_unix_ms,
            })
            .collect()
    }

    /// Gives up this node's share of a window another node needs more of: what it admitted
    /// from it (nothing, for a scope it never saw) is counted, and it admits the scope only
    /// through grants from then on in the window.
    async fn release_share(&self, wanted: Wanted) {
        let Some((scope, code)) = wanted.key.rsplit_once('/') else {
            return;
        };
        let Some(kind) = LimitKind::ALL.into_iter().find(|k| k.code() == code) else {
            return;
        };
        let unix = now_unix_ms();
        if kind.window(unix) != (wanted.window_start, wanted.window_ms) {
            return; // not the window this node admits in
        }
        let (share, nodes) = self.share_of(wanted.limit);
        let used = {
            let mut guard = lock(&self.inner.budgets);
            let budgets = &mut *guard;
            let budget = match budgets.map.entry_ref(&ScopeKind(scope, kind)) {
                EntryRef::Occupied(found) => found.into_mut(),
                EntryRef::Vacant(new) => {
                    let mut b =
                        Budget::new(kind, wanted.limit, wanted.window_start, Instant::now());
                    b.start_share(share, nodes, self.vouches_for(wanted.window_start));
                    let entry = new.insert_entry(Box::new(b));
                    Budgets::list_end(&mut budgets.ends, entry.key(), wanted.window_start);
                    entry.into_mut()
                }
            };
            // A budget still in an earlier window starts this one with its share when it next
            // admits; left alone here (the share stays held, which only costs utilisation).
            if budget.window_start != wanted.window_start {
                return;
            }
            let was_open = budget.share_mode == ShareMode::Open;
            budget.give_up_share();
            match budget.share_mode {
                // A grant request carries the release already.
                ShareMode::Releasing(_) if budget.renewing && !was_open => return,
                ShareMode::Releasing(used) => used,
                ShareMode::Open | ShareMode::Released => return,
            }
        };
        let outcome = self
            .inner
            .cluster
            .proposer
            .propose(Command::ReleaseShare {
                key: wanted.key.clone(),
                node: self.inner.node_id,
                limit: wanted.limit,
                window_ms: wanted.window_ms,
                window_start_unix_ms: wanted.window_start,
                share,
                share_nodes: nodes,
                used,
            })
            .await;
        if outcome.is_ok() {
            let mut guard = lock(&self.inner.budgets);
            let budgets = &mut *guard;
            if let Some((key, b)) = budgets.map.get_key_value_mut(&ScopeKind(scope, kind))
                && b.window_start == wanted.window_start
                && b.share_mode == ShareMode::Releasing(used)
            {
                // Counted by the ledger; the budget goes through grants from here on (charges
                // settled since are the ledger's to hear of).
                b.reported = used as i64;
                b.allowance = used;
                b.share_mode = ShareMode::Released;
                Budgets::touch_one(&mut budgets.touched, key, b);
            }
        }
        // Admissions that waited on the share being given up may ask for a grant now.
        self.inner.granted.notify_waiters();
    }
}

/// The flusher and the renewer: usage goes to the ledger every `flush_every`, and slices are
/// renewed as admissions ask for them.
async fn background(quota: Quota, mut renewals: mpsc::UnboundedReceiver<BudgetKey>) {
    let mut tick = tokio::time::interval(quota.inner.config.flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = quota.inner.cluster.state.clone();
    let mut seen = Arc::clone(&state.borrow_and_update());
    loop {
        tokio::select! {
            _ = tick.tick() => quota.flush().await,
            Ok(()) = state.changed() => {
                let now = Arc::clone(&state.borrow_and_update());
                for wanted in quota.shares_wanted(&seen, &now) {
                    let q = quota.clone();
                    tokio::spawn(async move { q.release_share(wanted).await });
                }
                seen = now;
            }
            key = renewals.recv() => match key {
                Some(key) => {
                    let q = quota.clone();
                    tokio::spawn(async move { q.renew(key).await });
                }
                None => return,
            },
        }
    }
}

/// A node's share counts across its restarts, in its data directory.
///
/// While the node runs, `quota.running` exists; a clean stop writes `quota-shares.json` and
/// then removes the marker. A start that finds the marker knows the node stopped without saving
/// (a crash): it cannot know what it admitted from its shares, so it counts the shares of
/// windows begun before this start as spent (released at once, as fully used). A start that
/// finds the saved counts takes them up and goes on from them.
mod shares {
    use std::io::Write;
    use std::path::Path;

    use serde::{Deserialize, Serialize};

    use super::{LimitKind, now_unix_ms};

    const MARKER: &str = "quota.running";
    const SAVED: &str = "quota-shares.json";

    /// One budget's share, as kept over a restart.
    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct Kept {
        pub scope: String,
        #[serde(with = "kind_code")]
        pub kind: LimitKind,
        pub limit: u64,
        pub window_start: u64,
        pub charged: i64,
        pub share: u64,
        pub share_nodes: u64,
        /// Being released, having admitted this much.
        pub released: Option<u64>,
    }

    mod kind_code {
        use super::LimitKind;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(k: &LimitKind, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(k.code())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LimitKind, D::Error> {
            let code = String::deserialize(d)?;
            LimitKind::ALL
                .into_iter()
                .find(|k| k.code() == code)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown limit {code:?}")))
        }
    }

    /// From when this start can vouch for its shares (0: always), and the counts kept by a
    /// clean stop. Marks the node running.
    pub(super) fn restore(dir: &Path) -> (u64, Vec<Kept>) {
        let marker = dir.join(MARKER);
        let saved = dir.join(SAVED);
        let crashed = marker.exists();
        let (kept, unreadable) = match std::fs::read(&saved) {
            _ if crashed => (Vec::new(), false),
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(kept) => (kept, false),
                Err(e) => {
                    tracing::warn!(error = %e, "quota: saved share counts unreadable");
                    (Vec::new(), true)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
            Err(e) => {
                tracing::warn!(error = %e, "quota: saved share counts unreadable");
                (Vec::new(), true)
            }
        };
        let _ = std::fs::remove_file(&saved);
        let from = if crashed || unreadable {
            tracing::warn!(
                "quota: this node's share counts from before this start are lost (no clean stop); the shares of windows begun before now count as spent"
            );
            now_unix_ms()
        } else {
            0
        };
        if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| durable_write(dir, MARKER, b""))
        {
            tracing::warn!(error = %e, "quota: cannot mark the node running; shares are not kept over a restart");
            return (now_unix_ms(), Vec::new());
        }
        (from, kept)
    }

    pub(super) fn save(dir: &Path, kept: &[Kept]) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(kept)?;
        durable_write(dir, SAVED, &bytes)?;
        std::fs::remove_file(dir.join(MARKER))?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Writes `name` in `dir` atomically and durably: temp file, fsync, rename, fsync the dir.
    fn durable_write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// A usage flush is one Raft entry: it stays under this many bytes (by the estimates below,
/// which are over the JSON each command encodes to), half of the 1 MiB an entry may hold
/// (`meridian_cluster::raft::MAX_ENTRY_BYTES`).
const MAX_FLUSH_BYTES: usize = 512 * 1024;
/// A `ReportUsage` command's encoded size, less its key.
const REPORT_BYTES: usize = 224;
/// A `RecordUsage` command's encoded size, less its tenant and model names.
const ROLLUP_BYTES: usize = 320;

/// What is left of a flush's size budget.
struct Room(usize);

impl Room {
    /// Takes `bytes` if they fit.
    fn take(&mut self, bytes: usize) -> bool {
        match self.0.checked_sub(bytes) {
            Some(left) => {
                self.0 = left;
                true
            }
            None => false,
        }
    }
}

/// The calendar month (UTC) that holds `unix_ms`: its first midnight and its length, in ms.
fn calendar_month(unix_ms: u64) -> (u64, u64) {
    use time::{Date, Month, OffsetDateTime};
    let at = i64::try_from(unix_ms / 1000)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let first = |year: i32, month: Month| {
        Date::from_calendar_date(year, month, 1).map_or(0, |d| {
            d.midnight().assume_utc().unix_timestamp().max(0) as u64 * 1000
        })
    };
    let (year, month) = (at.year(), at.month());
    let start = first(year, month);
    let next = match month {
        Month::December => first(year + 1, Month::January),
        m => first(year, m.next()),
    };
    (start, next.saturating_sub(start))
}

fn window_reset(window_start: u64, window_ms: u64, now: u64) -> Duration {
    Duration::from_millis((window_start + window_ms).saturating_sub(now))
}

fn limited(kind: LimitKind, limit: u64, left: u64, retry: Duration) -> ApiError {
    let suffix = kind.header_suffix();
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "rate limit reached: {} is {limit}; retry after {} s",
            kind.code(),
            whole_seconds(retry)
        ),
    )
    .with_code(kind.code())
    .with_retry_after(retry.max(Duration::from_secs(1)))
    .with_header(format!("x-ratelimit-limit-{suffix}"), limit.to_string())
    .with_header(format!("x-ratelimit-remaining-{suffix}"), left.to_string())
    .with_header(
        format!("x-ratelimit-reset-{suffix}"),
        format!("{}s", whole_seconds(retry)),
    )
}

/// A single request larger than the whole limit can never be admitted.
fn too_big(kind: LimitKind, limit: u64, cost: u64) -> ApiError {
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "this request needs {cost} against {} = {limit}, more than the limit allows in any window; lower max_tokens or the prompt",
            kind.code()
        ),
    )
    .with_code(kind.code())
    .with_param("max_tokens")
    .no_retry()
}

#[cfg(test)]
mod tests;
