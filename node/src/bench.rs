//! `blazedb bench`: the standard benchmarks (see BRIEF: B1–B8) that exist so far.
//!
//! - **B1** batch codec on workload W (5,000-op batches): the compact codec alone (encode,
//!   borrowed decode, decode to owned ops), seal (encode + zstd + blake3 + sign), batch id
//!   alone, verify (inflate + decode + hash + signature + op checks); baseline: plain
//!   serde+ciborium encode/decode of the same ops, in the same run.
//! - **B3** two nodes in this process over loopback TCP (TLS 1.3 + yamux): write at A in
//!   5,000-op calls until every batch is durable at B; baselines: raw loopback TCP goodput for
//!   the same bytes, and a plain libp2p gossipsub pair on the same links moving the same
//!   sealed batches (`bench_gossip`), in the same run.
//!
//! Figures are medians of `--runs` runs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, ChainPosition, Envelope};
use blazedb_protocol::{Engine, EngineConfig, Hlc, Op, OpsBuilder};

use crate::dicts::{DictPolicy, DictTrainer};
use crate::node::{Node, NodeHandle, DEFAULT_NAMESPACE};

/// Arguments of `blazedb bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Ops written in B3.
    #[arg(long, default_value_t = 200_000)]
    pub ops: usize,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Which benchmarks (b1, b2, b3, b4, b5, b6, b7; parts of b2 alone: b2i ingest, b2m
    /// materializer, b2b calls built in the window (owned ops vs OpsBuilder), b2h HTTP bulk
    /// ingest, b2l sustained ingest (4M ops), b2s small writes; b5l the bulk writes of b5
    /// alone).
    #[arg(long, value_delimiter = ',', default_value = "b1,b2,b3,b4,b5,b6,b7")]
    pub only: Vec<String>,
    /// Ops written in B2l (sustained ingest).
    #[arg(long, default_value_t = 4_000_000)]
    pub b2l_ops: usize,
    /// B2l's key space (records the ops' keys are drawn from): W's 1M by default; a larger
    /// one makes a dataset that keeps growing; 0 makes every key new and larger than all
    /// before it (appends, as a time series writes).
    #[arg(long, default_value_t = W_KEYS)]
    pub b2l_keys: u64,
    /// Ops the catching-up node missed in B6.
    #[arg(long, default_value_t = 1_000_000)]
    pub catchup_ops: usize,
}

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Benchmark id.
    pub id: &'static str,
    /// What was measured.
    pub what: String,
    /// Value.
    pub value: f64,
    /// Unit.
    pub unit: &'static str,
    /// Ratio to the in-run baseline, if any.
    pub ratio: Option<f64>,
    /// What the ratio compares with.
    pub baseline: Option<String>,
}

impl Row {
    /// A row with no baseline.
    fn plain(id: &'static str, what: String, value: f64, unit: &'static str) -> Row {
        Row {
            id,
            what,
            value,
            unit,
            ratio: None,
            baseline: None,
        }
    }
}

/// Ops per client call in workload W.
pub const W_BATCH_OPS: usize = 5_000;
/// Records in workload W's key space.
pub const W_KEYS: u64 = 1_000_000;

/// Workload W: uniformly random keys over 1M records, 3 fields per upsert, values of 8–64
/// bytes, 10% deletes.
pub fn workload_w(rng: &mut impl Rng, n: usize, hlc_start: u64) -> Vec<Op> {
    workload_w_over(rng, n, hlc_start, W_KEYS, 0)
}

/// A workload-W key: drawn from `keys` records, or for `keys` 0 the `nth` of increasing keys
/// (`rng` untouched then).
fn w_key(rng: &mut impl Rng, keys: u64, nth: u64) -> String {
    match keys {
        0 => format!("k{nth:012}"),
        _ => format!("k{:07}", rng.gen_range(0..keys)),
    }
}

/// [`workload_w`] with its keys drawn from `keys` records instead of [`W_KEYS`] (B2l's
/// growing dataset), or, for `keys` 0, increasing from `first` (appends: each op a new key,
/// after every key before it).
fn workload_w_over(rng: &mut impl Rng, n: usize, hlc_start: u64, keys: u64, first: u64) -> Vec<Op> {
    (0..n)
        .map(|i| {
            let key = w_key(rng, keys, first + i as u64);
            let hlc = Hlc(hlc_start + i as u64);
            if rng.gen_range(0..10) == 0 {
                Op::Delete {
                    collection: "bench".into(),
                    key,
                    hlc,
                }
            } else {
                let fields = ["a", "b", "c"]
                    .iter()
                    .map(|f| {
                        let len = rng.gen_range(8..=64);
                        let v: String = (0..len)
                            .map(|_| rng.gen_range(b'a'..=b'z') as char)
                            .collect();
                        (f.to_string(), serde_json::Value::String(v))
                    })
                    .collect();
                Op::Upsert {
                    collection: "bench".into(),
                    key,
                    hlc,
                    fields,
                }
            }
        })
        .collect()
}

/// The machine a report was measured on, printed with it: figures from different machines
/// (or different hours of one shared VM) are not comparable, so a report names its own.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// When the report was made (HTTP date, UTC).
    pub date: String,
    /// CPU model (`/proc/cpuinfo`), or "unknown".
    pub cpu: String,
    /// Logical CPUs this process may use.
    pub logical_cpus: usize,
    /// Total memory, GiB (`/proc/meminfo`), 0 if unknown.
    pub memory_gib: f64,
    /// Operating system and kernel release.
    pub os: String,
    /// Whether the CPU reports running under a hypervisor.
    pub virtual_machine: bool,
    /// Whether links prefer AES-GCM here (the CPU has AES instructions), else ChaCha20-Poly1305.
    pub aes_links: bool,
    /// This build's version.
    pub blazedb: &'static str,
}

impl Machine {
    /// Reads what this machine tells about itself.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Machine {
            date: httpdate::fmt_http_date(std::time::SystemTime::now()),
            cpu: field("model name").unwrap_or_else(|| "unknown".into()),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            os: format!("{} {}", std::env::consts::OS, kernel.trim()),
            virtual_machine: field("flags")
                .is_some_and(|f| f.split_whitespace().any(|x| x == "hypervisor")),
            aes_links: blazedb_crypto::aes_hardware(),
            blazedb: env!("CARGO_PKG_VERSION"),
        }
    }

    /// One line for the table's head.
    fn line(&self) -> String {
        format!(
            "{}; {} x {} logical CPUs{}, {:.0} GiB, {}; links {}; blazedb {}",
            self.date,
            self.cpu,
            self.logical_cpus,
            if self.virtual_machine { " (VM)" } else { "" },
            self.memory_gib,
            self.os,
            if self.aes_links {
                "AES-128-GCM"
            } else {
                "ChaCha20-Poly1305"
            },
            self.blazedb
        )
    }
}

