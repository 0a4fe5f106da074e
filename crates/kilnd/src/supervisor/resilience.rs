//! A stream that outlives its source: when the source is lost (the publisher left, its media failed, or no frame
//! came for `source_timeout_ms`) a running stream switches its encoders' input to the slate and keeps every
//! rendition going at real time; the next publisher with the key (or, for a pulled source, the next attempt of
//! [`super::pulled`]) takes over from the slate at its first decoded frame. After `reconnect_window_s` on the
//! slate with nobody back, the stream ends (ENDLIST); with `mode: end` it ends at once. The switches are in
//! `kiln_media` (one timeline, same encoders); here are the policy, the timers, the status and the series.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kiln_model::{Resilience, SourceLoss, SourceLossMode};

use super::*;

/// A publish stream's slate and its history.
#[derive(Debug, Default)]
pub(crate) struct ResilienceState {
    /// Since when the slate is on (unix ms, and the instant for durations).
    pub(super) slate_since: Option<(u64, Instant)>,
    /// Slate time of earlier stretches.
    slate_before: Duration,
    /// Slate seconds already added to the counter.
    slate_counted: f64,
    source_losses: u64,
    reconnects: u64,
    /// Counts stretches of slate: a window timer ends only the stretch it was armed for.
    stretch: u64,
    /// The input whose loss opened the current stretch: only a newer one closes it.
    pub(super) lost_input: u64,
    /// The newest attempt to pull a lost source again that failed before it got on air.
    pub(super) failed_input: u64,
    /// Attempts to pull a lost source again.
    pub(super) retries: u64,
    /// Switches to the backup, and back to the source.
    pub(super) failovers: u64,
    pub(super) failbacks: u64,
    /// The source waiting behind the backup for its failback (its generation now).
    pub(super) standby: Option<u64>,
    /// The backup failed off air and waits to be started again.
    pub(super) backup_failed: bool,
    pub(super) backup_restarts: u64,
    /// Backup publishers attached so far (a `publish:` backup: each after the first is a restart).
    pub(super) backup_publishers: u64,
    /// Counts the loops pulling the source again behind the backup: only the newest runs.
    pub(super) behind: u64,
    /// When the source waiting behind the backup takes over if it goes on decoding (unix ms).
    pub(super) failback_at: Option<u64>,
}

impl ResilienceState {
    /// Whether stretch `stretch` of slate is still open.
    pub(super) fn in_stretch(&self, stretch: u64) -> bool {
        self.stretch == stretch && self.slate_since.is_some()
    }

    fn slate_total(&self) -> Duration {
        self.slate_before
            + self
                .slate_since
                .map_or(Duration::ZERO, |(_, t)| t.elapsed())
    }

    pub(super) fn slate_off(&mut self) {
        if let Some((_, t)) = self.slate_since.take() {
            self.slate_before += t.elapsed();
        }
    }

    /// A rebuilt pipeline (the CPU fallback) numbers its inputs from 1: no input is lost or failed yet, nothing
    /// waits behind the backup. Started on its source, the stretch of slate (and its timers and attempts) ends;
    /// started on the slate (`on_slate`: a `publish:` stream with no publisher on air), an open stretch goes on,
    /// with its reconnect window.
    pub(super) fn new_pipeline(&mut self, on_slate: bool) {
        if !on_slate {
            self.slate_off();
            self.stretch += 1;
        }
        self.lost_input = 0;
        self.failed_input = 0;
        self.standby = None;
        self.failback_at = None;
        self.backup_failed = false;
    }
}

impl StreamHandle {
    /// A handle on the pipeline's inputs (none without a pipeline or for a test source): switching through it
    /// does not hold the pipeline's lock while a new input starts.
    pub(super) fn switcher(&self) -> Option<kiln_media::Switcher> {
        self.pipeline.lock().as_ref().and_then(|p| p.switcher())
    }

    /// Starts a new source input built with `opts` (off the runtime's threads: it may connect); it takes over
    /// from the slate at its first decoded frame. Returns its generation.
    pub(super) async fn switch_to_source(
        &self,
        opts: kiln_media::BuildOptions,
    ) -> Result<u64, SupervisorError> {
        self.start_input(opts, false).await
    }

    /// [`Self::switch_to_source`] in standby: decoded, off air until armed (behind the backup).
    pub(super) async fn start_standby(
        &self,
        opts: kiln_media::BuildOptions,
    ) -> Result<u64, SupervisorError> {
        self.start_input(opts, true).await
    }

