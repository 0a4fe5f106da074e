//! Stream life cycle: resolve → build → start → feed the origin → stop (EOS → ENDLIST) → linger → drop.
//!
//! Each stream owns its pipeline and one consumer task. The pipeline's streaming threads hand typed events to that
//! task over a bounded channel; the task feeds the origin. A failing stream records its error and stops alone:
//! nothing it does reaches another stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_llhls::PackagerConfig;
use kiln_media::{LivePipeline, MediaEvent};
use kiln_model::capacity::Resources;
use kiln_model::{
    PlanError, RenditionStatus, StreamPlan, StreamRequest, StreamState, StreamStatus,
};
use kiln_origin::{Origin, RenditionInfo, RenditionKind, StreamOrigin};
use tokio::sync::{mpsc, watch};

use crate::Config;

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
    /// What admission booked for this stream.
    pub demand: Resources,
    pub request: StreamRequest,
    pub origin: Arc<StreamOrigin>,
    pipeline: Mutex<Option<LivePipeline>>,
    state: watch::Sender<StreamState>,
    errors: Mutex<Vec<String>>,
    eos: watch::Sender<bool>,
    created_unix_ms: u64,
}

impl StreamHandle {
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
    /// Resources booked by admitted streams (and by streams being started).
    allocated: Mutex<Resources>,
    epoch: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Supervisor {
    pub fn new(config: Arc<Config>, origin: Origin, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            config,
            origin,
            metrics,
            streams: Mutex::new(HashMap::new()),
            shutting_down: false.into(),
            allocated: Mutex::new(Resources::default()),
            epoch: unix_ms(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<StreamHandle>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unix ms when this supervisor started: changes on every daemon restart.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Resources booked now.
    pub fn allocated(&self) -> Resources {
        *self.allocated.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's schedulable capacity.
    pub fn capacity(&self) -> Resources {
        self.config.capacity
    }

    /// Books `demand` if it fits; never over-commits (check and add under one lock).
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

    fn release(&self, demand: &Resources) {
        let mut alloc = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        *alloc = alloc.minus(demand);
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
        &self,
        id: &str,
        request: StreamRequest,
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

        let demand = self.config.cpu_model.demand(&plan);
        self.reserve(&demand)?;
        match self.start(id, request, plan, demand).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.release(&demand);
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        id: &str,
        request: StreamRequest,
        plan: StreamPlan,
        demand: Resources,
    ) -> Result<(Arc<StreamHandle>, bool), SupervisorError> {
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
        let build_plan = plan.clone();
        let started = tokio::task::spawn_blocking(move || {
            let p = LivePipeline::build(&build_plan, sink)?;
            let origin_ms = p.start()?;
            Ok::<_, kiln_media::MediaError>((p, origin_ms))
        })
        .await
        .map_err(|e| SupervisorError::Media(e.to_string()))?
        .map_err(|e| SupervisorError::Media(e.to_string()))?;
        let (pipeline, origin_ms) = started;

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
            demand,
            request,
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
                    self.release(&handle.demand);
                    Ok((h.clone(), false))
                } else {
                    Err(SupervisorError::Conflict(id.to_string()))
                };
            }
            map.insert(id.to_string(), handle.clone());
        }
        self.origin.insert(stream_origin);
        self.metrics.init_stream(id);
        tokio::spawn(consume(handle.clone(), rx, self.metrics.clone()));
        tracing::info!(
            stream = id,
            renditions = handle.origin.renditions.len(),
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
        self.release(&h.demand);
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

/// Feeds one stream's events into the origin, and records them in the metrics.
async fn consume(
    h: Arc<StreamHandle>,
    mut rx: mpsc::Receiver<MediaEvent>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let names: Vec<String> = h
        .origin
        .renditions
        .iter()
        .map(|r| r.info.name.clone())
        .collect();
    let mut media_ns = vec![0u64; names.len()];
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
                part,
                at,
            } => {
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
                h.push_error(match element {
                    Some(e) => format!("{e}: {message}"),
                    None => message,
                });
                h.set_state(StreamState::Failed);
                let p = h.pipeline.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(p) = p {
                    let _ = tokio::task::spawn_blocking(move || drop(p)).await;
                }
                h.origin.end();
                h.eos.send_replace(true);
            }
            MediaEvent::Eos => {
                h.eos.send_replace(true);
            }
        }
    }
}
