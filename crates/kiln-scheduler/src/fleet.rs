//! The scheduler's view of the fleet as a packing problem (pure: no I/O).
//!
//! Nodes come from heartbeats (capacity in physical units), bookings from the scheduler's own records, and a
//! stream's demand alternatives from its policy and the prices nodes report per preset.

use std::collections::{HashMap, HashSet};

use kiln_binpack::{Demand, Gpu, Node};
use kiln_model::capacity::{Dimension, GpuCostModel, Resources};
use kiln_model::node::Heartbeat;
use kiln_model::{Policy, Source, StreamRequest};

use crate::store::{NodeEntry, Phase, StreamRecord};

/// Per-dimension maximum.
pub fn max_each(a: &Resources, b: &Resources) -> Resources {
    Resources {
        cpu_millicores: a.cpu_millicores.max(b.cpu_millicores),
        memory_mib: a.memory_mib.max(b.memory_mib),
        nvenc_fps: a.nvenc_fps.max(b.nvenc_fps),
        nvdec_fps: a.nvdec_fps.max(b.nvdec_fps),
        encoder_sessions: a.encoder_sessions.max(b.encoder_sessions),
        vram_mib: a.vram_mib.max(b.vram_mib),
    }
}

/// Whether live node `node` reports `stream` live (neither ended, failed nor stopping).
pub fn runs(nodes: &[NodeEntry], node: &str, stream: &str) -> bool {
    nodes
        .iter()
        .find(|n| n.id == node)
        .and_then(|n| n.heartbeat.as_ref())
        .is_some_and(|h| reports_running(h, stream))
}

/// Whether heartbeat `h` reports a copy of `stream` that still plays (neither ended, failed nor stopping).
pub fn reports_running(h: &kiln_model::node::Heartbeat, stream: &str) -> bool {
    h.capacity.streams.iter().any(|s| {
        s.id == stream
            && !matches!(
                s.state,
                kiln_model::StreamState::Ended
                    | kiln_model::StreamState::Failed
                    | kiln_model::StreamState::Stopping
            )
    })
}

/// Node state as `GET /v1/nodes` shows it.
pub fn node_state(n: &NodeEntry) -> &'static str {
    match (&n.heartbeat, n.closed()) {
        (None, _) => "dead",
        (Some(_), true) => "draining",
        (Some(_), false) => "alive",
    }
}

/// The packing view: one [`Node`] per live node (`accepting` false when draining or excluded), with bookings
/// that are the larger of what the scheduler booked there and what the daemon says it has booked (the daemon may
/// run streams the scheduler did not place, and its report lags a placement by up to one heartbeat).
pub fn view(
    nodes: &[NodeEntry],
    records: &[StreamRecord],
    excluded: &HashSet<String>,
) -> Vec<Node> {
    // the placed records per node, in one pass (a fleet of N nodes and R streams costs N + R, not N × R)
    let mut placed: HashMap<&str, Vec<&StreamRecord>> = HashMap::new();
    for r in records.iter().filter(|r| r.phase == Phase::Placed) {
        if let Some(node) = r.node.as_deref() {
            placed.entry(node).or_default().push(r);
        }
    }
    nodes
        .iter()
        .filter_map(|n| n.heartbeat.as_ref().map(|hb| (n, hb)))
        .map(|(n, hb)| {
            let rep = &hb.capacity;
            let mut host_booked = Resources::default();
            let mut gpu_booked = vec![Resources::default(); rep.gpus.len()];
            let mut pixel_rate = 0;
            for r in placed.get(n.id.as_str()).into_iter().flatten() {
                let Some(d) = &r.demand else { continue };
                host_booked = host_booked.plus(&d.host);
                pixel_rate += d.pixel_rate;
                if let (Some(g), Some(gd)) = (r.gpu, d.gpu) {
                    if let Some(b) = gpu_booked.get_mut(g) {
                        *b = b.plus(&gd);
                    }
                }
            }
            Node {
                id: n.id.clone(),
                host_capacity: rep.host.capacity,
                // what the node's viewers take is not bookable there either (its admission keeps it free)
                host_used: max_each(&host_booked, &rep.host.allocated).plus(&Resources {
                    cpu_millicores: rep.host.serving.reserved_millicores,
                    ..Default::default()
                }),
                gpus: rep
                    .gpus
                    .iter()
                    .zip(&gpu_booked)
                    .map(|(g, b)| Gpu {
                        capacity: if g.nvenc {
                            g.capacity
                        } else {
                            Resources::default()
                        },
                        used: max_each(b, &g.allocated),
                    })
                    .collect(),
                pixel_rate,
                accepting: !n.closed() && !excluded.contains(&n.id),
            }
        })
        .collect()
}

