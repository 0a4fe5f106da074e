//! The elements of a live pipeline, branch by branch: the test sources, each video rendition (scale → encoder →
//! parser → cmafmux → appsink) with its encoder settings (x264 or NVENC), and the audio rendition.

use super::*;

pub(super) fn video_caps(w: u32, h: u32, fps: kiln_model::Fraction) -> gst::Caps {
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
pub(super) fn build_test_video_source(
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
pub(super) fn build_mux_sink(
    plan: &StreamPlan,
    index: usize,
    name: &str,
    part_ns: u64,
    sink: EventSink,
) -> Result<(gst::Element, gst::Element), MediaError> {
    let mux = make("cmafmux", &format!("mux-{name}"))?;
    wait_for_data(&mux);
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

/// Tells `mux` that its input is not live, so it waits for data instead of for deadlines.
///
/// cmafmux is an aggregator. Told its input is live, it wakes at each deadline (the next buffer's running time
/// plus the pipeline latency) and, while no buffer has come, keeps waking at that same passed deadline without
/// sleeping. Input later than the latency is normal for a publisher or a pulled source: ffmpeg's MPEG-TS muxer
/// sends AAC in PES packets of up to ~0.4 s, so the audio trails the video it was captured with. An SRT publisher
/// cost 1.6 cores that way on the 2-core test machine (three spinning muxers), and starved the viewer's browser.
/// A muxer with one input has nothing to time out for: it only waits for the next buffer. The pipeline latency
/// that `clocksync` paces by is unchanged, as nothing downstream of a muxer syncs to the clock.
fn wait_for_data(mux: &gst::Element) {
    let not_live = |pad: &gst::Pad| {
        // PULL: the query on its way back, as the upstream peer answered it.
        pad.add_probe(
            gst::PadProbeType::QUERY_UPSTREAM | gst::PadProbeType::PULL,
            |_, info| {
                if let Some(gst::PadProbeData::Query(q)) = info.data.as_mut() {
                    if let gst::QueryViewMut::Latency(l) = q.view_mut() {
                        let (_, min, max) = l.result();
                        l.set(false, min, max);
                    }
                }
                gst::PadProbeReturn::Ok
            },
        );
    };
    // cmafmux has one always sink pad; a muxer that makes them on request gets the probe on each
    mux.sink_pads().iter().for_each(not_live);
    mux.connect_pad_added(move |_, pad| {
        if pad.direction() == gst::PadDirection::Sink {
            not_live(pad);
        }
    });
}

/// Which video rendition a branch is, and what gates its keyframes.
pub(super) struct VideoBranch {
    pub index: usize,
    /// The source's IDRs on the stream's timeline, with a passthrough rendition (keyframes only there).
    pub keys: Option<Arc<crate::source::SourceKeys>>,
}

pub(super) fn build_video_branch(
    pipeline: &gst::Pipeline,
    tee: &gst::Element,
    plan: &StreamPlan,
    opts: &BuildOptions,
    branch: VideoBranch,
    v: &VideoRendition,
    sink: EventSink,
) -> Result<(), MediaError> {
    let index = branch.index;
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
        branch.keys.map(|k| (k, v.fps)),
    );
    let mut splitter = VideoSplitter::new(plan.timing.segment_ns(), part_ns);
    add_split_probe(
        &pcaps.static_pad("src").expect("capsfilter has a src pad"),
        move |rt, key| splitter.on_frame(rt, key),
    );
    Ok(())
}

pub(super) fn configure_x264(
    enc: &gst::Element,
    plan: &StreamPlan,
    v: &VideoRendition,
    seg_frames: u64,
) {
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
pub(super) fn set_if_present(enc: &gst::Element, prop: &str, value: &str) -> bool {
    if enc.find_property(prop).is_none() {
        return false;
    }
    enc.set_property_from_str(prop, value);
    true
}

/// NVENC for live: CBR at the rendition's bitrate, no B-frames, low-latency, keyframes only from kiln's clock.
/// Untested on hardware here: no lent GPU has NVENC (README).
pub(super) fn configure_nvenc(
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
pub(super) fn inject_encoder_fault(enc: &gst::Element, after: u64) {
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

/// The passthrough rendition: (appsrc → clocksync, the entry's) → identity → [splitter] → cmafmux → appsink.
/// Returns its head, which the entry's pacer links to. Parts hold whole frames of the source's rate (read from its caps,
/// else the plan's); segments start at the source's IDRs (see `source::passthrough`).
pub(super) fn build_passthrough_branch(
    pipeline: &gst::Pipeline,
    plan: &StreamPlan,
    index: usize,
    name: &str,
    sink: EventSink,
) -> Result<gst::Element, MediaError> {
    let fallback_fps = plan.source_fps();
    let (mux, appsink) = build_mux_sink(
        plan,
        index,
        name,
        plan.timing.video_part_ns(fallback_fps),
        sink,
    )?;
    // the splitter's probe sits on the pad that feeds the muxer
    let head = make("identity", &format!("pass-{name}"))?;
    add_link(pipeline, &[&head, &mux, &appsink])?;
    let segment_ns = plan.timing.segment_ns();
    let timing = plan.timing;
    let mut splitter: Option<VideoSplitter> = None;
    let srcpad = head.static_pad("src").expect("identity has a src pad");
    let caps_pad = srcpad.clone();
    add_split_probe(&srcpad, move |rt, key| {
        let sp = splitter.get_or_insert_with(|| {
            let fps = caps_pad
                .current_caps()
                .and_then(|c| {
                    let f = c.structure(0)?.get::<gst::Fraction>("framerate").ok()?;
                    let fps = kiln_model::Fraction::new(
                        u32::try_from(f.numer()).ok()?,
                        u32::try_from(f.denom()).ok()?,
                    );
                    (fps.den > 0 && (1.0..=120.0).contains(&fps.as_f64())).then_some(fps)
                })
                .unwrap_or(fallback_fps);
            VideoSplitter::new(segment_ns, timing.video_part_ns(fps))
        });
        sp.on_frame(rt, key)
    });
    Ok(head)
}

/// audioconvert → audioresample → caps → AAC → aacparse → [splitter] → cmafmux → appsink; returns the head.
pub(super) fn build_audio_branch(
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
    // Whole audio from here on: a switch of inputs (a publisher lost or back, whose sound trails its picture by up
    // to ~0.4 s in MPEG-TS) leaves a gap or an overlap that audiorate fills with silence or trims.
    let rate = make("audiorate", &format!("arate-{n}"))?;
    // from the first sound on: a rebuilt pipeline's timeline starts long after its segment does
    rate.set_property("skip-to-first", true);
    let enc_factory = aac_encoder()?;
    let enc = make(enc_factory, &format!("aenc-{n}"))?;
    enc.set_property("bitrate", (a.bitrate_kbps * 1000) as i32);
    // Output timestamps count samples from the first input: a publisher's AAC arrives with millisecond (FLV) or
    // jittered timestamps, and tracking them would make each part's tfdt miss the previous part's end by a few
    // samples. A real gap (over the encoder's tolerance) still resyncs.
    enc.set_property("perfect-timestamp", true);
    let parse = make("aacparse", &format!("aparse-{n}"))?;
    let part_ns = plan.timing.audio_part_ns(a.sample_rate);
    let (mux, appsink) = build_mux_sink(plan, index, n, part_ns, sink)?;
    add_link(
        pipeline,
        &[&conv, &res, &caps, &rate, &enc, &parse, &mux, &appsink],
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
pub(super) fn build_test_audio_source(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// live source → cmafmux; the live flag the muxer's own latency query reports.
    fn mux_reports_live(wait: bool) -> bool {
        let pipeline = gst::Pipeline::new();
        let src = make("fakesrc", "src").unwrap();
        src.set_property("is-live", true);
        let mux = make("cmafmux", "mux").unwrap();
        if wait {
            wait_for_data(&mux);
        }
        pipeline.add_many([&src, &mux]).unwrap();
        // no caps check: nothing flows, only the latency query goes up
        let sink = mux.static_pad("sink").unwrap();
        let linked = src
            .static_pad("src")
            .unwrap()
            .link_full(&sink, gst::PadLinkCheck::empty());
        linked.unwrap();
        let mut q = gst::query::Latency::new();
        let answered = mux.static_pad("src").unwrap().query(&mut q);
        assert!(answered);
        q.result().0
    }

    #[test]
    fn a_muxer_waits_for_data_not_for_deadlines() {
        if crate::init().is_err() {
            eprintln!("skipping: GStreamer or kiln's plugins are missing");
            return;
        }
        // the control: told the truth, cmafmux would time out on a live input
        assert!(mux_reports_live(false));
        assert!(!mux_reports_live(true));
    }
}
