//! Post-quantum-hybrid links: our nodes negotiate X25519MLKEM768 and say so; a peer that
//! offers only classical key exchange is refused (whichever side dials), and the node keeps
//! serving others.

use std::time::Duration;

use blazedb_crypto::{PqTlsConfig, HYBRID_GROUP};
use blazedb_identity::Keypair;
use blazedb_node::net;
use blazedb_tests::{eventually, obj, start_node, wait_peers};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_report_the_hybrid_key_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let b = start_node(&dir.path().join("b"), &a.listen_addrs())
        .await
        .unwrap();
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    for n in [&a, &b] {
        let s = n.status().await.unwrap();
        assert_eq!(
            s.peers[0].key_exchange.as_deref(),
            Some(HYBRID_GROUP),
            "{:?}",
            s.peers
        );
        assert_eq!(s.peers[0].security, "TLSv1_3");
    }
    // One dial, so one link and one handshake, for the one bootstrap address: the redial
    // timer used to fire at once and dial again while the first dial was connecting.
    let dials =
        |n: &blazedb_node::NodeHandle| n.metrics().dials.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dials(&b), 1, "B dialed its bootstrap peer once");
    assert_eq!(dials(&a), 0, "A dialed no one");
    a.shutdown().await;
    b.shutdown().await;
}

fn classical_swarm() -> libp2p::Swarm<net::Behaviour> {
    net::build_swarm_with(Keypair::generate().to_libp2p(), false, |k| {
        PqTlsConfig::classical_only(k)
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classical_only_peers_are_refused_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir.path().join("n"), &[]).await.unwrap();

    // 1. A classical-only peer dials the node: the link never becomes usable.
    let mut old = classical_swarm();
    let old_peer = *old.local_peer_id();
    old.dial(node.listen_addrs()[0].clone()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = tokio::time::timeout_at(deadline, old.select_next_some())
            .await
            .expect("the classical dial neither failed nor was closed");
        match ev {
            SwarmEvent::OutgoingConnectionError { .. } => break,
            SwarmEvent::ConnectionClosed {
                num_established: 0, ..
            } => break,
            _ => {}
        }
    }
    let s = node.status().await.unwrap();
    assert!(
        s.peers.iter().all(|p| p.peer_id != old_peer.to_string()),
        "classical peer listed as connected: {:?}",
        s.peers
    );

    // 2. The node dials a classical-only listener: refused too.
    let mut old_listener = classical_swarm();
    old_listener
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = old_listener.select_next_some().await {
            break address;
        }
    };
    let dialer = start_node(&dir.path().join("d"), &[addr]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut refused = false;
    while !refused {
        let ev = tokio::time::timeout_at(deadline, old_listener.select_next_some())
            .await
            .expect("the node's dial to a classical listener was never refused");
        refused = matches!(
            ev,
            SwarmEvent::IncomingConnectionError { .. }
                | SwarmEvent::ConnectionClosed {
                    num_established: 0,
                    ..
                }
        );
    }
    assert!(dialer.status().await.unwrap().peers.is_empty());

    // 3. The node keeps serving: an honest node connects and syncs.
    let honest = start_node(&dir.path().join("h"), &node.listen_addrs())
        .await
        .unwrap();
    wait_peers(&honest, 1).await;
    node.put("default", "c", "k", obj(json!({"v": 1})))
        .await
        .unwrap();
    eventually(
        "the honest peer to sync",
        Duration::from_secs(20),
        || async { honest.get("default", "c", "k").ok()?.map(|_| ()) },
    )
    .await;
    for n in [node, dialer, honest] {
        n.shutdown().await;
    }
}
