//! Crash/restart: a node stopped, written around, restarted from its data directory keeps
//! its data and catches up on what it missed.

use std::time::Duration;

use blazedb_tests::{eventually, metric, obj, serve_api, snapshot, start_node, wait_peers};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_data_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let a_addr = a.listen_addrs()[0].clone();
    let c_dir = dir.path().join("c");
    let c = start_node(&c_dir, std::slice::from_ref(&a_addr))
        .await
        .unwrap();
    let c_did = c.did();
    wait_peers(&a, 1).await;

    for i in 0..20 {
        c.put("default", "docs", &format!("c-{i}"), obj(json!({"v": i})))
            .await
            .unwrap();
    }
    a.put("default", "docs", "from-a-before", obj(json!({"v": "a"})))
        .await
        .unwrap();
    eventually(
        "C to receive A's first write",
        Duration::from_secs(30),
        || async { c.get("default", "docs", "from-a-before").ok()?.map(|_| ()) },
    )
    .await;

    // Stop C; drop every handle so its files are closed.
    c.shutdown().await;
    drop(c);

    // Written around C: many batches, more than one fetch window, plus an overwrite and a
    // delete of records C holds.
    for i in 0..150 {
        a.put(
            "default",
            "docs",
            &format!("missed-{i}"),
            obj(json!({"v": i})),
        )
        .await
        .unwrap();
    }
    a.put("default", "docs", "c-0", obj(json!({"v": "overwritten"})))
        .await
        .unwrap();
    a.delete("default", "docs", "c-1").await.unwrap();

    // Restart from the same directory: same identity, same data.
    let c = start_node(&c_dir, &[a_addr]).await.unwrap();
    assert_eq!(c.did(), c_did, "identity must survive a restart");
    assert!(
        c.get("default", "docs", "c-5").unwrap().is_some(),
        "own data lost on restart"
    );

    eventually("C to catch up", Duration::from_secs(60), || async {
        (snapshot(&c, "docs") == snapshot(&a, "docs")).then_some(())
    })
    .await;
    assert_eq!(
        c.get("default", "docs", "c-0").unwrap().unwrap()["v"],
        "overwritten"
    );
    assert!(c.get("default", "docs", "c-1").unwrap().is_none());
    assert_eq!(c.counts().unwrap().0, a.counts().unwrap().0);

    // And C's own chain continues where it left off after the restart.
    let r = c
        .put("default", "docs", "after-restart", obj(json!({"v": 1})))
        .await
        .unwrap();
    assert_eq!(r.seq, 21);
    eventually(
        "A to see C's post-restart write",
        Duration::from_secs(30),
        || async { a.get("default", "docs", "after-restart").ok()?.map(|_| ()) },
    )
    .await;
    a.shutdown().await;
    c.shutdown().await;
}

/// `durable_head` reports what the log holds, read without the actor: the writer's own seq as
/// soon as a write is acknowledged, a peer's once its batches are stored, nothing for an
/// author never seen, and the same after a restart (loaded from the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_heads_follow_the_log_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let b_dir = dir.path().join("b");
    let b = start_node(&b_dir, &a.listen_addrs()).await.unwrap();
    wait_peers(&a, 1).await;
    let a_key = blazedb_identity::PublicKey::from_did(&a.did()).unwrap();
    let stranger = blazedb_identity::Keypair::from_seed([42; 32]).public();
    assert_eq!(a.durable_head("default", &a_key), None);

    let mut last = 0;
    for i in 0..5 {
        let r = a
            .put("default", "heads", &format!("k{i}"), obj(json!({"i": i})))
            .await
            .unwrap();
        // Acknowledged means durable: the head is there already.
        assert!(a.durable_head("default", &a_key) >= Some(r.seq));
        last = r.seq;
    }
    assert_eq!(a.durable_head("default", &a_key), Some(last));
    assert_eq!(a.durable_head("default", &stranger), None);
    assert_eq!(a.durable_head("no-such-ns", &a_key), None);
    eventually("B to store A's batches", Duration::from_secs(30), || {
        let b = b.clone();
        let key = a_key;
        async move { (b.durable_head("default", &key) == Some(last)).then_some(()) }
    })
    .await;
    b.shutdown().await;
    drop(b);
    let b = start_node(&b_dir, &[]).await.unwrap();
    assert_eq!(b.durable_head("default", &a_key), Some(last));
    a.shutdown().await;
    b.shutdown().await;
}

/// Staged records reach the view file once the node is idle, and that is counted: the
/// node's flush counters and `/metrics` (what an operator watches to see what sustained
/// ingest pays to keep the view file current) both name the flush and its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_flushes_its_records_into_the_view_file_and_counts_it() {
    const RECORDS: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let (flushes_before, records_before) = a.view_flushes();
    for i in 0..RECORDS {
        a.put(
            "default",
            "flush",
            &format!("k{i:03}"),
            obj(json!({"i": i})),
        )
        .await
        .unwrap();
    }
    let (flushes, records) = eventually("a flush of the records", Duration::from_secs(30), || {
        let (f, r) = a.view_flushes();
        async move { (f > flushes_before && r >= records_before + RECORDS).then_some((f, r)) }
    })
    .await;
    let base = serve_api(&a).await;
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metric(&text, "blazedb_view_flushes_total") >= flushes);
    assert!(metric(&text, "blazedb_view_records_flushed_total") >= records);
    a.shutdown().await;
}
