//! VOD jobs: a queue persisted on disk, a dispatcher bounded by capacity, and the runner that turns an input file
//! into an ABR ladder of CMAF segments with HLS and DASH manifests and thumbnails.
//!
//! - **Persistence** (`store`). Each job is `{data}/jobs/{id}.json` (its [`JobStatus`]), written atomically (a
//!   uniquely named temporary file in the same directory, fsync, rename) on every state change. At start the
//!   daemon reloads them: a job that was running when the daemon died is queued again and restarts from the
//!   beginning (its partial output is deleted), so no accepted job is lost.
//! - **Order and concurrency** (`dispatch`). Queued jobs start by priority (higher first), then age; at most
//!   `max_concurrent` run, and each books its ladder's CPU cost in the same admission ledger as live streams, so
//!   VOD fills what live leaves free (one job may always run, so a large ladder on a small host is not starved).
//!   A job moves from queued to running only by a check-and-set under the queue's lock, so a job cancelled while
//!   the dispatcher books its resources stays cancelled and its booking is given back.
//! - **Planning** ([`kiln_model::vod::plan_job`], pure). The probe and the preset are summarised (`plan`) and the
//!   plan decides the ladder (never upscaled), the frame rate, the GOP, the x264 speed, audio and thumbnails.
//! - **Running** (`run`). Input (`input`: a file under the input directory, or a download), probe (codec
//!   allowlist, size limits), plan, then [`kiln_media::vod::VodPipeline`]; segments are written as they come to
//!   `{data}/vod/{id}.partial/`, then the playlists, the MPD and the thumbnails (`thumbnails`), and the directory is renamed
//!   to `{data}/vod/{id}/` when complete. Served under `/vod/{id}/…` once done. Failures are [`RunError`]s; their
//!   text is what `JobStatus.error` shows.
//!
//! Every event about one job is logged inside a `job{id=…}` span. This module depends only downwards (the
//! supervisor's admission ledger, metrics, the fetcher), never on the HTTP API or the daemon's state.

mod dispatch;
mod input;
mod plan;
mod run;
mod store;
mod thumbnails;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_model::capacity::Resources;
use kiln_model::vod::{JobLinks, JobRequest, JobState, JobStatus, DEFAULT_VOD_PRESET};
use parking_lot::Mutex;

pub use run::RunError;
pub(crate) use store::write_atomic;
pub use thumbnails::ThumbnailError;

pub use crate::config::{JobsConfig, DEFAULT_MAX_INPUT_BYTES};

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

/// One job in memory: its status, its cancel flag (read by the runner) and what it has booked.
#[derive(Debug)]
struct Entry {
    status: JobStatus,
    cancel: Arc<AtomicBool>,
    booked: Resources,
}

impl Entry {
    fn new(status: JobStatus) -> Self {
        Entry {
            status,
            cancel: Arc::new(AtomicBool::new(false)),
            booked: Resources::default(),
        }
    }
}

/// The job queue of this daemon.
#[derive(Debug)]
pub struct Jobs {
    cfg: JobsConfig,
    store: store::Store,
    fetcher: crate::fetch::Fetcher,
    presets: kiln_config::Presets,
    cpu_model: kiln_model::capacity::CpuCostModel,
    entries: Mutex<BTreeMap<String, Entry>>,
    wake: tokio::sync::Notify,
    /// The daemon is stopping: running jobs are interrupted and go back to the queue.
    stopping: AtomicBool,
    /// The node is draining: running jobs finish, queued ones wait (on disk) for the node's next start.
    paused: AtomicBool,
    /// Where `job.done` and `job.failed` go (`--webhook-url`).
    pub webhooks: std::sync::OnceLock<Arc<crate::webhooks::Webhooks>>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new job id: `j` + 11 hex digits of a millisecond stamp + 8 random hex digits. The stamp never repeats in a
/// process (it moves one past the last when two jobs arrive in the same millisecond), so ids sort in submission
/// order, which is the dispatcher's last tie-break.
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = unix_ms();
    let stamp = match LAST.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
        Some(now.max(last + 1))
    }) {
        Ok(last) | Err(last) => now.max(last + 1),
    };
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("j{stamp:011x}{:08x}", h.finish() as u32)
}

