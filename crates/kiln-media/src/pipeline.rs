//! Building and running a live stream pipeline.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use gst::prelude::*;
use kiln_llhls::plan::{AudioSplitter, KeyframeClock, Split, VideoSplitter};
use kiln_model::{AudioRendition, Backend, Source, StreamPlan, TestPattern, VideoRendition};

use crate::chunks::ChunkAssembler;
use crate::elements::{aac_encoder, capsfilter, make, make_dyn, set_nick};
use crate::select::{Registry, Selection};
use crate::{EventSink, MediaError, MediaEvent};

mod branches;
mod cuts;

use branches::*;
use cuts::*;

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
    /// For SRT callers and RTSP: the address the daemon resolved and checked for the source's host. The element
    /// connects to it and never resolves the name again (a second lookup could answer differently).
    pub source_addr: Option<std::net::IpAddr>,
    /// For `http(s)://` sources: the body, fetched by the daemon through its own checked client; for `publish:`
    /// sources, what the publisher sends.
    pub byte_feed: Option<crate::source::ByteFeed>,
    /// The largest source picture the stream may decode (publish sources: what admission booked).
    pub size_limit: Option<crate::source::SizeLimit>,
    /// For the backup input (`plan.backup`): its checked address and, for `http(s)://`, its feed.
    pub backup_addr: Option<std::net::IpAddr>,
    pub backup_feed: Option<crate::source::ByteFeed>,
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
            source_addr: None,
            byte_feed: None,
            size_limit: None,
            backup_addr: None,
            backup_feed: None,
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
    /// An encoded source's entry points and its inputs: the source's own pipeline, and the slate's while the
    /// source is gone (retired inputs are stopped at the next switch).
    inputs: Option<Switcher>,
    /// Frames that entered the video tee (the source's frame rate, after decoding).
    input_frames: Arc<std::sync::atomic::AtomicU64>,
    video_names: Vec<String>,
}

/// The inputs of a stream with an encoded source, and what it takes to build another: a handle that switches
/// them without the [`LivePipeline`], so a caller that keeps the pipeline under a lock need not hold it while a
/// new source connects (an SRT or RTSP connection can take seconds). Once the pipeline stops, an input started
/// through it is stopped at once.
#[derive(Clone)]
pub struct Switcher {
    entry: Arc<crate::source::Entry>,
    running: Arc<Mutex<Vec<crate::source::EncodedSource>>>,
    plan: StreamPlan,
    sink: EventSink,
    /// Set (under `running`'s lock) when the pipeline stops.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The backup input (`plan.backup`), decoded all the time; not in `running` (no takeover retires it).
    backup: Arc<Mutex<Option<crate::source::EncodedSource>>>,
    /// The options the backup is rebuilt with.
    opts: BuildOptions,
}

impl std::fmt::Debug for Switcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switcher")
            .field("entry", &self.entry)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
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

impl LivePipeline {
    /// Builds the pipeline for `plan` with x264 and the host's registry (see [`Self::build_with`]).
    pub fn build(plan: &StreamPlan, sink: EventSink) -> Result<Self, MediaError> {
        let opts = BuildOptions::cpu(Arc::new(Registry::probe()?))?;
        Self::build_with(plan, &opts, sink)
    }

    /// Builds the pipeline for `plan` with the chosen elements; events go to `sink`. Rendition indices: video
    /// renditions in plan order, then audio.
    // Long by design: one linear element graph: source → tee → renditions, then the bus watch.
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

