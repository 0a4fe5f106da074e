//! Building and running a live stream pipeline.

use std::sync::{Arc, Mutex};

use gst::prelude::*;
use kiln_llhls::plan::{AudioSplitter, KeyframeClock, Split, VideoSplitter};
use kiln_model::{AudioRendition, Source, StreamPlan, TestPattern, VideoRendition};

use crate::chunks::ChunkAssembler;
use crate::elements::{aac_encoder, capsfilter, make, set_nick};
use crate::{EventSink, MediaError, MediaEvent};

/// A running (or ready) live pipeline. Dropping it stops the pipeline.
#[derive(Debug)]
pub struct LivePipeline {
    pipeline: gst::Pipeline,
    clock: gst::Clock,
}

/// The custom event that makes cmafmux (manual-split) start a new chunk (`chunk=true`) or fragment before the
/// next buffer.
fn split_event(split: Split) -> gst::Event {
    gst::event::CustomDownstream::builder(
        gst::Structure::builder("FMP4MuxSplitNow")
            .field("chunk", split == Split::Part)
            .build(),
    )
    .build()
}

/// The running time of a buffer on `pad`, from the pad's sticky segment.
fn running_time(pad: &gst::Pad, buf: &gst::BufferRef) -> Option<u64> {
    let pts = buf.pts().or(buf.dts())?;
    let ev = pad.sticky_event::<gst::event::Segment>(0)?;
    let seg = ev.segment().downcast_ref::<gst::ClockTime>()?;
    seg.to_running_time(pts).map(|t| t.nseconds())
}

impl LivePipeline {
    /// Builds the pipeline for `plan`; events go to `sink`. Rendition indices: video renditions in plan order,
    /// then audio.
    pub fn build(plan: &StreamPlan, sink: EventSink) -> Result<Self, MediaError> {
        crate::init()?;
        let pipeline = gst::Pipeline::with_name(&format!("kiln-{}", plan.id));
        // Running time 0 maps to a wall-clock instant, so PROGRAM-DATE-TIME = base time + running time.
        let clock: gst::Clock = gst::glib::Object::builder::<gst::SystemClock>()
            .property("clock-type", gst::ClockType::Realtime)
            .build()
            .upcast();
        pipeline.use_clock(Some(&clock));

        let Source::Test { pattern } = &plan.source;
        let tee = build_test_video_source(&pipeline, plan, *pattern)?;
        for (i, v) in plan.video.iter().enumerate() {
            build_video_branch(&pipeline, &tee, plan, i, v, sink.clone())?;
        }
        if let Some(a) = &plan.audio {
            build_test_audio(&pipeline, plan, plan.video.len(), a, sink.clone())?;
        }

        let bus = pipeline.bus().expect("a pipeline has a bus");
        bus.set_sync_handler(move |_, msg| {
            use gst::MessageView;
            let element = || msg.src().map(|s| s.path_string().to_string());
            match msg.view() {
                MessageView::Error(e) => sink(MediaEvent::Error {
                    element: element(),
                    message: e.error().to_string(),
                    debug: e.debug().map(|d| d.to_string()),
                }),
                MessageView::Warning(w) => sink(MediaEvent::Warning {
                    element: element(),
                    message: w.error().to_string(),
                }),
                MessageView::Eos(_) => sink(MediaEvent::Eos),
                _ => {}
            }
            gst::BusSyncReply::Drop
        });
        Ok(Self { pipeline, clock })
    }