/// How often a running job's progress is updated between segments (from the pipeline's position), and during a
/// download.
const PROGRESS_POLL: Duration = Duration::from_millis(500);

/// The span every event about job `id` is logged in.
fn job_span(id: &str) -> tracing::Span {
    tracing::info_span!("job", id = %id)
}

impl Jobs {
    /// Opens the queue in `cfg.data_dir`, reloading persisted jobs (running ones go back to the queue).
    pub fn open(
        cfg: JobsConfig,
        presets: kiln_config::Presets,
        cpu_model: kiln_model::capacity::CpuCostModel,
    ) -> std::io::Result<Self> {
        let store = store::Store::open(cfg.data_dir.clone())?;
        let fetcher = crate::fetch::Fetcher::new(cfg.url_policy.clone(), cfg.max_input_bytes)
            .map_err(std::io::Error::other)?;
        let entries = store
            .load_all()?
            .into_iter()
            .map(|s| (s.id.clone(), Entry::new(s)))
            .collect();
        Ok(Self {
            cfg,
            store,
            fetcher,
            presets,
            cpu_model,
            entries: Mutex::new(entries),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            webhooks: std::sync::OnceLock::new(),
        })
    }

    /// Output directory of a finished job.
    pub fn output_dir(&self, id: &str) -> Option<PathBuf> {
        let done = self
            .entries
            .lock()
            .get(id)
            .is_some_and(|e| e.status.state == JobState::Done);
        done.then(|| self.store.output_dir(id))
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
        self.price(&req).map_err(JobError::Invalid)?;
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
            interrupted: 0,
            input_bytes: None,
            input_total_bytes: None,
            duration_s: None,
            renditions: Vec::new(),
            thumbnails: 0,
            links: JobLinks::default(),
        };
        self.store.save(&status)?;
        self.entries
            .lock()
            .insert(status.id.clone(), Entry::new(status.clone()));
        self.wake.notify_one();
        Ok(status)
    }

    pub fn get(&self, id: &str) -> Option<JobStatus> {
        self.entries.lock().get(id).map(|e| e.status.clone())
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let mut v: Vec<JobStatus> = self
            .entries
            .lock()
            .values()
            .map(|e| e.status.clone())
            .collect();
        v.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        v
    }

    /// Queued and running jobs, and the slots, for the capacity report (the scheduler routes jobs by it).
    pub fn load(&self) -> kiln_model::node::VodLoad {
        let map = self.entries.lock();
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
            let mut map = self.entries.lock();
            let e = map
                .get(id)
                .ok_or_else(|| JobError::NotFound(id.to_string()))?;
            if !e.status.state.is_final() {
                return Err(JobError::NotFinished(id.to_string(), e.status.state));
            }
            map.remove(id);
        }
        self.store.remove(id)?;
        job_span(id).in_scope(|| tracing::info!("job deleted with its outputs"));
        Ok(())
    }

    /// Deletes finished jobs older than the retention (by their end time). Returns how many.
    fn sweep(&self) -> usize {
        let Some(keep) = self.cfg.retention else {
            return 0;
        };
        let cutoff = unix_ms().saturating_sub(keep.as_millis() as u64);
        let old: Vec<String> = self
            .entries
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
        let mut map = self.entries.lock();
        let e = map
            .get_mut(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        match e.status.state {
            JobState::Queued => {
                e.status.state = JobState::Cancelled;
                e.status.finished_unix_ms = Some(unix_ms());
                let s = e.status.clone();
                drop(map);
                self.save_final(&s);
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

    /// The node is draining: nothing new starts; running jobs go on.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// The daemon is stopping: running jobs stop within a moment and are queued again (they restart at the next
    /// start); nothing new starts.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let running: Vec<JobStatus> = self
            .entries
            .lock()
            .values()
            .filter(|e| e.status.state == JobState::Running)
            .map(|e| {
                e.cancel.store(true, Ordering::SeqCst);
                e.status.clone()
            })
            .collect();
        // stored as queued now, not when their threads return: one that outlasts the runtime's stop (a probe, a
        // download chunk, writing outputs) would otherwise stay `running` on disk and count as a death of the
        // daemon at the next start (`interrupted`)
        for s in running {
            let _ = self.store.save(&JobStatus {
                state: JobState::Queued,
                progress: 0.0,
                speed: None,
                eta_s: None,
                ..s
            });
        }
        self.wake.notify_one();
    }

    /// Changes job `id`'s status in memory (the caller persists it when it matters); `None` if it is gone.
    fn update(&self, id: &str, f: impl FnOnce(&mut JobStatus)) -> Option<JobStatus> {
        let mut map = self.entries.lock();
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
}

/// Test helpers shared by the submodules' tests: a queue in a temporary directory with the built-in presets.
#[cfg(test)]
mod testing {
    use super::*;

    pub(super) fn jobs(dir: &std::path::Path, max_concurrent: usize) -> Arc<Jobs> {
        let cfg = JobsConfig {
            max_concurrent,
            ..JobsConfig::new(dir.to_path_buf())
        };
        Arc::new(
            Jobs::open(
                cfg,
                kiln_config::Presets::builtin(),
                kiln_config::builtin_cpu_profile(),
            )
            .expect("open"),
        )
    }

    pub(super) fn request(priority: i32) -> JobRequest {
        JobRequest {
            input: "file:///media/a.mp4".into(),
            preset: None,
            renditions: None,
            priority,
            outputs: Default::default(),
            thumbnail_interval_s: None,
            x264_speed: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{jobs, request};
    use super::*;

    #[test]
    fn a_cancelled_queued_job_is_final_on_disk_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let a = j.submit(request(0)).unwrap();
        let b = j.submit(request(0)).unwrap();
        assert_eq!(j.cancel(&a.id).unwrap().state, JobState::Cancelled);
        // cancelling twice is not an error; purging a queued job is
        assert_eq!(j.cancel(&a.id).unwrap().state, JobState::Cancelled);
        assert!(matches!(
            j.purge(&b.id),
            Err(JobError::NotFinished(_, JobState::Queued))
        ));
        assert_eq!(
            j.load(),
            kiln_model::node::VodLoad {
                queued: 1,
                running: 0,
                slots: 2
            }
        );
        drop(j);
        let j = jobs(dir.path(), 2);
        assert_eq!(j.get(&a.id).unwrap().state, JobState::Cancelled);
        assert_eq!(j.get(&b.id).unwrap().state, JobState::Queued);
        j.purge(&a.id).unwrap();
        assert!(j.get(&a.id).is_none());
        assert!(!dir
            .path()
            .join("jobs")
            .join(format!("{}.json", a.id))
            .exists());
        assert!(matches!(j.cancel(&a.id), Err(JobError::NotFound(_))));
    }

    #[test]
    fn an_unknown_preset_or_a_bad_input_is_refused_at_submit() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let unknown = JobRequest {
            preset: Some("nope".into()),
            ..request(0)
        };
        assert!(
            matches!(j.submit(unknown), Err(JobError::Invalid(m)) if m == "unknown preset `nope`")
        );
        let bad = JobRequest {
            input: "ftp://x/y".into(),
            ..request(0)
        };
        assert!(matches!(j.submit(bad), Err(JobError::Invalid(_))));
        assert!(j.list().is_empty());
    }

    #[test]
    fn progress_only_moves_forward() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let id = j.submit(request(0)).unwrap().id;
        j.advance(&id, 5.0, 10.0, Duration::from_secs(1));
        let s = j.get(&id).unwrap();
        assert_eq!(s.progress, 0.5);
        assert_eq!(s.speed, Some(5.0));
        assert_eq!(s.eta_s, Some(1.0));
        // the position query lags the segments: an earlier position does not move progress back
        j.advance(&id, 3.0, 10.0, Duration::from_secs(2));
        assert_eq!(j.get(&id).unwrap().progress, 0.5);
        // never 100 % before the job is done
        j.advance(&id, 20.0, 10.0, Duration::from_secs(3));
        assert_eq!(j.get(&id).unwrap().progress, 0.99);
    }
}
