//! kiln-binpack: where a stream should run, as a pure function of the fleet's state (no I/O, no clock).
//!
//! A stream's demand has two parts (DESIGN.md §5–6): a *GPU part* (NVENC/NVDEC throughput, encoder sessions,
//! VRAM) that must fit on **one** GPU, and a *host part* (CPU, memory) that must fit on the node. Feasibility is
//! checked at both levels; nothing here can over-commit either.
//!
//! Among feasible (node, GPU) pairs, [`Strategy::Kiln`] scores with the scarcity-weighted L2 norm of the bin's
//! remaining capacity after placement (the norm-based greedy of Panigrahy et al. 2011, "Heuristics for Vector
//! Bin Packing"): dimensions are normalised by capacity and weighted by how scarce they are fleet-wide, so a
//! stream goes where it leaves the least, and least of what is scarce. A stranded-resource penalty discourages
//! placements that exhaust one dimension of a bin while leaving capacity on others that no stream could use.
//! Ties break on node order, so results are deterministic.
//!
//! The anchors the benchmarks compare against: First-Fit, Best-Fit (least remaining after placement, summed over
//! normalised dimensions), Kubernetes `MostAllocated` (highest mean utilisation after placement) and Livepeer's
//! least-loaded (fewest Σ w·h·fps already running).
//!
//! [`solve`] is the entry point the scheduler service uses: a [`Problem`] (nodes with what they already run,
//! items with their demand alternatives) and the previous assignments (kept where they still fit) give
//! [`Solution`]. [`place`], [`place_batch`] and [`commit`] are its parts; [`sim`] drives them with seeded traces
//! for the placement report (`benches/placement.rs`).

pub mod sim;

use kiln_model::capacity::{Dimension, Resources};

/// How many dimensions a resource vector has (the index space of the per-dimension arrays here).
const DIMS: usize = Dimension::ALL.len();
use serde::{Deserialize, Serialize};

/// What one stream needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Demand {
    /// CPU and memory on the node.
    pub host: Resources,
    /// NVENC/NVDEC/sessions/VRAM on one GPU; `None` for a CPU-only stream.
    pub gpu: Option<Resources>,
    /// Σ width·height·fps of its renditions (Livepeer's load unit).
    pub pixel_rate: u64,
}

/// One GPU of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Gpu {
    pub capacity: Resources,
    pub used: Resources,
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub host_capacity: Resources,
    pub host_used: Resources,
    pub gpus: Vec<Gpu>,
    /// Σ pixel rate of what runs there (for the least-loaded anchor).
    pub pixel_rate: u64,
    /// Dead or draining nodes take nothing.
    pub accepting: bool,
}

/// Where a stream goes: node index and, for a GPU demand, the GPU index on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub node: usize,
    pub gpu: Option<usize>,
}

/// Placement policies: kiln's and the anchors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Kiln,
    FirstFit,
    BestFit,
    MostAllocated,
    LeastLoaded,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::Kiln,
        Strategy::FirstFit,
        Strategy::BestFit,
        Strategy::MostAllocated,
        Strategy::LeastLoaded,
    ];
}

fn get(r: &Resources, d: usize) -> u64 {
    r.get(Dimension::ALL[d])
}

fn fits(cap: &Resources, used: &Resources, add: &Resources) -> bool {
    cap.minus(used).short_dimension(add).is_none()
        && (0..DIMS).all(|d| {
            // a dimension the bin lacks (capacity 0) only takes demands of 0
            get(cap, d) > 0 || get(add, d) == 0
        })
}

/// Fleet-wide scarcity weight per dimension: demanded (used + this demand) over capacity, so dimensions that run
/// out first weigh most. Dimensions nobody has weigh 0.
fn scarcity(nodes: &[Node], demand: &Demand) -> [f64; 6] {
    let mut cap = Resources::default();
    let mut used = Resources::default();
    for n in nodes.iter().filter(|n| n.accepting) {
        cap = cap.plus(&n.host_capacity);
        used = used.plus(&n.host_used);
        for g in &n.gpus {
            cap = cap.plus(&g.capacity);
            used = used.plus(&g.used);
        }
    }
    let want = used
        .plus(&demand.host)
        .plus(&demand.gpu.unwrap_or_default());
    let mut w = [0.0; 6];
    for (d, wd) in w.iter_mut().enumerate() {
        let c = get(&cap, d);
        if c > 0 {
            *wd = (get(&want, d) as f64 / c as f64).max(1e-3);
        }
    }
    w
}

