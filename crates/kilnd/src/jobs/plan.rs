//! The glue between the pure job plan ([`kiln_model::vod::plan_job`]) and the media and packaging crates: the
//! probe and the preset summarised for the plan, and the plan turned into a [`VodPlan`] (what the pipeline
//! builds), the tracks the packager fills, and the renditions a job's status lists.

use kiln_llhls::vod::{TrackKind, VodTrack};
use kiln_media::vod::{ProbeInfo, VodPlan};
use kiln_model::vod::{JobPlan, JobRendition, PresetSummary, SourceSummary, SourceVideo};
use kiln_model::Fraction;

/// Sample rate of every audio output (the pipeline resamples to it).
const AUDIO_SAMPLE_RATE: u32 = 48_000;
/// Timescale of a track until its init segment says otherwise.
const DEFAULT_TIMESCALE: u32 = 90_000;

/// What the plan needs from a probe: the first video stream and the first audio stream's channels.
pub(super) fn source_summary(probe: &ProbeInfo) -> SourceSummary {
    SourceSummary {
        video: probe.video.as_ref().map(|v| SourceVideo {
            width: v.width,
            height: v.height,
            fps: Fraction::new(v.fps.0, v.fps.1),
            rotation: v.rotation,
        }),
        audio_channels: probe.audio.first().map(|a| a.channels),
    }
}

/// What the plan needs from a preset.
pub(super) fn preset_summary(preset: &kiln_config::Preset) -> PresetSummary {
    PresetSummary {
        video: preset.video.clone(),
        audio_kbps: preset.audio.as_ref().map(|a| a.bitrate_kbps),
        segment_ms: preset.segment_ms,
        x264_speed: preset.encoder.x264_speed,
    }
}

/// The pipeline that carries out `plan` on the input at `uri`.
pub(super) fn vod_plan(uri: String, plan: &JobPlan, source: Option<(u32, u32)>) -> VodPlan {
    VodPlan {
        // macroblock rounding (1080 → 1088) is not growth
        max_source_pixels: source.map(|(w, h)| (u64::from(w) + 16) * (u64::from(h) + 16)),
        uri,
        video: plan.video.clone(),
        fps: (plan.fps.num, plan.fps.den),
        convert_rate: plan.convert_rate,
        rotation: plan.rotation,
        audio_kbps: plan.audio.map(|a| a.bitrate_kbps),
        segment_ms: plan.segment_ms,
        x264_speed: plan.x264_speed,
        thumbnails: plan.thumbnails.map(|t| (t.interval_s, t.width)),
    }
}

/// The tracks the pipeline's events fill, in its order (video renditions, then audio), still without segments.
pub(super) fn tracks(plan: &JobPlan) -> Vec<VodTrack> {
    let fps = f64::from(plan.fps.num) / f64::from(plan.fps.den.max(1));
    let video = plan.video.iter().map(|v| VodTrack {
        name: v.name.clone(),
        kind: TrackKind::Video {
            width: v.width,
            height: v.height,
            fps,
        },
        codecs: String::new(),
        bitrate_kbps: v.bitrate_kbps,
        timescale: DEFAULT_TIMESCALE,
        segments: Vec::new(),
    });
    let audio = plan.audio.map(|a| VodTrack {
        name: "audio".into(),
        kind: TrackKind::Audio {
            sample_rate: AUDIO_SAMPLE_RATE,
            channels: a.channels,
        },
        codecs: String::new(),
        bitrate_kbps: a.bitrate_kbps,
        timescale: DEFAULT_TIMESCALE,
        segments: Vec::new(),
    });
    video.chain(audio).collect()
}

