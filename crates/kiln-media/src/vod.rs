//! VOD transcoding: [`probe`] a file or URL, then [`VodPipeline`] decodes it once and encodes a ladder as fast as
//! the CPU allows (no pacing, no live clock), cutting CMAF segments that line up across renditions.
//!
//! ```text
//! uridecodebin ─video→ videoflip(the probed rotation) → [videorate → caps(fps)] → tee
//!     tee → queue → videoscale → videoconvert → caps(WxH I420, PAR 1:1) → x264enc(fixed GOP, no scene cuts)
//!         → h264parse → cmafmux(fragment = segment) → appsink          (one branch per rendition)
//!     tee → queue → videorate(1/interval, drop only) → videoscale → videoconvert → caps(RGB) → appsink (thumbnails)
//!               ─audio→ audioconvert → audioresample → caps(48 kHz, ≤ 2 ch) → AAC → aacparse → cmafmux → appsink
//! ```
//! Every rendition encodes the same frames with the same fixed GOP (`key-int-max` = fps × segment, scene cuts
//! off), so every fragment boundary falls on the same frame in every rendition. The first video and the first
//! audio stream are used; further streams (a second audio track, subtitles) go to fakesinks.

use std::sync::Arc;

use parking_lot::Mutex;

use bytes::{Bytes, BytesMut};
use gst::prelude::*;
use kiln_llhls::cmaf::{self, InitInfo};
use kiln_model::{VideoRendition, X264Speed};

use crate::elements::{aac_encoder, capsfilter, make, set_nick};
use crate::MediaError;

mod probe;
pub use probe::{probe, AudioProbe, ProbeInfo, VideoProbe};

/// Fails the job (through `sink`) and drops the caps when a decoded picture on `pad` has more than `max` pixels.
fn guard_picture_size(pad: &gst::Pad, max: u64, sink: VodSink) {
    let reported = std::sync::atomic::AtomicBool::new(false);
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        let Some(gst::PadProbeData::Event(ev)) = &info.data else {
            return gst::PadProbeReturn::Ok;
        };
        let gst::EventView::Caps(c) = ev.view() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(st) = c.caps().structure(0) else {
            return gst::PadProbeReturn::Ok;
        };
        let w = st.get::<i32>("width").unwrap_or(0).max(0) as u64;
        let h = st.get::<i32>("height").unwrap_or(0).max(0) as u64;
        if w * h <= max {
            return gst::PadProbeReturn::Ok;
        }
        if !reported.swap(true, std::sync::atomic::Ordering::SeqCst) {
            sink(VodEvent::Error(format!(
                "the decoded pictures grew to {w}x{h} mid-file, more than the {max} pixels the input declared"
            )));
        }
        gst::PadProbeReturn::Drop
    });
}

/// What a VOD pipeline makes.
#[derive(Debug, Clone)]
pub struct VodPlan {
    pub uri: String,
    /// Already laddered for the source (never above it).
    pub video: Vec<VideoRendition>,
    /// Output frame rate (≤ the source's).
    pub fps: (u32, u32),
    /// The source is faster than `fps`: drop frames down to it (otherwise frames pass with their own timestamps,
    /// so a source with jittery timestamps keeps exactly its frames).
    pub convert_rate: bool,
    /// Clockwise rotation to apply (the probe's: 0, 90, 180, 270).
    pub rotation: u32,
    /// AAC bitrate, when the input has audio and the job wants it.
    pub audio_kbps: Option<u32>,
    pub segment_ms: u32,
    pub x264_speed: X264Speed,
    /// One thumbnail every this many seconds, this wide (height follows the aspect ratio).
    pub thumbnails: Option<(u32, u32)>,
    /// Most pixels a decoded picture may have: the size the probe read (and admission booked memory for). A
    /// stream whose pictures grow past it mid-file fails the job instead of allocating larger pictures.
    pub max_source_pixels: Option<u64>,
}

/// Something a VOD pipeline reports. Tracks: video renditions in plan order, then audio.
#[derive(Debug, Clone)]
pub enum VodEvent {
    Init {
        track: usize,
        bytes: Bytes,
        codec: Option<String>,
        timescale: u32,
    },
    Segment {
        track: usize,
        bytes: Bytes,
        /// In the track's timescale.
        start: u64,
        duration: u64,
    },
    Thumbnail {
        pts_ns: u64,
        width: u32,
        height: u32,
        rgb: Vec<u8>,
    },
    Error(String),
    Eos,
}

pub type VodSink = Arc<dyn Fn(VodEvent) + Send + Sync>;

/// A running VOD transcode; stops when dropped.
#[derive(Debug)]
pub struct VodPipeline {
    pipeline: gst::Pipeline,
}

