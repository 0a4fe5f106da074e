//! A stream's backup input (`"backup": {"source": …, "failback_s": 10}`), the MediaLive automatic input
//! failover model: a second pulled source decoded all the time next to the stream's own (booked in admission).
//! - **Failover.** When the source on air is lost (any loss [`super::resilience`] and [`super::pulled`] know) and
//!   the backup decodes, the backup goes on air at its next frame instead of the slate.
//! - **Failback.** The source that comes back (a publisher, or an attempt to pull it again) starts in standby:
//!   decoded, off air. Once it has decoded without a gap for `failback_s`, it takes over at its next frame.
//! - **The backup fails.** On air: the waiting source takes over if it decodes, else the slate goes on (and
//!   the source is waited for or pulled again, as without a backup). Off air: it is started again with
//!   backoff. Either way it is started again.
//!
//! Every switch is the media crate's (one timeline, same encoders, no discontinuity); here are the decisions.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;

/// A backup that failed off air is started again after this long, doubling up to [`RESTART_MAX`].
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A backup (re)started that has decoded nothing after this long has failed.
const FIRST_FRAME_LIMIT: Duration = Duration::from_secs(10);

impl Supervisor {
    /// Source input `lost`, on air, is gone (`why`): when the stream's backup decodes, it goes on air at its next
    /// frame instead of the slate, and a pulled source is pulled again behind it. Returns whether it did.
    pub(super) async fn fail_over(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        lost: u64,
        why: Option<&str>,
    ) -> bool {
        // a backup that failed (its error came first: one outage for both) is not armed
        if h.plan.backup.is_none()
            || h.state() != StreamState::Running
            || h.resilience.lock().backup_failed
        {
            return false;
        }
        let Some(s) = h.switcher() else { return false };
        let timeout = h.on_source_loss().source_timeout();
        let seen = s.backup_since_seen();
        if seen.is_none_or(|d| d >= timeout) {
            h.span.in_scope(|| {
                tracing::warn!(error = ?why, backup_last_frame = ?seen, "source lost and the backup does not decode: no failover")
            });
            return false;
        }
        // off the runtime's threads: it takes the locks a streaming thread holds while it pushes
        let switched = tokio::task::spawn_blocking(move || s.switch_to_backup()).await;
        let Ok(Some(armed)) = switched else {
            return false;
        };
        self.count_loss(h);
        {
            let mut r = h.resilience.lock();
            r.lost_input = r.lost_input.max(lost);
            r.standby = None;
        }
        h.span.in_scope(
            || tracing::warn!(error = ?why, "source lost: the backup goes on air (failover)"),
        );
        if h.plan.source.is_pulled_live() {
            self.pull_behind_backup(h);
        }
        self.watch_takeover(h, lost, armed);
        true
    }