/// Median of a non-empty set of figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Runs the selected benchmarks and prints the report.
pub async fn run(args: BenchArgs) -> Result<()> {
    let mut rows = Vec::new();
    let runs = args.runs.max(1);
    if args.only.iter().any(|b| b == "b1") {
        rows.extend(b1(runs)?);
    }
    // B2m before B2's ingest: its delta-memory figure is the process's growth, which memory
    // freed by an earlier benchmark (and kept by the allocator) would hide.
    if args.only.iter().any(|b| b == "b2" || b == "b2m") {
        rows.extend(crate::bench_materialize::b2m(args.ops.max(200_000), runs)?);
    }
    if args.only.iter().any(|b| b == "b2" || b == "b2i") {
        rows.extend(b2(args.ops, runs).await?);
    }
    if args.only.iter().any(|b| b == "b2" || b == "b2b") {
        rows.extend(b2b(args.ops, runs).await?);
    }
    if args.only.iter().any(|b| b == "b2" || b == "b2h") {
        rows.extend(b2h(args.ops, runs).await?);
    }
    if args.only.iter().any(|b| b == "b2" || b == "b2l") {
        rows.extend(b2l(args.b2l_ops, args.b2l_keys, runs).await?);
    }
    if args.only.iter().any(|b| b == "b2" || b == "b2s") {
        rows.extend(crate::bench_adaptive::b2s(runs).await?);
    }
    if args.only.iter().any(|b| b == "b3") {
        rows.extend(b3(args.ops, runs).await?);
    }
    if args.only.iter().any(|b| b == "b4") {
        rows.extend(b4()?);
    }
    if args.only.iter().any(|b| b == "b5") {
        for n in [10, 50, 100] {
            rows.extend(b5(n, 20).await?);
        }
    }
    if args.only.iter().any(|b| b == "b5" || b == "b5l") {
        rows.extend(b5_large(10, 10).await?);
    }
    if args.only.iter().any(|b| b == "b7") {
        rows.extend(crate::bench_handshake::b7(runs).await?);
    }
    if args.only.iter().any(|b| b == "b6") {
        rows.extend(b6(args.catchup_ops, runs).await?);
    }
    let machine = Machine::detect();
    if args.json {
        let report = serde_json::json!({
            "machine": machine,
            "runs": runs,
            "ops": args.ops,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("# {}; median of {runs} run(s)", machine.line());
        println!(
            "{:<4} {:<60} {:>14} {:<8} {:>8}  baseline",
            "id", "what", "value", "unit", "ratio"
        );
        for r in &rows {
            let value = if r.value.abs() < 100.0 {
                format!("{:.2}", r.value)
            } else {
                format!("{:.0}", r.value)
            };
            println!(
                "{:<4} {:<60} {:>14} {:<8} {:>8}  {}",
                r.id,
                r.what,
                value,
                r.unit,
                r.ratio.map(|x| format!("{x:.3}x")).unwrap_or_default(),
                r.baseline.clone().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// B1: batch codec, one core. The codec alone (compact encode; borrowed decode with every op
/// check) against plain serde+ciborium on the same ops, then the whole batch path (seal:
/// encode + zstd + blake3 + ed25519 sign; verify: inflate + decode + hash + strict signature +
/// op checks; the ops stay the validated payload, `BatchOps`).
pub fn b1(runs: usize) -> Result<Vec<Row>> {
    use blazedb_protocol::codec;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let kp = Keypair::from_seed([7; 32]);
    let ops = workload_w(&mut rng, W_BATCH_OPS, 1);
    let reps = 100;
    let n = (W_BATCH_OPS * reps) as f64;
    let rate = |t: Instant| n / t.elapsed().as_secs_f64();
    let mut r: [Vec<f64>; 11] = Default::default();
    let (mut sealed_bpo, mut plain_bpo, mut serde_bpo) = (0.0, 0.0, 0.0);
    let raw = workload_w_raw(&mut rand::rngs::StdRng::seed_from_u64(1), W_BATCH_OPS);
    for _ in 0..runs {
        // Codec alone.
        let mut compact = Vec::new();
        let t = Instant::now();
        for _ in 0..reps {
            compact.clear();
            codec::encode_ops(&ops, &mut compact);
            std::hint::black_box(&compact);
        }
        r[0].push(rate(t));
        plain_bpo = compact.len() as f64 / W_BATCH_OPS as f64;
        let mut plain = Vec::new();
        let t = Instant::now();
        for _ in 0..reps {
            plain.clear();
            ciborium::into_writer(&ops, &mut plain)?;
        }
        r[1].push(rate(t));
        serde_bpo = plain.len() as f64 / W_BATCH_OPS as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(codec::decode(&compact)?);
        }
        r[2].push(rate(t));
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(codec::decode(&compact)?.to_ops());
        }
        r[3].push(rate(t));
        let t = Instant::now();
        for _ in 0..reps {
            let v: Vec<Op> = ciborium::from_reader(&plain[..])?;
            std::hint::black_box(v);
        }
        r[4].push(rate(t));

        // The whole batch path (seal takes its ops by value: the clone is part of it, as for
        // a caller that keeps its ops).
        let t = Instant::now();
        let mut sealed = None;
        for _ in 0..reps {
            sealed = Some(
                batch::seal(
                    &kp,
                    DEFAULT_NAMESPACE,
                    ChainPosition { seq: 1, prev: None },
                    ops.clone(),
                    None,
                )
                .context("sealing")?,
            );
        }
        r[5].push(rate(t));
        let sealed = sealed.expect("reps > 0");
        sealed_bpo = sealed.bytes.len() as f64 / W_BATCH_OPS as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(Envelope::parse(&sealed.bytes)?.id());
        }
        r[6].push(reps as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(batch::verify(sealed.bytes.clone())?);
        }
        r[7].push(rate(t));
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(sealed.ops.decode_uncached()?);
        }
        r[8].push(rate(t));

        // A call from the app's strings to a payload ready to seal: built (checked and
        // encoded as each op is added, then pruned as a payload), against owned ops made
        // from the same strings, checked, pruned and encoded ahead.
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(built_call(&raw)?.into_checked());
        }
        r[9].push(rate(t));
        let t = Instant::now();
        for _ in 0..reps {
            let mut c = blazedb_protocol::CheckedOps::new(owned_call(&raw))?;
            c.encode_ahead();
            std::hint::black_box(c);
        }
        r[10].push(rate(t));
    }
    let [enc, base_enc, dec, dec_owned, base_dec, seal, id, verify, reread, built, owned] =
        r.map(median);
    let row = |what: &str, value: f64, unit: &'static str, base: Option<(f64, &str)>| Row {
        id: "B1",
        what: what.into(),
        value,
        unit,
        ratio: base.map(|(b, _)| value / b),
        baseline: base.map(|(b, name)| format!("{name} {b:.0} ops/s")),
    };
    let se = Some((base_enc, "serde+ciborium encode"));
    let sd = Some((base_dec, "serde+ciborium decode"));
    Ok(vec![
        row("encode (compact codec), 5k-op batch", enc, "ops/s", se),
        row(
            "a call from the app's strings to a payload (OpsBuilder: check, encode, prune)",
            built,
            "ops/s",
            Some((owned, "owned ops made, checked, pruned, encoded")),
        ),
        row("decode (borrowed view, all op checks)", dec, "ops/s", sd),
        row("decode to owned ops (tools, tests)", dec_owned, "ops/s", sd),
        row(
            "decode a sealed batch's ops once more (first BatchOps::view; then kept)",
            reread,
            "ops/s",
            sd,
        ),
        row(
            "seal (encode + zstd-1 + blake3 + ed25519 sign)",
            seal,
            "ops/s",
            se,
        ),
        row(
            "batch id (envelope parse + blake3 of header)",
            id,
            "ids/s",
            None,
        ),
        row(
            "verify (inflate + decode + hash + strict sig; ops kept as payload)",
            verify,
            "ops/s",
            sd,
        ),
        Row {
            id: "B1",
            what: "payload size, compact codec (uncompressed)".into(),
            value: plain_bpo,
            unit: "B/op",
            ratio: Some(plain_bpo / serde_bpo),
            baseline: Some(format!("serde+ciborium {serde_bpo:.1} B/op")),
        },
        row("sealed batch size", sealed_bpo, "B/op", None),
    ])
}

async fn wait_for<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn two_nodes(dir: &std::path::Path) -> Result<(NodeHandle, NodeHandle)> {
    let lo: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
    let a = Node::builder()
        .data_dir(dir.join("a"))
        .listen(vec![lo.clone()])
        .mdns(false)
        .spawn()
        .await?;
    let b = Node::builder()
        .data_dir(dir.join("b"))
        .listen(vec![lo])
        .mdns(false)
        .bootstrap(a.listen_addrs()[0].clone())
        .spawn()
        .await?;
    Ok((a, b))
}

/// B3: two-node replication over loopback, with two in-run baselines: raw loopback TCP and a
/// plain libp2p gossipsub pair (`bench_gossip`) moving the same sealed batches.
pub async fn b3(total_ops: usize, runs: usize) -> Result<Vec<Row>> {
    let calls = total_ops.div_ceil(W_BATCH_OPS).max(1);
    let mut public = Vec::new();
    let mut owned = Vec::new();
    let mut pair = Vec::new();
    let mut rss = Vec::new();
    let mut cpus = Vec::new();
    let mut faults = Vec::new();
    let mut owned_dups = Vec::new();
    let (mut public_dups, mut gossiped) = (Vec::new(), Vec::new());
    let (mut readable, mut cpus_readable) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let r = b3_run(total_ops, run as u64, false).await?;
        public.push(r.rate);
        readable.push(r.readable);
        cpus_readable.push(r.cpu_us_readable);
        rss.push(r.rss_growth_mb);
        cpus.push(r.cpu_us_per_op);
        faults.push(r.faults_per_kop);
        public_dups.push(r.duplicates_per_batch);
        gossiped.push(r.gossiped_per_batch);
        let o = b3_run(total_ops, run as u64, true).await?;
        owned.push(o.rate);
        owned_dups.push(o.duplicates_per_batch);
        let sealed = crate::bench_gossip::sealed_w_batches(calls, run as u64)?;
        pair.push(crate::bench_gossip::gossipsub_pair_ops(&sealed, W_BATCH_OPS).await?);
    }
    let (public, owned, pair) = (median(public), median(owned), median(pair));
    let tcp = raw_tcp_goodput_ops().await?;
    Ok(vec![
        Row {
            id: "B3",
            what: format!(
                "2 nodes loopback TLS, A write (OpsBuilder) -> durable at B, {total_ops} ops"
            ),
            value: public,
            unit: "ops/s",
            ratio: Some(public / tcp),
            baseline: Some(format!(
                "raw loopback TCP moving the same batch bytes: {tcp:.0} ops/s"
            )),
        },
        Row {
            id: "B3",
            what: "same, vs a plain libp2p gossipsub pair (same links and batches)".into(),
            value: public,
            unit: "ops/s",
            ratio: Some(public / pair),
            baseline: Some(format!(
                "2 bare gossipsub swarms, TCP+PQ TLS+yamux, blake3 ids: {pair:.0} ops/s \
                 ({:.3}x raw TCP)",
                pair / tcp
            )),
        },
        Row {
            id: "B3",
            what: "same, until every op is readable at both nodes (records staged)".into(),
            value: median(readable),
            unit: "ops/s",
            ratio: None,
            baseline: None,
        },
        Row {
            id: "B3",
            what: "public run: batches B received by gossip / twice, per batch written".into(),
            value: median(gossiped),
            unit: "msgs",
            ratio: None,
            baseline: Some(format!(
                "large batches are pushed around gossip; received twice: {:.2}",
                median(public_dups)
            )),
        },
        Row {
            id: "B3",
            what: "same, owned namespace (capability-checked push to readers)".into(),
            value: owned,
            unit: "ops/s",
            ratio: Some(owned / public),
            baseline: Some("the public namespace above".into()),
        },
        Row {
            id: "B3",
            what: "owned run: batches B received twice (pushed and fetched), per batch".into(),
            value: median(owned_dups),
            unit: "copies",
            ratio: None,
            baseline: Some("B's duplicate count over the run / batches written".into()),
        },
        Row {
            id: "B3",
            what: "peak RSS growth of this process during a public run (A and B)".into(),
            value: median(rss),
            unit: "MB",
            ratio: None,
            baseline: Some("VmRSS sampled every 10 ms, minus the value before the run".into()),
        },
        Row {
            id: "B3",
            what: "CPU per op, both nodes, public run (all threads, user + system)".into(),
            value: median(cpus),
            unit: "us/op",
            ratio: None,
            baseline: Some("process CPU time over the run / ops; 2 cores".into()),
        },
        Row {
            id: "B3",
            what: "CPU per op until readable at both nodes, public run".into(),
            value: median(cpus_readable),
            unit: "us/op",
            ratio: None,
            baseline: Some("as above, until both nodes' records hold every op".into()),
        },
        Row {
            id: "B3",
            what: "page faults per 1,000 ops, both nodes, public run (minor, all threads)".into(),
            value: median(faults),
            unit: "faults",
            ratio: None,
            baseline: Some("fresh memory touched: dear on this VM (README)".into()),
        },
    ])
}

/// CPU time this process has used so far, all threads, user and system, in seconds (from
/// /proc/self/stat, in USER_HZ = 100 ticks; 0 where /proc is not available). Per-op CPU over a
/// run is far steadier than wall-clock rates on a shared machine: it is what the builds of one
/// session are compared by.
pub(crate) fn cpu_secs() -> f64 {
    // utime and stime are fields 14 and 15 of the line.
    proc_stat_sum(&[14, 15]).map_or(0.0, |ticks| ticks as f64 / 100.0)
}

/// Minor page faults of this process so far (all threads; 0 where /proc is not available).
/// On the project's VM a page the process touches for the first time can cost ~3–10 µs (the
/// host may have to fault it in again: README, "Measuring on this VM"), so faults per op say
/// how much of a run's CPU went to fresh memory.
pub(crate) fn minor_faults() -> u64 {
    // minflt is field 10 of the line.
    proc_stat_sum(&[10]).unwrap_or(0)
}

