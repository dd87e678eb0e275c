//! The node: an actor that owns the swarm, the store and the sync engine, and the cloneable
//! [`NodeHandle`] applications hold.
//!
//! Shape (after iroh-gossip): one task owns all mutable state; handles talk to it over a
//! bounded channel (`COMMAND_CAP`); the loop is `select! { biased; … }` with local commands
//! first. Reads do not go through the actor: redb serves concurrent readers, and a write is
//! answered only after its transaction committed, so reads see every acknowledged write.
//!
//! Writes arriving together are group-committed and coalesced (adaptive batching, see
//! [`crate::batcher`]): the actor drains the queued write commands, and under load waits a
//! bounded moment for more; it then seals the writes to each namespace into as few batches as
//! the limits allow ([`Engine::write_many`]: each caller checked on its own), stores them all
//! in one durable redb transaction, then answers each writer and gossips the batches.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, mdns, request_response, Multiaddr, PeerId, Swarm};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use blazedb_crypto::{KxPolicy, LinkRegistry};
use blazedb_identity::{Keypair, PublicKey};
use blazedb_protocol::capability::{self, Chain, Rights, TokenId};
use blazedb_protocol::engine::HaveEntry;
use blazedb_protocol::{
    limits, squeeze, Action, BatchError, CheckedOps, Engine, EngineConfig, GossipVerdict, Op,
    OpsBuilder, PreVerified, SyncMessage, VerifiedBatch,
};

use crate::batcher::{Batcher, BatchingConfig, Decision};
use crate::committer::{Committer, Done, Reply, Work, WriteAnswer};
use crate::dicts::{DictPolicy, DictTrainer};
use crate::materializer::{self, Job, MatSync};
use crate::net::{self, Ack, Behaviour, BehaviourEvent, Class};
use crate::scrub::{Scrub, ScrubConfig};
use crate::store::{BackupInfo, ChainRange, Change, Fields, NamespaceRecord, Store, StoreError};
use crate::verifier::{self, Verified, Verifier};

/// Capacity of the command channel into the actor.
pub const COMMAND_CAP: usize = 256;
/// Batches from this size on are not handed to gossipsub when no peer is subscribed to
/// their namespace (its copies of them would be for nothing; smaller ones are cheaper to
/// hand over than to check).
const PUBLISH_CHECK_MIN_BYTES: usize = 64 * 1024;
/// Waits for more writes shorter than this are spent yielding to the writers' tasks rather
/// than on a timer (tokio's timers have millisecond resolution).
const SPIN_WAIT_MAX: Duration = Duration::from_millis(1);
/// Capacity of the change broadcast (slow subscribers see a `Lagged` gap).
const CHANGES_CAP: usize = 4096;
/// Fewest records a listing joins the batches not yet staged on (the smallest keys those
/// batches touch in its range; each is read whole). A listing of `limit` records joins up to
/// half again as many, at most [`LIST_JOIN_CAP`]; where the records below the next key
/// touched are fewer than `limit`, it waits for the materializer instead.
const LIST_JOIN_MIN: usize = 256;
/// Most records a listing joins the batches not yet staged on (the shards read hold off
/// staging while they are read).
const LIST_JOIN_CAP: usize = 4096;
/// Most bytes served in answer to one fetch.
const SERVE_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Most unanswered sync requests to one peer. Past it, further sync messages to that peer are
/// dropped, not queued: each is sent again later (Have and Present every anti-entropy round, a
/// fetch when it times out, pushed and served batches through the peer's catch-up).
///
/// At most half of a class's streams per connection: request-response counts the peer's
/// requests to us and ours to it against one budget per protocol, and a request past that
/// budget fails at once ("max sub-streams reached"). With 128 here against 64 streams, a
/// burst of pushes lost all but the first ~64 and the rest waited for the next round: B3's
/// owned namespace fell to ~80k ops/s in about one run in three.
pub const SYNC_INFLIGHT_MAX: usize = 32;
/// Most groups of batches queued for the log committer (the actor waits beyond it).
pub const COMMIT_QUEUE_CAP: usize = crate::committer::QUEUED_MAX;
/// Most fetch answers queued for the verifier (beyond it, the engine verifies on the actor).
pub const VERIFY_QUEUE_CAP: usize = verifier::QUEUED_MAX;
const _: () = assert!(
    2 * SYNC_INFLIGHT_MAX <= crate::net::CONTROL_STREAMS
        && 2 * SYNC_INFLIGHT_MAX <= crate::net::LIVE_STREAMS
);
/// Most fetch answers (bulk) sent to one peer and not yet acknowledged; further fetches from
/// it wait in its bulk queue, unread from the store.
const BULK_INFLIGHT_MAX: usize = 4;
/// Most fetches waiting in one peer's bulk queue; past that they are dropped (the peer's
/// fetch times out and goes elsewhere).
const BULK_QUEUE_MAX: usize = 256;
/// Damaged log batches reported in the error log (each once); more are only counted.
const DAMAGE_REPORTS_MAX: usize = 256;
/// Why this node's own chain in a namespace may go further at its peers than in its log
/// ([`Actor::own_chain_unsettled`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Doubt {
    /// `blazedb repair --cut-damaged` cut it at a damaged batch.
    Cut,
    /// The log was restored from a backup.
    Backup,
}

/// [`NodeConfig::own_chain_wait`]'s default: how long writes wait on a peer's claim that it
/// holds more of this node's own chain while none of it arrives ([`OwnBehind`]).
const OWN_CHAIN_WAIT: Duration = Duration::from_secs(30);
/// Where this node's own chain is in doubt (a restored identity, a backup, a cut), how long
/// after the first peer's vector for a namespace writes there wait for the other connected
/// peers' ([`Actor::told`]): the first to answer may lack the latest batches another holds.
const TOLD_BY_ALL_WAIT: Duration = Duration::from_secs(5);

/// The peers whose vector (`Have`) for a namespace arrived since the start.
struct Heard {
    /// Who told.
    from: HashSet<PeerId>,
    /// When the first did.
    first: tokio::time::Instant,
    /// Nothing is in doubt here (a namespace this node created).
    settled: bool,
}

/// What this node's peers have told of a namespace ([`Actor::told`]).
enum Told {
    /// No peer has.
    Nobody,
    /// Some of the connected peers have, `of` connected; the rest are waited for a while.
    Some { told: usize, of: usize },
    /// Every connected peer has, or the wait for the rest is over.
    Enough,
}

