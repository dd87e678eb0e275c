//! A node whose log was damaged on disk: it does not send the damaged batch (its peers
//! would take it for a forgery and drop the link), serves everything before it, reports
//! the damage, and keeps its links.

use std::time::Duration;

use blazedb_node::store::{BATCHES, CHAINS};
use blazedb_tests::{eventually, obj, start_node, wait_peers};
use redb::{ReadableDatabase, ReadableTable};
use serde_json::json;

/// Flips one bit in the last byte of the first piece of the batch at chain position
/// `nth` (0-based, in the log's chain order) of the stopped node's log at `log`.
fn damage_logged_batch(log: &std::path::Path, nth: usize) {
    let db = redb::Database::create(log).unwrap();
    let id: Vec<u8> = {
        let txn = db.begin_read().unwrap();
        let chains = txn.open_table(CHAINS).unwrap();
        let entry = chains.iter().unwrap().nth(nth).unwrap().unwrap();
        entry.1.value().to_vec()
    };
    let txn = db.begin_write().unwrap();
    {
        let mut batches = txn.open_table(BATCHES).unwrap();
        let mut key = id.clone();
        key.extend_from_slice(&0u16.to_be_bytes());
        let mut piece = batches
            .get(key.as_slice())
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        *piece.last_mut().unwrap() ^= 0x04;
        batches.insert(key.as_slice(), piece.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_batch_is_not_served_and_the_links_stay() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let a = start_node(&a_dir, &[]).await.unwrap();
    for i in 0..6 {
        a.put("default", "docs", &format!("k{i}"), obj(json!({ "v": i })))
            .await
            .unwrap();
    }
    a.shutdown().await;
    drop(a);
    // The fourth batch (k3) damaged on A's disk.
    damage_logged_batch(&a_dir.join("store.redb"), 3);

    let a = start_node(&a_dir, &[]).await.unwrap();
    // A's records are its view's: still whole.
    assert!(a.get("default", "docs", "k3").unwrap().is_some());
    let b = start_node(&dir.path().join("b"), &a.listen_addrs())
        .await
        .unwrap();
    wait_peers(&b, 1).await;
    eventually(
        "B to hold what precedes the damage",
        Duration::from_secs(30),
        || async { b.get("default", "docs", "k2").ok()?.map(|_| ()) },
    )
    .await;
    // B asks again for what it lacks; A answers short each time.
    eventually(
        "A to cut two answers short",
        Duration::from_secs(60),
        || async {
            (a.metrics()
                .log_damaged
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2)
                .then_some(())
        },
    )
    .await;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    assert_eq!(b.metrics().peers_dropped.load(relaxed), 0, "B dropped A");
    assert_eq!(
        b.metrics().rejected.load(relaxed),
        0,
        "A sent B a damaged batch"
    );
    assert_eq!(b.status().await.unwrap().peers.len(), 1);
    // Nothing at or after the damage reached B (its chain cannot skip it).
    for k in ["k3", "k4", "k5"] {
        assert!(b.get("default", "docs", k).unwrap().is_none(), "{k} at B");
    }
    let author = blazedb_identity::PublicKey::from_did(&a.did()).unwrap();
    assert_eq!(b.durable_head("default", &author), Some(3));
    a.shutdown().await;
    b.shutdown().await;
}

/// A record state in the view that no longer decodes (a damaged page the view's opening
/// did not reach): the read that meets it fails saying so and marks the view, and the next
/// start sets the file aside and makes the records again from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_state_is_made_again_at_the_next_start() {
    use blazedb_node::store::{record_key, RECORDS};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = start_node(&data, &[]).await.unwrap();
    for k in ["a", "b"] {
        node.put("default", "docs", k, obj(json!({ "v": k })))
            .await
            .unwrap();
    }
    node.wait_records().unwrap();
    node.shutdown().await;
    drop(node);
    {
        let db = redb::Database::create(data.join("records.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(RECORDS).unwrap();
            let k = record_key("default", "docs", "a");
            assert!(
                t.get(k.as_slice()).unwrap().is_some(),
                "the record is in the table"
            );
            t.insert(k.as_slice(), [0xffu8, 0xff, 0xff].as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let node = start_node(&data, &[]).await.unwrap();
    let e = node.get("default", "docs", "a").unwrap_err();
    assert!(e.to_string().contains("does not decode"), "{e}");
    assert_eq!(node.get("default", "docs", "b").unwrap().unwrap()["v"], "b");
    node.shutdown().await;
    drop(node);
    let node = start_node(&data, &[]).await.unwrap();
    assert_eq!(node.get("default", "docs", "a").unwrap().unwrap()["v"], "a");
    assert!(data.join("records.redb.damaged").exists());
    node.shutdown().await;
}
