//! [`LedgerTable`]: the quota ledger's entries, keyed by a 64-bit hash of their limit key.
//!
//! A usage flush changes a hundred entries in one apply, and each change copies the B-tree
//! nodes on its path (the published state still holds the old ones). Copying a node clones
//! every key and value in it. With the keys as shared strings, each key cloned was a
//! reference-count increment, and another decrement when the replaced state was dropped. Keyed
//! by a `u64`, a node's copy counts only its values' references, and a lookup compares
//! integers. The state bench's flush of 100 reports measured the difference
//! (`cluster/benches/state.rs`, the README).
//!
//! The hash (XXH3-64, a published algorithm, so every node and version computes the same) is
//! no secret: keys can collide, and a tenant can make its own users' keys collide on purpose.
//! Each hash has one slot, held by the smallest of its keys; the others are kept in `spill`
//! by (hash, key). So the layout depends only on which keys there are, not on the order they
//! came in (by log or by snapshot), as the state machine's determinism requires, and every key
//! is found: a lookup checks the key of its hash's holder, then `spill`. The table is walked
//! (swept, paged, serialized) in one order, by (hash, key).
//!
//! Serialized as a map from key to entry, as the string-keyed table before it was: the ledger
//! reads the same from a snapshot of either.

use std::sync::Arc;

use imbl::OrdMap;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Ledger;

/// The ledger's entries by limit key. Cloning it is O(1), like the state's other tables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerTable {
    /// Each hash's smallest key.
    by_hash: OrdMap<u64, Arc<Ledger>>,
    /// Keys whose hash a smaller key holds, by hash and key (none but for collisions).
    spill: OrdMap<(u64, Arc<str>), Arc<Ledger>>,
    wants: Wants,
}

/// How often an entry was marked [`Ledger::wanted`], and which entries were marked last, for a
/// node to find the shares it should give up without comparing versions of the state (see
/// [`LedgerTable::wanted_since`]). Not part of the replicated state: two tables are equal
/// whatever their marks, and a table read from a snapshot starts a new `epoch` (unique in the
/// process), so that it reads as changed to whoever saw another. Deterministic otherwise: every
/// copy that applies the same entries marks the same.
#[derive(Debug, Clone, Default)]
pub struct Wants {
    epoch: u64,
    marks: u64,
    /// The keys of the last [`RECENT_WANTS`] marks, oldest first.
    recent: imbl::Vector<LedgerKey>,
}

/// How many of the last marks [`Wants`] keeps the keys of.
const RECENT_WANTS: usize = 256;

impl PartialEq for Wants {
    fn eq(&self, _: &Wants) -> bool {
        true
    }
}

impl Eq for Wants {}

/// The next epoch of a table read from a snapshot.
static EPOCHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn hash(key: &str) -> u64 {
    // The tests' keys under `collide/` share a hash: XXH3 collisions take longer to find than a
    // test runs.
    #[cfg(test)]
    if key.starts_with("collide/") {
        return 42;
    }
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// `make`'s entry, named `key`.
fn named(key: &str, make: impl FnOnce() -> Ledger) -> Arc<Ledger> {
    let mut ledger = make();
    ledger.key = LedgerKey::new(key);
    Arc::new(ledger)
}

/// Keys up to this many bytes are kept inside their entry.
const INLINE_KEY: usize = 62;

/// A ledger entry's limit key, kept in the entry itself: a lookup that checks it reads memory
/// it is about to change anyway, and copying the entry copies the key with it (no allocation,
/// no reference count). Keys longer than [`INLINE_KEY`] bytes are shared strings.
#[derive(Clone, PartialEq, Eq)]
pub struct LedgerKey(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Shared(Arc<str>),
}

impl LedgerKey {
    pub fn new(key: &str) -> Self {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key.as_bytes());
                LedgerKey(Repr::Inline { len, bytes })
            }
            _ => LedgerKey(Repr::Shared(key.into())),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(s) => s.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Made from a whole `str` and never changed, so always valid.
            Repr::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Repr::Shared(s) => s,
        }
    }

    /// Whether this is `key` (compared as bytes, with no UTF-8 check on the way).
    fn is(&self, key: &str) -> bool {
        self.as_bytes() == key.as_bytes()
    }
}

