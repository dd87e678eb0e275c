//! Bad input, from HTTP clients and from peers: a clear error (HTTP 4xx with a JSON message,
//! or the peer dropped), the node keeps serving, nothing stored changes.

use std::time::Duration;

use blazedb_identity::Keypair;
use blazedb_node::{api, net, NodeHandle};
use blazedb_protocol::batch::{self, ChainPosition};
use blazedb_protocol::{Hlc, Op, SyncMessage};
use blazedb_tests::{eventually, obj, snapshot, start_node, wait_peers};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use serde_json::{json, Value};

async fn serve_api(node: &NodeHandle) -> String {
    let listener = api::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(node.clone(), listener, std::future::pending()));
    format!("http://{addr}")
}

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status().as_u16(), status);
    let v: Value = resp.json().await.expect("error body is JSON");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().expect("message").to_string();
    assert!(!msg.is_empty());
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_gets_json_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]).await.unwrap();
    let base = serve_api(&node).await;
    let http = reqwest::Client::new();
    let rec = format!("{base}/v1/ns/default/users/ada");
    let ok = http
        .put(&rec)
        .body(r#"{"name":"Ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let before = node.counts().unwrap();

    let msg = expect_error(
        http.put(&rec).body("{not json").send().await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert!(msg.contains("JSON"), "{msg}");
    let msg = expect_error(
        http.put(&rec).body("[1,2]").send().await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert!(msg.contains("object"), "{msg}");
    expect_error(
        http.put(&rec).body("\"str\"").send().await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    let huge = format!(r#"{{"f":"{}"}}"#, "x".repeat(api::MAX_BODY_BYTES + 10));
    expect_error(
        http.put(&rec).body(huge).send().await.unwrap(),
        413,
        "body_too_large",
    )
    .await;
    let big_value = format!(r#"{{"f":"{}"}}"#, "x".repeat(100_000));
    let msg = expect_error(
        http.put(&rec).body(big_value).send().await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert!(msg.contains("exceeds"), "{msg}");
    expect_error(
        http.put(format!("{base}/v1/ns/nowhere/users/ada"))
            .body("{}")
            .send()
            .await
            .unwrap(),
        404,
        "unknown_namespace",
    )
    .await;
    expect_error(
        http.get(format!("{base}/v1/ns/nowhere/users/ada"))
            .send()
            .await
            .unwrap(),
        404,
        "unknown_namespace",
    )
    .await;
    let long_key = "k".repeat(300);
    let msg = expect_error(
        http.put(format!("{base}/v1/ns/default/users/{long_key}"))
            .body("{}")
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert!(msg.contains("key"), "{msg}");
    expect_error(
        http.put(format!("{base}/v1/ns/default/bad%20coll/k"))
            .body("{}")
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect_error(
        http.put(format!("{base}/v1/ns/default/users/bad%0Akey"))
            .body("{}")
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    // Bulk endpoint: wrong shape, unknown op, too many ops; one bad op fails the whole call.
    let ops = format!("{base}/v1/ns/default/ops");
    // Raw bodies: not a list of ops, no list, a field besides it, an unknown op, not UTF-8,
    // a field given twice in one upsert (refused, not silently the last one).
    let raw: [&[u8]; 7] = [
        br#"{"ops": 5}"#,
        br#"{}"#,
        br#"{"ops": [], "x": 1}"#,
        br#"{"ops": [{"op": "delete", "collection": "c", "key": "k"}] trailing"#,
        br#"{"ops":[{"op":"explode","collection":"c","key":"k"}]}"#,
        b"{\"ops\":[{\"op\":\"delete\",\"collection\":\"c\",\"key\":\"\xff\"}]}",
        br#"{"ops":[{"op":"upsert","collection":"users","key":"fine","fields":{"a":1,"a":2}}]}"#,
    ];
    for body in raw {
        expect_error(
            http.post(&ops)
                .header("content-type", "application/json")
                .body(body.to_vec())
                .send()
                .await
                .unwrap(),
            400,
            "bad_request",
        )
        .await;
    }
    // Each kind takes exactly its own fields.
    for wrong in [
        json!({"op": "delete", "collection": "users", "key": "fine", "fields": {"a": 1}}),
        json!({"op": "upsert", "collection": "users", "key": "fine"}),
        json!({"op": "upsert", "collection": "users", "key": "fine", "fields": {"a": 1}, "delta": 1}),
        json!({"op": "add", "collection": "users", "key": "fine", "field": "n"}),
        json!({"op": "add", "collection": "users", "key": "fine", "delta": 1}),
        json!({"op": "upsert", "collection": "users", "key": "fine", "fields": {"a": 1}, "x": 1}),
        json!({"collection": "users", "key": "fine", "fields": {"a": 1}}),
        json!({"op": "add", "collection": "users", "key": "fine", "field": "", "delta": 1}),
        json!({"op": "upsert", "collection": "_reserved", "key": "fine", "fields": {}}),
    ] {
        let body = json!({"ops": [
            {"op": "upsert", "collection": "users", "key": "fine", "fields": {"a": 1}},
            wrong,
        ]});
        expect_error(
            http.post(&ops).json(&body).send().await.unwrap(),
            400,
            "bad_request",
        )
        .await;
    }
    let mixed = json!({"ops": [
        {"op": "upsert", "collection": "users", "key": "fine", "fields": {"a": 1}},
        {"op": "upsert", "collection": "users", "key": "", "fields": {"a": 1}},
    ]});
    expect_error(
        http.post(&ops).json(&mixed).send().await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| json!({"op": "delete", "collection": "c", "key": format!("k{i}")}))
        .collect();
    expect_error(
        http.post(&ops)
            .json(&json!({ "ops": too_many }))
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect_error(
        http.get(format!("{base}/v1/ns/default/users?limit=0"))
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect_error(
        http.get(format!("{base}/v1/ns/default/users?limit=abc"))
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect_error(
        http.get(format!("{base}/v2/nothing")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;

    // Nothing stored changed, and the node still serves.
    assert_eq!(node.counts().unwrap(), before);
    assert!(node.get("default", "users", "fine").unwrap().is_none());
    let got: Value = http.get(&rec).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["fields"]["name"], "Ada");
    let good = json!({"ops": [
        {"op": "upsert", "collection": "users", "key": "bob", "fields": {"n": 1}},
        {"op": "upsert", "collection": "users", "key": "eve", "fields": {
            "quote": "say \"hi\"\n", "big": u64::MAX, "neg": -7, "f": 0.25, "no": null,
            "t": true, "list": [1, "two", {"three": [3]}], "obj": {"k": "v"},
        }},
        {"op": "add", "collection": "users", "key": "bob", "field": "n", "delta": 4},
        {"op": "delete", "collection": "users", "key": "ada"},
    ]});
    let r = http.post(&ops).json(&good).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        node.get("default", "users", "bob").unwrap().unwrap()["n"],
        5
    );
    assert!(node.get("default", "users", "ada").unwrap().is_none());
    // Values read straight into the call's payload come back as they were sent.
    let eve = Value::Object(node.get("default", "users", "eve").unwrap().unwrap());
    assert_eq!(
        eve,
        json!({
            "quote": "say \"hi\"\n", "big": u64::MAX, "neg": -7, "f": 0.25, "no": null,
            "t": true, "list": [1, "two", {"three": [3]}], "obj": {"k": "v"},
        })
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("blazedb_local_batches_total 2"),
        "{metrics}"
    );
    node.shutdown().await;
}

/// A real libp2p swarm with the node's behaviours, driven by hand by the test (an attacker,
/// or a peer sending exactly what the test says).
fn raw_peer(key: &Keypair) -> libp2p::Swarm<net::Behaviour> {
    net::build_swarm(
        key.to_libp2p(),
        false,
        Default::default(),
        Default::default(),
    )
    .unwrap()
}

fn tampered_batch() -> Vec<u8> {
    let kp = Keypair::generate();
    let ops = vec![Op::Upsert {
        collection: "evil".into(),
        key: "k".into(),
        hlc: Hlc::new(1_000, 0),
        fields: [("x".to_string(), json!(1))].into_iter().collect(),
    }];
    let mut bytes = batch::seal(
        &kp,
        "default",
        ChainPosition { seq: 1, prev: None },
        ops,
        None,
    )
    .unwrap()
    .bytes
    .to_vec();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x55; // inside the payload: hash no longer matches
    bytes
}

/// A peer that gossips a corrupted batch is dropped; nothing is stored; an honest peer keeps
/// syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_gossip_drops_the_peer_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir.path().join("n"), &[]).await.unwrap();
    let honest = start_node(&dir.path().join("h"), &node.listen_addrs())
        .await
        .unwrap();
    wait_peers(&node, 1).await;
    honest
        .put("default", "c", "before", obj(json!({"v": 1})))
        .await
        .unwrap();
    eventually(
        "honest write to arrive",
        Duration::from_secs(20),
        || async { node.get("default", "c", "before").ok()?.map(|_| ()) },
    )
    .await;
    let before = node.counts().unwrap();

    // The attacker: a real libp2p swarm with our behaviours, driven by hand.
    let mut evil = raw_peer(&Keypair::generate());
    let topic = net::topic("default");
    evil.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    evil.dial(node.listen_addrs()[0].clone()).unwrap();
    let node_peer = node.peer_id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut published = false;
    let closed = loop {
        let ev = tokio::time::timeout_at(deadline, evil.select_next_some())
            .await
            .expect("attacker was never disconnected");
        match ev {
            SwarmEvent::Behaviour(net::BehaviourEvent::Gossipsub(
                libp2p::gossipsub::Event::Subscribed { peer_id, .. },
            )) if peer_id == node_peer && !published => {
                evil.behaviour_mut()
                    .gossipsub
                    .publish(topic.clone(), tampered_batch())
                    .unwrap();
                published = true;
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if peer_id == node_peer && published => {
                break true;
            }
            _ => {}
        }
    };
    assert!(closed);
    assert!(
        node.metrics()
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        node.counts().unwrap(),
        before,
        "a corrupted batch changed the store"
    );
    assert!(node.get("default", "evil", "k").unwrap().is_none());

    // The honest peer is unaffected.
    honest
        .put("default", "c", "after", obj(json!({"v": 2})))
        .await
        .unwrap();
    eventually(
        "honest write after the attack",
        Duration::from_secs(20),
        || async { node.get("default", "c", "after").ok()?.map(|_| ()) },
    )
    .await;
    assert_eq!(snapshot(&node, "c"), snapshot(&honest, "c"));
    node.shutdown().await;
    honest.shutdown().await;
}

/// A peer that answers over the sync protocol with a corrupted batch is dropped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_sync_batch_drops_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]).await.unwrap();
    let before = node.counts().unwrap();
    // One tampered batch (verified by the engine on the actor), then an answer of several
    // (verified on the verifier's thread first): either way the sender is dropped.
    for (round, n) in [1usize, 3].into_iter().enumerate() {
        let mut evil = raw_peer(&Keypair::generate());
        evil.dial(node.listen_addrs()[0].clone()).unwrap();
        let node_peer = node.peer_id();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut sent = false;
        loop {
            let ev = tokio::time::timeout_at(deadline, evil.select_next_some())
                .await
                .expect("attacker was never disconnected");
            match ev {
                SwarmEvent::ConnectionEstablished { peer_id, .. }
                    if peer_id == node_peer && !sent =>
                {
                    let author = [0u8; 32];
                    let msg = SyncMessage::Batches {
                        ns: "default".into(),
                        author,
                        batches: (0..n)
                            .map(|_| serde_bytes::ByteBuf::from(tampered_batch()))
                            .collect(),
                    };
                    evil.behaviour_mut().sync.send_request(&node_peer, msg);
                    sent = true;
                }
                SwarmEvent::ConnectionClosed {
                    peer_id,
                    num_established: 0,
                    ..
                } if peer_id == node_peer && sent => {
                    break;
                }
                _ => {}
            }
        }
        assert!(
            node.metrics()
                .peers_dropped
                .load(std::sync::atomic::Ordering::Relaxed)
                > round as u64
        );
        assert_eq!(node.counts().unwrap(), before);
    }
    // Still serving.
    node.put("default", "c", "k", obj(json!({"ok": true})))
        .await
        .unwrap();
    assert!(node.get("default", "c", "k").unwrap().is_some());
    node.shutdown().await;
}

/// Sends `batches` as a sync `Batches` message from a fresh raw peer and returns whether the
/// node dropped that peer.
async fn send_raw_batches(
    node: &NodeHandle,
    key: &Keypair,
    author: [u8; 32],
    batches: Vec<Vec<u8>>,
) -> bool {
    let mut peer = raw_peer(key);
    peer.dial(node.listen_addrs()[0].clone()).unwrap();
    let node_peer = node.peer_id();
    let mut sent = false;
    // After sending, an honest-looking peer stays connected: we watch a bounded window.
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = match tokio::time::timeout_at(deadline, peer.select_next_some()).await {
            Ok(ev) => ev,
            Err(_) => return false,
        };
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == node_peer && !sent => {
                let msg = SyncMessage::Batches {
                    ns: "default".into(),
                    author,
                    batches: batches
                        .iter()
                        .cloned()
                        .map(serde_bytes::ByteBuf::from)
                        .collect(),
                };
                peer.behaviour_mut().sync.send_request(&node_peer, msg);
                sent = true;
                deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if peer_id == node_peer && sent => {
                return true;
            }
            _ => {}
        }
    }
}

fn upsert_at(ms: u64, key: &str) -> Op {
    Op::Upsert {
        collection: "c".into(),
        key: key.into(),
        hlc: Hlc::new(ms, 0),
        fields: [("x".to_string(), json!(1))].into_iter().collect(),
    }
}

/// Forged signature, wrong chain link, oversize batch: rejected, counted, nothing stored, the
/// sender dropped. A replayed batch is ignored and counted as a duplicate, and the node keeps
/// serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_from_a_peer_are_rejected_and_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]).await.unwrap();
    let author = Keypair::generate();
    let a = *author.public().as_bytes();
    let first = batch::seal(
        &author,
        "default",
        ChainPosition { seq: 1, prev: None },
        vec![upsert_at(1_000, "a")],
        None,
    )
    .unwrap();

    // Forged: a valid batch of another key with this author's key spliced in is not
    // constructible without the secret; re-signing the header with another key is.
    let forger = Keypair::generate();
    let forged = {
        let mut b = batch::seal(
            &forger,
            "default",
            ChainPosition { seq: 1, prev: None },
            vec![upsert_at(1_000, "f")],
            None,
        )
        .unwrap()
        .bytes
        .to_vec();
        // Overwrite the author key inside the header bytes with the victim's.
        let pos = b
            .windows(32)
            .position(|w| w == forger.public().as_bytes())
            .unwrap();
        b[pos..pos + 32].copy_from_slice(&a);
        b
    };
    let wrong_link = batch::seal(
        &author,
        "default",
        ChainPosition {
            seq: 2,
            prev: Some(blazedb_protocol::BatchId([7; 32])),
        },
        vec![upsert_at(2_000, "b")],
        None,
    )
    .unwrap()
    .bytes
    .to_vec();
    let oversize = {
        // An envelope announcing a 5 MiB payload, beyond the 4 MiB batch limit.
        let mut v = vec![0x83, 0x40, 0x40, 0x5a];
        v.extend_from_slice(&(5u32 * 1024 * 1024).to_be_bytes());
        v.resize(v.len() + 5 * 1024 * 1024, 0);
        v
    };

    for (what, batches) in [
        ("forged signature", vec![forged]),
        ("wrong chain", vec![first.bytes.to_vec(), wrong_link]),
        ("oversize", vec![oversize]),
    ] {
        let before = node.counts().unwrap();
        let rejected = node.metrics().rejected.load(Relaxed);
        let dropped = send_raw_batches(&node, &Keypair::generate(), a, batches).await;
        assert!(dropped, "{what}: sender not dropped");
        assert!(
            node.metrics().rejected.load(Relaxed) > rejected,
            "{what}: not counted"
        );
        if what != "wrong chain" {
            assert_eq!(
                node.counts().unwrap(),
                before,
                "{what}: something was stored"
            );
        }
    }
    // The valid first link of the "wrong chain" case was stored; the broken second was not.
    assert_eq!(node.counts().unwrap().0, 1);

    // Replay: the same valid batch again is a duplicate, not an offence.
    let dups = node.metrics().duplicates.load(Relaxed);
    let engine_dups_before = node.counts().unwrap();
    let dropped =
        send_raw_batches(&node, &Keypair::generate(), a, vec![first.bytes.to_vec()]).await;
    assert!(!dropped, "a replayed valid batch got its sender dropped");
    assert_eq!(node.counts().unwrap(), engine_dups_before);
    assert!(
        node.metrics().duplicates.load(Relaxed) > dups,
        "replay not counted"
    );

    // Still serving.
    node.put("default", "c", "ok", obj(json!({"ok": true})))
        .await
        .unwrap();
    assert!(node.get("default", "c", "ok").unwrap().is_some());
    node.shutdown().await;
}

/// A peer that claims more of a node's own chain than the node's log holds makes the
/// node's writes wait (it could be telling the truth: the node may have lost its log); when
/// none of it arrives, the claim lapses, writes resume, and the peer's later claims (sent
/// again every 200 ms here) are not believed: a peer cannot stop a node's writes by claiming
/// batches only the node's key could have signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_the_own_chain_that_sends_nothing_lapses() {
    blazedb_tests::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let node = blazedb_node::Node::builder()
        .data_dir(dir.path())
        .listen(vec![blazedb_tests::loopback()])
        .mdns(false)
        .engine(blazedb_tests::fast_engine())
        .own_chain_wait(Duration::from_secs(2))
        .spawn()
        .await
        .unwrap();
    node.put("default", "c", "before", obj(json!({"v": 1})))
        .await
        .unwrap();
    let own = blazedb_identity::PublicKey::from_did(&node.did()).unwrap();
    let claim = SyncMessage::Have {
        ns: "default".into(),
        heads: vec![blazedb_protocol::engine::HaveEntry {
            author: *own.as_bytes(),
            seq: 100,
        }],
    };
    let mut evil = raw_peer(&Keypair::generate());
    evil.dial(node.listen_addrs()[0].clone()).unwrap();
    let node_peer = node.peer_id();
    let driver = tokio::spawn(async move {
        let mut connected = false;
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                ev = evil.select_next_some() => {
                    if let SwarmEvent::ConnectionEstablished { peer_id, .. } = ev {
                        connected |= peer_id == node_peer;
                    }
                }
                _ = every.tick(), if connected => {
                    evil.behaviour_mut().sync.send_request(&node_peer, claim.clone());
                }
            }
        }
    });
    let write = |key: &'static str| node.put("default", "c", key, obj(json!({"v": 2})));
    let refused = eventually(
        "the claim to hold writes",
        Duration::from_secs(20),
        || async {
            match write("held").await {
                Err(e) if e.to_string().contains("up to seq 100") => Some(e),
                _ => None,
            }
        },
    )
    .await;
    assert!(refused.to_string().contains("fetched back"), "{refused}");
    let held = node.durable_head("default", &own).unwrap();
    let started = std::time::Instant::now();
    let taken = eventually("the claim to lapse", Duration::from_secs(30), || async {
        write("after").await.ok()
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the claim lapsed at once"
    );
    assert_eq!(
        taken.seq,
        held + 1,
        "a write was taken while the claim held"
    );
    // The peer keeps claiming; it is no longer believed.
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = write("later").await;
        assert!(r.is_ok(), "write {i} after the lapse: {:?}", r.err());
    }
    driver.abort();
    node.shutdown().await;
}

/// A node whose identity outlived its log waits, before its first write in a namespace, for
/// the vector of every connected peer there, not only the first: the first to tell may lack
/// the latest of the node's chain that another holds (written on, the node would fork it).
/// Two raw peers here: once one has told, a write is still refused, naming how many have;
/// once both have, it is taken, as seq 1 (neither holds any of the chain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_identity_waits_for_every_connected_peer_to_tell() {
    use libp2p::request_response::{Event, Message};
    blazedb_tests::init_logs();
    let dir = tempfile::tempdir().unwrap();
    Keypair::generate()
        .save_new(&blazedb_node::node::key_path(dir.path()))
        .unwrap();
    let node = blazedb_node::Node::builder()
        .data_dir(dir.path())
        .listen(vec![blazedb_tests::loopback()])
        .mdns(false)
        .engine(blazedb_tests::fast_engine())
        .spawn()
        .await
        .unwrap();
    let node_peer = node.peer_id();
    let told = SyncMessage::Have {
        ns: "default".into(),
        heads: Vec::new(),
    };
    // Each raw peer tells the node its (empty) vector when asked, and reports the answer.
    let mut peers = Vec::new();
    for _ in 0..2 {
        let mut raw = raw_peer(&Keypair::generate());
        raw.dial(node.listen_addrs()[0].clone()).unwrap();
        let (ask, mut asked) = tokio::sync::mpsc::channel::<()>(1);
        let (answered, answers) = tokio::sync::mpsc::channel::<()>(1);
        let told = told.clone();
        let driver = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = raw.select_next_some() => {
                        if let SwarmEvent::Behaviour(net::BehaviourEvent::Sync(Event::Message {
                            message: Message::Response { .. },
                            ..
                        })) = ev
                        {
                            let _ = answered.send(()).await;
                        }
                    }
                    Some(()) = asked.recv() => {
                        raw.behaviour_mut().sync.send_request(&node_peer, told.clone());
                    }
                }
            }
        });
        peers.push((ask, answers, driver));
    }
    wait_peers(&node, 2).await;
    let write = |key: &'static str| node.put("default", "c", key, obj(json!({"v": 1})));
    let mut tell = async |i: usize| {
        let (ask, answers, _) = &mut peers[i];
        ask.send(()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), answers.recv())
            .await
            .expect("the node answered the vector")
            .unwrap();
    };
    let alone = write("nobody told").await.unwrap_err().to_string();
    assert!(alone.contains("no peer has told"), "{alone}");
    tell(0).await;
    let one = write("one told").await.unwrap_err().to_string();
    assert!(one.contains("1 of this node's 2 connected peers"), "{one}");
    tell(1).await;
    let taken = write("both told").await.unwrap();
    assert_eq!(taken.seq, 1);
    for (_, _, driver) in peers {
        driver.abort();
    }
    node.shutdown().await;
}

