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
    marks: Option<crate::chunks::Marks>,
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
    let mut asm = ChunkAssembler::new(index, sink.clone(), marks);
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
    /// The source's cuts on the stream's timeline, with a passthrough rendition (keyframes on its IDRs, segments
    /// and discontinuities at switch points).
    pub keys: Option<Arc<crate::source::SourceKeys>>,
    /// Where this rendition's access units fill in for the source's (the top rendition of a stream with a
    /// passthrough rendition).
    pub fill: Option<FillSlot>,
}

/// The stream's entry, once built: the top encoded rendition hands it its access units
/// ([`crate::source::Entry::push_fill`]).
pub(super) type FillSlot = Arc<Mutex<Option<std::sync::Weak<crate::source::Entry>>>>;

/// Hands every access unit leaving `pad` to the entry in `slot` (it feeds the passthrough rendition while the
/// source's bitstream cannot).
fn tap_fill(pad: &gst::Pad, slot: FillSlot, tolerance_ns: u64) {
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let entry = slot.lock().as_ref().and_then(|w| w.upgrade());
        let (Some(entry), Some(buf)) = (entry, info.buffer()) else {
            return gst::PadProbeReturn::Ok;
        };
        // on the stream's timeline: running time (the encoder's own timestamps are shifted, x264enc's by 1000 h)
        let Some(seg) = pad
            .sticky_event::<gst::event::Segment>(0)
            .and_then(|e| e.segment().downcast_ref::<gst::ClockTime>().cloned())
        else {
            return gst::PadProbeReturn::Ok;
        };
        let rt = |t: Option<gst::ClockTime>| t.and_then(|t| seg.to_running_time(t));
        let (pts, dts) = (rt(buf.pts()), rt(buf.dts()));
        let mut au = buf.to_owned();
        {
            let b = au.make_mut();
            b.set_pts(pts);
            b.set_dts(dts.or(pts));
        }
        entry.push_fill(&au, pad.current_caps().as_deref(), tolerance_ns);
        gst::PadProbeReturn::Ok
    });
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
    let enc = build_encoder(plan, opts, &branch, v)?;
    let parse = make("h264parse", &format!("parse-{n}"))?;
    let pcaps = capsfilter(
        &format!("pcaps-{n}"),
        gst::Caps::builder("video/x-h264")
            .field("stream-format", "avc")
            .field("alignment", "au")
            .build(),
    )?;
    let part_ns = plan.timing.video_part_ns(v.fps);
    let half_frame = kiln_model::stream::frames_to_ns(1, v.fps) / 2;
    let marks = branch
        .keys
        .clone()
        .map(|k| crate::chunks::Marks::new(k, half_frame + 1_000_000));
    let (mux, appsink) = build_mux_sink(plan, index, n, part_ns, sink, marks)?;
    // the keyframe probe sits on the pad that feeds the encoder
    let before_enc = chain.last().expect("non-empty").clone();
    chain.extend([enc, parse, pcaps.clone(), mux, appsink]);
    let refs: Vec<&gst::Element> = chain.iter().collect();
    add_link(pipeline, &refs)?;
    tee.link(&chain[0])
        .map_err(|e| MediaError::Build(format!("linking tee → {n}: {e}")))?;
    let keys = branch.keys;
    add_keyframe_probe(
        &before_enc.static_pad("src").expect("has a src pad"),
        plan.timing.segment_ns(),
        keys.clone().map(|k| (k, v.fps)),
    );
    let out = pcaps.static_pad("src").expect("capsfilter has a src pad");
    if let Some(fill) = branch.fill {
        tap_fill(&out, fill, half_frame + 1_000_000);
    }
    let splitter = VideoSplitter::new(plan.timing.segment_ns(), part_ns);
    add_split_probe(&out, video_cuts(splitter, keys, half_frame, false));
    Ok(())
}

