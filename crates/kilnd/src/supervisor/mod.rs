//! Stream life cycle: resolve → build → start → feed the origin → stop (EOS → ENDLIST) → linger → drop.
//!
//! Each stream owns its pipeline and one consumer task. The pipeline's streaming threads hand typed events to that
//! task over a bounded channel; the task feeds the origin. A failing stream records its error and stops alone:
//! nothing it does reaches another stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_llhls::PackagerConfig;
use kiln_media::select::Registry;
use kiln_media::{BuildOptions, LivePipeline, MediaEvent};
use kiln_model::capacity::{Dimension, Resources};
use kiln_model::{
    Backend, Fallback, PlanError, Policy, RenditionStatus, StreamPlan, StreamRequest, StreamState,
    StreamStatus,
};
use kiln_origin::{Origin, RenditionInfo, RenditionKind, StreamOrigin};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

mod admission;
mod backup;
mod consume;
mod publish;
mod publish_backup;
mod pulled;
mod report;
mod resilience;

pub use publish::{random_token, Publisher, Refusal, Secrets, FEED_QUEUE};

use consume::{consume, launch};

use crate::config::Config;
use crate::gpus::GpuPool;

/// Encoder failures a stream may recover from by rebuilding, per [`RESTART_WINDOW_MS`]; more and it fails.
const MAX_RESTARTS: usize = 3;
const RESTART_WINDOW_MS: u64 = 300_000;

/// Where a stream runs and what it books there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub backend: Backend,
    /// NVDEC decodes an encoded source on this GPU.
    pub decode_gpu: Option<u32>,
    /// Booked on the host (CPU, memory).
    pub host: Resources,
    /// Booked on a GPU (NVENC/NVDEC throughput, sessions, VRAM).
    pub gpu: Option<(u32, Resources)>,
}

impl Placement {
    /// Everything booked, on one vector.
    pub fn total(&self) -> Resources {
        self.gpu.map_or(self.host, |(_, g)| self.host.plus(&g))
    }
}

/// Events buffered between a pipeline and its consumer task.
const EVENT_QUEUE: usize = 1024;

/// How long a pipeline's teardown (state NULL) may take before the stream goes on without it.
const TEARDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Drops a pipeline (its state to NULL) on a blocking thread and waits for that, at most [`TEARDOWN_LIMIT`]. A
/// teardown that never returns (a streaming thread stuck inside GStreamer) is logged and its thread left behind,
/// so it never holds up the stream's end, a fallback, the next publisher or the daemon's shutdown; the handle
/// returned then says when it does return. A stuck pipeline may still hold its NVENC session and memory, so its
/// bookings are kept until then ([`Supervisor::tear_down_booked`]).
pub(crate) async fn tear_down(p: LivePipeline) -> Option<tokio::task::JoinHandle<()>> {
    let mut done = tokio::task::spawn_blocking(move || drop(p));
    match tokio::time::timeout(TEARDOWN_LIMIT, &mut done).await {
        Ok(_) => None,
        Err(_) => {
            tracing::error!(
                limit_s = TEARDOWN_LIMIT.as_secs(),
                "a pipeline did not stop in time: its thread is left behind, its bookings kept until it returns"
            );
            Some(done)
        }
    }
}
/// Errors kept per stream.
const MAX_ERRORS: usize = 20;

/// Why a stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Invalid(#[from] PlanError),
    #[error("stream `{0}` already exists with a different spec")]
    Conflict(String),
    #[error("stream `{0}` does not exist")]
    NotFound(String),
    #[error("the pipeline could not start: {0}")]
    Media(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(
        "the node is draining (it is shutting down through its scheduler): it takes no new streams"
    )]
    Draining,
    #[error("{0}")]
    Policy(String),
    #[error("source file: {0}")]
    SourceFile(String),
    #[error("source address: {0}")]
    SourceAddress(String),
    #[error("not enough {dimension} on this node: the stream needs {requested}, {free} is free")]
    Capacity {
        dimension: Dimension,
        requested: u64,
        free: u64,
    },
}

/// How far ahead of this host's clock an epoch may be. A scheduler's epoch is either a lease counter (Redis: 1, 2,
/// 3, …) or its start time in unix milliseconds (the in-memory store), so no real epoch is a day in the future; a
/// larger one is a bug or an attack, and accepting it would fence out every real scheduler until a restart.
pub const MAX_EPOCH_LEAD_MS: u64 = 24 * 3600 * 1000;

/// The largest epoch accepted at `now_ms`.
pub fn max_epoch(now_ms: u64) -> u64 {
    now_ms.saturating_add(MAX_EPOCH_LEAD_MS)
}

