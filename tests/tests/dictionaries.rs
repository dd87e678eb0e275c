//! zstd dictionaries over real sockets: a node writing many small batches trains dictionaries
//! and seals with them; a node started later catches up (fetching the dictionaries its
//! batches name), then follows live writes by gossip across a new dictionary, and ends with
//! exactly the writer's records; both logs re-verify from their own stored dictionaries.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use blazedb_node::store::Store;
use blazedb_node::{DictPolicy, Node, NodeHandle};
use blazedb_tests::{eventually, fast_engine, init_logs, loopback, obj, snapshot, wait_peers};
use serde_json::json;

/// Small enough thresholds that the test trains twice before B starts and once more while B
/// follows by gossip.
fn policy() -> DictPolicy {
    DictPolicy {
        first_after: 100,
        retrain_after: 150,
        min_sample_bytes: 4 * 1024,
        ..DictPolicy::default()
    }
}

async fn start(dir: &std::path::Path, bootstrap: &[libp2p::Multiaddr]) -> NodeHandle {
    init_logs();
    let mut b = Node::builder()
        .data_dir(dir)
        .listen(vec![loopback()])
        .mdns(false)
        .engine(fast_engine())
        .dicts(policy());
    for a in bootstrap {
        b = b.bootstrap(a.clone());
    }
    b.spawn().await.unwrap()
}

/// One single-op write, game-like: a player's position and state.
async fn move_player(node: &NodeHandle, i: usize) {
    let fields = obj(json!({
        "x": (i * 37) % 1000,
        "y": (i * 91) % 1000,
        "name": format!("player-{}", i % 20),
        "team": (["red", "blue"][i % 2]),
        "state": "running",
    }));
    node.put("default", "players", &format!("p{}", i % 20), fields)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batches_with_dictionaries_catch_up_and_gossip_to_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), &[]).await;
    // Each put is awaited before the next: every batch holds one op (sealed at once).
    for i in 0..400 {
        move_player(&a, i).await;
    }
    let am = a.metrics();
    assert!(
        am.dicts_trained.load(Relaxed) >= 2,
        "A trained no dictionary"
    );
    let sealed_with_dict = am.dict_batches_sealed.load(Relaxed);
    assert!(
        sealed_with_dict >= 100,
        "only {sealed_with_dict} batches used a dictionary"
    );

    // B starts later and catches up through fetches: the dictionaries come on request.
    let b = start(&dir.path().join("b"), &[a.listen_addrs()[0].clone()]).await;
    wait_peers(&b, 1).await;
    eventually("B to catch up", Duration::from_secs(60), || async {
        (snapshot(&b, "players") == snapshot(&a, "players")).then_some(())
    })
    .await;
    let bm = b.metrics();
    let fetched = bm.dicts_received.load(Relaxed);
    assert!(fetched >= 2, "B received {fetched} dictionaries");
    let caught_up = bm.dict_batches_stored.load(Relaxed);
    assert_eq!(caught_up, sealed_with_dict);

    // Live writes while connected: gossiped, across a dictionary B has not seen yet.
    for i in 400..600 {
        move_player(&a, i).await;
    }
    eventually("B to follow by gossip", Duration::from_secs(60), || async {
        (b.metrics().dict_batches_stored.load(Relaxed)
            == a.metrics().dict_batches_sealed.load(Relaxed)
            && snapshot(&b, "players") == snapshot(&a, "players"))
        .then_some(())
    })
    .await;
    assert!(a.metrics().dicts_trained.load(Relaxed) >= 3);
    assert!(b.metrics().dicts_received.load(Relaxed) > fetched);
    assert_eq!(b.metrics().rejected.load(Relaxed), 0);
    assert_eq!(a.metrics().rejected.load(Relaxed), 0);

    a.shutdown().await;
    b.shutdown().await;
    drop((a, b));
    // Both logs re-verify every batch with the dictionaries stored next to them.
    for node in ["a", "b"] {
        let path = dir.path().join(node).join("store.redb");
        let store = eventually("the store to be released", Duration::from_secs(20), || {
            let opened = Store::open(&path).ok();
            async move { opened }
        })
        .await;
        assert_eq!(store.check().unwrap(), 600, "{node}'s log");
        assert!(store.dicts().unwrap().len() >= 3, "{node}'s dictionaries");
    }
}