    /// The armed backup must take over within the stream's `source_timeout_ms` (it decoded just before, but may
    /// have failed with the source: one outage for both). If it has not, it goes back to standby and the slate
    /// goes on, as if there were no backup.
    /// `armed`: the generation the backup was armed with (that arming, in this pipeline, is what is watched).
    fn watch_takeover(self: &Arc<Self>, h: &Arc<StreamHandle>, lost: u64, armed: u64) {
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        let timeout = h.on_source_loss().source_timeout();
        let epoch = h.pipeline_epoch.load(Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(sup) = sup.upgrade() else { return };
            let Some(s) = stream.switcher() else { return };
            if stream.state() != StreamState::Running
                || stream.pipeline_epoch.load(Ordering::SeqCst) != epoch
            {
                return;
            }
            // false: it took over (or was re-armed or replaced) meanwhile
            let disarmed = tokio::task::spawn_blocking(move || s.disarm_backup(armed)).await;
            if !matches!(disarmed, Ok(true)) {
                return;
            }
            stream.resilience.lock().backup_failed = true;
            let why = format!(
                "the backup did not take over within {} ms",
                timeout.as_millis()
            );
            sup.backup_failed_on_air(&stream, lost, why, true).await;
        });
    }

    /// The consumer's side of a switch: counts failovers (to the backup) and failbacks (from it), with their
    /// series and webhook.
    pub(super) fn count_switch(
        &self,
        h: &Arc<StreamHandle>,
        kind: kiln_media::InputKind,
        from: kiln_media::InputKind,
    ) {
        use kiln_media::InputKind::{Backup, Source};
        let to = match (kind, from) {
            (Backup, Backup) => return,
            (Backup, _) => "backup",
            (Source, Backup) => "source",
            _ => return,
        };
        {
            let mut r = h.resilience.lock();
            if from == kiln_media::InputKind::Slate {
                r.slate_off(); // the backup replaced the slate
            }
            if to == "backup" {
                r.failovers += 1;
            } else {
                r.failbacks += 1;
                r.standby = None;
                r.failback_at = None;
            }
        }
        self.metrics
            .ingest
            .failovers
            .with_label_values(&[h.plan.id.as_str(), to])
            .inc();
        h.span
            .in_scope(|| tracing::info!(to, "input switched between the source and the backup"));
        self.event("source.failover", h);
    }

    /// Source input `input` decodes behind the backup: once it has decoded without a gap (of the stream's
    /// `source_timeout_ms`) for `failback_s`, it takes over at its next frame. `who`: its publisher (whose
    /// generation follows), for a publish stream. Gives up when the input goes, or the backup is no longer on air.
    pub(super) fn fail_back(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        input: u64,
        who: Option<Arc<Publisher>>,
    ) {
        let Some(failback) = h.plan.backup.as_ref().map(|b| b.failback()) else {
            return;
        };
        h.resilience.lock().standby = Some(input);
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        let timeout = h.on_source_loss().source_timeout();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut healthy_since: Option<Instant> = None;
            let mut decoded = false;
            loop {
                tick.tick().await;
                if stream.state() != StreamState::Running
                    || stream.resilience.lock().standby != Some(input)
                {
                    stream.resilience.lock().failback_at = None;
                    return;
                }
                if let Some(w) = &who {
                    let ours = stream.publisher().is_some_and(|p| Arc::ptr_eq(&p, w));
                    if !ours {
                        stream.resilience.lock().failback_at = None;
                        return;
                    }
                }
                let Some(s) = stream.switcher() else { return };
                let seen = s.since_seen(input);
                if seen.is_some_and(|d| d < timeout) {
                    decoded = true;
                    let since = *healthy_since.get_or_insert_with(|| {
                        stream.resilience.lock().failback_at =
                            Some(unix_ms() + failback.as_millis() as u64);
                        Instant::now()
                    });
                    if since.elapsed() < failback {
                        continue;
                    }
                } else {
                    healthy_since = None;
                    stream.resilience.lock().failback_at = None;
                    // a publisher that decoded and then stopped sending (its connection still open) is lost: it
                    // would hold the key's slot for good
                    if let (true, Some(w), Some(sup)) = (decoded, &who, sup.upgrade()) {
                        let why = format!(
                            "no frame from the publisher for {} ms while it waited behind the backup",
                            timeout.as_millis()
                        );
                        sup.source_lost(&stream, input, Some(w), Some((Refusal::Timeout, why)))
                            .await;
                        return;
                    }
                    continue;
                }
                let armed = tokio::task::spawn_blocking(move || s.arm(input)).await;
                stream.resilience.lock().failback_at = None;
                let Ok(Some(armed)) = armed else { return };
                if let Some(w) = &who {
                    w.input.store(armed, Ordering::SeqCst);
                }
                stream.resilience.lock().standby = Some(armed);
                stream.span.in_scope(|| {
                    tracing::info!(
                        input = armed,
                        failback_s = failback.as_secs(),
                        "the source has been healthy for failback_s: it takes over from the backup"
                    )
                });
                return;
            }
        });
    }

    /// Pulls a lost source again while the backup is on air: attempts in standby (with the backoff of
    /// [`super::pulled`]), the first that decodes is handed to [`Self::fail_back`].
    fn pull_behind_backup(self: &Arc<Self>, h: &Arc<StreamHandle>) {
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        let token = {
            let mut r = h.resilience.lock();
            r.behind += 1;
            r.behind
        };
        tokio::spawn(async move {
            // only while the backup is on air (the source back ends it, and on the slate, the backup failed too,
            // the slate's own attempts run), and only the newest such loop
            let behind = |s: &StreamHandle| {
                s.state() == StreamState::Running
                    && s.resilience.lock().behind == token
                    && s.pipeline.lock().as_ref().and_then(|p| p.input())
                        == Some(kiln_media::InputKind::Backup)
            };
            let mut wait = Duration::from_secs(1);
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
                let Some(sup) = sup.upgrade() else { return };
                if !behind(&stream) {
                    return;
                }
                let opts =
                    match sup.build_options(&stream.placement(), &stream.plan, &stream.input, None)
                    {
                        Ok(o) => o,
                        Err(e) => {
                            stream.push_error(format!("pulling the source again: {e}"));
                            continue;
                        }
                    };
                let attempt = match stream.start_standby(opts).await {
                    Ok(g) => g,
                    Err(e) => {
                        stream.push_error(format!("pulling the source again: {e}"));
                        continue;
                    }
                };
                stream.resilience.lock().retries += 1;
                let started = Instant::now();
                let mut handed = false;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    if !behind(&stream) {
                        return;
                    }
                    // the attempt failed (its generation, or the one it got when armed)
                    if stream.resilience.lock().failed_input >= attempt {
                        break;
                    }
                    let s = stream.switcher();
                    if !handed {
                        if s.and_then(|s| s.since_seen(attempt)).is_some() {
                            sup.fail_back(&stream, attempt, None);
                            handed = true;
                        } else if started.elapsed() > super::pulled::ATTEMPT_LIMIT {
                            break;
                        }
                        continue;
                    }
                    // handed over, but it stopped decoding for good: the next attempt
                    let standby = stream.resilience.lock().standby;
                    let gone = standby.is_none_or(|g| {
                        s.and_then(|s| s.since_seen(g))
                            .is_none_or(|d| d > super::pulled::ATTEMPT_LIMIT)
                    });
                    if gone {
                        break;
                    }
                }
                // withdrawn before the wait for the next attempt (it, or the generation it got when armed)
                withdraw_attempt(&stream, attempt).await;
            }
        });
    }

    /// The backup failed (`why`: an error, its end, or no frame). On air: the source waiting behind it takes over
    /// if it decodes, else the slate goes on. Either way the backup is started again.
    pub(super) async fn backup_lost(self: &Arc<Self>, h: &Arc<StreamHandle>, why: String) {
        {
            // one failure often brings several errors: the first is handled, until the backup is started again
            let mut r = h.resilience.lock();
            if r.backup_failed {
                return;
            }
            r.backup_failed = true;
        }
        // a backup publisher cannot be called again: it is cut off, and the next one replaces it
        h.kick_backup_publisher(Refusal::Pipeline, &why);
        let (on_air, armed, lost) = {
            let p = h.pipeline.lock();
            let p = p.as_ref();
            let s = p.and_then(|p| p.switcher());
            (
                p.and_then(|p| p.input()) == Some(kiln_media::InputKind::Backup),
                s.as_ref()
                    .filter(|s| s.backup_armed())
                    .and_then(|s| s.backup_input()),
                p.and_then(|p| p.current_input()).unwrap_or(0),
            )
        };
        if h.state() != StreamState::Running {
            return;
        }
        if let (false, Some(g), Some(s)) = (on_air, armed, h.switcher()) {
            // armed for a failover and failed before it took over: the loss it was armed for was counted then
            let disarmed = tokio::task::spawn_blocking(move || s.disarm_backup(g)).await;
            let counted = matches!(disarmed, Ok(true));
            self.backup_failed_on_air(h, lost, why, counted).await;
            return;
        }
        if !on_air {
            h.span
                .in_scope(|| tracing::warn!(error = %why, "the backup failed off air"));
            return;
        }
        self.backup_failed_on_air(h, lost, why, false).await;
    }

    /// The backup on air (input `lost`, or armed to replace it) failed: the source waiting behind it takes over
    /// if it decodes; else the slate goes on (or the stream ends, `mode: end`), and a pulled source is pulled
    /// again. `counted`: the loss was counted (and announced) when the backup was armed for it, and it never got
    /// on air.
    async fn backup_failed_on_air(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        lost: u64,
        why: String,
        counted: bool,
    ) {
        h.push_error(format!("backup: {why}"));
        if !counted {
            self.event("source.lost", h);
        }
        let Some(s) = h.switcher() else { return };
        let timeout = h.on_source_loss().source_timeout();
        let standby = h.resilience.lock().standby;
        if let Some(g) = standby.filter(|g| s.since_seen(*g).is_some_and(|d| d < timeout)) {
            let armed = tokio::task::spawn_blocking(move || s.arm(g)).await;
            if let Ok(Some(armed)) = armed {
                if let Some(p) = h.publisher() {
                    if p.input.load(Ordering::SeqCst) == g {
                        p.input.store(armed, Ordering::SeqCst);
                    }
                }
                h.resilience.lock().standby = Some(armed);
                h.span.in_scope(|| tracing::warn!(error = %why, "the backup failed on air: the source takes over at once"));
                return;
            }
        }
        h.resilience.lock().standby = None;
        if h.on_source_loss().mode == kiln_model::SourceLossMode::End {
            if !counted {
                self.count_loss(h);
            }
            h.span.in_scope(|| tracing::info!(error = %why, "the backup failed on air: the stream ends (on_source_loss: end)"));
            self.end_stream(h).await;
            return;
        }
        h.span.in_scope(
            || tracing::warn!(error = %why, "the backup failed on air and the source is not back: slate"),
        );
        let stretch = self.slate_on_counted(h, lost, Some(why), !counted).await;
        if h.plan.source.is_pulled_live() {
            self.pull_again(h, stretch);
        }
    }

    /// Watches a stream's backup for the stream's life: no frame while it is on air is its loss; failed off air
    /// (an error, its end, nothing decoded in [`FIRST_FRAME_LIMIT`], or a gap) it is started again with backoff.
    pub(super) fn watch_backup(self: &Arc<Self>, h: &Arc<StreamHandle>) {
        let (sup, stream) = (Arc::downgrade(self), h.clone());
        let timeout = h.on_source_loss().source_timeout();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut started = Instant::now();
            let mut wait = RESTART_FIRST;
            let mut next_restart: Option<Instant> = None;
            loop {
                tick.tick().await;
                match stream.state() {
                    StreamState::Running | StreamState::Starting | StreamState::Waiting => {}
                    _ => return,
                }
                let Some(sup) = sup.upgrade() else { return };
                let (on_air, seen, since_frame) = {
                    let p = stream.pipeline.lock();
                    let Some(p) = p.as_ref() else {
                        started = Instant::now();
                        continue;
                    };
                    (
                        p.input() == Some(kiln_media::InputKind::Backup),
                        p.switcher().and_then(|s| s.backup_since_seen()),
                        p.since_last_frame(),
                    )
                };
                if on_air {
                    if since_frame.is_some_and(|d| d > timeout) {
                        let why =
                            format!("no frame from the backup for {} ms", timeout.as_millis());
                        sup.backup_lost(&stream, why).await;
                    }
                    continue;
                }
                if sup.backup_replaces_slate(&stream, seen, timeout).await {
                    continue;
                }
                if stream.has_publish_backup() {
                    // nothing to start again: the next backup publisher replaces a failed one
                    sup.check_backup_publisher(&stream, seen, timeout).await;
                    continue;
                }
                let failed = stream.resilience.lock().backup_failed
                    || seen.map_or(started.elapsed() > FIRST_FRAME_LIMIT, |d| {
                        d > timeout.max(Duration::from_secs(2))
                    });
                if !failed {
                    if seen.is_some() {
                        wait = RESTART_FIRST;
                    }
                    continue;
                }
                let due = *next_restart.get_or_insert_with(|| Instant::now() + wait);
                if Instant::now() < due {
                    continue;
                }
                next_restart = None;
                let Some(s) = stream.switcher() else { continue };
                let restarted = tokio::task::spawn_blocking(move || s.restart_backup()).await;
                match restarted {
                    // armed or on air meanwhile: its failure is handled there (no attempt made, no backoff)
                    Ok(Ok(false)) | Err(_) => continue,
                    Ok(Ok(true)) => {}
                    Ok(Err(e)) => stream.push_error(format!("backup: starting it again: {e}")),
                }
                wait = (wait * 2).min(RESTART_MAX);
                started = Instant::now();
                {
                    let mut r = stream.resilience.lock();
                    r.backup_failed = false;
                    r.backup_restarts += 1;
                }
                stream
                    .span
                    .in_scope(|| tracing::info!("the backup failed off air: started again"));
            }
        });
    }
}

