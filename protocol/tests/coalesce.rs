//! `Engine::write_many`: several callers' writes sealed into one batch give the same records
//! as one batch per caller, and a bad caller fails alone.

use std::collections::BTreeMap;

use blazedb_identity::Keypair;
use blazedb_protocol::capability::{namespace_id, Chain, Rights};
use blazedb_protocol::{
    Action, BatchError, CheckedOps, Engine, EngineConfig, Hlc, Op, RecordState, Value,
};
use proptest::prelude::*;

const NS: &str = "default";

type Records = BTreeMap<(String, String), RecordState>;

fn upsert(key: &str, fields: &[(&str, i64)]) -> Op {
    Op::Upsert {
        collection: "tick".into(),
        key: key.into(),
        hlc: Hlc::default(),
        fields: fields
            .iter()
            .map(|(f, v)| (f.to_string(), Value::from(*v)))
            .collect(),
    }
}

/// The records an engine's stored batches (from its actions) produce.
fn apply(records: &mut Records, actions: &[Action<u32>]) {
    for a in actions {
        if let Action::Store(vb) = a {
            for op in vb.ops.to_vec().unwrap().iter() {
                records
                    .entry((op.collection().to_string(), op.key().to_string()))
                    .or_default()
                    .apply(op, vb.header.author);
            }
        }
    }
    records.retain(|_, r| *r != RecordState::default());
}

fn arb_writes() -> impl Strategy<Value = Vec<Vec<Op>>> {
    let key = prop_oneof![Just("a"), Just("b"), Just("c")];
    let field = prop_oneof![Just("x"), Just("y")];
    let op = prop_oneof![
        (
            key.clone(),
            proptest::collection::vec((field.clone(), -5i64..5), 0..3)
        )
            .prop_map(|(k, f)| {
                let f: Vec<(&str, i64)> = f;
                upsert(k, &f)
            }),
        key.clone().prop_map(|k| Op::Delete {
            collection: "tick".into(),
            key: k.into(),
            hlc: Hlc::default(),
        }),
        (key, field, -3i64..3).prop_map(|(k, f, d)| Op::CounterAdd {
            collection: "tick".into(),
            key: k.into(),
            hlc: Hlc::default(),
            field: f.into(),
            delta: d,
        }),
    ];
    proptest::collection::vec(proptest::collection::vec(op, 1..4), 1..12)
}

proptest! {
    /// Coalesced (with op merging across callers) and one batch per caller: same records.
    #[test]
    fn coalesced_equals_one_batch_per_caller(writes in arb_writes(), now in 1_000u64..2_000) {
        let key = Keypair::from_seed([7; 32]);
        let mut one: Engine<u32> = Engine::new(EngineConfig::default());
        one.join(NS);
        let mut many: Engine<u32> = Engine::new(EngineConfig::default());
        many.join(NS);

        let (mut a, mut b) = (Records::new(), Records::new());
        let mut separate = 0;
        for ops in writes.clone() {
            let (_, actions) = one.write(NS, &key, ops, now).unwrap();
            apply(&mut a, &actions);
            separate += 1;
        }
        let out = many.write_many(NS, &key, writes.clone(), now);
        prop_assert_eq!(out.results.len(), writes.len());
        prop_assert!(out.results.iter().all(|r| *r == Ok(0)), "{:?}", out.results);
        prop_assert_eq!(out.batches.len(), 1);
        prop_assert!(out.batches.len() <= separate);
        apply(&mut b, &out.actions);
        prop_assert_eq!(a, b);
        // The chain goes on from the coalesced batch.
        let (vb, _) = many.write(NS, &key, vec![upsert("a", &[("x", 1)])], now).unwrap();
        prop_assert_eq!(vb.header.seq, 2);
    }
}

/// In an owned namespace with a capability scoped to `tick/`, an out-of-scope caller among
/// good ones gets its own error; the good ones share one batch.
#[test]
fn an_out_of_scope_caller_fails_alone() {
    let owner = Keypair::from_seed([1; 32]);
    let me = Keypair::from_seed([2; 32]);
    let ns = namespace_id(&owner.public());
    let chain = Chain::issue_root(
        &owner,
        &ns,
        &me.public(),
        Rights::Write,
        Some("tick/".into()),
        0,
        None,
        9,
    )
    .unwrap();
    let mut e: Engine<u32> = Engine::new(EngineConfig::default());
    let _ = e.join_owned(&ns, Some(chain));
    let outside = Op::Upsert {
        collection: "other".into(),
        key: "k".into(),
        hlc: Hlc::default(),
        fields: Default::default(),
    };
    let writes = vec![
        vec![upsert("a", &[("x", 1)])],
        vec![outside],
        vec![upsert("b", &[("x", 2)]), upsert("c", &[("x", 3)])],
        vec![Op::Revoke {
            token: "00".repeat(32),
            hlc: Hlc::default(),
        }],
        vec![upsert("d", &[("x", 4)])],
    ];
    let out = e.write_many(&ns, &me, writes, 5_000);
    assert_eq!(out.results[0], Ok(0));
    assert!(
        matches!(out.results[1], Err(BatchError::Unauthorized(_))),
        "{:?}",
        out.results[1]
    );
    assert_eq!(out.results[2], Ok(0));
    // A revocation needs admin rights: refused, alone.
    assert!(
        matches!(out.results[3], Err(BatchError::Unauthorized(_))),
        "{:?}",
        out.results[3]
    );
    assert_eq!(out.results[4], Ok(0));
    assert_eq!(out.batches.len(), 1);
    let ops = out.batches[0].ops.to_vec().unwrap();
    let keys: Vec<&str> = ops.iter().map(|o| o.key()).collect();
    assert_eq!(keys, ["a", "b", "c", "d"]);
    let stores = out
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Store(_)))
        .count();
    assert_eq!(stores, 1);
}

