//! Op merging before encoding: drop the ops (and fields) of a batch that a later op of the
//! same batch makes invisible forever.
//!
//! Within one batch every op has the same author and a strictly later timestamp than the one
//! before, so a later write *dominates* an earlier one exactly when the merge rules would let
//! the later one win against anything: a later upsert of a field hides the earlier value of
//! that field and every earlier counter add to it; a later delete hides every earlier write
//! and add to the record and every earlier delete. Those are precisely the entries the merge
//! rules' compaction drops, so pruning them changes no state — alone or joined with any other
//! replica's state (property-tested against unmerged application).
//!
//! Ops are never combined into new ops with other timestamps (two upserts of different fields
//! keep their own stamps), which is what keeps the result exactly equivalent.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::op::Op;

/// Removes dominated ops and fields, in place. `ops` must be in timestamp order, as in a
/// batch.
///
/// Only an op on a record that the batch touches more than once can be dominated, so a
/// first pass finds the records touched more than once (one hash of each op's record into a
/// table of op indices), and only their ops are examined, walking backwards. A batch of
/// distinct records (the common case under random keys) is left untouched after that one
/// pass; otherwise the few ops that go are removed in place. Nothing is reallocated: a
/// batch's worth of fresh memory per write (a new vector of ~5k ops) was mostly the
/// kernel zeroing pages for it.
pub fn prune(ops: &mut Vec<Op>) {
    let hasher = foldhash::fast::RandomState::default();
    let hash = |i: usize| hasher.hash_one((ops[i].collection(), ops[i].key()));
    let same = |i: usize, j: usize| {
        ops[i].key() == ops[j].key() && ops[i].collection() == ops[j].collection()
    };
    let Some(rep) = repeats(ops.len(), hash, same) else {
        return;
    };
    // Walk backwards, remembering per record what later ops already cover.
    let mut later: HashMap<u32, Later<String>> = HashMap::new();
    let mut keep = vec![true; ops.len()];
    for i in (0..ops.len()).rev() {
        if rep[i] == ALONE {
            continue;
        }
        let seen = later.entry(rep[i]).or_default();
        keep[i] = match &mut ops[i] {
            Op::Delete { .. } => seen.delete(),
            Op::Upsert { fields, .. } => {
                let all = fields.len();
                fields.retain(|f, _| !seen.overwritten(f));
                seen.upsert(all, fields.keys().cloned())
            }
            Op::CounterAdd { field, .. } => !seen.hides(field),
            Op::Revoke { .. } => true,
        };
    }
    let mut keep = keep.into_iter();
    ops.retain(|_| keep.next().unwrap_or(true));
}

/// No other op of the batch touches this op's record ([`repeats`]).
pub(crate) const ALONE: u32 = u32::MAX;

/// Per op (of `n`), the index of the first op on its record if another op touches that
/// record too, else [`ALONE`]; `None` if no record is touched twice. `hash(i)` is op `i`'s
/// record's hash, `same(i, j)` whether ops `i` and `j` touch one record. (4 bytes a slot:
/// the table of a 5k-op batch stays in cache, and records are compared only when the hash
/// tags match.)
pub(crate) fn repeats(
    n: usize,
    hash: impl Fn(usize) -> u64,
    same: impl Fn(usize, usize) -> bool,
) -> Option<Vec<u32>> {
    let mut first: HashTable<u32> = HashTable::with_capacity(n);
    let mut rep: Option<Vec<u32>> = None;
    for i in 0..n {
        let h = hash(i);
        match first.find(h, |j| same(*j as usize, i)) {
            Some(&j) => {
                let rep = rep.get_or_insert_with(|| vec![ALONE; n]);
                rep[i] = j;
                rep[j as usize] = j;
            }
            None => {
                first.insert_unique(h, i as u32, |j| hash(*j as usize));
            }
        }
    }
    rep
}

/// What the later ops of a batch already cover on one record, for a walk backwards over its
/// ops: the rules of the module doc in one place, for owned ops ([`prune`], fields named by
/// `String`) and for encoded ones ([`crate::OpsBuilder`], fields named by name index).
pub(crate) struct Later<K> {
    deleted: bool,
    written: BTreeSet<K>,
}

impl<K> Default for Later<K> {
    fn default() -> Self {
        Later {
            deleted: false,
            written: BTreeSet::new(),
        }
    }
}

impl<K: Ord> Later<K> {
    /// A delete: visible unless a later delete covers it.
    pub(crate) fn delete(&mut self) -> bool {
        !std::mem::replace(&mut self.deleted, true)
    }

    /// Whether a later upsert sets `field` (an earlier upsert's value of it is hidden).
    pub(crate) fn overwritten(&self, field: &K) -> bool {
        self.written.contains(field)
    }

    /// Whether a later write or delete hides an earlier counter add to `field`.
    pub(crate) fn hides(&self, field: &K) -> bool {
        self.deleted || self.written.contains(field)
    }

