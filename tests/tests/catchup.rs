//! Striped catch-up over real sockets: a node that missed many batches catches up with
//! several fetch windows in flight per author, from two peers, while live writes keep
//! arriving, and ends with exactly the records and version vector of its sources.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use blazedb_node::{Node, NodeHandle};
use blazedb_protocol::EngineConfig;
use blazedb_tests::wait_peers;
use blazedb_tests::{eventually, fast_engine, init_logs, loopback, obj, snapshot, start_node};
use serde_json::json;

/// Batches the catching-up node misses (one record each), well over one fetch window.
const MISSED: usize = 300;
/// Live writes at each source while the catch-up runs.
const LIVE: usize = 20;

async fn heads(node: &NodeHandle) -> BTreeMap<String, u64> {
    let s = node.status().await.expect("status");
    s.namespaces
        .into_iter()
        .find(|n| n.name == "default")
        .map(|n| n.heads)
        .unwrap_or_default()
}

/// Starts the sources: A, and C connected to it. Returns them and A's address.
async fn sources(dir: &std::path::Path) -> (NodeHandle, NodeHandle, libp2p::Multiaddr) {
    init_logs();
    let a = start_node(&dir.join("a"), &[]).await.unwrap();
    let a_addr = a.listen_addrs()[0].clone();
    let c = start_node(&dir.join("c"), std::slice::from_ref(&a_addr))
        .await
        .unwrap();
    (a, c, a_addr)
}

