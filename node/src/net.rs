//! The libp2p side: transports, security, behaviours.
//!
//! - Transport: TCP, secured by libp2p's TLS 1.3 (rustls + aws-lc-rs) through
//!   `blazedb_crypto::PqTlsConfig`, which *requires* the X25519MLKEM768 hybrid group under the
//!   default strict policy, multiplexed by yamux. No second security protocol is
//!   offered next to TLS: protocol negotiation is unauthenticated, so offering Noise too would
//!   let an attacker push both sides down to it. QUIC is not enabled: its TLS configuration is
//!   private to libp2p-quic, so its key exchange cannot be checked (see ARCHITECTURE.md).
//! - gossipsub: one topic per namespace, message id = batch id, anonymous messages (batches
//!   carry their own author signature), every message validated by the sync engine before it
//!   is relayed.
//! - request-response (CBOR): the engine's sync messages, each sent as a request answered by
//!   an empty acknowledgement, over one protocol per traffic class so that one class cannot
//!   use up another's streams:
//!   - `/blazedb/sync/1`, *control*: Have, Fetch, Present, Revoked, empty Batches (small);
//!   - `/blazedb/live/1`, *live*: batches pushed to readers of owned namespaces;
//!   - `/blazedb/bulk/1`, *bulk*: batches served in answer to a Fetch (catch-up).
//!
//!   Each has its own stream limit per connection; the node bounds what it has outstanding
//!   per peer and class (see `node.rs`). Any message is accepted on any of them: the class
//!   is only a transport. Behaviours are polled in declaration order, so when several have
//!   events ready, control goes first, then gossip, then live pushes, then bulk.
//! - identify, mDNS (optional).

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{gossipsub, identify, mdns, request_response, StreamProtocol, Swarm};
use serde::{Deserialize, Serialize};

use blazedb_crypto::{KxPolicy, LinkError, LinkRegistry, PqTlsConfig};
use blazedb_protocol::batch::Envelope;
use blazedb_protocol::{limits, SyncMessage};

/// Request-response protocol name of the sync engine's control messages.
pub const SYNC_PROTOCOL: &str = "/blazedb/sync/1";
/// Request-response protocol name of live pushes (owned namespaces).
pub const LIVE_PROTOCOL: &str = "/blazedb/live/1";
/// Request-response protocol name of bulk catch-up (fetch answers).
pub const BULK_PROTOCOL: &str = "/blazedb/bulk/1";

/// Concurrent streams per connection of the control protocol.
pub const CONTROL_STREAMS: usize = 64;
/// Concurrent streams per connection of the live protocol.
pub const LIVE_STREAMS: usize = 64;
/// Concurrent streams per connection of the bulk protocol.
pub const BULK_STREAMS: usize = 32;

/// Traffic class of a sync message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Have, Fetch, Present, Revoked, empty Batches.
    Control,
    /// Batches pushed as they are written (owned namespaces).
    Live,
    /// Batches served in answer to a fetch.
    Bulk,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 3] = [Class::Control, Class::Live, Class::Bulk];

    /// The class of a message the engine asked to send (served fetch answers are bulk).
    pub fn of(msg: &SyncMessage) -> Class {
        match msg {
            SyncMessage::Batches { batches, .. } if !batches.is_empty() => Class::Live,
            _ => Class::Control,
        }
    }

    /// Lower-case name (metrics).
    pub fn name(self) -> &'static str {
        match self {
            Class::Control => "control",
            Class::Live => "live",
            Class::Bulk => "bulk",
        }
    }
}
/// identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/blazedb/1.0.0";
/// Most gossip messages queued for one peer (gossipsub's per-peer send queue). Past it,
/// publishing to that peer fails and the peer catches up by fetching.
pub const GOSSIP_QUEUE_LEN: usize = 64;

/// The acknowledgement that answers every sync request.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Ack {}

/// A request-response behaviour carrying sync messages.
pub type SyncBehaviour = request_response::cbor::Behaviour<SyncMessage, Ack>;

/// All behaviours of a node. Field order is poll order (priority).
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Sync control messages.
    pub sync: SyncBehaviour,
    /// Batch gossip.
    pub gossipsub: gossipsub::Behaviour,
    /// Live pushes.
    pub live: SyncBehaviour,
    /// Bulk catch-up.
    pub bulk: SyncBehaviour,
    /// Peer information exchange.
    pub identify: identify::Behaviour,
    /// Local-network discovery.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Gossip topic of a namespace.