impl Supervisor {
    /// On the slate (the backup had failed too), a backup that decodes again replaces it, and a pulled source is
    /// pulled again behind it. Returns whether the slate is on with the backup decoding.
    async fn backup_replaces_slate(
        self: &Arc<Self>,
        stream: &Arc<StreamHandle>,
        seen: Option<Duration>,
        timeout: Duration,
    ) -> bool {
        let on_slate = stream.pipeline.lock().as_ref().and_then(|p| p.input())
            == Some(kiln_media::InputKind::Slate);
        if !on_slate
            || stream.state() != StreamState::Running
            || seen.is_none_or(|d| d >= timeout)
            || stream.resilience.lock().backup_failed
        {
            return false;
        }
        let Some(s) = stream.switcher() else {
            return true;
        };
        // a source about to take over from the slate (a returning publisher, an attempt) goes first
        if s.source_waiting() {
            return true;
        }
        let switched = tokio::task::spawn_blocking(move || s.switch_to_backup()).await;
        if matches!(switched, Ok(Some(_))) {
            stream
                .span
                .in_scope(|| tracing::info!("the backup decodes again: it replaces the slate"));
            if stream.plan.source.is_pulled_live() {
                self.pull_behind_backup(stream);
            }
        }
        true
    }
}

/// Withdraws a failed attempt to pull the source again behind the backup: its generation, and the one it got if
/// it was armed.
async fn withdraw_attempt(stream: &StreamHandle, attempt: u64) {
    let standby = stream.resilience.lock().standby.take();
    if let Some(s) = stream.switcher() {
        let _ = tokio::task::spawn_blocking(move || {
            s.withdraw(attempt);
            if let Some(g) = standby {
                s.withdraw(g);
            }
        })
        .await;
    }
}
