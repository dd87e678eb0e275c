//! The sans-IO sync engine.
//!
//! One [`Engine`] per node. It is fed events — a local write, a peer coming up or going down,
//! a message or a gossiped batch from a peer, the passing of time — each with the current time
//! in milliseconds, and answers with [`Action`]s for its shell to carry out: store a batch,
//! publish it, send a message, serve a fetch, drop a peer. It never does I/O, never reads the
//! clock, never spawns: `node/` drives it with libp2p and redb, `simulations/` with a virtual
//! network and virtual time.
//!
//! ## Protocol
//!
//! Each author's batches in a namespace form a hash chain (`seq`, `prev`). A node's knowledge
//! of a namespace is therefore a *version vector*: author → highest contiguous `seq`.
//!
//! - New batches are pushed by gossip. A gossiped batch that extends its author's chain is
//!   stored at once; one that skips ahead is buffered (bounded) while the gap is fetched from
//!   the peer that sent it.
//! - Large batches (`push_min_bytes`, 64 KiB) go around gossip, along a tree in the manner of
//!   Plumtree (Leitão et al., "Epidemic Broadcast Trees", SRDS 2007): a node that stores one
//!   from a `Batches` message (or writes one) pushes it at once to its peers on the tree and
//!   announces it (`Announce`: author, seq) `announce_delay_ms` later to its other peers that
//!   have not told it they hold it. Each author has its own tree (Plumtree's per-source
//!   trees): every link starts on it; a peer pushed a large batch it already holds answers
//!   `Prune` (the link leaves that author's tree, both ways), so after an author's first large
//!   batch floods, each later one reaches each node about once, along the paths its first one
//!   took fastest. A peer told of a seq it lacks fetches it as below, and if it had pruned
//!   that link it `Graft`s it back: the tree mends where it broke.
//! - On connect, and every `anti_entropy_interval_ms`, peers exchange `Have` (their vectors).
//!   For every author a peer has more of, we send `Fetch { from_seq, limit }`: up to
//!   `fetch_stripes` fetches ("stripes") in flight per (namespace, author) at disjoint seq
//!   ranges, spread over the peers that hold them, each at most `fetch_window` batches (and
//!   about `fetch_window_bytes`), re-issued on answer until caught up, and re-routed one by
//!   one to another peer on timeout or disconnect. The first stripe always starts at the first
//!   missing seq, so it is requested in the first round trip (capped at
//!   [`limits::FIRST_FETCH_BYTES`] while no batch size is known, so that a large first batch
//!   is not held back by a whole window behind it); the others land in the bounded
//!   out-of-order buffer, and are only requested while the buffer has room for them (counted in
//!   batches and, by the batch sizes seen, in bytes). At most `max_fetches_per_peer` fetches
//!   are in flight to one peer; what that holds back is retried as fetches complete.
//! - A `Fetch` is answered with `Batches` (the shell reads them from its store).
//! - Dictionaries ([`crate::dict`]) travel on request. A batch (gossiped, fetched or pushed)
//!   that names a dictionary we do not hold is not the sender's fault: its signed header is
//!   checked, the batch waits in a small bounded buffer, and the dictionary is asked of the
//!   peer that sent it (`FetchDicts`, at most a few outstanding per peer, each with the fetch
//!   time-out). Fetches of that author's chain pause until it arrives (`Dicts`) or the request
//!   times out; then the waiting batches are verified and ingested as if they had just
//!   arrived. Whatever does not fit the buffer, or outlives its request, is dropped and comes
//!   back through catch-up: a chain never waits on a dictionary for longer than a time-out.
//!
//! Every batch is verified (envelope, canonical header, payload hash, strict signature, op
//! limits) and chain-checked (`prev` = id of the author's previous batch, timestamps after it)
//! before it is stored. A peer that sends an invalid batch or a malformed message is reported
//! with [`Action::Reject`] so the shell can drop it.
//!
//! ## Owned namespaces: capabilities
//!
//! A namespace is *public* (`default`: anyone reads and writes, batches are gossiped) or
//! *owned* (its id derives from an owner key; see [`crate::capability`]).
//!
//! - **Write path.** In an owned namespace every batch not written by the owner key carries the
//!   author's capability chain in its header; it is admitted only if the chain grants `Write`
//!   (`Admin` for revocations) to the author at the batch's own timestamps (not the receiver's
//!   clock) and covers every record it touches. Anything else is rejected and counted.
//! - **Revocation** is an op in the namespace's log, written by an admin. A batch whose chain
//!   contains a token revoked at or before the batch's last timestamp is stored (chains stay
//!   contiguous) but *ineffective*: its ops do not count. Because the verdict depends only on
//!   the batches held, not on arrival order, replicas that hold the same batches agree — also
//!   across a partition where a revocation and a write were concurrent. A newly learned
//!   revocation makes the shell rebuild the namespace's records ([`Action::Rebuild`]).
//! - **Read path.** Owned namespaces are never gossiped (gossipsub has no read access
//!   control). Peers present their capability chain (`Present`); only peers whose chain grants
//!   `Read` to their authenticated key, now, and is not revoked, get `Have`, fetched batches
//!   and pushed new batches. Revocation or expiry ends that at once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use blazedb_identity::Keypair;

use crate::batch::{self, BatchError, BatchId, ChainPosition, VerifiedBatch};
use crate::capability::{self, Chain, Rights, TokenId};
use crate::dict::{Dict, DictId, DictLookup, DictRef, DictSet};
use crate::hlc::{Clock, Hlc};
use crate::limits;
use crate::op::{CheckedOps, Op, Stamped};
use crate::squeeze::Squeeze;

/// Outcome of [`Engine::write_many`].
#[derive(Debug)]
pub struct WriteMany<P> {
    /// The batches sealed, in chain order.
    pub batches: Vec<VerifiedBatch>,
    /// Per caller, in the order given: the index of the batch holding its ops, or its error.
    pub results: Vec<Result<usize, BatchError>>,
    /// Store, then publish, for every batch.
    pub actions: Vec<Action<P>>,
    /// Per caller, in the order given: its ops, no longer needed once sealed (stamped and
    /// perhaps pruned if sealed alone; as given if sealed in a group, which sealed a copy),
    /// for the caller to drop where it likes (empty where a caller's ops failed their checks).
    /// The writers allocated them; freeing them on the writers' side keeps the engine's
    /// thread, which every write passes through in turn, from paying for it.
    pub spent: Vec<CheckedOps>,
}

/// Tunables of the engine. Defaults suit a LAN/WAN node; tests shrink the intervals.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How often version vectors are exchanged with every peer.
    pub anti_entropy_interval_ms: u64,
    /// How long a fetch may stay unanswered before it is re-routed.
    pub fetch_timeout_ms: u64,
    /// Batches requested per fetch.
    pub fetch_window: u32,
    /// Fetches in flight at once per (namespace, author), at disjoint seq ranges (1 = one
    /// window at a time).
    pub fetch_stripes: u32,
    /// Bytes one fetch aims at: once batch sizes are known, a window is cut to about this
    /// many bytes (peers cap their answers by bytes too; asking for more would only reserve
    /// buffer room that never fills).
    pub fetch_window_bytes: usize,
    /// Most fetches in flight to one peer, over all namespaces and authors.
    pub max_fetches_per_peer: usize,
    /// Most out-of-order batches buffered per namespace.
    pub max_pending_batches: usize,
    /// Most bytes of out-of-order batches buffered per namespace.
    pub max_pending_bytes: usize,
    /// Most dictionaries held in memory for verification (the least recently used is
    /// forgotten past it; a batch that names it again has it fetched again).
    pub max_dicts_held: usize,
    /// Most batches waiting for their dictionary (all namespaces).
    pub max_dict_waiting: usize,
    /// Most dictionary requests outstanding to one peer.
    pub max_dict_requests_per_peer: usize,
    /// Public namespaces: a batch of this many envelope bytes or more goes around gossip,
    /// pushed (`Batches`) along a tree of links and announced (`Announce`) over the others
    /// (see the module doc). `usize::MAX`: every batch is gossiped.
    pub push_min_bytes: usize,
    /// Most peers one node pushes a large batch to (its tree links first; the others are
    /// told by `Announce`). It bounds a node's upload per batch while an author's first large
    /// batch floods; on a formed tree a node's links on it are fewer. 16, not gossipsub's 6:
    /// a tree link beyond the bound is never pruned (it never carries a copy twice) yet waits
    /// for the late announcement every time (the simulator's bulk-200 at 2,000 nodes: p99 156
    /// against 59 ms).
    pub push_fanout: usize,
    /// How long a node waits before announcing a large batch to the peers it did not push it
    /// to: meanwhile the tree usually brings it to them, so they neither fetch it nor all
    /// fetch it from the writer (whose upload would grow with its number of peers).
    pub announce_delay_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            anti_entropy_interval_ms: 5_000,
            fetch_timeout_ms: 10_000,
            fetch_window: 64,
            fetch_stripes: 4,
            fetch_window_bytes: 8 * 1024 * 1024,
            max_fetches_per_peer: 32,
            max_pending_batches: 4_096,
            max_pending_bytes: 64 * 1024 * 1024,
            max_dicts_held: 1_024,
            max_dict_waiting: 64,
            max_dict_requests_per_peer: 4,
            push_min_bytes: limits::PUSH_MIN_BYTES,
            push_fanout: 16,
            announce_delay_ms: 100,
        }
    }
}

/// One entry of a version vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveEntry {
    /// Author key.
    #[serde(with = "serde_bytes")]
    pub author: [u8; 32],
    /// Highest contiguous seq held.
    pub seq: u64,
}

/// Messages between engines (carried by the node's request-response protocol).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SyncMessage {
    /// "This is what I hold in `ns`."
    Have {
        /// Namespace.
        ns: String,
        /// Version vector.
        heads: Vec<HaveEntry>,
    },
    /// "Send me `author`'s batches from `from_seq`, at most `limit`."
    Fetch {
        /// Namespace.
        ns: String,
        /// Author key.
        #[serde(with = "serde_bytes")]
        author: [u8; 32],
        /// First seq wanted.
        from_seq: u64,
        /// Most batches wanted.
        limit: u32,
        /// Most bytes wanted (at least one batch is always sent); `None`: the server's own
        /// cap. Absent from the encoding when `None`, so peers that predate it read it as
        /// before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u32>,
    },
    /// "This is my capability for `ns`" (owned namespaces): the receiver serves us if it
    /// grants `Read` to our key.
    Present {
        /// Namespace.
        ns: String,
        /// Encoded capability chain.
        chain: serde_bytes::ByteBuf,
    },
    /// "Your capability was revoked by these batches": lets a revoked peer reach the same
    /// verdict without receiving anything else. The batches are verified and their
    /// revocations recorded, but they are not stored.
    Revoked {
        /// Namespace.
        ns: String,
        /// Envelope bytes of the revoking batches.
        batches: Vec<serde_bytes::ByteBuf>,
    },
    /// The answer to a `Fetch` (possibly empty), in seq order; in owned namespaces also new
    /// batches pushed to authorized peers.
    Batches {
        /// Namespace.
        ns: String,
        /// Author key.
        #[serde(with = "serde_bytes")]
        author: [u8; 32],
        /// Envelope bytes of each batch.
        batches: Vec<serde_bytes::ByteBuf>,
    },
    /// "I hold `author`'s chain in `ns` up to `seq`" (public namespaces: a large batch stored
    /// here and not pushed to the receiver, which fetches it if it lacks it). Adds to what a
    /// `Have` said.
    Announce {
        /// Namespace.
        ns: String,
        /// Author key.
        #[serde(with = "serde_bytes")]
        author: [u8; 32],
        /// Highest contiguous seq held.
        seq: u64,
    },
    /// "A large batch of `author` in `ns` you pushed me I held already: announce theirs to
    /// me instead" (the link leaves `author`'s push tree, both ways).
    Prune {
        /// Namespace.
        ns: String,
        /// Whose tree.
        #[serde(with = "serde_bytes")]
        author: [u8; 32],
    },
    /// "I had to fetch a large batch of `author` in `ns` you announced: push theirs to me
    /// again" (the link joins `author`'s push tree, both ways).
    Graft {
        /// Namespace.
        ns: String,
        /// Whose tree.
        #[serde(with = "serde_bytes")]
        author: [u8; 32],
    },
    /// "Send me the dictionaries with these refs" (named by batches of `ns` you sent me).
    FetchDicts {
        /// Namespace of the batches that name them (the asker must be allowed to read it).
        ns: String,
        /// Refs, at most [`limits::MAX_DICTS_PER_MESSAGE`].
        refs: Vec<DictRef>,
    },
    /// Dictionaries asked for with `FetchDicts`, at most [`limits::MAX_DICTS_PER_MESSAGE`].
    Dicts {
        /// Each dictionary's bytes (its id is their blake3).
        dicts: Vec<serde_bytes::ByteBuf>,
    },
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
// Actions live for one event's handling; boxing the batch would cost an allocation per batch.
#[allow(clippy::large_enum_variant)]
pub enum Action<P> {
    /// Send a message to a peer.
    Send {
        /// Destination.
        peer: P,
        /// Message.
        msg: SyncMessage,
    },
    /// Durably store (and apply) a batch that passed every check.
    Store(VerifiedBatch),
    /// Gossip a locally written batch to the namespace's topic.
    Publish {
        /// Namespace (topic).
        ns: String,
        /// Batch id (gossip message id).
        id: BatchId,
        /// Envelope bytes (shared with the stored batch).
        bytes: bytes::Bytes,
    },
    /// Read `author`'s batches `from_seq..` (at most `limit`) from the store and send them to
    /// `peer` as [`SyncMessage::Batches`].
    Serve {
        /// Requesting peer.
        peer: P,
        /// Namespace.
        ns: String,
        /// Author key.
        author: [u8; 32],
        /// First seq.
        from_seq: u64,
        /// Most batches.
        limit: u32,
        /// Most bytes (at least one batch); `None`: the shell's own cap.
        max_bytes: Option<u32>,
        /// Serve only batches whose last timestamp is before this (the peer's capability was
        /// revoked then); `None` = no limit.
        until: Option<Hlc>,
    },
    /// Send `peer` the batches that revoked `tokens` in `ns` (as [`SyncMessage::Revoked`]):
    /// it still presents a revoked chain.
    ServeRevocations {
        /// Peer.
        peer: P,
        /// Namespace.
        ns: String,
        /// Revoked tokens of its chain.
        tokens: Vec<TokenId>,
    },
    /// A revocation became known: recompute the namespace's records from its log, treating a
    /// batch as ineffective when a token of its chain was revoked at or before its last
    /// timestamp (see [`batch_effective`]).
    Rebuild {
        /// Namespace.
        ns: String,
        /// Every revocation known in the namespace: token → earliest revocation time.
        revocations: BTreeMap<TokenId, Hlc>,
    },
    /// Read the dictionaries with these refs from the store and send them to `peer` as
    /// [`SyncMessage::Dicts`] (the engine did not hold them in memory).
    ServeDicts {
        /// Requesting peer.
        peer: P,
        /// Refs asked for.
        refs: Vec<DictRef>,
    },
    /// The peer sent something invalid: drop it and count it.
    Reject {
        /// Offending peer.
        peer: P,
        /// Why.
        reason: String,
    },
}

