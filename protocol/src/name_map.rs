//! A small map from names to values, held as one vector sorted by name: an upsert's fields
//! ([`OpFields`]) and a record's field states ([`crate::FieldMap`]).
//!
//! An op or a record holds a few fields (workload W: three). A `BTreeMap` allocates its first
//! leaf for eleven entries (632 bytes for `String` → `Value`, ~1.4 KB for field states), and
//! reading its entries touches that leaf's key and value arrays at opposite ends: most of an
//! owned op's or a staged record's memory, and the cache misses that bounded encoding a batch
//! of owned ops. Here the entries sit side by side in a vector of exactly their number, found
//! by binary search. Order, iteration, equality, changes and serde's map form are a
//! `BTreeMap`'s (property-tested against it).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::op::Value;

/// Name → value, in name order, names unique.
#[derive(Clone, PartialEq, Eq)]
pub struct NameMap<V>(Vec<(String, V)>);

/// An upsert's fields: field name → value.
pub type OpFields = NameMap<Value>;

impl<V> Default for NameMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> NameMap<V> {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No entries at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&V> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    /// The value of `name`, to change it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut V> {
        self.find(name).ok().map(|i| &mut self.0[i].1)
    }

    /// Whether `name` is held.
    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Sets `name`; returns its previous value.
    pub fn insert(&mut self, name: String, value: V) -> Option<V> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// The value of `name`, made the default first if missing (the name is made owned only
    /// then).
    pub fn entry(&mut self, name: Cow<'_, str>) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&name) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (name.into_owned(), V::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Room for `n` more entries: exactly `n` on an empty map (a record usually gets all its
    /// fields from its first upsert), amortized growth otherwise.
    pub fn reserve(&mut self, n: usize) {
        if self.0.is_empty() {
            self.0.reserve_exact(n);
        } else {
            self.0.reserve(n);
        }
    }

    /// Removes `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<V> {
        self.find(name).ok().map(|i| self.0.remove(i).1)
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut V) -> bool) {
        self.0.retain_mut(|(n, v)| keep(n, v));
    }

    /// The entries in name order.
    pub fn iter(&self) -> Iter<'_, V> {
        Iter(self.0.iter())
    }

    /// The names in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> + DoubleEndedIterator {
        self.0.iter().map(|(n, _)| n)
    }

    /// The values in their names' order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = &V> + DoubleEndedIterator {
        self.0.iter().map(|(_, v)| v)
    }

    /// The values, taken, in their names' order.
    pub fn into_values(self) -> impl ExactSizeIterator<Item = V> + DoubleEndedIterator {
        self.0.into_iter().map(|(_, v)| v)
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for NameMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Iterator over `(&name, &value)`, in name order.
#[derive(Clone)]
pub struct Iter<'a, V>(std::slice::Iter<'a, (String, V)>);

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (&'a String, &'a V);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(n, v)| (n, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<V> DoubleEndedIterator for Iter<'_, V> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(n, v)| (n, v))
    }
}

impl<V> ExactSizeIterator for Iter<'_, V> {}

impl<'a, V> IntoIterator for &'a NameMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = Iter<'a, V>;

    fn into_iter(self) -> Iter<'a, V> {
        self.iter()
    }
}

impl<V> IntoIterator for NameMap<V> {
    type Item = (String, V);
    type IntoIter = std::vec::IntoIter<(String, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<V> FromIterator<(String, V)> for NameMap<V> {
    /// As a `BTreeMap` collects: of two entries with one name, the later one stays.
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut v: Vec<(String, V)> = iter.into_iter().collect();
        if v.windows(2).all(|w| w[0].0 < w[1].0) {
            return Self(v);
        }
        // A stable sort keeps equal names in their order; the last of each run stays.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, V)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        Self(out)
    }
}

impl<'a, V> FromIterator<(&'a str, V)> for NameMap<V> {
    fn from_iter<I: IntoIterator<Item = (&'a str, V)>>(iter: I) -> Self {
        iter.into_iter().map(|(n, v)| (n.to_owned(), v)).collect()
    }
}

impl<V> Extend<(String, V)> for NameMap<V> {
    fn extend<I: IntoIterator<Item = (String, V)>>(&mut self, iter: I) {
        for (n, v) in iter {
            self.insert(n, v);
        }
    }
}

impl<V> From<BTreeMap<String, V>> for NameMap<V> {
    fn from(m: BTreeMap<String, V>) -> Self {
        Self(m.into_iter().collect())
    }
}

