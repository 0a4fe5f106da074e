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
}