/// Random JSON values shaped like the API's bodies, most of them wrong somewhere: names
/// and keys empty, too long, with control characters or odd Unicode; numbers beyond i64;
/// values deep or wide; ops of unknown kinds or missing fields.
struct BodyGen(rand::rngs::StdRng);

impl BodyGen {
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        use rand::Rng;
        &xs[self.0.gen_range(0..xs.len())]
    }

    fn text(&mut self) -> String {
        use rand::Rng;
        match self.0.gen_range(0..24) {
            0 => String::new(),
            1 => "x".repeat(self.0.gen_range(60..300)),
            2 => "a\u{0}b".into(),
            3 => "\n".into(),
            4 => "é𝄞\u{202e}".into(),
            5 => "../..".into(),
            6 => " ".into(),
            _ => self
                .pick(&["users", "k1", "name", "docs", "a.b-c_d"])
                .to_string(),
        }
    }

    fn value(&mut self, depth: u32) -> Value {
        use rand::Rng;
        match self.0.gen_range(0..if depth > 2 { 6 } else { 12 }) {
            0 => Value::Null,
            1 => json!(self.0.gen::<bool>()),
            2 => json!(self.0.gen::<i64>()),
            3 => {
                let n = *self.pick(&["18446744073709551615", "-1e400", "1e308", "0.1"]);
                serde_json::from_str(n).unwrap_or(Value::Null)
            }
            4 => json!(self.text()),
            5 if self.0.gen_range(0..4) == 0 => json!("y".repeat(self.0.gen_range(1_000..80_000))),
            5 => json!(self.text()),
            6 => Value::Array(
                (0..self.0.gen_range(0..4))
                    .map(|_| self.value(depth + 1))
                    .collect(),
            ),
            7 if self.0.gen_range(0..3) == 0 => {
                // deep nesting
                let mut v = json!(1);
                for _ in 0..self.0.gen_range(1..60) {
                    v = json!([v]);
                }
                v
            }
            _ => Value::Object(
                (0..self.0.gen_range(0..4))
                    .map(|_| (self.text(), self.value(depth + 1)))
                    .collect(),
            ),
        }
    }

    fn fields(&mut self) -> Value {
        use rand::Rng;
        match self.0.gen_range(0..12) {
            0 => self.value(0),
            1 => Value::Object(
                (0..self.0.gen_range(250..300))
                    .map(|i| (format!("f{i}"), json!(i)))
                    .collect(),
            ),
            _ => Value::Object(
                (0..self.0.gen_range(0..5))
                    .map(|_| (self.text(), self.value(1)))
                    .collect(),
            ),
        }
    }

    fn op(&mut self) -> Value {
        use rand::Rng;
        let mut op = serde_json::Map::new();
        let kinds = [
            "upsert", "upsert", "delete", "add", "add", "revoke", "", "UPSERT",
        ];
        let kind = self.pick(&kinds).to_string();
        if self.0.gen_range(0..20) > 0 {
            op.insert("op".into(), json!(kind));
        }
        let wanted: &[(&str, u32)] = match kind.as_str() {
            "upsert" => &[
                ("collection", 19),
                ("key", 19),
                ("fields", 19),
                ("field", 1),
            ],
            "delete" => &[("collection", 19), ("key", 19), ("fields", 1)],
            "add" => &[
                ("collection", 19),
                ("key", 19),
                ("field", 19),
                ("delta", 19),
            ],
            _ => &[
                ("collection", 10),
                ("key", 10),
                ("fields", 10),
                ("field", 5),
                ("delta", 5),
            ],
        };
        for &(name, p) in wanted {
            if self.0.gen_range(0..20) < p {
                let v = match name {
                    "fields" => self.fields(),
                    "delta" => match self.0.gen_range(0..5) {
                        0..=2 => json!(self.0.gen::<i64>() >> self.0.gen_range(0..64)),
                        3 => json!(1.5),
                        _ => self.value(0),
                    },
                    _ if self.0.gen_range(0..12) == 0 => self.value(0),
                    _ => json!(self.text()),
                };
                op.insert(name.into(), v);
            }
        }
        Value::Object(op)
    }

    fn ops_body(&mut self) -> Value {
        use rand::Rng;
        match self.0.gen_range(0..16) {
            0 => self.value(0),
            1 => json!({ "ops": self.value(0) }),
            _ => {
                json!({ "ops": (0..self.0.gen_range(0..4)).map(|_| self.op()).collect::<Vec<_>>() })
            }
        }
    }
}

