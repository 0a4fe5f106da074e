//! Building and running a live stream pipeline.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use gst::prelude::*;
use kiln_llhls::plan::{AudioSplitter, KeyframeClock, Split, VideoSplitter};
use kiln_model::{AudioRendition, Backend, Source, StreamPlan, TestPattern, VideoRendition};

use crate::chunks::ChunkAssembler;
use crate::elements::{aac_encoder, capsfilter, make, make_dyn, set_nick};
use crate::select::{Registry, Selection};
use crate::{EventSink, MediaError, MediaEvent};

/// How to build a stream's pipeline beyond its plan: the elements chosen for this host, where an encoded source
/// may decode, and where its media file is.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub registry: Arc<Registry>,
    /// Scaler and encoder for every video rendition.
    pub selection: Selection,
    /// Decode an encoded source on NVDEC of this GPU when the registry has the decoder.
    pub decode_gpu: Option<u32>,
    /// For `file://` sources: the resolved path (the daemon checks it is inside its media directory).
    pub file: Option<PathBuf>,
    /// Test-only: make the encoder of video rendition 0 fail after this many frames.
    #[cfg(feature = "fault-injection")]
    pub fail_encoder_after_frames: Option<u64>,
}

impl BuildOptions {
    /// x264 on the CPU with whatever the registry has (tests, tools).
    pub fn cpu(registry: Arc<Registry>) -> Result<Self, MediaError> {
        let selection = registry
            .select(kiln_model::VideoCodec::H264, Backend::Cpu, None)
            .map_err(|e| MediaError::Build(e.to_string()))?;
        Ok(Self {
            registry,
            selection,
            decode_gpu: None,
            file: None,
            #[cfg(feature = "fault-injection")]
            fail_encoder_after_frames: None,
        })
    }
}

/// A running (or ready) live pipeline. Dropping it stops the pipeline.
#[derive(Debug)]
pub struct LivePipeline {
    pipeline: gst::Pipeline,
    clock: gst::Clock,
    /// The decoupled pipeline of an encoded source (files, URLs).
    source: Option<crate::source::EncodedSource>,
    /// Frames that entered the video tee (the source's frame rate, after decoding).
    input_frames: Arc<std::sync::atomic::AtomicU64>,
    video_names: Vec<String>,
}

/// Frame counters of one video rendition since the pipeline started (from its videorate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenditionFrames {
    pub name: String,
    /// Frames handed to the encoder.
    pub encoded: u64,
    /// Source frames dropped to reach the rendition's rate (or because they came late).
    pub dropped: u64,
    /// Frames repeated to fill gaps in the source.
    pub duplicated: u64,
}

