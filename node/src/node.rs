//! The node: an actor that owns the swarm, the store and the sync engine, and the cloneable
//! [`NodeHandle`] applications hold.
//!
//! Shape (after iroh-gossip): one task owns all mutable state; handles talk to it over a
//! bounded channel (`COMMAND_CAP`); the loop is `select! { biased; … }` with local commands
//! first. Reads do not go through the actor: redb serves concurrent readers, and a write is
//! answered only after its transaction committed, so reads see every acknowledged write.
//!
//! Writes arriving together are group-committed: the actor drains up to `GROUP_COMMIT_MAX`
//! queued write commands, seals each into its own batch, stores them all in one durable redb
//! transaction, then answers each writer and gossips the batches.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, mdns, request_response, Multiaddr, PeerId, Swarm};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use blazedb_crypto::{KxPolicy, LinkRegistry};
use blazedb_identity::{Keypair, PublicKey};
use blazedb_protocol::capability::{self, Chain, Rights, TokenId};
use blazedb_protocol::{
    limits, Action, BatchError, Engine, EngineConfig, GossipVerdict, Op, SyncMessage, VerifiedBatch,
};

use crate::materializer::{self, Job, MatSync};
use crate::net::{self, Ack, Behaviour, BehaviourEvent, Class};
use crate::store::{Change, Fields, NamespaceRecord, Store, StoreError};

/// Capacity of the command channel into the actor.
pub const COMMAND_CAP: usize = 256;
/// Most write commands sealed into one group commit.
const GROUP_COMMIT_MAX: usize = 64;
/// Capacity of the change broadcast (slow subscribers see a `Lagged` gap).
const CHANGES_CAP: usize = 4096;
/// Most bytes served in answer to one fetch.
const SERVE_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Most unanswered sync requests to one peer. Past it, further sync messages to that peer are
/// dropped, not queued: each is sent again later (Have and Present every anti-entropy round, a
/// fetch when it times out, pushed and served batches through the peer's catch-up).
pub const SYNC_INFLIGHT_MAX: usize = 128;
/// Most fetch answers (bulk) sent to one peer and not yet acknowledged; further fetches from
/// it wait in its bulk queue, unread from the store.
const BULK_INFLIGHT_MAX: usize = 4;
/// Most fetches waiting in one peer's bulk queue; past that they are dropped (the peer's
/// fetch times out and goes elsewhere).
const BULK_QUEUE_MAX: usize = 256;
/// The public namespace every node joins unless told not to.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Errors seen by users of the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The namespace is not joined by this node.
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
    /// The request is invalid (names, sizes, values).
    #[error("{0}")]
    Invalid(String),
    /// The node cannot answer right now (records catching up, or failed).
    #[error("{0}")]
    Unavailable(String),
    /// Our capability does not allow it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node has stopped.
    #[error("node is shut down")]
    Stopped,
}

/// What a node is built from.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Directory holding the key file and the store.
    pub data_dir: PathBuf,
    /// p2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (and to re-dial while disconnected).
    pub bootstrap: Vec<Multiaddr>,
    /// Local-network discovery.
    pub mdns: bool,
    /// Join the public `default` namespace.
    pub default_namespace: bool,
    /// Sync engine tunables.
    pub engine: EngineConfig,
    /// Which key exchanges links may use (default: hybrid post-quantum only).
    pub pq_policy: KxPolicy,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("blazedb-data"),
            listen: vec!["/ip4/0.0.0.0/tcp/7701".parse().expect("valid multiaddr")],
            bootstrap: Vec::new(),
            mdns: true,
            default_namespace: true,
            engine: EngineConfig::default(),
            pq_policy: KxPolicy::Strict,
        }
    }
}

/// Builder of a node: `Node::builder().data_dir(..).spawn().await`.
#[derive(Clone, Debug, Default)]
pub struct NodeBuilder {
    cfg: NodeConfig,
}

/// Entry point of the embedding API.
pub struct Node;

impl Node {
    /// A builder with the defaults of `blazedb node`.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }
}

impl NodeBuilder {
    /// Data directory (created if missing).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cfg.data_dir = dir.into();
        self
    }
    /// Replaces the listen addresses.
    pub fn listen(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.cfg.listen = addrs;
        self
    }
    /// Adds a bootstrap peer address.
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.cfg.bootstrap.push(addr);
        self
    }
    /// Turns mDNS discovery on or off.
    pub fn mdns(mut self, on: bool) -> Self {
        self.cfg.mdns = on;
        self
    }
    /// Joins (or not) the public `default` namespace.
    pub fn default_namespace(mut self, on: bool) -> Self {
        self.cfg.default_namespace = on;
        self
    }
    /// Sync engine tunables.
    pub fn engine(mut self, cfg: EngineConfig) -> Self {
        self.cfg.engine = cfg;
        self
    }
    /// Fetch windows in flight per (namespace, author) during catch-up
    /// ([`EngineConfig::fetch_stripes`]; 1 = one window at a time).
    pub fn fetch_stripes(mut self, n: u32) -> Self {
        self.cfg.engine.fetch_stripes = n.max(1);
        self
    }
    /// Link key-exchange policy.
    pub fn pq_policy(mut self, policy: KxPolicy) -> Self {
        self.cfg.pq_policy = policy;
        self
    }
    /// The whole configuration.
    pub fn config(mut self, cfg: NodeConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Opens the data directory, starts the swarm and the actor, and waits until every
    /// listen address is bound.
    pub async fn spawn(self) -> anyhow::Result<NodeHandle> {
        spawn(self.cfg).await
    }
}

/// A peer in [`Status`].
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    /// libp2p PeerId.
    pub peer_id: String,
    /// did:key of the peer (same key).
    pub did: Option<String>,
    /// Remote address of the first connection.
    pub address: String,
    /// Transport of that connection.
    pub transport: String,
    /// Security protocol of the link.
    pub security: String,
    /// Key exchange negotiated on the link (`X25519MLKEM768` under the strict policy).
    pub key_exchange: Option<String>,
}