/// The sum of the given (1-based) numeric fields of `/proc/self/stat`.
fn proc_stat_sum(fields: &[usize]) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (field 2, which may hold spaces) in parentheses; the
    // first of them is field 3.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    fields
        .iter()
        .map(|&n| f.get(n.checked_sub(3)?)?.parse::<u64>().ok())
        .sum()
}

/// Resident set size of this process, in bytes (0 where /proc is not available).
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One B2 run: a fresh node, `calls` 5k-op calls of workload W through the embedding API,
/// each built as a payload ([`OpsBuilder`]) from the app's strings inside the window, `writers`
/// calls in flight at a time (each call waits for durability).
async fn b2_run(calls: usize, run: usize, writers: usize) -> Result<B2Run> {
    b2b_run(calls, run, writers, CallForm::Built, W_KEYS).await
}

/// A fresh node for an ingest run, its data in `dir`.
async fn ingest_node(dir: &std::path::Path) -> Result<NodeHandle> {
    Node::builder()
        .data_dir(dir.join("n"))
        .listen(vec!["/ip4/127.0.0.1/tcp/0".parse()?])
        .mdns(false)
        .spawn()
        .await
}

/// Times `write` over `calls` of [`W_BATCH_OPS`] ops each, `writers` in flight, on `node`
/// (data in `dir`): until durable, then until readable; then shuts the node down.
async fn ingest_window<T, F, Fut>(
    node: &NodeHandle,
    dir: &std::path::Path,
    calls: Vec<T>,
    writers: usize,
    write: F,
    keys: u64,
) -> Result<B2Run>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let ops = (calls.len() * W_BATCH_OPS) as f64;
    let mut lat = Vec::with_capacity(calls.len());
    // Window markers: a profile recorded with `perf record -k CLOCK_REALTIME` lines up with
    // these log lines' timestamps.
    tracing::info!(writers, "bench window: B2 start");
    let t = Instant::now();
    let (cpu0, faults0) = (cpu_secs(), minor_faults());
    let (flushes0, kinds0) = (node.view_flushes(), node.view_flush_kinds());
    in_flight(calls, writers, write, &mut lat).await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu_us = (cpu_secs() - cpu0) * 1e6 / ops;
    let faults_per_kop = minor_faults().saturating_sub(faults0) as f64 * 1e3 / ops;
    let flushes = node.view_flushes();
    let flushes = (flushes.0 - flushes0.0, flushes.1 - flushes0.1);
    let kinds = node.view_flush_kinds();
    let kinds = (kinds.0 - kinds0.0, kinds.1 - kinds0.1);
    tracing::info!(writers, "bench window: B2 end");
    // Until the records have caught up too.
    let n2 = node.clone();
    tokio::task::spawn_blocking(move || n2.wait_records()).await??;
    let readable = ops / t.elapsed().as_secs_f64();
    let cpu_us_readable = (cpu_secs() - cpu0) * 1e6 / ops;
    // What a `/metrics` record count costs right after the window when one is due (taken on a
    // thread of its own behind the scrapes, `Store::counts_for_scrape`; later scrapes return
    // it until it is ten times its cost old), with the records' delta as full as the window
    // left it.
    let n2 = node.clone();
    let counted = Instant::now();
    tokio::task::spawn_blocking(move || n2.counts()).await??;
    let counts_ms = counted.elapsed().as_secs_f64() * 1e3;
    // What a read pays right after the window: random keys of the calls' key space (with
    // W's, nearly all held; with a larger one, mostly not: every level is looked in).
    let runs_held = node.view_runs_held()? as f64;
    let n2 = node.clone();
    let ops_written = ops as u64;
    let gets_us = tokio::task::spawn_blocking(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t = Instant::now();
        for _ in 0..GETS_AFTER_WINDOW {
            let nth = rng.gen_range(0..ops_written);
            n2.get(DEFAULT_NAMESPACE, "bench", &w_key(&mut rng, keys, nth))?;
        }
        Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1e6 / GETS_AFTER_WINDOW as f64)
    })
    .await??;
    node.clone().shutdown().await;
    let bytes = std::fs::metadata(crate::node::store_path(&dir.join("n")))?.len() as f64;
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Ok(B2Run {
        rate: ops / secs,
        readable,
        mb_s: bytes / secs / 1e6,
        lat,
        cpu_us,
        cpu_us_readable,
        faults_per_kop,
        flushes,
        kinds,
        counts_ms,
        gets_us,
        runs_held,
    })
}

/// A workload-W op as an app holds it before writing: its own strings.
struct RawOp {
    key: String,
    /// The three field values; `None` for a delete.
    values: Option<[String; 3]>,
}

/// Workload W as [`RawOp`]s (the same ops [`workload_w`] draws from the same generator).
fn workload_w_raw(rng: &mut impl Rng, n: usize) -> Vec<RawOp> {
    workload_w_raw_over(rng, n, W_KEYS, 0)
}

/// [`workload_w_raw`] over `keys` records (0: increasing keys from `first`).
fn workload_w_raw_over(rng: &mut impl Rng, n: usize, keys: u64, first: u64) -> Vec<RawOp> {
    workload_w_over(rng, n, 0, keys, first)
        .into_iter()
        .map(|op| match op {
            Op::Upsert { key, fields, .. } => {
                let mut v = fields.into_values().map(|v| match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                });
                let mut next = || v.next().unwrap_or_default();
                RawOp {
                    key,
                    values: Some([next(), next(), next()]),
                }
            }
            other => RawOp {
                key: other.key().to_string(),
                values: None,
            },
        })
        .collect()
}

/// A call of workload W as owned ops, made from the app's strings.
fn owned_call(call: &[RawOp]) -> Vec<Op> {
    call.iter()
        .map(|r| match &r.values {
            Some(v) => Op::Upsert {
                collection: "bench".into(),
                key: r.key.clone(),
                hlc: Hlc(0),
                fields: ["a", "b", "c"]
                    .iter()
                    .zip(v)
                    .map(|(f, v)| (f.to_string(), v.as_str().into()))
                    .collect(),
            },
            None => Op::Delete {
                collection: "bench".into(),
                key: r.key.clone(),
                hlc: Hlc(0),
            },
        })
        .collect()
}

/// A call of workload W built as a payload from the app's strings.
fn built_call(call: &[RawOp]) -> Result<OpsBuilder> {
    let mut b = OpsBuilder::with_capacity(call.len(), 128);
    for r in call {
        match &r.values {
            Some([a, bv, cv]) => b.upsert(
                "bench",
                &r.key,
                &[("a", a.into()), ("b", bv.into()), ("c", cv.into())],
            )?,
            None => b.delete("bench", &r.key)?,
        }
    }
    Ok(b)
}

/// How a B2b call hands its ops to the node.
#[derive(Clone, Copy, PartialEq)]
enum CallForm {
    /// `Vec<Op>` built from the app's strings, then `NodeHandle::write`.
    Owned,
    /// An `OpsBuilder` fed the app's strings, then `NodeHandle::write_built`.
    Built,
}

/// One B2b run: B2's ingest with each call made from the app's own strings inside the
/// window, in `form`.
async fn b2b_run(
    calls: usize,
    run: usize,
    writers: usize,
    form: CallForm,
    keys: u64,
) -> Result<B2Run> {
    let dir = tempfile_dir()?;
    let node = ingest_node(dir.path()).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(100 + run as u64);
    let raw: Vec<Vec<RawOp>> = (0..calls)
        .map(|c| workload_w_raw_over(&mut rng, W_BATCH_OPS, keys, (c * W_BATCH_OPS) as u64))
        .collect();
    let write = |call: Vec<RawOp>| {
        let node = node.clone();
        async move {
            let c = Instant::now();
            match form {
                CallForm::Owned => node.write(DEFAULT_NAMESPACE, owned_call(&call)).await?,
                CallForm::Built => {
                    node.write_built(DEFAULT_NAMESPACE, built_call(&call)?)
                        .await?
                }
            };
            drop(call);
            Ok::<f64, anyhow::Error>(c.elapsed().as_secs_f64() * 1e3)
        }
    };
    ingest_window(&node, dir.path(), raw, writers, write, keys).await
}

/// B2b: B2 with each call made inside the window from the app's own strings, as owned ops
/// (`NodeHandle::write`) and built as a payload (`OpsBuilder`, `NodeHandle::write_built`),
/// one writer and [`B2_WRITERS`], alternating in one process.
pub async fn b2b(total_ops: usize, runs: usize) -> Result<Vec<Row>> {
    let calls = total_ops.div_ceil(W_BATCH_OPS).max(1);
    let mut m: [[Vec<B2Run>; 2]; 2] = Default::default();
    for run in 0..runs {
        for (w, writers) in [1, B2_WRITERS].into_iter().enumerate() {
            for (f, form) in [CallForm::Owned, CallForm::Built].into_iter().enumerate() {
                m[w][f].push(b2b_run(calls, run, writers, form, W_KEYS).await?);
            }
        }
    }
    let med = |runs: &[B2Run], f: fn(&B2Run) -> f64| median(runs.iter().map(f).collect());
    let mut rows = Vec::new();
    for (w, writers) in [1, B2_WRITERS].into_iter().enumerate() {
        let owned = med(&m[w][0], |r| r.rate);
        let built = med(&m[w][1], |r| r.rate);
        rows.push(Row {
            id: "B2b",
            what: format!(
                "durable ingest, calls built from the app's strings in the window with \
                 OpsBuilder, {writers} writer(s), {total_ops} ops"
            ),
            value: built,
            unit: "ops/s",
            ratio: Some(built / owned),
            baseline: Some(format!("Vec<Op> built in the window: {owned:.0} ops/s")),
        });
        let (co, cb) = (med(&m[w][0], |r| r.cpu_us), med(&m[w][1], |r| r.cpu_us));
        rows.push(Row {
            id: "B2b",
            what: format!("same, CPU per op until durable, {writers} writer(s)"),
            value: cb,
            unit: "us/op",
            ratio: Some(cb / co),
            baseline: Some(format!("Vec<Op>: {co:.2} us/op")),
        });
    }
    Ok(rows)
}

/// Runs `call` on each item, `writers` at a time (a new one starts as one ends), pushing each
/// call's result (its latency) to `lat`.
async fn in_flight<T, F, Fut>(
    items: Vec<T>,
    writers: usize,
    call: F,
    lat: &mut Vec<f64>,
) -> Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    use futures::StreamExt;
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut it = items.into_iter();
    for item in it.by_ref().take(writers.max(1)) {
        inflight.push(call(item));
    }
    while let Some(res) = inflight.next().await {
        lat.push(res?);
        if let Some(item) = it.next() {
            inflight.push(call(item));
        }
    }
    Ok(())
}

