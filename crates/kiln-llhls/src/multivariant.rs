//! The multivariant (master) playlist of a stream.

use std::fmt::Write as _;

/// A video variant.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoVariant {
    /// Media playlist URI relative to the multivariant playlist.
    pub uri: String,
    /// Peak bits per second of the video alone.
    pub bandwidth: u64,
    /// Average bits per second of the video alone, when measured.
    pub average_bandwidth: Option<u64>,
    /// RFC 6381 string of the video track (e.g. `avc1.64001f`).
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub frame_rate: f64,
}

/// The audio rendition every variant refers to.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioMedia {
    pub uri: String,
    pub name: String,
    pub bandwidth: u64,
    pub codec: String,
    pub channels: u32,
}

/// Group id of the audio rendition.
pub const AUDIO_GROUP: &str = "aud";

/// Renders the multivariant playlist: one EXT-X-STREAM-INF per video variant, highest bandwidth first, each
/// naming the audio group, with CODECS listing video and audio. Without video, the audio playlist is the variant.
pub fn render(video: &[VideoVariant], audio: Option<&AudioMedia>) -> String {
    let mut out = String::from("#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    if let Some(a) = audio {
        let _ = writeln!(
            out,
            "#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"{AUDIO_GROUP}\",NAME=\"{}\",DEFAULT=YES,AUTOSELECT=YES,CHANNELS=\"{}\",URI=\"{}\"",
            a.name, a.channels, a.uri
        );
    }
    let mut order: Vec<&VideoVariant> = video.iter().collect();
    order.sort_by_key(|v| std::cmp::Reverse(v.bandwidth));
    for v in order {
        let (bw, avg, codecs) = match audio {
            Some(a) => (
                v.bandwidth + a.bandwidth,
                v.average_bandwidth.map(|x| x + a.bandwidth),
                format!("{},{}", v.codec, a.codec),
            ),
            None => (v.bandwidth, v.average_bandwidth, v.codec.clone()),
        };
        let _ = write!(out, "#EXT-X-STREAM-INF:BANDWIDTH={bw}");
        if let Some(avg) = avg {
            let _ = write!(out, ",AVERAGE-BANDWIDTH={avg}");
        }
        let _ = write!(
            out,
            ",CODECS=\"{codecs}\",RESOLUTION={}x{},FRAME-RATE={:.3}",
            v.width, v.height, v.frame_rate
        );
        if audio.is_some() {
            let _ = write!(out, ",AUDIO=\"{AUDIO_GROUP}\"");
        }
        let _ = write!(out, "\n{}\n", v.uri);
    }
    // Audio only: the audio playlist is the one variant (RFC 8216 §4.3.4.2: CODECS lists only audio).
    if video.is_empty() {
        if let Some(a) = audio {
            let _ = write!(
                out,
                "#EXT-X-STREAM-INF:BANDWIDTH={},CODECS=\"{}\"\n{}\n",
                a.bandwidth, a.codec, a.uri
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_variants_with_audio_group() {
        let v = |uri: &str, bw, w, h| VideoVariant {
            uri: uri.into(),
            bandwidth: bw,
            average_bandwidth: None,
            codec: "avc1.64001f".into(),
            width: w,
            height: h,
            frame_rate: 30.0,
        };
        let a = AudioMedia {
            uri: "audio/index.m3u8".into(),
            name: "audio".into(),
            bandwidth: 128_000,
            codec: "mp4a.40.2".into(),
            channels: 2,
        };
        let text = render(
            &[
                v("lo/index.m3u8", 800_000, 640, 360),
                v("hi/index.m3u8", 3_000_000, 1280, 720),
            ],
            Some(&a),
        );
        let parsed = m3u8_rs::parse_master_playlist_res(text.as_bytes()).unwrap();
        assert_eq!(parsed.variants.len(), 2);
        assert_eq!(parsed.variants[0].uri, "hi/index.m3u8");
        assert_eq!(parsed.variants[0].bandwidth, 3_128_000);
        assert_eq!(
            parsed.variants[0].codecs.as_deref(),
            Some("avc1.64001f,mp4a.40.2")
        );
        assert_eq!(parsed.variants[1].audio.as_deref(), Some("aud"));
        assert_eq!(parsed.alternatives.len(), 1);
        assert!(text.contains("FRAME-RATE=30.000"));
    }

    #[test]
    fn audio_only_is_one_audio_variant() {
        let a = AudioMedia {
            uri: "audio/index.m3u8".into(),
            name: "audio".into(),
            bandwidth: 96_000,
            codec: "mp4a.40.2".into(),
            channels: 2,
        };
        let text = render(&[], Some(&a));
        let parsed = m3u8_rs::parse_master_playlist_res(text.as_bytes()).unwrap();
        assert_eq!(parsed.variants.len(), 1);
        assert_eq!(parsed.variants[0].uri, "audio/index.m3u8");
        assert_eq!(parsed.variants[0].codecs.as_deref(), Some("mp4a.40.2"));
        assert_eq!(parsed.variants[0].bandwidth, 96_000);
    }
}