    /// Starts the pipeline. Returns the wall-clock time (Unix ms) of running time 0.
    pub fn start(&self) -> Result<i64, MediaError> {
        let base = self.clock.time();
        self.pipeline.set_start_time(gst::ClockTime::NONE);
        self.pipeline.set_base_time(base);
        self.pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| MediaError::Start(e.to_string()))?;
        Ok(base.mseconds() as i64)
    }

    /// Asks every source to end; the muxers drain their last parts and an [`MediaEvent::Eos`] follows.
    pub fn send_eos(&self) -> bool {
        self.pipeline.send_event(gst::event::Eos::new())
    }

    /// Pauses a live pipeline: sources stop producing and no part is published until [`Self::resume`]. Used
    /// to stall a stream on purpose (tests of the origin's timeouts; an operator hold).
    pub fn pause(&self) -> Result<(), MediaError> {
        self.pipeline
            .set_state(gst::State::Paused)
            .map(|_| ())
            .map_err(|e| MediaError::Start(e.to_string()))
    }

    /// Resumes after [`Self::pause`].
    pub fn resume(&self) -> Result<(), MediaError> {
        self.pipeline
            .set_state(gst::State::Playing)
            .map(|_| ())
            .map_err(|e| MediaError::Start(e.to_string()))
    }

    /// Stops at once (no more events).
    pub fn stop(&self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }

    /// The pipeline's name (`kiln-<stream id>`).
    pub fn name(&self) -> String {
        self.pipeline.name().to_string()
    }
}

impl Drop for LivePipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

fn add_link(pipeline: &gst::Pipeline, chain: &[&gst::Element]) -> Result<(), MediaError> {
    pipeline.add_many(chain.iter().copied())?;
    gst::Element::link_many(chain.iter().copied())
        .map_err(|e| MediaError::Build(format!("linking {}: {e}", names(chain))))?;
    Ok(())
}

fn names(chain: &[&gst::Element]) -> String {
    chain
        .iter()
        .map(|e| e.name().to_string())
        .collect::<Vec<_>>()
        .join(" → ")
}

fn video_caps(w: u32, h: u32, fps: kiln_model::Fraction) -> gst::Caps {
    gst::Caps::builder("video/x-raw")
        .field("format", "I420")
        .field("width", w as i32)
        .field("height", h as i32)
        .field(
            "framerate",
            gst::Fraction::new(fps.num as i32, fps.den as i32),
        )
        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
        .build()
}

/// videotestsrc → caps → clockoverlay → tee.
fn build_test_video_source(
    pipeline: &gst::Pipeline,
    plan: &StreamPlan,
    pattern: TestPattern,
) -> Result<gst::Element, MediaError> {
    let (w, h) = plan.source_size();
    let src = make("videotestsrc", "vsrc")?;
    src.set_property("is-live", true);
    set_nick(
        &src,
        "pattern",
        match pattern {
            TestPattern::Smpte => "smpte",
            TestPattern::Ball => "ball",
            TestPattern::Bars => "smpte75",
        },
    );
    let caps = capsfilter("vsrc-caps", video_caps(w, h, plan.source_fps()))?;
    let overlay = make("clockoverlay", "clock")?;
    overlay.set_property("time-format", "%H:%M:%S");
    overlay.set_property("text", format!("kiln {}", plan.id));
    overlay.set_property("shaded-background", true);
    overlay.set_property("font-desc", format!("Sans Bold {}", (h / 36).clamp(6, 48)));
    set_nick(&overlay, "halignment", "left");
    set_nick(&overlay, "valignment", "top");
    let tee = make("tee", "vtee")?;
    add_link(pipeline, &[&src, &caps, &overlay, &tee])?;

    Ok(tee)
}

/// cmafmux (manual-split) → appsink for rendition `index`, returning the muxer.
fn build_mux_sink(
    plan: &StreamPlan,
    index: usize,
    name: &str,
    part_ns: u64,
    sink: EventSink,
) -> Result<(gst::Element, gst::Element), MediaError> {
    let mux = make("cmafmux", &format!("mux-{name}"))?;
    mux.set_property("manual-split", true);
    mux.set_property("fragment-duration", plan.timing.segment_ns());
    // In manual-split mode the durations only feed latency reporting.
    mux.set_property("chunk-duration", part_ns);
    let appsink = gst_app::AppSink::builder()
        .name(format!("sink-{name}"))
        .sync(false)
        .build();
    appsink.set_property("buffer-list", true);
    let mut asm = ChunkAssembler::new(index, sink.clone());
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Err(e) = asm.on_sample(&sample) {
                    sink(MediaEvent::Error {
                        element: Some(s.name().to_string()),
                        message: e,
                        debug: None,
                    });
                    return Err(gst::FlowError::Error);
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    let appsink: gst::Element = appsink.upcast();
    Ok((mux, appsink))
}

/// Sends `FMP4MuxSplitNow` into the muxer ahead of the frames the splitter picks.
fn add_split_probe<F>(pad: &gst::Pad, decide: F)
where
    F: FnMut(u64, bool) -> Option<Split> + Send + 'static,
{
    let decide = Mutex::new(decide);
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buf) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(rt) = running_time(pad, buf) else {
            return gst::PadProbeReturn::Ok;
        };
        let key = !buf.flags().contains(gst::BufferFlags::DELTA_UNIT);
        let split = (decide.lock().unwrap_or_else(|e| e.into_inner()))(rt, key);
        if let (Some(split), Some(peer)) = (split, pad.peer()) {
            peer.send_event(split_event(split));
        }
        nudge_timestamps(info);
        gst::PadProbeReturn::Ok
    });
}

