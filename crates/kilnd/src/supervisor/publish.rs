//! `publish:` streams: created waiting (booked, no pipeline), claimed by one authorized publisher, encoding while
//! it publishes. When it leaves or is cut off, a stream that is on air goes on the slate (see [`super::resilience`])
//! and the next publisher takes over from it; one that never got on air waits again, and the next publisher's
//! pipeline continues the timeline (with a discontinuity). The listeners in [`crate::ingest`] authorize, claim
//! and attach; nothing here touches a socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use kiln_model::ingest::{IngestInfo, Protocol, PublisherStatus};

use super::*;

/// A publish stream's key and passphrase: never logged, never in `GET` answers (only in the 201 that created it).
#[derive(Clone)]
pub struct Secrets {
    pub key: String,
    pub passphrase: String,
    /// The backup publisher's RTMP key (a stream with `"backup": {"source": "publish:"}`).
    pub backup_key: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(hidden)")
    }
}

/// The publisher connected to a stream.
#[derive(Debug)]
pub struct Publisher {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    /// Codec names the protocol announced (RTMP tags name them; SRT's MPEG-TS is only known to the demuxer).
    pub codecs: Mutex<Vec<String>>,
    /// Bytes received.
    pub bytes: AtomicU64,
    pub connected_unix_ms: u64,
    /// Notified when the daemon cuts the publisher off (the stream stops, its pipeline failed).
    pub kick: tokio::sync::Notify,
    /// Why, when the daemon said (else: the stream stopped or its pipeline ended).
    pub kicked_for: Mutex<Option<(Refusal, String)>>,
    /// A pipeline was started for it (from then on the consumer ends the session, not the listener).
    pub(super) attached: AtomicBool,
    /// The generation of the pipeline input its bytes feed (0 until attached; see `LivePipeline::switch_to_source`).
    pub input: AtomicU64,
    /// It publishes the stream's `publish:` backup (it came with the backup key or the `<id>/backup` stream id).
    pub backup: bool,
}

impl Publisher {
    pub fn status(&self) -> PublisherStatus {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = (unix_ms().saturating_sub(self.connected_unix_ms) as f64 / 1000.0).max(0.001);
        PublisherStatus {
            protocol: self.protocol,
            address: self.addr.to_string(),
            codecs: self.codecs.lock().clone(),
            bytes,
            input_bitrate_kbps: (bytes as f64 * 8.0 / 1000.0 / secs) as u64,
            connected_unix_ms: self.connected_unix_ms,
        }
    }
}

/// Why a publisher was refused or cut off: the `reason` label of `kiln_ingest_rejections_total` and
/// `kiln_ingest_disconnections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// RTMP: no stream has this key.
    UnknownKey,
    /// SRT: no stream has this id (or it is not a `publish:` stream).
    UnknownStream,
    /// SRT: the publisher's passphrase does not decrypt the stream's key material.
    BadPassphrase,
    /// SRT: the publisher did not encrypt (every publish stream has a passphrase).
    NoPassphrase,
    /// Someone already publishes to the stream.
    Busy,
    /// `--publish-auth-url` answered no.
    AuthDenied,
    /// `--publish-auth-url` failed, timed out, or answered something unusable.
    AuthError,
    /// A codec kiln cannot decode (HEVC over RTMP, …).
    Codec,
    /// The picture is larger than the stream's reservation or the daemon's `--ingest-max-*`.
    TooLarge,
    /// Over `--ingest-max-bitrate-kbps`.
    Bitrate,
    /// Bytes that are not the protocol (a bad handshake, a malformed stream id, random data).
    Protocol,
    /// Connected, then said nothing for too long.
    Timeout,
    /// The stream's pipeline failed or could not start.
    Pipeline,
    /// The daemon is shutting down or the stream is being deleted.
    Stopping,
    /// Bytes flowed but nothing decoded within the first-picture timeout.
    NoPicture,
}

