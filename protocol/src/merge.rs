//! Merge rules, as pure functions over record states.
//!
//! A [`RecordState`] is a join-semilattice: [`RecordState::merge`] is commutative, associative
//! and idempotent (property-tested below), so replicas that have applied the same set of ops
//! hold the same state whatever the order. Applying an op is merging the state that op alone
//! would produce.
//!
//! Rules:
//! - **Fields** are last-writer-wins by [`Stamp`] (HLC, then author key; a tie on both — only
//!   possible for a forked chain — falls back to comparing the values).
//! - **Delete** is a tombstone at a stamp: every field write and counter add at or before it is
//!   hidden; writes after it show again.
//! - **Counters**: a counter field's value is its last written number (or 0) plus every add
//!   stamped after both that write and the last delete. Concurrent adds all count.
//!
//! States are kept *compact*: entries that can never be visible again (dominated by a later
//! write or tombstone, which only ever grow) are dropped on every merge, so compact states are
//! canonical and compare equal exactly when they are the same join.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{OpView, PayloadView};
use crate::hlc::Hlc;
use crate::name_map::NameMap;
use crate::op::{Op, Value};

/// Total order of writes: HLC first, then author key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// When.
    pub hlc: Hlc,
    /// Who (ed25519 public key bytes).
    #[serde(with = "serde_bytes")]
    pub author: [u8; 32],
}

/// State of one field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldState {
    /// Last written value and its stamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lww: Option<(Stamp, Value)>,
    /// Counter adds not yet dominated by a write or a tombstone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adds: BTreeMap<Stamp, i64>,
}

/// A record's fields by name ([`NameMap`]: a vector kept sorted by name). Records hold a few
/// fields; a `BTreeMap`'s first leaf alone is allocated for 11 entries (~1.4 KB per record
/// here, which was most of the materializer's per-op memory and allocation time).
pub type FieldMap = NameMap<FieldState>;

/// State of one record: the join of every op applied to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordState {
    /// Latest tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Stamp>,
    /// Latest write of any kind (upsert or add) to the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub touched: Option<Stamp>,
    /// Per-field state.
    #[serde(default)]
    pub fields: FieldMap,
}

fn max_opt(a: Option<Stamp>, b: Option<Stamp>) -> Option<Stamp> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Whether a write of `value` at `stamp` replaces `old` (last writer wins; a tie on the stamp,
/// only possible for a forked chain, goes to the greater value).
fn wins(stamp: Stamp, value: &Value, old: &(Stamp, Value)) -> bool {
    match stamp.cmp(&old.0) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => value_key(value) > value_key(&old.1),
    }
}

