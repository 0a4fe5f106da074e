//! The plan of a VOD job: what a probed input, the request and the preset decide (ladder, frame rate, GOP, x264
//! speed, audio, thumbnails), as a pure function, [`plan_job`]. The daemon probes the input, summarises the probe
//! and the preset into [`SourceSummary`] and [`PresetSummary`], and turns the [`JobPlan`] into its pipeline.

use crate::stream::{Fraction, VideoRendition, X264Speed};

use super::{ladder, JobRequest, DEFAULT_THUMBNAIL_INTERVAL_S};

/// Width of a job's thumbnails in pixels (the height follows the aspect ratio).
pub const THUMBNAIL_WIDTH: u32 = 640;

/// Frame rate of the (unused) video settings of a job without video.
const NO_VIDEO_FPS: Fraction = Fraction::new(30, 1);

/// A source counts as faster than the preset only above the preset's rate plus this (29.97 is not "faster" than
/// 30, and neither is a rate that differs by rounding).
const FASTER_MARGIN_FPS: f64 = 0.01;

/// What a job's plan needs from the probe of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceSummary {
    /// The first video stream, if any.
    pub video: Option<SourceVideo>,
    /// Channels of the first audio stream; `None`: the input has no audio.
    pub audio_channels: Option<u32>,
}

/// The first video stream of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceVideo {
    /// Display size (after rotation).
    pub width: u32,
    pub height: u32,
    /// Frame rate; a numerator of 0 means unknown.
    pub fps: Fraction,
    /// Degrees clockwise to rotate (0, 90, 180, 270).
    pub rotation: u32,
}

/// What a job's plan needs from its preset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetSummary {
    /// The preset's ladder (replaced by the request's renditions, when it has some).
    pub video: Vec<VideoRendition>,
    /// AAC bitrate; `None`: the preset makes no audio.
    pub audio_kbps: Option<u32>,
    /// Segment (and GOP) duration.
    pub segment_ms: u32,
    pub x264_speed: X264Speed,
}

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPlan {
    /// Laddered for the source (never upscaled); empty: no video output.
    pub video: Vec<VideoRendition>,
    /// Output frame rate: the source's, or the first requested rendition's when the source is faster or its rate
    /// is unknown.
    pub fps: Fraction,
    /// The source is faster than [`Self::fps`]: frames are dropped down to it (otherwise they pass untouched).
    pub convert_rate: bool,
    /// Degrees clockwise to rotate the source (its probed orientation).
    pub rotation: u32,
    pub audio: Option<AudioPlan>,
    /// Segment duration; every rendition has one GOP per segment.
    pub segment_ms: u32,
    pub x264_speed: X264Speed,
    pub thumbnails: Option<ThumbnailPlan>,
}

/// The audio output of a job (AAC, 48 kHz).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioPlan {
    pub bitrate_kbps: u32,
    /// 1 or 2: the source's channels, down-mixed to stereo at most.
    pub channels: u32,
}

/// One thumbnail every `interval_s` seconds, `width` pixels wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThumbnailPlan {
    pub interval_s: u32,
    pub width: u32,
}

/// Why a job cannot run on its input (the text is what `JobStatus.error` shows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobPlanError {
    #[error("nothing to encode: the input has no stream this preset makes")]
    NothingToEncode,
}

/// Decoded source pictures a job holds at once: the H.264/HEVC decoder's picture buffer (up to 16 references plus
/// the frame being decoded) and the queues between the decoder and the scalers.
pub const SOURCE_FRAMES_IN_FLIGHT: u64 = 24;
/// Pictures of one rendition held at once: its queue, x264's lookahead and frame threads.
pub const RUNG_FRAMES_IN_FLIGHT: u64 = 48;
/// The pipeline's fixed cost (elements, muxers, audio, thumbnails), MiB.
pub const JOB_BASE_MEMORY_MIB: u64 = 64;

/// Bytes of one 8-bit 4:2:0 picture (what the source chain converts to).
fn picture_bytes(width: u32, height: u32) -> u64 {
    u64::from(width) * u64::from(height) * 3 / 2
}

