//! Live ingest: kilnd as an ingest server. Publishers (OBS, ffmpeg, encoders, cameras) push RTMP ([`rtmp`]) or
//! SRT ([`srt`]) to `publish:` streams; each connection is authorized (key, stream id, passphrase, or the
//! operator's `--publish-auth-url` in [`auth`]) before anything is built, then its bytes feed the stream's
//! pipeline through a bounded channel ([`Session`]).
//!
//! The protocols come from libraries (`rml_rtmp`: handshake, chunking, AMF; `srt-tokio`: SRT with a
//! per-connection accept/reject and passphrase), and the media from GStreamer (`flvdemux`, `tsdemux` behind
//! `parsebin`). This module only routes, authorizes, frames RTMP messages as FLV tags and counts.

pub mod auth;
mod rtmp;
mod srt;
mod srt_guard;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_model::ingest::Protocol;
use tokio::sync::mpsc;

use crate::config::IngestConfig;
use crate::metrics::ingest::IngestMetrics;
use crate::supervisor::{Publisher, Refusal, StreamHandle, Supervisor, FEED_QUEUE};

/// The listeners' sockets, bound before the daemon announces itself (port 0 gets a real port).
#[derive(Debug, Default)]
pub struct Sockets {
    pub rtmp: Option<std::net::TcpListener>,
    pub rtmps: Option<std::net::TcpListener>,
    pub srt: Option<std::net::UdpSocket>,
}

impl Sockets {
    /// Binds the listeners `cfg` asks for.
    pub fn bind(cfg: &IngestConfig) -> std::io::Result<Self> {
        let tcp = |a: Option<SocketAddr>| {
            a.map(|a| {
                let l = std::net::TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(l)
            })
            .transpose()
        };
        let (rtmp, rtmps) = (tcp(cfg.rtmp_listen)?, tcp(cfg.rtmps_listen)?);
        let srt = cfg
            .srt_listen
            .map(|a| {
                let s = std::net::UdpSocket::bind(a)?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            })
            .transpose()?;
        Ok(Self { rtmp, rtmps, srt })
    }