    async fn start_input(
        &self,
        opts: kiln_media::BuildOptions,
        standby: bool,
    ) -> Result<u64, SupervisorError> {
        let s = self
            .switcher()
            .ok_or_else(|| SupervisorError::Media("the stream has no pipeline".into()))?;
        tokio::task::spawn_blocking(move || {
            if standby {
                s.start_standby(&opts)
            } else {
                s.switch_to_source(&opts)
            }
        })
        .await
        .map_err(|e| SupervisorError::Media(e.to_string()))?
        .map_err(|e| SupervisorError::Media(e.to_string()))
    }

    /// What to do when the source goes.
    pub fn on_source_loss(&self) -> SourceLoss {
        self.request.on_source_loss.unwrap_or_default()
    }

    /// The `resilience` part of a publish stream's status.
    pub(super) fn resilience_status(&self) -> Option<Resilience> {
        if !self.plan.source.is_resilient() {
            return None;
        }
        let r = self.resilience.lock();
        let policy = self.on_source_loss();
        let (active, backup_seen) = {
            let p = self.pipeline.lock();
            let p = p.as_ref();
            (
                p.and_then(|p| p.input()).map_or("none", |k| k.as_str()),
                p.and_then(|p| p.switcher())
                    .and_then(|s| s.backup_since_seen()),
            )
        };
        let backup = self.plan.backup.as_ref().map(|b| kiln_model::BackupStatus {
            source: b.source.to_string(),
            healthy: backup_seen.is_some_and(|d| d < policy.source_timeout()),
            last_frame_ms_ago: backup_seen.map(|d| d.as_millis() as u64),
            restarts: r.backup_restarts,
            failback_s: b.failback_s,
            publisher: self.backup_publisher().map(|p| p.status()),
        });
        let window_ms = u64::from(policy.reconnect_window_s) * 1000;
        Some(Resilience {
            active_input: active.into(),
            slate_since_unix_ms: r.slate_since.map(|(ms, _)| ms),
            ends_at_unix_ms: r
                .slate_since
                .filter(|_| window_ms > 0)
                .map(|(ms, _)| ms + window_ms),
            source_losses: r.source_losses,
            reconnects: r.reconnects,
            retries: r.retries,
            failovers: r.failovers,
            failbacks: r.failbacks,
            failback_at_unix_ms: r.failback_at,
            backup,
            slate_seconds: r.slate_total().as_secs_f64(),
            on_source_loss: policy,
        })
    }

    /// Sets the slate series from the current state (each `/metrics` scrape).
    pub(super) fn refresh_resilience(&self, m: &crate::metrics::ingest::IngestMetrics) {
        if !self.plan.source.is_resilient() {
            return;
        }
        let mut r = self.resilience.lock();
        let total = r.slate_total().as_secs_f64();
        let id = self.plan.id.as_str();
        m.slate_seconds
            .with_label_values(&[id])
            .inc_by((total - r.slate_counted).max(0.0));
        r.slate_counted = total;
        m.on_slate
            .with_label_values(&[id])
            .set(i64::from(r.slate_since.is_some()));
        drop(r);
        let on_air = self.pipeline.lock().as_ref().and_then(|p| p.input());
        m.set_active_input(id, on_air.map(|k| k.as_str()));
    }

    /// Source input `input` took over (`from_slate`: from the slate, a reconnect, counted); the stretch of slate
    /// closes if that source is still on air (it may already be lost again, with the slate back).
    pub(super) fn resilience_back(&self, input: u64, from_slate: bool) -> bool {
        let on_air = self
            .pipeline
            .lock()
            .as_ref()
            .and_then(|p| p.current_input())
            == Some(input);
        let mut r = self.resilience.lock();
        // the event may come after that very source was lost again (a new stretch, opened for it): keep that one
        if on_air && input > r.lost_input {
            r.slate_off();
        }
        if from_slate {
            r.reconnects += 1;
            self.span
                .in_scope(|| tracing::info!(input, "the source is back on air"));
        }
        from_slate
    }
}

impl Supervisor {
    /// The listener's side of an attached session that ended (`detail`: why it was cut off): the loss of its
    /// source, unless the pipeline already reported it.
    pub async fn session_over(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        who: &Arc<Publisher>,
        detail: Option<String>,
    ) {
        if who.backup {
            return self.backup_session_over(h, who, detail).await;
        }
        let input = who.input.load(Ordering::SeqCst);
        self.source_lost(h, input, Some(who), detail.map(|d| (Refusal::Pipeline, d)))
            .await
    }