/// The bin a candidate lands in: the node's host vector joined with the chosen GPU's vector.
fn bin(node: &Node, gpu: Option<usize>) -> (Resources, Resources) {
    let (gc, gu) = gpu
        .and_then(|g| node.gpus.get(g))
        .map_or((Resources::default(), Resources::default()), |g| {
            (g.capacity, g.used)
        });
    (node.host_capacity.plus(&gc), node.host_used.plus(&gu))
}

fn norm(v: &Resources, cap: &Resources, d: usize) -> f64 {
    let c = get(cap, d);
    if c == 0 {
        0.0
    } else {
        get(v, d) as f64 / c as f64
    }
}

fn score(
    strategy: Strategy,
    w: &[f64; 6],
    node: &Node,
    gpu: Option<usize>,
    demand: &Demand,
) -> f64 {
    let (cap, used) = bin(node, gpu);
    let add = demand.host.plus(&demand.gpu.unwrap_or_default());
    let after = used.plus(&add);
    let dims = 0..DIMS;
    match strategy {
        Strategy::Kiln => {
            // scarcity-weighted L2 norm of what the bin would have left: small = a tight fit, weighted so that
            // leftovers on the fleet's scarce dimensions count most (Panigrahy et al.'s norm-based greedy)
            let left: Vec<(usize, f64)> = dims
                .filter(|&d| get(&cap, d) > 0)
                .map(|d| (d, 1.0 - norm(&after, &cap, d)))
                .collect();
            let l2 = left.iter().map(|&(d, r)| w[d] * r * r).sum::<f64>().sqrt();
            // stranded resources: once a dimension is (nearly) exhausted, what is left on the others cannot be
            // sold; penalise placements that strand much
            let exhausted = left.iter().any(|&(_, r)| r < 0.05);
            let stranded: f64 = if exhausted {
                left.iter()
                    .filter(|&&(_, r)| r >= 0.05)
                    .map(|&(d, r)| w[d] * r)
                    .sum()
            } else {
                0.0
            };
            -l2 - 0.5 * stranded
        }
        Strategy::FirstFit => 0.0,
        Strategy::BestFit => -dims
            .map(|d| 1.0 - norm(&after, &cap, d))
            .filter(|r| *r > 0.0)
            .sum::<f64>(),
        Strategy::MostAllocated => {
            let used_dims: Vec<f64> = dims
                .filter(|&d| get(&cap, d) > 0)
                .map(|d| norm(&after, &cap, d))
                .collect();
            used_dims.iter().sum::<f64>() / used_dims.len().max(1) as f64
        }
        Strategy::LeastLoaded => -(node.pixel_rate as f64),
    }
}

/// The best slot for `demand` under `strategy`, or `None` when nothing fits anywhere. Deterministic: ties go
/// to the lower node index, then the lower GPU index.
pub fn place(nodes: &[Node], demand: &Demand, strategy: Strategy) -> Option<Slot> {
    let w = scarcity(nodes, demand);
    let mut best: Option<(f64, Slot)> = None;
    for (i, n) in nodes.iter().enumerate() {
        if !n.accepting || !fits(&n.host_capacity, &n.host_used, &demand.host) {
            continue;
        }
        let gpus: Vec<Option<usize>> = match &demand.gpu {
            None => vec![None],
            Some(g) => n
                .gpus
                .iter()
                .enumerate()
                .filter(|(_, x)| fits(&x.capacity, &x.used, g))
                .map(|(j, _)| Some(j))
                .collect(),
        };
        for gpu in gpus {
            let s = score(strategy, &w, n, gpu, demand);
            if best.is_none_or(|(b, _)| s > b + 1e-12) {
                best = Some((s, Slot { node: i, gpu }));
            }
            if strategy == Strategy::FirstFit {
                return best.map(|(_, s)| s);
            }
        }
    }
    best.map(|(_, s)| s)
}

/// Books `demand` into `slot` (the caller has a slot from [`place`]).
pub fn commit(nodes: &mut [Node], slot: Slot, demand: &Demand) {
    let n = &mut nodes[slot.node];
    n.host_used = n.host_used.plus(&demand.host);
    n.pixel_rate += demand.pixel_rate;
    if let (Some(g), Some(d)) = (slot.gpu, demand.gpu) {
        n.gpus[g].used = n.gpus[g].used.plus(&d);
    }
}