/// What to tell the gossip layer about a received message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GossipVerdict {
    /// Valid and new: keep relaying it.
    Accept,
    /// Valid but not useful (duplicate, unknown namespace): do not relay, do not punish.
    Ignore,
    /// Invalid: do not relay, penalize the sender.
    Reject(String),
}

/// Counters the shell exports as metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Batches stored (local and remote).
    pub batches_stored: u64,
    /// Batches received that we already had.
    pub batches_duplicate: u64,
    /// Batches rejected (bad envelope, hash, signature, op, chain).
    pub batches_rejected: u64,
    /// Out-of-order batches dropped because the buffer was full.
    pub pending_dropped: u64,
    /// Fetches sent.
    pub fetches_sent: u64,
    /// Fetches that timed out (and were re-routed).
    pub fetches_timed_out: u64,
    /// Batches stored but ineffective (revoked capability).
    pub batches_ineffective: u64,
    /// Requests refused for lack of a read capability.
    pub reads_refused: u64,
    /// Local batches sealed with a dictionary.
    pub dict_batches_sealed: u64,
    /// Local batches whose large payload was compressed with the fast zstd level (the
    /// strong one gained too little on this namespace's data; see [`crate::squeeze`]).
    pub fast_compressed_sealed: u64,
    /// Local batches sealed with the ops frame their writer compressed ahead
    /// ([`CheckedOps::compress_ahead`]; see [`crate::squeeze::Squeeze::compress_split`]).
    pub writer_compressed_sealed: u64,
    /// Batches stored (local and remote) whose payload uses a dictionary.
    pub dict_batches_stored: u64,
    /// Dictionaries received that we had asked for.
    pub dicts_received: u64,
    /// Dictionaries refused (malformed or oversized).
    pub dicts_rejected: u64,
    /// Dictionary requests sent.
    pub dict_requests_sent: u64,
    /// Batches that waited for a dictionary and were dropped (buffer full, request timed
    /// out or refused); catch-up brings them again.
    pub dict_waits_dropped: u64,
}

/// Whether a batch's ops count, given the namespace's revocations: false if any token of its
/// capability chain was revoked at or before the batch's last timestamp.
pub fn batch_effective(vb: &VerifiedBatch, revocations: &BTreeMap<TokenId, Hlc>) -> bool {
    match &vb.cap {
        None => true,
        Some(chain) => !chain.ids().any(|id| {
            revocations
                .get(&id)
                .is_some_and(|at| *at <= vb.header.hlc_max)
        }),
    }
}

/// Who may do what in a namespace.
#[derive(Clone, Debug)]
enum Policy {
    /// Anyone reads and writes; batches are gossiped.
    Public,
    /// Owned: capabilities required; `mine` is our own chain, if we have one.
    Owned { mine: Option<Chain> },
}

#[derive(Clone, Copy, Debug)]
struct Head {
    seq: u64,
    id: BatchId,
    hlc_max: Hlc,
}

/// One fetch in flight (a stripe): `from..=to` of an author's chain, asked of `peer`.
#[derive(Clone, Debug)]
struct InFlight<P> {
    peer: P,
    to: u64,
    deadline_ms: u64,
}

#[derive(Debug)]
struct NsState<P> {
    policy: Policy,
    heads: BTreeMap<[u8; 32], Head>,
    pending: BTreeMap<([u8; 32], u64), VerifiedBatch>,
    pending_bytes: usize,
    /// Fetches in flight, by (author, first seq asked).
    fetches: BTreeMap<([u8; 32], u64), InFlight<P>>,
    /// Authors with seqs to fetch that were held back (per-peer cap, buffer room).
    wanting: BTreeSet<[u8; 32]>,
    /// Where the next round-robin retry of `wanting` starts.
    wanting_cursor: [u8; 32],
    /// Running estimate of one batch's envelope size here (0 = none seen yet).
    batch_bytes_est: usize,
    peer_heads: BTreeMap<P, BTreeMap<[u8; 32], u64>>,
    /// Public namespaces, per author: peers whose link is off the tree that author's large
    /// batches are pushed along (`Prune`d, either way): they are told by a late `Announce`
    /// instead. At most [`limits::MAX_TREE_AUTHORS`] authors (the least recently pruned one
    /// makes room); empty sets are not kept.
    lazy: BTreeMap<[u8; 32], OffTree<P>>,
    /// Prunes counted so far: the order of [`OffTree::pruned_at`].
    prunes: u64,
    revocations: BTreeMap<TokenId, Hlc>,
    /// Owned namespaces: peers allowed to read, with the chain that allows them.
    readers: BTreeMap<P, Chain>,
    /// Authors whose fetched batch waits for a dictionary: their fetches pause until it
    /// arrives or the deadline passes.
    dict_blocked: BTreeMap<[u8; 32], (DictRef, u64)>,
    /// Our compression effort for large payloads written here.
    squeeze: Squeeze,
}

/// The links off one author's push tree, and when one was last taken off.
#[derive(Debug)]
struct OffTree<P> {
    peers: BTreeSet<P>,
    /// [`NsState::prunes`] at the latest prune.
    pruned_at: u64,
}

impl<P: Ord> NsState<P> {
    /// Whether `peer`'s link is off `author`'s push tree.
    fn is_lazy(&self, author: &[u8; 32], peer: &P) -> bool {
        self.lazy
            .get(author)
            .is_some_and(|t| t.peers.contains(peer))
    }

    /// Takes `peer`'s link off `author`'s push tree; false if it was off already. A new
    /// author past [`limits::MAX_TREE_AUTHORS`] takes the place of the one pruned least
    /// recently (whose tree is forgotten: its next large batch floods and prunes again).
    fn prune(&mut self, author: [u8; 32], peer: P) -> bool {
        self.prunes += 1;
        if !self.lazy.contains_key(&author) && self.lazy.len() >= limits::MAX_TREE_AUTHORS {
            let oldest = self.lazy.iter().min_by_key(|(_, t)| t.pruned_at);
            if let Some(oldest) = oldest.map(|(a, _)| *a) {
                self.lazy.remove(&oldest);
            }
        }
        let tree = self.lazy.entry(author).or_insert_with(|| OffTree {
            peers: BTreeSet::new(),
            pruned_at: 0,
        });
        tree.pruned_at = self.prunes;
        tree.peers.insert(peer)
    }

    /// Puts `peer`'s link back on `author`'s push tree; false if it was on it.
    fn graft(&mut self, author: &[u8; 32], peer: &P) -> bool {
        let Some(tree) = self.lazy.get_mut(author) else {
            return false;
        };
        let was = tree.peers.remove(peer);
        if tree.peers.is_empty() {
            self.lazy.remove(author);
        }
        was
    }
}

impl<P> Default for NsState<P> {
    fn default() -> Self {
        Self {
            policy: Policy::Public,
            heads: BTreeMap::new(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            fetches: BTreeMap::new(),
            wanting: BTreeSet::new(),
            wanting_cursor: [0; 32],
            batch_bytes_est: 0,
            peer_heads: BTreeMap::new(),
            lazy: BTreeMap::new(),
            prunes: 0,
            revocations: BTreeMap::new(),
            readers: BTreeMap::new(),
            dict_blocked: BTreeMap::new(),
            squeeze: Squeeze::adaptive(),
        }
    }
}

impl<P: Ord> NsState<P> {
    fn owned(&self) -> bool {
        matches!(self.policy, Policy::Owned { .. })
    }

    /// What `peer` may receive now: `None` nothing; `Some(None)` everything;
    /// `Some(Some(t))` only batches written before `t` (its chain was revoked at `t`).
    fn read_cutoff(
        &self,
        peer: &P,
        key: Option<&[u8; 32]>,
        ns: &str,
        now_ms: u64,
    ) -> Option<Option<Hlc>> {
        match &self.policy {
            Policy::Public => Some(None),
            Policy::Owned { .. } => {
                let key = key?;
                if capability::is_owner(ns, key) {
                    return Some(None);
                }
                let chain = self.readers.get(peer)?;
                chain.authorizes(ns, key, Rights::Read, now_ms).ok()?;
                Some(
                    chain
                        .ids()
                        .filter_map(|id| self.revocations.get(&id).copied())
                        .min(),
                )
            }
        }
    }

