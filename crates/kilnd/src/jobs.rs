//! VOD jobs: a queue persisted on disk, a dispatcher bounded by capacity, and the runner that turns an input file
//! into an ABR ladder of CMAF segments with HLS and DASH manifests and thumbnails.
//!
//! - **Persistence.** Each job is `{data}/jobs/{id}.json` (its [`JobStatus`]), written atomically (temp file +
//!   rename) on every state change. At start the daemon reloads them: a job that was running when the daemon died
//!   is queued again and restarts from the beginning (its partial output is deleted), so no accepted job is lost.
//! - **Order and concurrency.** Queued jobs start by priority (higher first), then age; at most
//!   `max_concurrent` run, and each books its ladder's CPU cost in the same admission ledger as live streams, so
//!   VOD fills what live leaves free (one job may always run, so a large ladder on a small host is not starved).
//! - **Running.** Probe (codec allowlist, size limits), ladder ([`kiln_model::vod::ladder`]: never upscaled), then
//!   [`kiln_media::vod::VodPipeline`]; segments are written as they come to `{data}/vod/{id}.partial/`, renamed
//!   to `{data}/vod/{id}/` when complete. Served under `/vod/{id}/…` once done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_llhls::vod::{TrackKind, VodSegment, VodTrack};
use kiln_media::vod::{VodEvent, VodPipeline, VodPlan};
use kiln_model::capacity::Resources;
use kiln_model::vod::{
    JobInput, JobLinks, JobRendition, JobRequest, JobState, JobStatus,
    DEFAULT_THUMBNAIL_INTERVAL_S, DEFAULT_VOD_PRESET,
};
use kiln_model::StreamRequest;

use crate::supervisor::Supervisor;

/// Where jobs live and how many run at once.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// State (`jobs/`) and outputs (`vod/`).
    pub data_dir: PathBuf,
    /// `file://` inputs must resolve under it; without it, only http(s) inputs work.
    pub input_dir: Option<PathBuf>,
    pub max_concurrent: usize,
    /// Networks `http(s)` inputs may reach beyond public addresses (`--allow-networks`).
    pub url_policy: kiln_model::net::UrlPolicy,
    /// The largest `http(s)` input downloaded, in bytes.
    pub max_input_bytes: u64,
    /// Finished jobs (record and outputs) are deleted this long after they end; `None` keeps them.
    pub retention: Option<Duration>,
}

/// Default `--vod-max-input-bytes`: 64 GiB (a 4K mezzanine file of a few hours).
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 64 << 30;

impl JobsConfig {
    /// State in `data_dir`, no file inputs, 2 jobs at once, public URLs only, [`DEFAULT_MAX_INPUT_BYTES`].
    pub fn new(data_dir: PathBuf) -> JobsConfig {
        JobsConfig {
            data_dir,
            input_dir: None,
            max_concurrent: 2,
            url_policy: kiln_model::net::UrlPolicy::default(),
            max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
            retention: None,
        }
    }
}

/// Why a job call failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Invalid(String),
    #[error("job `{0}` does not exist")]
    NotFound(String),
    #[error("job `{0}` has already finished ({1:?})")]
    Finished(String, JobState),
    #[error("job `{0}` is {1:?}: cancel it first, then delete it")]
    NotFinished(String, JobState),
    #[error("storing the job failed: {0}")]
    Io(String),
}

#[derive(Debug)]
struct Entry {
    status: JobStatus,
    cancel: Arc<AtomicBool>,
    booked: Resources,
}

