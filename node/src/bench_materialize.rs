//! B2m: the materializer alone — the bound of readable ingest, two-node replication (B3) and
//! catch-up (B6), since the log runs ahead of the records only as far as the materializer's
//! bounded queue allows.
//!
//! Sealed workload-W batches (5,000 ops, random keys over 1M records) are applied to a fresh
//! store's records with [`Store::apply_with`] in transactions of the materializer's size
//! (50,000 ops, non-durable, no change events), exactly as the materializer thread does.
//! Baseline in the same run: raw redb inserting one value of the same size per distinct record
//! touched, in the same key order and transaction size (no read, no merge, no encoding): the
//! price of the B-tree alone.
//!
//! `BLAZEDB_B2M_DELTA_MB` sets the delta size (default: the node's), for the size trade-off
//! recorded in ARCHITECTURE.md.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use rand::SeedableRng;

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, ChainPosition};
use blazedb_protocol::VerifiedBatch;

use crate::bench::{median, tempfile_dir, workload_w, Row, W_BATCH_OPS};
use crate::materializer::{self, Job, MatSync};
use crate::node::DEFAULT_NAMESPACE;
use crate::store::{record_key, Store};

/// Ops per view transaction (the materializer's `OPS_PER_TXN`).
const TXN_OPS: usize = 50_000;

/// Sealed, chained workload-W batches of one author.
pub fn sealed_batches(seed: u64, total_ops: usize) -> Result<Vec<VerifiedBatch>> {
    let kp = Keypair::from_seed([seed as u8; 32]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<VerifiedBatch> = Vec::new();
    let mut hlc = 1u64 << 40;
    for seq in 1..=total_ops.div_ceil(W_BATCH_OPS) as u64 {
        let ops = workload_w(&mut rng, W_BATCH_OPS, hlc);
        hlc += W_BATCH_OPS as u64;
        let prev = out.last().map(|b| b.id);
        out.push(batch::seal(
            &kp,
            DEFAULT_NAMESPACE,
            ChainPosition { seq, prev },
            ops,
            None,
        )?);
    }
    Ok(out)
}

/// Runs B2m: `total_ops` ops applied, median of `runs`.
pub fn b2m(total_ops: usize, runs: usize) -> Result<Vec<Row>> {
    let per_txn = TXN_OPS / W_BATCH_OPS;
    let delta_bytes = std::env::var("BLAZEDB_B2M_DELTA_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(materializer::STAGED_FLUSH_BYTES, |mb| mb << 20);
    let (mut rates, mut raw_rates, mut readable, mut direct) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut grown, mut estimated, mut heap) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let batches = sealed_batches(200 + run as u64, total_ops)?;
        let ops: usize = batches.iter().map(|b| b.ops.len()).sum();
        let dir = tempfile_dir()?;
        let store = Arc::new(Store::open(&dir.path().join("store.redb"))?);
        let sync = Arc::new(MatSync::default());
        let (changes, _) = tokio::sync::broadcast::channel(16);
        let (tx, thread) = materializer::spawn(store.clone(), sync.clone(), changes, delta_bytes);
        // The raw baseline below needs the keys: keep them, hand the batches over.
        let keys_per_txn: Vec<Vec<Vec<u8>>> = batches
            .chunks(per_txn)
            .map(|chunk| {
                let mut keys: Vec<Vec<u8>> = Vec::new();
                for b in chunk {
                    let view = b.ops.view()?;
                    keys.extend(view.ops().iter().map(|op| {
                        record_key(DEFAULT_NAMESPACE, view.collection(op), view.key(op))
                    }));
                }
                keys.sort_unstable();
                keys.dedup();
                Ok(keys)
            })
            .collect::<Result<_>>()?;
        let rss_before = crate::bench::rss_bytes();
        let t = Instant::now();
        for b in batches {
            sync.submitted(1);
            tx.send(Job::Apply(vec![b]))
                .map_err(|_| anyhow::anyhow!("materializer stopped"))?;
        }
        sync.wait_applied().map_err(|e| anyhow::anyhow!(e))?;
        readable.push(ops as f64 / t.elapsed().as_secs_f64());
        // The delta's memory: the process's growth while the ops moved from the (freed)
        // batches into it, and the store's own estimate that bounds it.
        grown.push(crate::bench::rss_bytes().saturating_sub(rss_before) as f64 / ops as f64);
        estimated.push(store.staged_bytes() as f64 / ops as f64);
        heap.push(store.staged_heap_bytes() as f64 / ops as f64);
        drop(tx);
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("materializer panicked"))?;
        rates.push(ops as f64 / t.elapsed().as_secs_f64());
        let (n_records, n_bytes) = store.view_size()?;
        // Raw redb: one value of the stored state's size per distinct record of each txn.
        let value_len = (n_bytes / n_records.max(1)) as usize;
        drop(store);

        // The previous design: each job applied straight to the view file (read-modify-write
        // per record, 50k-op non-durable transactions), on this thread.
        std::fs::create_dir_all(dir.path().join("direct"))?;
        let direct_store = Store::open(&dir.path().join("direct").join("store.redb"))?;
        let batches = sealed_batches(200 + run as u64, total_ops)?;
        let t = Instant::now();
        for chunk in batches.chunks(per_txn) {
            direct_store.apply_with(chunk, false, false)?;
        }
        direct_store.sync_view()?;
        direct.push(ops as f64 / t.elapsed().as_secs_f64());
        drop(direct_store);
        let value = vec![0x5au8; value_len];
        let db = redb::Database::builder()
            .set_cache_size(256 * 1024 * 1024)
            .create(dir.path().join("raw.redb"))?;
        const T: redb::TableDefinition<'_, &[u8], &[u8]> = redb::TableDefinition::new("raw");
        let t = Instant::now();
        for keys in &keys_per_txn {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            {
                let mut table = txn.open_table(T)?;
                for k in keys {
                    table.insert(k.as_slice(), value.as_slice())?;
                }
            }
            txn.commit()?;
        }
        let txn = db.begin_write()?;
        txn.commit()?;
        raw_rates.push(ops as f64 / t.elapsed().as_secs_f64());
    }
    let (rate, raw) = (median(rates), median(raw_rates));
    Ok(vec![
        Row {
            id: "B2m",
            what: format!("materializer: {total_ops} W ops readable (staged in memory)"),
            value: median(readable.clone()),
            unit: "ops/s",
            ratio: Some(median(readable) / median(direct.clone())),
            baseline: Some(format!(
                "applied straight to the view file in 50k-op txns (previous design): {:.0} ops/s",
                median(direct)
            )),
        },
        Row {
            id: "B2m",
            // Counted from the table itself: the process's growth (also shown) reads low
            // whenever the delta reuses memory the process already held (the batches freed
            // as they are staged, earlier runs), down to 0 at 1M ops.
            what: "delta memory: table slots + the record blocks' chunks, per staged op".into(),
            value: median(heap),
            unit: "B/op",
            ratio: None,
            baseline: Some(format!(
                "the store's estimate, which bounds the delta: {:.0} B/op; process growth (largest of the runs): {:.0} B/op",
                median(estimated),
                grown.iter().copied().fold(0.0, f64::max)
            )),
        },
        Row {
            id: "B2m",
            what: format!("materializer: {total_ops} W ops written to the view file (durable)"),
            value: rate,
            unit: "ops/s",
            ratio: Some(rate / raw),
            baseline: Some(format!(
                "raw redb, one value per record touched, same keys and txns: {raw:.0} ops/s"
            )),
        },
    ])
}
