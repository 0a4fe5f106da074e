//! VOD jobs: what a client submits (`POST /v1/jobs`), what it reads back (`GET /v1/jobs/{id}`), and the pure rules
//! a job follows (where its input may come from, which renditions a source gets, and — in [`plan`] — everything a
//! probed input, the request and the preset decide about the transcode).

use serde::{Deserialize, Serialize};

use crate::stream::{VideoRendition, X264Speed};

pub mod h264;
pub mod plan;

pub use plan::{
    plan_job, AudioPlan, JobPlan, JobPlanError, PresetSummary, SourceSummary, SourceVideo,
    ThumbnailPlan, THUMBNAIL_WIDTH,
};

/// `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// `file:///absolute/path` (under the daemon's `--vod-input-dir`) or `http(s)://…`.
    pub input: String,
    /// A named ladder (default `vod-1080p-abr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Explicit video renditions; replace the preset's. Checked as a live stream's are (kilnd prices a job as
    /// one), so what a live stream refuses is refused here too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renditions: Option<Vec<VideoRendition>>,
    /// Higher runs first; equal priorities run oldest first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub outputs: JobOutputs,
    /// Seconds between thumbnails (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_interval_s: Option<u32>,
    /// x264 speed preset (default: the preset's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x264_speed: Option<X264Speed>,
}

/// What a job writes. HLS (CMAF) is always written; DASH reuses the same segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobOutputs {
    #[serde(default = "yes")]
    pub dash: bool,
    #[serde(default = "yes")]
    pub thumbnails: bool,
}

fn yes() -> bool {
    true
}

impl Default for JobOutputs {
    fn default() -> Self {
        Self {
            dash: true,
            thumbnails: true,
        }
    }
}

/// Default seconds between thumbnails.
pub const DEFAULT_THUMBNAIL_INTERVAL_S: u32 = 5;
/// The preset a job gets without one.
pub const DEFAULT_VOD_PRESET: &str = "vod-1080p-abr";
/// Largest source accepted, per side and in pixels (8K UHD).
pub const MAX_SOURCE_SIDE: u32 = 8192;
pub const MAX_SOURCE_PIXELS: u64 = 7680 * 4320;

/// Why the stream headers of an input are refused before anything decodes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the stream header declares {0}x{1}: larger than kiln accepts ({MAX_SOURCE_SIDE} a side, {MAX_SOURCE_PIXELS} pixels)")]
    TooLarge(u32, u32),
    #[error("the container says the video is {0}x{1} but its stream header declares {2}x{3}: refused (decoding would allocate pictures of the larger size)")]
    Inflated(u32, u32, u32, u32),
}

/// Judges the video sizes seen while reading an input's headers, in order (the container's first, then what the
/// codec's own header declares, e.g. the H.264 SPS's coded size), before any decoder runs. Refuses a size over the
/// limits, and a codec header that declares much more than the container (more than 4 × the pixels and more than 16 pixels more
/// on a side: rounding to macroblocks and cropping differ by less): a few KB that decode to 8K pictures.
pub fn check_header_sizes(sizes: &[(u32, u32)]) -> Result<(), HeaderError> {
    for &(w, h) in sizes {
        if w > MAX_SOURCE_SIDE
            || h > MAX_SOURCE_SIDE
            || u64::from(w) * u64::from(h) > MAX_SOURCE_PIXELS
        {
            return Err(HeaderError::TooLarge(w, h));
        }
    }
    let known: Vec<(u32, u32)> = sizes
        .iter()
        .copied()
        .filter(|&(w, h)| w > 0 && h > 0)
        .collect();
    let largest_later = known
        .iter()
        .skip(1)
        .copied()
        .max_by_key(|&(w, h)| u64::from(w) * u64::from(h));
    if let (Some(&(cw, ch)), Some((sw, sh))) = (known.first(), largest_later) {
        let (cpx, spx) = (u64::from(cw) * u64::from(ch), u64::from(sw) * u64::from(sh));
        if spx > 4 * cpx && (sw > cw + 16 || sh > ch + 16) {
            return Err(HeaderError::Inflated(cw, ch, sw, sh));
        }
    }
    Ok(())
}

