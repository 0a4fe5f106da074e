//! The dispatcher: starts queued jobs while there is room, and settles each job when its runner returns.
//!
//! A start is three steps: [select](Jobs::select_next) the best queued job (priority, then age) under the lock,
//! [book](Jobs::book) its CPU cost in the admission [`Ledger`] without the lock, then [claim](Jobs::claim) it:
//! Queued → Running as a check-and-set under the lock. A job cancelled (or a daemon stopped) between the first and
//! the last step is not started, and its booking is given back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kiln_model::capacity::Resources;
use kiln_model::stream::{RenditionSpec, VideoRendition};
use kiln_model::vod::{JobRequest, JobState, JobStatus, DEFAULT_VOD_PRESET};
use kiln_model::StreamRequest;

use super::{job_span, unix_ms, Jobs, RunError};

/// Video renditions a live stream may have beside its audio (its 8 tracks at most): how a job's ladder is cut to
/// be priced ([`Jobs::price`]).
const LIVE_VIDEO_TRACKS: usize = kiln_model::StreamPlan::MAX_RENDITIONS - 1;
use crate::metrics::Metrics;
use crate::supervisor::Supervisor;

/// Where jobs book host resources: the daemon's admission ledger, shared with live streams.
pub(crate) trait Ledger: Send + Sync {
    /// The node's schedulable capacity.
    fn capacity(&self) -> Resources;
    /// Books `demand` if it fits; never over-commits.
    fn try_book(&self, demand: &Resources) -> bool;
    /// Gives back what [`Ledger::try_book`] booked.
    fn unbook(&self, demand: &Resources);
    /// What is not booked.
    fn free(&self) -> Resources;
}

impl Ledger for Supervisor {
    fn capacity(&self) -> Resources {
        Supervisor::capacity(self)
    }
    fn try_book(&self, demand: &Resources) -> bool {
        Supervisor::try_book(self, demand)
    }
    fn unbook(&self, demand: &Resources) {
        Supervisor::unbook(self, demand)
    }
    fn free(&self) -> Resources {
        Supervisor::capacity(self).minus(&Supervisor::allocated(self))
    }
}

/// The queued job that should start next, and how many jobs run now.
#[derive(Debug)]
struct Candidate {
    id: String,
    request: JobRequest,
    running: usize,
}

/// How often the dispatcher looks again without being woken (retention sweep, capacity freed by live streams).
const IDLE_WAKE: Duration = Duration::from_secs(1);

