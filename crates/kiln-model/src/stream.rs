//! Stream requests, resolved plans, and the timing rules that make LL-HLS parts legal.
//!
//! A client sends a [`StreamRequest`] (a preset name and/or explicit renditions, optional timing). The config crate
//! fills in the preset and calls [`StreamPlan::new`], which validates everything once: after that a plan is known
//! to be buildable and its part grid is known to satisfy the LL-HLS duration rules (every part ≤ PART-TARGET and
//! ≥ 85 % of it).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::source::{Source, SourceError};

/// A rational number, used for frame rates (`30`, `"30000/1001"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fraction {
    pub num: u32,
    pub den: u32,
}

impl Fraction {
    pub const fn new(num: u32, den: u32) -> Self {
        Self { num, den }
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.num) / f64::from(self.den)
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

impl Serialize for Fraction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.den == 1 {
            s.serialize_u32(self.num)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

/// A frame rate: an integer (`30`) or a fraction (`"30000/1001"`), as it is serialized.
impl utoipa::PartialSchema for Fraction {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^\s*[0-9]+\s*(/\s*[0-9]+\s*)?$")),
            )
            .description(Some("frames per second: an integer, or `num/den`"))
            .into()
    }
}

impl utoipa::ToSchema for Fraction {}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(u32),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) => Ok(Fraction::new(n, 1)),
            Repr::Str(s) => {
                let (n, dd) = s.split_once('/').unwrap_or((s.as_str(), "1"));
                let num = n.trim().parse().map_err(serde::de::Error::custom)?;
                let den = dd.trim().parse().map_err(serde::de::Error::custom)?;
                Ok(Fraction::new(num, den))
            }
        }
    }
}

/// Video codecs kiln can encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VideoCodec {
    #[default]
    H264,
}

/// Audio codecs kiln can encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AudioCodec {
    /// AAC-LC (`mp4a.40.2`).
    #[default]
    Aac,
}

/// One video rendition of a ladder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoRendition {
    /// Short name, used in URLs (`/live/{stream}/{name}/index.m3u8`).
    pub name: String,
    pub width: u32,
    pub height: u32,
    #[serde(default = "default_fps")]
    pub fps: Fraction,
    pub bitrate_kbps: u32,
    #[serde(default)]
    pub codec: VideoCodec,
}

fn default_fps() -> Fraction {
    Fraction::new(30, 1)
}

/// `{"name": "source", "passthrough": true}`: a rendition that forwards the source's own H.264 access units
/// without re-encoding. Its size, rate and bitrate are the source's; `bitrate_kbps` (optional) is what the
/// multivariant playlist states as its BANDWIDTH (default [`Passthrough::DEFAULT_BITRATE_KBPS`]); `width` and
/// `height` (optional, default 1920x1080) the largest picture the source may send, which its decode is booked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Passthrough {
    pub name: String,
    pub passthrough: bool,
    // optional in a request (the defaults below), always present once resolved
    #[schema(required = false)]
    pub bitrate_kbps: u32,
    #[schema(required = false)]
    pub width: u32,
    #[schema(required = false)]
    pub height: u32,
}

impl Passthrough {
    /// The BANDWIDTH stated when the request gives none (a 1080p contribution feed).
    pub const DEFAULT_BITRATE_KBPS: u32 = 8000;
    /// The largest source picture booked when the request gives none.
    pub const DEFAULT_SIZE: (u32, u32) = (1920, 1080);
}

/// One entry of a request's `renditions`: an encoded rung, or the source passed through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum RenditionSpec {
    Video(VideoRendition),
    Passthrough(Passthrough),
}

impl From<VideoRendition> for RenditionSpec {
    fn from(v: VideoRendition) -> Self {
        Self::Video(v)
    }
}