/// A namespace in [`Status`].
#[derive(Clone, Debug, Serialize)]
pub struct NamespaceStatus {
    /// Name.
    pub name: String,
    /// Chain heads: author did:key → highest seq held.
    pub heads: BTreeMap<String, u64>,
    /// Owned (capabilities required, never gossiped) or public.
    pub owned: bool,
    /// Our rights in an owned namespace.
    pub rights: Option<String>,
}

/// Snapshot of a node's state (`GET /v1/status`).
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// did:key of the node.
    pub did: String,
    /// libp2p PeerId (same key).
    pub peer_id: String,
    /// Bound p2p addresses.
    pub listen_addrs: Vec<String>,
    /// Connected peers.
    pub peers: Vec<PeerStatus>,
    /// Joined namespaces.
    pub namespaces: Vec<NamespaceStatus>,
}

/// A capability issued by [`NodeHandle::invite`].
#[derive(Clone, Debug, Serialize)]
pub struct Invite {
    /// Namespace.
    pub ns: String,
    /// The token chain in text form (`blzcap1…`): give it to the invitee for `ns join`.
    pub token: String,
    /// Id of the new (leaf) token: what `ns revoke` takes.
    pub id: String,
    /// did:key of the invitee.
    pub to: String,
    /// Rights granted.
    pub rights: String,
}

/// Receipt of a durable write.
#[derive(Clone, Debug, Serialize)]
pub struct WriteReceipt {
    /// Batch id (hex).
    pub batch: String,
    /// Seq of the batch in this node's chain.
    pub seq: u64,
    /// Ops in the batch.
    pub ops: usize,
}

/// Counters exported at `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Batches written locally.
    pub local_batches: AtomicU64,
    /// Ops written locally.
    pub local_ops: AtomicU64,
    /// Batches stored from peers.
    pub remote_batches: AtomicU64,
    /// Batches or messages rejected from peers.
    pub rejected: AtomicU64,
    /// Peers dropped for misbehaviour.
    pub peers_dropped: AtomicU64,
    /// Group commits performed.
    pub commits: AtomicU64,
    /// Duplicate batches received (gossip, pushes, fetch answers, replays).
    pub duplicates: AtomicU64,
    /// Batches stored but ineffective (revoked capability).
    pub ineffective: AtomicU64,
    /// Pushes to slow readers dropped (they catch up by fetching).
    pub pushes_dropped: AtomicU64,
    /// Envelope bytes of batches written locally.
    pub local_bytes: AtomicU64,
    /// Envelope bytes of batches served to peers' fetches.
    pub served_bytes: AtomicU64,
    /// Fetches from peers that waited in a bulk queue (answers to that peer in flight).
    pub serves_queued: AtomicU64,
    /// Fetches from peers dropped because their bulk queue was full.
    pub serves_dropped: AtomicU64,
    /// Sync messages dropped because their peer already had [`SYNC_INFLIGHT_MAX`] unanswered
    /// (pushes, fetch answers, Have, Fetch; all are sent again later).
    pub sync_dropped: AtomicU64,
    /// Highest number of unanswered sync requests to one peer seen (≤ [`SYNC_INFLIGHT_MAX`]).
    pub sync_inflight_max: AtomicU64,
    /// Gossip publishes refused because every subscriber's send queue was full
    /// ([`net::GOSSIP_QUEUE_LEN`]); those peers catch up by fetching.
    pub gossip_dropped: AtomicU64,
    /// Highest depth of the command channel seen by the actor (≤ [`COMMAND_CAP`]).
    pub commands_max: AtomicU64,
    /// Jobs handed to the materializer.
    pub mat_jobs_sent: AtomicU64,
    /// Highest materializer queue depth seen: jobs handed over and not yet picked up
    /// (≤ [`materializer::QUEUE_CAP`] + 1, the one being picked up).
    pub mat_queue_max: AtomicU64,
}

/// Depths of the node's bounded queues: now, and the highest seen since start.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueueDepths {
    /// Commands queued for the actor (≤ [`COMMAND_CAP`]).
    pub commands: u64,
    /// Highest command queue depth seen.
    pub commands_max: u64,
    /// Jobs queued for the materializer (≤ [`materializer::QUEUE_CAP`] + 1).
    pub materializer_jobs: u64,
    /// Highest materializer queue depth seen.
    pub materializer_jobs_max: u64,
    /// Highest number of unanswered sync requests to one peer seen (≤ [`SYNC_INFLIGHT_MAX`]).
    pub sync_inflight_max: u64,
    /// Upper bound of every sampled depth of a per-peer gossip send queue (gossipsub samples
    /// each queue at every heartbeat into buckets 50 wide), `None` before the first sample.
    /// The queue itself holds at most [`net::GOSSIP_QUEUE_LEN`] messages.
    pub gossip_queue_sampled_max: Option<u64>,
}

enum Command {
    CreateNamespace {
        reply: oneshot::Sender<Result<String, NodeError>>,
    },
    Invite {
        ns: String,
        to: PublicKey,
        rights: Rights,
        prefix: Option<String>,
        expires_ms: Option<u64>,
        reply: oneshot::Sender<Result<Invite, NodeError>>,
    },
    Join {
        chain: Chain,
        reply: oneshot::Sender<Result<String, NodeError>>,
    },
    Write {
        ns: String,
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<WriteReceipt, NodeError>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

struct Shared {
    /// gossipsub's metrics (read-only after start).
    registry: libp2p::metrics::Registry,
    store: Arc<Store>,
    mat: Arc<MatSync>,
    keypair: Keypair,
    namespaces: RwLock<BTreeSet<String>>,
    data_dir: PathBuf,
    changes: broadcast::Sender<Change>,
    metrics: Metrics,
    listen_addrs: watch::Receiver<Vec<Multiaddr>>,
}

/// A cloneable handle on a running node. The node stops when [`NodeHandle::shutdown`] is
/// called or the last handle is dropped.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl NodeHandle {
    /// The node's did:key.
    pub fn did(&self) -> String {
        self.shared.keypair.public().to_did()
    }

    /// The node's libp2p PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.shared.keypair.public().to_peer_id()
    }

