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
//! delta when a reservation settles for less than estimated). A new slice comes on top of what
//! the node's previous grant still promised (the node charges against that until it hears the
//! answer, so the ledger never hands it to another node meanwhile), with what the ledger had
//! seen reported by the node: the node may charge that, plus what is held, plus the slice, so
//! charges not yet reported come out of what is held. A slice is used for half its TTL; the
//! other half is the time late reports have to land before the ledger takes it back. A node that
//! dies stops renewing: its slice lapses at expiry and returns to the pool.
//!
//! Without quorum (no slice can be renewed), each limit follows its policy: `deny` refuses with
//! 503 `quota_unavailable`, `local_share` admits up to limit ÷ cluster size on this node alone.
//!
//! Windows are aligned multiples of their length since the Unix epoch (minute, day) and calendar
//! months in UTC (`tokens_per_month`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use hashbrown::hash_map::EntryRef;
use meridian_proto::cluster::{Command, Limits, NodeId, UsageKey, UsageTotals};
use meridian_proto::{ApiError, ErrorKind};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

mod budget;
mod limits;
mod reservation;
mod shares;
mod sync;

use budget::{Budget, BudgetKey, Budgets, ScopeKind, ShareMode};
pub use limits::{LimitKind, RateLimitState, whole_seconds};
use limits::{limit_of, limited, too_big};
pub use meridian_policy::clock::WallClock;
use meridian_policy::limit::{Unit, static_share, window_reset};
pub use reservation::{Estimate, Reservation};
use sync::background;

use crate::replicated::Replicated;
use meridian_policy::cost::{Billable, Rates};

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
    /// How long a slice is valid (the ledger counts from its proposal's timestamp, this node
    /// from its request).
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
    /// End users a tenant's daily roll-up keeps by name (sent with each report).
    pub usage_users_per_day: u64,
    /// Prompt tokens an image in a request is estimated at.
    pub image_tokens: u64,
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
    /// Where windows are read from (the system's clock; tests set their own).
    pub clock: WallClock,
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
            usage_users_per_day: meridian_proto::cluster::DEFAULT_MAX_USERS,
            image_tokens: crate::estimate::DEFAULT_IMAGE_TOKENS,
            static_share: 0.5,
            state_dir: None,
            min_nodes: 1,
            clock: WallClock::system(),
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
    meridian_policy::clock::unix_ms()
}

/// Day (since the Unix epoch) → tenant → row → usage: see `Inner::rollups`.
type Rollups = hashbrown::HashMap<
    u64,
    hashbrown::HashMap<Arc<str>, hashbrown::HashMap<UsageKey, UsageTotals>>,
>;

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
    /// Replaced whole by a configuration reload ([`Quota::retune`]); read once per use.
    config: RwLock<Arc<QuotaConfig>>,
    cluster: Replicated,
    /// Keyed with a fast seeded hash (foldhash): one lookup per limit per request.
    budgets: Mutex<Budgets>,
    late: Mutex<Vec<Late>>,
    /// Usage not yet reported, by the calls' day, then tenant, then model, provider, feature
    /// and user (keyed with the fast hash: a client can name users and features, but a table
    /// lives one flush long). By day, so that a call is counted in its own day however late
    /// its flush commits.
    rollups: Mutex<Rollups>,
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

impl Inner {
    /// The `[quota]` settings in force now.
    fn config(&self) -> Arc<QuotaConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }
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

/// A call's row in its tenant's daily roll-up, borrowed (made into a [`UsageKey`] only for a
/// row new to this flush). Hashes as a `UsageKey` does: field by field, as strings.
#[derive(Debug, Clone, Copy, Hash)]
pub struct RollupKey<'a> {
    pub model: &'a str,
    pub provider: &'a str,
    pub feature: &'a str,
    pub user: &'a str,
}

