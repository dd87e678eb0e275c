//! B2 as a criterion bench: local durable ingest of one workload-W call (5,000 ops) through
//! the embedding API (`NodeHandle::write`: HLC stamping, pruning, sealing, one durable log
//! transaction; the records are materialized off the write path), against raw redb storing
//! the same sealed batch bytes as one value in one durable transaction, in the same process.
//! At the end the ratio of the two (mean time per call over the measured samples) is printed.
//!
//! Unlike `blazedb bench --only b2` (40 calls by default, a burst that fits in the
//! materializer's 64-job queue), criterion makes hundreds of calls, so the embedding-API
//! figure is the sustained one: once the materializer's queue is full, a write waits for it.
//!
//! `cargo bench -p blazedb-node --bench ingest`; `cargo test -p blazedb-node --benches` runs
//! each routine once as a smoke test.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use rand::SeedableRng;

use blazedb_node::bench::{workload_w, W_BATCH_OPS};
use blazedb_node::{Node, DEFAULT_NAMESPACE};
use blazedb_protocol::Op;

/// Samples per routine (flat sampling: each sample is one `iter_custom` call).
const SAMPLES: usize = 20;

/// Raw redb table: call number → sealed batch bytes.
const RAW: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("raw");

/// (iterations, time) of every `iter_custom` call of one routine; the last [`SAMPLES`] are
/// criterion's measured samples (the ones before are its warm-up).
#[derive(Default)]
struct Calls(Mutex<Vec<(u64, Duration)>>);

impl Calls {
    fn record(&self, iters: u64, took: Duration) {
        if let Ok(mut v) = self.0.lock() {
            v.push((iters, took));
        }
    }

    /// Mean seconds per call over the measured samples (`None` in test mode, where each
    /// routine runs once).
    fn mean_secs(&self) -> Option<f64> {
        let v = self.0.lock().ok()?;
        if v.len() < SAMPLES {
            return None;
        }
        let measured = &v[v.len().saturating_sub(SAMPLES)..];
        let iters: u64 = measured.iter().map(|(i, _)| i).sum();
        let secs: f64 = measured.iter().map(|(_, d)| d.as_secs_f64()).sum();
        (iters > 0).then(|| secs / iters as f64)
    }
}

fn b2_ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let node = rt
        .block_on(
            Node::builder()
                .data_dir(dir.path().join("node"))
                .listen(vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")])
                .mdns(false)
                .spawn(),
        )
        .expect("starting the node");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    // A few distinct calls, reused round robin (generating W is not what is measured).
    let pool: Vec<Vec<Op>> = (0..8)
        .map(|_| workload_w(&mut rng, W_BATCH_OPS, 0))
        .collect();
    // The bytes a node stores for such a call, sealed by the same write path.
    let sealed = blazedb_node::bench_gossip::sealed_w_batches(1, 2)
        .expect("sealing")
        .remove(0);
    let db = redb::Database::create(dir.path().join("raw.redb")).expect("raw redb");

    let (api, raw) = (Calls::default(), Calls::default());
    let mut g = c.benchmark_group("b2_durable_ingest_5k_op_call");
    g.throughput(Throughput::Elements(W_BATCH_OPS as u64))
        .sample_size(SAMPLES)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(8));
    let mut call = 0usize;
    g.bench_function("embedding_api_write", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let ops = pool[call % pool.len()].clone();
                call += 1;
                let t = Instant::now();
                rt.block_on(node.write(DEFAULT_NAMESPACE, ops))
                    .expect("durable write");
                took += t.elapsed();
            }
            api.record(iters, took);
            took
        })
    });
    let mut key = 0u64;
    g.bench_function("raw_redb_same_bytes", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                key += 1;
                let txn = db.begin_write().expect("txn");
                txn.open_table(RAW)
                    .expect("table")
                    .insert(key, sealed.as_slice())
                    .expect("insert");
                txn.commit().expect("durable commit");
            }
            let took = t.elapsed();
            raw.record(iters, took);
            took
        })
    });
    g.finish();
    rt.block_on(node.shutdown());
    if let (Some(api), Some(raw)) = (api.mean_secs(), raw.mean_secs()) {
        let ops = W_BATCH_OPS as f64;
        println!(
            "B2 (criterion): embedding API {:.0} ops/s, raw redb same bytes {:.0} ops/s, \
             ratio {:.3}x",
            ops / api,
            ops / raw,
            raw / api
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    b2_ingest(&mut c);
    c.final_summary();
}