/// Where a job reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobInput {
    /// An absolute path (still to be checked against the input directory).
    File(String),
    /// An http(s) URL.
    Url(String),
}

/// Why a job request is malformed (400 at submit time; a well-formed input that turns out bad fails the job).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobRequestError {
    #[error("input must be file:///absolute/path or http(s)://host/path (got `{0}`)")]
    BadInput(String),
    #[error("thumbnail_interval_s must be 1–3600")]
    BadInterval,
    #[error("renditions must be 1–8, each 16–8192 pixels a side (even), 1–120 fps, 50–100000 kb/s, with a name of its own other than `audio` and `thumbs`")]
    BadRenditions,
}

impl JobRequest {
    /// The input's kind, or why it is malformed. A `file://` URL must be absolute, without `..` parts, NUL or
    /// percent-escapes; a network URL must be http(s) with a host.
    pub fn parse_input(&self) -> Result<JobInput, JobRequestError> {
        let bad = || JobRequestError::BadInput(self.input.chars().take(200).collect());
        let s = self.input.as_str();
        if s.len() > 4096 || s.chars().any(|c| c.is_control()) {
            return Err(bad());
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') || path.contains('%') || path.split('/').any(|p| p == "..") {
                return Err(bad());
            }
            return Ok(JobInput::File(path.to_string()));
        }
        if let Some(rest) = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
        {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            if host.is_empty() || host.contains('@') || rest.contains(char::is_whitespace) {
                return Err(bad());
            }
            return Ok(JobInput::Url(s.to_string()));
        }
        Err(bad())
    }

    /// Checks everything that does not need the file itself.
    pub fn validate(&self) -> Result<JobInput, JobRequestError> {
        if let Some(i) = self.thumbnail_interval_s {
            if !(1..=3600).contains(&i) {
                return Err(JobRequestError::BadInterval);
            }
        }
        if let Some(r) = &self.renditions {
            let names: std::collections::HashSet<&str> =
                r.iter().map(|v| v.name.as_str()).collect();
            let ok = !r.is_empty()
                && r.len() <= 8
                && names.len() == r.len()
                && r.iter().all(|v| {
                    (16..=MAX_SOURCE_SIDE).contains(&v.width)
                        && (16..=MAX_SOURCE_SIDE).contains(&v.height)
                        && v.width % 2 == 0
                        && v.height % 2 == 0
                        && v.fps.den > 0
                        && (1.0..=120.0).contains(&v.fps.as_f64())
                        && (50..=100_000).contains(&v.bitrate_kbps)
                        && crate::stream::valid_stream_id(&v.name)
                        // the job's own tracks: its audio and its thumbnails
                        && !["audio", "thumbs"].contains(&v.name.as_str())
                });
            if !ok {
                return Err(JobRequestError::BadRenditions);
            }
        }
        self.parse_input()
    }
}

/// Life cycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One output rendition of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRendition {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub bitrate_kbps: u32,
    pub playlist: String,
}

/// Where a finished job's outputs are.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobLinks {
    pub master: Option<String>,
    pub mpd: Option<String>,
    pub poster: Option<String>,
    pub sprite: Option<String>,
    pub thumbnails_vtt: Option<String>,
}

/// `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    /// 0..1 (media time encoded / input duration).
    pub progress: f64,
    /// Media seconds encoded per wall-clock second, while running and at the end.
    pub speed: Option<f64>,
    /// Seconds left at the current speed.
    pub eta_s: Option<f64>,
    pub error: Option<String>,
    pub request: JobRequest,
    pub priority: i32,
    pub created_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    pub finished_unix_ms: Option<u64>,
    /// Times the job was started (more than 1: a restart resumed it).
    pub attempts: u32,
    /// Times the daemon died while running it (killed, crashed, out of memory). At 3 the job fails instead of
    /// running again: an input that crashes the daemon would otherwise take every live stream down with it at
    /// each start.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interrupted: u32,
    /// Bytes of an `http(s)` input downloaded so far (the transcode starts once it is whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_bytes: Option<u64>,
    /// The input's size, when the server declared it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_total_bytes: Option<u64>,
    /// Input duration in seconds, once probed.
    pub duration_s: Option<f64>,
    pub renditions: Vec<JobRendition>,
    /// Thumbnails written (0 until done).
    pub thumbnails: u32,
    pub links: JobLinks,
}

