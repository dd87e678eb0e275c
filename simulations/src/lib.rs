//! A deterministic discrete-event simulator of BlazeDB meshes, driving the real sync engine.
//!
//! Every simulated node is a real [`blazedb_protocol::Engine`] with a real ed25519 key: the
//! batches are really sealed, signed, verified, chain-checked and merged. What is simulated is
//! everything the engine leaves to its shell:
//!
//! - **Time**: virtual milliseconds. An event queue ordered by `(time, sequence)` holds message
//!   deliveries, writes, engine ticks and fault changes; nothing reads the wall clock.
//! - **Network**: a random graph where every node links to at least `degree` others (a ring
//!   first, so the graph is connected); each link has a fixed latency drawn from
//!   `latency_ms`; messages can be lost (`loss`) or cut by a partition (messages crossing the
//!   cut are dropped while it lasts; anti-entropy heals afterwards).
//! - **Gossip**: modelled as flooding over the links, as gossipsub does with flood publishing
//!   and a mesh made of all links: a node relays a batch to all its other neighbours when the
//!   engine accepts it, and drops further copies (counted as duplicates). Real gossipsub keeps a
//!   mesh of D=6 and lazy-pushes to others, so its duplicate count is lower when the degree
//!   is above 6; the in-process real-mesh comparison is not built yet.
//! - **Storage**: each node's log is a set of batch ids; batch bytes are shared between nodes
//!   (one copy in memory), each distinct batch is verified once and handed to the engines as
//!   verified.
//!
//! Only ordered collections and a seeded RNG are used, so a seed replays exactly: the report
//! carries a hash of the whole event trace (tested: same seed, same hash).

use std::collections::BTreeMap;
use std::rc::Rc;

use rand::{Rng, SeedableRng};

use blazedb_identity::Keypair;
use blazedb_protocol::batch::BatchId;
use blazedb_protocol::{
    Action, Engine, EngineConfig, GossipVerdict, Hlc, Op, OpFields, RecordState, SyncMessage,
    VerifiedBatch,
};

const NS: &str = "default";

/// A partition: nodes `0..nodes*fraction` are cut off from the rest between `start_ms` and
/// `end_ms`.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Partition {
    /// When the cut starts.
    pub start_ms: u64,
    /// When it heals.
    pub end_ms: u64,
    /// Share of the nodes on the small side.
    pub fraction: f64,
    /// Only messages from the small side to the rest are cut (the other way still flows).
    #[serde(default)]
    pub one_way: bool,
}

/// One simulation.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Links per node (at least).
    pub degree: usize,
    /// RNG seed: same seed, same run.
    pub seed: u64,
    /// Link latency range, ms (uniform per link).
    pub latency_ms: (u64, u64),
    /// Probability that a message is lost.
    pub loss: f64,
    /// Nodes that write.
    pub writers: usize,
    /// Writes per writer.
    pub writes_per_writer: usize,
    /// Virtual time between a writer's writes, ms.
    pub write_interval_ms: u64,
    /// Ops per write (one batch per write).
    pub ops_per_write: usize,
    /// Distinct record keys written.
    pub keys: usize,
    /// A partition, if any.
    pub partition: Option<Partition>,
    /// Engine tick period, ms.
    pub tick_ms: u64,
    /// Anti-entropy period, ms.
    pub anti_entropy_ms: u64,
    /// Simulated time after the last write before the run stops, ms.
    pub settle_ms: u64,
    /// Link bandwidth, bytes per ms in each direction (`None` = unlimited): a message waits
    /// for the link to finish sending what was queued before it.
    pub bandwidth_bytes_per_ms: Option<u64>,
    /// Extra random delay per message, 0..=jitter ms (messages on a link can overtake).
    pub jitter_ms: u64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Nodes that crash and restart: volatile state is lost, the log survives.
    pub crashes: Vec<Crash>,
    /// Churn: every `every_ms` a random node (never a writer) crashes for `down_ms`.
    pub churn: Option<Churn>,
    /// An explicit topology (undirected links); overrides `topology` when not empty.
    pub edges: Vec<(usize, usize)>,
    /// Shape of the generated topology.
    pub topology: Topology,
    /// Bytes of random letters each upsert also carries (field `v`; 0 = none): bulk writes
    /// whose batches do not compress away, so large ones go around gossip as on real nodes.
    pub value_bytes: usize,
    /// Gossip every batch, large ones too (the engine's `push_min_bytes` at `usize::MAX`): the
    /// baseline for the push tree.
    pub gossip_large: bool,
}

impl SimConfig {
    /// The engine settings every simulated node runs with.
    fn engine(&self) -> EngineConfig {
        EngineConfig {
            anti_entropy_interval_ms: self.anti_entropy_ms,
            push_min_bytes: match self.gossip_large {
                true => usize::MAX,
                false => EngineConfig::default().push_min_bytes,
            },
            ..EngineConfig::default()
        }
    }
}

/// How the simulator links nodes (every shape is connected).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Topology {
    /// A ring plus random links until every node has `degree` links.
    #[default]
    Random,
    /// Watts–Strogatz small world: a ring lattice of `degree` neighbours, long links rewired
    /// with probability `rewire`.
    SmallWorld {
        /// Rewiring probability.
        rewire: f64,
    },
    /// `clusters` groups, well connected inside (links use `latency_ms`), joined by `bridges`
    /// slow links per neighbouring pair of clusters (`inter_latency_ms`).
    Clusters {
        /// Number of clusters.
        clusters: usize,
        /// Links between neighbouring clusters.
        bridges: usize,
        /// Latency range of the links between clusters, ms.
        inter_latency_ms: (u64, u64),
    },
}