impl Jobs {
    /// Starts queued jobs while there is room; runs until the task is dropped.
    pub async fn dispatch(self: Arc<Self>, sup: Arc<Supervisor>, metrics: Arc<Metrics>) {
        let ledger: Arc<dyn Ledger> = sup;
        loop {
            while let Some(status) = self.start_next(ledger.as_ref()) {
                self.spawn_run(status.id, ledger.clone(), metrics.clone());
            }
            let swept = self.sweep();
            if swept > 0 {
                tracing::info!(jobs = swept, "finished jobs past their retention deleted");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_WAKE) => {}
            }
        }
    }

    /// Selects, books and claims the next job that can start now; `None` when none can (no queued job, no free
    /// slot, no room in the ledger, or the daemon is stopping).
    fn start_next(&self, ledger: &dyn Ledger) -> Option<JobStatus> {
        loop {
            if self.stopping.load(Ordering::SeqCst) || self.paused.load(Ordering::SeqCst) {
                return None;
            }
            let next = self.select_next()?;
            // a job the cost model cannot price (queued before its checks were these, or its preset gone after a
            // restart with other presets) fails with the reason: it would otherwise book the whole host or
            // nothing
            if let Err(why) = self.price(&next.request) {
                self.fail_queued(&next.id, &format!("the job cannot be priced: {why}"));
                continue;
            }
            let booked = self.book(&next, ledger)?;
            if let Some(status) = self.claim(&next.id, booked, ledger) {
                job_span(&status.id).in_scope(|| {
                    tracing::info!(
                        priority = status.priority,
                        attempt = status.attempts,
                        "job started"
                    )
                });
                return Some(status);
            }
            // it was cancelled meanwhile: it is no longer queued, so the next pass selects another
        }
    }

    /// The queued job to start next (highest priority, then oldest), if a slot is free.
    fn select_next(&self) -> Option<Candidate> {
        let map = self.entries.lock();
        let running = map
            .values()
            .filter(|e| e.status.state == JobState::Running)
            .count();
        if running >= self.cfg.max_concurrent {
            return None;
        }
        map.values()
            .filter(|e| e.status.state == JobState::Queued)
            .min_by(|a, b| {
                b.status
                    .priority
                    .cmp(&a.status.priority)
                    .then(a.status.created_unix_ms.cmp(&b.status.created_unix_ms))
                    .then(a.status.id.cmp(&b.status.id))
            })
            .map(|e| Candidate {
                id: e.status.id.clone(),
                request: e.status.request.clone(),
                running,
            })
    }

    /// Books what `next` costs, clamped to the node (a ladder larger than the host still runs, alone). When it
    /// does not fit, the job still starts, booking nothing, if no other job runs; otherwise `None`.
    fn book(&self, next: &Candidate, ledger: &dyn Ledger) -> Option<Resources> {
        let want = self.demand(&next.request);
        let cap = ledger.capacity();
        let want = Resources {
            cpu_millicores: want.cpu_millicores.min(cap.cpu_millicores),
            memory_mib: want.memory_mib.min(cap.memory_mib),
            ..Resources::default()
        };
        if ledger.try_book(&want) {
            Some(want)
        } else if next.running == 0 {
            Some(Resources::default())
        } else {
            None
        }
    }

    /// Queued → Running for job `id`, as one check-and-set under the lock, recording `booked` on it. A job that is
    /// no longer queued (cancelled, purged), or a daemon that is stopping, starts nothing: `booked` goes back to
    /// the ledger and the answer is `None`.
    fn claim(&self, id: &str, booked: Resources, ledger: &dyn Ledger) -> Option<JobStatus> {
        let claimed = {
            let mut map = self.entries.lock();
            match map.get_mut(id) {
                Some(e)
                    if e.status.state == JobState::Queued
                        && !self.stopping.load(Ordering::SeqCst) =>
                {
                    let s = &mut e.status;
                    s.state = JobState::Running;
                    s.attempts += 1;
                    s.started_unix_ms = Some(unix_ms());
                    s.progress = 0.0;
                    s.error = None;
                    s.input_bytes = None;
                    s.input_total_bytes = None;
                    s.duration_s = None;
                    e.booked = booked;
                    e.cancel.store(false, Ordering::SeqCst);
                    Some(e.status.clone())
                }
                _ => None,
            }
        };
        match claimed {
            Some(status) => {
                let _ = self.store.save(&status);
                Some(status)
            }
            None => {
                ledger.unbook(&booked);
                None
            }
        }
    }

    /// What one job of this request books: its ladder's real-time CPU cost on this host (`start_next` fails
    /// the jobs it cannot price before this is asked).
    fn demand(&self, req: &JobRequest) -> Resources {
        self.price(req).unwrap_or_default()
    }

    /// Queued → failed with `why` for job `id` (if it is still queued), stored.
    fn fail_queued(&self, id: &str, why: &str) {
        let failed = {
            let mut map = self.entries.lock();
            map.get_mut(id)
                .filter(|e| e.status.state == JobState::Queued)
                .map(|e| {
                    e.status.state = JobState::Failed;
                    e.status.error = Some(why.to_string());
                    e.status.finished_unix_ms = Some(unix_ms());
                    e.status.clone()
                })
        };
        if let Some(s) = failed {
            job_span(id).in_scope(|| tracing::warn!(error = why, "job failed before it started"));
            self.save_final(&s);
        }
    }

    /// Stores a final status outside the lock (a write and an fsync must not hold every reader of the jobs), then
    /// undoes it if the job was purged meanwhile: a purge removes the entry under the lock before its files, so
    /// either it removes this record too, or the entry is gone by the time this looks and the record goes.
    pub(super) fn save_final(&self, s: &JobStatus) {
        let _ = self.store.save(s);
        if !self.entries.lock().contains_key(&s.id) {
            let _ = self.store.remove(&s.id);
        }
    }

    /// A request's real-time CPU cost on this host, or why its ladder cannot be priced (`submit` answers 400 with
    /// it: a job runs only what a live stream's checks accept too, so what it runs is what it books).
    ///
    /// What is priced is the ladder's cost, not a live stream's shape: an upright rung is priced lying down (the
    /// same pixels; a live stream may be at most 7680x4320), names are not what costs (a live name is at most
    /// 32 characters), and a rate below 5 fps is priced as 5 (fewer frames than that do not fill a live part).
    /// The job's own checks ([`JobRequest::validate`]) are what it must pass besides.
    pub(super) fn price(&self, req: &JobRequest) -> Result<Resources, String> {
        let preset = Some(
            req.preset
                .clone()
                .unwrap_or_else(|| DEFAULT_VOD_PRESET.into()),
        );
        let priced = |renditions: Option<Vec<RenditionSpec>>| {
            let sreq = StreamRequest {
                source: "test:".into(),
                preset: preset.clone(),
                renditions,
                ..Default::default()
            };
            self.presets
                .resolve("job", &sreq)
                .map(|plan| self.cpu_model.demand(&plan))
                .map_err(|e| e.to_string())
        };
        let Some(ladder) = &req.renditions else {
            return priced(None);
        };
        let rungs: Vec<RenditionSpec> = ladder
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (width, height) = if v.height > v.width {
                    (v.height, v.width)
                } else {
                    (v.width, v.height)
                };
                let fps = if v.fps.den > 0 && v.fps.as_f64() < 5.0 {
                    kiln_model::stream::Fraction::new(5, 1)
                } else {
                    v.fps
                };
                VideoRendition {
                    name: format!("r{i}"),
                    width,
                    height,
                    fps,
                    ..v.clone()
                }
                .into()
            })
            .collect();
        // a live stream has at most 8 tracks, its audio among them: a longer ladder is priced in parts and
        // summed (each part counts the decode and the audio again: more, never less, than the job costs)
        let mut total = Resources::default();
        for part in rungs.chunks(LIVE_VIDEO_TRACKS) {
            total = total.plus(&priced(Some(part.to_vec()))?);
        }
        Ok(total)
    }

    /// Runs a claimed job on a blocking thread, inside its span, and settles it at the end.
    fn spawn_run(self: &Arc<Self>, id: String, ledger: Arc<dyn Ledger>, metrics: Arc<Metrics>) {
        let me = self.clone();
        let span = job_span(&id);
        tokio::task::spawn_blocking(move || {
            let _in_job = span.enter();
            let outcome = me.run(&id, ledger.as_ref());
            me.finish(&id, outcome, ledger.as_ref(), &metrics);
        });
    }

    /// A runner returned: gives back the job's booking, records its end (see [`settle`]), deletes the download
    /// and a failed job's partial output, counts it in the metrics and wakes the dispatcher.
    fn finish(
        &self,
        id: &str,
        outcome: Result<(), RunError>,
        ledger: &dyn Ledger,
        metrics: &Metrics,
    ) {
        let booked = self
            .entries
            .lock()
            .get_mut(id)
            .map(|e| std::mem::take(&mut e.booked))
            .unwrap_or_default();
        ledger.unbook(&booked);
        let status = {
            let mut map = self.entries.lock();
            map.get_mut(id).map(|e| {
                let cancelled = e.cancel.load(Ordering::SeqCst);
                let stopping = self.stopping.load(Ordering::SeqCst);
                settle(&mut e.status, &outcome, cancelled, stopping, unix_ms());
                e.status.clone()
            })
        };
        // once the job is final a purge (or the retention sweep) may remove its record: `save_final` keeps a late
        // save from bringing the record back, without its outputs, at the next start
        if let Some(s) = &status {
            self.save_final(s);
        }
        let _ = std::fs::remove_file(self.store.download_path(id));
        if let Some(s) = status {
            if s.state != JobState::Done {
                let _ = std::fs::remove_dir_all(self.store.partial_dir(id));
            }
            tracing::info!(state = ?s.state, error = ?s.error, "job finished");
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
            // after the record: a crash in between runs the job again, and its event keeps the same id
            let kind = match s.state {
                JobState::Done => Some("job.done"),
                JobState::Failed => Some("job.failed"),
                _ => None,
            };
            if let (Some(kind), Some(w)) = (kind, self.webhooks.get()) {
                w.emit(
                    kind,
                    None,
                    Some(id),
                    serde_json::to_value(&s).unwrap_or_default(),
                );
            }
        }
        self.wake.notify_one();
    }
}