        // a passthrough rendition: the encoders key only where the source had its IDRs
        let keys = Arc::new(crate::source::SourceKeys::new(plan.timing.segment_ns()));
        let gate = plan.passthrough.as_ref().map(|_| keys.clone());
        let fill: FillSlot = Arc::default();
        // no tee at all for an audio-only stream
        let tee = if plan.video.is_empty() {
            None
        } else {
            let tee = make("tee", "vtee")?;
            pipeline.add(&tee)?;
            for (i, v) in plan.video.iter().enumerate() {
                let b = VideoBranch {
                    index: i,
                    keys: gate.clone(),
                    // the top rendition fills in for the source's bitstream
                    fill: (i == 0 && gate.is_some()).then(|| fill.clone()),
                };
                build_video_branch(&pipeline, &tee, plan, opts, b, v, sink.clone())?;
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
                gate.clone(),
            )?),
            None => None,
        };
        let mut inputs = None;
        match &plan.source {
            Source::Test { pattern } => {
                if let Some(tee) = &tee {
                    build_test_video_source(&pipeline, plan, opts, *pattern, tee)?;
                }
                if let Some(ain) = &audio_in {
                    build_test_audio_source(&pipeline, ain)?;
                }
            }
            Source::File { .. }
            | Source::Srt(_)
            | Source::Rtsp(_)
            | Source::Http(_)
            | Source::Publish => {
                let pass_in = match (plan.passthrough.as_ref(), plan.passthrough_index()) {
                    (Some(p), Some(index)) => Some(build_passthrough_branch(
                        &pipeline,
                        plan,
                        index,
                        &p.name,
                        sink.clone(),
                        keys.clone(),
                    )?),
                    _ => None,
                };
                let entry = crate::source::Entry::build(
                    &pipeline,
                    tee.as_ref(),
                    audio_in.as_ref(),
                    pass_in.as_ref(),
                    keys,
                )?;
                *fill.lock() = Some(Arc::downgrade(&entry));
                // a `publish:` stream built without its publisher's bytes (rebuilt while the slate or the
                // backup was on air) starts on the slate: the next publisher, or the backup, takes over from it
                let first = if plan.source.is_publish() && opts.byte_feed.is_none() {
                    entry.start_on_slate();
                    crate::slate::build(&entry, plan, sink.clone())?
                } else {
                    crate::source::EncodedSource::build(&entry, plan, opts, sink.clone())?
                };
                // a backup that cannot be built is the backup's trouble, not the stream's: it is started again
                // later (the daemon watches its health)
                // a `publish:` backup is built when its publisher connects ([`Switcher::attach_backup`])
                let pending =
                    |b: &&kiln_model::Backup| b.source.is_publish() && opts.backup_feed.is_none();
                let backup = plan.backup.as_ref().filter(|b| !pending(b)).and_then(|_| {
                    crate::source::EncodedSource::build_as(
                        &entry,
                        plan,
                        opts,
                        sink.clone(),
                        crate::source::Role::Backup,
                    )
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "the backup input could not be built"),
                    )
                    .ok()
                });
                let running = Arc::new(Mutex::new(vec![first]));
                entry.set_reaper(reaper(Arc::downgrade(&running)));
                inputs = Some(Switcher {
                    entry,
                    running,
                    plan: plan.clone(),
                    sink: sink.clone(),
                    closed: Default::default(),
                    backup: Arc::new(Mutex::new(backup)),
                    opts: opts.clone(),
                });
            }
        }

        let bus = pipeline.bus().expect("a pipeline has a bus");
        bus.set_sync_handler(move |_, msg| {
            crate::priority::on_message(msg);
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
            inputs,
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
        if let Some(i) = &self.inputs {
            if let Some(first) = i.running.lock().first() {
                first.start(self.clock.time().saturating_sub(base).nseconds())?;
            }
            let mut backup = i.backup.lock();
            if let Some(Err(e)) = backup.as_ref().map(|b| b.start(0)) {
                tracing::warn!(error = %e, "the backup input could not start");
                if let Some(b) = backup.take() {
                    b.stop();
                }
            }
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
        if let Some(i) = &self.inputs {
            // not under the list's lock: a takeover's reaper may be waiting for it
            let inputs = {
                let mut running = i.running.lock();
                i.closed.store(true, std::sync::atomic::Ordering::SeqCst);
                std::mem::take(&mut *running)
            };
            inputs.iter().for_each(|s| s.stop());
            if let Some(b) = i.backup.lock().take() {
                b.stop();
            }
        }
    }

    /// Test-only: the first video rendition's encoder posts an error now, like an NVENC session that dies (the
    /// `fault-injection` feature). Returns whether there was an encoder to fail.
    #[cfg(feature = "fault-injection")]
    pub fn inject_encoder_error(&self) -> bool {
        let Some(enc) = self
            .video_names
            .first()
            .and_then(|n| self.pipeline.by_name(&format!("enc-{n}")))
        else {
            return false;
        };
        gst::element_error!(
            enc,
            gst::StreamError::Encode,
            ["injected encoder fault (test)"]
        );
        true
    }

    /// Test-only: from now on the first video rendition's encoder takes `delay` longer per frame it outputs, like
    /// an encoder on a host with too little CPU left (the `fault-injection` feature). Its queue fills and holds
    /// up the source, so every rendition falls behind real time. Returns whether there was an encoder to slow.
    #[cfg(feature = "fault-injection")]
    pub fn inject_encoder_slowness(&self, delay: std::time::Duration) -> bool {
        let pad = self
            .video_names
            .first()
            .and_then(|n| self.pipeline.by_name(&format!("enc-{n}")))
            .and_then(|enc| enc.static_pad("src"));
        let Some(pad) = pad else {
            return false;
        };
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            std::thread::sleep(delay);
            gst::PadProbeReturn::Ok
        });
        true
    }

    /// A handle that switches this pipeline's inputs (`None` for a test source).
    pub fn switcher(&self) -> Option<Switcher> {
        self.inputs.clone()
    }

    /// Puts the slate on: it takes over at its first frame, right after the source's last one, and the
    /// renditions go on at real time with the same encoders. A no-op when the slate is on already (a source
    /// that was about to take over is dropped). `Err` for a stream without an encoded source.
    pub fn switch_to_slate(&self) -> Result<(), MediaError> {
        self.switchable()?.switch_to_slate()
    }

    /// See [`Switcher::switch_to_source`].
    pub fn switch_to_source(&self, opts: &BuildOptions) -> Result<u64, MediaError> {
        self.switchable()?.switch_to_source(opts)
    }

    /// What feeds the stream now (`None`: a test source, built into the stream pipeline).
    pub fn input(&self) -> Option<crate::InputKind> {
        Some(self.inputs.as_ref()?.entry.on_air())
    }

    /// How long since the input on air last handed over a frame (`None` before its first, or for a test source).
    pub fn since_last_frame(&self) -> Option<std::time::Duration> {
        self.inputs.as_ref()?.entry.since_last_frame()
    }

    fn switchable(&self) -> Result<&Switcher, MediaError> {
        self.inputs
            .as_ref()
            .ok_or_else(|| MediaError::Start("a test source has no other input".into()))
    }

    /// The generation of the input on air (1 for the first source; `None` for a test source).
    pub fn current_input(&self) -> Option<u64> {
        Some(self.inputs.as_ref()?.entry.current())
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

impl Switcher {
    /// Puts the slate on (see [`LivePipeline::switch_to_slate`]).
    pub fn switch_to_slate(&self) -> Result<(), MediaError> {
        let slate = if self.entry.on_slate() {
            None
        } else {
            let s = crate::slate::build(&self.entry, &self.plan, self.sink.clone())?;
            if let Err(e) = s.start(0) {
                s.stop();
                return Err(e);
            }
            Some(s)
        };
        self.keep_only(slate);
        Ok(())
    }

    /// Starts a new source (a publisher's new session: `opts` carries its bytes; a pulled source: a new
    /// connection) that takes over at its first decoded frame, placed right after the last frame in (the
    /// slate's). Until then the slate stays on. Any other input that was waiting to take over is dropped.
    /// Returns the new source's generation (the first source's is 1), which its events and errors carry.
    pub fn switch_to_source(&self, opts: &BuildOptions) -> Result<u64, MediaError> {
        self.start_source(opts, crate::source::Role::Source)
    }

    /// Starts a new source like [`Self::switch_to_source`] but in standby: decoded, off air, until
    /// [`Self::arm`] (a source back while the backup is on air waits out the failback delay). Until then the
    /// input on air stays. Returns its generation (it gets another when armed).
    pub fn start_standby(&self, opts: &BuildOptions) -> Result<u64, MediaError> {
        self.start_source(opts, crate::source::Role::Standby)
    }

    fn start_source(
        &self,
        opts: &BuildOptions,
        role: crate::source::Role,
    ) -> Result<u64, MediaError> {
        // the inputs still waiting (an earlier attempt) go first, and are stopped before this one starts: an
        // SRT listener's port is free again for it
        let waiting = self.take_waiting();
        waiting.iter().for_each(|s| s.stop());
        let s = crate::source::EncodedSource::build_as(
            &self.entry,
            &self.plan,
            opts,
            self.sink.clone(),
            role,
        )?;
        if let Err(e) = s.start(0) {
            s.stop();
            return Err(e);
        }
        let generation = s.state.generation();
        self.keep_only(Some(s));
        Ok(generation)
    }

    /// Withdraws the inputs waiting to take over (not the one on air, not the backup) and hands them over.
    fn take_waiting(&self) -> Vec<crate::source::EncodedSource> {
        let mut running = self.running.lock();
        let current = self.entry.withdraw_all_but(&running, None, None);
        let (keep, stop): (Vec<_>, Vec<_>) = running
            .drain(..)
            .partition(|s| s.state.generation() == current);
        *running = keep;
        stop
    }

    /// Withdraws input `generation` if it is not on air (an attempt that lost its race), and stops it.
    pub fn withdraw(&self, generation: u64) {
        let gone = {
            let mut running = self.running.lock();
            let Some(i) = running
                .iter()
                .position(|s| s.state.generation() == generation)
            else {
                return;
            };
            if !self.entry.withdraw(&running[i].state) {
                return; // it is on air
            }
            running.remove(i)
        };
        stop_elsewhere(vec![gone]);
    }

    /// Lets standby input `generation` take over at its next frame. Returns its new generation, or `None` when
    /// no such input waits (it was withdrawn, or it is already on air).
    pub fn arm(&self, generation: u64) -> Option<u64> {
        let running = self.running.lock();
        let s = running
            .iter()
            .find(|s| s.state.generation() == generation && s.state.is_standby())?;
        Some(s.state.arm())
    }

    /// Withdraws every input waiting to take over (a standby source, an armed backup not yet on air).
    pub fn withdraw_waiting(&self) {
        self.keep_only(None);
    }

    /// Puts the backup on air at its next frame (any other input waiting to take over is withdrawn). Returns its
    /// generation, or `None` without a backup (or with it on air already).
    pub fn switch_to_backup(&self) -> Option<u64> {
        // on air already, or armed and about to take over (arming it again would make it take over from itself)
        let ready = self
            .backup
            .lock()
            .as_ref()
            .is_some_and(|b| !b.state.is_armed());
        if !ready || self.entry.on_air() == crate::InputKind::Backup {
            return None;
        }
        // whatever waited to take over goes first (the backup itself is armed after, so it stays)
        stop_elsewhere(self.take_waiting());
        let b = self.backup.lock();
        Some(b.as_ref()?.state.arm())
    }

    /// How long since the backup last decoded a frame (`None`: no backup, or none decoded yet).
    pub fn backup_since_seen(&self) -> Option<std::time::Duration> {
        self.backup.lock().as_ref()?.state.since_seen()
    }

    /// How long since input `generation` last decoded a frame (`None`: no such input, or none decoded yet).
    pub fn since_seen(&self, generation: u64) -> Option<std::time::Duration> {
        let running = self.running.lock();
        running
            .iter()
            .find(|s| s.state.generation() == generation)?
            .state
            .since_seen()
    }

    /// The generation now of the input built as generation `built` (the number in its pipeline's name, which
    /// errors carry): an input armed since has another. `built` itself when no such input runs.
    pub fn resolve(&self, built: u64) -> u64 {
        let running = self.running.lock();
        running
            .iter()
            .find(|s| s.built == built)
            .map_or(built, |s| s.state.generation())
    }

    /// Whether the backup is armed: it will take over at its next frame, but has not yet.
    pub fn backup_armed(&self) -> bool {
        self.backup
            .lock()
            .as_ref()
            .is_some_and(|b| b.state.is_armed())
    }

    /// Sends the backup armed as generation `armed`, if it did not take over, back to standby (the slate goes on
    /// instead). Returns whether it did (false: it is on air, or was re-armed or replaced since).
    pub fn disarm_backup(&self, armed: u64) -> bool {
        let b = self.backup.lock();
        b.as_ref()
            .filter(|b| b.state.generation() == armed)
            .is_some_and(|b| self.entry.withdraw_backup(&b.state))
    }

    /// The backup's generation now (it changes each time it is armed).
    pub fn backup_input(&self) -> Option<u64> {
        Some(self.backup.lock().as_ref()?.state.generation())
    }

    /// Replaces a backup that failed while off air with a new one (a new connection), in standby. A no-op while
    /// the backup is on air (its loss is the stream's: the caller puts the slate on first).
    /// Returns whether it did.
    pub fn restart_backup(&self) -> Result<bool, MediaError> {
        Ok(self.replace_backup(&self.opts)? == Replaced::Yes)
    }

    /// A `publish:` backup's publisher connected: its bytes (`feed`) become the backup input, in standby, like
    /// [`Self::restart_backup`]. `Ok(false)`: the last backup is still on air or armed, and nothing was built
    /// (`feed` is unused: the caller may try again). An `Err` once the feed was read (the backup was armed while
    /// the new input started, or the pipeline stopped): the feed cannot be used again.
    pub fn attach_backup(&self, feed: crate::ByteFeed) -> Result<bool, MediaError> {
        let opts = BuildOptions {
            backup_feed: Some(feed),
            ..self.opts.clone()
        };
        match self.replace_backup(&opts)? {
            Replaced::Yes => Ok(true),
            Replaced::Busy => Ok(false),
            Replaced::Dropped => Err(MediaError::Start(
                "the backup went on air (or the pipeline stopped) while the new backup input started".into(),
            )),
        }
    }

    fn replace_backup(&self, opts: &BuildOptions) -> Result<Replaced, MediaError> {
        // on air, or armed to take over: its loss is the stream's, handled first
        let busy = || {
            self.backup
                .lock()
                .as_ref()
                .is_some_and(|b| b.state.is_armed())
                || self.entry.on_air() == crate::InputKind::Backup
        };
        if busy() || self.plan.backup.is_none() {
            return Ok(Replaced::Busy);
        }
        let new = crate::source::EncodedSource::build_as(
            &self.entry,
            &self.plan,
            opts,
            self.sink.clone(),
            crate::source::Role::Backup,
        )?;
        if let Err(e) = new.start(0) {
            new.stop();
            return Err(e);
        }
        let old = {
            let mut b = self.backup.lock();
            // closed, or the old one was armed (a failover) while the new one started: the new one goes
            let armed = b.as_ref().is_some_and(|b| b.state.is_armed())
                || self.entry.on_air() == crate::InputKind::Backup;
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) || armed {
                drop(b);
                stop_elsewhere(vec![new]);
                return Ok(Replaced::Dropped);
            }
            b.replace(new)
        };
        stop_elsewhere(old.into_iter().collect());
        Ok(Replaced::Yes)
    }

    /// Whether a source input waits to take over (a returning publisher, an attempt to pull the source again).
    pub fn source_waiting(&self) -> bool {
        let current = self.entry.current();
        self.running
            .lock()
            .iter()
            .any(|s| s.state.generation() > current && !s.state.is_withdrawn())
    }

    /// Stops every input but the one on air and `new`, which joins them. The others are withdrawn first, under
    /// the lock a takeover holds, so none of them can take over after this. After the pipeline stopped, `new`
    /// is stopped too.
    fn keep_only(&self, new: Option<crate::source::EncodedSource>) {
        let mut running = self.running.lock();
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            drop(running);
            stop_elsewhere(new.into_iter().collect());
            return;
        }
        // only inputs older than `new` go: a switch that raced this one (built later) keeps its input
        let newest = new.as_ref().map(|s| s.state.generation());
        let current = {
            let backup = self.backup.lock();
            self.entry
                .withdraw_all_but(&running, newest, backup.as_ref().map(|b| &*b.state))
        };
        let (keep, stop): (Vec<_>, Vec<_>) = running.drain(..).partition(|s| {
            let g = s.state.generation();
            g == current || newest.is_some_and(|n| g > n)
        });
        *running = keep;
        running.extend(new);
        drop(running);
        stop_elsewhere(stop);
    }
}

