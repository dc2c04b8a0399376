//! [`ClusterState::apply`]: what each command does to the state. Deterministic: it reads only
//! the proposal's timestamp and the state (no clock, no IO, no randomness).

use super::*;

impl ClusterState {
    pub fn apply(&mut self, p: &Proposal) -> Applied {
        let applied = self.apply_command(p.at_unix_ms, p.proposer, &p.command);
        self.sweep_ledger(p.at_unix_ms, SWEEP_PER_APPLY);
        applied
    }

    /// Looks at the next `count` ledger entries after where the last sweep stopped (wrapping
    /// around): lapsed grants are dropped, and an entry whose window ended more than
    /// [`LEDGER_GRACE_MS`] ago with no live grant is removed. So the ledger holds the windows
    /// in use, not every scope ever seen, and each apply pays a bounded share of the cleanup.
    /// Deterministic: it reads only the proposal's timestamp and the state.
    pub fn sweep_ledger(&mut self, at: u64, count: usize) {
        let live = |g: &Grant| g.expires_at_unix_ms > at;
        // Only the keys to act on are copied (rarely any); the rest are looked at in place.
        let mut remove = Vec::new();
        let mut prune = Vec::new();
        let mut last = None;
        let after = self.ledger.after(&self.ledger_sweep_after);
        let from_start = self.ledger.values();
        for ledger in after.chain(from_start).take(count.min(self.ledger.len())) {
            let key = &ledger.key;
            last = Some(key);
            let ended = ledger.window_start_unix_ms + ledger.window_ms + LEDGER_GRACE_MS <= at;
            if ended && !ledger.grants.values().any(live) {
                remove.push(key.clone());
            } else if !ledger.grants.values().all(live) {
                prune.push(key.clone());
            }
        }
        // The next sweep starts after the last key looked at.
        self.ledger_sweep_after = last.cloned().unwrap_or_default();
        for key in remove {
            self.ledger.remove(&key);
        }
        for key in prune {
            if let Some(ledger) = self.ledger.get_mut(&key) {
                std::sync::Arc::make_mut(ledger)
                    .grants
                    .retain(|_, g| live(g));
            }
        }
    }

