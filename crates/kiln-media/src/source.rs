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
use kiln_model::source::{Host, SrtMode};
use kiln_model::{Source, StreamPlan};

use crate::elements::{make, make_dyn};
use crate::select::{InputCodec, Registry};
use crate::{EventSink, MediaError, MediaEvent};

/// The source pipeline and the stream pipeline's entry points.
#[derive(Debug)]
pub(crate) struct EncodedSource {
    pipeline: gst::Pipeline,
    state: Arc<Shared>,
    /// An `http(s)` source's appsrc and the feed that fills it (started with the pipeline).
    feed: Option<Feed>,
}

/// An `http(s)` source's appsrc, its feed, and where a read error goes.
#[derive(Clone)]
struct Feed(gst_app::AppSrc, ByteFeed, EventSink);

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Feed")
    }
}

/// Opens the bytes of a source the daemon reads itself (the body of an `http(s)://` source, a publisher's FLV or
/// MPEG-TS): called each time a source pipeline starts, on a thread of its own that pushes what it reads into the
/// pipeline. A read error ends the stream with that error; the end of the bytes ends the stream.
#[derive(Clone)]
pub struct ByteFeed(
    pub Arc<dyn Fn() -> std::io::Result<Box<dyn std::io::Read + Send>> + Send + Sync>,
);

impl std::fmt::Debug for ByteFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ByteFeed")
    }
}

/// Media types that are playlists, not media: an adaptive demuxer would fetch every URL they name with its own
/// HTTP client, past the daemon's address policy. Refused wherever they turn up (a file, an HTTP body).
pub(crate) const PLAYLIST_CAPS: [&str; 3] = [
    "application/x-hls",
    "application/dash+xml",
    "application/vnd.ms-sstr+xml",
];

/// Stops `bin` (a parsebin or decodebin) from plugging an adaptive demuxer: a playlist's caps end autoplugging
/// and are reported as an error through `sink`.
pub(crate) fn refuse_playlists(bin: &gst::Element, sink: EventSink) {
    bin.connect("autoplug-continue", false, move |args| {
        let caps = args.get(2).and_then(|v| v.get::<gst::Caps>().ok());
        let name = caps
            .as_ref()
            .and_then(|c| c.structure(0))
            .map(|s| s.name().to_string())
            .unwrap_or_default();
        if PLAYLIST_CAPS.contains(&name.as_str()) {
            sink(MediaEvent::Error {
                element: None,
                message: format!(
                    "the source is a playlist ({name}), not media: kiln ingests media streams (SRT, RTSP, \
                     progressive HTTP, files), not HLS/DASH pulls"
                ),
                debug: None,
            });
            return Some(false.to_value());
        }
        Some(true.to_value())
    });
}

/// The element that reads the source, with its properties set from the typed source (never from its string).
fn source_element(
    plan: &StreamPlan,
    opts: &crate::BuildOptions,
) -> Result<(gst::Element, Option<ByteFeed>), MediaError> {
    let pinned = |host: &Host| -> Result<String, MediaError> {
        match (opts.source_addr, host) {
            (Some(ip), _) | (None, &Host::Ip(ip)) => Ok(Host::Ip(ip).to_string()),
            (None, Host::Name(n)) => Err(MediaError::Build(format!(
                "the daemon did not resolve the source host {n}"
            ))),
        }
    };
    Ok(match &plan.source {
        Source::File { .. } => {
            let path = opts
                .file
                .as_deref()
                .ok_or_else(|| MediaError::Build("a file source needs its resolved path".into()))?;
            let f = make("filesrc", "fsrc")?;
            f.set_property("location", path.to_string_lossy().to_string());
            (f, None)
        }
        Source::Srt(srt) => (srt_element(srt, pinned)?, None),
        Source::Rtsp(r) => {
            let e = make("rtspsrc", "rtspsrc")?;
            // rtsps keeps the name: the server's certificate is checked against it.
            let host = if r.tls {
                r.host.to_string()
            } else {
                pinned(&r.host)?
            };
            let scheme = if r.tls { "rtsps" } else { "rtsp" };
            e.set_property(
                "location",
                format!("{scheme}://{host}:{}{}", r.port, r.path),
            );
            if let Some(u) = &r.user {
                e.set_property("user-id", u);
            }
            if let Some(p) = &r.password {
                e.set_property("user-pw", p);
            }
            (e, None)
        }
        Source::Http(_) | Source::Publish => {
            let feed = opts.byte_feed.clone().ok_or_else(|| {
                MediaError::Build("an HTTP or publish source needs the daemon's byte feed".into())
            })?;
            let src = gst_app::AppSrc::builder()
                .name("hsrc")
                .format(gst::Format::Bytes)
                .stream_type(gst_app::AppStreamType::Stream)
                .is_live(true)
                .block(true)
                .max_bytes(2 << 20)
                .build();
            (src.upcast(), Some(feed))
        }
        Source::Test { .. } => {
            return Err(MediaError::Build("a test source is not encoded".into()))
        }
    })
}

