//! Encoded sources (files, URLs, publishers) in pipelines of their own, and the slate that stands in for a lost one.
//!
//! ```text
//! source pipeline:  filesrc | urisourcebin → parsebin ─┬ queue → decoder (selection table) → videoconvert → appsink
//!                                                      └ queue → decodebin → audioconvert → appsink
//! slate pipeline:   videotestsrc → textoverlay → appsink,  audiotestsrc (silence) → appsink
//! stream pipeline:  appsrc → clocksync (pacing) → tee / audio branch …     (the entry points, [`Entry`])
//! ```
//! The appsinks hand each decoded frame to the stream pipeline's appsrcs with its timestamp moved onto the
//! stream's timeline: running time in the input's pipeline + the input's offset. The first input's offset starts
//! at "now" on a continued timeline (a rebuild) and, for a looping file, grows by the loop's length each time the
//! file ends; the source pipeline then seeks back to 0 with a flush that stays inside it. The stream pipeline sees
//! one segment, no flush and no EOS until a URL source really ends. Back-pressure: the appsrcs block when full, so
//! an input runs only as fast as the pacers let frames through.
//!
//! Inputs are switchable without touching the encoders: a later input (the slate when the source is lost, a new
//! source when a publisher comes back) takes over at its first frame, which is placed right after the last frame
//! already in. One timeline, monotonic timestamps, no gap; the frames of a retired input are refused, which stops
//! its pipeline's streaming threads.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use gst::prelude::*;
use kiln_model::source::{Host, SrtMode};
use kiln_model::{Source, StreamPlan};

use crate::elements::{make, make_dyn};
use crate::select::{InputCodec, Registry};
use crate::{EventSink, MediaError, MediaEvent};

mod passthrough;
pub(crate) use passthrough::{Gate, SourceKeys};

