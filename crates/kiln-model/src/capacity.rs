//! Capacity in physical units: what a stream demands and what a node has, on every dimension.
//!
//! Pure arithmetic; the cost figures come from a [`CpuCostModel`] (loaded from `hw-profiles/`, replaced by a
//! calibrated one when `kilnd calibrate` exists). GPU dimensions are part of the vector now so that every consumer
//! (admission, `/v1/capacity`, the scheduler) adds them up the same way; on CPU-only pipelines they are 0.

use serde::{Deserialize, Serialize};

use crate::stream::{StreamPlan, X264Speed};

/// A resource vector. Units: CPU in millicores, memory and VRAM in MiB, NVENC/NVDEC in 1080p30-equivalent frames
/// per second, encoder sessions as a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resources {
    pub cpu_millicores: u64,
    pub memory_mib: u64,
    pub nvenc_fps: u64,
    pub nvdec_fps: u64,
    pub encoder_sessions: u64,
    pub vram_mib: u64,
}

/// One dimension of a [`Resources`] vector. The order of [`Dimension::ALL`] is the order admission reports the
/// first one that is short; [`Dimension::as_str`] is the field's name in JSON, in error bodies and in metric
/// labels.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    CpuMillicores,
    MemoryMib,
    NvencFps,
    NvdecFps,
    EncoderSessions,
    VramMib,
}

impl Dimension {
    /// Every dimension, host ones first.
    pub const ALL: [Dimension; 6] = [
        Dimension::CpuMillicores,
        Dimension::MemoryMib,
        Dimension::NvencFps,
        Dimension::NvdecFps,
        Dimension::EncoderSessions,
        Dimension::VramMib,
    ];

    /// The dimensions a GPU has (the rest belong to the host).
    pub const GPU: [Dimension; 4] = [
        Dimension::NvencFps,
        Dimension::NvdecFps,
        Dimension::EncoderSessions,
        Dimension::VramMib,
    ];

    /// The field name (`cpu_millicores`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::CpuMillicores => "cpu_millicores",
            Dimension::MemoryMib => "memory_mib",
            Dimension::NvencFps => "nvenc_fps",
            Dimension::NvdecFps => "nvdec_fps",
            Dimension::EncoderSessions => "encoder_sessions",
            Dimension::VramMib => "vram_mib",
        }
    }

    /// The dimension named `name` (its field name).
    pub fn parse(name: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// CPU and memory belong to the host; the others to one GPU.
    pub fn is_host(self) -> bool {
        matches!(self, Dimension::CpuMillicores | Dimension::MemoryMib)
    }
}

impl std::fmt::Display for Dimension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Resources {
    /// The value of one dimension.
    pub fn get(&self, d: Dimension) -> u64 {
        match d {
            Dimension::CpuMillicores => self.cpu_millicores,
            Dimension::MemoryMib => self.memory_mib,
            Dimension::NvencFps => self.nvenc_fps,
            Dimension::NvdecFps => self.nvdec_fps,
            Dimension::EncoderSessions => self.encoder_sessions,
            Dimension::VramMib => self.vram_mib,
        }
    }

    /// Sets one dimension.
    pub fn set(&mut self, d: Dimension, v: u64) {
        match d {
            Dimension::CpuMillicores => self.cpu_millicores = v,
            Dimension::MemoryMib => self.memory_mib = v,
            Dimension::NvencFps => self.nvenc_fps = v,
            Dimension::NvdecFps => self.nvdec_fps = v,
            Dimension::EncoderSessions => self.encoder_sessions = v,
            Dimension::VramMib => self.vram_mib = v,
        }
    }

    /// The host's share of a demand: CPU and memory (the GPU dimensions 0).
    pub fn host_part(&self) -> Resources {
        Resources {
            cpu_millicores: self.cpu_millicores,
            memory_mib: self.memory_mib,
            ..Default::default()
        }
    }

    /// One GPU's share of a demand (the host dimensions 0).
    pub fn gpu_part(&self) -> Resources {
        Resources {
            cpu_millicores: 0,
            memory_mib: 0,
            ..*self
        }
    }