impl<'de> Deserialize<'de> for RenditionSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // one shape for both, so a mistake gets a message that names the field (an untagged enum would only say
        // that no variant matched)
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Any {
            name: String,
            width: Option<u32>,
            height: Option<u32>,
            fps: Option<Fraction>,
            bitrate_kbps: Option<u32>,
            codec: Option<VideoCodec>,
            #[serde(default)]
            passthrough: bool,
        }
        use serde::de::Error;
        let a = Any::deserialize(d)?;
        if a.passthrough {
            if a.fps.is_some() || a.codec.is_some() {
                return Err(D::Error::custom(format!(
                    "rendition `{}`: a passthrough rendition has the source's rate and codec: drop fps and codec \
                     (width and height, if given, are the largest picture the source may send)",
                    a.name
                )));
            }
            let (w, h) = Passthrough::DEFAULT_SIZE;
            return Ok(Self::Passthrough(Passthrough {
                name: a.name,
                passthrough: true,
                bitrate_kbps: a.bitrate_kbps.unwrap_or(Passthrough::DEFAULT_BITRATE_KBPS),
                width: a.width.unwrap_or(w),
                height: a.height.unwrap_or(h),
            }));
        }
        let need = |v: Option<u32>, what: &str| {
            v.ok_or_else(|| {
                D::Error::custom(format!("rendition `{}`: missing field `{what}`", a.name))
            })
        };
        Ok(Self::Video(VideoRendition {
            width: need(a.width, "width")?,
            height: need(a.height, "height")?,
            bitrate_kbps: need(a.bitrate_kbps, "bitrate_kbps")?,
            fps: a.fps.unwrap_or_else(default_fps),
            codec: a.codec.unwrap_or_default(),
            name: a.name,
        }))
    }
}

/// The audio rendition of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AudioRendition {
    #[serde(default = "default_audio_name")]
    pub name: String,
    #[serde(default = "default_audio_bitrate")]
    pub bitrate_kbps: u32,
    #[serde(default = "default_channels")]
    pub channels: u32,
    #[serde(default = "default_rate")]
    pub sample_rate: u32,
    #[serde(default)]
    pub codec: AudioCodec,
}

fn default_audio_name() -> String {
    "audio".into()
}
fn default_audio_bitrate() -> u32 {
    128
}
fn default_channels() -> u32 {
    2
}
fn default_rate() -> u32 {
    48_000
}

impl Default for AudioRendition {
    fn default() -> Self {
        Self {
            name: default_audio_name(),
            bitrate_kbps: default_audio_bitrate(),
            channels: default_channels(),
            sample_rate: default_rate(),
            codec: AudioCodec::Aac,
        }
    }
}

/// Samples per AAC-LC frame.
pub const AAC_FRAME_SAMPLES: u32 = 1024;

/// Segment and part timing of a stream. Fixed for the stream's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// Segment (and GOP) duration in milliseconds.
    pub segment_ms: u32,
    /// The advertised PART-TARGET in milliseconds. Real parts are never longer.
    pub part_target_ms: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            segment_ms: 2000,
            part_target_ms: 334,
        }
    }
}

impl Timing {
    pub fn segment_ns(&self) -> u64 {
        u64::from(self.segment_ms) * 1_000_000
    }

    pub fn part_target_ns(&self) -> u64 {
        u64::from(self.part_target_ms) * 1_000_000
    }

    /// EXT-X-TARGETDURATION: an integer ≥ 1 that every rounded EXTINF stays under. Segments follow the forced
    /// keyframes (video) or the first AAC frame at/after the grid point (audio, < 1 frame late), so `ceil` of the
    /// nominal duration bounds `round(EXTINF)`.
    pub fn target_duration_s(&self) -> u32 {
        self.segment_ms.div_ceil(1000).max(1)
    }

    /// PART-HOLD-BACK in seconds: 3 × PART-TARGET (the spec's SHOULD; the MUST is 2×).
    pub fn part_hold_back_s(&self) -> f64 {
        3.0 * f64::from(self.part_target_ms) / 1000.0
    }

