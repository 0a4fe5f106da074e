//! VOD manifests over finished CMAF tracks: HLS media playlists (`EXT-X-PLAYLIST-TYPE:VOD`, `EXT-X-ENDLIST`), the
//! multivariant playlist, and a static DASH MPD with `SegmentTemplate`/`SegmentTimeline` over the same files.
//!
//! File layout (relative to the job's root): `{track}/init.mp4`, `{track}/seg-{n}.m4s` (n from 1),
//! `{track}/index.m3u8`, `master.m3u8`, `manifest.mpd`.

use std::fmt::Write;

/// What a track is.
#[derive(Debug, Clone, PartialEq)]
pub enum TrackKind {
    Video { width: u32, height: u32, fps: f64 },
    Audio { sample_rate: u32, channels: u32 },
}

/// One finished segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VodSegment {
    /// Start in the track's timescale (`tfdt`).
    pub start: u64,
    /// Duration in the track's timescale.
    pub duration: u64,
    pub bytes: u64,
}

/// One rendition's output.
#[derive(Debug, Clone, PartialEq)]
pub struct VodTrack {
    /// Directory name (`720p`, `audio`).
    pub name: String,
    pub kind: TrackKind,
    /// RFC 6381 codec string.
    pub codecs: String,
    /// Target bitrate, for the manifest when segments are tiny.
    pub bitrate_kbps: u32,
    pub timescale: u32,
    pub segments: Vec<VodSegment>,
}

impl VodTrack {
    fn secs(&self, units: u64) -> f64 {
        units as f64 / f64::from(self.timescale.max(1))
    }

    /// Total duration in seconds.
    pub fn duration_s(&self) -> f64 {
        self.secs(self.segments.iter().map(|s| s.duration).sum())
    }

    /// Peak segment bitrate in bit/s (`BANDWIDTH`), never below what the bytes average.
    pub fn peak_bps(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.duration > 0)
            .map(|s| (s.bytes as f64 * 8.0 / self.secs(s.duration)).ceil() as u64)
            .max()
            .unwrap_or(u64::from(self.bitrate_kbps) * 1000)
    }

    /// Average bitrate in bit/s (`AVERAGE-BANDWIDTH`).
    pub fn average_bps(&self) -> u64 {
        let d = self.duration_s();
        if d <= 0.0 {
            return u64::from(self.bitrate_kbps) * 1000;
        }
        (self.segments.iter().map(|s| s.bytes).sum::<u64>() as f64 * 8.0 / d).ceil() as u64
    }
}

/// `{track}/index.m3u8`.
pub fn media_playlist(t: &VodTrack) -> String {
    let target = t
        .segments
        .iter()
        .map(|s| t.secs(s.duration).round() as u64)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut out = String::new();
    let _ = writeln!(out, "#EXTM3U");
    let _ = writeln!(out, "#EXT-X-VERSION:7");
    let _ = writeln!(out, "#EXT-X-TARGETDURATION:{target}");
    let _ = writeln!(out, "#EXT-X-PLAYLIST-TYPE:VOD");
    let _ = writeln!(out, "#EXT-X-MEDIA-SEQUENCE:1");
    let _ = writeln!(out, "#EXT-X-INDEPENDENT-SEGMENTS");
    let _ = writeln!(out, "#EXT-X-MAP:URI=\"init.mp4\"");
    for (i, s) in t.segments.iter().enumerate() {
        let _ = writeln!(out, "#EXTINF:{:.5},", t.secs(s.duration));
        let _ = writeln!(out, "seg-{}.m4s", i + 1);
    }
    let _ = writeln!(out, "#EXT-X-ENDLIST");
    out
}