/// A peer's claim that it holds this node's own chain in a namespace further than the log
/// does. Only the node's key can have signed those batches, so the claim is believed only
/// while they keep arriving: if the head does not move for [`NodeConfig::own_chain_wait`], the claim
/// lapses (a peer cannot stop this node's writes by claiming seqs it cannot send) and that
/// peer's later claims are not believed. A claim whose peer goes stays until then: writing
/// before the chain is back would fork it, whoever has to send it.
#[derive(Clone, Copy, Debug)]
struct OwnBehind {
    /// Highest seq claimed.
    seq: u64,
    /// Who claimed it.
    peer: PeerId,
    /// The log's head when it last moved, and when.
    head: u64,
    since: tokio::time::Instant,
}
/// The public namespace every node joins unless told not to.
pub const DEFAULT_NAMESPACE: &str = "default";
/// How often bootstrap peers that are not connected are dialed again.
const REDIAL_EVERY: Duration = Duration::from_secs(3);

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
    /// How local writes are batched (default: adaptive, coalescing, 2 ms latency bound).
    pub batching: BatchingConfig,
    /// When this node trains zstd dictionaries for its small batches (default: on).
    pub dicts: DictPolicy,
    /// Size (approximate bytes) at which the materializer's in-memory delta of record changes
    /// is written into the view file. Under sustained ingest up to about four times this is
    /// held (the delta filling and the one being written, each up to twice this), five at
    /// worst (each up to two and a half times this when flushes run later than expected,
    /// see the materializer's pacing). Measured
    /// (B2m): larger flushes were not faster than ~200k-op ones on workload W. Default
    /// [`materializer::STAGED_FLUSH_BYTES`] (256 MiB, ~400k W ops; 64 MiB halves B3).
    pub view_delta_bytes: usize,
    /// How long writes wait on a peer's claim that it holds more of this node's own chain
    /// than its log, while none of it arrives (then the claim lapses and that peer is not
    /// believed again). Default 30 s.
    pub own_chain_wait: Duration,
    /// The log's background check ([`ScrubConfig`]: 8 MiB/s, first pass 10 minutes after
    /// the start, one a day).
    pub scrub: ScrubConfig,
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
            batching: BatchingConfig::default(),
            dicts: DictPolicy::default(),
            view_delta_bytes: materializer::STAGED_FLUSH_BYTES,
            own_chain_wait: OWN_CHAIN_WAIT,
            scrub: ScrubConfig::default(),
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

    /// Size at which the materializer writes its in-memory delta into the view file
    /// ([`NodeConfig::view_delta_bytes`]; at least 1 MiB).
    pub fn view_delta_bytes(mut self, bytes: usize) -> Self {
        self.cfg.view_delta_bytes = bytes.max(1 << 20);
        self
    }
    /// How long writes wait on an unsupported claim on this node's own chain
    /// ([`NodeConfig::own_chain_wait`]).
    pub fn own_chain_wait(mut self, wait: Duration) -> Self {
        self.cfg.own_chain_wait = wait;
        self
    }

    /// How the log is scrubbed in the background ([`NodeConfig::scrub`]).
    pub fn scrub(mut self, cfg: ScrubConfig) -> Self {
        self.cfg.scrub = cfg;
        self
    }

    /// Link key-exchange policy.
    pub fn pq_policy(mut self, policy: KxPolicy) -> Self {
        self.cfg.pq_policy = policy;
        self
    }
    /// How local writes are batched.
    pub fn batching(mut self, cfg: BatchingConfig) -> Self {
        self.cfg.batching = cfg;
        self
    }
    /// When dictionaries are trained for small batches.
    pub fn dicts(mut self, policy: DictPolicy) -> Self {
        self.cfg.dicts = policy;
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
    /// Batch id (hex). Concurrent writes coalesced into one batch share it.
    pub batch: String,
    /// Seq of the batch in this node's chain.
    pub seq: u64,
    /// Ops of this write.
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
    /// Highest depth of the committer's queue seen (≤ [`COMMIT_QUEUE_CAP`] + 1).
    pub commit_queue_max: AtomicU64,
    /// Highest depth of the verifier's queue seen (≤ [`VERIFY_QUEUE_CAP`] + 1).
    pub verify_queue_max: AtomicU64,
    /// Most actor groups (local flushes, swarm-event groups) one log commit has covered (the
    /// committer takes together what queued during the previous fsync).
    pub commit_groups_max: AtomicU64,
    /// Log commits of light groups (live writes) taken ahead of heavier ones queued before
    /// them (catch-up answers) that share no author with them.
    pub commits_ahead: AtomicU64,
    /// Log commits that took only part of a group larger than a transaction holds
    /// (`committer::COMMIT_BYTES_MAX`).
    pub commits_split: AtomicU64,
    /// Duplicate batches received (gossip, pushes, fetch answers, replays).
    pub duplicates: AtomicU64,
    /// Out-of-order batches dropped because the engine's buffer was full (fetched again
    /// later: wasted transfer).
    pub pending_dropped: AtomicU64,
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
    /// Fetches answered short because a batch read back from the log was damaged (the
    /// answer ends before it; the error log names the batch once).
    pub log_damaged: AtomicU64,
    /// Batches the log's scrub checked sound ([`crate::scrub`]).
    pub scrub_batches: AtomicU64,
    /// Damaged batches the log's scrub found (the first of each chain, every pass).
    pub scrub_damaged: AtomicU64,
    /// Passes of the log's scrub finished.
    pub scrub_passes: AtomicU64,
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
    /// Outgoing dials started (bootstrap peers at start and their redials, mDNS finds, dial
    /// commands).
    pub dials: AtomicU64,
    /// Jobs handed to the materializer.
    pub mat_jobs_sent: AtomicU64,
    /// Highest materializer queue depth seen: jobs handed over and not yet picked up
    /// (≤ [`materializer::QUEUE_CAP`] + 1, the one being picked up).
    pub mat_queue_max: AtomicU64,
    /// Batches sealed from local writes (one per call without coalescing; fewer with it).
    pub batches_sealed: AtomicU64,
    /// Ops in the batches sealed locally (after op merging).
    pub ops_sealed: AtomicU64,
    /// Local write calls acknowledged (durable).
    pub writes_acked: AtomicU64,
    /// Current adaptive flush delay, in microseconds (a gauge).
    pub batch_linger_us: AtomicU64,
    /// Dictionaries trained from this node's small batches.
    pub dicts_trained: AtomicU64,
    /// Local batches sealed with a dictionary.
    pub dict_batches_sealed: AtomicU64,
    /// Local batches whose large payload was compressed with the fast zstd level.
    pub fast_compressed_sealed: AtomicU64,
    /// Local batches sealed with the ops frame their writer compressed ahead.
    pub writer_compressed_sealed: AtomicU64,
    /// Batches stored (local and remote) that use a dictionary.
    pub dict_batches_stored: AtomicU64,
    /// Dictionaries received from peers (asked for: a batch named one we lacked).
    pub dicts_received: AtomicU64,
    /// Batches that waited for a dictionary and were dropped (catch-up brings them again).
    pub dict_waits_dropped: AtomicU64,
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
    /// Highest depth of the log committer's queue seen (≤ [`COMMIT_QUEUE_CAP`] + 1).
    pub commit_queue_max: u64,
    /// Highest depth of the fetch-answer verifier's queue seen (≤ [`VERIFY_QUEUE_CAP`] + 1).
    pub verify_queue_max: u64,
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
    Write(PendingWrite),
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

/// A write queued at the actor, waiting to be sealed.
struct PendingWrite {
    ns: String,
    /// Checked on the caller's task (with their approximate encoded bytes).
    ops: CheckedOps,
    /// When the caller queued it.
    at: tokio::time::Instant,
    reply: oneshot::Sender<WriteAnswer>,
}

/// What the actor, the handles and the committer share.
pub(crate) struct Shared {
    /// gossipsub's metrics (read-only after start).
    registry: libp2p::metrics::Registry,
    pub(crate) store: Arc<Store>,
    pub(crate) mat: Arc<MatSync>,
    pub(crate) keypair: Keypair,
    namespaces: RwLock<BTreeSet<String>>,
    data_dir: PathBuf,
    changes: broadcast::Sender<Change>,
    pub(crate) metrics: Metrics,
    listen_addrs: watch::Receiver<Vec<Multiaddr>>,
    /// Per namespace and author, the highest seq durable in the log (what the committer has
    /// committed). Read without the actor ([`NodeHandle::durable_head`]).
    pub(crate) durable: RwLock<HashMap<String, HashMap<[u8; 32], u64>>>,
    /// Per namespace, the zstd level the actor last chose for large batches: what writers
    /// compress a call's ops ahead at (a stale level only means the actor compresses them).
    levels: RwLock<HashMap<String, i32>>,
    /// A backup of the log is being made ([`NodeHandle::backup`]): one at a time.
    backing_up: Arc<AtomicBool>,
}

impl Shared {
    /// The zstd level the actor last chose for large batches in `ns` ([`Shared::levels`]).
    fn level(&self, ns: &str) -> Option<i32> {
        self.levels.read().ok().and_then(|l| l.get(ns).copied())
    }

    /// Records batches as durable (called by the committer after each commit).
    pub(crate) fn mark_durable(&self, batches: &[VerifiedBatch]) {
        let Ok(mut d) = self.durable.write() else {
            return;
        };
        for vb in batches {
            let h = &vb.header;
            let seq = match d.get_mut(h.ns.as_str()) {
                Some(m) => m.entry(h.author).or_insert(0),
                None => d
                    .entry(h.ns.clone())
                    .or_default()
                    .entry(h.author)
                    .or_insert(0),
            };
            *seq = (*seq).max(h.seq);
        }
    }

    /// Counts a job handed to the materializer and records the queue's high-water mark.
    pub(crate) fn mat_handed_over(&self) {
        let m = &self.metrics;
        let sent = m.mat_jobs_sent.fetch_add(1, Ordering::Relaxed) + 1;
        let depth = sent.saturating_sub(self.mat.taken());
        m.mat_queue_max.fetch_max(depth, Ordering::Relaxed);
    }
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

    /// View flushes committed since the node started, and the records they wrote
    /// ([`Store::view_flushes`]).
    pub fn view_flushes(&self) -> (u64, u64) {
        self.shared.store.view_flushes()
    }

    /// View flushes since the node started that wrote (part of) their delta as a sorted run
    /// beside the records' table, and those that folded a slice of the key space into the
    /// table (the runs' records there, and the delta's); the rest spliced their delta into
    /// the table ([`Store::flush_frozen`]).
    pub fn view_flush_kinds(&self) -> (u64, u64) {
        let store = &self.shared.store;
        (store.view_runs_written(), store.view_folds())
    }

    /// How long the materializer has waited for the view file's flushes since the node
    /// started: staging no faster than a running flush goes, and stopped at the hard bound
    /// for one to end. Writers that outpace the view file are slowed by the sum.
    pub fn view_paced(&self) -> (std::time::Duration, std::time::Duration) {
        self.shared.mat.paced()
    }

    /// Reads so far (gets and listings) that joined batches in the log and not yet in the
    /// records, instead of waiting for the records to catch up.
    pub fn reads_joined(&self) -> u64 {
        self.shared.mat.reads_joined()
    }

    /// Sorted runs held beside the view's records' table now (a read looks in each whose
    /// filter may hold its key).
    pub fn view_runs_held(&self) -> Result<usize, NodeError> {
        Ok(self.shared.store.view_runs_held()?)
    }

    /// Bytes of the runs' Bloom filters held in memory.
    pub fn run_filter_bytes(&self) -> u64 {
        self.shared.store.run_filter_bytes()
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

    /// Whether the records' file still lags the log: batches not yet applied, or applied
    /// only to the in-memory delta (reads already see those; this is about background work
    /// still to come, e.g. for a benchmark that must not measure it).
    pub fn view_pending(&self) -> bool {
        self.shared.mat.backlog() > 0 || self.shared.store.view_pending()
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
            commit_queue_max: m.commit_queue_max.load(Ordering::Relaxed),
            verify_queue_max: m.verify_queue_max.load(Ordering::Relaxed),
            gossip_queue_sampled_max: gossip_queue_sampled_max(&self.gossip_metrics_text()),
        }
    }

    /// The highest seq of `author`'s chain in `ns` that is durable in this node's log (the
    /// batches before it are too: chains are stored contiguously), or `None` if it holds
    /// none. Answered without the actor, so it stays cheap while the node is busy: a way to
    /// wait until a peer's write has reached this node's disk.
    pub fn durable_head(&self, ns: &str, author: &PublicKey) -> Option<u64> {
        let d = self.shared.durable.read().ok()?;
        d.get(ns)?.get(author.as_bytes()).copied()
    }

    /// Writes a copy of this node's log, consistent at one point, into a new file at `to`
    /// and fsyncs it, while the node runs on ([`Store::backup_log`]: a log a node starts
    /// from, or `blazedb restore` makes a data directory of). One backup at a time: another
    /// asked for meanwhile gets [`NodeError::Unavailable`].
    pub async fn backup(&self, to: &Path) -> Result<BackupInfo, NodeError> {
        let to = to.to_path_buf();
        self.backing_up(move |store, _busy| store.backup_log(&to, true))
            .await
    }

    /// [`NodeHandle::backup`] into a file of the data directory that is unlinked as soon as
    /// it is made: the open file is returned to be read (the HTTP API streams it), and its
    /// space is freed once it is closed, whatever happens to the reader. No other backup is
    /// made until the [`BackupFile`] is dropped: a reader that is slow (or stalls) holds one
    /// copy's disk space, never more.
    pub async fn backup_file(&self) -> Result<BackupFile, NodeError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{BACKUP_TEMP_PREFIX}{}-{}.redb",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.shared.data_dir.join(name);
        self.backing_up(move |store, busy| {
            let made = store.backup_log(&path, false);
            let opened = made.and_then(|info| {
                let file = std::fs::File::open(&path).map_err(|e| StoreError::File {
                    path: path.clone(),
                    source: Box::new(StoreError::Redb(e.into())),
                })?;
                Ok(BackupFile { file, info, busy })
            });
            let _ = std::fs::remove_file(&path);
            opened
        })
        .await
    }

    /// Runs `backup` on a blocking thread unless a backup is under way already; the next may
    /// start once the [`Busy`] it is given is dropped (when the copy ends, unless `backup`
    /// keeps it; even if the caller stopped waiting).
    async fn backing_up<T: Send + 'static>(
        &self,
        backup: impl FnOnce(&Store, Busy) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, NodeError> {
        if self.shared.backing_up.swap(true, Ordering::AcqRel) {
            return Err(NodeError::Unavailable(
                "a backup is being made: try again once it is done".into(),
            ));
        }
        let busy = Busy(self.shared.backing_up.clone());
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || backup(&store, busy))
            .await
            .map_err(|_| NodeError::Unavailable("making the backup failed (panicked)".into()))?
            .map_err(Into::into)
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
        // Checked here, on the caller's task: a bad op is refused before anything is queued,
        // and the actor, which every write passes through, does not walk the fields again.
        // A call large enough to be sealed alone is pruned and encoded here too, while its
        // ops are in this core's cache; the actor only stamps it.
        let mut ops = CheckedOps::new(ops).map_err(|e| NodeError::Invalid(e.to_string()))?;
        ops.encode_ahead();
        self.write_checked(ns, ops).await
    }

    /// Writes a call built as a payload ([`OpsBuilder`]: checked and encoded as its ops
    /// were added, no owned ops) to `ns` as one batch; returns once the batch is durable.
    /// The batch is the one the same ops given to [`NodeHandle::write`] would make.
    pub async fn write_built(&self, ns: &str, ops: OpsBuilder) -> Result<WriteReceipt, NodeError> {
        self.check_ns(ns)?;
        if ops.is_empty() {
            return Err(NodeError::Invalid("no ops given".into()));
        }
        self.write_checked(ns, ops.into_checked()).await
    }

    async fn write_checked(
        &self,
        ns: &str,
        mut ops: CheckedOps,
    ) -> Result<WriteReceipt, NodeError> {
        // The ops of a call sealed alone are compressed here too, in parallel with other
        // writers; the actor only compresses the payload's head (the batch is the same).
        if ops.is_encoded_ahead() {
            let level = self.shared.level(ns);
            ops.compress_ahead(level.unwrap_or(squeeze::STRONG_LEVEL));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Write(PendingWrite {
                ns: ns.to_string(),
                ops,
                at: tokio::time::Instant::now(),
                reply,
            }))
            .await
            .map_err(|_| NodeError::Stopped)?;
        // The ops come back with the answer and are freed here, on the writer's task.
        let (answer, spent) = rx.await.map_err(|_| NodeError::Stopped)?;
        drop(spent);
        answer
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

    /// Reads one record's visible fields: with every batch durable in the log before the
    /// call (every write acknowledged before it among them), whether or not the records
    /// have caught up with them yet.
    pub fn get(&self, ns: &str, collection: &str, key: &str) -> Result<Option<Fields>, NodeError> {
        self.check_ns(ns)?;
        blazedb_protocol::op::validate_collection(collection)
            .and_then(|_| blazedb_protocol::op::validate_key(key))
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        // Batches committed and not yet staged are joined here rather than waited for (a
        // catch-up's backlog took a read up to ~100 ms to wait out).
        let unstaged = self.unstaged_for_read()?;
        let got = self
            .shared
            .store
            .get_joining(ns, collection, key, &unstaged);
        Ok(got.inspect_err(|e| self.on_read_error(e))?)
    }

    /// A read that found the view damaged marks it to be made again ([`Self::view_failed`]).
    fn on_read_error(&self, e: &StoreError) {
        if let StoreError::DamagedState(_) = e {
            self.view_failed(&format!("a read found {e}"));
        }
    }

    /// What a read joins to the records: the batches in the log and not yet staged.
    fn unstaged_for_read(&self) -> Result<crate::materializer::UnstagedBatches, NodeError> {
        let unstaged = self
            .shared
            .mat
            .unstaged_for_read()
            .map_err(NodeError::Unavailable)?
            .resolve(|b| self.shared.store.logged(b))?;
        if !unstaged.is_empty() {
            self.shared.mat.joined_read();
        }
        Ok(unstaged)
    }

    /// Lists records of a collection by key prefix (existing records in key order, at most
    /// `limit`), with every batch durable in the log before the call, as [`NodeHandle::get`].
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
        // As `get`, for the first records in range: the batches not yet staged joined to
        // the smallest keys they touch. Where those leave fewer than `limit` records exact,
        // the listing waits for the records instead.
        let unstaged = self.unstaged_for_read()?;
        let store = &self.shared.store;
        let kept_max = LIST_JOIN_MIN
            .max(limit.saturating_add(limit / 2))
            .min(LIST_JOIN_CAP);
        let joined = store.list_joining(ns, collection, prefix, limit, &unstaged, kept_max);
        if let Some(listed) = joined.inspect_err(|e| self.on_read_error(e))? {
            return Ok(listed);
        }
        self.wait_records()?;
        let listed = store.list(ns, collection, prefix, limit);
        Ok(listed.inspect_err(|e| self.on_read_error(e))?)
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

    /// Waits until the records hold every batch durable before this call: what a count
    /// waits for. Reads need not ([`NodeHandle::get`] and most listings join the batches the
    /// records do not hold yet); benchmarks use it to time the records catching up.
    pub fn wait_records(&self) -> Result<(), NodeError> {
        self.shared
            .mat
            .wait_applied()
            .map_err(NodeError::Unavailable)
    }

    async fn send(&self, cmd: Command) -> Result<(), NodeError> {
        self.tx.send(cmd).await.map_err(|_| NodeError::Stopped)
    }

    /// Marks the view file to be made again from the log at the next start: reading it
    /// failed in a way only damage explains (a redb panic). Logged, never fails the caller.
    pub(crate) fn view_failed(&self, why: &str) {
        error!("{why}: the next start makes the view file again from the log");
        if let Err(e) = self.shared.store.mark_view_failed(why) {
            error!("marking the view to be made again failed too: {e}");
        }
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
        self.wait_records()?;
        Ok(self.shared.store.counts()?)
    }

    /// (batches, records) held in the store, for callers that ask often (`/metrics`): the
    /// record count is taken again only once the last one is ten times its own cost old
    /// ([`crate::store::Store::counts_bounded`]), on a thread of its own while this returns
    /// the last one ([`crate::store::Store::counts_for_scrape`]), and does not wait for the
    /// records to catch up with the log. [`NodeHandle::counts`] is exact.
    pub fn counts_bounded(&self) -> Result<(u64, u64), NodeError> {
        Ok(self.shared.store.counts_for_scrape()?)
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

/// Marks a backup under way ([`NodeHandle::backup`]): the next may start once it is dropped.
pub struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A copy of the log made by [`NodeHandle::backup_file`], already unlinked: read `file`;
/// no other backup is made while this is held.
pub struct BackupFile {
    /// The copy, open for reading from its start.
    pub file: std::fs::File,
    /// What it holds.
    pub info: BackupInfo,
    busy: Busy,
}

impl BackupFile {
    /// The file, what it holds, and the mark that keeps other backups waiting (drop it
    /// once the file is read).
    pub fn into_parts(self) -> (std::fs::File, BackupInfo, Busy) {
        (self.file, self.info, self.busy)
    }
}

/// Names of the unlinked backup files [`NodeHandle::backup_file`] makes in the data
/// directory begin so (one left by a crash is removed at the next start).
const BACKUP_TEMP_PREFIX: &str = ".backup-";

/// Where the node keeps its files.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("node.key")
}

/// Path of the store file.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store.redb")
}

