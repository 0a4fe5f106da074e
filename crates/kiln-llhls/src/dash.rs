//! The LL-DASH manifest (a dynamic MPD) over the same CMAF segments the HLS playlists list.
//!
//! Segments are addressed with `SegmentTemplate` + `$Number$` (the HLS media sequence number), so one store and
//! one set of URLs serves both protocols. `availabilityTimeOffset` = segment − part duration and
//! `availabilityTimeComplete="false"` announce that a segment can be requested while it is being produced: the
//! origin then streams it chunk by chunk (one CMAF chunk = one LL-HLS part) with chunked transfer encoding.
//! `presentationTimeOffset` maps each track's `tfdt` timeline to the period, whose start is the stream's running
//! time 0 = `availabilityStartTime`.

use std::fmt::Write as _;

use crate::time::format_unix_ms;

/// One representation.
#[derive(Debug, Clone, PartialEq)]
pub struct DashRepresentation {
    /// Also the path segment before the media file names (`{id}/seg-$Number$.m4s`).
    pub id: String,
    pub codecs: String,
    pub bandwidth: u64,
    pub kind: DashKind,
    /// Track timescale (from the init segment).
    pub timescale: u32,
    /// `tfdt` (in `timescale` ticks) that corresponds to the period start.
    pub presentation_time_offset: u64,
}

/// Media type of a representation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DashKind {
    Video { width: u32, height: u32, fps: f64 },
    Audio { sample_rate: u32, channels: u32 },
}

/// Everything the MPD states.
#[derive(Debug, Clone, PartialEq)]
pub struct DashManifest {
    /// Wall clock of running time 0 (Unix ms).
    pub availability_start_unix_ms: i64,
    pub publish_unix_ms: i64,
    pub segment_ms: u32,
    pub part_ms: u32,
    /// `$Number$` of the segment that starts at the period start.
    pub start_number: u64,
    /// How far back segments stay available.
    pub time_shift_buffer_s: u32,
    /// Target latency for players (ms).
    pub target_latency_ms: u32,
    /// URL of the clock endpoint (`urn:mpeg:dash:utc:http-iso:2014`).
    pub utc_timing_url: String,
    pub representations: Vec<DashRepresentation>,
    /// The stream has ended: the MPD becomes static-like (no more updates).
    pub ended: bool,
}

fn iso_duration_ms(ms: u64) -> String {
    format!("PT{}.{:03}S", ms / 1000, ms % 1000)
}