impl Default for LedgerKey {
    fn default() -> Self {
        LedgerKey::new("")
    }
}

impl std::ops::Deref for LedgerKey {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Written as the string it is (the sweep's cursor in the state was one).
impl Serialize for LedgerKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LedgerKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let key = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(LedgerKey::new(&key))
    }
}

impl std::fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Where a key goes in the table.
enum Slot {
    /// Its hash's slot is free, or holds this key.
    Own,
    /// Its hash's slot holds a larger key, which gives the slot up to it.
    Take,
    /// Its hash's slot holds a smaller key.
    Spill,
}

impl LedgerTable {
    /// Says that `key`'s entry was marked [`Ledger::wanted`] (again).
    pub fn mark_wanted(&mut self, key: &str) {
        let wants = &mut self.wants;
        wants.marks += 1;
        wants.recent.push_back(LedgerKey::new(key));
        if wants.recent.len() > RECENT_WANTS {
            wants.recent.pop_front();
        }
    }

    /// Changes whenever an entry is marked [`Ledger::wanted`], and when the table is read from
    /// a snapshot. The same in every copy made by applying the same entries to one table.
    pub fn wants(&self) -> (u64, u64) {
        (self.wants.epoch, self.wants.marks)
    }

    /// The keys marked wanted since `seen` (an earlier [`LedgerTable::wants`]), a key once for
    /// each mark; `None` when they are not all known (too many marks since, or a table read
    /// from a snapshot since): then every entry must be looked at.
    pub fn wanted_since(&self, seen: (u64, u64)) -> Option<impl Iterator<Item = &LedgerKey>> {
        let (epoch, marks) = seen;
        let new = self.wants.marks.checked_sub(marks)?;
        let new = usize::try_from(new).ok()?;
        (epoch == self.wants.epoch && new <= self.wants.recent.len())
            .then(|| self.wants.recent.iter().skip(self.wants.recent.len() - new))
    }

