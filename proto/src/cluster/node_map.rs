//! [`NodeMap`]: a map from node id to a small value, for the per-node fields of a ledger entry.
//!
//! A ledger entry is copied whenever it changes (the published state still holds the old one),
//! and a usage flush changes a hundred of them in one apply. With `BTreeMap`s each copy cost an
//! allocation per non-empty map and each drop a free; a cluster has a handful of nodes, so the
//! entries are kept sorted inline (spilling to the heap only past [`INLINE`] nodes) and a copy
//! is a `memcpy`. Serialized as a map, exactly as the `BTreeMap` it replaced, so snapshots and
//! log entries written before read the same.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use super::NodeId;

/// Nodes held without a heap allocation (a cluster of three, the usual size).
const INLINE: usize = 3;

/// Entries sorted by node id, each id once.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeMap<V> {
    entries: SmallVec<[(NodeId, V); INLINE]>,
}

impl<V> Default for NodeMap<V> {
    fn default() -> Self {
        NodeMap {
            entries: SmallVec::new(),
        }
    }
}

impl<V> NodeMap<V> {
    fn find(&self, node: NodeId) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&node, |(n, _)| *n)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, node: &NodeId) -> Option<&V> {
        self.find(*node).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, node: &NodeId) -> Option<&mut V> {
        self.find(*node).ok().map(|i| &mut self.entries[i].1)
    }

    pub fn contains_key(&self, node: &NodeId) -> bool {
        self.find(*node).is_ok()
    }

    /// Sets `node`'s value, returning the one it replaces.
    pub fn insert(&mut self, node: NodeId, value: V) -> Option<V> {
        match self.find(node) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (node, value));
                None
            }
        }
    }

    pub fn remove(&mut self, node: &NodeId) -> Option<V> {
        self.find(*node).ok().map(|i| self.entries.remove(i).1)
    }

    /// `node`'s value, inserted as `V::default()` first if it has none.
    pub fn entry_or_default(&mut self, node: NodeId) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(node) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (node, V::default()));
                i
            }
        };
        &mut self.entries[i].1
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&NodeId, &mut V) -> bool) {
        self.entries.retain(|(n, v)| keep(n, v));
    }

    /// In node order.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &V)> {
        self.entries.iter().map(|(n, v)| (n, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &NodeId> {
        self.entries.iter().map(|(n, _)| n)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

impl<V> FromIterator<(NodeId, V)> for NodeMap<V> {
    fn from_iter<I: IntoIterator<Item = (NodeId, V)>>(iter: I) -> Self {
        let mut map = NodeMap::default();
        for (node, value) in iter {
            map.insert(node, value);
        }
        map
    }
}

impl<V: fmt::Debug> fmt::Debug for NodeMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Serialize> Serialize for NodeMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (node, value) in &self.entries {
            map.serialize_entry(node, value)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for NodeMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = NodeMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from node id to value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<NodeMap<V>, A::Error> {
                let mut map = NodeMap::default();
                while let Some((node, value)) = access.next_entry::<NodeId, V>()? {
                    map.insert(node, value);
                }
                Ok(map)
            }
        }

        deserializer.deserialize_map(Entries(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn keeps_node_order_and_one_value_per_node() {
        let mut map = NodeMap::default();
        assert_eq!(map.insert(3, 30), None);
        assert_eq!(map.insert(1, 10), None);
        assert_eq!(map.insert(2, 20), None);
        assert_eq!(map.insert(5, 50), None); // past the inline capacity
        assert_eq!(map.insert(2, 21), Some(20));
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 5]);
        *map.entry_or_default(4) += 40;
        *map.entry_or_default(1) += 1;
        assert_eq!(map.get(&4), Some(&40));
        assert_eq!(map.get(&1), Some(&11));
        assert_eq!(map.remove(&3), Some(30));
        assert_eq!(map.remove(&3), None);
        map.retain(|_, v| *v > 20);
        assert_eq!(
            map.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>(),
            [(2, 21), (4, 40), (5, 50)]
        );
        assert!(!map.contains_key(&1));
        assert_eq!(map.len(), 3);
    }

    /// Snapshots and log entries written with a `BTreeMap` here read back the same, and the
    /// other way round.
    #[test]
    fn reads_and_writes_what_a_btree_map_did() {
        let before: BTreeMap<NodeId, u64> = [(7, 70), (2, 20), (9, 90), (1, 10)].into();
        let json = serde_json::to_string(&before).unwrap();
        let map: NodeMap<u64> = serde_json::from_str(&json).unwrap();
        assert_eq!(
            map.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>(),
            before.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>()
        );
        assert_eq!(serde_json::to_string(&map).unwrap(), json);
        let back: BTreeMap<NodeId, u64> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, before);
    }
}