/// The state a running job ends in: interrupted by a daemon stop → queued again (it restarts at the next start);
/// cancelled by a user → cancelled; otherwise done or failed with the runner's error text.
fn settle(
    s: &mut JobStatus,
    outcome: &Result<(), RunError>,
    cancelled: bool,
    stopping: bool,
    now_ms: u64,
) {
    s.finished_unix_ms = Some(now_ms);
    s.eta_s = None;
    match (outcome, cancelled) {
        (_, true) if stopping => {
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
            s.error = Some(e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::testing::{jobs, request};
    use parking_lot::Mutex;

    /// A ledger with a fixed CPU capacity that records what is booked.
    #[derive(Debug)]
    struct FakeLedger {
        cap: Resources,
        booked: Mutex<Resources>,
    }

    impl FakeLedger {
        fn with_cpu(millicores: u64) -> Self {
            FakeLedger {
                cap: Resources {
                    cpu_millicores: millicores,
                    memory_mib: 1 << 20,
                    ..Resources::default()
                },
                booked: Mutex::new(Resources::default()),
            }
        }
        fn booked_cpu(&self) -> u64 {
            self.booked.lock().cpu_millicores
        }
    }

    impl Ledger for FakeLedger {
        fn capacity(&self) -> Resources {
            self.cap
        }
        fn try_book(&self, demand: &Resources) -> bool {
            let mut b = self.booked.lock();
            if self.cap.minus(&b).short_dimension(demand).is_some() {
                return false;
            }
            *b = b.plus(demand);
            true
        }
        fn unbook(&self, demand: &Resources) {
            let mut b = self.booked.lock();
            *b = b.minus(demand);
        }
        fn free(&self) -> Resources {
            self.cap.minus(&self.booked.lock())
        }
    }

    fn on_disk(dir: &std::path::Path, id: &str) -> JobStatus {
        let path = dir.join("jobs").join(format!("{id}.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn a_job_cancelled_between_selection_and_claim_is_not_started() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let ledger = FakeLedger::with_cpu(1_000_000);
        let id = j.submit(request(0)).unwrap().id;
        let next = j.select_next().expect("the queued job is selected");
        assert_eq!(next.id, id);
        let booked = j.book(&next, &ledger).expect("room for it");
        assert!(booked.cpu_millicores > 0 && ledger.booked_cpu() == booked.cpu_millicores);
        // the user cancels while the dispatcher holds no lock
        assert_eq!(j.cancel(&id).unwrap().state, JobState::Cancelled);
        assert!(
            j.claim(&id, booked, &ledger).is_none(),
            "a cancelled job was started"
        );
        let s = j.get(&id).unwrap();
        assert_eq!(
            (s.state, s.attempts, s.started_unix_ms),
            (JobState::Cancelled, 0, None)
        );
        assert_eq!(on_disk(dir.path(), &id).state, JobState::Cancelled);
        assert_eq!(ledger.booked_cpu(), 0, "the booking was given back");
        assert_eq!(j.load().running, 0);
        // nothing is left to start
        assert!(j.start_next(&ledger).is_none());
    }

    #[test]
    fn a_claimed_job_runs_once_and_records_its_booking() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let ledger = FakeLedger::with_cpu(1_000_000);
        let id = j.submit(request(0)).unwrap().id;
        let s = j.start_next(&ledger).expect("it starts");
        assert_eq!(
            (s.id.as_str(), s.state, s.attempts),
            (id.as_str(), JobState::Running, 1)
        );
        assert_eq!(on_disk(dir.path(), &id).state, JobState::Running);
        assert_eq!(
            j.entries.lock()[&id].booked.cpu_millicores,
            ledger.booked_cpu()
        );
        // claiming it again (a second dispatcher pass) is refused, and books nothing more
        let again = Resources {
            cpu_millicores: 7,
            ..Resources::default()
        };
        assert!(ledger.try_book(&again));
        assert!(j.claim(&id, again, &ledger).is_none());
        assert_eq!(
            j.entries.lock()[&id].booked.cpu_millicores,
            ledger.booked_cpu()
        );
        // a cancel now reaches the runner through the flag
        j.cancel(&id).unwrap();
        assert!(j.entries.lock()[&id].cancel.load(Ordering::SeqCst));
    }

    #[test]
    fn nothing_is_claimed_once_the_daemon_stops() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let ledger = FakeLedger::with_cpu(1_000_000);
        let id = j.submit(request(0)).unwrap().id;
        let next = j.select_next().unwrap();
        let booked = j.book(&next, &ledger).unwrap();
        j.shutdown();
        assert!(j.claim(&id, booked, &ledger).is_none());
        assert_eq!(j.get(&id).unwrap().state, JobState::Queued);
        assert_eq!(ledger.booked_cpu(), 0);
        assert!(j.start_next(&ledger).is_none());
    }

    #[test]
    fn higher_priority_then_older_jobs_start_first_within_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let ledger = FakeLedger::with_cpu(1_000_000);
        let low = j.submit(request(1)).unwrap().id;
        let high = j.submit(request(5)).unwrap().id;
        let also_high = j.submit(request(5)).unwrap().id;
        assert_eq!(j.start_next(&ledger).unwrap().id, high);
        assert_eq!(j.start_next(&ledger).unwrap().id, also_high);
        // two slots: the third waits
        assert!(j.start_next(&ledger).is_none());
        assert_eq!(j.get(&low).unwrap().state, JobState::Queued);
    }

    #[test]
    fn a_ladder_the_cost_model_cannot_price_is_refused_at_submit_not_booked_as_nothing() {
        use kiln_model::stream::{Fraction, VideoCodec, VideoRendition};
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let rung = |name: &str, width: u32, fps: Fraction| VideoRendition {
            name: name.into(),
            width,
            height: 720,
            fps,
            bitrate_kbps: 2000,
            codec: VideoCodec::default(),
        };
        let with = |r: Vec<VideoRendition>| JobRequest {
            renditions: Some(r),
            ..request(0)
        };
        let ok = with(vec![rung("hd", 1280, Fraction::new(30, 1))]);
        assert!(j.price(&ok).unwrap().cpu_millicores > 0);
        j.submit(ok).expect("a plain ladder is accepted");
        // a job's ladder is priced as what it costs: an upright rung taller than a live stream may be, a long
        // name, a slow rate
        let upright = with(vec![VideoRendition {
            height: 5120,
            ..rung(
                "a-name-longer-than-a-live-stream-allows",
                2160,
                Fraction::new(2, 1),
            )
        }]);
        j.submit(upright)
            .expect("an upright 2160x5120 rung at 2 fps is a job's to run");
        // eight rungs (a live stream has seven beside its audio): priced in parts, dearer than one rung
        let eight = with(
            (0..8)
                .map(|i| rung(&format!("v{i}"), 640, Fraction::new(30, 1)))
                .collect(),
        );
        let one = with(vec![rung("v0", 640, Fraction::new(30, 1))]);
        assert!(
            j.price(&eight).unwrap().cpu_millicores > 4 * j.price(&one).unwrap().cpu_millicores
        );
        j.submit(eight).expect("eight rungs");
        let nine = with(
            (0..9)
                .map(|i| rung(&format!("v{i}"), 640, Fraction::new(30, 1)))
                .collect(),
        );
        assert!(j.submit(nine).is_err(), "nine rungs");
        for (why, bad) in [
            ("odd width", vec![rung("hd", 1281, Fraction::new(30, 1))]),
            ("0 fps", vec![rung("hd", 1280, Fraction::new(0, 1))]),
            ("fps x/0", vec![rung("hd", 1280, Fraction::new(30, 0))]),
            (
                "fps over 120",
                vec![rung("hd", 1280, Fraction::new(240, 1))],
            ),
            (
                "the thumbnails' name",
                vec![rung("thumbs", 1280, Fraction::new(30, 1))],
            ),
            (
                "the audio's name",
                vec![rung("audio", 1280, Fraction::new(30, 1))],
            ),
            (
                "a name twice",
                vec![
                    rung("hd", 1280, Fraction::new(30, 1)),
                    rung("hd", 640, Fraction::new(30, 1)),
                ],
            ),
        ] {
            match j.submit(with(bad)) {
                Err(super::super::JobError::Invalid(e)) => assert!(!e.is_empty(), "{why}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // one that got in anyway (the presets changed under a queued job) fails when its turn comes, with the
        // reason, and books nothing; the next job starts
        let unpriced = JobRequest {
            preset: Some("gone".into()),
            ..request(0)
        };
        assert!(j.price(&unpriced).is_err());
        let mut queued = j.submit(request(0)).unwrap();
        queued.request = unpriced;
        queued.id = "unpriced".into();
        // first in line
        queued.priority = 100;
        j.store.save(&queued).unwrap();
        let reopened = jobs(dir.path(), 2);
        let ledger = FakeLedger::with_cpu(1_000_000);
        let started = reopened.start_next(&ledger).expect("the next job starts");
        assert_ne!(started.id, "unpriced");
        let failed = reopened.get("unpriced").unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert!(failed.error.unwrap().contains("cannot be priced"));
        assert_eq!(on_disk(dir.path(), "unpriced").state, JobState::Failed);
        assert_eq!(ledger.booked_cpu(), started_cpu(&reopened, &started));
    }

    fn started_cpu(j: &Jobs, s: &JobStatus) -> u64 {
        j.demand(&s.request).cpu_millicores
    }

    #[test]
    fn a_job_larger_than_the_free_room_runs_only_alone() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 4);
        let demand = j.demand(&request(0)).cpu_millicores;
        assert!(demand > 0, "the default preset has a CPU cost");
        // room for one job and a half
        let ledger = FakeLedger::with_cpu(demand * 3 / 2);
        let ids: Vec<String> = (0..3).map(|_| j.submit(request(0)).unwrap().id).collect();
        assert_eq!(j.start_next(&ledger).unwrap().id, ids[0]);
        assert_eq!(ledger.booked_cpu(), demand);
        // the second does not fit beside the first
        assert!(j.start_next(&ledger).is_none());
        // alone, a job starts even when it does not fit (here: live streams hold the room)
        let ledger_full = FakeLedger::with_cpu(demand / 2);
        let dir2 = tempfile::tempdir().unwrap();
        let alone = jobs(dir2.path(), 4);
        let id = alone.submit(request(0)).unwrap().id;
        assert!(ledger_full.try_book(&Resources {
            cpu_millicores: demand / 2,
            ..Resources::default()
        }));
        let s = alone.start_next(&ledger_full).unwrap();
        assert_eq!(s.id, id);
        assert_eq!(alone.entries.lock()[&id].booked, Resources::default());
    }

    #[test]
    fn a_finished_run_settles_by_outcome_and_stop() {
        let mut s = on_disk_like();
        settle(&mut s, &Ok(()), false, false, 9);
        assert_eq!(
            (s.state, s.progress, s.finished_unix_ms),
            (JobState::Done, 1.0, Some(9))
        );
        let mut s = on_disk_like();
        settle(&mut s, &Err(RunError::UnknownPreset), false, false, 9);
        assert_eq!(
            (s.state, s.error.as_deref()),
            (JobState::Failed, Some("unknown preset"))
        );
        let mut s = on_disk_like();
        settle(&mut s, &Err(RunError::Cancelled), true, false, 9);
        assert_eq!((s.state, s.error), (JobState::Cancelled, None));
        // a daemon stop interrupts the job: back to the queue, as if never started
        let mut s = on_disk_like();
        settle(&mut s, &Err(RunError::Cancelled), true, true, 9);
        assert_eq!(
            (s.state, s.progress, s.speed, s.finished_unix_ms, s.eta_s),
            (JobState::Queued, 0.0, None, None, None)
        );
    }

    fn on_disk_like() -> JobStatus {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 1);
        let mut s = j.submit(request(0)).unwrap();
        s.state = JobState::Running;
        s.progress = 0.5;
        s.speed = Some(2.0);
        s.eta_s = Some(4.0);
        s
    }

    #[test]
    fn finishing_gives_back_the_booking_and_stores_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let j = jobs(dir.path(), 2);
        let ledger = FakeLedger::with_cpu(1_000_000);
        let metrics = Metrics::new();
        let id = j.submit(request(0)).unwrap().id;
        j.start_next(&ledger).unwrap();
        std::fs::create_dir_all(j.store.partial_dir(&id)).unwrap();
        j.finish(&id, Err(RunError::PipelineGone), &ledger, &metrics);
        assert_eq!(ledger.booked_cpu(), 0);
        let s = on_disk(dir.path(), &id);
        assert_eq!(
            (s.state, s.error.as_deref()),
            (JobState::Failed, Some("the pipeline went away"))
        );
        assert!(!j.store.partial_dir(&id).exists());
        assert_eq!(j.load().running, 0);
    }
}