/// Removes backup files a crash left in `data_dir` ([`BACKUP_TEMP_PREFIX`]).
fn remove_backup_leftovers(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(BACKUP_TEMP_PREFIX))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

async fn spawn(cfg: NodeConfig) -> anyhow::Result<NodeHandle> {
    use anyhow::Context;
    // The links' random generator seeds itself while the store opens (once per process).
    blazedb_crypto::warm_up();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let key_existed = key_path(&cfg.data_dir).exists();
    remove_backup_leftovers(&cfg.data_dir);
    let keypair = Keypair::load_or_create(&key_path(&cfg.data_dir))?;
    // A damaged view is moved aside and made again from the log (below: every batch then
    // counts as unapplied); a damaged log stops the start here.
    let log_existed = store_path(&cfg.data_dir).exists();
    let (store, _moved) = Store::open_moving_damaged_view(&store_path(&cfg.data_dir))
        .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;

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
    if let Some(chain) = store.view_ahead_of_log(&heads)? {
        // Its watermark would skip the chain's next batches: acknowledged writes would never
        // show. The records it holds may be the last copy: the user decides, and finds the
        // directory as it was (a log opened here for the first time is removed again).
        drop(store);
        if !log_existed {
            let _ = std::fs::remove_file(store_path(&cfg.data_dir));
        }
        return Err(StoreError::ViewAheadOfLog(chain))
            .with_context(|| format!("opening the store in {}", cfg.data_dir.display()));
    }
    if key_existed && !log_existed {
        warn!(
            "this node's identity (node.key) was found without its log: it may have written \
             chains its peers hold. Before its first write in a namespace, a peer must tell \
             what it holds of them there"
        );
        store.mark_identity_restored()?;
    }
    if !key_existed && log_existed {
        // A new identity has written nothing anywhere: no chain of its own to fork.
        store.clear_own_chain_doubts()?;
    }
    let restored = store.identity_restored()?;
    let mut doubted: HashMap<String, Doubt> = HashMap::new();
    for ns in store.backup_marks()? {
        doubted.insert(ns, Doubt::Backup);
    }
    for ns in store.own_chain_cuts()? {
        doubted.insert(ns, Doubt::Cut);
    }
    let mut durable: HashMap<String, HashMap<[u8; 32], u64>> = HashMap::new();
    for h in &heads {
        durable
            .entry(h.ns.clone())
            .or_default()
            .insert(h.author, h.seq);
        if namespaces.contains(&h.ns) {
            engine.load_head(&h.ns, h.author, h.seq, h.id, h.hlc_max);
        }
    }
    for d in store.dicts()?.iter() {
        engine.load_dict(d.clone());
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
    // A window at a time: a view made again from a large log never holds it all.
    let applied = store.apply_unapplied(&heads)?;
    if applied > 0 {
        info!(
            batches = applied,
            "applied logged batches the records lacked"
        );
    }
    let mat = Arc::new(MatSync::default());
    let (mat_tx, mat_thread) = materializer::spawn(
        store.clone(),
        mat.clone(),
        changes.clone(),
        cfg.view_delta_bytes,
    );
    let shared = Arc::new(Shared {
        registry,
        store,
        mat,
        keypair: keypair.clone(),
        namespaces: RwLock::new(namespaces),
        durable: RwLock::new(durable),
        levels: RwLock::default(),
        backing_up: Arc::default(),
        data_dir: cfg.data_dir.clone(),
        changes,
        metrics: Metrics {
            // Every bootstrap address was dialed above.
            dials: AtomicU64::new(cfg.bootstrap.len() as u64),
            ..Metrics::default()
        },
        listen_addrs: listen_rx,
    });
    let (done_tx, commit_done) = mpsc::unbounded_channel();
    let committer = Committer::spawn(shared.clone(), mat_tx, done_tx);
    let (verified_tx, verified_rx) = mpsc::unbounded_channel();
    let verifier = Verifier::spawn(verified_tx);
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
        committer,
        commit_done,
        awaiting: VecDeque::new(),
        verifier,
        verified_rx,
        inflight: HashMap::new(),
        lagging: HashSet::new(),
        damage_reported: HashSet::new(),
        restored,
        doubted,
        heard: HashMap::new(),
        own_behind: HashMap::new(),
        own_claims_ignored: HashSet::new(),
        own_chain_wait: cfg.own_chain_wait,
        gossip_dropped_since_tick: false,
        bulk_queue: HashMap::new(),
        mat_thread: Some(mat_thread),
        scrub: Some(Scrub::spawn(shared.clone(), cfg.scrub)),
        batcher: Batcher::new(&cfg.batching),
        coalesce: cfg.batching.coalesce,
        pending: Vec::new(),
        batch_deadline: None,
        epoch: tokio::time::Instant::now(),
        deferred: None,
        dict_policy: cfg.dicts.clone(),
        trainers: HashMap::new(),
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
    /// Makes batches durable off this thread (and feeds the materializer after them).
    committer: Committer,
    /// The committer's reports: commits done, oldest first.
    commit_done: mpsc::UnboundedReceiver<Done>,
    /// Per commit in flight, oldest first: what runs once it is durable.
    awaiting: VecDeque<Awaiting>,
    /// Verifies fetch answers off this thread.
    verifier: Verifier,
    /// Its verified answers, in the order they were queued.
    verified_rx: mpsc::UnboundedReceiver<Verified>,
    /// Sync requests sent to each peer, per traffic class, and not yet answered.
    inflight: HashMap<(PeerId, Class), usize>,
    /// Peers that missed pushed (live) batches because they had too many unanswered: sent
    /// our vectors once they drain (see `request_done`).
    lagging: HashSet<PeerId>,
    /// Damaged log batches already reported (at most [`DAMAGE_REPORTS_MAX`] kept).
    damage_reported: HashSet<String>,
    /// The log was begun beside an older identity ([`Store::identity_restored`]): a
    /// namespace where this node holds none of its own batches is written only once a
    /// peer's vector for it arrived (`heard`). See [`Actor::own_chain_unsettled`].
    restored: bool,
    /// Namespaces where this node's own chain may go further at its peers than in its log
    /// (`blazedb repair --cut-damaged` cut it, [`Store::own_chain_cuts`]; or the log was
    /// restored from a backup, [`Store::backup_marks`]): written only once a peer's vector
    /// arrived, like a restored identity's.
    doubted: HashMap<String, Doubt>,
    /// Joined namespaces for which a peer's vector (`Have`) arrived since start, and whose.
    heard: HashMap<String, Heard>,
    /// Joined namespaces where a peer holds more of this node's own chain than its log
    /// says: writes there wait until the chain is fetched back that far (or the claim
    /// lapses, [`OwnBehind`]).
    own_behind: HashMap<String, OwnBehind>,
    /// Peers whose claims on this node's own chain lapsed: not believed again (bounded by
    /// [`DAMAGE_REPORTS_MAX`]).
    own_claims_ignored: HashSet<PeerId>,
    /// [`NodeConfig::own_chain_wait`].
    own_chain_wait: Duration,
    /// A publish failed because every subscriber's gossip queue was full (since the last
    /// tick): the next tick sends our vectors to every peer.
    gossip_dropped_since_tick: bool,
    /// Fetches from each peer waiting for its bulk answers in flight to drop below
    /// `BULK_INFLIGHT_MAX` (bounded by `BULK_QUEUE_MAX`).
    bulk_queue: HashMap<PeerId, VecDeque<ServeRequest>>,
    mat_thread: Option<std::thread::JoinHandle<()>>,
    /// The log's background check (stopped before the store is let go).
    scrub: Option<Scrub>,
    /// The adaptive batching policy, fed the pending writes.
    batcher: Batcher,
    /// Seal several callers' writes into one batch.
    coalesce: bool,
    /// Writes waiting to be sealed (bounded by the batcher's size bound).
    pending: Vec<PendingWrite>,
    /// When the open batch must be looked at again (a wait on a timer).
    batch_deadline: Option<tokio::time::Instant>,
    /// Origin of the batcher's microsecond clock.
    epoch: tokio::time::Instant,
    /// While set, `execute` collects actions here instead of running them, and gossip
    /// verdicts wait with them: swarm events that are ready together are handled as one
    /// group, whose batches are stored in one log transaction (one fsync) before any of them
    /// is reported valid to gossipsub (and so relayed).
    deferred: Option<Deferred>,
    /// When to train dictionaries, and each public namespace's samples.
    dict_policy: DictPolicy,
    trainers: HashMap<String, DictTrainer>,
}

/// A gossip message's verdict, reported to gossipsub (which relays only accepted ones).
type Verdict = (gossipsub::MessageId, PeerId, GossipVerdict);

/// Actions and gossip verdicts of a group of swarm events, run together.
#[derive(Default)]
struct Deferred {
    actions: Vec<Action<PeerId>>,
    verdicts: Vec<Verdict>,
    replies: Vec<Reply>,
}

/// What waits for a commit in flight: the other actions of its group, the gossip verdicts on
/// the batches it stores, and whatever was produced after it was queued.
#[derive(Default)]
struct Awaiting {
    actions: Vec<Action<PeerId>>,
    verdicts: Vec<Verdict>,
    /// Status answers (taken when asked): their heads include batches of this commit.
    statuses: Vec<(oneshot::Sender<Status>, Status)>,
}

/// Most swarm events that are ready at once handled as one group (one log commit).
const EVENT_GROUP_MAX: usize = 64;

/// A fetch to answer from the store.
struct ServeRequest {
    ns: String,
    author: [u8; 32],
    from_seq: u64,
    limit: u32,
    max_bytes: Option<u32>,
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
        // First tick one period from now: the bootstrap peers were dialed at start, and an
        // immediate tick dialed each again while that first dial was still connecting (two
        // connections, two handshakes, per bootstrap peer).
        let mut redial =
            tokio::time::interval_at(tokio::time::Instant::now() + REDIAL_EVERY, REDIAL_EVERY);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop_reply = loop {
            let deadline = self.batch_deadline;
            tokio::select! {
                biased;
                Some(done) = self.commit_done.recv() => {
                    if let Flow::Stop(reply) = self.on_committed(done) {
                        break reply;
                    }
                }
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else {
                        // Every handle is gone: seal what is pending, then stop.
                        if let Flow::Stop(reply) = self.flush_writes() {
                            break reply;
                        }
                        break None;
                    };
                    self.shared
                        .metrics
                        .commands_max
                        .fetch_max(self.rx.len() as u64, Ordering::Relaxed);
                    if let Flow::Stop(reply) = self.on_command(cmd) {
                        break reply;
                    }
                    if let Flow::Stop(reply) = self.linger().await {
                        break reply;
                    }
                }
                Some(v) = self.verified_rx.recv() => {
                    if let Flow::Stop(reply) = self.on_verified(v) {
                        break reply;
                    }
                }
                // Woken a little early: the last stretch is spent in `linger`, precisely.
                _ = sleep_until_some(deadline.map(|d| d.checked_sub(SPIN_WAIT_MAX).unwrap_or(d))),
                    if deadline.is_some() => {
                    self.batch_deadline = None;
                    if let Flow::Stop(reply) = self.poll_batch() {
                        break reply;
                    }
                    if let Flow::Stop(reply) = self.linger().await {
                        break reply;
                    }
                }
                ev = self.swarm.select_next_some() => {
                    if let Flow::Stop(reply) = self.on_swarm_events(ev) {
                        break reply;
                    }
                }
                _ = tick.tick() => {
                    let mut actions = self.engine.tick(now_ms());
                    if std::mem::take(&mut self.gossip_dropped_since_tick) {
                        // Published batches were dropped (every subscriber's queue full): if
                        // nothing is published after them, subscribers would see the gap
                        // only at the next anti-entropy round. Our vectors, within a tick,
                        // let them fetch it.
                        let peers: Vec<PeerId> = self.connected.keys().copied().collect();
                        for p in peers {
                            actions.extend(self.engine.haves_for(&p, now_ms()));
                        }
                    }
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
        // Let the committer finish what is queued (writers waiting get their answers), then
        // the materializer, which makes the view durable.
        if let Some(t) = self.committer.close() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(t) = self.mat_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(scrub) = self.scrub.take() {
            // Its step under way ends first (dropping it waits for the thread).
            let _ = tokio::task::spawn_blocking(move || drop(scrub)).await;
        }
        // A record count behind the `/metrics` scrapes shares the store: stop it too.
        let store = Arc::clone(&self.shared.store);
        let _ = tokio::task::spawn_blocking(move || store.stop_background_count()).await;
        drop(self);
        if let Some(reply) = stop_reply {
            let _ = reply.send(());
        }
    }

    fn redial_bootstrap(&mut self) {
        for addr in &self.bootstrap {
            if !self.connected.values().any(|a| a == addr) {
                self.shared.metrics.dials.fetch_add(1, Ordering::Relaxed);
                let _ = self.swarm.dial(addr.clone());
            }
        }
    }

    fn on_command(&mut self, cmd: Command) -> Flow {
        if !matches!(cmd, Command::Write(_)) && !self.pending.is_empty() {
            // Everything queued before a command is handled before it.
            if let Flow::Stop(r) = self.flush_writes() {
                return Flow::Stop(r);
            }
        }
        match cmd {
            Command::Write(w) => {
                self.queue_write(w);
                // Take whatever else is already queued, up to the size bound.
                while !self.batcher.is_full() {
                    match self.rx.try_recv() {
                        Ok(Command::Write(w)) => self.queue_write(w),
                        Ok(other) => return self.on_command(other),
                        Err(_) => break,
                    }
                }
                self.poll_batch()
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
                self.shared.metrics.dials.fetch_add(1, Ordering::Relaxed);
                let res = self
                    .swarm
                    .dial(addr)
                    .map_err(|e| NodeError::Invalid(format!("cannot dial: {e}")));
                let _ = reply.send(res);
                Flow::Continue
            }
            Command::Status { reply } => {
                // The heads it reports are durable: answered once the commits in flight are.
                let status = self.status();
                match self.awaiting.back_mut() {
                    Some(last) => last.statuses.push((reply, status)),
                    None => {
                        let _ = reply.send(status);
                    }
                }
                Flow::Continue
            }
            Command::Shutdown { reply } => Flow::Stop(Some(reply)),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn queue_write(&mut self, w: PendingWrite) {
        let at_us = u64::try_from(w.at.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX);
        self.batcher
            .arrive(at_us, w.ops.len(), w.ops.bytes(), w.ops.sealed_alone());
        self.pending.push(w);
    }

    /// Asks the batching policy about the pending writes: seal them now, or wait.
    fn poll_batch(&mut self) -> Flow {
        match self.batcher.poll(self.now_us()) {
            Decision::Idle => {
                self.batch_deadline = None;
                Flow::Continue
            }
            Decision::Flush(_) => self.flush_writes(),
            Decision::WaitUntil(t) => {
                self.batch_deadline = Some(self.epoch + Duration::from_micros(t));
                Flow::Continue
            }
        }
    }

    /// A short wait for more writes (below a timer's resolution): yield to the writers'
    /// tasks, take what they queued, ask the policy again. Bounded by the policy's latency
    /// bound; longer waits go back to the loop on a timer (`batch_deadline`).
    async fn linger(&mut self) -> Flow {
        loop {
            let Some(deadline) = self.batch_deadline else {
                return Flow::Continue;
            };
            if deadline.saturating_duration_since(tokio::time::Instant::now()) >= SPIN_WAIT_MAX {
                return Flow::Continue;
            }
            tokio::task::yield_now().await;
            let mut got = false;
            loop {
                if self.batcher.is_full() {
                    break;
                }
                match self.rx.try_recv() {
                    Ok(Command::Write(w)) => {
                        self.queue_write(w);
                        got = true;
                    }
                    Ok(other) => {
                        self.batch_deadline = None;
                        return self.on_command(other);
                    }
                    Err(_) => break,
                }
            }
            if !got {
                self.batcher.yielded_idle();
            }
            if let Flow::Stop(r) = self.poll_batch() {
                return Flow::Stop(r);
            }
        }
    }

    /// Seals and commits every pending write.
    fn flush_writes(&mut self) -> Flow {
        self.batch_deadline = None;
        self.batcher.flushed();
        self.shared
            .metrics
            .batch_linger_us
            .store(self.batcher.linger_us(), Ordering::Relaxed);
        if self.pending.is_empty() {
            return Flow::Continue;
        }
        let writes = std::mem::take(&mut self.pending);
        self.commit_writes(writes)
    }

    /// Seals the writes (per namespace, coalesced or one batch per call), stores every batch
    /// in one durable transaction, then answers each caller.
    fn commit_writes(&mut self, writes: Vec<PendingWrite>) -> Flow {
        let now = now_ms();
        let mut actions = Vec::new();
        let mut replies = Vec::new();
        // Per namespace, in order of first appearance; each caller's order kept.
        let mut order: Vec<String> = Vec::new();
        let mut by_ns: HashMap<String, Vec<PendingWrite>> = HashMap::new();
        for w in writes {
            if !by_ns.contains_key(&w.ns) {
                order.push(w.ns.clone());
            }
            by_ns.entry(w.ns.clone()).or_default().push(w);
        }
        let mut sealed: Vec<(u64, u64, u64)> = Vec::new(); // (batches, ops, bytes)
        for ns in order {
            let callers = by_ns.remove(&ns).unwrap_or_default();
            if !self.engine.has_namespace(&ns) {
                for w in callers {
                    let unknown = Err(NodeError::UnknownNamespace(ns.clone()));
                    let _ = w.reply.send((unknown, w.ops.into_ops()));
                }
                continue;
            }
            if let Some(why) = self.own_chain_unsettled(&ns) {
                for w in callers {
                    let refused = Err(NodeError::Unavailable(why.clone()));
                    let _ = w.reply.send((refused, w.ops.into_ops()));
                }
                continue;
            }
            let receipt = |vb: &VerifiedBatch, n_ops: usize| WriteReceipt {
                batch: vb.id.to_hex(),
                seq: vb.header.seq,
                ops: n_ops,
            };
            // Public namespaces only: a dictionary is served to whoever asks by ref.
            let mut trainer = match self.dict_policy.enabled && !self.engine.is_owned(&ns) {
                true => Some(
                    self.trainers
                        .entry(ns.clone())
                        .or_insert_with(|| DictTrainer::new(self.dict_policy.clone())),
                ),
                false => None,
            };
            let mut count = |vb: &VerifiedBatch| {
                sealed.push((1, u64::from(vb.header.ops), vb.bytes.len() as u64));
                if let Some(t) = trainer.as_mut() {
                    t.observe(vb);
                }
            };
            if self.coalesce {
                let mut ops = Vec::with_capacity(callers.len());
                let mut rest = Vec::with_capacity(callers.len());
                for w in callers {
                    rest.push((w.ops.len(), w.reply));
                    ops.push(w.ops);
                }
                let out = self
                    .engine
                    .write_many_checked(&ns, &self.shared.keypair, ops, now);
                actions.extend(out.actions);
                out.batches.iter().for_each(&mut count);
                let answers = out.results.into_iter().zip(out.spent);
                for ((n_ops, reply), (res, spent)) in rest.into_iter().zip(answers) {
                    let spent = spent.into_ops();
                    match res {
                        Ok(b) => replies.push((reply, receipt(&out.batches[b], n_ops), spent)),
                        Err(e) => {
                            let _ = reply.send((Err(write_error(e)), spent));
                        }
                    }
                }
            } else {
                for mut w in callers {
                    let n_ops = w.ops.len();
                    let sealed =
                        self.engine
                            .write_checked(&ns, &self.shared.keypair, &mut w.ops, now);
                    let spent = w.ops.into_ops();
                    match sealed {
                        Ok((vb, acts)) => {
                            actions.extend(acts);
                            count(&vb);
                            replies.push((w.reply, receipt(&vb, n_ops), spent));
                        }
                        Err(e) => {
                            let _ = w.reply.send((Err(write_error(e)), spent));
                        }
                    }
                }
            }
            if let Some(level) = self.engine.squeeze_level(&ns) {
                if self.shared.level(&ns) != Some(level) {
                    if let Ok(mut l) = self.shared.levels.write() {
                        l.insert(ns.clone(), level);
                    }
                }
            }
            if let Some(t) = trainer.filter(|t| t.due()) {
                // Rare (every `retrain_after` small batches) and a few ms: done in line.
                if let Some(d) = t.train() {
                    debug!(%ns, bytes = d.bytes().len(), "trained a dictionary");
                    self.engine.set_write_dict(&ns, d);
                    let m = &self.shared.metrics;
                    m.dicts_trained.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let m = &self.shared.metrics;
        let batches: u64 = sealed.iter().map(|s| s.0).sum();
        m.local_batches.fetch_add(batches, Ordering::Relaxed);
        m.batches_sealed.fetch_add(batches, Ordering::Relaxed);
        m.ops_sealed
            .fetch_add(sealed.iter().map(|s| s.1).sum(), Ordering::Relaxed);
        m.local_bytes
            .fetch_add(sealed.iter().map(|s| s.2).sum(), Ordering::Relaxed);
        m.local_ops.fetch_add(
            replies.iter().map(|(_, r, _)| r.ops as u64).sum(),
            Ordering::Relaxed,
        );
        // The committer answers the writers once their batches are durable.
        self.execute_with(actions, replies, Vec::new())
    }

    /// Carries out engine actions: stores first (one durable transaction), then the rest.
    fn execute(&mut self, actions: Vec<Action<PeerId>>) -> Flow {
        self.execute_with(actions, Vec::new(), Vec::new())
    }

    /// Carries out engine actions, with the writers to answer and the gossip verdicts to
    /// report once they are durable. Batches to store go to the committer (one log
    /// transaction, off this thread), with the writers of local ones; everything else runs
    /// once every commit queued before it is durable: now if none is in flight, otherwise
    /// when the committer says so ([`Actor::on_committed`]). So a batch is published or
    /// relayed, and anything that may read it from the store runs, only once it is durable.
    fn execute_with(
        &mut self,
        actions: Vec<Action<PeerId>>,
        replies: Vec<Reply>,
        verdicts: Vec<Verdict>,
    ) -> Flow {
        if let Some(group) = &mut self.deferred {
            group.actions.extend(actions);
            group.replies.extend(replies);
            group.verdicts.extend(verdicts);
            return Flow::Continue;
        }
        let stats = self.engine.stats();
        let m = &self.shared.metrics;
        m.duplicates
            .store(stats.batches_duplicate, Ordering::Relaxed);
        m.ineffective
            .store(stats.batches_ineffective, Ordering::Relaxed);
        m.pending_dropped
            .store(stats.pending_dropped, Ordering::Relaxed);
        let dict_stats = [
            (&m.dict_batches_sealed, stats.dict_batches_sealed),
            (&m.fast_compressed_sealed, stats.fast_compressed_sealed),
            (&m.writer_compressed_sealed, stats.writer_compressed_sealed),
            (&m.dict_batches_stored, stats.dict_batches_stored),
            (&m.dicts_received, stats.dicts_received),
            (&m.dict_waits_dropped, stats.dict_waits_dropped),
        ];
        for (metric, v) in dict_stats {
            metric.store(v, Ordering::Relaxed);
        }
        let mut to_store: Vec<VerifiedBatch> = Vec::new();
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Store(vb) => to_store.push(vb),
                other => rest.push(other),
            }
        }
        if !to_store.is_empty() || !replies.is_empty() {
            // Blocks while `committer::QUEUED_MAX` groups wait to be committed: backpressure.
            let work = Work::Commit {
                batches: to_store,
                replies,
            };
            match self.committer.send(work) {
                Ok(depth) => {
                    let m = &self.shared.metrics;
                    m.commit_queue_max.fetch_max(depth, Ordering::Relaxed);
                }
                Err(()) => {
                    tracing::error!("the log committer has stopped; stopping the node");
                    return Flow::Stop(None);
                }
            }
            self.awaiting.push_back(Awaiting {
                actions: rest,
                verdicts,
                statuses: Vec::new(),
            });
            return Flow::Continue;
        }
        if let Some(last) = self.awaiting.back_mut() {
            last.actions.extend(rest);
            last.verdicts.extend(verdicts);
            return Flow::Continue;
        }
        self.report_verdicts(verdicts);
        self.run_actions(rest)
    }

    /// The committer made commits durable (or failed: the engine already counts their
    /// batches as held, so memory and disk would disagree; the node stops, and a restart
    /// reloads the truth from disk). Runs what waited for them.
    fn on_committed(&mut self, done: Done) -> Flow {
        if let Err(e) = done.result {
            tracing::error!("storing batches failed, stopping the node: {e}");
            return Flow::Stop(None);
        }
        for _ in 0..done.commits {
            let Some(a) = self.awaiting.pop_front() else {
                break;
            };
            for (reply, status) in a.statuses {
                let _ = reply.send(status);
            }
            self.report_verdicts(a.verdicts);
            if let Flow::Stop(r) = self.run_actions(a.actions) {
                return Flow::Stop(r);
            }
        }
        Flow::Continue
    }

    /// Tells gossipsub which messages to relay (accepted ones: durable here by now), and
    /// drops the peers that sent invalid ones.
    fn report_verdicts(&mut self, verdicts: Vec<Verdict>) {
        for (message_id, source, verdict) in verdicts {
            let acceptance = match &verdict {
                GossipVerdict::Accept => gossipsub::MessageAcceptance::Accept,
                GossipVerdict::Ignore => gossipsub::MessageAcceptance::Ignore,
                GossipVerdict::Reject(_) => gossipsub::MessageAcceptance::Reject,
            };
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(&message_id, &source, acceptance);
            if let GossipVerdict::Reject(reason) = verdict {
                self.drop_peer(source, &format!("invalid gossiped batch: {reason}"));
            }
        }
    }

    /// Runs actions other than stores (those go to the committer).
    fn run_actions(&mut self, rest: Vec<Action<PeerId>>) -> Flow {
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
                    // No peer subscribed (a node alone, or none in this namespace): gossipsub
                    // would copy a large batch twice (~375 KB each for a 5k-op call, 1% of
                    // B2) only to answer `NoPeersSubscribedToTopic`, caching nothing. Looked
                    // for only where those copies outweigh a walk over the peers.
                    if bytes.len() >= PUBLISH_CHECK_MIN_BYTES {
                        let hash = topic.hash();
                        let gossip = &self.swarm.behaviour().gossipsub;
                        if !gossip
                            .all_peers()
                            .any(|(_, topics)| topics.contains(&&hash))
                        {
                            continue;
                        }
                    }
                    match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                        Ok(_) => {}
                        // Nobody to tell yet: peers catch up through anti-entropy.
                        Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                        // Every subscriber's send queue is full (slow links): not queued
                        // further; they catch up by fetching.
                        Err(gossipsub::PublishError::AllQueuesFull(_)) => {
                            debug!(%ns, "gossip: every subscriber's queue is full, not sent");
                            self.gossip_dropped_since_tick = true;
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
                    max_bytes,
                    until,
                } => {
                    let req = ServeRequest {
                        ns,
                        author,
                        from_seq,
                        limit,
                        max_bytes,
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
                Action::ServeDicts { peer, refs } => match self.shared.store.dicts_by_ref(&refs) {
                    Ok(dicts) if !dicts.is_empty() => {
                        let dicts = dicts
                            .iter()
                            .take(blazedb_protocol::limits::MAX_DICTS_PER_MESSAGE)
                            .map(|d| serde_bytes::ByteBuf::from(d.bytes().to_vec()))
                            .collect();
                        self.send_sync(peer, Class::Control, SyncMessage::Dicts { dicts });
                    }
                    Ok(_) => {}
                    Err(e) => warn!("serving dictionaries: {e}"),
                },
                Action::Reject { peer, reason } => self.drop_peer(peer, &reason),
                Action::Rebuild { ns, revocations } => {
                    // In order with the batches committed before it. Reads wait for the
                    // records until it is done.
                    self.shared.mat.rebuild_queued();
                    if self
                        .committer
                        .send(Work::Mat(Job::Rebuild { ns, revocations }))
                        .is_err()
                    {
                        return Flow::Stop(None);
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
        // A peer that missed a push gets no more until every push to it is answered (then
        // our `Have`s, see `request_done`): pushes still in flight when it fetched the gap
        // would reach it twice (pushed and fetched), and later pushes would only wait in its
        // buffer behind the gap.
        let lagging = class == Class::Live && self.lagging.contains(&peer);
        if class != Class::Bulk && (*outstanding >= SYNC_INFLIGHT_MAX || lagging) {
            m.sync_dropped.fetch_add(1, Ordering::Relaxed);
            if class == Class::Live {
                // It misses a pushed batch: tell it what we hold once it has drained.
                self.lagging.insert(peer);
            }
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
            max_bytes,
            until,
        } = req;
        let store = &self.shared.store;
        let max_bytes = max_bytes.map_or(SERVE_MAX_BYTES, |b| SERVE_MAX_BYTES.min(b as usize));
        let range = ChainRange {
            ns: &ns,
            author: &author,
            from_seq,
            limit,
            max_bytes,
            until,
        };
        match store.serve_range(range) {
            Ok((batches, damage)) => {
                if let Some(damage) = damage {
                    // The peer gets what precedes it: sending the batch would only get this
                    // node dropped as a forger (peers that hold the batch still serve it).
                    self.shared
                        .metrics
                        .log_damaged
                        .fetch_add(1, Ordering::Relaxed);
                    if self.damage_reported.len() < DAMAGE_REPORTS_MAX
                        && self.damage_reported.insert(damage.clone())
                    {
                        error!(
                            "the log is damaged at {damage}: fetches stop before it \
                             (`blazedb check` lists the damage)"
                        );
                    }
                }
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

    /// A peer's vector for `ns`: notes that one arrived, and whether the peer holds more of
    /// this node's own chain than its log does.
    fn heard_vector(&mut self, peer: &PeerId, ns: &str, heads: &[HaveEntry]) {
        if !self.engine.has_namespace(ns) {
            return;
        }
        self.heard
            .entry(ns.to_string())
            .or_insert_with(|| Heard {
                from: HashSet::new(),
                first: tokio::time::Instant::now(),
                settled: false,
            })
            .from
            .insert(*peer);
        let own = *self.shared.keypair.public().as_bytes();
        let Some(theirs) = heads.iter().find(|h| h.author == own).map(|h| h.seq) else {
            return;
        };
        let ours = self.engine.head(ns, &own).map_or(0, |h| h.0);
        if theirs > ours && !self.own_claims_ignored.contains(peer) {
            let claim = OwnBehind {
                seq: theirs,
                peer: *peer,
                head: ours,
                since: tokio::time::Instant::now(),
            };
            let seen = self.own_behind.entry(ns.to_string()).or_insert(claim);
            if seen.seq < theirs {
                *seen = claim;
            }
            if seen.since == claim.since {
                error!(
                    %peer,
                    %ns,
                    "the peer holds this node's own chain up to seq {theirs}, its log only up \
                     to {ours}: the log was lost or replaced by an older copy. The missing \
                     batches are fetched back; writes in {ns} wait for them (a write now \
                     would fork the chain)"
                );
            }
        }
    }

    /// Why this node must not write in `ns` now, if it must not: its own chain there may go
    /// further at its peers than in its log, and a batch sealed now would take a seq they
    /// hold under another id (they would keep theirs and drop ours as a duplicate, and our
    /// chain would break on theirs: a fork no replica repairs). Either a peer showed more
    /// of it (until it is fetched back), or the log was begun beside an older identity and
    /// no peer has told yet what it holds (until one does, or the log holds a batch of ours
    /// there). A node with no peer to tell it cannot tell either; it is told how to write
    /// alone (a new identity).
    fn own_chain_unsettled(&mut self, ns: &str) -> Option<String> {
        let own = *self.shared.keypair.public().as_bytes();
        let ours = self.engine.head(ns, &own).map_or(0, |h| h.0);
        if let Some(claim) = self.own_behind.get_mut(ns) {
            let theirs = claim.seq;
            let now = tokio::time::Instant::now();
            if ours > claim.head {
                (claim.head, claim.since) = (ours, now);
            }
            let stalled = now.duration_since(claim.since) > self.own_chain_wait;
            if ours >= theirs {
                info!(%ns, seq = ours, "this node's own chain is fetched back: writes resume");
                self.own_behind.remove(ns);
            } else if stalled {
                let peer = claim.peer;
                warn!(
                    %peer,
                    %ns,
                    "the peer claimed this node's own chain up to seq {theirs} but did not \
                     send it (the log holds {ours}): its claims are no longer believed, \
                     writes resume"
                );
                self.own_behind.remove(ns);
                if self.own_claims_ignored.len() < DAMAGE_REPORTS_MAX {
                    self.own_claims_ignored.insert(peer);
                }
            } else {
                return Some(format!(
                    "a peer holds this node's own chain in {ns} up to seq {theirs}, its log \
                     only up to {ours} (the log was lost or replaced by an older copy): the \
                     missing batches are being fetched back, and writes resume once they are \
                     here (a write now would fork the chain)"
                ));
            }
        }
        let in_doubt = self.doubted.contains_key(ns) || (self.restored && ours == 0);
        if !in_doubt {
            return None; // nothing in doubt: the usual case, every write
        }
        let told = self.told(ns);
        if let Told::Some { told, of } = told {
            return Some(format!(
                "{told} of this node's {of} connected peers have told what they hold of its own \
                 chain in {ns}, which may go further than its log (a restored identity, a \
                 backup, or a cut): writes there wait for the others, at most {}s (one that has \
                 not told may hold more of it)",
                TOLD_BY_ALL_WAIT.as_secs()
            ));
        }
        let told = matches!(told, Told::Enough);
        if let Some(doubt) = self.doubted.get(ns) {
            if !told {
                return Some(match doubt {
                    Doubt::Cut => format!(
                        "this node's own chain in {ns} was cut at a damaged batch (`blazedb \
                         repair --cut-damaged`), and no peer has told yet what it holds of it: \
                         writes there wait for a peer (a write now could fork the chain)"
                    ),
                    Doubt::Backup => format!(
                        "this node's log was restored from a backup, and no peer has told yet \
                         what it holds of this node's own chain in {ns} (it may have gone on \
                         after the backup): writes there wait for a peer (a write now could \
                         fork the chain). A node that writes alone is restored with `blazedb \
                         restore --alone`"
                    ),
                });
            }
            // A peer told, and nothing more of the chain is missing: settled for good.
            let cleared = match doubt {
                Doubt::Cut => self.shared.store.clear_own_chain_cut(ns),
                Doubt::Backup => self.shared.store.clear_backup_mark(ns),
            };
            if let Err(e) = cleared {
                warn!(%ns, "clearing a mark on this node's own chain: {e}");
            }
            self.doubted.remove(ns);
        }
        if self.restored && ours == 0 && !told {
            return Some(format!(
                "this node's log may lack batches its identity (node.key) wrote (the log was \
                 begun beside an existing node.key, or restored from a backup), and no peer \
                 has told yet what it holds of this node's own chain in {ns}: writes there \
                 wait for a peer (a write now could fork a chain the node wrote before). A \
                 node that must write alone can start with a new identity (move node.key \
                 away), or be restored with `blazedb restore --alone`"
            ));
        }
        None
    }

    /// What the connected peers have told of `ns`: enough once every connected peer's
    /// vector for it has arrived, or [`TOLD_BY_ALL_WAIT`] after the first one's (a connected
    /// peer outside the namespace never tells).
    fn told(&self, ns: &str) -> Told {
        let Some(heard) = self.heard.get(ns) else {
            return Told::Nobody;
        };
        let of = self.connected.len();
        let told = self
            .connected
            .keys()
            .filter(|p| heard.from.contains(p))
            .count();
        if heard.settled || told == of || heard.first.elapsed() >= TOLD_BY_ALL_WAIT {
            Told::Enough
        } else {
            Told::Some { told, of }
        }
    }

    fn drop_peer(&mut self, peer: PeerId, reason: &str) {
        warn!(%peer, "dropping peer: {reason}");
        let m = &self.shared.metrics;
        m.rejected.fetch_add(1, Ordering::Relaxed);
        m.peers_dropped.fetch_add(1, Ordering::Relaxed);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Handles `first` and whatever other swarm events are ready right now (up to
    /// [`EVENT_GROUP_MAX`]) as one group: their stores are committed together, then their
    /// other actions run, then gossipsub hears the verdicts (a batch is relayed only once it
    /// is durable here, as before — now one fsync covers the whole group).
    fn on_swarm_events(&mut self, first: SwarmEvent<BehaviourEvent>) -> Flow {
        use futures::FutureExt;
        self.deferred.get_or_insert_with(Deferred::default);
        let mut flow = self.on_swarm_event(first);
        for _ in 1..EVENT_GROUP_MAX {
            if matches!(flow, Flow::Stop(_)) {
                break;
            }
            // A pending poll registers no waker that matters: the select! loop polls the
            // swarm again with its own waker right after.
            match self.swarm.next().now_or_never() {
                Some(Some(ev)) => flow = self.on_swarm_event(ev),
                _ => break,
            }
        }
        let group = self.deferred.take().unwrap_or_default();
        if let Flow::Stop(reply) = flow {
            return Flow::Stop(reply);
        }
        self.execute_with(group.actions, group.replies, group.verdicts)
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
                    self.lagging.remove(&peer_id);
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
                        self.shared.metrics.dials.fetch_add(1, Ordering::Relaxed);
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
        let (propagation_source, message_id, message) = match ev {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => (propagation_source, message_id, message),
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => {
                // Its send queue was full at some point since the last heartbeat, so it missed
                // published batches: our vectors let it fetch them now rather than at the next
                // anti-entropy round (seconds later). At most once per heartbeat per peer.
                debug!(peer = %peer_id, ?failed_messages, "slow gossip peer: sending our heads");
                let haves = self.engine.haves_for(&peer_id, now_ms());
                return self.execute(haves);
            }
            _ => return Flow::Continue,
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
        // Store before relaying: the verdict waits for the group's log commit
        // (`on_swarm_events`, the only way swarm events arrive here).
        let group = self.deferred.get_or_insert_with(Deferred::default);
        group.actions.extend(actions);
        group
            .verdicts
            .push((message_id, propagation_source, verdict));
        Flow::Continue
    }

    /// A sync event on the protocol of `class` (any message is handled the same whichever
    /// protocol carried it).
    fn on_sync(&mut self, ev: request_response::Event<SyncMessage, Ack>, class: Class) -> Flow {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    // A fetch answer (or push) of several batches: verified on the verifier's
                    // thread, acknowledged once the engine has it (see `verifier`).
                    let request = match request {
                        SyncMessage::Batches {
                            ns,
                            author,
                            batches,
                        } if batches.len() > 1
                            && batches.len() <= limits::MAX_FETCH_BATCHES as usize =>
                        {
                            let job = verifier::Job {
                                peer,
                                class,
                                channel,
                                ns,
                                author,
                                batches: batches.into_iter().map(|b| b.into_vec()).collect(),
                            };
                            let Some(job) = self.verifier.try_send(job) else {
                                let depth = self.verifier.depth();
                                let m = &self.shared.metrics;
                                m.verify_queue_max.fetch_max(depth, Ordering::Relaxed);
                                return Flow::Continue;
                            };
                            // The queue is full: verified by the engine, here, as before.
                            return self.on_verified(
                                job.map_batches(|b| b.into_iter().map(PreVerified::Raw).collect()),
                            );
                        }
                        other => other,
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .class_mut(class)
                        .send_response(channel, Ack {});
                    if let SyncMessage::Have { ns, heads } = &request {
                        self.heard_vector(&peer, ns, heads);
                    }
                    let actions = self.engine.handle_message(peer, request, now_ms());
                    self.execute(actions)
                }
                request_response::Message::Response { .. } => self.request_done(&peer, class),
            },
            request_response::Event::InboundFailure { peer, error, .. } => {
                // A request we could not decode (malformed or oversized) is the peer's fault.
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.drop_peer(peer, &format!("malformed sync request: {error}"));
                }
                Flow::Continue
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, "sync request failed: {error}");
                self.request_done(&peer, class)
            }
            request_response::Event::ResponseSent { .. } => Flow::Continue,
        }
    }

    /// A fetch answer whose batches are verified (or left to the engine): acknowledged, then
    /// handed to the engine.
    fn on_verified(&mut self, v: Verified) -> Flow {
        let _ = self
            .swarm
            .behaviour_mut()
            .class_mut(v.class)
            .send_response(v.channel, Ack {});
        let actions =
            self.engine
                .handle_batches_preverified(v.peer, v.ns, v.author, v.batches, now_ms());
        self.execute(actions)
    }

    fn request_done(&mut self, peer: &PeerId, class: Class) -> Flow {
        if let Some(n) = self.inflight.get_mut(&(*peer, class)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inflight.remove(&(*peer, class));
            }
        }
        if class == Class::Bulk {
            self.drain_bulk_queue(peer);
        }
        if class == Class::Live
            && self.outstanding(peer, Class::Live) == 0
            && self.lagging.remove(peer)
        {
            // Pushes to it were dropped while it lagged; now that none is in flight, our
            // vectors let it fetch the gap at once instead of at the next anti-entropy round
            // (seconds later), and nothing it fetches is also on its way as a push (B3 owned,
            // 200k ops: ~10 batches of 40 received twice when this waited for half the
            // pushes only). Best effort: a dropped Have leaves that round as the fallback.
            let haves = self.engine.haves_for(peer, now_ms());
            return self.execute(haves);
        }
        Flow::Continue
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
        // New here: no chain of this node's own can be in it, whatever the log lost.
        self.heard.insert(
            ns.clone(),
            Heard {
                from: HashSet::new(),
                first: tokio::time::Instant::now(),
                settled: true,
            },
        );
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

/// A sealing error as callers see it.
fn write_error(e: BatchError) -> NodeError {
    match e {
        BatchError::Unauthorized(why) => NodeError::Forbidden(why),
        e => NodeError::Invalid(e.to_string()),
    }
}

/// Sleeps until `at` (forever if `None`; the select guard keeps that branch off then).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
