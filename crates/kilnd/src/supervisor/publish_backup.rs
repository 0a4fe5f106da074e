//! A `publish:` backup (`"backup": {"source": "publish:"}` on a `publish:` stream): a second publisher, with the
//! stream's backup key (RTMP) or the stream id `<id>/backup` (SRT, the stream's passphrase), whose bytes are
//! the stream's backup input. It connects once the stream has a pipeline (its primary started it); its input is
//! decoded all the time in standby and goes on air when the primary is lost, like a pulled backup
//! ([`super::backup`]). What differs: nobody can call it again, so a backup that fails (it leaves, its bytes
//! stop decoding, the pipeline is rebuilt or torn down) has its publisher cut off, and the next backup
//! publisher that connects replaces it.
//!
//! Also here: what a rebuild (the CPU fallback) does to a publish stream's publishers and slate.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

impl StreamHandle {
    /// Cuts the backup publisher off (if any) with `why`; its slot is free for the next one.
    pub(crate) fn kick_backup_publisher(&self, refusal: Refusal, why: &str) {
        let gone = self.backup_publisher.lock().take();
        if let Some(p) = gone {
            p.kicked_for
                .lock()
                .get_or_insert((refusal, why.to_string()));
            p.kick.notify_one();
        }
    }

    /// Whether the stream's backup is a second publisher.
    pub(crate) fn has_publish_backup(&self) -> bool {
        self.plan
            .backup
            .as_ref()
            .is_some_and(|b| b.source.is_publish())
    }
}

impl StreamHandle {
    /// A publish stream is rebuilt (the CPU fallback): its publishers' bytes fed the old pipeline and cannot be
    /// replayed (the FLV header and codec configuration are consumed), so the new pipeline starts on the slate and
    /// both publishers (the primary on air or waiting behind the backup, the backup's) are cut off, to reconnect.
    /// Slots, feed and pipeline are taken together under the publisher lock (like `teardown`): a session that
    /// ends because the pipeline went finds its slot empty. Returns the old pipeline and whether the
    /// publisher's source was on air in it.
    pub(super) fn cut_off_for_rebuild(&self) -> (Option<LivePipeline>, bool) {
        let why = "the stream's encoder failed and it was rebuilt on the CPU: reconnect";
        let mut slot = self.publisher.lock();
        *self.publish_feed.lock() = None;
        if let Some(p) = slot.take() {
            p.kicked_for
                .lock()
                .get_or_insert((Refusal::Pipeline, why.into()));
            p.kick.notify_one();
        }
        self.kick_backup_publisher(Refusal::Pipeline, why);
        let p = self.pipeline.lock().take();
        let on_air = p.as_ref().and_then(|p| p.input()) == Some(kiln_media::InputKind::Source);
        (p, on_air)
    }
}

impl Supervisor {
    /// After a rebuild: the new pipeline numbers its inputs from 1, so what the old one's inputs left behind (a
    /// lost input, a source waiting behind the backup) is over. Started on its source, the stretch of slate ends
    /// too; started on the slate (`on_slate`), a stretch still open goes on, else one opens: a loss counted now
    /// when the publisher's source was on air (`source_on_air`), already counted when the backup was; with
    /// `on_source_loss.mode: end`, the stream ends instead.
    pub(super) async fn new_pipeline_inputs(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        on_slate: bool,
        source_on_air: bool,
    ) {
        let stretch_open = {
            let mut r = h.resilience.lock();
            r.new_pipeline(on_slate);
            r.slate_since.is_some()
        };
        if !on_slate || stretch_open {
            return;
        }
        if source_on_air {
            self.event("source.lost", h);
        }
        if h.on_source_loss().mode == kiln_model::SourceLossMode::End {
            if source_on_air {
                self.count_loss(h);
            }
            h.span.in_scope(|| {
                tracing::info!("the encoder failed with no input to rebuild on: the stream ends (on_source_loss: end)")
            });
            self.end_stream(h).await;
            return;
        }
        let why = "the encoder failed: rebuilt on the slate";
        self.slate_on_counted(h, 0, Some(why.into()), source_on_air)
            .await;
    }