/// Works around a rounding mismatch in cmafmux 0.14.5: it writes `tfdt` with a floor conversion to the track
/// timescale but sample durations with a rounding one. Sources stamp frames with floored nanoseconds
/// (30 fps frame 10 = 333 333 333 ns → tick 999.99… → 999 at timescale 3000, while ten 100-tick durations end at
/// 1000), so each part's `tfdt` would sit one tick before the previous part's end. Moving every timestamp 1 ns
/// later makes the floor land on the intended tick (1 ns is far below one tick at any timescale cmafmux picks),
/// so `tfdt(n+1) = tfdt(n) + Σ durations(n)` holds exactly.
fn nudge_timestamps(info: &mut gst::PadProbeInfo) {
    if let Some(gst::PadProbeData::Buffer(ref mut buffer)) = info.data {
        let b = buffer.make_mut();
        let one = gst::ClockTime::from_nseconds(1);
        if let Some(p) = b.pts() {
            b.set_pts(p + one);
        }
        if let Some(d) = b.dts() {
            b.set_dts(d + one);
        }
    }
}

/// Forces a keyframe on the first frame at or after each segment grid point, by sending a downstream
/// force-key-unit event into the encoder just ahead of that frame. Every branch runs the same clock on the same
/// running times, so all renditions key the same frame. It sits right in front of the encoder because elements
/// before it may hold a frame back (videorate keeps one to decide on duplicates), which would let the event
/// overtake the frame it was meant for.
fn add_keyframe_probe(pad: &gst::Pad, segment_ns: u64) {
    let clock = Mutex::new((KeyframeClock::new(segment_ns), 0u32));
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buf) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(rt) = running_time(pad, buf) else {
            return gst::PadProbeReturn::Ok;
        };
        let mut st = clock.lock().unwrap_or_else(|e| e.into_inner());
        if st.0.on_frame(rt) {
            st.1 += 1;
            // running-time NONE means "the next frame": the event travels in-band just ahead of this frame, so the
            // encoder keys exactly this frame. (A concrete running time is compared by GstVideoEncoder 1.22 against
            // its internal, min-pts-shifted frame times — x264enc adds 1000 h — and is then ignored.)
            let ev = gst_video::DownstreamForceKeyUnitEvent::builder()
                .timestamp(buf.pts())
                .running_time(gst::ClockTime::NONE)
                .all_headers(true)
                .count(st.1)
                .build();
            if let Some(peer) = pad.peer() {
                peer.send_event(ev);
            }
        }
        gst::PadProbeReturn::Ok
    });
}