/// The ladder a source of (display) size `w`×`h` gets from the requested renditions: never upscaled, aspect kept.
///
/// A rendition's short side is the requested one's (`1280x720` is "720": 1280×720 for a landscape source,
/// 720×1280 for a portrait one); the long side follows the source's aspect ratio. Renditions whose short side
/// exceeds the source's are dropped; if that drops all of them, one rendition at the source's size remains (with
/// the bitrate of the smallest requested). Sizes are rounded down to even numbers (4:2:0 chroma), and duplicates (same
/// size) are removed, keeping the first.
pub fn ladder(w: u32, h: u32, requested: &[VideoRendition]) -> Vec<VideoRendition> {
    if w < 2 || h < 2 || requested.is_empty() {
        return Vec::new();
    }
    // down to even, so rounding never upscales
    let even = |x: f64| (((x / 2.0).floor() as u32) * 2).max(2);
    let (short, long) = (w.min(h), w.max(h));
    let portrait = h > w;
    let size = |target_short: u32| -> (u32, u32) {
        let s = even(target_short as f64);
        let l = even(long as f64 * target_short as f64 / short as f64);
        if portrait {
            (s, l)
        } else {
            (l, s)
        }
    };
    let mut out: Vec<VideoRendition> = Vec::new();
    for r in requested {
        let target = r.width.min(r.height);
        if target > short {
            continue;
        }
        let (rw, rh) = size(target);
        if out.iter().any(|o| (o.width, o.height) == (rw, rh)) {
            continue;
        }
        out.push(VideoRendition {
            width: rw,
            height: rh,
            ..r.clone()
        });
    }
    if out.is_empty() {
        let smallest = requested
            .iter()
            .min_by_key(|r| r.width.min(r.height))
            .expect("non-empty");
        let (rw, rh) = size(short);
        out.push(VideoRendition {
            width: rw,
            height: rh,
            ..smallest.clone()
        });
    }
    out
}

