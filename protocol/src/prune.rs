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

use std::collections::{BTreeMap, BTreeSet};
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
    let Some(repeated) = repeated_records(ops) else {
        return;
    };
    // Walk backwards, remembering per record what later ops already cover.
    #[derive(Default)]
    struct Later {
        deleted: bool,
        written: BTreeSet<String>,
    }
    let mut later: BTreeMap<(String, String), Later> = BTreeMap::new();
    let mut keep = vec![true; ops.len()];
    for i in (0..ops.len()).rev() {
        if !repeated[i] {
            continue;
        }
        let rec = (ops[i].collection().to_string(), ops[i].key().to_string());
        let seen = later.entry(rec).or_default();
        keep[i] = match &mut ops[i] {
            Op::Delete { .. } => !std::mem::replace(&mut seen.deleted, true),
            Op::Upsert { fields, .. } => {
                if seen.deleted {
                    false
                } else {
                    let all = fields.len();
                    fields.retain(|f, _| !seen.written.contains(f));
                    // An upsert whose every field is overwritten later is invisible; an empty
                    // one written on purpose ({}: "the record exists") is kept unless a later
                    // write or delete of the record covers it.
                    let covered = all > 0 && fields.is_empty();
                    let empty_covered = all == 0 && !seen.written.is_empty();
                    seen.written.extend(fields.keys().cloned());
                    !covered && !empty_covered
                }
            }
            Op::CounterAdd { field, .. } => !(seen.deleted || seen.written.contains(field)),
            Op::Revoke { .. } => true,
        };
    }
    let mut keep = keep.into_iter();
    ops.retain(|_| keep.next().unwrap_or(true));
}

/// Per op, whether its record is touched by another op of the batch too; `None` if no record
/// is touched twice.
fn repeated_records(ops: &[Op]) -> Option<Vec<bool>> {
    let hasher = foldhash::fast::RandomState::default();
    let hash = |op: &Op| hasher.hash_one((op.collection(), op.key()));
    // Index of the first op on each record (4 bytes a slot: the table of a 5k-op batch
    // stays in cache, and a record's strings are compared only when the hash tags match).
    let mut first: HashTable<u32> = HashTable::with_capacity(ops.len());
    let mut repeated: Option<Vec<bool>> = None;
    for (i, op) in ops.iter().enumerate() {
        let same = |j: &u32| {
            let o = &ops[*j as usize];
            o.key() == op.key() && o.collection() == op.collection()
        };
        let h = hash(op);
        match first.find(h, same) {
            Some(&j) => {
                let r = repeated.get_or_insert_with(|| vec![false; ops.len()]);
                r[i] = true;
                r[j as usize] = true;
            }
            None => {
                first.insert_unique(h, i as u32, |j| hash(&ops[*j as usize]));
            }
        }
    }
    repeated
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::merge::RecordState;
    use crate::op::Value;
    use proptest::prelude::*;

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
                            fields,
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
        /// The first pass flags exactly the ops whose record another op touches too.
        #[test]
        fn repeated_records_are_exact(ops in arb_ops()) {
            let naive: Vec<bool> = ops
                .iter()
                .map(|a| ops.iter().filter(|b| (a.collection(), a.key()) == (b.collection(), b.key())).count() > 1)
                .collect();
            let want = naive.iter().any(|r| *r).then_some(naive);
            prop_assert_eq!(repeated_records(&ops), want);
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
