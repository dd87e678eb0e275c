//! `blazedb sim`: runs the deterministic mesh simulator (`blazedb-sim`) on a named scenario or
//! on flags, prints a table (or JSON), and can sweep many seeds checking the safety
//! invariants; a failing seed is printed so it can be replayed with `--seed`.

use std::time::Instant;

use anyhow::{bail, Result};
use blazedb_sim::{check_invariants, run, SimConfig, SimReport};

/// Arguments of `blazedb sim`.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// A shipped scenario (lan-50, wan-1000, partition-heal-200, churn-500, game-lobby-64,
    /// mesh-10k, bulk-200) or the path of a scenario file (TOML, fields of `SimConfig`).
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
    /// Compare with a baseline report (JSON from `--json`); fail on a regression.
    #[arg(long)]
    pub compare: Option<std::path::PathBuf>,
    /// Write report.json and plots (latency CDF, convergence, bandwidth; SVG) into this
    /// directory.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// The shipped scenario files (`simulations/scenarios/`).
pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "lan-50",
        include_str!("../../simulations/scenarios/lan-50.toml"),
    ),
    (
        "wan-1000",
        include_str!("../../simulations/scenarios/wan-1000.toml"),
    ),
    (
        "partition-heal-200",
        include_str!("../../simulations/scenarios/partition-heal-200.toml"),
    ),
    (
        "churn-500",
        include_str!("../../simulations/scenarios/churn-500.toml"),
    ),
    (
        "game-lobby-64",
        include_str!("../../simulations/scenarios/game-lobby-64.toml"),
    ),
    (
        "mesh-10k",
        include_str!("../../simulations/scenarios/mesh-10k.toml"),
    ),
    (
        "bulk-200",
        include_str!("../../simulations/scenarios/bulk-200.toml"),
    ),
];

/// Parses a scenario file's text.
pub fn parse_scenario(text: &str) -> Result<SimConfig> {
    let cfg: SimConfig = toml::from_str(text)?;
    if cfg.nodes == 0 || cfg.nodes > 100_000 {
        bail!("nodes must be 1..=100000");
    }
    if !(0.0..1.0).contains(&cfg.loss) || !(0.0..1.0).contains(&cfg.duplicate) {
        bail!("loss and duplicate must be probabilities in [0, 1)");
    }
    if cfg.latency_ms.0 > cfg.latency_ms.1 {
        bail!("latency_ms must be [min, max]");
    }
    Ok(cfg)
}

/// A shipped scenario by name, or a scenario file by path.
pub fn scenario(name: &str) -> Result<SimConfig> {
    if let Some((_, text)) = SCENARIOS.iter().find(|(n, _)| *n == name) {
        return parse_scenario(text);
    }
    let path = std::path::Path::new(name);
    if path.extension().is_some_and(|e| e == "toml") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        return parse_scenario(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
    bail!(
        "unknown scenario {name:?}: one of {} or a .toml file",
        names.join(", ")
    )
}

/// Regressions of `now` against `base`: the dissemination tail, duplicates and bytes per op
/// may not grow by more than 10% (plus a small absolute slack), and safety may not degrade.
pub fn regressions(base: &SimReport, now: &SimReport) -> Vec<String> {
    let mut out = Vec::new();
    let worse = |name: &str, b: f64, n: f64, slack: f64, out: &mut Vec<String>| {
        if n > b * 1.10 + slack {
            out.push(format!("{name}: {b:.1} -> {n:.1}"));
        }
    };
    worse(
        "latency p99 ms",
        base.latency_p99_ms as f64,
        now.latency_p99_ms as f64,
        5.0,
        &mut out,
    );
    worse(
        "latency max ms",
        base.latency_max_ms as f64,
        now.latency_max_ms as f64,
        5.0,
        &mut out,
    );
    worse(
        "duplicates/batch",
        base.duplicates_per_batch,
        now.duplicates_per_batch,
        0.5,
        &mut out,
    );
    worse(
        "bytes/op",
        base.bytes_per_op,
        now.bytes_per_op,
        1.0,
        &mut out,
    );
    if base.converged && !now.converged {
        out.push("no longer converges".into());
    }
    if now.batches_everywhere < now.batches {
        out.push(format!(
            "{} of {} batches reached everyone",
            now.batches_everywhere, now.batches
        ));
    }
    out
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
            "mean share of nodes reached per write",
            format!("{:.4}", r.reach),
        ),
        (
            "restart -> caught up (median / max)",
            r.rejoin_catch_up_ms
                .map_or("-".into(), |(m, x)| format!("{m} / {x} ms")),
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
    let baseline: Option<SimReport> = match &args.compare {
        Some(p) => Some(serde_json::from_str(&std::fs::read_to_string(p)?)?),
        None => None,
    };
    let mut failures = Vec::new();
    for seed in args.seed..args.seed + args.seeds.max(1) {
        cfg.seed = seed;
        let t = Instant::now();
        let r = if args.seeds <= 1 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} virtual {pos} / {len} ms  [{elapsed_precise}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let r = blazedb_sim::run_with_progress(cfg.clone(), &mut |now, stop| {
                bar.set_length(stop);
                bar.set_position(now);
            });
            bar.finish_and_clear();
            r
        } else {
            run(cfg.clone())
        };
        let wall = t.elapsed().as_secs_f64();
        if let Some(dir) = &args.out {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&r)?)?;
            let plots = blazedb_sim::write_plots(&r, dir).map_err(|e| anyhow::anyhow!(e))?;
            for p in plots {
                eprintln!("wrote {}", p.display());
            }
        }
        if args.seeds <= 1 {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_table(&args.scenario, &r, wall);
            }
        }
        if let Some(base) = &baseline {
            let found = regressions(base, &r);
            for f in &found {
                eprintln!(
                    "regression against {}: {f}",
                    args.compare.as_ref().unwrap().display()
                );
            }
            if !found.is_empty() {
                failures.push(seed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_parse() {
        for (name, text) in SCENARIOS {
            let cfg = parse_scenario(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cfg.nodes >= 50, "{name}");
        }
        assert!(parse_scenario("nodes = 0").is_err());
        assert!(
            parse_scenario("nodes = 5\nbogus = 1").is_err(),
            "unknown fields are refused"
        );
        assert!(scenario("no-such").is_err());
    }

    /// The regression guard: the shipped lan-50 run must not regress against its committed
    /// baseline (the run is deterministic, so any change here is a real behaviour change).
    #[test]
    fn lan_50_matches_its_baseline() {
        let base: SimReport =
            serde_json::from_str(include_str!("../../simulations/baselines/lan-50.json")).unwrap();
        let now = run(scenario("lan-50").unwrap());
        check_invariants(&now).unwrap();
        assert_eq!(regressions(&base, &now), Vec::<String>::new());
        // And the guard does flag a worse run.
        let mut worse = now.clone();
        worse.latency_p99_ms = base.latency_p99_ms * 2 + 10;
        assert!(!regressions(&base, &worse).is_empty());
    }

    #[test]
    fn plots_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let r = run(scenario("lan-50").unwrap());
        let files = blazedb_sim::write_plots(&r, dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        for f in files {
            let svg = std::fs::read_to_string(&f).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("<polyline"),
                "{}",
                f.display()
            );
        }
    }
}
