//! The sync engine driven without any I/O, in the manner of quinn-proto's `Pair` harness.
//!
//! A [`Net`] owns N engines (peer ids are indices), a virtual clock in milliseconds and a FIFO
//! queue of messages in flight with a fixed latency. It carries out every [`Action`] the way a
//! shell would: `Send` goes through the queue, `Publish` floods the batch to every connected
//! engine (no relaying: the tests use full meshes), `Serve` reads the serving engine's stored
//! batches and answers `Batches`, `Store` appends to the engine's log and applies the ops to its
//! materialized records, `Reject` is recorded. Each `Store` is checked on the way in: a batch is
//! stored at most once per engine, and only right after its predecessor in the author's chain.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, BatchId, ChainPosition};
use blazedb_protocol::dict::DictLookup;
use blazedb_protocol::{
    squeeze, Action, CheckedOps, Dict, DictSet, Engine, EngineConfig, FieldValue, GossipVerdict,
    Hlc, Op, OpsBuilder, RecordState, SyncMessage, Value, VerifiedBatch,
};
use proptest::prelude::*;

const NS: &str = "default";
/// Most messages delivered by one `run_idle` before the harness declares a message storm.
const MAX_STEPS: usize = 200_000;

type Records = BTreeMap<(String, String), RecordState>;

#[derive(Clone, Debug)]
enum Wire {
    Sync(SyncMessage),
    Gossip(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Packet {
    at_ms: u64,
    from: usize,
    to: usize,
    wire: Wire,
}

struct Node {
    engine: Engine<usize>,
    key: Keypair,
    /// Stored batches, by (author, seq).
    log: BTreeMap<([u8; 32], u64), VerifiedBatch>,
    /// (author, seq) in the order they were stored.
    stored_order: Vec<([u8; 32], u64)>,
    records: Records,
    /// Gossip verdicts given, with the relaying peer.
    verdicts: Vec<(usize, GossipVerdict)>,
    /// Dictionaries named by stored batches (what a shell's store holds).
    dicts: DictSet,
}

struct Net {
    now_ms: u64,
    latency_ms: u64,
    tick_ms: u64,
    nodes: Vec<Node>,
    /// Connected pairs, (low, high).
    links: BTreeSet<(usize, usize)>,
    queue: VecDeque<Packet>,
    /// Whether `Publish` floods (off: catch-up must come from Have/Fetch/Batches alone).
    gossip: bool,
    /// Fetches sent to these engines are lost (they never answer).
    deaf_to_fetch: BTreeSet<usize>,
    /// (engine, offending peer, reason) for every `Action::Reject`.
    rejects: Vec<(usize, usize, String)>,
    /// (from, to, from_seq, limit) of every fetch put on the wire.
    fetches: Vec<(usize, usize, u64, u32)>,
    /// The byte cap of each of those fetches, in the same order.
    fetch_caps: Vec<Option<u32>>,
    /// Sync messages delivered.
    sync_delivered: u64,
    /// Most batches in one `Serve` answer (a peer capping its answers by bytes).
    serve_cap: Option<usize>,
    /// Most fetches seen in flight from one engine to another, (from, to) → count.
    max_in_flight: BTreeMap<(usize, usize), usize>,
    /// Dictionary requests sent to these engines are lost.
    deaf_to_dicts: BTreeSet<usize>,
}

fn test_config() -> EngineConfig {
    EngineConfig {
        anti_entropy_interval_ms: 1_000,
        fetch_timeout_ms: 2_000,
        fetch_window: 64,
        ..EngineConfig::default()
    }
}

/// [`test_config`] with `stripes` fetch windows of `window` batches per author.
fn striped(stripes: u32, window: u32) -> EngineConfig {
    EngineConfig {
        fetch_stripes: stripes,
        fetch_window: window,
        ..test_config()
    }
}

impl Net {
    fn new(n: usize, cfg: EngineConfig) -> Self {
        Self::with_configs(vec![cfg; n])
    }

    /// One engine per configuration.
    fn with_configs(cfgs: Vec<EngineConfig>) -> Self {
        let nodes = cfgs
            .into_iter()
            .enumerate()
            .map(|(i, cfg)| {
                let mut engine = Engine::new(cfg);
                engine.join(NS);
                Node {
                    engine,
                    key: Keypair::from_seed([i as u8 + 1; 32]),
                    log: BTreeMap::new(),
                    stored_order: Vec::new(),
                    records: BTreeMap::new(),
                    verdicts: Vec::new(),
                    dicts: DictSet::new(),
                }
            })
            .collect();
        Net {
            now_ms: 1_000,
            latency_ms: 10,
            tick_ms: 100,
            nodes,
            links: BTreeSet::new(),
            queue: VecDeque::new(),
            gossip: true,
            deaf_to_fetch: BTreeSet::new(),
            rejects: Vec::new(),
            fetches: Vec::new(),
            fetch_caps: Vec::new(),
            sync_delivered: 0,
            serve_cap: None,
            max_in_flight: BTreeMap::new(),
            deaf_to_dicts: BTreeSet::new(),
        }
    }

    fn author(&self, i: usize) -> [u8; 32] {
        *self.nodes[i].key.public().as_bytes()
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        self.links.contains(&(a.min(b), a.max(b)))
    }

    fn connect(&mut self, a: usize, b: usize) {
        assert_ne!(a, b);
        self.links.insert((a.min(b), a.max(b)));
        let acts = self.nodes[a].engine.peer_up(b, self.now_ms);
        self.apply(a, acts);
        let acts = self.nodes[b].engine.peer_up(a, self.now_ms);
        self.apply(b, acts);
    }

    fn connect_all(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                self.connect(a, b);
            }
        }
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        self.links.remove(&(a.min(b), a.max(b)));
        let acts = self.nodes[a].engine.peer_down(&b, self.now_ms);
        self.apply(a, acts);
        let acts = self.nodes[b].engine.peer_down(&a, self.now_ms);
        self.apply(b, acts);
    }

    fn send(&mut self, from: usize, to: usize, wire: Wire) {
        if !self.linked(from, to) {
            return;
        }
        if let Wire::Sync(SyncMessage::Fetch {
            from_seq,
            limit,
            max_bytes,
            ..
        }) = &wire
        {
            self.fetches.push((from, to, *from_seq, *limit));
            self.fetch_caps.push(*max_bytes);
            let n = self.nodes[from].engine.fetches_in_flight(&to);
            let max = self.max_in_flight.entry((from, to)).or_insert(0);
            *max = (*max).max(n);
        }
        self.queue.push_back(Packet {
            at_ms: self.now_ms + self.latency_ms,
            from,
            to,
            wire,
        });
    }

