//! Spend alerts: when a tenant's (or one of its features') spend today crosses a fraction of its
//! daily cost cap, or an absolute amount, a webhook hears of it once for the whole cluster.
//!
//! The Raft leader looks every `check_every` at the tenants whose daily roll-up changed since it
//! last looked (every node's usage reaches the roll-ups within a flush). A threshold crossed
//! that the replicated state has no alert for is proposed as [`Command::FireAlert`]: the first
//! such entry in the log records the alert, any repeat (a new leader finding it again) changes
//! nothing, so each alert fires once per day for the cluster. The leader then POSTs every
//! alert not yet delivered to the webhook (JSON with a Slack-compatible `text`), retrying with
//! backoff, and records the delivery through the log; a leader that dies before recording it
//! leaves it to the next one (delivery is at least once). None of this is on a request's path.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meridian_cluster::raft::ClusterNode;
use meridian_proto::cluster::{
    Applied, ClusterState, Command, NodeId, SpendAlert, TenantDay, day_of,
};
use tokio::sync::mpsc;

/// Tries per delivery, and the first wait between them (doubled each time).
const TRIES: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// `[alerts]`, validated.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// Where alerts are POSTed (`None`: logged and counted only).
    pub webhook: Option<reqwest::Url>,
    /// Fractions of a daily cost cap (`cost_per_day` of the tenant, or of a feature) that alert.
    pub cap_fractions: Vec<f64>,
    /// Daily spend of a tenant, in µ$, that alerts whatever its cap.
    pub daily_micro_usd: Vec<u64>,
    pub check_every: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhook: None,
            cap_fractions: vec![0.5, 0.8, 1.0],
            daily_micro_usd: Vec::new(),
            check_every: Duration::from_secs(1),
        }
    }
}

/// What this node did with alerts (for `/metrics`).
#[derive(Debug, Default)]
pub struct AlertCounts {
    pub fired: AtomicU64,
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

/// The alerts `tenant`'s day `usage` calls for: its spend (and each feature's) against the
/// fractions of the daily cost caps, and the tenant's against the absolute amounts.
pub fn crossed(
    state: &ClusterState,
    config: &AlertsConfig,
    day: u64,
    tenant: &str,
    usage: &TenantDay,
) -> Vec<SpendAlert> {
    let mut total = 0u64;
    let mut by_feature = std::collections::BTreeMap::<&str, u64>::new();
    for (key, t) in usage.rows() {
        total = total.saturating_add(t.cost_micro_usd);
        if !key.feature.is_empty() {
            let f = by_feature.entry(&key.feature).or_default();
            *f = f.saturating_add(t.cost_micro_usd);
        }
    }
    let mut alerts = Vec::new();
    let mut alert = |feature: &str, threshold: String, at: u64, cap: u64, spent: u64| {
        alerts.push(SpendAlert {
            id: SpendAlert::id_of(day, tenant, feature, &threshold),
            day,
            tenant: tenant.to_owned(),
            feature: feature.to_owned(),
            threshold,
            threshold_micro_usd: at,
            cap_micro_usd: cap,
            spent_micro_usd: spent,
            ..SpendAlert::default()
        });
    };
    let mut against_cap = |feature: &str, cap: Option<u64>, spent: u64| {
        let Some(cap) = cap.filter(|c| *c > 0) else {
            return;
        };
        for f in &config.cap_fractions {
            let at = (cap as f64 * f).ceil() as u64;
            if spent >= at {
                alert(feature, format!("{}%", (f * 100.0).round()), at, cap, spent);
            }
        }
    };
    let cap = |limits: Option<meridian_proto::cluster::Limits>| {
        limits.and_then(|l| l.cost_per_day_micro_usd)
    };
    against_cap("", cap(state.limits_of(tenant)), total);
    for (feature, spent) in &by_feature {
        against_cap(
            feature,
            cap(state.feature_limits_of(tenant, feature)),
            *spent,
        );
    }
    for at in &config.daily_micro_usd {
        if total >= *at {
            let shown = format!("${:.2}", *at as f64 / 1e6);
            alert("", shown, *at, 0, total);
        }
    }
    alerts
}

/// Starts the alert task (every node runs it; only the leader acts).
pub fn start(
    cluster: ClusterNode,
    node_id: NodeId,
    config: AlertsConfig,
    counts: Arc<AlertCounts>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(cluster, node_id, config, counts))
}