/// A node crash at `at_ms`, restarting `down_ms` later.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Crash {
    /// Node index.
    pub node: usize,
    /// When it crashes.
    pub at_ms: u64,
    /// How long it stays down.
    pub down_ms: u64,
}

/// Random crashes at a steady rate.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Churn {
    /// Period between crashes.
    pub every_ms: u64,
    /// How long each crashed node stays down.
    pub down_ms: u64,
    /// No crash starts after this time.
    pub until_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 100,
            degree: 6,
            seed: 1,
            latency_ms: (5, 50),
            loss: 0.0,
            writers: 5,
            writes_per_writer: 10,
            write_interval_ms: 100,
            ops_per_write: 10,
            keys: 50,
            partition: None,
            tick_ms: 100,
            anti_entropy_ms: 1_000,
            settle_ms: 60_000,
            bandwidth_bytes_per_ms: None,
            jitter_ms: 0,
            duplicate: 0.0,
            crashes: Vec::new(),
            churn: None,
            edges: Vec::new(),
            topology: Topology::Random,
            value_bytes: 0,
            gossip_large: false,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SimReport {
    /// Nodes simulated.
    pub nodes: usize,
    /// Batches written.
    pub batches: usize,
    /// Batches that reached every node.
    pub batches_everywhere: usize,
    /// Time until a batch is held by every node: median, ms.
    pub latency_p50_ms: u64,
    /// 90th percentile, ms.
    pub latency_p90_ms: u64,
    /// 99th percentile, ms.
    pub latency_p99_ms: u64,
    /// Maximum, ms.
    pub latency_max_ms: u64,
    /// Redundant gossip deliveries per batch (copies received beyond the first, all nodes).
    pub duplicates_per_batch: f64,
    /// Messages sent (gossip + sync).
    pub messages: u64,
    /// Bytes sent (batch bytes + approximate sync message sizes).
    pub bytes: u64,
    /// Batch bytes on the wire per op written.
    pub bytes_per_op: f64,
    /// Every node holds the same batches and the same records at the end.
    pub converged: bool,
    /// Batches rejected by any engine (must be 0: nobody is malicious here).
    pub rejected: u64,
    /// Time from the partition healing until all nodes held every batch, ms.
    pub heal_to_converged_ms: Option<u64>,
    /// Virtual time simulated, ms.
    pub sim_time_ms: u64,
    /// Node restarts after crashes.
    pub restarts: u64,
    /// Mean share of the nodes each batch reached by the end (1.0 = everyone got everything).
    #[serde(default)]
    pub reach: f64,
    /// After a restart, time until the node held every batch written before it restarted
    /// (median and max over restarts, ms).
    #[serde(default)]
    pub rejoin_catch_up_ms: Option<(u64, u64)>,
    /// Per batch, the time until every node held it (ms), ascending (for the latency CDF).
    #[serde(default)]
    pub latencies_ms: Vec<u64>,
    /// Over time: share of all (batch, node) deliveries done, and bytes sent per bucket.
    #[serde(default)]
    pub timeline: Vec<TimelinePoint>,
    /// Hash of the event trace (FNV-1a 64): equal for equal seeds.
    pub trace_hash: u64,
}

/// One bucket of the run's timeline.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimelinePoint {
    /// Bucket start, virtual ms.
    pub t_ms: u64,
    /// Share of all (batch, node) deliveries done by the end of the bucket.
    pub delivered: f64,
    /// Bytes sent during the bucket.
    pub bytes: u64,
}

/// Timeline resolution, virtual ms.
const BUCKET_MS: u64 = 10;

#[derive(Clone, Debug)]
enum Msg {
    Gossip(Rc<VerifiedBatch>),
    Sync(SyncMessage),
}

#[derive(Clone, Debug)]
enum Event {
    Deliver { from: usize, to: usize, msg: Msg },
    Write { node: usize, n: usize },
    Tick { node: usize },
    Crash { node: usize, down_ms: u64 },
    Restart { node: usize },
}

struct Node {
    engine: Engine<usize>,
    key: Keypair,
    links: BTreeMap<usize, u64>,
    /// (author, seq) → batch id, the node's log.
    log: BTreeMap<([u8; 32], u64), BatchId>,
    /// The batches the node stored, in the order it stored them. Its records are these
    /// applied in this order ([`Sim::records_of`]): built at the end, one node at a time,
    /// instead of kept for every node throughout (200 nodes each holding bulk-200's 20,000
    /// records as owned states took 2 GB).
    arrivals: Vec<BatchId>,
}

struct Sim {
    cfg: SimConfig,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: Vec<Node>,
    rng: rand::rngs::StdRng,
    batches: BTreeMap<BatchId, Rc<VerifiedBatch>>,
    written_at: BTreeMap<BatchId, u64>,
    holders: BTreeMap<BatchId, (usize, u64)>,
    messages: u64,
    bytes: u64,
    duplicates: u64,
    rejected: u64,
    trace: u64,
    last_store_ms: u64,
    link_busy: BTreeMap<(usize, usize), u64>,
    store_times: Vec<u64>,
    bytes_by_bucket: BTreeMap<u64, u64>,
    down: BTreeMap<usize, u64>,
    restarts: u64,
    rejoins: Vec<(usize, u64, std::collections::BTreeSet<BatchId>)>,
    rejoin_done: Vec<u64>,
}