    /// Carries out what engine `i` asked for.
    fn apply(&mut self, i: usize, actions: Vec<Action<usize>>) {
        for action in actions {
            match action {
                Action::Send { peer, msg } => self.send(i, peer, Wire::Sync(msg)),
                Action::Store(vb) => self.store(i, vb),
                Action::Publish { ns, bytes, .. } => {
                    assert_eq!(ns, NS);
                    if self.gossip {
                        let peers: Vec<usize> = (0..self.nodes.len())
                            .filter(|p| *p != i && self.linked(i, *p))
                            .collect();
                        for p in peers {
                            self.send(i, p, Wire::Gossip(bytes.to_vec()));
                        }
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
                    // As a node serves: at most `max_bytes`, but at least one batch.
                    let cap = max_bytes.map_or(usize::MAX, |b| b as usize);
                    let mut bytes = 0usize;
                    let batches = self.nodes[i]
                        .log
                        .range((author, from_seq)..=(author, u64::MAX))
                        .take(limit as usize)
                        .take(self.serve_cap.unwrap_or(usize::MAX))
                        .filter(|(_, b)| until.is_none_or(|u| b.header.hlc_max < u))
                        .take_while(|(_, b)| {
                            let first = bytes == 0;
                            bytes += b.bytes.len();
                            first || bytes <= cap
                        })
                        .map(|(_, b)| serde_bytes::ByteBuf::from(b.bytes.to_vec()))
                        .collect();
                    let msg = SyncMessage::Batches {
                        ns,
                        author,
                        batches,
                    };
                    self.send(i, peer, Wire::Sync(msg));
                }
                Action::ServeDicts { peer, refs } => {
                    let dicts = refs
                        .iter()
                        .flat_map(|r| self.nodes[i].dicts.find(*r))
                        .map(|d| serde_bytes::ByteBuf::from(d.bytes().to_vec()))
                        .collect();
                    self.send(i, peer, Wire::Sync(SyncMessage::Dicts { dicts }));
                }
                Action::Reject { peer, reason } => self.rejects.push((i, peer, reason)),
                other => panic!("unexpected action in a public namespace: {other:?}"),
            }
        }
    }

    fn store(&mut self, i: usize, vb: VerifiedBatch) {
        let node = &mut self.nodes[i];
        let (author, seq) = (vb.header.author, vb.header.seq);
        assert!(
            seq == 1 || node.log.contains_key(&(author, seq - 1)),
            "engine {i} stored seq {seq} before its predecessor"
        );
        for op in vb.ops.to_vec().unwrap().iter() {
            node.records
                .entry((op.collection().to_string(), op.key().to_string()))
                .or_default()
                .apply(op, author);
        }
        if let Some(d) = &vb.dict {
            node.dicts.insert(d.clone());
        }
        node.stored_order.push((author, seq));
        let old = node.log.insert((author, seq), vb);
        assert!(old.is_none(), "engine {i} stored seq {seq} twice");
    }

    fn deliver(&mut self, p: Packet) {
        if !self.linked(p.from, p.to) {
            return; // the connection went down while the message was in flight
        }
        self.now_ms = self.now_ms.max(p.at_ms);
        let now = self.now_ms;
        match p.wire {
            Wire::Sync(msg) => {
                if matches!(msg, SyncMessage::Fetch { .. }) && self.deaf_to_fetch.contains(&p.to) {
                    return;
                }
                if matches!(msg, SyncMessage::FetchDicts { .. })
                    && self.deaf_to_dicts.contains(&p.to)
                {
                    return;
                }
                self.sync_delivered += 1;
                let acts = self.nodes[p.to].engine.handle_message(p.from, msg, now);
                self.apply(p.to, acts);
            }
            Wire::Gossip(bytes) => {
                self.gossip_direct(p.from, p.to, bytes);
            }
        }
    }

    /// Hands gossip bytes "relayed by" `from` straight to `to`'s engine (no queue, no link
    /// needed) and carries out the resulting actions.
    fn gossip_direct(&mut self, from: usize, to: usize, bytes: Vec<u8>) -> GossipVerdict {
        let now = self.now_ms;
        let (verdict, acts) = self.nodes[to].engine.handle_gossip(from, NS, bytes, now);
        self.nodes[to].verdicts.push((from, verdict.clone()));
        self.apply(to, acts);
        verdict
    }

    /// Delivers messages in FIFO order until none is in flight.
    fn run_idle(&mut self) {
        let mut steps = 0;
        while let Some(p) = self.queue.pop_front() {
            self.deliver(p);
            steps += 1;
            assert!(
                steps < MAX_STEPS,
                "no quiescence after {MAX_STEPS} messages"
            );
        }
    }

    /// Lets `ms` of virtual time pass: messages are delivered when due and every engine is
    /// ticked every `tick_ms`.
    fn advance(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        let mut steps = 0;
        while self.now_ms < end {
            let next_tick = ((self.now_ms / self.tick_ms + 1) * self.tick_ms).min(end);
            while self.queue.front().is_some_and(|p| p.at_ms <= next_tick) {
                let p = self.queue.pop_front().expect("checked");
                self.deliver(p);
                steps += 1;
                assert!(steps < MAX_STEPS, "message storm while advancing time");
            }
            self.now_ms = next_tick;
            self.tick_all();
        }
    }

    fn tick_all(&mut self) {
        for i in 0..self.nodes.len() {
            let acts = self.nodes[i].engine.tick(self.now_ms);
            self.apply(i, acts);
        }
    }

    fn write(&mut self, i: usize, ops: Vec<Op>) -> VerifiedBatch {
        self.now_ms += 1;
        let key = self.nodes[i].key.clone();
        let (vb, acts) = self.nodes[i]
            .engine
            .write(NS, &key, ops, self.now_ms)
            .expect("local write");
        self.apply(i, acts);
        vb
    }

    fn vector(&self, i: usize) -> BTreeMap<[u8; 32], u64> {
        self.nodes[i].engine.vector(NS)
    }

    fn assert_converged(&self, nodes: &[usize]) {
        let first = nodes[0];
        for &i in &nodes[1..] {
            assert_eq!(
                self.vector(i),
                self.vector(first),
                "version vectors of {i} and {first} differ"
            );
            assert_eq!(
                self.nodes[i].records, self.nodes[first].records,
                "records of {i} and {first} differ"
            );
            let ids = |n: usize| -> Vec<BatchId> {
                self.nodes[n].log.values().map(|b| b.id).collect::<Vec<_>>()
            };
            assert_eq!(ids(i), ids(first), "logs of {i} and {first} differ");
        }
    }
}

fn upsert(key: &str, field: &str, value: impl Into<Value>) -> Op {
    Op::Upsert {
        collection: "c".into(),
        key: key.into(),
        hlc: Hlc::ZERO,
        fields: blazedb_protocol::OpFields::from([(field.to_string(), value.into())]),
    }
}

fn delete(key: &str) -> Op {
    Op::Delete {
        collection: "c".into(),
        key: key.into(),
        hlc: Hlc::ZERO,
    }
}

fn add(key: &str, field: &str, delta: i64) -> Op {
    Op::CounterAdd {
        collection: "c".into(),
        key: key.into(),
        hlc: Hlc::ZERO,
        field: field.into(),
        delta,
    }
}

/// The visible value of a field on engine `i`.
fn field(net: &Net, i: usize, key: &str, name: &str) -> Option<Value> {
    net.nodes[i]
        .records
        .get(&("c".to_string(), key.to_string()))?
        .visible()?
        .get(name)
        .cloned()
}

/// Every engine's records equal the join of every op ever written, in any order.
fn reference(batches: &[VerifiedBatch]) -> Records {
    let mut out = Records::new();
    for vb in batches.iter().rev() {
        for op in vb.ops.to_vec().unwrap().iter() {
            out.entry((op.collection().to_string(), op.key().to_string()))
                .or_default()
                .apply(op, vb.header.author);
        }
    }
    out
}

/// Flips one byte of the payload (the last part of the envelope).
fn tamper(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let last = out.len() - 1;
    out[last] ^= 0x01;
    assert!(matches!(
        batch::verify(out.clone()),
        Err(blazedb_protocol::BatchError::PayloadMismatch)
    ));
    out
}

fn batches_msg(author: [u8; 32], batches: &[&[u8]]) -> SyncMessage {
    SyncMessage::Batches {
        ns: NS.into(),
        author,
        batches: batches
            .iter()
            .map(|b| serde_bytes::ByteBuf::from(b.to_vec()))
            .collect(),
    }
}

#[test]
fn three_connected_writers_converge() {
    let mut net = Net::new(3, test_config());
    net.connect_all();
    net.run_idle();
    let mut written = Vec::new();
    for round in 0..20i64 {
        for w in 0..3usize {
            let ops = vec![
                upsert("shared", "last", format!("w{w}r{round}")),
                upsert(&format!("own{w}"), "round", round),
                add("shared", "hits", 1),
            ];
            written.push(net.write(w, ops));
            // Concurrent writes: the three engines write before hearing each other.
            if round % 3 == 0 {
                net.advance(5);
            }
        }
        if round == 10 {
            written.push(net.write(1, vec![delete("own2")]));
        }
        net.advance(7);
    }
    net.run_idle();
    net.advance(2_000);

    assert!(net.rejects.is_empty(), "rejects: {:?}", net.rejects);
    net.assert_converged(&[0, 1, 2]);
    let expect: BTreeMap<[u8; 32], u64> = [
        (net.author(0), 20),
        (net.author(1), 21),
        (net.author(2), 20),
    ]
    .into_iter()
    .collect();
    assert_eq!(net.vector(0), expect);
    assert_eq!(net.nodes[0].records, reference(&written));
    // All 60 adds count, whatever the interleaving.
    assert_eq!(field(&net, 2, "shared", "hits"), Some(Value::from(60)));
    // The delete (written after own2's round 10) hid it; later upserts show it again.
    assert_eq!(field(&net, 0, "own2", "round"), Some(Value::from(19)));
    for i in 0..3 {
        assert_eq!(net.nodes[i].engine.stats().batches_stored, 61);
        assert_eq!(net.nodes[i].engine.stats().batches_rejected, 0);
    }
}

#[test]
fn reconnecting_node_catches_up_through_fetch_windows() {
    const PER_WRITER: u64 = 250;
    let mut net = Net::new(3, test_config());
    net.connect_all();
    net.run_idle();
    net.disconnect(0, 2);
    net.disconnect(1, 2);
    for i in 0..PER_WRITER {
        net.write(0, vec![upsert(&format!("a{}", i % 40), "v", i)]);
        net.write(
            1,
            vec![upsert(&format!("b{}", i % 40), "v", i), add("n", "n", 1)],
        );
    }
    net.run_idle();
    net.assert_converged(&[0, 1]);
    assert!(net.vector(2).is_empty(), "the cut node heard something");

    // Catch-up must come from Have/Fetch/Batches alone.
    net.gossip = false;
    let fetches_before = net.nodes[2].engine.stats().fetches_sent;
    net.connect(2, 0);
    net.connect(2, 1);
    net.run_idle();

    net.assert_converged(&[0, 1, 2]);
    assert_eq!(net.vector(2).values().sum::<u64>(), 2 * PER_WRITER);
    assert!(
        net.nodes[2].verdicts.is_empty(),
        "gossip reached the cut node"
    );
    let fetches = net.nodes[2].engine.stats().fetches_sent - fetches_before;
    let windows = 2 * PER_WRITER.div_ceil(64);
    assert!(
        (windows..=windows + 2).contains(&fetches),
        "{fetches} fetches for {} batches (expected about {windows})",
        2 * PER_WRITER
    );
    // One fetch in flight per author: no batch was transferred twice although both peers
    // hold both chains.
    assert_eq!(net.nodes[2].engine.stats().batches_duplicate, 0);
    assert_eq!(
        field(&net, 2, "n", "n"),
        Some(Value::from(PER_WRITER as i64))
    );
}

#[test]
fn out_of_order_gossip_is_buffered_then_stored_in_order() {
    let mut net = Net::new(2, test_config());
    // Not connected: batches are handed over by hand, in the order chosen here.
    let b: Vec<VerifiedBatch> = (1..=3i64)
        .map(|i| net.write(0, vec![upsert("k", "v", i), add("k", "n", i)]))
        .collect();
    let author = net.author(0);

    assert_eq!(
        net.gossip_direct(0, 1, b[2].bytes.to_vec()),
        GossipVerdict::Accept
    );
    assert!(net.nodes[1].log.is_empty(), "seq 3 stored before 1 and 2");
    assert!(net.vector(1).is_empty());

    net.gossip_direct(0, 1, b[0].bytes.to_vec());
    assert_eq!(net.nodes[1].stored_order, vec![(author, 1)]);
    // A second copy of the buffered batch is a duplicate, not news to relay.
    assert_eq!(
        net.gossip_direct(0, 1, b[2].bytes.to_vec()),
        GossipVerdict::Ignore
    );
    net.gossip_direct(0, 1, b[1].bytes.to_vec());
    assert_eq!(
        net.nodes[1].stored_order,
        vec![(author, 1), (author, 2), (author, 3)]
    );
    net.assert_converged(&[0, 1]);
    assert_eq!(field(&net, 1, "k", "n"), Some(Value::from(6)));
    assert_eq!(field(&net, 1, "k", "v"), Some(Value::from(3)));
    assert_eq!(net.nodes[1].engine.stats().batches_stored, 3);

    assert_eq!(
        net.gossip_direct(0, 1, b[2].bytes.to_vec()),
        GossipVerdict::Ignore
    );
    assert_eq!(net.nodes[1].engine.stats().batches_duplicate, 2);
}

#[test]
fn gossip_gap_is_fetched_from_the_relaying_peer() {
    let mut net = Net::new(2, test_config());
    net.gossip = false;
    let b: Vec<VerifiedBatch> = (1..=5i64)
        .map(|i| net.write(0, vec![upsert("k", "v", i)]))
        .collect();
    net.links.insert((0, 1)); // connected, but peer_up's Have exchange is skipped
    net.nodes[0].engine.peer_up(1, net.now_ms);
    net.nodes[1].engine.peer_up(0, net.now_ms);
    assert_eq!(
        net.gossip_direct(0, 1, b[4].bytes.to_vec()),
        GossipVerdict::Accept
    );
    assert_eq!(
        net.fetches,
        vec![(1, 0, 1, 4)],
        "gap 1..=4 fetched from the relay"
    );
    net.run_idle();
    net.assert_converged(&[0, 1]);
    assert_eq!(net.vector(1)[&net.author(0)], 5);
}

/// Regression: a peer that relays a batch it has only buffered does not hold the gap. Its
/// empty answer to our gap fetch used to trigger the same fetch again at once, a fetch /
/// empty-answer ping-pong lasting until the next `Have` from that peer.
#[test]
fn empty_fetch_answer_does_not_refetch_from_the_same_peer() {
    let mut net = Net::new(3, test_config());
    net.gossip = false;
    let b: Vec<VerifiedBatch> = (1..=3i64)
        .map(|i| net.write(0, vec![upsert("k", "v", i)]))
        .collect();
    net.connect(1, 2);
    net.run_idle();
    // Engine 2 gets seq 3 "relayed" by engine 1, which holds nothing.
    assert_eq!(
        net.gossip_direct(1, 2, b[2].bytes.to_vec()),
        GossipVerdict::Accept
    );
    net.run_idle(); // panics on a message storm
    let to_1 = net.fetches.iter().filter(|f| f.0 == 2 && f.1 == 1).count();
    assert_eq!(to_1, 1, "fetches from 2 to 1: {:?}", net.fetches);
    assert!(net.vector(2).is_empty());

    // The author shows up: its Have leads to the gap, and the buffered seq 3 follows.
    net.connect(0, 2);
    net.run_idle();
    assert_eq!(net.vector(2)[&net.author(0)], 3);
    assert_eq!(net.nodes[2].records, net.nodes[0].records);
    assert!(net.rejects.is_empty());
}

#[test]
fn invalid_batches_are_rejected_and_duplicates_ignored() {
    let mut net = Net::new(3, test_config());
    let writer = 0;
    let author = net.author(writer);
    let b1 = net.write(writer, vec![upsert("k", "v", 1)]);

    // A flipped payload byte: the gossip verdict is Reject, nothing is stored.
    let bad = tamper(&b1.bytes);
    assert!(matches!(
        net.gossip_direct(writer, 1, bad.clone()),
        GossipVerdict::Reject(_)
    ));
    assert!(net.nodes[1].log.is_empty() && net.vector(1).is_empty());
    assert_eq!(net.nodes[1].engine.stats().batches_rejected, 1);

    // The same in a Batches answer: the peer is reported.
    let acts = net.nodes[2]
        .engine
        .handle_message(writer, batches_msg(author, &[&bad]), net.now_ms);
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Reject { peer, .. } if *peer == writer)));
    assert!(!acts.iter().any(|a| matches!(a, Action::Store(_))));

    // The genuine batch is then accepted.
    assert_eq!(
        net.gossip_direct(writer, 1, b1.bytes.to_vec()),
        GossipVerdict::Accept
    );
    assert_eq!(net.vector(1)[&author], 1);

    // A well-signed seq 2 whose prev is not seq 1's id.
    let forged_prev = ChainPosition {
        seq: 2,
        prev: Some(BatchId(rand::random())),
    };
    let later = Hlc(b1.header.hlc_max.0 + 1);
    let mut op = upsert("k", "v", 666);
    op.set_hlc(later);
    let broken =
        batch::seal(&net.nodes[writer].key, NS, forged_prev, vec![op], None).expect("sealed");
    assert!(
        batch::verify(broken.bytes.to_vec()).is_ok(),
        "signature is valid"
    );
    assert!(matches!(
        net.gossip_direct(writer, 1, broken.bytes.to_vec()),
        GossipVerdict::Reject(r) if r.contains("broken chain")
    ));
    let acts = net.nodes[1].engine.handle_message(
        writer,
        batches_msg(author, &[&broken.bytes]),
        net.now_ms,
    );
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Reject { peer, .. } if *peer == writer)));
    assert_eq!(net.vector(1)[&author], 1);
    assert_eq!(net.nodes[1].log.len(), 1);

    // A second, different, validly signed seq 1: equivocation.
    let mut op = upsert("k", "v", 999);
    op.set_hlc(later);
    let fork = batch::seal(
        &net.nodes[writer].key,
        NS,
        ChainPosition { seq: 1, prev: None },
        vec![op],
        None,
    )
    .expect("sealed");
    assert!(matches!(
        net.gossip_direct(writer, 1, fork.bytes.to_vec()),
        GossipVerdict::Reject(r) if r.contains("equivocation")
    ));

    // Replays: ignored, counted, not punished, not stored again.
    let dup_before = net.nodes[1].engine.stats().batches_duplicate;
    assert_eq!(
        net.gossip_direct(writer, 1, b1.bytes.to_vec()),
        GossipVerdict::Ignore
    );
    let acts =
        net.nodes[1]
            .engine
            .handle_message(writer, batches_msg(author, &[&b1.bytes]), net.now_ms);
    assert!(
        acts.iter()
            .all(|a| !matches!(a, Action::Reject { .. } | Action::Store(_))),
        "{acts:?}"
    );
    assert_eq!(
        net.nodes[1].engine.stats().batches_duplicate,
        dup_before + 2
    );
    assert_eq!(net.nodes[1].engine.stats().batches_stored, 1);
    assert_eq!(net.nodes[1].records, net.nodes[writer].records);
}

