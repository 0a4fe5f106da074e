//! A `publish:` stream that outlives its publisher: when the source is lost (the publisher left, its media
//! failed, or no frame came for `SOURCE_TIMEOUT`) a running stream switches its encoders' input to the slate and
//! keeps every rendition going at real time; the next publisher with the key takes over from the slate at its
//! first decoded frame. After `reconnect_window_s` on the slate with nobody back, the stream ends (ENDLIST); with
//! `mode: end` it ends at once. The switches are in `kiln_media` (one timeline, same encoders); here are the
//! policy, the timers, the status and the series.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kiln_model::{Resilience, SourceLoss, SourceLossMode};

use super::*;

/// No frame from a connected publisher for this long is a loss (the issue's `source_timeout_ms`).
pub const SOURCE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A publish stream's slate and its history.
#[derive(Debug, Default)]
pub(crate) struct ResilienceState {
    /// Since when the slate is on (unix ms, and the instant for durations).
    slate_since: Option<(u64, Instant)>,
    /// Slate time of earlier stretches.
    slate_before: Duration,
    /// Slate seconds already added to the counter.
    slate_counted: f64,
    source_losses: u64,
    reconnects: u64,
}

impl ResilienceState {
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
}

impl StreamHandle {
    /// What to do when the source goes.
    pub fn on_source_loss(&self) -> SourceLoss {
        self.request.on_source_loss.unwrap_or_default()
    }