/// What one B2 run measured.
struct B2Run {
    /// Durable ops/s.
    rate: f64,
    /// Ops/s until every op was readable.
    readable: f64,
    /// Store growth, MB/s.
    mb_s: f64,
    /// Per-call commit latency, ms, sorted.
    lat: Vec<f64>,
    /// Process CPU (all threads) per op until durable, µs.
    cpu_us: f64,
    /// Process CPU per op until every op was readable, µs (the records' staging is done by
    /// then; their write into the view file comes later, off this figure).
    cpu_us_readable: f64,
    /// Minor page faults (all threads) per 1,000 ops until durable.
    faults_per_kop: f64,
    /// View flushes committed in the window, and the records they wrote.
    flushes: (u64, u64),
    /// Of those, the flushes that wrote a sorted run, and those that folded a slice of the
    /// key space into the records' table.
    kinds: (u64, u64),
    /// Time to count the node's batches and records right after the window (ms).
    counts_ms: f64,
    /// Time per `get` of a random key of the key space right after the window (µs).
    gets_us: f64,
    /// Runs beside the records' table when those gets ran.
    runs_held: f64,
}

impl B2Run {
    /// The 99th percentile of the calls' commit latency, ms.
    fn p99_ms(&self) -> f64 {
        self.lat[(self.lat.len() * 99 / 100).min(self.lat.len() - 1)]
    }
}

/// Gets timed right after each B2 window ([`B2Run::gets_us`]).
const GETS_AFTER_WINDOW: usize = 20_000;

/// Writers in flight in B2's concurrent variant (as several client connections would).
pub const B2_WRITERS: usize = 4;

/// The JSON body `POST /v1/ns/{ns}/ops` takes for `ops` (what a client in another language
/// sends).
fn ops_body(ops: &[Op]) -> Vec<u8> {
    let ops: Vec<serde_json::Value> = ops
        .iter()
        .map(|op| match op {
            Op::Upsert {
                collection,
                key,
                fields,
                ..
            } => serde_json::json!({
                "op": "upsert", "collection": collection, "key": key, "fields": fields,
            }),
            Op::Delete {
                collection, key, ..
            } => {
                serde_json::json!({ "op": "delete", "collection": collection, "key": key })
            }
            Op::CounterAdd {
                collection,
                key,
                field,
                delta,
                ..
            } => serde_json::json!({
                "op": "add", "collection": collection, "key": key, "field": field, "delta": delta,
            }),
            Op::Revoke { .. } => serde_json::Value::Null,
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "ops": ops })).expect("JSON of JSON values")
}

/// B2h: B2's ingest through the HTTP API (`POST /v1/ns/default/ops`, 5,000 workload-W ops as
/// JSON per call, answered once durable), `writers` calls in flight. The bodies are made
/// before the clock starts; the client (reqwest) runs in this process, so the CPU figure
/// includes sending the requests and reading the answers.
async fn b2h_run(calls: usize, run: usize, writers: usize) -> Result<HttpRun> {
    let dir = tempfile_dir()?;
    let node = Node::builder()
        .data_dir(dir.path().join("n"))
        .listen(vec!["/ip4/127.0.0.1/tcp/0".parse()?])
        .mdns(false)
        .spawn()
        .await?;
    let listener = crate::api::bind("127.0.0.1:0".parse()?).await?;
    let url = format!(
        "http://{}/v1/ns/{DEFAULT_NAMESPACE}/ops",
        listener.local_addr()?
    );
    tokio::spawn(crate::api::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(300 + run as u64);
    let bodies: Vec<Vec<u8>> = (0..calls)
        .map(|_| ops_body(&workload_w(&mut rng, W_BATCH_OPS, 0)))
        .collect();
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let c = Instant::now();
            let resp = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(resp.status().is_success(), "POST ops: {}", resp.status());
            Ok::<f64, anyhow::Error>(c.elapsed().as_secs_f64() * 1e3)
        }
    };
    let mut lat = Vec::with_capacity(calls);
    tracing::info!(writers, "bench window: B2h start");
    let t = Instant::now();
    let cpu0 = cpu_secs();
    in_flight(bodies, writers, post, &mut lat).await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu_us = (cpu_secs() - cpu0) * 1e6 / (calls * W_BATCH_OPS) as f64;
    tracing::info!(writers, "bench window: B2h end");
    node.shutdown().await;
    drop(node);
    Ok(HttpRun {
        rate: (calls * W_BATCH_OPS) as f64 / secs,
        p50_ms: median(lat),
        cpu_us,
    })
}

/// What one B2h run measured.
struct HttpRun {
    /// Durable ops/s.
    rate: f64,
    /// Median call latency, ms.
    p50_ms: f64,
    /// Process CPU (all threads, the client's too) per op, µs.
    cpu_us: f64,
}

/// B2h: HTTP bulk ingest, one client and [`B2_WRITERS`] calls in flight, against the
/// embedding API's figure for the same calls in the same run (one writer).
pub async fn b2h(total_ops: usize, runs: usize) -> Result<Vec<Row>> {
    let calls = total_ops.div_ceil(W_BATCH_OPS).max(1);
    let (mut one, mut four, mut api, mut p50, mut cpu) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let r = b2h_run(calls, run, 1).await?;
        one.push(r.rate);
        p50.push(r.p50_ms);
        cpu.push(r.cpu_us);
        four.push(b2h_run(calls, run, B2_WRITERS).await?.rate);
        api.push(b2_run(calls, run, 1).await?.rate);
    }
    let (one, api, four) = (median(one), median(api), median(four));
    Ok(vec![
        Row {
            id: "B2h",
            what: format!(
                "HTTP bulk ingest: POST /ops, 5k W ops as JSON per call, {total_ops} ops"
            ),
            value: one,
            unit: "ops/s",
            ratio: Some(one / api),
            baseline: Some(format!(
                "embedding API, same calls, one writer: {api:.0} ops/s"
            )),
        },
        Row {
            id: "B2h",
            what: "same, call latency p50 (until durable)".into(),
            value: median(p50),
            unit: "ms",
            ratio: None,
            baseline: None,
        },
        Row {
            id: "B2h",
            what: format!("same, {B2_WRITERS} calls in flight"),
            value: four,
            unit: "ops/s",
            ratio: Some(four / one),
            baseline: Some("one call at a time".into()),
        },
        Row {
            id: "B2h",
            what: "CPU per op, one call at a time (server and client in this process)".into(),
            value: median(cpu),
            unit: "us/op",
            ratio: None,
            baseline: None,
        },
    ])
}

/// B2: local durable ingest through the embedding API, 5,000-op calls, one writer after
/// another (each call waits for durability), vs raw redb storing the same batch bytes as one
/// value per durable transaction; then the same with [`B2_WRITERS`] calls in flight (group
/// commit: their batches share log transactions).
pub async fn b2(total_ops: usize, runs: usize) -> Result<Vec<Row>> {
    let calls = total_ops.div_ceil(W_BATCH_OPS).max(1);
    let (mut rates, mut mbs, mut p50s, mut p99s, mut raw_rates) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut readable = Vec::new();
    let (mut conc, mut conc_readable, mut conc_p50) = (vec![], vec![], vec![]);
    let (mut cpus, mut conc_cpus) = (vec![], vec![]);
    let (mut cpus_readable, mut conc_cpus_readable) = (vec![], vec![]);
    let (mut faults, mut conc_faults) = (vec![], vec![]);
    for run in 0..runs {
        let one = b2_run(calls, run, 1).await?;
        let lat = &one.lat;
        rates.push(one.rate);
        readable.push(one.readable);
        mbs.push(one.mb_s);
        p50s.push(lat[lat.len() / 2]);
        p99s.push(one.p99_ms());
        cpus.push(one.cpu_us);
        cpus_readable.push(one.cpu_us_readable);
        faults.push(one.faults_per_kop);
        let four = b2_run(calls, run, B2_WRITERS).await?;
        conc.push(four.rate);
        conc_readable.push(four.readable);
        conc_p50.push(four.lat[four.lat.len() / 2]);
        conc_cpus.push(four.cpu_us);
        conc_cpus_readable.push(four.cpu_us_readable);
        conc_faults.push(four.faults_per_kop);

        // Raw redb: the same number of sealed batches, one value each, durable commits.
        let dir = tempfile_dir()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(200 + run as u64);
        let kp = Keypair::from_seed([3; 32]);
        let sealed = batch::seal(
            &kp,
            DEFAULT_NAMESPACE,
            ChainPosition { seq: 1, prev: None },
            workload_w(&mut rng, W_BATCH_OPS, 1),
            None,
        )?;
        let db = redb::Database::create(dir.path().join("raw.redb"))?;
        const T: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("raw");
        let t = Instant::now();
        for i in 0..calls as u64 {
            let txn = db.begin_write()?;
            txn.open_table(T)?.insert(i, &sealed.bytes[..])?;
            txn.commit()?;
        }
        raw_rates.push((calls * W_BATCH_OPS) as f64 / t.elapsed().as_secs_f64());
    }
    let (rate, raw) = (median(rates), median(raw_rates));
    let conc = median(conc);
    let row = |what: String, value: f64, unit: &'static str| Row::plain("B2", what, value, unit);
    Ok(vec![
        Row {
            id: "B2",
            what: format!("local durable ingest, 5k-op calls built in the window (OpsBuilder), {total_ops} ops"),
            value: rate,
            unit: "ops/s",
            ratio: Some(rate / raw),
            baseline: Some(format!(
                "raw redb, one sealed batch per durable txn: {raw:.0} ops/s"
            )),
        },
        row(
            "same, until every op is applied to the records (readable)".into(),
            median(readable),
            "ops/s",
        ),
        row("store growth rate".into(), median(mbs), "MB/s"),
        row("commit latency p50 (5k-op call)".into(), median(p50s), "ms"),
        row("commit latency p99 (5k-op call)".into(), median(p99s), "ms"),
        Row {
            id: "B2",
            what: format!("same ingest, {B2_WRITERS} writers' calls in flight (group commit)"),
            value: conc,
            unit: "ops/s",
            ratio: Some(conc / rate),
            baseline: Some(format!("one writer: {rate:.0} ops/s")),
        },
        row(
            format!("{B2_WRITERS} writers, until every op is readable"),
            median(conc_readable),
            "ops/s",
        ),
        row(
            format!("{B2_WRITERS} writers, commit latency p50"),
            median(conc_p50),
            "ms",
        ),
        row(
            "CPU per op until durable, one writer (all threads, user + system)".into(),
            median(cpus),
            "us/op",
        ),
        row(
            format!("CPU per op until durable, {B2_WRITERS} writers"),
            median(conc_cpus),
            "us/op",
        ),
        row(
            "CPU per op until readable, one writer (records staged too)".into(),
            median(cpus_readable),
            "us/op",
        ),
        row(
            format!("CPU per op until readable, {B2_WRITERS} writers"),
            median(conc_cpus_readable),
            "us/op",
        ),
        row(
            "page faults per 1,000 ops until durable, one writer (minor, all threads)".into(),
            median(faults),
            "faults",
        ),
        row(
            format!("page faults per 1,000 ops until durable, {B2_WRITERS} writers"),
            median(conc_faults),
            "faults",
        ),
    ])
}