#[test]
fn broken_link_waiting_in_the_buffer_is_dropped_when_the_gap_fills() {
    let mut net = Net::new(2, test_config());
    let author = net.author(0);
    let b1 = net.write(0, vec![upsert("k", "v", 1)]);
    let b2 = net.write(0, vec![upsert("k", "v", 2)]);
    let mut op = upsert("k", "v", 666);
    op.set_hlc(Hlc(b2.header.hlc_max.0 + 1));
    let broken = batch::seal(
        &net.nodes[0].key,
        NS,
        ChainPosition {
            seq: 2,
            prev: Some(BatchId([7; 32])),
        },
        vec![op],
        None,
    )
    .expect("sealed");
    // Without seq 1 the engine cannot tell: the forged seq 2 is buffered...
    assert_eq!(
        net.gossip_direct(0, 1, broken.bytes.to_vec()),
        GossipVerdict::Accept
    );
    // ...and dropped, not stored, once seq 1 shows the link is wrong.
    net.gossip_direct(0, 1, b1.bytes.to_vec());
    assert_eq!(net.nodes[1].stored_order, vec![(author, 1)]);
    assert_eq!(net.nodes[1].engine.stats().batches_rejected, 1);
    // The genuine seq 2 still gets in.
    assert_eq!(
        net.gossip_direct(0, 1, b2.bytes.to_vec()),
        GossipVerdict::Accept
    );
    net.assert_converged(&[0, 1]);
}

/// Regression: on a time-out the fetch was re-issued to the first peer (by id) known to hold
/// more — often the very peer that had just failed to answer — so a catch-up could stall
/// forever behind one unresponsive peer.
#[test]
fn timed_out_fetch_is_rerouted_to_another_peer() {
    let cfg = test_config();
    let timeout = cfg.fetch_timeout_ms;
    // 0: holds the data but never answers a fetch; 1: holds it and answers; 2: catches up.
    let mut net = Net::new(3, cfg);
    net.connect(0, 1);
    for i in 0..10i64 {
        net.write(1, vec![upsert("k", "v", i)]);
    }
    net.run_idle();
    net.assert_converged(&[0, 1]);
    net.deaf_to_fetch.insert(0);
    net.connect(2, 0);
    net.connect(2, 1);
    net.run_idle();
    let author = net.author(1);
    assert_eq!(net.fetches, vec![(2, 0, 1, 10)], "first fetch goes to 0");
    assert!(net.vector(2).is_empty());

    net.advance(timeout - 200);
    assert!(net.vector(2).is_empty(), "re-routed before the time-out");
    assert_eq!(net.fetches.len(), 1);

    net.advance(400);
    net.run_idle();
    assert_eq!(
        net.fetches[1],
        (2, 1, 1, 10),
        "re-sent to the peer that answers"
    );
    assert_eq!(net.vector(2)[&author], 10);
    net.assert_converged(&[0, 1, 2]);
}

#[derive(Clone, Debug)]
enum Step {
    /// `node` writes one op on one of a few keys.
    Write {
        node: usize,
        key: u8,
        kind: u8,
        val: i64,
    },
    /// Deliver the in-flight message at `pick` (modulo), keeping a copy if `dup`.
    Deliver { pick: usize, dup: bool },
    /// Time passes and every engine ticks (anti-entropy, time-outs); nothing is delivered.
    Wait { ms: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..3usize, 0..4u8, 0..3u8, -5..5i64)
            .prop_map(|(node, key, kind, val)| Step::Write { node, key, kind, val }),
        6 => (any::<usize>(), prop::bool::weighted(0.2))
            .prop_map(|(pick, dup)| Step::Deliver { pick, dup }),
        1 => (1..3_000u64).prop_map(|ms| Step::Wait { ms }),
    ]
}

