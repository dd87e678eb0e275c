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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn striped_catch_up_ends_with_the_sources_state_while_live_writes_arrive() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let a_addr = a.listen_addrs()[0].clone();
    let c = start_node(&dir.path().join("c"), std::slice::from_ref(&a_addr))
        .await
        .unwrap();
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
    eventually(
        "B to hold every batch",
        Duration::from_secs(120),
        || async { (heads(&b).await == want).then_some(()) },
    )
    .await;
    assert_eq!(heads(&c).await, want, "C's vector differs");
    // The records, once materialized, are the sources' exactly.
    for coll in ["docs", "live"] {
        let expect = snapshot(&a, coll);
        eventually(
            &format!("B's {coll} records to match A's"),
            Duration::from_secs(60),
            || async { (snapshot(&b, coll) == expect).then_some(()) },
        )
        .await;
        assert_eq!(snapshot(&c, coll), expect, "C's {coll} records differ");
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