/// `master.m3u8`: one variant per video track (with the audio group), or the audio track alone.
pub fn master_playlist(tracks: &[VodTrack]) -> String {
    let audio = tracks
        .iter()
        .find(|t| matches!(t.kind, TrackKind::Audio { .. }));
    let mut out = String::new();
    let _ = writeln!(out, "#EXTM3U");
    let _ = writeln!(out, "#EXT-X-VERSION:7");
    let _ = writeln!(out, "#EXT-X-INDEPENDENT-SEGMENTS");
    if let Some(a) = audio {
        let channels = match a.kind {
            TrackKind::Audio { channels, .. } => channels,
            TrackKind::Video { .. } => 2,
        };
        let _ = writeln!(
            out,
            "#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"audio\",NAME=\"{}\",DEFAULT=YES,AUTOSELECT=YES,CHANNELS=\"{channels}\",URI=\"{}/index.m3u8\"",
            a.name, a.name
        );
    }
    let videos: Vec<&VodTrack> = tracks
        .iter()
        .filter(|t| matches!(t.kind, TrackKind::Video { .. }))
        .collect();
    for v in &videos {
        let TrackKind::Video { width, height, fps } = v.kind else {
            continue;
        };
        let (peak, avg, codecs) = match audio {
            Some(a) => (
                v.peak_bps() + a.peak_bps(),
                v.average_bps() + a.average_bps(),
                format!("{},{}", v.codecs, a.codecs),
            ),
            None => (v.peak_bps(), v.average_bps(), v.codecs.clone()),
        };
        let _ = write!(
            out,
            "#EXT-X-STREAM-INF:BANDWIDTH={peak},AVERAGE-BANDWIDTH={avg},CODECS=\"{codecs}\",RESOLUTION={width}x{height},FRAME-RATE={fps:.3}"
        );
        if audio.is_some() {
            let _ = write!(out, ",AUDIO=\"audio\"");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{}/index.m3u8", v.name);
    }
    if videos.is_empty() {
        if let Some(a) = audio {
            let _ = writeln!(
                out,
                "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},CODECS=\"{}\"",
                a.peak_bps(),
                a.average_bps(),
                a.codecs
            );
            let _ = writeln!(out, "{}/index.m3u8", a.name);
        }
    }
    out
}

fn iso_duration(s: f64) -> String {
    format!("PT{:.3}S", s.max(0.0))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `manifest.mpd`: a static (on-demand) MPD, one adaptation set for video and one for audio, each representation
/// a `SegmentTemplate` with a `SegmentTimeline` read from the segments themselves.
// Long by design: a renderer: the MPD elements in document order.
pub fn mpd(tracks: &[VodTrack]) -> String {
    let duration = tracks.iter().map(VodTrack::duration_s).fold(0.0, f64::max);
    let max_seg = tracks
        .iter()
        .flat_map(|t| t.segments.iter().map(move |s| t.secs(s.duration)))
        .fold(0.0, f64::max);
    let mut out = String::new();
    let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        out,
        r#"<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" profiles="urn:mpeg:dash:profile:isoff-on-demand:2011,urn:mpeg:dash:profile:isoff-live:2011" type="static" mediaPresentationDuration="{}" minBufferTime="PT2S" maxSegmentDuration="{}">"#,
        iso_duration(duration),
        iso_duration(max_seg)
    );
    let _ = writeln!(out, r#"  <Period id="0" start="PT0S">"#);
    for (set, video) in [(0, true), (1, false)] {
        let group: Vec<&VodTrack> = tracks
            .iter()
            .filter(|t| matches!(t.kind, TrackKind::Video { .. }) == video)
            .collect();
        if group.is_empty() {
            continue;
        }
        let (ct, mime) = if video {
            ("video", "video/mp4")
        } else {
            ("audio", "audio/mp4")
        };
        let _ = writeln!(
            out,
            r#"    <AdaptationSet id="{set}" contentType="{ct}" mimeType="{mime}" segmentAlignment="true" startWithSAP="1">"#
        );
        for t in group {
            let attrs = match t.kind {
                TrackKind::Video { width, height, fps } => {
                    format!(
                        r#" width="{width}" height="{height}" frameRate="{}""#,
                        fps_attr(fps)
                    )
                }
                TrackKind::Audio { sample_rate, .. } => {
                    format!(r#" audioSamplingRate="{sample_rate}""#)
                }
            };
            let _ = writeln!(
                out,
                r#"      <Representation id="{}" codecs="{}" bandwidth="{}"{attrs}>"#,
                xml_escape(&t.name),
                xml_escape(&t.codecs),
                t.peak_bps()
            );
            if let TrackKind::Audio { channels, .. } = t.kind {
                let _ = writeln!(
                    out,
                    r#"        <AudioChannelConfiguration schemeIdUri="urn:mpeg:dash:23003:3:audio_channel_configuration:2011" value="{channels}"/>"#
                );
            }
            let first = t.segments.first().map_or(0, |s| s.start);
            let _ = writeln!(
                out,
                r#"        <SegmentTemplate timescale="{}" initialization="{}/init.mp4" media="{}/seg-$Number$.m4s" startNumber="1" presentationTimeOffset="{first}">"#,
                t.timescale,
                xml_escape(&t.name),
                xml_escape(&t.name)
            );
            let _ = writeln!(out, "          <SegmentTimeline>");
            // runs of equal durations collapse into r="n"
            let mut i = 0;
            while i < t.segments.len() {
                let s = t.segments[i];
                let mut run = 0;
                while i + run + 1 < t.segments.len()
                    && t.segments[i + run + 1].duration == s.duration
                {
                    run += 1;
                }
                let r = if run > 0 {
                    format!(r#" r="{run}""#)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    r#"            <S t="{}" d="{}"{r}/>"#,
                    s.start, s.duration
                );
                i += run + 1;
            }
            let _ = writeln!(out, "          </SegmentTimeline>");
            let _ = writeln!(out, "        </SegmentTemplate>");
            let _ = writeln!(out, "      </Representation>");
        }
        let _ = writeln!(out, "    </AdaptationSet>");
    }
    let _ = writeln!(out, "  </Period>");
    let _ = writeln!(out, "</MPD>");
    out
}

fn fps_attr(fps: f64) -> String {
    if (fps - fps.round()).abs() < 1e-6 {
        format!("{}", fps.round() as u64)
    } else {
        format!("{}/1001", (fps * 1001.0).round() as u64)
    }
}

/// The WebVTT index of thumbnail sprite sheets: cue `i` covers `[i·interval, min((i+1)·interval, duration))` and
/// points at its tile (`sprite.jpg#xywh=x,y,w,h`), tiles left to right, `columns` per row, `per_sheet` tiles a
/// sheet, sheet `k` named `sheet(k)` (one JPEG cannot be taller than 65,535 pixels).
pub fn thumbnails_vtt(
    count: u32,
    interval_s: u32,
    duration_s: f64,
    tile: (u32, u32),
    (columns, per_sheet): (u32, u32),
    sheet: &dyn Fn(u32) -> String,
) -> String {
    let ts = |s: f64| {
        let ms = (s * 1000.0).round() as u64;
        format!(
            "{:02}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        )
    };
    let mut out = String::from("WEBVTT\n");
    for i in 0..count {
        let start = f64::from(i * interval_s);
        let end = (f64::from((i + 1) * interval_s)).min(duration_s.max(start + 0.001));
        let per_sheet = per_sheet.max(1);
        let (k, j) = (i / per_sheet, i % per_sheet);
        let (x, y) = ((j % columns.max(1)) * tile.0, (j / columns.max(1)) * tile.1);
        let _ = write!(
            out,
            "\n{} --> {}\n{}#xywh={x},{y},{},{}\n",
            ts(start),
            ts(end),
            sheet(k),
            tile.0,
            tile.1
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(name: &str, kind: TrackKind, codecs: &str, n: usize) -> VodTrack {
        VodTrack {
            name: name.into(),
            kind,
            codecs: codecs.into(),
            bitrate_kbps: 1000,
            timescale: 90_000,
            segments: (0..n)
                .map(|i| VodSegment {
                    start: i as u64 * 360_000,
                    duration: if i + 1 == n { 180_000 } else { 360_000 },
                    bytes: 500_000,
                })
                .collect(),
        }
    }

    fn ladder() -> Vec<VodTrack> {
        vec![
            track(
                "720p",
                TrackKind::Video {
                    width: 1280,
                    height: 720,
                    fps: 30.0,
                },
                "avc1.64001f",
                3,
            ),
            track(
                "360p",
                TrackKind::Video {
                    width: 640,
                    height: 360,
                    fps: 30.0,
                },
                "avc1.64001e",
                3,
            ),
            track(
                "audio",
                TrackKind::Audio {
                    sample_rate: 48_000,
                    channels: 2,
                },
                "mp4a.40.2",
                3,
            ),
        ]
    }

    #[test]
    fn media_playlist_is_a_complete_vod_playlist() {
        let p = media_playlist(&ladder()[0]);
        assert!(p.contains("#EXT-X-PLAYLIST-TYPE:VOD\n"));
        assert!(p.ends_with("#EXT-X-ENDLIST\n"));
        assert!(p.contains("#EXT-X-MAP:URI=\"init.mp4\""));
        assert!(p.contains("#EXT-X-TARGETDURATION:4\n"));
        assert_eq!(p.matches("#EXTINF:").count(), 3);
        assert!(p.contains("#EXTINF:2.00000,\nseg-3.m4s"));
        // parses as a media playlist
        let parsed = m3u8_rs::parse_media_playlist_res(p.as_bytes()).expect("valid media playlist");
        assert!(parsed.end_list);
        assert_eq!(parsed.segments.len(), 3);
    }

    #[test]
    fn master_names_codecs_bandwidth_and_the_audio_group() {
        let m = master_playlist(&ladder());
        let parsed = m3u8_rs::parse_master_playlist_res(m.as_bytes()).expect("valid master");
        assert_eq!(parsed.variants.len(), 2);
        let v = &parsed.variants[0];
        assert_eq!(v.codecs.as_deref(), Some("avc1.64001f,mp4a.40.2"));
        assert_eq!(v.audio.as_deref(), Some("audio"));
        // 500 kB in 2 s = 2 Mb/s peak per track (the short last segment)
        assert_eq!(v.bandwidth, 4_000_000);
        assert_eq!(parsed.alternatives.len(), 1);
        // audio only: one variant, the audio playlist
        let a = master_playlist(&ladder()[2..]);
        assert!(a.contains("CODECS=\"mp4a.40.2\"\naudio/index.m3u8"));
    }

    #[test]
    fn mpd_lists_every_segment_once() {
        let x = mpd(&ladder());
        assert!(x.contains(r#"type="static""#));
        assert!(x.contains(r#"mediaPresentationDuration="PT10.000S""#));
        assert_eq!(x.matches("<Representation ").count(), 3);
        // two equal segments then a short one, per track
        assert_eq!(x.matches(r#"<S t="0" d="360000" r="1"/>"#).count(), 3);
        assert_eq!(x.matches(r#"<S t="720000" d="180000"/>"#).count(), 3);
    }

    #[test]
    fn vtt_points_each_interval_at_its_tile() {
        let name = |k: u32| format!("s{k}.jpg");
        let v = thumbnails_vtt(3, 5, 12.0, (160, 90), (2, 4), &name);
        assert!(v.starts_with("WEBVTT\n"));
        assert!(v.contains("00:00:00.000 --> 00:00:05.000\ns0.jpg#xywh=0,0,160,90"));
        assert!(v.contains("00:00:05.000 --> 00:00:10.000\ns0.jpg#xywh=160,0,160,90"));
        assert!(v.contains("00:00:10.000 --> 00:00:12.000\ns0.jpg#xywh=0,90,160,90"));
        // past a sheet's tiles (2 here), the next sheet from its top
        let v = thumbnails_vtt(5, 5, 25.0, (160, 90), (2, 2), &name);
        assert!(v.contains("00:00:10.000 --> 00:00:15.000\ns1.jpg#xywh=0,0,160,90"));
        assert!(v.contains("00:00:20.000 --> 00:00:25.000\ns2.jpg#xywh=0,0,160,90"));
    }
}