fn op_for(key: u8, kind: u8, val: i64) -> Op {
    let key = format!("k{key}");
    match kind {
        0 => upsert(&key, "f", val),
        1 => delete(&key),
        _ => add(&key, "n", val),
    }
}

/// Every batch of every writer, handed to fresh engines by gossip in any order, with
/// duplicates: the buffer alone puts each chain back in order.
fn gossip_in_any_order(writes: Vec<(usize, u8, u8, i64)>, order: Vec<usize>) {
    let mut net = Net::new(5, test_config());
    net.gossip = false;
    let written: Vec<(usize, VerifiedBatch)> = writes
        .into_iter()
        .map(|(w, key, kind, val)| (w, net.write(w, vec![op_for(key, kind, val)])))
        .collect();
    for &k in &order {
        let (w, vb) = &written[k % written.len()];
        for r in 3..5 {
            let verdict = net.gossip_direct(*w, r, vb.bytes.to_vec());
            assert!(!matches!(verdict, GossipVerdict::Reject(_)), "{verdict:?}");
        }
    }
    let all: Vec<VerifiedBatch> = written.into_iter().map(|(_, vb)| vb).collect();
    for r in 3..5 {
        assert_eq!(
            net.nodes[r].log.len(),
            all.len(),
            "receiver {r} misses batches"
        );
        assert_eq!(net.nodes[r].records, reference(&all));
    }
    net.assert_converged(&[3, 4]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn gossip_order_and_duplicates_do_not_matter(
        (writes, order) in prop::collection::vec((0..3usize, 0..4u8, 0..3u8, -5..5i64), 1..30)
            .prop_flat_map(|writes| {
                let n = writes.len();
                (Just(writes), prop::collection::vec(0..n, n..2 * n + 1))
            })
            .prop_flat_map(|(writes, mut extra)| {
                // Each batch at least once, some more than once, shuffled.
                extra.extend(0..writes.len());
                (Just(writes), Just(extra).prop_shuffle())
            })
    ) {
        gossip_in_any_order(writes, order);
    }

    /// Writes, gossip and sync messages interleaved at random: messages are delivered in any
    /// order, some twice, time jumps trigger anti-entropy and fetch time-outs. After a final
    /// FIFO settle, every engine holds every batch and the same records, and no honest engine
    /// was ever reported.
    #[test]
    fn random_interleavings_converge(steps in prop::collection::vec(step(), 1..120)) {
        let mut net = Net::new(4, test_config());
        net.connect_all();
        let mut written = Vec::new();
        for s in steps {
            match s {
                Step::Write { node, key, kind, val } => {
                    written.push(net.write(node, vec![op_for(key, kind, val)]));
                }
                Step::Deliver { pick, dup } => {
                    if net.queue.is_empty() {
                        continue;
                    }
                    let k = pick % net.queue.len();
                    let p = if dup {
                        net.queue[k].clone()
                    } else {
                        net.queue.remove(k).expect("in range")
                    };
                    net.deliver(p);
                }
                Step::Wait { ms } => {
                    net.now_ms += ms;
                    net.tick_all();
                }
            }
        }
        net.run_idle();
        net.advance(3_000);
        net.run_idle();
        prop_assert!(net.rejects.is_empty(), "rejects: {:?}", net.rejects);
        net.assert_converged(&[0, 1, 2, 3]);
        prop_assert_eq!(net.nodes[3].log.len(), written.len());
        prop_assert_eq!(&net.nodes[3].records, &reference(&written));
    }
}

// ---------------------------------------------------------------------------------------------
// Striped catch-up: several fetch windows in flight per author.

/// Engines 0 and 1 hold `n` batches of engine 0's chain; engine 2 (never connected) holds none.
/// Gossip is off afterwards: catch-up comes from Have/Fetch/Batches alone.
fn two_holders(cfgs: Vec<EngineConfig>, n: u64) -> Net {
    let mut net = Net::with_configs(cfgs);
    net.connect(0, 1);
    for i in 0..n {
        net.write(0, vec![upsert(&format!("k{}", i % 50), "v", i as i64)]);
    }
    net.run_idle();
    net.assert_converged(&[0, 1]);
    net.gossip = false;
    net
}

/// The seq ranges engine `from` asked for, sorted, checked disjoint.
fn asked_ranges(net: &Net, from: usize) -> Vec<(u64, u64, usize)> {
    let mut r: Vec<(u64, u64, usize)> = net
        .fetches
        .iter()
        .filter(|f| f.0 == from)
        .map(|f| (f.2, f.2 + u64::from(f.3) - 1, f.1))
        .collect();
    r.sort();
    r
}

/// Delivers what is in flight layer by layer, each layer in reverse order of sending: answers
/// to later stripes arrive before earlier ones.
fn run_reversed(net: &mut Net) {
    let mut rounds = 0;
    while !net.queue.is_empty() {
        let layer: Vec<Packet> = net.queue.drain(..).collect();
        for p in layer.into_iter().rev() {
            net.deliver(p);
        }
        rounds += 1;
        assert!(rounds < 10_000, "no quiescence");
    }
}

#[test]
fn striped_catch_up_spreads_disjoint_windows_over_peers() {
    const N: u64 = 1_000;
    let mut net = two_holders(vec![test_config(), test_config(), striped(4, 32)], N);
    net.connect(2, 0);
    net.connect(2, 1);
    net.run_idle();

    net.assert_converged(&[0, 1, 2]);
    assert!(net.rejects.is_empty(), "{:?}", net.rejects);
    let stats = net.nodes[2].engine.stats().clone();
    assert_eq!(stats.batches_duplicate, 0, "a batch was transferred twice");
    assert_eq!(
        stats.pending_dropped, 0,
        "asked for more than the buffer holds"
    );
    // Disjoint windows covering the whole chain, served by both peers.
    let ranges = asked_ranges(&net, 2);
    let mut next = 1;
    for (from, to, _) in &ranges {
        assert_eq!(*from, next, "ranges {ranges:?}");
        next = to + 1;
    }
    assert_eq!(next, N + 1);
    assert!(ranges.iter().any(|r| r.2 == 0) && ranges.iter().any(|r| r.2 == 1));
    // Several windows in flight at once, several per peer.
    let in_flight = |to| net.max_in_flight.get(&(2, to)).copied().unwrap_or(0);
    assert!(
        in_flight(0) >= 2 && in_flight(1) >= 2,
        "{:?}",
        net.max_in_flight
    );
    assert!(in_flight(0) + in_flight(1) <= 4, "{:?}", net.max_in_flight);
    // Fewer round trips than one window at a time would need.
    assert_eq!(ranges.len() as u64, N.div_ceil(32));
}

#[test]
fn first_missing_batch_is_asked_for_in_the_first_round_trip() {
    let mut net = two_holders(vec![test_config(), test_config(), striped(4, 16)], 200);
    net.connect(2, 0);
    // Deliver only what connecting put on the wire (the Have messages).
    let haves: Vec<Packet> = net.queue.drain(..).collect();
    for p in haves {
        net.deliver(p);
    }
    let first: Vec<_> = net.fetches.iter().filter(|f| f.0 == 2).collect();
    assert_eq!(
        first.first().map(|f| (f.2, f.3)),
        Some((1, 16)),
        "{first:?}"
    );
    net.run_idle();
    net.assert_converged(&[0, 2]);
}

/// A node that has seen no batch of a namespace caps its first fetch of each chain at
/// `FIRST_FETCH_BYTES`: with large batches (~340 KB here) the first answer is one batch,
/// stored after one batch's transfer instead of a whole window's, and the windows after it,
/// on several stripes, are whole again. (Small batches fit many to the cap: the striped
/// tests above get theirs a full window at a time, as before.)
#[test]
fn a_fresh_nodes_first_fetch_is_capped_in_bytes() {
    use blazedb_protocol::limits::FIRST_FETCH_BYTES;
    let mut net = Net::with_configs(vec![test_config(), test_config(), striped(4, 16)]);
    net.connect(0, 1);
    let mut seed = 7u64;
    let mut letters = |n: usize| -> String {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (b'a' + (seed % 26) as u8) as char
            })
            .collect()
    };
    for b in 0..20 {
        let ops = (0..8)
            .map(|i| upsert(&format!("k{b}-{i}"), "v", letters(60_000)))
            .collect();
        net.write(0, ops);
    }
    net.run_idle();
    net.assert_converged(&[0, 1]);
    net.gossip = false;
    net.connect(2, 0);
    let haves: Vec<Packet> = net.queue.drain(..).collect();
    for p in haves {
        net.deliver(p);
    }
    assert_eq!(net.fetches, vec![(2, 0, 1, 16)], "{:?}", net.fetches);
    assert_eq!(net.fetch_caps, vec![Some(FIRST_FETCH_BYTES)]);
    // The fetch reaches 0, its answer reaches 2.
    for _ in 0..2 {
        let layer: Vec<Packet> = net.queue.drain(..).collect();
        for p in layer {
            net.deliver(p);
        }
    }
    let author = net.author(0);
    assert_eq!(net.vector(2).get(&author), Some(&1), "one batch came first");
    // Then whole windows, uncapped, on several stripes at once.
    let later = &net.fetch_caps[1..];
    assert!(later.len() >= 2, "{:?}", net.fetches);
    assert!(later.iter().all(Option::is_none), "{later:?}");
    net.run_idle();
    net.assert_converged(&[0, 1, 2]);
    assert_eq!(net.nodes[2].engine.stats().batches_duplicate, 0);
}

#[test]
fn striped_answers_arriving_out_of_order_are_buffered_and_stored_in_order() {
    const N: u64 = 600;
    let mut net = two_holders(vec![test_config(), test_config(), striped(6, 20)], N);
    net.connect(2, 0);
    net.connect(2, 1);
    run_reversed(&mut net);
    // `Net::store` asserts that every batch is stored right after its predecessor.
    net.assert_converged(&[0, 1, 2]);
    let stats = net.nodes[2].engine.stats();
    assert_eq!(stats.batches_duplicate, 0);
    assert_eq!(stats.pending_dropped, 0);
    assert!(net.max_in_flight.values().sum::<usize>() > 2);
}

