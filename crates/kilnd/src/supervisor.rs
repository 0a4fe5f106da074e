//! Stream life cycle: resolve → build → start → feed the origin → stop (EOS → ENDLIST) → linger → drop.
//!
//! Each stream owns its pipeline and one consumer task. The pipeline's streaming threads hand typed events to that
//! task over a bounded channel; the task feeds the origin. A failing stream records its error and stops alone:
//! nothing it does reaches another stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_llhls::PackagerConfig;
use kiln_media::select::{Registry, SelectError};
use kiln_media::{BuildOptions, LivePipeline, MediaEvent};
use kiln_model::capacity::Resources;
use kiln_model::{
    Backend, Fallback, PlanError, Policy, RenditionStatus, Source, StreamPlan, StreamRequest,
    StreamState, StreamStatus, VideoCodec,
};
use kiln_origin::{Origin, RenditionInfo, RenditionKind, StreamOrigin};
use tokio::sync::{mpsc, watch};

use crate::gpus::GpuPool;
use crate::Config;

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
    #[error("{0}")]
    Policy(String),
    #[error("source file: {0}")]
    SourceFile(String),
    #[error("source address: {0}")]
    SourceAddress(String),
    #[error("not enough {dimension} on this node: the stream needs {requested}, {free} is free")]
    Capacity {
        dimension: &'static str,
        requested: u64,
        free: u64,
    },
}

/// A live stream under supervision.
#[derive(Debug)]
pub struct StreamHandle {
    pub plan: StreamPlan,
    /// Where the stream runs and what admission booked for it (changes on a fallback).
    placement: Mutex<Placement>,
    pub request: StreamRequest,
    /// The resolved media file of a `file://` source.
    file: Option<PathBuf>,
    fallbacks: Mutex<Vec<Fallback>>,
    /// Frame counters seen at the last scrape (of the current pipeline).
    frames_seen: Mutex<kiln_media::FrameStats>,
    pub origin: Arc<StreamOrigin>,
    pipeline: Mutex<Option<LivePipeline>>,
    state: watch::Sender<StreamState>,
    errors: Mutex<Vec<String>>,
    eos: watch::Sender<bool>,
    created_unix_ms: u64,
}