/// Renders the MPD.
// Long by design: a renderer: the MPD elements in document order.
pub fn render(m: &DashManifest) -> String {
    let mut out = String::with_capacity(2048);
    let ato = f64::from(m.segment_ms.saturating_sub(m.part_ms)) / 1000.0;
    let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = write!(
        out,
        r#"<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" profiles="urn:mpeg:dash:profile:isoff-live:2011,urn:mpeg:dash:profile:cmaf:2019" type="dynamic" availabilityStartTime="{}" publishTime="{}" minBufferTime="{}" maxSegmentDuration="{}" timeShiftBufferDepth="{}""#,
        format_unix_ms(m.availability_start_unix_ms),
        format_unix_ms(m.publish_unix_ms),
        iso_duration_ms(u64::from(m.part_ms) * 2),
        iso_duration_ms(u64::from(m.segment_ms)),
        iso_duration_ms(u64::from(m.time_shift_buffer_s) * 1000),
    );
    if !m.ended {
        let _ = write!(
            out,
            r#" minimumUpdatePeriod="{}""#,
            iso_duration_ms(u64::from(m.segment_ms))
        );
    }
    out.push_str(">\n");
    let _ = writeln!(
        out,
        r#"  <ServiceDescription id="0"><Latency target="{}" min="{}" max="{}" referenceId="0"/><PlaybackRate min="0.96" max="1.04"/></ServiceDescription>"#,
        m.target_latency_ms,
        m.target_latency_ms / 2,
        m.target_latency_ms * 3,
    );
    out.push_str("  <Period id=\"0\" start=\"PT0S\">\n");
    for (i, kind) in ["video", "audio"].iter().enumerate() {
        let reps: Vec<&DashRepresentation> = m
            .representations
            .iter()
            .filter(|r| {
                matches!(
                    (r.kind, *kind),
                    (DashKind::Video { .. }, "video") | (DashKind::Audio { .. }, "audio")
                )
            })
            .collect();
        if reps.is_empty() {
            continue;
        }
        let mime = if *kind == "video" {
            "video/mp4"
        } else {
            "audio/mp4"
        };
        let _ = writeln!(
            out,
            r#"    <AdaptationSet id="{i}" contentType="{kind}" mimeType="{mime}" segmentAlignment="true" startWithSAP="1">"#
        );
        for r in reps {
            let _ = write!(
                out,
                r#"      <Representation id="{}" codecs="{}" bandwidth="{}""#,
                r.id, r.codecs, r.bandwidth
            );
            match r.kind {
                DashKind::Video { width, height, fps } => {
                    let _ = write!(
                        out,
                        r#" width="{width}" height="{height}" frameRate="{}""#,
                        fps_attr(fps)
                    );
                }
                DashKind::Audio { sample_rate, .. } => {
                    let _ = write!(out, r#" audioSamplingRate="{sample_rate}""#);
                }
            }
            out.push_str(">\n");
            if let DashKind::Audio { channels, .. } = r.kind {
                let _ = writeln!(
                    out,
                    r#"        <AudioChannelConfiguration schemeIdUri="urn:mpeg:dash:23003:3:audio_channel_configuration:2011" value="{channels}"/>"#
                );
            }
            let seg_ticks = u64::from(m.segment_ms) * u64::from(r.timescale) / 1000;
            let _ = writeln!(
                out,
                r#"        <SegmentTemplate timescale="{}" duration="{seg_ticks}" startNumber="{}" presentationTimeOffset="{}" initialization="{}/init.mp4" media="{}/seg-$Number$.m4s" availabilityTimeOffset="{ato:.3}" availabilityTimeComplete="false"/>"#,
                r.timescale, m.start_number, r.presentation_time_offset, r.id, r.id
            );
            out.push_str("      </Representation>\n");
        }
        out.push_str("    </AdaptationSet>\n");
    }
    out.push_str("  </Period>\n");
    let _ = writeln!(
        out,
        r#"  <UTCTiming schemeIdUri="urn:mpeg:dash:utc:http-iso:2014" value="{}"/>"#,
        m.utc_timing_url
    );
    out.push_str("</MPD>\n");
    out
}

fn fps_attr(fps: f64) -> String {
    if (fps - fps.round()).abs() < 1e-9 {
        format!("{}", fps.round() as u64)
    } else {
        format!("{}/1001", (fps * 1001.0).round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_low_latency_dynamic_mpd() {
        let m = DashManifest {
            availability_start_unix_ms: 1_795_880_805_000,
            publish_unix_ms: 1_795_880_815_000,
            segment_ms: 2000,
            part_ms: 334,
            start_number: 897_940_402,
            time_shift_buffer_s: 20,
            target_latency_ms: 1500,
            utc_timing_url: "http://h/time".into(),
            ended: false,
            representations: vec![
                DashRepresentation {
                    id: "hi".into(),
                    codecs: "avc1.64001f".into(),
                    bandwidth: 2_500_000,
                    kind: DashKind::Video {
                        width: 1280,
                        height: 720,
                        fps: 30.0,
                    },
                    timescale: 3000,
                    presentation_time_offset: 10_800_000_000,
                },
                DashRepresentation {
                    id: "audio".into(),
                    codecs: "mp4a.40.2".into(),
                    bandwidth: 128_000,
                    kind: DashKind::Audio {
                        sample_rate: 48_000,
                        channels: 2,
                    },
                    timescale: 48_000,
                    presentation_time_offset: 0,
                },
            ],
        };
        let x = render(&m);
        assert!(x.contains(r#"type="dynamic" availabilityStartTime="2026-11-28T15:46:45.000Z""#));
        assert!(x.contains(r#"availabilityTimeOffset="1.666" availabilityTimeComplete="false""#));
        assert!(x.contains(r#"<SegmentTemplate timescale="3000" duration="6000" startNumber="897940402" presentationTimeOffset="10800000000" initialization="hi/init.mp4" media="hi/seg-$Number$.m4s""#));
        assert!(x.contains(r#"duration="96000""#));
        assert!(x.contains(
            r#"<UTCTiming schemeIdUri="urn:mpeg:dash:utc:http-iso:2014" value="http://h/time"/>"#
        ));
        assert!(x.contains(r#"minimumUpdatePeriod="PT2.000S""#));
        assert_eq!(x.matches("<AdaptationSet").count(), 2);
        assert_eq!(fps_attr(29.97002997), "30000/1001");
    }
}
