//! A pulled live source (SRT, RTSP, HTTP) that is lost while the stream runs (an error or the end of its feed, or
//! no frame for `source_timeout_ms`) is bridged by the slate like a publisher ([`super::resilience`]) and pulled
//! again with backoff: each attempt is a new source pipeline, so a new connection, that takes over from the slate
//! at its first decoded frame. The attempts stop when the source is back on air, when the reconnect window ends
//! the stream, or when the stream stops. A source that fails before the stream ever ran fails the stream, as a
//! wrong URL should.

use std::time::{Duration, Instant};

use kiln_model::SourceLossMode;

use super::*;

/// The first attempt comes this long after the loss; each one that fails doubles the wait, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// An attempt that has not put a picture on air in this long is dropped for the next (a connection that hangs, a
/// feed with no keyframe).
pub(super) const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);

impl Supervisor {
    /// Watches a pulled stream for its whole life: no frame from the source on air for `source_timeout_ms` is a
    /// loss. (A publisher is watched per session, [`Self::watch_stalls`].)
    pub(super) fn watch_pulled(self: &Arc<Self>, h: &Arc<StreamHandle>) {
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        let timeout = h.on_source_loss().source_timeout();
        let first_picture = self.config.ingest.first_picture_timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let created = std::time::Instant::now();
            loop {
                tick.tick().await;
                match stream.state() {
                    StreamState::Running => {}
                    // a source that connects but never delivers a picture fails the stream
                    StreamState::Starting if created.elapsed() > first_picture => {
                        let Some(sup) = sup.upgrade() else { return };
                        stream.push_error(format!(
                            "no picture from the source in {} s",
                            first_picture.as_secs()
                        ));
                        sup.fail(&stream).await;
                        return;
                    }
                    StreamState::Starting => continue,
                    _ => return,
                }
                let Some(sup) = sup.upgrade() else { return };
                let stalled = {
                    let p = stream.pipeline.lock();
                    p.as_ref().and_then(|p| {
                        let on_source = p.input() == Some(kiln_media::InputKind::Source);
                        let late = p.since_last_frame().is_some_and(|d| d > timeout);
                        if on_source && late {
                            p.current_input()
                        } else {
                            None
                        }
                    })
                };
                if let Some(input) = stalled {
                    let why = format!("no frame from the source for {} ms", timeout.as_millis());
                    sup.pull_lost(&stream, input, why).await;
                }
            }
        });
    }

    /// Pulled input `input` failed, ended or stalled (`why`). On air, it is a loss: the slate stands in and the
    /// attempts start (or the stream ends, `mode: end`); each input is lost once. Not on air, it is an attempt
    /// that failed: the attempts move on to the next.
    pub(super) async fn pull_lost(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        input: u64,
        why: String,
    ) {
        if h.state() != StreamState::Running {
            return;
        }
        let on_air = h.pipeline.lock().as_ref().is_some_and(|p| {
            p.current_input() == Some(input) && p.input() == Some(kiln_media::InputKind::Source)
        });
        {
            let mut r = h.resilience.lock();
            if !on_air {
                r.failed_input = r.failed_input.max(input);
                h.span
                    .in_scope(|| tracing::info!(input, error = %why, "an attempt to pull the source again failed"));
                return;
            }
            if input <= r.lost_input {
                return;
            }
            r.lost_input = input;
        }
        h.push_error(why.clone());
        self.event("source.lost", h);
        if self.fail_over(h, input, Some(&why)).await {
            return;
        }
        match h.on_source_loss().mode {
            SourceLossMode::End => {
                self.count_loss(h);
                h.span.in_scope(|| tracing::info!(error = %why, "source lost: the stream ends (on_source_loss: end)"));
                self.end_stream(h).await;
            }
            SourceLossMode::Slate => {
                let stretch = self.slate_on(h, input, Some(why)).await;
                self.pull_again(h, stretch);
            }
        }
    }

    /// Pulls the source again while stretch `stretch` of slate lasts: one attempt at a time, the first after
    /// [`RETRY_FIRST`], doubling after each failure.
    pub(super) fn pull_again(self: &Arc<Self>, h: &Arc<StreamHandle>, stretch: u64) {
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        tokio::spawn(async move {
            let lasts = |s: &StreamHandle| {
                s.state() == StreamState::Running && s.resilience.lock().in_stretch(stretch)
            };
            let mut wait = RETRY_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
                let Some(sup) = sup.upgrade() else { return };
                if !lasts(&stream) {
                    return;
                }
                let attempt = match sup.attempt(&stream).await {
                    Ok(g) => g,
                    Err(e) => {
                        stream.push_error(format!("pulling the source again: {e}"));
                        continue;
                    }
                };
                drop(sup);
                stream.resilience.lock().retries += 1;
                stream
                    .span
                    .in_scope(|| tracing::info!(input = attempt, "pulling the source again"));
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    if !lasts(&stream) {
                        // back on air (the takeover closed the stretch), or the stream ended: an attempt that did
                        // not win is withdrawn
                        if let Some(s) = stream.switcher() {
                            let _ = tokio::task::spawn_blocking(move || s.withdraw(attempt)).await;
                        }
                        return;
                    }
                    let failed = stream.resilience.lock().failed_input >= attempt;
                    if failed || started.elapsed() > ATTEMPT_LIMIT {
                        break;
                    }
                }
                // the next attempt comes after a wait: this one no longer counts as waiting to take over
                if let Some(s) = stream.switcher() {
                    let _ = tokio::task::spawn_blocking(move || s.withdraw(attempt)).await;
                }
            }
        });
    }

    /// Starts a new source input for `h` (the slate stays on air until it has a picture). Returns its generation.
    async fn attempt(&self, h: &Arc<StreamHandle>) -> Result<u64, SupervisorError> {
        let opts = self.build_options(&h.placement(), &h.plan, &h.input, None)?;
        h.switch_to_source(opts).await
    }
}