impl VodPipeline {
    /// Builds the pipeline; nothing runs until [`Self::start`].
    // Long by design: one linear element graph (decode → rotate → tee → rungs, audio, thumbnails); splitting it would scatter the links.
    pub fn build(plan: &VodPlan, sink: VodSink) -> Result<Self, MediaError> {
        crate::init()?;
        let pipeline = gst::Pipeline::with_name("kiln-vod");
        // uridecodebin, not uridecodebin3: with 1.22's uridecodebin3, about one job in four started with two
        // pipelines at once never produced a buffer (found by tests/vod.rs)
        let src = make("uridecodebin", "src")?;
        src.set_property("uri", &plan.uri);
        pipeline.add(&src)?;
        let seg_ns = u64::from(plan.segment_ms) * 1_000_000;
        let (fn_, fd) = (plan.fps.0.max(1), plan.fps.1.max(1));
        let gop =
            ((u64::from(fn_) * u64::from(plan.segment_ms)) / (u64::from(fd) * 1000)).max(1) as u32;

        let video_in = if plan.video.is_empty() {
            None
        } else {
            // the rotation is set from the probe rather than `auto`: a method known before the first caps means no
            // renegotiation mid-stream (with `auto`, the tag arrives after caps and the frames came out unrotated)
            let flip = make("videoflip", "flip")?;
            let method = match plan.rotation {
                90 => "90r",
                180 => "180",
                270 => "90l",
                _ => "identity",
            };
            set_nick(&flip, "video-direction", method);
            // the frames are upright now: the orientation tag must not reach the muxers, which would write it into
            // the output's track matrix and make players rotate the picture a second time
            flip.static_pad("src").expect("videoflip src").add_probe(
                gst::PadProbeType::EVENT_DOWNSTREAM,
                |_, info| {
                    // replaced, not dropped: dropping a serialized event here made GStreamer print a CRITICAL
                    // (unref of NULL) for every later event
                    if let Some(gst::PadProbeData::Event(ev)) = &mut info.data {
                        if let gst::EventView::Tag(t) = ev.view() {
                            let mut tags = t.tag_owned();
                            tags.make_mut().remove::<gst::tags::ImageOrientation>();
                            *ev = gst::event::Tag::new(tags);
                        }
                    }
                    gst::PadProbeReturn::Ok
                },
            );
            let tee = make("tee", "vtee")?;
            pipeline.add_many([&flip, &tee])?;
            if plan.convert_rate {
                let rate = make("videorate", "rate")?;
                let fcaps = capsfilter(
                    "fps",
                    gst::Caps::builder("video/x-raw")
                        .field("framerate", gst::Fraction::new(fn_ as i32, fd as i32))
                        .build(),
                )?;
                pipeline.add_many([&rate, &fcaps])?;
                gst::Element::link_many([&flip, &rate, &fcaps, &tee])?;
            } else {
                flip.link(&tee)?;
            }
            for (i, v) in plan.video.iter().enumerate() {
                let n = &v.name;
                let q = make("queue", &format!("q-{n}"))?;
                let scale = make("videoscale", &format!("scale-{n}"))?;
                let conv = make("videoconvert", &format!("conv-{n}"))?;
                let caps = capsfilter(
                    &format!("caps-{n}"),
                    gst::Caps::builder("video/x-raw")
                        .field("format", "I420")
                        .field("width", v.width as i32)
                        .field("height", v.height as i32)
                        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
                        .build(),
                )?;
                let enc = make("x264enc", &format!("enc-{n}"))?;
                enc.set_property("bitrate", v.bitrate_kbps);
                set_nick(&enc, "speed-preset", plan.x264_speed.as_str());
                enc.set_property("key-int-max", gop);
                enc.set_property("bframes", 0u32);
                // a fixed GOP in every rendition: fragments line up across the ladder
                enc.set_property("option-string", "scenecut=0:open-gop=0");
                let parse = make("h264parse", &format!("parse-{n}"))?;
                let (mux, appsink) = mux_sink(n, i, seg_ns, sink.clone())?;
                pipeline.add_many([&q, &scale, &conv, &caps, &enc, &parse, &mux, &appsink])?;
                gst::Element::link_many([
                    &tee, &q, &scale, &conv, &caps, &enc, &parse, &mux, &appsink,
                ])?;
            }
            if let Some((interval, width)) = plan.thumbnails {
                let top = &plan.video[0];
                let tw = (width.min(top.width) / 2 * 2).max(2);
                let th = ((u64::from(top.height) * u64::from(tw) / u64::from(top.width.max(1)))
                    as u32
                    / 2
                    * 2)
                .max(2);
                let q = make("queue", "q-thumbs")?;
                // one frame per interval, chosen by videorate before anything is scaled (a pad probe that dropped
                // buffers made GStreamer 1.22 print a CRITICAL per dropped frame)
                let rate = make("videorate", "rate-thumbs")?;
                rate.set_property("drop-only", true);
                let fcaps = capsfilter(
                    "fps-thumbs",
                    gst::Caps::builder("video/x-raw")
                        .field("framerate", gst::Fraction::new(1, interval.max(1) as i32))
                        .build(),
                )?;
                let scale = make("videoscale", "scale-thumbs")?;
                let conv = make("videoconvert", "conv-thumbs")?;
                let caps = capsfilter(
                    "caps-thumbs",
                    gst::Caps::builder("video/x-raw")
                        .field("format", "RGB")
                        .field("width", tw as i32)
                        .field("height", th as i32)
                        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
                        .build(),
                )?;
                let appsink = gst_app::AppSink::builder()
                    .name("sink-thumbs")
                    .sync(false)
                    .build();
                // no preroll: a sink that prerolls early would block the tee while the muxers still wait for a
                // whole segment
                appsink.set_property("async", false);
                pipeline.add_many([
                    &q,
                    &rate,
                    &fcaps,
                    &scale,
                    &conv,
                    &caps,
                    appsink.upcast_ref(),
                ])?;
                gst::Element::link_many([
                    &tee,
                    &q,
                    &rate,
                    &fcaps,
                    &scale,
                    &conv,
                    &caps,
                    appsink.upcast_ref(),
                ])?;
                let tsink = sink.clone();
                appsink.set_callbacks(
                    gst_app::AppSinkCallbacks::builder()
                        .new_sample(move |s| {
                            let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                            if let Some(b) = sample.buffer() {
                                let map = b.map_readable().map_err(|_| gst::FlowError::Error)?;
                                tsink(VodEvent::Thumbnail {
                                    pts_ns: b.pts().map_or(0, |p| p.nseconds()),
                                    width: tw,
                                    height: th,
                                    rgb: packed_rgb(map.as_slice(), tw, th)
                                        .ok_or(gst::FlowError::Error)?,
                                });
                            }
                            Ok(gst::FlowSuccess::Ok)
                        })
                        .build(),
                );
            }
            Some(flip)
        };
        let audio_in = match plan.audio_kbps {
            Some(kbps) => {
                let conv = make("audioconvert", "aconv")?;
                let res = make("audioresample", "ares")?;
                let caps = capsfilter(
                    "acaps",
                    gst::Caps::builder("audio/x-raw")
                        .field("rate", 48_000i32)
                        .field("channels", gst::IntRange::new(1, 2))
                        .build(),
                )?;
                let enc = make(aac_encoder()?, "aenc")?;
                enc.set_property("bitrate", (kbps * 1000) as i32);
                let parse = make("aacparse", "aparse")?;
                let (mux, appsink) = mux_sink("audio", plan.video.len(), seg_ns, sink.clone())?;
                pipeline.add_many([&conv, &res, &caps, &enc, &parse, &mux, &appsink])?;
                gst::Element::link_many([&conv, &res, &caps, &enc, &parse, &mux, &appsink])?;
                Some(conv)
            }
            None => None,
        };
        // decoded pads → the branches (a stream nobody wants goes to a fakesink so it cannot stall the rest)
        let weak = pipeline.downgrade();
        let max_pixels = plan.max_source_pixels;
        let grow_sink = sink.clone();
        src.connect_pad_added(move |_, pad| {
            let Some(pipeline) = weak.upgrade() else {
                return;
            };
            let name = pad
                .current_caps()
                .or_else(|| Some(pad.query_caps(None)))
                .and_then(|c| c.structure(0).map(|s| s.name().to_string()))
                .unwrap_or_default();
            let target = if name.starts_with("video/") {
                if let Some(max) = max_pixels {
                    guard_picture_size(pad, max, grow_sink.clone());
                }
                video_in.clone()
            } else if name.starts_with("audio/") {
                audio_in.clone()
            } else {
                None
            };
            let target = match target
                .and_then(|t| t.static_pad("sink"))
                .filter(|p| !p.is_linked())
            {
                Some(p) => p,
                None => {
                    let Ok(fake) = make("fakesink", &format!("discard-{}", pad.name())) else {
                        return;
                    };
                    fake.set_property("sync", false);
                    fake.set_property("async", false);
                    let _ = pipeline.add(&fake);
                    let _ = fake.sync_state_with_parent();
                    fake.static_pad("sink").expect("fakesink sink")
                }
            };
            let _ = pad.link(&target);
        });
        let bus = pipeline.bus().expect("a pipeline has a bus");
        bus.set_sync_handler(move |_, msg| {
            crate::priority::on_message(msg);
            use gst::MessageView;
            match msg.view() {
                MessageView::Error(e) => {
                    let from = msg.src().map(|s| s.name().to_string()).unwrap_or_default();
                    sink(VodEvent::Error(format!("{from}: {}", e.error())))
                }
                MessageView::Eos(_) => sink(VodEvent::Eos),
                _ => {}
            }
            gst::BusSyncReply::Drop
        });
        Ok(Self { pipeline })
    }