    /// The source of input `input` (of publisher `who`, when the caller knows it: generations start over in each
    /// new pipeline) is gone: it left, its media failed, or it stalled. Its publisher, if still the stream's, is cut
    /// off with `why`. If that source was on air, the stream goes on the slate or ends (`mode: end`); if it never
    /// got on air, the slate stays (a failed reconnect) or, before any part, the stream waits again. A no-op for
    /// any other publisher.
    pub(super) async fn source_lost(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        input: u64,
        who: Option<&Arc<Publisher>>,
        why: Option<(Refusal, String)>,
    ) {
        let gone = {
            let mut slot = h.publisher.lock();
            let matches = slot.as_ref().is_some_and(|p| {
                p.input.load(Ordering::SeqCst) == input && who.is_none_or(|w| Arc::ptr_eq(p, w))
            });
            if !matches {
                return;
            }
            slot.take()
        };
        if let Some(p) = &gone {
            if let Some(w) = &why {
                p.kicked_for.lock().get_or_insert(w.clone());
            }
            p.kick.notify_one();
        }
        *h.publish_feed.lock() = None;
        // a stop cuts its publisher off too: that is the stream ending, not its source lost
        if matches!(h.state(), StreamState::Starting | StreamState::Running) {
            self.event("source.lost", h);
        }
        let detail = why.map(|(_, d)| d);
        let (on_air, behind_backup) = {
            let p = h.pipeline.lock();
            let p = p.as_ref();
            (
                p.and_then(|p| p.current_input()) == Some(input),
                p.and_then(|p| p.input()) == Some(kiln_media::InputKind::Backup),
            )
        };
        if on_air
            && h.state() == StreamState::Running
            && self.fail_over(h, input, detail.as_deref()).await
        {
            return;
        }
        if behind_backup && h.state() == StreamState::Running {
            // a returning publisher that was waiting behind the backup: the backup stays on air
            h.resilience.lock().standby = None;
            if let Some(s) = h.switcher() {
                let _ = tokio::task::spawn_blocking(move || s.withdraw_waiting()).await;
            }
            return;
        }
        match (h.state(), h.on_source_loss().mode) {
            (StreamState::Running, SourceLossMode::Slate) if on_air => {
                self.slate_on(h, input, detail).await;
            }
            (StreamState::Running, SourceLossMode::End) if on_air => {
                self.count_loss(h);
                h.span.in_scope(|| tracing::info!(error = ?detail, "source lost: the stream ends (on_source_loss: end)"));
                self.end_stream(h).await;
            }
            // a publisher that came back but never got on air: the slate stays (its source is dropped), and the
            // window of that stretch runs on
            (StreamState::Running, _) => {
                h.span.in_scope(
                    || tracing::warn!(error = ?detail, "the returning publisher never got on air"),
                );
                self.switch_to_slate(h).await;
            }
            // never on air: back to waiting, as before the publisher came
            (StreamState::Starting, _) => self.teardown(h, detail).await,
            _ => {}
        }
    }

    pub(super) fn count_loss(&self, h: &StreamHandle) {
        h.resilience.lock().source_losses += 1;
        self.metrics
            .ingest
            .source_losses
            .with_label_values(&[h.plan.id.as_str()])
            .inc();
    }