fn build_video_branch(
    pipeline: &gst::Pipeline,
    tee: &gst::Element,
    plan: &StreamPlan,
    index: usize,
    v: &VideoRendition,
    sink: EventSink,
) -> Result<(), MediaError> {
    let n = &v.name;
    let queue = make("queue", &format!("q-{n}"))?;
    queue.set_property("max-size-buffers", 0u32);
    queue.set_property("max-size-bytes", 0u32);
    queue.set_property("max-size-time", 1_000_000_000u64);
    let scale = make("videoconvertscale", &format!("scale-{n}"))?;
    let rate = make("videorate", &format!("rate-{n}"))?;
    // Keep the source's timestamps: by default videorate restarts its output at the segment start, which would
    // shift this branch's running time against the keyframe clock (measured: by the source's start-up latency).
    rate.set_property("skip-to-first", true);
    let caps = capsfilter(&format!("caps-{n}"), video_caps(v.width, v.height, v.fps))?;
    let enc = make("x264enc", &format!("enc-{n}"))?;
    enc.set_property("bitrate", v.bitrate_kbps);
    set_nick(&enc, "tune", "zerolatency");
    set_nick(&enc, "speed-preset", plan.encoder.x264_speed.as_str());
    // Keyframes come from the keyframe clock; x264's own GOP limit is only a safety net, and scene cuts would
    // give renditions different keyframes.
    let seg_frames = (plan.timing.segment_ms as u64 * v.fps.num as u64)
        .div_ceil(1000 * v.fps.den as u64)
        .max(1);
    enc.set_property("key-int-max", (2 * seg_frames) as u32);
    enc.set_property("option-string", "scenecut=0");
    let parse = make("h264parse", &format!("parse-{n}"))?;
    let pcaps = capsfilter(
        &format!("pcaps-{n}"),
        gst::Caps::builder("video/x-h264")
            .field("stream-format", "avc")
            .field("alignment", "au")
            .build(),
    )?;
    let part_ns = plan.timing.video_part_ns(v.fps);
    let (mux, appsink) = build_mux_sink(plan, index, n, part_ns, sink)?;
    add_link(
        pipeline,
        &[
            &queue, &scale, &rate, &caps, &enc, &parse, &pcaps, &mux, &appsink,
        ],
    )?;
    tee.link(&queue)
        .map_err(|e| MediaError::Build(format!("linking tee → {n}: {e}")))?;
    add_keyframe_probe(
        &caps.static_pad("src").expect("capsfilter has a src pad"),
        plan.timing.segment_ns(),
    );
    let mut splitter = VideoSplitter::new(plan.timing.segment_ns(), part_ns);
    add_split_probe(
        &pcaps.static_pad("src").expect("capsfilter has a src pad"),
        move |rt, key| splitter.on_frame(rt, key),
    );
    Ok(())
}

fn build_test_audio(
    pipeline: &gst::Pipeline,
    plan: &StreamPlan,
    index: usize,
    a: &AudioRendition,
    sink: EventSink,
) -> Result<(), MediaError> {
    let n = &a.name;
    let src = make("audiotestsrc", "asrc")?;
    src.set_property("is-live", true);
    src.set_property("volume", 0.1f64);
    src.set_property("freq", 440.0f64);
    src.set_property("samplesperbuffer", 1024i32);
    let conv = make("audioconvert", &format!("aconv-{n}"))?;
    let res = make("audioresample", &format!("ares-{n}"))?;
    let caps = capsfilter(
        &format!("acaps-{n}"),
        gst::Caps::builder("audio/x-raw")
            .field("rate", a.sample_rate as i32)
            .field("channels", a.channels as i32)
            .build(),
    )?;
    let enc_factory = aac_encoder()?;
    let enc = make(enc_factory, &format!("aenc-{n}"))?;
    enc.set_property("bitrate", (a.bitrate_kbps * 1000) as i32);
    let parse = make("aacparse", &format!("aparse-{n}"))?;
    let part_ns = plan.timing.audio_part_ns(a.sample_rate);
    let (mux, appsink) = build_mux_sink(plan, index, n, part_ns, sink)?;
    add_link(
        pipeline,
        &[&src, &conv, &res, &caps, &enc, &parse, &mux, &appsink],
    )?;
    let mut splitter = AudioSplitter::new(
        plan.timing.segment_ns(),
        plan.timing.audio_frames_per_part(a.sample_rate),
    );
    add_split_probe(
        &parse.static_pad("src").expect("aacparse has a src pad"),
        move |rt, _| splitter.on_frame(rt),
    );
    Ok(())
}

/// An event sink that forwards into a channel (tests and tools that consume events on one thread).
pub fn channel_sink() -> (EventSink, std::sync::mpsc::Receiver<MediaEvent>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    (
        Arc::new(move |e| {
            let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(e);
        }),
        rx,
    )
}