async fn run(
    cluster: ClusterNode,
    node_id: NodeId,
    config: AlertsConfig,
    counts: Arc<AlertCounts>,
) {
    let client = match reqwest::Client::builder().timeout(DELIVERY_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "spend alerts: no webhook client with a timeout; using one without");
            reqwest::Client::new()
        }
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    // Alerts being delivered by this node (so that each is posted by one task at a time).
    let mut in_flight: HashSet<String> = HashSet::new();
    // Each tenant's cost in the day as last looked at, while this node leads. Not the day's
    // roll-ups themselves: holding a version's table would make the state machine copy it
    // (see `meridian_cluster::state_machine`), and comparing two versions' tables finds what
    // changed quickly only where they share nodes, which its two copies mostly do not.
    let mut seen: Option<(u64, HashMap<String, u64>)> = None;
    let mut tick = tokio::time::interval(config.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(id) = done_rx.recv() => {
                in_flight.remove(&id);
                continue;
            }
        }
        if cluster.status().leader != Some(node_id) {
            seen = None;
            continue;
        }
        let state = cluster.state().borrow().clone();
        let today = day_of(cluster.now_ms());
        let tenants = state.usage.get(&today).cloned().unwrap_or_default();
        // Only the tenants whose cost in the day changed (all of them on becoming leader, or on
        // a new day): every alert is about cost, which only grows.
        let costs: HashMap<String, u64> = (tenants.iter())
            .map(|(tenant, day)| {
                let cost = day.rows().map(|(_, t)| t.cost_micro_usd);
                (tenant.clone(), cost.fold(0u64, u64::saturating_add))
            })
            .collect();
        let changed: Vec<String> = match &seen {
            Some((day, before)) if *day == today => (costs.iter())
                .filter(|(tenant, cost)| before.get(*tenant) != Some(cost))
                .map(|(tenant, _)| tenant.clone())
                .collect(),
            _ => costs.keys().cloned().collect(),
        };
        let mut unrecorded = false;
        for tenant in &changed {
            let Some(usage) = tenants.get(tenant) else {
                continue;
            };
            for alert in crossed(&state, &config, today, tenant, usage) {
                if state.alerts.contains_key(&alert.id) {
                    continue;
                }
                match cluster.propose(Command::FireAlert(alert.clone())).await {
                    Ok(Applied::Changed) => {
                        counts.fired.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(alert = %alert.id, spent_micro_usd = alert.spent_micro_usd, "{}", alert.text());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        unrecorded = true;
                        tracing::warn!(alert = %alert.id, error = %e, "spend alert not recorded; tried again next look");
                    }
                }
            }
        }
        // After a failed proposal every tenant is looked at again next time (its day may not
        // change again), so that the alert is tried again as the log line says.
        seen = (!unrecorded).then_some((today, costs));
        let Some(webhook) = &config.webhook else {
            continue;
        };
        // Deliver what is recorded and not yet delivered (a former leader's included).
        let state = cluster.state().borrow().clone();
        for alert in state.alerts.values() {
            if alert.delivered_at_unix_ms.is_some() || in_flight.contains(&alert.id) {
                continue;
            }
            in_flight.insert(alert.id.clone());
            tokio::spawn(deliver(
                client.clone(),
                webhook.clone(),
                alert.clone(),
                cluster.clone(),
                Arc::clone(&counts),
                done_tx.clone(),
            ));
        }
    }
}