    /// Frames per video part at `fps`: the most whole frames that fit in PART-TARGET.
    pub fn video_frames_per_part(&self, fps: Fraction) -> u64 {
        // frames = floor(PT_ms * num / (1000 * den))
        (u64::from(self.part_target_ms) * u64::from(fps.num)) / (1000 * u64::from(fps.den))
    }

    /// Duration of a full video part in nanoseconds at `fps`.
    pub fn video_part_ns(&self, fps: Fraction) -> u64 {
        frames_to_ns(self.video_frames_per_part(fps), fps)
    }

    /// AAC frames per audio part at `sample_rate`.
    pub fn audio_frames_per_part(&self, sample_rate: u32) -> u64 {
        (u64::from(self.part_target_ms) * u64::from(sample_rate))
            / (1000 * u64::from(AAC_FRAME_SAMPLES))
    }

    /// Duration of a full audio part in nanoseconds.
    pub fn audio_part_ns(&self, sample_rate: u32) -> u64 {
        self.audio_frames_per_part(sample_rate) * u64::from(AAC_FRAME_SAMPLES) * 1_000_000_000
            / u64::from(sample_rate)
    }
}

/// Duration of `frames` frames at `fps`, in nanoseconds.
pub fn frames_to_ns(frames: u64, fps: Fraction) -> u64 {
    frames * 1_000_000_000 * u64::from(fps.den) / u64::from(fps.num)
}

/// What a client asks for in `PUT /v1/streams/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamRequest {
    /// Source URI, e.g. `test:` or `test:pattern=ball`.
    pub source: String,
    /// A named ladder from `pipelines/` (default: the daemon's default preset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Explicit video renditions; replace the preset's. One may be `{"name": "source", "passthrough": true}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renditions: Option<Vec<RenditionSpec>>,
    /// Audio rendition; replaces the preset's. `"audio": {"enabled": false}` removes audio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioRequest>,
    /// Segment duration in ms (default from the preset, else 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_ms: Option<u32>,
    /// PART-TARGET in ms (default from the preset, else 334).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_target_ms: Option<u32>,
    /// `gpu-only`, `prefer-gpu` (default) or `cpu-only`; replaces the preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// A `publish:` stream's key and passphrase, when the caller chooses them (else generated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<crate::ingest::IngestRequest>,
    /// What a `publish:` or pulled live stream does when its source goes (default: the slate for 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_source_loss: Option<SourceLoss>,
    /// A second input, decoded all the time, that goes on air when the source is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupRequest>,
}

/// `"backup": {"source": "srt://…" | "publish:", "failback_s": 10}`: a live input decoded all the time next to
/// the stream's own (a pulled source, or on a `publish:` stream a second publisher with the backup key). When the source is lost the backup goes on air (instead of the slate) at its next frame; when
/// the source is back and has been healthy for `failback_s`, it takes over again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    pub source: String,
    #[serde(default = "Backup::default_failback")]
    pub failback_s: u32,
}

/// A validated backup input (see [`BackupRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Backup {
    #[serde(serialize_with = "ser_display")]
    #[schema(value_type = String)]
    pub source: Source,
    pub failback_s: u32,
}

impl Backup {
    /// The longest `failback_s` (an hour).
    pub const MAX_FAILBACK_S: u32 = 3600;

    fn default_failback() -> u32 {
        10
    }