/// Why a request cannot become demand alternatives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DemandError {
    #[error("{0}")]
    Invalid(String),
    #[error("policy gpu-only: no live node has an NVENC GPU")]
    NoGpu,
}

/// A stream's demand alternatives in order of preference.
///
/// A plain preset stream on a test source is priced by the nodes themselves (their reports, per preset: the
/// element-wise maximum over live nodes, so no node is under-booked); anything else (explicit renditions,
/// encoded sources) is priced with the built-in cost models. `prefer-gpu` tries NVENC first, then x264;
/// `gpu-only` only NVENC; `cpu-only` and audio-only streams only x264.
pub fn alternatives(
    presets: &kiln_config::Presets,
    id: &str,
    req: &StreamRequest,
    live: &[&Heartbeat],
) -> Result<Vec<Demand>, DemandError> {
    let plan = presets
        .resolve(id, req)
        .map_err(|e| DemandError::Invalid(e.to_string()))?;
    let preset = req.preset.as_deref().unwrap_or(presets.default_name());
    let plain = req.renditions.is_none()
        && req.audio.is_none()
        && matches!(Source::parse(&req.source), Ok(Source::Test { .. }));
    let priced: Vec<_> = live
        .iter()
        .filter_map(|hb| hb.capacity.demands.get(preset))
        .collect();
    let any_nvenc = live
        .iter()
        .any(|hb| hb.capacity.gpus.iter().any(|g| g.nvenc));
    let pixel_rate = plan.pixel_rate();
    let (cpu, gpu) = if plain && !priced.is_empty() {
        let cpu = priced
            .iter()
            .fold(Resources::default(), |a, d| max_each(&a, &d.cpu));
        let gpu = priced.iter().filter_map(|d| d.gpu).fold(
            None,
            |a: Option<(Resources, Resources)>, g| {
                let (h, x) = a.unwrap_or_default();
                Some((max_each(&h, &g.host), max_each(&x, &g.gpu)))
            },
        );
        (cpu, gpu)
    } else {
        // a backup input is decoded on the CPU whatever the backend (kilnd books it the same way)
        let model = kiln_config::builtin_cpu_profile();
        let backup = model.backup_demand(&plan);
        let cpu = model.demand(&plan).plus(&backup);
        let g = GpuCostModel::default().demand(&plan, false);
        (
            cpu,
            any_nvenc.then_some((g.host_part().plus(&backup), g.gpu_part())),
        )
    };
    let cpu_alt = Demand {
        host: cpu,
        gpu: None,
        pixel_rate,
    };
    let gpu_alt = gpu.map(|(host, g)| Demand {
        host,
        gpu: Some(g),
        pixel_rate,
    });
    let policy = if plan.video.is_empty() {
        Policy::CpuOnly
    } else {
        plan.encoder.policy
    };
    Ok(match (policy, gpu_alt) {
        (Policy::GpuOnly, None) => return Err(DemandError::NoGpu),
        (Policy::GpuOnly, Some(g)) => vec![g],
        (Policy::PreferGpu, Some(g)) => vec![g, cpu_alt],
        _ => vec![cpu_alt],
    })
}

/// The request the daemon gets for a booked alternative: a stream booked on the CPU is pinned there
/// (`cpu-only`), so the daemon does not put it on an NVENC GPU the scheduler did not book.
pub fn pinned(req: &StreamRequest, booked: &Demand) -> StreamRequest {
    let mut r = req.clone();
    if booked.gpu.is_none() && r.policy != Some(Policy::CpuOnly) {
        r.policy = Some(Policy::CpuOnly);
    }
    r
}