/// Posts `alert` to `webhook`, retrying with backoff, and records the delivery.
async fn deliver(
    client: reqwest::Client,
    webhook: reqwest::Url,
    alert: SpendAlert,
    cluster: ClusterNode,
    counts: Arc<AlertCounts>,
    done: mpsc::UnboundedSender<String>,
) {
    let body = serde_json::json!({
        "text": alert.text(),
        "alert": {
            "id": alert.id,
            "date": meridian_proto::cluster::utc_date(alert.day),
            "tenant": alert.tenant,
            "feature": alert.feature,
            "threshold": alert.threshold,
            "threshold_usd": alert.threshold_micro_usd as f64 / 1e6,
            "cap_usd": alert.cap_micro_usd as f64 / 1e6,
            "spent_usd": alert.spent_micro_usd as f64 / 1e6,
            "fired_at_unix_ms": alert.fired_at_unix_ms,
        },
    });
    let mut wait = FIRST_BACKOFF;
    for attempt in 1..=TRIES {
        let sent = client.post(webhook.clone()).json(&body).send().await;
        match sent {
            Ok(r) if r.status().is_success() => {
                counts.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(alert = %alert.id, attempt, "spend alert delivered");
                if let Err(e) = cluster
                    .propose(Command::AlertDelivered {
                        id: alert.id.clone(),
                    })
                    .await
                {
                    tracing::warn!(alert = %alert.id, error = %e, "spend alert delivered but not recorded as such: it may be sent again");
                }
                let _ = done.send(alert.id);
                return;
            }
            Ok(r) => {
                tracing::warn!(alert = %alert.id, attempt, status = %r.status(), "the webhook refused a spend alert")
            }
            Err(e) => {
                tracing::warn!(alert = %alert.id, attempt, error = %e, "the webhook did not take a spend alert")
            }
        }
        if attempt < TRIES {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    counts.failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(alert = %alert.id, tries = TRIES, "spend alert not delivered; the next leader tries again");
    // Not sent back as done: this node does not try again while it leads.
}

#[cfg(test)]
mod tests {
    use meridian_proto::cluster::{Limits, Tenant, Tier, UsageKey, UsageTotals};

    use super::*;

    fn spend(day: &mut TenantDay, feature: &str, micro_usd: u64) {
        let key = UsageKey {
            model: "m".into(),
            feature: feature.into(),
            ..UsageKey::default()
        };
        let totals = UsageTotals {
            requests: 1,
            cost_micro_usd: micro_usd,
            ..UsageTotals::default()
        };
        day.add(key, &totals, 1_000);
    }

    #[test]
    fn thresholds_are_crossed_by_the_days_spend_against_caps_and_amounts() {
        let mut state = ClusterState::default();
        state.tiers.insert(
            "paid".into(),
            Tier {
                name: "paid".into(),
                limits: Limits {
                    cost_per_day_micro_usd: Some(10_000_000), // $10
                    ..Limits::default()
                },
                ..Tier::default()
            },
        );
        let mut tenant = Tenant {
            id: "acme".into(),
            tier: "paid".into(),
            ..Tenant::default()
        };
        tenant.features.insert(
            "search".into(),
            Limits {
                cost_per_day_micro_usd: Some(2_000_000), // $2
                ..Limits::default()
            },
        );
        state.tenants.insert("acme".into(), tenant);
        let config = AlertsConfig {
            daily_micro_usd: vec![5_000_000, 50_000_000],
            ..AlertsConfig::default()
        };
        let mut day = TenantDay::default();
        spend(&mut day, "search", 1_700_000);
        spend(&mut day, "chat", 4_000_000);
        let ids: Vec<String> = crossed(&state, &config, 20_000, "acme", &day)
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(
            ids,
            [
                // $5.70 of $10: 50 %; and the $5 amount.
                "20000/tenant/acme/50%",
                // $1.70 of the feature's $2: 50 % and 80 %.
                "20000/tenant/acme/feature/search/50%",
                "20000/tenant/acme/feature/search/80%",
                "20000/tenant/acme/$5.00",
            ]
        );
        let a = crossed(&state, &config, 20_000, "acme", &day).remove(2);
        assert_eq!(
            a.text(),
            "Meridian spend alert: Feature search of tenant acme has spent $1.70 today (UTC day 2024-10-04), past 80% of its daily cap of $2.00."
        );
        // A tenant with no cap and no amount reached: nothing.
        assert!(crossed(&state, &AlertsConfig::default(), 20_000, "beta", &day).is_empty());
    }
}