impl JobPlan {
    /// What the job's pipeline holds in memory, in MiB, for a source of `width` × `height` (decoded size): the
    /// decoded-picture pool ([`SOURCE_FRAMES_IN_FLIGHT`]), each rendition's pictures ([`RUNG_FRAMES_IN_FLIGHT`])
    /// and a fixed part. An 8K source is about 1.5 GiB, a 1080p one about 0.3 GiB. Admission books it, and a job
    /// whose estimate is over the daemon's per-job budget fails with the number.
    pub fn memory_mib(&self, width: u32, height: u32) -> u64 {
        let source = if self.video.is_empty() {
            0
        } else {
            picture_bytes(width, height) * SOURCE_FRAMES_IN_FLIGHT
        };
        let rungs: u64 = self
            .video
            .iter()
            .map(|v| picture_bytes(v.width, v.height) * RUNG_FRAMES_IN_FLIGHT)
            .sum();
        JOB_BASE_MEMORY_MIB + (source + rungs).div_ceil(1 << 20)
    }

    /// Output track names in pipeline order: the video renditions, then `audio`.
    pub fn track_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.video.iter().map(|v| v.name.clone()).collect();
        if self.audio.is_some() {
            names.push("audio".into());
        }
        names
    }
}

/// Plans a job: the request's renditions (or the preset's) laddered for the source, never upscaled; the source's
/// frame rate, converted down only when it is faster than the first rendition's; audio when both the input and
/// the preset have it; thumbnails when asked for and there is video. Fails when nothing would be encoded.
pub fn plan_job(
    source: &SourceSummary,
    req: &JobRequest,
    preset: &PresetSummary,
) -> Result<JobPlan, JobPlanError> {
    let requested = req.renditions.as_deref().unwrap_or(&preset.video);
    let (video, fps, convert_rate) = match (&source.video, requested.first()) {
        (Some(v), Some(first)) => {
            let want = first.fps;
            let src = if v.fps.num > 0 { v.fps } else { want };
            // never above the source's rate, nor above the preset's
            let faster =
                f64::from(src.num) / f64::from(src.den.max(1)) > want.as_f64() + FASTER_MARGIN_FPS;
            let fps = if faster { want } else { src };
            (ladder(v.width, v.height, requested), fps, faster)
        }
        _ => (Vec::new(), NO_VIDEO_FPS, false),
    };
    let audio = match (preset.audio_kbps, source.audio_channels) {
        (Some(bitrate_kbps), Some(channels)) => Some(AudioPlan {
            bitrate_kbps,
            channels: channels.clamp(1, 2),
        }),
        _ => None,
    };
    if video.is_empty() && audio.is_none() {
        return Err(JobPlanError::NothingToEncode);
    }
    let thumbnails = (req.outputs.thumbnails && !video.is_empty()).then(|| ThumbnailPlan {
        interval_s: req
            .thumbnail_interval_s
            .unwrap_or(DEFAULT_THUMBNAIL_INTERVAL_S),
        width: THUMBNAIL_WIDTH,
    });
    Ok(JobPlan {
        video,
        fps,
        convert_rate,
        rotation: source.video.map_or(0, |v| v.rotation),
        audio,
        segment_ms: preset.segment_ms,
        x264_speed: req.x264_speed.unwrap_or(preset.x264_speed),
        thumbnails,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::VideoCodec;
    use crate::vod::JobOutputs;

    fn rung(name: &str, w: u32, h: u32, fps: Fraction) -> VideoRendition {
        VideoRendition {
            name: name.into(),
            width: w,
            height: h,
            fps,
            bitrate_kbps: 1000,
            codec: VideoCodec::H264,
        }
    }

    fn preset() -> PresetSummary {
        let f30 = Fraction::new(30, 1);
        PresetSummary {
            video: vec![
                rung("1080p", 1920, 1080, f30),
                rung("720p", 1280, 720, f30),
                rung("360p", 640, 360, f30),
            ],
            audio_kbps: Some(128),
            segment_ms: 4000,
            x264_speed: X264Speed::Faster,
        }
    }

    fn req() -> JobRequest {
        JobRequest {
            input: "file:///media/a.mp4".into(),
            preset: None,
            renditions: None,
            priority: 0,
            outputs: JobOutputs::default(),
            thumbnail_interval_s: None,
            x264_speed: None,
        }
    }

    fn video(w: u32, h: u32, fps: (u32, u32)) -> Option<SourceVideo> {
        Some(SourceVideo {
            width: w,
            height: h,
            fps: Fraction::new(fps.0, fps.1),
            rotation: 0,
        })
    }

    fn source(video: Option<SourceVideo>, audio_channels: Option<u32>) -> SourceSummary {
        SourceSummary {
            video,
            audio_channels,
        }
    }

    fn sizes(p: &JobPlan) -> Vec<(u32, u32)> {
        p.video.iter().map(|r| (r.width, r.height)).collect()
    }

    #[test]
    fn a_full_hd_source_gets_the_whole_ladder_audio_and_thumbnails() {
        let p = plan_job(
            &source(video(1920, 1080, (30, 1)), Some(2)),
            &req(),
            &preset(),
        )
        .unwrap();
        assert_eq!(sizes(&p), vec![(1920, 1080), (1280, 720), (640, 360)]);
        assert_eq!((p.fps, p.convert_rate), (Fraction::new(30, 1), false));
        assert_eq!(
            p.audio,
            Some(AudioPlan {
                bitrate_kbps: 128,
                channels: 2
            })
        );
        assert_eq!(p.segment_ms, 4000);
        assert_eq!(p.x264_speed, X264Speed::Faster);
        assert_eq!(
            p.thumbnails,
            Some(ThumbnailPlan {
                interval_s: DEFAULT_THUMBNAIL_INTERVAL_S,
                width: THUMBNAIL_WIDTH
            })
        );
        assert_eq!(p.track_names(), ["1080p", "720p", "360p", "audio"]);
    }

    #[test]
    fn memory_follows_the_decoded_source_and_the_ladder() {
        let hd = plan_job(
            &source(video(1920, 1080, (30, 1)), Some(2)),
            &req(),
            &preset(),
        )
        .unwrap();
        let m_hd = hd.memory_mib(1920, 1080);
        // 24 source pictures of 3 MiB, 48 of each rung (1080p, 720p, 360p), plus the base
        let want = JOB_BASE_MEMORY_MIB
            + (1920u64 * 1080 * 3 / 2 * (24 + 48)
                + 1280 * 720 * 3 / 2 * 48
                + 640 * 360 * 3 / 2 * 48)
                .div_ceil(1 << 20);
        assert_eq!(m_hd, want);
        assert!((300..500).contains(&m_hd), "{m_hd}");
        // the same ladder from a source that decodes at 8K holds gigabytes: the declared size decides
        let m_8k = hd.memory_mib(7680, 4320);
        assert!(m_8k > 1400 && m_8k > 3 * m_hd, "{m_8k} vs {m_hd}");
        let audio = plan_job(&source(None, Some(1)), &req(), &preset()).unwrap();
        assert_eq!(audio.memory_mib(7680, 4320), JOB_BASE_MEMORY_MIB);
    }

    #[test]
    fn an_audio_only_input_gets_audio_and_no_video_nor_thumbnails() {
        let p = plan_job(&source(None, Some(1)), &req(), &preset()).unwrap();
        assert!(p.video.is_empty());
        assert_eq!((p.fps, p.convert_rate), (NO_VIDEO_FPS, false));
        assert_eq!(p.rotation, 0);
        assert_eq!(
            p.audio,
            Some(AudioPlan {
                bitrate_kbps: 128,
                channels: 1
            })
        );
        assert_eq!(p.thumbnails, None, "no video, no thumbnails");
        assert_eq!(p.track_names(), ["audio"]);
    }

    #[test]
    fn an_input_without_audio_gets_no_audio_track() {
        let p = plan_job(&source(video(1280, 720, (30, 1)), None), &req(), &preset()).unwrap();
        assert_eq!(p.audio, None);
        assert_eq!(p.track_names(), ["720p", "360p"]);
    }

    #[test]
    fn audio_is_down_mixed_to_stereo_at_most() {
        let p = plan_job(&source(None, Some(6)), &req(), &preset()).unwrap();
        assert_eq!(p.audio.map(|a| a.channels), Some(2));
        // a stream that reports no channels still gets one
        let p = plan_job(&source(None, Some(0)), &req(), &preset()).unwrap();
        assert_eq!(p.audio.map(|a| a.channels), Some(1));
    }

    #[test]
    fn nothing_to_encode_is_an_error() {
        // neither stream in the input
        assert_eq!(
            plan_job(&source(None, None), &req(), &preset()),
            Err(JobPlanError::NothingToEncode)
        );
        // audio in the input, but a preset without audio and no video to make
        let silent = PresetSummary {
            audio_kbps: None,
            ..preset()
        };
        assert_eq!(
            plan_job(&source(None, Some(2)), &req(), &silent),
            Err(JobPlanError::NothingToEncode)
        );
        // video in the input, but a preset without a ladder (and the input has no audio)
        let no_ladder = PresetSummary {
            video: Vec::new(),
            ..preset()
        };
        assert_eq!(
            plan_job(&source(video(640, 360, (30, 1)), None), &req(), &no_ladder),
            Err(JobPlanError::NothingToEncode)
        );
        assert_eq!(
            JobPlanError::NothingToEncode.to_string(),
            "nothing to encode: the input has no stream this preset makes"
        );
    }

    #[test]
    fn a_source_faster_than_the_preset_is_converted_down() {
        let p = plan_job(&source(video(1280, 720, (60, 1)), None), &req(), &preset()).unwrap();
        assert_eq!((p.fps, p.convert_rate), (Fraction::new(30, 1), true));
        // 59.94 too
        let p = plan_job(
            &source(video(1280, 720, (60_000, 1001)), None),
            &req(),
            &preset(),
        )
        .unwrap();
        assert_eq!((p.fps, p.convert_rate), (Fraction::new(30, 1), true));
    }

    #[test]
    fn a_slower_source_keeps_its_own_rate() {
        let p = plan_job(&source(video(1280, 720, (25, 1)), None), &req(), &preset()).unwrap();
        assert_eq!((p.fps, p.convert_rate), (Fraction::new(25, 1), false));
        // 29.97 is not faster than 30, and an exact match is kept as is
        for src in [(30_000, 1001), (30, 1)] {
            let p = plan_job(&source(video(1280, 720, src), None), &req(), &preset()).unwrap();
            assert_eq!(
                (p.fps, p.convert_rate),
                (Fraction::new(src.0, src.1), false)
            );
        }
    }

    #[test]
    fn an_unknown_source_rate_takes_the_presets() {
        let p = plan_job(&source(video(1280, 720, (0, 1)), None), &req(), &preset()).unwrap();
        assert_eq!((p.fps, p.convert_rate), (Fraction::new(30, 1), false));
    }

    #[test]
    fn the_ladder_is_never_upscaled() {
        let p = plan_job(&source(video(1280, 720, (30, 1)), None), &req(), &preset()).unwrap();
        assert_eq!(sizes(&p), vec![(1280, 720), (640, 360)]);
        // smaller than every rung: one rendition at the source's size
        let p = plan_job(&source(video(320, 180, (30, 1)), None), &req(), &preset()).unwrap();
        assert_eq!(sizes(&p), vec![(320, 180)]);
        // portrait, rotated: the rotation is passed on and the ladder is portrait
        let rotated = Some(SourceVideo {
            rotation: 90,
            ..video(720, 1280, (30, 1)).unwrap()
        });
        let p = plan_job(&source(rotated, None), &req(), &preset()).unwrap();
        assert_eq!(sizes(&p), vec![(720, 1280), (360, 640)]);
        assert_eq!(p.rotation, 90);
    }

    #[test]
    fn explicit_renditions_replace_the_presets() {
        let r = JobRequest {
            renditions: Some(vec![
                rung("small", 426, 240, Fraction::new(24, 1)),
                rung("big", 3840, 2160, Fraction::new(24, 1)),
            ]),
            ..req()
        };
        let p = plan_job(&source(video(1920, 1080, (60, 1)), Some(2)), &r, &preset()).unwrap();
        // the 4K rung is above the source: dropped
        assert_eq!(sizes(&p), vec![(426, 240)]);
        assert_eq!(p.video[0].name, "small");
        // the first requested rendition's rate is the target
        assert_eq!((p.fps, p.convert_rate), (Fraction::new(24, 1), true));
    }

    #[test]
    fn thumbnails_follow_the_request() {
        let src = source(video(1280, 720, (30, 1)), Some(2));
        let off = JobRequest {
            outputs: JobOutputs {
                dash: true,
                thumbnails: false,
            },
            ..req()
        };
        assert_eq!(plan_job(&src, &off, &preset()).unwrap().thumbnails, None);
        let every_2s = JobRequest {
            thumbnail_interval_s: Some(2),
            ..req()
        };
        assert_eq!(
            plan_job(&src, &every_2s, &preset()).unwrap().thumbnails,
            Some(ThumbnailPlan {
                interval_s: 2,
                width: THUMBNAIL_WIDTH
            })
        );
    }

    #[test]
    fn the_request_overrides_the_x264_speed() {
        let src = source(video(640, 360, (30, 1)), None);
        let fast = JobRequest {
            x264_speed: Some(X264Speed::Ultrafast),
            ..req()
        };
        assert_eq!(
            plan_job(&src, &fast, &preset()).unwrap().x264_speed,
            X264Speed::Ultrafast
        );
        assert_eq!(
            plan_job(&src, &req(), &preset()).unwrap().x264_speed,
            X264Speed::Faster
        );
    }
}
