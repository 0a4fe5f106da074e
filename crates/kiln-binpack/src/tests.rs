use super::*;
use proptest::prelude::{prop_assert, prop_assert_eq, proptest};

fn gpu_node(id: &str, gpus: usize) -> Node {
    Node {
        id: id.into(),
        host_capacity: Resources {
            cpu_millicores: 16_000,
            memory_mib: 64_000,
            ..Default::default()
        },
        gpus: (0..gpus)
            .map(|_| Gpu {
                capacity: Resources {
                    nvenc_fps: 1400,
                    nvdec_fps: 2800,
                    encoder_sessions: 1024,
                    vram_mib: 20_000,
                    ..Default::default()
                },
                used: Resources::default(),
            })
            .collect(),
        accepting: true,
        ..Default::default()
    }
}

fn stream(nvenc: u64, cpu: u64) -> Demand {
    Demand {
        host: Resources {
            cpu_millicores: cpu,
            memory_mib: 100,
            ..Default::default()
        },
        gpu: (nvenc > 0).then_some(Resources {
            nvenc_fps: nvenc,
            nvdec_fps: 30,
            encoder_sessions: 3,
            vram_mib: 600,
            ..Default::default()
        }),
        pixel_rate: nvenc * 2_073_600,
    }
}

fn over_committed(nodes: &[Node]) -> bool {
    nodes.iter().any(|n| {
        n.host_capacity.short_dimension(&n.host_used).is_some()
            || n.gpus
                .iter()
                .any(|g| g.capacity.short_dimension(&g.used).is_some())
    })
}

#[test]
fn gpu_part_must_fit_on_one_gpu() {
    // two half-full GPUs: 800 free in total but 400 on each, so a 500-fps stream does not fit
    let mut n = gpu_node("a", 2);
    n.gpus[0].used.nvenc_fps = 1000;
    n.gpus[1].used.nvenc_fps = 1000;
    for s in Strategy::ALL {
        assert_eq!(
            place(std::slice::from_ref(&n), &stream(500, 100), s),
            None,
            "{s:?}"
        );
    }
    assert!(place(&[n], &stream(300, 100), Strategy::Kiln).is_some());
}

#[test]
fn cpu_streams_never_land_on_a_gpu_and_dead_nodes_take_nothing() {
    let mut nodes = vec![gpu_node("a", 1), gpu_node("b", 1)];
    nodes[0].accepting = false;
    let s = place(&nodes, &stream(0, 500), Strategy::Kiln).unwrap();
    assert_eq!(s, Slot { node: 1, gpu: None });
}

#[test]
fn lower_bound_is_the_tightest_dimension() {
    let n = gpu_node("a", 1);
    let demands = vec![stream(700, 100); 5]; // 3500 fps of NVENC over 1400-fps nodes
    assert_eq!(lower_bound(&n, &demands), 3);
}

#[test]
fn kiln_packs_at_least_as_tight_as_first_fit_on_a_mixed_batch() {
    // big GPU ladders and CPU-heavy streams: complementary packing matters
    let demands: Vec<Demand> = (0..60)
        .map(|i| {
            if i % 3 == 0 {
                stream(0, 3000)
            } else {
                stream(350, 300)
            }
        })
        .collect();
    let used = |s: Strategy| {
        let mut nodes: Vec<Node> = (0..40).map(|i| gpu_node(&format!("n{i}"), 1)).collect();
        let r = place_batch(&mut nodes, &demands, s);
        assert!(r.iter().all(Option::is_some), "{s:?} refused something");
        assert!(!over_committed(&nodes));
        nodes
            .iter()
            .filter(|n| n.host_used != Resources::default())
            .count()
    };
    let kiln = used(Strategy::Kiln);
    let lb = lower_bound(&gpu_node("x", 1), &demands) as usize;
    assert!(kiln >= lb);
    assert!(kiln <= used(Strategy::FirstFit), "kiln {kiln}");
    assert!(
        kiln <= used(Strategy::LeastLoaded),
        "kiln {kiln} vs least-loaded"
    );
}

#[test]
fn solve_keeps_what_still_fits_and_falls_back_to_the_second_choice() {
    let mut nodes = vec![gpu_node("a", 1), gpu_node("b", 0)];
    nodes[0].gpus[0].capacity.nvenc_fps = 500;
    let item = |id: &str, alts: Vec<Demand>| Item {
        id: id.into(),
        alternatives: alts,
    };
    let problem = Problem {
        nodes,
        items: vec![
            item("gpu", vec![stream(400, 100)]),
            item("prefers-gpu", vec![stream(400, 100), stream(0, 3000)]),
            item("cpu", vec![stream(0, 1000)]),
        ],
        strategy: Strategy::Kiln,
    };
    let s = solve(&problem, &[]);
    assert!(s.refused.is_empty(), "{:?}", s.refused);
    let by_id =
        |s: &Solution, id: &str| s.assignments.iter().find(|a| a.id == id).cloned().unwrap();
    // one 400-fps stream fits the 500-fps GPU; the other takes its x264 alternative
    let g = by_id(&s, "gpu");
    let p = by_id(&s, "prefers-gpu");
    assert_eq!((g.node.as_str(), g.gpu, g.alternative), ("a", Some(0), 0));
    assert_eq!((p.gpu, p.alternative), (None, 1));
    // the same problem with the answer as previous keeps every assignment
    let again = solve(&problem, &s.assignments);
    assert_eq!(again.assignments, s.assignments);
    // node a stops accepting: its items move, nothing lands on a
    let mut p2 = problem.clone();
    p2.nodes[0].accepting = false;
    let moved = solve(&p2, &s.assignments);
    assert!(moved.assignments.iter().all(|a| a.node == "b"));
    assert_eq!(moved.refused, vec!["gpu".to_string()]);
}

