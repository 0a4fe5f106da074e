//! The node's GPUs as admission sees them: each GPU from the inventory (`kiln-gpu`), matched to its
//! `hw-profiles/` model, with what the GStreamer registry says it can really do (NVENC/NVDEC elements present),
//! its capacity vector and what streams have booked on it.

use parking_lot::Mutex;

use kiln_media::select::Registry;
use kiln_model::capacity::{Dimension, GpuProfile, Resources};
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

    fn lock(&self) -> parking_lot::MutexGuard<'_, Vec<Resources>> {
        self.allocated.lock()
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
    pub fn reserve(&self, gpu: u32, demand: &Resources) -> Result<(), (Dimension, u64, u64)> {
        let Some(i) = self.pos(gpu) else {
            return Err((Dimension::NvencFps, demand.nvenc_fps, 0));
        };
        let mut alloc = self.lock();
        let free = self.slots[i].capacity.minus(&alloc[i]);
        if let Some(dim) = free.short_dimension(demand) {
            return Err((dim, demand.get(dim), free.get(dim)));
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

/// Runs `kiln-nvenc-probe` (next to this executable, or on PATH) with a 10 s limit and returns its JSON. `None`
/// when it is not installed, fails or says nothing useful: the GStreamer registry is then the only source. It runs
/// as a subprocess because it links the NVIDIA driver libraries: a crash there cannot take the daemon down.
pub fn run_nvenc_probe() -> Option<serde_json::Value> {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kiln-nvenc-probe")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "kiln-nvenc-probe".into());
    let mut child = std::process::Command::new(&exe)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50)); // polling a child: no event to wait on
            }
            _ => {
                let _ = child.kill();
                tracing::warn!(probe = %exe.display(), "kiln-nvenc-probe did not answer within 10 s");
                return None;
            }
        }
    }
    let out = child.wait_with_output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    (v["probe"] == "nvenc").then_some(v)
}

/// Applies the probe's verdict: a GPU the driver says cannot open an NVENC session books no NVENC, whatever the
/// registry lists.
pub fn apply_nvenc_probe(slots: &mut [GpuSlot], probe: &serde_json::Value) {
    for d in probe["devices"].as_array().into_iter().flatten() {
        let (Some(i), Some(false)) = (d["index"].as_u64(), d["nvenc"].as_bool()) else {
            continue;
        };
        if let Some(s) = slots.iter_mut().find(|s| u64::from(s.index) == i) {
            if s.nvenc {
                tracing::warn!(gpu = s.index, error = %d["error"], "the registry lists an NVENC encoder but the driver opens no session: not booking NVENC");
            }
            s.nvenc = false;
            s.capacity.nvenc_fps = 0;
            s.capacity.encoder_sessions = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(index: u32, nvenc: bool) -> GpuSlot {
        GpuSlot {
            index,
            name: "NVIDIA L4".into(),
            uuid: String::new(),
            profile: Some("l4".into()),
            nvenc,
            nvdec: true,
            capacity: Resources {
                nvenc_fps: 1400,
                nvdec_fps: 2800,
                encoder_sessions: 1024,
                vram_mib: 20000,
                ..Default::default()
            },
        }
    }

    #[test]
    fn bookings_never_exceed_a_gpu_and_name_the_short_dimension() {
        let pool = GpuPool::new(vec![slot(0, true)]);
        let d = Resources {
            nvenc_fps: 600,
            encoder_sessions: 2,
            vram_mib: 400,
            ..Default::default()
        };
        assert!(pool.reserve(0, &d).is_ok());
        assert!(pool.reserve(0, &d).is_ok());
        assert_eq!(pool.reserve(0, &d), Err((Dimension::NvencFps, 600, 200)));
        assert_eq!(pool.allocated(0).nvenc_fps, 1200);
        pool.release(0, &d);
        assert!(pool.reserve(0, &d).is_ok());
        assert!(pool.reserve(7, &d).is_err(), "unknown GPU");
    }

    #[test]
    fn the_probe_overrules_the_registry() {
        let mut slots = vec![slot(0, true), slot(1, true)];
        let probe = serde_json::json!({"probe": "nvenc", "devices": [
            {"index": 0, "nvenc": true, "codecs": ["h264"]},
            {"index": 1, "nvenc": false, "error_code": 2, "error": "UnsupportedDevice"}]});
        apply_nvenc_probe(&mut slots, &probe);
        assert!(slots[0].nvenc && slots[0].capacity.nvenc_fps > 0);
        assert!(
            !slots[1].nvenc
                && slots[1].capacity.nvenc_fps == 0
                && slots[1].capacity.encoder_sessions == 0
        );
    }
}
