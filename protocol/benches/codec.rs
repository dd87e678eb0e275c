//! B1 as a criterion bench: the compact batch codec against plain serde+ciborium on the same
//! workload-W ops (5,000 per batch, uniformly random keys over 1M records, 3 fields of 8–64
//! bytes, 10% deletes), one core. `cargo bench -p blazedb-protocol --bench codec`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use blazedb_protocol::{codec, squeeze, CheckedOps, FieldValue, Hlc, Op, OpsBuilder, Value};

/// Workload W from a fixed-seed xorshift (the bench needs no RNG crate).
fn workload(n: usize) -> Vec<Op> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    };
    (0..n)
        .map(|i| {
            let key = format!("k{:07}", next(1_000_000));
            let hlc = Hlc(1 + i as u64);
            if next(10) == 0 {
                return Op::Delete {
                    collection: "bench".into(),
                    key,
                    hlc,
                };
            }
            let fields: blazedb_protocol::OpFields = ["a", "b", "c"]
                .iter()
                .map(|f| {
                    let len = 8 + next(57);
                    let v: String = (0..len).map(|_| (b'a' + next(26) as u8) as char).collect();
                    (f.to_string(), Value::String(v))
                })
                .collect();
            Op::Upsert {
                collection: "bench".into(),
                key,
                hlc,
                fields,
            }
        })
        .collect()
}

fn b1(c: &mut Criterion) {
    let ops = workload(5_000);
    let mut compact = Vec::new();
    codec::encode_ops(&ops, &mut compact);
    let mut plain = Vec::new();
    ciborium::into_writer(&ops, &mut plain).unwrap();

    let mut g = c.benchmark_group("b1_codec_5k_ops");
    g.throughput(Throughput::Elements(ops.len() as u64));
    g.bench_function("encode/compact", |b| {
        let mut out = Vec::with_capacity(compact.len());
        b.iter(|| {
            out.clear();
            codec::encode_ops(&ops, &mut out);
            out.len()
        })
    });
    g.bench_function("encode/serde_ciborium", |b| {
        let mut out = Vec::with_capacity(plain.len());
        b.iter(|| {
            out.clear();
            ciborium::into_writer(&ops, &mut out).unwrap();
            out.len()
        })
    });
    // A call from the app's own data to a payload ready to seal: built (checked, encoded as
    // each op is added, pruned as a payload) against owned ops made, checked, pruned and
    // encoded ahead. The app's data here: each op's strings, borrowed from `ops`.
    g.bench_function("call/ops_builder", |b| {
        b.iter(|| {
            let mut built = OpsBuilder::with_capacity(ops.len(), 128);
            for op in &ops {
                match op {
                    Op::Upsert {
                        collection,
                        key,
                        fields,
                        ..
                    } => {
                        let f: Vec<(&str, FieldValue<'_>)> = fields
                            .iter()
                            .map(|(n, v)| (n.as_str(), FieldValue::Str(v.as_str().unwrap_or(""))))
                            .collect();
                        built.upsert(collection, key, &f).unwrap();
                    }
                    Op::Delete {
                        collection, key, ..
                    } => built.delete(collection, key).unwrap(),
                    _ => unreachable!("W has upserts and deletes"),
                }
            }
            built.into_checked().len()
        })
    });
    g.bench_function("call/owned_ops", |b| {
        b.iter(|| {
            let mut checked = CheckedOps::new(ops.clone()).unwrap();
            checked.encode_ahead();
            checked.len()
        })
    });
    g.bench_function("decode/compact_view", |b| {
        b.iter(|| codec::decode(&compact).unwrap().len())
    });
    g.bench_function("decode/compact_owned", |b| {
        b.iter(|| codec::decode(&compact).unwrap().to_ops().len())
    });
    g.bench_function("decode/serde_ciborium", |b| {
        b.iter(|| {
            ciborium::from_reader::<Vec<Op>, _>(&plain[..])
                .unwrap()
                .len()
        })
    });
    g.bench_function("blake3/compact_payload", |b| {
        b.iter(|| *blake3::hash(&compact).as_bytes())
    });
    for level in [-5, -1, 1, 3] {
        let z = zstd::bulk::compress(&compact, level).unwrap();
        eprintln!(
            "zstd level {level}: {:.1} B/op (uncompressed {:.1})",
            z.len() as f64 / ops.len() as f64,
            compact.len() as f64 / ops.len() as f64
        );
        g.bench_function(format!("zstd/level_{level}"), |b| {
            b.iter(|| zstd::bulk::compress(&compact, level).unwrap().len())
        });
    }
    // What sealing runs: this thread's reused context, the strong, fast and fastest level
    // (negative levels with the literals still entropy-coded; see `squeeze`).
    for (name, level) in [
        ("strong", squeeze::STRONG_LEVEL),
        ("fast", squeeze::FAST_LEVEL),
        ("fastest", squeeze::FASTEST_LEVEL),
    ] {
        let z = squeeze::compress(&compact, level).unwrap();
        eprintln!(
            "seal zstd {name} (level {level}): {:.1} B/op",
            z.len() as f64 / ops.len() as f64
        );
        g.bench_function(format!("zstd/seal_{name}"), |b| {
            b.iter(|| squeeze::compress(&compact, level).unwrap().len())
        });
    }
    g.finish();
}

criterion_group!(benches, b1);
criterion_main!(benches);