    pub fn start(&self) -> Result<(), MediaError> {
        self.pipeline
            .set_state(gst::State::Playing)
            .map(|_| ())
            .map_err(|e| MediaError::Start(e.to_string()))
    }

    /// Media position of the pipeline, in ns, when known.
    pub fn position_ns(&self) -> Option<u64> {
        self.pipeline
            .query_position::<gst::ClockTime>()
            .map(|t| t.nseconds())
    }

    pub fn stop(&self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Drop for VodPipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// cmafmux cutting one fragment per segment, into an appsink that reports init and segments.
fn mux_sink(
    name: &str,
    track: usize,
    seg_ns: u64,
    sink: VodSink,
) -> Result<(gst::Element, gst::Element), MediaError> {
    let mux = make("cmafmux", &format!("mux-{name}"))?;
    mux.set_property("fragment-duration", seg_ns);
    let appsink = gst_app::AppSink::builder()
        .name(format!("sink-{name}"))
        .sync(false)
        .build();
    appsink.set_property("buffer-list", true);
    appsink.set_property("async", false);
    let init: Mutex<Option<InitInfo>> = Mutex::new(None);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffers: Vec<gst::Buffer> = match (sample.buffer_list(), sample.buffer()) {
                    (Some(list), _) => list.iter_owned().collect(),
                    (None, Some(b)) => vec![b.to_owned()],
                    (None, None) => return Ok(gst::FlowSuccess::Ok),
                };
                let mut body = BytesMut::new();
                let mut init = init.lock();
                for b in &buffers {
                    let map = b.map_readable().map_err(|_| gst::FlowError::Error)?;
                    let data = map.as_slice();
                    if data.len() >= 8 && &data[4..8] == b"ftyp" {
                        match cmaf::parse_init(data) {
                            Ok(info) => {
                                let timescale = info.tracks.first().map_or(90_000, |t| t.timescale);
                                sink(VodEvent::Init {
                                    track,
                                    bytes: Bytes::copy_from_slice(data),
                                    codec: info.codecs(),
                                    timescale,
                                });
                                *init = Some(info);
                            }
                            Err(e) => {
                                sink(VodEvent::Error(format!("init segment: {e}")));
                                return Err(gst::FlowError::Error);
                            }
                        }
                        continue;
                    }
                    body.extend_from_slice(data);
                }
                if body.is_empty() {
                    return Ok(gst::FlowSuccess::Ok);
                }
                let Some(info) = init.as_ref() else {
                    sink(VodEvent::Error(
                        "a segment arrived before the init segment".into(),
                    ));
                    return Err(gst::FlowError::Error);
                };
                match cmaf::parse_fragment(&body, info) {
                    Ok(f) => sink(VodEvent::Segment {
                        track,
                        bytes: body.freeze(),
                        start: f.base_decode_time,
                        duration: f.duration,
                    }),
                    Err(e) => {
                        sink(VodEvent::Error(format!("segment: {e}")));
                        return Err(gst::FlowError::Error);
                    }
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    Ok((mux, appsink.upcast()))
}

/// The rows of a raw `RGB` frame without their padding: GStreamer's default layout pads each row to a multiple of
/// 4 bytes (a 426-pixel row is 1,278 bytes of pixels in 1,280), which read as packed pixels shears the picture.
/// `None` when the buffer is shorter than the frame.
fn packed_rgb(data: &[u8], width: u32, height: u32) -> Option<Vec<u8>> {
    let row = width as usize * 3;
    let stride = row.div_ceil(4) * 4;
    let rows = height as usize;
    if data.len() < stride * (rows.max(1) - 1) + row {
        return None;
    }
    if stride == row {
        return Some(data[..row * rows].to_vec());
    }
    let mut out = Vec::with_capacity(row * rows);
    for r in 0..rows {
        out.extend_from_slice(&data[r * stride..r * stride + row]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::packed_rgb;

    #[test]
    fn rgb_rows_lose_their_padding() {
        // 2 x 2 pixels: 6 bytes a row, padded to 8
        let padded = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0];
        assert_eq!(
            packed_rgb(&padded, 2, 2).unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        // the last row's padding may be absent
        assert_eq!(packed_rgb(&padded[..14], 2, 2).unwrap().len(), 12);
        // 4 pixels a row: 12 bytes, no padding
        let packed: Vec<u8> = (0..24).collect();
        assert_eq!(packed_rgb(&packed, 4, 2).unwrap(), packed);
        assert_eq!(packed_rgb(&padded[..13], 2, 2), None);
    }
}
