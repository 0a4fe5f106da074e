//! Where jobs live on disk: `{data}/jobs/{id}.json` (the [`JobStatus`], rewritten atomically on every state change),
//! `{data}/vod/{id}.partial/` while a job runs, `{data}/vod/{id}/` once it is done, and `{data}/inputs/{id}` for a
//! downloaded input. Reloading at start queues again the jobs that were running when the daemon stopped.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_model::vod::{JobState, JobStatus};

use super::{job_span, JobError};

/// The job store's directories.
#[derive(Debug)]
pub(super) struct Store {
    data_dir: PathBuf,
}

impl Store {
    /// Creates the directories, and empties `inputs/` (downloads of jobs that were running when the daemon stopped:
    /// those jobs start again from the fetch).
    pub(super) fn open(data_dir: PathBuf) -> std::io::Result<Store> {
        std::fs::create_dir_all(data_dir.join("jobs"))?;
        std::fs::create_dir_all(data_dir.join("vod"))?;
        let _ = std::fs::remove_dir_all(data_dir.join("inputs"));
        std::fs::create_dir_all(data_dir.join("inputs"))?;
        Ok(Store { data_dir })
    }

    fn jobs_dir(&self) -> PathBuf {
        self.data_dir.join("jobs")
    }

    fn job_file(&self, id: &str) -> PathBuf {
        self.jobs_dir().join(format!("{id}.json"))
    }

    /// A finished job's outputs (served under `/vod/{id}/`).
    pub(super) fn output_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("vod").join(id)
    }

    /// A running job's outputs so far.
    pub(super) fn partial_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("vod").join(format!("{id}.partial"))
    }

    /// Where an `http(s)` input is downloaded to (deleted when the job ends).
    pub(super) fn download_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("inputs").join(id)
    }

    /// Writes a job's record.
    pub(super) fn save(&self, s: &JobStatus) -> Result<(), JobError> {
        write_atomic(&self.job_file(&s.id), &to_json(s)).map_err(|e| JobError::Io(e.to_string()))
    }

    /// Every stored job. Unreadable records are skipped (with a warning); a job that was running is queued again,
    /// with its progress reset and its partial output deleted, and stored so. Temporary files that a crash left
    /// behind are deleted.
    pub(super) fn load_all(&self) -> std::io::Result<Vec<JobStatus>> {
        let mut jobs = Vec::new();
        for e in std::fs::read_dir(self.jobs_dir())? {
            let path = e?.path();
            if is_temporary(&path) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
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
            // a stop puts its running jobs back in the queue first: one still running here was running when the
            // daemon died
            if status.state == JobState::Running {
                status.interrupted += 1;
                status.progress = 0.0;
                status.speed = None;
                status.eta_s = None;
                if status.interrupted >= MAX_INTERRUPTED {
                    let n = status.interrupted;
                    job_span(&status.id).in_scope(|| {
                        tracing::error!(
                            times = n,
                            "the daemon died while running this job again: failed, not run again"
                        )
                    });
                    status.state = JobState::Failed;
                    status.error = Some(format!(
                        "the daemon stopped {n} times while running this job (killed, crashed or out of \
                         memory): it is not run again"
                    ));
                    status.finished_unix_ms = Some(super::unix_ms());
                } else {
                    job_span(&status.id).in_scope(|| {
                        tracing::info!("was running when the daemon stopped: queued again")
                    });
                    status.state = JobState::Queued;
                }
                let _ = std::fs::remove_dir_all(self.partial_dir(&status.id));
                write_atomic(&path, &to_json(&status))?;
            }
            jobs.push(status);
        }
        Ok(jobs)
    }

    /// Deletes a job's record and outputs (finished or partial); missing ones are fine.
    pub(super) fn remove(&self, id: &str) -> Result<(), JobError> {
        let _ = std::fs::remove_file(self.job_file(id));
        for dir in [self.output_dir(id), self.partial_dir(id)] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JobError::Io(format!("{}: {e}", dir.display()))),
            }
        }
        Ok(())
    }
}

fn to_json(s: &JobStatus) -> Vec<u8> {
    serde_json::to_vec_pretty(s).expect("a JobStatus always serialises")
}

/// Prefix of [`write_atomic`]'s temporary files (`tempfile`'s default; never a job file's name, which starts with
/// `j`).
const TEMP_PREFIX: &str = ".tmp";

fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMP_PREFIX))
}