/// The job queue of this daemon.
#[derive(Debug)]
pub struct Jobs {
    cfg: JobsConfig,
    fetcher: crate::fetch::Fetcher,
    presets: kiln_config::Presets,
    cpu_model: kiln_model::capacity::CpuCostModel,
    entries: Mutex<BTreeMap<String, Entry>>,
    wake: tokio::sync::Notify,
    /// The daemon is stopping: running jobs are interrupted and go back to the queue.
    stopping: AtomicBool,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("j{:011x}{:08x}", unix_ms(), h.finish() as u32)
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Jobs {
    /// Opens the queue in `cfg.data_dir`, reloading persisted jobs (running ones go back to the queue).
    pub fn open(
        cfg: JobsConfig,
        presets: kiln_config::Presets,
        cpu_model: kiln_model::capacity::CpuCostModel,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(cfg.data_dir.join("jobs"))?;
        std::fs::create_dir_all(cfg.data_dir.join("vod"))?;
        // downloads of jobs that were running when the daemon stopped: those jobs start again from the fetch
        let _ = std::fs::remove_dir_all(cfg.data_dir.join("inputs"));
        std::fs::create_dir_all(cfg.data_dir.join("inputs"))?;
        let fetcher = crate::fetch::Fetcher::new(cfg.url_policy.clone(), cfg.max_input_bytes)
            .map_err(std::io::Error::other)?;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(cfg.data_dir.join("jobs"))? {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let mut status: JobStatus = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable job file");
                    continue;
                }
            };
            if status.state == JobState::Running {
                tracing::info!(job = %status.id, "was running when the daemon stopped: queued again");
                status.state = JobState::Queued;
                status.progress = 0.0;
                status.speed = None;
                status.eta_s = None;
                let _ = std::fs::remove_dir_all(
                    cfg.data_dir
                        .join("vod")
                        .join(format!("{}.partial", status.id)),
                );
                write_atomic(&path, &serde_json::to_vec_pretty(&status).expect("json"))?;
            }
            entries.insert(
                status.id.clone(),
                Entry {
                    status,
                    cancel: Arc::new(AtomicBool::new(false)),
                    booked: Resources::default(),
                },
            );
        }
        Ok(Self {
            cfg,
            fetcher,
            presets,
            cpu_model,
            entries: Mutex::new(entries),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, s: &JobStatus) -> Result<(), JobError> {
        let path = self
            .cfg
            .data_dir
            .join("jobs")
            .join(format!("{}.json", s.id));
        write_atomic(&path, &serde_json::to_vec_pretty(s).expect("json"))
            .map_err(|e| JobError::Io(e.to_string()))
    }

    /// Output directory of a finished job.
    pub fn output_dir(&self, id: &str) -> Option<PathBuf> {
        let done = self
            .lock()
            .get(id)
            .is_some_and(|e| e.status.state == JobState::Done);
        done.then(|| self.cfg.data_dir.join("vod").join(id))
    }

    /// `POST /v1/jobs`: validates what can be validated without the input and queues the job.
    pub fn submit(&self, req: JobRequest) -> Result<JobStatus, JobError> {
        req.validate()
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        let preset = req.preset.as_deref().unwrap_or(DEFAULT_VOD_PRESET);
        if self.presets.get(preset).is_none() {
            return Err(JobError::Invalid(format!(
                "unknown preset `{}`",
                preset.chars().take(64).collect::<String>()
            )));
        }
        let now = unix_ms();
        let status = JobStatus {
            id: new_id(),
            state: JobState::Queued,
            progress: 0.0,
            speed: None,
            eta_s: None,
            error: None,
            priority: req.priority,
            request: req,
            created_unix_ms: now,
            started_unix_ms: None,
            finished_unix_ms: None,
            attempts: 0,
            input_bytes: None,
            input_total_bytes: None,
            duration_s: None,
            renditions: Vec::new(),
            thumbnails: 0,
            links: JobLinks::default(),
        };
        self.persist(&status)?;
        self.lock().insert(
            status.id.clone(),
            Entry {
                status: status.clone(),
                cancel: Arc::new(AtomicBool::new(false)),
                booked: Resources::default(),
            },
        );
        self.wake.notify_one();
        Ok(status)
    }

    pub fn get(&self, id: &str) -> Option<JobStatus> {
        self.lock().get(id).map(|e| e.status.clone())
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let mut v: Vec<JobStatus> = self.lock().values().map(|e| e.status.clone()).collect();
        v.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        v
    }

    /// Queued and running jobs, and the slots, for the capacity report (the scheduler routes jobs by it).
    pub fn load(&self) -> kiln_model::node::VodLoad {
        let map = self.lock();
        let count = |st: JobState| map.values().filter(|e| e.status.state == st).count() as u32;
        kiln_model::node::VodLoad {
            queued: count(JobState::Queued),
            running: count(JobState::Running),
            slots: self.cfg.max_concurrent as u32,
        }
    }

    /// `DELETE /v1/jobs/{id}?purge=true`: forgets a finished job and deletes its outputs. A queued or running job
    /// must be cancelled first.
    pub fn purge(&self, id: &str) -> Result<(), JobError> {
        {
            let mut map = self.lock();
            let e = map
                .get(id)
                .ok_or_else(|| JobError::NotFound(id.to_string()))?;
            if !e.status.state.is_final() {
                return Err(JobError::NotFinished(id.to_string(), e.status.state));
            }
            map.remove(id);
        }
        let _ = std::fs::remove_file(self.cfg.data_dir.join("jobs").join(format!("{id}.json")));
        let vod = self.cfg.data_dir.join("vod");
        for dir in [vod.join(id), vod.join(format!("{id}.partial"))] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JobError::Io(format!("{}: {e}", dir.display()))),
            }
        }
        tracing::info!(job = %id, "job deleted with its outputs");
        Ok(())
    }

    /// Deletes finished jobs older than the retention (by their end time). Returns how many.
    fn sweep(&self) -> usize {
        let Some(keep) = self.cfg.retention else {
            return 0;
        };
        let cutoff = unix_ms().saturating_sub(keep.as_millis() as u64);
        let old: Vec<String> = self
            .lock()
            .values()
            .filter(|e| {
                e.status.state.is_final() && e.status.finished_unix_ms.is_some_and(|t| t <= cutoff)
            })
            .map(|e| e.status.id.clone())
            .collect();
        old.iter().filter(|id| self.purge(id).is_ok()).count()
    }

    /// `DELETE /v1/jobs/{id}`: a queued job is cancelled at once, a running one stops within a moment.
    pub fn cancel(&self, id: &str) -> Result<JobStatus, JobError> {
        let mut map = self.lock();
        let e = map
            .get_mut(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        match e.status.state {
            JobState::Queued => {
                e.status.state = JobState::Cancelled;
                e.status.finished_unix_ms = Some(unix_ms());
                let s = e.status.clone();
                drop(map);
                self.persist(&s)?;
                Ok(s)
            }
            JobState::Running => {
                e.cancel.store(true, Ordering::SeqCst);
                Ok(e.status.clone())
            }
            JobState::Cancelled => Ok(e.status.clone()),
            s => Err(JobError::Finished(id.to_string(), s)),
        }
    }

    /// The daemon is stopping: running jobs stop within a moment and are queued again (they restart at the next
    /// start); nothing new starts.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for e in self.lock().values() {
            if e.status.state == JobState::Running {
                e.cancel.store(true, Ordering::SeqCst);
            }
        }
        self.wake.notify_one();
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut JobStatus)) -> Option<JobStatus> {
        let mut map = self.lock();
        let e = map.get_mut(id)?;
        f(&mut e.status);
        Some(e.status.clone())
    }

    /// Moves a running job's progress forward to `done_s` of `total_s` media seconds (never back: the position
    /// query and the segments disagree by the encoder's lookahead), with speed and ETA from the wall time so far.
    fn advance(&self, id: &str, done_s: f64, total_s: f64, wall: Duration) {
        if !(done_s.is_finite() && done_s > 0.0 && total_s > 0.0) {
            return;
        }
        let done_s = done_s.min(total_s);
        let progress = (done_s / total_s).clamp(0.0, 0.99);
        let speed = done_s / wall.as_secs_f64().max(1e-3);
        self.update(id, |s| {
            if progress > s.progress {
                s.progress = progress;
                s.speed = Some(speed);
                s.eta_s = Some((total_s - done_s).max(0.0) / speed.max(1e-6));
            }
        });
    }

    /// What one job of this request books: its ladder's real-time CPU cost on this host.
    fn demand(&self, req: &JobRequest) -> Resources {
        let sreq = StreamRequest {
            source: "test:".into(),
            preset: Some(
                req.preset
                    .clone()
                    .unwrap_or_else(|| DEFAULT_VOD_PRESET.into()),
            ),
            renditions: req.renditions.clone(),
            ..Default::default()
        };
        self.presets
            .resolve("job", &sreq)
            .map(|plan| self.cpu_model.demand(&plan))
            .unwrap_or_default()
    }

    /// Starts queued jobs while there is room; runs until the task is dropped.
    pub async fn dispatch(
        self: Arc<Self>,
        sup: Arc<Supervisor>,
        metrics: Arc<crate::metrics::Metrics>,
    ) {
        loop {
            loop {
                if self.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let next = {
                    let map = self.lock();
                    let running = map
                        .values()
                        .filter(|e| e.status.state == JobState::Running)
                        .count();
                    if running >= self.cfg.max_concurrent {
                        None
                    } else {
                        map.values()
                            .filter(|e| e.status.state == JobState::Queued)
                            .min_by(|a, b| {
                                b.status
                                    .priority
                                    .cmp(&a.status.priority)
                                    .then(a.status.created_unix_ms.cmp(&b.status.created_unix_ms))
                                    .then(a.status.id.cmp(&b.status.id))
                            })
                            .map(|e| (e.status.id.clone(), e.status.request.clone(), running))
                    }
                };
                let Some((id, req, running)) = next else {
                    break;
                };
                let want = self.demand(&req);
                let cap = sup.capacity();
                // clamp to the node (a ladder larger than the host still runs, alone); one job may always run
                let want = Resources {
                    cpu_millicores: want.cpu_millicores.min(cap.cpu_millicores),
                    memory_mib: want.memory_mib.min(cap.memory_mib),
                    ..Resources::default()
                };
                let booked = if sup.try_book(&want) {
                    want
                } else if running == 0 {
                    Resources::default()
                } else {
                    break;
                };
                let Some(status) = self.update(&id, |s| {
                    s.state = JobState::Running;
                    s.attempts += 1;
                    s.started_unix_ms = Some(unix_ms());
                    s.progress = 0.0;
                    s.error = None;
                    s.input_bytes = None;
                    s.input_total_bytes = None;
                    s.duration_s = None;
                }) else {
                    sup.unbook(&booked);
                    continue;
                };
                if let Some(e) = self.lock().get_mut(&id) {
                    e.booked = booked;
                    e.cancel.store(false, Ordering::SeqCst);
                }
                let _ = self.persist(&status);
                tracing::info!(job = %id, priority = status.priority, attempt = status.attempts, "job started");
                let (me, sup2, m) = (self.clone(), sup.clone(), metrics.clone());
                tokio::task::spawn_blocking(move || {
                    let outcome = me.run(&id);
                    me.finish(&id, outcome, &sup2, &m);
                });
            }
            let swept = self.sweep();
            if swept > 0 {
                tracing::info!(jobs = swept, "finished jobs past their retention deleted");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn finish(
        &self,
        id: &str,
        outcome: Result<(), String>,
        sup: &Supervisor,
        metrics: &crate::metrics::Metrics,
    ) {
        let booked = self
            .lock()
            .get_mut(id)
            .map(|e| std::mem::take(&mut e.booked))
            .unwrap_or_default();
        sup.unbook(&booked);
        let cancelled = self
            .lock()
            .get(id)
            .is_some_and(|e| e.cancel.load(Ordering::SeqCst));
        let status = self.update(id, |s| {
            s.finished_unix_ms = Some(unix_ms());
            s.eta_s = None;
            match (&outcome, cancelled) {
                // interrupted by a daemon stop, not by a user: back to the queue
                (_, true) if self.stopping.load(Ordering::SeqCst) => {
                    s.state = JobState::Queued;
                    s.progress = 0.0;
                    s.speed = None;
                    s.finished_unix_ms = None;
                }
                (_, true) => s.state = JobState::Cancelled,
                (Ok(()), false) => {
                    s.state = JobState::Done;
                    s.progress = 1.0;
                }
                (Err(e), false) => {
                    s.state = JobState::Failed;
                    s.error = Some(e.clone());
                }
            }
        });
        let _ = std::fs::remove_file(self.download_path(id));
        if let Some(s) = status {
            if s.state != JobState::Done {
                let _ = std::fs::remove_dir_all(
                    self.cfg.data_dir.join("vod").join(format!("{id}.partial")),
                );
            }
            tracing::info!(job = %id, state = ?s.state, error = ?s.error, "job finished");
            if s.state == JobState::Done {
                metrics
                    .vod_media_seconds
                    .inc_by(s.duration_s.unwrap_or(0.0));
            }
            metrics.vod_input_bytes.inc_by(s.input_bytes.unwrap_or(0));
            if let (Some(a), Some(b)) = (s.started_unix_ms, s.finished_unix_ms) {
                metrics
                    .vod_busy_seconds
                    .inc_by(b.saturating_sub(a) as f64 / 1000.0);
            }
            let _ = self.persist(&s);
        }
        self.wake.notify_one();
    }

    /// Where an `http(s)` input is downloaded to (deleted when the job ends).
    fn download_path(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("inputs").join(id)
    }

    /// Resolves the input to a local file URI GStreamer can open: files must be under the input directory;
    /// URLs are downloaded first ([`crate::fetch`]: address policy, size limit, stall timeout).
    fn input_uri(&self, id: &str, req: &JobRequest, cancel: &AtomicBool) -> Result<String, String> {
        match req.parse_input().map_err(|e| e.to_string())? {
            JobInput::Url(u) => {
                let dest = self.download_path(id);
                let mut last = Instant::now();
                let mut progress = |got: u64, total: Option<u64>| {
                    if last.elapsed() >= PROGRESS_POLL || total == Some(got) {
                        last = Instant::now();
                        self.update(id, |s| {
                            s.input_bytes = Some(got);
                            s.input_total_bytes = total;
                        });
                    }
                };
                let got = tokio::runtime::Handle::current().block_on(self.fetcher.fetch(
                    &u,
                    &dest,
                    cancel,
                    &mut progress,
                ))?;
                self.update(id, |s| s.input_bytes = Some(got));
                tracing::info!(job = %id, bytes = got, "input downloaded");
                Ok(file_uri(&dest))
            }
            JobInput::File(p) => {
                let dir = self
                    .cfg
                    .input_dir
                    .as_ref()
                    .ok_or("file inputs are disabled: start kilnd with --vod-input-dir")?;
                let dir = dir
                    .canonicalize()
                    .map_err(|e| format!("the input directory: {e}"))?;
                let path = Path::new(&p)
                    .canonicalize()
                    .map_err(|e| format!("input file {p}: {e}"))?;
                if !path.starts_with(&dir) {
                    return Err(format!("input file {p} is outside the input directory"));
                }
                let meta = std::fs::metadata(&path).map_err(|e| format!("input file {p}: {e}"))?;
                if !meta.is_file() {
                    return Err(format!("input {p} is not a regular file"));
                }
                if meta.len() == 0 {
                    return Err(format!("input file {p} is empty"));
                }
                path.to_str().ok_or("the input path is not UTF-8")?;
                Ok(file_uri(&path))
            }
        }
    }

    /// Runs one job to the end (blocking; called on a blocking thread).
    fn run(&self, id: &str) -> Result<(), String> {
        let (req, cancel) = {
            let map = self.lock();
            let e = map.get(id).ok_or("job vanished")?;
            (e.status.request.clone(), e.cancel.clone())
        };
        let uri = self.input_uri(id, &req, &cancel)?;
        let probe = kiln_media::vod::probe(&uri, Duration::from_secs(20))?;
        let preset = self
            .presets
            .get(req.preset.as_deref().unwrap_or(DEFAULT_VOD_PRESET))
            .ok_or("unknown preset")?
            .clone();
        let requested = req
            .renditions
            .clone()
            .unwrap_or_else(|| preset.video.clone());
        let (video, fps, convert_rate) = match &probe.video {
            Some(v) if !requested.is_empty() => {
                let ladder = kiln_model::vod::ladder(v.width, v.height, &requested);
                let want = requested[0].fps;
                let src = if v.fps.0 > 0 {
                    v.fps
                } else {
                    (want.num, want.den)
                };
                // never above the source's rate, nor above the preset's
                let faster = f64::from(src.0) / f64::from(src.1.max(1)) > want.as_f64() + 0.01;
                (
                    ladder,
                    if faster { (want.num, want.den) } else { src },
                    faster,
                )
            }
            _ => (Vec::new(), (30, 1), false),
        };
        let audio_kbps = match (&preset.audio, probe.audio.is_empty()) {
            (Some(a), false) => Some(a.bitrate_kbps),
            _ => None,
        };
        if video.is_empty() && audio_kbps.is_none() {
            return Err("nothing to encode: the input has no stream this preset makes".into());
        }
        let interval = req
            .thumbnail_interval_s
            .unwrap_or(DEFAULT_THUMBNAIL_INTERVAL_S);
        let thumbs = (req.outputs.thumbnails && !video.is_empty()).then_some((interval, 640));
        self.update(id, |s| {
            s.duration_s = Some(probe.duration_s);
            s.renditions = video
                .iter()
                .map(|v| JobRendition {
                    name: v.name.clone(),
                    width: v.width,
                    height: v.height,
                    bitrate_kbps: v.bitrate_kbps,
                    playlist: format!("/vod/{id}/{}/index.m3u8", v.name),
                })
                .collect();
        });
        let out = self.cfg.data_dir.join("vod").join(format!("{id}.partial"));
        let _ = std::fs::remove_dir_all(&out);
        let mut names: Vec<String> = video.iter().map(|v| v.name.clone()).collect();
        if audio_kbps.is_some() {
            names.push("audio".into());
        }
        for n in &names {
            std::fs::create_dir_all(out.join(n)).map_err(|e| format!("output: {e}"))?;
        }
        let plan = VodPlan {
            uri,
            video: video.clone(),
            fps,
            convert_rate,
            rotation: probe.video.as_ref().map_or(0, |v| v.rotation),
            audio_kbps,
            segment_ms: preset.segment_ms,
            x264_speed: req.x264_speed.unwrap_or(preset.encoder.x264_speed),
            thumbnails: thumbs,
        };
        let (tx, rx) = std::sync::mpsc::channel::<VodEvent>();
        let tx = Mutex::new(tx);
        let pipeline = VodPipeline::build(
            &plan,
            Arc::new(move |e| {
                let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(e);
            }),
        )
        .map_err(|e| e.to_string())?;
        pipeline.start().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut tracks: Vec<VodTrack> = names
            .iter()
            .enumerate()
            .map(|(i, n)| VodTrack {
                name: n.clone(),
                kind: match video.get(i) {
                    Some(v) => TrackKind::Video {
                        width: v.width,
                        height: v.height,
                        fps: f64::from(fps.0) / f64::from(fps.1.max(1)),
                    },
                    None => TrackKind::Audio {
                        sample_rate: 48_000,
                        channels: probe.audio.first().map_or(2, |a| a.channels.clamp(1, 2)),
                    },
                },
                codecs: String::new(),
                bitrate_kbps: video
                    .get(i)
                    .map_or(audio_kbps.unwrap_or(128), |v| v.bitrate_kbps),
                timescale: 90_000,
                segments: Vec::new(),
            })
            .collect();
        let mut thumbnails: Vec<(u64, u32, u32, Vec<u8>)> = Vec::new();
        let mut last_event = Instant::now();
        let mut last_poll = Instant::now();
        loop {
            if cancel.load(Ordering::SeqCst) {
                pipeline.stop();
                return Err("cancelled".into());
            }
            // between segments (seconds apart), progress follows the pipeline's position
            if last_poll.elapsed() >= PROGRESS_POLL {
                last_poll = Instant::now();
                if let Some(pos) = pipeline.position_ns() {
                    let done_s = pos as f64 / 1e9;
                    self.advance(id, done_s, probe.duration_s, started.elapsed());
                }
            }
            let ev = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => {
                    last_event = Instant::now();
                    ev
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    // a pipeline that produces nothing for this long is stuck: fail the job rather than hold a slot
                    if last_event.elapsed() > STALL_LIMIT {
                        pipeline.stop();
                        return Err(format!(
                            "the pipeline stalled: no output for {} s",
                            STALL_LIMIT.as_secs()
                        ));
                    }
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the pipeline went away".into())
                }
            };
            match ev {
                VodEvent::Init {
                    track,
                    bytes,
                    codec,
                    timescale,
                } => {
                    let t = tracks.get_mut(track).ok_or("unknown track")?;
                    t.codecs = codec.unwrap_or_default();
                    t.timescale = timescale;
                    std::fs::write(out.join(&t.name).join("init.mp4"), &bytes)
                        .map_err(|e| format!("output: {e}"))?;
                }
                VodEvent::Segment {
                    track,
                    bytes,
                    start,
                    duration,
                } => {
                    let t = tracks.get_mut(track).ok_or("unknown track")?;
                    let n = t.segments.len() + 1;
                    std::fs::write(out.join(&t.name).join(format!("seg-{n}.m4s")), &bytes)
                        .map_err(|e| format!("output: {e}"))?;
                    t.segments.push(VodSegment {
                        start,
                        duration,
                        bytes: bytes.len() as u64,
                    });
                    if track == 0 {
                        let done_s = (start + duration) as f64 / f64::from(t.timescale.max(1));
                        self.advance(id, done_s, probe.duration_s, started.elapsed());
                    }
                }
                VodEvent::Thumbnail {
                    pts_ns,
                    width,
                    height,
                    rgb,
                } => thumbnails.push((pts_ns, width, height, rgb)),
                VodEvent::Error(e) => {
                    pipeline.stop();
                    return Err(format!("transcoding failed: {e}"));
                }
                VodEvent::Eos => break,
            }
        }
        pipeline.stop();
        // the output must cover the input: a truncated file decodes to an early end
        let encoded = tracks.first().map_or(0.0, VodTrack::duration_s);
        if encoded < probe.duration_s * 0.9 - 0.5 {
            return Err(format!(
                "the input ended early: {encoded:.2} s decoded of the {:.2} s it declares (truncated or corrupt)",
                probe.duration_s
            ));
        }
        for t in &tracks {
            if t.segments.is_empty() {
                return Err(format!("rendition {} produced no segment", t.name));
            }
            std::fs::write(
                out.join(&t.name).join("index.m3u8"),
                kiln_llhls::vod::media_playlist(t),
            )
            .map_err(|e| format!("output: {e}"))?;
        }
        std::fs::write(
            out.join("master.m3u8"),
            kiln_llhls::vod::master_playlist(&tracks),
        )
        .map_err(|e| format!("output: {e}"))?;
        let mut links = JobLinks {
            master: Some(format!("/vod/{id}/master.m3u8")),
            ..Default::default()
        };
        if req.outputs.dash {
            std::fs::write(out.join("manifest.mpd"), kiln_llhls::vod::mpd(&tracks))
                .map_err(|e| format!("output: {e}"))?;
            links.mpd = Some(format!("/vod/{id}/manifest.mpd"));
        }
        // one thumbnail per interval inside the video (a frame repeated at the very end does not count)
        let step = u64::from(interval) * 1_000_000_000;
        let end_ns = (encoded * 1e9) as u64;
        let mut seen = std::collections::BTreeSet::new();
        thumbnails.retain(|t| t.0 < end_ns && seen.insert(t.0 / step));
        let mut count = 0;
        if !thumbnails.is_empty() {
            count = write_thumbnails(
                &out,
                &thumbnails,
                interval,
                encoded.max(probe.duration_s.min(encoded + 1.0)),
            )?;
            links.poster = Some(format!("/vod/{id}/poster.jpg"));
            links.sprite = Some(format!("/vod/{id}/sprite.jpg"));
            links.thumbnails_vtt = Some(format!("/vod/{id}/thumbnails.vtt"));
        }
        let done = self.cfg.data_dir.join("vod").join(id);
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(&out, &done).map_err(|e| format!("output: {e}"))?;
        let wall = started.elapsed().as_secs_f64().max(1e-3);
        self.update(id, |s| {
            s.links = links;
            s.thumbnails = count;
            s.speed = Some(encoded / wall);
        });
        Ok(())
    }
}

/// `file://` URI of a local path, percent-encoding what a URI cannot carry raw.
fn file_uri(path: &Path) -> String {
    let mut uri = String::from("file://");
    for b in path.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

/// A running job that produces nothing (no segment, no thumbnail) for this long fails.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// How often a running job's progress is read from the pipeline's position between segments.
const PROGRESS_POLL: Duration = Duration::from_millis(500);

/// Tile width in the sprite sheet, and tiles per row.
const TILE_WIDTH: u32 = 160;
const SPRITE_COLUMNS: u32 = 10;

/// `poster.jpg` (the thumbnail nearest 10 % into the video, full thumbnail size), `sprite.jpg` (every thumbnail,
/// 160 px wide, 10 per row) and `thumbnails.vtt` (the scrubbing index). Returns the thumbnail count.
fn write_thumbnails(
    out: &Path,
    thumbs: &[(u64, u32, u32, Vec<u8>)],
    interval_s: u32,
    duration_s: f64,
) -> Result<u32, String> {
    use image::{imageops, RgbImage};
    let to_img = |(_, w, h, rgb): &(u64, u32, u32, Vec<u8>)| {
        RgbImage::from_raw(*w, *h, rgb.clone()).ok_or("a thumbnail frame has the wrong size")
    };
    let target = (duration_s * 0.1 * 1e9) as u64;
    let poster = thumbs
        .iter()
        .min_by_key(|t| t.0.abs_diff(target))
        .expect("non-empty");
    let jpeg = |img: &RgbImage, path: &Path| -> Result<(), String> {
        let f = std::fs::File::create(path).map_err(|e| format!("thumbnails: {e}"))?;
        let mut w = std::io::BufWriter::new(f);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 85)
            .encode_image(img)
            .map_err(|e| format!("thumbnails: {e}"))
    };
    jpeg(&to_img(poster)?, &out.join("poster.jpg"))?;
    let (w, h) = (poster.1, poster.2);
    let th = ((u64::from(h) * u64::from(TILE_WIDTH) / u64::from(w.max(1))) as u32).max(1);
    let n = thumbs.len() as u32;
    let cols = SPRITE_COLUMNS.min(n);
    let rows = n.div_ceil(SPRITE_COLUMNS);
    let mut sprite = RgbImage::new(TILE_WIDTH * cols, th * rows);
    for (i, t) in thumbs.iter().enumerate() {
        let tile = imageops::resize(&to_img(t)?, TILE_WIDTH, th, imageops::FilterType::Triangle);
        let i = i as u32;
        imageops::replace(
            &mut sprite,
            &tile,
            i64::from(i % SPRITE_COLUMNS * TILE_WIDTH),
            i64::from(i / SPRITE_COLUMNS * th),
        );
    }
    jpeg(&sprite, &out.join("sprite.jpg"))?;
    std::fs::write(
        out.join("thumbnails.vtt"),
        kiln_llhls::vod::thumbnails_vtt(
            n,
            interval_s,
            duration_s,
            (TILE_WIDTH, th),
            SPRITE_COLUMNS,
            "sprite.jpg",
        ),
    )
    .map_err(|e| format!("thumbnails: {e}"))?;
    Ok(n)
}