/// Why a scheduler command's epoch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("scheduler epoch {epoch} is older than {fence}, which this daemon already follows: the sender is no longer the leader")]
    Stale { epoch: u64, fence: u64 },
    #[error("scheduler epoch {epoch} is beyond any real scheduler's (at most {max}: a lease counter or a start time in unix ms)")]
    Future { epoch: u64, max: u64 },
}

/// A source's resolved inputs: the media file of a `file://` source, the checked address an SRT caller, RTSP
/// or HTTP source connects to.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceInput {
    pub file: Option<PathBuf>,
    pub addr: Option<std::net::IpAddr>,
    /// The backup's checked address (`plan.backup`).
    pub backup_addr: Option<std::net::IpAddr>,
}

/// A live stream under supervision.
#[derive(Debug)]
pub struct StreamHandle {
    pub plan: StreamPlan,
    /// Where the stream runs and what admission booked for it (changes on a fallback).
    placement: Mutex<Placement>,
    pub request: StreamRequest,
    /// Where the source's bytes come from, resolved and checked at admission.
    input: SourceInput,
    fallbacks: Mutex<Vec<Fallback>>,
    /// Frame counters seen at the last scrape (of the current pipeline).
    frames_seen: Mutex<kiln_media::FrameStats>,
    pub origin: Arc<StreamOrigin>,
    pipeline: Mutex<Option<LivePipeline>>,
    state: watch::Sender<StreamState>,
    errors: Mutex<Vec<String>>,
    eos: watch::Sender<bool>,
    /// `stream{id=…}`: every event about this stream is logged inside it.
    span: tracing::Span,
    created_unix_ms: u64,
    /// Unix ms of the stream's running time 0 (its timeline; a rebuilt or re-published pipeline continues it).
    origin_ms: i64,
    /// A `publish:` stream's key and passphrase.
    pub(crate) secrets: Option<Secrets>,
    /// A `publish:` stream's connected publisher.
    publisher: Mutex<Option<Arc<Publisher>>>,
    /// The connected publisher of a `publish:` backup (`"backup": {"source": "publish:"}`).
    backup_publisher: Mutex<Option<Arc<Publisher>>>,
    /// What the current publisher sends (a rebuilt pipeline gets the same feed).
    publish_feed: Mutex<Option<kiln_media::ByteFeed>>,
    /// Publishers that have had a pipeline (the second one opens with a discontinuity).
    sessions: std::sync::atomic::AtomicU64,
    /// A publish stream's slate and its history.
    resilience: Mutex<resilience::ResilienceState>,
    /// Moves on whenever the stream's pipeline is replaced or dropped: the consumer of an older one stops.
    pipeline_epoch: std::sync::atomic::AtomicU64,
    /// Media its slowest rendition has published (ns, of the current pipeline's consumer), and its recent
    /// real-time ratio, sampled by [`crate::load`].
    pub(crate) media_ns: std::sync::atomic::AtomicU64,
    realtime: Mutex<kiln_model::load::RealtimeMeter>,
}

impl StreamHandle {
    pub fn placement(&self) -> Placement {
        *self.placement.lock()
    }

    /// Frame counters since the previous call (for Prometheus counters). A rebuilt pipeline starts from 0, so a
    /// counter that went down counts from 0.
    pub fn frame_delta(&self) -> kiln_media::FrameStats {
        let now = {
            let p = self.pipeline.lock();
            match p.as_ref() {
                Some(p) => p.frame_stats(),
                None => return Default::default(),
            }
        };
        let mut seen = self.frames_seen.lock();
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        let delta = kiln_media::FrameStats {
            input: d(now.input, seen.input),
            renditions: now
                .renditions
                .iter()
                .map(|r| {
                    let then = seen.renditions.iter().find(|s| s.name == r.name);
                    kiln_media::RenditionFrames {
                        name: r.name.clone(),
                        encoded: d(r.encoded, then.map_or(0, |t| t.encoded)),
                        dropped: d(r.dropped, then.map_or(0, |t| t.dropped)),
                        duplicated: d(r.duplicated, then.map_or(0, |t| t.duplicated)),
                    }
                })
                .collect(),
        };
        *seen = now;
        delta
    }

    /// Everything booked for this stream.
    pub fn demand(&self) -> Resources {
        self.placement().total()
    }

    pub fn state(&self) -> StreamState {
        *self.state.borrow()
    }