    pub fn rtmp_addr(&self) -> Option<SocketAddr> {
        self.rtmp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn rtmps_addr(&self) -> Option<SocketAddr> {
        self.rtmps.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn srt_addr(&self) -> Option<SocketAddr> {
        self.srt.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// The `host:port` publishers use: `public_host` (or the bound address, or `fallback_host` when bound to
    /// every address) with the bound port.
    pub fn public(
        addr: SocketAddr,
        public_host: Option<&str>,
        fallback_host: Option<&str>,
    ) -> String {
        let host = match (public_host, addr.ip().is_unspecified(), fallback_host) {
            (Some(h), _, _) => h.to_string(),
            (None, true, Some(h)) => h.to_string(),
            (None, _, _) => match addr.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            },
        };
        format!("{host}:{}", addr.port())
    }

    /// Starts the listeners on the current runtime; RTMPS uses the daemon's certificate (`tls`).
    pub fn spawn(
        self,
        sup: Arc<Supervisor>,
        cfg: IngestConfig,
        tls: Option<&crate::config::TlsFiles>,
    ) -> anyhow::Result<()> {
        let cfg = Arc::new(cfg);
        if let Some(l) = self.rtmp {
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(rtmp::serve(l, sup.clone(), cfg.clone(), None));
        }
        if let Some(l) = self.rtmps {
            let files = tls.ok_or_else(|| {
                anyhow::anyhow!("--rtmps-listen needs the daemon's --tls-cert and --tls-key")
            })?;
            // no ALPN: RTMP has no protocol id, and publishers send none
            let acceptor = crate::tls::acceptor_with(files, &[])?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(rtmp::serve(l, sup.clone(), cfg.clone(), Some(acceptor)));
        }
        if let Some(s) = self.srt {
            let s = tokio::net::UdpSocket::from_std(s)?;
            tokio::spawn(srt::serve(s, sup, cfg));
        }
        Ok(())
    }
}

/// Counts a refusal before anything was built.
fn reject(m: &IngestMetrics, protocol: Protocol, why: Refusal, addr: SocketAddr, detail: &str) {
    m.rejections
        .with_label_values(&[protocol.as_str(), why.label()])
        .inc();
    tracing::warn!(protocol = protocol.as_str(), %addr, reason = why.label(), detail, "publisher refused");
}

/// One authorized publisher on its stream: the claim, the channel into the pipeline, the counters.
struct Session {
    sup: Arc<Supervisor>,
    stream: Arc<StreamHandle>,
    publisher: Arc<Publisher>,
    tx: Option<mpsc::Sender<Bytes>>,
    /// Until the pipeline is attached, the other end of `tx`.
    rx: Option<mpsc::Receiver<Bytes>>,
    cfg: Arc<IngestConfig>,
    /// Bitrate window: start and bytes.
    window: (Instant, u64),
    /// The pipeline runs on this session's bytes (set once `Supervisor::attach` succeeded).
    attached: bool,
    /// How the session ends (`None`: the publisher left); read when it is dropped.
    why: Option<(Refusal, String)>,
    /// The longest a send may wait for the pipeline to take bytes.
    max_wait: Duration,
}

impl Session {
    fn new(
        sup: Arc<Supervisor>,
        stream: Arc<StreamHandle>,
        publisher: Arc<Publisher>,
        cfg: Arc<IngestConfig>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(FEED_QUEUE);
        Self {
            sup,
            stream,
            publisher,
            tx: Some(tx),
            rx: Some(rx),
            max_wait: cfg.idle_timeout,
            cfg,
            window: (Instant::now(), 0),
            attached: false,
            why: None,
        }
    }

    fn metrics(&self) -> &IngestMetrics {
        &self.sup.metrics().ingest
    }

    fn protocol(&self) -> &'static str {
        self.publisher.protocol.as_str()
    }

    /// Starts the stream's pipeline on this session's bytes.
    async fn attach(&mut self) -> Result<(), (Refusal, String)> {
        let rx = self
            .rx
            .take()
            .ok_or((Refusal::Pipeline, "attached twice".to_string()))?;
        self.sup
            .attach(&self.stream, &self.publisher, rx)
            .await
            .map_err(|e| (Refusal::Pipeline, e.to_string()))?;
        self.attached = true;
        let m = self.metrics();
        m.connects.with_label_values(&[self.protocol()]).inc();
        m.publishers.with_label_values(&[self.protocol()]).inc();
        Ok(())
    }

    /// Hands bytes to the pipeline (waiting while it is behind, at most `max_wait`).
    async fn send(&mut self, bytes: Bytes) -> Result<(), (Refusal, String)> {
        let n = bytes.len() as u64;
        self.publisher.bytes.fetch_add(n, Ordering::Relaxed);
        self.metrics()
            .bytes
            .with_label_values(&[self.protocol()])
            .inc_by(n);
        self.window.1 += n;
        let elapsed = self.window.0.elapsed();
        if elapsed >= Duration::from_secs(5) {
            let kbps = self.window.1 * 8 / 1000 / elapsed.as_secs().max(1);
            if kbps > self.cfg.max_bitrate_kbps {
                return Err((
                    Refusal::Bitrate,
                    format!(
                        "the publisher sends {kbps} kbit/s, over this daemon's --ingest-max-bitrate-kbps {}",
                        self.cfg.max_bitrate_kbps
                    ),
                ));
            }
            self.window = (Instant::now(), 0);
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or((Refusal::Pipeline, "the session ended".to_string()))?;
        match tokio::time::timeout(self.max_wait, tx.send(bytes)).await {
            Ok(Ok(())) => Ok(()),
            // the daemon may have cut the session off first (a stop, the first-picture timeout): say why
            Ok(Err(_)) => Err(self.publisher.kicked_for.lock().clone().unwrap_or((
                Refusal::Pipeline,
                "the stream's pipeline stopped reading".into(),
            ))),
            Err(_) => Err((
                Refusal::Pipeline,
                "the stream's pipeline did not take the publisher's bytes in time".into(),
            )),
        }
    }

    /// Ends the session: `why` is `None` when the publisher left, else why the daemon cut it off.
    fn end(mut self, why: Option<(Refusal, String)>) {
        self.why = why;
    }
}

/// However a session ends (returned, cut off, or its task unwound), the pipeline gets the end of stream; one that
/// does not drain within the grace time (or any session cut off) is torn down, so the stream is free for the
/// next publisher whatever state the pipeline was in.
impl Drop for Session {
    fn drop(&mut self) {
        self.tx = None; // end of stream for the pipeline
        let why = self.why.take();
        let reason = why.as_ref().map_or("left", |(r, _)| r.label());
        let protocol = self.protocol();
        let m = self.metrics().clone();
        if !self.attached {
            if let Some((r, detail)) = &why {
                m.rejections.with_label_values(&[protocol, r.label()]).inc();
                self.stream.push_error(format!(
                    "{protocol} publisher {} refused: {detail}",
                    self.publisher.addr
                ));
                self.stream.span().in_scope(|| {
                    tracing::warn!(protocol, addr = %self.publisher.addr, reason, %detail, "publisher refused")
                });
            }
            self.sup.release_claim(&self.stream, &self.publisher);
            return;
        }
        m.publishers.with_label_values(&[protocol]).dec();
        m.disconnects.with_label_values(&[protocol, reason]).inc();
        let detail = why.map(|(_, d)| {
            let e = format!("{protocol} publisher {} cut off: {d}", self.publisher.addr);
            self.stream.push_error(e.clone());
            e
        });
        let (sup, h, p) = (
            self.sup.clone(),
            self.stream.clone(),
            self.publisher.clone(),
        );
        let wait = if detail.is_some() {
            Duration::ZERO
        } else {
            sup.grace()
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(wait).await;
                sup.session_over(&h, &p, detail).await;
            });
        }
    }
}

/// Finds (or, through `--publish-auth-url`, creates) the stream a publisher names and claims it.
async fn authorize(
    sup: &Arc<Supervisor>,
    cfg: &Arc<IngestConfig>,
    protocol: Protocol,
    name: &str,
    addr: SocketAddr,
) -> Result<(Arc<StreamHandle>, Arc<Publisher>), (Refusal, String)> {
    let found = match protocol {
        Protocol::Rtmp => sup.stream_for_key(name),
        Protocol::Srt => sup.publish_stream(name),
    };
    // a backup's SRT id names a stream that exists: the auth URL creates primaries only
    let backup_id = protocol == Protocol::Srt && name.ends_with(kiln_model::ingest::BACKUP_SUFFIX);
    let (stream, backup) = match (found, &cfg.auth_url) {
        (Some(found), _) => found,
        (None, Some(url)) if !backup_id => (
            auth::create_from(sup, url, cfg.auth_timeout, protocol, name, addr).await?,
            false,
        ),
        (None, _) => {
            let why = match protocol {
                Protocol::Rtmp => Refusal::UnknownKey,
                Protocol::Srt => Refusal::UnknownStream,
            };
            return Err((why, "no publish stream has this key or id".into()));
        }
    };
    let publisher = sup.claim(&stream, protocol, addr, backup)?;
    Ok((stream, publisher))
}