/// Frame counters of a pipeline since it started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FrameStats {
    /// Source frames in (after decoding).
    pub input: u64,
    pub renditions: Vec<RenditionFrames>,
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
    /// Builds the pipeline for `plan` with x264 and the host's registry (see [`Self::build_with`]).
    pub fn build(plan: &StreamPlan, sink: EventSink) -> Result<Self, MediaError> {
        let opts = BuildOptions::cpu(Arc::new(Registry::probe()?))?;
        Self::build_with(plan, &opts, sink)
    }

    /// Builds the pipeline for `plan` with the chosen elements; events go to `sink`. Rendition indices: video
    /// renditions in plan order, then audio.
    pub fn build_with(
        plan: &StreamPlan,
        opts: &BuildOptions,
        sink: EventSink,
    ) -> Result<Self, MediaError> {
        crate::init()?;
        let pipeline = gst::Pipeline::with_name(&format!("kiln-{}", plan.id));
        // Running time 0 maps to a wall-clock instant, so PROGRAM-DATE-TIME = base time + running time.
        let clock: gst::Clock = gst::glib::Object::builder::<gst::SystemClock>()
            .property("clock-type", gst::ClockType::Realtime)
            .build()
            .upcast();
        pipeline.use_clock(Some(&clock));

        // no tee at all for an audio-only stream
        let tee = if plan.video.is_empty() {
            None
        } else {
            let tee = make("tee", "vtee")?;
            pipeline.add(&tee)?;
            for (i, v) in plan.video.iter().enumerate() {
                build_video_branch(&pipeline, &tee, plan, opts, i, v, sink.clone())?;
            }
            Some(tee)
        };
        let audio_in = match &plan.audio {
            Some(a) => Some(build_audio_branch(
                &pipeline,
                plan,
                plan.video.len(),
                a,
                sink.clone(),
            )?),
            None => None,
        };
        let mut source = None;
        match &plan.source {
            Source::Test { pattern } => {
                if let Some(tee) = &tee {
                    build_test_video_source(&pipeline, plan, opts, *pattern, tee)?;
                }
                if let Some(ain) = &audio_in {
                    build_test_audio_source(&pipeline, ain)?;
                }
            }
            Source::File { .. } | Source::Url { .. } => {
                source = Some(crate::source::EncodedSource::build(
                    &pipeline,
                    plan,
                    opts,
                    tee.as_ref(),
                    audio_in.as_ref(),
                    sink.clone(),
                )?);
            }
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
        let input_frames = Arc::new(std::sync::atomic::AtomicU64::new(0));
        if let Some(pad) = tee.as_ref().and_then(|t| t.static_pad("sink")) {
            let n = input_frames.clone();
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                gst::PadProbeReturn::Ok
            });
        }
        Ok(Self {
            pipeline,
            clock,
            source,
            input_frames,
            video_names: plan.video.iter().map(|v| v.name.clone()).collect(),
        })
    }

    /// Starts the pipeline. Returns the wall-clock time (Unix ms) of running time 0.
    pub fn start(&self) -> Result<i64, MediaError> {
        self.start_at(None)
    }

    /// Starts the pipeline on the timeline of an earlier pipeline whose running time 0 was at `origin_unix_ms`
    /// (a rebuild after an encoder failure): running times continue where the old pipeline's would be now, so
    /// the segment grid, keyframe clock and PROGRAM-DATE-TIME stay those of the stream.
    pub fn start_at(&self, origin_unix_ms: Option<i64>) -> Result<i64, MediaError> {
        // The clock is the realtime clock: its time is Unix time in ns.
        let base = match origin_unix_ms {
            Some(ms) => gst::ClockTime::from_mseconds(ms.max(0) as u64),
            None => self.clock.time(),
        };
        self.pipeline.set_start_time(gst::ClockTime::NONE);
        self.pipeline.set_base_time(base);
        self.pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| MediaError::Start(e.to_string()))?;
        // An encoded source starts at position 0: on a continued timeline its frames are moved to "now" so the
        // pacing (clocksync) neither bursts nor stalls.
        if let Some(src) = &self.source {
            src.start(self.clock.time().saturating_sub(base).nseconds())?;
        }
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
        // The stream pipeline first: its appsrcs go flushing, which releases a source thread blocked on a full
        // appsrc (stopping the source first could wait on it forever).
        let _ = self.pipeline.set_state(gst::State::Null);
        if let Some(src) = &self.source {
            src.stop();
        }
    }

    /// Frame counters since start: source frames in, and per video rendition what videorate passed on, dropped
    /// and duplicated.
    pub fn frame_stats(&self) -> FrameStats {
        let renditions = self
            .video_names
            .iter()
            .map(|name| {
                let rate = self.pipeline.by_name(&format!("rate-{name}"));
                let get = |p: &str| rate.as_ref().map_or(0, |r| r.property::<u64>(p));
                RenditionFrames {
                    name: name.clone(),
                    encoded: get("out"),
                    dropped: get("drop"),
                    duplicated: get("duplicate"),
                }
            })
            .collect();
        FrameStats {
            input: self.input_frames.load(std::sync::atomic::Ordering::Relaxed),
            renditions,
        }
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

/// videotestsrc → caps → clockoverlay → [cudaupload] → tee.
fn build_test_video_source(
    pipeline: &gst::Pipeline,
    plan: &StreamPlan,
    opts: &BuildOptions,
    pattern: TestPattern,
    tee: &gst::Element,
) -> Result<(), MediaError> {
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
    let mut chain = vec![src, caps, overlay];
    if opts.selection.upload {
        chain.push(make("cudaupload", "vupload")?);
    }
    let refs: Vec<&gst::Element> = chain.iter().collect();
    add_link(pipeline, &refs)?;
    chain
        .last()
        .expect("non-empty")
        .link(tee)
        .map_err(|e| MediaError::Build(format!("linking the source to the tee: {e}")))?;
    Ok(())
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
    opts: &BuildOptions,
    index: usize,
    v: &VideoRendition,
    sink: EventSink,
) -> Result<(), MediaError> {
    let n = &v.name;
    let sel = &opts.selection;
    let queue = make("queue", &format!("q-{n}"))?;
    queue.set_property("max-size-buffers", 0u32);
    queue.set_property("max-size-bytes", 0u32);
    queue.set_property("max-size-time", 1_000_000_000u64);
    let scale = make_dyn(&sel.scaler.factory, &format!("scale-{n}"))?;
    let rate = make("videorate", &format!("rate-{n}"))?;
    // Keep the source's timestamps: by default videorate restarts its output at the segment start, which would
    // shift this branch's running time against the keyframe clock (measured: by the source's start-up latency).
    rate.set_property("skip-to-first", true);
    let mut raw_caps = video_caps(v.width, v.height, v.fps);
    if sel.scaler.gpu {
        raw_caps
            .make_mut()
            .set_features_simple(Some(gst::CapsFeatures::new(["memory:CUDAMemory"])));
    }
    let caps = capsfilter(&format!("caps-{n}"), raw_caps)?;
    let mut chain = vec![queue, scale, rate, caps.clone()];
    if sel.download {
        chain.push(make("cudadownload", &format!("down-{n}"))?);
    }
    let enc = make_dyn(&sel.encoder.factory, &format!("enc-{n}"))?;
    let seg_frames = (plan.timing.segment_ms as u64 * v.fps.num as u64)
        .div_ceil(1000 * v.fps.den as u64)
        .max(1);
    match sel.backend {
        Backend::Cpu => configure_x264(&enc, plan, v, seg_frames),
        Backend::Nvenc { .. } => {
            configure_nvenc(&enc, plan, v, seg_frames, sel.encoder.cuda_device_id)?
        }
    }
    #[cfg(feature = "fault-injection")]
    if index == 0 {
        if let Some(after) = opts.fail_encoder_after_frames {
            inject_encoder_fault(&enc, after);
        }
    }
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
    // the keyframe probe sits on the pad that feeds the encoder
    let before_enc = chain.last().expect("non-empty").clone();
    chain.extend([enc, parse, pcaps.clone(), mux, appsink]);
    let refs: Vec<&gst::Element> = chain.iter().collect();
    add_link(pipeline, &refs)?;
    tee.link(&chain[0])
        .map_err(|e| MediaError::Build(format!("linking tee → {n}: {e}")))?;
    add_keyframe_probe(
        &before_enc.static_pad("src").expect("has a src pad"),
        plan.timing.segment_ns(),
    );
    let mut splitter = VideoSplitter::new(plan.timing.segment_ns(), part_ns);
    add_split_probe(
        &pcaps.static_pad("src").expect("capsfilter has a src pad"),
        move |rt, key| splitter.on_frame(rt, key),
    );
    Ok(())
}

fn configure_x264(enc: &gst::Element, plan: &StreamPlan, v: &VideoRendition, seg_frames: u64) {
    enc.set_property("bitrate", v.bitrate_kbps);
    set_nick(enc, "tune", "zerolatency");
    set_nick(enc, "speed-preset", plan.encoder.x264_speed.as_str());
    // Keyframes come from the keyframe clock; x264's own GOP limit is only a safety net, and scene cuts would
    // give renditions different keyframes.
    enc.set_property("key-int-max", (2 * seg_frames) as u32);
    enc.set_property("option-string", "scenecut=0");
}

/// Sets an NVENC property only when this element has it (the old `nvh264enc` and the newer `nvcudah264enc` /
/// `nvautogpuh264enc` differ), from a string so the value is parsed against the property's own type.
fn set_if_present(enc: &gst::Element, prop: &str, value: &str) -> bool {
    if enc.find_property(prop).is_none() {
        return false;
    }
    enc.set_property_from_str(prop, value);
    true
}

/// NVENC for live: CBR at the rendition's bitrate, no B-frames, low-latency, keyframes only from kiln's clock.
/// Untested on hardware here: no lent GPU has NVENC (README).
fn configure_nvenc(
    enc: &gst::Element,
    plan: &StreamPlan,
    v: &VideoRendition,
    seg_frames: u64,
    cuda_device_id: Option<u32>,
) -> Result<(), MediaError> {
    if let Some(id) = cuda_device_id {
        if !set_if_present(enc, "cuda-device-id", &id.to_string()) {
            return Err(MediaError::Build(format!(
                "{} has no cuda-device-id property to pin GPU {id}",
                enc.name()
            )));
        }
    }
    set_if_present(enc, "bitrate", &v.bitrate_kbps.to_string());
    set_if_present(enc, "rc-mode", "cbr");
    set_if_present(enc, "bframes", "0");
    set_if_present(enc, "zerolatency", "true");
    set_if_present(enc, "gop-size", &(2 * seg_frames).to_string());
    let preset = format!("p{}", plan.encoder.nvenc_preset);
    let has_p = enc.find_property("preset").is_some_and(|p| {
        p.downcast_ref::<gst::glib::ParamSpecEnum>()
            .is_some_and(|e| e.enum_class().value_by_nick(&preset).is_some())
    });
    if has_p {
        enc.set_property_from_str("preset", &preset);
    } else {
        set_if_present(enc, "preset", "low-latency-hq");
    }
    Ok(())
}

/// Test-only fault: after `after` frames the encoder posts an error and stops passing data, like an NVENC
/// session that dies mid-stream.
#[cfg(feature = "fault-injection")]
fn inject_encoder_fault(enc: &gst::Element, after: u64) {
    let count = std::sync::atomic::AtomicU64::new(0);
    let weak = enc.downgrade();
    if let Some(pad) = enc.static_pad("src") {
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < after {
                return gst::PadProbeReturn::Ok;
            }
            if n == after {
                if let Some(e) = weak.upgrade() {
                    gst::element_error!(
                        e,
                        gst::StreamError::Encode,
                        ["injected encoder fault after {} frames", after]
                    );
                }
            }
            gst::PadProbeReturn::Drop
        });
    }
}