/// Callers are grouped within the per-batch op limit, in order, and a revocation (public
/// namespace: refused) or an oversized caller does not take the others down.
#[test]
fn groups_respect_the_op_limit_and_keep_order() {
    let key = Keypair::from_seed([3; 32]);
    let mut e: Engine<u32> = Engine::new(EngineConfig::default());
    e.join(NS);
    // 60 callers of 200 ops: 12,000 ops > 10,000, so two batches.
    let writes: Vec<Vec<Op>> = (0..60)
        .map(|c| {
            (0..200)
                .map(|i| upsert(&format!("k{c:02}-{i:03}"), &[("x", i)]))
                .collect()
        })
        .collect();
    let mut with_bad = writes.clone();
    with_bad.insert(
        30,
        vec![Op::Revoke {
            token: "ab".repeat(32),
            hlc: Hlc::default(),
        }],
    );
    with_bad.insert(10, Vec::new());
    let out = e.write_many(NS, &key, with_bad, 1_000);
    assert!(out.results[10].is_err(), "an empty write fails");
    assert!(
        matches!(out.results[31], Err(BatchError::Unauthorized(_))),
        "{:?}",
        out.results[31]
    );
    let ok: Vec<usize> = out.results.iter().filter_map(|r| r.clone().ok()).collect();
    assert_eq!(ok.len(), 60);
    assert!(
        ok.windows(2).all(|w| w[0] <= w[1]),
        "batches follow caller order"
    );
    assert!(
        out.batches.len() >= 2 && out.batches.len() <= 3,
        "{}",
        out.batches.len()
    );
    for b in &out.batches {
        assert!(b.ops.len() <= blazedb_protocol::limits::MAX_OPS_PER_BATCH);
    }
    for w in out.batches.windows(2) {
        assert_eq!(w[1].header.seq, w[0].header.seq + 1);
        assert!(w[1].header.hlc_min > w[0].header.hlc_max);
    }
    let total: usize = out.batches.iter().map(|b| b.ops.len()).sum();
    assert_eq!(total, 12_000);
}

/// A large call encoded ahead on its writer's task that pruning shrank to a size the planner
/// groups with other callers: its payload is not used (the group is encoded as one), its
/// provisional stamps are replaced, and the records read as on the plain path.
#[test]
fn a_call_encoded_ahead_then_grouped_is_sealed_like_any_other() {
    let key = Keypair::from_seed([7; 32]);
    let now = 1_800_000_000_000;
    // 300 upserts of 100 records: pruned to 100 ops on the writer's task.
    let big: Vec<Op> = (0..300)
        .map(|i| upsert(&format!("k{}", i % 100), &[("x", i)]))
        .collect();
    let small = vec![upsert("z", &[("y", 1)])];
    let mut early = CheckedOps::new(big.clone()).unwrap();
    early.encode_ahead();
    assert_eq!(early.len(), 100);

    let mut ahead: Engine<u32> = Engine::new(EngineConfig::default());
    ahead.join(NS);
    let out = ahead.write_many_checked(
        NS,
        &key,
        vec![early, CheckedOps::new(small.clone()).unwrap()],
        now,
    );
    assert!(out.results.iter().all(|r| *r == Ok(0)), "{:?}", out.results);
    assert_eq!(out.batches.len(), 1, "grouped");
    let mut plain: Engine<u32> = Engine::new(EngineConfig::default());
    plain.join(NS);
    let out2 = plain.write_many(NS, &key, vec![big, small], now);
    assert_eq!(out2.batches.len(), 2, "300 ops are sealed alone there");

    let (mut a, mut b) = (Records::new(), Records::new());
    apply(&mut a, &out.actions);
    apply(&mut b, &out2.actions);
    let visible =
        |r: &Records| -> Vec<_> { r.iter().map(|(k, s)| (k.clone(), s.visible())).collect() };
    assert_eq!(a.len(), 101);
    assert_eq!(visible(&a), visible(&b));
    // Real stamps, not provisional ones.
    let hlc_max = out.batches[0].header.hlc_max;
    assert!(
        hlc_max.wall_ms() >= now && hlc_max.wall_ms() < now + 1_000,
        "{hlc_max:?}"
    );
}