/// B2l: B2's ingest sustained (`ops`, default four times workload W's key space,
/// [`B2_WRITERS`] writers): long enough that the records' delta is written into the view
/// file (a whole-file merge at workload W's key space, on the flusher thread) inside the
/// window, which B2's 200k-op window never sees. `keys` is the key space (W's 1M by default;
/// a larger one is a dataset that keeps growing, whose flushes grow with it). Its in-run
/// baseline is the same ingest at 200k ops, run first in the same process.
pub async fn b2l(ops: usize, keys: u64, runs: usize) -> Result<Vec<Row>> {
    let (mut rates, mut readable, mut cpus, mut bursts) = (vec![], vec![], vec![], vec![]);
    let (mut flushes, mut flushed_per_op, mut counts_ms) = (vec![], vec![], vec![]);
    let (mut as_runs, mut folds, mut gets_us) = (vec![], vec![], vec![]);
    let (mut runs_held, mut p99s, mut maxes) = (vec![], vec![], vec![]);
    let calls = ops.div_ceil(W_BATCH_OPS).max(1);
    let ops = calls * W_BATCH_OPS;
    for run in 0..runs {
        let burst = b2b_run(
            200_000 / W_BATCH_OPS,
            run,
            B2_WRITERS,
            CallForm::Built,
            keys,
        );
        bursts.push(burst.await?.rate);
        let long = b2b_run(calls, run, B2_WRITERS, CallForm::Built, keys).await?;
        rates.push(long.rate);
        readable.push(long.readable);
        cpus.push(long.cpu_us);
        flushes.push(long.flushes.0 as f64);
        as_runs.push(long.kinds.0 as f64);
        folds.push(long.kinds.1 as f64);
        flushed_per_op.push(long.flushes.1 as f64 / ops as f64);
        counts_ms.push(long.counts_ms);
        gets_us.push(long.gets_us);
        runs_held.push(long.runs_held);
        p99s.push(long.p99_ms());
        maxes.push(long.lat[long.lat.len() - 1]);
    }
    let (rate, burst) = (median(rates), median(bursts));
    let space = match keys {
        0 => "on increasing keys (appends)".to_string(),
        _ => format!("over {keys} keys"),
    };
    let row = |what: String, value: f64, unit: &'static str| Row::plain("B2l", what, value, unit);
    Ok(vec![
        Row {
            id: "B2l",
            what: format!(
                "sustained durable ingest, {B2_WRITERS} writers, {ops} ops {space} (view flushes in the window)"
            ),
            value: rate,
            unit: "ops/s",
            ratio: Some(rate / burst),
            baseline: Some(format!("the same ingest at 200k ops: {burst:.0} ops/s")),
        },
        row("same, until every op is readable".into(), median(readable), "ops/s"),
        row(
            "CPU per op until durable (all threads, the flusher's included)".into(),
            median(cpus),
            "us/op",
        ),
        row(
            "a writer's call until durable, p99 (writers wait while the view file takes a flush)".into(),
            median(p99s),
            "ms",
        ),
        row("same, the longest call".into(), median(maxes), "ms"),
        row(
            "view flushes committed in the window".into(),
            median(flushes),
            "flushes",
        ),
        row(
            "of those, written as a sorted run beside the records' table".into(),
            median(as_runs),
            "flushes",
        ),
        row(
            "of those, folding a slice of the key space into the records' table (the runs' records there, and the delta's)".into(),
            median(folds),
            "flushes",
        ),
        row(
            "records written into the view file per op ingested".into(),
            median(flushed_per_op),
            "records/op",
        ),
        row(
            "counting batches and records right after the window (what a /metrics count costs when due, taken behind the scrapes)".into(),
            median(counts_ms),
            "ms",
        ),
        row(
            format!(
                "a get of a random key of the key space right after the window (mean of {GETS_AFTER_WINDOW}: delta, runs and table joined)"
            ),
            median(gets_us),
            "us",
        ),
        row(
            "runs beside the records' table when those gets ran".into(),
            median(runs_held),
            "runs",
        ),
    ])
}

/// B4: bytes per op of what crosses the wire for workload W: the sealed batch (header,
/// signature, compact payload, zstd level 1 when it pays); TLS/yamux framing (~0.1%) not
/// counted. Then the shipped dictionary path: one author seals a realistic run of 1-, 10- and
/// 100-op batches through the engine with the node's dictionary policy ([`DictPolicy`]:
/// trained from its own recent small payloads, used per batch only when smaller), against the
/// same run without dictionaries; the dictionaries' own bytes are amortized over the batches
/// that used them (each is sent once per receiving node). Workload W's values are random
/// letters (the worst case for a dictionary); a game-like workload (positions, names, teams)
/// is measured next to it.
pub fn b4() -> Result<Vec<Row>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let kp = Keypair::from_seed([4; 32]);
    let sealed = batch::seal(
        &kp,
        DEFAULT_NAMESPACE,
        ChainPosition { seq: 1, prev: None },
        workload_w(&mut rng, W_BATCH_OPS, 1),
        None,
    )?;
    let mut rows = vec![Row {
        id: "B4",
        what: "wire bytes per op, workload W, 5k-op batch (sealed, zstd level 1)".into(),
        value: sealed.bytes.len() as f64 / W_BATCH_OPS as f64,
        unit: "B/op",
        ratio: None,
        baseline: None,
    }];
    // What a node actually sends for 5k-op calls: the writer's adaptive effort (one probe of
    // the levels, then the chosen one; see `blazedb_protocol::squeeze`).
    let mut squeeze = blazedb_protocol::squeeze::Squeeze::adaptive();
    let (mut bytes, mut strong_bytes, n) = (0usize, 0usize, 8usize);
    for seq in 1..=n as u64 {
        let ops = workload_w(&mut rng, W_BATCH_OPS, seq);
        let pos = ChainPosition { seq: 1, prev: None };
        let strong = batch::seal(&kp, DEFAULT_NAMESPACE, pos, ops.clone(), None)?;
        let adaptive =
            batch::seal_squeezed(&kp, DEFAULT_NAMESPACE, pos, ops, None, None, &mut squeeze)?;
        bytes += adaptive.bytes.len();
        strong_bytes += strong.bytes.len();
    }
    rows.push(Row {
        id: "B4",
        what: format!(
            "same, as a node seals them (adaptive zstd effort: {} of {n} below level 1, {} at -20)",
            squeeze.fast_batches(),
            squeeze.fastest_batches()
        ),
        value: bytes as f64 / (n * W_BATCH_OPS) as f64,
        unit: "B/op",
        ratio: Some(bytes as f64 / strong_bytes as f64),
        baseline: Some("zstd level 1 on the same batches".into()),
    });
    let runs: [(&str, usize, usize); 4] = [
        ("workload W", 1, 20_000),
        ("workload W", 10, 4_000),
        ("workload W", 100, 400),
        ("game-like", 1, 20_000),
    ];
    for (workload, n, batches) in runs {
        let gen = |rng: &mut rand::rngs::StdRng, n: usize| match workload {
            "game-like" => game_ops(rng, n),
            _ => workload_w(rng, n, 0),
        };
        let with = dict_run(&gen, n, batches, true)?;
        let without = dict_run(&gen, n, batches, false)?;
        let per_op = |r: &DictRun| r.bytes as f64 / r.ops as f64;
        let dict_bytes: usize = with.dicts.iter().sum();
        let amortized = match with.dict_batches {
            0 => 0.0,
            m => dict_bytes as f64 / m as f64,
        };
        let all_in = (with.bytes + dict_bytes as u64) as f64 / with.ops as f64;
        rows.push(Row {
            id: "B4",
            what: format!(
                "wire bytes/op, {workload}, {n}-op batches sealed with the node's dictionary policy"
            ),
            value: per_op(&with),
            unit: "B/op",
            ratio: Some(per_op(&with) / per_op(&without)),
            baseline: Some(format!(
                "without dictionaries {:.1} B/op; {batches} batches, {} used a dictionary; {} \
                 dictionaries, {dict_bytes} B in all = {amortized:.1} B per batch that used \
                 one, {all_in:.1} B/op all-in; training {:.0} ms per dictionary; sealing \
                 {:.1} vs {:.1} us/batch, verifying {:.1} vs {:.1}",
                per_op(&without),
                with.dict_batches,
                with.dicts.len(),
                with.train_ms / with.dicts.len().max(1) as f64,
                with.write_secs * 1e6 / batches as f64,
                without.write_secs * 1e6 / batches as f64,
                with.verify_secs * 1e6 / batches as f64,
                without.verify_secs * 1e6 / batches as f64,
            )),
        });
    }
    Ok(rows)
}

/// A game-like small write: a player's position and state (what live-write workloads look
/// like: the same collection, field names and a few value vocabularies, over and over).
pub fn game_ops(rng: &mut impl Rng, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let p = rng.gen_range(0..200u32);
            let fields = [
                ("x", serde_json::json!(rng.gen_range(0..10_000))),
                ("y", serde_json::json!(rng.gen_range(0..10_000))),
                ("hp", serde_json::json!(rng.gen_range(0..100))),
                ("name", serde_json::json!(format!("player-{p}"))),
                (
                    "team",
                    serde_json::json!(["red", "blue", "green"][p as usize % 3]),
                ),
                (
                    "state",
                    serde_json::json!(["idle", "running", "jumping"][rng.gen_range(0..3)]),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            Op::Upsert {
                collection: "players".into(),
                key: format!("p{p}"),
                hlc: Hlc::ZERO,
                fields,
            }
        })
        .collect()
}