/// Places a batch (failover, a VOD burst). Returns one slot (or `None`, refused) per demand, in the input order.
///
/// [`Strategy::Kiln`] packs bin-centrically (after Panigrahy et al.'s bin-centric dot-product heuristics, lifted
/// to two levels): it fills one node at a time, each time taking the waiting demand whose (scarcity-weighted,
/// capacity-normalised) vector is most aligned (cosine) with what the node — and the GPU it would use — has
/// left, plus the share of that hole it fills, so shapes mix (an NVENC-heavy VOD next to VRAM-heavy 720p
/// ladders) instead of one kind filling a GPU and stranding the rest. Measured on the simulator's mix (seed 1,
/// 6,000 streams, LB 113 nodes): plain dot product 121 nodes (= first-fit-decreasing), cosine alone 124, this
/// 118.
/// Kiln also runs its scoring item by item, largest first, and keeps whichever plan opens fewer nodes (so a batch
/// never packs worse than decreasing order). The anchors place item by item, largest first.
pub fn place_batch(
    nodes: &mut [Node],
    demands: &[Demand],
    strategy: Strategy,
) -> Vec<Option<Slot>> {
    if strategy != Strategy::Kiln {
        return place_batch_decreasing(nodes, demands, strategy);
    }
    // A small portfolio, each run on a copy: the bin-centric packer and first-fit-decreasing with kiln's
    // scoring. The plan that places the most and opens the fewest nodes wins (ties: the bin-centric one).
    let busy = |ns: &[Node]| {
        ns.iter()
            .filter(|n| n.host_used != Resources::default())
            .count()
    };
    let mut a = nodes.to_vec();
    let ra = place_batch_bin_centric(&mut a, demands);
    let mut b = nodes.to_vec();
    let rb = place_batch_decreasing(&mut b, demands, Strategy::Kiln);
    let placed = |r: &[Option<Slot>]| r.iter().filter(|s| s.is_some()).count();
    let a_key = (std::cmp::Reverse(placed(&ra)), busy(&a));
    let b_key = (std::cmp::Reverse(placed(&rb)), busy(&b));
    if b_key < a_key {
        nodes.clone_from_slice(&b);
        rb
    } else {
        nodes.clone_from_slice(&a);
        ra
    }
}

fn place_batch_bin_centric(nodes: &mut [Node], demands: &[Demand]) -> Vec<Option<Slot>> {
    let w = scarcity(nodes, &Demand::default());
    // identical demands form one group (first appearance order: deterministic)
    let mut groups: Vec<(Demand, Vec<usize>)> = Vec::new();
    for (i, d) in demands.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| g == d) {
            Some((_, v)) => v.push(i),
            None => groups.push((*d, vec![i])),
        }
    }
    for (_, v) in &mut groups {
        v.reverse(); // pop() hands out the lowest index first
    }
    let mut out = vec![None; demands.len()];
    for n in 0..nodes.len() {
        if !nodes[n].accepting {
            continue;
        }
        loop {
            let mut best: Option<(f64, usize, Option<usize>)> = None;
            for (gi, (d, waiting)) in groups.iter().enumerate() {
                if waiting.is_empty()
                    || !fits(&nodes[n].host_capacity, &nodes[n].host_used, &d.host)
                {
                    continue;
                }
                let gpus: Vec<Option<usize>> = match &d.gpu {
                    None => vec![None],
                    Some(g) => nodes[n]
                        .gpus
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| fits(&x.capacity, &x.used, g))
                        .map(|(j, _)| Some(j))
                        .collect(),
                };
                for gpu in gpus {
                    let (cap, used) = bin(&nodes[n], gpu);
                    let add = d.host.plus(&d.gpu.unwrap_or_default());
                    let left = cap.minus(&used);
                    // cosine between the demand and what is left (weighted, normalised): the demand whose shape
                    // best matches the hole, whatever its size, so kinds mix
                    let (mut dot, mut a2, mut l2) = (0.0, 0.0, 0.0);
                    for (k, wk) in w.iter().enumerate() {
                        let (a, l) = (norm(&add, &cap, k), norm(&left, &cap, k));
                        dot += wk * a * l;
                        a2 += wk * a * a;
                        l2 += wk * l * l;
                    }
                    // plus how much of the hole it fills: big demands plug what small ones would leave
                    let dot = if a2 > 0.0 && l2 > 0.0 {
                        dot / (a2.sqrt() * l2.sqrt()) + a2.sqrt() / l2.sqrt()
                    } else {
                        0.0
                    };
                    if best.is_none_or(|(b, _, _)| dot > b + 1e-12) {
                        best = Some((dot, gi, gpu));
                    }
                }
            }
            let Some((_, gi, gpu)) = best else {
                break;
            };
            let d = groups[gi].0;
            let i = groups[gi].1.pop().expect("non-empty group");
            let slot = Slot { node: n, gpu };
            commit(nodes, slot, &d);
            out[i] = Some(slot);
        }
    }
    out
}