impl RollupKey<'_> {
    fn to_key(self) -> UsageKey {
        UsageKey {
            model: self.model.to_owned(),
            provider: self.provider.to_owned(),
            feature: self.feature.to_owned(),
            user: self.user.to_owned(),
        }
    }
}

impl hashbrown::Equivalent<UsageKey> for RollupKey<'_> {
    fn equivalent(&self, key: &UsageKey) -> bool {
        self.model == key.model
            && self.provider == key.provider
            && self.feature == key.feature
            && self.user == key.user
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
            Some(dir) => shares::restore(dir, config.clock.now_ms()),
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
                config: RwLock::new(Arc::new(config)),
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

    /// Applies a reloaded `[quota]` section from the next admission, flush and renewal on.
    /// What the node was started with stays for what must not change while it runs: the static
    /// share (every node must split the same one, and this window's shares were counted under
    /// it), where the share counts are kept, the node count shares are split among, the clock.
    /// Returns whether the static share differed (it takes a restart of every node).
    pub fn retune(&self, new: QuotaConfig) -> bool {
        let mut slot = self.inner.config.write().unwrap_or_else(|e| e.into_inner());
        let old = Arc::clone(&slot);
        *slot = Arc::new(QuotaConfig {
            static_share: old.static_share,
            state_dir: old.state_dir.clone(),
            min_nodes: old.min_nodes,
            clock: old.clock.clone(),
            ..new.clone()
        });
        new.static_share != old.static_share
    }

    /// Prompt tokens an image is estimated at (`[quota] image_tokens`).
    pub fn image_tokens(&self) -> u64 {
        self.inner.config().image_tokens
    }

    /// Admissions made under a local share, and refusals for want of quorum.
    pub fn no_quorum_counts(&self) -> (u64, u64) {
        (
            self.inner.local_share_admits.load(Ordering::Relaxed),
            self.inner.denied_no_quorum.load(Ordering::Relaxed),
        )
    }

    /// Admits a request (with `limits`) costing `estimate`, or refuses it with a
    /// 429 naming the limit (or 503 when no quorum and the policy denies).
    pub async fn admit(
        &self,
        scopes: &[Scope],
        estimate: Estimate,
    ) -> Result<Reservation, ApiError> {
        if scopes.is_empty() {
            // Nothing to charge (a caller with no limit): no lock; the reservation carries the
            // prompt's estimate.
            return Ok(Reservation {
                quota: self.clone(),
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
                        .get_or_insert_with(|| Instant::now() + self.inner.config().grant_wait);
                    last_look = tokio::time::timeout_at(until, waiting).await.is_err();
                }
            }
        }
    }

    /// Adds `usage` to `tenant`'s roll-up row `key` of day `day` (since the Unix epoch: the
    /// call's own), reported with the next flush.
    pub fn record(&self, tenant: &Arc<str>, day: u64, key: RollupKey<'_>, usage: &UsageTotals) {
        let mut rollups = lock(&self.inner.rollups);
        let rows = rollups
            .entry(day)
            .or_default()
            .entry_ref(&**tenant)
            .or_default();
        // No allocation once the row has an entry in this flush's table.
        match rows.get_mut(&key) {
            Some(totals) => totals.add(usage),
            None => {
                rows.insert(key.to_key(), *usage);
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
        // The settings in force, read once for the whole decision (not under the budget lock).
        let config = self.inner.config();
        let unix = config.clock.now_ms();
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
            .filter_map(|(s, k)| Some((&s.key, k, limit_of(k, &s.limits)?)));
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
                        .is_some_and(|e| e <= now + config.grant_ttl / 5);
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
            let policy = config
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
        let config = self.inner.config();
        let Some(dir) = &config.state_dir else {
            return;
        };
        let unix = config.clock.now_ms();
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
        let config = self.inner.config();
        let nodes = members.max(config.min_nodes).max(1);
        (static_share(limit, config.static_share, nodes), nodes)
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
            let (current, _) = c.key.kind.window(self.inner.config().clock.now_ms());
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
}

#[cfg(test)]
mod tests;