/// `srtsrc` with every property from the typed source: a caller connects to `pinned(host)`.
fn srt_element(
    srt: &kiln_model::SrtSource,
    pinned: impl Fn(&Host) -> Result<String, MediaError>,
) -> Result<gst::Element, MediaError> {
    let e = make("srtsrc", "srtsrc")?;
    match srt.mode {
        SrtMode::Caller => {
            let host = srt
                .host
                .as_ref()
                .ok_or_else(|| MediaError::Build("an SRT caller needs a host".into()))?;
            e.set_property("uri", format!("srt://{}:{}", pinned(host)?, srt.port));
            e.set_property_from_str("mode", "caller");
        }
        SrtMode::Listener => {
            let bind = match &srt.host {
                Some(Host::Ip(ip)) => ip.to_string(),
                _ => "0.0.0.0".to_string(),
            };
            e.set_property_from_str("mode", "listener");
            e.set_property("localaddress", bind);
            e.set_property("localport", u32::from(srt.port));
        }
    }
    if let Some(id) = &srt.stream_id {
        e.set_property("streamid", id);
    }
    if let Some(p) = &srt.passphrase {
        e.set_property("passphrase", p);
    }
    if let Some(k) = srt.key_length {
        e.set_property_from_str("pbkeylen", &k.to_string());
    }
    if let Some(ms) = srt.latency_ms {
        e.set_property("latency", ms as i32);
    }
    Ok(e)
}

