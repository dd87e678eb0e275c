//! Several real nodes on loopback, each writing: all reach the same state.

use std::time::Duration;

use blazedb_tests::{eventually, obj, snapshot, start_node, wait_peers};
use serde_json::json;

/// Three nodes in a line (B and C dial A); each writes its own records and they all overwrite
/// and delete shared ones concurrently. Every replica ends identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_each_writing_converge() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let a_addr = a.listen_addrs()[0].clone();
    let b = start_node(&dir.path().join("b"), std::slice::from_ref(&a_addr))
        .await
        .unwrap();
    let c = start_node(&dir.path().join("c"), &[a_addr]).await.unwrap();
    wait_peers(&a, 2).await;

    let nodes = [a.clone(), b.clone(), c.clone()];
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..40 {
                n.put(
                    "default",
                    "items",
                    &format!("own-{i}-{j}"),
                    obj(json!({"by": i, "j": j})),
                )
                .await
                .unwrap();
                // Shared keys: all three write the same records concurrently.
                n.put(
                    "default",
                    "items",
                    &format!("shared-{}", j % 5),
                    obj(json!({"by": i, "j": j})),
                )
                .await
                .unwrap();
                if j % 10 == 9 {
                    n.delete("default", "items", &format!("shared-{}", j % 3))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // 3 × (40 + 40 + 4) batches written in all; wait until every node holds all of them.
    let expected_batches = 3 * (40 + 40 + 4);
    for n in &nodes {
        eventually(
            "all batches everywhere",
            Duration::from_secs(60),
            || async {
                let (batches, _) = n.counts().ok()?;
                (batches == expected_batches).then_some(())
            },
        )
        .await;
    }
    let sa = snapshot(&a, "items");
    assert_eq!(sa, snapshot(&b, "items"), "A and B differ");
    assert_eq!(sa, snapshot(&c, "items"), "A and C differ");
    // Own records of every writer are present on every node.
    assert_eq!(
        sa.iter().filter(|(k, _)| k.starts_with("own-")).count(),
        120
    );
    // Identical version vectors.
    let heads = |s: blazedb_node::Status| s.namespaces[0].heads.clone();
    let ha = heads(a.status().await.unwrap());
    assert_eq!(ha.len(), 3);
    assert_eq!(ha, heads(b.status().await.unwrap()));
    assert_eq!(ha, heads(c.status().await.unwrap()));
    for n in nodes {
        n.shutdown().await;
    }
}

/// Calls built as payloads (`OpsBuilder`, `NodeHandle::write_built`) replicate like any
/// other: A writes large calls whose records repeat (pruned as payloads) and a small one
/// (grouped); B, over a real link, ends with A's records, and those are exactly what a third
/// node that wrote the same ops as `Vec<Op>` holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_built_as_payloads_replicate_as_owned_ops_would() {
    use blazedb_node::{FieldValue, OpsBuilder};
    use blazedb_protocol::{Hlc, Op};

    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let b = start_node(&dir.path().join("b"), &[a.listen_addrs()[0].clone()])
        .await
        .unwrap();
    let c = start_node(&dir.path().join("c"), &[]).await.unwrap();
    wait_peers(&a, 1).await;

    // (key, kind, value): upserts of one or two fields, deletes, counter adds, over few
    // enough records that many repeat within a call.
    let call = |seed: u64, n: u64| -> Vec<(String, u64, i64)> {
        (0..n)
            .map(|i| {
                let x = (seed * 7919 + i * 104_729) % 1_000_003;
                (format!("k{}", x % 400), x % 5, (x % 97) as i64)
            })
            .collect()
    };
    let calls = [call(1, 900), call(2, 40), call(3, 2_000)];
    for ops in &calls {
        let mut built = OpsBuilder::new();
        let mut owned = Vec::new();
        for (key, kind, v) in ops {
            let hlc = Hlc(0);
            let (collection, key) = ("items".to_string(), key.clone());
            match kind {
                0 | 1 => {
                    let f = [("a", FieldValue::Int(*v)), ("b", FieldValue::Str("x"))];
                    let fields = &f[..*kind as usize + 1];
                    built.upsert(&collection, &key, fields).unwrap();
                    let fields = [("a", json!(v)), ("b", json!("x"))][..*kind as usize + 1]
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.clone()))
                        .collect();
                    owned.push(Op::Upsert {
                        collection,
                        key,
                        hlc,
                        fields,
                    });
                }
                2 => {
                    built.delete(&collection, &key).unwrap();
                    owned.push(Op::Delete {
                        collection,
                        key,
                        hlc,
                    });
                }
                _ => {
                    built.add(&collection, &key, "n", *v).unwrap();
                    owned.push(Op::CounterAdd {
                        collection,
                        key,
                        hlc,
                        field: "n".into(),
                        delta: *v,
                    });
                }
            }
        }
        let receipt = a.write_built("default", built).await.unwrap();
        c.write("default", owned).await.unwrap();
        assert!(receipt.ops <= ops.len());
    }
    assert!(
        a.write_built("default", OpsBuilder::new()).await.is_err(),
        "an empty call is refused"
    );
    eventually("A's batches at B", Duration::from_secs(30), || async {
        let (batches, _) = b.counts().ok()?;
        (batches == calls.len() as u64).then_some(())
    })
    .await;
    let sa = snapshot(&a, "items");
    assert!(sa.len() > 300, "most of the 400 records are live");
    assert_eq!(sa, snapshot(&b, "items"), "B replicated A");
    assert_eq!(sa, snapshot(&c, "items"), "the same ops as Vec<Op>");
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// Large calls are compressed on their writers' tasks (the ops frame, at the level the node
/// last chose) and the node seals them with those frames; the two-frame payloads verify and
/// replicate over a real link. Long random-letter values make a level below the strong one
/// win the node's probe (matches save too little), so every call after the first is taken
/// only if the writer followed the level the node published after that probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_calls_compressed_by_their_writers_replicate() {
    use blazedb_node::{FieldValue, OpsBuilder};
    use std::sync::atomic::Ordering::Relaxed;

    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let b = start_node(&dir.path().join("b"), &[a.listen_addrs()[0].clone()])
        .await
        .unwrap();
    wait_peers(&a, 1).await;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut letters = |n: usize| -> String { (0..n).map(|_| rng.gen_range('a'..='z')).collect() };
    let calls = 4u64;
    for _ in 0..calls {
        let mut built = OpsBuilder::new();
        for _ in 0..1_200 {
            let (k, v) = (letters(16), letters(300));
            built
                .upsert("items", &k, &[("v", FieldValue::Str(&v))])
                .unwrap();
        }
        a.write_built("default", built).await.unwrap();
    }
    let taken = || a.metrics().writer_compressed_sealed.load(Relaxed);
    eventually("writers' frames taken", Duration::from_secs(10), || async {
        (taken() >= calls - 2).then_some(())
    })
    .await;
    assert!(taken() <= calls);
    assert!(a.metrics().fast_compressed_sealed.load(Relaxed) >= calls - 2);
    eventually("A's batches at B", Duration::from_secs(30), || async {
        let (batches, _) = b.counts().ok()?;
        (batches == calls).then_some(())
    })
    .await;
    let sa = snapshot(&a, "items");
    assert_eq!(sa.len(), (calls * 1_200) as usize);
    assert_eq!(sa, snapshot(&b, "items"), "B replicated A");
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// Large batches in a public namespace go around gossipsub: A pushes each to B over a sync
/// stream, B pushes it on to C (A – B – C in a line: every link on the push tree). No gossip
/// message carries them (gossip still carries small writes), and all three end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_travel_around_gossip_over_a_line_of_nodes() {
    use blazedb_node::{FieldValue, OpsBuilder};
    use rand::{Rng, SeedableRng};

    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let b = start_node(&dir.path().join("b"), &[a.listen_addrs()[0].clone()])
        .await
        .unwrap();
    let c = start_node(&dir.path().join("c"), &[b.listen_addrs()[0].clone()])
        .await
        .unwrap();
    wait_peers(&b, 2).await;
    // Gossip is live from A through B to C: a small write reaches C as a gossip message.
    let mut probe = 0u64;
    eventually("a gossiped probe at C", Duration::from_secs(30), || {
        probe += 1;
        let (a, c) = (a.clone(), c.clone());
        async move {
            let fields = obj(json!({"n": probe}));
            a.put("default", "probe", &format!("p{probe}"), fields)
                .await
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while std::time::Instant::now() < deadline {
                if c.gossip_received().1 > 0 {
                    return Some(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }
    })
    .await;
    let gossip_before = [b.gossip_received().1, c.gossip_received().1];

    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut letters = |n: usize| -> String { (0..n).map(|_| rng.gen_range('a'..='z')).collect() };
    let calls = 3;
    for _ in 0..calls {
        let mut built = OpsBuilder::new();
        for _ in 0..1_200 {
            let (k, v) = (letters(16), letters(300));
            built
                .upsert("large", &k, &[("v", FieldValue::Str(&v))])
                .unwrap();
        }
        a.write_built("default", built).await.unwrap();
    }
    let (a_batches, _) = a.counts().unwrap();
    eventually("A's batches at C", Duration::from_secs(30), || async {
        let (batches, _) = c.counts().ok()?;
        (batches == a_batches).then_some(())
    })
    .await;
    let sa = snapshot(&a, "large");
    assert_eq!(sa.len(), 3 * 1_200);
    assert_eq!(sa, snapshot(&b, "large"), "B replicated A");
    assert_eq!(sa, snapshot(&c, "large"), "C replicated A");
    // Earlier probes that missed the mesh may still come through gossip's IHAVE/IWANT.
    for (n, before) in [&b, &c].into_iter().zip(gossip_before) {
        let new = n.gossip_received().1 - before;
        assert!(
            new < probe,
            "{new} new gossip messages after {probe} probes: large batches went by gossip"
        );
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// What a reader has counted in the log, it then finds in the records: while one task
/// writes single-record batches, a reader that counts the node's batches and then lists
/// its records always finds at least one record per batch counted. (A batch used to be
/// counted as handed to the materializer only after its commit, so a reader that saw it in
/// the log could list the records before they held it: CI once caught a replica's records
/// a batch short of the batches it had just counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_hold_every_batch_a_reader_has_counted() {
    read_after_counting(|a, counted| {
        let held = a.list("default", "items", "", 100_000).unwrap().len() as u64;
        assert!(
            held >= counted,
            "{counted} batches counted, {held} records listed"
        );
        held
    })
    .await;
}

/// The same for a point read, which joins the batches committed and not yet in the records
/// instead of waiting for them: after counting `n` batches, the `n`th write's record is
/// there (each batch holds at least the next write, in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_finds_every_batch_a_reader_has_counted() {
    read_after_counting(|a, counted| {
        if counted == 0 {
            return 0;
        }
        let key = format!("k{:05}", counted - 1);
        let found = a.get("default", "items", &key).unwrap();
        assert!(
            found.is_some(),
            "{counted} batches counted, {key} not found"
        );
        // Done once the last write is counted and found.
        if counted >= READ_AFTER_COUNTING_WRITES {
            READ_AFTER_COUNTING_WRITES
        } else {
            0
        }
    })
    .await;
}

const READ_AFTER_COUNTING_WRITES: u64 = 1_500;

/// While a task writes [`READ_AFTER_COUNTING_WRITES`] puts of a new record each, a reader
/// counts the node's batches (beyond those it started with) and calls `read` with the count,
/// until `read` returns at least the number of writes (records it found).
async fn read_after_counting(read: fn(&blazedb_node::NodeHandle, u64) -> u64) {
    const WRITES: u64 = READ_AFTER_COUNTING_WRITES;
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    // The log's batches, counted without waiting for the records (`counts` would).
    let batches = |a: &blazedb_node::NodeHandle| a.counts_bounded().unwrap().0;
    let base = batches(&a);
    let writer = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                a.put(
                    "default",
                    "items",
                    &format!("k{i:05}"),
                    obj(json!({ "i": i })),
                )
                .await
                .unwrap();
            }
        })
    };
    let reader = {
        let a = a.clone();
        tokio::task::spawn_blocking(move || {
            let mut reads = 0u64;
            loop {
                let counted = batches(&a) - base;
                reads += 1;
                if read(&a, counted) >= WRITES {
                    return reads;
                }
            }
        })
    };
    writer.await.unwrap();
    let reads = reader.await.unwrap();
    assert!(reads > 1, "the reader read while the writer wrote");
    a.shutdown().await;
}
