//! A running stream's consumer: media events from the pipeline feed the origin (parts, segments, init), errors
//! are recorded, and an encoder failure rebuilds the stream on the CPU (the runtime fallback) within a restart
//! budget. A publish stream's source errors and ends are losses of its source ([`super::resilience`]).

use super::*;

/// Builds and starts a pipeline on a blocking thread. Returns it, the wall-clock ms of its running time 0 and its
/// events. `continue_from` continues an earlier pipeline's timeline (a rebuild).
pub(super) async fn launch(
    plan: &StreamPlan,
    opts: BuildOptions,
    continue_from: Option<i64>,
) -> Result<(LivePipeline, i64, mpsc::Receiver<MediaEvent>), SupervisorError> {
    let (tx, rx) = mpsc::channel::<MediaEvent>(EVENT_QUEUE);
    let sink: kiln_media::EventSink = Arc::new(move |ev| {
        // Streaming threads may block briefly (backpressure); a message posted from inside the runtime (a
        // state change called from async code) must not.
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = tx.try_send(ev);
        } else {
            let _ = tx.blocking_send(ev);
        }
    });
    let plan = plan.clone();
    let (p, origin_ms) = tokio::task::spawn_blocking(move || {
        let p = LivePipeline::build_with(&plan, &opts, sink)?;
        let origin_ms = p.start_at(continue_from)?;
        Ok::<_, kiln_media::MediaError>((p, origin_ms))
    })
    .await
    .map_err(|e| SupervisorError::Media(e.to_string()))?
    .map_err(|e| SupervisorError::Media(e.to_string()))?;
    Ok((p, origin_ms, rx))
}

impl Supervisor {
    /// Rebuilds a running stream's pipeline on the CPU after its encoder failed: the old pipeline is torn down
    /// (freeing its NVENC session), its bookings released, the CPU placement booked (never over-committing: no
    /// room means the stream fails), and the new pipeline continues the stream's timeline. Bounded: a `gpu-only`
    /// stream never falls back, and more than [`MAX_RESTARTS`] rebuilds in [`RESTART_WINDOW_MS`] fail it.
    pub(super) async fn fallback(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        error: &str,
        origin_ms: i64,
    ) -> Result<mpsc::Receiver<MediaEvent>, SupervisorError> {
        let now = unix_ms();
        fallback_allowed(h, now)?;
        // a publish stream's new pipeline starts on the slate: its publishers are cut off first (see
        // `cut_off_for_rebuild`), together with taking the pipeline, so their sessions' ends find nothing to lose
        let on_slate = h.plan.source.is_publish();
        let (p, source_on_air) = if on_slate {
            h.cut_off_for_rebuild()
        } else {
            (h.pipeline.lock().take(), false)
        };
        // a stop took the pipeline first: it tears it down and releases what it booked
        let Some(p) = p else {
            return Err(SupervisorError::Media(
                "the stream's pipeline was taken by a stop before its rebuild".into(),
            ));
        };
        // the old pipeline's bookings leave the placement with it: a stop or a failure that comes while it is torn
        // down finds neither, so nothing is released twice
        let old = Self::take_bookings(h);
        let stuck = tear_down(p).await;
        // a stuck teardown may still hold the old NVENC session: its bookings wait for it
        match stuck {
            Some(j) => self.hold_until_torn_down(j, old),
            None => self.release_placement(&old),
        }
        let nothing = Placement {
            host: Resources::default(),
            gpu: None,
            decode_gpu: None,
            ..old
        };
        *h.placement.lock() = nothing;
        let new = self.place(&h.plan, true)?;
        let started = async {
            let feed = h.publish_feed.lock().clone();
            let opts = self.build_options(&new, &h.plan, &h.input, feed)?;
            launch(&h.plan, opts, Some(origin_ms)).await
        }
        .await;
        let (pipeline, _, rx) = match started {
            Ok(r) => r,
            Err(e) => {
                self.release_placement(&new);
                return Err(e);
            }
        };
        // installed only on a stream still live, under the publisher lock, which a stop (`begin_stop`), a failure
        // (`fail`) and an end (`end_stream`) take to change the state: either they come after and take this
        // pipeline and its bookings, or they came during the rebuild and the new pipeline goes with its bookings
        let stopped = {
            let _order = h.publisher.lock();
            if matches!(h.state(), StreamState::Starting | StreamState::Running) {
                *h.pipeline.lock() = Some(pipeline);
                h.pipeline_epoch
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                *h.placement.lock() = new;
                None
            } else {
                Some(pipeline)
            }
        };
        if let Some(p) = stopped {
            match tear_down(p).await {
                Some(j) => self.hold_until_torn_down(j, new),
                None => self.release_placement(&new),
            }
            return Err(SupervisorError::Media(format!(
                "the stream left its live state ({:?}) while its pipeline was rebuilt",
                h.state()
            )));
        }
        h.fallbacks.lock().push(Fallback {
            at_unix_ms: now,
            from: old.backend,
            to: new.backend,
            reason: "encoder_error".into(),
            error: error.chars().take(300).collect(),
        });
        self.metrics
            .fallbacks
            .with_label_values(&[h.plan.id.as_str(), "encoder_error"])
            .inc();
        tracing::warn!(from = old.backend.label(), to = new.backend.label(), %error, "encoder failed: pipeline rebuilt");
        self.event("encoder.fallback", h);
        self.new_pipeline_inputs(h, on_slate, source_on_air).await;
        Ok(rx)
    }
}