/// One input's pipeline (a source, or the slate) and what its frames need on their way into the [`Entry`].
#[derive(Debug)]
pub(crate) struct EncodedSource {
    pipeline: gst::Pipeline,
    pub(crate) state: Arc<Shared>,
    /// The generation it was built with: the number in its pipeline's name, so in its errors' element paths.
    pub(crate) built: u64,
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

/// Steers a source's parsebin: a playlist's caps end autoplugging and are reported as an error through `sink`
/// (no adaptive demuxer is ever plugged), and a parsed (or framed) elementary stream is exposed as it is.
///
/// The second matters on a GPU host: kilnd takes NVDEC's decoders out of autoplugging (rank NONE), and parsebin
/// only exposes parsed H.264 on its own when some decoder with a rank accepts it. Without a software decoder
/// installed (no gst-libav), it would report a missing parser (seen on the lent H200), although kiln plugs
/// `nvh264dec` itself.
pub(crate) fn refuse_playlists(bin: &gst::Element, sink: EventSink) {
    bin.connect("autoplug-continue", false, move |args| {
        let caps = args.get(2).and_then(|v| v.get::<gst::Caps>().ok());
        let s = caps.as_ref().and_then(|c| c.structure(0));
        let name = s.map(|s| s.name().to_string()).unwrap_or_default();
        let done = s.is_some_and(|s| {
            (name.starts_with("video/") || name.starts_with("audio/"))
                && (s.get::<bool>("parsed").unwrap_or(false)
                    || s.get::<bool>("framed").unwrap_or(false))
        });
        if done {
            return Some(false.to_value());
        }
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
            confine_rtsp(&e, &host, r.port);
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
/// Its errors name the appsrc by path (so they carry the input's generation, like the bus's) and are dropped
/// once the input is retired or stopped (a read that fails long after the input was replaced is not the
/// stream's).
fn pump(src: gst_app::AppSrc, feed: ByteFeed, sink: EventSink, state: Arc<Shared>) {
    let fail = |message: String| {
        if !state.live() || state.stopped.load(Ordering::SeqCst) {
            return;
        }
        sink(MediaEvent::Error {
            element: Some(src.path_string().to_string()),
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

/// The generation of the source input an element belongs to, from its path (`/kiln-<id>-source-<n>/…`): `None`
/// for an element of the stream pipeline or of the slate.
pub fn input_of(element_path: &str, stream_id: &str) -> Option<u64> {
    let rest = element_path.strip_prefix(&format!("/kiln-{stream_id}-source-"))?;
    rest.split('/').next()?.parse().ok()
}

/// How far a later input's first sound may be moved to join the sound before it (see `Shared::audio_offset`).
const AUDIO_SNAP_NS: i64 = 100_000_000;

/// See [`Entry::set_reaper`].
type Reaper = Box<dyn Fn(u64) + Send + Sync>;

/// What an input is, for the stream's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// The stream's own source (a file, a URL, a publisher).
    Source,
    /// The picture and silence that stand in while the source is gone.
    Slate,
    /// The stream's second input, decoded all the time, on air while the source is gone.
    Backup,
}

impl InputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Slate => "slate",
            Self::Backup => "backup",
        }
    }
}

/// Whether an element belongs to the stream's backup input (`/kiln-<id>-backup/…`).
pub fn is_backup(element_path: &str, stream_id: &str) -> bool {
    element_path.starts_with(&format!("/kiln-{stream_id}-backup/"))
}

/// One input's state, shared by its pipeline's callbacks.
pub(crate) struct Shared {
    pub(crate) kind: InputKind,
    /// Takes over the entry points when this is above the current generation (see [`Entry::push`]). A standby
    /// input gets a new one when it is armed.
    generation: AtomicU64,
    /// Decoded, its frames dropped: a backup waiting for its turn, or a returning source waiting out the
    /// failback delay. Set (and the input given a new generation) by [`Shared::arm`].
    standby: AtomicBool,
    /// Survives its retirement: goes back to standby instead of stopping (the backup).
    keep: bool,
    /// When the input last decoded a frame, on air or not.
    last_seen: Mutex<Option<std::time::Instant>>,
    looping: bool,
    /// A publisher's or a live feed's source: its end is the source's loss ([`MediaEvent::SourceEnded`]), not
    /// the stream's end.
    switchable: bool,
    /// Added to every frame's running time (negative when a later input's clock is ahead of the stream's).
    offset_ns: AtomicI64,
    /// End of the current loop (running time in the source pipeline, before the offset).
    loop_end_ns: AtomicU64,
    pub(crate) entry: Arc<Entry>,
    /// (video linked, audio linked)
    linked: Mutex<(bool, bool)>,
    /// Set when the input's pipeline stops (a waiting frame gives up).
    stopped: AtomicBool,
    /// A later input's audio offset, once its first sound was placed (`i64::MIN`: not yet; the first input's
    /// audio always uses `offset_ns`).
    audio_offset_ns: AtomicI64,
    snap_audio: AtomicBool,
    /// Where its takeover is reported.
    sink: EventSink,
    /// Running times of the IDRs its parser passed, not yet matched to a decoded frame (a stream with a
    /// passthrough rendition, see [`passthrough`]).
    idr_rt: Mutex<std::collections::VecDeque<u64>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("kind", &self.kind)
            .field("generation", &self.generation)
            .field("standby", &self.standby)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        kind: InputKind,
        entry: &Arc<Entry>,
        looping: bool,
        switchable: bool,
        sink: EventSink,
    ) -> Self {
        Self::with_role(kind, entry, looping, switchable, sink, false)
    }

    /// [`Shared::new`], in standby when `standby` (a backup is kept through its retirements too).
    pub(crate) fn with_role(
        kind: InputKind,
        entry: &Arc<Entry>,
        looping: bool,
        switchable: bool,
        sink: EventSink,
        standby: bool,
    ) -> Self {
        let generation = entry.next_generation.fetch_add(1, Ordering::SeqCst);
        Self {
            kind,
            generation: AtomicU64::new(generation),
            standby: AtomicBool::new(standby),
            keep: kind == InputKind::Backup,
            last_seen: Mutex::new(None),
            looping,
            switchable,
            offset_ns: AtomicI64::new(0),
            loop_end_ns: AtomicU64::new(0),
            entry: entry.clone(),
            linked: Mutex::new((false, false)),
            stopped: AtomicBool::new(false),
            audio_offset_ns: AtomicI64::new(i64::MIN),
            snap_audio: AtomicBool::new(generation != entry.current.load(Ordering::SeqCst)),
            sink,
            idr_rt: Mutex::new(Default::default()),
        }
    }

    /// The input's generation now (see [`Shared::arm`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Withdrawn or stopped: it can no longer take over.
    pub(crate) fn is_withdrawn(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Armed: not in standby and not on air (waiting for its next frame to take over).
    pub(crate) fn is_armed(&self) -> bool {
        !self.is_standby() && self.generation() > self.entry.current()
    }

    /// Whether the input decodes without feeding the stream.
    pub(crate) fn is_standby(&self) -> bool {
        self.standby.load(Ordering::SeqCst)
    }

    /// How long since the input last decoded a frame (`None` before its first).
    pub(crate) fn since_seen(&self) -> Option<std::time::Duration> {
        self.last_seen.lock().map(|t| t.elapsed())
    }

    /// Lets a standby input take over at its next frame (placed right after the last frame in, like any later
    /// input): it gets a new generation, above every other. Returns it.
    pub(crate) fn arm(&self) -> u64 {
        // under both track locks (video, then audio: the entry's order): a push that is sending a retired backup
        // back to standby cannot undo this
        let _video = self
            .entry
            .video_out
            .is_some()
            .then(|| self.entry.video.lock());
        let _audio = self
            .entry
            .audio_out
            .is_some()
            .then(|| self.entry.audio.lock());
        self.audio_offset_ns.store(i64::MIN, Ordering::SeqCst);
        self.snap_audio.store(true, Ordering::SeqCst);
        self.stopped.store(false, Ordering::SeqCst);
        let g = self.entry.next_generation.fetch_add(1, Ordering::SeqCst);
        self.generation.store(g, Ordering::SeqCst);
        self.standby.store(false, Ordering::SeqCst);
        g
    }

    /// The offset of this input's audio at running time `rt`, given where the stream's sound ends (`track`). A
    /// later input's first sound is moved by at most [`AUDIO_SNAP_NS`] to start exactly where the sound before it
    /// ended: the audio encoders see no gap or overlap, so AAC frames and `tfdt` stay continuous. That shifts the
    /// input's sound against its picture by under a frame of either; a larger gap is the input's own and stays.
    fn audio_offset(&self, rt: u64, track: &Track) -> i64 {
        let common = self.offset_ns.load(Ordering::SeqCst);
        if !self.snap_audio.load(Ordering::SeqCst) {
            return common;
        }
        match self.audio_offset_ns.load(Ordering::SeqCst) {
            i64::MIN => {
                let want = rt as i64 + common;
                let end = track.end as i64;
                let offset = if track.start.is_some() && (want - end).abs() < AUDIO_SNAP_NS {
                    end - rt as i64
                } else {
                    common
                };
                self.audio_offset_ns.store(offset, Ordering::SeqCst);
                offset
            }
            offset => offset,
        }
    }

    /// Whether this input feeds the stream or may still take over (not retired).
    pub(crate) fn live(&self) -> bool {
        self.keep || self.generation() >= self.entry.current.load(Ordering::SeqCst)
    }
}

/// Where the last frame of one kind went: its start and end on the stream's timeline.
#[derive(Debug, Default)]
struct Track {
    start: Option<u64>,
    end: u64,
}

/// The stream pipeline's entry points (appsrc → clocksync into the tee and the audio branch), fed by one input at
/// a time. The first input is current from the start; a later one takes over at its first frame.
pub(crate) struct Entry {
    pub(crate) video_out: Option<gst_app::AppSrc>,
    pub(crate) audio_out: Option<gst_app::AppSrc>,
    /// The passthrough rendition's entry (access units, not frames), and where its track stands.
    pub(crate) pass_out: Option<gst_app::AppSrc>,
    pass: Mutex<passthrough::PassTrack>,
    /// Where the source's IDRs landed on the stream's timeline (the encoded renditions key on them).
    keys: Arc<SourceKeys>,
    /// The generation of the input that feeds the entry points.
    current: AtomicU64,
    next_generation: AtomicU64,
    /// What the current input is.
    on_air: Mutex<InputKind>,
    /// Each held while its appsrc is pushed to, so a takeover never lands between another input's frame and its
    /// push. Lock order: video, then audio.
    video: Mutex<Track>,
    audio: Mutex<Track>,
    /// When the current input last pushed a frame.
    last_frame: Mutex<Option<std::time::Instant>>,
    /// Notified when an input takes over.
    switched: parking_lot::Condvar,
    switch_lock: Mutex<()>,
    /// Stops the inputs a takeover retired (see `set_reaper`).
    reaper: Mutex<Option<Reaper>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("current", &self.current)
            .field("on_air", &self.on_air)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// appsrc → clocksync into `tee` (video), `audio_in` (audio) and `pass_in` (the passthrough rendition)
    /// where the plan has them.
    pub(crate) fn build(
        stream: &gst::Pipeline,
        tee: Option<&gst::Element>,
        audio_in: Option<&gst::Element>,
        pass_in: Option<&gst::Element>,
        keys: Arc<SourceKeys>,
    ) -> Result<Arc<Self>, MediaError> {
        let entry =
            |name: &str, pace: &str, next: &gst::Element| -> Result<gst_app::AppSrc, MediaError> {
                let src = appsrc(name);
                let clocksync = make("clocksync", pace)?;
                stream.add_many([src.upcast_ref::<gst::Element>(), &clocksync])?;
                gst::Element::link_many([src.upcast_ref::<gst::Element>(), &clocksync, next])
                    .map_err(|e| MediaError::Build(format!("linking {name}: {e}")))?;
                Ok(src)
            };
        Ok(Arc::new(Self {
            video_out: tee.map(|t| entry("vin", "vpace", t)).transpose()?,
            audio_out: audio_in.map(|a| entry("ain", "apace", a)).transpose()?,
            pass_out: pass_in
                .map(|p| {
                    let src = entry("pin", "ppace", p)?;
                    // Never blocks: a push holds the passthrough track's lock, which the frames' path takes too,
                    // and a blocked push waited on a pipeline that could not preroll without those frames (seen
                    // with a file source). The access units are paced upstream anyway: the source pipeline's tee
                    // runs only as far ahead as its decoding branch's queue lets it, and the fill comes from a
                    // paced rendition.
                    src.set_property("block", false);
                    src.set_max_buffers(0);
                    src.set_max_bytes(0);
                    Ok::<_, MediaError>(src)
                })
                .transpose()?,
            pass: Mutex::new(Default::default()),
            keys,
            current: AtomicU64::new(1),
            next_generation: AtomicU64::new(1),
            on_air: Mutex::new(InputKind::Source),
            video: Mutex::new(Track::default()),
            audio: Mutex::new(Track::default()),
            last_frame: Mutex::new(None),
            switched: parking_lot::Condvar::new(),
            switch_lock: Mutex::new(()),
            reaper: Mutex::new(None),
        }))
    }

    /// The generation of the input on air.
    pub(crate) fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Whether the slate feeds the stream now.
    pub(crate) fn on_slate(&self) -> bool {
        self.on_air() == InputKind::Slate
    }

    /// What feeds the stream now.
    pub(crate) fn on_air(&self) -> InputKind {
        *self.on_air.lock()
    }

    /// The first input is the slate (built next, as generation 1).
    pub(crate) fn start_on_slate(&self) {
        *self.on_air.lock() = InputKind::Slate;
    }

    /// How long since the current input's last frame (`None` before its first).
    pub(crate) fn since_last_frame(&self) -> Option<std::time::Duration> {
        self.last_frame.lock().map(|t| t.elapsed())
    }

    /// `input` takes over with its frame at `rt` (of the kind `video`; `track` is that kind's, locked): its offset
    /// places the frame where the last frame of either kind ended.
    fn take_over(&self, input: &Shared, generation: u64, video: bool, rt: u64, track: &Track) {
        let other = if video { self.audio.lock().end } else { 0 };
        let start = track.end.max(other);
        input
            .offset_ns
            .store(start as i64 - rt as i64, Ordering::SeqCst);
        let from = self.on_air();
        {
            let _g = self.switch_lock.lock();
            self.current.store(generation, Ordering::SeqCst);
            self.switched.notify_all();
        }
        *self.on_air.lock() = input.kind;
        if video {
            self.pass_switch(generation, start);
        }
        tracing::info!(input = ?input.kind, at_ns = start, "input switched");
        (input.sink)(MediaEvent::InputSwitched {
            input: generation,
            kind: input.kind,
            from_slate: from == InputKind::Slate,
            from,
        });
        if let Some(reap) = self.reaper.lock().as_ref() {
            reap(generation);
        }
    }

    /// Withdraws every input in `inputs` that is not on air and not in `keep`: none of them can take over once
    /// this returns (decided under the lock a takeover holds). Returns the generation on air.
    /// A backup that was armed but is not on air goes back to standby.
    pub(crate) fn withdraw_all_but(
        &self,
        inputs: &[EncodedSource],
        keep: Option<u64>,
        backup: Option<&Shared>,
    ) -> u64 {
        let _anchor = if self.video_out.is_some() {
            self.video.lock()
        } else {
            self.audio.lock()
        };
        let current = self.current();
        // with `keep`, only the inputs older than it (one built later belongs to a switch that raced this one)
        let goes = |g: u64| g != current && keep.is_none_or(|k| g < k);
        for s in inputs {
            if goes(s.state.generation()) {
                s.state.stopped.store(true, Ordering::SeqCst);
            }
        }
        if let Some(b) = backup {
            if goes(b.generation()) {
                b.standby.store(true, Ordering::SeqCst);
            }
        }
        current
    }

    /// Withdraws `input` unless it is on air (decided under the lock a takeover holds). Returns whether it was.
    pub(crate) fn withdraw(&self, input: &Shared) -> bool {
        let _anchor = if self.video_out.is_some() {
            self.video.lock()
        } else {
            self.audio.lock()
        };
        if input.generation() == self.current() {
            return false;
        }
        input.stopped.store(true, Ordering::SeqCst);
        true
    }

    /// Sends `backup` back to standby unless it is on air (under the lock a takeover holds). Returns whether it
    /// did.
    pub(crate) fn withdraw_backup(&self, backup: &Shared) -> bool {
        let _anchor = if self.video_out.is_some() {
            self.video.lock()
        } else {
            self.audio.lock()
        };
        // only an armed backup (out of standby, not yet on air): one on air, back in standby or retired is left
        if backup.is_standby() || backup.generation() <= self.current() {
            return false;
        }
        backup.standby.store(true, Ordering::SeqCst);
        true
    }

    /// Called (from a streaming thread) with the generation that just took over, to stop the retired ones.
    pub(crate) fn set_reaper(&self, reap: impl Fn(u64) + Send + Sync + 'static) {
        *self.reaper.lock() = Some(Box::new(reap));
    }

    /// The slate's sound waits for its picture to take over: it is not live, and dropped until then it would
    /// run ahead of the stream's clock by as much as it could make in the meantime.
    fn wait_for_takeover(&self, input: &Shared) -> Result<(), gst::FlowError> {
        let mut g = self.switch_lock.lock();
        while input.generation() > self.current.load(Ordering::SeqCst) {
            if input.stopped.load(Ordering::SeqCst) {
                return Err(gst::FlowError::Flushing);
            }
            self.switched
                .wait_for(&mut g, std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    /// Pushes a frame of `input` at running time `rt` (in the input's pipeline) onto the stream's timeline.
    /// A retired input gets `Eos`, which stops its streaming thread. A newer input takes over at its first frame
    /// (video, or audio in an audio-only stream; its audio before that is dropped): its offset places that frame
    /// right after the last frame of either kind already in. A frame that would go backwards (audio that started
    /// before the takeover point) is dropped.
    fn push(
        &self,
        input: &Shared,
        video: bool,
        mut buf: gst::Buffer,
        rt: u64,
        caps: Option<&gst::CapsRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let (out, track) = if video {
            (&self.video_out, &self.video)
        } else {
            (&self.audio_out, &self.audio)
        };
        let Some(out) = out else {
            return Ok(gst::FlowSuccess::Ok);
        };
        if video || self.video_out.is_none() {
            *input.last_seen.lock() = Some(std::time::Instant::now());
        }
        if input.is_standby() {
            return Ok(gst::FlowSuccess::Ok); // decoded, not on air
        }
        let mut track = track.lock();
        let current = self.current.load(Ordering::SeqCst);
        let generation = input.generation();
        if generation < current {
            if input.keep {
                // a backup that another input replaced waits for its next turn
                input.standby.store(true, Ordering::SeqCst);
                return Ok(gst::FlowSuccess::Ok);
            }
            return Err(gst::FlowError::Eos);
        }
        if generation > current {
            // a newer input takes over at its first picture (its sound before that is dropped), unless it was
            // withdrawn (see `withdraw_all_but`: checked under the same lock)
            if (!video && self.video_out.is_some())
                || input.stopped.load(Ordering::SeqCst)
                || input.is_standby()
            {
                return Ok(gst::FlowSuccess::Ok);
            }
            self.take_over(input, generation, video, rt, &track);
        }
        let offset = if video {
            input.offset_ns.load(Ordering::SeqCst)
        } else {
            input.audio_offset(rt, &track)
        };
        let pts = (rt as i64 + offset).max(0) as u64;
        if track.start.is_some_and(|s| pts <= s) {
            return Ok(gst::FlowSuccess::Ok);
        }
        if video {
            self.note_key(input, rt, pts);
        }
        let duration = buf.duration().map_or(0, |d| d.nseconds());
        *track = Track {
            start: Some(pts),
            end: pts + duration,
        };
        {
            let b = buf.make_mut();
            b.set_pts(gst::ClockTime::from_nseconds(pts));
            b.set_dts(gst::ClockTime::NONE);
        }
        // the current input's caps (a switch brings the other input's format; the branches adapt)
        if let Some(caps) = caps {
            if out.caps().as_deref() != Some(caps) {
                tracing::info!(input = generation, %caps, "input format");
                out.set_caps(Some(&caps.to_owned()));
            }
        }
        *self.last_frame.lock() = Some(std::time::Instant::now());
        out.push_buffer(buf).map(|_| gst::FlowSuccess::Ok)
    }
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

/// What a source input is built as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The stream's source: on air from the start (the first input) or at its first frame (a later one).
    Source,
    /// The stream's source, decoded but off air until it is armed (a source back while the backup is on air).
    Standby,
    /// The stream's backup (`plan.backup`): decoded all the time, on air only while armed.
    Backup,
}

impl EncodedSource {
    /// Builds a source's pipeline, feeding `entry`: the stream's first input (`generation` current from the start)
    /// or a later one that takes over at its first frame.
    pub(crate) fn build(
        entry: &Arc<Entry>,
        plan: &StreamPlan,
        opts: &crate::BuildOptions,
        sink: EventSink,
    ) -> Result<Self, MediaError> {
        Self::build_as(entry, plan, opts, sink, Role::Source)
    }

    /// [`Self::build`] in `role`. The backup reads `plan.backup`'s source through `opts.backup_addr` /
    /// `opts.backup_feed`.
    // Long by design: one linear element graph per source kind (test, file, URL) with its pad-linking callbacks.
    pub(crate) fn build_as(
        entry: &Arc<Entry>,
        plan: &StreamPlan,
        opts: &crate::BuildOptions,
        sink: EventSink,
        role: Role,
    ) -> Result<Self, MediaError> {
        let backup_plan;
        let backup_opts;
        let (plan, opts) = if role == Role::Backup {
            let b = plan
                .backup
                .as_ref()
                .ok_or_else(|| MediaError::Build("the stream has no backup".into()))?;
            backup_plan = StreamPlan {
                source: b.source.clone(),
                ..plan.clone()
            };
            backup_opts = crate::BuildOptions {
                source_addr: opts.backup_addr,
                byte_feed: opts.backup_feed.clone(),
                // a backup publisher is held to the stream's booking like its primary
                size_limit: if b.source.is_publish() {
                    opts.size_limit
                } else {
                    None
                },
                file: None,
                ..opts.clone()
            };
            (&backup_plan, &backup_opts)
        } else {
            (plan, opts)
        };
        let state = Arc::new(Shared::with_role(
            if role == Role::Backup {
                InputKind::Backup
            } else {
                InputKind::Source
            },
            entry,
            matches!(plan.source, Source::File { .. }),
            // a live feed's end is its loss (the slate stands in, the daemon retries); an HTTP body may be a
            // finite file, whose end is the stream's (but not the backup's)
            matches!(
                plan.source,
                Source::Publish | Source::Srt(_) | Source::Rtsp(_)
            ) || role == Role::Backup,
            sink.clone(),
            role != Role::Source,
        ));
        let registry = opts.registry.clone();
        let decode_gpu = if role == Role::Backup {
            None // booked on the CPU
        } else {
            opts.decode_gpu
        };
        let size_limit = opts.size_limit;
        let name = if role == Role::Backup {
            format!("kiln-{}-backup", plan.id)
        } else {
            format!("kiln-{}-source-{}", plan.id, state.generation())
        };
        let pipeline = gst::Pipeline::with_name(&name);
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
                if st.entry.video_out.is_none() {
                    return; // audio-only stream: the source's video is not used
                }
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
                    st.clone(),
                    size_limit,
                    &err_sink,
                )
            } else if name.starts_with("audio/") {
                if st.entry.audio_out.is_none() {
                    return;
                }
                {
                    let mut l = st.linked.lock();
                    if l.1 {
                        return;
                    }
                    l.1 = true;
                }
                link_audio(&pipeline, pad, st.clone())
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
            let missing = match (
                st.entry.video_out.is_some() && !l.0,
                st.entry.audio_out.is_some() && !l.1,
            ) {
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
                crate::priority::on_message(msg);
                use gst::MessageView;
                match msg.view() {
                    // a retired or stopped input's troubles are no longer the stream's (a backup replaced by a
                    // new one keeps its name)
                    _ if !st.live() || st.stopped.load(Ordering::SeqCst) => {}
                    MessageView::Error(e) => sink(MediaEvent::Error {
                        element: msg.src().map(|s| s.path_string().to_string()),
                        message: e.error().to_string(),
                        debug: e.debug().map(|d| d.to_string()),
                    }),
                    // a live feed's end, or the end of any input not on air (an attempt whose body was empty):
                    // a loss, never the stream's end
                    MessageView::Eos(_)
                        if st.switchable || st.generation() != st.entry.current() =>
                    {
                        sink(MediaEvent::SourceEnded {
                            input: st.generation(),
                            kind: st.kind,
                        })
                    }
                    MessageView::Eos(_) if st.looping => {
                        let end = st.loop_end_ns.swap(0, Ordering::SeqCst);
                        st.offset_ns.fetch_add(end as i64, Ordering::SeqCst);
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
                        let entry = &st.entry;
                        let outs = [&entry.video_out, &entry.audio_out, &entry.pass_out];
                        for out in outs.into_iter().flatten() {
                            let _ = out.end_of_stream();
                        }
                    }
                    _ => {}
                }
                gst::BusSyncReply::Drop
            });
        Ok(Self {
            pipeline,
            built: state.generation(),
            state,
            feed,
        })
    }

    /// An input whose pipeline is built already (the slate).
    pub(crate) fn from_parts(pipeline: gst::Pipeline, state: Arc<Shared>) -> Self {
        Self {
            pipeline,
            built: state.generation(),
            state,
            feed: None,
        }
    }

    /// Starts the input; the first input's frames get `offset_ns` added (0 for a new stream, "now" on a continued
    /// timeline), a later input's offset is set when it takes over.
    pub(crate) fn start(&self, offset_ns: u64) -> Result<(), MediaError> {
        self.state
            .offset_ns
            .store(offset_ns as i64, Ordering::SeqCst);
        self.pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| MediaError::Start(format!("the source pipeline: {e}")))?;
        if let Some(Feed(src, feed, sink)) = self.feed.clone() {
            let state = self.state.clone();
            std::thread::Builder::new()
                .name("kiln-byte-feed".into())
                .spawn(move || pump(src, feed, sink, state))
                .map_err(|e| MediaError::Start(format!("the HTTP feed thread: {e}")))?;
        }
        Ok(())
    }

    pub(crate) fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// appsink → the stream pipeline's appsrc, moving each frame onto the stream's timeline.
/// appsink → the stream's entry point (`video` or audio), moving each frame onto the stream's timeline.
pub(crate) fn bridge(name: &str, video: bool, state: Arc<Shared>) -> gst::Element {
    // async=false: this sink is added while the source pipeline is already playing. An async sink would take the
    // pipeline back to PAUSED until it prerolls, and a live source (SRT, RTSP) produces nothing in PAUSED: the
    // stream would wait forever for its first frame.
    let appsink = gst_app::AppSink::builder().name(name).sync(false).build();
    appsink.set_property("async", false);
    if !video && state.kind == InputKind::Slate && state.entry.video_out.is_some() {
        // The slate's sound waits for its picture to take over ([`Entry::wait_for_takeover`]) here, in a probe in
        // front of the sink, not in its callback: the callback runs under the sink's preroll lock, which the slate
        // pipeline's change to PLAYING takes, while the picture can only take over once PLAYING. Waiting in the
        // callback deadlocked the three (the slate never went on air, its stream wedged; gdb on a hung test
        // showed the sound's thread in the wait, the picture's in preroll, the state change on the lock).
        let st = state.clone();
        if let Some(pad) = appsink.static_pad("sink") {
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                match st.entry.wait_for_takeover(&st) {
                    Ok(()) => gst::PadProbeReturn::Ok,
                    Err(_) => gst::PadProbeReturn::Drop, // stopped
                }
            });
        }
    }
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
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
                state
                    .entry
                    .push(&state, video, buf, rt.nseconds(), sample.caps())
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
    let pass = state.entry.pass_out.is_some();
    if pass && codec != InputCodec::H264 {
        return Err(MediaError::Build(format!(
            "the passthrough rendition forwards H.264 only; the source's video is `{caps_name}`"
        )));
    }
    let mut chain = vec![make("queue", "vdec-q")?];
    // parsebin's output is fixed before the decoder is linked: a parser of our own negotiates with the decoder
    // (seen on the H200: nvh264dec refused the `avc` H.264 that parsebin exposed from an MP4)
    if pass || gst::ElementFactory::find(codec.parser()).is_some() {
        chain.push(make_dyn(codec.parser(), "vdec-parse")?);
    }
    let head = if pass {
        passthrough::watch_idrs(chain.last().expect("the parser"), state.clone());
        chain.push(make("tee", "vdec-split")?);
        let head = std::mem::replace(&mut chain, vec![make("queue", "vdec-q2")?]);
        Some(head)
    } else {
        None
    };
    let pass_state = state.clone();
    chain.extend([
        make_dyn(&dec.factory, "vdec")?,
        make("videoconvert", "vdec-convert")?,
        // I420, whatever the source decodes to (NVDEC's NV12, 10-bit, 4:4:4, RGB): one format on the stream's
        // entry for every input (a switch never changes it), the one the slate and the test sources have. NV12
        // reached the renditions' scalers on the H200 and was refused there (not-negotiated); the conversion is a
        // plane copy next to the decode.
        crate::elements::capsfilter(
            "vdec-format",
            gst::Caps::builder("video/x-raw")
                .field("format", "I420")
                .build(),
        )?,
        bridge("vout", true, state),
    ]);
    match head {
        Some(head) => {
            let branch = passthrough::branch(pass_state)?;
            passthrough::add_tree(pipeline, pad, &head, &[chain, branch])
        }
        None => add_chain(pipeline, pad, &chain),
    }
}

fn link_audio(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    state: Arc<Shared>,
) -> Result<(), MediaError> {
    let q = make("queue", "adec-q")?;
    let dec = make("decodebin", "adec")?;
    let conv = make("audioconvert", "adec-convert")?;
    let appsink = bridge("aout", false, state);
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

/// Keeps `rtspsrc` on the server the daemon checked (`host:port`, the address it pinned): rtspsrc follows an
/// RTSP 301/302 and absolute control URLs by itself, to any host, past the daemon's address policy (a public
/// server could redirect the DESCRIBE to 127.0.0.1 or 10.0.0.5 and have the daemon ingest an internal camera). A
/// request for any other server is not sent, and the source fails with the reason.
fn confine_rtsp(e: &gst::Element, host: &str, port: u16) {
    let allowed = (host.trim_matches(['[', ']']).to_ascii_lowercase(), port);
    e.connect("before-send", false, move |args| {
        let element = args[0].get::<gst::Element>().ok()?;
        let uri = args[1]
            .get::<gst_rtsp::rtsp_message::RTSPMessage>()
            .ok()
            .and_then(|m| request_uri(&m));
        let target = uri.as_deref().and_then(rtsp_server);
        if target.as_ref() == Some(&allowed) {
            return Some(true.to_value());
        }
        element.post_error_message(gst::error_msg!(
            gst::ResourceError::NotAuthorized,
            (
                "the RTSP server sent the source elsewhere ({}): only {}:{} was checked against the daemon's \
                 address policy (--allow-networks), so the request was not sent",
                uri.as_deref().unwrap_or("a request without a URI"),
                allowed.0,
                allowed.1
            )
        ));
        Some(false.to_value())
    });
}

/// The URI of an RTSP request message.
#[allow(unsafe_code)] // gstreamer-rtsp has no safe binding for it; the message outlives the call
fn request_uri(m: &gst_rtsp::rtsp_message::RTSPMessage) -> Option<String> {
    use gst::glib::translate::ToGlibPtr;
    let mut uri: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: `m` is a valid message for the call; the out-pointers for method and version may be NULL (they
    // are optional in gst_rtsp_message_parse_request); `uri` points into the message, copied before it is freed
    let res = unsafe {
        gst_rtsp::ffi::gst_rtsp_message_parse_request(
            ToGlibPtr::<*const gst_rtsp::ffi::GstRTSPMessage>::to_glib_none(m).0 as *mut _,
            std::ptr::null_mut(),
            &mut uri,
            std::ptr::null_mut(),
        )
    };
    if res != gst_rtsp::ffi::GST_RTSP_OK || uri.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string owned by the message, alive for this borrow
    Some(
        unsafe { std::ffi::CStr::from_ptr(uri) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// `(host, port)` of an `rtsp(s)://` request URI (host lower-case, without IPv6 brackets; port 554, or 322 for
/// rtsps, when absent); `None` for anything else (`*`, another scheme).
fn rtsp_server(uri: &str) -> Option<(String, u16)> {
    let (scheme, rest) = uri.split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "rtsp" | "rtspt" | "rtspu" => 554,
        "rtsps" | "rtspst" => 322,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']')?;
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default,
    };
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod rtsp_tests {
    use super::rtsp_server;

    #[test]
    fn rtsp_request_uris_name_their_server() {
        let s = |h: &str, p| Some((h.to_string(), p));
        assert_eq!(
            rtsp_server("rtsp://203.0.113.5:8554/cam"),
            s("203.0.113.5", 8554)
        );
        assert_eq!(
            rtsp_server("rtsp://203.0.113.5/cam/trackID=1"),
            s("203.0.113.5", 554)
        );
        assert_eq!(
            rtsp_server("RTSP://User:pw@Cam.Example/x"),
            s("cam.example", 554)
        );
        assert_eq!(rtsp_server("rtsps://cam.example/x"), s("cam.example", 322));
        assert_eq!(rtsp_server("rtsp://[2001:db8::1]:9/x"), s("2001:db8::1", 9));
        assert_eq!(rtsp_server("*"), None);
        assert_eq!(rtsp_server("http://203.0.113.5/"), None);
        assert_eq!(rtsp_server("rtsp://h:notaport/"), None);
    }
}
