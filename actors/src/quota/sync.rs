//! The quota account's Raft side: usage flushed to the ledger, slices renewed, static shares
//! released when the ledger asks for them, and the task that runs all three.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use meridian_policy::limit::slice_size;
use meridian_proto::cluster::{Applied, ClusterState, Command, GrantRequest, Ledger};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;

impl Quota {
    /// Reports every unreported charge (and the day's roll-ups) to the ledger in one batch.
    pub(super) async fn flush(&self) {
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
    pub(super) fn next_batch(&self) -> Option<Batch> {
        let mut commands = Vec::new();
        let sent;
        let mut room = Room(MAX_FLUSH_BYTES);
        {
            let mut budgets = lock(&self.inner.budgets);
            budgets.forget_ended(self.inner.config().clock.now_ms());
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
            let mut days: Vec<u64> = rollups.keys().copied().collect();
            days.sort_unstable();
            'days: for day in days {
                let Some(tenants) = rollups.get_mut(&day) else {
                    continue;
                };
                let names: Vec<Arc<str>> = tenants.keys().cloned().collect();
                for tenant in names {
                    let Some(rows) = tenants.remove(&tenant) else {
                        continue;
                    };
                    // Taken whole (the keys move into the commands); what does not fit goes
                    // back.
                    let mut rows = rows.into_iter();
                    while let Some((key, totals)) = rows.next() {
                        let names = key.model.len()
                            + key.provider.len()
                            + key.feature.len()
                            + key.user.len();
                        if !room.take(ROLLUP_BYTES + tenant.len() + names) {
                            let back = tenants.entry(tenant).or_default();
                            back.insert(key, totals);
                            back.extend(rows);
                            break 'days;
                        }
                        commands.push(Command::RecordUsage {
                            tenant: tenant.to_string(),
                            model: key.model,
                            totals,
                            retain_days: self.inner.config().usage_retention_days,
                            provider: key.provider,
                            feature: key.feature,
                            user: key.user,
                            max_users: self.inner.config().usage_users_per_day,
                            day: Some(day),
                        });
                    }
                }
                rollups.remove(&day);
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
    /// (its answer says), plus what it still held for this node (the rest of the previous
    /// grant, or the charges this request says were made beyond the reports), plus the slice:
    /// whatever this node charged beyond its reports, reported later or not yet, comes out of
    /// what was held. So no report has to land first, and it does not matter which of this
    /// node's reports and grants complete first here.
    pub(super) async fn renew(&self, key: BudgetKey) {
        let (request, sent_at) = {
            let mut budgets = lock(&self.inner.budgets);
            let Some(b) = budgets.map.get_mut(&key) else {
                return;
            };
            let now = Instant::now();
            let amount = slice_size(
                b.limit,
                self.inner.config().max_slice,
                b.demand,
                now.duration_since(b.demand_since),
                self.inner.config().slice_horizon,
                b.need,
            );
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
                    ttl_ms: self.inner.config().grant_ttl.as_millis() as u64,
                    share: b.share,
                    share_nodes: b.share_nodes,
                    share_used: match b.share_mode {
                        ShareMode::Releasing(used) => used,
                        ShareMode::Released => 0,
                        // Not asked for from an open share; if it ever is, the request gives
                        // the share up with what it admitted (see below), never as unused.
                        ShareMode::Open => b.charged.max(0) as u64,
                    },
                    charged: b.charged.max(0) as u64,
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
                        Ok(Applied::Granted { amount, used, held }) => {
                            if let ShareMode::Releasing(share_used) = b.share_mode {
                                // The ledger has counted what the share admitted.
                                b.reported = share_used as i64;
                                b.share_mode = ShareMode::Released;
                                // Charges settled since are the ledger's to hear of now.
                                Budgets::touch_one(&mut budgets.touched, &key, b);
                            }
                            b.allowance = used + held + amount;
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
                            b.expires = Some(sent_at + self.inner.config().grant_ttl / 2);
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
                                .config()
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
                                            Some(Instant::now() + self.inner.config().grant_ttl);
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

/// Takes a key out of the releases under way when its release ends, however it ends.
struct Released(Arc<std::sync::Mutex<HashSet<String>>>, String);

impl Drop for Released {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

/// A ledger entry that asks for this node's share.
#[derive(Debug)]
pub(super) struct Wanted {
    key: String,
    limit: u64,
    window_ms: u64,
    window_start: u64,
}

impl Quota {
    /// The ledger entries marked wanted since `seen` (`LedgerTable::wants`) that ask for this
    /// node's share: those marked last, or every entry when the ledger does not know them all
    /// (at start, after a snapshot, after many marks).
    pub(super) fn shares_wanted(
        &self,
        state: &ClusterState,
        seen: Option<(u64, u64)>,
    ) -> Vec<Wanted> {
        let ledger = &state.ledger;
        let marked: Box<dyn Iterator<Item = &Arc<Ledger>>> =
            match seen.and_then(|seen| ledger.wanted_since(seen)) {
                Some(keys) => {
                    let keys: BTreeSet<&str> = keys.map(|k| k.as_str()).collect();
                    Box::new(keys.into_iter().filter_map(|k| ledger.get(k)))
                }
                None => Box::new(ledger.values()),
            };
        marked.filter_map(|l| self.share_wanted(l)).collect()
    }

    /// What `ledger` asks of this node's share, if anything.
    fn share_wanted(&self, ledger: &Ledger) -> Option<Wanted> {
        let me = self.inner.node_id;
        (ledger.wanted && ledger.share > 0 && !ledger.released.contains_key(&me)).then(|| Wanted {
            key: ledger.key().to_string(),
            limit: ledger.limit,
            window_ms: ledger.window_ms,
            window_start: ledger.window_start_unix_ms,
        })
    }

    /// Gives up this node's share of a window another node needs more of: what it admitted
    /// from it (nothing, for a scope it never saw) is counted, and it admits the scope only
    /// through grants from then on in the window.
    pub(super) async fn release_share(&self, wanted: Wanted) {
        let Some((scope, code)) = wanted.key.rsplit_once('/') else {
            return;
        };
        let Some(kind) = LimitKind::ALL.into_iter().find(|k| k.code() == code) else {
            return;
        };
        let unix = self.inner.config().clock.now_ms();
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
pub(super) async fn background(quota: Quota, mut renewals: mpsc::UnboundedReceiver<BudgetKey>) {
    let ticker = |every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    };
    let mut every = quota.inner.config().flush_every;
    let mut tick = ticker(every);
    let mut state = quota.inner.cluster.state.clone();
    // Not the version last seen: holding it would keep the state machine from reusing it
    // (see `meridian_cluster::state_machine`). Only its ledger's marks; none at first, so that
    // the first look walks the whole ledger.
    let mut seen = None;
    // The keys whose release is under way, so that marks made meanwhile start no other.
    let releasing: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    // Keys marked while their release was under way, looked at again at each change until it
    // is done (that release may have failed, or been for another window).
    let mut missed: HashSet<String> = HashSet::new();
    let mut release = |state: &ClusterState, seen: &mut Option<(u64, u64)>| {
        let wants = state.ledger.wants();
        if *seen == Some(wants) && missed.is_empty() {
            return;
        }
        let mut wanted = if *seen == Some(wants) {
            Vec::new()
        } else {
            quota.shares_wanted(state, *seen)
        };
        *seen = Some(wants);
        let again = std::mem::take(&mut missed).into_iter();
        wanted.extend(again.filter_map(|key| quota.share_wanted(state.ledger.get(&key)?)));
        for wanted in wanted {
            if !lock(&releasing).insert(wanted.key.clone()) {
                missed.insert(wanted.key);
                continue;
            }
            let (q, done) = (
                quota.clone(),
                Released(Arc::clone(&releasing), wanted.key.clone()),
            );
            tokio::spawn(async move {
                q.release_share(wanted).await;
                drop(done);
            });
        }
    };
    let now = Arc::clone(&state.borrow_and_update());
    release(&now, &mut seen);
    drop(now);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                quota.flush().await;
                // A reload may have changed the period.
                let now = quota.inner.config().flush_every;
                if now != every {
                    every = now;
                    tick = ticker(every);
                    tick.reset();
                }
            }
            Ok(()) = state.changed() => {
                let now = Arc::clone(&state.borrow_and_update());
                release(&now, &mut seen);
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

/// A usage flush is one Raft entry: it stays under this many bytes (by the estimates below,
/// which are over the JSON each command encodes to), half of the 1 MiB an entry may hold
/// (`meridian_cluster::raft::MAX_ENTRY_BYTES`).
pub(super) const MAX_FLUSH_BYTES: usize = 512 * 1024;
/// A `ReportUsage` command's encoded size, less its key.
pub(super) const REPORT_BYTES: usize = 224;
/// A `RecordUsage` command's encoded size, less its tenant, model, provider, feature and user
/// names (408 bytes with every number at its longest: a test holds it to this).
pub(super) const ROLLUP_BYTES: usize = 416;

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
