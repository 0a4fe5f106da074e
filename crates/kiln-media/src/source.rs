//! Encoded sources (files, URLs) in a pipeline of their own.
//!
//! ```text
//! source pipeline:  filesrc | urisourcebin → parsebin ─┬ queue → decoder (selection table) → videoconvert → appsink
//!                                                      └ queue → decodebin → audioconvert → appsink
//! stream pipeline:  appsrc → clocksync (pacing) → tee / audio branch …
//! ```
//! The appsinks hand each decoded frame to the stream pipeline's appsrcs with its timestamp moved onto the
//! stream's timeline: running time in the source pipeline + an offset. The offset starts at "now" on a continued
//! timeline (a rebuild) and, for a looping file, grows by the loop's length each time the file ends; the source
//! pipeline then seeks back to 0 with a flush that stays inside it. The stream pipeline sees one segment, no
//! flush and no EOS until a URL source really ends. Back-pressure: the appsrcs block when full, so the source
//! runs only as fast as the pacers let frames through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use gst::prelude::*;
use kiln_model::{Source, StreamPlan};

use crate::elements::{make, make_dyn};
use crate::select::{InputCodec, Registry};
use crate::{EventSink, MediaError, MediaEvent};

/// The source pipeline and the stream pipeline's entry points.
#[derive(Debug)]
pub(crate) struct EncodedSource {
    pipeline: gst::Pipeline,
    state: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    looping: bool,
    /// Added to every frame's running time.
    offset_ns: AtomicU64,
    /// End of the current loop (running time in the source pipeline, before the offset).
    loop_end_ns: AtomicU64,
    video_out: Option<gst_app::AppSrc>,
    audio_out: Option<gst_app::AppSrc>,
    /// (video linked, audio linked)
    linked: Mutex<(bool, bool)>,
}

fn appsrc(name: &str) -> gst_app::AppSrc {
    gst_app::AppSrc::builder()
        .name(name)
        .format(gst::Format::Time)
        .is_live(false)
        .block(true)
        .max_buffers(4)
        .build()
}