fn place_batch_decreasing(
    nodes: &mut [Node],
    demands: &[Demand],
    strategy: Strategy,
) -> Vec<Option<Slot>> {
    let w = scarcity(nodes, &Demand::default());
    let mut cap = Resources::default();
    for n in nodes.iter() {
        cap = cap.plus(&n.host_capacity);
        for g in &n.gpus {
            cap = cap.plus(&g.capacity);
        }
    }
    let size = |d: &Demand| -> f64 {
        let v = d.host.plus(&d.gpu.unwrap_or_default());
        (0..DIMS).map(|k| w[k] * norm(&v, &cap, k)).sum()
    };
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| {
        size(&demands[b])
            .total_cmp(&size(&demands[a]))
            .then(a.cmp(&b))
    });
    let mut out = vec![None; demands.len()];
    for i in order {
        if let Some(s) = place(nodes, &demands[i], strategy) {
            commit(nodes, s, &demands[i]);
            out[i] = Some(s);
        }
    }
    out
}

/// One stream to place: what it needs, in order of preference (`prefer-gpu`: the NVENC demand, then the x264
/// one; `gpu-only` or `cpu-only`: one alternative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub alternatives: Vec<Demand>,
}

/// A placement problem: the fleet (with what already runs booked in `used`) and the items to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub nodes: Vec<Node>,
    pub items: Vec<Item>,
    pub strategy: Strategy,
}

/// Where one item runs: node id, GPU index on it (for a GPU demand) and which alternative was booked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: String,
    pub node: String,
    pub gpu: Option<usize>,
    pub alternative: usize,
}

/// The answer: assignments in item order, the ids that fit nowhere, and the fleet with everything booked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Solution {
    pub assignments: Vec<Assignment>,
    pub refused: Vec<String>,
    pub nodes: Vec<Node>,
}

/// Places `problem.items`. An item with a previous assignment stays where it is when that node still accepts
/// and the booked alternative still fits there (streams are not moved to pack tighter); the others are placed as
/// one batch per alternative rank (all first choices together, largest first or bin-centric as
/// [`place_batch`] does, then the second choices of those refused, …). Deterministic; never over-commits.
// Long by design: keep previous assignments, then place the rest decreasing; both halves share the bin state.
pub fn solve(problem: &Problem, previous: &[Assignment]) -> Solution {
    let mut nodes = problem.nodes.clone();
    let mut out: Vec<Option<Assignment>> = vec![None; problem.items.len()];
    for (i, item) in problem.items.iter().enumerate() {
        let Some(prev) = previous.iter().find(|a| a.id == item.id) else {
            continue;
        };
        let Some(n) = nodes.iter().position(|n| n.id == prev.node && n.accepting) else {
            continue;
        };
        let Some(d) = item.alternatives.get(prev.alternative) else {
            continue;
        };
        let host_ok = fits(&nodes[n].host_capacity, &nodes[n].host_used, &d.host);
        let gpu_ok = match (&d.gpu, prev.gpu) {
            (None, None) => true,
            (Some(g), Some(j)) => nodes[n]
                .gpus
                .get(j)
                .is_some_and(|x| fits(&x.capacity, &x.used, g)),
            _ => false,
        };
        if host_ok && gpu_ok {
            commit(
                &mut nodes,
                Slot {
                    node: n,
                    gpu: prev.gpu,
                },
                d,
            );
            out[i] = Some(prev.clone());
        }
    }
    let ranks = problem
        .items
        .iter()
        .map(|it| it.alternatives.len())
        .max()
        .unwrap_or(0);
    for rank in 0..ranks {
        let waiting: Vec<usize> = (0..problem.items.len())
            .filter(|&i| out[i].is_none() && problem.items[i].alternatives.len() > rank)
            .collect();
        if waiting.is_empty() {
            continue;
        }
        let demands: Vec<Demand> = waiting
            .iter()
            .map(|&i| problem.items[i].alternatives[rank])
            .collect();
        let slots = if demands.len() == 1 {
            let s = place(&nodes, &demands[0], problem.strategy);
            if let Some(s) = s {
                commit(&mut nodes, s, &demands[0]);
            }
            vec![s]
        } else {
            place_batch(&mut nodes, &demands, problem.strategy)
        };
        for (&i, slot) in waiting.iter().zip(slots) {
            if let Some(s) = slot {
                out[i] = Some(Assignment {
                    id: problem.items[i].id.clone(),
                    node: nodes[s.node].id.clone(),
                    gpu: s.gpu,
                    alternative: rank,
                });
            }
        }
    }
    let refused = problem
        .items
        .iter()
        .zip(&out)
        .filter(|(_, a)| a.is_none())
        .map(|(it, _)| it.id.clone())
        .collect();
    Solution {
        assignments: out.into_iter().flatten().collect(),
        refused,
        nodes,
    }
}

