//! Placement report: kiln's strategy against the anchors (First-Fit, Best-Fit, Kubernetes MostAllocated,
//! Livepeer least-loaded) on seeded traces, against the lower bound LB = max over dimensions ⌈Σ demand / node
//! capacity⌉. Pure computation (`kiln-binpack`), no daemons.
//!
//! - static: a snapshot sized for ~100 nodes and ~1,000 nodes (3 seeds each), placed as one batch → nodes
//!   used / LB;
//! - online: daily cycle, a node failure every 4 h — 3 seeds × 24 h on 100 nodes, 3 seeds × 6 h on 1,000 nodes
//!   (the simulation is single-threaded) → node-hours / LB node-hours, peak nodes used / LB, refusals, failover
//!   losses;
//! - online, kiln again with hourly consolidation (`kiln_binpack::consolidate`: empty the least-loaded nodes onto
//!   nodes in use, ≤ 1 % of the mean stream count moved per pass), with moves per placed stream;
//! - decision latency of one `place` call at 1,000 nodes, p50/p99.
//!
//! Run: `cargo bench -p kiln-benches --bench placement`.

use kiln_binpack::sim::{online, online_with, static_snapshot};
use kiln_binpack::Strategy;

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn main() {
    let seeds = [1u64, 2, 3];
    println!("## static snapshots: nodes used / LB (mean over seeds)\n");
    println!("| streams | LB | kiln | first-fit | best-fit | most-allocated | least-loaded |");
    println!("|---|---|---|---|---|---|---|");
    // ~100 and ~1,000 L4-class nodes of the mix
    for (n, nseeds) in [(6_000usize, 3usize), (60_000, 3)] {
        let seeds = &seeds[..nseeds];
        let k = nseeds as f64;
        let mut row = format!(
            "| {n} ({nseeds} seed{}) |",
            if nseeds > 1 { "s" } else { "" }
        );
        let lb: f64 = seeds
            .iter()
            .map(|&s| static_snapshot(s, n, Strategy::Kiln).1 as f64)
            .sum::<f64>()
            / k;
        row.push_str(&format!(" {lb:.0} |"));
        for st in Strategy::ALL {
            let r: f64 = seeds
                .iter()
                .map(|&s| {
                    let (used, lb) = static_snapshot(s, n, st);
                    used as f64 / lb as f64
                })
                .sum::<f64>()
                / k;
            row.push_str(&format!(" {r:.3} |"));
        }
        println!("{row}");
    }

    println!("\n## online, node failure every 4 h (100 nodes: 24 h, 3 seeds; 1,000 nodes: 6 h, 3 seeds)\n");
    println!("| fleet | strategy | node-hours / LB | peak used / LB | refusals | failover lost | moves / placed |");
    println!("|---|---|---|---|---|---|---|");
    for (fleet, mean, hours, nseeds) in [(100usize, 5_000.0, 24, 3usize), (1_000, 50_000.0, 6, 3)] {
        // kiln twice: placing only, and with hourly consolidation (≤ 1 % of the fleet's mean streams moved per pass)
        let budget = (mean / 50.0) as usize;
        let plans: Vec<(Strategy, Option<(u64, usize)>)> = Strategy::ALL
            .iter()
            .map(|&s| (s, None))
            .chain(std::iter::once((Strategy::Kiln, Some((60, budget)))))
            .collect();
        for (st, consolidate) in plans {
            let runs: Vec<_> = seeds[..nseeds]
                .iter()
                .map(|&s| online_with(s, fleet, mean, hours, 4, st, false, consolidate))
                .collect();
            let k = runs.len() as f64;
            let nh: f64 = runs
                .iter()
                .map(|r| r.node_hours / r.lb_node_hours)
                .sum::<f64>()
                / k;
            let peak: f64 = runs.iter().map(|r| r.peak_ratio).sum::<f64>() / k;
            let refusals: usize = runs.iter().map(|r| r.refusals).sum();
            let lost: usize = runs.iter().map(|r| r.failover_lost).sum();
            let moves: usize = runs.iter().map(|r| r.moves).sum();
            let placed: usize = runs.iter().map(|r| r.placed).sum();
            let name = match consolidate {
                Some((every, budget)) => {
                    format!("{st:?} + consolidation every {every} min (≤ {budget} moves)")
                }
                None => format!("{st:?}"),
            };
            println!(
                "| {fleet} | {name} | {nh:.3} | {peak:.3} | {refusals} | {lost} | {:.4} |",
                moves as f64 / placed.max(1) as f64
            );
        }
    }

    println!("\n## decision latency at 1,000 nodes (one place() call, this host)\n");
    for st in Strategy::ALL {
        let mut ns = online(1, 1_000, 50_000.0, 1, 0, st, true).decision_ns;
        println!(
            "- {st:?}: p50 {:.1} µs, p99 {:.1} µs over {} decisions",
            pct(&mut ns, 0.5) as f64 / 1e3,
            pct(&mut ns, 0.99) as f64 / 1e3,
            ns.len()
        );
    }
}