    pub fn len(&self) -> usize {
        self.by_hash.len() + self.spill.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty() && self.spill.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Ledger>> {
        let h = hash(key);
        match self.by_hash.get(&h) {
            Some(l) if l.key.is(key) => Some(l),
            Some(_) => self.spill.get(&spilled(h, key)),
            // A key is spilled only while its hash's slot is held.
            None => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Arc<Ledger>> {
        let h = hash(key);
        if self.spill.is_empty() {
            // No key is spilled: a key's entry, if any, holds its hash's slot. One walk down
            // the tree, where checking the holder first would take two.
            return self.by_hash.get_mut(&h).filter(|l| l.key.is(key));
        }
        match self.by_hash.get(&h) {
            Some(l) if l.key.is(key) => self.by_hash.get_mut(&h),
            Some(_) => self.spill.get_mut(&spilled(h, key)),
            None => None,
        }
    }

    /// The entry of `key`, made by `make` if there is none.
    pub fn get_or_insert_with(
        &mut self,
        key: &str,
        make: impl FnOnce() -> Ledger,
    ) -> &mut Arc<Ledger> {
        let h = hash(key);
        let slot = match self.by_hash.get(&h) {
            Some(l) if key.as_bytes() < l.key.as_bytes() => Slot::Take,
            Some(l) if key.as_bytes() > l.key.as_bytes() => Slot::Spill,
            _ => Slot::Own,
        };
        match slot {
            Slot::Spill => {
                return self
                    .spill
                    .entry(spilled(h, key))
                    .or_insert_with(|| named(key, make));
            }
            Slot::Take => {
                if let Some(holder) = self.by_hash.remove(&h) {
                    self.spill.insert(spilled(h, holder.key.as_str()), holder);
                }
            }
            Slot::Own => {}
        }
        self.by_hash.entry(h).or_insert_with(|| named(key, make))
    }

    pub fn remove(&mut self, key: &str) -> Option<Arc<Ledger>> {
        let h = hash(key);
        match self.by_hash.get(&h) {
            Some(l) if l.key.is(key) => {
                let removed = self.by_hash.remove(&h);
                // The smallest spilled key of this hash, if any, takes the slot.
                let next = (self.spill.range(spilled(h, "")..).next())
                    .filter(|((next, _), _)| *next == h)
                    .map(|(k, _)| k.clone());
                if let Some(next) = next
                    && let Some(l) = self.spill.remove(&next)
                {
                    self.by_hash.insert(h, l);
                }
                removed
            }
            Some(_) => self.spill.remove(&spilled(h, key)),
            None => None,
        }
    }

    /// Every entry, in the table's order: by hash, and by key among keys of one hash.
    pub fn values(&self) -> impl Iterator<Item = &Arc<Ledger>> {
        merge(
            self.by_hash.iter().map(|(h, l)| (*h, l)),
            self.spill.iter().map(|((h, _), l)| (*h, l)),
        )
    }

    pub fn keys(&self) -> impl Iterator<Item = &LedgerKey> {
        self.values().map(|l| &l.key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&LedgerKey, &Arc<Ledger>)> {
        self.values().map(|l| (&l.key, l))
    }

    /// The entries after `key` in the table's order (all of them after `""`, as no key is
    /// empty), for a sweep or a page that goes on where the last one stopped. `key` need not be
    /// in the table any more: the order is by (hash, key), whatever the table holds.
    pub fn after<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Arc<Ledger>> + 'a {
        let (h, all) = (hash(key), key.is_empty());
        let beyond = move |hh: u64, l: &Ledger| all || (hh, l.key.as_bytes()) > (h, key.as_bytes());
        let start = if all { 0 } else { h };
        let held = (self.by_hash.range(start..)).map(|(hh, l)| (*hh, l));
        let spilled = (!self.spill.is_empty())
            .then(|| self.spill.range((start, Arc::<str>::from(""))..))
            .into_iter()
            .flatten()
            .map(|((hh, _), l)| (*hh, l));
        merge(
            held.filter(move |(hh, l)| beyond(*hh, l)),
            spilled.filter(move |(hh, l)| beyond(*hh, l)),
        )
    }

    /// Whether the two share all their nodes (one is a clone of the other, unchanged).
    pub fn ptr_eq(&self, other: &LedgerTable) -> bool {
        self.by_hash.ptr_eq(&other.by_hash) && self.spill.ptr_eq(&other.spill)
    }
}

/// `key`'s place in `spill`. (An allocation: made only where a hash's slot holds another key,
/// which takes a collision.)
fn spilled(h: u64, key: &str) -> (u64, Arc<str>) {
    (h, Arc::from(key))
}

/// Two runs of entries, each in (hash, key) order, as one run in that order.
fn merge<'a>(
    a: impl Iterator<Item = (u64, &'a Arc<Ledger>)>,
    b: impl Iterator<Item = (u64, &'a Arc<Ledger>)>,
) -> impl Iterator<Item = &'a Arc<Ledger>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || {
        let take_a = match (a.peek(), b.peek()) {
            (Some((ha, la)), Some((hb, lb))) => (ha, la.key.as_bytes()) <= (hb, lb.key.as_bytes()),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let next = if take_a { a.next() } else { b.next() };
        next.map(|(_, l)| l)
    })
}

impl std::ops::Index<&str> for LedgerTable {
    type Output = Arc<Ledger>;

    /// Panics if `key` has no entry, as a map's indexing does.
    fn index(&self, key: &str) -> &Arc<Ledger> {
        match self.get(key) {
            Some(l) => l,
            None => panic!("no ledger entry {key:?}"),
        }
    }
}

impl Serialize for LedgerTable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (key, ledger) in self.iter() {
            map.serialize_entry(key.as_str(), &**ledger)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for LedgerTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = LedgerTable;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of ledger entries by key")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LedgerTable, A::Error> {
                let mut table = LedgerTable::default();
                while let Some((key, ledger)) = map.next_entry::<String, Ledger>()? {
                    *table.get_or_insert_with(&key, Ledger::default) = named(&key, || ledger);
                }
                table.wants.epoch = EPOCHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(table)
            }
        }
        d.deserialize_map(Entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(used: u64) -> impl FnOnce() -> Ledger {
        move || Ledger {
            used,
            ..Ledger::default()
        }
    }

    #[test]
    fn entries_are_found_changed_and_removed_by_key() {
        let mut t = LedgerTable::default();
        for i in 0..1_000 {
            Arc::make_mut(
                t.get_or_insert_with(&format!("tenant/t{i}/tokens_per_day"), entry(i)),
            )
            .used += 1;
        }
        assert_eq!(t.len(), 1_000);
        assert_eq!(t["tenant/t7/tokens_per_day"].used, 8);
        assert_eq!(
            &*t["tenant/t7/tokens_per_day"].key,
            "tenant/t7/tokens_per_day"
        );
        assert!(t.get("tenant/t1000/tokens_per_day").is_none());
        let before = t.clone();
        assert!(before.ptr_eq(&t));
        if let Some(l) = t.get_mut("tenant/t9/tokens_per_day") {
            Arc::make_mut(l).used = 99;
        }
        assert!(!before.ptr_eq(&t));
        assert_eq!(
            before["tenant/t9/tokens_per_day"].used, 10,
            "the clone is unchanged"
        );
        assert!(t.remove("tenant/t9/tokens_per_day").is_some());
        assert!(t.remove("tenant/t9/tokens_per_day").is_none());
        assert_eq!(t.len(), 999);
        // A sweep that resumes after a key, present or gone, and wraps around sees every entry
        // once.
        for from in ["tenant/t3/tokens_per_day", "tenant/t9/tokens_per_day", ""] {
            let seen: std::collections::BTreeSet<String> = (t.after(from).chain(t.values()))
                .take(t.len())
                .map(|l| l.key.to_string())
                .collect();
            assert_eq!(seen.len(), t.len(), "after {from:?}");
        }
        // A key too long to keep in place is found as well.
        let long = format!("tenant/t1/user/{}/tokens_per_day", "u".repeat(100));
        t.get_or_insert_with(&long, entry(5));
        assert_eq!(&*t[long.as_str()].key, long);
    }

    #[test]
    fn colliding_keys_are_each_found_and_the_layout_does_not_depend_on_their_order() {
        let keys = ["collide/x", "collide/b", "collide/m"];
        let mut tables = Vec::new();
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]] {
            let mut t = LedgerTable::default();
            t.get_or_insert_with("tenant/t/tokens_per_day", entry(7));
            for i in order {
                Arc::make_mut(t.get_or_insert_with(keys[i], entry(0))).used = i as u64;
            }
            for (i, key) in keys.iter().enumerate() {
                assert_eq!(&*t[key].key, *key);
                assert_eq!(t[key].used, i as u64);
            }
            assert!(t.get("collide/other").is_none());
            assert_eq!(t.len(), 4);
            tables.push(t);
        }
        assert!(
            tables.iter().all(|t| *t == tables[0]),
            "the same keys make the same table, whatever their order"
        );
        let mut t = tables.swap_remove(0);
        assert_eq!(
            t.spill.keys().map(|(_, k)| &**k).collect::<Vec<_>>(),
            ["collide/m", "collide/x"],
            "the smallest key holds the slot"
        );
        // Removing the holder hands its slot to the next smallest key; every key stays found.
        assert!(t.remove("collide/b").is_some());
        assert_eq!(
            t.spill.keys().map(|(_, k)| &**k).collect::<Vec<_>>(),
            ["collide/x"]
        );
        assert_eq!(t["collide/m"].used, 2);
        assert!(t.remove("collide/x").is_some(), "a spilled key is removed");
        assert!(t.get("collide/x").is_none());
        assert_eq!(t["collide/m"].used, 2);
        assert!(t.remove("collide/m").is_some());
        assert_eq!(t.len(), 1);
        // Resuming after a key goes on in (hash, key) order, whether the key is there or not:
        // here after the holder, gone and replaced by the next key of its hash.
        let mut t = tables.swap_remove(0);
        let after: Vec<_> = t.after("collide/m").map(|l| &*l.key).collect();
        assert_eq!(after, ["collide/x", "tenant/t/tokens_per_day"]);
        let lap = |t: &LedgerTable, from: &str| -> Vec<String> {
            (t.after(from).chain(t.values()))
                .take(t.len())
                .map(|l| l.key.to_string())
                .collect()
        };
        assert!(t.remove("collide/b").is_some());
        let seen = lap(&t, "collide/b");
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen.iter().collect::<std::collections::BTreeSet<_>>().len(),
            3,
            "each entry once: {seen:?}"
        );
        assert_eq!(
            &seen[..2],
            ["collide/m", "collide/x"],
            "the new holder comes next"
        );
        t.remove("collide/m");
        assert_eq!(t.len(), 2);
        assert_eq!(lap(&t, "collide/m")[0], "collide/x");
    }

    #[test]
    fn a_wanted_mark_changes_what_wants_says_and_not_what_the_table_equals() {
        let mut t = LedgerTable::default();
        t.get_or_insert_with("a", entry(1));
        let (before, copy) = (t.wants(), t.clone());
        t.mark_wanted("a");
        assert_ne!(t.wants(), before);
        assert_eq!(t, copy, "marks are not part of the replicated state");
        let since = |t: &LedgerTable, seen| {
            (t.wanted_since(seen)).map(|keys| keys.map(|k| k.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(since(&t, before), Some(vec!["a".to_owned()]));
        assert_eq!(since(&t, t.wants()), Some(vec![]));
        let marked = t.wants();
        for i in 0..RECENT_WANTS {
            t.mark_wanted(&format!("k{i}"));
        }
        assert_eq!(since(&t, marked).map(|k| k.len()), Some(RECENT_WANTS));
        assert_eq!(
            since(&t, before),
            None,
            "one mark too many to know them all"
        );
        let json = serde_json::to_value(&t).expect("serializes");
        let read: LedgerTable = serde_json::from_value(json.clone()).expect("reads back");
        let again: LedgerTable = serde_json::from_value(json).expect("reads back");
        assert_eq!(read, t);
        assert_ne!(read.wants(), t.wants());
        assert!(
            read.wanted_since(t.wants()).is_none(),
            "a snapshot read: walk it all"
        );
        let (epoch, _) = t.wants();
        assert!(
            read.wanted_since((epoch, 0)).is_none(),
            "as many marks in another epoch are not the same marks"
        );
        assert_eq!(read.wanted_since(read.wants()).map(|k| k.count()), Some(0));
        assert_ne!(
            read.wants(),
            again.wants(),
            "each read starts an epoch of its own"
        );
    }

    #[test]
    fn serialized_as_the_string_keyed_map_it_replaced() {
        let mut t = LedgerTable::default();
        for (i, key) in ["b", "a", "c"].into_iter().enumerate() {
            t.get_or_insert_with(key, entry(i as u64));
        }
        let json = serde_json::to_value(&t).expect("serializes");
        let old: std::collections::BTreeMap<String, Ledger> =
            serde_json::from_value(json.clone()).expect("reads as the old map");
        assert_eq!(old.len(), 3);
        assert_eq!(old["a"].used, 1);
        let back: LedgerTable = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, t);
        assert_eq!(&*back["c"].key, "c");
    }
}
