//! FLV framing of RTMP media, and the rule that turns a publisher's timestamps into the stream's timeline.
//!
//! RTMP carries the payloads of FLV tags (the first byte of a video tag names the codec and frame type, an AVC
//! tag then carries `AVCPacketType`, a composition offset and either an `avcC` record or length-prefixed NAL
//! units). kilnd wraps each message in an FLV tag and hands the byte stream to GStreamer's `flvdemux`, so this
//! module only frames and inspects; it never parses the media itself.
//!
//! Timestamps: RTMP timestamps are 32-bit milliseconds that start anywhere, wrap after 49.7 days, and jump when
//! an encoder restarts or misbehaves. [`Timeline`] starts the stream at 0 and reads each step modulo 2³² (so a
//! wrap is an ordinary step). A message that would land more than [`Timeline::MAX_BACK_MS`] behind or
//! [`Timeline::MAX_STEP_MS`] ahead of the latest time given out is a jump: the timeline continues one frame after
//! that latest time, so the fragments' `tfdt` stays continuous whatever the publisher sends.

/// The FLV file header (version 1, audio and video present) and the first `PreviousTagSize0`.
pub const HEADER: [u8; 13] = [b'F', b'L', b'V', 1, 5, 0, 0, 0, 9, 0, 0, 0, 0];

/// Largest tag body FLV can frame (24-bit size).
pub const MAX_TAG_BYTES: usize = (1 << 24) - 1;

/// FLV tag types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    Audio = 8,
    Video = 9,
    Script = 18,
}

/// One FLV tag (header, body, `PreviousTagSize`), or `None` when the body is too large to frame.
pub fn tag(kind: TagKind, ts_ms: u32, body: &[u8]) -> Option<Vec<u8>> {
    if body.len() > MAX_TAG_BYTES {
        return None;
    }
    let n = body.len() as u32;
    let mut out = Vec::with_capacity(11 + body.len() + 4);
    out.push(kind as u8);
    out.extend_from_slice(&n.to_be_bytes()[1..]);
    out.extend_from_slice(&ts_ms.to_be_bytes()[1..]); // lower 24 bits
    out.push((ts_ms >> 24) as u8); // TimestampExtended
    out.extend_from_slice(&[0, 0, 0]); // StreamID
    out.extend_from_slice(body);
    out.extend_from_slice(&(n + 11).to_be_bytes());
    Some(out)
}

/// The codec of an RTMP video message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoCodec {
    /// Legacy codec id 7.
    Avc,
    /// Enhanced RTMP (`hvc1`) or the legacy id 12 some encoders use.
    Hevc,
    /// Anything else, named by its FourCC (enhanced RTMP) or legacy codec id.
    Other(String),
}

impl VideoCodec {
    pub fn name(&self) -> &str {
        match self {
            VideoCodec::Avc => "h264",
            VideoCodec::Hevc => "hevc",
            VideoCodec::Other(s) => s,
        }
    }
}

/// What the first bytes of an RTMP video message say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoTag<'a> {
    pub codec: VideoCodec,
    pub keyframe: bool,
    /// An AVC sequence header: `config` is the `avcC` record.
    pub config: Option<&'a [u8]>,
}

/// Reads the header of an RTMP video message (`None`: too short to say anything).
pub fn inspect_video(body: &[u8]) -> Option<VideoTag<'_>> {
    let b0 = *body.first()?;
    if b0 & 0x80 != 0 {
        // Enhanced RTMP: IsExHeader, 3-bit frame type, 4-bit packet type, then a FourCC.
        let fourcc = body.get(1..5)?;
        let codec = match fourcc {
            b"hvc1" => VideoCodec::Hevc,
            other => VideoCodec::Other(String::from_utf8_lossy(other).into_owned()),
        };
        return Some(VideoTag {
            codec,
            keyframe: (b0 >> 4) & 0x07 == 1,
            config: None,
        });
    }
    let keyframe = b0 >> 4 == 1;
    let codec = match b0 & 0x0f {
        7 => VideoCodec::Avc,
        12 => VideoCodec::Hevc,
        id => VideoCodec::Other(format!("flv-codec-{id}")),
    };
    let config = match codec {
        VideoCodec::Avc if body.get(1) == Some(&0) => body.get(5..),
        _ => None,
    };
    Some(VideoTag {
        codec,
        keyframe,
        config,
    })
}

/// The codec name of an RTMP audio message (`aac`, `mp3`, …), from its SoundFormat.
pub fn audio_codec(body: &[u8]) -> Option<&'static str> {
    Some(match body.first()? >> 4 {
        10 => "aac",
        2 | 14 => "mp3",
        11 => "speex",
        7 | 8 => "g711",
        0 | 1 | 3 => "pcm",
        4..=6 => "nellymoser",
        _ => "unknown",
    })
}

