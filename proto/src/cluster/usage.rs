//! Daily usage roll-ups: what each tenant used in a day, by model, provider, feature and end
//! user, and the reports made from them.
//!
//! End users are kept by name up to a cap per tenant and day (the proposer's `max_users`); the
//! rest of a day's users are counted together under [`OTHER_USERS`], so that a tenant with a
//! million end users does not put a million rows a day into the replicated state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::UsageTotals;

/// End users kept by name per tenant and day unless configured otherwise.
pub const DEFAULT_MAX_USERS: u64 = 1_000;

/// The name the users beyond a day's cap are counted under.
pub const OTHER_USERS: &str = "(other users)";

pub(super) fn default_max_users() -> u64 {
    DEFAULT_MAX_USERS
}

/// What a roll-up row is kept by within a tenant's day (empty: not given).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct UsageKey {
    pub model: String,
    #[serde(default)]
    pub provider: String,
    #[serde(default)]
    pub feature: String,
    #[serde(default)]
    pub user: String,
}

/// A dimension a usage report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageDimension {
    Tenant,
    Model,
    Provider,
    Feature,
    User,
}

impl UsageDimension {
    pub const ALL: [UsageDimension; 5] = [
        UsageDimension::Tenant,
        UsageDimension::Model,
        UsageDimension::Provider,
        UsageDimension::Feature,
        UsageDimension::User,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UsageDimension::Tenant => "tenant",
            UsageDimension::Model => "model",
            UsageDimension::Provider => "provider",
            UsageDimension::Feature => "feature",
            UsageDimension::User => "user",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// One tenant's usage in one day.
///
/// Encoded as a list of `(key, totals)` rows; a map of model → totals (how roll-ups were kept
/// before they had providers, features and users) is read as rows of those models.
///
/// The rows are a vector sorted by key: most days of most tenants hold one row or a few, and
/// a `BTreeMap`'s first node has room for eleven (1.6 KB here): with 90 days of 10,000
/// tenants, a node on them held about 1 GB more and took twice as long to start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantDay {
    rows: Vec<(UsageKey, UsageTotals)>,
    /// The users kept by name (rebuilt from the rows when read).
    users: BTreeSet<String>,
}

impl TenantDay {
    /// Adds `totals` to the row of `key`; a user beyond the first `max_users` of the day is
    /// counted under [`OTHER_USERS`].
    pub fn add(&mut self, mut key: UsageKey, totals: &UsageTotals, max_users: u64) {
        if !key.user.is_empty() && !self.users.contains(&key.user) {
            if (self.users.len() as u64) < max_users {
                self.users.insert(key.user.clone());
            } else {
                key.user = OTHER_USERS.to_owned();
            }
        }
        self.row(key).add(totals);
    }

    /// The totals of `key`'s row, made (in its place) if it has none.
    fn row(&mut self, key: UsageKey) -> &mut UsageTotals {
        let at = match self.rows.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(at) => at,
            Err(at) => {
                self.rows.insert(at, (key, UsageTotals::default()));
                at
            }
        };
        &mut self.rows[at].1
    }

    pub fn rows(&self) -> impl Iterator<Item = (&UsageKey, &UsageTotals)> {
        self.rows.iter().map(|(k, t)| (k, t))
    }

    /// The day's totals of `model`, over every provider, feature and user.
    pub fn model(&self, model: &str) -> UsageTotals {
        let mut sum = UsageTotals::default();
        for (_, t) in self.rows.iter().filter(|(k, _)| k.model == model) {
            sum.add(t);
        }
        sum
    }
}

impl Serialize for TenantDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.rows.iter())
    }
}

impl<'de> Deserialize<'de> for TenantDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Rows;
        impl<'de> Visitor<'de> for Rows {
            type Value = TenantDay;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of usage rows, or a map of model to totals")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TenantDay, A::Error> {
                let mut day = TenantDay::default();
                while let Some((key, totals)) = seq.next_element::<(UsageKey, UsageTotals)>()? {
                    if !key.user.is_empty() && key.user != OTHER_USERS {
                        day.users.insert(key.user.clone());
                    }
                    day.row(key).add(&totals);
                }
                Ok(day)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TenantDay, A::Error> {
                let mut day = TenantDay::default();
                while let Some((model, totals)) = map.next_entry::<String, UsageTotals>()? {
                    let key = UsageKey {
                        model,
                        ..UsageKey::default()
                    };
                    day.row(key).add(&totals);
                }
                Ok(day)
            }
        }
        d.deserialize_any(Rows)
    }
}

/// The day (since the Unix epoch, UTC) of `unix_ms`: what roll-ups and alerts are kept by.
pub fn day_of(unix_ms: u64) -> u64 {
    unix_ms / super::DAY_MS
}

/// Day `day` since the Unix epoch (UTC) as YYYY-MM-DD.
pub fn utc_date(day: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(
        day.min(i64::MAX as u64 / 86_400) as i64 * 86_400,
    )
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}",
        at.year(),
        u8::from(at.month()),
        at.day()
    )
}

/// One line of a usage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    /// The value of the dimension grouped by (empty: not given, e.g. calls with no feature).
    pub key: String,
    pub totals: UsageTotals,
}

/// Sums `days` (day number → tenant → day) from `first` to `last` (inclusive) by `by`, over
/// every tenant or only `tenant`; the costliest first, then by key.
pub fn report<'a>(
    days: impl IntoIterator<Item = (u64, &'a super::Table<String, TenantDay>)>,
    first: u64,
    last: u64,
    tenant: Option<&str>,
    by: UsageDimension,
) -> Vec<ReportRow> {
    let mut sums: BTreeMap<&str, UsageTotals> = BTreeMap::new();
    for (day, tenants) in days {
        if day < first || day > last {
            continue;
        }
        for (name, usage) in tenants.iter() {
            if tenant.is_some_and(|t| t != name) {
                continue;
            }
            for (key, totals) in usage.rows() {
                let group = match by {
                    UsageDimension::Tenant => name.as_str(),
                    UsageDimension::Model => &key.model,
                    UsageDimension::Provider => &key.provider,
                    UsageDimension::Feature => &key.feature,
                    UsageDimension::User => &key.user,
                };
                sums.entry(group).or_default().add(totals);
            }
        }
    }
    let mut rows: Vec<ReportRow> = sums
        .into_iter()
        .map(|(key, totals)| ReportRow {
            key: key.to_owned(),
            totals,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.totals
            .cost_micro_usd
            .cmp(&a.totals.cost_micro_usd)
            .then_with(|| a.key.cmp(&b.key))
    });
    rows
}
