//! Owned namespaces: capabilities decide who writes and who reads; revocation is a log entry
//! every replica judges the same way.

use std::time::Duration;

use blazedb_identity::Keypair;
use blazedb_node::{net, NodeError, NodeHandle};
use blazedb_protocol::batch::{self, ChainPosition};
use blazedb_protocol::capability::{namespace_id, Chain, Rights, TokenId};
use blazedb_protocol::{Hlc, Op, SyncMessage};
use blazedb_tests::{eventually, obj, start_node, wait_peers};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use serde_json::json;

fn did_key(n: &NodeHandle) -> blazedb_identity::PublicKey {
    blazedb_identity::PublicKey::from_did(&n.did()).unwrap()
}

fn records(n: &NodeHandle, ns: &str, coll: &str) -> Vec<(String, blazedb_node::Fields)> {
    n.list(ns, coll, "", 10_000).unwrap()
}

async fn has(n: &NodeHandle, ns: &str, coll: &str, key: &str) -> Option<()> {
    n.get(ns, coll, key).ok()?.map(|_| ())
}

/// Without a capability a node gets nothing; with a read token it converges but cannot write;
/// a scoped write token writes only inside its scope; after revocation the revoked reader
/// receives nothing written later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_scope_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let owner = start_node(&dir.path().join("owner"), &[]).await.unwrap();
    let addr = owner.listen_addrs();
    let reader = start_node(&dir.path().join("reader"), &addr).await.unwrap();
    let writer = start_node(&dir.path().join("writer"), &addr).await.unwrap();
    wait_peers(&owner, 2).await;

    let ns = owner.create_namespace().await.unwrap();
    assert!(ns.starts_with('n') && ns.len() == 41);
    owner
        .put(&ns, "docs", "d1", obj(json!({"v": 1})))
        .await
        .unwrap();

    // No capability: the namespace is unknown to the reader and nothing reaches it.
    assert!(matches!(
        reader.get(&ns, "docs", "d1"),
        Err(NodeError::UnknownNamespace(_))
    ));

    // A read token: converges, cannot write.
    let inv = owner
        .invite(&ns, did_key(&reader), Rights::Read, None, None)
        .await
        .unwrap();
    assert_eq!(reader.join(&inv.token).await.unwrap(), ns);
    eventually("reader to receive d1", Duration::from_secs(20), || {
        has(&reader, &ns, "docs", "d1")
    })
    .await;
    let err = reader
        .put(&ns, "docs", "x", obj(json!({"v": 0})))
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Forbidden(_)), "{err}");

    // A write token scoped to docs/: writes there, not elsewhere; its writes reach everyone.
    let winv = owner
        .invite(
            &ns,
            did_key(&writer),
            Rights::Write,
            Some("docs/".into()),
            None,
        )
        .await
        .unwrap();
    writer.join(&winv.token).await.unwrap();
    writer
        .put(&ns, "docs", "by-writer", obj(json!({"v": 2})))
        .await
        .unwrap();
    let err = writer
        .put(&ns, "users", "u", obj(json!({"v": 3})))
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Forbidden(_)), "{err}");
    for n in [&owner, &reader] {
        eventually(
            "the writer's record everywhere",
            Duration::from_secs(20),
            || has(n, &ns, "docs", "by-writer"),
        )
        .await;
    }
    // A token for someone else cannot be used.
    let err = writer.join(&inv.token).await.unwrap_err();
    assert!(err.to_string().contains("another key"), "{err}");

    // Revoke the reader; later writes never reach it, while the writer still gets them.
    owner
        .revoke(&ns, TokenId::from_hex(&inv.id).unwrap())
        .await
        .unwrap();
    owner
        .put(&ns, "docs", "after-revoke", obj(json!({"v": 4})))
        .await
        .unwrap();
    eventually(
        "the writer to receive the post-revocation record",
        Duration::from_secs(20),
        || has(&writer, &ns, "docs", "after-revoke"),
    )
    .await;
    // The reader is connected and polling (anti-entropy every 300 ms in tests): give it
    // several rounds, then check it still has nothing written after the revocation.
    let before = owner
        .metrics()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    owner
        .put(&ns, "docs", "marker", obj(json!({"v": 5})))
        .await
        .unwrap();
    eventually(
        "the writer to receive the marker",
        Duration::from_secs(20),
        || has(&writer, &ns, "docs", "marker"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // observation window, not sync
    assert!(
        owner
            .metrics()
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
    );
    assert!(reader.get(&ns, "docs", "after-revoke").unwrap().is_none());
    assert!(reader.get(&ns, "docs", "marker").unwrap().is_none());
    assert!(
        reader.get(&ns, "docs", "d1").unwrap().is_some(),
        "pre-revocation data stays"
    );

    // Public data keeps flowing to the reader.
    owner
        .put("default", "pub", "p", obj(json!({"v": 6})))
        .await
        .unwrap();
    eventually("public data to the reader", Duration::from_secs(20), || {
        has(&reader, "default", "pub", "p")
    })
    .await;
    for n in [owner, reader, writer] {
        n.shutdown().await;
    }
}

/// A raw peer without capability that subscribes to the namespace's gossip topic and asks
/// for its data directly gets nothing readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_capability_receives_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let owner = start_node(&dir.path().join("o"), &[]).await.unwrap();
    let ns = owner.create_namespace().await.unwrap();
    let mut spy = net::build_swarm(
        Keypair::generate().to_libp2p(),
        false,
        Default::default(),
        Default::default(),
    )
    .unwrap();
    spy.behaviour_mut()
        .gossipsub
        .subscribe(&net::topic(&ns))
        .unwrap();
    spy.dial(owner.listen_addrs()[0].clone()).unwrap();
    let owner_peer = owner.peer_id();
    let me = *blazedb_identity::PublicKey::from_did(&owner.did())
        .unwrap()
        .as_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut asked = false;
    let mut answers = 0;
    let mut leaked = Vec::new();
    loop {
        let ev = match tokio::time::timeout_at(deadline, spy.select_next_some()).await {
            Ok(ev) => ev,
            Err(_) => break, // observation window over
        };
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. }
                if peer_id == owner_peer && !asked =>
            {
                owner
                    .put(&ns, "secret", "s", obj(json!({"v": "classified"})))
                    .await
                    .unwrap();
                for msg in [
                    SyncMessage::Fetch {
                        ns: ns.clone(),
                        author: me,
                        from_seq: 1,
                        limit: 10,
                        max_bytes: None,
                    },
                    SyncMessage::Have {
                        ns: ns.clone(),
                        heads: vec![],
                    },
                ] {
                    spy.behaviour_mut().sync.send_request(&owner_peer, msg);
                }
                asked = true;
            }
            SwarmEvent::Behaviour(net::BehaviourEvent::Gossipsub(
                libp2p::gossipsub::Event::Message { message, .. },
            )) => leaked.push(message.data),
            SwarmEvent::Behaviour(net::BehaviourEvent::Sync(
                libp2p::request_response::Event::Message {
                    message:
                        libp2p::request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => {
                let _ = spy.behaviour_mut().sync.send_response(channel, net::Ack {});
                match request {
                    SyncMessage::Batches { batches, .. } => {
                        answers += 1;
                        leaked.extend(batches.into_iter().map(|b| b.into_vec()));
                    }
                    SyncMessage::Have { ns: n, .. } if n == ns => leaked.push(b"have".to_vec()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    assert!(asked, "the spy never connected");
    assert!(
        answers >= 1,
        "the fetch was not even answered (empty answer expected)"
    );
    assert!(
        leaked.is_empty(),
        "data reached a peer without capability: {} items",
        leaked.len()
    );
    owner.shutdown().await;
}

/// Batches with an expired, out-of-scope or missing capability are rejected, counted, not
/// stored; the sender is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_capabilities_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir.path().join("n"), &[]).await.unwrap();
    // A namespace owned by a key the test holds; the node joins it with a read token.
    let owner = Keypair::generate();
    let ns = namespace_id(&owner.public());
    let node_key = blazedb_identity::PublicKey::from_did(&node.did()).unwrap();
    let read = Chain::issue_root(&owner, &ns, &node_key, Rights::Read, None, 0, None, 1).unwrap();
    node.join(&read.to_text()).await.unwrap();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let attacker = Keypair::generate();
    let expired = Chain::issue_root(
        &owner,
        &ns,
        &attacker.public(),
        Rights::Write,
        None,
        0,
        Some(now - 60_000),
        2,
    )
    .unwrap();
    let scoped = Chain::issue_root(
        &owner,
        &ns,
        &attacker.public(),
        Rights::Write,
        Some("docs/".into()),
        0,
        None,
        3,
    )
    .unwrap();
    let op = |coll: &str| Op::Upsert {
        collection: coll.into(),
        key: "k".into(),
        hlc: Hlc::new(now, 0),
        fields: [("x".to_string(), json!(1))].into_iter().collect(),
    };
    let first = ChainPosition { seq: 1, prev: None };
    let cases = vec![
        (
            "expired",
            batch::seal(&attacker, &ns, first, vec![op("docs")], Some(&expired)).unwrap(),
        ),
        (
            "out of scope",
            batch::seal(&attacker, &ns, first, vec![op("users")], Some(&scoped)).unwrap(),
        ),
        (
            "no capability",
            batch::seal(&attacker, &ns, first, vec![op("docs")], None).unwrap(),
        ),
    ];
    for (what, b) in cases {
        let before_rejected = node
            .metrics()
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed);
        let before = node.counts().unwrap();
        let mut evil = net::build_swarm(
            attacker.to_libp2p(),
            false,
            Default::default(),
            Default::default(),
        )
        .unwrap();
        evil.dial(node.listen_addrs()[0].clone()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut sent = false;
        loop {
            let ev = tokio::time::timeout_at(deadline, evil.select_next_some())
                .await
                .unwrap_or_else(|_| panic!("{what}: sender never dropped"));
            match ev {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if !sent => {
                    let msg = SyncMessage::Batches {
                        ns: ns.clone(),
                        author: *attacker.public().as_bytes(),
                        batches: vec![serde_bytes::ByteBuf::from(b.bytes.clone())],
                    };
                    evil.behaviour_mut().sync.send_request(&peer_id, msg);
                    sent = true;
                }
                SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } if sent => break,
                _ => {}
            }
        }
        assert!(
            node.metrics()
                .rejected
                .load(std::sync::atomic::Ordering::Relaxed)
                > before_rejected,
            "{what}"
        );
        assert_eq!(
            node.counts().unwrap(),
            before,
            "{what}: something was stored"
        );
    }
    node.shutdown().await;
}

/// A revocation and a write on two sides of a partition: after healing, every replica holds
/// the same verdict and the same state — the write made before the revocation counts, the one
/// after does not, on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revoke_and_write_converge_to_one_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let admin = start_node(&dir.path().join("admin"), &[]).await.unwrap();
    let writer = start_node(&dir.path().join("writer"), &[]).await.unwrap(); // partitioned
    let ns = admin.create_namespace().await.unwrap();
    admin
        .put(&ns, "docs", "base", obj(json!({"v": 0})))
        .await
        .unwrap();
    let inv = admin
        .invite(&ns, did_key(&writer), Rights::Write, None, None)
        .await
        .unwrap();
    writer.join(&inv.token).await.unwrap();

    writer
        .put(&ns, "docs", "before", obj(json!({"v": 1})))
        .await
        .unwrap();
    // Distinct wall-clock milliseconds, so "before" and the revocation do not tie (a tie
    // counts as after the revocation).
    tokio::time::sleep(Duration::from_millis(5)).await;
    admin
        .revoke(&ns, TokenId::from_hex(&inv.id).unwrap())
        .await
        .unwrap();
    // Make sure the writer's next timestamp is after the revocation's.
    tokio::time::sleep(Duration::from_millis(5)).await;
    writer
        .put(&ns, "docs", "after", obj(json!({"v": 2})))
        .await
        .unwrap();
    assert!(
        writer.get(&ns, "docs", "after").unwrap().is_some(),
        "writer sees its own write"
    );

    // Heal.
    writer.dial(admin.listen_addrs()[0].clone()).await.unwrap();
    wait_peers(&admin, 1).await;
    // The admin fetches both of the writer's batches; the writer gets what it may still read
    // (written before the revocation) and the revocation itself.
    eventually(
        "the admin to hold the writer's batches",
        Duration::from_secs(30),
        || async { has(&admin, &ns, "docs", "before").await },
    )
    .await;
    eventually(
        "one verdict on both sides",
        Duration::from_secs(30),
        || async {
            let a = records(&admin, &ns, "docs");
            (a.len() == 2 && a == records(&writer, &ns, "docs")).then_some(())
        },
    )
    .await;
    assert_eq!(
        admin.counts().unwrap().0,
        4,
        "base, revocation and both writer batches"
    );
    assert!(admin.get(&ns, "docs", "base").unwrap().is_some());
    assert!(admin.get(&ns, "docs", "before").unwrap().is_some());
    assert!(admin.get(&ns, "docs", "after").unwrap().is_none());
    assert!(
        writer.get(&ns, "docs", "after").unwrap().is_none(),
        "the revoked write still counts"
    );
    assert_eq!(admin.list(&ns, "_revocations", "", 10).unwrap().len(), 1);
    // The writer keeps that verdict across a restart (revocations are durable).
    let wdir = dir.path().join("writer");
    writer.shutdown().await;
    drop(writer);
    let writer = start_node(&wdir, &[]).await.unwrap();
    assert!(writer.get(&ns, "docs", "after").unwrap().is_none());
    assert!(writer.get(&ns, "docs", "before").unwrap().is_some());
    admin.shutdown().await;
    writer.shutdown().await;
}

/// An admin that is not the owner delegates: its invitee holds a two-link chain, and every
/// replica accepts it; scope and expiry are inherited from the admin's own capability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_admin_invites_within_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let owner = start_node(&dir.path().join("owner"), &[]).await.unwrap();
    let addr = owner.listen_addrs();
    let admin = start_node(&dir.path().join("admin"), &addr).await.unwrap();
    let member = start_node(&dir.path().join("member"), &addr).await.unwrap();
    wait_peers(&owner, 2).await;
    let ns = owner.create_namespace().await.unwrap();
    let far_future = 4_000_000_000_000u64;
    let a = owner
        .invite(
            &ns,
            did_key(&admin),
            Rights::Admin,
            Some("team/".into()),
            Some(far_future),
        )
        .await
        .unwrap();
    admin.join(&a.token).await.unwrap();
    // No prefix or expiry given: both are inherited from the admin's own capability.
    let m = admin
        .invite(&ns, did_key(&member), Rights::Write, None, None)
        .await
        .unwrap();
    let chain = Chain::from_text(&m.token).unwrap();
    assert_eq!(chain.tokens().len(), 2);
    assert_eq!(chain.leaf().body.prefix.as_deref(), Some("team/"));
    assert_eq!(chain.leaf().body.exp_ms, Some(far_future));
    member.join(&m.token).await.unwrap();
    member
        .put(&ns, "team", "x", obj(json!({"v": 1})))
        .await
        .unwrap();
    let err = member
        .put(&ns, "other", "x", obj(json!({"v": 1})))
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Forbidden(_)), "{err}");
    eventually(
        "the member's write at the owner",
        Duration::from_secs(20),
        || has(&owner, &ns, "team", "x"),
    )
    .await;
    for n in [owner, admin, member] {
        n.shutdown().await;
    }
}
