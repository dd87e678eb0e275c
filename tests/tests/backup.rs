//! Backups through the embedding API: one at a time, the copy's reader included (a slow
//! reader holds one copy's disk space, never more), and what the copy holds.

use std::io::Read;

use blazedb_node::store::{Store, VIEW_FILE};
use blazedb_node::NodeError;
use blazedb_tests::{obj, start_node};
use serde_json::json;

/// While a streamed copy (`backup_file`, what `GET /v1/backup` sends) is held, no other
/// backup is made; once it is dropped, one is. The copy, read to its end, is a log that
/// opens read-only and verifies, holding every batch written before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backup_at_a_time_its_reader_included() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir.path().join("n"), &[]).await.unwrap();
    for i in 0..5 {
        node.put("default", "c", &format!("k{i}"), obj(json!({ "v": i })))
            .await
            .unwrap();
    }
    let held = node.backup_file().await.unwrap();
    let second = dir.path().join("second.redb");
    for refused in [
        node.backup_file().await.err(),
        node.backup(&second).await.err(),
    ] {
        assert!(
            matches!(&refused, Some(NodeError::Unavailable(why)) if why.contains("backup")),
            "{refused:?}"
        );
    }
    assert!(!second.exists());
    let (mut file, info, busy) = held.into_parts();
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes.len() as u64, info.bytes);
    assert_eq!(info.batches, 5);
    // Read, but still held: still one at a time.
    assert!(node.backup(&second).await.is_err());
    drop(busy);
    let made = node.backup(&second).await.unwrap();
    assert_eq!(made.batches, 5);
    node.shutdown().await;

    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::write(copy.join("store.redb"), &bytes).unwrap();
    Store::create_view_file(&copy.join(VIEW_FILE)).unwrap();
    let store = Store::open_read_only(&copy.join("store.redb"), &copy.join(VIEW_FILE)).unwrap();
    assert_eq!(store.check().unwrap(), 5);
    assert!(store.identity_restored().unwrap());
    assert_eq!(store.backup_marks().unwrap(), vec!["default"]);
}