fn fnv(h: &mut u64, data: &[u8]) {
    for b in data {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

fn sync_size(m: &SyncMessage) -> u64 {
    match m {
        SyncMessage::Have { heads, .. } => 16 + 40 * heads.len() as u64,
        SyncMessage::Fetch { .. } | SyncMessage::Announce { .. } => 64,
        SyncMessage::Prune { .. } | SyncMessage::Graft { .. } => 48,
        SyncMessage::Present { chain, .. } => 16 + chain.len() as u64,
        SyncMessage::Revoked { batches, .. } | SyncMessage::Batches { batches, .. } => {
            48 + batches.iter().map(|b| b.len() as u64).sum::<u64>()
        }
        SyncMessage::FetchDicts { refs, .. } => 16 + 8 * refs.len() as u64,
        SyncMessage::Dicts { dicts } => 16 + dicts.iter().map(|d| d.len() as u64).sum::<u64>(),
    }
}

impl Sim {
    fn new(cfg: SimConfig) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let engine_cfg = cfg.engine();
        let mut nodes: Vec<Node> = (0..cfg.nodes)
            .map(|_| {
                let mut engine = Engine::new(engine_cfg.clone());
                engine.join(NS);
                Node {
                    engine,
                    key: Keypair::from_seed(rng.gen()),
                    links: BTreeMap::new(),
                    log: BTreeMap::new(),
                    arrivals: Vec::new(),
                }
            })
            .collect();
        // Topology (see `Topology`): always connected.
        let n = cfg.nodes;
        let (lo, hi) = cfg.latency_ms;
        let clusters = match cfg.topology {
            Topology::Clusters { clusters, .. } => clusters.max(1),
            _ => 1,
        };
        let cluster_of = |i: usize| i * clusters / n.max(1);
        let slow = match cfg.topology {
            Topology::Clusters {
                inter_latency_ms, ..
            } => inter_latency_ms,
            _ => (lo, hi),
        };
        let link = |a: usize, b: usize, nodes: &mut Vec<Node>, rng: &mut rand::rngs::StdRng| {
            if a != b && !nodes[a].links.contains_key(&b) {
                let (l, h) = if cluster_of(a) == cluster_of(b) {
                    (lo, hi)
                } else {
                    slow
                };
                let lat = rng.gen_range(l..=h.max(l));
                nodes[a].links.insert(b, lat);
                nodes[b].links.insert(a, lat);
            }
        };
        for (a, b) in cfg.edges.clone() {
            if a < n && b < n {
                link(a, b, &mut nodes, &mut rng);
            }
        }
        if n > 1 && cfg.edges.is_empty() {
            match cfg.topology {
                Topology::Random => {
                    for i in 0..n {
                        link(i, (i + 1) % n, &mut nodes, &mut rng);
                    }
                }
                Topology::SmallWorld { rewire } => {
                    // Watts–Strogatz: a ring lattice of `degree` neighbours, each "far" link
                    // rewired to a random node with probability `rewire` (the ring stays).
                    let k = (cfg.degree / 2).max(1);
                    for i in 0..n {
                        link(i, (i + 1) % n, &mut nodes, &mut rng);
                        for d in 2..=k {
                            let j = if rng.gen_bool(rewire.clamp(0.0, 1.0)) {
                                rng.gen_range(0..n)
                            } else {
                                (i + d) % n
                            };
                            link(i, j, &mut nodes, &mut rng);
                        }
                    }
                }
                Topology::Clusters { bridges, .. } => {
                    // A ring inside each cluster, random links inside it up to `degree`, and
                    // `bridges` slow links from each cluster to the next.
                    let members: Vec<Vec<usize>> = (0..clusters)
                        .map(|c| (0..n).filter(|i| cluster_of(*i) == c).collect())
                        .collect();
                    for m in &members {
                        for w in 0..m.len() {
                            link(m[w], m[(w + 1) % m.len()], &mut nodes, &mut rng);
                        }
                    }
                    for c in 0..clusters {
                        let (a, b) = (&members[c], &members[(c + 1) % clusters]);
                        for _ in 0..bridges.max(1) {
                            if !a.is_empty() && !b.is_empty() {
                                let (x, y) =
                                    (a[rng.gen_range(0..a.len())], b[rng.gen_range(0..b.len())]);
                                link(x, y, &mut nodes, &mut rng);
                            }
                        }
                    }
                }
            }
            if !matches!(cfg.topology, Topology::SmallWorld { .. }) {
                for i in 0..n {
                    let mut tries = 0;
                    while nodes[i].links.len() < cfg.degree.min(n - 1) && tries < 100 {
                        let j = rng.gen_range(0..n);
                        if cluster_of(i) == cluster_of(j) {
                            link(i, j, &mut nodes, &mut rng);
                        }
                        tries += 1;
                    }
                }
            }
        }
        let mut sim = Sim {
            cfg,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            rng,
            batches: BTreeMap::new(),
            written_at: BTreeMap::new(),
            holders: BTreeMap::new(),
            messages: 0,
            bytes: 0,
            duplicates: 0,
            rejected: 0,
            trace: 0xcbf2_9ce4_8422_2325,
            last_store_ms: 0,
            link_busy: BTreeMap::new(),
            store_times: Vec::new(),
            bytes_by_bucket: BTreeMap::new(),
            down: BTreeMap::new(),
            restarts: 0,
            rejoins: Vec::new(),
            rejoin_done: Vec::new(),
        };
        for c in sim.cfg.crashes.clone() {
            if c.node < n {
                sim.schedule(
                    c.at_ms,
                    Event::Crash {
                        node: c.node,
                        down_ms: c.down_ms,
                    },
                );
            }
        }
        if let Some(ch) = sim.cfg.churn.clone() {
            let mut t = ch.every_ms.max(1);
            while t <= ch.until_ms {
                let writers = sim.cfg.writers.min(n).max(1);
                let node = sim.rng.gen_range(0..n);
                // Writers stay up, so every write has a live author to fetch from.
                if node % (n / writers).max(1) != 0 || node / (n / writers).max(1) >= writers {
                    sim.schedule(
                        t,
                        Event::Crash {
                            node,
                            down_ms: ch.down_ms,
                        },
                    );
                }
                t += ch.every_ms.max(1);
            }
        }
        for i in 0..n {
            let peers: Vec<usize> = sim.nodes[i].links.keys().copied().collect();
            for p in peers {
                let key = *sim.nodes[p].key.public().as_bytes();
                let acts = sim.nodes[i].engine.peer_up_with_key(p, Some(key), 0);
                sim.run_actions(i, acts);
            }
            let offset = sim.rng.gen_range(0..sim.cfg.tick_ms.max(1));
            sim.schedule(offset, Event::Tick { node: i });
        }
        for w in 0..sim.cfg.writers.min(n) {
            let start = sim.rng.gen_range(0..sim.cfg.write_interval_ms.max(1));
            sim.schedule(
                start,
                Event::Write {
                    node: w * (n / sim.cfg.writers.min(n).max(1)),
                    n: 0,
                },
            );
        }
        sim
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn cut(&self, a: usize, b: usize, at: u64) -> bool {
        match &self.cfg.partition {
            Some(p) if at >= p.start_ms && at < p.end_ms => {
                let small = (self.cfg.nodes as f64 * p.fraction) as usize;
                if p.one_way {
                    a < small && b >= small
                } else {
                    (a < small) != (b < small)
                }
            }
            _ => false,
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let Some(lat) = self.nodes[from].links.get(&to).copied() else {
            return;
        };
        self.messages += 1;
        let sent = match &msg {
            Msg::Gossip(vb) => vb.bytes.len() as u64,
            Msg::Sync(m) => sync_size(m),
        };
        self.bytes += sent;
        *self
            .bytes_by_bucket
            .entry(self.now / BUCKET_MS)
            .or_insert(0) += sent;
        if self.cut(from, to, self.now) || (self.cfg.loss > 0.0 && self.rng.gen_bool(self.cfg.loss))
        {
            return;
        }
        let size = match &msg {
            Msg::Gossip(vb) => vb.bytes.len() as u64,
            Msg::Sync(m) => sync_size(m),
        };
        let mut depart = self.now;
        if let Some(bw) = self.cfg.bandwidth_bytes_per_ms {
            let busy = self.link_busy.entry((from, to)).or_insert(0);
            depart = (*busy).max(self.now) + size.div_ceil(bw.max(1));
            *busy = depart;
        }
        let jitter = match self.cfg.jitter_ms {
            0 => 0,
            j => self.rng.gen_range(0..=j),
        };
        let at = depart + lat + jitter;
        if self.cfg.duplicate > 0.0 && self.rng.gen_bool(self.cfg.duplicate) {
            self.schedule(
                at + 1,
                Event::Deliver {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
        self.schedule(at, Event::Deliver { from, to, msg });
    }

    fn run_actions(&mut self, node: usize, actions: Vec<Action<usize>>) {
        for a in actions {
            match a {
                Action::Send { peer, msg } => self.send(node, peer, Msg::Sync(msg)),
                Action::Publish { id, .. } => {
                    let vb = self.batches[&id].clone();
                    let peers: Vec<usize> = self.nodes[node].links.keys().copied().collect();
                    for p in peers {
                        self.send(node, p, Msg::Gossip(vb.clone()));
                    }
                }
                Action::Store(vb) => self.store(node, &vb),
                Action::Serve {
                    peer,
                    author,
                    from_seq,
                    limit,
                    max_bytes,
                    ..
                } => {
                    // As a node serves: at most `max_bytes`, but at least one batch.
                    let cap = max_bytes.map_or(usize::MAX, |b| b as usize);
                    let mut bytes = 0usize;
                    let batches: Vec<serde_bytes::ByteBuf> = self.nodes[node]
                        .log
                        .range((author, from_seq)..=(author, u64::MAX))
                        .take(limit as usize)
                        .map(|(_, id)| &self.batches[id].bytes)
                        .take_while(|b| {
                            let first = bytes == 0;
                            bytes += b.len();
                            first || bytes <= cap
                        })
                        .map(|b| serde_bytes::ByteBuf::from(b.clone()))
                        .collect();
                    let msg = SyncMessage::Batches {
                        ns: NS.into(),
                        author,
                        batches,
                    };
                    self.send(node, peer, Msg::Sync(msg));
                }
                Action::Reject { .. } => self.rejected += 1,
                // Simulated writers use no dictionaries, so none is ever asked for.
                Action::ServeRevocations { .. }
                | Action::Rebuild { .. }
                | Action::ServeDicts { .. } => {}
            }
        }
    }

    fn store(&mut self, node: usize, vb: &VerifiedBatch) {
        let n = &mut self.nodes[node];
        n.log.insert((vb.header.author, vb.header.seq), vb.id);
        n.arrivals.push(vb.id);
        self.batches
            .entry(vb.id)
            .or_insert_with(|| Rc::new(vb.clone()));
        let e = self.holders.entry(vb.id).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(self.now);
        self.last_store_ms = self.now;
        self.store_times.push(self.now);
        let now = self.now;
        let mut done = Vec::new();
        self.rejoins.retain_mut(|(n, t0, needed)| {
            if *n == node {
                needed.remove(&vb.id);
                if needed.is_empty() {
                    done.push(now - *t0);
                    return false;
                }
            }
            true
        });
        self.rejoin_done.extend(done);
    }

    /// A node's records: the batches it stored, applied in the order it stored them.
    fn records_of(&self, node: usize) -> BTreeMap<(String, String), RecordState> {
        let mut records: BTreeMap<(String, String), RecordState> = BTreeMap::new();
        for id in &self.nodes[node].arrivals {
            let vb = &self.batches[id];
            // Verified on arrival: the payload decodes (a failure would be a codec bug,
            // which the simulation exists to find).
            let view = vb.ops.view().expect("a verified batch's payload decodes");
            for op in view.ops() {
                records
                    .entry((view.collection(op).to_string(), view.key(op).to_string()))
                    .or_default()
                    .apply_view(view, op, vb.header.author);
            }
        }
        records
    }

    fn step(&mut self) -> bool {
        let Some(((at, _), ev)) = self.queue.pop_first() else {
            return false;
        };
        self.now = at;
        let mut h = self.trace;
        fnv(&mut h, &at.to_le_bytes());
        match ev {
            Event::Crash { node, down_ms } => {
                fnv(&mut h, &[4, node as u8, (node >> 8) as u8]);
                self.trace = h;
                if self.down.contains_key(&node) {
                    return true;
                }
                self.down.insert(node, self.now + down_ms);
                // Its neighbours see the connection drop.
                let peers: Vec<usize> = self.nodes[node].links.keys().copied().collect();
                for p in peers {
                    if !self.down.contains_key(&p) {
                        let acts = self.nodes[p].engine.peer_down(&node, self.now);
                        self.run_actions(p, acts);
                    }
                }
                let at = self.now + down_ms;
                self.schedule(at, Event::Restart { node });
            }
            Event::Restart { node } => {
                fnv(&mut h, &[5, node as u8, (node >> 8) as u8]);
                self.trace = h;
                self.down.remove(&node);
                self.restarts += 1;
                // Volatile state is gone: a fresh engine, restored from the node's log.
                let engine_cfg = self.cfg.engine();
                let mut engine = Engine::new(engine_cfg);
                engine.join(NS);
                let mut heads: BTreeMap<[u8; 32], (u64, BatchId)> = BTreeMap::new();
                for ((author, seq), id) in &self.nodes[node].log {
                    heads.insert(*author, (*seq, *id));
                }
                for (author, (seq, id)) in heads {
                    let hlc = self.batches[&id].header.hlc_max;
                    engine.load_head(NS, author, seq, id, hlc);
                }
                self.nodes[node].engine = engine;
                let held: std::collections::BTreeSet<BatchId> =
                    self.nodes[node].log.values().copied().collect();
                let needed: std::collections::BTreeSet<BatchId> = self
                    .written_at
                    .iter()
                    .filter(|(id, t)| **t <= self.now && !held.contains(*id))
                    .map(|(id, _)| *id)
                    .collect();
                if needed.is_empty() {
                    self.rejoin_done.push(0);
                } else {
                    self.rejoins.push((node, self.now, needed));
                }
                let peers: Vec<usize> = self.nodes[node].links.keys().copied().collect();
                for p in peers {
                    if self.down.contains_key(&p) {
                        continue;
                    }
                    let kp = *self.nodes[p].key.public().as_bytes();
                    let kn = *self.nodes[node].key.public().as_bytes();
                    let a = self.nodes[node]
                        .engine
                        .peer_up_with_key(p, Some(kp), self.now);
                    self.run_actions(node, a);
                    let b = self.nodes[p]
                        .engine
                        .peer_up_with_key(node, Some(kn), self.now);
                    self.run_actions(p, b);
                }
            }
            Event::Tick { node } if self.down.contains_key(&node) => {
                let next = self.now + self.cfg.tick_ms;
                self.schedule(next, Event::Tick { node });
            }
            Event::Deliver { to, .. } if self.down.contains_key(&to) => {}
            Event::Write { node, n } if self.down.contains_key(&node) => {
                let at = self.down[&node];
                self.schedule(at, Event::Write { node, n });
            }
            Event::Tick { node } => {
                fnv(&mut h, &[0, node as u8, (node >> 8) as u8]);
                self.trace = h;
                let acts = self.nodes[node].engine.tick(self.now);
                self.run_actions(node, acts);
                let next = self.now + self.cfg.tick_ms;
                self.schedule(next, Event::Tick { node });
            }
            Event::Write { node, n } => {
                fnv(&mut h, &[1, node as u8, n as u8]);
                self.trace = h;
                let ops: Vec<Op> = (0..self.cfg.ops_per_write)
                    .map(|i| {
                        let k = self.rng.gen_range(0..self.cfg.keys.max(1));
                        let mut fields: OpFields =
                            [("w".to_string(), serde_json::json!([node, n, i]))].into();
                        if self.cfg.value_bytes > 0 {
                            let v: String = (0..self.cfg.value_bytes)
                                .map(|_| self.rng.gen_range(b'a'..=b'z') as char)
                                .collect();
                            fields.insert("v".to_string(), v.into());
                        }
                        Op::Upsert {
                            collection: "sim".into(),
                            key: format!("k{k}"),
                            hlc: Hlc::ZERO,
                            fields,
                        }
                    })
                    .collect();
                let key = self.nodes[node].key.clone();
                let (vb, acts) = self.nodes[node]
                    .engine
                    .write(NS, &key, ops, self.now)
                    .expect("local write");
                self.batches.insert(vb.id, Rc::new(vb.clone()));
                self.written_at.insert(vb.id, self.now);
                self.run_actions(node, acts);
                if n + 1 < self.cfg.writes_per_writer {
                    let next = self.now + self.cfg.write_interval_ms;
                    self.schedule(next, Event::Write { node, n: n + 1 });
                }
            }
            Event::Deliver { from, to, msg } => {
                if self.cut(from, to, self.now) {
                    return true;
                }
                fnv(
                    &mut h,
                    &[2, from as u8, (from >> 8) as u8, to as u8, (to >> 8) as u8],
                );
                match msg {
                    Msg::Gossip(vb) => {
                        fnv(&mut h, &vb.id.0[..8]);
                        self.trace = h;
                        let (verdict, acts) = self.nodes[to].engine.handle_gossip_verified(
                            from,
                            NS,
                            (*vb).clone(),
                            self.now,
                        );
                        self.run_actions(to, acts);
                        match verdict {
                            GossipVerdict::Accept => {
                                let peers: Vec<usize> = self.nodes[to]
                                    .links
                                    .keys()
                                    .copied()
                                    .filter(|p| *p != from)
                                    .collect();
                                for p in peers {
                                    self.send(to, p, Msg::Gossip(vb.clone()));
                                }
                            }
                            GossipVerdict::Ignore => self.duplicates += 1,
                            GossipVerdict::Reject(_) => self.rejected += 1,
                        }
                    }
                    Msg::Sync(m) => {
                        fnv(&mut h, &[3, sync_size(&m) as u8]);
                        self.trace = h;
                        // Copies of batches it held that reach an engine as pushes or fetch
                        // answers count as duplicate deliveries too.
                        let held = self.nodes[to].engine.stats().batches_duplicate;
                        let acts = self.nodes[to].engine.handle_message(from, m, self.now);
                        self.duplicates += self.nodes[to].engine.stats().batches_duplicate - held;
                        self.run_actions(to, acts);
                    }
                }
            }
        }
        true
    }

    fn end_of_writes(&self) -> u64 {
        self.cfg.write_interval_ms * self.cfg.writes_per_writer as u64 + self.cfg.write_interval_ms
    }

    fn all_delivered(&self) -> bool {
        let n = self.cfg.nodes;
        self.written_at
            .keys()
            .all(|id| self.holders.get(id).is_some_and(|(c, _)| *c == n))
    }

    /// Runs until every write has happened, the partition (if any) has healed and every batch
    /// is everywhere — or until `settle_ms` after that point, whichever comes first.
    fn run(mut self) -> SimReport {
        self.run_with(&mut |_, _| {})
    }

    fn run_with(&mut self, progress: &mut dyn FnMut(u64, u64)) -> SimReport {
        let mut quiet = self.end_of_writes();
        if let Some(p) = &self.cfg.partition {
            quiet = quiet.max(p.end_ms);
        }
        let stop = quiet + self.cfg.settle_ms;
        let mut now = 0;
        let mut events: u64 = 0;
        while let Some(((t, _), _)) = self.queue.first_key_value() {
            if *t > stop {
                break;
            }
            now = *t;
            if now >= quiet && self.all_delivered() {
                break;
            }
            self.step();
            events += 1;
            if events.is_multiple_of(4096) {
                progress(now, stop);
            }
        }
        self.report(now.max(1))
    }

    fn report(&self, stop: u64) -> SimReport {
        let n = self.cfg.nodes;
        let mut lat: Vec<u64> = self
            .written_at
            .iter()
            .filter_map(|(id, w)| {
                let (count, last) = self.holders.get(id)?;
                (*count == n).then(|| last.saturating_sub(*w))
            })
            .collect();
        lat.sort_unstable();
        let pct = |p: f64| -> u64 {
            if lat.is_empty() {
                return 0;
            }
            lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1]
        };
        let first = &self.nodes[0];
        let converged =
            self.nodes.iter().all(|node| {
                node.log == first.log && node.engine.vector(NS) == first.engine.vector(NS)
            }) && {
                // Records last, one node's at a time: each node's batches applied in the order
                // it stored them, so arrival orders that differ must still merge alike.
                let first_records = self.records_of(0);
                (1..n).all(|i| self.records_of(i) == first_records)
            };
        let ops_written = (self.written_at.len() * self.cfg.ops_per_write).max(1) as f64;
        let heal_to_converged_ms = self.cfg.partition.as_ref().and_then(|p| {
            (lat.len() == self.written_at.len())
                .then(|| self.last_store_ms.saturating_sub(p.end_ms))
        });
        // The timeline, at most ~200 points.
        let total = (self.written_at.len() * n).max(1) as f64;
        let span = stop.max(1);
        let step = (span / 200).max(BUCKET_MS) / BUCKET_MS * BUCKET_MS;
        let mut times = self.store_times.clone();
        times.sort_unstable();
        let mut timeline = Vec::new();
        let mut t = 0;
        while t <= span {
            let end = t + step;
            let delivered = times.partition_point(|x| *x < end) as f64 / total;
            let bytes: u64 = self
                .bytes_by_bucket
                .range(t / BUCKET_MS..end / BUCKET_MS)
                .map(|(_, b)| *b)
                .sum();
            timeline.push(TimelinePoint {
                t_ms: t,
                delivered,
                bytes,
            });
            t = end;
        }
        let reach = if self.written_at.is_empty() {
            1.0
        } else {
            self.written_at
                .keys()
                .map(|id| self.holders.get(id).map_or(0, |(c, _)| *c) as f64 / n as f64)
                .sum::<f64>()
                / self.written_at.len() as f64
        };
        let rejoin_catch_up_ms = if self.rejoin_done.is_empty() {
            None
        } else {
            let mut d = self.rejoin_done.clone();
            d.sort_unstable();
            Some((d[d.len() / 2], d[d.len() - 1]))
        };
        SimReport {
            reach,
            rejoin_catch_up_ms,
            latencies_ms: lat.clone(),
            timeline,
            nodes: n,
            batches: self.written_at.len(),
            batches_everywhere: lat.len(),
            latency_p50_ms: pct(0.50),
            latency_p90_ms: pct(0.90),
            latency_p99_ms: pct(0.99),
            latency_max_ms: lat.last().copied().unwrap_or(0),
            duplicates_per_batch: self.duplicates as f64 / self.written_at.len().max(1) as f64,
            messages: self.messages,
            bytes: self.bytes,
            bytes_per_op: self.bytes as f64 / ops_written,
            converged,
            rejected: self.rejected,
            heal_to_converged_ms,
            sim_time_ms: stop,
            restarts: self.restarts,
            trace_hash: self.trace,
        }
    }
}

/// Runs one simulation to the end and reports.
pub fn run(cfg: SimConfig) -> SimReport {
    Sim::new(cfg).run()
}

/// [`run`], calling `progress(virtual_now_ms, virtual_stop_ms)` every few thousand events.
pub fn run_with_progress(cfg: SimConfig, progress: &mut dyn FnMut(u64, u64)) -> SimReport {
    Sim::new(cfg).run_with(progress)
}

/// Safety invariants of a report: everything converged, nothing was rejected, every batch
/// reached every node.
pub fn check_invariants(r: &SimReport) -> Result<(), String> {
    if !r.converged {
        return Err("replicas did not converge to identical logs and records".into());
    }
    if r.rejected != 0 {
        return Err(format!("{} batches rejected in an honest mesh", r.rejected));
    }
    if r.batches_everywhere != r.batches {
        return Err(format!(
            "{} of {} batches reached every node",
            r.batches_everywhere, r.batches
        ));
    }
    Ok(())
}

/// Plots of a report, as SVG files in `dir`: the latency CDF, convergence over time and
/// bandwidth over time. Returns the paths written.
pub fn write_plots(
    r: &SimReport,
    dir: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>, String> {
    use plotters::prelude::*;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut out = Vec::new();

    let path = dir.join("latency-cdf.svg");
    {
        let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let max = r.latencies_ms.last().copied().unwrap_or(1).max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("time until all {} nodes hold a write", r.nodes),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..max * 1.05, 0f64..1.0)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("share of writes")
            .draw()
            .map_err(|e| err(&e))?;
        let n = r.latencies_ms.len().max(1) as f64;
        let pts: Vec<(f64, f64)> = r
            .latencies_ms
            .iter()
            .enumerate()
            .map(|(i, l)| (*l as f64, (i + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, &BLUE))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    out.push(path);

    let path = dir.join("convergence.svg");
    {
        let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let tmax = r.timeline.last().map_or(1, |p| p.t_ms).max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption("deliveries done over time", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..tmax, 0f64..1.0)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("virtual ms")
            .y_desc("share of (batch, node)")
            .draw()
            .map_err(|e| err(&e))?;
        let pts: Vec<(f64, f64)> = r
            .timeline
            .iter()
            .map(|p| (p.t_ms as f64, p.delivered))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, &GREEN))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    out.push(path);

    let path = dir.join("bandwidth.svg");
    {
        let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let tmax = r.timeline.last().map_or(1, |p| p.t_ms).max(1) as f64;
        let step = r.timeline.get(1).map_or(1, |p| p.t_ms).max(1) as f64;
        let bmax = r.timeline.iter().map(|p| p.bytes).max().unwrap_or(1).max(1) as f64
            / 1e6
            / (step / 1e3);
        let mut chart = ChartBuilder::on(&root)
            .caption("bytes sent, whole mesh", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..tmax, 0f64..bmax * 1.05)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("virtual ms")
            .y_desc("MB/s")
            .draw()
            .map_err(|e| err(&e))?;
        let pts: Vec<(f64, f64)> = r
            .timeline
            .iter()
            .map(|p| (p.t_ms as f64, p.bytes as f64 / 1e6 / (step / 1e3)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, &RED))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    out.push(path);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> SimConfig {
        SimConfig {
            nodes: 30,
            writers: 3,
            writes_per_writer: 5,
            seed,
            ..SimConfig::default()
        }
    }

    #[test]
    fn same_seed_replays_exactly() {
        let a = run(small(7));
        let b = run(small(7));
        assert_eq!(a, b);
        let c = run(small(8));
        assert_ne!(a.trace_hash, c.trace_hash, "different seeds, same trace");
    }

    /// Records are rebuilt at the end from each node's arrivals, in its own order: arrival
    /// orders differ between nodes and still merge alike, and a node whose records differ
    /// (one stored batch taken out of what it applies) is reported as not converged.
    #[test]
    fn records_are_checked_from_each_nodes_arrival_order() {
        let mut sim = Sim::new(small(1));
        let r = sim.run_with(&mut |_, _| {});
        check_invariants(&r).unwrap();
        let orders: std::collections::BTreeSet<&Vec<BatchId>> =
            sim.nodes.iter().map(|n| &n.arrivals).collect();
        assert!(
            orders.len() > 1,
            "every node stored the batches in one order"
        );
        let all = sim.records_of(0);
        assert!(!all.is_empty());
        // Leave out the first of node 1's batches whose absence changes its records.
        let arrivals = sim.nodes[1].arrivals.clone();
        let left_out = (0..arrivals.len()).find(|&i| {
            let mut fewer = arrivals.clone();
            fewer.remove(i);
            sim.nodes[1].arrivals = fewer;
            sim.records_of(1) != all
        });
        assert!(left_out.is_some(), "no batch changes node 1's records");
        let after = sim.report(r.sim_time_ms);
        assert!(
            !after.converged,
            "a node missing a batch's records converged"
        );
    }

    #[test]
    fn mesh_converges_and_reports_dissemination() {
        let r = run(small(1));
        check_invariants(&r).unwrap();
        assert_eq!(r.batches, 15);
        assert!(r.latency_max_ms >= r.latency_p50_ms);
        assert!(r.latency_p50_ms > 0);
        assert!(
            r.duplicates_per_batch > 0.0,
            "flooding over a graph must see duplicates"
        );
    }

    #[test]
    fn partition_heals_through_anti_entropy() {
        let cfg = SimConfig {
            nodes: 50,
            writers: 4,
            writes_per_writer: 10,
            partition: Some(Partition {
                start_ms: 0,
                end_ms: 3_000,
                fraction: 0.3,
                one_way: false,
            }),
            loss: 0.01,
            seed: 3,
            ..SimConfig::default()
        };
        let r = run(cfg);
        check_invariants(&r).unwrap();
        assert!(r.heal_to_converged_ms.is_some());
    }

    #[test]
    fn lossy_links_still_converge() {
        for seed in 0..5 {
            let r = run(SimConfig {
                loss: 0.1,
                ..small(100 + seed)
            });
            check_invariants(&r)
                .map_err(|e| format!("seed {seed}: {e}"))
                .unwrap();
        }
    }

    #[test]
    fn faults_converge_and_replay() {
        let cfg = SimConfig {
            nodes: 40,
            writers: 4,
            writes_per_writer: 8,
            jitter_ms: 30,
            duplicate: 0.05,
            bandwidth_bytes_per_ms: Some(200),
            partition: Some(Partition {
                start_ms: 200,
                end_ms: 1_500,
                fraction: 0.3,
                one_way: true,
            }),
            crashes: vec![Crash {
                node: 7,
                at_ms: 300,
                down_ms: 2_000,
            }],
            churn: Some(Churn {
                every_ms: 400,
                down_ms: 700,
                until_ms: 3_000,
            }),
            seed: 11,
            ..SimConfig::default()
        };
        let r = run(cfg.clone());
        check_invariants(&r).unwrap();
        assert!(r.restarts >= 2, "crashes did not happen: {}", r.restarts);
        assert_eq!(run(cfg), r, "faulty runs must replay exactly too");
    }

    #[test]
    fn small_world_and_clustered_topologies_converge() {
        for topology in [
            Topology::SmallWorld { rewire: 0.2 },
            Topology::Clusters {
                clusters: 4,
                bridges: 2,
                inter_latency_ms: (80, 120),
            },
        ] {
            let cfg = SimConfig {
                nodes: 60,
                writers: 3,
                writes_per_writer: 5,
                topology: topology.clone(),
                crashes: vec![Crash {
                    node: 5,
                    at_ms: 100,
                    down_ms: 1_000,
                }],
                ..SimConfig::default()
            };
            let r = run(cfg);
            check_invariants(&r)
                .map_err(|e| format!("{topology:?}: {e}"))
                .unwrap();
            assert!((r.reach - 1.0).abs() < 1e-9);
            assert!(
                r.rejoin_catch_up_ms.is_some(),
                "{topology:?}: the crash was not measured"
            );
        }
    }

    /// Bulk writes (batches past 64 KiB) reach every node of a 40-node mesh around gossip,
    /// pushed along a tree per writer: only each writer's first floods the links, so over
    /// twelve writes from two writers a node receives a few times fewer copies than when
    /// every write is gossiped (flooded), at under half the bytes. Also with a crash.
    #[test]
    fn bulk_writes_go_around_gossip_along_a_tree() {
        let bulk = |gossip_large: bool| SimConfig {
            nodes: 40,
            writers: 2,
            writes_per_writer: 6,
            ops_per_write: 2_000,
            keys: 10_000,
            value_bytes: 48,
            latency_ms: (1, 5),
            gossip_large,
            crashes: vec![Crash {
                node: 7,
                at_ms: 50,
                down_ms: 500,
            }],
            ..SimConfig::default()
        };
        let pushed = run(bulk(false));
        check_invariants(&pushed).unwrap();
        let gossiped = run(bulk(true));
        check_invariants(&gossiped).unwrap();
        assert_eq!(pushed.batches_everywhere, 12);
        assert!(
            pushed.duplicates_per_batch * 3.0 < gossiped.duplicates_per_batch,
            "duplicates per batch: pushed {} gossiped {}",
            pushed.duplicates_per_batch,
            gossiped.duplicates_per_batch
        );
        assert!(
            pushed.bytes * 2 < gossiped.bytes,
            "bytes: pushed {} gossiped {}",
            pushed.bytes,
            gossiped.bytes
        );
    }
}