    /// Validates `req` for a stream whose own source is `primary`.
    pub fn new(req: &BackupRequest, primary: &Source) -> Result<Self, PlanError> {
        let bad = |why: &str| PlanError::Backup(why.to_string());
        if !primary.is_resilient() {
            return Err(bad(
                "a backup applies to `publish:` streams and pulled live sources (srt, rtsp, http)",
            ));
        }
        let source = Source::parse(&req.source)?;
        // a `publish:` backup is a second publisher on the stream's own ingest (its `backup_key`, its SRT
        // stream id `<id>/backup`): only a publish stream has the secrets that authorize one
        if source.is_publish() && !primary.is_publish() {
            return Err(bad(
                "a `publish:` backup needs a `publish:` stream (a second publisher with the stream's backup key); \
                 a pulled source takes a pulled backup (srt://, rtsp(s)://, http(s)://)",
            ));
        }
        if !source.is_pulled_live() && !source.is_publish() {
            return Err(bad(
                "the backup must be a live input: `publish:` (a second publisher) or a pulled live source \
                 (srt://, rtsp(s)://, http(s)://)",
            ));
        }
        if source == *primary && !source.is_publish() {
            return Err(bad("the backup is the stream's own source"));
        }
        if req.failback_s > Self::MAX_FAILBACK_S {
            return Err(bad("failback_s: at most 3600"));
        }
        Ok(Self {
            source,
            failback_s: req.failback_s,
        })
    }

    pub fn failback(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.failback_s))
    }
}

/// What a stream does when its source goes: `slate` keeps every rendition going at real time with a picture that
/// says so (and silence) until the source comes back, for up to `reconnect_window_s` (0: until the stream is
/// deleted); `end` ends the stream at once (ENDLIST). A source that is connected but sends no frame for
/// `source_timeout_ms` is lost too. A pulled source (SRT, RTSP, HTTP) is retried with backoff meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceLoss {
    #[serde(default)]
    pub mode: SourceLossMode,
    #[serde(default = "SourceLoss::default_window")]
    pub reconnect_window_s: u32,
    #[serde(default = "SourceLoss::default_timeout")]
    pub source_timeout_ms: u32,
}

impl SourceLoss {
    /// The longest window a request may ask for other than 0 (a day; 0 is "forever").
    pub const MAX_WINDOW_S: u32 = 86_400;
    /// The range of `source_timeout_ms`: below 200 ms a publisher's normal jitter (a late AAC packet, an SRT
    /// retransmission) would count as a loss; above a minute viewers would watch a frozen picture.
    pub const TIMEOUT_MS: std::ops::RangeInclusive<u32> = 200..=60_000;

    fn default_window() -> u32 {
        30
    }

    fn default_timeout() -> u32 {
        1500
    }

    /// `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.reconnect_window_s > Self::MAX_WINDOW_S {
            return Err(format!(
                "on_source_loss.reconnect_window_s: at most {} (a day), or 0 to keep the slate until the stream is deleted",
                Self::MAX_WINDOW_S
            ));
        }
        if !Self::TIMEOUT_MS.contains(&self.source_timeout_ms) {
            return Err(format!(
                "on_source_loss.source_timeout_ms: {} to {}",
                Self::TIMEOUT_MS.start(),
                Self::TIMEOUT_MS.end()
            ));
        }
        Ok(())
    }

    /// No frame for this long is a loss.
    pub fn source_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.source_timeout_ms))
    }
}

impl Default for SourceLoss {
    fn default() -> Self {
        Self {
            mode: SourceLossMode::Slate,
            reconnect_window_s: Self::default_window(),
            source_timeout_ms: Self::default_timeout(),
        }
    }
}

/// See [`SourceLoss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SourceLossMode {
    #[default]
    Slate,
    End,
}

/// The audio part of a stream request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AudioRequest {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate_kbps: Option<u32>,
}

fn yes() -> bool {
    true
}

/// x264 speed presets kiln allows (slower ones cannot keep up with live on a CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum X264Speed {
    Ultrafast,
    Superfast,
    #[default]
    Veryfast,
    Faster,
    Fast,
    Medium,
}

impl X264Speed {
    /// The x264enc `speed-preset` nick.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ultrafast => "ultrafast",
            Self::Superfast => "superfast",
            Self::Veryfast => "veryfast",
            Self::Faster => "faster",
            Self::Fast => "fast",
            Self::Medium => "medium",
        }
    }
}