/// Reads the feed into the appsrc until the body ends, the read fails or the pipeline stops.
fn pump(src: gst_app::AppSrc, feed: ByteFeed, sink: EventSink) {
    let fail = |message: String| {
        sink(MediaEvent::Error {
            element: Some("hsrc".into()),
            message,
            debug: None,
        })
    };
    let mut reader = match (feed.0)() {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                let _ = src.end_of_stream();
                return;
            }
            Ok(n) => {
                if src
                    .push_buffer(gst::Buffer::from_slice(buf[..n].to_vec()))
                    .is_err()
                {
                    return; // stopped
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return fail(e.to_string()),
        }
    }
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
        let size_limit = opts.size_limit;
        let pipeline = gst::Pipeline::with_name(&format!("kiln-{}-source", plan.id));
        let (src, feed) = source_element(plan, opts)?;
        let parse = make("parsebin", "parse")?;
        refuse_playlists(&parse, sink.clone());
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
        let feed = feed.and_then(|f| {
            Some(Feed(
                src.clone().downcast::<gst_app::AppSrc>().ok()?,
                f,
                sink.clone(),
            ))
        });
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
                    size_limit,
                    &err_sink,
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
        Ok(Self {
            pipeline,
            state,
            feed,
        })
    }

    /// Starts the source; frames get `offset_ns` added (0 for a new stream, "now" on a continued timeline).
    pub(crate) fn start(&self, offset_ns: u64) -> Result<(), MediaError> {
        self.state.offset_ns.store(offset_ns, Ordering::SeqCst);
        self.pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| MediaError::Start(format!("the source pipeline: {e}")))?;
        if let Some(Feed(src, feed, sink)) = self.feed.clone() {
            std::thread::Builder::new()
                .name("kiln-byte-feed".into())
                .spawn(move || pump(src, feed, sink))
                .map_err(|e| MediaError::Start(format!("the HTTP feed thread: {e}")))?;
        }
        Ok(())
    }

    pub(crate) fn stop(&self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// appsink → the stream pipeline's appsrc, moving each frame onto the stream's timeline.
fn bridge(name: &str, out: gst_app::AppSrc, state: Arc<Shared>) -> gst::Element {
    // async=false: this sink is added while the source pipeline is already playing. An async sink would take the
    // pipeline back to PAUSED until it prerolls, and a live source (SRT, RTSP) produces nothing in PAUSED: the
    // stream would wait forever for its first frame.
    let appsink = gst_app::AppSink::builder().name(name).sync(false).build();
    appsink.set_property("async", false);
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

/// Refuses parsed video larger than `limit` (the publisher's picture is checked before it is decoded, at the
/// first caps and at every change): the caps event is dropped and the stream gets an error that names both
/// sizes, so nothing is decoded past the size admission booked.
fn guard_size(pad: &gst::Pad, limit: SizeLimit, sink: &EventSink) -> Result<(), MediaError> {
    let check = move |caps: &gst::CapsRef| -> Result<(), String> {
        let Some(s) = caps.structure(0) else {
            return Ok(());
        };
        let (Ok(w), Ok(h)) = (s.get::<i32>("width"), s.get::<i32>("height")) else {
            return Ok(());
        };
        limit.check(w.max(0) as u32, h.max(0) as u32)
    };
    if let Some(caps) = pad.current_caps() {
        check(&caps).map_err(MediaError::Build)?;
    }
    let sink = sink.clone();
    // once refused, nothing more passes (not even the buffers of the refused caps) until the stream is torn down
    let refused = std::sync::atomic::AtomicBool::new(false);
    let mask = gst::PadProbeType::EVENT_DOWNSTREAM | gst::PadProbeType::BUFFER;
    pad.add_probe(mask, move |_, info| {
        if refused.load(Ordering::SeqCst) {
            return gst::PadProbeReturn::Drop;
        }
        let Some(gst::PadProbeData::Event(ev)) = &info.data else {
            return gst::PadProbeReturn::Ok;
        };
        let gst::EventView::Caps(c) = ev.view() else {
            return gst::PadProbeReturn::Ok;
        };
        match check(c.caps()) {
            Ok(()) => gst::PadProbeReturn::Ok,
            Err(message) => {
                refused.store(true, Ordering::SeqCst);
                sink(MediaEvent::Error {
                    element: Some("vdec".into()),
                    message,
                    debug: None,
                });
                gst::PadProbeReturn::Drop
            }
        }
    });
    Ok(())
}

/// The largest source picture a stream may decode, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimit {
    /// Pixels per frame admission booked the decode for.
    pub booked_pixels: u64,
    /// The daemon's limits on either side (`--ingest-max-width/-height`).
    pub max_width: u32,
    pub max_height: u32,
}

impl SizeLimit {
    /// The limit for a decode booked at `width`×`height`: a picture up to that size rounded up to whole
    /// macroblocks (what the SPS declares as coded size for, e.g., 1080 lines is 1088).
    pub fn for_booking(width: u32, height: u32, max_width: u32, max_height: u32) -> Self {
        let align = |v: u32| u64::from(v.div_ceil(16) * 16);
        Self {
            booked_pixels: align(width) * align(height),
            max_width,
            max_height,
        }
    }

    /// `Err` names the picture and the limit it breaks.
    pub fn check(&self, w: u32, h: u32) -> Result<(), String> {
        if w > self.max_width.div_ceil(16) * 16 || h > self.max_height.div_ceil(16) * 16 {
            return Err(format!(
                "the source picture is {w}x{h}, over this daemon's ingest limit of {}x{}",
                self.max_width, self.max_height
            ));
        }
        if u64::from(w) * u64::from(h) > self.booked_pixels {
            return Err(format!(
                "the source picture is {w}x{h} ({} pixels), larger than the {} pixels this stream's decode was \
                 booked for (its largest rendition): publish at most that size, or create the stream with a \
                 larger ladder",
                u64::from(w) * u64::from(h),
                self.booked_pixels
            ));
        }
        Ok(())
    }
}

// Long by design: the decode chain in one list, after the two refusals (codec, size) that must come first.
#[allow(clippy::too_many_arguments)]
fn link_video(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    caps_name: &str,
    registry: &Registry,
    decode_gpu: Option<u32>,
    out: gst_app::AppSrc,
    state: Arc<Shared>,
    limit: Option<SizeLimit>,
    sink: &EventSink,
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
    if let Some(limit) = limit {
        guard_size(pad, limit, sink)?;
    }
    let chain = vec![
        make("queue", "vdec-q")?,
        make_dyn(&dec.factory, "vdec")?,
        make("videoconvert", "vdec-convert")?,
        // 8-bit 4:2:0, whatever the source decodes to (10-bit, 4:4:4, RGB): the ladder's scalers and encoders
        // take these, and the renditions are 8-bit 4:2:0 anyway
        crate::elements::capsfilter(
            "vdec-format",
            gst::Caps::builder("video/x-raw")
                .field("format", gst::List::new(["I420", "NV12"]))
                .build(),
        )?,
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
