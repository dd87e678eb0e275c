//! Memory stays bounded under a writer that outpaces the network.
//!
//! Node B reaches node A only through a TCP proxy on loopback that stands for B's network
//! link: first it stops carrying bytes altogether (B's reading paused, the kernel buffers
//! fill), then it carries a trickle. Meanwhile A is written to as fast as it takes writes: a
//! burst of more concurrent writers than the command channel holds, then writers in a loop
//! producing more batches than the materializer and the link keep up with, and writes into an
//! owned namespace B reads, each pushed to B as a sync request. Asserted:
//!
//! - every write at A succeeds (slowed by backpressure, never failed);
//! - A's queues stay within their documented bounds the whole time (sampled, and the
//!   high-water marks A keeps): command channel ≤ 256, materializer jobs ≤ 64 (+1 being
//!   picked up), unanswered sync requests per peer ≤ 32, gossip send queue ≤ 64 (gossipsub
//!   samples it into buckets 50 wide: no sample above the bucket that holds 64);
//! - what does not fit is dropped, not buffered: A refused gossip publishes to B's full queue
//!   and dropped pushes past 32 unanswered sync requests (B catches up by fetching);
//! - once the link is open again, B converges to exactly A's state (heads, counts, records).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use blazedb_identity::PublicKey;
use blazedb_node::node::{COMMAND_CAP, SYNC_INFLIGHT_MAX};
use blazedb_node::{materializer, net, NodeHandle, QueueDepths};
use blazedb_protocol::capability::Rights;
use blazedb_protocol::Op;
use blazedb_tests::{eventually, obj, scrape_metrics, start_node, wait_peers};
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// What the link between B and A lets through.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Gate {
    /// Nothing: the proxy stops reading, so senders' socket buffers fill.
    Stopped,
    /// About this many bytes per second, each way.
    Throttled(u64),
    /// As fast as loopback goes.
    Open,
}

/// Socket buffers of the proxy, kept small so a stopped link backs up at once.
const PROXY_SOCKET_BUFFER: u32 = 64 * 1024;

/// B's network link to A: a loopback TCP proxy whose [`Gate`] the test sets.
struct Link {
    addr: Multiaddr,
    gate: watch::Sender<Gate>,
}

impl Link {
    async fn to(target: SocketAddr) -> Link {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(PROXY_SOCKET_BUFFER).unwrap();
        socket.set_send_buffer_size(PROXY_SOCKET_BUFFER).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (gate, gate_rx) = watch::channel(Gate::Open);
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let up = TcpSocket::new_v4().unwrap();
                up.set_recv_buffer_size(PROXY_SOCKET_BUFFER).unwrap();
                up.set_send_buffer_size(PROXY_SOCKET_BUFFER).unwrap();
                let Ok(up) = up.connect(target).await else {
                    continue;
                };
                carry(down, up, gate_rx.clone());
            }
        });
        Link {
            addr: format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap(),
            gate,
        }
    }

    fn set(&self, gate: Gate) {
        self.gate.send_replace(gate);
    }
}

/// Pumps bytes both ways between `a` and `b` as the gate allows.
fn carry(a: TcpStream, b: TcpStream, gate: watch::Receiver<Gate>) {
    let (a_read, a_write) = a.into_split();
    let (b_read, b_write) = b.into_split();
    tokio::spawn(pump(a_read, b_write, gate.clone()));
    tokio::spawn(pump(b_read, a_write, gate));
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<Gate>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *gate.borrow_and_update();
        if now == Gate::Stopped {
            if gate.changed().await.is_err() {
                return;
            }
            continue;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Gate::Throttled(bytes_per_sec) = now {
            // The throttle itself (not synchronization): n bytes take n / rate seconds.
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / bytes_per_sec as f64)).await;
        }
    }
}

fn socket_addr(addr: &Multiaddr) -> SocketAddr {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    SocketAddr::new(ip.expect("an ip4 address"), port.expect("a tcp port"))
}

/// xorshift64: deterministic, dependency-free randomness for the workload.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Pseudo-random lowercase text, so batch sizes are realistic (zstd does not shrink it much).
fn text(state: &mut u64, len: usize) -> String {
    (0..len)
        .map(|_| (b'a' + (next(state) % 26) as u8) as char)
        .collect()
}

/// `n` upserts into `collection`, keys drawn from `keys` records, one `value_len`-byte field.
fn upserts(seed: u64, collection: &str, n: usize, keys: u64, value_len: usize) -> Vec<Op> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| Op::Upsert {
            collection: collection.to_string(),
            key: format!("k{:05}", next(&mut state) % keys),
            hlc: Default::default(),
            fields: [(
                "v".to_string(),
                serde_json::Value::String(text(&mut state, value_len)),
            )]
            .into_iter()
            .collect(),
        })
        .collect()
}