    /// `dimension=value` for every non-zero dimension, for logs (`cpu_millicores=1200 memory_mib=300`).
    pub fn describe(&self) -> String {
        Dimension::ALL
            .into_iter()
            .filter(|d| self.get(*d) > 0)
            .map(|d| format!("{d}={}", self.get(d)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Component-wise sum (saturating).
    pub fn plus(&self, o: &Resources) -> Resources {
        Resources {
            cpu_millicores: self.cpu_millicores.saturating_add(o.cpu_millicores),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            nvenc_fps: self.nvenc_fps.saturating_add(o.nvenc_fps),
            nvdec_fps: self.nvdec_fps.saturating_add(o.nvdec_fps),
            encoder_sessions: self.encoder_sessions.saturating_add(o.encoder_sessions),
            vram_mib: self.vram_mib.saturating_add(o.vram_mib),
        }
    }

    /// Component-wise difference, floored at 0.
    pub fn minus(&self, o: &Resources) -> Resources {
        Resources {
            cpu_millicores: self.cpu_millicores.saturating_sub(o.cpu_millicores),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            nvenc_fps: self.nvenc_fps.saturating_sub(o.nvenc_fps),
            nvdec_fps: self.nvdec_fps.saturating_sub(o.nvdec_fps),
            encoder_sessions: self.encoder_sessions.saturating_sub(o.encoder_sessions),
            vram_mib: self.vram_mib.saturating_sub(o.vram_mib),
        }
    }

    /// The first dimension on which `demand` does not fit in `self` (the free capacity), if any.
    pub fn short_dimension(&self, demand: &Resources) -> Option<Dimension> {
        Dimension::ALL
            .into_iter()
            .find(|&d| demand.get(d) > self.get(d))
    }

    /// How many copies of `demand` fit in `self`.
    pub fn how_many(&self, demand: &Resources) -> u64 {
        Dimension::ALL
            .into_iter()
            .filter(|&d| demand.get(d) > 0)
            .map(|d| self.get(d) / demand.get(d))
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// What software encoding costs on this host class (figures in `hw-profiles/cpu-*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CpuCostModel {
    /// Fixed cost of a stream: pipeline threads, muxing, packaging, serving.
    pub stream_base_millicores: u64,
    /// Producing the source picture (test source, or decoding), per megapixel/s of the source.
    pub source_millicores_per_mpx: f64,
    /// x264 per megapixel/s of output, by speed preset: ultrafast, superfast, veryfast, faster, fast, medium.
    pub x264_millicores_per_mpx: [f64; 6],
    /// One AAC rendition.
    pub audio_millicores: u64,
    /// Memory: fixed per stream, plus per megapixel/s of all video renditions.
    pub stream_base_memory_mib: u64,
    pub memory_mib_per_mpx: f64,
    /// What serving viewers costs on this host (`kilnd calibrate` measures it; absent from a profile that was
    /// not calibrated). Admission reserves what serving measurably takes whether or not this is known; it gives
    /// the capacity report's serving headroom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<crate::load::ServingCost>,
}

fn speed_index(s: X264Speed) -> usize {
    match s {
        X264Speed::Ultrafast => 0,
        X264Speed::Superfast => 1,
        X264Speed::Veryfast => 2,
        X264Speed::Faster => 3,
        X264Speed::Fast => 4,
        X264Speed::Medium => 5,
    }
}

impl CpuCostModel {
    /// What a stream's backup input costs the host: its decode, on the CPU whatever the backend (booked at the
    /// source size, like the stream's own decode), for as long as the stream runs: the picture, its sound (as
    /// much as the stream's AAC encode) and a quarter of a stream's fixed cost (its demuxer and connection).
    /// Measured (2-core host, release build): a 640x360@30 H.264 + AAC backup over SRT cost 42 millicores
    /// (300 vs 258 for the same stream without it); this books 46.
    pub fn backup_demand(&self, plan: &StreamPlan) -> Resources {
        if plan.backup.is_none() {
            return Resources::default();
        }
        let (sw, sh) = plan.source_size();
        let source = f64::from(sw) * f64::from(sh) * plan.source_fps().as_f64() / 1e6;
        let audio = if plan.audio.is_some() {
            self.audio_millicores
        } else {
            0
        };
        let cpu = self.source_millicores_per_mpx * source
            + audio as f64
            + self.stream_base_millicores as f64 / 4.0;
        Resources {
            cpu_millicores: cpu.ceil().max(0.0) as u64,
            memory_mib: (self.memory_mib_per_mpx * source).ceil().max(0.0) as u64,
            ..Default::default()
        }
    }

    /// The CPU-backend demand of a stream.
    pub fn demand(&self, plan: &StreamPlan) -> Resources {
        let mpx = |w: u32, h: u32, fps: f64| f64::from(w) * f64::from(h) * fps / 1e6;
        let (sw, sh) = plan.source_size();
        let source = mpx(sw, sh, plan.source_fps().as_f64());
        let out: f64 = plan
            .video
            .iter()
            .map(|v| mpx(v.width, v.height, v.fps.as_f64()))
            .sum();
        let x264 = self.x264_millicores_per_mpx[speed_index(plan.encoder.x264_speed)];
        let audio = if plan.audio.is_some() {
            self.audio_millicores
        } else {
            0
        };
        let cpu = self.stream_base_millicores as f64
            + self.source_millicores_per_mpx * source
            + x264 * out
            + audio as f64;
        Resources {
            cpu_millicores: cpu.ceil().max(0.0) as u64,
            memory_mib: (self.stream_base_memory_mib as f64
                + self.memory_mib_per_mpx * (source + out))
                .ceil()
                .max(0.0) as u64,
            ..Default::default()
        }
    }
}

/// Who limits concurrent NVENC sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionScope {
    /// No driver cap (data-centre and professional boards).
    None,
    /// A cap per host, shared by every GeForce board in it (the driver enforces it; hitting it returns
    /// `NV_ENC_ERR_OUT_OF_MEMORY`).
    Host,
}

/// A GPU model's media engines, from `hw-profiles/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    /// File stem, e.g. `l4`.
    pub name: String,
    /// Product name as NVML reports it, e.g. `NVIDIA L4`.
    pub model: String,
    pub architecture: String,
    pub vram_mib: u64,
    pub nvenc_engines: u32,
    pub nvdec_engines: u32,
    /// Codecs NVENC encodes on this chip (`h264`, `hevc`, `av1`); empty without NVENC.
    pub encode_codecs: Vec<String>,
    pub decode_codecs: Vec<String>,
    /// 1080p H.264 frames/s one NVENC engine encodes, for NVENC presets p1 (fastest) … p7 (best).
    pub nvenc_h264_fps_per_engine: [u64; 7],
    /// 1080p H.264 frames/s one NVDEC engine decodes.
    pub nvdec_h264_fps_per_engine: u64,
    pub session_scope: SessionScope,
    /// The cap when `session_scope = "host"`.
    #[serde(default)]
    pub max_sessions: Option<u32>,
    /// Where each figure comes from, keyed by field name; a value starting with `unverified` marks an estimate.
    pub sources: std::collections::BTreeMap<String, String>,
}

/// The figures a profile must source.
pub const GPU_PROFILE_FIGURES: [&str; 7] = [
    "vram_mib",
    "nvenc_engines",
    "nvdec_engines",
    "encode_codecs",
    "nvenc_h264_fps_per_engine",
    "nvdec_h264_fps_per_engine",
    "session_scope",
];

/// An upper bound on sessions for GPUs without a driver cap (NVENC sessions are then limited by VRAM and
/// throughput, which are their own dimensions).
pub const UNCAPPED_SESSIONS: u64 = 1024;

impl GpuProfile {
    /// Consistency problems (empty when the profile is usable).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.vram_mib == 0 {
            out.push("vram_mib must be > 0".into());
        }
        if (self.nvenc_engines == 0) != self.encode_codecs.is_empty() {
            out.push("encode_codecs must be empty exactly when nvenc_engines = 0".into());
        }
        if (self.nvenc_engines == 0) != (self.nvenc_h264_fps_per_engine == [0; 7]) {
            out.push(
                "nvenc_h264_fps_per_engine must be all 0 exactly when nvenc_engines = 0".into(),
            );
        }
        if self
            .nvenc_h264_fps_per_engine
            .windows(2)
            .any(|w| w[1] > w[0])
        {
            out.push(
                "nvenc_h264_fps_per_engine must not rise from p1 to p7 (slower presets)".into(),
            );
        }
        if self.nvdec_engines > 0 && self.nvdec_h264_fps_per_engine == 0 {
            out.push("nvdec_h264_fps_per_engine must be > 0 with NVDEC engines".into());
        }
        match (self.session_scope, self.max_sessions) {
            (SessionScope::Host, None) => {
                out.push("session_scope = \"host\" needs max_sessions".into())
            }
            (SessionScope::None, Some(_)) => {
                out.push("max_sessions only applies to session_scope = \"host\"".into())
            }
            _ => {}
        }
        for c in self.encode_codecs.iter().chain(&self.decode_codecs) {
            if !["h264", "hevc", "av1", "vp8", "vp9", "mpeg2", "vc1", "jpeg"].contains(&c.as_str())
            {
                out.push(format!("unknown codec `{c}`"));
            }
        }
        for f in GPU_PROFILE_FIGURES {
            if self.sources.get(f).is_none_or(|s| s.trim().is_empty()) {
                out.push(format!(
                    "`{f}` has no entry in [sources] (give one, or say `unverified: …`)"
                ));
            }
        }
        out
    }