impl StreamHandle {
    pub fn placement(&self) -> Placement {
        *self.placement.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frame counters since the previous call (for Prometheus counters). A rebuilt pipeline starts from 0, so a
    /// counter that went down counts from 0.
    pub fn frame_delta(&self) -> kiln_media::FrameStats {
        let now = {
            let p = self.pipeline.lock().unwrap_or_else(|e| e.into_inner());
            match p.as_ref() {
                Some(p) => p.frame_stats(),
                None => return Default::default(),
            }
        };
        let mut seen = self.frames_seen.lock().unwrap_or_else(|e| e.into_inner());
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

    fn set_state(&self, s: StreamState) {
        self.state.send_if_modified(|cur| {
            // Failed and Ended are final.
            let change = *cur != s && !matches!(*cur, StreamState::Failed | StreamState::Ended);
            if change {
                *cur = s;
            }
            change
        });
    }

    /// Pauses the stream's pipeline (no new parts until it resumes). Not reachable from the HTTP API.
    pub fn pause(&self) -> bool {
        let p = self.pipeline.lock().unwrap_or_else(|e| e.into_inner());
        p.as_ref().is_some_and(|p| p.pause().is_ok())
    }

    fn push_error(&self, e: String) {
        let mut v = self.errors.lock().unwrap_or_else(|e| e.into_inner());
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
                let (kind, width, height) = match r.info.kind {
                    RenditionKind::Video { width, height, .. } => {
                        ("video", Some(width), Some(height))
                    }
                    RenditionKind::Audio { .. } => ("audio", None, None),
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
            fallbacks: self
                .fallbacks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            created_unix_ms: self.created_unix_ms,
        }
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
    /// Resources booked on the host by admitted streams (and by streams being started).
    allocated: Mutex<Resources>,
    epoch: u64,
    /// Highest scheduler epoch accepted (fencing token; 0 = none).
    fence: std::sync::atomic::AtomicU64,
    /// What this host's GStreamer can build.
    pub registry: Arc<Registry>,
    /// GPUs and their bookings.
    pub gpus: GpuPool,
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
            config,
            origin,
            metrics,
            streams: Mutex::new(HashMap::new()),
            shutting_down: false.into(),
            allocated: Mutex::new(Resources::default()),
            epoch: unix_ms(),
            fence: 0.into(),
            registry,
            gpus,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<StreamHandle>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unix ms when this supervisor started: changes on every daemon restart.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Highest scheduler epoch this daemon has accepted.
    pub fn fence_epoch(&self) -> u64 {
        self.fence.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Accepts `epoch` if it is not older than the fence (raising the fence to it); otherwise returns the fence.
    pub fn raise_fence(&self, epoch: u64) -> Result<(), u64> {
        let prev = self
            .fence
            .fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
        if epoch < prev {
            Err(prev)
        } else {
            Ok(())
        }
    }

    /// Resources booked now.
    pub fn allocated(&self) -> Resources {
        *self.allocated.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's schedulable capacity.
    pub fn capacity(&self) -> Resources {
        self.config.capacity
    }

    /// Books `demand` on the host if it fits; never over-commits (check and add under one lock).
    fn reserve(&self, demand: &Resources) -> Result<(), SupervisorError> {
        let mut alloc = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        let free = self.config.capacity.minus(&alloc);
        if let Some(dimension) = free.short_dimension(demand) {
            return Err(SupervisorError::Capacity {
                dimension,
                requested: demand.dimension(dimension),
                free: free.dimension(dimension),
            });
        }
        *alloc = alloc.plus(demand);
        Ok(())
    }

    /// Books host resources for work that is not a stream (a VOD job); `false` when they do not fit.
    pub fn try_book(&self, demand: &Resources) -> bool {
        self.reserve(demand).is_ok()
    }

    /// Gives back what [`Self::try_book`] booked.
    pub fn unbook(&self, demand: &Resources) {
        self.release(demand);
    }

    fn release(&self, demand: &Resources) {
        let mut alloc = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        *alloc = alloc.minus(demand);
    }

    /// Releases what a stream has booked, once: its placement keeps the backend but books nothing afterwards.
    fn release_all(&self, h: &StreamHandle) {
        let mut p = h.placement.lock().unwrap_or_else(|e| e.into_inner());
        self.release_placement(&p);
        p.host = Resources::default();
        p.gpu = None;
    }

    /// Releases everything a placement booked.
    fn release_placement(&self, p: &Placement) {
        self.release(&p.host);
        if let Some((g, d)) = &p.gpu {
            self.gpus.release(*g, d);
        }
    }

    /// Chooses where `plan` runs under its policy and books it: NVENC on the first GPU with an encoder and room
    /// (`prefer-gpu`, `gpu-only`), else x264 on the CPU (`prefer-gpu`, `cpu-only`); an encoded source decodes on
    /// NVDEC where a GPU has a decoder and room. `force_cpu` is the fallback after an encoder failure.
    fn place(&self, plan: &StreamPlan, force_cpu: bool) -> Result<Placement, SupervisorError> {
        // an audio-only stream has nothing for NVENC: the CPU encodes its AAC whatever the policy
        let policy = if force_cpu || plan.video.is_empty() {
            Policy::CpuOnly
        } else {
            plan.encoder.policy
        };
        let gm = &self.config.gpu_model;
        let encoded = plan.source.is_encoded();
        let with_nvenc: Vec<u32> = self
            .gpus
            .slots
            .iter()
            .filter(|s| s.nvenc)
            .map(|s| s.index)
            .collect();
        let gpu_demand = |g: u32| {
            let nvdec = encoded && self.gpus.slots.iter().any(|s| s.index == g && s.nvdec);
            let d = gm.demand(plan, nvdec);
            (
                Resources {
                    cpu_millicores: 0,
                    memory_mib: 0,
                    ..d
                },
                Resources {
                    cpu_millicores: d.cpu_millicores,
                    memory_mib: d.memory_mib,
                    ..Default::default()
                },
                nvdec,
            )
        };
        let with_room: Vec<u32> = with_nvenc
            .iter()
            .copied()
            .filter(|g| {
                self.gpus
                    .free(*g)
                    .short_dimension(&gpu_demand(*g).0)
                    .is_none()
            })
            .collect();
        let backend = match self
            .registry
            .backend_for(policy, VideoCodec::H264, &with_room)
        {
            Ok(b) => b,
            Err(SelectError::GpuOnlyImpossible(_)) if !with_nvenc.is_empty() => {
                // GPUs with NVENC exist but are full: name the short dimension on the emptiest one
                let g = with_nvenc[0];
                let d = gpu_demand(g).0;
                let free = self.gpus.free(g);
                let dim = free.short_dimension(&d).unwrap_or("nvenc_fps");
                return Err(SupervisorError::Capacity {
                    dimension: dim,
                    requested: d.dimension(dim),
                    free: free.dimension(dim),
                });
            }
            Err(e) => return Err(SupervisorError::Policy(e.to_string())),
        };
        let placement = match backend {
            Backend::Nvenc { gpu } => {
                let (g, host, nvdec) = gpu_demand(gpu);
                Placement {
                    backend,
                    decode_gpu: nvdec.then_some(gpu),
                    host,
                    gpu: Some((gpu, g)),
                }
            }
            Backend::Cpu => {
                let host = self.config.cpu_model.demand(plan);
                // decode on NVDEC where a GPU has a decoder and room for it
                let decode = encoded
                    .then(|| {
                        self.gpus.slots.iter().filter(|s| s.nvdec).find_map(|s| {
                            let d = gm.demand(plan, true);
                            let dec = Resources {
                                nvdec_fps: d.nvdec_fps,
                                vram_mib: gm.vram_per_decoder_mib,
                                ..Default::default()
                            };
                            self.gpus
                                .free(s.index)
                                .short_dimension(&dec)
                                .is_none()
                                .then_some((s.index, dec))
                        })
                    })
                    .flatten();
                Placement {
                    backend,
                    decode_gpu: decode.map(|(g, _)| g),
                    host,
                    gpu: decode,
                }
            }
        };
        self.reserve(&placement.host)?;
        if let Some((g, d)) = &placement.gpu {
            if let Err((dimension, requested, free)) = self.gpus.reserve(*g, d) {
                self.release(&placement.host);
                return Err(SupervisorError::Capacity {
                    dimension,
                    requested,
                    free,
                });
            }
        }
        Ok(placement)
    }

    /// The media file of a `file://` source, inside the media directory (symlinks resolved).
    fn resolve_file(&self, plan: &StreamPlan) -> Result<Option<PathBuf>, SupervisorError> {
        let Source::File { path } = &plan.source else {
            return Ok(None);
        };
        let dir = self.config.media_dir.as_ref().ok_or_else(|| {
            SupervisorError::SourceFile(
                "file sources are disabled: start kilnd with --media-dir".into(),
            )
        })?;
        let root = dir
            .canonicalize()
            .map_err(|e| SupervisorError::SourceFile(format!("media directory: {e}")))?;
        let full = root.join(path).canonicalize().map_err(|_| {
            SupervisorError::SourceFile(format!("`{path}` does not exist in the media directory"))
        })?;
        if !full.starts_with(&root) || !full.is_file() {
            return Err(SupervisorError::SourceFile(format!(
                "`{path}` is not a file inside the media directory"
            )));
        }
        Ok(Some(full))
    }

    fn build_options(
        &self,
        placement: &Placement,
        file: Option<PathBuf>,
    ) -> Result<BuildOptions, SupervisorError> {
        let selection = self
            .registry
            .select(VideoCodec::H264, placement.backend, placement.decode_gpu)
            .map_err(|e| SupervisorError::Policy(e.to_string()))?;
        Ok(BuildOptions {
            registry: self.registry.clone(),
            selection,
            decode_gpu: placement.decode_gpu,
            file,
            #[cfg(feature = "fault-injection")]
            fail_encoder_after_frames: None,
        })
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
        if let Some(h) = self.get(id) {
            return if h.plan == plan {
                Ok((h, false))
            } else {
                Err(SupervisorError::Conflict(id.to_string()))
            };
        }

        let file = self.resolve_file(&plan)?;
        if let Source::Url { url, .. } = &plan.source {
            crate::fetch::check_source(&self.config.source_networks, url)
                .await
                .map_err(SupervisorError::SourceAddress)?;
        }
        let placement = self.place(&plan, false)?;
        match self.start(id, request, plan, placement, file, fault).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.release_placement(&placement);
                Err(e)
            }
        }
    }

    async fn start(
        self: &Arc<Self>,
        id: &str,
        request: StreamRequest,
        plan: StreamPlan,
        placement: Placement,
        file: Option<PathBuf>,
        fault: Option<u64>,
    ) -> Result<(Arc<StreamHandle>, bool), SupervisorError> {
        #[allow(unused_mut)]
        let mut opts = self.build_options(&placement, file.clone())?;
        #[cfg(feature = "fault-injection")]
        {
            opts.fail_encoder_after_frames = fault;
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = fault;
        let (pipeline, origin_ms, rx) = launch(&plan, opts, None).await?;

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
        let stream_origin = StreamOrigin::new(id, infos, pcfg);
        let handle = Arc::new(StreamHandle {
            plan,
            placement: Mutex::new(placement),
            request,
            file,
            fallbacks: Mutex::new(Vec::new()),
            frames_seen: Mutex::new(Default::default()),
            origin: stream_origin.clone(),
            pipeline: Mutex::new(Some(pipeline)),
            state: watch::channel(StreamState::Starting).0,
            errors: Mutex::new(Vec::new()),
            eos: watch::channel(false).0,
            created_unix_ms: unix_ms(),
        });
        {
            let mut map = self.map();
            if let Some(h) = map.get(id) {
                // Lost a race with an identical PUT: keep the first one (ours drops, stops and is released).
                return if h.plan == handle.plan {
                    self.release_placement(&handle.placement());
                    Ok((h.clone(), false))
                } else {
                    Err(SupervisorError::Conflict(id.to_string()))
                };
            }
            map.insert(id.to_string(), handle.clone());
        }
        self.origin.insert(stream_origin);
        self.metrics.init_stream(id);
        tokio::spawn(consume(
            handle.clone(),
            rx,
            self.metrics.clone(),
            Arc::downgrade(self),
            origin_ms,
        ));
        tracing::info!(
            stream = id,
            renditions = handle.origin.renditions.len(),
            backend = placement.backend.label(),
            decode_gpu = placement.decode_gpu,
            "stream started"
        );
        Ok((handle, true))
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
    fn begin_stop(h: &StreamHandle) -> Option<LivePipeline> {
        h.set_state(StreamState::Stopping);
        let p = h
            .pipeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        p.send_eos().then_some(p)
    }

    /// Waits (bounded by the grace period) for the drained EOS, tears the pipeline down, ends the playlists and
    /// schedules the stream's removal from the origin.
    async fn complete_stop(&self, h: Arc<StreamHandle>, pipeline: Option<LivePipeline>) {
        if let Some(p) = pipeline {
            let mut eos = h.eos.subscribe();
            let _ = tokio::time::timeout(self.config.grace, eos.wait_for(|e| *e)).await;
            let _ = tokio::task::spawn_blocking(move || drop(p)).await;
        }
        h.origin.end();
        h.set_state(StreamState::Ended);
        self.release_all(&h);
        tracing::info!(stream = %h.plan.id, "stream stopped");
        let origin = self.origin.clone();
        let linger = self.config.linger;
        let so = h.origin.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            origin.remove_if_same(&so);
            let names: Vec<String> = so.renditions.iter().map(|r| r.info.name.clone()).collect();
            metrics.forget_stream(&so.id, &names);
        });
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
        for (h, p) in begun {
            self.complete_stop(h, p).await;
        }
    }
}

/// Builds and starts a pipeline on a blocking thread. Returns it, the wall-clock ms of its running time 0 and its
/// events. `continue_from` continues an earlier pipeline's timeline (a rebuild).
async fn launch(
    plan: &StreamPlan,
    opts: BuildOptions,
    continue_from: Option<i64>,
) -> Result<(LivePipeline, i64, mpsc::Receiver<MediaEvent>), SupervisorError> {
    let (tx, rx) = mpsc::channel::<MediaEvent>(EVENT_QUEUE);
    let sink: kiln_media::EventSink = Arc::new(move |ev| {
        // Streaming threads may block briefly (backpressure); a message posted from inside the runtime (a
        // state change called from async code) must not.
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = tx.try_send(ev);
        } else {
            let _ = tx.blocking_send(ev);
        }
    });
    let plan = plan.clone();
    let (p, origin_ms) = tokio::task::spawn_blocking(move || {
        let p = LivePipeline::build_with(&plan, &opts, sink)?;
        let origin_ms = p.start_at(continue_from)?;
        Ok::<_, kiln_media::MediaError>((p, origin_ms))
    })
    .await
    .map_err(|e| SupervisorError::Media(e.to_string()))?
    .map_err(|e| SupervisorError::Media(e.to_string()))?;
    Ok((p, origin_ms, rx))
}

impl Supervisor {
    /// Rebuilds a running stream's pipeline on the CPU after its encoder failed: the old pipeline is torn down
    /// (freeing its NVENC session), its bookings released, the CPU placement booked (never over-committing: no
    /// room means the stream fails), and the new pipeline continues the stream's timeline. Bounded: a `gpu-only`
    /// stream never falls back, and more than [`MAX_RESTARTS`] rebuilds in [`RESTART_WINDOW_MS`] fail it.
    async fn fallback(
        &self,
        h: &Arc<StreamHandle>,
        error: &str,
        origin_ms: i64,
    ) -> Result<mpsc::Receiver<MediaEvent>, SupervisorError> {
        let now = unix_ms();
        let old = h.placement();
        if h.plan.encoder.policy == Policy::GpuOnly {
            return Err(SupervisorError::Policy(
                "the encoder failed and policy gpu-only forbids a CPU fallback".into(),
            ));
        }
        let recent = h
            .fallbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|f| now.saturating_sub(f.at_unix_ms) < RESTART_WINDOW_MS)
            .count();
        if recent >= MAX_RESTARTS {
            return Err(SupervisorError::Policy(format!(
                "the encoder failed {} times within {} s; not rebuilding again",
                recent + 1,
                RESTART_WINDOW_MS / 1000
            )));
        }
        let p = h.pipeline.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = p {
            let _ = tokio::task::spawn_blocking(move || drop(p)).await;
        }
        self.release_placement(&old);
        let nothing = Placement {
            host: Resources::default(),
            gpu: None,
            decode_gpu: None,
            ..old
        };
        *h.placement.lock().unwrap_or_else(|e| e.into_inner()) = nothing;
        let new = self.place(&h.plan, true)?;
        let started = async {
            let opts = self.build_options(&new, h.file.clone())?;
            launch(&h.plan, opts, Some(origin_ms)).await
        }
        .await;
        let (pipeline, _, rx) = match started {
            Ok(r) => r,
            Err(e) => {
                self.release_placement(&new);
                return Err(e);
            }
        };
        *h.pipeline.lock().unwrap_or_else(|e| e.into_inner()) = Some(pipeline);
        *h.placement.lock().unwrap_or_else(|e| e.into_inner()) = new;
        h.fallbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Fallback {
                at_unix_ms: now,
                from: old.backend,
                to: new.backend,
                reason: "encoder_error".into(),
                error: error.chars().take(300).collect(),
            });
        self.metrics
            .fallbacks
            .with_label_values(&[h.plan.id.as_str(), "encoder_error"])
            .inc();
        tracing::warn!(stream = %h.plan.id, from = old.backend.label(), to = new.backend.label(), %error, "encoder failed: pipeline rebuilt");
        Ok(rx)
    }
}