/// Seeded random bodies and paths against the real HTTP API: every answer is a success or
/// a JSON error with a 4xx status and a code (never a 5xx, never a dropped connection),
/// and a refused call changes nothing stored. A failing case prints its seed and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_http_bodies_get_4xx_or_success_and_refusals_change_nothing() {
    use rand::SeedableRng;
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]).await.unwrap();
    let base = serve_api(&node).await;
    let http = reqwest::Client::new();
    let seed: u64 = std::env::var("BLAZEDB_HTTP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261207);
    let mut g = BodyGen(rand::rngs::StdRng::seed_from_u64(seed));
    let (mut taken, mut refused) = (0, 0);
    for case in 0..300 {
        let before = node.counts().unwrap();
        let (what, resp) = if case % 3 == 0 {
            let (c, k) = (g.text(), g.text());
            let body = g.fields();
            let url = format!("{base}/v1/ns/default/{}/{}", urlencode(&c), urlencode(&k));
            let what = format!("PUT {url} {body}");
            (what, http.put(&url).json(&body).send().await)
        } else {
            let body = g.ops_body();
            let what = format!("POST ops {body}");
            let url = format!("{base}/v1/ns/default/ops");
            (what, http.post(&url).json(&body).send().await)
        };
        let what: String = what.chars().take(600).collect();
        let resp = resp.unwrap_or_else(|e| panic!("seed {seed} case {case}: {e}: {what}"));
        let status = resp.status().as_u16();
        if status == 200 {
            taken += 1;
            continue;
        }
        refused += 1;
        assert!(
            (400..500).contains(&status),
            "seed {seed} case {case}: status {status}: {what}"
        );
        let v: Value = resp.json().await.unwrap_or_else(|e| {
            panic!("seed {seed} case {case}: error body not JSON ({e}): {what}")
        });
        assert!(
            v["error"]["code"].is_string(),
            "seed {seed} case {case}: {v}: {what}"
        );
        assert_eq!(
            node.counts().unwrap(),
            before,
            "seed {seed} case {case}: a refused call stored something: {what}"
        );
    }
    // The generator is not all refusals, nor all successes.
    assert!(
        taken >= 30 && refused >= 100,
        "taken {taken}, refused {refused}"
    );
    eprintln!("random HTTP bodies: {taken} taken, {refused} refused (seed {seed})");
    node.put("default", "c", "still", obj(json!({"ok": true})))
        .await
        .unwrap();
    node.shutdown().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
