//! kiln-gpu: what GPUs this host has and how busy they are, with no build-time NVIDIA dependency.
//!
//! NVML (`nvml-wrapper`) and the CUDA driver (`cudarc`, dynamic loading) are both opened with `dlopen` at run time.
//! On a host without the driver, [`Telemetry::open`] logs one line saying why and every [`Telemetry::snapshot`] is
//! an empty inventory — never a panic, never an error that stops the daemon.
//!
//! What NVML says is telemetry, not capability: on the H200 it reports an H.264 encoder capacity of 100 although the
//! chip has no NVENC (DESIGN.md §5). Whether a GPU can encode is decided from the GStreamer registry and the NVENC
//! probe, never from this crate.

use parking_lot::Mutex;

use nvml_wrapper::Nvml;
use serde::Serialize;

/// One GPU as NVML reports it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    /// NVML index (the CUDA device id when `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub index: u32,
    pub name: String,
    pub uuid: String,
    /// PCI bus id, e.g. `00000000:17:00.0`.
    pub pci_bus_id: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    /// NVENC utilisation over NVML's last sampling period, percent; `None` where the driver does not say.
    pub nvenc_utilization_pct: Option<u32>,
    /// NVDEC utilisation, percent.
    pub nvdec_utilization_pct: Option<u32>,
    /// Active NVENC sessions on this GPU (all processes).
    pub encoder_sessions: Option<u32>,
    /// Trailing average fps over all active encoder sessions.
    pub encoder_average_fps: Option<u32>,
}

/// The host's GPUs at one instant, and where that knowledge came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Inventory {
    pub gpus: Vec<GpuInfo>,
    /// The driver version NVML reports; `None` without NVML.
    pub driver_version: Option<String>,
    /// CUDA devices the driver API sees; `None` when libcuda is not installed.
    pub cuda_devices: Option<u32>,
    /// Why the list is empty or partial (no driver, an NVML error), for operators.
    pub note: Option<String>,
}

/// An open NVML handle (or the reason there is none). Cheap to share; [`Telemetry::snapshot`] is a few NVML calls
/// per GPU.
#[derive(Debug)]
pub struct Telemetry {
    nvml: Option<Mutex<Nvml>>,
    note: Option<String>,
    cuda_devices: Option<u32>,
}

/// How many CUDA devices the driver API sees, or `None` when libcuda cannot be loaded (checked before any cudarc
/// call: cudarc panics when asked to call into a library it could not load).
pub fn cuda_device_count() -> Option<u32> {
    // SAFETY: `is_culib_present` only tries to dlopen the candidate library names; it calls no CUDA function and
    // touches no device. This is the one unsafe call in kiln (the workspace denies unsafe code; this allow is the only one).
    #[allow(unsafe_code)]
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present {
        return None;
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) => Some(n.max(0) as u32),
        Err(e) => {
            tracing::warn!(error = %e, "libcuda is installed but cuDeviceGetCount failed");
            Some(0)
        }
    }
}

