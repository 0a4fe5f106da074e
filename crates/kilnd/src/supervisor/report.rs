//! What the supervisor describes to the outside: the node's capacity report (the body of `GET /v1/capacity` and of
//! every heartbeat) and the Prometheus gauges of streams, bookings and GPUs, refreshed on each scrape.

use std::collections::BTreeMap;

use kiln_gpu::Inventory;
use kiln_model::capacity::{Dimension, Resources};
use kiln_model::node::{
    CapacityReport, GpuDemand, GpuInventoryNote, GpuMeasured, GpuReport, HostReport, NodeStream,
    PresetDemand, VodLoad,
};
use kiln_model::StreamRequest;

use super::Supervisor;

/// This process's own CPU and memory use (the `measured` host figures).
fn measured() -> Resources {
    Resources {
        cpu_millicores: crate::metrics::process_cpu_millicores(),
        memory_mib: crate::metrics::process_rss_mib(),
        ..Default::default()
    }
}

impl Supervisor {
    /// The node's capacity report with NVML's view of the GPUs from `telemetry` and the VOD queue's load.
    pub fn capacity_report(
        &self,
        telemetry: &kiln_gpu::Telemetry,
        vod: Option<VodLoad>,
    ) -> CapacityReport {
        let (cap, alloc) = (self.capacity(), self.allocated());
        // one reading of the serving load: `free` and `serving` (its headroom) leave out the same reservation
        let serving = self.serving();
        let free = self.free_with(&serving);
        let measured = measured();
        let effective = Resources {
            cpu_millicores: alloc.cpu_millicores.max(measured.cpu_millicores),
            memory_mib: alloc.memory_mib.max(measured.memory_mib),
            ..alloc
        };
        let (headroom, demands) = self.preset_prices(&free);
        let inventory = telemetry.snapshot();
        CapacityReport {
            node_id: self.config.node_id.clone(),
            epoch: self.epoch(),
            fence_epoch: self.fence_epoch(),
            host: HostReport {
                capacity: cap,
                allocated: alloc,
                free,
                measured,
                effective,
                serving,
            },
            gpus: self.gpu_reports(&inventory),
            gpu_inventory: GpuInventoryNote {
                driver_version: inventory.driver_version.clone(),
                cuda_devices: inventory.cuda_devices,
                note: inventory.note.clone(),
            },
            streams: self.node_streams(),
            headroom,
            demands,
            vod,
            draining: self.is_draining(),
        }
    }

    /// Every stream with what it books, for the report.
    fn node_streams(&self) -> Vec<NodeStream> {
        self.list()
            .iter()
            .map(|h| {
                let p = h.placement();
                NodeStream {
                    id: h.plan.id.clone(),
                    state: h.state(),
                    backend: p.backend,
                    decode_gpu: p.decode_gpu,
                    demand: p.host,
                    gpu_demand: p.gpu.map(|(_, d)| d),
                    behind_real_time: h.behind_real_time(),
                    has_segment: h
                        .origin
                        .renditions
                        .iter()
                        .all(|r| !r.snapshot().closed.is_empty()),
                }
            })
            .collect()
    }

    /// Per preset: how many more streams of it fit in `free` on the CPU (the headroom), and what one costs here on
    /// the CPU and, where a GPU has NVENC, on a GPU (the prices the scheduler books with).
    fn preset_prices(
        &self,
        free: &Resources,
    ) -> (BTreeMap<String, u64>, BTreeMap<String, PresetDemand>) {
        let has_nvenc = self.gpus.slots.iter().any(|s| s.nvenc);
        let mut headroom = BTreeMap::new();
        let mut demands = BTreeMap::new();
        for name in self.config.presets.names() {
            let req = StreamRequest {
                source: "test:".into(),
                preset: Some(name.to_string()),
                ..Default::default()
            };
            let Ok(plan) = self.config.presets.resolve("headroom", &req) else {
                continue;
            };
            let cpu = self.config.cpu_model.demand(&plan);
            headroom.insert(name.to_string(), free.how_many(&cpu));
            let g = self.config.gpu_model.demand(&plan, false);
            let gpu = (has_nvenc && !plan.video.is_empty()).then(|| GpuDemand {
                host: g.host_part(),
                gpu: g.gpu_part(),
            });
            let pixel_rate = plan.pixel_rate();
            demands.insert(
                name.to_string(),
                PresetDemand {
                    cpu,
                    gpu,
                    pixel_rate,
                },
            );
        }
        (headroom, demands)
    }

    /// Each GPU slot with its bookings and NVML's measurements.
    fn gpu_reports(&self, inventory: &Inventory) -> Vec<GpuReport> {
        self.gpus
            .slots
            .iter()
            .map(|slot| {
                let nvml = inventory.gpus.iter().find(|g| g.index == slot.index);
                let alloc = self.gpus.allocated(slot.index);
                GpuReport {
                    index: slot.index,
                    model: slot.name.clone(),
                    uuid: slot.uuid.clone(),
                    pci_bus_id: nvml.map(|g| g.pci_bus_id.clone()),
                    profile: slot.profile.clone(),
                    nvenc: slot.nvenc,
                    nvdec: slot.nvdec,
                    capacity: slot.capacity,
                    allocated: alloc,
                    free: slot.capacity.minus(&alloc),
                    measured: nvml.map(|g| GpuMeasured {
                        vram_mib: g.memory_used_mib,
                        nvenc_utilization_pct: g.nvenc_utilization_pct,
                        nvdec_utilization_pct: g.nvdec_utilization_pct,
                        encoder_sessions: g.encoder_sessions,
                    }),
                }
            })
            .collect()
    }

