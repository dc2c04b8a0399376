//! Spend alerts, each decided once for the whole cluster: the first proposal of an alert's id
//! records it, a repeat (another node, or a new leader, finding the same threshold crossed)
//! changes nothing.

use serde::{Deserialize, Serialize};

use super::{NodeId, utc_date};

/// A tenant's (or one of its features') spend in a UTC day crossed a threshold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpendAlert {
    /// `<day>/<scope>/<threshold>` (see [`SpendAlert::id_of`]): what makes it one of a kind.
    pub id: String,
    /// Days since the Unix epoch (UTC).
    pub day: u64,
    pub tenant: String,
    /// Empty for the tenant as a whole.
    #[serde(default)]
    pub feature: String,
    /// What was crossed, as shown: `80%` (of the daily cost cap) or `$100`.
    pub threshold: String,
    pub threshold_micro_usd: u64,
    /// The daily cost cap the threshold is a fraction of (0: an absolute amount).
    #[serde(default)]
    pub cap_micro_usd: u64,
    /// The spend when it was found crossed.
    pub spent_micro_usd: u64,
    /// Set by apply: when, and by whose proposal.
    #[serde(default)]
    pub fired_at_unix_ms: u64,
    #[serde(default)]
    pub fired_by: NodeId,
    /// When a webhook took it (`None`: not yet, or no webhook is configured).
    #[serde(default)]
    pub delivered_at_unix_ms: Option<u64>,
}

impl SpendAlert {
    pub fn id_of(day: u64, tenant: &str, feature: &str, threshold: &str) -> String {
        if feature.is_empty() {
            format!("{day}/tenant/{tenant}/{threshold}")
        } else {
            format!("{day}/tenant/{tenant}/feature/{feature}/{threshold}")
        }
    }

    /// One line for a person (a chat message).
    pub fn text(&self) -> String {
        let dollars = |micro: u64| {
            if micro >= 1_000_000 {
                format!("${:.2}", micro as f64 / 1e6)
            } else {
                // Below a dollar, to the millionth (trailing zeros dropped).
                let s = format!("{:.6}", micro as f64 / 1e6);
                format!("${}", s.trim_end_matches('0').trim_end_matches('.'))
            }
        };
        let whom = if self.feature.is_empty() {
            format!("Tenant {}", self.tenant)
        } else {
            format!("Feature {} of tenant {}", self.feature, self.tenant)
        };
        let against = if self.cap_micro_usd > 0 {
            format!(
                "{} of its daily cap of {}",
                self.threshold,
                dollars(self.cap_micro_usd)
            )
        } else {
            format!("the alert amount of {}", self.threshold)
        };
        format!(
            "Meridian spend alert: {whom} has spent {} today (UTC day {}), past {against}.",
            dollars(self.spent_micro_usd),
            utc_date(self.day),
        )
    }
}