/// Where a stream may encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// NVENC or nothing: refused where no GPU with NVENC has room.
    GpuOnly,
    /// NVENC when a GPU has room, else the CPU when it has room; an encoder failure falls back to the CPU.
    #[default]
    PreferGpu,
    /// x264 on the CPU (decoding may still use NVDEC when the source is encoded and a GPU decoder exists).
    CpuOnly,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::GpuOnly => "gpu-only",
            Policy::PreferGpu => "prefer-gpu",
            Policy::CpuOnly => "cpu-only",
        }
    }
}

/// Where a stream encodes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Backend {
    /// NVENC on GPU `gpu` (NVML index).
    Nvenc { gpu: u32 },
    /// x264 on the host CPU.
    Cpu,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Nvenc { .. } => "nvenc",
            Backend::Cpu => "cpu",
        }
    }
}

fn default_nvenc_preset() -> u8 {
    4
}

/// Encoder settings that are not per rendition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EncoderSettings {
    /// Speed preset for the x264 (CPU) backend.
    #[serde(default)]
    pub x264_speed: X264Speed,
    /// NVENC preset p1 (fastest) … p7 (best quality) for the NVENC backend.
    #[serde(default = "default_nvenc_preset")]
    pub nvenc_preset: u8,
    /// Where the stream may encode (default prefer-gpu).
    #[serde(default)]
    pub policy: Policy,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            x264_speed: X264Speed::default(),
            nvenc_preset: default_nvenc_preset(),
            policy: Policy::default(),
        }
    }
}

/// A validated, fully resolved stream: everything a pipeline is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StreamPlan {
    pub id: String,
    #[serde(serialize_with = "ser_display")]
    #[schema(value_type = String)]
    pub source: Source,
    pub video: Vec<VideoRendition>,
    pub audio: Option<AudioRendition>,
    pub timing: Timing,
    pub encoder: EncoderSettings,
    /// A second input decoded all the time (see [`BackupRequest`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<Backup>,
    /// The source's own video, forwarded without re-encoding (see [`Passthrough`]). Not in `video`: nothing is
    /// encoded (or booked) for it. Its rendition index follows the audio's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<Passthrough>,
}

fn ser_display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Why a stream request cannot become a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid stream id `{0}`: use 1-64 characters from [A-Za-z0-9_-]")]
    BadId(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("unknown preset `{0}`")]
    UnknownPreset(String),
    #[error("a stream needs at least one rendition (video, or audio for an audio-only stream)")]
    NoVideo,
    #[error("nvenc_preset {0} is out of range (1 = p1 fastest … 7 = p7 best)")]
    BadNvencPreset(u8),
    #[error("too many renditions ({0}, at most {max})", max = StreamPlan::MAX_RENDITIONS)]
    TooManyRenditions(usize),
    #[error("rendition name `{0}` is invalid: use 1-32 characters from [a-z0-9_-]")]
    BadRenditionName(String),
    #[error("rendition name `{0}` is used twice")]
    DuplicateRendition(String),
    #[error("rendition `{name}`: {what}")]
    BadRendition { name: String, what: String },
    #[error("timing: {0}")]
    BadTiming(String),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error("backup: {0}")]
    Backup(String),
}

fn valid_token(s: &str, max: usize, upper_ok: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'_'
                || b == b'-'
                || (upper_ok && b.is_ascii_uppercase())
        })
}

/// Whether `id` is a legal stream id (it becomes a URL path segment).
pub fn valid_stream_id(id: &str) -> bool {
    valid_token(id, 64, true)
}

impl StreamPlan {
    pub const MAX_RENDITIONS: usize = 8;

