//! Paging through the replicated state's tables for the admin API: pages by key, bounded in
//! records and bytes, each saying where the next starts.

use meridian_proto::cluster::{LedgerTable, Table};
use tonic::Status;

use super::field;

/// A page's records by key, and where the next page starts.
pub(super) type Page = (serde_json::Map<String, serde_json::Value>, String);

/// A page's size: `requested` (0: 1,000), at most 10,000.
pub(super) fn page_limit(requested: u32) -> usize {
    match requested {
        0 => 1_000,
        n => n.min(10_000) as usize,
    }
}

/// A page stops growing past this many bytes of JSON, well inside the 4 MiB gRPC message.
const PAGE_BYTES: usize = 3 * 1024 * 1024;

/// A key of a state table, as a page's `after` names it.
pub(super) trait PageKey: Ord + Clone + std::fmt::Display {
    fn parse_key(s: &str) -> Option<Self>;
}

impl PageKey for String {
    fn parse_key(s: &str) -> Option<Self> {
        Some(s.to_owned())
    }
}

impl PageKey for u64 {
    fn parse_key(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

/// The records of `table` after key `after`, in key order.
pub(super) fn after_key<'a, K, V>(
    table: &'a Table<K, V>,
    after: &str,
) -> Box<dyn Iterator<Item = (&'a K, &'a V)> + 'a>
where
    K: PageKey,
    V: Clone,
{
    match K::parse_key(after) {
        Some(key) if !after.is_empty() => {
            Box::new(table.range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded)))
        }
        _ => Box::new(table.iter()),
    }
}

/// Keeps the first `limit` of `items` (fetched as `limit + 1`) and says where the next page
/// starts: after the last one kept, if there were more.
pub(super) fn next_page<T>(items: &mut Vec<T>, limit: usize, key: impl Fn(&T) -> String) -> String {
    if items.len() <= limit {
        return String::new();
    }
    items.truncate(limit);
    items.last().map(key).unwrap_or_default()
}

/// Up to `limit` records of `table` whose key starts with `prefix`, after `after`, as JSON by
/// key; stops early at [`PAGE_BYTES`].
pub(super) fn page_of<K, V>(
    table: &Table<K, V>,
    prefix: &str,
    after: &str,
    limit: usize,
) -> Result<Page, Status>
where
    K: PageKey,
    V: Clone + serde::Serialize,
{
    if !after.is_empty() && K::parse_key(after).is_none() {
        return Err(field(
            "after",
            &format!("{after:?} is not a key of this section"),
        ));
    }
    page_from(after_key(table, after), prefix, limit)
}

/// A page of the quota ledger, in the ledger's own order (by a hash of the key: see
/// [`LedgerTable`]), after key `after`.
pub(super) fn ledger_page(
    table: &LedgerTable,
    prefix: &str,
    after: &str,
    limit: usize,
) -> Result<Page, Status> {
    page_from(table.after(after).map(|l| (l.key(), &**l)), prefix, limit)
}

/// The first `limit` of `items` (at most [`PAGE_BYTES`] of them) whose key starts with
/// `prefix`, and the key the next page starts after.
fn page_from<'a, K, V>(
    items: impl Iterator<Item = (&'a K, &'a V)>,
    prefix: &str,
    limit: usize,
) -> Result<Page, Status>
where
    K: std::fmt::Display + 'a,
    V: serde::Serialize + 'a,
{
    let mut records = serde_json::Map::new();
    let mut bytes = 0;
    let mut last = String::new();
    for (k, v) in items.filter(|(k, _)| k.to_string().starts_with(prefix)) {
        if records.len() == limit || bytes > PAGE_BYTES {
            return Ok((records, last));
        }
        let value = serde_json::to_value(v).map_err(|e| Status::internal(e.to_string()))?;
        last = k.to_string();
        bytes += last.len() + value.to_string().len();
        records.insert(last.clone(), value);
    }
    Ok((records, String::new()))
}