/// What one author's run of sealed batches weighed.
struct DictRun {
    bytes: u64,
    ops: u64,
    dict_batches: u64,
    /// Sizes of the dictionaries trained.
    dicts: Vec<usize>,
    train_ms: f64,
    /// Time spent in `Engine::write` (sealing, signing, chain bookkeeping).
    write_secs: f64,
    /// Time a receiver spends verifying the batches (`verify_with`, dictionaries held).
    verify_secs: f64,
}

/// Seals `batches` batches of `n` ops through an engine, as the node's actor does: with the
/// node's default dictionary policy (`dicts`) or without dictionaries.
fn dict_run(
    gen: &dyn Fn(&mut rand::rngs::StdRng, usize) -> Vec<Op>,
    n: usize,
    batches: usize,
    dicts: bool,
) -> Result<DictRun> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(44);
    let kp = Keypair::from_seed([4; 32]);
    let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
    engine.join(DEFAULT_NAMESPACE);
    let mut trainer = dicts.then(|| DictTrainer::new(DictPolicy::default()));
    let mut run = DictRun {
        bytes: 0,
        ops: 0,
        dict_batches: 0,
        dicts: Vec::new(),
        train_ms: 0.0,
        write_secs: 0.0,
        verify_secs: 0.0,
    };
    for i in 0..batches {
        let now = 1_000 + i as u64;
        let ops = gen(&mut rng, n);
        let start = Instant::now();
        let (vb, _) = engine.write(DEFAULT_NAMESPACE, &kp, ops, now)?;
        run.write_secs += start.elapsed().as_secs_f64();
        let bytes = vb.bytes.clone();
        let start = Instant::now();
        batch::verify_with(bytes, engine.dicts())?;
        run.verify_secs += start.elapsed().as_secs_f64();
        run.bytes += vb.bytes.len() as u64;
        run.ops += vb.ops.len() as u64;
        run.dict_batches += u64::from(vb.dict.is_some());
        if let Some(t) = trainer.as_mut() {
            t.observe(&vb);
            if t.due() {
                let start = Instant::now();
                let trained = t.train();
                run.train_ms += start.elapsed().as_secs_f64() * 1e3;
                if let Some(d) = trained {
                    run.dicts.push(d.bytes().len());
                    engine.set_write_dict(DEFAULT_NAMESPACE, d);
                }
            }
        }
    }
    Ok(run)
}

