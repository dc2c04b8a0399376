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
//! Windows are aligned multiples of their length since the Unix epoch (minute, day, and 30-day
//! "months": calendar months are not modelled).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::hash_map::EntryRef;
use http::{HeaderMap, HeaderName, HeaderValue};
use meridian_proto::cluster::{Applied, Command, GrantRequest, Limits, NodeId, UsageTotals};
use meridian_proto::{ApiError, ErrorKind};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::estimate::Price;
use crate::gateway::Replicated;

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

    /// The suffix of its `x-ratelimit-*` headers (OpenAI's names for the per-minute ones): the
    /// tests' independent statement of what [`Self::header_names`] must say.
    #[cfg(test)]
    fn header_suffix(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests",
            Self::TokensPerMinute => "tokens",
            Self::TokensPerDay => "tokens-day",
            Self::TokensPerMonth => "tokens-month",
            Self::CostPerDay => "cost-day",
        }
    }

    /// `x-ratelimit-limit-*`, `x-ratelimit-remaining-*`, `x-ratelimit-reset-*` (built at
    /// compile time, in a static: naming them costs nothing per response).
    pub fn header_names(self) -> &'static [HeaderName; 3] {
        const fn names(
            limit: &'static str,
            remaining: &'static str,
            reset: &'static str,
        ) -> [HeaderName; 3] {
            [
                HeaderName::from_static(limit),
                HeaderName::from_static(remaining),
                HeaderName::from_static(reset),
            ]
        }
        static NAMES: [[HeaderName; 3]; 5] = [
            names(
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ),
            names(
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ),
            names(
                "x-ratelimit-limit-tokens-day",
                "x-ratelimit-remaining-tokens-day",
                "x-ratelimit-reset-tokens-day",
            ),
            names(
                "x-ratelimit-limit-tokens-month",
                "x-ratelimit-remaining-tokens-month",
                "x-ratelimit-reset-tokens-month",
            ),
            names(
                "x-ratelimit-limit-cost-day",
                "x-ratelimit-remaining-cost-day",
                "x-ratelimit-reset-cost-day",
            ),
        ];
        &NAMES[self as usize]
    }

    pub fn window_ms(self) -> u64 {
        match self {
            Self::RequestsPerMinute | Self::TokensPerMinute => 60_000,
            Self::TokensPerDay | Self::CostPerDay => 86_400_000,
            Self::TokensPerMonth => 30 * 86_400_000,
        }
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

/// A budget's identity: its scope and limit (its ledger key is made once, with it).
#[derive(Debug, Clone)]
struct BudgetKey {
    scope: Arc<str>,
    kind: LimitKind,
    ledger: Arc<str>,
}

impl BudgetKey {
    fn new(scope: &str, kind: LimitKind) -> Self {
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
struct ScopeKind<'a>(&'a str, LimitKind);

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

/// Admitted charges: the budget, the window, and what was reserved.
type Charges = Vec<(BudgetKey, u64, u64)>;

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This node's account of one limit key in the current window.
#[derive(Debug)]
struct Budget {
    kind: LimitKind,
    limit: u64,
    window_start: u64,
    /// What this node may charge in the window: what the ledger has seen from it plus its
    /// current slice.
    allowance: u64,
    /// Charged in the window (admitted, adjusted as reservations settle).
    charged: i64,
    /// Of `charged`, what the ledger has been told.
    reported: i64,
    /// The slice's local expiry (from when it was asked for, shortened by a margin).
    expires: Option<Instant>,
    /// A renewal is under way.
    renewing: bool,
    /// Admitted since the last renewal, and since when (demand for the next slice).
    demand: u64,
    demand_since: Instant,
    /// The last slice's size.
    last_slice: u64,
    /// Working from a local share (no quorum).
    local_share: bool,
    /// `limit`, and the window's reset in whole seconds with its value, rendered for the
    /// `x-ratelimit-*` headers (see [`RateLimitState`]).
    limit_value: HeaderValue,
    reset_value: Option<(u64, HeaderValue)>,
    /// The last renewal found no quorum.
    no_quorum: bool,
    /// The largest admission waiting for a slice (the next slice covers at least this).
    need: u64,
    /// The ledger lately gave less than needed: until then, do not ask again for more.
    dry_until: Option<Instant>,
}

impl Budget {
    /// A budget first seen now: no slice yet.
    fn new(kind: LimitKind, limit: u64, window_start: u64, now: Instant) -> Self {
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
            limit_value: HeaderValue::from(limit),
            reset_value: None,
            no_quorum: false,
            need: 0,
            dry_until: None,
        }
    }
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
}

struct Inner {
    node_id: NodeId,
    config: QuotaConfig,
    cluster: Replicated,
    /// Keyed with a fast seeded hash (foldhash): one lookup per limit per request.
    budgets: Mutex<hashbrown::HashMap<BudgetKey, Budget>>,
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

/// `x-ratelimit-*` values for one limit, made by admission (see [`write_rate_limit_headers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitState {
    kind: LimitKind,
    limit: u64,
    remaining: u64,
    reset: Duration,
    /// `limit` and `reset` as header values. They change rarely (the reset once a second), so
    /// each budget keeps them rendered and every response shares them.
    rendered: [HeaderValue; 2],
}

impl RateLimitState {
    #[cfg(test)]
    fn new(kind: LimitKind, limit: u64, remaining: u64, reset: Duration) -> Self {
        Self {
            kind,
            limit,
            remaining,
            reset,
            rendered: [HeaderValue::from(limit), render_reset(whole_seconds(reset))],
        }
    }
}

/// `n` as a header value: one allocation of its exact size (http's `From<u64>` makes two).
fn count_value(n: u64) -> HeaderValue {
    HeaderValue::from_str(itoa::Buffer::new().format(n)).unwrap_or_else(|_| HeaderValue::from(n))
}

/// `secs` as an `x-ratelimit-reset-*` value (`12s`).
fn render_reset(secs: u64) -> HeaderValue {
    HeaderValue::try_from(format!("{secs}s")).unwrap_or_else(|_| HeaderValue::from_static("0s"))
}

/// Room in a header map for the `x-ratelimit-*` headers of `limits` limits and the few others
/// every answer gets (a map grows before it is full, so reserving only the three per limit
/// still left it to grow once).
pub fn header_room(limits: usize) -> usize {
    3 * limits + 4
}

/// Adds the `x-ratelimit-limit-*`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` headers
/// of each limit to `headers`. This runs for every admitted response: the names are static, the
/// limit and reset values come rendered (see [`RateLimitState`]), and only the remaining count
/// is written here.
pub fn write_rate_limit_headers(states: Vec<RateLimitState>, headers: &mut HeaderMap) {
    if states.is_empty() {
        return;
    }
    headers.reserve(header_room(states.len()));
    for state in states {
        let [limit, remaining, reset] = state.kind.header_names();
        let [limit_value, reset_value] = state.rendered;
        headers.insert(limit.clone(), limit_value);
        headers.insert(remaining.clone(), count_value(state.remaining));
        headers.insert(reset.clone(), reset_value);
    }
}

/// `d` in whole seconds, rounded up.
fn whole_seconds(d: Duration) -> u64 {
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
            .find(|e| e.0.kind.counts_tokens())
            .map_or(0, |e| e.2);
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
        let quota = Self {
            inner: Arc::new(Inner {
                node_id,
                config,
                cluster,
                budgets: Mutex::new(hashbrown::HashMap::new()),
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
        let mut budgets = lock(&self.inner.budgets);
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
            let window_ms = kind.window_ms();
            let window_start = unix - unix % window_ms;
            // One lookup, by the request's scope: a key is made only for a new budget.
            let entry = match budgets.entry_ref(&ScopeKind(scope, kind)) {
                EntryRef::Occupied(found) => found,
                EntryRef::Vacant(new) => {
                    new.insert_entry(Budget::new(kind, limit, window_start, now))
                }
            };
            let key = entry.key().clone();
            let budget = entry.into_mut();
            if budget.limit != limit {
                budget.limit = limit;
                budget.limit_value = HeaderValue::from(limit);
            }
            if budget.window_start != window_start {
                // A new window: whatever was charged in the old one and not yet reported is
                // reported to the old window; the new one starts with no slice.
                let unreported = budget.charged - budget.reported;
                if unreported != 0 {
                    lock(&self.inner.late).push(Late {
                        key: key.clone(),
                        window_start: budget.window_start,
                        delta: unreported,
                    });
                }
                budget.window_start = window_start;
                budget.allowance = 0;
                budget.charged = 0;
                budget.reported = 0;
                budget.expires = None;
                budget.local_share = false;
                budget.dry_until = None;
            }
            if cost > limit {
                refusal = Some(too_big(kind, limit, cost));
                break;
            }
            let lapsed = budget.expires.is_none_or(|e| e <= now);
            let left = (budget.allowance as i64 - budget.charged).max(0) as u64;
            let reset = window_reset(window_start, window_ms, unix);
            if (budget.local_share || !lapsed) && left >= cost {
                budget.charged += cost as i64;
                budget.demand += cost;
                local_share_admits += u64::from(budget.local_share);
                let left = left - cost;
                // Renew early, before the slice runs dry or lapses (once the request is
                // admitted: a request refused by a later limit asks for nothing).
                let low = left < budget.last_slice / 2
                    || budget
                        .expires
                        .is_some_and(|e| e <= now + self.inner.config.grant_ttl / 5);
                if low && !budget.renewing && !budget.local_share {
                    renew_early.push(charges.len());
                }
                let cluster_left = self.cluster_left(&key.ledger).unwrap_or(left);
                let secs = whole_seconds(reset);
                let reset_value = match &budget.reset_value {
                    Some((s, v)) if *s == secs => v.clone(),
                    _ => budget
                        .reset_value
                        .insert((secs, render_reset(secs)))
                        .1
                        .clone(),
                };
                states.push(RateLimitState {
                    kind,
                    limit,
                    remaining: cluster_left
                        .saturating_sub((budget.charged - budget.reported).max(0) as u64),
                    reset,
                    rendered: [budget.limit_value.clone(), reset_value],
                });
                charges.push((key, window_start, cost));
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
            // A new slice can help if this one lapsed, or if the ledger has not lately
            // answered with less than was needed (the window's budget is spent or promised).
            let dry = budget.dry_until.is_some_and(|d| d > now);
            if !budget.local_share && (lapsed || !dry) {
                budget.need = budget.need.max(cost);
                if !budget.renewing {
                    budget.renewing = true;
                    let _ = self.inner.renew.send(key.clone());
                }
                wait = true;
                continue;
            }
            let cluster_left = self.cluster_left(&key.ledger).unwrap_or(0);
            let retry = if cluster_left >= cost && !budget.local_share {
                Duration::from_secs(1).min(reset)
            } else {
                reset
            };
            refusal = Some(limited(kind, limit, cluster_left, retry));
            break;
        }
        if wait || refusal.is_some() {
            // Not admitted: give back what the limits that did admit were charged.
            for (key, _, cost) in &charges {
                if let Some(b) = budgets.get_mut(key) {
                    b.charged -= *cost as i64;
                    b.demand = b.demand.saturating_sub(*cost);
                }
            }
            return refusal.map_or(Verdict::Wait, Verdict::Refused);
        }
        for i in renew_early {
            let key = &charges[i].0;
            if let Some(b) = budgets.get_mut(key)
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

    fn settle(&self, entries: &[(BudgetKey, u64, u64)], actual_tokens: u64, actual_micro_usd: u64) {
        let mut budgets = lock(&self.inner.budgets);
        for (key, window_start, reserved) in entries {
            let actual = match key.kind.unit() {
                Unit::Requests => continue,
                Unit::Tokens => actual_tokens,
                Unit::MicroUsd => actual_micro_usd,
            };
            let delta = actual as i64 - *reserved as i64;
            if delta == 0 {
                continue;
            }
            match budgets.get_mut(key) {
                Some(b) if b.window_start == *window_start => b.charged += delta,
                _ => lock(&self.inner.late).push(Late {
                    key: key.clone(),
                    window_start: *window_start,
                    delta,
                }),
            }
        }
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
                    if let Some(b) = budgets.get_mut(&key)
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
        let mut sent: Vec<(BudgetKey, u64, i64)> = Vec::new();
        let mut room = Room(MAX_FLUSH_BYTES);
        {
            let mut budgets = lock(&self.inner.budgets);
            forget_ended(&mut budgets, now_unix_ms());
            for (key, b) in budgets.iter() {
                let delta = b.charged - b.reported;
                // Left unreported, a budget's charge is reported by a later flush.
                if delta != 0 && room.take(REPORT_BYTES + key.ledger.len()) {
                    commands.push(Command::ReportUsage {
                        key: key.ledger.to_string(),
                        node: self.inner.node_id,
                        window_start_unix_ms: b.window_start,
                        delta,
                    });
                    sent.push((key.clone(), b.window_start, delta));
                }
            }
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
            let Some(b) = budgets.get_mut(&key) else {
                return;
            };
            let now = Instant::now();
            let elapsed = now.duration_since(b.demand_since).as_secs_f64().max(0.05);
            let rate = b.demand as f64 / elapsed;
            let cap = ((b.limit as f64 * self.inner.config.max_slice).ceil() as u64).max(1);
            let want = (rate * self.inner.config.slice_horizon.as_secs_f64()).ceil() as u64;
            let amount = want.clamp((cap / 10).max(1), cap).max(b.need).min(b.limit);
            b.need = 0;
            b.demand = 0;
            b.demand_since = now;
            (
                GrantRequest {
                    key: key.ledger.to_string(),
                    node: self.inner.node_id,
                    limit: b.limit,
                    window_ms: b.kind.window_ms(),
                    window_start_unix_ms: b.window_start,
                    amount,
                    ttl_ms: self.inner.config.grant_ttl.as_millis() as u64,
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
            let mut budgets = lock(&self.inner.budgets);
            if let Some(b) = budgets.get_mut(&key) {
                b.renewing = false;
                if b.window_start == request.window_start_unix_ms {
                    match outcome {
                        Ok(Applied::Granted { amount, used }) => {
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

/// The flusher and the renewer: usage goes to the ledger every `flush_every`, and slices are
/// renewed as admissions ask for them.
async fn background(quota: Quota, mut renewals: mpsc::UnboundedReceiver<BudgetKey>) {
    let mut tick = tokio::time::interval(quota.inner.config.flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => quota.flush().await,
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

/// A usage flush is one Raft entry: it stays under this many bytes (by the estimates below,
/// which are over the JSON each command encodes to), half of the 1 MiB an entry may hold
/// (`meridian_cluster::raft::MAX_ENTRY_BYTES`).
const MAX_FLUSH_BYTES: usize = 512 * 1024;
/// A `ReportUsage` command's encoded size, less its key.
const REPORT_BYTES: usize = 160;
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

/// Forgets the budgets whose window has ended with everything reported: a request in a later
/// window starts a fresh one anyway, and per-user budgets would otherwise pile up with every
/// user ever seen.
fn forget_ended(budgets: &mut hashbrown::HashMap<BudgetKey, Budget>, unix: u64) {
    budgets.retain(|_, b| {
        let ended = b.window_start + b.kind.window_ms() <= unix;
        !(ended && b.charged == b.reported && !b.renewing)
    });
}

fn window_reset(window_start: u64, window_ms: u64, now: u64) -> Duration {
    Duration::from_millis((window_start + window_ms).saturating_sub(now))
}

fn limited(kind: LimitKind, limit: u64, left: u64, retry: Duration) -> ApiError {
    let [limit_name, remaining_name, reset_name] = kind.header_names();
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
    .with_header(limit_name.as_str(), limit.to_string())
    .with_header(remaining_name.as_str(), left.to_string())
    .with_header(reset_name.as_str(), format!("{}s", whole_seconds(retry)))
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
