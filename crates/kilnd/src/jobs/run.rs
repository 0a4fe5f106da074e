//! The runner: one job from its input to its published outputs, on a blocking thread. Input (resolved by
//! [`super::input`]), probe, [plan](kiln_model::vod::plan_job), transcode (segments written as the
//! pipeline emits them, progress from segments and the pipeline's position, a stall limit, the cancel flag), then
//! playlists, MPD and thumbnails, and the rename that publishes the outputs. Every failure is a [`RunError`], whose
//! text is what the job's status shows.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_llhls::vod::{VodSegment, VodTrack};
use kiln_media::vod::{VodEvent, VodPipeline, VodPlan};
use kiln_media::MediaError;
use kiln_model::capacity::Resources;
use kiln_model::vod::{
    plan_job, JobLinks, JobPlan, JobPlanError, JobRequest, JobRequestError, DEFAULT_VOD_PRESET,
};
use parking_lot::Mutex;

use super::dispatch::Ledger;
use super::thumbnails::{self, Collected, Frame, ThumbnailError};
use super::{plan, Jobs, PROGRESS_POLL};

/// How long the probe of an input may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a job waits for memory to book after its probe (other jobs and streams ending free it).
const MEMORY_WAIT: Duration = Duration::from_secs(60);

/// A running job that produces nothing (no segment, no thumbnail) for this long fails.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// How long the runner waits for a pipeline event before it checks the cancel flag and the stall limit again.
const EVENT_WAIT: Duration = Duration::from_millis(200);