    /// Sets the stream, booking and GPU gauges from the current state (called on each `/metrics` scrape).
    pub fn refresh_metrics(&self, telemetry: &kiln_gpu::Telemetry) {
        let m = &self.metrics;
        m.streams.reset();
        m.stream_backend.reset();
        m.stream_recent_realtime.reset();
        m.stream_behind.reset();
        m.ingest.bitrate.reset();
        for h in self.list() {
            h.refresh_resilience(&m.ingest);
            let delta = h.frame_delta();
            m.frames(&h.plan.id, &delta);
            if let Some(p) = h.publisher() {
                let proto = p.protocol.as_str();
                m.ingest
                    .frames
                    .with_label_values(&[proto])
                    .inc_by(delta.input);
                m.ingest
                    .bitrate
                    .with_label_values(&[h.plan.id.as_str(), proto])
                    .set((p.status().input_bitrate_kbps * 1000) as i64);
            }
            let p = h.placement();
            let gpu = match p.backend {
                kiln_model::Backend::Nvenc { gpu } => gpu.to_string(),
                kiln_model::Backend::Cpu => String::new(),
            };
            m.stream_backend
                .with_label_values(&[
                    h.plan.id.as_str(),
                    p.backend.label(),
                    gpu.as_str(),
                    h.plan.encoder.policy.as_str(),
                ])
                .set(1);
            let id = h.plan.id.as_str();
            if let Some(r) = h.recent_realtime_ratio() {
                m.stream_recent_realtime.with_label_values(&[id]).set(r);
            }
            m.stream_behind
                .with_label_values(&[id])
                .set(i64::from(h.behind_real_time()));
            let state = serde_json::to_value(h.state()).ok();
            let state = state.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown");
            m.streams.with_label_values(&[state]).inc();
        }
        m.parked_requests.set(self.origin.parked() as i64);
        let serving = self.serving();
        m.serving
            .with_label_values(&["measured"])
            .set(serving.millicores as i64);
        m.serving
            .with_label_values(&["reserved"])
            .set(serving.reserved_millicores as i64);
        if let Some(c) = serving.calibrated_millicores {
            m.serving.with_label_values(&["calibrated"]).set(c as i64);
        }
        m.serving_headroom_rps
            .set(serving.headroom_rps.unwrap_or(0) as i64);
        let (cap, alloc) = (self.capacity(), self.allocated());
        for (kind, r) in [
            ("capacity", cap),
            ("allocated", alloc),
            ("free", self.free_with(&serving)),
            ("measured", measured()),
        ] {
            for dim in Dimension::ALL {
                m.capacity
                    .with_label_values(&[dim.as_str(), kind])
                    .set(r.get(dim) as i64);
            }
        }
        self.refresh_gpu_metrics(&telemetry.snapshot());
    }

    /// Per GPU: NVML telemetry and bookings.
    fn refresh_gpu_metrics(&self, inventory: &Inventory) {
        let m = &self.metrics;
        for g in [&m.gpu_nvenc_utilization, &m.gpu_nvdec_utilization] {
            g.reset();
        }
        m.gpu_encoder_sessions.reset();
        m.gpu_vram_used_bytes.reset();
        m.gpu_resources.reset();
        for g in &inventory.gpus {
            let index = g.index.to_string();
            let l = [index.as_str(), g.name.as_str()];
            if let Some(u) = g.nvenc_utilization_pct {
                m.gpu_nvenc_utilization
                    .with_label_values(&l)
                    .set(f64::from(u) / 100.0);
            }
            if let Some(u) = g.nvdec_utilization_pct {
                m.gpu_nvdec_utilization
                    .with_label_values(&l)
                    .set(f64::from(u) / 100.0);
            }
            if let Some(n) = g.encoder_sessions {
                m.gpu_encoder_sessions
                    .with_label_values(&l)
                    .set(i64::from(n));
            }
            m.gpu_vram_used_bytes
                .with_label_values(&l)
                .set((g.memory_used_mib << 20) as i64);
        }
        for slot in &self.gpus.slots {
            let alloc = self.gpus.allocated(slot.index);
            let gpu = slot.index.to_string();
            for (kind, r) in [
                ("capacity", slot.capacity),
                ("allocated", alloc),
                ("free", slot.capacity.minus(&alloc)),
            ] {
                for dim in Dimension::GPU {
                    m.gpu_resources
                        .with_label_values(&[gpu.as_str(), dim.as_str(), kind])
                        .set(r.get(dim) as i64);
                }
            }
        }
    }
}