#[test]
fn stripes_never_ask_for_more_than_the_buffer_holds() {
    const N: u64 = 800;
    // Room for 50 batches out of order (count), then for ~10 batches (bytes).
    let by_count = EngineConfig {
        max_pending_batches: 50,
        ..striped(8, 32)
    };
    let mut net = two_holders(vec![test_config(), test_config(), by_count], N);
    net.connect(2, 0);
    net.connect(2, 1);
    run_reversed(&mut net);
    net.assert_converged(&[0, 1, 2]);
    assert_eq!(net.nodes[2].engine.stats().pending_dropped, 0);
    assert_eq!(net.nodes[2].engine.stats().batches_duplicate, 0);

    let size = net.nodes[0]
        .log
        .values()
        .map(|b| b.bytes.len())
        .max()
        .unwrap();
    let by_bytes = EngineConfig {
        max_pending_bytes: 10 * size,
        ..striped(8, 32)
    };
    let mut net = two_holders(vec![test_config(), test_config(), by_bytes], N);
    net.connect(2, 0);
    net.connect(2, 1);
    run_reversed(&mut net);
    net.assert_converged(&[0, 1, 2]);
    assert_eq!(net.nodes[2].engine.stats().pending_dropped, 0);
}

#[test]
fn truncated_answers_leave_gaps_that_are_fetched_again() {
    const N: u64 = 400;
    let mut net = two_holders(vec![test_config(), test_config(), striped(4, 64)], N);
    net.serve_cap = Some(7); // peers cap their answers (by bytes, in a real node)
    net.connect(2, 0);
    net.connect(2, 1);
    run_reversed(&mut net);
    net.assert_converged(&[0, 1, 2]);
    assert_eq!(net.nodes[2].engine.stats().batches_duplicate, 0);
    assert_eq!(net.nodes[2].engine.stats().pending_dropped, 0);
}

#[test]
fn peer_dropping_mid_transfer_has_its_stripes_rerouted() {
    const N: u64 = 1_000;
    let mut net = two_holders(vec![test_config(), test_config(), striped(4, 32)], N);
    net.connect(2, 0);
    net.connect(2, 1);
    // A few round trips, then 0 goes away with stripes in flight.
    for _ in 0..12 {
        if let Some(p) = net.queue.pop_front() {
            net.deliver(p);
        }
    }
    assert!(
        net.nodes[2].engine.fetches_in_flight(&0) > 0,
        "nothing in flight to 0"
    );
    let asked_before = net.fetches.len();
    net.disconnect(2, 0);
    assert_eq!(net.nodes[2].engine.fetches_in_flight(&0), 0);
    net.run_idle();
    net.assert_converged(&[1, 2]);
    assert!(
        net.fetches[asked_before..].iter().all(|f| f.1 == 1),
        "asked a gone peer"
    );
    assert_eq!(net.nodes[2].engine.stats().pending_dropped, 0);
}

#[test]
fn silent_peer_has_each_stripe_rerouted_on_time_out() {
    const N: u64 = 300;
    let cfg = striped(4, 16);
    let timeout = cfg.fetch_timeout_ms;
    let mut net = two_holders(vec![test_config(), test_config(), cfg], N);
    net.deaf_to_fetch.insert(0);
    net.connect(2, 0);
    net.connect(2, 1);
    net.run_idle();
    assert!(net.vector(2).get(&net.author(0)).copied().unwrap_or(0) < N);
    net.advance(timeout + 500);
    net.run_idle();
    net.assert_converged(&[0, 1, 2]);
}

#[test]
fn fetches_in_flight_per_peer_are_bounded() {
    // Ten writers, all held by engine 0; engine 11 catches up from 0 alone.
    let cap = 3;
    let mut cfgs = vec![test_config(); 11];
    cfgs.push(EngineConfig {
        max_fetches_per_peer: cap,
        ..striped(4, 8)
    });
    let mut net = Net::with_configs(cfgs);
    for w in 1..=10 {
        net.connect(0, w);
    }
    for round in 0..30i64 {
        for w in 1..=10 {
            net.write(w, vec![upsert(&format!("w{w}"), "v", round)]);
        }
    }
    net.run_idle();
    net.gossip = false;
    net.connect(11, 0);
    net.run_idle();
    net.advance(3_000);
    net.run_idle();
    assert_eq!(net.vector(11), net.vector(0));
    assert_eq!(net.nodes[11].records, net.nodes[0].records);
    assert_eq!(net.max_in_flight.get(&(11, 0)).copied(), Some(cap));
}