/// Waits until `b` holds the vector `want` and, once materialized, exactly `a`'s records of
/// each collection.
async fn holds_what_a_holds(
    b: &NodeHandle,
    a: &NodeHandle,
    want: &BTreeMap<String, u64>,
    collections: &[&str],
) {
    eventually(
        "B to hold every batch",
        Duration::from_secs(120),
        || async { (heads(b).await == *want).then_some(()) },
    )
    .await;
    for coll in collections {
        let expect = snapshot(a, coll);
        eventually(
            &format!("B's {coll} records to match A's"),
            Duration::from_secs(60),
            || async { (snapshot(b, coll) == expect).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn striped_catch_up_ends_with_the_sources_state_while_live_writes_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c, a_addr) = sources(dir.path()).await;
    let c_addr = c.listen_addrs()[0].clone();
    wait_peers(&a, 1).await;

    // B is not running: it misses all of this (A's chain, and some of C's).
    for i in 0..MISSED {
        a.put("default", "docs", &format!("a-{i}"), obj(json!({"v": i})))
            .await
            .unwrap();
        if i % 10 == 0 {
            c.put("default", "docs", &format!("c-{i}"), obj(json!({"v": i})))
                .await
                .unwrap();
        }
    }
    // Overwrites and deletes among the missed batches.
    a.put("default", "docs", "a-0", obj(json!({"v": "overwritten"})))
        .await
        .unwrap();
    c.delete("default", "docs", "a-1").await.unwrap();
    eventually("C to hold A's chain", Duration::from_secs(60), || async {
        (heads(&c).await == heads(&a).await).then_some(())
    })
    .await;

    // B catches up with small windows, so that many stripes are needed, from A and C.
    let b = Node::builder()
        .data_dir(dir.path().join("b"))
        .listen(vec![loopback()])
        .mdns(false)
        .engine(EngineConfig {
            fetch_window: 8,
            ..fast_engine()
        })
        .fetch_stripes(4)
        .bootstrap(a_addr)
        .bootstrap(c_addr)
        .spawn()
        .await
        .unwrap();
    // Live writes on both sources while B catches up.
    for i in 0..LIVE {
        a.put("default", "live", &format!("a-{i}"), obj(json!({"v": i})))
            .await
            .unwrap();
        c.put("default", "live", &format!("c-{i}"), obj(json!({"v": i})))
            .await
            .unwrap();
    }

    let total = MISSED + 1 + MISSED / 10 + 1 + 2 * LIVE;
    let want = eventually("A and C to agree", Duration::from_secs(60), || async {
        let h = heads(&a).await;
        (h == heads(&c).await && h.values().sum::<u64>() as usize == total).then_some(h)
    })
    .await;
    holds_what_a_holds(&b, &a, &want, &["docs", "live"]).await;
    assert_eq!(heads(&c).await, want, "C's vector differs");
    for coll in ["docs", "live"] {
        assert_eq!(
            snapshot(&c, coll),
            snapshot(&a, coll),
            "C's {coll} records differ"
        );
    }
    assert_eq!(snapshot(&b, "docs").len(), MISSED + MISSED / 10 - 1);
    assert_eq!(snapshot(&b, "live").len(), 2 * LIVE);
    let m = b.metrics();
    assert_eq!(m.rejected.load(Relaxed), 0);
    let served = a.metrics().served_bytes.load(Relaxed) + c.metrics().served_bytes.load(Relaxed);
    assert!(served > 0, "nothing was served by fetch");

    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// Large batches written while B was away (~7 MB of them, served in answers of several MiB,
/// which B's log committer splits into bounded transactions), with small live writes from a
/// third node arriving meanwhile (light groups, which may be committed ahead of the catch-up's
/// heavy ones): B ends with its sources' records and vector, and its log re-verifies whole,
/// every chain contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_catch_up_beside_live_writes_leaves_a_whole_log() {
    use rand::{Rng, SeedableRng};
    const LARGE: usize = 40;
    const SMALL_MIN: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let (a, c, a_addr) = sources(dir.path()).await;
    wait_peers(&a, 1).await;

    // ~180 KB per batch once compressed: four fields of 60,000 characters of 64 kinds.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for i in 0..LARGE {
        let mut fields = serde_json::Map::new();
        for f in 0..4 {
            let text: String = (0..60_000)
                .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
                .collect();
            fields.insert(format!("f{f}"), text.into());
        }
        a.put("default", "big", &format!("b-{i}"), fields)
            .await
            .unwrap();
    }
    eventually("C to hold A's chain", Duration::from_secs(60), || async {
        (heads(&c).await == heads(&a).await).then_some(())
    })
    .await;
    let before = a.metrics().local_bytes.load(Relaxed);
    assert!(before > 6_000_000, "A wrote only {before} bytes");

    let b = Node::builder()
        .data_dir(dir.path().join("b"))
        .listen(vec![loopback()])
        .mdns(false)
        .engine(fast_engine())
        .fetch_stripes(4)
        .bootstrap(a_addr)
        .spawn()
        .await
        .unwrap();
    // C writes small batches throughout B's catch-up: they reach B through A as live gossip.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while n < SMALL_MIN || !stop.load(Relaxed) {
                c.put("default", "live", &format!("c-{n}"), obj(json!({"v": n})))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    let a_key = blazedb_identity::PublicKey::from_did(&a.did()).unwrap();
    eventually("B to hold A's chain", Duration::from_secs(120), || async {
        (b.durable_head("default", &a_key) == Some(LARGE as u64)).then_some(())
    })
    .await;
    stop.store(true, Relaxed);
    let small = writer.await.unwrap();
    let want = eventually("A and C to agree", Duration::from_secs(60), || async {
        let h = heads(&a).await;
        (h == heads(&c).await && h.values().sum::<u64>() as usize == LARGE + small).then_some(h)
    })
    .await;
    holds_what_a_holds(&b, &a, &want, &["big", "live"]).await;
    assert_eq!(snapshot(&b, "big").len(), LARGE);
    assert_eq!(snapshot(&b, "live").len(), small);
    assert_eq!(b.metrics().rejected.load(Relaxed), 0);
    assert!(
        a.metrics().served_bytes.load(Relaxed) > 6_000_000,
        "the large batches were not served by fetch"
    );

    for n in [a, b, c] {
        n.shutdown().await;
    }
    let path = dir.path().join("b").join("store.redb");
    let store = eventually("B's store to be released", Duration::from_secs(20), || {
        let opened = blazedb_node::store::Store::open(&path).ok();
        async move { opened }
    })
    .await;
    assert_eq!(
        store.check().expect("B's log verifies"),
        (LARGE + small) as u64
    );
}