pub fn topic(ns: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("blazedb/ns/{ns}/v1"))
}

/// Gossip message id: the batch id, so duplicates die at the first hop that has seen them.
fn message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    match Envelope::parse(&m.data) {
        Ok(env) => gossipsub::MessageId::new(&env.id().0),
        // Not a batch: still needs an id; validation will reject it.
        Err(_) => gossipsub::MessageId::new(blake3::hash(&m.data).as_bytes()),
    }
}

/// Builds the swarm for `keypair`, with links secured under `policy` and their negotiated
/// parameters recorded in `links`.
pub fn build_swarm(
    keypair: libp2p::identity::Keypair,
    enable_mdns: bool,
    policy: KxPolicy,
    links: LinkRegistry,
) -> anyhow::Result<Swarm<Behaviour>> {
    build_swarm_with(keypair, enable_mdns, move |key| {
        PqTlsConfig::new(key, policy, links)
    })
}

/// [`build_swarm`], recording gossipsub's metrics (message counts before and after
/// de-duplication, mesh, scores) in `registry`.
pub fn build_swarm_metered(
    keypair: libp2p::identity::Keypair,
    enable_mdns: bool,
    policy: KxPolicy,
    links: LinkRegistry,
    registry: &mut libp2p::metrics::Registry,
) -> anyhow::Result<Swarm<Behaviour>> {
    let security = move |key: &libp2p::identity::Keypair| PqTlsConfig::new(key, policy, links);
    build_swarm_inner(keypair, enable_mdns, security, Some(registry))
}

/// Builds the swarm with a given security upgrade (tests use it to play a classical peer).
pub fn build_swarm_with(
    keypair: libp2p::identity::Keypair,
    enable_mdns: bool,
    security: impl FnOnce(&libp2p::identity::Keypair) -> Result<PqTlsConfig, LinkError>,
) -> anyhow::Result<Swarm<Behaviour>> {
    build_swarm_inner(keypair, enable_mdns, security, None)
}

fn build_swarm_inner(
    keypair: libp2p::identity::Keypair,
    enable_mdns: bool,
    security: impl FnOnce(&libp2p::identity::Keypair) -> Result<PqTlsConfig, LinkError>,
    registry: Option<&mut libp2p::metrics::Registry>,
) -> anyhow::Result<Swarm<Behaviour>> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            security,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                .max_transmit_size(limits::MAX_BATCH_BYTES + 64 * 1024)
                .message_id_fn(message_id)
                .validation_mode(gossipsub::ValidationMode::Anonymous)
                .validate_messages()
                .heartbeat_interval(Duration::from_millis(700))
                // Bounded per-connection send queue: a slow peer costs at most this many
                // queued messages; past that, publishing fails and peers catch up by pulling.
                .connection_handler_queue_len(GOSSIP_QUEUE_LEN)
                .build()
                .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
            let mut gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_cfg)
                    .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
            if let Some(registry) = registry {
                gossipsub = gossipsub.with_metrics(registry, Default::default());
            }
            let sync = sync_behaviour(SYNC_PROTOCOL, CONTROL_STREAMS);
            let live = sync_behaviour(LIVE_PROTOCOL, LIVE_STREAMS);
            let bulk = sync_behaviour(BULK_PROTOCOL, BULK_STREAMS);
            let identify = identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_string(),
                key.public(),
            ));
            let mdns = if enable_mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                sync,
                gossipsub,
                live,
                bulk,
                identify,
                mdns: Toggle::from(mdns),
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// One request-response behaviour for sync messages on `protocol`.
fn sync_behaviour(protocol: &'static str, streams: usize) -> SyncBehaviour {
    let codec = request_response::cbor::codec::Codec::<SyncMessage, Ack>::default()
        .set_request_size_maximum(limits::MAX_SYNC_MESSAGE_BYTES as u64)
        .set_response_size_maximum(1024);
    request_response::Behaviour::with_codec(
        codec,
        [(
            StreamProtocol::new(protocol),
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(30))
            .with_max_concurrent_streams(streams),
    )
}

impl Behaviour {
    /// The behaviour carrying `class`.
    pub fn class_mut(&mut self, class: Class) -> &mut SyncBehaviour {
        match class {
            Class::Control => &mut self.sync,
            Class::Live => &mut self.live,
            Class::Bulk => &mut self.bulk,
        }
    }
}