/// B6: a node that missed `missed_ops` catches up from one peer: seconds from connect until it
/// holds everything, and bytes served / bytes missing (batch bytes; framing not counted).
///
/// Run once per fetch-stripe setting (`BLAZEDB_B6_STRIPES`, default `1,4`). During the
/// catch-up a third node C, up to date and connected to A only, writes one small batch every
/// 50 ms: its gossip reaches B through A, which is busy serving the catch-up. Reported per
/// setting: catch-up seconds, time to the first missing batch stored, bytes served / missing,
/// the latency of C's live writes at B (write acknowledged at C until B holds it; p50 and
/// max), and the peak RSS of the bench process during the catch-up (A, B and C together).
/// `BLAZEDB_B6_LIVE=0` leaves C out (the plain catch-up of the earlier B6).
pub async fn b6(missed_ops: usize, runs: usize) -> Result<Vec<Row>> {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::{Arc, Mutex};
    let stripes_list: Vec<u32> = std::env::var("BLAZEDB_B6_STRIPES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<u32>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 4]);
    let with_live = std::env::var("BLAZEDB_B6_LIVE").map_or(true, |v| v != "0");
    let calls = missed_ops.div_ceil(W_BATCH_OPS).max(1);
    let mut rows = Vec::new();
    for stripes in stripes_list {
        let (mut secs_v, mut first_v, mut ratio_v) = (vec![], vec![], vec![]);
        let (mut live_p50_v, mut live_max_v, mut rss_v) = (vec![], vec![], vec![]);
        let (mut rss_growth_v, mut dropped_v) = (vec![], vec![]);
        let (mut read_p50_v, mut read_max_v) = (vec![], vec![]);
        let (mut list_p50_v, mut list_max_v, mut list_n_v) = (vec![], vec![], vec![]);
        for run in 0..runs {
            let dir = tempfile_dir()?;
            let lo: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
            let a = Node::builder()
                .data_dir(dir.path().join("a"))
                .listen(vec![lo.clone()])
                .mdns(false)
                .spawn()
                .await?;
            let c = if with_live {
                let c = Node::builder()
                    .data_dir(dir.path().join("c"))
                    .listen(vec![lo.clone()])
                    .mdns(false)
                    .bootstrap(a.listen_addrs()[0].clone())
                    .spawn()
                    .await?;
                // C connected before A writes: it receives them by gossip.
                let deadline = Instant::now() + Duration::from_secs(30);
                while c.status().await?.peers.is_empty() {
                    anyhow::ensure!(Instant::now() < deadline, "C did not connect");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Some(c)
            } else {
                None
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(600 + run as u64);
            for _ in 0..calls {
                a.write(DEFAULT_NAMESPACE, workload_w(&mut rng, W_BATCH_OPS, 0))
                    .await?;
            }
            let want = calls as u64;
            // C holds A's writes before B starts (gossip, else its own catch-up).
            if let Some(c) = &c {
                wait_for("C to hold A's writes", Duration::from_secs(1800), || {
                    c.metrics().remote_batches.load(Relaxed) >= want
                })
                .await?;
            }
            // A and C finish writing their records' files first, so the catch-up below is
            // not measured together with their deferred background work.
            wait_for("A and C to settle", Duration::from_secs(1800), || {
                !a.view_pending() && c.as_ref().is_none_or(|c| !c.view_pending())
            })
            .await?;
            let served_before = a.metrics().served_bytes.load(Relaxed);
            reset_peak_rss();
            let rss_before_mb = rss_bytes() as f64 / (1024.0 * 1024.0);
            let t = Instant::now();
            let b = Node::builder()
                .data_dir(dir.path().join("b"))
                .listen(vec![lo])
                .mdns(false)
                .fetch_stripes(stripes)
                .bootstrap(a.listen_addrs()[0].clone())
                .spawn()
                .await?;
            // C's live writes: (seq, acknowledged at).
            let live: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = c.clone().map(|c| {
                let (live, stop) = (live.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Relaxed) {
                        let fields = serde_json::Map::from_iter([("i".to_string(), i.into())]);
                        if let Ok(r) = c
                            .put(DEFAULT_NAMESPACE, "live", &format!("l{i}"), fields)
                            .await
                        {
                            live.lock()
                                .expect("not poisoned")
                                .push((r.seq, Instant::now()));
                        }
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            });
            // A reader at B: one get every 20 ms, each with every batch B's log held when it
            // began (read-your-writes), as an app's reads would: it joins what the records do
            // not hold yet.
            let (reads, reader) = {
                let b = b.clone();
                timed_reads(stop.clone(), Duration::from_millis(20), move || {
                    b.get(DEFAULT_NAMESPACE, "live", "l0").is_ok()
                })
            };
            // A second reader at B: the first page of W's collection (a listing of 100
            // records) every 50 ms, as an app showing that page would, with read-your-writes.
            let (lists, lister) = {
                let b = b.clone();
                timed_reads(stop.clone(), Duration::from_millis(50), move || {
                    b.list(DEFAULT_NAMESPACE, "bench", "", 100).is_ok()
                })
            };
            // Read from B's durable heads without going through B's actor (which is busy with
            // the catch-up: polling `status` measured its queue, not the write's arrival).
            let c_key = match &c {
                Some(c) => Some(blazedb_identity::PublicKey::from_did(&c.did())?),
                None => None,
            };
            let a_key = blazedb_identity::PublicKey::from_did(&a.did())?;
            let mut lat: Vec<f64> = Vec::new();
            let mut seen = 0usize;
            // The same writes' arrival at A (the relay), to tell A's share from B's.
            let (mut lat_a, mut seen_a) = (Vec::<f64>::new(), 0usize);
            let mut first = None;
            let deadline = Instant::now() + Duration::from_secs(1800);
            let mut done_at = None;
            loop {
                let got = b.metrics().remote_batches.load(Relaxed);
                if got > 0 && first.is_none() {
                    first = Some(t.elapsed().as_secs_f64());
                }
                if c_key.is_none() {
                    if got >= want {
                        done_at = Some(t.elapsed().as_secs_f64());
                        break;
                    }
                    anyhow::ensure!(Instant::now() < deadline, "catch-up did not finish");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let now = Instant::now();
                let c_head = c_key
                    .as_ref()
                    .and_then(|k| b.durable_head(DEFAULT_NAMESPACE, k))
                    .unwrap_or(0);
                let c_head_a = c_key
                    .as_ref()
                    .and_then(|k| a.durable_head(DEFAULT_NAMESPACE, k))
                    .unwrap_or(0);
                {
                    let live = live.lock().expect("not poisoned");
                    while seen_a < live.len() && live[seen_a].0 <= c_head_a {
                        lat_a.push(now.duration_since(live[seen_a].1).as_secs_f64());
                        seen_a += 1;
                    }
                    while seen < live.len() && live[seen].0 <= c_head {
                        lat.push(now.duration_since(live[seen].1).as_secs_f64());
                        seen += 1;
                    }
                }
                // A's chain complete at B?
                if done_at.is_none()
                    && b.durable_head(DEFAULT_NAMESPACE, &a_key).unwrap_or(0) >= want
                {
                    done_at = Some(t.elapsed().as_secs_f64());
                }
                if done_at.is_some() {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "catch-up did not finish");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            stop.store(true, Relaxed);
            if let Some(w) = writer {
                let _ = w.await;
            }
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
            let _ = tokio::task::spawn_blocking(move || lister.join()).await;
            // How many listings ran: one that waits long leaves room for few.
            list_n_v.push(lists.lock().expect("not poisoned").len() as f64);
            for (timings, p50s, maxes) in [
                (&reads, &mut read_p50_v, &mut read_max_v),
                (&lists, &mut list_p50_v, &mut list_max_v),
            ] {
                let mut v = std::mem::take(&mut *timings.lock().expect("not poisoned"));
                v.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
                if !v.is_empty() {
                    p50s.push(v[v.len() / 2]);
                    maxes.push(v[v.len() - 1]);
                }
            }
            secs_v.push(done_at.unwrap_or_default());
            first_v.push(first.unwrap_or_default());
            rss_v.push(peak_rss_mb());
            rss_growth_v.push(peak_rss_mb() - rss_before_mb);
            let missing = a.metrics().local_bytes.load(Relaxed) as f64;
            let served = (a.metrics().served_bytes.load(Relaxed) - served_before) as f64;
            ratio_v.push(served / missing);
            dropped_v.push(b.metrics().pending_dropped.load(Relaxed) as f64);
            lat.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
            lat_a.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
            if !lat.is_empty() && !lat_a.is_empty() {
                tracing::info!(
                    stripes,
                    writes = lat.len(),
                    at_a_p50_ms = lat_a[lat_a.len() / 2] * 1e3,
                    at_a_max_ms = lat_a[lat_a.len() - 1] * 1e3,
                    at_b_p50_ms = lat[lat.len() / 2] * 1e3,
                    at_b_max_ms = lat[lat.len() - 1] * 1e3,
                    "B6 live writes: durable at the relay A, and at B"
                );
            }
            if !lat.is_empty() {
                live_p50_v.push(lat[lat.len() / 2]);
                live_max_v.push(lat[lat.len() - 1]);
            }
            a.shutdown().await;
            b.shutdown().await;
            if let Some(c) = c {
                c.shutdown().await;
            }
        }
        let tag = format!("stripes={stripes}");
        let med = |v: Vec<f64>| if v.is_empty() { f64::NAN } else { median(v) };
        let rows_before = rows.len();
        rows.extend([
            Row {
                id: "B6",
                what: format!("catch-up of {missed_ops} missed ops from one peer ({tag})"),
                value: med(secs_v),
                unit: "s",
                ratio: None,
                baseline: None,
            },
            Row {
                id: "B6",
                what: format!("time until the first missing batch is stored ({tag})"),
                value: med(first_v) * 1e3,
                unit: "ms",
                ratio: None,
                baseline: None,
            },
            Row {
                id: "B6",
                what: format!("batch bytes served / batch bytes missing ({tag})"),
                value: med(ratio_v),
                unit: "x",
                ratio: None,
                baseline: Some(format!(
                    "message framing, TLS and yamux not counted; out-of-order batches B \
                     dropped for lack of buffer room: {:.0}",
                    med(dropped_v)
                )),
            },
        ]);
        rows.extend(p50_and_max(
            "live write latency at B during catch-up",
            &tag,
            (live_p50_v, live_max_v),
            "1-op batches from a third node, every 50 ms, until durable in B's log (read \
             without B's actor)",
        ));
        rows.extend(p50_and_max(
            "a read at B during catch-up",
            &tag,
            (read_p50_v, read_max_v),
            "a get every 20 ms, with every batch B's log held when it began (read-your-writes), \
             joined where B's records do not hold it yet",
        ));
        rows.extend(p50_and_max(
            "a listing at B during catch-up",
            &tag,
            (list_p50_v, list_max_v),
            &format!(
                "the first 100 records of W's collection every 50 ms, read-your-writes as the \
                 get above; {:.0} listings per catch-up",
                med(list_n_v)
            ),
        ));
        rows.extend([Row {
            id: "B6",
            what: format!("peak RSS during catch-up, all nodes in one process ({tag})"),
            value: med(rss_v),
            unit: "MB",
            ratio: None,
            baseline: Some(format!(
                "grown {:.0} MB from the start of the catch-up until B's log held every \
                     batch (the rest is A's and C's, from writing the ops before)",
                med(rss_growth_v)
            )),
        }]);
        if !with_live {
            // No live writer: drop its two rows (p50, max).
            rows.drain(rows_before + 3..rows_before + 5);
        }
    }
    Ok(rows)
}

/// Seconds each read took, shared with the thread that times them.
type Timings = std::sync::Arc<std::sync::Mutex<Vec<f64>>>;

/// A thread that calls `read` every `every` until `stop` is set, keeping the seconds each
/// call that succeeded took.
fn timed_reads(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    every: Duration,
    read: impl Fn() -> bool + Send + 'static,
) -> (Timings, std::thread::JoinHandle<()>) {
    let times = Timings::default();
    let kept = times.clone();
    let thread = std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            if read() {
                kept.lock()
                    .expect("not poisoned")
                    .push(t.elapsed().as_secs_f64());
            }
            std::thread::sleep(every);
        }
    });
    (times, thread)
}

/// Two B6 rows, in milliseconds: the median over runs of each run's p50, then of its max.
fn p50_and_max(name: &str, tag: &str, (p50s, maxes): (Vec<f64>, Vec<f64>), note: &str) -> [Row; 2] {
    let med = |v: Vec<f64>| if v.is_empty() { f64::NAN } else { median(v) };
    [
        Row {
            id: "B6",
            what: format!("{name}, p50 ({tag})"),
            value: med(p50s) * 1e3,
            unit: "ms",
            ratio: None,
            baseline: Some(note.into()),
        },
        Row {
            id: "B6",
            what: format!("{name}, max ({tag})"),
            value: med(maxes) * 1e3,
            unit: "ms",
            ratio: None,
            baseline: None,
        },
    ]
}

/// Resets the process's peak RSS (Linux: `clear_refs` 5); ignored elsewhere.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak RSS of the process since the last reset, in MB (NaN where unknown).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One B3 run: ops/s from the first write at A until B durably holds every batch, and the
/// growth of this process's peak RSS over the run, in MB.
/// One B3 run's figures.
struct B3Run {
    /// Ops/s until B's log held every batch (durable at B).
    rate: f64,
    /// Ops/s until both nodes' records held every op (readable at A and B).
    readable: f64,
    /// Process CPU per op until readable at both, µs.
    cpu_us_readable: f64,
    rss_growth_mb: f64,
    cpu_us_per_op: f64,
    /// Minor page faults (all threads, both nodes) per 1,000 ops until durable at B.
    faults_per_kop: f64,
    /// Batches B received again after holding them (pushed and fetched, or relayed back).
    duplicates_per_batch: f64,
    /// New gossip messages B received over the run, per batch written.
    gossiped_per_batch: f64,
}

async fn b3_run(total_ops: usize, seed: u64, owned: bool) -> Result<B3Run> {
    use futures::StreamExt;
    use std::sync::atomic::Ordering::Relaxed;
    let calls = total_ops.div_ceil(W_BATCH_OPS).max(1);
    let dir = tempfile_dir()?;
    let (a, b) = two_nodes(dir.path()).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.status().await?.peers.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "nodes did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ns = if owned {
        let ns = a.create_namespace().await?;
        let b_key = blazedb_identity::PublicKey::from_did(&b.did())?;
        let inv = a
            .invite(
                &ns,
                b_key,
                blazedb_protocol::capability::Rights::Read,
                None,
                None,
            )
            .await?;
        b.join(&inv.token).await?;
        // Wait until B is an authorized reader: a probe write reaches it.
        let probe: crate::Fields = [("p".to_string(), serde_json::json!(1))]
            .into_iter()
            .collect();
        a.put(&ns, "probe", "p", probe).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while b.get(&ns, "probe", "p")?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "B never became a reader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ns
    } else {
        DEFAULT_NAMESPACE.to_string()
    };
    let base = b.metrics().remote_batches.load(Relaxed);
    let dups_base = b.metrics().duplicates.load(Relaxed);
    let gossip_base = b.gossip_received().1;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let batches: Vec<Vec<RawOp>> = (0..calls)
        .map(|_| workload_w_raw(&mut rng, W_BATCH_OPS))
        .collect();
    let rss_start = rss_bytes();
    let rss_peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_start));
    let sampler = {
        let peak = rss_peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tracing::info!(owned, "bench window: B3 start");
    let t = Instant::now();
    let (cpu0, faults0) = (cpu_secs(), minor_faults());
    // Several calls in flight, as several client connections would.
    // Each call built from the app's strings as it is written (OpsBuilder).
    let write = |call: Vec<RawOp>| {
        let (a, ns) = (a.clone(), ns.clone());
        async move { anyhow::Ok(a.write_built(&ns, built_call(&call)?).await?) }
    };
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut it = batches.into_iter();
    for ops in it.by_ref().take(4) {
        inflight.push(write(ops));
    }
    while let Some(res) = inflight.next().await {
        res?;
        if let Some(ops) = it.next() {
            inflight.push(write(ops));
        }
    }
    let want = base + calls as u64;
    wait_for("B to hold every batch", Duration::from_secs(600), || {
        b.metrics().remote_batches.load(Relaxed) >= want
    })
    .await?;
    let rate = (calls * W_BATCH_OPS) as f64 / t.elapsed().as_secs_f64();
    let cpu_us = (cpu_secs() - cpu0) * 1e6 / (calls * W_BATCH_OPS) as f64;
    let faults_per_kop =
        minor_faults().saturating_sub(faults0) as f64 * 1e3 / (calls * W_BATCH_OPS) as f64;
    tracing::info!(owned, "bench window: B3 end");
    // Until both nodes' records hold every op too.
    for n in [&a, &b] {
        let n = n.clone();
        tokio::task::spawn_blocking(move || n.wait_records()).await??;
    }
    let readable = (calls * W_BATCH_OPS) as f64 / t.elapsed().as_secs_f64();
    let cpu_us_readable = (cpu_secs() - cpu0) * 1e6 / (calls * W_BATCH_OPS) as f64;
    sampler.abort();
    let gossiped = b.gossip_received().1.saturating_sub(gossip_base);
    let rss_growth = rss_peak.load(Relaxed).saturating_sub(rss_start) as f64 / 1e6;
    a.shutdown().await;
    b.shutdown().await;
    // After shutdown: copies still on the way when B completed count too.
    let dups = b
        .metrics()
        .duplicates
        .load(Relaxed)
        .saturating_sub(dups_base);
    Ok(B3Run {
        rate,
        readable,
        cpu_us_readable,
        rss_growth_mb: rss_growth,
        cpu_us_per_op: cpu_us,
        faults_per_kop,
        duplicates_per_batch: dups as f64 / calls as f64,
        gossiped_per_batch: gossiped as f64 / calls as f64,
    })
}

/// Raw loopback TCP: how many workload-W ops per second a plain socket moves when the ops are
/// sent as sealed batch bytes (no TLS, no storage).
async fn raw_tcp_goodput_ops() -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let kp = Keypair::from_seed([9; 32]);
    let sealed = batch::seal(
        &kp,
        DEFAULT_NAMESPACE,
        ChainPosition { seq: 1, prev: None },
        workload_w(&mut rng, W_BATCH_OPS, 1),
        None,
    )?;
    let reps = 200usize;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let total = sealed.bytes.len() * reps;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        while got < total {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok::<usize, std::io::Error>(got)
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let t = Instant::now();
    for _ in 0..reps {
        s.write_all(&sealed.bytes).await?;
    }
    s.flush().await?;
    let got = reader.await??;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        got == total,
        "raw TCP baseline moved {got} of {total} bytes"
    );
    Ok((reps * W_BATCH_OPS) as f64 / secs)
}