    /// Makes what `publisher` (the backup's) sends through `rx` the stream's backup input, in standby. A backup
    /// that was on air and failed is still being replaced by the slate or the source when its successor
    /// connects at once: that is waited for (bounded).
    pub(super) async fn attach_backup(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        publisher: &Arc<Publisher>,
        rx: mpsc::Receiver<Bytes>,
    ) -> Result<(), SupervisorError> {
        let feed = super::publish::feed_of(rx);
        let deadline =
            Instant::now() + h.on_source_loss().source_timeout() + Duration::from_secs(2);
        let not_on_air = || {
            SupervisorError::Media(
                "the stream has no pipeline: a backup publisher is taken once the primary has started the stream"
                    .into(),
            )
        };
        // `Ok(false)`: nothing was built (the feed is unused), so trying again is safe
        let input =
            loop {
                let s = h.switcher().ok_or_else(not_on_air)?;
                let f = feed.clone();
                let s2 = s.clone();
                let attached = tokio::task::spawn_blocking(move || s2.attach_backup(f))
                    .await
                    .map_err(|e| SupervisorError::Media(format!("attaching the backup: {e}")))?;
                match attached {
                    Ok(true) => break s.backup_input().unwrap_or(0),
                    Ok(false) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Ok(false) => return Err(SupervisorError::Media(
                        "the last backup is still on air: the new backup publisher was not taken"
                            .into(),
                    )),
                    Err(e) => return Err(SupervisorError::Media(format!("the backup input: {e}"))),
                }
            };
        let kept = {
            let slot = h.backup_publisher.lock();
            let ours = slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, publisher));
            let live = matches!(h.state(), StreamState::Starting | StreamState::Running);
            if ours && live {
                publisher.attached.store(true, Ordering::SeqCst);
                publisher.input.store(input, Ordering::SeqCst);
            }
            ours && live
        };
        if !kept {
            return Err(SupervisorError::Media(
                "the stream stopped while the backup publisher was being attached".into(),
            ));
        }
        {
            let mut r = h.resilience.lock();
            if r.backup_publishers > 0 {
                r.backup_restarts += 1;
            }
            r.backup_publishers += 1;
            r.backup_failed = false;
        }
        h.span.in_scope(|| {
            tracing::info!(protocol = publisher.protocol.as_str(), addr = %publisher.addr, input, "backup publisher attached")
        });
        self.event("source.connected", h);
        Ok(())
    }

    /// The backup publisher's session ended (it left, or was cut off with `detail`): if it still holds the
    /// slot, its input has failed.
    pub(super) async fn backup_session_over(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        who: &Arc<Publisher>,
        detail: Option<String>,
    ) {
        let ours = {
            let mut slot = h.backup_publisher.lock();
            let ours = slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, who));
            if ours {
                *slot = None;
            }
            ours
        };
        if ours {
            let why = detail.unwrap_or_else(|| "the backup publisher left".into());
            self.backup_lost(h, why).await;
        }
    }

    /// The backup watchdog's part for a `publish:` backup (see `watch_backup`): a backup publisher whose bytes
    /// never decode (within the first-picture timeout) or stop decoding (for the stream's source timeout, at
    /// least 2 s) while off air has failed, and is cut off so that another may connect.
    pub(super) async fn check_backup_publisher(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        seen: Option<Duration>,
        timeout: Duration,
    ) {
        let Some(p) = h.backup_publisher() else {
            return;
        };
        if !p.attached.load(Ordering::SeqCst) || h.resilience.lock().backup_failed {
            return;
        }
        let connected = Duration::from_millis(unix_ms().saturating_sub(p.connected_unix_ms));
        let limit = self.config.ingest.first_picture_timeout;
        let why = match seen {
            None if connected > limit => format!(
                "nothing decodable from the backup publisher in {} s",
                limit.as_secs()
            ),
            Some(d) if d > timeout.max(Duration::from_secs(2)) => format!(
                "no frame from the backup publisher for {} ms",
                d.as_millis()
            ),
            _ => return,
        };
        h.kick_backup_publisher(Refusal::NoPicture, &why);
        self.backup_lost(h, why).await;
    }
}