/// Thumbnails a video of `duration_s` gets at one every `interval_s`: at 0, interval, 2·interval, … before the end.
pub fn thumbnail_count(duration_s: f64, interval_s: u32) -> u32 {
    if duration_s <= 0.0 || interval_s == 0 {
        return 0;
    }
    (duration_s / f64::from(interval_s)).ceil().max(1.0) as u32
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes_refuse_oversize_and_inflated_streams() {
        assert_eq!(check_header_sizes(&[]), Ok(()));
        assert_eq!(check_header_sizes(&[(1920, 1080), (1920, 1080)]), Ok(()));
        // macroblock rounding and cropping: 1080 vs 1088, a container that says nothing (0x0)
        assert_eq!(check_header_sizes(&[(1920, 1080), (1920, 1088)]), Ok(()));
        assert_eq!(check_header_sizes(&[(0, 0), (3840, 2160)]), Ok(()));
        // the adversarial file: a 64x64 track whose SPS declares 8K
        assert_eq!(
            check_header_sizes(&[(64, 64), (7680, 4320)]),
            Err(HeaderError::Inflated(64, 64, 7680, 4320))
        );
        // h264parse repeats the container's size after the SPS was read: the largest later size counts
        assert_eq!(
            check_header_sizes(&[(64, 64), (7680, 4320), (64, 64)]),
            Err(HeaderError::Inflated(64, 64, 7680, 4320))
        );
        assert_eq!(
            check_header_sizes(&[(16000, 16000)]),
            Err(HeaderError::TooLarge(16000, 16000))
        );
        assert!(matches!(
            check_header_sizes(&[(640, 360), (8400, 64)]),
            Err(HeaderError::TooLarge(8400, 64))
        ));
        // a smaller stream header than the container (anamorphic, cropped) is not a bomb
        assert_eq!(check_header_sizes(&[(1920, 1080), (1440, 1080)]), Ok(()));
    }
    use crate::stream::{Fraction, VideoCodec};

    fn r(name: &str, w: u32, h: u32) -> VideoRendition {
        VideoRendition {
            name: name.into(),
            width: w,
            height: h,
            fps: Fraction::new(30, 1),
            bitrate_kbps: 1000,
            codec: VideoCodec::H264,
        }
    }

    fn sizes(v: &[VideoRendition]) -> Vec<(u32, u32)> {
        v.iter().map(|r| (r.width, r.height)).collect()
    }

    fn preset() -> Vec<VideoRendition> {
        vec![
            r("1080p", 1920, 1080),
            r("720p", 1280, 720),
            r("360p", 640, 360),
        ]
    }

    #[test]
    fn never_upscales_and_keeps_the_aspect_ratio() {
        assert_eq!(
            sizes(&ladder(1280, 720, &preset())),
            vec![(1280, 720), (640, 360)]
        );
        // 4:3 source: the long side follows the source
        assert_eq!(
            sizes(&ladder(960, 720, &preset())),
            vec![(960, 720), (480, 360)]
        );
        // portrait: the short side is the width
        assert_eq!(
            sizes(&ladder(720, 1280, &preset())),
            vec![(720, 1280), (360, 640)]
        );
        // smaller than every rung: one rendition at the source size, with the smallest rung's settings
        let tiny = ladder(320, 240, &preset());
        assert_eq!(sizes(&tiny), vec![(320, 240)]);
        assert_eq!(tiny[0].name, "360p");
    }

    #[test]
    fn odd_sizes_round_to_even() {
        assert_eq!(sizes(&ladder(641, 359, &preset())), vec![(640, 358)]);
        let l = ladder(1001, 563, &preset());
        assert!(
            l.iter().all(|r| r.width % 2 == 0 && r.height % 2 == 0),
            "{l:?}"
        );
        assert_eq!(sizes(&l), vec![(640, 360)]);
    }

    #[test]
    fn inputs_are_checked_before_anything_runs() {
        let req = |input: &str| JobRequest {
            input: input.into(),
            preset: None,
            renditions: None,
            priority: 0,
            outputs: JobOutputs::default(),
            thumbnail_interval_s: None,
            x264_speed: None,
        };
        assert_eq!(
            req("file:///media/a.mp4").validate(),
            Ok(JobInput::File("/media/a.mp4".into()))
        );
        assert!(matches!(
            req("https://cdn.example/a.mp4").validate(),
            Ok(JobInput::Url(_))
        ));
        for bad in [
            "file://relative.mp4",
            "file:///a/../../etc/passwd",
            "ftp://x/y",
            "http://",
            "http://u:p@h/x",
            "/abs.mp4",
            "file:///a%2e%2e/b",
        ] {
            assert!(req(bad).validate().is_err(), "{bad}");
        }
        let bad_interval = JobRequest {
            thumbnail_interval_s: Some(0),
            ..req("file:///a.mp4")
        };
        assert_eq!(bad_interval.validate(), Err(JobRequestError::BadInterval));
        // unknown fields are refused (a typo must not silently change a job)
        assert!(serde_json::from_str::<JobRequest>(
            r#"{"input": "file:///a.mp4", "presset": "x"}"#
        )
        .is_err());
    }

    #[test]
    fn thumbnail_count_covers_the_whole_video() {
        assert_eq!(thumbnail_count(6.0, 5), 2);
        assert_eq!(thumbnail_count(5.0, 5), 1);
        assert_eq!(thumbnail_count(0.5, 5), 1);
        assert_eq!(thumbnail_count(0.0, 5), 0);
    }
}