    /// An upsert of `all` fields, of which `kept` are not [`Later::overwritten`]: whether it
    /// stays visible. An upsert whose every field is overwritten later is invisible; an empty
    /// one written on purpose (`{}`: "the record exists") is kept unless a later write or
    /// delete of the record covers it.
    pub(crate) fn upsert(&mut self, all: usize, kept: impl IntoIterator<Item = K>) -> bool {
        if self.deleted {
            return false;
        }
        let was_empty = self.written.is_empty();
        let mut n = 0;
        for k in kept {
            self.written.insert(k);
            n += 1;
        }
        let covered = all > 0 && n == 0;
        let empty_covered = all == 0 && !was_empty;
        !covered && !empty_covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::merge::RecordState;
    use crate::op::Value;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
        // Few keys, so records repeat; five, so some do not (the first pass's fast path).
        let key = prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string()),
            Just("d".to_string()),
            Just("e".to_string())
        ];
        let field = prop_oneof![
            Just("x".to_string()),
            Just("y".to_string()),
            Just("z".to_string())
        ];
        let op = prop_oneof![
            (
                key.clone(),
                proptest::collection::btree_map(field.clone(), any::<i8>(), 0..3)
            )
                .prop_map(|(k, f)| (
                    0u8,
                    k,
                    f.into_iter().map(|(n, v)| (n, Value::from(v))).collect(),
                    String::new(),
                    0
                )),
            key.clone()
                .prop_map(|k| (1u8, k, BTreeMap::new(), String::new(), 0)),
            (key, field, -3i64..3).prop_map(|(k, f, d)| (2u8, k, BTreeMap::new(), f, d)),
        ];
        proptest::collection::vec(op, 0..12).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (kind, key, fields, field, delta))| {
                    let hlc = Hlc(100 + i as u64);
                    let collection = "c".to_string();
                    match kind {
                        0 => Op::Upsert {
                            collection,
                            key,
                            hlc,
                            fields: fields.into(),
                        },
                        1 => Op::Delete {
                            collection,
                            key,
                            hlc,
                        },
                        _ => Op::CounterAdd {
                            collection,
                            key,
                            hlc,
                            field,
                            delta,
                        },
                    }
                })
                .collect()
        })
    }

    fn states(
        ops: &[Op],
        author: [u8; 32],
        base: &BTreeMap<String, RecordState>,
    ) -> BTreeMap<String, RecordState> {
        let mut s = base.clone();
        for op in ops {
            s.entry(op.key().to_string()).or_default().apply(op, author);
        }
        // Normalize: a record no op touched and an empty default are the same.
        s.retain(|_, r| *r != RecordState::default());
        s
    }

    proptest! {
        /// Pruned and unpruned batches give the same state, alone and joined with concurrent
        /// writes of another author at interleaved timestamps.
        #[test]
        fn pruning_is_equivalent(ops in arb_ops(), other in arb_ops(), shift in 0u64..20) {
            let me = [1u8; 32];
            let them = [2u8; 32];
            // The other author's ops interleave in time with ours.
            let other: Vec<Op> = other
                .into_iter()
                .map(|mut o| { let h = o.hlc(); o.set_hlc(Hlc(h.0 - 100 + shift * 2 + 95)); o })
                .collect();
            let base = states(&other, them, &BTreeMap::new());
            let mut pruned = ops.clone();
            prune(&mut pruned);
            prop_assert!(pruned.len() <= ops.len());
            prop_assert_eq!(states(&pruned, me, &base), states(&ops, me, &base));
            prop_assert_eq!(states(&pruned, me, &BTreeMap::new()), states(&ops, me, &BTreeMap::new()));
            // Order is kept (timestamps still strictly increase).
            for w in pruned.windows(2) {
                prop_assert!(w[0].hlc() < w[1].hlc());
            }
        }
    }

    proptest! {
        /// The first pass maps exactly the ops whose record another op touches too, each to
        /// the first op on its record.
        #[test]
        fn repeats_are_exact(ops in arb_ops()) {
            let rec = |o: &Op| (o.collection().to_string(), o.key().to_string());
            let naive: Vec<u32> = ops
                .iter()
                .map(|a| {
                    let same: Vec<usize> =
                        (0..ops.len()).filter(|j| rec(&ops[*j]) == rec(a)).collect();
                    match same.len() > 1 {
                        true => same[0] as u32,
                        false => ALONE,
                    }
                })
                .collect();
            let want = naive.iter().any(|r| *r != ALONE).then_some(naive);
            let hash = |i: usize| {
                let mut h = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(&rec(&ops[i]), &mut h);
                std::hash::Hasher::finish(&h)
            };
            prop_assert_eq!(repeats(ops.len(), hash, |i, j| rec(&ops[i]) == rec(&ops[j])), want);
        }
    }

    #[test]
    fn dominated_writes_go() {
        let up = |h, k: &str, f: &[&str]| Op::Upsert {
            collection: "c".into(),
            key: k.into(),
            hlc: Hlc(h),
            fields: f.iter().map(|n| (n.to_string(), Value::from(h))).collect(),
        };
        let del = |h, k: &str| Op::Delete {
            collection: "c".into(),
            key: k.into(),
            hlc: Hlc(h),
        };
        let ops = vec![
            up(1, "a", &["x", "y"]),
            up(2, "a", &["x"]),
            up(3, "b", &["x"]),
            del(4, "b"),
            up(5, "b", &["z"]),
        ];
        let mut p = ops;
        prune(&mut p);
        assert_eq!(
            p,
            vec![
                up(1, "a", &["y"]),
                up(2, "a", &["x"]),
                del(4, "b"),
                up(5, "b", &["z"])
            ]
        );
    }
}