    /// Bound p2p addresses.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.shared.listen_addrs.borrow().clone()
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// gossipsub's own metrics, in Prometheus text format.
    pub fn gossip_metrics_text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.shared.registry);
        out
    }

    /// Gossip messages received (every copy, before de-duplication) and accepted as new
    /// (after), summed over topics: the difference is the duplicate copies on the wire.
    pub fn gossip_received(&self) -> (u64, u64) {
        let text = self.gossip_metrics_text();
        let sum = |name: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        (
            sum("topic_msg_recv_counts_unfiltered_total"),
            sum("topic_msg_recv_counts_total"),
        )
    }

    /// Depths of the bounded queues (also at `/metrics`).
    pub fn queues(&self) -> QueueDepths {
        let m = &self.shared.metrics;
        let sent = m.mat_jobs_sent.load(Ordering::Relaxed);
        QueueDepths {
            commands: (COMMAND_CAP - self.tx.capacity()) as u64,
            commands_max: m.commands_max.load(Ordering::Relaxed),
            materializer_jobs: sent.saturating_sub(self.shared.mat.taken()),
            materializer_jobs_max: m.mat_queue_max.load(Ordering::Relaxed),
            sync_inflight_max: m.sync_inflight_max.load(Ordering::Relaxed),
            gossip_queue_sampled_max: gossip_queue_sampled_max(&self.gossip_metrics_text()),
        }
    }

    /// Whether `ns` is joined.
    pub fn has_namespace(&self, ns: &str) -> bool {
        self.shared.namespaces.read().is_ok_and(|n| n.contains(ns))
    }

    fn check_ns(&self, ns: &str) -> Result<(), NodeError> {
        if self.has_namespace(ns) {
            Ok(())
        } else {
            Err(NodeError::UnknownNamespace(ns.chars().take(80).collect()))
        }
    }

    /// Writes ops to `ns` as one batch; returns once the batch is durable.
    pub async fn write(&self, ns: &str, ops: Vec<Op>) -> Result<WriteReceipt, NodeError> {
        self.check_ns(ns)?;
        if ops.is_empty() {
            return Err(NodeError::Invalid("no ops given".into()));
        }
        if ops.len() > limits::MAX_OPS_PER_BATCH {
            return Err(NodeError::Invalid(format!(
                "{} ops exceed the limit of {} per call",
                ops.len(),
                limits::MAX_OPS_PER_BATCH
            )));
        }
        for op in &ops {
            op.validate()
                .map_err(|e| NodeError::Invalid(e.to_string()))?;
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Write {
                ns: ns.to_string(),
                ops,
                reply,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Upserts fields of one record.
    pub async fn put(
        &self,
        ns: &str,
        collection: &str,
        key: &str,
        fields: Fields,
    ) -> Result<WriteReceipt, NodeError> {
        let op = Op::Upsert {
            collection: collection.to_string(),
            key: key.to_string(),
            hlc: Default::default(),
            fields: fields.into_iter().collect(),
        };
        self.write(ns, vec![op]).await
    }

    /// Deletes one record (tombstone).
    pub async fn delete(
        &self,
        ns: &str,
        collection: &str,
        key: &str,
    ) -> Result<WriteReceipt, NodeError> {
        let op = Op::Delete {
            collection: collection.to_string(),
            key: key.to_string(),
            hlc: Default::default(),
        };
        self.write(ns, vec![op]).await
    }

    /// Reads one record's visible fields.
    pub fn get(&self, ns: &str, collection: &str, key: &str) -> Result<Option<Fields>, NodeError> {
        self.check_ns(ns)?;
        blazedb_protocol::op::validate_collection(collection)
            .and_then(|_| blazedb_protocol::op::validate_key(key))
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        self.wait_applied()?;
        Ok(self.shared.store.get(ns, collection, key)?)
    }

    /// Lists records of a collection by key prefix.
    pub fn list(
        &self,
        ns: &str,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Fields)>, NodeError> {
        self.check_ns(ns)?;
        blazedb_protocol::op::validate_collection(collection)
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        if prefix.len() > limits::MAX_KEY_LEN {
            return Err(NodeError::Invalid(
                "prefix longer than the longest key".into(),
            ));
        }
        self.wait_applied()?;
        Ok(self.shared.store.list(ns, collection, prefix, limit)?)
    }

    /// Creates a namespace owned by a fresh key kept in the data directory; this node gets an
    /// admin capability for it. Returns the namespace id.
    pub async fn create_namespace(&self) -> Result<String, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CreateNamespace { reply }).await?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Issues a capability for `ns` to `to` (requires the owner key or an admin capability).
    pub async fn invite(
        &self,
        ns: &str,
        to: PublicKey,
        rights: Rights,
        prefix: Option<String>,
        expires_ms: Option<u64>,
    ) -> Result<Invite, NodeError> {
        self.check_ns(ns)?;
        let (reply, rx) = oneshot::channel();
        let ns = ns.to_string();
        self.send(Command::Invite {
            ns,
            to,
            rights,
            prefix,
            expires_ms,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Joins an owned namespace with a capability issued to this node. Returns its id.
    pub async fn join(&self, token: &str) -> Result<String, NodeError> {
        let chain = Chain::from_text(token)
            .map_err(|e| NodeError::Invalid(format!("not a valid capability token: {e}")))?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Join { chain, reply }).await?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Revokes a capability token (and everything delegated from it) in `ns`.
    pub async fn revoke(&self, ns: &str, token: TokenId) -> Result<WriteReceipt, NodeError> {
        self.write(
            ns,
            vec![Op::Revoke {
                token: token.to_hex(),
                hlc: Default::default(),
            }],
        )
        .await
    }

    /// Dials a peer address (in addition to bootstrap peers and mDNS discoveries).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Dial { addr, reply }).await?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Read-your-writes: wait until every batch durable before this call is in the records.
    fn wait_applied(&self) -> Result<(), NodeError> {
        self.shared
            .mat
            .wait_applied()
            .map_err(NodeError::Unavailable)
    }

    async fn send(&self, cmd: Command) -> Result<(), NodeError> {
        self.tx.send(cmd).await.map_err(|_| NodeError::Stopped)
    }

    /// A live stream of record changes (all namespaces).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }

    /// Current status.
    pub async fn status(&self) -> Result<Status, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Status { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// (batches, records) held in the store.
    pub fn counts(&self) -> Result<(u64, u64), NodeError> {
        self.wait_applied()?;
        Ok(self.shared.store.counts()?)
    }

    /// Stops the node and waits until it has stopped.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Waits until the actor has exited (after shutdown).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Where the node keeps its files.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("node.key")
}

/// Path of the store file.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store.redb")
}

async fn spawn(cfg: NodeConfig) -> anyhow::Result<NodeHandle> {
    use anyhow::Context;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let keypair = Keypair::load_or_create(&key_path(&cfg.data_dir))?;
    let store = Store::open(&store_path(&cfg.data_dir))
        .with_context(|| format!("opening store in {}", cfg.data_dir.display()))?;

    let mut engine: Engine<PeerId> = Engine::new(cfg.engine.clone());
    let mut namespaces = BTreeSet::new();
    let mut public = BTreeSet::new();
    if cfg.default_namespace {
        engine.join(DEFAULT_NAMESPACE);
        namespaces.insert(DEFAULT_NAMESPACE.to_string());
        public.insert(DEFAULT_NAMESPACE.to_string());
    }
    for (ns, rec) in store.namespaces()? {
        if rec.owned {
            let chain =
                match &rec.chain {
                    Some(bytes) => Some(Chain::decode(bytes).with_context(|| {
                        format!("stored capability for namespace {ns} is invalid")
                    })?),
                    None => None,
                };
            engine.join_owned(&ns, chain);
            for (token, at) in store.revocations(&ns)? {
                engine.load_revocation(&ns, token, at);
            }
        } else {
            engine.join(&ns);
            public.insert(ns.clone());
        }
        namespaces.insert(ns);
    }
    let heads = store.heads()?;
    for h in &heads {
        if namespaces.contains(&h.ns) {
            engine.load_head(&h.ns, h.author, h.seq, h.id, h.hlc_max);
        }
    }

    if cfg.pq_policy == KxPolicy::Compat {
        warn!(
            "pq-policy=compat: links with classical-only (X25519) peers are ACCEPTED and are not \
             post-quantum secure"
        );
    }
    let links = LinkRegistry::default();
    let mut registry = libp2p::metrics::Registry::default();
    let mut swarm = net::build_swarm_metered(
        keypair.to_libp2p(),
        cfg.mdns,
        cfg.pq_policy,
        links.clone(),
        &mut registry,
    )?;
    let mut topics = HashMap::new();
    // Owned namespaces are never gossiped (gossipsub has no read access control).
    for ns in &public {
        let t = net::topic(ns);
        swarm.behaviour_mut().gossipsub.subscribe(&t)?;
        topics.insert(t.hash(), ns.clone());
    }
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("listening on {addr}"))?;
    }
    // Wait for the listeners to bind, so callers can read real ports.
    let mut bound = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bound.len() < cfg.listen.len() {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .context("timed out binding listen addresses")?;
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => bound.push(address),
            SwarmEvent::ListenerError { error, .. } => anyhow::bail!("listener error: {error}"),
            SwarmEvent::ListenerClosed { reason: Err(e), .. } => {
                anyhow::bail!("listener closed: {e}")
            }
            _ => {}
        }
    }
    for addr in &cfg.bootstrap {
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, "dialing bootstrap peer: {e}");
        }
    }

    let (listen_tx, listen_rx) = watch::channel(bound);
    let (changes, _) = broadcast::channel(CHANGES_CAP);
    // Records behind the log (a crash, or a stop with work queued): apply them first.
    let store = Arc::new(store);
    let behind = store.unapplied(&heads)?;
    if !behind.is_empty() {
        info!(
            batches = behind.len(),
            "applying logged batches to the records"
        );
        for chunk in behind.chunks(256) {
            store.apply(chunk, true)?;
        }
    }
    let mat = Arc::new(MatSync::default());
    let (mat_tx, mat_thread) = materializer::spawn(store.clone(), mat.clone(), changes.clone());
    let shared = Arc::new(Shared {
        registry,
        store,
        mat,
        keypair: keypair.clone(),
        namespaces: RwLock::new(namespaces),
        data_dir: cfg.data_dir.clone(),
        changes,
        metrics: Metrics::default(),
        listen_addrs: listen_rx,
    });
    let (tx, rx) = mpsc::channel(COMMAND_CAP);
    let actor = Actor {
        swarm,
        engine,
        shared: shared.clone(),
        rx,
        topics,
        listen_tx,
        bootstrap: cfg.bootstrap.clone(),
        connected: HashMap::new(),
        links,
        mat_tx: Some(mat_tx),
        inflight: HashMap::new(),
        bulk_queue: HashMap::new(),
        mat_thread: Some(mat_thread),
    };
    let span = tracing::info_span!("node", peer = %keypair.public().to_peer_id());
    tokio::spawn(tracing::Instrument::instrument(actor.run(), span));
    info!(did = %keypair.public().to_did(), "node started");
    Ok(NodeHandle { tx, shared })
}