/// Whether stream `h` may be rebuilt at `now`: not `gpu-only`, and under [`MAX_RESTARTS`] rebuilds in
/// [`RESTART_WINDOW_MS`].
fn fallback_allowed(h: &StreamHandle, now: u64) -> Result<(), SupervisorError> {
    if h.plan.encoder.policy == Policy::GpuOnly {
        return Err(SupervisorError::Policy(
            "the encoder failed and policy gpu-only forbids a CPU fallback".into(),
        ));
    }
    let recent = h
        .fallbacks
        .lock()
        .iter()
        .filter(|f| now.saturating_sub(f.at_unix_ms) < RESTART_WINDOW_MS)
        .count();
    if recent >= MAX_RESTARTS {
        return Err(SupervisorError::Policy(format!(
            "the encoder failed {} times within {} s; not rebuilding again",
            recent + 1,
            RESTART_WINDOW_MS / 1000
        )));
    }
    Ok(())
}

/// Whether a bus message came from an encoder element (`…/GstX264Enc:enc-720p`).
pub(super) fn from_encoder(element: Option<&str>) -> bool {
    element
        .and_then(|e| e.rsplit('/').next())
        .and_then(|e| e.rsplit(':').next())
        .is_some_and(|n| n.starts_with("enc-"))
}

