//! The node's GPUs as admission sees them: each GPU from the inventory (`kiln-gpu`), matched to its
//! `hw-profiles/` model, with what the GStreamer registry says it can really do (NVENC/NVDEC elements present),
//! its capacity vector and what streams have booked on it.

use std::sync::Mutex;

use kiln_media::select::Registry;
use kiln_model::capacity::{GpuProfile, Resources};
use kiln_model::VideoCodec;
use serde::Serialize;

/// NVENC preset the capacity figures are quoted at (p4, NVENC's balanced default).
pub const CAPACITY_PRESET: u8 = 4;

/// One GPU.
#[derive(Debug, Clone, Serialize)]
pub struct GpuSlot {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    /// The `hw-profiles/` model, if kiln ships one for this product.
    pub profile: Option<String>,
    /// An NVENC H.264 encoder element exists for this GPU.
    pub nvenc: bool,
    /// An NVDEC H.264 decoder element exists for this GPU.
    pub nvdec: bool,
    /// Bookable resources (0 on dimensions it lacks or has no profile for).
    pub capacity: Resources,
}

impl GpuSlot {
    /// A slot from an inventory entry, its profile and the registry.
    pub fn new(info: &kiln_gpu::GpuInfo, registry: &Registry) -> Self {
        let profile: Option<GpuProfile> =
            kiln_gpu::profile_for(&info.name).and_then(kiln_config::builtin_gpu_profile);
        let nvenc = registry
            .nvenc_gpus(VideoCodec::H264, info.index + 1)
            .contains(&info.index);
        let dec_name = if info.index == 0 {
            "nvh264dec".to_string()
        } else {
            format!("nvh264device{}dec", info.index)
        };
        let nvdec = registry.has(&dec_name);
        let mut capacity = profile
            .as_ref()
            .map(|p| p.capacity(CAPACITY_PRESET))
            .unwrap_or_default();
        // the registry decides presence; the profile only sizes what is present
        if !nvenc {
            capacity.nvenc_fps = 0;
            capacity.encoder_sessions = 0;
        }
        if !nvdec {
            capacity.nvdec_fps = 0;
        }
        // VRAM as NVML reports it is the truth for this board
        if info.memory_total_mib > 0 {
            capacity.vram_mib = info.memory_total_mib * 9 / 10;
        }
        if profile.is_none() {
            tracing::warn!(gpu = info.index, name = %info.name, "no hw-profile for this GPU model: its NVENC/NVDEC throughput is not bookable");
        }
        Self {
            index: info.index,
            name: info.name.clone(),
            uuid: info.uuid.clone(),
            profile: profile.map(|p| p.name),
            nvenc,
            nvdec,
            capacity,
        }
    }
}

/// The GPUs and their bookings.
#[derive(Debug)]
pub struct GpuPool {
    pub slots: Vec<GpuSlot>,
    allocated: Mutex<Vec<Resources>>,
}

impl GpuPool {
    pub fn new(slots: Vec<GpuSlot>) -> Self {
        let n = slots.len();
        Self {
            slots,
            allocated: Mutex::new(vec![Resources::default(); n]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Resources>> {
        self.allocated.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pos(&self, gpu: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.index == gpu)
    }

    /// Booked on GPU `gpu`.
    pub fn allocated(&self, gpu: u32) -> Resources {
        self.pos(gpu).map(|i| self.lock()[i]).unwrap_or_default()
    }

    /// Free on GPU `gpu`.
    pub fn free(&self, gpu: u32) -> Resources {
        self.pos(gpu)
            .map(|i| self.slots[i].capacity.minus(&self.lock()[i]))
            .unwrap_or_default()
    }

    /// Books `demand` on `gpu` if it fits (check and add under one lock); else the first short dimension.
    pub fn reserve(&self, gpu: u32, demand: &Resources) -> Result<(), (&'static str, u64, u64)> {
        let Some(i) = self.pos(gpu) else {
            return Err(("nvenc_fps", demand.nvenc_fps, 0));
        };
        let mut alloc = self.lock();
        let free = self.slots[i].capacity.minus(&alloc[i]);
        if let Some(dim) = free.short_dimension(demand) {
            return Err((dim, demand.dimension(dim), free.dimension(dim)));
        }
        alloc[i] = alloc[i].plus(demand);
        Ok(())
    }

    pub fn release(&self, gpu: u32, demand: &Resources) {
        if let Some(i) = self.pos(gpu) {
            let mut alloc = self.lock();
            alloc[i] = alloc[i].minus(demand);
        }
    }
}