impl Refusal {
    pub const ALL: [Refusal; 15] = [
        Refusal::UnknownKey,
        Refusal::UnknownStream,
        Refusal::BadPassphrase,
        Refusal::NoPassphrase,
        Refusal::Busy,
        Refusal::AuthDenied,
        Refusal::AuthError,
        Refusal::Codec,
        Refusal::TooLarge,
        Refusal::Bitrate,
        Refusal::Protocol,
        Refusal::Timeout,
        Refusal::Pipeline,
        Refusal::Stopping,
        Refusal::NoPicture,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownKey => "unknown_key",
            Refusal::UnknownStream => "unknown_stream",
            Refusal::BadPassphrase => "bad_passphrase",
            Refusal::NoPassphrase => "no_passphrase",
            Refusal::Busy => "busy",
            Refusal::AuthDenied => "auth_denied",
            Refusal::AuthError => "auth_error",
            Refusal::Codec => "codec",
            Refusal::TooLarge => "too_large",
            Refusal::Bitrate => "bitrate",
            Refusal::Protocol => "protocol",
            Refusal::Timeout => "timeout",
            Refusal::Pipeline => "pipeline",
            Refusal::Stopping => "stopping",
            Refusal::NoPicture => "no_picture",
        }
    }
}

/// What a publisher's bytes go through: bounded, so a pipeline that falls behind slows the publisher's socket
/// (TCP or SRT flow control) instead of growing memory.
pub const FEED_QUEUE: usize = 256;

/// A blocking reader over the publisher's chunks (the media crate's feed thread reads it).
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    rest: Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.rest.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.rest = b,
                None => return Ok(0), // the publisher left: end of stream
            }
        }
        let n = buf.len().min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest.split_to(n));
        Ok(n)
    }
}

/// A feed that hands out `rx` once (a rebuilt pipeline cannot replay a publisher: it gets an error and the
/// publisher is cut off, to reconnect).
pub(super) fn feed_of(rx: mpsc::Receiver<Bytes>) -> kiln_media::ByteFeed {
    let slot = Arc::new(Mutex::new(Some(rx)));
    kiln_media::ByteFeed(Arc::new(move || {
        let rx = slot.lock().take().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the publisher's bytes were already consumed by an earlier pipeline: it must reconnect",
            )
        })?;
        Ok(Box::new(ChunkReader {
            rx,
            rest: Bytes::new(),
        }) as Box<dyn std::io::Read + Send>)
    }))
}