impl Telemetry {
    /// Opens NVML and counts CUDA devices. Without a driver this logs why and returns a handle whose snapshots
    /// are empty.
    pub fn open() -> Self {
        let cuda_devices = cuda_device_count();
        match Nvml::init() {
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                tracing::info!(gpus = count, cuda_devices, "NVML loaded");
                Self {
                    nvml: Some(Mutex::new(nvml)),
                    note: None,
                    cuda_devices,
                }
            }
            Err(e) => {
                let note = format!(
                    "no NVIDIA GPU inventory: NVML could not be loaded ({e}); running CPU-only"
                );
                tracing::info!("{note}");
                Self {
                    nvml: None,
                    note: Some(note),
                    cuda_devices,
                }
            }
        }
    }

    /// A handle that reports no GPU (tests, `--no-gpu`).
    pub fn disabled(reason: &str) -> Self {
        Self {
            nvml: None,
            note: Some(reason.to_string()),
            cuda_devices: None,
        }
    }

    /// Whether NVML is loaded.
    pub fn has_nvml(&self) -> bool {
        self.nvml.is_some()
    }

    /// The GPUs now. Per-GPU read errors leave that field `None` (and are noted); a GPU that cannot even be
    /// opened is skipped with a note.
    pub fn snapshot(&self) -> Inventory {
        let Some(nvml) = &self.nvml else {
            return Inventory {
                note: self.note.clone(),
                cuda_devices: self.cuda_devices,
                ..Default::default()
            };
        };
        let nvml = nvml.lock();
        let mut inv = Inventory {
            driver_version: nvml.sys_driver_version().ok(),
            cuda_devices: self.cuda_devices,
            ..Default::default()
        };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                inv.note = Some(format!("NVML device count failed: {e}"));
                return inv;
            }
        };
        let mut notes = Vec::new();
        for index in 0..count {
            let dev = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    notes.push(format!("GPU {index}: {e}"));
                    continue;
                }
            };
            let mem = dev.memory_info().ok();
            let stats = dev.encoder_stats().ok();
            inv.gpus.push(GpuInfo {
                index,
                name: dev.name().unwrap_or_else(|_| "unknown".into()),
                uuid: dev.uuid().unwrap_or_default(),
                pci_bus_id: dev.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                memory_total_mib: mem.as_ref().map_or(0, |m| m.total >> 20),
                memory_used_mib: mem.as_ref().map_or(0, |m| m.used >> 20),
                nvenc_utilization_pct: dev.encoder_utilization().ok().map(|u| u.utilization),
                nvdec_utilization_pct: dev.decoder_utilization().ok().map(|u| u.utilization),
                encoder_sessions: stats.as_ref().map(|s| s.session_count),
                encoder_average_fps: stats.as_ref().map(|s| s.average_fps),
            });
        }
        if !notes.is_empty() {
            inv.note = Some(notes.join("; "));
        }
        inv
    }
}

/// Matches an NVML product name (`NVIDIA H200`, `Tesla T4`, `NVIDIA GeForce RTX 4090`, `NVIDIA RTX 4000 Ada
/// Generation`) to a `hw-profiles/` file stem, if kiln ships one for it.
pub fn profile_for(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase();
    let n = n.replace(['-', '_'], " ");
    let has = |w: &str| n.split_whitespace().any(|t| t == w);
    // most specific first
    if n.contains("rtx 4000 ada") {
        return Some("rtx-4000-ada");
    }
    if n.contains("rtx 4090") {
        return Some("rtx-4090");
    }
    if has("l40s") {
        return Some("l40s");
    }
    [
        ("t4", "t4"),
        ("a10", "a10"),
        ("a16", "a16"),
        ("l4", "l4"),
        ("a100", "a100"),
        ("h100", "h100"),
        ("h200", "h200"),
        ("b200", "b200"),
    ]
    .into_iter()
    .find(|(w, _)| has(w))
    .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_names_map_to_profiles() {
        for (name, want) in [
            ("NVIDIA H200", Some("h200")),
            ("NVIDIA H100 80GB HBM3", Some("h100")),
            ("Tesla T4", Some("t4")),
            ("NVIDIA A10", Some("a10")),
            ("NVIDIA A100-SXM4-80GB", Some("a100")),
            ("NVIDIA L4", Some("l4")),
            ("NVIDIA L40S", Some("l40s")),
            ("NVIDIA GeForce RTX 4090", Some("rtx-4090")),
            ("NVIDIA RTX 4000 Ada Generation", Some("rtx-4000-ada")),
            ("NVIDIA B200", Some("b200")),
            ("NVIDIA A16", Some("a16")),
            ("NVIDIA GeForce GTX 1080", None),
        ] {
            assert_eq!(profile_for(name), want, "{name}");
        }
    }

    /// On a host without the driver (this CI machine) opening never panics and the inventory is empty with a
    /// note; on a GPU host the list is non-empty and every GPU has a name and memory.
    #[test]
    fn opening_never_panics_and_reports_consistently() {
        let t = Telemetry::open();
        let inv = t.snapshot();
        if t.has_nvml() {
            for g in &inv.gpus {
                assert!(!g.name.is_empty() && g.memory_total_mib > 0, "{g:?}");
            }
        } else {
            assert!(inv.gpus.is_empty());
            assert!(
                inv.note.as_deref().unwrap_or("").contains("NVML"),
                "{inv:?}"
            );
        }
        let json = serde_json::to_value(&inv).unwrap();
        assert!(json["gpus"].is_array());
    }
}
