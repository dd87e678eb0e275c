//! An in-process mesh of real nodes (the real node code over loopback TCP): every write
//! reaches every node across several hops (gossip, or anti-entropy while meshes form), and
//! gossipsub's wire counters agree with the simulator's model on a graph without cycles: no
//! duplicate copies. (Larger meshes are compared with the simulator in `blazedb bench` B5.)

use std::time::Duration;

use blazedb_tests::{eventually, obj, snapshot, start_node, wait_peers};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_node_line_mesh_converges_by_gossip() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for i in 0..10 {
        // A line: node i dials node i-1 only, so writes must hop across the mesh.
        let boot = match nodes.last() {
            Some(prev) => blazedb_node::NodeHandle::listen_addrs(prev),
            None => Vec::new(),
        };
        nodes.push(
            start_node(&dir.path().join(format!("n{i}")), &boot)
                .await
                .unwrap(),
        );
    }
    for n in &nodes[1..] {
        wait_peers(n, 1).await;
    }
    for (i, n) in nodes.iter().enumerate().step_by(3) {
        n.put(
            "default",
            "mesh",
            &format!("from-{i}"),
            obj(json!({"i": i})),
        )
        .await
        .unwrap();
    }
    eventually(
        "every write on every node",
        Duration::from_secs(60),
        || async {
            let want = snapshot(&nodes[9], "mesh");
            (want.len() == 4 && nodes.iter().all(|n| snapshot(n, "mesh") == want)).then_some(())
        },
    )
    .await;
    // The line has no cycles: flooding sends nobody a second copy, and gossipsub agrees.
    let (all, new): (u64, u64) = nodes
        .iter()
        .map(|n| n.gossip_received())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(all, new, "duplicate copies on an acyclic mesh");
    for n in nodes {
        n.shutdown().await;
    }
}