/// The rendition's encoder (x264 or NVENC), configured for its rate and the stream's keyframe policy.
fn build_encoder(
    plan: &StreamPlan,
    opts: &BuildOptions,
    branch: &VideoBranch,
    v: &VideoRendition,
) -> Result<gst::Element, MediaError> {
    let sel = &opts.selection;
    let enc = make_dyn(&sel.encoder.factory, &format!("enc-{}", v.name))?;
    // With a passthrough rendition keyframes come only where a cut was decided (the source's IDRs, switch
    // points): the encoder's own GOP limit, a safety net, must not add one within the longest source GOP.
    let seg_ms = if branch.keys.is_some() {
        30_000
    } else {
        plan.timing.segment_ms as u64
    };
    let seg_frames = (seg_ms * v.fps.num as u64)
        .div_ceil(1000 * v.fps.den as u64)
        .max(1);
    match sel.backend {
        Backend::Cpu => configure_x264(&enc, plan, v, seg_frames),
        Backend::Nvenc { .. } => {
            configure_nvenc(&enc, plan, v, seg_frames, sel.encoder.cuda_device_id)?
        }
    }
    #[cfg(feature = "fault-injection")]
    if branch.index == 0 {
        if let Some(after) = opts.fail_encoder_after_frames {
            inject_encoder_fault(&enc, after);
        }
    }
    Ok(enc)
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
    keys: Arc<crate::source::SourceKeys>,
) -> Result<gst::Element, MediaError> {
    let fallback_fps = plan.source_fps();
    let part_ns = plan.timing.video_part_ns(fallback_fps);
    // the muxers this rendition goes through share what they marked
    let marks = crate::chunks::Marks::new(
        keys.clone(),
        kiln_model::stream::frames_to_ns(1, fallback_fps) / 2 + 1_000_000,
    );
    let (mux, appsink) = build_mux_sink(
        plan,
        index,
        name,
        part_ns,
        sink.clone(),
        Some(marks.clone()),
    )?;
    // the splitter's probe sits on the pad that feeds the muxer
    let head = make("identity", &format!("pass-{name}"))?;
    add_link(pipeline, &[&head, &mux, &appsink])?;
    let srcpad = head.static_pad("src").expect("identity has a src pad");
    // another bitstream: a muxer of its own (see `swap_muxer`); its first fragment starts by itself
    let fresh = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (plan2, name2, marks2, fresh2) =
        (plan.clone(), name.to_string(), marks.clone(), fresh.clone());
    let weak = pipeline.downgrade();
    let mut swaps = 0u32;
    swap_muxer(&srcpad, move || {
        swaps += 1;
        let p = weak.upgrade()?;
        let built = build_mux_sink(
            &plan2,
            index,
            &format!("{name2}-{swaps}"),
            part_ns,
            sink.clone(),
            Some(marks2.clone()),
        );
        let (mux, appsink) = built
            .inspect_err(|e| tracing::error!(error = %e, "no muxer for the new bitstream"))
            .ok()?;
        p.add_many([&mux, &appsink]).ok()?;
        mux.link(&appsink).ok()?;
        appsink.sync_state_with_parent().ok()?;
        mux.sync_state_with_parent().ok()?;
        fresh2.store(true, std::sync::atomic::Ordering::SeqCst);
        Some(mux)
    });
    add_split_probe(
        &srcpad,
        passthrough_cuts(srcpad.clone(), plan, fallback_fps, keys, fresh),
    );
    Ok(head)
}

/// The passthrough rendition's cuts: parts of whole frames of the source's rate (read from its caps at the first
/// access unit, else `fallback_fps`), segments on its IDRs ([`video_cuts`]); none before the first access unit a
/// new muxer gets (`fresh`: it opens its first fragment by itself).
fn passthrough_cuts(
    caps_pad: gst::Pad,
    plan: &StreamPlan,
    fallback_fps: kiln_model::Fraction,
    keys: Arc<crate::source::SourceKeys>,
    fresh: Arc<std::sync::atomic::AtomicBool>,
) -> impl FnMut(u64, bool) -> Option<Split> + Send + 'static {
    let segment_ns = plan.timing.segment_ns();
    let timing = plan.timing;
    let mut cuts: Option<Cuts> = None;
    move |rt, key| {
        let cut = cuts.get_or_insert_with(|| {
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
            let splitter = VideoSplitter::new(segment_ns, timing.video_part_ns(fps));
            let half_frame = kiln_model::stream::frames_to_ns(1, fps) / 2;
            Box::new(video_cuts(splitter, Some(keys.clone()), half_frame, true))
        });
        let split = cut(rt, key);
        // a new muxer opens its first fragment by itself
        if fresh.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        split
    }
}

