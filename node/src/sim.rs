//! `blazedb sim`: runs the deterministic mesh simulator (`blazedb-sim`) on a named scenario or
//! on flags, prints a table (or JSON), and can sweep many seeds checking the safety
//! invariants; a failing seed is printed so it can be replayed with `--seed`.

use std::time::Instant;

use anyhow::{bail, Result};
use blazedb_sim::{check_invariants, run, Partition, SimConfig, SimReport};

/// Arguments of `blazedb sim`.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Scenario: lan-50, wan-1000, partition-heal-200, game-lobby-64, mesh-10k.
    #[arg(default_value = "lan-50")]
    pub scenario: String,
    /// Seed (first seed when sweeping).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run this many seeds (seed, seed+1, …) and check the invariants of each.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Override the number of nodes.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Override the message loss probability.
    #[arg(long)]
    pub loss: Option<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The shipped scenarios.
pub fn scenario(name: &str) -> Result<SimConfig> {
    let base = SimConfig::default();
    Ok(match name {
        "lan-50" => SimConfig { nodes: 50, latency_ms: (1, 5), ..base },
        "wan-1000" => SimConfig {
            nodes: 1_000,
            latency_ms: (20, 150),
            writers: 10,
            writes_per_writer: 10,
            write_interval_ms: 500,
            ..base
        },
        "partition-heal-200" => SimConfig {
            nodes: 200,
            latency_ms: (5, 50),
            writers: 10,
            writes_per_writer: 20,
            partition: Some(Partition { start_ms: 500, end_ms: 5_000, fraction: 0.4 }),
            ..base
        },
        "game-lobby-64" => SimConfig {
            nodes: 64,
            degree: 8,
            latency_ms: (5, 40),
            writers: 64,
            writes_per_writer: 50,
            write_interval_ms: 50,
            ops_per_write: 1,
            keys: 64,
            anti_entropy_ms: 500,
            ..base
        },
        "mesh-10k" => SimConfig {
            nodes: 10_000,
            degree: 6,
            latency_ms: (10, 100),
            writers: 20,
            writes_per_writer: 5,
            write_interval_ms: 1_000,
            ..base
        },
        other => bail!(
            "unknown scenario {other:?}: lan-50, wan-1000, partition-heal-200, game-lobby-64, mesh-10k"
        ),
    })
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn print_table(name: &str, r: &SimReport, wall_s: f64) {
    println!("scenario {name}  seed-trace {:016x}", r.trace_hash);
    let rows: Vec<(&str, String)> = vec![
        ("nodes", r.nodes.to_string()),
        (
            "batches written / everywhere",
            format!("{} / {}", r.batches, r.batches_everywhere),
        ),
        (
            "time until all hold a write p50/p90/p99/max",
            format!(
                "{} / {} / {} / {} ms",
                r.latency_p50_ms, r.latency_p90_ms, r.latency_p99_ms, r.latency_max_ms
            ),
        ),
        (
            "duplicate deliveries per batch",
            format!("{:.1}", r.duplicates_per_batch),
        ),
        ("messages / bytes", format!("{} / {}", r.messages, r.bytes)),
        (
            "wire bytes per op written",
            format!("{:.0}", r.bytes_per_op),
        ),
        (
            "heal -> converged",
            r.heal_to_converged_ms
                .map_or("-".into(), |ms| format!("{ms} ms")),
        ),
        (
            "converged / rejected",
            format!("{} / {}", r.converged, r.rejected),
        ),
        ("virtual time", format!("{} ms", r.sim_time_ms)),
        ("wall time", format!("{wall_s:.2} s")),
        (
            "peak memory",
            peak_rss_mb().map_or("-".into(), |m| format!("{m:.0} MB")),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<46} {v}");
    }
}

/// Runs `blazedb sim`.
pub fn main(args: SimArgs) -> Result<()> {
    let mut cfg = scenario(&args.scenario)?;
    if let Some(n) = args.nodes {
        cfg.nodes = n;
    }
    if let Some(l) = args.loss {
        if !(0.0..1.0).contains(&l) {
            bail!("--loss must be in [0, 1)");
        }
        cfg.loss = l;
    }
    let mut failures = Vec::new();
    for seed in args.seed..args.seed + args.seeds.max(1) {
        cfg.seed = seed;
        let t = Instant::now();
        let r = run(cfg.clone());
        let wall = t.elapsed().as_secs_f64();
        if args.seeds <= 1 {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_table(&args.scenario, &r, wall);
            }
        }
        if let Err(e) = check_invariants(&r) {
            eprintln!(
                "seed {seed}: {e} (replay: blazedb sim {} --seed {seed})",
                args.scenario
            );
            failures.push(seed);
        }
    }
    if args.seeds > 1 {
        println!(
            "{} seeds of {}: {} failed",
            args.seeds,
            args.scenario,
            failures.len()
        );
    }
    if !failures.is_empty() {
        bail!("invariants violated for seeds {failures:?}");
    }
    Ok(())
}