/// audioconvert → audioresample → caps → AAC → aacparse → [splitter] → cmafmux → appsink; returns the head.
fn build_audio_branch(
    pipeline: &gst::Pipeline,
    plan: &StreamPlan,
    index: usize,
    a: &AudioRendition,
    sink: EventSink,
) -> Result<gst::Element, MediaError> {
    let n = &a.name;
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
        &[&conv, &res, &caps, &enc, &parse, &mux, &appsink],
    )?;
    let mut splitter = AudioSplitter::new(
        plan.timing.segment_ns(),
        plan.timing.audio_frames_per_part(a.sample_rate),
    );
    add_split_probe(
        &parse.static_pad("src").expect("aacparse has a src pad"),
        move |rt, _| splitter.on_frame(rt),
    );
    Ok(conv)
}

/// A live sine tone into the audio branch.
fn build_test_audio_source(
    pipeline: &gst::Pipeline,
    audio_in: &gst::Element,
) -> Result<(), MediaError> {
    let src = make("audiotestsrc", "asrc")?;
    src.set_property("is-live", true);
    src.set_property("volume", 0.1f64);
    src.set_property("freq", 440.0f64);
    src.set_property("samplesperbuffer", 1024i32);
    pipeline.add(&src)?;
    src.link(audio_in)
        .map_err(|e| MediaError::Build(format!("linking the test tone: {e}")))?;
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