fn value_key(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl RecordState {
    /// The state that a single op, written by `author`, produces on an empty record.
    pub fn from_op(op: &Op, author: [u8; 32]) -> Self {
        let stamp = Stamp {
            hlc: op.hlc(),
            author,
        };
        let mut s = RecordState::default();
        match op {
            Op::Upsert { fields, .. } => {
                s.touched = Some(stamp);
                for (name, value) in fields {
                    s.fields.insert(
                        name.clone(),
                        FieldState {
                            lww: Some((stamp, value.clone())),
                            adds: BTreeMap::new(),
                        },
                    );
                }
            }
            Op::Delete { .. } => s.deleted = Some(stamp),
            Op::Revoke { .. } => {
                s.touched = Some(stamp);
                s.fields.insert(
                    "revoked_at".to_string(),
                    FieldState {
                        lww: Some((stamp, Value::from(op.hlc().wall_ms()))),
                        adds: BTreeMap::new(),
                    },
                );
            }
            Op::CounterAdd { field, delta, .. } => {
                s.touched = Some(stamp);
                s.fields.insert(
                    field.clone(),
                    FieldState {
                        lww: None,
                        adds: BTreeMap::from([(stamp, *delta)]),
                    },
                );
            }
        }
        s
    }

    /// Applies one op: the same as merging [`RecordState::from_op`] (property-tested below),
    /// done in place without building that state (no name or value is copied unless it wins).
    pub fn apply(&mut self, op: &Op, author: [u8; 32]) {
        let stamp = Stamp {
            hlc: op.hlc(),
            author,
        };
        match op {
            Op::Upsert { fields, .. } => {
                self.touched = max_opt(self.touched, Some(stamp));
                self.fields.reserve(fields.len());
                for (name, value) in fields {
                    self.write_field(Cow::Borrowed(name), stamp, Cow::Borrowed(value));
                }
            }
            Op::Delete { .. } => self.deleted = max_opt(self.deleted, Some(stamp)),
            Op::Revoke { .. } => {
                self.touched = max_opt(self.touched, Some(stamp));
                let at = Value::from(op.hlc().wall_ms());
                self.write_field(Cow::Borrowed("revoked_at"), stamp, Cow::Owned(at));
            }
            Op::CounterAdd { field, delta, .. } => {
                self.touched = max_opt(self.touched, Some(stamp));
                let f = self.fields.entry(Cow::Borrowed(field));
                let d = f.adds.entry(stamp).or_insert(*delta);
                *d = (*d).max(*delta);
            }
        }
        self.compact();
    }

    /// [`RecordState::apply`] for an op read from a payload view (the materializer's way:
    /// received ops are never made owned): names and values become owned only here, once,
    /// as they are stored.
    pub fn apply_view(&mut self, view: &PayloadView<'_>, op: &OpView<'_>, author: [u8; 32]) {
        match op {
            OpView::Upsert { hlc, .. } => {
                let stamp = Stamp { hlc: *hlc, author };
                self.touched = max_opt(self.touched, Some(stamp));
                let fields = view.fields(op);
                self.fields.reserve(fields.len());
                for (name, value) in fields {
                    self.write_field(Cow::Borrowed(name), stamp, Cow::Owned(value.to_value()));
                }
                self.compact();
            }
            other => self.apply(&view.to_op(other), author),
        }
    }

    /// The last-writer-wins part of merging one written field. The name and the value are
    /// made owned only when they are stored (borrowed by `apply`, built from the payload by
    /// `apply_view`).
    fn write_field(&mut self, name: Cow<'_, str>, stamp: Stamp, value: Cow<'_, Value>) {
        let f = self.fields.entry(name);
        let replace = match &f.lww {
            Some(old) => wins(stamp, &value, old),
            None => true,
        };
        if replace {
            f.lww = Some((stamp, value.into_owned()));
        }
    }

    /// Joins `other` into `self`.
    pub fn merge(&mut self, other: &RecordState) {
        self.deleted = max_opt(self.deleted, other.deleted);
        self.touched = max_opt(self.touched, other.touched);
        for (name, theirs) in &other.fields {
            let mine = self.fields.entry(Cow::Borrowed(name));
            if let Some(t) = &theirs.lww {
                let replace = match &mine.lww {
                    Some(m) => wins(t.0, &t.1, m),
                    None => true,
                };
                if replace {
                    mine.lww = Some(t.clone());
                }
            }
            for (stamp, delta) in &theirs.adds {
                // A stamp names one op, so both sides hold the same delta; only a forked chain
                // could disagree, and then the larger delta wins on every replica alike.
                let d = mine.adds.entry(*stamp).or_insert(*delta);
                *d = (*d).max(*delta);
            }
        }
        self.compact();
    }

    /// Drops whatever can never be visible again.
    fn compact(&mut self) {
        let deleted = self.deleted;
        self.fields.retain(|_, f| {
            if let (Some((stamp, _)), Some(d)) = (&f.lww, deleted) {
                if *stamp <= d {
                    f.lww = None;
                }
            }
            let floor = max_opt(f.lww.as_ref().map(|(s, _)| *s), deleted);
            if let Some(floor) = floor {
                f.adds.retain(|s, _| *s > floor);
            }
            f.lww.is_some() || !f.adds.is_empty()
        });
        if let (Some(t), Some(d)) = (self.touched, self.deleted) {
            if t <= d {
                self.touched = None;
            }
        }
    }

    /// Whether the record currently exists (written after its last delete).
    pub fn exists(&self) -> bool {
        self.touched.is_some()
    }

    /// The visible fields, as a JSON object; `None` if the record does not exist.
    pub fn visible(&self) -> Option<serde_json::Map<String, Value>> {
        if !self.exists() {
            return None;
        }
        let mut out = serde_json::Map::new();
        for (name, f) in &self.fields {
            let value = if f.adds.is_empty() {
                match &f.lww {
                    Some((_, v)) => v.clone(),
                    None => continue,
                }
            } else {
                let sum: i64 = f.adds.values().fold(0i64, |a, d| a.wrapping_add(*d));
                match f.lww.as_ref().map(|(_, v)| v) {
                    Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
                        Value::from(n.as_i64().unwrap_or(i64::MAX).wrapping_add(sum))
                    }
                    Some(Value::Number(n)) => Value::from(n.as_f64().unwrap_or(0.0) + sum as f64),
                    _ => Value::from(sum),
                }
            };
            out.insert(name.clone(), value);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_op() -> impl Strategy<Value = (Op, [u8; 32])> {
        let author = prop_oneof![Just([1u8; 32]), Just([2u8; 32]), Just([3u8; 32])];
        let field = prop_oneof![Just("a".to_string()), Just("b".to_string())];
        let value = prop_oneof![
            Just(Value::Null),
            any::<i32>().prop_map(Value::from),
            "[a-z]{0,3}".prop_map(Value::from),
        ];
        let hlc = (0u64..20).prop_map(Hlc);
        let op = prop_oneof![
            (
                hlc.clone(),
                proptest::collection::btree_map(field.clone(), value, 0..3)
            )
                .prop_map(|(hlc, fields)| Op::Upsert {
                    collection: "c".into(),
                    key: "k".into(),
                    hlc,
                    fields: fields.into()
                }),
            hlc.clone().prop_map(|hlc| Op::Delete {
                collection: "c".into(),
                key: "k".into(),
                hlc
            }),
            (hlc, field, -5i64..5).prop_map(|(hlc, field, delta)| Op::CounterAdd {
                collection: "c".into(),
                key: "k".into(),
                hlc,
                field,
                delta
            }),
        ];
        (op, author)
    }

    fn state_of(ops: &[(Op, [u8; 32])]) -> RecordState {
        let mut s = RecordState::default();
        for (op, a) in ops {
            s.apply(op, *a);
        }
        s
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in proptest::collection::vec(arb_op(), 0..8),
                                b in proptest::collection::vec(arb_op(), 0..8)) {
            let (sa, sb) = (state_of(&a), state_of(&b));
            let mut ab = sa.clone();
            ab.merge(&sb);
            let mut ba = sb.clone();
            ba.merge(&sa);
            prop_assert_eq!(&ab, &ba);
            prop_assert_eq!(ab.visible(), ba.visible());
        }

        #[test]
        fn merge_is_associative(a in proptest::collection::vec(arb_op(), 0..6),
                                b in proptest::collection::vec(arb_op(), 0..6),
                                c in proptest::collection::vec(arb_op(), 0..6)) {
            let (sa, sb, sc) = (state_of(&a), state_of(&b), state_of(&c));
            let mut left = sa.clone();
            left.merge(&sb);
            left.merge(&sc);
            let mut bc = sb.clone();
            bc.merge(&sc);
            let mut right = sa.clone();
            right.merge(&bc);
            prop_assert_eq!(left, right);
        }

        #[test]
        fn merge_is_idempotent(a in proptest::collection::vec(arb_op(), 0..8)) {
            let sa = state_of(&a);
            let mut twice = sa.clone();
            twice.merge(&sa);
            prop_assert_eq!(&twice, &sa);
            // Re-applying every op changes nothing either.
            let mut again = sa.clone();
            for (op, author) in &a {
                again.apply(op, *author);
            }
            prop_assert_eq!(again, sa);
        }

        #[test]
        fn apply_is_merging_the_ops_state(a in proptest::collection::vec(arb_op(), 0..10)) {
            let mut applied = RecordState::default();
            let mut merged = RecordState::default();
            for (op, author) in &a {
                applied.apply(op, *author);
                merged.merge(&RecordState::from_op(op, *author));
                prop_assert_eq!(&applied, &merged);
            }
        }

        #[test]
        fn apply_view_is_apply(a in proptest::collection::vec(arb_op(), 0..10)) {
            let mut by_ref = RecordState::default();
            let mut viewed = RecordState::default();
            for (op, author) in &a {
                by_ref.apply(op, *author);
                let mut plain = Vec::new();
                crate::codec::encode_ops(std::slice::from_ref(op), &mut plain);
                let view = crate::codec::decode(&plain).unwrap();
                viewed.apply_view(&view, &view.ops()[0], *author);
                prop_assert_eq!(&by_ref, &viewed);
            }
        }

        #[test]
        fn apply_order_does_not_matter(mut a in proptest::collection::vec(arb_op(), 0..10),
                                       seed in any::<u64>()) {
            let forward = state_of(&a);
            // A deterministic shuffle driven by the seed.
            let n = a.len();
            let mut x = seed;
            for i in (1..n).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                a.swap(i, (x >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(state_of(&a), forward);
        }

        /// The sorted-vector field map behaves as a `BTreeMap` under inserts, entries and
        /// retains: same lookups, same iteration order.
        #[test]
        fn field_map_is_a_sorted_map(steps in proptest::collection::vec(
            (0u8..3, "[a-e]{1,2}", any::<i64>()), 0..40)) {
            let mut map = FieldMap::default();
            let mut model: BTreeMap<String, FieldState> = BTreeMap::new();
            let stamp = Stamp { hlc: Hlc(1), author: [0; 32] };
            for (kind, name, v) in steps {
                match kind {
                    0 => {
                        let f = FieldState { lww: Some((stamp, Value::from(v))), adds: BTreeMap::new() };
                        prop_assert_eq!(map.insert(name.clone(), f.clone()), model.insert(name.clone(), f));
                    }
                    1 => {
                        map.entry(Cow::Borrowed(&name)).adds.insert(stamp, v);
                        model.entry(name.clone()).or_default().adds.insert(stamp, v);
                    }
                    _ => {
                        let keep = |n: &str| !n.starts_with(name.as_str());
                        map.retain(|n, _| keep(n));
                        model.retain(|n, _| keep(n));
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                prop_assert!(map.iter().eq(model.iter()));
                prop_assert_eq!(map.get(&name), model.get(&name));
            }
        }
    }

    fn up(h: u64, fields: serde_json::Value) -> Op {
        Op::Upsert {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(h),
            fields: serde_json::from_value(fields).unwrap(),
        }
    }

    #[test]
    fn lww_tombstone_and_counter_semantics() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let mut s = RecordState::default();
        s.apply(&up(10, serde_json::json!({"x": 1, "y": "old"})), a);
        s.apply(&up(5, serde_json::json!({"y": "older"})), b);
        assert_eq!(s.visible().unwrap()["y"], "old");
        // Same HLC, higher author wins.
        s.apply(&up(10, serde_json::json!({"y": "tie"})), b);
        assert_eq!(s.visible().unwrap()["y"], "tie");
        s.apply(
            &Op::Delete {
                collection: "c".into(),
                key: "k".into(),
                hlc: Hlc(20),
            },
            a,
        );
        assert_eq!(s.visible(), None);
        // An older write does not resurrect; a newer one does, alone.
        s.apply(&up(15, serde_json::json!({"z": 1})), a);
        assert_eq!(s.visible(), None);
        s.apply(&up(25, serde_json::json!({"z": 2})), a);
        assert_eq!(
            s.visible().unwrap(),
            serde_json::json!({"z": 2}).as_object().unwrap().clone()
        );
        let add = |h, d| Op::CounterAdd {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(h),
            field: "n".into(),
            delta: d,
        };
        s.apply(&add(30, 5), a);
        s.apply(&add(30, 7), b);
        assert_eq!(s.visible().unwrap()["n"], 12);
        s.apply(&up(31, serde_json::json!({"n": 100})), a);
        s.apply(&add(32, -1), b);
        assert_eq!(s.visible().unwrap()["n"], 99);
    }
}