proptest! {
    /// No strategy ever over-commits a GPU or a node, whatever arrives; identical input gives identical
    /// output; everything refused really fits nowhere.
    #[test]
    fn never_over_commits_and_is_deterministic(
        seeds in proptest::collection::vec((0u64..900, 0u64..6000), 1..120),
        nodes_n in 1usize..12,
        gpus in 0usize..4,
        si in 0usize..5,
    ) {
        let strategy = Strategy::ALL[si];
        let demands: Vec<Demand> = seeds.iter().map(|&(g, c)| stream(g, c)).collect();
        let fleet: Vec<Node> = (0..nodes_n).map(|i| gpu_node(&format!("n{i}"), gpus)).collect();
        let mut a = fleet.clone();
        let ra = place_batch(&mut a, &demands, strategy);
        prop_assert!(!over_committed(&a));
        for (d, r) in demands.iter().zip(&ra) {
            if r.is_none() {
                prop_assert!(place(&a, d, strategy).is_none(), "refused but fits");
            }
        }
        let mut b = fleet;
        prop_assert_eq!(ra, place_batch(&mut b, &demands, strategy));
        prop_assert_eq!(a, b);
    }

    /// Consolidation never over-commits, only moves streams onto nodes already in use, and empties every
    /// node it takes streams from; nodes in use never increase.
    #[test]
    fn consolidation_empties_nodes_without_over_commit(
        seeds in proptest::collection::vec((0u64..500, 100u64..3000), 1..60),
        departures in proptest::collection::vec(proptest::bool::ANY, 60),
    ) {
        let demands: Vec<Demand> = seeds.iter().map(|&(g, c)| stream(g, c)).collect();
        let mut nodes: Vec<Node> = (0..8).map(|i| gpu_node(&format!("n{i}"), 1)).collect();
        let slots = place_batch(&mut nodes, &demands, Strategy::FirstFit);
        // some streams leave, leaving holes
        let mut running = Vec::new();
        for (i, (d, s)) in demands.iter().zip(&slots).enumerate() {
            let Some(s) = s else { continue };
            if departures[i % departures.len()] {
                let n = &mut nodes[s.node];
                n.host_used = n.host_used.minus(&d.host);
                if let (Some(g), Some(gd)) = (s.gpu, d.gpu) {
                    n.gpus[g].used = n.gpus[g].used.minus(&gd);
                }
            } else {
                running.push((*d, *s));
            }
        }
        let in_use = |ns: &[Node]| ns.iter().filter(|n| n.host_used != Resources::default()).count();
        let before_nodes = nodes.clone();
        let before = in_use(&nodes);
        let moves = consolidate(&mut nodes, &running, 1000);
        prop_assert!(!over_committed(&nodes));
        prop_assert!(in_use(&nodes) <= before);
        for &(i, s) in &moves {
            prop_assert!(before_nodes[s.node].host_used != Resources::default(), "moved onto an empty node");
            prop_assert!(s.node != running[i].1.node);
            let from = running[i].1.node;
            prop_assert!(nodes[from].host_used == Resources::default(), "a source node was not emptied");
        }
    }

    /// Failover: the streams of a dead node are re-placed on the others whenever they fit.
    #[test]
    fn failover_replaces_what_fits(seeds in proptest::collection::vec((0u64..500, 100u64..2000), 1..40)) {
        let demands: Vec<Demand> = seeds.iter().map(|&(g, c)| stream(g, c)).collect();
        let mut nodes: Vec<Node> = (0..4).map(|i| gpu_node(&format!("n{i}"), 1)).collect();
        let first = place_batch(&mut nodes, &demands, Strategy::Kiln);
        // node 0 dies: its streams go back into the pool
        let lost: Vec<Demand> = demands.iter().zip(&first)
            .filter(|(_, s)| s.is_some_and(|s| s.node == 0)).map(|(d, _)| *d).collect();
        nodes[0] = Node { accepting: false, ..gpu_node("n0", 1) };
        let again = place_batch(&mut nodes, &lost, Strategy::Kiln);
        prop_assert!(!over_committed(&nodes));
        for (d, s) in lost.iter().zip(&again) {
            prop_assert!(s.is_none_or(|s| s.node != 0));
            if s.is_none() {
                prop_assert!(place(&nodes, d, Strategy::Kiln).is_none());
            }
        }
    }
}