impl EncodedSource {
    /// Builds the source pipeline and, in the stream pipeline, appsrc → clocksync into `tee` (video) and
    /// `audio_in` (audio) where the plan has them.
    // Long by design: one linear element graph per source kind (test, file, URL) with its pad-linking callbacks.
    pub(crate) fn build(
        stream: &gst::Pipeline,
        plan: &StreamPlan,
        opts: &crate::BuildOptions,
        tee: Option<&gst::Element>,
        audio_in: Option<&gst::Element>,
        sink: EventSink,
    ) -> Result<Self, MediaError> {
        let entry =
            |name: &str, pace: &str, next: &gst::Element| -> Result<gst_app::AppSrc, MediaError> {
                let src = appsrc(name);
                let clocksync = make("clocksync", pace)?;
                stream.add_many([src.upcast_ref::<gst::Element>(), &clocksync])?;
                gst::Element::link_many([src.upcast_ref::<gst::Element>(), &clocksync, next])
                    .map_err(|e| MediaError::Build(format!("linking {name}: {e}")))?;
                Ok(src)
            };
        let video_out = tee.map(|t| entry("vin", "vpace", t)).transpose()?;
        let audio_out = audio_in.map(|a| entry("ain", "apace", a)).transpose()?;

        let registry = opts.registry.clone();
        let decode_gpu = opts.decode_gpu;
        let file = opts.file.as_deref();
        let pipeline = gst::Pipeline::with_name(&format!("kiln-{}-source", plan.id));
        let src = match &plan.source {
            Source::File { .. } => {
                let path = file.ok_or_else(|| {
                    MediaError::Build("a file source needs its resolved path".into())
                })?;
                let f = make("filesrc", "fsrc")?;
                f.set_property("location", path.to_string_lossy().to_string());
                f
            }
            Source::Url { url, .. } => {
                let u = make("urisourcebin", "usrc")?;
                u.set_property("uri", url);
                u
            }
            Source::Test { .. } => {
                return Err(MediaError::Build("a test source is not encoded".into()))
            }
        };
        let parse = make("parsebin", "parse")?;
        pipeline.add_many([&src, &parse])?;
        if src.static_pad("src").is_some() {
            src.link(&parse)
                .map_err(|e| MediaError::Build(format!("linking the source: {e}")))?;
        } else {
            let parse_weak = parse.downgrade();
            src.connect_pad_added(move |_, pad| {
                if let Some(sinkpad) = parse_weak.upgrade().and_then(|p| p.static_pad("sink")) {
                    if !sinkpad.is_linked() {
                        let _ = pad.link(&sinkpad);
                    }
                }
            });
        }
        let state = Arc::new(Shared {
            looping: matches!(plan.source, Source::File { .. }),
            offset_ns: AtomicU64::new(0),
            loop_end_ns: AtomicU64::new(0),
            video_out,
            audio_out,
            linked: Mutex::new((false, false)),
        });

        let weak = pipeline.downgrade();
        let st = state.clone();
        let err_sink = sink.clone();
        parse.connect_pad_added(move |_, pad| {
            let Some(pipeline) = weak.upgrade() else {
                return;
            };
            let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
            let name = caps
                .structure(0)
                .map(|s| s.name().to_string())
                .unwrap_or_default();
            let result = if name.starts_with("video/") {
                let Some(out) = st.video_out.clone() else {
                    return; // audio-only stream: the source's video is not used
                };
                {
                    let mut l = st.linked.lock();
                    if l.0 {
                        return; // a second video stream is ignored
                    }
                    l.0 = true;
                }
                link_video(
                    &pipeline,
                    pad,
                    &name,
                    &registry,
                    decode_gpu,
                    out,
                    st.clone(),
                )
            } else if name.starts_with("audio/") {
                let Some(out) = st.audio_out.clone() else {
                    return;
                };
                {
                    let mut l = st.linked.lock();
                    if l.1 {
                        return;
                    }
                    l.1 = true;
                }
                link_audio(&pipeline, pad, out, st.clone())
            } else {
                Ok(())
            };
            if let Err(e) = result {
                err_sink(MediaEvent::Error {
                    element: Some(pad.path_string().to_string()),
                    message: e.to_string(),
                    debug: None,
                });
            }
        });
        let st = state.clone();
        let no_more_sink = sink.clone();
        parse.connect_no_more_pads(move |p| {
            let l = st.linked.lock();
            let missing = match (st.video_out.is_some() && !l.0, st.audio_out.is_some() && !l.1) {
                (true, _) => Some("the source has no video stream kiln can decode"),
                (false, true) => Some(
                    "the source has no audio stream: request `\"audio\": {\"enabled\": false}` for a video-only stream",
                ),
                _ => None,
            };
            if let Some(m) = missing {
                no_more_sink(MediaEvent::Error {
                    element: Some(p.path_string().to_string()),
                    message: m.to_string(),
                    debug: None,
                });
            }
        });

        // The source pipeline's own bus: errors go to the stream; its end loops the file or ends the stream.
        let st = state.clone();
        let weak = pipeline.downgrade();
        pipeline
            .bus()
            .expect("a pipeline has a bus")
            .set_sync_handler(move |_, msg| {
                use gst::MessageView;
                match msg.view() {
                    MessageView::Error(e) => sink(MediaEvent::Error {
                        element: msg.src().map(|s| s.path_string().to_string()),
                        message: e.error().to_string(),
                        debug: e.debug().map(|d| d.to_string()),
                    }),
                    MessageView::Eos(_) if st.looping => {
                        let end = st.loop_end_ns.swap(0, Ordering::SeqCst);
                        st.offset_ns.fetch_add(end, Ordering::SeqCst);
                        if let Some(p) = weak.upgrade() {
                            p.call_async(|p| {
                                if p.seek_simple(
                                    gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                                    gst::ClockTime::ZERO,
                                )
                                .is_err()
                                {
                                    tracing::warn!(
                                        "looping the file source: the seek to 0 was refused"
                                    );
                                }
                            });
                        }
                    }
                    MessageView::Eos(_) => {
                        for out in st.video_out.iter().chain(st.audio_out.iter()) {
                            let _ = out.end_of_stream();
                        }
                    }
                    _ => {}
                }
                gst::BusSyncReply::Drop
            });
        Ok(Self { pipeline, state })
    }

    /// Starts the source; frames get `offset_ns` added (0 for a new stream, "now" on a continued timeline).
    pub(crate) fn start(&self, offset_ns: u64) -> Result<(), MediaError> {
        self.state.offset_ns.store(offset_ns, Ordering::SeqCst);
        self.pipeline
            .set_state(gst::State::Playing)
            .map(|_| ())
            .map_err(|e| MediaError::Start(format!("the source pipeline: {e}")))
    }

