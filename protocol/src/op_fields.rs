//! An upsert's fields: a map from field name to value, held as one vector sorted by name.
//!
//! An op carries a few fields (workload W: three). A `BTreeMap` allocates its first leaf for
//! eleven entries (632 bytes for `String` → `Value`), and reading an op's fields touches that
//! leaf's key and value arrays at opposite ends: most of an owned op's memory, and the cache
//! misses that bounded encoding a batch of owned ops. Here the entries sit side by side in a
//! vector of exactly their number, found by binary search. Order, iteration, equality and
//! serde's map form are a `BTreeMap`'s (property-tested against it).

use std::collections::BTreeMap;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::op::Value;

/// Field name → value, in name order, names unique.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OpFields(Vec<(String, Value)>);

impl OpFields {
    /// No fields.
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `n` fields.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// How many fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No fields at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// The value of field `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    /// The value of field `name`, to change it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.find(name).ok().map(|i| &mut self.0[i].1)
    }

    /// Whether field `name` is set.
    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Sets field `name`; returns its previous value.
    pub fn insert(&mut self, name: String, value: Value) -> Option<Value> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// Removes field `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.find(name).ok().map(|i| self.0.remove(i).1)
    }

    /// Keeps the fields `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut Value) -> bool) {
        self.0.retain_mut(|(n, v)| keep(n, v));
    }

    /// The fields in name order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    /// The field names in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> + DoubleEndedIterator {
        self.0.iter().map(|(n, _)| n)
    }

    /// The values in their names' order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = &Value> + DoubleEndedIterator {
        self.0.iter().map(|(_, v)| v)
    }

    /// The values, taken, in their names' order.
    pub fn into_values(self) -> impl ExactSizeIterator<Item = Value> + DoubleEndedIterator {
        self.0.into_iter().map(|(_, v)| v)
    }

    /// Appends a field whose name is greater than every name held (a decoder reading names in
    /// increasing order); `Err` gives it back otherwise.
    pub fn push_last(&mut self, name: String, value: Value) -> Result<(), (String, Value)> {
        if self.0.last().is_some_and(|(last, _)| *last >= name) {
            return Err((name, value));
        }
        self.0.push((name, value));
        Ok(())
    }

    /// The fields as a `BTreeMap`.
    pub fn to_btree(&self) -> BTreeMap<String, Value> {
        self.0.iter().cloned().collect()
    }
}

impl std::fmt::Debug for OpFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Iterator over `(&name, &value)`, in name order.
#[derive(Clone)]
pub struct Iter<'a>(std::slice::Iter<'a, (String, Value)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a String, &'a Value);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(n, v)| (n, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(n, v)| (n, v))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a OpFields {
    type Item = (&'a String, &'a Value);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for OpFields {
    type Item = (String, Value);
    type IntoIter = std::vec::IntoIter<(String, Value)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<(String, Value)> for OpFields {
    /// As a `BTreeMap` collects: of two entries with one name, the later one stays.
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        let mut v: Vec<(String, Value)> = iter.into_iter().collect();
        if v.windows(2).all(|w| w[0].0 < w[1].0) {
            return Self(v);
        }
        // A stable sort keeps equal names in their order; the last of each run stays.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, Value)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        Self(out)
    }
}

impl<'a> FromIterator<(&'a str, Value)> for OpFields {
    fn from_iter<I: IntoIterator<Item = (&'a str, Value)>>(iter: I) -> Self {
        iter.into_iter().map(|(n, v)| (n.to_owned(), v)).collect()
    }
}

impl Extend<(String, Value)> for OpFields {
    fn extend<I: IntoIterator<Item = (String, Value)>>(&mut self, iter: I) {
        for (n, v) in iter {
            self.insert(n, v);
        }
    }
}

impl From<BTreeMap<String, Value>> for OpFields {
    fn from(m: BTreeMap<String, Value>) -> Self {
        Self(m.into_iter().collect())
    }
}

impl From<OpFields> for BTreeMap<String, Value> {
    fn from(f: OpFields) -> Self {
        f.0.into_iter().collect()
    }
}

impl<const N: usize> From<[(String, Value); N]> for OpFields {
    fn from(a: [(String, Value); N]) -> Self {
        a.into_iter().collect()
    }
}

impl std::ops::Index<&str> for OpFields {
    type Output = Value;

    fn index(&self, name: &str) -> &Value {
        self.get(name).expect("no such field")
    }
}

impl Serialize for OpFields {
    /// A map in name order: the bytes a `BTreeMap` of the same fields serializes to.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (n, v) in &self.0 {
            m.serialize_entry(n, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for OpFields {
    /// Any map, as a `BTreeMap` reads one: sorted, and of a repeated name the last value.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OpFields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of field names to values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<OpFields, A::Error> {
                // Bounded by what the map's own encoding holds; serde's hint is capped.
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(64));
                while let Some(e) = a.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(v.into_iter().collect())
            }
        }
        d.deserialize_map(V)
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
            prop_assert_eq!(f.to_btree(), m.clone());
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

    #[test]
    fn push_last_only_appends_in_order() {
        let mut f = OpFields::new();
        assert!(f.push_last("b".into(), Value::Null).is_ok());
        assert!(f.push_last("b".into(), Value::Null).is_err());
        assert!(f.push_last("a".into(), Value::Null).is_err());
        assert!(f.push_last("c".into(), Value::Null).is_ok());
        assert_eq!(f.keys().collect::<Vec<_>>(), ["b", "c"]);
    }
}