    /// Whether `peer` may receive anything of this namespace now.
    fn may_read(&self, peer: &P, key: Option<&[u8; 32]>, ns: &str, now_ms: u64) -> bool {
        self.read_cutoff(peer, key, ns, now_ms).is_some()
    }
}

enum Ingest {
    Stored,
    Duplicate,
    Buffered,
    Rejected(String),
}

/// A dictionary asked of a peer.
#[derive(Debug)]
struct DictRequest<P> {
    peer: P,
    deadline_ms: u64,
}

/// A batch (signed header checked) waiting for its dictionary.
#[derive(Debug)]
struct Waiting<P> {
    /// Who sent it.
    peer: P,
    ns: String,
    bytes: Vec<u8>,
    /// Arrived by gossip (else in a `Batches` message).
    gossip: bool,
    /// A push in an owned namespace, passed on to readers once stored.
    forward: bool,
}

/// Most dictionary requests outstanding over all peers.
const DICT_REQUESTS_MAX: usize = 64;
/// Most bytes of batches waiting for dictionaries.
const DICT_WAITING_BYTES_MAX: usize = 8 * 1024 * 1024;

/// The sync engine. `P` identifies a peer (a libp2p `PeerId` in the node, an index in the
/// simulator).
#[derive(Debug)]
pub struct Engine<P> {
    cfg: EngineConfig,
    namespaces: BTreeMap<String, NsState<P>>,
    peers: BTreeSet<P>,
    peer_keys: BTreeMap<P, [u8; 32]>,
    clock: Clock,
    next_anti_entropy_ms: u64,
    stats: EngineStats,
    /// Fetches in flight to each peer (all namespaces).
    peer_fetches: BTreeMap<P, usize>,
    /// Peers whose fetch timed out and that have not answered one since: asked last.
    silent: BTreeSet<P>,
    /// Dictionaries held for verification, and when each was last used (a counter).
    dicts: DictSet,
    dict_used: BTreeMap<DictId, u64>,
    dict_clock: u64,
    /// The dictionary our writes in a namespace try (set by the shell's training policy).
    write_dicts: BTreeMap<String, Dict>,
    dict_requests: BTreeMap<DictRef, DictRequest<P>>,
    /// Batches waiting for a dictionary, by the ref they name.
    dict_waiting: BTreeMap<DictRef, Vec<Waiting<P>>>,
    dict_waiting_count: usize,
    dict_waiting_bytes: usize,
    /// Announcements of large batches written here, due at a time (in due order), at most
    /// [`LATE_ANNOUNCES_MAX`].
    late_announces: std::collections::VecDeque<LateAnnounce<P>>,
}

/// Most announcements waiting for their time (past it they go at once).
const LATE_ANNOUNCES_MAX: usize = 4_096;

/// An `Announce` the writer sends later (see [`EngineConfig::announce_delay_ms`]).
#[derive(Debug)]
struct LateAnnounce<P> {
    due_ms: u64,
    peer: P,
    ns: String,
    author: [u8; 32],
    seq: u64,
}

/// One batch of a `Batches` message as the shell hands it to
/// [`Engine::handle_batches_preverified`].
#[derive(Debug)]
pub enum PreVerified {
    /// Verified ahead with [`batch::verify`] (it names no dictionary, so the engine's own
    /// verification, with its dictionaries, would give exactly this).
    Verified(Box<VerifiedBatch>),
    /// Not verified ahead (it names a dictionary, which only the engine holds).
    Raw(Vec<u8>),
    /// Verification failed: the peer that sent it is rejected when the engine reaches it.
    Invalid(BatchError),
}

/// Verifies a `Batches` message's batches ahead of the engine, in order: the expensive part
/// of handling a fetch answer (inflate, decode, hash, signature), pure, so a shell can run it
/// on another thread than the one driving the engine. Stops at the first invalid batch (the
/// engine rejects the peer there and drops the rest).
pub fn preverify(batches: Vec<Vec<u8>>) -> Vec<PreVerified> {
    let mut out = Vec::with_capacity(batches.len());
    for bytes in batches {
        if batch::named_dict(&bytes).is_some() {
            out.push(PreVerified::Raw(bytes));
            continue;
        }
        match batch::verify(bytes) {
            Ok(vb) => out.push(PreVerified::Verified(Box::new(vb))),
            Err(e) => {
                out.push(PreVerified::Invalid(e));
                break;
            }
        }
    }
    out
}

impl<P: Clone + Ord + std::fmt::Debug> Engine<P> {
    /// An engine that has joined no namespace yet.
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            namespaces: BTreeMap::new(),
            peers: BTreeSet::new(),
            peer_keys: BTreeMap::new(),
            clock: Clock::new(),
            next_anti_entropy_ms: 0,
            stats: EngineStats::default(),
            peer_fetches: BTreeMap::new(),
            silent: BTreeSet::new(),
            dicts: DictSet::new(),
            dict_used: BTreeMap::new(),
            dict_clock: 0,
            write_dicts: BTreeMap::new(),
            dict_requests: BTreeMap::new(),
            dict_waiting: BTreeMap::new(),
            dict_waiting_count: 0,
            dict_waiting_bytes: 0,
            late_announces: std::collections::VecDeque::new(),
        }
    }

    /// Holds a dictionary for verification (start-up: the store's dictionaries).
    pub fn load_dict(&mut self, d: Dict) {
        self.hold_dict(d);
    }

    /// Our writes in `ns` try `d` from now on (small batches use it when it makes them
    /// smaller). Public namespaces only: a dictionary is trained on the namespace's data and
    /// is served to whoever asks by ref.
    pub fn set_write_dict(&mut self, ns: &str, d: Dict) {
        if self.namespaces.get(ns).is_some_and(|s| !s.owned()) {
            self.hold_dict(d.clone());
            self.write_dicts.insert(ns.to_string(), d);
        }
    }

    /// The zstd level our next large batch in `ns` is compressed at unless it is probed
    /// ([`Squeeze::level`]): what a writer compresses a call's ops ahead at
    /// ([`CheckedOps::compress_ahead`]). `None` for a namespace not joined.
    pub fn squeeze_level(&self, ns: &str) -> Option<i32> {
        self.namespaces.get(ns).map(|s| s.squeeze.level())
    }

    /// The dictionary our writes in `ns` try.
    pub fn write_dict(&self, ns: &str) -> Option<&Dict> {
        self.write_dicts.get(ns)
    }

    /// Dictionaries held in memory.
    pub fn dicts(&self) -> &DictSet {
        &self.dicts
    }

    /// Batches waiting for a dictionary, and dictionary requests outstanding.
    pub fn dict_waiting(&self) -> (usize, usize) {
        (self.dict_waiting_count, self.dict_requests.len())
    }

    fn hold_dict(&mut self, d: Dict) {
        let id = d.id();
        self.dict_clock += 1;
        self.dict_used.insert(id, self.dict_clock);
        self.dicts.insert(d);
        while self.dicts.len() > self.cfg.max_dicts_held.max(1) {
            // Forget the least recently used one that no write of ours uses.
            let victim = self
                .dict_used
                .iter()
                .filter(|(v, _)| **v != id && !self.write_dicts.values().any(|w| w.id() == **v))
                .min_by_key(|(_, used)| **used)
                .map(|(v, _)| *v);
            let Some(v) = victim else { break };
            self.dicts.remove(&v);
            self.dict_used.remove(&v);
        }
    }

    /// Verifies with the held dictionaries, noting which one was used.
    fn verify(&mut self, bytes: Vec<u8>) -> Result<VerifiedBatch, BatchError> {
        let vb = batch::verify_with(bytes, &self.dicts)?;
        if let Some(d) = &vb.dict {
            self.dict_clock += 1;
            self.dict_used.insert(d.id(), self.dict_clock);
        }
        Ok(vb)
    }

    /// If the batch names a dictionary we do not hold: its header, once the signature over
    /// it checks out (so only authentic batches cost a dictionary request).
    fn lacks_dict(
        &self,
        bytes: &[u8],
    ) -> Option<Result<(DictRef, batch::BatchHeader), BatchError>> {
        let r = batch::named_dict(bytes)?;
        if !self.dicts.find(r).is_empty() {
            return None;
        }
        Some(batch::verify_header(bytes).map(|(h, _)| (r, h)))
    }

    /// Asks `peer` for dictionary `r` unless it is asked for already. False if it could not
    /// be asked (too many requests outstanding).
    fn request_dict(
        &mut self,
        peer: &P,
        ns: &str,
        r: DictRef,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) -> bool {
        if self.dict_requests.contains_key(&r) {
            return true;
        }
        let to_peer = self
            .dict_requests
            .values()
            .filter(|q| &q.peer == peer)
            .count();
        if to_peer >= self.cfg.max_dict_requests_per_peer
            || self.dict_requests.len() >= DICT_REQUESTS_MAX
        {
            return false;
        }
        self.dict_requests.insert(
            r,
            DictRequest {
                peer: peer.clone(),
                deadline_ms: now_ms + self.cfg.fetch_timeout_ms,
            },
        );
        self.stats.dict_requests_sent += 1;
        out.push(Action::Send {
            peer: peer.clone(),
            msg: SyncMessage::FetchDicts {
                ns: ns.to_string(),
                refs: vec![r],
            },
        });
        true
    }

    /// Keeps a batch until dictionary `r` arrives (asking `peer` for it), within the bounds;
    /// otherwise drops it (catch-up brings it again). Returns whether it waits.
    fn wait_for_dict(
        &mut self,
        r: DictRef,
        w: Waiting<P>,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) -> bool {
        let asked = self.request_dict(&w.peer, &w.ns, r, now_ms, out);
        if !asked
            || self.dict_waiting_count >= self.cfg.max_dict_waiting
            || self.dict_waiting_bytes + w.bytes.len() > DICT_WAITING_BYTES_MAX
        {
            self.stats.dict_waits_dropped += 1;
            return false;
        }
        self.dict_waiting_count += 1;
        self.dict_waiting_bytes += w.bytes.len();
        self.dict_waiting.entry(r).or_default().push(w);
        true
    }

    /// Dictionary `r` arrived (`got`) or will not (request timed out, peer gone): ingest or
    /// drop what waited for it, and resume the fetches it paused.
    fn dict_settled(&mut self, r: DictRef, got: bool, now_ms: u64, out: &mut Vec<Action<P>>) {
        self.dict_requests.remove(&r);
        let waiting = self.dict_waiting.remove(&r).unwrap_or_default();
        for w in &waiting {
            self.dict_waiting_count -= 1;
            self.dict_waiting_bytes -= w.bytes.len();
        }
        let mut resume = Vec::new();
        for (ns, st) in &mut self.namespaces {
            st.dict_blocked.retain(|a, (b, _)| {
                let keep = *b != r;
                if !keep {
                    resume.push((ns.clone(), *a));
                }
                keep
            });
        }
        for w in waiting {
            if !got {
                self.stats.dict_waits_dropped += 1;
                continue;
            }
            if !self.namespaces.contains_key(&w.ns) {
                continue;
            }
            let vb = match self.verify(w.bytes) {
                Ok(vb) if vb.header.ns == w.ns => vb,
                _ => {
                    // Not the sender's fault for sure (the dictionary came from elsewhere):
                    // dropped and counted, not punished.
                    self.stats.batches_rejected += 1;
                    continue;
                }
            };
            let (author, seq) = (vb.header.author, vb.header.seq);
            let from = w.forward.then_some(&w.peer);
            match self.ingest_from(&w.ns, vb, from, w.forward, now_ms, out) {
                Ingest::Buffered if w.gossip => {
                    self.fetch_gap(&w.peer, &w.ns, author, seq, now_ms, out)
                }
                Ingest::Rejected(reason) => out.push(Action::Reject {
                    peer: w.peer,
                    reason,
                }),
                _ => {}
            }
        }
        for (ns, author) in resume {
            self.schedule(&ns, author, None, None, u32::MAX, now_ms, out);
        }
    }

    /// Settles dictionary requests past their deadline (or to `gone`), and unpauses authors
    /// whose pause ran out.
    fn expire_dicts(&mut self, now_ms: u64, gone: Option<&P>, out: &mut Vec<Action<P>>) {
        let expired: Vec<DictRef> = self
            .dict_requests
            .iter()
            .filter(|(_, q)| q.deadline_ms <= now_ms || Some(&q.peer) == gone)
            .map(|(r, _)| *r)
            .collect();
        for r in expired {
            self.dict_settled(r, false, now_ms, out);
        }
        let mut resume = Vec::new();
        for (ns, st) in &mut self.namespaces {
            st.dict_blocked.retain(|a, (_, deadline)| {
                let keep = *deadline > now_ms;
                if !keep {
                    resume.push((ns.clone(), *a));
                }
                keep
            });
        }
        for (ns, author) in resume {
            self.schedule(&ns, author, None, None, u32::MAX, now_ms, out);
        }
    }

    /// Joins a namespace: its batches will be accepted, stored and synced.
    pub fn join(&mut self, ns: &str) {
        self.namespaces.entry(ns.to_string()).or_default();
    }

    /// Joins (or updates) an owned namespace with our capability chain (`None` if we hold the
    /// owner key itself). Returns the `Present` messages for the peers already connected.
    pub fn join_owned(&mut self, ns: &str, mine: Option<Chain>) -> Vec<Action<P>> {
        let st = self.namespaces.entry(ns.to_string()).or_default();
        st.policy = Policy::Owned { mine };
        let peers: Vec<P> = self.peers.iter().cloned().collect();
        peers.iter().flat_map(|p| self.presents_for(p)).collect()
    }

    /// Restores a revocation from the store at start-up.
    pub fn load_revocation(&mut self, ns: &str, token: TokenId, at: Hlc) {
        let st = self.namespaces.entry(ns.to_string()).or_default();
        let e = st.revocations.entry(token).or_insert(at);
        *e = (*e).min(at);
    }

    /// Revocations known in a namespace.
    pub fn revocations(&self, ns: &str) -> BTreeMap<TokenId, Hlc> {
        self.namespaces
            .get(ns)
            .map(|s| s.revocations.clone())
            .unwrap_or_default()
    }

    /// Whether `ns` is owned (capabilities required, never gossiped).
    pub fn is_owned(&self, ns: &str) -> bool {
        self.namespaces.get(ns).is_some_and(|s| s.owned())
    }

    /// Our capability chain for an owned namespace.
    pub fn my_chain(&self, ns: &str) -> Option<&Chain> {
        match &self.namespaces.get(ns)?.policy {
            Policy::Owned { mine } => mine.as_ref(),
            Policy::Public => None,
        }
    }

    /// Whether the namespace has been joined.
    pub fn has_namespace(&self, ns: &str) -> bool {
        self.namespaces.contains_key(ns)
    }

    /// Joined namespaces.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }

    /// Restores an author's chain head from the store at start-up.
    pub fn load_head(&mut self, ns: &str, author: [u8; 32], seq: u64, id: BatchId, hlc_max: Hlc) {
        self.clock.observe(hlc_max);
        self.namespaces
            .entry(ns.to_string())
            .or_default()
            .heads
            .insert(author, Head { seq, id, hlc_max });
    }

    /// The version vector of a namespace (author → highest contiguous seq).
    pub fn vector(&self, ns: &str) -> BTreeMap<[u8; 32], u64> {
        self.namespaces
            .get(ns)
            .map(|s| s.heads.iter().map(|(a, h)| (*a, h.seq)).collect())
            .unwrap_or_default()
    }

    /// The head (seq, id) of one author's chain.
    pub fn head(&self, ns: &str, author: &[u8; 32]) -> Option<(u64, BatchId)> {
        self.namespaces
            .get(ns)?
            .heads
            .get(author)
            .map(|h| (h.seq, h.id))
    }

    /// Counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Connected peers.
    pub fn peers(&self) -> impl Iterator<Item = &P> {
        self.peers.iter()
    }

    /// Seals local ops into the next batch of `keypair`'s chain in `ns`. Ops are stamped with
    /// fresh, strictly increasing timestamps here. Returns the batch and the actions (store,
    /// then publish).
    pub fn write(
        &mut self,
        ns: &str,
        keypair: &Keypair,
        ops: Vec<Op>,
        now_ms: u64,
    ) -> Result<(VerifiedBatch, Vec<Action<P>>), BatchError> {
        self.write_checked(ns, keypair, &mut CheckedOps::new(ops)?, now_ms)
    }

    /// [`Engine::write`] of ops the caller has already checked: their fields are not walked
    /// again here (see [`CheckedOps`]). The ops are left in `ops`, stamped and perhaps
    /// pruned, for the caller to drop.
    pub fn write_checked(
        &mut self,
        ns: &str,
        keypair: &Keypair,
        ops: &mut CheckedOps,
        now_ms: u64,
    ) -> Result<(VerifiedBatch, Vec<Action<P>>), BatchError> {
        let ahead = ops.take_ahead();
        let len = ops.len();
        let ops = ops.ops_mut();
        let state = self.namespaces.get(ns).ok_or_else(|| {
            BatchError::Inconsistent(format!("namespace {ns:?} has not been joined"))
        })?;
        if len > limits::MAX_OPS_PER_BATCH {
            return Err(BatchError::Inconsistent(format!(
                "{len} ops exceed the limit of {} per batch",
                limits::MAX_OPS_PER_BATCH
            )));
        }
        let author = *keypair.public().as_bytes();
        let pos = match state.heads.get(&author) {
            Some(h) => ChainPosition {
                seq: h.seq + 1,
                prev: Some(h.id),
            },
            None => ChainPosition { seq: 1, prev: None },
        };
        let saved_clock = self.clock.clone();
        // One tick per op written, then drop what later ops of the same batch make invisible
        // (exactly equivalent). Ops encoded ahead by their writer were pruned there, carrying
        // provisional stamps (see `CheckedOps::encode_ahead`): they take the stamps they
        // would have had here, and their payload then needs only its first stamp written in.
        let stamped = match ahead {
            Some(a) => {
                let first = self.clock.tick(now_ms);
                for _ in 1..a.stamps() {
                    self.clock.tick(now_ms);
                }
                match a.stamp(first) {
                    Some(s) => Some(s),
                    None => {
                        self.clock = saved_clock;
                        return Err(BatchError::Inconsistent(
                            "a payload encoded ahead does not decode".into(),
                        ));
                    }
                }
            }
            None => {
                for op in ops.iter_mut() {
                    op.set_hlc(self.clock.tick(now_ms));
                }
                crate::prune::prune(ops);
                None
            }
        };
        let cap = match &state.policy {
            Policy::Owned { mine } if !capability::is_owner(ns, &author) => {
                Some(mine.clone().ok_or_else(|| {
                    BatchError::Inconsistent(format!("no capability to write in {ns:?}"))
                })?)
            }
            _ => None,
        };
        let dict = match &state.policy {
            Policy::Public => self.write_dicts.get(ns),
            Policy::Owned { .. } => None,
        };
        let mut squeeze = state.squeeze;
        let sealed = match stamped {
            Some(Stamped::Plain(plain)) => {
                batch::seal_plain(keypair, ns, pos, plain, cap.as_ref(), dict, &mut squeeze)
            }
            Some(Stamped::Ops(decoded)) => {
                batch::seal_checked(keypair, ns, pos, &decoded, cap.as_ref(), dict, &mut squeeze)
            }
            None => batch::seal_checked(keypair, ns, pos, ops, cap.as_ref(), dict, &mut squeeze),
        };
        if let Some(st) = self.namespaces.get_mut(ns) {
            self.stats.fast_compressed_sealed += squeeze.fast_batches() - st.squeeze.fast_batches();
            self.stats.writer_compressed_sealed += squeeze.ahead_taken() - st.squeeze.ahead_taken();
            st.squeeze = squeeze;
        }
        let vb = match sealed {
            Ok(vb) => vb,
            Err(e) => {
                self.clock = saved_clock;
                return Err(e);
            }
        };
        if let Err(why) = self.admit(ns, &vb) {
            self.clock = saved_clock;
            return Err(BatchError::Unauthorized(why));
        }
        let mut actions = Vec::with_capacity(2);
        match self.ingest(ns, vb.clone(), None, now_ms, &mut actions) {
            Ingest::Stored => {}
            other => {
                // Cannot happen: we just built the next link of our own chain.
                let why = match other {
                    Ingest::Rejected(r) => r,
                    _ => "not stored".into(),
                };
                return Err(BatchError::Inconsistent(format!(
                    "local batch refused: {why}"
                )));
            }
        }
        if vb.dict.is_some() {
            self.stats.dict_batches_sealed += 1;
        }
        if !self.is_owned(ns) && !self.push_large(ns, &vb, now_ms, &mut actions) {
            actions.push(Action::Publish {
                ns: ns.to_string(),
                id: vb.id,
                bytes: vb.bytes.clone(),
            });
        }
        Ok((vb, actions))
    }

    /// Seals the writes of several local callers to `ns`, in order, into as few batches as
    /// the limits allow (see [`crate::coalesce`] for why this is equivalent to one batch per
    /// caller). Each caller is checked on its own first, so an invalid or unauthorized write
    /// fails alone. Returns, per caller, the index of its batch in [`WriteMany::batches`] or
    /// its own error; and the actions (store, then publish) for every batch.
    pub fn write_many(
        &mut self,
        ns: &str,
        keypair: &Keypair,
        writes: Vec<Vec<Op>>,
        now_ms: u64,
    ) -> WriteMany<P> {
        let writes = writes
            .into_iter()
            .map(|ops| CheckedOps::new(ops).map_err(BatchError::from))
            .collect();
        self.write_many_inner(ns, keypair, writes, now_ms)
    }

    /// [`Engine::write_many`] of ops each caller has already checked ([`CheckedOps`]).
    pub fn write_many_checked(
        &mut self,
        ns: &str,
        keypair: &Keypair,
        writes: Vec<CheckedOps>,
        now_ms: u64,
    ) -> WriteMany<P> {
        let writes = writes.into_iter().map(Ok).collect();
        self.write_many_inner(ns, keypair, writes, now_ms)
    }

    fn write_many_inner(
        &mut self,
        ns: &str,
        keypair: &Keypair,
        writes: Vec<Result<CheckedOps, BatchError>>,
        now_ms: u64,
    ) -> WriteMany<P> {
        let mut out = WriteMany {
            batches: Vec::new(),
            results: Vec::with_capacity(writes.len()),
            actions: Vec::new(),
            spent: Vec::with_capacity(writes.len()),
        };
        let author = *keypair.public().as_bytes();
        // Per-caller checks; the callers that pass are planned into groups.
        let mut ok: Vec<(usize, CheckedOps)> = Vec::with_capacity(writes.len());
        let mut sizes = Vec::with_capacity(writes.len());
        for (i, ops) in writes.into_iter().enumerate() {
            let checked = ops.and_then(|ops| {
                self.check_write(ns, &author, &ops, now_ms)?;
                Ok(ops)
            });
            match checked {
                Ok(ops) => {
                    sizes.push(crate::coalesce::CallerSize {
                        ops: ops.len(),
                        bytes: ops.bytes(),
                        alone: ops.sealed_alone(),
                    });
                    ok.push((i, ops));
                    out.results
                        .push(Err(BatchError::Inconsistent("not written".into())));
                }
                Err(e) => out.results.push(Err(e)),
            }
            out.spent.push(CheckedOps::default());
        }
        let groups = crate::coalesce::plan(
            &sizes,
            limits::MAX_OPS_PER_BATCH,
            crate::coalesce::GROUP_BYTES_BUDGET,
        );
        let mut ok = ok.into_iter();
        for g in groups {
            let members: Vec<(usize, CheckedOps)> = ok.by_ref().take(g.len()).collect();
            if members.len() > 1 {
                // A copy: if the group does not seal, each caller is sealed alone.
                let mut all = CheckedOps::concat(members.iter().map(|(_, ops)| ops));
                if let Ok((vb, acts)) = self.write_checked(ns, keypair, &mut all, now_ms) {
                    let b = out.batches.len();
                    out.batches.push(vb);
                    out.actions.extend(acts);
                    for (i, ops) in members {
                        out.results[i] = Ok(b);
                        out.spent[i] = ops;
                    }
                    continue;
                }
                // The group did not seal (a bound or a validity window the per-caller checks
                // could not see): each caller alone gets exactly its own outcome.
            }
            for (i, mut ops) in members {
                out.results[i] = match self.write_checked(ns, keypair, &mut ops, now_ms) {
                    Ok((vb, acts)) => {
                        out.batches.push(vb);
                        out.actions.extend(acts);
                        Ok(out.batches.len() - 1)
                    }
                    Err(e) => Err(e),
                };
                out.spent[i] = ops;
            }
        }
        out
    }

    /// Whether one caller's ops could be sealed by us into `ns` now: op count, and the
    /// namespace's write policy (no revocations in public namespaces; in owned ones our
    /// capability's rights, validity at `now_ms` and scope). The same checks the sealed
    /// batch passes in `admit`, judged per caller so that a bad caller fails alone.
    fn check_write(
        &self,
        ns: &str,
        author: &[u8; 32],
        ops: &CheckedOps,
        now_ms: u64,
    ) -> Result<(), BatchError> {
        let st = self.namespaces.get(ns).ok_or_else(|| {
            BatchError::Inconsistent(format!("namespace {ns:?} has not been joined"))
        })?;
        if ops.is_empty() {
            return Err(BatchError::Inconsistent(
                "a batch holds at least one op".into(),
            ));
        }
        if ops.len() > limits::MAX_OPS_PER_BATCH {
            return Err(BatchError::Inconsistent(format!(
                "{} ops exceed the limit of {} per batch",
                ops.len(),
                limits::MAX_OPS_PER_BATCH
            )));
        }
        let revokes = ops.has_revokes();
        match &st.policy {
            Policy::Public if revokes => Err(BatchError::Unauthorized(
                "revocation in a public namespace".into(),
            )),
            Policy::Public => Ok(()),
            Policy::Owned { .. } if capability::is_owner(ns, author) => Ok(()),
            Policy::Owned { mine } => {
                let chain = mine.as_ref().ok_or_else(|| {
                    BatchError::Inconsistent(format!("no capability to write in {ns:?}"))
                })?;
                let need = if revokes {
                    Rights::Admin
                } else {
                    Rights::Write
                };
                chain
                    .authorizes(ns, author, need, now_ms)
                    .map_err(|e| BatchError::Unauthorized(e.to_string()))?;
                // A capability over the whole namespace covers every record: no need to read
                // them (for a call encoded ahead that read is a decode of its payload, on the
                // actor: 4% of B3's owned run).
                if chain.covers_everything() {
                    return Ok(());
                }
                match ops.record_outside(|c, k| chain.covers(c, k)) {
                    Some((c, k)) => Err(BatchError::Unauthorized(format!(
                        "record {c}/{k} outside the capability's scope"
                    ))),
                    None => Ok(()),
                }
            }
        }
    }

    /// A connection to `peer` is up: tell it what we have. Without the peer's key it can
    /// only take part in public namespaces.
    pub fn peer_up(&mut self, peer: P, now_ms: u64) -> Vec<Action<P>> {
        self.peer_up_with_key(peer, None, now_ms)
    }

    /// A connection to `peer`, authenticated as ed25519 `key`, is up.
    pub fn peer_up_with_key(
        &mut self,
        peer: P,
        key: Option<[u8; 32]>,
        now_ms: u64,
    ) -> Vec<Action<P>> {
        self.peers.insert(peer.clone());
        if let Some(k) = key {
            self.peer_keys.insert(peer.clone(), k);
        }
        let mut actions = self.presents_for(&peer);
        actions.extend(self.haves_for(&peer, now_ms));
        actions
    }

    /// The connection to `peer` is gone: forget what it had and re-route its fetches.
    pub fn peer_down(&mut self, peer: &P, now_ms: u64) -> Vec<Action<P>> {
        self.peers.remove(peer);
        self.peer_keys.remove(peer);
        let mut actions = Vec::new();
        let names: Vec<String> = self.namespaces.keys().cloned().collect();
        for ns in names {
            let st = self.namespaces.get_mut(&ns).expect("listed");
            st.peer_heads.remove(peer);
            st.lazy.retain(|_, tree| {
                tree.peers.remove(peer);
                !tree.peers.is_empty()
            });
            st.readers.remove(peer);
            let orphaned: Vec<([u8; 32], u64)> = st
                .fetches
                .iter()
                .filter(|(_, f)| &f.peer == peer)
                .map(|(k, _)| *k)
                .collect();
            let mut authors = BTreeSet::new();
            for key in orphaned {
                self.take_fetch(&ns, key);
                authors.insert(key.0);
            }
            // Each orphaned stripe goes to another holder.
            for author in authors {
                self.schedule(&ns, author, None, None, u32::MAX, now_ms, &mut actions);
            }
        }
        self.peer_fetches.remove(peer);
        self.silent.remove(peer);
        self.expire_dicts(now_ms, Some(peer), &mut actions);
        self.retry_wanting(now_ms, &mut actions);
        actions
    }

    /// A sync message arrived from `peer`.
    pub fn handle_message(&mut self, peer: P, msg: SyncMessage, now_ms: u64) -> Vec<Action<P>> {
        let mut actions = Vec::new();
        match msg {
            SyncMessage::Have { ns, heads } => {
                if heads.len() > limits::MAX_HAVE_AUTHORS {
                    actions.push(Action::Reject {
                        peer,
                        reason: "oversized Have".into(),
                    });
                    return actions;
                }
                let Some(st) = self.namespaces.get_mut(&ns) else {
                    return actions;
                };
                let theirs: BTreeMap<[u8; 32], u64> =
                    heads.iter().map(|h| (h.author, h.seq)).collect();
                let behind: Vec<[u8; 32]> = theirs
                    .iter()
                    .filter(|(a, seq)| **seq > st.heads.get(*a).map_or(0, |h| h.seq))
                    .map(|(a, _)| *a)
                    .collect();
                st.peer_heads.insert(peer.clone(), theirs);
                // First every author's first missing window (so each is asked for in this
                // round trip even when the per-peer cap is tight), then the other stripes.
                for author in &behind {
                    self.schedule(&ns, *author, Some(&peer), None, 1, now_ms, &mut actions);
                }
                for author in behind {
                    let max = u32::MAX;
                    self.schedule(&ns, author, Some(&peer), None, max, now_ms, &mut actions);
                }
            }
            SyncMessage::Prune { ns, author } => {
                if let Some(st) = self.namespaces.get_mut(&ns) {
                    // Only for an author we hold (the peer pushed us theirs) and a peer that
                    // holds the namespace; bounded like our own prunes.
                    if st.peer_heads.contains_key(&peer) && st.heads.contains_key(&author) {
                        st.prune(author, peer);
                    }
                }
            }
            SyncMessage::Graft { ns, author } => {
                if let Some(st) = self.namespaces.get_mut(&ns) {
                    st.graft(&author, &peer);
                }
            }
            SyncMessage::Announce { ns, author, seq } => {
                let Some(st) = self.namespaces.get_mut(&ns) else {
                    return actions;
                };
                let theirs = st.peer_heads.entry(peer.clone()).or_default();
                if theirs.len() >= limits::MAX_HAVE_AUTHORS && !theirs.contains_key(&author) {
                    actions.push(Action::Reject {
                        peer,
                        reason: "announces too many authors".into(),
                    });
                    return actions;
                }
                let known = theirs.entry(author).or_insert(0);
                *known = (*known).max(seq);
                if seq > st.heads.get(&author).map_or(0, |h| h.seq) {
                    let max = u32::MAX;
                    self.schedule(&ns, author, Some(&peer), None, max, now_ms, &mut actions);
                }
            }
            SyncMessage::Fetch {
                ns,
                author,
                from_seq,
                limit,
                max_bytes,
            } => {
                let Some(st) = self.namespaces.get(&ns) else {
                    return actions;
                };
                let ours = st.heads.get(&author).map_or(0, |h| h.seq);
                let cutoff = st.read_cutoff(&peer, self.peer_keys.get(&peer), &ns, now_ms);
                if cutoff.is_none() {
                    // Reveal nothing, not even whether we hold the chain.
                    self.stats.reads_refused += 1;
                    actions.push(Action::Send {
                        peer,
                        msg: SyncMessage::Batches {
                            ns,
                            author,
                            batches: Vec::new(),
                        },
                    });
                } else if from_seq == 0 {
                    actions.push(Action::Reject {
                        peer,
                        reason: "fetch from seq 0".into(),
                    });
                } else if from_seq <= ours {
                    let limit = limit.clamp(1, limits::MAX_FETCH_BATCHES);
                    actions.push(Action::Serve {
                        until: cutoff.flatten(),
                        peer,
                        ns,
                        author,
                        from_seq,
                        limit,
                        max_bytes,
                    });
                } else {
                    actions.push(Action::Send {
                        peer,
                        msg: SyncMessage::Batches {
                            ns,
                            author,
                            batches: Vec::new(),
                        },
                    });
                }
            }
            SyncMessage::Revoked { ns, batches } => {
                if batches.len() > capability::MAX_CHAIN_DEPTH {
                    actions.push(Action::Reject {
                        peer,
                        reason: "too many revocations".into(),
                    });
                    return actions;
                }
                if !self.is_owned(&ns) {
                    return actions;
                }
                let mut learned = false;
                for bytes in batches {
                    if let Some(Ok((r, _))) = self.lacks_dict(&bytes) {
                        // Not its fault: ask for the dictionary; it tells us again on the
                        // next `Present`.
                        self.request_dict(&peer, &ns, r, now_ms, &mut actions);
                        return actions;
                    }
                    let vb = match self.verify(bytes.into_vec()) {
                        Ok(vb) if vb.header.ns == ns => vb,
                        Ok(_) => {
                            actions.push(Action::Reject {
                                peer,
                                reason: "revocation for another namespace".into(),
                            });
                            return actions;
                        }
                        Err(e) => {
                            self.stats.batches_rejected += 1;
                            actions.push(Action::Reject {
                                peer,
                                reason: e.to_string(),
                            });
                            return actions;
                        }
                    };
                    if let Err(reason) = self.admit(&ns, &vb) {
                        self.stats.batches_rejected += 1;
                        actions.push(Action::Reject { peer, reason });
                        return actions;
                    }
                    let st = self.namespaces.get_mut(&ns).expect("checked");
                    learned |= record_revocations(&mut st.revocations, &vb);
                }
                if learned {
                    let revocations = self.revocations(&ns);
                    actions.push(Action::Rebuild { ns, revocations });
                }
            }
            SyncMessage::Present { ns, chain } => {
                let Some(st) = self.namespaces.get_mut(&ns) else {
                    return actions;
                };
                if !st.owned() {
                    return actions;
                }
                let chain = match Chain::decode(&chain) {
                    Ok(c) => c,
                    Err(e) => {
                        actions.push(Action::Reject {
                            peer,
                            reason: format!("bad capability: {e}"),
                        });
                        return actions;
                    }
                };
                let Some(key) = self.peer_keys.get(&peer).copied() else {
                    return actions;
                };
                let revoked: Vec<TokenId> = chain
                    .ids()
                    .filter(|id| st.revocations.contains_key(id))
                    .collect();
                if chain.authorizes(&ns, &key, Rights::Read, now_ms).is_ok() {
                    let newly = !st.readers.contains_key(&peer);
                    st.readers.insert(peer.clone(), chain);
                    if newly {
                        actions.extend(self.have_for(&ns, &peer, now_ms));
                        // Answer with ours at once (instead of at the next anti-entropy
                        // round), so a node that just joined is served both ways right away.
                        actions.extend(self.present_for(&ns, &peer));
                    }
                    if !revoked.is_empty() {
                        // It still presents a revoked chain: it has not heard. Tell it, so it
                        // reaches the same verdict as everyone else.
                        actions.push(Action::ServeRevocations {
                            peer,
                            ns,
                            tokens: revoked,
                        });
                    }
                } else {
                    st.readers.remove(&peer);
                    self.stats.reads_refused += 1;
                }
            }
            SyncMessage::FetchDicts { ns, refs } => {
                if refs.len() > limits::MAX_DICTS_PER_MESSAGE {
                    actions.push(Action::Reject {
                        peer,
                        reason: "too many dictionaries asked for".into(),
                    });
                    return actions;
                }
                let Some(st) = self.namespaces.get(&ns) else {
                    return actions;
                };
                if !st.may_read(&peer, self.peer_keys.get(&peer), &ns, now_ms) {
                    self.stats.reads_refused += 1;
                    return actions;
                }
                let mut found = Vec::new();
                let mut missing = Vec::new();
                for r in refs {
                    match self.dicts.find(r) {
                        held if held.is_empty() => missing.push(r),
                        held => found.extend(held),
                    }
                }
                found.truncate(limits::MAX_DICTS_PER_MESSAGE);
                if !found.is_empty() {
                    let dicts = found
                        .iter()
                        .map(|d| serde_bytes::ByteBuf::from(d.bytes().to_vec()))
                        .collect();
                    actions.push(Action::Send {
                        peer: peer.clone(),
                        msg: SyncMessage::Dicts { dicts },
                    });
                }
                if !missing.is_empty() {
                    actions.push(Action::ServeDicts {
                        peer,
                        refs: missing,
                    });
                }
            }
            SyncMessage::Dicts { dicts } => {
                if dicts.len() > limits::MAX_DICTS_PER_MESSAGE {
                    self.stats.dicts_rejected += 1;
                    actions.push(Action::Reject {
                        peer,
                        reason: "too many dictionaries".into(),
                    });
                    return actions;
                }
                let mut arrived = Vec::new();
                for bytes in dicts {
                    let d = match Dict::new(bytes.into_vec()) {
                        Ok(d) => d,
                        Err(e) => {
                            self.stats.dicts_rejected += 1;
                            actions.push(Action::Reject {
                                peer,
                                reason: e.to_string(),
                            });
                            return actions;
                        }
                    };
                    // Only what we asked for (by ref: the id is computed from the bytes, and
                    // the batch's keyed payload hash decides whether it is the right one).
                    let r = d.dict_ref();
                    if self.dict_requests.contains_key(&r) || self.dict_waiting.contains_key(&r) {
                        self.stats.dicts_received += 1;
                        self.hold_dict(d);
                        arrived.push(r);
                    }
                }
                for r in arrived {
                    self.dict_settled(r, true, now_ms, &mut actions);
                }
            }
            SyncMessage::Batches {
                ns,
                author,
                batches,
            } => {
                let items = batches
                    .into_iter()
                    .map(|b| PreVerified::Raw(b.into_vec()))
                    .collect();
                self.on_batches(peer, ns, author, items, now_ms, &mut actions);
            }
        }
        actions
    }

    /// A `Batches` message whose batches the shell verified ahead, off the thread that drives
    /// the engine ([`preverify`]): handled exactly as [`Engine::handle_message`] handles the
    /// message itself, without verifying again what was verified.
    pub fn handle_batches_preverified(
        &mut self,
        peer: P,
        ns: String,
        author: [u8; 32],
        batches: Vec<PreVerified>,
        now_ms: u64,
    ) -> Vec<Action<P>> {
        let mut actions = Vec::new();
        self.on_batches(peer, ns, author, batches, now_ms, &mut actions);
        actions
    }

    /// One fetched (or pushed) batch, verified, checked against the chain it was asked for
    /// and ingested. `None` if the peer was rejected (the rest of its message is dropped).
    #[allow(clippy::too_many_arguments)]
    fn accept_fetched(
        &mut self,
        peer: &P,
        ns: &str,
        author: [u8; 32],
        vb: VerifiedBatch,
        forward: bool,
        now_ms: u64,
        actions: &mut Vec<Action<P>>,
        first_seq: &mut Option<u64>,
    ) -> Option<Ingest> {
        if vb.header.ns != ns || vb.header.author != author {
            self.stats.batches_rejected += 1;
            actions.push(Action::Reject {
                peer: peer.clone(),
                reason: "batch outside the fetched chain".into(),
            });
            return None;
        }
        first_seq.get_or_insert(vb.header.seq);
        let from = if forward { Some(peer) } else { None };
        let res = self.ingest_from(ns, vb, from, forward, now_ms, actions);
        if let Ingest::Rejected(reason) = res {
            actions.push(Action::Reject {
                peer: peer.clone(),
                reason,
            });
            return None;
        }
        Some(res)
    }

    /// A `Batches` message: a fetch answer, or a push (owned namespaces; large batches in
    /// public ones).
    fn on_batches(
        &mut self,
        peer: P,
        ns: String,
        author: [u8; 32],
        batches: Vec<PreVerified>,
        now_ms: u64,
        actions: &mut Vec<Action<P>>,
    ) {
        if batches.len() > limits::MAX_FETCH_BATCHES as usize {
            actions.push(Action::Reject {
                peer,
                reason: "too many batches".into(),
            });
            return;
        }
        let Some(st) = self.namespaces.get(&ns) else {
            return;
        };
        let head_before = st.heads.get(&author).map_or(0, |h| h.seq);
        let public = !st.owned();
        // Whether a large batch is stored here: one of the message's, or one of the buffer's
        // that they let through.
        let mut large = false;
        // Large batches stored from this message (pushed on along the tree), and whether a
        // large one pushed to us was one we held (the link then leaves the tree).
        let mut fresh: Vec<bytes::Bytes> = Vec::new();
        let mut pushed_twice = false;
        let buffered_large: Vec<u64> = st
            .pending
            .range((author, 0)..=(author, u64::MAX))
            .filter(|(_, vb)| vb.bytes.len() >= self.cfg.push_min_bytes)
            .map(|((_, seq), _)| *seq)
            .collect();
        // An answer to our fetch is not forwarded to readers, a push in an owned namespace is;
        // in public namespaces a large batch from either goes on along the push tree (below).
        let forward = !st
            .fetches
            .range((author, 0)..=(author, u64::MAX))
            .any(|(_, f)| f.peer == peer);
        let empty = batches.is_empty();
        let mut first_seq = None;
        for item in batches {
            let verified = match item {
                PreVerified::Verified(vb) => Ok(*vb),
                PreVerified::Invalid(e) => Err(e),
                PreVerified::Raw(bytes) => {
                    match self.lacks_dict(&bytes) {
                        None => {}
                        Some(Ok((r, h))) if h.ns == ns && h.author == author => {
                            // Wait for the dictionary; the rest of the answer is dropped and
                            // fetched again once it is here (this author's fetches pause).
                            first_seq.get_or_insert(h.seq);
                            let w = Waiting {
                                peer: peer.clone(),
                                ns: ns.clone(),
                                bytes,
                                gossip: false,
                                forward,
                            };
                            self.wait_for_dict(r, w, now_ms, actions);
                            let deadline = now_ms + self.cfg.fetch_timeout_ms;
                            let st = self.namespaces.get_mut(&ns).expect("checked");
                            st.dict_blocked.insert(author, (r, deadline));
                            break;
                        }
                        Some(Ok(_)) => {
                            self.stats.batches_rejected += 1;
                            actions.push(Action::Reject {
                                peer,
                                reason: "batch outside the fetched chain".into(),
                            });
                            return;
                        }
                        Some(Err(e)) => {
                            self.stats.batches_rejected += 1;
                            actions.push(Action::Reject {
                                peer,
                                reason: e.to_string(),
                            });
                            return;
                        }
                    }
                    self.verify(bytes)
                }
            };
            let vb = match verified {
                Ok(vb) => vb,
                Err(e) => {
                    self.stats.batches_rejected += 1;
                    actions.push(Action::Reject {
                        peer,
                        reason: e.to_string(),
                    });
                    return;
                }
            };
            let is_large = vb.bytes.len() >= self.cfg.push_min_bytes;
            large |= is_large;
            let bytes = is_large.then(|| vb.bytes.clone());
            match self.accept_fetched(
                &peer,
                &ns,
                author,
                vb,
                forward,
                now_ms,
                actions,
                &mut first_seq,
            ) {
                None => return,
                Some(Ingest::Stored) => fresh.extend(bytes),
                Some(Ingest::Duplicate) => pushed_twice |= is_large && forward,
                Some(_) => {}
            }
        }
        // Which stripe this answers (the message does not say): a non-empty answer,
        // the one to `peer` holding its first seq; an empty one, the highest one to
        // `peer` (if a lower one comes back empty, the higher ones will too).
        let st = self.namespaces.get(&ns).expect("checked");
        let mut mine = st
            .fetches
            .range((author, 0)..=(author, u64::MAX))
            .filter(|(_, f)| f.peer == peer);
        let answered = match first_seq {
            Some(q) => mine
                .find(|((_, from), f)| *from <= q && q <= f.to)
                .map(|(k, _)| *k),
            None => mine.last().map(|(k, _)| *k),
        };
        if let Some(key) = answered {
            self.take_fetch(&ns, key);
            self.silent.remove(&peer);
        }
        if empty {
            // The peer holds nothing from where we asked (say, it relayed a batch it
            // had only buffered): believing our earlier guess would re-send the same
            // fetch at once, and again on every empty answer.
            let st = self.namespaces.get_mut(&ns).expect("checked");
            let ours = st.heads.get(&author).map_or(0, |h| h.seq);
            let bound = answered.map_or(ours, |(_, from)| (from - 1).max(ours));
            if let Some(known) = st
                .peer_heads
                .get_mut(&peer)
                .and_then(|h| h.get_mut(&author))
            {
                *known = (*known).min(bound);
            }
            let max = u32::MAX;
            self.schedule(&ns, author, None, Some(&peer), max, now_ms, actions);
        } else {
            // Keep going while the peer is known to have more.
            let max = u32::MAX;
            self.schedule(&ns, author, Some(&peer), None, max, now_ms, actions);
        }
        let st = self.namespaces.get_mut(&ns).expect("checked");
        let head_after = st.heads.get(&author).map_or(0, |h| h.seq);
        large |= buffered_large.iter().any(|seq| *seq <= head_after);
        if public && pushed_twice && st.prune(author, peer.clone()) {
            actions.push(Action::Send {
                peer: peer.clone(),
                msg: SyncMessage::Prune {
                    ns: ns.clone(),
                    author,
                },
            });
        }
        if public && !forward && !fresh.is_empty() && st.graft(&author, &peer) {
            // We had to fetch it: the tree did not bring it here in time.
            actions.push(Action::Send {
                peer: peer.clone(),
                msg: SyncMessage::Graft {
                    ns: ns.clone(),
                    author,
                },
            });
        }
        if public && large && head_after > head_before {
            self.relay_large(&ns, author, &peer, fresh, now_ms, actions);
        }
        // A slot to this peer is free again: authors held back may go now.
        self.retry_wanting(now_ms, actions);
    }

    /// The verdict for gossip on `ns` before looking at the batch: unknown namespaces are
    /// ignored; owned ones are never gossiped, so whoever does is leaking or probing.
    fn gossip_gate(&self, ns: &str) -> Option<GossipVerdict> {
        match self.namespaces.get(ns) {
            None => Some(GossipVerdict::Ignore),
            Some(st) if st.owned() => {
                Some(GossipVerdict::Reject("gossip in an owned namespace".into()))
            }
            Some(_) => None,
        }
    }

    /// A batch arrived by gossip on `ns`'s topic, relayed by `peer`.
    pub fn handle_gossip(
        &mut self,
        peer: P,
        ns: &str,
        bytes: Vec<u8>,
        now_ms: u64,
    ) -> (GossipVerdict, Vec<Action<P>>) {
        let mut actions = Vec::new();
        if let Some(verdict) = self.gossip_gate(ns) {
            return (verdict, actions);
        }
        // Cheap duplicate check first: most gossip copies are of batches we already hold, and
        // a header decode costs far less than a signature check.
        if let Ok(env) = batch::Envelope::parse(&bytes) {
            if let Ok(h) = ciborium::from_reader::<batch::BatchHeader, _>(env.header) {
                let st = self.namespaces.get(ns).expect("checked");
                if let Some(head) = st.heads.get(&h.author) {
                    if h.seq < head.seq || (h.seq == head.seq && env.id() == head.id) {
                        self.stats.batches_duplicate += 1;
                        return (GossipVerdict::Ignore, actions);
                    }
                }
            }
        }
        match self.lacks_dict(&bytes) {
            None => {}
            Some(Ok((r, _))) => {
                // Authentic, but we cannot read it yet: ask the relayer for the dictionary and
                // keep the batch meanwhile. Not relayed by us (others get it from their own
                // mesh or by catch-up), not held against the relayer.
                let w = Waiting {
                    peer,
                    ns: ns.to_string(),
                    bytes,
                    gossip: true,
                    forward: false,
                };
                self.wait_for_dict(r, w, now_ms, &mut actions);
                return (GossipVerdict::Ignore, actions);
            }
            Some(Err(e)) => {
                self.stats.batches_rejected += 1;
                return (GossipVerdict::Reject(e.to_string()), actions);
            }
        }
        let vb = match self.verify(bytes) {
            Ok(vb) => vb,
            Err(e) => {
                self.stats.batches_rejected += 1;
                return (GossipVerdict::Reject(e.to_string()), actions);
            }
        };
        let (verdict, more) = self.handle_gossip_verified(peer, ns, vb, now_ms);
        actions.extend(more);
        (verdict, actions)
    }

    /// [`Engine::handle_gossip`] for a batch the caller has already verified with
    /// [`batch::verify`] (a simulator verifies each distinct batch once for all its nodes).
    pub fn handle_gossip_verified(
        &mut self,
        peer: P,
        ns: &str,
        vb: VerifiedBatch,
        now_ms: u64,
    ) -> (GossipVerdict, Vec<Action<P>>) {
        let mut actions = Vec::new();
        if let Some(verdict) = self.gossip_gate(ns) {
            return (verdict, actions);
        }
        if vb.header.ns != ns {
            self.stats.batches_rejected += 1;
            return (
                GossipVerdict::Reject("batch published on another namespace's topic".into()),
                actions,
            );
        }
        let author = vb.header.author;
        let seq = vb.header.seq;
        let verdict = match self.ingest(ns, vb, None, now_ms, &mut actions) {
            Ingest::Stored => GossipVerdict::Accept,
            Ingest::Duplicate => GossipVerdict::Ignore,
            Ingest::Buffered => {
                self.fetch_gap(&peer, ns, author, seq, now_ms, &mut actions);
                GossipVerdict::Accept
            }
            Ingest::Rejected(reason) => GossipVerdict::Reject(reason),
        };
        (verdict, actions)
    }

    /// A gossiped batch at `seq` was buffered: the relaying peer holds at least the chain
    /// before it, so fetch the gap.
    fn fetch_gap(
        &mut self,
        peer: &P,
        ns: &str,
        author: [u8; 32],
        seq: u64,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) {
        let Some(st) = self.namespaces.get_mut(ns) else {
            return;
        };
        let known = st
            .peer_heads
            .entry(peer.clone())
            .or_default()
            .entry(author)
            .or_insert(0);
        *known = (*known).max(seq - 1);
        self.schedule(ns, author, Some(peer), None, u32::MAX, now_ms, out);
    }

    /// Time passes: periodic anti-entropy (capabilities and version vectors) and fetch
    /// time-outs.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action<P>> {
        let mut actions = Vec::new();
        if now_ms >= self.next_anti_entropy_ms {
            self.next_anti_entropy_ms = now_ms + self.cfg.anti_entropy_interval_ms;
            let peers: Vec<P> = self.peers.iter().cloned().collect();
            for p in peers {
                actions.extend(self.presents_for(&p));
                actions.extend(self.haves_for(&p, now_ms));
            }
        }
        let names: Vec<String> = self.namespaces.keys().cloned().collect();
        for ns in names {
            let st = self.namespaces.get(&ns).expect("listed");
            let expired: Vec<([u8; 32], u64)> = st
                .fetches
                .iter()
                .filter(|(_, f)| f.deadline_ms <= now_ms)
                .map(|(k, _)| *k)
                .collect();
            // Each timed-out stripe is re-routed on its own, away from the silent peer.
            let mut reroute = BTreeSet::new();
            for key in expired {
                if let Some(f) = self.take_fetch(&ns, key) {
                    self.stats.fetches_timed_out += 1;
                    self.silent.insert(f.peer.clone());
                    reroute.insert((key.0, f.peer));
                }
            }
            for (author, silent) in reroute {
                let max = u32::MAX;
                self.schedule(&ns, author, None, Some(&silent), max, now_ms, &mut actions);
            }
        }
        self.expire_dicts(now_ms, None, &mut actions);
        self.retry_wanting(now_ms, &mut actions);
        self.send_late_announces(now_ms, &mut actions);
        actions
    }

    /// When [`Engine::tick`] next has work to do.
    pub fn next_deadline_ms(&self) -> u64 {
        let fetch = self
            .namespaces
            .values()
            .flat_map(|s| {
                let fetches = s.fetches.values().map(|f| f.deadline_ms);
                fetches.chain(s.dict_blocked.values().map(|(_, d)| *d))
            })
            .min()
            .unwrap_or(u64::MAX);
        let dicts = self.dict_requests.values().map(|q| q.deadline_ms).min();
        let late = self.late_announces.front().map(|a| a.due_ms);
        fetch
            .min(dicts.unwrap_or(u64::MAX))
            .min(late.unwrap_or(u64::MAX))
            .min(self.next_anti_entropy_ms)
    }

    /// Our capability chains, for every owned namespace we hold one in.
    fn presents_for(&self, peer: &P) -> Vec<Action<P>> {
        self.namespaces
            .keys()
            .filter_map(|ns| self.present_for(ns, peer))
            .collect()
    }

    /// Our (unrevoked) capability for `ns`, as a `Present` to `peer`.
    fn present_for(&self, ns: &str, peer: &P) -> Option<Action<P>> {
        let st = self.namespaces.get(ns)?;
        match &st.policy {
            Policy::Owned { mine: Some(chain) }
                if !chain.ids().any(|id| st.revocations.contains_key(&id)) =>
            {
                Some(Action::Send {
                    peer: peer.clone(),
                    msg: SyncMessage::Present {
                        ns: ns.to_string(),
                        chain: serde_bytes::ByteBuf::from(chain.encode()),
                    },
                })
            }
            _ => None,
        }
    }

    /// Version vectors of every namespace `peer` may read, as `Have`s to it. Sent each
    /// anti-entropy round; the node also sends them at once to a peer that missed pushed or
    /// gossiped batches (dropped while it lagged), so that it fetches the gap without waiting.
    pub fn haves_for(&self, peer: &P, now_ms: u64) -> Vec<Action<P>> {
        let names: Vec<&String> = self.namespaces.keys().collect();
        names
            .into_iter()
            .flat_map(|ns| self.have_for(ns, peer, now_ms))
            .collect()
    }

    fn have_for(&self, ns: &str, peer: &P, now_ms: u64) -> Option<Action<P>> {
        let st = self.namespaces.get(ns)?;
        if !st.may_read(peer, self.peer_keys.get(peer), ns, now_ms) {
            return None;
        }
        Some(Action::Send {
            peer: peer.clone(),
            msg: SyncMessage::Have {
                ns: ns.to_string(),
                heads: st
                    .heads
                    .iter()
                    .map(|(a, h)| HaveEntry {
                        author: *a,
                        seq: h.seq,
                    })
                    .collect(),
            },
        })
    }

    /// Removes a fetch in flight, keeping the per-peer count.
    fn take_fetch(&mut self, ns: &str, key: ([u8; 32], u64)) -> Option<InFlight<P>> {
        let f = self.namespaces.get_mut(ns)?.fetches.remove(&key)?;
        if let Some(n) = self.peer_fetches.get_mut(&f.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.peer_fetches.remove(&f.peer);
            }
        }
        Some(f)
    }

    /// Fetches in flight to `peer` (all namespaces and authors).
    pub fn fetches_in_flight(&self, peer: &P) -> usize {
        self.peer_fetches.get(peer).copied().unwrap_or(0)
    }

    /// Requests what is missing of `author`'s chain in `ns` from the connected peers known to
    /// hold it: at most `max_new` new fetches, up to `fetch_stripes` in flight, each over a
    /// seq range that is neither in flight nor buffered, starting from the first missing seq.
    /// Each goes to the holder with the fewest of this author's stripes, then the fewest
    /// fetches overall, then `prefer`; `avoid` (a peer that just answered empty) and peers
    /// that let a fetch time out (until they answer one) only if nobody else holds the range. Ranges past the first missing one land in the
    /// out-of-order buffer: they are asked for only while the buffer has room for them. What
    /// the per-peer cap or the buffer holds back marks the author as wanting, retried by
    /// [`Engine::retry_wanting`].
    #[allow(clippy::too_many_arguments)]
    fn schedule(
        &mut self,
        ns: &str,
        author: [u8; 32],
        prefer: Option<&P>,
        avoid: Option<&P>,
        max_new: u32,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) {
        let cfg = &self.cfg;
        let Some(st) = self.namespaces.get_mut(ns) else {
            return;
        };
        if st.dict_blocked.contains_key(&author) {
            // Paused until a dictionary arrives (or its wait times out): then rescheduled.
            return;
        }
        let ours = st.heads.get(&author).map_or(0, |h| h.seq);
        let holders: Vec<(P, u64)> = st
            .peer_heads
            .iter()
            .filter(|(p, _)| self.peers.contains(*p))
            .filter_map(|(p, h)| {
                h.get(&author)
                    .filter(|s| **s > ours)
                    .map(|s| (p.clone(), *s))
            })
            .collect();
        let Some(max_theirs) = holders.iter().map(|(_, s)| *s).max() else {
            st.wanting.remove(&author);
            return;
        };
        let est = st.batch_bytes_est as u64;
        let window = match est {
            0 => u64::from(cfg.fetch_window),
            e => (cfg.fetch_window_bytes as u64 / e).clamp(1, u64::from(cfg.fetch_window.max(1))),
        };
        // Room left in the buffer: what is buffered, plus every stripe that does not start at
        // its author's next seq (its batches will wait there).
        let mut reserved = 0u64;
        for ((a, from), f) in &st.fetches {
            if *from > st.heads.get(a).map_or(0, |h| h.seq) + 1 {
                reserved += f.to + 1 - from;
            }
        }
        let mut free_batches =
            (cfg.max_pending_batches as u64).saturating_sub(st.pending.len() as u64 + reserved);
        let mut free_bytes = (cfg.max_pending_bytes as u64)
            .saturating_sub(st.pending_bytes as u64 + reserved.saturating_mul(est));
        let range = (author, 0)..=(author, u64::MAX);
        let mut stripes = st
            .fetches
            .range(range.clone())
            .filter(|(_, f)| f.to > ours)
            .count() as u64;
        // This author's stripes per peer, to spread them.
        let mut spread: BTreeMap<P, u32> = BTreeMap::new();
        for (_, f) in st.fetches.range(range) {
            *spread.entry(f.peer.clone()).or_insert(0) += 1;
        }
        let mut held_back = false;
        let mut new = 0u32;
        let mut s = ours + 1;
        while s <= max_theirs && stripes < u64::from(cfg.fetch_stripes.max(1)) && new < max_new {
            // Skip what is in flight (stripes are disjoint: only the last one starting at or
            // before `s` can cover it) or buffered.
            if let Some((_, f)) = st
                .fetches
                .range((author, 0)..=(author, s))
                .next_back()
                .filter(|(_, f)| f.to >= s)
            {
                s = f.to + 1;
                continue;
            }
            if st.pending.contains_key(&(author, s)) {
                s += 1;
                continue;
            }
            let mut end = s.saturating_add(window - 1);
            if let Some(((_, next), _)) = st
                .fetches
                .range((author, s + 1)..=(author, u64::MAX))
                .next()
            {
                end = end.min(next - 1);
            }
            if let Some(((_, next), _)) = st
                .pending
                .range((author, s + 1)..=(author, u64::MAX))
                .next()
            {
                end = end.min(next - 1);
            }
            let pick = holders
                .iter()
                .filter(|(p, theirs)| {
                    *theirs >= s
                        && self.peer_fetches.get(p).copied().unwrap_or(0) < cfg.max_fetches_per_peer
                })
                .min_by_key(|(p, _)| {
                    (
                        Some(p) == avoid || self.silent.contains(p),
                        spread.get(p).copied().unwrap_or(0),
                        self.peer_fetches.get(p).copied().unwrap_or(0),
                        Some(p) != prefer,
                    )
                });
            let Some((peer, theirs)) = pick else {
                // Every holder of `s` is at its cap.
                held_back = true;
                break;
            };
            end = end.min(*theirs);
            let mut n = end + 1 - s;
            if s > ours + 1 {
                // Lands in the buffer: only while there is room, by count and by the batch
                // sizes seen (none seen yet: wait for the first answer to tell).
                let fit = free_bytes
                    .checked_div(est)
                    .map_or(0, |by_bytes| by_bytes.min(free_batches));
                if fit == 0 {
                    held_back = true;
                    break;
                }
                n = n.min(fit);
                free_batches -= n;
                free_bytes -= n * est;
            }
            // No batch of this namespace seen yet (a fresh node catching up): the first
            // window of each author asks for at most `FIRST_FETCH_BYTES`. Large batches then
            // come one in the first answer, after one batch's transfer instead of a whole
            // window's (~8 MB: 60-100 ms on loopback, seconds on a slow link), so the first
            // missing batch is stored that much sooner, and that answer tells the batch size
            // that opens the other stripes (held back until a size is known) at full
            // windows. Small batches still come a whole window at a time.
            let max_bytes = (est == 0 && s == ours + 1).then_some(limits::FIRST_FETCH_BYTES);
            let to = s + n - 1;
            st.fetches.insert(
                (author, s),
                InFlight {
                    peer: peer.clone(),
                    to,
                    deadline_ms: now_ms + cfg.fetch_timeout_ms,
                },
            );
            *self.peer_fetches.entry(peer.clone()).or_insert(0) += 1;
            *spread.entry(peer.clone()).or_insert(0) += 1;
            self.stats.fetches_sent += 1;
            out.push(Action::Send {
                peer: peer.clone(),
                msg: SyncMessage::Fetch {
                    ns: ns.to_string(),
                    author,
                    from_seq: s,
                    limit: n.min(u64::from(u32::MAX)) as u32,
                    max_bytes,
                },
            });
            stripes += 1;
            new += 1;
            s = to + 1;
        }
        if held_back {
            st.wanting.insert(author);
        } else {
            st.wanting.remove(&author);
        }
    }

    /// Schedules authors held back by the per-peer cap or the buffer, a bounded number per
    /// call (round robin), while some peer has a free slot.
    fn retry_wanting(&mut self, now_ms: u64, out: &mut Vec<Action<P>>) {
        const PER_CALL: usize = 64;
        let names: Vec<String> = self
            .namespaces
            .iter()
            .filter(|(_, st)| !st.wanting.is_empty())
            .map(|(ns, _)| ns.clone())
            .collect();
        for ns in names {
            let room = |e: &Self| {
                e.peers
                    .iter()
                    .any(|p| e.fetches_in_flight(p) < e.cfg.max_fetches_per_peer)
            };
            if !room(self) {
                return;
            }
            let st = self.namespaces.get_mut(&ns).expect("listed");
            let cursor = st.wanting_cursor;
            let authors: Vec<[u8; 32]> = st
                .wanting
                .range(cursor..)
                .chain(st.wanting.range(..cursor))
                .take(PER_CALL)
                .copied()
                .collect();
            if let Some(last) = authors.last() {
                st.wanting_cursor = next_key(last);
            }
            for author in authors {
                if !room(self) {
                    break;
                }
                self.schedule(&ns, author, None, None, u32::MAX, now_ms, out);
            }
        }
    }

    /// A large batch written here in a public namespace goes around gossip: pushed now to at
    /// most `push_fanout` of the peers holding `ns` on the tree (which ones turns with the
    /// seq), announced to the others after `announce_delay_ms` (by then most have it from
    /// the tree). False (gossip it) if it is small or no peer is known to hold `ns` yet (a
    /// peer that says it does later learns our heads from our `Have`).
    fn push_large(
        &mut self,
        ns: &str,
        vb: &VerifiedBatch,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) -> bool {
        if vb.bytes.len() < self.cfg.push_min_bytes {
            return false;
        }
        let Some(st) = self.namespaces.get(ns) else {
            return false;
        };
        if st.peer_heads.is_empty() {
            return false;
        }
        // Tree peers first (which of them turns with the seq), then the pruned ones.
        let (eager, lazy): (Vec<&P>, Vec<&P>) = st
            .peer_heads
            .keys()
            .partition(|p| !st.is_lazy(&vb.header.author, p));
        let start = (vb.header.seq % eager.len().max(1) as u64) as usize;
        let rotated = eager.iter().cycle().skip(start).take(eager.len());
        let order: Vec<P> = rotated.chain(lazy.iter()).map(|p| (*p).clone()).collect();
        let pushes = eager.len().min(self.cfg.push_fanout);
        let (author, seq) = (vb.header.author, vb.header.seq);
        for (i, p) in order.into_iter().enumerate() {
            if i < pushes {
                out.push(Action::Send {
                    peer: p,
                    msg: SyncMessage::Batches {
                        ns: ns.to_string(),
                        author,
                        batches: vec![serde_bytes::ByteBuf::from(vb.bytes.to_vec())],
                    },
                });
            } else {
                self.announce_later(p, ns, author, seq, now_ms, out);
            }
        }
        true
    }

    /// Sends the late announcements that are due, except to peers gone or known to hold the
    /// batch by now.
    fn send_late_announces(&mut self, now_ms: u64, out: &mut Vec<Action<P>>) {
        while self
            .late_announces
            .front()
            .is_some_and(|a| a.due_ms <= now_ms)
        {
            let a = self.late_announces.pop_front().expect("checked");
            let Some(theirs) = self
                .namespaces
                .get(&a.ns)
                .and_then(|st| st.peer_heads.get(&a.peer))
            else {
                continue;
            };
            if theirs.get(&a.author).is_some_and(|s| *s >= a.seq) {
                continue;
            }
            out.push(Action::Send {
                peer: a.peer,
                msg: SyncMessage::Announce {
                    ns: a.ns,
                    author: a.author,
                    seq: a.seq,
                },
            });
        }
    }

    /// After a `Batches` message from `from` in a public namespace that stored large batches
    /// ([`EngineConfig::push_min_bytes`]): `fresh` (those of the message) are pushed on to the
    /// peers on the tree (not `Prune`d; at most `push_fanout`), and our new head of `author` is
    /// announced to the others after `announce_delay_ms` (by then the tree has usually brought
    /// it to them; one that still lacks it fetches it and `Graft`s the link). Peers known to
    /// hold it, and `from`, get nothing. Large batches stored only from our buffer (`fresh`
    /// empty) are announced to the tree peers at once.
    fn relay_large(
        &mut self,
        ns: &str,
        author: [u8; 32],
        from: &P,
        fresh: Vec<bytes::Bytes>,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) {
        let Some(st) = self.namespaces.get(ns) else {
            return;
        };
        let Some(seq) = st.heads.get(&author).map(|h| h.seq) else {
            return;
        };
        let mut eager = 0;
        let mut late = Vec::new();
        for (p, theirs) in &st.peer_heads {
            if p == from || theirs.get(&author).is_some_and(|s| *s >= seq) {
                continue;
            }
            if st.is_lazy(&author, p) || eager >= self.cfg.push_fanout {
                late.push(p.clone());
                continue;
            }
            eager += 1;
            let msg = match fresh.is_empty() {
                false => SyncMessage::Batches {
                    ns: ns.to_string(),
                    author,
                    batches: fresh
                        .iter()
                        .map(|b| serde_bytes::ByteBuf::from(b.to_vec()))
                        .collect(),
                },
                true => SyncMessage::Announce {
                    ns: ns.to_string(),
                    author,
                    seq,
                },
            };
            out.push(Action::Send {
                peer: p.clone(),
                msg,
            });
        }
        for p in late {
            self.announce_later(p, ns, author, seq, now_ms, out);
        }
    }

    /// Queues an `Announce` to `peer` for `announce_delay_ms` from now (see
    /// [`Engine::send_late_announces`]); sent at once if the queue is full.
    fn announce_later(
        &mut self,
        peer: P,
        ns: &str,
        author: [u8; 32],
        seq: u64,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) {
        if self.late_announces.len() < LATE_ANNOUNCES_MAX {
            self.late_announces.push_back(LateAnnounce {
                due_ms: now_ms + self.cfg.announce_delay_ms,
                peer,
                ns: ns.to_string(),
                author,
                seq,
            });
        } else {
            out.push(Action::Send {
                peer,
                msg: SyncMessage::Announce {
                    ns: ns.to_string(),
                    author,
                    seq,
                },
            });
        }
    }

    /// Ingests a batch from a local write (`from` = None) or gossip.
    fn ingest(
        &mut self,
        ns: &str,
        vb: VerifiedBatch,
        from: Option<&P>,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) -> Ingest {
        self.ingest_from(ns, vb, from, true, now_ms, out)
    }

    /// Whether the batch's author may write it into `ns` (judged at the batch's own time).
    fn admit(&self, ns: &str, vb: &VerifiedBatch) -> Result<(), String> {
        let st = self.namespaces.get(ns).ok_or("unknown namespace")?;
        let revokes = vb.ops.has_revokes();
        match &st.policy {
            Policy::Public => {
                if revokes {
                    return Err("revocation in a public namespace".into());
                }
                Ok(())
            }
            Policy::Owned { .. } => {
                let author = &vb.header.author;
                if capability::is_owner(ns, author) {
                    return Ok(());
                }
                let chain = vb.cap.as_ref().ok_or("write without a capability")?;
                let need = if revokes {
                    Rights::Admin
                } else {
                    Rights::Write
                };
                for at in [vb.header.hlc_min.wall_ms(), vb.header.hlc_max.wall_ms()] {
                    chain
                        .authorizes(ns, author, need, at)
                        .map_err(|e| e.to_string())?;
                }
                if chain.covers_everything() {
                    return Ok(());
                }
                let view = vb.ops.view().map_err(|e| e.to_string())?;
                for op in view.ops() {
                    let (collection, key) = (view.collection(op), view.key(op));
                    if !chain.covers(collection, key) {
                        return Err(format!(
                            "record {collection}/{key} outside the capability's scope"
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Chain-checks a verified batch and stores it (and any buffered successors) or buffers
    /// it. In owned namespaces, newly stored batches are pushed to authorized readers (except
    /// `from`) when `forward` is set.
    fn ingest_from(
        &mut self,
        ns: &str,
        vb: VerifiedBatch,
        from: Option<&P>,
        forward: bool,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) -> Ingest {
        let st = self
            .namespaces
            .get(ns)
            .expect("caller checked the namespace");
        let author = vb.header.author;
        let head = st.heads.get(&author).copied();
        let head_seq = head.map_or(0, |h| h.seq);
        let seq = vb.header.seq;
        if seq <= head_seq {
            if seq == head_seq && head.is_some_and(|h| h.id != vb.id) {
                self.stats.batches_rejected += 1;
                return Ingest::Rejected(format!("equivocation: second batch at seq {seq}"));
            }
            self.stats.batches_duplicate += 1;
            return Ingest::Duplicate;
        }
        if let Err(reason) = self.admit(ns, &vb) {
            self.stats.batches_rejected += 1;
            return Ingest::Rejected(reason);
        }
        let st = self.namespaces.get_mut(ns).expect("checked above");
        // Sizes seen, for the buffer room of striped fetches (a moving average).
        let len = vb.bytes.len();
        st.batch_bytes_est = match st.batch_bytes_est {
            0 => len,
            e => (e * 7 + len) / 8,
        }
        .max(1);
        if seq > head_seq + 1 {
            let key = (author, seq);
            if st.pending.contains_key(&key) {
                // Already buffered: a duplicate (gossip must not relay it again), and its gap
                // fetch was started by the first copy.
                self.stats.batches_duplicate += 1;
                return Ingest::Duplicate;
            }
            if st.pending.len() >= self.cfg.max_pending_batches
                || st.pending_bytes + vb.bytes.len() > self.cfg.max_pending_bytes
            {
                self.stats.pending_dropped += 1;
                return Ingest::Buffered;
            }
            st.pending_bytes += vb.bytes.len();
            st.pending.insert(key, vb);
            return Ingest::Buffered;
        }
        if let Err(reason) = check_link(head, &vb) {
            self.stats.batches_rejected += 1;
            return Ingest::Rejected(reason);
        }
        let owned = st.owned();
        let mut new_revocations = false;
        let mut stored = Vec::new();
        let mut next = Some(vb);
        while let Some(mut vb) = next.take() {
            let seq = vb.header.seq;
            st.heads.insert(
                author,
                Head {
                    seq,
                    id: vb.id,
                    hlc_max: vb.header.hlc_max,
                },
            );
            self.clock.observe(vb.header.hlc_max);
            self.stats.batches_stored += 1;
            if vb.dict.is_some() {
                self.stats.dict_batches_stored += 1;
            }
            vb.effective = batch_effective(&vb, &st.revocations);
            if !vb.effective {
                self.stats.batches_ineffective += 1;
            }
            new_revocations |= record_revocations(&mut st.revocations, &vb);
            stored.push(vb);
            if let Some(succ) = st.pending.remove(&(author, seq + 1)) {
                st.pending_bytes -= succ.bytes.len();
                if check_link(st.heads.get(&author).copied(), &succ).is_ok() {
                    next = Some(succ);
                } else {
                    self.stats.batches_rejected += 1;
                }
            }
        }
        if owned && forward {
            let readers: Vec<(P, Option<Hlc>)> = st
                .readers
                .keys()
                .filter(|p| Some(*p) != from)
                .filter_map(|p| {
                    let cutoff = st.read_cutoff(p, self.peer_keys.get(p), ns, now_ms)?;
                    Some((p.clone(), cutoff))
                })
                .collect();
            for (p, cutoff) in readers {
                let batches: Vec<serde_bytes::ByteBuf> = stored
                    .iter()
                    .filter(|b| cutoff.is_none_or(|c| b.header.hlc_max < c))
                    .map(|b| serde_bytes::ByteBuf::from(b.bytes.clone()))
                    .collect();
                if !batches.is_empty() {
                    out.push(Action::Send {
                        peer: p,
                        msg: SyncMessage::Batches {
                            ns: ns.to_string(),
                            author,
                            batches,
                        },
                    });
                }
            }
        }
        out.extend(stored.into_iter().map(Action::Store));
        if new_revocations {
            // Readers whose chain is now revoked receive nothing written from then on (see
            // `read_cutoff`).
            let revs = st.revocations.clone();
            out.push(Action::Rebuild {
                ns: ns.to_string(),
                revocations: revs,
            });
        }
        Ingest::Stored
    }
}

/// The smallest key after `k` (wrapping), for round-robin cursors.
fn next_key(k: &[u8; 32]) -> [u8; 32] {
    let mut out = *k;
    for b in out.iter_mut().rev() {
        let (v, carry) = b.overflowing_add(1);
        *b = v;
        if !carry {
            break;
        }
    }
    out
}

/// Adds the batch's revocations (earliest time per token); true if anything was new or earlier.
fn record_revocations(revocations: &mut BTreeMap<TokenId, Hlc>, vb: &VerifiedBatch) -> bool {
    let mut changed = false;
    for (token, hlc) in vb.ops.revocations() {
        if let Some(id) = TokenId::from_hex(token) {
            match revocations.get(&id) {
                Some(at) if *at <= *hlc => {}
                _ => {
                    revocations.insert(id, *hlc);
                    changed = true;
                }
            }
        }
    }
    changed
}

/// `vb` must be the next link after `head`: right `prev`, timestamps after the previous batch.
fn check_link(head: Option<Head>, vb: &VerifiedBatch) -> Result<(), String> {
    match head {
        None => {
            if vb.header.seq != 1 {
                return Err("chain does not start at seq 1".into());
            }
        }
        Some(h) => {
            if vb.header.seq != h.seq + 1 || vb.header.prev != Some(h.id) {
                return Err(format!("broken chain at seq {}", vb.header.seq));
            }
            if vb.header.hlc_min <= h.hlc_max {
                return Err("timestamps do not advance along the chain".into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn author(i: usize) -> [u8; 32] {
        let mut a = [0u8; 32];
        a[..8].copy_from_slice(&(i as u64).to_le_bytes());
        a
    }

    /// The push trees kept per namespace are bounded: past `MAX_TREE_AUTHORS`, a new
    /// author's prune takes the place of the author pruned least recently; a graft that
    /// empties an author's set drops it.
    #[test]
    fn push_trees_are_bounded_per_namespace() {
        let max = limits::MAX_TREE_AUTHORS;
        let mut st = NsState::<u32>::default();
        for i in 0..max {
            assert!(st.prune(author(i), 1));
        }
        // Author 0 is pruned again (most recent now); author 1 is the least recent.
        assert!(st.prune(author(0), 2));
        assert!(!st.prune(author(0), 2), "pruned twice");
        assert!(st.prune(author(max), 1));
        assert_eq!(st.lazy.len(), max, "the bound");
        assert!(
            st.is_lazy(&author(max), &1),
            "the new author's tree was not kept"
        );
        assert!(
            !st.is_lazy(&author(1), &1),
            "the least recent tree was not the one dropped"
        );
        assert!(st.is_lazy(&author(0), &1) && st.is_lazy(&author(2), &1));
        assert!(st.graft(&author(0), &1));
        assert!(st.graft(&author(0), &2));
        assert!(!st.graft(&author(0), &2), "grafted twice");
        assert!(!st.lazy.contains_key(&author(0)), "an emptied set was kept");
    }
}