/// A fresh temporary directory, removed on drop.
pub fn tempfile_dir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!(
        "blazedb-bench-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&base)?;
    Ok(TempDir(base))
}

/// A temporary directory removed on drop.
pub struct TempDir(std::path::PathBuf);
impl TempDir {
    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` real nodes in this process on loopback, each dialing its predecessor and one random
/// earlier node (seeded), with engine settings `engine`; returned once every node has a peer
/// and gossipsub's meshes had a few heartbeats to form. Also returns the edges.
async fn b5_mesh(
    dir: &std::path::Path,
    n: usize,
    engine: EngineConfig,
) -> Result<(Vec<NodeHandle>, Vec<(usize, usize)>)> {
    let lo: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut edges = Vec::new();
    for i in 0..n {
        let mut builder = Node::builder()
            .data_dir(dir.join(format!("n{i}")))
            .listen(vec![lo.clone()])
            .mdns(false)
            .engine(engine.clone());
        if i > 0 {
            builder = builder.bootstrap(nodes[i - 1].listen_addrs()[0].clone());
            edges.push((i, i - 1));
            let j = rng.gen_range(0..i);
            if j != i - 1 {
                builder = builder.bootstrap(nodes[j].listen_addrs()[0].clone());
                edges.push((i, j));
            }
        }
        nodes.push(builder.spawn().await?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in &nodes {
        while node.status().await?.peers.is_empty() {
            anyhow::ensure!(Instant::now() < deadline, "mesh did not connect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let gossipsub's meshes form (a few heartbeats).
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok((nodes, edges))
}

/// Waits until each of `nodes` holds `want` batches from others (B5's "held by all").
async fn every_node_holds(nodes: &[NodeHandle], want: u64) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    for node in nodes {
        wait_for(
            "every node to hold the write",
            Duration::from_secs(60),
            || node.metrics().remote_batches.load(Relaxed) >= want,
        )
        .await?;
    }
    Ok(())
}

/// Copies of batches they held that reached the engines of `nodes` (gossip, pushes, fetches).
fn duplicates_received(nodes: &[NodeHandle]) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    nodes
        .iter()
        .map(|x| x.metrics().duplicates.load(Relaxed))
        .sum()
}

/// B5 (real tier): `n` real nodes in this process on loopback (see [`b5_mesh`]), one writer;
/// per write, the time until every node holds it, and gossip duplicates per batch. The same
/// N in the simulator is printed alongside.
pub async fn b5(n: usize, writes: usize) -> Result<Vec<Row>> {
    let dir = tempfile_dir()?;
    let (nodes, edges) = b5_mesh(dir.path(), n, EngineConfig::default()).await?;
    // Wire duplicates: gossip copies received minus those that were new.
    let wire = |nodes: &[NodeHandle]| -> u64 {
        nodes
            .iter()
            .map(|x| {
                let (all, new) = x.gossip_received();
                all.saturating_sub(new)
            })
            .sum()
    };
    let (wire0, dups0) = (wire(&nodes), duplicates_received(&nodes));
    let mut lat = Vec::new();
    let mut wrng = rand::rngs::StdRng::seed_from_u64(55);
    for k in 0..writes {
        let t = Instant::now();
        nodes[0]
            .write(DEFAULT_NAMESPACE, workload_w(&mut wrng, 100, 0))
            .await?;
        every_node_holds(&nodes[1..], (k + 1) as u64).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Late copies still in flight when the last node got the batch: give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let wire_dups = (wire(&nodes) - wire0) as f64 / writes as f64;
    let engine_dups = (duplicates_received(&nodes) - dups0) as f64 / writes as f64;
    for node in &nodes {
        node.shutdown().await;
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    // The simulator on the very same graph.
    let sim = blazedb_sim::run(blazedb_sim::SimConfig {
        nodes: n,
        edges,
        latency_ms: (0, 1),
        writers: 1,
        writes_per_writer: writes,
        ops_per_write: 100,
        ..blazedb_sim::SimConfig::default()
    });
    Ok(vec![
        Row {
            id: "B5",
            what: format!("{n} real nodes, loopback: write -> held by all, p50/p99/max (ms)"),
            value: p(0.5),
            unit: "ms",
            ratio: None,
            baseline: Some(format!("p99 {:.1} ms, max {:.1} ms", p(0.99), p(1.0))),
        },
        Row {
            id: "B5",
            what: format!("{n} real nodes: duplicate gossip copies on the wire, per batch"),
            value: wire_dups,
            unit: "dups",
            ratio: Some(wire_dups / sim.duplicates_per_batch.max(1e-9)),
            baseline: Some(format!(
                "simulator on the same graph: {:.1}; copies reaching the engine: {engine_dups:.1}",
                sim.duplicates_per_batch
            )),
        },
    ])
}

/// Bytes received on the loopback interface so far (every node of a bench mesh talks over
/// it; TLS and framing included), from /proc/net/dev.
fn loopback_rx_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.trim_start().starts_with("lo:"))
                .and_then(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One B5L mesh run's figures.
struct LargeMeshRun {
    /// Milliseconds from each write until every node held it, sorted.
    lat_ms: Vec<f64>,
    /// Loopback bytes over the writes / (batch bytes written × (n − 1)).
    wire_ratio: f64,
    /// Batches that reached an engine again after it held them, per batch written.
    engine_dups: f64,
}

async fn b5_large_run(n: usize, writes: usize, engine: EngineConfig) -> Result<LargeMeshRun> {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile_dir()?;
    let (nodes, _) = b5_mesh(dir.path(), n, engine).await?;
    let mut wrng = rand::rngs::StdRng::seed_from_u64(56);
    let calls: Vec<Vec<RawOp>> = (0..writes)
        .map(|_| workload_w_raw(&mut wrng, W_BATCH_OPS))
        .collect();
    let (rx0, dups0) = (loopback_rx_bytes(), duplicates_received(&nodes));
    let bytes0 = nodes[0].metrics().local_bytes.load(Relaxed);
    let mut lat = Vec::new();
    for (k, call) in calls.iter().enumerate() {
        let t = Instant::now();
        nodes[0]
            .write_built(DEFAULT_NAMESPACE, built_call(call)?)
            .await?;
        every_node_holds(&nodes[1..], (k + 1) as u64).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Late copies still in flight when the last node got the batch: give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = nodes[0].metrics().local_bytes.load(Relaxed) - bytes0;
    let wire = loopback_rx_bytes().saturating_sub(rx0);
    let dups = duplicates_received(&nodes) - dups0;
    for node in &nodes {
        node.shutdown().await;
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Ok(LargeMeshRun {
        lat_ms: lat,
        wire_ratio: wire as f64 / (written as f64 * (n - 1) as f64).max(1.0),
        engine_dups: dups as f64 / writes as f64,
    })
}

/// B5L: bulk writes (5k workload-W ops, ~375 KB each) from one node of an `n`-node mesh:
/// pushed and announced around gossip (the default), against the same writes gossiped
/// (`push_min_bytes` = `usize::MAX`) on the same graph in the same run.
pub async fn b5_large(n: usize, writes: usize) -> Result<Vec<Row>> {
    let pushed = b5_large_run(n, writes, EngineConfig::default()).await?;
    let gossiped = b5_large_run(
        n,
        writes,
        EngineConfig {
            push_min_bytes: usize::MAX,
            ..EngineConfig::default()
        },
    )
    .await?;
    let p50 = |l: &[f64]| l[(l.len() - 1) / 2];
    let max = |l: &[f64]| l[l.len() - 1];
    Ok(vec![
        Row {
            id: "B5L",
            what: format!("{n} real nodes, 5k-op writes (push tree): held by all, p50 (ms)"),
            value: p50(&pushed.lat_ms),
            unit: "ms",
            ratio: Some(p50(&pushed.lat_ms) / p50(&gossiped.lat_ms)),
            baseline: Some(format!(
                "max {:.1} ms; gossiped: p50 {:.1} ms, max {:.1} ms",
                max(&pushed.lat_ms),
                p50(&gossiped.lat_ms),
                max(&gossiped.lat_ms)
            )),
        },
        Row {
            id: "B5L",
            what: format!("{n} real nodes, 5k-op writes: loopback bytes / (batch x (n-1))"),
            value: pushed.wire_ratio,
            unit: "x",
            ratio: Some(pushed.wire_ratio / gossiped.wire_ratio),
            baseline: Some(format!(
                "gossiped: {:.2}x; copies reaching an engine twice, per batch: {:.1} pushed, \
                 {:.1} gossiped",
                gossiped.wire_ratio, pushed.engine_dups, gossiped.engine_dups
            )),
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::Machine;

    #[test]
    fn a_report_names_its_machine() {
        let m = Machine::detect();
        assert!(m.logical_cpus >= 1);
        assert!(m.date.ends_with("GMT"), "{}", m.date);
        #[cfg(target_os = "linux")]
        {
            assert_ne!(m.cpu, "unknown");
            assert!(m.memory_gib > 0.0);
            assert!(m.os.starts_with("linux "), "{}", m.os);
        }
        let line = m.line();
        assert!(line.contains(&m.cpu) && line.contains(m.blazedb), "{line}");
    }

    /// The counters read from /proc/self/stat move with what the process does: touching
    /// 32 MiB of fresh memory faults pages in, and spinning uses CPU time.
    #[cfg(target_os = "linux")]
    #[test]
    fn page_faults_and_cpu_are_read_from_proc() {
        let (faults0, cpu0) = (super::minor_faults(), super::cpu_secs());
        assert!(faults0 > 0, "a running process has faulted pages in");
        let mut fresh = vec![0u8; 32 << 20];
        for page in fresh.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&fresh);
        assert!(
            super::minor_faults() >= faults0 + 1_000,
            "8,192 pages touched"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::cpu_secs() < cpu0 + 0.05 {
            assert!(std::time::Instant::now() < deadline, "CPU time never moved");
            std::hint::black_box((0..10_000u64).sum::<u64>());
        }
    }

    /// B5L's wire figure: the loopback counter grows by at least the bytes sent over it.
    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_bytes_count_what_crosses_loopback() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let before = super::loopback_rx_bytes();
        let sent = 4 * 1024 * 1024;
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            buf.len()
        });
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(&vec![7u8; sent]).unwrap();
        drop(c);
        assert_eq!(reader.join().unwrap(), sent);
        let grown = super::loopback_rx_bytes() - before;
        assert!(
            grown >= sent as u64,
            "loopback grew {grown} bytes for {sent} sent"
        );
    }
}