/// Random URL-safe text of `bytes` random bytes (base64url without padding).
pub fn random_token(bytes: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).expect("the OS random source is available");
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = String::new();
    for b in raw {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

impl Supervisor {
    /// The secrets of a new publish stream: the request's, else random (key 144 bits, passphrase 120 bits).
    /// A stream with a `publish:` backup gets a second key, its backup publisher's.
    pub(super) fn publish_secrets(
        &self,
        request: &StreamRequest,
        plan: &StreamPlan,
    ) -> Result<Secrets, SupervisorError> {
        let asked = request.ingest.clone().unwrap_or_default();
        asked
            .validate()
            .map_err(|e| SupervisorError::Invalid(e.into()))?;
        let publish_backup = plan.backup.as_ref().is_some_and(|b| b.source.is_publish());
        if asked.backup_key.is_some() && !publish_backup {
            return Err(SupervisorError::Invalid(
                kiln_model::ingest::IngestError::NoPublishBackup.into(),
            ));
        }
        let key = asked.key.unwrap_or_else(|| random_token(18));
        let backup_key =
            publish_backup.then(|| asked.backup_key.unwrap_or_else(|| random_token(18)));
        let keys = self.ingest_keys.lock();
        if keys.contains_key(&key) || backup_key.as_ref().is_some_and(|b| keys.contains_key(b)) {
            return Err(SupervisorError::Policy(
                "that ingest key belongs to another stream: choose another, or leave it out to get a random one"
                    .into(),
            ));
        }
        Ok(Secrets {
            key,
            passphrase: asked.passphrase.unwrap_or_else(|| random_token(15)),
            backup_key,
        })
    }

    /// The publish URLs of a stream, with its secrets (the 201 answer).
    pub fn ingest_info(&self, h: &StreamHandle) -> Option<IngestInfo> {
        let s = h.secrets.as_ref()?;
        let addrs = self.ingest_addrs.get().cloned().unwrap_or_default();
        let (rtmp_url, srt_url) = kiln_model::ingest::publish_urls(
            &h.plan.id,
            &s.key,
            &s.passphrase,
            addrs.rtmp.as_deref(),
            addrs.srt.as_deref(),
        );
        let backup = s.backup_key.as_ref().map(|key| {
            let (rtmp_url, srt_url) = kiln_model::ingest::backup_urls(
                &h.plan.id,
                key,
                &s.passphrase,
                addrs.rtmp.as_deref(),
                addrs.srt.as_deref(),
            );
            kiln_model::ingest::BackupIngestInfo {
                key: key.clone(),
                rtmp_url,
                rtmps_url: addrs
                    .rtmps
                    .as_ref()
                    .map(|a| format!("rtmps://{a}/live/{key}")),
                srt_url,
            }
        });
        Some(IngestInfo {
            key: s.key.clone(),
            passphrase: s.passphrase.clone(),
            rtmp_url,
            rtmps_url: addrs.rtmps.map(|a| format!("rtmps://{a}/live/{}", s.key)),
            srt_url,
            backup,
        })
    }

    /// The publish stream that has this RTMP key, and whether it is the stream's backup key.
    pub fn stream_for_key(&self, key: &str) -> Option<(Arc<StreamHandle>, bool)> {
        let id = self.ingest_keys.lock().get(key).cloned()?;
        let h = self.get(&id)?;
        let backup = h.secrets.as_ref()?.backup_key.as_deref() == Some(key);
        Some((h, backup))
    }

    /// The publish stream an SRT resource names (`<id>`, or `<id>/backup` for its `publish:` backup), and
    /// whether it is the backup.
    pub fn publish_stream(&self, resource: &str) -> Option<(Arc<StreamHandle>, bool)> {
        let (id, backup) = match resource.strip_suffix(kiln_model::ingest::BACKUP_SUFFIX) {
            Some(id) => (id, true),
            None => (resource, false),
        };
        let h = self.get(id)?;
        let secrets = h.secrets.as_ref()?;
        (!backup || secrets.backup_key.is_some()).then_some((h, backup))
    }

    /// Claims a waiting publish stream for one publisher: refused when someone already publishes to it or the
    /// stream is stopping.
    /// A backup publisher (`backup`) claims the stream's backup slot, once the stream has a pipeline.
    pub fn claim(
        &self,
        h: &Arc<StreamHandle>,
        protocol: Protocol,
        addr: SocketAddr,
        backup: bool,
    ) -> Result<Arc<Publisher>, (Refusal, String)> {
        let stopping = || (Refusal::Stopping, "the stream is stopping".to_string());
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(stopping());
        }
        let busy = || {
            (
                Refusal::Busy,
                "the stream already has a publisher (or its last one's pipeline is being torn down)".to_string(),
            )
        };
        let mut slot = if backup {
            let slot = h.backup_publisher.lock();
            match h.state() {
                _ if slot.is_some() => return Err(busy()),
                StreamState::Running | StreamState::Starting if h.pipeline.lock().is_some() => {}
                // no pipeline yet, or one being rebuilt or torn down
                StreamState::Waiting | StreamState::Starting | StreamState::Running => {
                    return Err((
                        Refusal::Busy,
                        "the stream is not on air: its backup publisher is taken once the primary has started it"
                            .into(),
                    ))
                }
                _ => return Err(stopping()),
            }
            slot
        } else {
            let slot = h.publisher.lock();
            match h.state() {
                _ if slot.is_some() => return Err(busy()),
                // on air without a publisher: the slate is on
                StreamState::Waiting | StreamState::Running => {}
                // the last publisher's pipeline is still being torn down
                StreamState::Starting => return Err(busy()),
                _ => return Err(stopping()),
            }
            slot
        };
        let p = Arc::new(Publisher {
            protocol,
            addr,
            codecs: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            connected_unix_ms: unix_ms(),
            kick: tokio::sync::Notify::new(),
            kicked_for: Mutex::new(None),
            attached: AtomicBool::new(false),
            input: AtomicU64::new(0),
            backup,
        });
        *slot = Some(p.clone());
        Ok(p)
    }

    /// Starts the stream's pipeline on what `publisher` sends through `rx`, on the stream's timeline; on a
    /// stream that shows the slate, starts a source in its pipeline that takes over at its first frame.
    pub async fn attach(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        publisher: &Arc<Publisher>,
        rx: mpsc::Receiver<Bytes>,
    ) -> Result<(), SupervisorError> {
        if publisher.backup {
            return self.attach_backup(h, publisher, rx).await;
        }
        let feed = feed_of(rx);
        let placement = h.placement();
        let opts = self.build_options(&placement, &h.plan, &h.input, Some(feed.clone()))?;
        if h.state() == StreamState::Running {
            return self.take_over(h, publisher, feed, opts).await;
        }
        let (pipeline, _, events) = launch(&h.plan, opts, Some(h.origin_ms)).await?;
        let refused = {
            // under the publisher lock, like begin_stop and teardown: a stop or a cut-off that happened while the
            // pipeline was being built wins, and the new pipeline is dropped
            let current = h.publisher.lock();
            let ours = current.as_ref().is_some_and(|p| Arc::ptr_eq(p, publisher));
            if ours && h.state() == StreamState::Waiting {
                publisher.attached.store(true, Ordering::SeqCst);
                publisher.input.store(1, Ordering::SeqCst);
                *h.publish_feed.lock() = Some(feed);
                *h.pipeline.lock() = Some(pipeline);
                h.pipeline_epoch.fetch_add(1, Ordering::SeqCst);
                h.set_state(StreamState::Starting);
                None
            } else {
                Some(pipeline)
            }
        };
        if let Some(p) = refused {
            tear_down(p).await;
            return Err(SupervisorError::Media(
                "the stream stopped while its pipeline was being built".into(),
            ));
        }
        let resumed = h.sessions.fetch_add(1, Ordering::SeqCst) > 0;
        let epoch = h.pipeline_epoch.load(Ordering::SeqCst);
        tokio::spawn(
            consume(
                h.clone(),
                events,
                self.metrics.clone(),
                Arc::downgrade(self),
                h.origin_ms,
                resumed,
                epoch,
            )
            .instrument(h.span.clone()),
        );
        self.watch_publisher(h, publisher, 1);
        Ok(())
    }

    /// `publisher` comes back to a stream on the slate: its source joins the running pipeline (built off the
    /// runtime's threads), and takes over at its first decoded frame.
    async fn take_over(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        publisher: &Arc<Publisher>,
        feed: kiln_media::ByteFeed,
        opts: BuildOptions,
    ) -> Result<(), SupervisorError> {
        let ours = |h: &StreamHandle| {
            h.publisher
                .lock()
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, publisher))
                && h.state() == StreamState::Running
        };
        let gone = || {
            SupervisorError::Media(
                "the stream stopped while the publisher was being attached".into(),
            )
        };
        if !ours(h) {
            return Err(gone());
        }
        // behind the backup, the source waits out the failback delay in standby
        let behind_backup = h.pipeline.lock().as_ref().and_then(|p| p.input())
            == Some(kiln_media::InputKind::Backup);
        let input = if behind_backup {
            h.start_standby(opts).await?
        } else {
            h.switch_to_source(opts).await?
        };
        let kept = {
            // under the publisher lock, like begin_stop and end_stream: a stop or an end meanwhile wins
            let slot = h.publisher.lock();
            let still = slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, publisher));
            if still && h.state() == StreamState::Running {
                publisher.attached.store(true, Ordering::SeqCst);
                publisher.input.store(input, Ordering::SeqCst);
                *h.publish_feed.lock() = Some(feed);
            }
            still && h.state() == StreamState::Running
        };
        if !kept {
            // its source must not take over: the slate stays (a no-op on a pipeline already gone)
            if let Some(s) = h.switcher() {
                let _ = tokio::task::spawn_blocking(move || s.switch_to_slate()).await;
            }
            return Err(gone());
        }
        self.watch_publisher(h, publisher, input);
        if behind_backup {
            self.fail_back(h, input, Some(publisher.clone()));
        }
        Ok(())
    }

    /// The watchdogs of a publisher whose bytes feed input `input`: it stalls ([`super::resilience`]), or
    /// nothing it sends ever decodes (the first-picture timeout).
    fn watch_publisher(
        self: &Arc<Self>,
        h: &Arc<StreamHandle>,
        publisher: &Arc<Publisher>,
        input: u64,
    ) {
        h.span.in_scope(|| {
            tracing::info!(protocol = publisher.protocol.as_str(), addr = %publisher.addr, input, "publisher attached")
        });
        self.event("source.connected", h);
        self.watch_stalls(h, publisher);
        // bytes that flow but never decode would keep the stream `starting` (or on the slate) and the claim forever
        let (sup, stream, who) = (Arc::downgrade(self), h.clone(), publisher.clone());
        let limit = self.config.ingest.first_picture_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            let current = stream.publisher().is_some_and(|p| Arc::ptr_eq(&p, &who));
            // its generation changes when a standby source is armed (a failback)
            let input = who.input.load(Ordering::SeqCst);
            let on_air = stream.state() == StreamState::Running
                && stream
                    .pipeline
                    .lock()
                    .as_ref()
                    .and_then(|p| p.current_input())
                    == Some(input);
            // a source waiting out the failback delay behind the backup decodes without being on air
            let decoded = stream
                .switcher()
                .and_then(|s| s.since_seen(input))
                .is_some();
            let Some(sup) = sup.upgrade() else {
                return;
            };
            if !current || on_air || decoded || stream.state() == StreamState::Stopping {
                return;
            }
            let why = format!(
                "nothing decodable in {} s (e.g. H.264 without SPS/PPS, or MPEG-TS split across SRT messages: \
                 send 7 TS packets per message)",
                limit.as_secs()
            );
            sup.source_lost(&stream, input, Some(&who), Some((Refusal::NoPicture, why)))
                .await;
        });
    }

    /// The listener's side of a session that ends: a publisher whose pipeline never started is released here;
    /// one with a pipeline is released by the consumer when that pipeline ends (EOS or error).
    pub fn release_claim(&self, h: &StreamHandle, publisher: &Arc<Publisher>) {
        if publisher.attached.load(Ordering::SeqCst) {
            return;
        }
        let mut slot = if publisher.backup {
            h.backup_publisher.lock()
        } else {
            h.publisher.lock()
        };
        if slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, publisher)) {
            *slot = None;
        }
    }

    /// The stream's pipeline is torn down (it failed, or it never got on air and its publisher is gone): the
    /// publisher, if any, is cut off, and the stream waits for the next one with its bookings kept. A stop in
    /// progress stays a stop.
    pub(super) async fn teardown(&self, h: &Arc<StreamHandle>, error: Option<String>) {
        // slot, pipeline and feed are taken together under the publisher lock (see `attach`)
        let (pipeline, kicked) = {
            let mut slot = h.publisher.lock();
            let kicked = slot.take();
            if let Some(p) = &kicked {
                p.kick.notify_one();
            }
            *h.publish_feed.lock() = None;
            h.pipeline_epoch.fetch_add(1, Ordering::SeqCst);
            (h.pipeline.lock().take(), kicked.is_some())
        };
        // the backup's input goes with the pipeline: its publisher comes back once the stream is on air again
        h.kick_backup_publisher(
            Refusal::Pipeline,
            "the stream's pipeline was torn down: the backup reconnects once the stream is on air",
        );
        if kicked && matches!(h.state(), StreamState::Starting | StreamState::Running) {
            self.event("source.lost", h);
        }
        if let Some(p) = pipeline {
            tear_down(p).await;
        }
        h.resilience.lock().slate_off();
        h.state.send_if_modified(|cur| {
            let change = matches!(*cur, StreamState::Starting | StreamState::Running);
            if change {
                *cur = StreamState::Waiting;
            }
            change
        });
        match error {
            Some(e) => {
                tracing::warn!(error = %e, "publisher cut off: the stream waits for the next one")
            }
            None => tracing::info!("publisher left: the stream waits for the next one"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_documented_label() {
        let labels: Vec<&str> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels, crate::metrics::ingest::REASONS);
    }

    #[test]
    fn random_tokens_are_url_safe_and_long_enough() {
        let a = random_token(18);
        let b = random_token(18);
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        let p = random_token(15);
        assert_eq!(p.len(), 20);
        assert!(kiln_model::ingest::IngestRequest {
            key: Some(a),
            passphrase: Some(p),
            backup_key: None,
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn a_size_limit_allows_macroblock_rounding_and_nothing_more() {
        let l = kiln_media::SizeLimit::for_booking(1920, 1080, 3840, 2160);
        assert!(l.check(1920, 1088).is_ok(), "the coded size of 1080p");
        assert!(l.check(1080, 1920).is_ok(), "portrait: same pixels");
        assert!(l.check(2560, 1440).is_err());
        assert!(kiln_media::SizeLimit::for_booking(7680, 4320, 3840, 2160)
            .check(4096, 2160)
            .is_err_and(|e| e.contains("ingest limit")));
    }
}