/// Whether a bus message came from an encoder element (`…/GstX264Enc:enc-720p`).
fn from_encoder(element: Option<&str>) -> bool {
    element
        .and_then(|e| e.rsplit('/').next())
        .and_then(|e| e.rsplit(':').next())
        .is_some_and(|n| n.starts_with("enc-"))
}

/// Feeds one stream's events into the origin, and records them in the metrics.
async fn consume(
    h: Arc<StreamHandle>,
    mut rx: mpsc::Receiver<MediaEvent>,
    metrics: Arc<crate::metrics::Metrics>,
    supervisor: std::sync::Weak<Supervisor>,
    origin_ms: i64,
) {
    let names: Vec<String> = h
        .origin
        .renditions
        .iter()
        .map(|r| r.info.name.clone())
        .collect();
    let mut media_ns = vec![0u64; names.len()];
    // after a rebuild, the first part of each rendition opens a discontinuity
    let mut discontinuity = vec![false; names.len()];
    let mut first_part: Option<std::time::Instant> = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            MediaEvent::Init {
                rendition,
                bytes,
                codec,
            } => h.origin.on_init(rendition, bytes, codec),
            MediaEvent::Part {
                rendition,
                mut part,
                at,
            } => {
                if let Some(d) = discontinuity.get_mut(rendition) {
                    part.discontinuity |= std::mem::take(d);
                }
                let (bytes, dur) = (part.bytes.len(), part.duration_ns);
                let published = h.origin.on_part(rendition, part);
                if let (Ok(_), Some(name)) = (&published, names.get(rendition)) {
                    let first = *first_part.get_or_insert(at);
                    media_ns[rendition] += dur;
                    metrics.part(
                        &h.plan.id,
                        name,
                        bytes,
                        std::time::Duration::from_nanos(dur),
                        at.elapsed(),
                    );
                    let wall = first.elapsed().as_secs_f64();
                    if wall >= 1.0 {
                        let slowest = media_ns.iter().copied().min().unwrap_or(0) as f64 / 1e9;
                        metrics
                            .realtime_ratio
                            .with_label_values(&[h.plan.id.as_str()])
                            .set(slowest / wall);
                    }
                }
                if let Err(e) = published {
                    tracing::debug!(stream = %h.plan.id, error = %e, "part dropped");
                } else if h.state() == StreamState::Starting
                    && h.origin
                        .renditions
                        .iter()
                        .all(|r| r.snapshot().last.is_some())
                {
                    h.set_state(StreamState::Running);
                }
            }
            MediaEvent::Warning { element, message } => {
                tracing::warn!(stream = %h.plan.id, ?element, %message, "pipeline warning");
            }
            MediaEvent::Error {
                element,
                message,
                debug: details,
            } => {
                tracing::error!(stream = %h.plan.id, ?element, %message, ?details, "pipeline error");
                metrics
                    .stream_errors
                    .with_label_values(&[h.plan.id.as_str()])
                    .inc();
                h.push_error(match &element {
                    Some(e) => format!("{e}: {message}"),
                    None => message.clone(),
                });
                let live = matches!(h.state(), StreamState::Starting | StreamState::Running);
                if live && from_encoder(element.as_deref()) {
                    if let Some(sup) = supervisor.upgrade() {
                        let why = match &details {
                            Some(d) => format!("{message} ({d})"),
                            None => message.clone(),
                        };
                        match sup.fallback(&h, &why, origin_ms).await {
                            Ok(new_rx) => {
                                rx = new_rx;
                                discontinuity.iter_mut().for_each(|d| *d = true);
                                continue;
                            }
                            Err(e) => h.push_error(format!("no fallback: {e}")),
                        }
                    }
                }
                h.set_state(StreamState::Failed);
                let p = h.pipeline.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(p) = p {
                    let _ = tokio::task::spawn_blocking(move || drop(p)).await;
                }
                h.origin.end();
                h.eos.send_replace(true);
                // a failed stream runs nothing: its bookings go back to the node at once
                if let Some(sup) = supervisor.upgrade() {
                    sup.release_all(&h);
                }
            }
            MediaEvent::Eos => {
                h.eos.send_replace(true);
                // The source itself ended (a URL source's EOS), not a stop: end the playlists and free the
                // bookings now; the stream stays listed as `ended` until it is deleted.
                if matches!(h.state(), StreamState::Starting | StreamState::Running) {
                    tracing::info!(stream = %h.plan.id, "the source ended: ending the stream");
                    h.origin.end();
                    h.set_state(StreamState::Ended);
                    if let Some(sup) = supervisor.upgrade() {
                        sup.release_all(&h);
                    }
                    let p = h.pipeline.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(p) = p {
                        let _ = tokio::task::spawn_blocking(move || drop(p)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Placement against a recorded registry and a synthetic GPU (no pipeline is started): the policy matrix,
    //! spill to the CPU, GPU-dimension refusals, NVDEC booking for encoded sources, release.
    use super::*;
    use crate::gpus::GpuSlot;

    fn l4(index: u32) -> GpuSlot {
        GpuSlot {
            index,
            name: "NVIDIA L4".into(),
            uuid: String::new(),
            profile: Some("l4".into()),
            nvenc: true,
            nvdec: true,
            capacity: Resources {
                nvenc_fps: 100,
                nvdec_fps: 1000,
                encoder_sessions: 1024,
                vram_mib: 20_000,
                ..Default::default()
            },
        }
    }

    fn supervisor(slots: Vec<GpuSlot>) -> Supervisor {
        let registry = Registry::from_names(
            (1, 22),
            &[
                "x264enc",
                "videoconvertscale",
                "nvh264enc",
                "nvh264dec",
                "avdec_h264",
            ],
        );
        let config = Config {
            gpus: Some(slots.clone()),
            // a fixed host, whatever machine runs the test
            capacity: Resources {
                cpu_millicores: 8000,
                memory_mib: 16_000,
                ..Default::default()
            },
            ..Default::default()
        };
        Supervisor::new(
            Arc::new(config),
            Origin::new(),
            Arc::new(crate::metrics::Metrics::new()),
            Arc::new(registry),
            GpuPool::new(slots),
        )
    }

    fn plan(sup: &Supervisor, source: &str, policy: Policy) -> StreamPlan {
        // 1080p30 + 720p30: 44 1080p-equivalent fps of NVENC
        let req: StreamRequest = serde_json::from_str(&format!(
            r#"{{"source": "{source}", "policy": "{}",
                "renditions": [{{"name": "a", "width": 1920, "height": 1080, "fps": 30, "bitrate_kbps": 5000}},
                               {{"name": "b", "width": 1280, "height": 720, "fps": 30, "bitrate_kbps": 2500}}]}}"#,
            policy.as_str()
        ))
        .unwrap();
        sup.config.presets.resolve("p", &req).unwrap()
    }

    #[test]
    fn policies_place_on_nvenc_spill_to_the_cpu_and_refuse_by_gpu_dimension() {
        let sup = supervisor(vec![l4(0)]);
        let gpu = plan(&sup, "test:", Policy::PreferGpu);
        let a = sup.place(&gpu, false).unwrap();
        assert_eq!(a.backend, Backend::Nvenc { gpu: 0 });
        assert_eq!(
            a.gpu.map(|(g, d)| (g, d.nvenc_fps, d.encoder_sessions)),
            Some((0, 44, 2))
        );
        assert!(
            a.host.cpu_millicores > 0 && a.host.cpu_millicores < 200,
            "{a:?}"
        );
        let b = sup.place(&gpu, false).unwrap();
        assert_eq!(b.backend, Backend::Nvenc { gpu: 0 });
        assert_eq!(sup.gpus.allocated(0).nvenc_fps, 88);
        // 12 fps of NVENC left: prefer-gpu spills to x264, gpu-only is refused on the GPU dimension
        let c = sup.place(&gpu, false).unwrap();
        assert_eq!((c.backend, c.gpu), (Backend::Cpu, None));
        sup.release_placement(&c);
        match sup.place(&plan(&sup, "test:", Policy::GpuOnly), false) {
            Err(SupervisorError::Capacity {
                dimension: "nvenc_fps",
                requested: 44,
                free: 12,
            }) => {}
            other => panic!("{other:?}"),
        }
        // cpu-only never touches the GPU; a rebuild after an encoder failure is CPU whatever the policy
        let cpu = sup
            .place(&plan(&sup, "test:", Policy::CpuOnly), false)
            .unwrap();
        assert_eq!((cpu.backend, cpu.gpu), (Backend::Cpu, None));
        sup.release_placement(&cpu);
        let rebuilt = sup.place(&gpu, true).unwrap();
        assert_eq!(rebuilt.backend, Backend::Cpu);
        sup.release_placement(&rebuilt);
        // releasing restores exactly
        sup.release_placement(&a);
        sup.release_placement(&b);
        assert_eq!(sup.gpus.allocated(0), Resources::default());
    }

    #[test]
    fn encoded_sources_book_nvdec_and_audio_only_stays_on_the_cpu() {
        let sup = supervisor(vec![l4(0)]);
        let p = sup
            .place(&plan(&sup, "file:///a.mp4", Policy::CpuOnly), false)
            .unwrap();
        assert_eq!((p.backend, p.decode_gpu), (Backend::Cpu, Some(0)));
        let (g, d) = p.gpu.unwrap();
        assert_eq!(
            (g, d.nvdec_fps, d.nvenc_fps, d.encoder_sessions),
            (0, 30, 0, 0)
        );
        let p = sup
            .place(&plan(&sup, "file:///a.mp4", Policy::PreferGpu), false)
            .unwrap();
        assert_eq!(
            (p.backend, p.decode_gpu),
            (Backend::Nvenc { gpu: 0 }, Some(0))
        );
        let radio = sup
            .config
            .presets
            .resolve(
                "r",
                &serde_json::from_str(
                    r#"{"source": "test:", "preset": "live-audio-only", "policy": "gpu-only"}"#,
                )
                .unwrap(),
            )
            .unwrap();
        assert_eq!(sup.place(&radio, false).unwrap().backend, Backend::Cpu);
        // no GPU at all: gpu-only is a policy error (422), not a capacity one
        let bare = supervisor(vec![]);
        assert!(matches!(
            bare.place(&plan(&bare, "test:", Policy::GpuOnly), false),
            Err(SupervisorError::Policy(_))
        ));
    }
}
