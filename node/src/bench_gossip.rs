//! B3's second in-run baseline: a plain libp2p gossipsub pair moving the batches B3 moves.
//!
//! Two bare swarms in this process, each with gossipsub as its only behaviour, on loopback TCP
//! secured exactly like the node's links: libp2p TLS 1.3 through [`PqTlsConfig`] (the hybrid
//! X25519MLKEM768 key exchange required), then yamux, TCP_NODELAY. gossipsub is configured as
//! the node configures it (anonymous messages, the node's transmit size and heartbeat) except
//! for what makes it BlazeDB: message id = blake3 of the data (a plain content hash), no
//! application validation, no sync engine, no storage; and its send queue has gossipsub's
//! default length (5,000) instead of the node's 64, so that no publish is refused (a refused
//! message cannot be published again: its id is already in the duplicate cache). At B3's
//! default 40 batches the node's queue never fills either.
//!
//! The publisher publishes sealed workload-W batches made by the real sync engine (HLC
//! stamping, op pruning, sealing, chaining: the bytes node A publishes in B3) as fast as
//! gossipsub takes them; the subscriber counts the batches delivered. Figure: ops delivered
//! per second, from the first publish until the last batch is delivered.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAuthenticity, MessageId, ValidationMode};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm};
use rand::SeedableRng;
use tokio::sync::oneshot;

use blazedb_crypto::{KxPolicy, LinkRegistry, PqTlsConfig};
use blazedb_identity::Keypair;
use blazedb_protocol::{limits, Engine, EngineConfig, Op};

use crate::bench::{workload_w, W_BATCH_OPS};
use crate::node::DEFAULT_NAMESPACE;

/// Longest a baseline run may take before it is reported as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Send-queue length of the pair: gossipsub's default, so that no publish is refused.
const QUEUE_LEN: usize = 5_000;

/// Seals `calls` workload-W batches of [`W_BATCH_OPS`] ops (random stream `seed`) with the
/// sync engine, as a node's write path does. Returns the envelope bytes, in chain order.
pub fn sealed_w_batches(calls: usize, seed: u64) -> Result<Vec<Vec<u8>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let batches: Vec<Vec<Op>> = (0..calls)
        .map(|_| workload_w(&mut rng, W_BATCH_OPS, 0))
        .collect();
    let kp = Keypair::from_seed([0x3b; 32]);
    let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
    engine.join(DEFAULT_NAMESPACE);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    batches
        .into_iter()
        .map(|ops| {
            let (vb, _) = engine
                .write(DEFAULT_NAMESPACE, &kp, ops, now_ms)
                .context("sealing a workload-W batch")?;
            Ok(vb.bytes.to_vec())
        })
        .collect()
}

/// A swarm running gossipsub alone, over TCP + PQ-enforced TLS + yamux.
fn bare_swarm() -> Result<Swarm<gossipsub::Behaviour>> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let links = LinkRegistry::default();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            move |k: &libp2p::identity::Keypair| PqTlsConfig::new(k, KxPolicy::Strict, links),
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|_| {
            let cfg = gossipsub::ConfigBuilder::default()
                .max_transmit_size(limits::MAX_BATCH_BYTES + 64 * 1024)
                .message_id_fn(|m: &gossipsub::Message| {
                    MessageId::new(blake3::hash(&m.data).as_bytes())
                })
                .validation_mode(ValidationMode::Anonymous)
                .heartbeat_interval(Duration::from_millis(700))
                .connection_handler_queue_len(QUEUE_LEN)
                .publish_queue_duration(RUN_TIMEOUT)
                .build()
                .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
            let behaviour = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, cfg)
                .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
            Ok(behaviour)
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// One run of the pair: publishes every batch of `batches` (each of `ops_per_batch` ops) from
/// one swarm to the other and returns the ops delivered per second.
pub async fn gossipsub_pair_ops(batches: &[Vec<u8>], ops_per_batch: usize) -> Result<f64> {
    tokio::time::timeout(RUN_TIMEOUT, pair_run(batches, ops_per_batch))
        .await
        .context("the gossipsub pair did not deliver every batch in time")?
}

async fn pair_run(batches: &[Vec<u8>], ops_per_batch: usize) -> Result<f64> {
    let topic = gossipsub::IdentTopic::new("blazedb-bench/pair/v1");
    let want = batches.len();
    anyhow::ensure!(want > 0, "no batches to publish");

    let mut sub = bare_swarm()?;
    sub.behaviour_mut().subscribe(&topic)?;
    sub.listen_on("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = sub.select_next_some().await {
            break address;
        }
    };
    // The subscriber: counts deliveries, reports when it holds all of them.
    let (done_tx, done_rx) = oneshot::channel::<Instant>();
    let subscriber = tokio::spawn(async move {
        let mut got = 0usize;
        let mut done_tx = Some(done_tx);
        loop {
            if let SwarmEvent::Behaviour(gossipsub::Event::Message { .. }) =
                sub.select_next_some().await
            {
                got += 1;
                if got == want {
                    if let Some(tx) = done_tx.take() {
                        let _ = tx.send(Instant::now());
                    }
                    // Keep the link up until the publisher is done with it.
                    return (sub, got);
                }
            }
        }
    });

    let mut publisher = bare_swarm()?;
    publisher.behaviour_mut().subscribe(&topic)?;
    publisher.dial(addr)?;
    // Until the publisher knows the subscriber is on the topic.
    loop {
        if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) =
            publisher.select_next_some().await
        {
            break;
        }
    }

    let t = Instant::now();
    for bytes in batches {
        publisher
            .behaviour_mut()
            .publish(topic.clone(), bytes.clone())
            .context("publishing to the gossipsub pair")?;
        // Let the swarm run its events between publishes.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, async {
            Some(publisher.select_next_some().await)
        })
        .await
        {}
    }
    // Drive the publisher until the subscriber has everything.
    let mut done_rx = done_rx;
    let end = loop {
        tokio::select! {
            end = &mut done_rx => break end.context("the subscriber stopped early")?,
            _ = publisher.select_next_some() => {}
        }
    };
    let (_sub, got) = subscriber.await.context("the subscriber task failed")?;
    anyhow::ensure!(got == want, "delivered {got} of {want} batches");
    let secs = end.duration_since(t).as_secs_f64();
    Ok((want * ops_per_batch) as f64 / secs)
}