    /// Whether the chip has NVENC at all.
    pub fn has_nvenc(&self) -> bool {
        self.nvenc_engines > 0
    }

    /// One GPU's capacity vector at NVENC preset `p` (1–7). CPU and memory are host dimensions: 0 here.
    pub fn capacity(&self, nvenc_preset: u8) -> Resources {
        let p = usize::from(nvenc_preset.clamp(1, 7)) - 1;
        Resources {
            nvenc_fps: u64::from(self.nvenc_engines) * self.nvenc_h264_fps_per_engine[p],
            nvdec_fps: u64::from(self.nvdec_engines) * self.nvdec_h264_fps_per_engine,
            encoder_sessions: if !self.has_nvenc() {
                0
            } else {
                match self.session_scope {
                    SessionScope::Host => u64::from(self.max_sessions.unwrap_or(0)),
                    SessionScope::None => UNCAPPED_SESSIONS,
                }
            },
            vram_mib: self.vram_mib,
            ..Default::default()
        }
    }
}

/// What a stream costs on a GPU: NVENC/NVDEC work in 1080p-equivalent frames/s, one encoder session per video
/// rendition, VRAM per session and per decoder, and the CPU work that stays on the host (audio, muxing, packaging).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuCostModel {
    pub vram_per_session_mib: u64,
    pub vram_per_decoder_mib: u64,
    /// Host CPU of a GPU stream (pipeline threads, audio encode, muxing, packaging).
    pub host_millicores: u64,
    pub host_memory_mib: u64,
}

