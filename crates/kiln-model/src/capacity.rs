//! Capacity in physical units: what a stream demands and what a node has, on every dimension.
//!
//! Pure arithmetic; the cost figures come from a [`CpuCostModel`] (loaded from `hw-profiles/`, replaced by a
//! calibrated one when `kilnd calibrate` exists). GPU dimensions are part of the vector now so that every consumer
//! (admission, `/v1/capacity`, the scheduler) adds them up the same way; on CPU-only pipelines they are 0.

use serde::{Deserialize, Serialize};

use crate::stream::{StreamPlan, X264Speed};

/// A resource vector. Units: CPU in millicores, memory and VRAM in MiB, NVENC/NVDEC in 1080p30-equivalent frames
/// per second, encoder sessions as a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millicores: u64,
    pub memory_mib: u64,
    pub nvenc_fps: u64,
    pub nvdec_fps: u64,
    pub encoder_sessions: u64,
    pub vram_mib: u64,
}

/// The dimensions, in the order admission reports the first one that is short.
pub const DIMENSIONS: [&str; 6] = [
    "cpu_millicores",
    "memory_mib",
    "nvenc_fps",
    "nvdec_fps",
    "encoder_sessions",
    "vram_mib",
];

impl Resources {
    fn get(&self, dim: usize) -> u64 {
        [
            self.cpu_millicores,
            self.memory_mib,
            self.nvenc_fps,
            self.nvdec_fps,
            self.encoder_sessions,
            self.vram_mib,
        ][dim]
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
    pub fn short_dimension(&self, demand: &Resources) -> Option<&'static str> {
        (0..DIMENSIONS.len())
            .find(|&d| demand.get(d) > self.get(d))
            .map(|d| DIMENSIONS[d])
    }

    /// How many copies of `demand` fit in `self`.
    pub fn how_many(&self, demand: &Resources) -> u64 {
        (0..DIMENSIONS.len())
            .filter(|&d| demand.get(d) > 0)
            .map(|d| self.get(d) / demand.get(d))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The demand dimension → (requested, free) for error messages.
    pub fn dimension(&self, name: &str) -> u64 {
        DIMENSIONS
            .iter()
            .position(|d| *d == name)
            .map_or(0, |i| self.get(i))
    }
}

/// What software encoding costs on this host class (figures in `hw-profiles/cpu-*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionScope {
    /// No driver cap (data-centre and professional boards).
    None,
    /// A cap per host, shared by every GeForce board in it (the driver enforces it; hitting it returns
    /// `NV_ENC_ERR_OUT_OF_MEMORY`).
    Host,
}

/// A GPU model's media engines, from `hw-profiles/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
mod tests {
    use super::*;
    use crate::stream::{AudioRendition, EncoderSettings, Fraction, Timing, VideoRendition};
    use proptest::prelude::*;

    fn model() -> CpuCostModel {
        CpuCostModel {
            stream_base_millicores: 40,
            source_millicores_per_mpx: 3.0,
            x264_millicores_per_mpx: [4.0, 6.0, 10.0, 14.0, 20.0, 28.0],
            audio_millicores: 15,
            stream_base_memory_mib: 20,
            memory_mib_per_mpx: 2.0,
        }
    }

    fn plan(renditions: &[(u32, u32, u32)], audio: bool) -> StreamPlan {
        let video = renditions
            .iter()
            .enumerate()
            .map(|(i, &(w, h, fps))| VideoRendition {
                name: format!("v{i}"),
                width: w,
                height: h,
                fps: Fraction::new(fps, 1),
                bitrate_kbps: 500,
                codec: Default::default(),
            })
            .collect();
        StreamPlan::new(
            "p",
            "test:",
            video,
            audio.then(AudioRendition::default),
            Timing::default(),
            EncoderSettings::default(),
        )
        .unwrap()
    }

    #[test]
    fn demo_ladder_costs_about_what_was_measured() {
        // 720p30 + 360p30 veryfast + AAC measured 520 millicores here (release build)
        let d = model().demand(&plan(&[(1280, 720, 30), (640, 360, 30)], true));
        assert!((450..=560).contains(&d.cpu_millicores), "{d:?}");
        assert_eq!(d.nvenc_fps, 0);
    }

