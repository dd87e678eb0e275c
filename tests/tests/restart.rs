//! Crash/restart: a node stopped, written around, restarted from its data directory keeps
//! its data and catches up on what it missed.

use std::time::Duration;

use blazedb_protocol::{Hlc, Op};
use blazedb_tests::{
    eventually, metric, metric_f64, obj, scrape_metrics, serve_api, snapshot, start_node,
    wait_peers,
};
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
    let text = scrape_metrics(&base).await;
    assert!(metric(&text, "blazedb_view_flushes_total") >= flushes);
    assert!(metric(&text, "blazedb_view_records_flushed_total") >= records);
    a.shutdown().await;
}

/// Records written among many the view file holds reach it mostly as a sorted run beside its
/// records' table (the flush folds only the first twelfth of the key space into the table),
/// `/metrics` counts that, and after a restart every record reads as written: the run is
/// joined on every read (`get`, `list`, the record count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_among_held_ones_become_a_run_and_read_right_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let a = start_node(&path, &[]).await.unwrap();
    let up = |key: String, v: u64| Op::Upsert {
        collection: "runs".into(),
        key,
        hlc: Hlc::ZERO,
        fields: [("v".to_string(), json!(v))].into_iter().collect(),
    };
    // 2,000 records, keys 0, 10, 20, ...: the first flush writes them into the empty table.
    let table: Vec<Op> = (0..2_000u64)
        .map(|i| up(format!("{:06}", i * 10), i))
        .collect();
    a.write("default", table).await.unwrap();
    let (_, flushed) = a.view_flushes();
    eventually("the first flush", Duration::from_secs(30), || {
        let (_, records) = a.view_flushes();
        async move { (records >= flushed + 2_000).then_some(()) }
    })
    .await;
    // 500 new keys among them and 100 overwrites: dense next to the table (600 of 2,000).
    let mut delta: Vec<Op> = (0..500u64)
        .map(|i| up(format!("{:06}", i * 40 + 5), 10_000 + i))
        .collect();
    delta.extend((0..100u64).map(|i| up(format!("{:06}", i * 20), 20_000 + i)));
    a.write("default", delta).await.unwrap();
    eventually("a run", Duration::from_secs(30), || {
        let (runs, _) = a.view_flush_kinds();
        async move { (runs >= 1).then_some(()) }
    })
    .await;
    // The API served until this check is done: its handle would keep the store open.
    let listener = blazedb_node::api::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(blazedb_node::api::serve(a.clone(), listener, async {
        let _ = stopped.await;
    }));
    let text = scrape_metrics(&base).await;
    assert!(metric(&text, "blazedb_view_runs_written_total") >= 1);
    assert!(metric(&text, "blazedb_view_runs") >= 1);
    // The run's filter: 10 bits per record, in 32-byte blocks. The run holds the delta's
    // records past the fold's slice (about 130 of the 600 fall in the first twelfth).
    assert!(metric(&text, "blazedb_view_run_filter_bytes") >= 400 * 10 / 8);
    assert!(metric(&text, "blazedb_view_folds_total") >= 1);
    // Nothing outpaced the view file here; the counters are there, in seconds.
    for name in [
        "blazedb_view_paced_seconds_total",
        "blazedb_view_stopped_seconds_total",
    ] {
        assert!(metric_f64(&text, name) >= 0.0, "{name}");
    }
    assert_eq!(metric(&text, "blazedb_stored_records"), 2_500);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    let listed = a.list("default", "runs", "", 10_000).unwrap();
    assert_eq!(listed.len(), 2_500);
    let counts = a.counts().unwrap();
    a.shutdown().await;
    drop(a);

    let a = start_node(&path, &[]).await.unwrap();
    assert_eq!(a.list("default", "runs", "", 10_000).unwrap(), listed);
    assert_eq!(a.counts().unwrap(), counts);
    let v = |key: &str| {
        a.get("default", "runs", key)
            .unwrap()
            .map(|f| f["v"].clone())
    };
    assert_eq!(v("000020"), Some(json!(20_001)), "overwritten, in the run");
    assert_eq!(v("000030"), Some(json!(3)), "only in the table");
    assert_eq!(v("000045"), Some(json!(10_001)), "only in the run");
    assert_eq!(v("000046"), None);
    a.shutdown().await;
}

