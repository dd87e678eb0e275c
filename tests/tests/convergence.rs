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
