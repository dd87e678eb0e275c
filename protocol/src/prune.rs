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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::op::Op;

/// Removes dominated ops and fields. `ops` must be in timestamp order, as in a batch.
///
/// Only an op on a record that the batch touches more than once can be dominated, so a
/// first pass counts the records (borrowed, hashed) and ops on records touched once are
/// kept as they are, without the walk's per-op allocations. A batch of distinct records (the
/// common case under random keys) comes back untouched after that one pass.
pub fn prune(ops: Vec<Op>) -> Vec<Op> {
    let repeated = repeated_records(&ops);
    if !repeated.iter().any(|r| *r) {
        return ops;
    }
    walk(ops, &repeated)
}

/// Per op: whether its record is touched by another op of the batch too.
fn repeated_records(ops: &[Op]) -> Vec<bool> {
    let mut seen: HashMap<(&str, &str), u32, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(ops.len(), Default::default());
    for op in ops {
        *seen.entry((op.collection(), op.key())).or_default() += 1;
    }
    ops.iter()
        .map(|op| {
            seen.get(&(op.collection(), op.key()))
                .is_some_and(|n| *n > 1)
        })
        .collect()
}

/// The backward walk over a batch; ops whose `repeated` flag is false are kept unexamined.
fn walk(ops: Vec<Op>, repeated: &[bool]) -> Vec<Op> {
    // Walk backwards, remembering per record what later ops already cover.
    #[derive(Default)]
    struct Later {
        deleted: bool,
        written: BTreeSet<String>,
    }
    let mut later: BTreeMap<(String, String), Later> = BTreeMap::new();
    let mut kept: Vec<Op> = Vec::with_capacity(ops.len());
    for (op, repeated) in ops.into_iter().zip(repeated).rev() {
        if !repeated {
            kept.push(op);
            continue;
        }
        let rec = (op.collection().to_string(), op.key().to_string());
        let seen = later.entry(rec).or_default();
        match op {
            Op::Delete { .. } => {
                if !seen.deleted {
                    seen.deleted = true;
                    kept.push(op);
                }
            }
            Op::Upsert {
                collection,
                key,
                hlc,
                mut fields,
            } => {
                if seen.deleted {
                    continue;
                }
                let all = fields.len();
                fields.retain(|f, _| !seen.written.contains(f));
                // An upsert whose every field is overwritten later is invisible; an empty one
                // written on purpose ({}: "the record exists") is kept unless a later write or
                // delete of the record covers it.
                let covered = all > 0 && fields.is_empty();
                let empty_covered = all == 0 && !seen.written.is_empty();
                seen.written.extend(fields.keys().cloned());
                if !covered && !empty_covered {
                    kept.push(Op::Upsert {
                        collection,
                        key,
                        hlc,
                        fields,
                    });
                }
            }
            Op::CounterAdd { ref field, .. } => {
                if seen.deleted || seen.written.contains(field) {
                    continue;
                }
                kept.push(op);
            }
            Op::Revoke { .. } => kept.push(op),
        }
    }
    kept.reverse();
    kept
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
            let pruned = prune(ops.clone());
            prop_assert!(pruned.len() <= ops.len());
            prop_assert_eq!(states(&pruned, me, &base), states(&ops, me, &base));
            prop_assert_eq!(states(&pruned, me, &BTreeMap::new()), states(&ops, me, &BTreeMap::new()));
            // Order is kept (timestamps still strictly increase).
            for w in pruned.windows(2) {
                prop_assert!(w[0].hlc() < w[1].hlc());
            }
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
        let p = prune(ops);
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