/// Most streams [`headroom`] counts per preset: a larger fleet answers this figure.
pub const HEADROOM_CAP: u64 = 100_000;

/// How many more streams of one kind the fleet takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Headroom {
    pub streams: u64,
    /// Of them, on the first alternative when that one is an NVENC one.
    pub on_gpu: u64,
}

/// How many more streams with demand alternatives `alts` the accepting nodes of `view` take: what placing them
/// one after another would give (each on its first alternative that fits anywhere), capped at [`HEADROOM_CAP`].
///
/// Computed per node in closed form rather than by placing: placing ran [`kiln_binpack::place`] over the whole
/// fleet once per stream, up to 100,000 times per preset (seconds for 40 nodes). The count is the same, because
/// the streams are identical and each node is its own bin:
/// - alternative k is placed only once no node has room for the alternatives before it, and room only shrinks,
///   so the fill runs alternative by alternative;
/// - on one node, copies of a demand with a GPU part keep landing while the host has room for one more and some
///   GPU does, so the node takes min(host copies, Σ per-GPU copies), whichever GPUs the scoring picks; a host-only
///   demand takes the host copies.
///
/// This relies on what [`alternatives`] returns: at most one alternative with a GPU part, and first (after it only
/// the host's room matters, so which GPU each copy took does not).
pub fn headroom(view: &[Node], alts: &[Demand]) -> Headroom {
    let mut host_used: Vec<Resources> = view.iter().map(|n| n.host_used).collect();
    let mut out = Headroom::default();
    for (k, d) in alts.iter().enumerate() {
        let mut placed = 0u64;
        for (n, used) in view.iter().zip(&mut host_used) {
            if !n.accepting {
                continue;
            }
            // how_many agrees with binpack's `fits`: a dimension with no capacity left takes no demand of it
            let mut copies = n.host_capacity.minus(used).how_many(&d.host);
            if let Some(g) = &d.gpu {
                let on_gpus = n
                    .gpus
                    .iter()
                    .map(|x| x.capacity.minus(&x.used).how_many(g))
                    .fold(0, u64::saturating_add);
                copies = copies.min(on_gpus);
            }
            let copies = copies.min(HEADROOM_CAP);
            *used = used.plus(&times(&d.host, copies));
            placed = placed.saturating_add(copies);
        }
        if k == 0 && d.gpu.is_some() {
            out.on_gpu = placed.min(HEADROOM_CAP);
        }
        out.streams = out.streams.saturating_add(placed);
    }
    out.streams = out.streams.min(HEADROOM_CAP);
    out
}