struct Actor {
    swarm: Swarm<Behaviour>,
    engine: Engine<PeerId>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    topics: HashMap<gossipsub::TopicHash, String>,
    listen_tx: watch::Sender<Vec<Multiaddr>>,
    bootstrap: Vec<Multiaddr>,
    connected: HashMap<PeerId, Multiaddr>,
    links: LinkRegistry,
    mat_tx: Option<std::sync::mpsc::SyncSender<Job>>,
    /// Sync requests sent to each peer, per traffic class, and not yet answered.
    inflight: HashMap<(PeerId, Class), usize>,
    /// Fetches from each peer waiting for its bulk answers in flight to drop below
    /// `BULK_INFLIGHT_MAX` (bounded by `BULK_QUEUE_MAX`).
    bulk_queue: HashMap<PeerId, VecDeque<ServeRequest>>,
    mat_thread: Option<std::thread::JoinHandle<()>>,
}

/// A fetch to answer from the store.
struct ServeRequest {
    ns: String,
    author: [u8; 32],
    from_seq: u64,
    limit: u32,
    until: Option<blazedb_protocol::Hlc>,
}

enum Flow {
    Continue,
    Stop(Option<oneshot::Sender<()>>),
}

impl Actor {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(Duration::from_secs(3));
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop_reply = loop {
            tokio::select! {
                biased;
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break None };
                    self.shared
                        .metrics
                        .commands_max
                        .fetch_max(self.rx.len() as u64, Ordering::Relaxed);
                    if let Flow::Stop(reply) = self.on_command(cmd) {
                        break reply;
                    }
                }
                ev = self.swarm.select_next_some() => {
                    if let Flow::Stop(reply) = self.on_swarm_event(ev) {
                        break reply;
                    }
                }
                _ = tick.tick() => {
                    let actions = self.engine.tick(now_ms());
                    if let Flow::Stop(reply) = self.execute(actions) {
                        break reply;
                    }
                }
                _ = redial.tick() => self.redial_bootstrap(),
            }
        };
        info!("node stopping");
        // Drop everything (connections, the actor's share of the store) before answering, so
        // the caller of shutdown() sees a node that is really gone: once its own handles are
        // dropped too, the store file is closed and can be opened again.
        // Let the materializer finish what is queued and make the view durable first.
        self.mat_tx.take();
        if let Some(t) = self.mat_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        drop(self);
        if let Some(reply) = stop_reply {
            let _ = reply.send(());
        }
    }

    fn redial_bootstrap(&mut self) {
        for addr in &self.bootstrap {
            if !self.connected.values().any(|a| a == addr) {
                let _ = self.swarm.dial(addr.clone());
            }
        }
    }

    fn on_command(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Write { ns, ops, reply } => {
                let mut writes = vec![(ns, ops, reply)];
                // Group commit: take whatever else is already queued.
                while writes.len() < GROUP_COMMIT_MAX {
                    match self.rx.try_recv() {
                        Ok(Command::Write { ns, ops, reply }) => writes.push((ns, ops, reply)),
                        Ok(other) => {
                            let flow = self.commit_writes(std::mem::take(&mut writes));
                            if let Flow::Stop(r) = flow {
                                return Flow::Stop(r);
                            }
                            return self.on_command(other);
                        }
                        Err(_) => break,
                    }
                }
                self.commit_writes(writes)
            }
            Command::CreateNamespace { reply } => {
                let _ = reply.send(self.create_namespace());
                Flow::Continue
            }
            Command::Invite {
                ns,
                to,
                rights,
                prefix,
                expires_ms,
                reply,
            } => {
                let _ = reply.send(self.invite(&ns, to, rights, prefix, expires_ms));
                Flow::Continue
            }
            Command::Join { chain, reply } => {
                let res = self.join(chain);
                let _ = reply.send(res);
                Flow::Continue
            }
            Command::Dial { addr, reply } => {
                let res = self
                    .swarm
                    .dial(addr)
                    .map_err(|e| NodeError::Invalid(format!("cannot dial: {e}")));
                let _ = reply.send(res);
                Flow::Continue
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
                Flow::Continue
            }
            Command::Shutdown { reply } => Flow::Stop(Some(reply)),
        }
    }

    #[allow(clippy::type_complexity)]
    fn commit_writes(
        &mut self,
        writes: Vec<(
            String,
            Vec<Op>,
            oneshot::Sender<Result<WriteReceipt, NodeError>>,
        )>,
    ) -> Flow {
        let now = now_ms();
        let mut actions = Vec::new();
        let mut replies = Vec::new();
        for (ns, ops, reply) in writes {
            if !self.engine.has_namespace(&ns) {
                let _ = reply.send(Err(NodeError::UnknownNamespace(ns)));
                continue;
            }
            let n_ops = ops.len();
            match self.engine.write(&ns, &self.shared.keypair, ops, now) {
                Ok((vb, acts)) => {
                    actions.extend(acts);
                    let len = vb.bytes.len() as u64;
                    self.shared
                        .metrics
                        .local_bytes
                        .fetch_add(len, Ordering::Relaxed);
                    replies.push((
                        reply,
                        WriteReceipt {
                            batch: vb.id.to_hex(),
                            seq: vb.header.seq,
                            ops: n_ops,
                        },
                    ));
                }
                Err(BatchError::Unauthorized(why)) => {
                    let _ = reply.send(Err(NodeError::Forbidden(why)));
                }
                Err(e) => {
                    let _ = reply.send(Err(NodeError::Invalid(e.to_string())));
                }
            }
        }
        let m = &self.shared.metrics;
        m.local_batches
            .fetch_add(replies.len() as u64, Ordering::Relaxed);
        m.local_ops.fetch_add(
            replies.iter().map(|(_, r)| r.ops as u64).sum(),
            Ordering::Relaxed,
        );
        let flow = self.execute(actions);
        for (reply, receipt) in replies {
            let res = match flow {
                Flow::Continue => Ok(receipt),
                Flow::Stop(_) => Err(NodeError::Stopped),
            };
            let _ = reply.send(res);
        }
        flow
    }

    /// Carries out engine actions: stores first (one durable transaction), then the rest.
    fn execute(&mut self, actions: Vec<Action<PeerId>>) -> Flow {
        let stats = self.engine.stats();
        let m = &self.shared.metrics;
        m.duplicates
            .store(stats.batches_duplicate, Ordering::Relaxed);
        m.ineffective
            .store(stats.batches_ineffective, Ordering::Relaxed);
        let mut to_store: Vec<VerifiedBatch> = Vec::new();
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Store(vb) => to_store.push(vb),
                other => rest.push(other),
            }
        }
        if !to_store.is_empty() {
            let me = *self.shared.keypair.public().as_bytes();
            let remote = to_store.iter().filter(|b| b.header.author != me).count() as u64;
            match self.shared.store.append_log(&to_store) {
                Ok(()) => {
                    let m = &self.shared.metrics;
                    m.commits.fetch_add(1, Ordering::Relaxed);
                    m.remote_batches.fetch_add(remote, Ordering::Relaxed);
                    self.shared.mat.submitted(to_store.len() as u64);
                    if let Some(tx) = &self.mat_tx {
                        // Blocks while the materializer is QUEUE_CAP jobs behind: backpressure.
                        if tx.send(Job::Apply(to_store)).is_ok() {
                            self.mat_handed_over();
                        }
                    }
                }
                Err(e) => {
                    // The engine already counts these batches as held; continuing would let
                    // memory and disk disagree. Stop: a restart reloads the truth from disk.
                    tracing::error!("storing batches failed, stopping the node: {e}");
                    return Flow::Stop(None);
                }
            }
        }
        for a in rest {
            match a {
                Action::Store(_) => unreachable!("partitioned above"),
                Action::Send { peer, msg } => {
                    let class = Class::of(&msg);
                    if !self.send_sync(peer, class, msg) && class == Class::Live {
                        // A slow reader: the push is dropped rather than queued without
                        // bound; it catches up through anti-entropy and fetches.
                        self.shared
                            .metrics
                            .pushes_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Action::Publish { ns, bytes, .. } => {
                    let topic = net::topic(&ns);
                    match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                        Ok(_) => {}
                        // Nobody to tell yet: peers catch up through anti-entropy.
                        Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                        // Every subscriber's send queue is full (slow links): not queued
                        // further; they catch up by fetching.
                        Err(gossipsub::PublishError::AllQueuesFull(_)) => {
                            self.shared
                                .metrics
                                .gossip_dropped
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => debug!("publish: {e}"),
                    }
                }
                Action::Serve {
                    peer,
                    ns,
                    author,
                    from_seq,
                    limit,
                    until,
                } => {
                    let req = ServeRequest {
                        ns,
                        author,
                        from_seq,
                        limit,
                        until,
                    };
                    let m = &self.shared.metrics;
                    if self.outstanding(&peer, Class::Bulk) < BULK_INFLIGHT_MAX {
                        self.serve(peer, req);
                    } else {
                        // Backpressure: the peer has not taken our last answers yet. Read
                        // nothing more from the store for it until it has.
                        let q = self.bulk_queue.entry(peer).or_default();
                        if q.len() < BULK_QUEUE_MAX {
                            q.push_back(req);
                            m.serves_queued.fetch_add(1, Ordering::Relaxed);
                        } else {
                            m.serves_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Action::ServeRevocations { peer, ns, tokens } => {
                    match self.shared.store.revoking_batches(&ns, &tokens) {
                        Ok(batches) if !batches.is_empty() => {
                            let batches = batches
                                .into_iter()
                                .map(serde_bytes::ByteBuf::from)
                                .collect();
                            let msg = SyncMessage::Revoked { ns, batches };
                            self.send_sync(peer, Class::Control, msg);
                        }
                        Ok(_) => {}
                        Err(e) => warn!("serving revocations: {e}"),
                    }
                }
                Action::Reject { peer, reason } => self.drop_peer(peer, &reason),
                Action::Rebuild { ns, revocations } => {
                    // In order with the batches queued before it.
                    if let Some(tx) = &self.mat_tx {
                        if tx.send(Job::Rebuild { ns, revocations }).is_ok() {
                            self.mat_handed_over();
                        }
                    }
                }
            }
        }
        Flow::Continue
    }

    /// Sync requests of `class` sent to `peer` and not yet answered.
    fn outstanding(&self, peer: &PeerId, class: Class) -> usize {
        self.inflight.get(&(*peer, class)).copied().unwrap_or(0)
    }

    /// Sends a sync message of `class`, unless `peer` already has [`SYNC_INFLIGHT_MAX`]
    /// unanswered control or live messages: then it is dropped (every such message is sent
    /// again later) rather than queued without bound. Bulk answers are gated before they are
    /// read from the store (see `serve`). Returns whether it was sent.
    fn send_sync(&mut self, peer: PeerId, class: Class, msg: SyncMessage) -> bool {
        let m = &self.shared.metrics;
        let outstanding = self.inflight.entry((peer, class)).or_insert(0);
        if class != Class::Bulk && *outstanding >= SYNC_INFLIGHT_MAX {
            m.sync_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        *outstanding += 1;
        m.sync_inflight_max
            .fetch_max(*outstanding as u64, Ordering::Relaxed);
        self.swarm
            .behaviour_mut()
            .class_mut(class)
            .send_request(&peer, msg);
        true
    }

    /// Reads the fetched batches from the store and sends them (bulk).
    fn serve(&mut self, peer: PeerId, req: ServeRequest) {
        let ServeRequest {
            ns,
            author,
            from_seq,
            limit,
            until,
        } = req;
        let store = &self.shared.store;
        match store.chain_range(&ns, &author, from_seq, limit, SERVE_MAX_BYTES, until) {
            Ok(batches) => {
                let n: usize = batches.iter().map(Vec::len).sum();
                self.shared
                    .metrics
                    .served_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                let batches: Vec<serde_bytes::ByteBuf> = batches
                    .into_iter()
                    .map(serde_bytes::ByteBuf::from)
                    .collect();
                // An empty answer is small: it goes with the control messages.
                let class = if batches.is_empty() {
                    Class::Control
                } else {
                    Class::Bulk
                };
                let msg = SyncMessage::Batches {
                    ns,
                    author,
                    batches,
                };
                self.send_sync(peer, class, msg);
            }
            Err(e) => warn!("serving fetch: {e}"),
        }
    }

    /// Serves queued fetches of `peer` while its bulk answers in flight are below the cap.
    fn drain_bulk_queue(&mut self, peer: &PeerId) {
        while self.outstanding(peer, Class::Bulk) < BULK_INFLIGHT_MAX {
            let Some(q) = self.bulk_queue.get_mut(peer) else {
                return;
            };
            let Some(req) = q.pop_front() else {
                self.bulk_queue.remove(peer);
                return;
            };
            self.serve(*peer, req);
        }
    }

    /// Counts a job handed to the materializer and records the queue's high-water mark.
    fn mat_handed_over(&self) {
        let m = &self.shared.metrics;
        let sent = m.mat_jobs_sent.fetch_add(1, Ordering::Relaxed) + 1;
        let depth = sent.saturating_sub(self.shared.mat.taken());
        m.mat_queue_max.fetch_max(depth, Ordering::Relaxed);
    }

    fn drop_peer(&mut self, peer: PeerId, reason: &str) {
        warn!(%peer, "dropping peer: {reason}");
        let m = &self.shared.metrics;
        m.rejected.fetch_add(1, Ordering::Relaxed);
        m.peers_dropped.fetch_add(1, Ordering::Relaxed);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) -> Flow {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listen_tx.send_modify(|v| {
                    if !v.contains(&address) {
                        v.push(address.clone())
                    }
                });
                Flow::Continue
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                let dialed = match &endpoint {
                    libp2p::core::ConnectedPoint::Dialer { address, .. } => Some(address.clone()),
                    _ => None,
                };
                self.connected
                    .entry(peer_id)
                    .or_insert_with(|| dialed.unwrap_or(addr));
                if num_established.get() == 1 {
                    debug!(%peer_id, "peer up");
                    let key = PublicKey::from_peer_id(&peer_id)
                        .ok()
                        .map(|k| *k.as_bytes());
                    let actions = self.engine.peer_up_with_key(peer_id, key, now_ms());
                    return self.execute(actions);
                }
                Flow::Continue
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    debug!(%peer_id, "peer down");
                    self.connected.remove(&peer_id);
                    self.links.remove(&peer_id);
                    for class in Class::ALL {
                        self.inflight.remove(&(peer_id, class));
                    }
                    self.bulk_queue.remove(&peer_id);
                    let actions = self.engine.peer_down(&peer_id, now_ms());
                    return self.execute(actions);
                }
                Flow::Continue
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(ev)) => self.on_gossip(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.on_sync(ev, Class::Control),
            SwarmEvent::Behaviour(BehaviourEvent::Live(ev)) => self.on_sync(ev, Class::Live),
            SwarmEvent::Behaviour(BehaviourEvent::Bulk(ev)) => self.on_sync(ev, Class::Bulk),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
                Flow::Continue
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != net::IDENTIFY_PROTOCOL {
                    debug!(%peer_id, version = %info.protocol_version, "peer speaks another protocol");
                }
                Flow::Continue
            }
            _ => Flow::Continue,
        }
    }

    fn on_gossip(&mut self, ev: gossipsub::Event) -> Flow {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = ev
        else {
            return Flow::Continue;
        };
        let Some(ns) = self.topics.get(&message.topic).cloned() else {
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    gossipsub::MessageAcceptance::Ignore,
                );
            return Flow::Continue;
        };
        let (verdict, actions) =
            self.engine
                .handle_gossip(propagation_source, &ns, message.data, now_ms());
        let acceptance = match &verdict {
            GossipVerdict::Accept => gossipsub::MessageAcceptance::Accept,
            GossipVerdict::Ignore => gossipsub::MessageAcceptance::Ignore,
            GossipVerdict::Reject(_) => gossipsub::MessageAcceptance::Reject,
        };
        // Store before relaying: a batch is passed on only once it is durable here.
        let flow = self.execute(actions);
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, acceptance);
        if let GossipVerdict::Reject(reason) = verdict {
            self.drop_peer(
                propagation_source,
                &format!("invalid gossiped batch: {reason}"),
            );
        }
        flow
    }

    /// A sync event on the protocol of `class` (any message is handled the same whichever
    /// protocol carried it).
    fn on_sync(&mut self, ev: request_response::Event<SyncMessage, Ack>, class: Class) -> Flow {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .class_mut(class)
                        .send_response(channel, Ack {});
                    let actions = self.engine.handle_message(peer, request, now_ms());
                    self.execute(actions)
                }
                request_response::Message::Response { .. } => {
                    self.request_done(&peer, class);
                    Flow::Continue
                }
            },
            request_response::Event::InboundFailure { peer, error, .. } => {
                // A request we could not decode (malformed or oversized) is the peer's fault.
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.drop_peer(peer, &format!("malformed sync request: {error}"));
                }
                Flow::Continue
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                self.request_done(&peer, class);
                debug!(%peer, "sync request failed: {error}");
                Flow::Continue
            }
            request_response::Event::ResponseSent { .. } => Flow::Continue,
        }
    }

    fn request_done(&mut self, peer: &PeerId, class: Class) {
        if let Some(n) = self.inflight.get_mut(&(*peer, class)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inflight.remove(&(*peer, class));
            }
        }
        if class == Class::Bulk {
            self.drain_bulk_queue(peer);
        }
    }

    fn owner_key_path(&self, ns: &str) -> PathBuf {
        self.shared
            .data_dir
            .join("namespaces")
            .join(format!("{ns}.key"))
    }

    fn add_namespace(&mut self, ns: &str, chain: &Chain) -> Result<(), NodeError> {
        let rec = NamespaceRecord {
            owned: true,
            chain: Some(serde_bytes::ByteBuf::from(chain.encode())),
        };
        self.shared.store.put_namespace(ns, &rec)?;
        let actions = self.engine.join_owned(ns, Some(chain.clone()));
        if let Ok(mut n) = self.shared.namespaces.write() {
            n.insert(ns.to_string());
        }
        if let Flow::Stop(_) = self.execute(actions) {
            return Err(NodeError::Stopped);
        }
        Ok(())
    }

    fn create_namespace(&mut self) -> Result<String, NodeError> {
        let owner = Keypair::generate();
        let ns = capability::namespace_id(&owner.public());
        let path = self.owner_key_path(&ns);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| NodeError::Invalid(format!("creating {}: {e}", dir.display())))?;
        }
        owner
            .save_new(&path)
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let me = self.shared.keypair.public();
        let chain = Chain::issue_root(
            &owner,
            &ns,
            &me,
            Rights::Admin,
            None,
            0,
            None,
            rand::random(),
        )
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
        self.add_namespace(&ns, &chain)?;
        info!(%ns, "namespace created");
        Ok(ns)
    }

    fn invite(
        &mut self,
        ns: &str,
        to: PublicKey,
        rights: Rights,
        prefix: Option<String>,
        expires_ms: Option<u64>,
    ) -> Result<Invite, NodeError> {
        if !self.engine.is_owned(ns) {
            return Err(NodeError::Invalid(format!(
                "{ns} is a public namespace: anyone may read and write it, there is nothing to invite to"
            )));
        }
        let owner_path = self.owner_key_path(ns);
        let chain = if owner_path.exists() {
            let owner =
                Keypair::load(&owner_path).map_err(|e| NodeError::Invalid(e.to_string()))?;
            Chain::issue_root(
                &owner,
                ns,
                &to,
                rights,
                prefix,
                0,
                expires_ms,
                rand::random(),
            )
        } else {
            let mine = self
                .engine
                .my_chain(ns)
                .ok_or_else(|| NodeError::Forbidden("no capability in this namespace".into()))?;
            if mine.rights() != Rights::Admin {
                return Err(NodeError::Forbidden(format!(
                    "inviting needs admin rights; this node has {}",
                    mine.rights().as_str()
                )));
            }
            mine.delegate_within(
                &self.shared.keypair,
                &to,
                rights,
                prefix,
                expires_ms,
                rand::random(),
            )
        }
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
        Ok(Invite {
            ns: ns.to_string(),
            token: chain.to_text(),
            id: chain.leaf().id.to_hex(),
            to: to.to_did(),
            rights: rights.as_str().to_string(),
        })
    }

    fn join(&mut self, chain: Chain) -> Result<String, NodeError> {
        let me = *self.shared.keypair.public().as_bytes();
        let ns = chain.ns().to_string();
        if chain.audience() != me {
            return Err(NodeError::Invalid(
                "this capability was issued to another key (check the invitee's did:key)".into(),
            ));
        }
        chain
            .authorizes(&ns, &me, Rights::Read, now_ms())
            .map_err(|e| NodeError::Forbidden(e.to_string()))?;
        self.add_namespace(&ns, &chain)?;
        info!(%ns, rights = chain.rights().as_str(), "namespace joined");
        Ok(ns)
    }

    fn status(&self) -> Status {
        let me = self.shared.keypair.public();
        let mut peers: Vec<PeerStatus> = self
            .connected
            .iter()
            .map(|(p, addr)| {
                let link = self.links.get(p);
                PeerStatus {
                    peer_id: p.to_string(),
                    did: PublicKey::from_peer_id(p).ok().map(|k| k.to_did()),
                    address: addr.to_string(),
                    transport: transport_of(addr),
                    security: link.as_ref().map_or("tls".into(), |l| l.protocol.clone()),
                    key_exchange: link.map(|l| l.key_exchange),
                }
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        let namespaces = self
            .engine
            .namespaces()
            .map(|ns| NamespaceStatus {
                owned: self.engine.is_owned(ns),
                rights: self
                    .engine
                    .my_chain(ns)
                    .map(|c| c.rights().as_str().to_string()),
                name: ns.to_string(),
                heads: self
                    .engine
                    .vector(ns)
                    .into_iter()
                    .map(|(a, seq)| {
                        let did = PublicKey::from_bytes(&a)
                            .map(|k| k.to_did())
                            .unwrap_or_default();
                        (did, seq)
                    })
                    .collect(),
            })
            .collect();
        Status {
            did: me.to_did(),
            peer_id: me.to_peer_id().to_string(),
            listen_addrs: self
                .listen_tx
                .borrow()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            peers,
            namespaces,
        }
    }
}

/// Upper bound of every sampled depth of gossipsub's per-peer (non-priority) send queue, read
/// from its `queue_size` histogram in Prometheus text: the smallest bucket bound that holds
/// every sample.
fn gossip_queue_sampled_max(text: &str) -> Option<u64> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("queue_size_bucket{") else {
            continue;
        };
        if !rest.contains("NonPriority") {
            continue;
        }
        let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
        let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok());
        match (le, count) {
            (Some("+Inf"), Some(c)) => total = Some(c),
            (Some(le), Some(c)) => {
                if let Ok(le) = le.parse::<f64>() {
                    buckets.push((le, c));
                }
            }
            _ => {}
        }
    }
    let total = total.filter(|t| *t > 0.0)?;
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    Some(
        buckets
            .iter()
            .find(|(_, c)| *c >= total)
            .map_or(u64::MAX, |(le, _)| *le as u64),
    )
}

fn transport_of(addr: &Multiaddr) -> String {
    use libp2p::multiaddr::Protocol;
    for p in addr.iter() {
        match p {
            Protocol::Tcp(_) => return "tcp".into(),
            Protocol::QuicV1 => return "quic".into(),
            Protocol::Memory(_) => return "memory".into(),
            _ => {}
        }
    }
    "unknown".into()
}
