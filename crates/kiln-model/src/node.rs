//! What a node tells the scheduler, and the scheduler tells a node: the one wire type of `GET /v1/capacity` and
//! of heartbeats ([`CapacityReport`], [`Heartbeat`]), and the fencing header carried on every command.
//!
//! A report is in physical units ([`Resources`]): the host's schedulable CPU and memory, and per GPU its
//! NVENC/NVDEC throughput (1080p-equivalent fps), encoder sessions and VRAM. It also carries, per preset, what one
//! stream of that preset costs on this node ([`PresetDemand`]): the node's own cost models (its calibrated CPU
//! profile, its GPU profiles) price streams, and the scheduler packs with those prices.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::StreamState;
use crate::capacity::Resources;
use crate::stream::Backend;

/// HTTP header on every scheduler command to a daemon: the leader's epoch (fencing token). A daemon remembers
/// the highest epoch it has seen and rejects commands that carry a lower one (409 `stale_epoch`).
pub const EPOCH_HEADER: &str = "x-kiln-epoch";

/// `GET /v1/capacity`: the node's capacity, bookings and streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CapacityReport {
    pub node_id: String,
    /// Unix ms when the daemon started: changes on every restart (a restarted daemon runs nothing).
    pub epoch: u64,
    /// Highest scheduler epoch this daemon has accepted (0: none yet).
    #[serde(default)]
    pub fence_epoch: u64,
    pub host: HostReport,
    pub gpus: Vec<GpuReport>,
    pub gpu_inventory: GpuInventoryNote,
    pub streams: Vec<NodeStream>,
    /// How many more streams of each preset fit on this node now.
    pub headroom: BTreeMap<String, u64>,
    /// What one stream of each preset costs here (a `test:` source).
    #[serde(default)]
    pub demands: BTreeMap<String, PresetDemand>,
    /// The node's VOD queue; absent when VOD is off there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vod: Option<VodLoad>,
    /// The daemon is stopping (SIGTERM with a scheduler): it takes no new streams and waits, up to its
    /// `--drain-timeout-s`, for the scheduler to start its streams elsewhere and stop them here.
    #[serde(default)]
    pub draining: bool,
}

/// A node's VOD queue, for routing jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VodLoad {
    pub queued: u32,
    pub running: u32,
    /// Jobs it runs at once (`--vod-concurrency`).
    pub slots: u32,
}

impl VodLoad {
    /// Jobs waiting or running per slot: the lower, the sooner a new job starts there.
    pub fn backlog(&self) -> f64 {
        (f64::from(self.queued) + f64::from(self.running)) / f64::from(self.slots.max(1))
    }
}

/// Host-level CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostReport {
    /// What admission may book.
    pub capacity: Resources,
    /// Booked by admitted streams.
    pub allocated: Resources,
    pub free: Resources,
    /// The daemon process's measured CPU and resident memory.
    pub measured: Resources,
    /// Per dimension, the larger of booked and measured.
    pub effective: Resources,
    /// What serving viewers costs now; `free` already leaves out its `reserved_millicores`.
    #[serde(default)]
    pub serving: crate::load::ServingLoad,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuReport {
    pub index: u32,
    pub model: String,
    pub uuid: String,
    #[serde(default)]
    pub pci_bus_id: Option<String>,
    /// hw-profiles entry used to size it.
    #[serde(default)]
    pub profile: Option<String>,
    pub nvenc: bool,
    pub nvdec: bool,
    pub capacity: Resources,
    pub allocated: Resources,
    pub free: Resources,
    /// NVML readings, when NVML is loaded.
    #[serde(default)]
    pub measured: Option<GpuMeasured>,
}

/// NVML readings of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuMeasured {
    pub vram_mib: u64,
    pub nvenc_utilization_pct: Option<u32>,
    pub nvdec_utilization_pct: Option<u32>,
    pub encoder_sessions: Option<u32>,
}

/// Driver facts, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuInventoryNote {
    pub driver_version: Option<String>,
    pub cuda_devices: Option<u32>,
    pub note: Option<String>,
}

/// A stream as its node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStream {
    pub id: String,
    pub state: StreamState,
    pub backend: Backend,
    #[serde(default)]
    pub decode_gpu: Option<u32>,
    /// Host resources booked.
    pub demand: Resources,
    /// GPU resources booked, on `backend`'s (or `decode_gpu`'s) GPU.
    #[serde(default)]
    pub gpu_demand: Option<Resources>,
    /// It publishes media slower than real time over the last seconds (a node short of CPU or GPU). A scheduler
    /// with `--relieve-behind` moves such a stream to another node (make-before-break); operators see it too.
    #[serde(default)]
    pub behind_real_time: bool,
    /// Every rendition has closed a segment. A copy that replaces another (a move) takes the viewers only then:
    /// its first whole segment then starts before the old copy's last one ended, so a viewer switching over
    /// finds no hole in the timeline. (Reported by daemons since 2026-12; an older one's copies count as having
    /// one once running.)
    #[serde(default = "yes")]
    pub has_segment: bool,
}

fn yes() -> bool {
    true
}

/// What one stream of a preset costs on a node: on the CPU (x264), and on one of its NVENC GPUs (a host part and a
/// GPU part). `gpu` is absent on a node without NVENC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PresetDemand {
    pub cpu: Resources,
    #[serde(default)]
    pub gpu: Option<GpuDemand>,
    /// Σ width·height·fps of the preset's renditions.
    #[serde(default)]
    pub pixel_rate: u64,
}

/// The two parts of an NVENC stream's demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuDemand {
    pub host: Resources,
    pub gpu: Resources,
}

/// `POST /v1/nodes/{id}/heartbeat` (daemon → scheduler), every `interval_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    /// Base URL viewers and the scheduler reach this daemon at (`http://host:port`).
    pub url: String,
    pub capacity: CapacityReport,
}

/// The scheduler's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatAck {
    /// The current leader's epoch (0 when no leader is known): the daemon raises its fence to it.
    pub epoch: u64,
    /// How often the scheduler wants heartbeats.
    pub interval_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_old_reports_without_demands_parse() {
        let r = CapacityReport {
            node_id: "n1".into(),
            epoch: 7,
            fence_epoch: 3,
            host: HostReport {
                capacity: Resources {
                    cpu_millicores: 1700,
                    memory_mib: 1000,
                    ..Default::default()
                },
                ..Default::default()
            },
            gpus: vec![],
            gpu_inventory: Default::default(),
            streams: vec![],
            headroom: [("live-720p-abr".to_string(), 2)].into(),
            vod: None,
            draining: false,
            demands: BTreeMap::new(),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["host"]["capacity"]["cpu_millicores"], 1700);
        let mut v2 = v.clone();
        v2.as_object_mut().unwrap().remove("demands");
        v2.as_object_mut().unwrap().remove("fence_epoch");
        let back: CapacityReport = serde_json::from_value(v2).unwrap();
        assert_eq!(back.fence_epoch, 0);
        assert_eq!(serde_json::from_value::<CapacityReport>(v).unwrap(), r);
    }

    #[test]
    fn a_reported_backlog_never_overflows() {
        let absurd = VodLoad {
            queued: u32::MAX,
            running: u32::MAX,
            slots: 0,
        };
        assert_eq!(absurd.backlog(), 2.0 * f64::from(u32::MAX));
    }
}