/// Writes `bytes` to `path` atomically: a uniquely named temporary file in the same directory (so concurrent
/// writers never share one), fsync, rename over `path`. A reader sees the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Deaths of the daemon while a job runs after which the job fails instead of running again.
pub(super) const MAX_INTERRUPTED: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::testing::request;

    #[test]
    fn a_job_the_daemon_died_under_three_times_fails_instead_of_running_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf()).unwrap();
        store.save(&status("j1", JobState::Running)).unwrap();
        for n in 1..MAX_INTERRUPTED {
            let loaded = store.load_all().unwrap();
            assert_eq!(
                (loaded[0].state, loaded[0].interrupted),
                (JobState::Queued, n)
            );
            // it runs again, and the daemon dies again
            store
                .save(&JobStatus {
                    state: JobState::Running,
                    ..loaded[0].clone()
                })
                .unwrap();
        }
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded[0].state, JobState::Failed);
        assert!(loaded[0].error.as_deref().unwrap().contains("3 times"));
        // failed for good: the next start leaves it as it is
        assert_eq!(store.load_all().unwrap()[0].state, JobState::Failed);
        // a queued job (a clean stop queues its running jobs) is not counted
        store.save(&status("j2", JobState::Queued)).unwrap();
        let j2 = store
            .load_all()
            .unwrap()
            .into_iter()
            .find(|j| j.id == "j2")
            .unwrap();
        assert_eq!((j2.state, j2.interrupted), (JobState::Queued, 0));
    }

    fn status(id: &str, state: JobState) -> JobStatus {
        JobStatus {
            id: id.into(),
            state,
            progress: 0.4,
            speed: Some(2.0),
            eta_s: Some(3.0),
            error: None,
            request: request(0),
            priority: 0,
            created_unix_ms: 1,
            started_unix_ms: Some(2),
            finished_unix_ms: None,
            attempts: 1,
            interrupted: 0,
            input_bytes: None,
            input_total_bytes: None,
            duration_s: Some(10.0),
            renditions: Vec::new(),
            thumbnails: 0,
            links: Default::default(),
        }
    }

    #[test]
    fn concurrent_writers_never_leave_a_torn_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j1.json");
        // two different records, large enough that a write takes more than one syscall's worth of bytes
        let docs: Vec<Vec<u8>> = ["a", "b"]
            .iter()
            .map(|tag| {
                let mut s = status(&tag.repeat(4), JobState::Running);
                s.error = Some(tag.repeat(256 * 1024));
                to_json(&s)
            })
            .collect();
        write_atomic(&path, &docs[0]).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            let writers: Vec<_> = docs
                .iter()
                .map(|doc| {
                    sc.spawn(|| {
                        for _ in 0..40 {
                            write_atomic(&path, doc).expect("every write succeeds");
                        }
                    })
                })
                .collect();
            let reader = sc.spawn(|| {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let got = std::fs::read(&path).expect("the file is always there");
                    assert!(docs.contains(&got), "a torn file of {} bytes", got.len());
                    reads += 1;
                }
                reads
            });
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            assert!(reader.join().unwrap() > 0);
        });
        let last = std::fs::read(&path).unwrap();
        assert!(serde_json::from_slice::<JobStatus>(&last).is_ok());
        // no temporary file is left behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("j1.json")]);
    }

    #[test]
    fn reloading_queues_running_jobs_again_and_skips_junk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf()).unwrap();
        store.save(&status("jrun", JobState::Running)).unwrap();
        store.save(&status("jdone", JobState::Done)).unwrap();
        std::fs::create_dir_all(store.partial_dir("jrun").join("720p")).unwrap();
        std::fs::write(store.jobs_dir().join("jbad.json"), b"{not json").unwrap();
        std::fs::write(store.jobs_dir().join(".tmpAbC123"), b"half a rec").unwrap();
        std::fs::write(store.download_path("jrun"), b"old download").unwrap();
        // the daemon restarts
        let store = Store::open(dir.path().to_path_buf()).unwrap();
        let mut jobs = store.load_all().unwrap();
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            jobs.iter()
                .map(|j| (j.id.as_str(), j.state))
                .collect::<Vec<_>>(),
            [("jdone", JobState::Done), ("jrun", JobState::Queued)]
        );
        let requeued = &jobs[1];
        assert_eq!(
            (requeued.progress, requeued.speed, requeued.eta_s),
            (0.0, None, None)
        );
        assert!(!store.partial_dir("jrun").exists());
        assert!(!store.download_path("jrun").exists());
        assert!(!store.jobs_dir().join(".tmpAbC123").exists());
        // the requeue is stored: another reload reads it as queued
        let on_disk: JobStatus =
            serde_json::from_slice(&std::fs::read(store.job_file("jrun")).unwrap()).unwrap();
        assert_eq!(on_disk.state, JobState::Queued);
    }

    #[test]
    fn removing_deletes_the_record_and_both_output_directories() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf()).unwrap();
        store.save(&status("jx", JobState::Failed)).unwrap();
        std::fs::create_dir_all(store.output_dir("jx").join("720p")).unwrap();
        std::fs::create_dir_all(store.partial_dir("jx")).unwrap();
        store.remove("jx").unwrap();
        assert!(!store.job_file("jx").exists());
        assert!(!store.output_dir("jx").exists());
        assert!(!store.partial_dir("jx").exists());
        // nothing left to remove is fine
        store.remove("jx").unwrap();
    }
}