/// The highest queue depths a sampler saw, next to the node's own high-water marks.
#[derive(Default)]
struct Seen {
    commands: AtomicU64,
    materializer_jobs: AtomicU64,
}

/// Checks every bound on `q` (a reading of A's queues), naming the one broken.
fn assert_bounded(q: &QueueDepths, when: &str) {
    assert!(
        q.commands <= COMMAND_CAP as u64 && q.commands_max <= COMMAND_CAP as u64,
        "{when}: command channel beyond {COMMAND_CAP}: {q:?}"
    );
    let mat_cap = materializer::QUEUE_CAP as u64 + 1;
    assert!(
        q.materializer_jobs <= mat_cap && q.materializer_jobs_max <= mat_cap,
        "{when}: materializer queue beyond {mat_cap}: {q:?}"
    );
    let commit_cap = blazedb_node::node::COMMIT_QUEUE_CAP as u64 + 1;
    assert!(
        q.commit_queue_max <= commit_cap,
        "{when}: log committer queue beyond {commit_cap}: {q:?}"
    );
    let verify_cap = blazedb_node::node::VERIFY_QUEUE_CAP as u64 + 1;
    assert!(
        q.verify_queue_max <= verify_cap,
        "{when}: verifier queue beyond {verify_cap}: {q:?}"
    );
    assert!(
        q.sync_inflight_max <= SYNC_INFLIGHT_MAX as u64,
        "{when}: more than {SYNC_INFLIGHT_MAX} unanswered sync requests to one peer: {q:?}"
    );
    // Buckets are 50 wide: every sample ≤ 64 lands at or below the bucket bounded by 100.
    let bucket_of_cap = (net::GOSSIP_QUEUE_LEN as u64).div_ceil(50) * 50;
    assert!(
        q.gossip_queue_sampled_max.unwrap_or(0) <= bucket_of_cap,
        "{when}: a gossip send queue sampled beyond {}: {q:?}",
        net::GOSSIP_QUEUE_LEN
    );
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Writes every call of `writes` into `ns` at `node` from `writers` concurrent tasks; every
/// write must succeed. Returns how many did.
async fn write_all(node: &NodeHandle, ns: &str, writes: Vec<Vec<Op>>, writers: usize) -> usize {
    let writes = Arc::new(std::sync::Mutex::new(writes));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (node, writes, ns) = (node.clone(), writes.clone(), ns.to_string());
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let Some(ops) = writes.lock().unwrap().pop() else {
                    return done;
                };
                node.write(&ns, ops)
                    .await
                    .expect("a write at A failed under backpressure");
                done += 1;
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("writer task");
    }
    done
}

/// Each namespace's chain heads (what "B holds every batch of A" compares).
fn heads(s: blazedb_node::Status) -> Vec<(String, std::collections::BTreeMap<String, u64>)> {
    s.namespaces
        .into_iter()
        .map(|n| (n.name, n.heads))
        .collect()
}