    /// Moves to `s`; whether it changed (Failed and Ended are final).
    fn set_state(&self, s: StreamState) -> bool {
        self.state.send_if_modified(|cur| {
            let change = *cur != s && !matches!(*cur, StreamState::Failed | StreamState::Ended);
            if change {
                *cur = s;
            }
            change
        })
    }

    /// Pauses the stream's pipeline (no new parts until it resumes). Not reachable from the HTTP API.
    /// The connected publisher of a `publish:` stream.
    pub fn publisher(&self) -> Option<Arc<Publisher>> {
        self.publisher.lock().clone()
    }

    /// The connected publisher of a `publish:` backup.
    pub fn backup_publisher(&self) -> Option<Arc<Publisher>> {
        self.backup_publisher.lock().clone()
    }

    /// Whether a PUT of `request` (planned as `plan`) asks for this very stream, so it answers with it (200)
    /// rather than 409: the same plan, no ingest secret other than this stream's, the same source-loss policy.
    fn answers(&self, plan: &StreamPlan, request: &StreamRequest) -> bool {
        let asked = request.ingest.clone().unwrap_or_default();
        let same_secrets = self.secrets.as_ref().is_none_or(|s| {
            asked.key.as_ref().is_none_or(|k| *k == s.key)
                && asked.passphrase.as_ref().is_none_or(|p| *p == s.passphrase)
                && asked
                    .backup_key
                    .as_ref()
                    .is_none_or(|b| Some(b) == s.backup_key.as_ref())
        });
        let same_loss = self.request.on_source_loss.unwrap_or_default()
            == request.on_source_loss.unwrap_or_default();
        self.plan == *plan && same_secrets && same_loss
    }

    /// Whether this is a `publish:` stream.
    pub fn is_publish(&self) -> bool {
        self.secrets.is_some()
    }

    pub fn pause(&self) -> bool {
        let p = self.pipeline.lock();
        p.as_ref().is_some_and(|p| p.pause().is_ok())
    }

    /// The stream's log span.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    pub(crate) fn push_error(&self, e: String) {
        let mut v = self.errors.lock();
        if v.len() >= MAX_ERRORS {
            v.remove(0);
        }
        v.push(e);
    }

    pub fn status(&self) -> StreamStatus {
        let renditions = self
            .origin
            .renditions
            .iter()
            .map(|r| {
                let snap = r.snapshot();
                let passthrough = self
                    .plan
                    .passthrough
                    .as_ref()
                    .is_some_and(|p| p.name == r.info.name);
                let (kind, width, height) = match (r.info.kind, r.size()) {
                    (RenditionKind::Video { .. }, Some((w, h))) => ("video", Some(w), Some(h)),
                    (RenditionKind::Video { .. }, None) if passthrough => ("video", None, None),
                    (RenditionKind::Video { width, height, .. }, None) => {
                        ("video", Some(width), Some(height))
                    }
                    (RenditionKind::Audio { .. }, _) => ("audio", None, None),
                };
                RenditionStatus {
                    name: r.info.name.clone(),
                    kind: kind.into(),
                    width,
                    height,
                    bitrate_kbps: (r.info.bitrate / 1000) as u32,
                    codecs: r.codec(),
                    playlist: format!("/live/{}/{}/index.m3u8", self.plan.id, r.info.name),
                    last_msn: snap.last.map(|p| p.msn),
                    last_part: snap.last.map(|p| p.part),
                    parts_published: snap.parts_published,
                    passthrough,
                }
            })
            .collect();
        StreamStatus {
            id: self.plan.id.clone(),
            state: self.state(),
            source: self.plan.source.to_string(),
            playback: format!("/live/{}/master.m3u8", self.plan.id),
            renditions,
            policy: self.plan.encoder.policy,
            backend: self.placement().backend,
            decode_gpu: self.placement().decode_gpu,
            fallbacks: self.fallbacks.lock().clone(),
            errors: self.errors.lock().clone(),
            created_unix_ms: self.created_unix_ms,
            publisher: self.publisher().map(|p| p.status()),
            ingest: None,
            resilience: self.resilience_status(),
            warnings: self.warnings(),
            recent_realtime_ratio: self.recent_realtime_ratio(),
            behind_real_time: self.behind_real_time(),
        }
    }

    /// Adds a reading of the media published (at `at_s` on the load sampler's clock).
    pub(crate) fn sample_realtime(&self, at_s: f64) {
        // only while running, from the first part on: a stream starting up, or waiting for its publisher, is not
        // behind, and its window starts afresh when it runs again
        let media_ns = self.media_ns.load(std::sync::atomic::Ordering::Relaxed);
        let running = self.state() == StreamState::Running;
        let mut meter = self.realtime.lock();
        if running && media_ns > 0 {
            meter.sample(at_s, media_ns as f64 / 1e9);
        } else {
            *meter = kiln_model::load::RealtimeMeter::new(crate::load::REALTIME_WINDOW_S);
        }
    }

    /// The recent real-time ratio over the sampler's window, once long enough to judge.
    pub fn recent_realtime_ratio(&self) -> Option<f64> {
        self.realtime.lock().ratio()
    }

    /// Running, and publishing slower than real time over the last seconds.
    pub fn behind_real_time(&self) -> bool {
        let behind = self.realtime.lock().behind();
        behind && self.state() == StreamState::Running
    }

    /// A passthrough rendition's segments follow the source's GOP: say so when that makes them longer than the
    /// segment target (TARGETDURATION follows), or longer than TARGETDURATION (the GOP grew after it was set).
    fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let o = &self.origin;
        if !o.follows_source_gop() || !o.target_known() {
            return w;
        }
        let (td, target) = (o.target_duration_s(), o.config.target_duration_s);
        if td > target {
            w.push(format!(
                "the source's GOP is longer than the {} ms segment target: segments follow it, TARGETDURATION is \
                 {td} s (send an IDR at least every {} ms for {target} s segments)",
                self.plan.timing.segment_ms, self.plan.timing.segment_ms
            ));
        }
        let over = o.segments_over_target();
        if over > 0 {
            w.push(format!(
                "{over} segment(s) of the passthrough rendition were longer than TARGETDURATION {td} s: the source's \
                 GOP grew after the stream started"
            ));
        }
        w
    }
}