    /// The slate on air (or kept there), off the runtime's threads: building it waits on GStreamer.
    async fn switch_to_slate(&self, h: &Arc<StreamHandle>) {
        let Some(s) = h.switcher() else { return };
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.switch_to_slate()).await {
            h.push_error(format!("the slate could not start: {e}"));
        }
    }

    /// Puts the slate on, opens a stretch of slate and arms its reconnect window.
    /// Returns the stretch it opened.
    pub(super) async fn slate_on(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        lost: u64,
        detail: Option<String>,
    ) -> u64 {
        self.slate_on_counted(h, lost, detail, true).await
    }

    /// [`Self::slate_on`]; `count`: whether this is a new loss (not one already counted when the backup was armed
    /// for it).
    pub(super) async fn slate_on_counted(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        lost: u64,
        detail: Option<String>,
        count: bool,
    ) -> u64 {
        self.switch_to_slate(h).await;
        if count {
            self.count_loss(h);
        }
        let stretch = {
            let mut r = h.resilience.lock();
            // the stream failed or ended meanwhile: no stretch to open
            if h.state() != StreamState::Running {
                return r.stretch;
            }
            // a stretch the consumer has not closed yet (the takeover's event still queued) ends here
            r.slate_off();
            r.slate_since = Some((unix_ms(), Instant::now()));
            r.lost_input = lost;
            r.stretch += 1;
            r.stretch
        };
        let window = h.on_source_loss().reconnect_window_s;
        h.span.in_scope(|| {
            tracing::warn!(error = ?detail, window_s = window, "source lost: the slate is on air")
        });
        if window > 0 {
            self.arm_window(h, stretch, Duration::from_secs(u64::from(window)));
        }
        stretch
    }

    /// Ends the stream when stretch `stretch` of slate lasts `window`. A publisher still trying to get on air at
    /// that moment gets its chance (its own first-picture timeout bounds it); the stream ends when it is gone.
    fn arm_window(self: &Arc<Self>, h: &Arc<StreamHandle>, stretch: u64, window: Duration) {
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                let Some(sup) = sup.upgrade() else { return };
                let (same, on_slate) = {
                    let r = stream.resilience.lock();
                    (r.stretch == stretch, r.slate_since.is_some())
                };
                let slate_on_air = stream.pipeline.lock().as_ref().and_then(|p| p.input())
                    == Some(kiln_media::InputKind::Slate);
                if !same || !on_slate || !slate_on_air || stream.state() != StreamState::Running {
                    return;
                }
                if stream.publisher().is_none() {
                    stream.span.in_scope(|| {
                        tracing::info!(
                            window_s = window.as_secs(),
                            "nobody came back: the stream ends"
                        )
                    });
                    sup.end_stream(&stream).await;
                    return;
                }
                drop(sup);
                tick.tick().await;
            }
        });
    }

    /// Ends a running stream now: ENDLIST, `ended`, its bookings back (it stays listed until deleted); a publisher
    /// still attached is cut off. A no-op unless the stream runs (a stop in progress finishes by itself).
    pub(super) async fn end_stream(&self, h: &Arc<StreamHandle>) {
        let p = {
            let mut slot = h.publisher.lock();
            if h.state() != StreamState::Running {
                return;
            }
            if let Some(p) = slot.take() {
                p.kicked_for
                    .lock()
                    .get_or_insert((Refusal::Stopping, "the stream ended".into()));
                p.kick.notify_one();
            }
            h.kick_backup_publisher(Refusal::Stopping, "the stream ended");
            if !h.set_state(StreamState::Ended) {
                return;
            }
            h.pipeline_epoch.fetch_add(1, Ordering::SeqCst);
            h.pipeline.lock().take()
        };
        // ENDLIST before the teardown, which may take a while: a stream reported `ended` has ended playlists (a
        // part the dying pipeline still hands over is refused by the ended packager)
        h.origin.end();
        if let Some(p) = p {
            self.tear_down_booked(h, p).await;
        }
        h.resilience.lock().slate_off();
        h.eos.send_replace(true);
        self.event("stream.ended", h);
        self.release_all(h);
    }

    /// Watches `who` while it is the stream's publisher: no frame for the stream's `source_timeout_ms` while
    /// its source is on air is a loss.
    pub(super) fn watch_stalls(self: &Arc<Self>, h: &Arc<StreamHandle>, who: &Arc<Publisher>) {
        let (sup, stream, who) = (Arc::downgrade(self), h.clone(), who.clone());
        let timeout = h.on_source_loss().source_timeout();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(sup) = sup.upgrade() else { return };
                if !stream.publisher().is_some_and(|p| Arc::ptr_eq(&p, &who)) {
                    return;
                }
                // read each time: a failback gives the source a new generation
                let input = who.input.load(Ordering::SeqCst);
                let (on_air, since) = {
                    let p = stream.pipeline.lock();
                    p.as_ref().map_or((false, None), |p| {
                        (p.current_input() == Some(input), p.since_last_frame())
                    })
                };
                let stalled = on_air && since.is_some_and(|d| d > timeout);
                if stalled && stream.state() == StreamState::Running {
                    let why = format!("no frame from the publisher for {} ms", timeout.as_millis());
                    sup.source_lost(&stream, input, Some(&who), Some((Refusal::Timeout, why)))
                        .await;
                    return;
                }
            }
        });
    }
}
