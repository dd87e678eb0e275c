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
//! - On connect, and every `anti_entropy_interval_ms`, peers exchange `Have` (their vectors).
//!   For every author a peer has more of, we send `Fetch { from_seq, limit }` — one fetch in
//!   flight per (namespace, author), `fetch_window` batches at a time, re-issued on answer
//!   until caught up, and re-routed to another peer on timeout or disconnect.
//! - A `Fetch` is answered with `Batches` (the shell reads them from its store).
//!
//! Every batch is verified (envelope, canonical header, payload hash, strict signature, op
//! limits) and chain-checked (`prev` = id of the author's previous batch, timestamps after it)
//! before it is stored. A peer that sends an invalid batch or a malformed message is reported
//! with [`Action::Reject`] so the shell can drop it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use blazedb_identity::Keypair;

use crate::batch::{self, BatchError, BatchId, ChainPosition, VerifiedBatch};
use crate::hlc::{Clock, Hlc};
use crate::limits;
use crate::op::Op;

/// Tunables of the engine. Defaults suit a LAN/WAN node; tests shrink the intervals.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How often version vectors are exchanged with every peer.
    pub anti_entropy_interval_ms: u64,
    /// How long a fetch may stay unanswered before it is re-routed.
    pub fetch_timeout_ms: u64,
    /// Batches requested per fetch.
    pub fetch_window: u32,
    /// Most out-of-order batches buffered per namespace.
    pub max_pending_batches: usize,
    /// Most bytes of out-of-order batches buffered per namespace.
    pub max_pending_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            anti_entropy_interval_ms: 5_000,
            fetch_timeout_ms: 10_000,
            fetch_window: 64,
            max_pending_batches: 4_096,
            max_pending_bytes: 64 * 1024 * 1024,
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
    },
    /// The answer to a `Fetch` (possibly empty), in seq order.
    Batches {
        /// Namespace.
        ns: String,
        /// Author key.
        #[serde(with = "serde_bytes")]
        author: [u8; 32],
        /// Envelope bytes of each batch.
        batches: Vec<serde_bytes::ByteBuf>,
    },
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
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
        /// Envelope bytes.
        bytes: Vec<u8>,
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
}

#[derive(Clone, Copy, Debug)]
struct Head {
    seq: u64,
    id: BatchId,
    hlc_max: Hlc,
}

#[derive(Clone, Debug)]
struct InFlight<P> {
    peer: P,
    deadline_ms: u64,
}

#[derive(Debug)]
struct NsState<P> {
    heads: BTreeMap<[u8; 32], Head>,
    pending: BTreeMap<([u8; 32], u64), VerifiedBatch>,
    pending_bytes: usize,
    fetches: BTreeMap<[u8; 32], InFlight<P>>,
    peer_heads: BTreeMap<P, BTreeMap<[u8; 32], u64>>,
}