    #[test]
    fn fit_and_headroom() {
        let cap = Resources {
            cpu_millicores: 1000,
            memory_mib: 100,
            ..Default::default()
        };
        let d = Resources {
            cpu_millicores: 300,
            memory_mib: 10,
            ..Default::default()
        };
        assert_eq!(cap.how_many(&d), 3);
        assert_eq!(cap.short_dimension(&d), None);
        let big = Resources {
            cpu_millicores: 300,
            memory_mib: 200,
            ..Default::default()
        };
        assert_eq!(cap.short_dimension(&big), Some("memory_mib"));
        assert_eq!(cap.minus(&big).memory_mib, 0);
    }

    proptest! {
        /// Demand grows with resolution and frame rate, adds across renditions, and is never negative.
        #[test]
        fn demand_is_monotone_and_additive(w in 8u32..960, h in 8u32..540, fi in 0usize..3, extra in 8u32..480) {
            const RATES: [u32; 4] = [24, 25, 30, 60];
            let (w, h, extra, fps) = (w * 2, h * 2, extra * 2, RATES[fi]);
            let m = model();
            let a = m.demand(&plan(&[(w, h, fps)], false));
            let bigger = m.demand(&plan(&[(w + 2, h + 2, fps)], false));
            let faster = m.demand(&plan(&[(w, h, RATES[fi + 1])], false));
            prop_assert!(bigger.cpu_millicores >= a.cpu_millicores && faster.cpu_millicores >= a.cpu_millicores);
            prop_assert!(bigger.memory_mib >= a.memory_mib);
            // a second (smaller) rendition costs its own encode, never less than nothing
            let two = m.demand(&plan(&[(w, h, fps), (extra.min(w), extra.min(h), fps)], false));
            prop_assert!(two.cpu_millicores >= a.cpu_millicores);
            let with_audio = m.demand(&plan(&[(w, h, fps)], true));
            prop_assert!(with_audio.cpu_millicores >= a.cpu_millicores + m.audio_millicores - 1);
        }
    }

    fn l4() -> GpuProfile {
        GpuProfile {
            name: "l4".into(),
            model: "NVIDIA L4".into(),
            architecture: "Ada".into(),
            vram_mib: 23034,
            nvenc_engines: 2,
            nvdec_engines: 4,
            encode_codecs: vec!["h264".into(), "hevc".into(), "av1".into()],
            decode_codecs: vec!["h264".into()],
            nvenc_h264_fps_per_engine: [700, 600, 500, 400, 300, 250, 200],
            nvdec_h264_fps_per_engine: 700,
            session_scope: SessionScope::None,
            max_sessions: None,
            sources: GPU_PROFILE_FIGURES
                .iter()
                .map(|f| (f.to_string(), "test".to_string()))
                .collect(),
        }
    }

    #[test]
    fn gpu_profiles_are_checked_and_give_capacity() {
        let p = l4();
        assert!(p.problems().is_empty(), "{:?}", p.problems());
        let c = p.capacity(4);
        assert_eq!((c.nvenc_fps, c.nvdec_fps, c.vram_mib), (800, 2800, 23034));
        assert_eq!(c.encoder_sessions, UNCAPPED_SESSIONS);
        let mut no_enc = p.clone();
        no_enc.nvenc_engines = 0;
        assert!(!no_enc.problems().is_empty(), "codecs listed without NVENC");
        no_enc.encode_codecs.clear();
        no_enc.nvenc_h264_fps_per_engine = [0; 7];
        assert!(no_enc.problems().is_empty());
        assert_eq!(no_enc.capacity(4).encoder_sessions, 0);
        let mut unsourced = p.clone();
        unsourced.sources.remove("vram_mib");
        assert!(unsourced.problems().iter().any(|e| e.contains("vram_mib")));
        let mut geforce = p;
        geforce.session_scope = SessionScope::Host;
        assert!(!geforce.problems().is_empty());
        geforce.max_sessions = Some(8);
        assert_eq!(geforce.capacity(1).encoder_sessions, 8);
    }

    #[test]
    fn gpu_demand_counts_sessions_and_1080p_equivalents() {
        let d =
            GpuCostModel::default().demand(&plan(&[(1920, 1080, 30), (1280, 720, 30)], true), true);
        assert_eq!(d.encoder_sessions, 2);
        assert_eq!(d.nvenc_fps, 44); // 30 + 13.33
        assert!(d.nvdec_fps > 0 && d.vram_mib == 2 * 200 + 150);
        let cpu_decode = GpuCostModel::default().demand(&plan(&[(1920, 1080, 30)], true), false);
        assert_eq!(cpu_decode.nvdec_fps, 0);
    }
}