    pub(crate) fn stop(&self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// appsink → the stream pipeline's appsrc, moving each frame onto the stream's timeline.
fn bridge(name: &str, out: gst_app::AppSrc, state: Arc<Shared>) -> gst::Element {
    let appsink = gst_app::AppSink::builder().name(name).sync(false).build();
    let caps_set = std::sync::atomic::AtomicBool::new(false);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(caps) = sample.caps() {
                    if !caps_set.swap(true, Ordering::SeqCst)
                        || out.caps().as_ref() != Some(&caps.to_owned())
                    {
                        out.set_caps(Some(&caps.to_owned()));
                    }
                }
                let Some(buf) = sample.buffer_owned() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let seg = sample
                    .segment()
                    .and_then(|s| s.downcast_ref::<gst::ClockTime>().cloned());
                let rt = buf
                    .pts()
                    .and_then(|p| seg.as_ref().and_then(|s| s.to_running_time(p)));
                let Some(rt) = rt else {
                    return Ok(gst::FlowSuccess::Ok); // outside the segment
                };
                let end = rt.nseconds() + buf.duration().map_or(0, |d| d.nseconds());
                state.loop_end_ns.fetch_max(end, Ordering::SeqCst);
                let mut buf = buf;
                {
                    let b = buf.make_mut();
                    b.set_pts(gst::ClockTime::from_nseconds(
                        rt.nseconds() + state.offset_ns.load(Ordering::SeqCst),
                    ));
                    b.set_dts(gst::ClockTime::NONE);
                }
                out.push_buffer(buf).map(|_| gst::FlowSuccess::Ok)
            })
            .build(),
    );
    appsink.upcast()
}

fn add_chain(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    chain: &[gst::Element],
) -> Result<(), MediaError> {
    let refs: Vec<&gst::Element> = chain.iter().collect();
    pipeline.add_many(refs.iter().copied())?;
    gst::Element::link_many(refs.iter().copied())
        .map_err(|e| MediaError::Build(format!("linking the source chain: {e}")))?;
    for e in chain.iter().rev() {
        e.sync_state_with_parent()?;
    }
    let head = chain[0]
        .static_pad("sink")
        .expect("the chain head has a sink pad");
    pad.link(&head)
        .map_err(|e| MediaError::Build(format!("linking the parsed stream: {e:?}")))?;
    Ok(())
}

fn link_video(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    caps_name: &str,
    registry: &Registry,
    decode_gpu: Option<u32>,
    out: gst_app::AppSrc,
    state: Arc<Shared>,
) -> Result<(), MediaError> {
    let codec = InputCodec::from_caps_name(caps_name).ok_or_else(|| {
        MediaError::Build(format!(
            "the source's video codec `{caps_name}` is not supported"
        ))
    })?;
    let dec = registry
        .decoder(codec, decode_gpu)
        .map_err(|e| MediaError::Build(e.to_string()))?;
    tracing::info!(decoder = %dec.factory, gpu = dec.gpu, "video decoder chosen");
    let chain = vec![
        make("queue", "vdec-q")?,
        make_dyn(&dec.factory, "vdec")?,
        make("videoconvert", "vdec-convert")?,
        bridge("vout", out, state),
    ];
    add_chain(pipeline, pad, &chain)
}

fn link_audio(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    out: gst_app::AppSrc,
    state: Arc<Shared>,
) -> Result<(), MediaError> {
    let q = make("queue", "adec-q")?;
    let dec = make("decodebin", "adec")?;
    let conv = make("audioconvert", "adec-convert")?;
    let appsink = bridge("aout", out, state);
    pipeline.add_many([&q, &dec, &conv, &appsink])?;
    q.link(&dec)
        .map_err(|e| MediaError::Build(format!("linking the audio decoder: {e}")))?;
    conv.link(&appsink)
        .map_err(|e| MediaError::Build(format!("linking the audio output: {e}")))?;
    let conv_weak = conv.downgrade();
    dec.connect_pad_added(move |_, p| {
        if let Some(sinkpad) = conv_weak.upgrade().and_then(|c| c.static_pad("sink")) {
            if !sinkpad.is_linked() {
                let _ = p.link(&sinkpad);
            }
        }
    });
    for e in [&appsink, &conv, &dec, &q] {
        e.sync_state_with_parent()?;
    }
    pad.link(&q.static_pad("sink").expect("queue has a sink pad"))
        .map_err(|e| MediaError::Build(format!("linking the parsed audio: {e:?}")))?;
    Ok(())
}