    /// Validates and builds a plan.
    pub fn new(
        id: &str,
        source: &str,
        video: Vec<VideoRendition>,
        audio: Option<AudioRendition>,
        timing: Timing,
        encoder: EncoderSettings,
    ) -> Result<Self, PlanError> {
        if !valid_stream_id(id) {
            return Err(PlanError::BadId(id.chars().take(80).collect()));
        }
        let source = Source::parse(source)?;
        if video.is_empty() && audio.is_none() {
            return Err(PlanError::NoVideo);
        }
        let total = video.len() + usize::from(audio.is_some());
        if total > Self::MAX_RENDITIONS {
            return Err(PlanError::TooManyRenditions(total));
        }
        validate_timing(&timing)?;
        if !(1..=7).contains(&encoder.nvenc_preset) {
            return Err(PlanError::BadNvencPreset(encoder.nvenc_preset));
        }
        let mut names: Vec<&str> = Vec::new();
        for v in &video {
            check_name(&v.name, &mut names)?;
            validate_video(v, &timing)?;
        }
        if let Some(a) = &audio {
            check_name(&a.name, &mut names)?;
            validate_audio(a, &timing)?;
        }
        Ok(Self {
            id: id.to_string(),
            source,
            video,
            audio,
            timing,
            encoder,
            backup: None,
            passthrough: None,
        })
    }

    /// The plan with a passthrough rendition: a live stream with an encoded source and at least one encoded video
    /// rendition (whose keyframes follow the source's), under a name no other rendition has.
    pub fn with_passthrough(mut self, p: Option<Passthrough>) -> Result<Self, PlanError> {
        let Some(p) = p else {
            return Ok(self);
        };
        let bad = |what: &str| {
            Err(PlanError::BadRendition {
                name: p.name.clone(),
                what: what.to_string(),
            })
        };
        if matches!(self.source, Source::Test { .. }) {
            return bad("a passthrough rendition needs an encoded source (publish:, srt://, rtsp://, http(s)://, file://)");
        }
        if self.video.is_empty() {
            return bad(
                "a passthrough rendition needs at least one encoded video rendition beside it",
            );
        }
        if !(16..=100_000).contains(&p.bitrate_kbps) {
            return bad("bitrate_kbps (the BANDWIDTH stated for it) is outside 16..=100000");
        }
        if !(16..=7680).contains(&p.width)
            || !(16..=4320).contains(&p.height)
            || p.width % 2 != 0
            || p.height % 2 != 0
        {
            return bad("width and height (the largest source picture) must be even, within 16x16..=7680x4320");
        }
        let total = self.video.len() + usize::from(self.audio.is_some()) + 1;
        if total > Self::MAX_RENDITIONS {
            return Err(PlanError::TooManyRenditions(total));
        }
        let mut names: Vec<&str> = self.video.iter().map(|v| v.name.as_str()).collect();
        names.extend(self.audio.iter().map(|a| a.name.as_str()));
        check_name(&p.name, &mut names)?;
        self.passthrough = Some(p);
        Ok(self)
    }

    /// The passthrough rendition's index among the stream's renditions (after the video, then the audio).
    pub fn passthrough_index(&self) -> Option<usize> {
        self.passthrough
            .as_ref()
            .map(|_| self.video.len() + usize::from(self.audio.is_some()))
    }

    /// The plan with `backup` validated against its source.
    pub fn with_backup(mut self, backup: Option<&BackupRequest>) -> Result<Self, PlanError> {
        self.backup = backup.map(|b| Backup::new(b, &self.source)).transpose()?;
        Ok(self)
    }

    /// Σ width × height × fps of the video renditions, in pixels per second (integer; what the scheduler's
    /// least-loaded anchor weighs nodes by).
    pub fn pixel_rate(&self) -> u64 {
        self.video
            .iter()
            .map(|v| {
                u64::from(v.width) * u64::from(v.height) * u64::from(v.fps.num)
                    / u64::from(v.fps.den.max(1))
            })
            .sum()
    }

    /// The largest video frame size, which the source produces before scaling down per rendition (with a
    /// passthrough rendition: at least the largest picture it allows the source).
    pub fn source_size(&self) -> (u32, u32) {
        let pass = self.passthrough.as_ref().map(|p| (p.width, p.height));
        let w = self
            .video
            .iter()
            .map(|v| v.width)
            .chain(pass.map(|p| p.0))
            .max()
            .unwrap_or(0);
        let h = self
            .video
            .iter()
            .map(|v| v.height)
            .chain(pass.map(|p| p.1))
            .max()
            .unwrap_or(0);
        (w, h)
    }