impl Drop for LivePipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`Switcher::replace_backup`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replaced {
    Yes,
    /// Nothing built: the backup is on air or armed.
    Busy,
    /// Built and started, then stopped: the backup was armed meanwhile, or the pipeline stopped.
    Dropped,
}

/// Stops `inputs` on a thread of its own: stopping waits for their streaming threads, which may be waiting on
/// the caller (a daemon's runtime taking their last events, or the takeover that called the reaper).
fn stop_elsewhere(inputs: Vec<crate::source::EncodedSource>) {
    if inputs.is_empty() {
        return;
    }
    let stopped = std::thread::Builder::new()
        .name("kiln-input-stop".into())
        .spawn(move || inputs.iter().for_each(|s| s.stop()));
    if let Err(e) = stopped {
        tracing::warn!(error = %e, "no thread to stop a retired input: its pipeline is dropped unstopped");
    }
}

/// What a takeover calls: stops the inputs older than the one that took over (newer ones may still take over).
/// The takeover holds a track lock, and `keep_only` holds the list while it takes one: the list is locked on a
/// thread of its own, never on the streaming thread.
fn reaper(
    running: std::sync::Weak<Mutex<Vec<crate::source::EncodedSource>>>,
) -> impl Fn(u64) + Send + Sync + 'static {
    move |current| {
        let running = running.clone();
        let reaped = std::thread::Builder::new()
            .name("kiln-input-reap".into())
            .spawn(move || {
                let Some(running) = running.upgrade() else {
                    return;
                };
                let retired: Vec<_> = {
                    let mut l = running.lock();
                    let (keep, old) = l.drain(..).partition(|s| s.state.generation() >= current);
                    *l = keep;
                    old
                };
                retired.iter().for_each(|s| s.stop());
            });
        if let Err(e) = reaped {
            tracing::warn!(error = %e, "no thread to stop retired inputs: they stop at the next switch");
        }
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

/// An event sink that forwards into a channel (tests and tools that consume events on one thread).
pub fn channel_sink() -> (EventSink, std::sync::mpsc::Receiver<MediaEvent>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    (
        Arc::new(move |e| {
            let _ = tx.lock().send(e);
        }),
        rx,
    )
}
