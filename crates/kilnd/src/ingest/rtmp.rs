//! The RTMP listener: `rml_rtmp` does the handshake, chunking and AMF; this module decides (connect: any app;
//! publish: the stream key names a `publish:` stream, or the auth URL creates one), checks the first video
//! message (H.264 only; the picture no larger than the stream's reservation) before building anything, then
//! frames every audio/video message as an FLV tag on the stream's timeline ([`kiln_model::ingest::flv`]) for
//! GStreamer's `flvdemux`.
//!
//! Every read and write has the idle timeout, so a connection that stalls mid-handshake or never publishes is
//! closed; at most [`MAX_CONNECTIONS`] are open at once.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use kiln_model::ingest::flv::{self, TagKind, Timeline, VideoCodec};
use kiln_model::ingest::Protocol;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{authorize, reject, Session};
use crate::config::IngestConfig;
use crate::supervisor::{Refusal, Supervisor};

/// RTMP connections open at once (publishers and would-be publishers); more are closed at accept.
pub const MAX_CONNECTIONS: usize = 512;
/// Media buffered before the first video message (a publisher that sends only audio is refused past it).
const MAX_PENDING_BYTES: usize = 8 << 20;
/// Bytes a peer may send before its publish is accepted (connect, createStream and publish are a few hundred).
const MAX_PRE_PUBLISH_BYTES: usize = 64 << 10;
/// Bytes the RTMP parser may take without producing a message (it buffers partial messages of up to 16 MiB; a
/// peer that never completes one is cut off instead of growing the buffer).
const MAX_BYTES_WITHOUT_MESSAGE: usize = 32 << 20;

type Fail = (Refusal, String);

/// A connection's byte stream: TCP, or TLS over TCP (RTMPS).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(super) async fn serve(
    l: TcpListener,
    sup: Arc<Supervisor>,
    cfg: Arc<IngestConfig>,
    tls: Option<TlsAcceptor>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    if let Ok(a) = l.local_addr() {
        let tls = tls.is_some();
        tracing::info!(addr = %a, tls, "RTMP ingest listening");
    }
    loop {
        let (sock, addr) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                // out of file descriptors, mostly: wait rather than spin
                tracing::warn!(error = %e, "RTMP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            reject(
                &sup.metrics().ingest,
                Protocol::Rtmp,
                Refusal::Busy,
                addr,
                "too many RTMP connections",
            );
            continue;
        };
        let (sup, cfg, tls) = (sup.clone(), cfg.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = sock.set_nodelay(true);
            let sock: Box<dyn Io> = match tls {
                None => Box::new(sock),
                Some(acceptor) => {
                    match tokio::time::timeout(cfg.idle_timeout, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            let m = &sup.metrics().ingest;
                            return reject(
                                m,
                                Protocol::Rtmp,
                                Refusal::Protocol,
                                addr,
                                &format!("TLS: {e}"),
                            );
                        }
                        Err(_) => {
                            let m = &sup.metrics().ingest;
                            return reject(
                                m,
                                Protocol::Rtmp,
                                Refusal::Timeout,
                                addr,
                                "no TLS handshake in time",
                            );
                        }
                    }
                }
            };
            Conn::run(sock, addr, sup, cfg).await;
        });
    }
}

/// One RTMP connection.
struct Conn {
    sock: Box<dyn Io>,
    addr: SocketAddr,
    sup: Arc<Supervisor>,
    cfg: Arc<IngestConfig>,
    publish: Option<Publish>,
}

/// The publishing half of a connection, once its key is accepted.
struct Publish {
    session: Session,
    timeline: Timeline,
    /// FLV bytes held until the first video message has been checked (then the pipeline starts on them).
    pending: Vec<u8>,
    started: bool,
    /// When the publish was accepted.
    since: std::time::Instant,
}