    /// The `resilience` part of a publish stream's status.
    pub(super) fn resilience_status(&self) -> Option<Resilience> {
        if !self.is_publish() {
            return None;
        }
        let r = self.resilience.lock();
        let policy = self.on_source_loss();
        let active = match self.pipeline.lock().as_ref().and_then(|p| p.input()) {
            Some(kiln_media::InputKind::Slate) => "slate",
            Some(kiln_media::InputKind::Source) => "source",
            None => "none",
        };
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
            slate_seconds: r.slate_total().as_secs_f64(),
            on_source_loss: policy,
        })
    }

    /// Sets the slate series from the current state (each `/metrics` scrape).
    pub(super) fn refresh_resilience(&self, m: &crate::metrics::ingest::IngestMetrics) {
        if !self.is_publish() {
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
    }

    /// Source input `input` took over: a publisher back from the slate (counted) when the slate was on.
    pub(super) fn resilience_back(&self, input: u64) -> bool {
        let mut r = self.resilience.lock();
        if r.slate_since.is_none() {
            return false;
        }
        r.slate_off();
        r.reconnects += 1;
        self.span
            .in_scope(|| tracing::info!(input, "the publisher is back on air"));
        true
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
        let input = who.input.load(Ordering::SeqCst);
        self.source_lost(h, input, detail.map(|d| (Refusal::Pipeline, d)))
            .await
    }

    /// The source of input `input` is gone (its publisher left, its media failed, or it stalled): its publisher,
    /// if still the stream's, is cut off with `why`, and the stream goes on the slate, ends (`mode: end`), or,
    /// when it never produced a part, waits for the next publisher. A no-op for any other input (a publisher
    /// that already left or was replaced).
    pub(super) async fn source_lost(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        input: u64,
        why: Option<(Refusal, String)>,
    ) {
        let who = {
            let mut slot = h.publisher.lock();
            if slot
                .as_ref()
                .is_none_or(|p| p.input.load(Ordering::SeqCst) != input)
            {
                return;
            }
            slot.take()
        };
        if let Some(who) = &who {
            if let Some(w) = &why {
                who.kicked_for.lock().get_or_insert(w.clone());
            }
            who.kick.notify_one();
        }
        *h.publish_feed.lock() = None;
        let detail = why.map(|(_, d)| d);
        let on_slate = h.resilience.lock().slate_since.is_some();
        match (h.state(), h.on_source_loss().mode) {
            // a publisher that came back but never got on air: the slate stays, its window runs on
            (StreamState::Running, _) if on_slate => {
                if let Some(Err(e)) = h.pipeline.lock().as_ref().map(|p| p.switch_to_slate()) {
                    h.push_error(format!("the slate: {e}"));
                }
            }
            (StreamState::Running, SourceLossMode::Slate) => self.slate_on(h, detail),
            (StreamState::Running, SourceLossMode::End) => {
                self.count_loss(h);
                h.span.in_scope(|| tracing::info!(error = ?detail, "source lost: the stream ends (on_source_loss: end)"));
                self.end_stream(h).await;
            }
            // never on air: back to waiting, as before the publisher came
            (StreamState::Starting, _) => self.teardown(h, detail).await,
            _ => {}
        }
    }

    fn count_loss(&self, h: &StreamHandle) {
        h.resilience.lock().source_losses += 1;
        self.metrics
            .ingest
            .source_losses
            .with_label_values(&[h.plan.id.as_str()])
            .inc();
    }

    /// Puts the slate on and arms the reconnect window.
    fn slate_on(self: &Arc<Self>, h: &Arc<StreamHandle>, detail: Option<String>) {
        let switched = h.pipeline.lock().as_ref().map(|p| p.switch_to_slate());
        if let Some(Err(e)) = switched {
            h.push_error(format!("the slate could not start: {e}"));
        }
        self.count_loss(h);
        let since = {
            let mut r = h.resilience.lock();
            let since = *r.slate_since.get_or_insert((unix_ms(), Instant::now()));
            since.1
        };
        let window = h.on_source_loss().reconnect_window_s;
        h.span.in_scope(|| {
            tracing::warn!(error = ?detail, window_s = window, "source lost: the slate is on air")
        });
        if window == 0 {
            return;
        }
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(window))).await;
            // still the same stretch of slate, nobody back
            let same = stream.resilience.lock().slate_since.map(|(_, t)| t) == Some(since);
            let (Some(sup), true) = (sup.upgrade(), same) else {
                return;
            };
            if stream.publisher().is_some() || stream.state() != StreamState::Running {
                return;
            }
            stream.span.in_scope(|| {
                tracing::info!(window_s = window, "nobody came back: the stream ends")
            });
            sup.end_stream(&stream).await;
        });
    }

    /// Ends a running stream now: ENDLIST, `ended`, its bookings back (it stays listed until deleted).
    pub(super) async fn end_stream(&self, h: &Arc<StreamHandle>) {
        let p = {
            let _slot = h.publisher.lock();
            h.pipeline_epoch.fetch_add(1, Ordering::SeqCst);
            h.pipeline.lock().take()
        };
        if let Some(p) = p {
            let _ = tokio::task::spawn_blocking(move || drop(p)).await;
        }
        h.resilience.lock().slate_off();
        h.origin.end();
        h.set_state(StreamState::Ended);
        h.eos.send_replace(true);
        self.release_all(h);
    }

    /// Watches the publisher on input `input` of `h` while it is on air: no frame for [`SOURCE_TIMEOUT`] is a
    /// loss. Ends when that publisher is no longer the stream's.
    pub(super) fn watch_stalls(self: &Arc<Self>, h: &Arc<StreamHandle>, input: u64) {
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(sup) = sup.upgrade() else { return };
                let ours = stream
                    .publisher()
                    .is_some_and(|p| p.input.load(Ordering::SeqCst) == input);
                if !ours {
                    return;
                }
                let (source, since) = {
                    let p = stream.pipeline.lock();
                    p.as_ref().map_or((false, None), |p| {
                        (
                            p.input() == Some(kiln_media::InputKind::Source),
                            p.since_last_frame(),
                        )
                    })
                };
                let stalled = source && since.is_some_and(|d| d > SOURCE_TIMEOUT);
                if stalled && stream.state() == StreamState::Running {
                    let why = format!(
                        "no frame from the publisher for {} ms",
                        SOURCE_TIMEOUT.as_millis()
                    );
                    sup.source_lost(&stream, input, Some((Refusal::Timeout, why)))
                        .await;
                    return;
                }
            }
        });
    }
}