    fn apply_command(&mut self, at: u64, proposer: NodeId, command: &Command) -> Applied {
        match command {
            Command::UpsertMember(m) => {
                if self.members.get(&m.id) == Some(m) {
                    return Applied::Unchanged;
                }
                self.members.insert(m.id, m.clone());
                Applied::Changed
            }
            Command::RemoveMember { id } => match self.members.remove(id) {
                Some(_) => Applied::Changed,
                None => Applied::NotFound,
            },
            Command::UpsertProvider(record) => {
                let mut record = record.clone();
                record.updated_at_unix_ms = at;
                if let Some(old) = self.providers.get(&record.id) {
                    let mut same = old.clone();
                    same.updated_at_unix_ms = record.updated_at_unix_ms;
                    if same == record {
                        return Applied::Unchanged;
                    }
                }
                self.providers.insert(record.id.clone(), record);
                Applied::Changed
            }
            Command::RemoveProvider { id } => match self.providers.remove(id) {
                Some(_) => Applied::Changed,
                None => Applied::NotFound,
            },
            Command::UpsertTier(tier) => {
                if self.tiers.get(&tier.name) == Some(tier) {
                    return Applied::Unchanged;
                }
                self.tiers.insert(tier.name.clone(), tier.clone());
                Applied::Changed
            }
            Command::UpsertTenant(tenant) => {
                if !self.tiers.contains_key(&tenant.tier) {
                    return Applied::NotFound;
                }
                // Unchanged only when the whole record, timestamps aside, is equal: comparing
                // chosen fields once let a change of regions alone be dropped.
                let mut tenant = tenant.clone();
                match self.tenants.get(&tenant.id) {
                    Some(old) => {
                        tenant.created_at_unix_ms = old.created_at_unix_ms;
                        tenant.updated_at_unix_ms = old.updated_at_unix_ms;
                        if tenant == *old {
                            return Applied::Unchanged;
                        }
                    }
                    None => tenant.created_at_unix_ms = at,
                }
                tenant.updated_at_unix_ms = at;
                self.tenants.insert(tenant.id.clone(), tenant);
                Applied::Changed
            }
            Command::RemoveTenant { id } => match self.tenants.remove(id) {
                Some(_) => {
                    // Its keys stop working with it.
                    let keys: Vec<String> = (self.api_keys.values())
                        .filter(|k| &k.tenant == id && k.revoked_at_unix_ms.is_none())
                        .map(|k| k.id.clone())
                        .collect();
                    for key in keys {
                        if let Some(k) = self.api_keys.get_mut(&key) {
                            k.revoked_at_unix_ms = Some(at);
                        }
                    }
                    Applied::Changed
                }
                None => Applied::NotFound,
            },
            Command::CreateApiKey(key) => {
                if !self.tenants.contains_key(&key.tenant) {
                    return Applied::NotFound;
                }
                let mut key = key.clone();
                if let Some(old) = self.api_keys.get(&key.id) {
                    // Keys never change: the same record again is a repeat, anything else
                    // (another tenant or secret, or a revoked key brought back) is refused.
                    key.created_at_unix_ms = old.created_at_unix_ms;
                    key.revoked_at_unix_ms = old.revoked_at_unix_ms;
                    return if key == *old && old.revoked_at_unix_ms.is_none() {
                        Applied::Unchanged
                    } else {
                        Applied::Refused
                    };
                }
                key.created_at_unix_ms = at;
                key.revoked_at_unix_ms = None;
                self.api_keys.insert(key.id.clone(), key);
                Applied::Changed
            }
            Command::RevokeCertificate { fingerprint, node } => {
                if self.revoked_certs.contains_key(fingerprint) {
                    return Applied::Unchanged;
                }
                self.revoked_certs.insert(
                    fingerprint.clone(),
                    RevokedCert {
                        node: *node,
                        revoked_at_unix_ms: at,
                    },
                );
                Applied::Changed
            }
            Command::RevokeApiKey { id } => stamp_once(
                self.api_keys.get_mut(id).map(|k| &mut k.revoked_at_unix_ms),
                at,
            ),
            Command::RequestGrant(r) => {
                let window_end = r.window_start_unix_ms.saturating_add(r.window_ms);
                if window_end.saturating_add(LEDGER_GRACE_MS) <= at {
                    // Long over (its entry may be gone): nothing to grant from.
                    return Applied::Granted {
                        amount: 0,
                        used: 0,
                        held: 0,
                    };
                }
                let ledger = std::sync::Arc::make_mut(
                    self.ledger.get_or_insert_with(&r.key, Ledger::default),
                );
                ledger.advance(at, r.window_start_unix_ms, r.window_ms);
                if ledger.window_start_unix_ms != r.window_start_unix_ms {
                    return Applied::Granted {
                        amount: 0,
                        used: 0,
                        held: 0,
                    };
                }
                ledger.limit = r.limit;
                if r.share > 0 {
                    ledger.release(r.node, r.share, r.share_nodes, r.share_used);
                }
                // What the node's live grant still promises stays with it: until it hears this
                // answer it goes on charging against that, and what it charged and has not yet
                // reported is in it. (Handing the unused part back here would let another node
                // be granted budget this one has already spent.) A lapsed grant promises
                // nothing, but the node's word for what it charged beyond its reports is held.
                let used = ledger.used_by.get(&r.node).copied().unwrap_or(0);
                let kept = ledger.grants.remove(&r.node).map_or(0, |g| g.outstanding());
                let held = kept.max(r.charged.saturating_sub(used));
                let amount = r.amount.min(ledger.available().saturating_sub(held));
                let wanted = amount < r.amount && ledger.shares_held() > 0;
                if wanted {
                    ledger.wanted = true;
                }
                ledger.grants.insert(
                    r.node,
                    Grant {
                        amount: held + amount,
                        used: 0,
                        expires_at_unix_ms: at.saturating_add(r.ttl_ms),
                    },
                );
                if wanted {
                    self.ledger.mark_wanted(&r.key);
                }
                Applied::Granted { amount, used, held }
            }
            Command::ReleaseShare {
                key,
                node,
                limit,
                window_ms,
                window_start_unix_ms,
                share,
                share_nodes,
                used,
            } => {
                let window_end = window_start_unix_ms.saturating_add(*window_ms);
                if window_end.saturating_add(LEDGER_GRACE_MS) <= at {
                    return Applied::Unchanged;
                }
                let ledger =
                    std::sync::Arc::make_mut(self.ledger.get_or_insert_with(key, Ledger::default));
                ledger.advance(at, *window_start_unix_ms, *window_ms);
                if ledger.window_start_unix_ms != *window_start_unix_ms {
                    return Applied::Unchanged;
                }
                ledger.limit = *limit;
                if ledger.released.contains_key(node) {
                    return Applied::Unchanged;
                }
                ledger.release(*node, *share, *share_nodes, *used);
                Applied::Changed
            }
            Command::ReportUsage {
                key,
                node,
                window_start_unix_ms,
                delta,
                limit,
                window_ms,
            } => {
                let window_end = window_start_unix_ms.saturating_add(*window_ms);
                let fresh =
                    *limit > 0 && *window_ms > 0 && window_end.saturating_add(LEDGER_GRACE_MS) > at;
                let ledger = match self.ledger.get_mut(key.as_str()) {
                    Some(ledger) => std::sync::Arc::make_mut(ledger),
                    None if fresh => {
                        let entry = || Ledger {
                            window_start_unix_ms: *window_start_unix_ms,
                            window_ms: *window_ms,
                            limit: *limit,
                            ..Ledger::default()
                        };
                        std::sync::Arc::make_mut(self.ledger.get_or_insert_with(key, entry))
                    }
                    None => return Applied::NotFound,
                };
                let window_ms = ledger.window_ms;
                ledger.advance(at, *window_start_unix_ms, window_ms);
                if ledger.window_start_unix_ms != *window_start_unix_ms {
                    return Applied::Unchanged;
                }
                ledger.used = ledger.used.saturating_add_signed(*delta);
                let mine = ledger.used_by.entry_or_default(*node);
                *mine = mine.saturating_add_signed(*delta);
                if let Some(g) = ledger.grants.get_mut(node) {
                    g.used = g.used.saturating_add_signed(*delta);
                }
                Applied::Changed
            }
            Command::SetBreaker {
                provider,
                state,
                reason,
                trips,
                forced,
                expect_version,
                groups,
            } => {
                let current = self.breakers.get(provider);
                let version = current.map_or(0, |b| b.version);
                if let Some(expected) = expect_version {
                    // Automatic: only from the state it was decided on, never over an operator.
                    if *expected != version || current.is_some_and(|b| b.forced) {
                        return Applied::Unchanged;
                    }
                }
                let record = BreakerRecord {
                    state: *state,
                    reason: reason.clone(),
                    since_unix_ms: at,
                    by: proposer,
                    trips: *trips,
                    forced: *forced,
                    version: version + 1,
                };
                if let Some(current) = current {
                    // A repeat only when every field but those apply sets is equal.
                    let mut same = record.clone();
                    same.since_unix_ms = current.since_unix_ms;
                    same.by = current.by;
                    same.version = current.version;
                    if same == *current {
                        return Applied::Unchanged;
                    }
                }
                let opening = matches!(state, BreakerState::Open { .. })
                    && !current.is_some_and(BreakerRecord::is_open);
                if opening && !*forced {
                    let open = |id: &String| {
                        id != provider && self.breakers.get(id).is_some_and(BreakerRecord::is_open)
                    };
                    let too_many = groups.iter().any(|g| {
                        let already = g.iter().filter(|id| open(id)).count();
                        (already + 1) * 2 > g.len()
                    });
                    if too_many {
                        return Applied::Refused;
                    }
                }
                self.breakers.insert(provider.clone(), record);
                Applied::Changed
            }
            Command::RecordUsage {
                tenant,
                model,
                totals,
                retain_days,
                provider,
                feature,
                user,
                max_users,
                day,
            } => {
                // A node's calls are dated by its clock; never a day past the proposal's. The
                // retention counts back from the proposal's day: a late row of a day already
                // dropped is not kept.
                let today = day_of(at);
                let day = day.map_or(today, |d| d.min(today));
                let oldest_kept = today.saturating_sub(retain_days.saturating_sub(1));
                if day < oldest_kept {
                    return Applied::Unchanged;
                }
                let key = UsageKey {
                    model: model.clone(),
                    provider: provider.clone(),
                    feature: feature.clone(),
                    user: user.clone(),
                };
                self.usage
                    .entry(day)
                    .or_default()
                    .entry(tenant.clone())
                    .or_default()
                    .add(key, totals, *max_users);
                while let Some(&(old, _)) = self.usage.get_min()
                    && old < oldest_kept
                {
                    self.usage.remove(&old);
                }
                Applied::Changed
            }
            Command::FireAlert(alert) => {
                if self.alerts.contains_key(&alert.id) {
                    return Applied::Unchanged;
                }
                let mut alert = alert.clone();
                alert.fired_at_unix_ms = at;
                alert.fired_by = proposer;
                alert.delivered_at_unix_ms = None;
                let oldest_kept = alert.day.saturating_sub(1);
                // Alerts are a few a day: a scan is fine.
                let old: Vec<String> = (self.alerts.iter())
                    .filter(|(_, a)| a.day < oldest_kept)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in old {
                    self.alerts.remove(&id);
                }
                self.alerts.insert(alert.id.clone(), alert);
                Applied::Changed
            }
            Command::AlertDelivered { id } => stamp_once(
                self.alerts.get_mut(id).map(|a| &mut a.delivered_at_unix_ms),
                at,
            ),
            Command::Once { node, seq, command } => {
                if self.applied_seq.get(node).is_some_and(|last| seq <= last) {
                    return Applied::Unchanged;
                }
                self.applied_seq.insert(*node, *seq);
                self.apply_command(at, proposer, command)
            }
            Command::Batch { commands } => {
                let mut changed = false;
                for c in commands {
                    changed |= matches!(
                        self.apply_command(at, proposer, c),
                        Applied::Changed | Applied::Granted { .. }
                    );
                }
                if changed {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                }
            }
        }
    }
}

/// A record's one-time mark (revoked, delivered) set to `at`: the first mark stands, and a
/// record that is not there is not found.
fn stamp_once(mark: Option<&mut Option<u64>>, at: u64) -> Applied {
    match mark {
        None => Applied::NotFound,
        Some(Some(_)) => Applied::Unchanged,
        Some(mark) => {
            *mark = Some(at);
            Applied::Changed
        }
    }
}