/// Writers 0..3 hold the data; engine 3 catches up one window at a time, engine 4 with
/// stripes, both from the same peers, with messages delivered in any order, time jumps
/// (time-outs), peers capping their answers and a peer dropping mid-transfer.
fn striped_equals_single(
    writes: Vec<(usize, u8)>,
    (stripes, window, pending, cap): (u32, u32, usize, Option<usize>),
    picks: Vec<(usize, u16)>,
    drop_at: usize,
) {
    let catcher = |stripes| EngineConfig {
        max_pending_batches: pending,
        ..striped(stripes, window)
    };
    let mut net = Net::with_configs(vec![
        test_config(),
        test_config(),
        test_config(),
        catcher(1),
        catcher(stripes),
    ]);
    net.connect(0, 1);
    net.connect(1, 2);
    net.connect(0, 2);
    let mut written = Vec::new();
    for (w, n) in writes {
        let ops = (0..n % 4 + 1)
            .map(|i| upsert(&format!("k{}", (n % 7 + i) % 7), "v", i64::from(n)))
            .collect();
        written.push(net.write(w, ops));
    }
    net.run_idle();
    net.gossip = false;
    net.serve_cap = cap;
    for c in [3, 4] {
        for h in 0..3 {
            net.connect(c, h);
        }
    }
    for (k, (pick, wait)) in picks.into_iter().enumerate() {
        if k == drop_at {
            net.disconnect(3, 0);
            net.disconnect(4, 0);
        }
        if wait > 60_000 {
            net.now_ms += u64::from(wait - 60_000);
            net.tick_all();
        } else if !net.queue.is_empty() {
            let p = net.queue.remove(pick % net.queue.len()).expect("in range");
            net.deliver(p);
        }
    }
    net.run_idle();
    net.advance(5_000);
    net.run_idle();
    assert!(net.rejects.is_empty(), "rejects: {:?}", net.rejects);
    net.assert_converged(&[0, 1, 2, 3, 4]);
    assert_eq!(net.nodes[4].records, reference(&written));
    // Only a late answer to a fetch given up on (timed out, its buffer room handed on) can
    // find the buffer full.
    let stats = net.nodes[4].engine.stats();
    if stats.fetches_timed_out == 0 {
        assert_eq!(stats.pending_dropped, 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Striped catch-up ends in exactly the state of one window at a time: same log, same
    /// version vector, same records.
    #[test]
    fn striped_catch_up_ends_like_one_stripe(
        writes in prop::collection::vec((0..3usize, any::<u8>()), 1..150),
        params in (2..7u32, 1..12u32, 4..64usize, prop::option::of(1..6usize)),
        picks in prop::collection::vec((any::<usize>(), 0..64_000u16), 0..400),
        drop_at in 0..600usize,
    ) {
        striped_equals_single(writes, params, picks, drop_at);
    }
}

// --- Dictionaries -------------------------------------------------------------------------

/// A raw-content dictionary: earlier payloads of [`small_op`] writes (`tag` makes it another
/// dictionary with another id).
fn test_dict(tag: &str) -> Dict {
    let mut bytes = tag.as_bytes().to_vec();
    for i in 0..64 {
        let mut op = small_op(i);
        op.set_hlc(Hlc(1 + i));
        blazedb_protocol::codec::encode_ops(&[op], &mut bytes);
    }
    Dict::new(bytes).unwrap()
}

fn small_op(i: u64) -> Op {
    Op::Upsert {
        collection: "c".into(),
        key: format!("k{}", i % 64),
        hlc: Hlc::ZERO,
        fields: blazedb_protocol::OpFields::from([
            (
                "name".to_string(),
                Value::from(format!("player-{}", i % 64)),
            ),
            (
                "score".to_string(),
                Value::from(format!("level {i} level {i}")),
            ),
        ]),
    }
}

/// A node that receives a dictionary-compressed batch by gossip without holding the
/// dictionary asks the relayer for it (not penalizing it), keeps the batches meanwhile, and
/// stores them once it arrives; the engines converge.
#[test]
fn gossiped_dict_batches_fetch_the_dictionary_from_the_relayer() {
    let mut net = Net::new(2, test_config());
    net.connect_all();
    net.run_idle();
    net.nodes[0].engine.set_write_dict(NS, test_dict("a"));
    let mut written = Vec::new();
    for i in 0..5 {
        written.push(net.write(0, vec![small_op(i)]));
    }
    assert!(
        written.iter().all(|b| b.dict.is_some()),
        "the dictionary was not used"
    );
    assert_eq!(net.nodes[0].engine.stats().dict_batches_sealed, 5);
    net.run_idle();
    net.assert_converged(&[0, 1]);
    let st = net.nodes[1].engine.stats();
    assert_eq!(st.dict_requests_sent, 1, "one request for the five batches");
    assert_eq!(st.dicts_received, 1);
    assert_eq!(st.dict_batches_stored, 5);
    assert_eq!(st.dict_waits_dropped, 0);
    assert!(net.rejects.is_empty(), "{:?}", net.rejects);
    assert!(net.nodes[1]
        .verdicts
        .iter()
        .all(|(_, v)| !matches!(v, GossipVerdict::Reject(_))));
    assert_eq!(net.nodes[1].engine.dict_waiting(), (0, 0));
    assert_eq!(
        net.nodes[1].dicts.len(),
        1,
        "stored with the batches that name it"
    );
    // The dictionary is now held: the next batch goes straight in.
    net.write(0, vec![small_op(9)]);
    net.run_idle();
    net.assert_converged(&[0, 1]);
    assert_eq!(net.nodes[1].engine.stats().dict_requests_sent, 1);
}

/// Catch-up through fetches over a chain that switches dictionaries (versioning: each batch
/// names its own): the fetching node pauses at each unknown dictionary, fetches it, and goes
/// on; it ends with exactly the writer's log and records, and both dictionaries.
#[test]
fn catch_up_over_two_dictionaries_converges() {
    let mut net = Net::new(2, striped(4, 8));
    net.gossip = false;
    net.nodes[0].engine.set_write_dict(NS, test_dict("a"));
    for i in 0..30 {
        net.write(0, vec![small_op(i)]);
    }
    net.nodes[0].engine.set_write_dict(NS, test_dict("b"));
    for i in 30..60 {
        net.write(0, vec![small_op(i)]);
    }
    assert_eq!(net.nodes[0].engine.stats().dict_batches_sealed, 60);
    net.connect_all();
    net.advance(20_000);
    net.assert_converged(&[0, 1]);
    let st = net.nodes[1].engine.stats();
    assert_eq!(st.dicts_received, 2);
    assert_eq!(st.dict_batches_stored, 60);
    assert!(net.rejects.is_empty(), "{:?}", net.rejects);
    assert_eq!(net.nodes[1].dicts.len(), 2);
}

/// The wait buffer is bounded, and a dictionary that never comes does not stall the chain:
/// the request times out, the waiting batches are dropped (counted), and once the peer
/// answers again catch-up brings everything.
#[test]
fn dict_waits_are_bounded_and_never_stall_the_chain() {
    let cfg = EngineConfig {
        max_dict_waiting: 3,
        ..test_config()
    };
    let mut net = Net::new(2, cfg);
    net.connect_all();
    net.run_idle();
    net.deaf_to_dicts.insert(0);
    net.nodes[0].engine.set_write_dict(NS, test_dict("a"));
    for i in 0..8 {
        net.write(0, vec![small_op(i)]);
    }
    net.run_idle();
    let e = &net.nodes[1].engine;
    assert_eq!(e.dict_waiting(), (3, 1), "3 batches wait, 1 request out");
    assert_eq!(e.stats().dict_waits_dropped, 5);
    assert!(e.vector(NS).is_empty());
    // The request times out: everything waiting is dropped, nothing is held forever (catch-up
    // meanwhile asks again, within the same bounds).
    net.advance(2_500);
    let e = &net.nodes[1].engine;
    assert!(e.stats().dict_waits_dropped >= 8);
    assert!(e.dict_waiting().0 <= 3 && e.dict_waiting().1 <= 1);
    assert!(
        e.stats().dict_requests_sent >= 2,
        "asked again after the time-out"
    );
    assert!(net.rejects.is_empty(), "{:?}", net.rejects);
    // The peer answers again: anti-entropy and catch-up bring it all.
    net.deaf_to_dicts.clear();
    net.advance(10_000);
    net.assert_converged(&[0, 1]);
}

/// Dictionaries from peers are checked: too many or oversized ones are rejected, unasked-for
/// ones are ignored (not held), and a request for too many is rejected.
#[test]
fn bad_dictionary_messages_are_refused() {
    let mut e: Engine<usize> = Engine::new(test_config());
    e.join(NS);
    e.peer_up(1, 0);
    let d = test_dict("x");
    let unasked = SyncMessage::Dicts {
        dicts: vec![serde_bytes::ByteBuf::from(d.bytes().to_vec())],
    };
    assert!(e.handle_message(1, unasked, 0).is_empty());
    assert!(e.dicts().is_empty());
    let big = vec![0u8; blazedb_protocol::limits::MAX_DICT_BYTES + 1];
    let oversized = SyncMessage::Dicts {
        dicts: vec![serde_bytes::ByteBuf::from(big)],
    };
    let acts = e.handle_message(1, oversized, 0);
    assert!(
        matches!(&acts[..], [Action::Reject { peer: 1, .. }]),
        "{acts:?}"
    );
    let many = SyncMessage::Dicts {
        dicts: vec![serde_bytes::ByteBuf::from(vec![1u8]); 9],
    };
    assert!(matches!(
        &e.handle_message(1, many, 0)[..],
        [Action::Reject { .. }]
    ));
    let ask = SyncMessage::FetchDicts {
        ns: NS.into(),
        refs: vec![d.dict_ref(); 9],
    };
    assert!(matches!(
        &e.handle_message(1, ask, 0)[..],
        [Action::Reject { .. }]
    ));
    assert_eq!(e.stats().dicts_rejected, 2);
    // Asked for one we do not hold in memory: the shell is told to serve it from its store.
    let ask = SyncMessage::FetchDicts {
        ns: NS.into(),
        refs: vec![d.dict_ref()],
    };
    let acts = e.handle_message(1, ask, 0);
    assert!(
        matches!(&acts[..], [Action::ServeDicts { peer: 1, refs }] if refs == &vec![d.dict_ref()])
    );
}

/// Dictionary requests to one peer are bounded: batches naming more unknown dictionaries than
/// that are dropped (and counted), never punished.
#[test]
fn dict_requests_per_peer_are_bounded() {
    let cfg = test_config();
    let per_peer = cfg.max_dict_requests_per_peer;
    let mut e: Engine<usize> = Engine::new(cfg);
    e.join(NS);
    e.peer_up(1, 0);
    let kp = Keypair::from_seed([42; 32]);
    let mut prev = None;
    let mut sent = 0;
    let n = per_peer + 3;
    for i in 0..n {
        let d = test_dict(&format!("dict-{i}"));
        let mut op = small_op(i as u64);
        op.set_hlc(Hlc(1_000 + i as u64));
        let pos = ChainPosition {
            seq: i as u64 + 1,
            prev,
        };
        let b = batch::seal_with(&kp, NS, pos, vec![op], None, Some(&d)).unwrap();
        assert!(b.dict.is_some());
        prev = Some(b.id);
        let (verdict, acts) = e.handle_gossip(1, NS, b.bytes.to_vec(), 0);
        assert_eq!(verdict, GossipVerdict::Ignore);
        sent += acts
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Send {
                        msg: SyncMessage::FetchDicts { .. },
                        ..
                    }
                )
            })
            .count();
    }
    assert_eq!(sent, per_peer);
    assert_eq!(e.dict_waiting(), (per_peer, per_peer));
    assert_eq!(e.stats().dict_waits_dropped, (n - per_peer) as u64);
    assert_eq!(e.stats().batches_rejected, 0);
}