impl Default for GpuCostModel {
    fn default() -> Self {
        // unverified estimates: an NVENC H.264 session at 1080p holds ~200 MiB of surfaces and bitstream buffers,
        // an NVDEC session ~150 MiB (re-measure with `kilnd calibrate` on the GPU host)
        Self {
            vram_per_session_mib: 200,
            vram_per_decoder_mib: 150,
            host_millicores: 60,
            host_memory_mib: 40,
        }
    }
}

/// The most streams a calibration ramp (`kilnd calibrate`) runs at once.
pub const RAMP_MAX_STREAMS: usize = 1024;

/// The stream count of a calibration ramp's step after one of `n` streams: one more up to 8, then an eighth more
/// (rounded down), never past [`RAMP_MAX_STREAMS`]. The sustainable count found is then within an eighth below
/// the host's true one, and a host that sustains hundreds is measured in tens of steps, not hundreds.
pub fn ramp_next(n: usize) -> usize {
    (n + (n / 8).max(1)).min(RAMP_MAX_STREAMS)
}

/// 1080p-equivalent frames/s of a `w`×`h` picture at `fps`.
pub fn equivalent_1080p_fps(w: u32, h: u32, fps: f64) -> f64 {
    f64::from(w) * f64::from(h) * fps / (1920.0 * 1080.0)
}

impl GpuCostModel {
    /// Demand of `plan` with its encodes on NVENC and, when `gpu_decode`, its source decoded on NVDEC.
    pub fn demand(&self, plan: &StreamPlan, gpu_decode: bool) -> Resources {
        let enc: f64 = plan
            .video
            .iter()
            .map(|v| equivalent_1080p_fps(v.width, v.height, v.fps.as_f64()))
            .sum();
        let (sw, sh) = plan.source_size();
        let dec = if gpu_decode {
            equivalent_1080p_fps(sw, sh, plan.source_fps().as_f64())
        } else {
            0.0
        };
        let sessions = plan.video.len() as u64;
        Resources {
            cpu_millicores: self.host_millicores,
            memory_mib: self.host_memory_mib,
            nvenc_fps: enc.ceil() as u64,
            nvdec_fps: dec.ceil() as u64,
            encoder_sessions: sessions,
            vram_mib: sessions * self.vram_per_session_mib
                + if gpu_decode {
                    self.vram_per_decoder_mib
                } else {
                    0
                },
        }
    }
}

#[cfg(test)]
mod tests;