/// All streams of this daemon.
#[derive(Debug)]
pub struct Supervisor {
    config: Arc<Config>,
    origin: Origin,
    metrics: Arc<crate::metrics::Metrics>,
    streams: Mutex<HashMap<String, Arc<StreamHandle>>>,
    shutting_down: std::sync::atomic::AtomicBool,
    /// Shutting down through the scheduler: no new streams; the ones running wait to be moved.
    draining: std::sync::atomic::AtomicBool,
    /// When a scheduler last answered a heartbeat (never: the start), and the heartbeat interval then.
    scheduler_seen: Mutex<(std::time::Instant, std::time::Duration)>,
    /// Resources booked on the host by admitted streams (and by streams being started).
    allocated: Mutex<Resources>,
    /// What serving viewers costs, sampled by [`crate::load`]; admission keeps its reservation free.
    serving: Mutex<kiln_model::load::ServingMeter>,
    epoch: u64,
    /// Highest scheduler epoch accepted (fencing token; 0 = none).
    fence: std::sync::atomic::AtomicU64,
    /// What this host's GStreamer can build.
    pub registry: Arc<Registry>,
    /// GPUs and their bookings.
    pub gpus: GpuPool,
    /// The checked HTTP client that fetches `http(s)://` sources (an error if it could not be built).
    live_fetcher: Result<crate::fetch::Fetcher, String>,
    /// RTMP key → stream id of every `publish:` stream.
    ingest_keys: Mutex<HashMap<String, String>>,
    /// The ingest listeners' public `host:port`, once bound.
    pub ingest_addrs: std::sync::OnceLock<IngestAddrs>,
    /// Where stream events go (`--webhook-url`).
    pub webhooks: std::sync::OnceLock<Arc<crate::webhooks::Webhooks>>,
    /// Teardowns that outran [`TEARDOWN_LIMIT`], with what their pipelines booked ([`Supervisor::reap_teardowns`]).
    stuck: Mutex<Vec<(tokio::task::JoinHandle<()>, Placement)>>,
}