/// Feeds one stream's events into the origin, and records them in the metrics.
// Long by design: one loop with one short arm per pipeline event type.
pub(super) async fn consume(
    h: Arc<StreamHandle>,
    mut rx: mpsc::Receiver<MediaEvent>,
    metrics: Arc<crate::metrics::Metrics>,
    supervisor: std::sync::Weak<Supervisor>,
    origin_ms: i64,
    resumed: bool,
    mut epoch: u64,
) {
    let names: Vec<String> = h
        .origin
        .renditions
        .iter()
        .map(|r| r.info.name.clone())
        .collect();
    let mut media_ns = vec![0u64; names.len()];
    // after a rebuild, the first part of each rendition opens a discontinuity
    let mut discontinuity = vec![resumed; names.len()];
    let mut first_part: Option<std::time::Instant> = None;
    while let Some(ev) = rx.recv().await {
        // the events of a pipeline that was replaced or dropped are not the stream's (unless it drains for a stop)
        if h.pipeline_epoch.load(std::sync::atomic::Ordering::SeqCst) != epoch
            && h.state() != StreamState::Stopping
        {
            return;
        }
        match ev {
            MediaEvent::Init {
                rendition,
                bytes,
                codec,
            } => h.origin.on_init(rendition, bytes, codec),
            MediaEvent::Part {
                rendition,
                mut part,
                at,
            } => {
                if let Some(d) = discontinuity.get_mut(rendition) {
                    part.discontinuity |= std::mem::take(d);
                }
                let (bytes, dur) = (part.bytes.len(), part.duration_ns);
                let published = h.origin.on_part(rendition, part);
                if let (Ok(_), Some(name)) = (&published, names.get(rendition)) {
                    let first = *first_part.get_or_insert(at);
                    media_ns[rendition] += dur;
                    metrics.part(
                        &h.plan.id,
                        name,
                        bytes,
                        std::time::Duration::from_nanos(dur),
                        at.elapsed(),
                    );
                    let slowest_ns = media_ns.iter().copied().min().unwrap_or(0);
                    h.media_ns
                        .store(slowest_ns, std::sync::atomic::Ordering::Relaxed);
                    let wall = first.elapsed().as_secs_f64();
                    if wall >= 1.0 {
                        let slowest = slowest_ns as f64 / 1e9;
                        metrics
                            .realtime_ratio
                            .with_label_values(&[h.plan.id.as_str()])
                            .set(slowest / wall);
                    }
                }
                if let Err(e) = published {
                    tracing::debug!(error = %e, "part dropped");
                } else if h.state() == StreamState::Starting
                    && h.origin
                        .renditions
                        .iter()
                        .all(|r| r.snapshot().last.is_some())
                    && h.set_state(StreamState::Running)
                {
                    if let Some(sup) = supervisor.upgrade() {
                        sup.event("stream.started", &h);
                    }
                }
            }
            MediaEvent::Warning { element, message } => {
                tracing::warn!(?element, %message, "pipeline warning");
            }
            MediaEvent::Error {
                element,
                message,
                debug: details,
            } => {
                tracing::error!(?element, %message, ?details, "pipeline error");
                metrics
                    .stream_errors
                    .with_label_values(&[h.plan.id.as_str()])
                    .inc();
                h.push_error(match &element {
                    Some(e) => format!("{e}: {message}"),
                    None => message.clone(),
                });
                // a stop in progress (sources often post an error as they are shut): nothing more drains out of
                // a pipeline in error, so the stop's wait for the drain ends now, and the stop ends the stream
                // as it would have (`ended`, not `failed`: an operator's DELETE is not a failure)
                let backup = element
                    .as_deref()
                    .is_some_and(|e| kiln_media::is_backup(e, &h.plan.id));
                if h.state() == StreamState::Stopping && !backup {
                    h.eos.send_replace(true);
                    continue;
                }
                let live = matches!(h.state(), StreamState::Starting | StreamState::Running);
                // the backup's troubles are its own: it is started again (or, on air, replaced)
                if element
                    .as_deref()
                    .is_some_and(|e| kiln_media::is_backup(e, &h.plan.id))
                {
                    if let Some(sup) = supervisor.upgrade() {
                        sup.backup_lost(&h, message.clone()).await;
                    }
                    continue;
                }
                // the encoder failed: rebuilt on the CPU (a publish stream's on the slate, once it is on air)
                let rebuild = live
                    && from_encoder(element.as_deref())
                    && (!h.is_publish() || h.state() == StreamState::Running);
                if rebuild {
                    if let Some(sup) = supervisor.upgrade() {
                        let why = match &details {
                            Some(d) => format!("{message} ({d})"),
                            None => message.clone(),
                        };
                        match sup.fallback(&h, &why, origin_ms).await {
                            Ok(new_rx) => {
                                rx = new_rx;
                                epoch = h.pipeline_epoch.load(std::sync::atomic::Ordering::SeqCst);
                                discontinuity.iter_mut().for_each(|d| *d = true);
                                continue;
                            }
                            // stopped, failed or ended during the rebuild: that path has ended it
                            Err(_)
                                if !matches!(
                                    h.state(),
                                    StreamState::Starting | StreamState::Running
                                ) =>
                            {
                                continue
                            }
                            Err(e) => h.push_error(format!("no fallback: {e}")),
                        }
                        // no rebuild (refused, no CPU room, it failed to start): the stream fails, as any does
                        sup.fail(&h).await;
                        continue;
                    }
                }
                if live && h.is_publish() {
                    if let Some(sup) = supervisor.upgrade() {
                        sup.publish_error(&h, element.as_deref(), &message).await;
                    }
                    continue;
                }
                if h.state() == StreamState::Running && h.plan.source.is_pulled_live() {
                    if let Some(sup) = supervisor.upgrade() {
                        if sup.pulled_error(&h, element.as_deref(), &message).await {
                            continue;
                        }
                    }
                }
                if let Some(sup) = supervisor.upgrade() {
                    sup.fail(&h).await;
                }
            }
            MediaEvent::InputSwitched {
                input,
                kind,
                from_slate,
                from,
            } => {
                // a switch while the stream stops (an attempt that was under way) is not a reconnect
                if h.state() != StreamState::Running {
                    continue;
                }
                if let Some(sup) = supervisor.upgrade() {
                    sup.count_switch(&h, kind, from);
                }
                if kind == kiln_media::InputKind::Source && h.resilience_back(input, from_slate) {
                    metrics
                        .ingest
                        .reconnects
                        .with_label_values(&[h.plan.id.as_str()])
                        .inc();
                    // a publisher's connection is reported when it attaches; a pulled source's when it is back
                    if let (true, Some(sup)) =
                        (h.plan.source.is_pulled_live(), supervisor.upgrade())
                    {
                        sup.event("source.connected", &h);
                    }
                }
            }
            MediaEvent::SourceEnded { input, kind } => {
                let Some(sup) = supervisor.upgrade() else {
                    continue;
                };
                if kind == kiln_media::InputKind::Backup {
                    sup.backup_lost(&h, "the backup ended its feed".into())
                        .await;
                } else if h.is_publish() {
                    sup.source_lost(&h, input, None, None).await;
                } else if h.state() == StreamState::Running {
                    sup.pull_lost(&h, input, "the source ended its feed".into())
                        .await;
                } else if h.state() == StreamState::Starting {
                    // before the first part there is nothing to bridge: a feed that ends then fails the stream
                    h.push_error("the source ended before the stream started".into());
                    sup.fail(&h).await;
                }
            }
            MediaEvent::Eos => {
                h.eos.send_replace(true);
                // The source itself ended (a URL source's EOS), not a stop: end the playlists and free the
                // bookings now; the stream stays listed as `ended` until it is deleted.
                if matches!(h.state(), StreamState::Starting | StreamState::Running) {
                    tracing::info!("the source ended: ending the stream");
                    h.resilience.lock().slate_off();
                    h.origin.end();
                    let ended = h.set_state(StreamState::Ended);
                    let p = h.pipeline.lock().take();
                    match supervisor.upgrade() {
                        Some(sup) => {
                            if ended {
                                sup.event("stream.ended", &h);
                            }
                            if let Some(p) = p {
                                sup.tear_down_booked(&h, p).await;
                            }
                            sup.release_all(&h);
                        }
                        None => {
                            if let Some(p) = p {
                                tear_down(p).await;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Supervisor {
    /// Fails stream `h` (its error is recorded already): `failed`, its pipeline dropped, ENDLIST, its bookings
    /// back to the node at once (a failed stream runs nothing).
    pub(super) async fn fail(&self, h: &Arc<StreamHandle>) {
        // the state changes under the publisher lock, as a rebuild's install checks it (`fallback`)
        let (failed, kicked) = {
            let mut slot = h.publisher.lock();
            (h.set_state(StreamState::Failed), slot.take())
        };
        if failed {
            self.event("stream.failed", h);
        }
        // a publish stream's publishers are told why, not left to find their bytes unread
        if let Some(p) = kicked {
            p.kicked_for
                .lock()
                .get_or_insert((Refusal::Pipeline, "the stream failed".into()));
            p.kick.notify_one();
        }
        h.kick_backup_publisher(Refusal::Pipeline, "the stream failed");
        // ENDLIST before the teardown, which may take a while: a stream reported `failed` has ended playlists
        h.origin.end();
        let p = h.pipeline.lock().take();
        if let Some(p) = p {
            self.tear_down_booked(h, p).await;
        }
        h.resilience.lock().slate_off();
        h.eos.send_replace(true);
        self.release_all(h);
    }

    /// An error in a running pulled stream's pipeline: one from a source's pipeline is the loss of that source
    /// (or the failure of an attempt to pull it again). Whether it was: an error of the stream's own pipeline (an
    /// encoder, a muxer) is not the source's.
    pub(super) async fn pulled_error(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        element: Option<&str>,
        message: &str,
    ) -> bool {
        let id = h.plan.id.as_str();
        let Some(built) = element.and_then(|e| kiln_media::input_of(e, id)) else {
            return false;
        };
        let input = h.switcher().map_or(built, |s| s.resolve(built));
        self.pull_lost(h, input, message.to_string()).await;
        true
    }

    /// An error in a publish stream's pipeline: one from a source's pipeline (or its decode guard) is the loss of
    /// that source; any other stream-side error (the slate, an encoder before the stream ran: a running stream's
    /// encoder failure is rebuilt on the slate instead, or fails the stream) tears the pipeline down and the
    /// stream waits for the next publisher.
    pub(super) async fn publish_error(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        element: Option<&str>,
        message: &str,
    ) {
        let id = h.plan.id.as_str();
        // an element path carries the generation its input was built with; an input armed since has another
        let input = element
            .and_then(|e| kiln_media::input_of(e, id))
            .map(|built| h.switcher().map_or(built, |s| s.resolve(built)));
        let stream_side = element.is_some_and(|e| {
            from_encoder(Some(e))
                || e.starts_with(&format!("/kiln-{id}/"))
                || e.starts_with(&format!("/kiln-{id}-slate-"))
        });
        let current = h
            .publisher()
            .map(|p| p.input.load(std::sync::atomic::Ordering::SeqCst));
        match (input.or(current), stream_side) {
            (Some(input), false) => {
                let why = (Refusal::Pipeline, message.to_string());
                self.source_lost(h, input, None, Some(why)).await
            }
            _ => self.teardown(h, Some(message.to_string())).await,
        }
    }
}