impl<P> Default for NsState<P> {
    fn default() -> Self {
        Self {
            heads: BTreeMap::new(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            fetches: BTreeMap::new(),
            peer_heads: BTreeMap::new(),
        }
    }
}

enum Ingest {
    Stored,
    Duplicate,
    Buffered,
    Rejected(String),
}

/// The sync engine. `P` identifies a peer (a libp2p `PeerId` in the node, an index in the
/// simulator).
#[derive(Debug)]
pub struct Engine<P> {
    cfg: EngineConfig,
    namespaces: BTreeMap<String, NsState<P>>,
    peers: BTreeSet<P>,
    clock: Clock,
    next_anti_entropy_ms: u64,
    stats: EngineStats,
}

impl<P: Clone + Ord + std::fmt::Debug> Engine<P> {
    /// An engine that has joined no namespace yet.
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            namespaces: BTreeMap::new(),
            peers: BTreeSet::new(),
            clock: Clock::new(),
            next_anti_entropy_ms: 0,
            stats: EngineStats::default(),
        }
    }

    /// Joins a namespace: its batches will be accepted, stored and synced.
    pub fn join(&mut self, ns: &str) {
        self.namespaces.entry(ns.to_string()).or_default();
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
        mut ops: Vec<Op>,
        now_ms: u64,
    ) -> Result<(VerifiedBatch, Vec<Action<P>>), BatchError> {
        let state = self.namespaces.get(ns).ok_or_else(|| {
            BatchError::Inconsistent(format!("namespace {ns:?} has not been joined"))
        })?;
        if ops.len() > limits::MAX_OPS_PER_BATCH {
            return Err(BatchError::Inconsistent(format!(
                "{} ops exceed the limit of {} per batch",
                ops.len(),
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
        for op in &mut ops {
            op.set_hlc(self.clock.tick(now_ms));
        }
        let vb = match batch::seal(keypair, ns, pos, ops) {
            Ok(vb) => vb,
            Err(e) => {
                self.clock = saved_clock;
                return Err(e);
            }
        };
        let mut actions = Vec::with_capacity(2);
        match self.ingest(ns, vb.clone(), &mut actions) {
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
        actions.push(Action::Publish {
            ns: ns.to_string(),
            id: vb.id,
            bytes: vb.bytes.clone(),
        });
        Ok((vb, actions))
    }

    /// A connection to `peer` is up: tell it what we have.
    pub fn peer_up(&mut self, peer: P, _now_ms: u64) -> Vec<Action<P>> {
        self.peers.insert(peer.clone());
        self.haves_for(&peer)
    }

    /// The connection to `peer` is gone: forget what it had and re-route its fetches.
    pub fn peer_down(&mut self, peer: &P, now_ms: u64) -> Vec<Action<P>> {
        self.peers.remove(peer);
        let mut actions = Vec::new();
        let names: Vec<String> = self.namespaces.keys().cloned().collect();
        for ns in names {
            let st = self.namespaces.get_mut(&ns).expect("listed");
            st.peer_heads.remove(peer);
            let orphaned: Vec<[u8; 32]> = st
                .fetches
                .iter()
                .filter(|(_, f)| &f.peer == peer)
                .map(|(a, _)| *a)
                .collect();
            for author in &orphaned {
                st.fetches.remove(author);
            }
            for author in orphaned {
                self.fetch_from_anyone(&ns, author, now_ms, &mut actions);
            }
        }
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
                for author in behind {
                    self.maybe_fetch(&ns, author, &peer, now_ms, &mut actions);
                }
            }
            SyncMessage::Fetch {
                ns,
                author,
                from_seq,
                limit,
            } => {
                let Some(st) = self.namespaces.get(&ns) else {
                    return actions;
                };
                let ours = st.heads.get(&author).map_or(0, |h| h.seq);
                if from_seq == 0 {
                    actions.push(Action::Reject {
                        peer,
                        reason: "fetch from seq 0".into(),
                    });
                } else if from_seq <= ours {
                    let limit = limit.clamp(1, limits::MAX_FETCH_BATCHES);
                    actions.push(Action::Serve {
                        peer,
                        ns,
                        author,
                        from_seq,
                        limit,
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
            SyncMessage::Batches {
                ns,
                author,
                batches,
            } => {
                if batches.len() > limits::MAX_FETCH_BATCHES as usize {
                    actions.push(Action::Reject {
                        peer,
                        reason: "too many batches".into(),
                    });
                    return actions;
                }
                if !self.namespaces.contains_key(&ns) {
                    return actions;
                }
                for bytes in batches {
                    let vb = match batch::verify(bytes.into_vec()) {
                        Ok(vb) => vb,
                        Err(e) => {
                            self.stats.batches_rejected += 1;
                            actions.push(Action::Reject {
                                peer,
                                reason: e.to_string(),
                            });
                            return actions;
                        }
                    };
                    if vb.header.ns != ns || vb.header.author != author {
                        self.stats.batches_rejected += 1;
                        actions.push(Action::Reject {
                            peer,
                            reason: "batch outside the fetched chain".into(),
                        });
                        return actions;
                    }
                    if let Ingest::Rejected(reason) = self.ingest(&ns, vb, &mut actions) {
                        actions.push(Action::Reject { peer, reason });
                        return actions;
                    }
                }
                let st = self.namespaces.get_mut(&ns).expect("checked");
                if st.fetches.get(&author).is_some_and(|f| f.peer == peer) {
                    st.fetches.remove(&author);
                }
                // Keep going while the peer is known to have more.
                self.maybe_fetch(&ns, author, &peer, now_ms, &mut actions);
            }
        }
        actions
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
        if !self.namespaces.contains_key(ns) {
            return (GossipVerdict::Ignore, actions);
        }
        let vb = match batch::verify(bytes) {
            Ok(vb) => vb,
            Err(e) => {
                self.stats.batches_rejected += 1;
                return (GossipVerdict::Reject(e.to_string()), actions);
            }
        };
        if vb.header.ns != ns {
            self.stats.batches_rejected += 1;
            return (
                GossipVerdict::Reject("batch published on another namespace's topic".into()),
                actions,
            );
        }
        let author = vb.header.author;
        let seq = vb.header.seq;
        let verdict = match self.ingest(ns, vb, &mut actions) {
            Ingest::Stored => GossipVerdict::Accept,
            Ingest::Duplicate => GossipVerdict::Ignore,
            Ingest::Buffered => {
                // The relaying peer holds at least this much of the chain: fetch the gap.
                let st = self.namespaces.get_mut(ns).expect("checked");
                let known = st
                    .peer_heads
                    .entry(peer.clone())
                    .or_default()
                    .entry(author)
                    .or_insert(0);
                *known = (*known).max(seq - 1);
                self.maybe_fetch(ns, author, &peer, now_ms, &mut actions);
                GossipVerdict::Accept
            }
            Ingest::Rejected(reason) => GossipVerdict::Reject(reason),
        };
        (verdict, actions)
    }

    /// Time passes: periodic anti-entropy and fetch time-outs.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action<P>> {
        let mut actions = Vec::new();
        if now_ms >= self.next_anti_entropy_ms {
            self.next_anti_entropy_ms = now_ms + self.cfg.anti_entropy_interval_ms;
            let peers: Vec<P> = self.peers.iter().cloned().collect();
            for p in peers {
                actions.extend(self.haves_for(&p));
            }
        }
        let names: Vec<String> = self.namespaces.keys().cloned().collect();
        for ns in names {
            let st = self.namespaces.get_mut(&ns).expect("listed");
            let expired: Vec<[u8; 32]> = st
                .fetches
                .iter()
                .filter(|(_, f)| f.deadline_ms <= now_ms)
                .map(|(a, _)| *a)
                .collect();
            for author in &expired {
                st.fetches.remove(author);
            }
            for author in expired {
                self.fetch_from_anyone(&ns, author, now_ms, &mut actions);
            }
        }
        actions
    }

    /// When [`Engine::tick`] next has work to do.
    pub fn next_deadline_ms(&self) -> u64 {
        let fetch = self
            .namespaces
            .values()
            .flat_map(|s| s.fetches.values().map(|f| f.deadline_ms))
            .min()
            .unwrap_or(u64::MAX);
        fetch.min(self.next_anti_entropy_ms)
    }

    fn haves_for(&self, peer: &P) -> Vec<Action<P>> {
        self.namespaces
            .iter()
            .map(|(ns, st)| Action::Send {
                peer: peer.clone(),
                msg: SyncMessage::Have {
                    ns: ns.clone(),
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
            .collect()
    }

    fn fetch_from_anyone(
        &mut self,
        ns: &str,
        author: [u8; 32],
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) {
        let Some(st) = self.namespaces.get(ns) else {
            return;
        };
        let ours = st.heads.get(&author).map_or(0, |h| h.seq);
        let candidate = st
            .peer_heads
            .iter()
            .find(|(p, h)| self.peers.contains(*p) && h.get(&author).is_some_and(|s| *s > ours))
            .map(|(p, _)| p.clone());
        if let Some(p) = candidate {
            self.maybe_fetch(ns, author, &p, now_ms, out);
        }
    }

    fn maybe_fetch(
        &mut self,
        ns: &str,
        author: [u8; 32],
        peer: &P,
        now_ms: u64,
        out: &mut Vec<Action<P>>,
    ) {
        let Some(st) = self.namespaces.get_mut(ns) else {
            return;
        };
        let ours = st.heads.get(&author).map_or(0, |h| h.seq);
        let theirs = st
            .peer_heads
            .get(peer)
            .and_then(|h| h.get(&author))
            .copied()
            .unwrap_or(0);
        if theirs <= ours || st.fetches.contains_key(&author) {
            return;
        }
        let limit = (theirs - ours).min(u64::from(self.cfg.fetch_window)) as u32;
        st.fetches.insert(
            author,
            InFlight {
                peer: peer.clone(),
                deadline_ms: now_ms + self.cfg.fetch_timeout_ms,
            },
        );
        self.stats.fetches_sent += 1;
        out.push(Action::Send {
            peer: peer.clone(),
            msg: SyncMessage::Fetch {
                ns: ns.to_string(),
                author,
                from_seq: ours + 1,
                limit,
            },
        });
    }

    /// Chain-checks a verified batch and stores it (and any buffered successors) or buffers it.
    fn ingest(&mut self, ns: &str, vb: VerifiedBatch, out: &mut Vec<Action<P>>) -> Ingest {
        let st = self
            .namespaces
            .get_mut(ns)
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
        if seq > head_seq + 1 {
            let key = (author, seq);
            if st.pending.contains_key(&key) {
                self.stats.batches_duplicate += 1;
                return Ingest::Buffered;
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
        let mut next = Some(vb);
        while let Some(vb) = next.take() {
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
            out.push(Action::Store(vb));
            if let Some(succ) = st.pending.remove(&(author, seq + 1)) {
                st.pending_bytes -= succ.bytes.len();
                if check_link(st.heads.get(&author).copied(), &succ).is_ok() {
                    next = Some(succ);
                } else {
                    self.stats.batches_rejected += 1;
                }
            }
        }
        Ingest::Stored
    }
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