/// The renditions job `id`'s status lists, with their playlist paths.
pub(super) fn renditions(id: &str, plan: &JobPlan) -> Vec<JobRendition> {
    plan.video
        .iter()
        .map(|v| JobRendition {
            name: v.name.clone(),
            width: v.width,
            height: v.height,
            bitrate_kbps: v.bitrate_kbps,
            playlist: format!("/vod/{id}/{}/index.m3u8", v.name),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_media::vod::{AudioProbe, VideoProbe};
    use kiln_model::vod::{plan_job, DEFAULT_VOD_PRESET};

    fn probe(video: bool, audio_channels: &[u32]) -> ProbeInfo {
        ProbeInfo {
            duration_s: 10.0,
            video: video.then(|| VideoProbe {
                codec: "video/x-h264".into(),
                width: 1280,
                height: 720,
                fps: (60, 1),
                rotation: 180,
            }),
            audio: audio_channels
                .iter()
                .map(|&channels| AudioProbe {
                    codec: "audio/mpeg".into(),
                    channels,
                    sample_rate: 44_100,
                })
                .collect(),
        }
    }

    fn default_preset() -> PresetSummary {
        preset_summary(
            kiln_config::Presets::builtin()
                .get(DEFAULT_VOD_PRESET)
                .expect("the default VOD preset is built in"),
        )
    }

    fn request() -> kiln_model::vod::JobRequest {
        crate::jobs::testing::request(0)
    }

    #[test]
    fn the_probe_summary_keeps_the_first_streams() {
        let s = source_summary(&probe(true, &[6, 2]));
        let v = s.video.unwrap();
        assert_eq!(
            (v.width, v.height, v.fps, v.rotation),
            (1280, 720, Fraction::new(60, 1), 180)
        );
        assert_eq!(s.audio_channels, Some(6));
        let s = source_summary(&probe(false, &[]));
        assert_eq!((s.video, s.audio_channels), (None, None));
    }

    #[test]
    fn the_pipeline_and_the_tracks_follow_the_plan() {
        let preset = default_preset();
        let plan = plan_job(&source_summary(&probe(true, &[6])), &request(), &preset).unwrap();
        let vp = vod_plan("file:///in.mp4".into(), &plan, Some((1920, 1080)));
        assert_eq!(vp.max_source_pixels, Some(1936 * 1096));
        assert_eq!(vp.uri, "file:///in.mp4");
        assert_eq!(vp.video, plan.video);
        assert_eq!(
            (vp.fps, vp.convert_rate),
            ((plan.fps.num, plan.fps.den), true)
        );
        assert_eq!(vp.rotation, 180);
        assert_eq!(vp.audio_kbps, preset.audio_kbps);
        assert_eq!(vp.segment_ms, preset.segment_ms);
        assert_eq!(vp.thumbnails, Some((5, 640)));
        let t = tracks(&plan);
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, plan.track_names());
        assert!(
            matches!(t[0].kind, TrackKind::Video { width: 1280, height: 720, fps } if fps == plan.fps.as_f64())
        );
        let audio = t.last().unwrap();
        assert_eq!(
            audio.kind,
            TrackKind::Audio {
                sample_rate: 48_000,
                channels: 2
            }
        );
        assert_eq!(Some(audio.bitrate_kbps), preset.audio_kbps);
        let r = renditions("j1", &plan);
        assert_eq!(r.len(), plan.video.len());
        assert_eq!(r[0].playlist, format!("/vod/j1/{}/index.m3u8", r[0].name));
    }

    #[test]
    fn an_audio_only_plan_has_one_audio_track() {
        let plan = plan_job(
            &source_summary(&probe(false, &[1])),
            &request(),
            &default_preset(),
        )
        .unwrap();
        let t = tracks(&plan);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[0].kind,
            TrackKind::Audio {
                sample_rate: 48_000,
                channels: 1
            }
        );
        let vp = vod_plan("file:///a.m4a".into(), &plan, None);
        assert_eq!(vp.max_source_pixels, None);
        assert_eq!((vp.video.len(), vp.thumbnails, vp.rotation), (0, None, 0));
        assert!(renditions("j1", &plan).is_empty());
    }
}