/// Why a job failed. The texts are what `JobStatus.error` shows (clients and tests match some of them).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("job vanished")]
    Vanished,
    /// The input string is malformed (normally refused at submit time).
    #[error("{0}")]
    Input(#[from] JobRequestError),
    /// Downloading an `http(s)` input failed ([`crate::fetch`]: address policy, status, size, stall).
    #[error("{0}")]
    Fetch(String),
    #[error("file inputs are disabled: start kilnd with --vod-input-dir")]
    FileInputsDisabled,
    #[error("the input directory: {0}")]
    InputDir(#[source] std::io::Error),
    #[error("input file {path}: {source}")]
    InputFile {
        path: String,
        source: std::io::Error,
    },
    #[error("input file {0} is outside the input directory")]
    OutsideInputDir(String),
    #[error("input {0} is not a regular file")]
    NotAFile(String),
    #[error("input file {0} is empty")]
    EmptyInput(String),
    #[error("the input path is not UTF-8")]
    NonUtf8Path,
    /// The probe refused the input (unreadable, unsupported codec, too large, no duration).
    #[error("{0}")]
    Probe(String),
    #[error("unknown preset")]
    UnknownPreset,
    #[error("{0}")]
    Plan(#[from] JobPlanError),
    /// Writing the outputs failed.
    #[error("output: {0}")]
    Output(#[source] std::io::Error),
    /// The pipeline could not be built or started.
    #[error("{0}")]
    Pipeline(#[from] MediaError),
    /// The pipeline reported an error while running.
    #[error("transcoding failed: {0}")]
    Transcode(String),
    #[error("the pipeline went away")]
    PipelineGone,
    #[error("unknown track")]
    UnknownTrack,
    #[error("the pipeline stalled: no output for {} s", .0.as_secs())]
    Stalled(Duration),
    #[error("cancelled")]
    Cancelled,
    /// The input decoded to an early end.
    #[error("the input ended early: {encoded_s:.2} s decoded of the {declared_s:.2} s it declares (truncated or corrupt)")]
    Truncated { encoded_s: f64, declared_s: f64 },
    #[error("rendition {0} produced no segment")]
    EmptyRendition(String),
    #[error("{0}")]
    Thumbnails(#[from] ThumbnailError),
    #[error("the input is {duration_s:.0} s of media, longer than the {max_s} s one job may transcode (--vod-max-duration-hours)")]
    TooLong { duration_s: f64, max_s: u64 },
    #[error("the job needs about {need} MiB to decode and encode its {width}x{height} input, more than the {budget} MiB one job may use (--vod-max-job-memory-mib)")]
    OverMemoryBudget {
        need: u64,
        budget: u64,
        width: u32,
        height: u32,
    },
    #[error("the job needs about {need} MiB and the host had only {free} MiB free for {} s", .waited.as_secs())]
    NoMemory {
        need: u64,
        free: u64,
        waited: Duration,
    },
}

/// What a transcode produced: the tracks with their segments, the thumbnail frames, and when encoding started.
#[derive(Debug)]
struct Encoded {
    tracks: Vec<VodTrack>,
    thumbnails: Collected,
    started: Instant,
}

/// What one pipeline event means for the loop.
#[derive(Debug)]
enum Step {
    More,
    /// Media seconds encoded so far (from the first track's segments).
    Progress(f64),
    End,
}

impl Encoded {
    /// Takes one pipeline event: init and media segments are written into `out` and recorded.
    fn take(&mut self, ev: VodEvent, out: &Path) -> Result<Step, RunError> {
        match ev {
            VodEvent::Init {
                track,
                bytes,
                codec,
                timescale,
            } => {
                let t = self.tracks.get_mut(track).ok_or(RunError::UnknownTrack)?;
                t.codecs = codec.unwrap_or_default();
                t.timescale = timescale;
                std::fs::write(out.join(&t.name).join("init.mp4"), &bytes)
                    .map_err(RunError::Output)?;
                Ok(Step::More)
            }
            VodEvent::Segment {
                track,
                bytes,
                start,
                duration,
            } => {
                let t = self.tracks.get_mut(track).ok_or(RunError::UnknownTrack)?;
                let n = t.segments.len() + 1;
                std::fs::write(out.join(&t.name).join(format!("seg-{n}.m4s")), &bytes)
                    .map_err(RunError::Output)?;
                t.segments.push(VodSegment {
                    start,
                    duration,
                    bytes: bytes.len() as u64,
                });
                Ok(if track == 0 {
                    Step::Progress((start + duration) as f64 / f64::from(t.timescale.max(1)))
                } else {
                    Step::More
                })
            }
            VodEvent::Thumbnail {
                pts_ns,
                width,
                height,
                rgb,
            } => {
                self.thumbnails.push(Frame {
                    pts_ns,
                    width,
                    height,
                    rgb,
                })?;
                Ok(Step::More)
            }
            VodEvent::Error(e) => Err(RunError::Transcode(e)),
            VodEvent::Eos => Ok(Step::End),
        }
    }
}

impl Jobs {
    /// Runs one job to the end (blocking: called on a blocking thread, inside the job's span).
    pub(super) fn run(&self, id: &str, ledger: &dyn Ledger) -> Result<(), RunError> {
        let (req, cancel) = {
            let map = self.entries.lock();
            let e = map.get(id).ok_or(RunError::Vanished)?;
            (e.status.request.clone(), e.cancel.clone())
        };
        let uri = self.input_uri(id, &req, &cancel)?;
        let probe = kiln_media::vod::probe(&uri, PROBE_TIMEOUT).map_err(RunError::Probe)?;
        if probe.duration_s > self.cfg.max_duration_s as f64 {
            return Err(RunError::TooLong {
                duration_s: probe.duration_s,
                max_s: self.cfg.max_duration_s,
            });
        }
        let preset = self
            .presets
            .get(req.preset.as_deref().unwrap_or(DEFAULT_VOD_PRESET))
            .ok_or(RunError::UnknownPreset)?;
        let job = plan_job(
            &plan::source_summary(&probe),
            &req,
            &plan::preset_summary(preset),
        )?;
        let size = probe.video.as_ref().map(|v| (v.width, v.height));
        self.book_memory(id, &job, size, ledger, &cancel)?;
        self.update(id, |s| {
            s.duration_s = Some(probe.duration_s);
            s.renditions = plan::renditions(id, &job);
        });
        let out = self.store.partial_dir(id);
        let _ = std::fs::remove_dir_all(&out);
        for n in job.track_names() {
            std::fs::create_dir_all(out.join(n)).map_err(RunError::Output)?;
        }
        let encoded = self.transcode(
            id,
            &plan::vod_plan(uri, &job, size),
            plan::tracks(&job),
            &out,
            &cancel,
            probe.duration_s,
        )?;
        self.publish(id, &req, &job, encoded, &out, probe.duration_s)
    }

    /// Books the memory the job's plan needs for its probed input ([`JobPlan::memory_mib`]) on top of what the
    /// dispatcher booked from the preset: a job over the per-job budget fails at once, and one that does not fit
    /// beside the other jobs and streams waits (at most [`MEMORY_WAIT`], cancellable) for room, then fails.
    fn book_memory(
        &self,
        id: &str,
        job: &JobPlan,
        size: Option<(u32, u32)>,
        ledger: &dyn Ledger,
        cancel: &AtomicBool,
    ) -> Result<(), RunError> {
        let (width, height) = size.unwrap_or((0, 0));
        let need = job.memory_mib(width, height);
        let budget = self.cfg.max_job_memory_mib;
        if need > budget {
            return Err(RunError::OverMemoryBudget {
                need,
                budget,
                width,
                height,
            });
        }
        let booked = self
            .entries
            .lock()
            .get(id)
            .map_or(0, |e| e.booked.memory_mib);
        let extra = Resources {
            memory_mib: need.saturating_sub(booked),
            ..Resources::default()
        };
        if extra.memory_mib == 0 {
            return Ok(());
        }
        let start = Instant::now();
        while !ledger.try_book(&extra) {
            if cancel.load(Ordering::SeqCst) {
                return Err(RunError::Cancelled);
            }
            if start.elapsed() >= MEMORY_WAIT {
                let free = ledger.free().memory_mib;
                return Err(RunError::NoMemory {
                    need,
                    free,
                    waited: MEMORY_WAIT,
                });
            }
            std::thread::sleep(EVENT_WAIT);
        }
        if let Some(e) = self.entries.lock().get_mut(id) {
            e.booked.memory_mib += extra.memory_mib;
        }
        Ok(())
    }

    /// Runs the pipeline of `vod` to its end, writing segments into `out` and moving the job's progress.
    fn transcode(
        &self,
        id: &str,
        vod: &VodPlan,
        tracks: Vec<VodTrack>,
        out: &Path,
        cancel: &AtomicBool,
        duration_s: f64,
    ) -> Result<Encoded, RunError> {
        let (tx, rx) = mpsc::channel::<VodEvent>();
        let tx = Mutex::new(tx);
        let pipeline = VodPipeline::build(
            vod,
            Arc::new(move |e| {
                let _ = tx.lock().send(e);
            }),
        )?;
        pipeline.start()?;
        let mut enc = Encoded {
            tracks,
            thumbnails: Collected::new(duration_s),
            started: Instant::now(),
        };
        let mut last_event = Instant::now();
        let mut last_poll = Instant::now();
        loop {
            if cancel.load(Ordering::SeqCst) {
                pipeline.stop();
                return Err(RunError::Cancelled);
            }
            // between segments (seconds apart), progress follows the pipeline's position
            if last_poll.elapsed() >= PROGRESS_POLL {
                last_poll = Instant::now();
                if let Some(pos) = pipeline.position_ns() {
                    self.advance(id, pos as f64 / 1e9, duration_s, enc.started.elapsed());
                }
            }
            let ev = match rx.recv_timeout(EVENT_WAIT) {
                Ok(ev) => {
                    last_event = Instant::now();
                    ev
                }
                // a pipeline that produces nothing for this long is stuck: fail the job rather than hold a slot
                Err(RecvTimeoutError::Timeout) if last_event.elapsed() > STALL_LIMIT => {
                    pipeline.stop();
                    return Err(RunError::Stalled(STALL_LIMIT));
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(RunError::PipelineGone),
            };
            match enc.take(ev, out) {
                Ok(Step::More) => {}
                Ok(Step::Progress(done_s)) => {
                    self.advance(id, done_s, duration_s, enc.started.elapsed())
                }
                Ok(Step::End) => break,
                Err(e) => {
                    pipeline.stop();
                    return Err(e);
                }
            }
        }
        pipeline.stop();
        Ok(enc)
    }

    /// Checks that the output covers the input, writes the playlists, the MPD and the thumbnails, and publishes
    /// `out` as the job's output directory.
    fn publish(
        &self,
        id: &str,
        req: &JobRequest,
        job: &JobPlan,
        enc: Encoded,
        out: &Path,
        duration_s: f64,
    ) -> Result<(), RunError> {
        let Encoded {
            tracks,
            thumbnails: mut thumbs,
            started,
        } = enc;
        // the output must cover the input: a truncated file decodes to an early end
        let encoded_s = tracks.first().map_or(0.0, VodTrack::duration_s);
        if encoded_s < duration_s * 0.9 - 0.5 {
            return Err(RunError::Truncated {
                encoded_s,
                declared_s: duration_s,
            });
        }
        let mut links = write_manifests(id, out, &tracks, req.outputs.dash)?;
        let mut count = 0;
        if let Some(t) = job.thumbnails {
            // one thumbnail per interval inside the video (a frame repeated at the very end does not count)
            thumbs.select(t.interval_s, encoded_s);
            if !thumbs.is_empty() {
                let shown_s = encoded_s.max(duration_s.min(encoded_s + 1.0));
                count = thumbnails::write(out, &thumbs, t.interval_s, shown_s)?;
                links.poster = Some(format!("/vod/{id}/poster.jpg"));
                links.sprite = Some(format!("/vod/{id}/sprite.jpg"));
                links.thumbnails_vtt = Some(format!("/vod/{id}/thumbnails.vtt"));
            }
        }
        let done = self.store.output_dir(id);
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(out, &done).map_err(RunError::Output)?;
        let wall = started.elapsed().as_secs_f64().max(1e-3);
        self.update(id, |s| {
            s.links = links;
            s.thumbnails = count;
            s.speed = Some(encoded_s / wall);
        });
        Ok(())
    }
}

/// Writes each track's media playlist, the multivariant playlist and (with `dash`) the MPD into `out`; returns
/// their links. A track without segments fails the job.
fn write_manifests(
    id: &str,
    out: &Path,
    tracks: &[VodTrack],
    dash: bool,
) -> Result<JobLinks, RunError> {
    for t in tracks {
        if t.segments.is_empty() {
            return Err(RunError::EmptyRendition(t.name.clone()));
        }
        std::fs::write(
            out.join(&t.name).join("index.m3u8"),
            kiln_llhls::vod::media_playlist(t),
        )
        .map_err(RunError::Output)?;
    }
    std::fs::write(
        out.join("master.m3u8"),
        kiln_llhls::vod::master_playlist(tracks),
    )
    .map_err(RunError::Output)?;
    let mut links = JobLinks {
        master: Some(format!("/vod/{id}/master.m3u8")),
        ..Default::default()
    };
    if dash {
        std::fs::write(out.join("manifest.mpd"), kiln_llhls::vod::mpd(tracks))
            .map_err(RunError::Output)?;
        links.mpd = Some(format!("/vod/{id}/manifest.mpd"));
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kiln_llhls::vod::TrackKind;

    fn video_track(name: &str) -> VodTrack {
        VodTrack {
            name: name.into(),
            kind: TrackKind::Video {
                width: 640,
                height: 360,
                fps: 30.0,
            },
            codecs: String::new(),
            bitrate_kbps: 1000,
            timescale: 90_000,
            segments: Vec::new(),
        }
    }

    #[test]
    fn events_are_written_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["360p", "audio"] {
            std::fs::create_dir_all(dir.path().join(n)).unwrap();
        }
        let mut enc = Encoded {
            tracks: vec![video_track("360p"), video_track("audio")],
            thumbnails: Collected::default(),
            started: Instant::now(),
        };
        let init = VodEvent::Init {
            track: 0,
            bytes: Bytes::from_static(b"init"),
            codec: Some("avc1.64001e".into()),
            timescale: 15_360,
        };
        assert!(matches!(enc.take(init, dir.path()), Ok(Step::More)));
        assert_eq!(enc.tracks[0].codecs, "avc1.64001e");
        let seg = |track, start| VodEvent::Segment {
            track,
            bytes: Bytes::from_static(b"moofmdat"),
            start,
            duration: 30_720,
        };
        // the first track's segments move progress: 2 s, then 4 s
        assert!(matches!(enc.take(seg(0, 0), dir.path()), Ok(Step::Progress(s)) if s == 2.0));
        assert!(matches!(enc.take(seg(0, 30_720), dir.path()), Ok(Step::Progress(s)) if s == 4.0));
        assert!(matches!(enc.take(seg(1, 0), dir.path()), Ok(Step::More)));
        assert_eq!(enc.tracks[0].segments.len(), 2);
        assert_eq!(enc.tracks[0].segments[1].bytes, 8);
        assert!(dir.path().join("360p/init.mp4").is_file());
        assert!(dir.path().join("360p/seg-2.m4s").is_file());
        assert!(dir.path().join("audio/seg-1.m4s").is_file());
        assert!(matches!(
            enc.take(seg(7, 0), dir.path()),
            Err(RunError::UnknownTrack)
        ));
        let err = enc.take(VodEvent::Error("x264enc: boom".into()), dir.path());
        assert_eq!(
            err.unwrap_err().to_string(),
            "transcoding failed: x264enc: boom"
        );
        assert!(matches!(enc.take(VodEvent::Eos, dir.path()), Ok(Step::End)));
    }

    #[test]
    fn manifests_need_a_segment_in_every_track() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = video_track("360p");
        a.segments.push(VodSegment {
            start: 0,
            duration: 180_000,
            bytes: 1000,
        });
        std::fs::create_dir_all(dir.path().join("360p")).unwrap();
        let links = write_manifests("j1", dir.path(), std::slice::from_ref(&a), true).unwrap();
        assert_eq!(links.master.as_deref(), Some("/vod/j1/master.m3u8"));
        assert_eq!(links.mpd.as_deref(), Some("/vod/j1/manifest.mpd"));
        assert!(dir.path().join("360p/index.m3u8").is_file());
        assert!(dir.path().join("manifest.mpd").is_file());
        let no_dash = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(no_dash.path().join("360p")).unwrap();
        let links = write_manifests("j1", no_dash.path(), std::slice::from_ref(&a), false).unwrap();
        assert_eq!(links.mpd, None);
        assert!(!no_dash.path().join("manifest.mpd").exists());
        let err = write_manifests("j1", dir.path(), &[a, video_track("720p")], true).unwrap_err();
        assert_eq!(err.to_string(), "rendition 720p produced no segment");
    }

    #[test]
    fn error_texts_stay_as_users_see_them() {
        assert_eq!(
            RunError::Stalled(STALL_LIMIT).to_string(),
            "the pipeline stalled: no output for 120 s"
        );
        assert_eq!(
            RunError::Truncated {
                encoded_s: 1.5,
                declared_s: 3.0
            }
            .to_string(),
            "the input ended early: 1.50 s decoded of the 3.00 s it declares (truncated or corrupt)"
        );
        assert_eq!(RunError::Cancelled.to_string(), "cancelled");
        assert_eq!(
            RunError::Output(std::io::Error::other("disk full")).to_string(),
            "output: disk full"
        );
        assert_eq!(
            RunError::from(JobPlanError::NothingToEncode).to_string(),
            "nothing to encode: the input has no stream this preset makes"
        );
    }
}
