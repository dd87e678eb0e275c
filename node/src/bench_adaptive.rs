//! B2s: many concurrent small writers, adaptive batching on vs off.
//!
//! `WRITERS` tasks each put `PUTS_PER_WRITER` single-op records through `NodeHandle::put`,
//! one after another (each waits for its write to be durable), against one node. Once with the
//! default batching (coalescing, adaptive flush delay), once with [`BatchingConfig::off`] (one
//! batch per call, still group-committed), and once coalescing with no flush delay (what the
//! adaptive delay adds). Then the same writers as HTTP clients (`PUT /v1/ns/default/..`, one
//! keep-alive connection each), on and off. Reports ops/s, p50/p99 call latency and batches
//! sealed per 1,000 writes; figures are medians of `runs` runs, the modes interleaved.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Result;

use crate::batcher::BatchingConfig;
use crate::bench::Row;
use crate::node::{Node, DEFAULT_NAMESPACE};

/// Concurrent writers.
pub const WRITERS: usize = 64;
/// Single-op puts per writer per run.
pub const PUTS_PER_WRITER: usize = 200;
/// Single-op HTTP PUTs per client per run.
pub const HTTP_PUTS_PER_CLIENT: usize = 50;

struct Run {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    batches_per_k: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

async fn one_run(batching: BatchingConfig, seed: u64, http: bool) -> Result<Run> {
    let dir = std::env::temp_dir().join(format!(
        "blazedb-b2s-{}-{seed}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let node = Node::builder()
        .data_dir(&dir)
        .listen(vec!["/ip4/127.0.0.1/tcp/0".parse()?])
        .mdns(false)
        .batching(batching)
        .spawn()
        .await?;
    let base = if http {
        let listener = crate::api::bind("127.0.0.1:0".parse()?).await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(crate::api::serve(
            node.clone(),
            listener,
            std::future::pending(),
        ));
        Some(base)
    } else {
        None
    };
    let puts = if http {
        HTTP_PUTS_PER_CLIENT
    } else {
        PUTS_PER_WRITER
    };
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(WRITERS);
    for w in 0..WRITERS {
        let node = node.clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut lat = Vec::with_capacity(puts);
            for i in 0..puts {
                let mut fields = serde_json::Map::new();
                fields.insert("v".into(), serde_json::Value::from(i as u64));
                fields.insert("w".into(), serde_json::Value::from(w as u64));
                let key = format!("w{w:03}-{i:05}");
                let c = Instant::now();
                match &base {
                    Some(base) => {
                        let resp = client
                            .put(format!("{base}/v1/ns/{DEFAULT_NAMESPACE}/tick/{key}"))
                            .json(&fields)
                            .send()
                            .await?;
                        anyhow::ensure!(resp.status().is_success(), "PUT: {}", resp.status());
                    }
                    None => {
                        node.put(DEFAULT_NAMESPACE, "tick", &key, fields).await?;
                    }
                }
                lat.push(c.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::with_capacity(WRITERS * PUTS_PER_WRITER);
    for t in tasks {
        lat.extend(t.await??);
    }
    let secs = t.elapsed().as_secs_f64();
    let batches = node.metrics().batches_sealed.load(Ordering::Relaxed) as f64;
    node.shutdown().await;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = lat.len();
    Ok(Run {
        ops_per_s: n as f64 / secs,
        p50_ms: lat[n / 2],
        p99_ms: lat[(n * 99 / 100).min(n - 1)],
        batches_per_k: batches * 1000.0 / n as f64,
    })
}

/// B2s: `WRITERS` concurrent single-op writers, adaptive batching vs one batch per call.
pub async fn b2s(runs: usize) -> Result<Vec<Row>> {
    let no_delay = BatchingConfig {
        max_delay: std::time::Duration::ZERO,
        ..BatchingConfig::default()
    };
    let (mut on, mut off, mut nod, mut h_on, mut h_off) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..runs.max(1) {
        let seed = run as u64;
        on.push(one_run(BatchingConfig::default(), seed, false).await?);
        off.push(one_run(BatchingConfig::off(), seed, false).await?);
        nod.push(one_run(no_delay.clone(), seed, false).await?);
        h_on.push(one_run(BatchingConfig::default(), seed, true).await?);
        h_off.push(one_run(BatchingConfig::off(), seed, true).await?);
    }
    let m = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let rate = |r: &Run| r.ops_per_s;
    let (rate_on, rate_off) = (m(&on, rate), m(&off, rate));
    let writes = WRITERS * PUTS_PER_WRITER;
    let off_name = "one batch per call (batching off)";
    let mut rows = vec![
        Row {
            id: "B2s",
            what: format!("{WRITERS} writers x single-op put, adaptive batching, {writes} writes"),
            value: rate_on,
            unit: "ops/s",
            ratio: Some(rate_on / rate_off),
            baseline: Some(format!("{off_name}: {rate_off:.0} ops/s")),
        },
        Row {
            id: "B2s",
            what: "same, batches sealed per 1,000 writes".into(),
            value: m(&on, |r| r.batches_per_k),
            unit: "batches",
            ratio: None,
            baseline: Some(format!("{off_name}: {:.0}", m(&off, |r| r.batches_per_k))),
        },
    ];
    for (what, f) in [
        ("p50", (|r: &Run| r.p50_ms) as fn(&Run) -> f64),
        ("p99", |r: &Run| r.p99_ms),
    ] {
        let (a, b) = (m(&on, f), m(&off, f));
        rows.push(Row {
            id: "B2s",
            what: format!("same, put latency {what} (until durable)"),
            value: a,
            unit: "ms",
            ratio: Some(a / b),
            baseline: Some(format!("{off_name}: {b:.2} ms")),
        });
    }
    let rate_nod = m(&nod, rate);
    rows.push(Row {
        id: "B2s",
        what: "same, coalescing but no flush delay (max_delay 0)".into(),
        value: rate_nod,
        unit: "ops/s",
        ratio: Some(rate_nod / rate_on),
        baseline: Some(format!(
            "adaptive above; {:.1} batches/1k writes, p99 {:.2} ms",
            m(&nod, |r| r.batches_per_k),
            m(&nod, |r| r.p99_ms)
        )),
    });
    let (hr_on, hr_off) = (m(&h_on, rate), m(&h_off, rate));
    rows.push(Row {
        id: "B2s",
        what: format!(
            "{WRITERS} HTTP clients x single-op PUT, adaptive, {} writes",
            WRITERS * HTTP_PUTS_PER_CLIENT
        ),
        value: hr_on,
        unit: "ops/s",
        ratio: Some(hr_on / hr_off),
        baseline: Some(format!("{off_name}: {hr_off:.0} ops/s")),
    });
    for (what, f) in [
        ("p50", (|r: &Run| r.p50_ms) as fn(&Run) -> f64),
        ("p99", |r: &Run| r.p99_ms),
    ] {
        let (a, b) = (m(&h_on, f), m(&h_off, f));
        rows.push(Row {
            id: "B2s",
            what: format!("same (HTTP), PUT latency {what}"),
            value: a,
            unit: "ms",
            ratio: Some(a / b),
            baseline: Some(format!("{off_name}: {b:.2} ms")),
        });
    }
    Ok(rows)
}