/// Creates an owned namespace at A that B joins with read rights (A pushes each of its
/// batches to B as a sync request) and waits until both that and gossip from A reach B.
/// Returns the namespace.
async fn owned_and_gossip_live(a: &NodeHandle, b: &NodeHandle) -> String {
    let owned = a.create_namespace().await.unwrap();
    let b_key = PublicKey::from_did(&b.did()).unwrap();
    let invite = a
        .invite(&owned, b_key, Rights::Read, None, None)
        .await
        .unwrap();
    b.join(&invite.token).await.unwrap();
    a.put(&owned, "probe", "p", obj(json!({"n": 0})))
        .await
        .unwrap();
    eventually(
        "B to read the owned namespace",
        Duration::from_secs(30),
        || async { b.get(&owned, "probe", "p").ok()?.map(|_| ()) },
    )
    .await;
    // Gossip from A to B is live: a probe write reaches B as a gossip message.
    let mut probe = 0;
    eventually("a gossiped probe at B", Duration::from_secs(30), || {
        probe += 1;
        let (a, b) = (a.clone(), b.clone());
        async move {
            a.put(
                "default",
                "probe",
                &format!("p{probe}"),
                obj(json!({"n": probe})),
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            (b.gossip_received().1 > 0).then_some(())
        }
    })
    .await;

    owned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_outpacing_the_link_is_slowed_not_buffered_and_b_converges() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a"), &[]).await.unwrap();
    let link = Link::to(socket_addr(&a.listen_addrs()[0])).await;
    let b = start_node(&dir.path().join("b"), std::slice::from_ref(&link.addr))
        .await
        .unwrap();
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    // An owned namespace B reads (A pushes every batch to B as a sync request), and gossip
    // from A to B, both live.
    let owned = owned_and_gossip_live(&a, &b).await;

    // A sampler reads A's queue depths throughout (as /metrics would).
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (a, seen, stop) = (a.clone(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rss_peak: f64 = 0.0;
            while !stop.load(Relaxed) {
                let q = a.queues();
                assert_bounded(&q, "sampled");
                seen.commands.fetch_max(q.commands, Relaxed);
                seen.materializer_jobs
                    .fetch_max(q.materializer_jobs, Relaxed);
                rss_peak = rss_peak.max(rss_mb());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            rss_peak
        })
    };
    let rss_before = rss_mb();

    // 1. The link stops carrying anything.
    link.set(Gate::Stopped);
    let b_before = b.metrics().remote_batches.load(Relaxed);
    // A burst: more concurrent writers than the command channel holds.
    let burst = 2 * COMMAND_CAP;
    let writes: Vec<Vec<Op>> = (0..burst)
        .map(|i| upserts(i as u64, "burst", 20, 400, 2_000))
        .collect();
    assert_eq!(write_all(&a, "default", writes, burst).await, burst);
    // Writers in a loop, one batch per write and a group commit each: many more materializer
    // jobs than its queue holds.
    let bulk = 300;
    let writes: Vec<Vec<Op>> = (0..bulk)
        .map(|i| upserts(10_000 + i as u64, "bulk", 200, 5_000, 300))
        .collect();
    assert_eq!(write_all(&a, "default", writes, 2).await, bulk);
    // Pushes to B in the owned namespace: more than the unanswered sync requests allowed.
    let pushed = 2 * SYNC_INFLIGHT_MAX;
    let writes: Vec<Vec<Op>> = (0..pushed)
        .map(|i| upserts(30_000 + i as u64, "pushed", 10, 1_000, 1_000))
        .collect();
    assert_eq!(write_all(&a, &owned, writes, 1).await, pushed);
    let written = a.metrics().local_batches.load(Relaxed);
    let b_during = b.metrics().remote_batches.load(Relaxed) - b_before;
    let q = a.queues();
    let rss_stopped = rss_mb();
    assert_bounded(&q, "link stopped");
    let gossip_dropped = a.metrics().gossip_dropped.load(Relaxed);
    let sync_dropped = a.metrics().sync_dropped.load(Relaxed);
    eprintln!(
        "link stopped: A wrote {written} batches, B received {b_during}; A queues {q:?}; \
         gossip publishes dropped {gossip_dropped}, sync messages dropped {sync_dropped}; \
         RSS {rss_before:.0} -> {rss_stopped:.0} MB"
    );
    assert!(
        b_during < (burst + bulk) as u64 / 2,
        "the stopped link still carried {b_during} batches"
    );
    assert!(
        gossip_dropped > 0,
        "A's gossip queue to B never filled, or it grew past its bound: {q:?}"
    );
    assert!(
        sync_dropped > 0,
        "{pushed} pushes to a stopped peer were all queued: {q:?}"
    );

    // 2. A trickle: A keeps writing, B starts to take batches.
    link.set(Gate::Throttled(2 * 1024 * 1024));
    let more = 40;
    let writes: Vec<Vec<Op>> = (0..more)
        .map(|i| upserts(20_000 + i as u64, "bulk", 200, 5_000, 300))
        .collect();
    assert_eq!(write_all(&a, "default", writes, 4).await, more);
    assert_bounded(&a.queues(), "link throttled");

    // 3. The link is open again: B drains and converges to exactly A's state.
    link.set(Gate::Open);
    let want = heads(a.status().await.unwrap());
    eventually(
        "B to hold every batch of A",
        Duration::from_secs(120),
        || {
            let (b, want) = (b.clone(), want.clone());
            async move { (heads(b.status().await.ok()?) == want).then_some(()) }
        },
    )
    .await;
    stop.store(true, Relaxed);
    let rss_peak = sampler.await.expect("sampler (a bound was broken)");
    let q = a.queues();
    assert_bounded(&q, "after draining");
    assert_eq!(a.counts().unwrap(), b.counts().unwrap(), "batches, records");
    // B caught up through fetch answers of many batches: verified off its actor.
    let qb = b.queues();
    assert_bounded(&qb, "B after catching up");
    assert!(
        qb.verify_queue_max >= 1,
        "no fetch answer went through the verifier: {qb:?}"
    );
    let collections = [
        ("default", "probe"),
        ("default", "burst"),
        ("default", "bulk"),
        (owned.as_str(), "probe"),
        (owned.as_str(), "pushed"),
    ];
    for (ns, collection) in collections {
        let (ra, rb) = (
            a.list(ns, collection, "", 100_000).unwrap(),
            b.list(ns, collection, "", 100_000).unwrap(),
        );
        assert!(!ra.is_empty(), "{ns}/{collection} is empty");
        assert!(ra == rb, "B's {ns}/{collection} records differ from A's");
    }
    // The same depths are exported at /metrics.
    let listener = blazedb_node::api::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let api = listener.local_addr().unwrap();
    tokio::spawn(blazedb_node::api::serve(
        a.clone(),
        listener,
        std::future::pending(),
    ));
    let text = scrape_metrics(&format!("http://{api}")).await;
    for (name, v) in [
        ("blazedb_command_queue_depth_max", q.commands_max),
        (
            "blazedb_materializer_queue_depth_max",
            q.materializer_jobs_max,
        ),
        ("blazedb_sync_inflight_max", q.sync_inflight_max),
        ("blazedb_gossip_dropped_total", gossip_dropped),
    ] {
        let got: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"));
        // High-water marks and counters only grow.
        assert!(
            got >= v && got > 0,
            "/metrics {name} = {got}, expected at least {v}"
        );
    }
    // Exported too (may be 0 here: the threads can take each item as soon as it is queued).
    for (name, v) in [
        ("blazedb_commit_queue_depth_max", q.commit_queue_max),
        ("blazedb_verify_queue_depth_max", q.verify_queue_max),
        ("blazedb_commit_groups_max", 1),
        ("blazedb_commits_ahead_total", 0),
        ("blazedb_commits_split_total", 0),
    ] {
        let got: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"));
        assert!(got >= v, "/metrics {name} = {got}, expected at least {v}");
    }
    eprintln!(
        "converged; A queues {q:?}; sampled max: commands {}, materializer jobs {}; \
         peak RSS {rss_peak:.0} MB (both nodes)",
        seen.commands.load(Relaxed),
        seen.materializer_jobs.load(Relaxed),
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Batches a lagging peer missed (gossip publishes refused at a full queue, pushes dropped
/// past the unanswered-request cap) reach it as soon as the link carries again — through our
/// heads sent when the drops happen — not at the next anti-entropy round, which this test
/// puts an hour away: without those heads, B would never converge within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_batches_are_fetched_at_once_not_at_the_next_round() {
    let dir = tempfile::tempdir().unwrap();
    let engine = blazedb_protocol::EngineConfig {
        anti_entropy_interval_ms: 3_600_000,
        ..blazedb_tests::fast_engine()
    };
    let start = |name: &str, bootstrap: Option<Multiaddr>| {
        let mut b = blazedb_node::Node::builder()
            .data_dir(dir.path().join(name))
            .listen(vec![blazedb_tests::loopback()])
            .mdns(false)
            .engine(engine.clone());
        if let Some(addr) = bootstrap {
            b = b.bootstrap(addr);
        }
        b.spawn()
    };
    let a = start("a", None).await.unwrap();
    let link = Link::to(socket_addr(&a.listen_addrs()[0])).await;
    let b = start("b", Some(link.addr.clone())).await.unwrap();
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let owned = owned_and_gossip_live(&a, &b).await;

    link.set(Gate::Stopped);
    let pushes = 3 * SYNC_INFLIGHT_MAX;
    let writes: Vec<Vec<Op>> = (0..pushes)
        .map(|i| upserts(40_000 + i as u64, "pushed", 10, 1_000, 1_000))
        .collect();
    assert_eq!(write_all(&a, &owned, writes, 1).await, pushes);
    let gossiped = 3 * net::GOSSIP_QUEUE_LEN;
    let writes: Vec<Vec<Op>> = (0..gossiped)
        .map(|i| upserts(50_000 + i as u64, "gossiped", 10, 1_000, 1_000))
        .collect();
    assert_eq!(write_all(&a, "default", writes, 1).await, gossiped);
    let (gossip_dropped, sync_dropped) = (
        a.metrics().gossip_dropped.load(Relaxed),
        a.metrics().sync_dropped.load(Relaxed),
    );
    assert!(gossip_dropped > 0, "no gossip publish was refused");
    assert!(sync_dropped > 0, "no push was dropped");

    link.set(Gate::Open);
    let want = heads(a.status().await.unwrap());
    eventually(
        "B to hold every batch of A, well before the next anti-entropy round",
        Duration::from_secs(60),
        || {
            let (b, want) = (b.clone(), want.clone());
            async move { (heads(b.status().await.ok()?) == want).then_some(()) }
        },
    )
    .await;
    for (ns, collection) in [(owned.as_str(), "pushed"), ("default", "gossiped")] {
        let (ra, rb) = (
            a.list(ns, collection, "", 100_000).unwrap(),
            b.list(ns, collection, "", 100_000).unwrap(),
        );
        assert!(
            !ra.is_empty() && ra == rb,
            "B's {ns}/{collection} differs from A's"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}
