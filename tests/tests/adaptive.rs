//! Adaptive batching with real nodes: many concurrent small writers end up in fewer batches
//! than writes, every write is readable once acknowledged, a bad write among good ones fails
//! alone, and a second node converges to the same state.

use std::time::Duration;

use blazedb_node::NodeError;
use blazedb_protocol::capability::Rights;
use blazedb_tests::{eventually, metric, obj, serve_api, snapshot, start_node, wait_peers};
use serde_json::json;

/// 64 HTTP clients PUT single-op records concurrently; one more client sends a revocation
/// to the public namespace (forbidden) in the middle of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http_writers_share_batches_and_converge() {
    const CLIENTS: usize = 64;
    const PUTS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let b = start_node(&dir.path().join("b"), &a.listen_addrs())
        .await
        .unwrap();
    wait_peers(&a, 1).await;
    let base = serve_api(&a).await;
    let http = reqwest::Client::new();

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, base, a) = (http.clone(), base.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PUTS {
                let key = format!("c{c:02}-{i:02}");
                let resp = http
                    .put(format!("{base}/v1/ns/default/tick/{key}"))
                    .json(&json!({"c": c, "i": i}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
                // Readable as soon as acknowledged.
                let got = a
                    .get("default", "tick", &key)
                    .unwrap()
                    .expect("acked write");
                assert_eq!(got["i"], json!(i));
            }
        }));
    }
    let bad = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..4 {
                let resp = http
                    .post(format!("{base}/v1/ns/default/revocations"))
                    .json(&json!({"token_id": "ab".repeat(32)}))
                    .send()
                    .await
                    .unwrap();
                codes.push(resp.status().as_u16());
            }
            codes
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let codes = bad.await.unwrap();
    assert!(codes.iter().all(|&c| c == 403), "{codes:?}");

    let writes = (CLIENTS * PUTS) as u64;
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sealed = metric(&text, "blazedb_batches_sealed_total");
    let ops = metric(&text, "blazedb_ops_sealed_total");
    assert_eq!(metric(&text, "blazedb_writes_total"), writes);
    assert_eq!(ops, writes, "distinct keys: nothing to merge");
    eprintln!("{sealed} batches sealed for {writes} HTTP writes");
    assert!(
        sealed >= 1 && sealed < writes,
        "{sealed} batches for {writes} writes"
    );

    // The second node converges to the same records.
    let want = snapshot(&a, "tick");
    assert_eq!(want.len(), CLIENTS * PUTS);
    eventually("b to hold every write", Duration::from_secs(30), || async {
        (snapshot(&b, "tick") == want).then_some(())
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// In an owned namespace with a write capability scoped to `tick/`, concurrent writers inside
/// the scope succeed (sharing batches) while the out-of-scope writers among them are refused
/// one by one; the owner converges to exactly the good writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_write_among_coalesced_ones_fails_alone() {
    const WRITERS: usize = 48;
    const PUTS: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let owner = start_node(&dir.path().join("owner"), &[]).await.unwrap();
    let writer = start_node(&dir.path().join("writer"), &owner.listen_addrs())
        .await
        .unwrap();
    wait_peers(&owner, 1).await;
    let ns = owner.create_namespace().await.unwrap();
    let to = blazedb_identity::PublicKey::from_did(&writer.did()).unwrap();
    let inv = owner
        .invite(&ns, to, Rights::Write, Some("tick/".into()), None)
        .await
        .unwrap();
    writer.join(&inv.token).await.unwrap();

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (writer, ns) = (writer.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..PUTS {
                // Every 8th writer also writes outside its scope, interleaved.
                if w % 8 == 0 {
                    let err = writer
                        .put(&ns, "other", &format!("w{w}-{i}"), obj(json!({"i": i})))
                        .await
                        .unwrap_err();
                    assert!(matches!(err, NodeError::Forbidden(_)), "{err}");
                    refused += 1;
                }
                let key = format!("w{w:02}-{i:02}");
                writer
                    .put(&ns, "tick", &key, obj(json!({"i": i})))
                    .await
                    .unwrap();
                let got = writer.get(&ns, "tick", &key).unwrap().expect("acked write");
                assert_eq!(got["i"], json!(i));
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await.unwrap();
    }
    assert_eq!(refused, (WRITERS / 8) * PUTS);
    let good = (WRITERS * PUTS) as u64;
    let m = writer.metrics();
    let sealed = m.batches_sealed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        m.writes_acked.load(std::sync::atomic::Ordering::Relaxed),
        good
    );
    eprintln!("{sealed} batches sealed for {good} good writes");
    assert!(sealed < good, "{sealed} batches for {good} writes");
    assert!(writer.list(&ns, "other", "", 10).unwrap().is_empty());

    let want = writer.list(&ns, "tick", "", 10_000).unwrap();
    assert_eq!(want.len(), WRITERS * PUTS);
    eventually(
        "the owner to hold every good write",
        Duration::from_secs(30),
        || async { (owner.list(&ns, "tick", "", 10_000).ok()? == want).then_some(()) },
    )
    .await;
    assert!(owner.list(&ns, "other", "", 10).unwrap().is_empty());
    owner.shutdown().await;
    writer.shutdown().await;
}