/// Publisher timestamps → the stream's timeline (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// The previous message: its input timestamp and where it landed.
    last: Option<(u32, u64)>,
    /// The latest time given out.
    max_out: u64,
    /// Jumps absorbed so far.
    pub jumps: u64,
}

impl Timeline {
    /// Further ahead of the latest output than this is a jump (a keyframe interval is rarely above 10 s, and 5 s
    /// without a message is not a live publisher).
    pub const MAX_STEP_MS: u64 = 5_000;
    /// Audio and video interleave out of order by up to this much behind the latest output; further is a jump.
    pub const MAX_BACK_MS: u64 = 1_000;
    /// Where the timeline continues after a jump: one frame after the latest output.
    pub const AFTER_JUMP_MS: u64 = 33;

    /// Maps one message's timestamp.
    pub fn map(&mut self, ts: u32) -> u32 {
        let out = match self.last {
            None => 0,
            Some((last_in, last_out)) => {
                // modulo 2^32: a wrap is a small step
                let step = i64::from(ts.wrapping_sub(last_in) as i32);
                let at = last_out as i64 + step;
                let lo = self.max_out.saturating_sub(Self::MAX_BACK_MS) as i64;
                let hi = (self.max_out + Self::MAX_STEP_MS) as i64;
                if (lo..=hi).contains(&at) {
                    at as u64
                } else {
                    self.jumps += 1;
                    self.max_out + Self::AFTER_JUMP_MS
                }
            }
        };
        self.last = Some((ts, out));
        self.max_out = self.max_out.max(out);
        // FLV timestamps are 32-bit ms: after 49.7 days they wrap, like the publisher's own
        out as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tags_are_framed_with_their_size_and_extended_timestamp() {
        let t = tag(TagKind::Video, 0x0123_4567, &[1, 2, 3]).unwrap();
        assert_eq!(
            t,
            vec![9, 0, 0, 3, 0x23, 0x45, 0x67, 0x01, 0, 0, 0, 1, 2, 3, 0, 0, 0, 14]
        );
        assert!(tag(TagKind::Audio, 0, &vec![0; MAX_TAG_BYTES + 1]).is_none());
    }

    #[test]
    fn video_headers_name_their_codec() {
        let avc_seq = [0x17, 0, 0, 0, 0, 1, 0x64];
        let v = inspect_video(&avc_seq).unwrap();
        assert_eq!(v.codec, VideoCodec::Avc);
        assert!(v.keyframe);
        assert_eq!(v.config, Some(&[1u8, 0x64][..]));
        let avc_nalu = [0x27, 1, 0, 0, 0];
        assert_eq!(inspect_video(&avc_nalu).unwrap().config, None);
        // enhanced RTMP: IsExHeader | keyframe | SequenceStart, "hvc1"
        let hevc = [0x90, b'h', b'v', b'c', b'1'];
        assert_eq!(inspect_video(&hevc).unwrap().codec, VideoCodec::Hevc);
        let av1 = [0x90, b'a', b'v', b'0', b'1'];
        assert_eq!(
            inspect_video(&av1).unwrap().codec,
            VideoCodec::Other("av01".into())
        );
        assert_eq!(inspect_video(&[0x1c]).unwrap().codec, VideoCodec::Hevc);
        assert!(inspect_video(&[]).is_none());
        assert_eq!(audio_codec(&[0xaf, 0]), Some("aac"));
    }

    #[test]
    fn the_timeline_starts_at_zero_and_absorbs_wraps_and_jumps() {
        let mut t = Timeline::default();
        assert_eq!(t.map(u32::MAX - 40), 0);
        assert_eq!(t.map(u32::MAX - 7), 33);
        assert_eq!(t.map(25), 66, "a 32-bit wrap is an ordinary step");
        assert_eq!(t.map(20), 61, "audio slightly behind video keeps its place");
        assert_eq!(
            t.map(3_600_000),
            99,
            "a jump forward continues one frame later"
        );
        assert_eq!(t.map(3_600_033), 132);
        assert_eq!(t.map(5), 165, "a jump back too");
        assert_eq!(t.jumps, 2);
    }

    proptest! {
        /// Whatever a publisher sends, the timeline never moves back more than the interleave allowance
        /// from the latest output, and never steps forward more than the largest legal step.
        #[test]
        fn the_timeline_is_continuous(first in any::<u32>(), steps in proptest::collection::vec(any::<i64>(), 1..200)) {
            let mut t = Timeline::default();
            let mut ts = first;
            let mut max_out = u64::from(t.map(ts));
            for s in steps {
                let s = s % (1i64 << 33);
                ts = ts.wrapping_add(s as u32);
                let out = u64::from(t.map(ts));
                prop_assert!(out + Timeline::MAX_BACK_MS >= max_out);
                prop_assert!(out <= max_out + Timeline::MAX_STEP_MS);
                max_out = max_out.max(out);
            }
        }
    }
}
