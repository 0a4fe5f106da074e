//! The scheduler's view of the fleet as a packing problem (pure: no I/O).
//!
//! Nodes come from heartbeats (capacity in physical units), bookings from the scheduler's own records, and a
//! stream's demand alternatives from its policy and the prices nodes report per preset.

use std::collections::HashSet;

use kiln_binpack::{Demand, Gpu, Node};
use kiln_model::capacity::{GpuCostModel, Resources};
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

/// Node state as `GET /v1/nodes` shows it.
pub fn node_state(n: &NodeEntry) -> &'static str {
    match (&n.heartbeat, n.draining) {
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
    nodes
        .iter()
        .filter_map(|n| n.heartbeat.as_ref().map(|hb| (n, hb)))
        .map(|(n, hb)| {
            let rep = &hb.capacity;
            let mut host_booked = Resources::default();
            let mut gpu_booked = vec![Resources::default(); rep.gpus.len()];
            let mut pixel_rate = 0;
            for r in records
                .iter()
                .filter(|r| r.phase == Phase::Placed && r.node.as_deref() == Some(n.id.as_str()))
            {
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
                host_used: max_each(&host_booked, &rep.host.allocated),
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
                accepting: !n.draining && !excluded.contains(&n.id),
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
        let cpu = kiln_config::builtin_cpu_profile().demand(&plan);
        let g = GpuCostModel::default().demand(&plan, false);
        (cpu, any_nvenc.then_some((g.host_part(), g.gpu_part())))
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

#[cfg(test)]
mod tests {
    use super::*;
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
    fn a_cpu_booking_is_pinned_to_the_cpu() {
        let d = Demand::default();
        assert_eq!(pinned(&req(None), &d).policy, Some(Policy::CpuOnly));
        let g = Demand {
            gpu: Some(Resources::default()),
            ..d
        };
        assert_eq!(pinned(&req(None), &g).policy, None);
    }
}