impl Conn {
    async fn run(
        sock: Box<dyn Io>,
        addr: SocketAddr,
        sup: Arc<Supervisor>,
        cfg: Arc<IngestConfig>,
    ) {
        let mut c = Conn {
            sock,
            addr,
            sup,
            cfg,
            publish: None,
        };
        let result = c.serve().await;
        let m = c.sup.metrics().ingest.clone();
        match (c.publish.take(), result) {
            (Some(p), Ok(())) => p.session.end(None),
            (Some(p), Err(f)) => p.session.end(Some(f)),
            (None, Ok(())) => {}
            (None, Err((why, detail))) => reject(&m, Protocol::Rtmp, why, addr, &detail),
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Fail> {
        let idle = self.cfg.idle_timeout;
        let kick = self.publish.as_ref().map(|p| p.session.publisher.clone());
        let kicked = async {
            match &kick {
                Some(p) => p.kick.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tokio::time::timeout(idle, self.sock.read(buf)) => match r {
                Err(_) => Err((Refusal::Timeout, format!("nothing received for {} s", idle.as_secs()))),
                Ok(Err(e)) => Err((Refusal::Protocol, format!("reading: {e}"))),
                Ok(Ok(n)) => Ok(n),
            },
            _ = kicked => Err(kicked_why(kick.as_deref())),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        // flushed: over TLS, written bytes wait in the session until a flush
        let write = async {
            self.sock.write_all(bytes).await?;
            self.sock.flush().await
        };
        match tokio::time::timeout(self.cfg.idle_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err((Refusal::Protocol, format!("writing: {e}"))),
            Err(_) => Err((Refusal::Timeout, "the peer does not read".into())),
        }
    }

    /// Handshake, then messages until the publisher finishes (`Ok`) or something fails.
    async fn serve(&mut self) -> Result<(), Fail> {
        let rest = self.handshake().await?;
        let (mut session, results) = ServerSession::new(ServerSessionConfig::new())
            .map_err(|e| (Refusal::Protocol, format!("{e:?}")))?;
        if self.apply(&mut session, results).await? {
            return Ok(());
        }
        let mut input = rest;
        let mut buf = vec![0u8; 64 << 10];
        let connected = std::time::Instant::now();
        let (mut before_publish, mut without_message) = (0usize, 0usize);
        loop {
            if !input.is_empty() {
                let results = session
                    .handle_input(&input)
                    .map_err(|e| (Refusal::Protocol, format!("not RTMP: {e:?}")))?;
                without_message = if results.is_empty() {
                    without_message + input.len()
                } else {
                    0
                };
                if without_message > MAX_BYTES_WITHOUT_MESSAGE {
                    return Err((
                        Refusal::Protocol,
                        "32 MiB without a complete RTMP message".into(),
                    ));
                }
                if self.apply(&mut session, results).await? {
                    return Ok(());
                }
            }
            if self.publish.is_none() {
                // until a publish is accepted: a few KiB, within the idle timeout, whatever the pace
                if connected.elapsed() > self.cfg.idle_timeout {
                    return Err((Refusal::Timeout, "no publish request in time".into()));
                }
                if before_publish > MAX_PRE_PUBLISH_BYTES {
                    return Err((Refusal::Protocol, "64 KiB without a publish request".into()));
                }
            }
            if let Some(p) = &self.publish {
                // a claimed stream must get its first video soon (audio or metadata alone hold it for nothing)
                let limit = self.cfg.first_picture_timeout;
                if !p.started && p.since.elapsed() > limit {
                    return Err((
                        Refusal::NoPicture,
                        format!("no video message in {} s", limit.as_secs()),
                    ));
                }
            }
            let n = self.read(&mut buf).await?;
            if n == 0 {
                return Ok(()); // the publisher closed the connection
            }
            if self.publish.is_none() {
                before_publish += n;
            }
            input = buf[..n].to_vec();
        }
    }

    async fn handshake(&mut self) -> Result<Vec<u8>, Fail> {
        let mut hs = Handshake::new(PeerType::Server);
        let mut buf = [0u8; 4096];
        loop {
            let n = self.read(&mut buf).await?;
            if n == 0 {
                return Err((Refusal::Protocol, "closed during the handshake".into()));
            }
            match hs
                .process_bytes(&buf[..n])
                .map_err(|e| (Refusal::Protocol, format!("bad RTMP handshake: {e:?}")))?
            {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    self.write(&response_bytes).await?
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    self.write(&response_bytes).await?;
                    return Ok(remaining_bytes);
                }
            }
        }
    }

    /// Sends the session's packets and handles its events; `true` when the publisher finished.
    async fn apply(
        &mut self,
        session: &mut ServerSession,
        results: Vec<ServerSessionResult>,
    ) -> Result<bool, Fail> {
        let mut queue = std::collections::VecDeque::from(results);
        while let Some(r) = queue.pop_front() {
            match r {
                ServerSessionResult::OutboundResponse(p) => self.write(&p.bytes).await?,
                ServerSessionResult::RaisedEvent(ev) => match self.on_event(session, ev).await? {
                    Step::More(more) => queue.extend(more),
                    Step::Finished => return Ok(true),
                },
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(false)
    }

    async fn on_event(
        &mut self,
        session: &mut ServerSession,
        ev: ServerSessionEvent,
    ) -> Result<Step, Fail> {
        let protocol_err =
            |e: rml_rtmp::sessions::ServerSessionError| (Refusal::Protocol, format!("{e:?}"));
        Ok(match ev {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                Step::More(session.accept_request(request_id).map_err(protocol_err)?)
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => self.on_publish(session, request_id, &stream_key).await?,
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => {
                self.media(TagKind::Video, data, timestamp.value).await?;
                Step::More(Vec::new())
            }
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => {
                self.media(TagKind::Audio, data, timestamp.value).await?;
                Step::More(Vec::new())
            }
            ServerSessionEvent::PublishStreamFinished { .. } => Step::Finished,
            ServerSessionEvent::PlayStreamRequested { request_id, .. } => {
                let packets = session
                    .reject_request(
                        request_id,
                        "NetStream.Play.Failed",
                        "kilnd ingests over RTMP; play the stream over LL-HLS",
                    )
                    .map_err(protocol_err)?;
                Step::More(packets)
            }
            _ => Step::More(Vec::new()),
        })
    }

    /// A publish request: the key names a stream (or the auth URL creates one), which is claimed; otherwise the
    /// request is refused at the protocol level and the connection ends.
    async fn on_publish(
        &mut self,
        session: &mut ServerSession,
        request_id: u32,
        stream_key: &str,
    ) -> Result<Step, Fail> {
        let protocol_err =
            |e: rml_rtmp::sessions::ServerSessionError| (Refusal::Protocol, format!("{e:?}"));
        if self.publish.is_some() {
            return Err((
                Refusal::Protocol,
                "a second publish on one connection".into(),
            ));
        }
        // `key?query` (some encoders append parameters): the key is before `?`
        let key = stream_key.split('?').next().unwrap_or_default();
        match authorize(&self.sup, &self.cfg, Protocol::Rtmp, key, self.addr).await {
            Ok((stream, publisher)) => {
                self.publish = Some(Publish {
                    session: Session::new(self.sup.clone(), stream, publisher, self.cfg.clone()),
                    timeline: Timeline::default(),
                    pending: flv::HEADER.to_vec(),
                    started: false,
                    since: std::time::Instant::now(),
                });
                Ok(Step::More(
                    session.accept_request(request_id).map_err(protocol_err)?,
                ))
            }
            Err((why, detail)) => {
                let code = match why {
                    Refusal::AuthDenied | Refusal::AuthError => "NetStream.Publish.Unauthorized",
                    _ => "NetStream.Publish.BadName",
                };
                // the peer learns the reason's name, not the details (they may name the auth URL)
                let packets = session
                    .reject_request(
                        request_id,
                        code,
                        &format!("publish refused: {}", why.label()),
                    )
                    .map_err(protocol_err)?;
                for p in packets {
                    if let ServerSessionResult::OutboundResponse(p) = p {
                        self.write(&p.bytes).await?;
                    }
                }
                let _ = self.sock.flush().await;
                Err((why, detail))
            }
        }
    }

    /// One audio or video message of the publisher.
    async fn media(&mut self, kind: TagKind, data: Bytes, ts: u32) -> Result<(), Fail> {
        let Some(p) = self.publish.as_mut() else {
            return Ok(()); // media before publish: ignored
        };
        let is_video = kind == TagKind::Video;
        if is_video {
            check_video(p, &data, &self.cfg)?;
        } else if let Some(codec) = flv::audio_codec(&data) {
            note_codec(p, codec);
        }
        let at = p.timeline.map(ts);
        let tag = flv::tag(kind, at, &data)
            .ok_or((Refusal::Protocol, "a media message over 16 MiB".to_string()))?;
        if p.started {
            return p.session.send(Bytes::from(tag)).await;
        }
        p.pending.extend_from_slice(&tag);
        let audio_only = p.session.stream.plan.video.is_empty();
        if is_video || audio_only {
            p.session.attach().await?;
            p.started = true;
            let first = Bytes::from(std::mem::take(&mut p.pending));
            p.session.send(first).await?;
        } else if p.pending.len() > MAX_PENDING_BYTES {
            return Err((
                Refusal::Codec,
                "no video message in the publisher's first 8 MiB".into(),
            ));
        }
        Ok(())
    }
}

/// Why the daemon cut a publisher off, when it said.
fn kicked_why(p: Option<&crate::supervisor::Publisher>) -> Fail {
    match p.and_then(|p| p.kicked_for.lock().clone()) {
        Some(why) => why,
        None => (
            Refusal::Stopping,
            "the stream stopped or its pipeline ended".into(),
        ),
    }
}

enum Step {
    More(Vec<ServerSessionResult>),
    Finished,
}

fn note_codec(p: &mut Publish, codec: &str) {
    let mut codecs = p.session.publisher.codecs.lock();
    if !codecs.iter().any(|c| c == codec) {
        codecs.push(codec.to_string());
    }
}

/// H.264 only (GStreamer 1.22's `flvdemux` reads no enhanced-RTMP codec), and an SPS no larger than the
/// stream's reservation and the daemon's limits: refused before the pipeline is built, or, on a later sequence
/// header, the publisher is cut off.
fn check_video(p: &mut Publish, data: &[u8], cfg: &IngestConfig) -> Result<(), Fail> {
    let Some(tag) = flv::inspect_video(data) else {
        return Ok(());
    };
    if tag.codec != VideoCodec::Avc {
        return Err((
            Refusal::Codec,
            format!(
                "video codec `{}` over RTMP is not supported by this daemon: publish H.264 (or HEVC over SRT)",
                tag.codec.name()
            ),
        ));
    }
    note_codec(p, "h264");
    if let Some(avcc) = tag.config {
        if let Some((w, h)) = kiln_model::vod::h264::avcc_coded_size(avcc) {
            let (bw, bh) = p.session.stream.plan.source_size();
            let limit = kiln_media::SizeLimit::for_booking(bw, bh, cfg.max_width, cfg.max_height);
            limit.check(w, h).map_err(|m| (Refusal::TooLarge, m))?;
        }
    }
    Ok(())
}