/// `n` copies of `r`.
fn times(r: &Resources, n: u64) -> Resources {
    let mut out = Resources::default();
    for d in Dimension::ALL {
        out.set(d, r.get(d).saturating_mul(n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_binpack::sim::Rng;
    use kiln_binpack::{commit, place, Strategy};
    use kiln_model::node::{CapacityReport, GpuDemand, HostReport, PresetDemand};

    fn hb(cpu: u64, gpu: bool) -> Heartbeat {
        let mut demands = std::collections::BTreeMap::new();
        demands.insert(
            "live-720p-abr".to_string(),
            PresetDemand {
                cpu: Resources {
                    cpu_millicores: cpu,
                    memory_mib: 100,
                    ..Default::default()
                },
                gpu: gpu.then_some(GpuDemand {
                    host: Resources {
                        cpu_millicores: 100,
                        ..Default::default()
                    },
                    gpu: Resources {
                        nvenc_fps: 60,
                        ..Default::default()
                    },
                }),
                pixel_rate: 1,
            },
        );
        Heartbeat {
            url: "http://n".into(),
            capacity: CapacityReport {
                node_id: "n".into(),
                epoch: 1,
                fence_epoch: 0,
                host: HostReport::default(),
                gpus: vec![],
                gpu_inventory: Default::default(),
                streams: vec![],
                headroom: Default::default(),
                demands,
                vod: None,
                draining: false,
            },
        }
    }

    fn req(policy: Option<Policy>) -> StreamRequest {
        StreamRequest {
            source: "test:".into(),
            preset: Some("live-720p-abr".into()),
            policy,
            ..Default::default()
        }
    }

    #[test]
    fn nodes_price_plain_presets_and_the_dearest_price_wins() {
        let p = kiln_config::Presets::builtin();
        let (a, b) = (hb(900, false), hb(1200, true));
        let alts = alternatives(&p, "s", &req(None), &[&a, &b]).unwrap();
        assert_eq!(alts.len(), 2, "prefer-gpu: NVENC first, then x264");
        assert_eq!(alts[0].gpu.unwrap().nvenc_fps, 60);
        assert_eq!(alts[1].host.cpu_millicores, 1200);
        let cpu = alternatives(&p, "s", &req(Some(Policy::CpuOnly)), &[&a, &b]).unwrap();
        assert_eq!(cpu.len(), 1);
        assert!(cpu[0].gpu.is_none());
        assert_eq!(
            alternatives(&p, "s", &req(Some(Policy::GpuOnly)), &[&a]),
            Err(DemandError::NoGpu)
        );
        let bad = StreamRequest {
            preset: Some("nope".into()),
            ..req(None)
        };
        assert!(matches!(
            alternatives(&p, "s", &bad, &[&a]),
            Err(DemandError::Invalid(_))
        ));
    }

    #[test]
    fn what_a_node_reserves_for_its_viewers_counts_as_used() {
        let mut beat = hb(900, false);
        beat.capacity.host.capacity = Resources {
            cpu_millicores: 4000,
            memory_mib: 4000,
            ..Default::default()
        };
        beat.capacity.host.allocated = Resources {
            cpu_millicores: 1000,
            ..Default::default()
        };
        beat.capacity.host.serving.reserved_millicores = 700;
        let node = NodeEntry {
            id: "n".into(),
            heartbeat: Some(beat),
            draining: false,
            evacuate: false,
        };
        let v = view(&[node], &[], &HashSet::new());
        assert_eq!(v[0].host_used.cpu_millicores, 1700);
        assert_eq!(v[0].host_capacity.cpu_millicores, 4000);
    }

    #[test]
    fn a_cpu_booking_is_pinned_to_the_cpu() {
        let d = Demand::default();
        assert_eq!(pinned(&req(None), &d).policy, Some(Policy::CpuOnly));
        let g = Demand {
            gpu: Some(Resources::default()),
            ..d
        };
        assert_eq!(pinned(&req(None), &g).policy, None);
    }

    /// What `GET /v1/fleet/headroom` computed before [`headroom`]: place one stream at a time, on the first
    /// alternative that fits anywhere, until nothing fits (the reference the closed form must match).
    fn headroom_by_placing(view: &[Node], alts: &[Demand], strategy: Strategy) -> Headroom {
        let mut nodes = view.to_vec();
        let (mut n, mut on_gpu) = (0u64, 0u64);
        'fill: while n < HEADROOM_CAP {
            for (k, d) in alts.iter().enumerate() {
                if let Some(slot) = place(&nodes, d, strategy) {
                    commit(&mut nodes, slot, d);
                    n += 1;
                    if k == 0 && d.gpu.is_some() {
                        on_gpu += 1;
                    }
                    continue 'fill;
                }
            }
            break;
        }
        Headroom { streams: n, on_gpu }
    }

    fn res(rng: &mut Rng, dims: &[Dimension], max: u64) -> Resources {
        let mut r = Resources::default();
        for &d in dims {
            // a few zeros: dimensions a bin lacks or a demand does not use
            let v = rng.next_u64() % (max + 1);
            r.set(d, if rng.next_u64() % 5 == 0 { 0 } else { v });
        }
        r
    }

    /// A random fleet: 0–6 nodes with 0–3 GPUs each, some load, some not accepting.
    fn fleet(rng: &mut Rng) -> Vec<Node> {
        use Dimension::*;
        let host = [CpuMillicores, MemoryMib];
        let gpu = [NvencFps, NvdecFps, EncoderSessions, VramMib];
        (0..rng.next_u64() % 7)
            .map(|i| Node {
                id: format!("n{i}"),
                host_capacity: res(rng, &host, 4000),
                host_used: res(rng, &host, 1500),
                gpus: (0..rng.next_u64() % 4)
                    .map(|_| Gpu {
                        capacity: res(rng, &gpu, 600),
                        used: res(rng, &gpu, 200),
                    })
                    .collect(),
                pixel_rate: 0,
                accepting: rng.next_u64() % 6 != 0,
            })
            .collect()
    }

    /// Alternatives shaped like [`alternatives`]'s: [NVENC, x264], [NVENC] or [x264] (or none).
    fn alts(rng: &mut Rng) -> Vec<Demand> {
        use Dimension::*;
        let host = [CpuMillicores, MemoryMib];
        let gpu = [NvencFps, NvdecFps, EncoderSessions, VramMib];
        let cpu = Demand {
            host: res(rng, &host, 700),
            gpu: None,
            pixel_rate: 1,
        };
        let nvenc = Demand {
            host: res(rng, &host, 200),
            gpu: Some(res(rng, &gpu, 150)),
            pixel_rate: 1,
        };
        match rng.next_u64() % 4 {
            0 => vec![nvenc, cpu],
            1 => vec![nvenc],
            2 => vec![cpu],
            _ => vec![],
        }
    }

    /// The closed form gives what placing stream after stream gave, on random fleets and for every strategy
    /// (the count does not depend on where each copy went).
    #[test]
    fn headroom_in_closed_form_matches_placing_one_stream_at_a_time() {
        let mut rng = Rng::new(7);
        let mut nonzero = 0;
        for case in 0..1500 {
            let view = fleet(&mut rng);
            let alts = alts(&mut rng);
            // zero demands fill to the cap: keep those to a few cases, placing 100,000 times is slow
            let zero = alts.iter().any(|d| {
                d.host == Resources::default() && d.gpu.is_none_or(|g| g == Resources::default())
            });
            if zero && case % 50 != 0 {
                continue;
            }
            let strategy = Strategy::ALL[case % Strategy::ALL.len()];
            let want = headroom_by_placing(&view, &alts, strategy);
            assert_eq!(
                headroom(&view, &alts),
                want,
                "case {case} ({strategy:?}): {view:?} {alts:?}"
            );
            nonzero += usize::from(want.streams > 0 && want.on_gpu > 0);
        }
        assert!(nonzero > 100, "the cases exercise GPUs: {nonzero}");
    }

    /// A fleet that takes more than [`HEADROOM_CAP`] streams answers the cap (placing would have run 100,000
    /// placements over 40 nodes per preset for it: the 4–6 s answer that starved heartbeats).
    #[test]
    fn a_large_fleet_answers_the_cap_at_once() {
        let node = |i: usize| Node {
            id: format!("n{i}"),
            host_capacity: Resources {
                cpu_millicores: 1 << 40,
                memory_mib: 1 << 40,
                ..Default::default()
            },
            gpus: vec![
                Gpu {
                    capacity: Resources {
                        nvenc_fps: 1 << 30,
                        ..Default::default()
                    },
                    used: Resources::default(),
                };
                8
            ],
            accepting: true,
            ..Default::default()
        };
        let view: Vec<Node> = (0..40).map(node).collect();
        let gpu = Demand {
            host: Resources {
                cpu_millicores: 100,
                ..Default::default()
            },
            gpu: Some(Resources {
                nvenc_fps: 60,
                ..Default::default()
            }),
            pixel_rate: 1,
        };
        let cpu = Demand {
            host: Resources {
                cpu_millicores: 900,
                ..Default::default()
            },
            gpu: None,
            pixel_rate: 1,
        };
        let h = headroom(&view, &[gpu, cpu]);
        assert_eq!(
            h,
            Headroom {
                streams: HEADROOM_CAP,
                on_gpu: HEADROOM_CAP
            }
        );
        // the zero demand (a preset nobody priced) is bounded too
        assert_eq!(headroom(&view, &[Demand::default()]).streams, HEADROOM_CAP);
        // nothing accepting: nothing
        let drained: Vec<Node> = view
            .into_iter()
            .map(|n| Node {
                accepting: false,
                ..n
            })
            .collect();
        assert_eq!(headroom(&drained, &[gpu, cpu]), Headroom::default());
    }
}