impl<V> From<NameMap<V>> for BTreeMap<String, V> {
    fn from(f: NameMap<V>) -> Self {
        f.0.into_iter().collect()
    }
}

impl<V, const N: usize> From<[(String, V); N]> for NameMap<V> {
    fn from(a: [(String, V); N]) -> Self {
        a.into_iter().collect()
    }
}

impl<V> std::ops::Index<&str> for NameMap<V> {
    type Output = V;

    fn index(&self, name: &str) -> &V {
        self.get(name).expect("no such name")
    }
}

impl<V: Serialize> Serialize for NameMap<V> {
    /// A map in name order: the bytes a `BTreeMap` of the same entries serializes to.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (n, v) in &self.0 {
            m.serialize_entry(n, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for NameMap<V> {
    /// Any map, as a `BTreeMap` reads one: sorted, and of a repeated name the last value.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = NameMap<V>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of names to values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<NameMap<V>, A::Error> {
                // Bounded by what the map's own encoding holds; serde's hint is capped.
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(64));
                while let Some(e) = a.next_entry::<String, V>()? {
                    v.push(e);
                }
                Ok(v.into_iter().collect())
            }
        }
        d.deserialize_map(Entries(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries() -> impl Strategy<Value = Vec<(String, i64)>> {
        proptest::collection::vec(("[a-e]{0,2}", any::<i64>()), 0..12)
    }

    fn both(es: &[(String, i64)]) -> (OpFields, BTreeMap<String, Value>) {
        let it = || es.iter().map(|(n, v)| (n.clone(), Value::from(*v)));
        (it().collect(), it().collect())
    }

    proptest! {
        /// Collecting, iterating, looking up and the serde map form agree with `BTreeMap`.
        #[test]
        fn reads_as_a_btree_map(es in entries(), probe in "[a-e]{0,2}") {
            let (f, m) = both(&es);
            prop_assert!(f.iter().eq(m.iter()));
            prop_assert_eq!(f.len(), m.len());
            prop_assert_eq!(f.get(&probe), m.get(&probe));
            prop_assert_eq!(f.contains_key(&probe), m.contains_key(&probe));
            prop_assert!(f.keys().eq(m.keys()));
            prop_assert!(f.values().rev().eq(m.values().rev()));
            prop_assert!(f.clone().into_values().eq(m.clone().into_values()));
            prop_assert_eq!(BTreeMap::from(f.clone()), m.clone());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            ciborium::into_writer(&f, &mut a).unwrap();
            ciborium::into_writer(&m, &mut b).unwrap();
            prop_assert_eq!(&a, &b);
            let back: OpFields = ciborium::from_reader(&a[..]).unwrap();
            prop_assert_eq!(back, f);
        }

        /// Inserting, removing and retaining change it as they change a `BTreeMap`.
        #[test]
        fn changes_as_a_btree_map(
            es in entries(),
            steps in proptest::collection::vec((0u8..3, "[a-e]{0,2}", any::<i64>()), 0..24),
        ) {
            let (mut f, mut m) = both(&es);
            for (what, name, v) in steps {
                match what {
                    0 => prop_assert_eq!(
                        f.insert(name.clone(), Value::from(v)),
                        m.insert(name, Value::from(v))
                    ),
                    1 => prop_assert_eq!(f.remove(&name), m.remove(&name)),
                    _ => {
                        f.retain(|n, _| *n != name);
                        m.retain(|n, _| *n != name);
                    }
                }
                prop_assert!(f.iter().eq(m.iter()));
            }
        }

        /// A map with repeated or unordered names reads as a `BTreeMap` reads it.
        #[test]
        fn a_repeated_name_keeps_its_last_value(es in entries()) {
            let mut enc = Vec::new();
            let pairs: Vec<(String, Value)> =
                es.iter().map(|(n, v)| (n.clone(), Value::from(*v))).collect();
            ciborium::into_writer(&ciborium::Value::Map(
                pairs.iter().map(|(n, v)| (
                    ciborium::Value::Text(n.clone()),
                    ciborium::Value::serialized(v).unwrap(),
                )).collect(),
            ), &mut enc).unwrap();
            let f: OpFields = ciborium::from_reader(&enc[..]).unwrap();
            let m: BTreeMap<String, Value> = ciborium::from_reader(&enc[..]).unwrap();
            prop_assert!(f.iter().eq(m.iter()));
        }
    }
}