/// What an engine did with a message, comparable across engines: each action (stored batches
/// by id), then its counters and vector.
fn outcome(net: &Net, i: usize, actions: &[Action<usize>]) -> (Vec<String>, [u64; 3], String) {
    let acts = actions
        .iter()
        .map(|a| match a {
            Action::Store(vb) => format!("store {}", vb.id.to_hex()),
            other => format!("{other:?}"),
        })
        .collect();
    let s = net.nodes[i].engine.stats();
    let counts = [s.batches_stored, s.batches_rejected, s.batches_duplicate];
    (acts, counts, format!("{:?}", net.vector(i)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A fetch answer verified ahead (`preverify`, as the node's verifier thread does) is
    /// handled exactly as the engine handles the raw message: same actions, same counters,
    /// same vector; in any order of the batches, with a tampered one anywhere, and with a
    /// batch already held.
    #[test]
    fn preverified_answers_are_handled_like_raw_ones(
        n in 1usize..6,
        order in proptest::collection::vec(0usize..6, 1..8),
        tamper_at in proptest::option::of(0usize..8),
        held in 0usize..2,
    ) {
        let mut net = Net::new(3, test_config());
        let author = net.author(0);
        let batches: Vec<VerifiedBatch> = (0..n)
            .map(|k| net.write(0, vec![upsert(&format!("k{k}"), "v", k as i64)]))
            .collect();
        let mut answer: Vec<Vec<u8>> = order
            .iter()
            .map(|&k| batches[k % n].bytes.to_vec())
            .collect();
        if let Some(t) = tamper_at {
            let t = t % answer.len();
            answer[t] = tamper(&answer[t]);
        }
        // Both receivers already hold the first `held` batches.
        for i in [1, 2] {
            for b in batches.iter().take(held.min(n)) {
                let acts = net.nodes[i].engine.handle_message(
                    0,
                    batches_msg(author, &[&b.bytes]),
                    net.now_ms,
                );
                net.apply(i, acts);
            }
        }
        let refs: Vec<&[u8]> = answer.iter().map(Vec::as_slice).collect();
        let raw = net.nodes[1]
            .engine
            .handle_message(0, batches_msg(author, &refs), net.now_ms);
        let pre = net.nodes[2].engine.handle_batches_preverified(
            0,
            NS.into(),
            author,
            blazedb_protocol::preverify(answer.clone()),
            net.now_ms,
        );
        prop_assert_eq!(outcome(&net, 1, &raw), outcome(&net, 2, &pre));
    }
}

/// An op of a wide random call: two-field and one-field upserts, deletes and counter adds
/// over 300 records, so that a call of 257+ ops has records written several times over
/// (pruning has work: whole ops and single fields dropped).
fn op_wide(key: u16, kind: u8, val: i64) -> Op {
    let key = format!("k{key}");
    match kind {
        0 => Op::Upsert {
            collection: "c".into(),
            key,
            hlc: Hlc(0),
            fields: [
                ("a".to_string(), Value::from(val)),
                ("b".into(), Value::from("x")),
            ]
            .into_iter()
            .collect(),
        },
        1 => upsert(&key, "b", val),
        2 => delete(&key),
        _ => add(&key, "n", val),
    }
}

/// Large calls of random letters (a level below the strong one wins the engine's probes
/// there) seal the same batches whether their ops are compressed by the sealer or ahead, at
/// the level the sealer is on or another one, and the batches verify and decode to the calls'
/// ops.
#[test]
fn large_calls_compressed_ahead_seal_the_same_batches() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut letters = |n: usize| -> String { (0..n).map(|_| rng.gen_range('a'..='z')).collect() };
    let calls: Vec<Vec<Op>> = (0..40)
        .map(|c| {
            (0..1_000)
                .map(|i| Op::Upsert {
                    collection: "c".into(),
                    key: format!("k{c}-{i}-{}", letters(8)),
                    hlc: Hlc(0),
                    fields: [("v".to_string(), Value::from(letters(60)))]
                        .into_iter()
                        .collect(),
                })
                .collect()
        })
        .collect();
    let key = Keypair::from_seed([4; 32]);
    let mut engines: Vec<Engine<usize>> = (0..4).map(|_| Engine::new(test_config())).collect();
    let mut fast_taken = 0;
    for e in engines.iter_mut() {
        e.join(NS);
    }
    for (i, call) in calls.iter().enumerate() {
        let now = 1_800_000_000_000 + i as u64;
        let mut sealed = Vec::new();
        for (e, level) in engines.iter_mut().zip([
            None,
            Some(squeeze::STRONG_LEVEL),
            Some(squeeze::FAST_LEVEL),
            Some(squeeze::FASTEST_LEVEL),
        ]) {
            let mut ops = CheckedOps::new(call.clone()).unwrap();
            ops.encode_ahead();
            assert!(ops.is_encoded_ahead());
            if let Some(level) = level {
                ops.compress_ahead(level);
            }
            if level.is_some_and(|l| l < squeeze::STRONG_LEVEL) && level == e.squeeze_level(NS) {
                fast_taken += 1;
            }
            sealed.push(e.write_checked(NS, &key, &mut ops, now).unwrap().0);
        }
        assert_eq!(sealed[0].bytes, sealed[1].bytes, "call {i}");
        assert_eq!(sealed[0].bytes, sealed[2].bytes, "call {i}");
        assert_eq!(sealed[0].bytes, sealed[3].bytes, "call {i}");
        let back = batch::verify(sealed[3].bytes.to_vec()).unwrap();
        assert_eq!(back.ops.to_vec().unwrap(), sealed[0].ops.to_vec().unwrap());
    }
    assert!(
        fast_taken > 30,
        "a level below the strong one was chosen and its frames offered: {fast_taken}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Calls pruned and encoded on their writer's task (`CheckedOps::encode_ahead`) seal into
    /// byte for byte the batches the engine seals from the same ops when it prunes and
    /// encodes them itself, call after call of one chain — at a real clock (the payload's
    /// first timestamp written in) and at a clock too small for its 9-byte form (the sealer
    /// encodes the ops itself).
    /// Some are compressed ahead too (`CheckedOps::compress_ahead`, at either level: the
    /// sealer takes the frame only at the level it chose).
    #[test]
    fn calls_encoded_ahead_seal_the_same_batches(
        calls in prop::collection::vec(
            prop::collection::vec((0..1200u16, 0..4u8, -5..5i64), 257..1300),
            1..4,
        ),
        now_ms in prop_oneof![Just(1_000u64), Just(1_800_000_000_000u64)],
        level in prop_oneof![
            Just(None),
            Just(Some(squeeze::STRONG_LEVEL)),
            Just(Some(squeeze::FAST_LEVEL)),
            Just(Some(squeeze::FASTEST_LEVEL)),
        ],
    ) {
        let key = Keypair::from_seed([9; 32]);
        let (mut here, mut ahead) = (Engine::<usize>::new(test_config()), Engine::<usize>::new(test_config()));
        here.join(NS);
        ahead.join(NS);
        for (i, call) in calls.iter().enumerate() {
            let ops: Vec<Op> = call.iter().map(|&(k, kind, v)| op_wide(k, kind, v)).collect();
            let now = now_ms + i as u64;
            let mut plain = CheckedOps::new(ops.clone()).unwrap();
            let (a, _) = here.write_checked(NS, &key, &mut plain, now).unwrap();
            let mut early = CheckedOps::new(ops).unwrap();
            early.encode_ahead();
            if let Some(level) = level {
                early.compress_ahead(level);
            }
            let (b, _) = ahead.write_checked(NS, &key, &mut early, now).unwrap();
            prop_assert_eq!(a.id, b.id);
            prop_assert_eq!(&a.bytes, &b.bytes);
            prop_assert_eq!(plain.ops().len(), early.len());
        }
    }

    /// Calls built as a payload (`OpsBuilder`) seal into byte for byte the batches the same
    /// ops give as owned ops, call after call of one chain: calls of distinct records (sealed
    /// as built), calls whose records repeat and small calls (both decoded for the ordinary
    /// path), at a real clock and at one too small for the payload's 9-byte first stamp.
    #[test]
    fn calls_built_as_payloads_seal_the_same_batches(
        calls in prop::collection::vec(
            (prop::collection::vec((0..300u16, 0..4u8, -5..5i64), 1..420), any::<bool>()),
            1..4,
        ),
        now_ms in prop_oneof![Just(1_000u64), Just(1_800_000_000_000u64)],
    ) {
        let key = Keypair::from_seed([9; 32]);
        let (mut owned, mut built) =
            (Engine::<usize>::new(test_config()), Engine::<usize>::new(test_config()));
        owned.join(NS);
        built.join(NS);
        for (i, (call, distinct)) in calls.iter().enumerate() {
            let ops: Vec<Op> = call
                .iter()
                .enumerate()
                .map(|(j, &(k, kind, v))| op_wide(if *distinct { j as u16 } else { k }, kind, v))
                .collect();
            let now = now_ms + i as u64;
            let mut plain = CheckedOps::new(ops.clone()).unwrap();
            plain.encode_ahead();
            let (a, _) = owned.write_checked(NS, &key, &mut plain, now).unwrap();
            let mut b = OpsBuilder::new();
            for op in &ops {
                match op {
                    Op::Upsert { collection, key, fields, .. } => {
                        let fields: Vec<(&str, FieldValue<'_>)> =
                            fields.iter().map(|(f, v)| (f.as_str(), FieldValue::Json(v))).collect();
                        b.upsert(collection, key, &fields).unwrap();
                    }
                    Op::Delete { collection, key, .. } => b.delete(collection, key).unwrap(),
                    Op::CounterAdd { collection, key, field, delta, .. } => {
                        b.add(collection, key, field, *delta).unwrap()
                    }
                    Op::Revoke { .. } => unreachable!(),
                }
            }
            prop_assert_eq!(b.bytes(), CheckedOps::new(ops.clone()).unwrap().bytes());
            let mut checked = b.into_checked();
            checked.compress_ahead(squeeze::STRONG_LEVEL);
            prop_assert_eq!(checked.len(), plain.len());
            let (z, _) = built.write_checked(NS, &key, &mut checked, now).unwrap();
            prop_assert_eq!(a.id, z.id);
            prop_assert_eq!(&a.bytes, &z.bytes);
        }
    }
}

/// A call whose batch is at least `push_min_bytes` (64 KiB) even compressed: `n` upserts of
/// 64 hex digits of blake3 each (`tag` makes calls differ).
fn large_call(tag: u64, n: u64) -> Vec<Op> {
    (0..n)
        .map(|i| {
            let v = blake3::hash(&(tag * 1_000_000 + i).to_le_bytes())
                .to_hex()
                .to_string();
            upsert(&format!("r{tag}-{i}"), "v", v)
        })
        .collect()
}

/// Sends and publishes in `actions`: (peers sent `Batches`, peers sent `Announce`, publishes).
fn pushes(actions: &[Action<usize>]) -> (Vec<usize>, Vec<usize>, usize) {
    let (mut pushed, mut told, mut published) = (Vec::new(), Vec::new(), 0);
    for a in actions {
        match a {
            Action::Send {
                peer,
                msg: SyncMessage::Batches { .. },
            } => pushed.push(*peer),
            Action::Send {
                peer,
                msg: SyncMessage::Announce { .. },
            } => told.push(*peer),
            Action::Publish { .. } => published += 1,
            _ => {}
        }
    }
    (pushed, told, published)
}

/// Large batches in a public namespace are pushed along a tree per author, never gossiped.
/// An author's first floods the links (every engine pushes it on) and each engine that
/// receives it twice `Prune`s that link for that author; the author's next ones then reach
/// every engine with no copy received twice and no fetch, before any tick. Another author's
/// first floods again (its own tree), and then both trees carry their authors' batches. A
/// small batch is still gossiped.
#[test]
fn large_batches_are_pushed_along_a_tree_instead_of_gossiped() {
    let mut net = Net::new(5, test_config());
    net.gossip = false;
    net.connect_all();
    net.run_idle();
    let dups = |net: &Net| -> u64 {
        (0..5)
            .map(|i| net.nodes[i].engine.stats().batches_duplicate)
            .sum()
    };

    net.now_ms += 1;
    let key = net.nodes[0].key.clone();
    let (big, acts) = net.nodes[0]
        .engine
        .write(NS, &key, large_call(1, 3_000), net.now_ms)
        .unwrap();
    assert!(big.bytes.len() >= blazedb_protocol::limits::PUSH_MIN_BYTES);
    let (mut pushed, told, published) = pushes(&acts);
    assert_eq!(published, 0, "a large batch is not gossiped");
    pushed.sort();
    assert_eq!(pushed, vec![1, 2, 3, 4], "pushed to every peer at first");
    assert!(told.is_empty(), "{told:?}");
    net.apply(0, acts);
    // No tick: only the pushes and what they set off.
    net.run_idle();
    assert!(net.rejects.is_empty(), "rejects: {:?}", net.rejects);
    for i in 1..5 {
        assert_eq!(net.vector(i).get(&net.author(0)), Some(&1), "engine {i}");
    }
    let flood = dups(&net);
    assert!(flood > 0, "the first large batch floods the links");

    // The writer's tree carries its next one.
    net.write(0, large_call(2, 3_000));
    net.run_idle();
    for i in 0..5 {
        assert_eq!(net.vector(i).get(&net.author(0)), Some(&2), "engine {i}");
    }
    assert_eq!(
        dups(&net),
        flood,
        "a copy received twice after the tree formed"
    );
    // Another writer's first large batch floods its own tree; then its next one, and the
    // first writer's, each reach every engine once.
    net.write(2, large_call(3, 3_000));
    net.run_idle();
    let second_flood = dups(&net);
    assert!(second_flood > flood, "each author's tree forms by a flood");
    net.write(2, large_call(4, 3_000));
    net.write(0, large_call(5, 3_000));
    net.run_idle();
    for i in 0..5 {
        assert_eq!(net.vector(i).get(&net.author(0)), Some(&3), "engine {i}");
        assert_eq!(net.vector(i).get(&net.author(2)), Some(&2), "engine {i}");
    }
    assert_eq!(
        dups(&net),
        second_flood,
        "a copy received twice after both trees formed"
    );
    assert!(net.fetches.is_empty(), "fetches: {:?}", net.fetches);
    // The late announcements over the pruned links go out and change nothing.
    net.advance(1_000);
    assert!(net.fetches.is_empty(), "fetches: {:?}", net.fetches);

    // A small batch is gossiped as before.
    net.now_ms += 1;
    let (small, acts) = net.nodes[0]
        .engine
        .write(NS, &key, vec![upsert("k", "f", 1)], net.now_ms)
        .unwrap();
    assert!(small.bytes.len() < 1024);
    assert_eq!(
        pushes(&acts),
        (vec![], vec![], 1),
        "a small batch is gossiped"
    );
    net.gossip = true;
    net.apply(0, acts);
    net.run_idle();
    net.assert_converged(&[0, 1, 2, 3, 4]);
}

/// When the tree breaks, a pruned link carries the batch: its late announcement makes the
/// engine cut off fetch it, and `Graft` the link back into the tree, so the next large batch
/// is pushed to it with no announcement or fetch.
#[test]
fn a_pruned_link_is_grafted_back_when_the_tree_breaks() {
    let mut net = Net::new(3, test_config());
    net.gossip = false;
    net.connect_all();
    net.run_idle();
    net.advance(100);
    // The first batch floods; 1 and 2 each receive it twice and prune the link between them.
    net.write(0, large_call(1, 3_000));
    net.run_idle();
    // The tree (0 – 1, 0 – 2) loses 0 – 2: only the pruned link 1 – 2 reaches 2.
    net.disconnect(0, 2);
    net.write(0, large_call(2, 3_000));
    net.run_idle();
    assert_eq!(
        net.vector(2).get(&net.author(0)),
        Some(&1),
        "pushed over a pruned link"
    );
    net.advance(400);
    assert_eq!(
        net.vector(2).get(&net.author(0)),
        Some(&2),
        "never announced"
    );
    assert_eq!(net.fetches.len(), 1, "fetches: {:?}", net.fetches);
    // Grafted: the next one is pushed from 1 to 2 at once.
    net.write(0, large_call(3, 3_000));
    net.run_idle();
    assert_eq!(
        net.vector(2).get(&net.author(0)),
        Some(&3),
        "the link was not grafted"
    );
    assert_eq!(net.fetches.len(), 1, "fetches: {:?}", net.fetches);
    assert!(net.rejects.is_empty(), "rejects: {:?}", net.rejects);
}

/// A peer connected only to the writer (a star around it, fanout 1) is not pushed to and
/// hears from no one else: the writer's own announcement reaches it after
/// `announce_delay_ms`, at a tick, and it fetches the batch from the writer.
#[test]
fn a_peer_only_the_writer_reaches_gets_its_late_announcement() {
    let cfg = EngineConfig {
        push_fanout: 1,
        announce_delay_ms: 300,
        ..test_config()
    };
    let mut net = Net::new(3, cfg);
    net.gossip = false;
    net.connect(0, 1);
    net.connect(0, 2);
    net.run_idle();
    // The first anti-entropy round goes by (the next is a second away).
    net.advance(100);
    net.write(0, large_call(2, 3_000));
    net.run_idle();
    let holding = |net: &Net| {
        (1..3)
            .filter(|i| net.vector(*i).contains_key(&net.author(0)))
            .count()
    };
    assert_eq!(
        holding(&net),
        1,
        "only the pushed peer holds it before the delay"
    );
    assert!(net.nodes[0].engine.next_deadline_ms() <= net.now_ms + 300);
    net.advance(200);
    assert_eq!(holding(&net), 1, "announced before announce_delay_ms");
    // Due at the write + 300 ms: sent at the next tick, then announce, fetch, answer.
    net.advance(300);
    assert_eq!(holding(&net), 2, "the late announcement never came");
    assert!(net.rejects.is_empty(), "rejects: {:?}", net.rejects);
    net.assert_converged(&[0, 1, 2]);
}

/// Large batches cross a line of peers (0 – 1 – 2 – 3) without gossip and before any
/// anti-entropy round: each hop pushes what it stored on to the next.
#[test]
fn large_batches_cross_a_line_of_peers() {
    let mut net = Net::new(4, test_config());
    net.gossip = false;
    for i in 0..3 {
        net.connect(i, i + 1);
    }
    net.run_idle();
    for tag in 0..3 {
        net.write(0, large_call(tag, 3_000));
    }
    // No time passes for ticks: only the pushes.
    net.run_idle();
    assert!(net.rejects.is_empty(), "rejects: {:?}", net.rejects);
    for i in 1..4 {
        assert_eq!(net.vector(i).get(&net.author(0)), Some(&3), "engine {i}");
    }
    assert!(net.fetches.is_empty(), "fetches: {:?}", net.fetches);
    net.assert_converged(&[0, 1, 2, 3]);
    for i in 0..4 {
        assert_eq!(
            net.nodes[i].engine.stats().batches_duplicate,
            0,
            "engine {i}"
        );
    }
}

/// An `Announce` adds to what a peer is known to hold, within the same bound as `Have`: a
/// peer announcing more authors than a `Have` may carry is dropped.
#[test]
fn announcing_too_many_authors_drops_the_peer() {
    let mut e = Engine::<usize>::new(test_config());
    e.join(NS);
    let mut rejected = None;
    for i in 0..=blazedb_protocol::limits::MAX_HAVE_AUTHORS as u64 {
        let mut author = [0u8; 32];
        author[..8].copy_from_slice(&i.to_le_bytes());
        let msg = SyncMessage::Announce {
            ns: NS.into(),
            author,
            seq: 0,
        };
        let acts = e.handle_message(7, msg, 1_000);
        if acts
            .iter()
            .any(|a| matches!(a, Action::Reject { peer: 7, .. }))
        {
            rejected = Some(i);
            break;
        }
    }
    assert_eq!(
        rejected,
        Some(blazedb_protocol::limits::MAX_HAVE_AUTHORS as u64)
    );
}

/// The wire form of `Announce` (CBOR, as the node's request-response codec writes it through
/// serde) is pinned: a renamed field or variant would break peers and shows up here.
#[test]
fn announce_has_a_pinned_cbor_form() {
    let msg = SyncMessage::Announce {
        ns: "default".into(),
        author: [0xab; 32],
        seq: 300,
    };
    let want = format!(
        "a1{}a3{}{}{}58 20{}{}19012c",
        "68416e6e6f756e6365", // "Announce"
        "626e73",             // "ns"
        "6764656661756c74",   // "default"
        "66617574686f72",     // "author"
        "ab".repeat(32),
        "63736571", // "seq"
    )
    .replace(' ', "");
    assert_pinned_cbor(&msg, &want);
}

/// `msg` is written as the CBOR `want_hex` (as the node's request-response codec writes it
/// through serde), and read back the same.
fn assert_pinned_cbor(msg: &SyncMessage, want_hex: &str) {
    let mut bytes = Vec::new();
    ciborium::into_writer(msg, &mut bytes).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, want_hex);
    let back: SyncMessage = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(&back, msg);
}

/// `Prune` and `Graft` name the author whose push tree they change (pinned wire form, as for
/// `Announce`).
#[test]
fn prune_and_graft_have_a_pinned_cbor_form() {
    for (msg, name) in [
        (
            SyncMessage::Prune {
                ns: "default".into(),
                author: [0xab; 32],
            },
            "655072756e65", // "Prune"
        ),
        (
            SyncMessage::Graft {
                ns: "default".into(),
                author: [0xab; 32],
            },
            "654772616674", // "Graft"
        ),
    ] {
        let want = format!(
            "a1{name}a2{}{}{}5820{}",
            "626e73",           // "ns"
            "6764656661756c74", // "default"
            "66617574686f72",   // "author"
            "ab".repeat(32),
        );
        assert_pinned_cbor(&msg, &want);
    }
}

/// A `Fetch` without a byte cap is written exactly as before the cap existed (four fields), so
/// peers that predate it read it; one with a cap adds `max_bytes`, and peers that predate it
/// skip the unknown field and read the rest.
#[test]
fn fetch_without_a_byte_cap_keeps_its_pinned_cbor_form() {
    let fetch = |max_bytes| SyncMessage::Fetch {
        ns: "default".into(),
        author: [0xab; 32],
        from_seq: 1,
        limit: 16,
        max_bytes,
    };
    let want = format!(
        "a1{}a4{}{}{}5820{}{}01{}10",
        "654665746368",     // "Fetch"
        "626e73",           // "ns"
        "6764656661756c74", // "default"
        "66617574686f72",   // "author"
        "ab".repeat(32),
        "6866726f6d5f736571", // "from_seq"
        "656c696d6974",       // "limit"
    );
    assert_pinned_cbor(&fetch(None), &want);
    let capped = fetch(Some(262_144));
    let mut bytes = Vec::new();
    ciborium::into_writer(&capped, &mut bytes).unwrap();
    let back: SyncMessage = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(back, capped);
    // What a peer without the field reads it as: the same fetch, uncapped.
    #[derive(serde::Deserialize, Debug, PartialEq)]
    enum Old {
        Fetch {
            ns: String,
            #[serde(with = "serde_bytes")]
            author: [u8; 32],
            from_seq: u64,
            limit: u32,
        },
    }
    let old: Old = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(
        old,
        Old::Fetch {
            ns: "default".into(),
            author: [0xab; 32],
            from_seq: 1,
            limit: 16
        }
    );
}