/// A node started with its identity but without its log (a new disk, a restored key):
/// peers hold chains it wrote before. It must not write until a peer has told it what it
/// holds of its own chain, and then only after fetching that back: a batch sealed before
/// would take a seq its peers hold under another id (a fork no replica repairs: they would
/// drop it as a duplicate, and this node would break its chain on theirs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_without_its_log_fetches_its_chain_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let a = start_node(&a_dir, &[]).await.unwrap();
    let b = start_node(&dir.path().join("b"), &a.listen_addrs())
        .await
        .unwrap();
    wait_peers(&b, 1).await;
    for i in 0..3 {
        a.put("default", "docs", &format!("k{i}"), obj(json!({ "v": i })))
            .await
            .unwrap();
    }
    let author = blazedb_identity::PublicKey::from_did(&a.did()).unwrap();
    eventually("B to hold A's chain", Duration::from_secs(30), || async {
        (b.durable_head("default", &author) == Some(3)).then_some(())
    })
    .await;
    a.shutdown().await;
    drop(a);
    for f in ["store.redb", "records.redb"] {
        std::fs::remove_file(a_dir.join(f)).unwrap();
    }

    // Alone: no peer can tell it what it wrote before.
    let a = start_node(&a_dir, &[]).await.unwrap();
    assert_eq!(a.did(), author.to_did());
    let refused = a
        .put("default", "docs", "new", obj(json!({ "v": "new" })))
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("may lack batches its identity"),
        "{refused}"
    );
    // A namespace it creates now cannot hold an earlier chain of its own: written at once.
    let fresh = a.create_namespace().await.unwrap();
    a.put(&fresh, "docs", "mine", obj(json!({ "v": 1 })))
        .await
        .unwrap();
    // Still refused after a restart without peers (the mark is kept in the log).
    a.shutdown().await;
    drop(a);
    let a = start_node(&a_dir, &[]).await.unwrap();
    assert!(a
        .put("default", "docs", "new", obj(json!({ "v": "new" })))
        .await
        .is_err());

    // With B: the write goes in only once A's chain is back, after it. Tried without
    // pause, so a write in the moment between B's vector and A's chain arriving is seen.
    a.dial(b.listen_addrs()[0].clone()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let receipt = loop {
        match a
            .put("default", "docs", "new", obj(json!({ "v": "new" })))
            .await
        {
            Ok(r) => break r,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "A's write never taken: {e}"
            ),
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(receipt.seq, 4, "the write did not follow A's earlier chain");
    for i in 0..3 {
        assert!(a
            .get("default", "docs", &format!("k{i}"))
            .unwrap()
            .is_some());
    }
    eventually(
        "B to hold A's new write",
        Duration::from_secs(30),
        || async { b.get("default", "docs", "new").ok()?.map(|_| ()) },
    )
    .await;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    for (name, n) in [("A", &a), ("B", &b)] {
        assert_eq!(
            n.metrics().peers_dropped.load(relaxed),
            0,
            "{name} dropped a peer"
        );
        assert_eq!(
            n.metrics().rejected.load(relaxed),
            0,
            "{name} rejected a batch"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A node whose last write was one large batch (kept in the log in several pieces) starts
/// again: every start reads each chain's head header from the batch's first piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_after_a_large_batch() {
    use blazedb_node::{FieldValue, OpsBuilder};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = start_node(&data, &[]).await.unwrap();
    let mut ops = OpsBuilder::new();
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..4_000 {
        // Random letters: zstd cannot shrink them below the log's 32 KB pieces.
        let v: String = (0..48)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (b'a' + (s % 26) as u8) as char
            })
            .collect();
        ops.upsert("docs", &format!("k{i}"), &[("v", FieldValue::from(&v))])
            .unwrap();
    }
    node.write_built("default", ops).await.unwrap();
    node.shutdown().await;
    drop(node);
    let node = start_node(&data, &[]).await.unwrap();
    assert!(node.get("default", "docs", "k3999").unwrap().is_some());
    node.shutdown().await;
}