    /// The highest frame rate among the renditions (the source's rate).
    pub fn source_fps(&self) -> Fraction {
        self.video
            .iter()
            .map(|v| v.fps)
            .max_by(|a, b| a.as_f64().total_cmp(&b.as_f64()))
            .unwrap_or(Fraction::new(30, 1))
    }
}

fn check_name<'a>(name: &'a str, seen: &mut Vec<&'a str>) -> Result<(), PlanError> {
    if !valid_token(name, 32, false) {
        return Err(PlanError::BadRenditionName(name.chars().take(40).collect()));
    }
    if seen.contains(&name) {
        return Err(PlanError::DuplicateRendition(name.to_string()));
    }
    seen.push(name);
    Ok(())
}

fn validate_timing(t: &Timing) -> Result<(), PlanError> {
    let bad = |s: String| Err(PlanError::BadTiming(s));
    if !(500..=10_000).contains(&t.segment_ms) {
        return bad(format!(
            "segment_ms {} is outside 500..=10000",
            t.segment_ms
        ));
    }
    if !(100..=5_000).contains(&t.part_target_ms) {
        return bad(format!(
            "part_target_ms {} is outside 100..=5000",
            t.part_target_ms
        ));
    }
    if t.part_target_ms > t.segment_ms {
        return bad("part_target_ms is longer than segment_ms".into());
    }
    Ok(())
}

fn validate_video(v: &VideoRendition, t: &Timing) -> Result<(), PlanError> {
    let bad = |what: String| {
        Err(PlanError::BadRendition {
            name: v.name.clone(),
            what,
        })
    };
    if !(16..=7680).contains(&v.width) || !(16..=4320).contains(&v.height) {
        return bad(format!(
            "size {}x{} is outside 16x16..=7680x4320",
            v.width, v.height
        ));
    }
    if v.width % 2 != 0 || v.height % 2 != 0 {
        return bad(format!(
            "size {}x{} must be even (4:2:0 chroma)",
            v.width, v.height
        ));
    }
    if v.fps.den == 0 || v.fps.num == 0 || !(1.0..=120.0).contains(&v.fps.as_f64()) {
        return bad(format!("frame rate {} is outside 1..=120", v.fps));
    }
    if !(16..=100_000).contains(&v.bitrate_kbps) {
        return bad(format!(
            "bitrate {} kb/s is outside 16..=100000",
            v.bitrate_kbps
        ));
    }
    let frames = t.video_frames_per_part(v.fps);
    let part_ns = t.video_part_ns(v.fps);
    if frames == 0 || part_ns * 100 < t.part_target_ns() * 85 {
        return bad(format!(
            "at {} fps no whole number of frames fills 85-100 % of PART-TARGET {} ms",
            v.fps, t.part_target_ms
        ));
    }
    Ok(())
}

fn validate_audio(a: &AudioRendition, t: &Timing) -> Result<(), PlanError> {
    let bad = |what: String| {
        Err(PlanError::BadRendition {
            name: a.name.clone(),
            what,
        })
    };
    if ![44_100, 48_000].contains(&a.sample_rate) {
        return bad(format!(
            "sample rate {} is not 44100 or 48000",
            a.sample_rate
        ));
    }
    if !(1..=2).contains(&a.channels) {
        return bad(format!("{} channels (1 or 2 supported)", a.channels));
    }
    if !(16..=512).contains(&a.bitrate_kbps) {
        return bad(format!(
            "bitrate {} kb/s is outside 16..=512",
            a.bitrate_kbps
        ));
    }
    let part_ns = t.audio_part_ns(a.sample_rate);
    if part_ns == 0 || part_ns * 100 < t.part_target_ns() * 85 {
        return bad(format!(
            "no whole number of AAC frames fills 85-100 % of PART-TARGET {} ms",
            t.part_target_ms
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