/// Where publishers reach this daemon (`host:port`), for the publish URLs.
#[derive(Debug, Clone, Default)]
pub struct IngestAddrs {
    pub rtmp: Option<String>,
    pub rtmps: Option<String>,
    pub srt: Option<String>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Supervisor {
    pub fn new(
        config: Arc<Config>,
        origin: Origin,
        metrics: Arc<crate::metrics::Metrics>,
        registry: Arc<Registry>,
        gpus: GpuPool,
    ) -> Self {
        Self {
            origin,
            metrics,
            streams: Mutex::new(HashMap::new()),
            shutting_down: false.into(),
            draining: false.into(),
            scheduler_seen: Mutex::new((
                std::time::Instant::now(),
                std::time::Duration::from_secs(1),
            )),
            allocated: Mutex::new(Resources::default()),
            serving: Mutex::new(kiln_model::load::ServingMeter::new(
                crate::load::SERVING_WINDOW_S,
                crate::load::SERVING_HOLD_S,
                crate::load::SERVING_FLOOR_MILLICORES,
            )),
            epoch: unix_ms(),
            fence: 0.into(),
            live_fetcher: crate::fetch::Fetcher::new(config.source_networks.clone(), u64::MAX),
            ingest_keys: Mutex::new(HashMap::new()),
            ingest_addrs: std::sync::OnceLock::new(),
            webhooks: std::sync::OnceLock::new(),
            stuck: Mutex::new(Vec::new()),
            config,
            registry,
            gpus,
        }
    }

    fn map(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Arc<StreamHandle>>> {
        self.streams.lock()
    }

    /// Unix ms when this supervisor started: changes on every daemon restart.
    /// How long a stop waits for a pipeline to drain.
    pub fn grace(&self) -> std::time::Duration {
        self.config.grace
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Highest scheduler epoch this daemon has accepted.
    pub fn fence_epoch(&self) -> u64 {
        self.fence.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a command carrying `epoch` may run: not older than the fence, and not beyond what any real scheduler
    /// can send ([`max_epoch`]). Checking never moves the fence: only [`Self::raise_fence`] does, after the command
    /// was accepted.
    pub fn check_fence(&self, epoch: u64) -> Result<(), FenceError> {
        let max = max_epoch(unix_ms());
        if epoch > max {
            return Err(FenceError::Future { epoch, max });
        }
        let fence = self.fence_epoch();
        if epoch < fence {
            return Err(FenceError::Stale { epoch, fence });
        }
        Ok(())
    }

    /// Raises the fence to `epoch` (never lowers it), within the same bound as [`Self::check_fence`]. Called for
    /// a control command that was authenticated, valid and accepted, and for a scheduler's heartbeat answer.
    pub fn raise_fence(&self, epoch: u64) -> Result<(), FenceError> {
        let max = max_epoch(unix_ms());
        if epoch > max {
            return Err(FenceError::Future { epoch, max });
        }
        let prev = self
            .fence
            .fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
        if epoch < prev {
            Err(FenceError::Stale { epoch, fence: prev })
        } else {
            Ok(())
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<StreamHandle>> {
        self.map().get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<StreamHandle>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by(|a, b| a.plan.id.cmp(&b.plan.id));
        v
    }

    /// Creates and starts a stream. Idempotent: the same request for an existing id returns the existing stream
    /// (`Ok((handle, false))`); a different one is a conflict.
    pub async fn create(
        self: &Arc<Self>,
        id: &str,
        request: StreamRequest,
    ) -> Result<(Arc<StreamHandle>, bool), SupervisorError> {
        self.create_inner(id, request, None).await
    }

    /// Test-only: creates a stream whose first pipeline's encoder (video rendition 0) fails after `frames`
    /// frames, to exercise the fallback. Not reachable from the HTTP API; compiled only with the
    /// `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub async fn create_with_encoder_fault(
        self: &Arc<Self>,
        id: &str,
        request: StreamRequest,
        frames: u64,
    ) -> Result<(Arc<StreamHandle>, bool), SupervisorError> {
        self.create_inner(id, request, Some(frames)).await
    }

    /// Test-only: the encoder of stream `id`'s running pipeline fails now (see
    /// [`LivePipeline::inject_encoder_error`]). Returns whether it had one.
    #[cfg(feature = "fault-injection")]
    pub fn inject_encoder_error(&self, id: &str) -> bool {
        self.get(id).is_some_and(|h| {
            h.pipeline
                .lock()
                .as_ref()
                .is_some_and(|p| p.inject_encoder_error())
        })
    }

    /// Test-only: stream `id`'s encoder slows down by `delay` per frame (see
    /// [`LivePipeline::inject_encoder_slowness`]). Returns whether it had one.
    #[cfg(feature = "fault-injection")]
    pub fn inject_encoder_slowness(&self, id: &str, delay: std::time::Duration) -> bool {
        self.get(id).is_some_and(|h| {
            h.pipeline
                .lock()
                .as_ref()
                .is_some_and(|p| p.inject_encoder_slowness(delay))
        })
    }

    async fn create_inner(
        self: &Arc<Self>,
        id: &str,
        request: StreamRequest,
        fault: Option<u64>,
    ) -> Result<(Arc<StreamHandle>, bool), SupervisorError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(SupervisorError::ShuttingDown);
        }
        let plan = self.config.presets.resolve(id, &request)?;
        if request.ingest.is_some() && !plan.source.is_publish() {
            return Err(PlanError::Ingest(kiln_model::ingest::IngestError::NotPublish).into());
        }
        if let Some(loss) = &request.on_source_loss {
            if !plan.source.is_resilient() {
                return Err(SupervisorError::Policy(
                    "on_source_loss applies to `publish:` streams and pulled live sources (srt, rtsp, http): a \
                     file loops and a test source cannot be lost"
                        .into(),
                ));
            }
            loss.validate().map_err(SupervisorError::Policy)?;
        }
        let existing = self.get(id);
        if existing.is_none() && self.is_draining() {
            return Err(SupervisorError::Draining);
        }
        if let Some(h) = existing {
            return if h.answers(&plan, &request) {
                Ok((h, false))
            } else {
                Err(SupervisorError::Conflict(id.to_string()))
            };
        }
        let secrets = plan
            .source
            .is_publish()
            .then(|| self.publish_secrets(&request, &plan))
            .transpose()?;

        let backup_addr = match &plan.backup {
            Some(b) => crate::fetch::check_source(&self.config.source_networks, &b.source)
                .await
                .map_err(SupervisorError::SourceAddress)?,
            None => None,
        };
        let input = SourceInput {
            file: self.resolve_file(&plan)?,
            addr: crate::fetch::check_source(&self.config.source_networks, &plan.source)
                .await
                .map_err(SupervisorError::SourceAddress)?,
            backup_addr,
        };
        let placement = self.place(&plan, false)?;
        match self
            .start(id, request, plan, placement, input, secrets, fault)
            .await
        {
            Ok(r) => Ok(r),
            Err(e) => {
                self.release_placement(&placement);
                Err(e)
            }
        }
    }

    // Long by design: build → register → spawn the consumer must happen in this order under one error path that releases the booking.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        self: &Arc<Self>,
        id: &str,
        request: StreamRequest,
        plan: StreamPlan,
        placement: Placement,
        input: SourceInput,
        secrets: Option<Secrets>,
        fault: Option<u64>,
    ) -> Result<(Arc<StreamHandle>, bool), SupervisorError> {
        #[allow(unused_mut)]
        let mut opts = self.build_options(&placement, &plan, &input, None)?;
        #[cfg(feature = "fault-injection")]
        {
            opts.fail_encoder_after_frames = fault;
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = fault;
        // a publish stream starts waiting: its pipeline is built when a publisher is attached
        let (pipeline, origin_ms, rx) = if secrets.is_some() {
            (None, unix_ms() as i64, None)
        } else {
            let (p, origin_ms, rx) = launch(&plan, opts, None).await?;
            // test-only, for daemons run as processes: every stream this daemon starts falls behind real time
            #[cfg(feature = "fault-injection")]
            if let Some(ms) = std::env::var("KILN_FAULT_SLOW_ENCODER_MS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                p.inject_encoder_slowness(std::time::Duration::from_millis(ms));
            }
            (Some(p), origin_ms, Some(rx))
        };

        let pcfg = PackagerConfig {
            segment_ns: plan.timing.segment_ns(),
            target_duration_s: plan.timing.target_duration_s(),
            part_target_ms: plan.timing.part_target_ms,
            window_segments: self.config.window_segments,
            retain_segments: self.config.retain_segments,
            wallclock_origin_unix_ms: origin_ms,
            // The Skip Boundary: the spec's minimum, 6 × TD.
            can_skip_until_s: Some(6 * plan.timing.target_duration_s()),
            first_msn: (origin_ms.max(0) as u64) / u64::from(plan.timing.segment_ms),
        };
        let mut infos: Vec<RenditionInfo> = plan
            .video
            .iter()
            .map(|v| RenditionInfo {
                name: v.name.clone(),
                kind: RenditionKind::Video {
                    width: v.width,
                    height: v.height,
                    fps: v.fps.as_f64(),
                },
                bitrate: u64::from(v.bitrate_kbps) * 1000,
            })
            .collect();
        if let Some(a) = &plan.audio {
            infos.push(RenditionInfo {
                name: a.name.clone(),
                kind: RenditionKind::Audio {
                    channels: a.channels,
                },
                bitrate: u64::from(a.bitrate_kbps) * 1000,
            });
        }
        // the passthrough rendition comes last (its index follows the audio's); its size is learnt from its init
        if let Some(p) = &plan.passthrough {
            infos.push(RenditionInfo {
                name: p.name.clone(),
                kind: RenditionKind::Video {
                    width: plan.source_size().0,
                    height: plan.source_size().1,
                    fps: plan.source_fps().as_f64(),
                },
                bitrate: u64::from(p.bitrate_kbps) * 1000,
            });
        }
        let stream_origin = match plan.passthrough_index() {
            Some(i) => StreamOrigin::following_gop(id, infos, pcfg, i),
            None => StreamOrigin::new(id, infos, pcfg),
        };
        let handle = Arc::new(StreamHandle {
            plan,
            placement: Mutex::new(placement),
            request,
            input,
            fallbacks: Mutex::new(Vec::new()),
            frames_seen: Mutex::new(Default::default()),
            origin: stream_origin.clone(),
            pipeline: Mutex::new(pipeline),
            state: watch::channel(if secrets.is_some() {
                StreamState::Waiting
            } else {
                StreamState::Starting
            })
            .0,
            errors: Mutex::new(Vec::new()),
            eos: watch::channel(false).0,
            created_unix_ms: unix_ms(),
            span: tracing::info_span!("stream", id = %id),
            origin_ms,
            secrets,
            publisher: Mutex::new(None),
            backup_publisher: Mutex::new(None),
            publish_feed: Mutex::new(None),
            sessions: 0.into(),
            resilience: Mutex::new(Default::default()),
            pipeline_epoch: 0.into(),
            media_ns: 0.into(),
            realtime: Mutex::new(kiln_model::load::RealtimeMeter::new(
                crate::load::REALTIME_WINDOW_S,
            )),
        });
        // `Ok(None)`: inserted; `Ok(Some(first))`: lost a race with an identical PUT, the first one is kept
        let inserted = {
            let mut map = self.map();
            match map.get(id) {
                Some(h) if h.answers(&handle.plan, &handle.request) => Ok(Some(h.clone())),
                Some(_) => Err(SupervisorError::Conflict(id.to_string())),
                None => {
                    let taken = handle.secrets.as_ref().is_some_and(|s| {
                        let keys = self.ingest_keys.lock();
                        keys.contains_key(&s.key)
                            || s.backup_key.as_ref().is_some_and(|b| keys.contains_key(b))
                    });
                    if taken {
                        Err(SupervisorError::Conflict(id.to_string()))
                    } else {
                        if let Some(s) = &handle.secrets {
                            let mut keys = self.ingest_keys.lock();
                            keys.insert(s.key.clone(), id.to_string());
                            if let Some(b) = &s.backup_key {
                                keys.insert(b.clone(), id.to_string());
                            }
                        }
                        map.insert(id.to_string(), handle.clone());
                        Ok(None)
                    }
                }
            }
        };
        // ours is not kept: its pipeline is torn down off the runtime's threads, bounded, not dropped here
        let stuck = match &inserted {
            Ok(None) => None,
            _ => {
                let p = handle.pipeline.lock().take();
                match p {
                    Some(p) => tear_down(p).await,
                    None => None,
                }
            }
        };
        match inserted {
            Ok(None) => {}
            Ok(Some(first)) => {
                // a teardown stuck past its limit keeps what it booked until its thread returns
                match stuck {
                    Some(j) => self.hold_until_torn_down(j, handle.placement()),
                    None => self.release_placement(&handle.placement()),
                }
                return Ok((first, false));
            }
            // the caller (create_inner) releases the booking on this error (a stuck teardown's too: the one path
            // that gives it back early, as the refusals before a launch always have)
            Err(e) => return Err(e),
        }
        self.origin.insert(stream_origin);
        self.event("stream.created", &handle);
        self.metrics.init_stream(id);
        if handle.plan.source.is_resilient() {
            self.metrics.ingest.init_stream(id);
        }
        if handle.plan.source.is_pulled_live() {
            self.watch_pulled(&handle);
        }
        if handle.plan.backup.is_some() {
            self.watch_backup(&handle);
        }
        if let Some(rx) = rx {
            tokio::spawn(
                consume(
                    handle.clone(),
                    rx,
                    self.metrics.clone(),
                    Arc::downgrade(self),
                    origin_ms,
                    false,
                    0,
                )
                .instrument(handle.span.clone()),
            );
        }
        handle.span.in_scope(|| {
            tracing::info!(
                renditions = handle.origin.renditions.len(),
                backend = placement.backend.label(),
                decode_gpu = placement.decode_gpu,
                "stream started"
            )
        });
        Ok((handle, true))
    }

    /// Records a webhook event about stream `h` (its status as the data), when webhooks are configured.
    pub(crate) fn event(&self, kind: &str, h: &StreamHandle) {
        if let Some(w) = self.webhooks.get() {
            let data = serde_json::to_value(h.status()).unwrap_or_default();
            w.emit(kind, Some(&h.plan.id), None, data);
        }
    }

    /// Stops a stream: EOS, wait (bounded) for the last parts, ENDLIST, then drop it from the origin after the
    /// linger time.
    pub async fn stop(&self, id: &str) -> Result<(), SupervisorError> {
        let h = self
            .map()
            .remove(id)
            .ok_or_else(|| SupervisorError::NotFound(id.to_string()))?;
        self.finish(h).await;
        Ok(())
    }

    async fn finish(&self, h: Arc<StreamHandle>) {
        let p = Self::begin_stop(&h);
        self.complete_stop(h, p).await;
    }

    /// Marks the stream stopping and sends EOS into its pipeline.
    fn begin_stop(h: &StreamHandle) -> Option<(LivePipeline, bool)> {
        let p = {
            // under the publisher lock, so a publisher being attached sees the stop (see `attach`)
            let publisher = h.publisher.lock();
            h.set_state(StreamState::Stopping);
            if let Some(p) = publisher.as_ref() {
                *p.kicked_for.lock() = Some((Refusal::Stopping, "the stream was stopped".into()));
                p.kick.notify_one();
            }
            h.kick_backup_publisher(Refusal::Stopping, "the stream was stopped");
            h.pipeline.lock().take()
        }?;
        // a pipeline that refused the EOS (a source in error) is still torn down by `complete_stop`, off the
        // runtime's threads and bounded: dropped here, its state change would run on this task, unbounded
        let eos = p.send_eos();
        Some((p, eos))
    }

    /// Waits (bounded by the grace period) for the drained EOS, tears the pipeline down, ends the playlists and
    /// schedules the stream's removal from the origin.
    async fn complete_stop(&self, h: Arc<StreamHandle>, pipeline: Option<(LivePipeline, bool)>) {
        if let Some((p, eos_sent)) = pipeline {
            if eos_sent {
                let mut eos = h.eos.subscribe();
                let _ = tokio::time::timeout(self.config.grace, eos.wait_for(|e| *e)).await;
            }
            self.tear_down_booked(&h, p).await;
        }
        h.origin.end();
        let ended = h.set_state(StreamState::Ended);
        h.resilience.lock().slate_off();
        if ended {
            self.event("stream.ended", &h);
        }
        self.release_all(&h);
        if let Some(s) = &h.secrets {
            let mut keys = self.ingest_keys.lock();
            keys.remove(&s.key);
            if let Some(b) = &s.backup_key {
                keys.remove(b);
            }
        }
        h.span.in_scope(|| tracing::info!("stream stopped"));
        let origin = self.origin.clone();
        let linger = self.config.linger;
        let so = h.origin.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            origin.remove_if_same(&so);
            let names: Vec<String> = so.renditions.iter().map(|r| r.info.name.clone()).collect();
            metrics.forget_stream(&so.id, &names);
            metrics.ingest.forget_stream(&so.id);
        });
    }

    /// From now on the node takes no new streams and reports `draining`, so its scheduler moves what it runs.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A scheduler answered a heartbeat; heartbeats go every `interval`.
    pub fn heard_from_scheduler(&self, interval: std::time::Duration) {
        *self.scheduler_seen.lock() = (std::time::Instant::now(), interval);
    }

    /// How long since a scheduler last answered a heartbeat (since the start if none has), and the heartbeat
    /// interval then.
    pub fn scheduler_silence(&self) -> (std::time::Duration, std::time::Duration) {
        let (at, interval) = *self.scheduler_seen.lock();
        (at.elapsed(), interval)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Streams still live here: neither ended nor failed (a stopping one still counts until its last parts are
    /// out).
    pub fn live_streams(&self) -> usize {
        self.list()
            .iter()
            .filter(|h| !matches!(h.state(), StreamState::Ended | StreamState::Failed))
            .count()
    }

    /// Stops every stream (daemon shutdown): EOS to all at once, then each drains within the grace period. New
    /// streams are refused from now on.
    pub async fn shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let all: Vec<_> = self.map().drain().map(|(_, h)| h).collect();
        let begun: Vec<_> = all
            .into_iter()
            .map(|h| {
                let p = Self::begin_stop(&h);
                (h, p)
            })
            .collect();
        // all at once: each waits up to the grace period for its EOS (and a stuck teardown up to its limit)
        futures::future::join_all(begun.into_iter().map(|(h, p)| self.complete_stop(h, p))).await;
    }
}

#[cfg(test)]
mod tests;