/// Plans moves that empty lightly loaded nodes: for each node in use, least loaded first (by its fullest
/// normalised dimension), if **everything** on it fits on other nodes already in use (never on an empty node),
/// those streams are re-placed there and the node is empty afterwards. `running` is what runs: (demand, slot).
/// Returns the moves as (index into `running`, new slot), at most `max_moves`, and books them in `nodes`.
///
/// Live streams cannot be packed better one arrival at a time once departures have left holes (arrivals and
/// lifetimes are independent of the packing); moving a few streams in the quiet hours is what brings nodes used
/// back to the lower bound. A move costs viewers a discontinuity (the new node starts its own timeline), so the
/// caller rations it.
pub fn consolidate(
    nodes: &mut [Node],
    running: &[(Demand, Slot)],
    max_moves: usize,
) -> Vec<(usize, Slot)> {
    let load = |n: &Node| -> f64 {
        let (cap, used) = (n.host_capacity, n.host_used);
        let mut m: f64 = (0..DIMS).map(|d| norm(&used, &cap, d)).fold(0.0, f64::max);
        for g in &n.gpus {
            m = m.max(
                (0..DIMS)
                    .map(|d| norm(&g.used, &g.capacity, d))
                    .fold(0.0, f64::max),
            );
        }
        m
    };
    let in_use = |n: &Node| n.host_used != Resources::default();
    let mut order: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].accepting && in_use(&nodes[i]))
        .collect();
    order.sort_by(|&a, &b| load(&nodes[a]).total_cmp(&load(&nodes[b])).then(a.cmp(&b)));
    let mut moves: Vec<(usize, Slot)> = Vec::new();
    let mut moved: Vec<bool> = vec![false; running.len()];
    let mut emptied: Vec<bool> = vec![false; nodes.len()];
    // a node that took moved streams is not emptied afterwards (no stream moves twice in one pass)
    let mut received: Vec<bool> = vec![false; nodes.len()];
    for &c in &order {
        if emptied[c] || received[c] {
            continue;
        }
        let items: Vec<usize> = (0..running.len())
            .filter(|&i| !moved[i] && running[i].1.node == c)
            .collect();
        if items.is_empty() || moves.len() + items.len() > max_moves {
            continue;
        }
        // targets: other nodes in use (not emptied, not this one)
        let mut trial = nodes.to_vec();
        for (i, n) in trial.iter_mut().enumerate() {
            n.accepting = n.accepting && i != c && !emptied[i] && in_use(n);
        }
        let demands: Vec<Demand> = items.iter().map(|&i| running[i].0).collect();
        let slots = place_batch_decreasing(&mut trial, &demands, Strategy::Kiln);
        if slots.iter().any(Option::is_none) {
            continue;
        }
        // apply: release from c, book on the targets
        for (&i, s) in items.iter().zip(&slots) {
            let s = s.expect("all placed");
            let (d, old) = running[i];
            let n = &mut nodes[old.node];
            n.host_used = n.host_used.minus(&d.host);
            n.pixel_rate = n.pixel_rate.saturating_sub(d.pixel_rate);
            if let (Some(gpu), Some(gd)) = (old.gpu.and_then(|g| n.gpus.get_mut(g)), d.gpu) {
                gpu.used = gpu.used.minus(&gd);
            }
            commit(nodes, s, &d);
            moved[i] = true;
            received[s.node] = true;
            moves.push((i, s));
        }
        emptied[c] = true;
    }
    moves
}

/// Lower bound on the nodes a set of demands needs, for identical nodes shaped like `node`: the maximum over
/// dimensions of ⌈Σ demand / per-node capacity⌉ (GPU dimensions summed over the node's GPUs).
pub fn lower_bound(node: &Node, demands: &[Demand]) -> u64 {
    let mut per_node = node.host_capacity;
    for g in &node.gpus {
        per_node = per_node.plus(&g.capacity);
    }
    let total = demands.iter().fold(Resources::default(), |acc, d| {
        acc.plus(&d.host).plus(&d.gpu.unwrap_or_default())
    });
    (0..DIMS)
        .filter(|&d| get(&total, d) > 0)
        .map(|d| {
            let c = get(&per_node, d);
            if c == 0 {
                u64::MAX
            } else {
                get(&total, d).div_ceil(c)
            }
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