/// cmafmux in manual-split mode cannot change codec parameters mid-stream (its drain on a caps change asserts that
/// a split is pending, and a split only takes effect at the next buffer, which comes after the caps). So when the
/// caps leaving `pad` change (the fill's bitstream, another publisher's), the muxer behind it is ended (EOS: it
/// drains its last part) and `next` builds another, which gets the new caps, writes a new init segment and starts
/// with a new fragment. The ended muxer and its sink are removed once their EOS has passed.
fn swap_muxer(pad: &gst::Pad, next: impl FnMut() -> Option<gst::Element> + Send + 'static) {
    let state = Mutex::new((None::<gst::Caps>, next));
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |pad, info| {
        let Some(gst::PadProbeData::Event(ev)) = &info.data else {
            return gst::PadProbeReturn::Ok;
        };
        let gst::EventView::Caps(c) = ev.view() else {
            return gst::PadProbeReturn::Ok;
        };
        let caps = c.caps_owned();
        let mut st = state.lock();
        let changed = st.0.as_ref().is_some_and(|l| *l != caps);
        st.0 = Some(caps);
        if !changed {
            return gst::PadProbeReturn::Ok;
        }
        let Some(old) = pad.peer() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(mux) = (st.1)() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(new) = mux.static_pad("sink") else {
            return gst::PadProbeReturn::Ok;
        };
        if pad.unlink(&old).is_err() || pad.link(&new).is_err() {
            tracing::error!("the passthrough rendition's muxer could not be replaced");
            return gst::PadProbeReturn::Ok;
        }
        retire_muxer(&old);
        // the caps event goes on to the new muxer (sticky events before it follow on the next push)
        gst::PadProbeReturn::Ok
    });
}

/// Ends the muxer whose sink pad is `old` (EOS: it drains its last part), and removes it and its appsink from the
/// pipeline once that EOS has reached the appsink.
fn retire_muxer(old: &gst::Pad) {
    let Some(mux) = old.parent_element() else {
        return;
    };
    let appsink = mux
        .static_pad("src")
        .and_then(|p| p.peer())
        .and_then(|p| p.parent_element());
    if let Some(sinkpad) = appsink.as_ref().and_then(|a| a.static_pad("sink")) {
        let (mux, appsink) = (mux.clone(), appsink.clone());
        sinkpad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
            let is_eos = matches!(&info.data, Some(gst::PadProbeData::Event(e)) if e.type_() == gst::EventType::Eos);
            if !is_eos {
                return gst::PadProbeReturn::Ok;
            }
            let (mux, appsink) = (mux.clone(), appsink.clone());
            // not on the streaming thread: setting an element to NULL waits for it
            let _ = std::thread::Builder::new()
                .name("kiln-mux-retire".into())
                .spawn(move || {
                    for e in [&mux].into_iter().chain(appsink.iter()) {
                        let _ = e.set_state(gst::State::Null);
                        if let Some(bin) = e.parent().and_then(|p| p.downcast::<gst::Bin>().ok()) {
                            let _ = bin.remove(e);
                        }
                    }
                });
            gst::PadProbeReturn::Drop
        });
    }
    old.send_event(gst::event::Eos::new());
}

/// audioconvert → audioresample → caps → AAC → aacparse → [splitter] → cmafmux → appsink; returns the head.
pub(super) fn build_audio_branch(
    pipeline: &gst::Pipeline,
    plan: &StreamPlan,
    index: usize,
    a: &AudioRendition,
    sink: EventSink,
    keys: Option<Arc<crate::source::SourceKeys>>,
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
    // audio marks a discontinuity on the segment it starts at each switch point (its first frame at or after)
    let marks = keys.clone().map(|k| crate::chunks::Marks::new(k, 0));
    let (mux, appsink) = build_mux_sink(plan, index, n, part_ns, sink, marks)?;
    add_link(
        pipeline,
        &[&conv, &res, &caps, &rate, &enc, &parse, &mux, &appsink],
    )?;
    let mut splitter = AudioSplitter::new(
        plan.timing.segment_ns(),
        plan.timing.audio_frames_per_part(a.sample_rate),
    );
    let mut handled = None;
    add_split_probe(
        &parse.static_pad("src").expect("aacparse has a src pad"),
        move |rt, _| {
            // every rendition starts a segment at a switch point: discontinuity sequence numbers must match
            if let Some(s) = keys.as_ref().and_then(|k| k.switch_due(handled, rt, 0)) {
                handled = Some(s);
                return splitter.force_segment(rt);
            }
            splitter.on_frame(rt)
        },
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
