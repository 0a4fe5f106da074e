//! The HTTP server both services run: accepts TCP (or TLS) connections and serves an axum app over HTTP/1.1 or
//! HTTP/2, with the limits that keep a flood of idle or slow clients from starving real ones.
//!
//! - **Connection cap** ([`Limits::max_connections`], further bounded by the process's file-descriptor limit): a
//!   connection over the cap is closed at once, and the first refusal of each burst is logged.
//! - **Header timeout** ([`Limits::header_timeout`]): a connection must send a whole request head within it — the
//!   first request (idle connections that never send a byte are closed), and every next one on a keep-alive
//!   connection (so it is also the keep-alive idle timeout). A slowloris client sending a byte a second is closed
//!   when it runs out. A request that is being answered is never timed out here: an LL-HLS blocking playlist
//!   request parks for up to 3 target durations and then gets its answer.
//! - **Protocol**: on plain TCP the first bytes decide (the HTTP/2 connection preface means h2c prior knowledge,
//!   anything else HTTP/1.1), read within the header timeout; over TLS, ALPN decides. HTTP/2 connections are
//!   pinged ([`Limits::h2_keepalive`]) and closed when the peer stops answering, closed (GOAWAY) after the header
//!   timeout without a stream in progress, and a stream whose client takes none of its answer for
//!   [`Limits::write_stall`] is reset (`crate::http2`).
//! - **Graceful stop**: when `shutdown` resolves, no new connection is accepted and open ones get
//!   [`Limits::drain`] to finish.
//!
//! - **Serving time**: every poll of a connection's future (and, over HTTP/2, of each request's) is timed into
//!   [`serving_busy`], the CPU that answering requests takes, which kilnd reserves from admission.
//!
//! - **Playback on kiln's own HTTP/1.1** ([`crate::h1`]): on plain TCP, the requests a [`Direct`] service answers
//!   from their head alone (kilnd: playback GETs) are answered without hyper, until the connection's first other
//!   request hands it to hyper.
//!
//! Why not `axum::serve`: it has no header timeout, no connection cap and no TLS; this is hyper's own connection
//! builders plus the accept loop, and HTTP/1.1 of our own only for the requests [`crate::h1`] says.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Method, Request, Response};
use axum::Router;
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::h1::{self, Direct, NoDirect};

/// Nanoseconds spent polling connection and request futures, process-wide.
static BUSY_NS: AtomicU64 = AtomicU64::new(0);

/// Time this process has spent serving HTTP (TLS handshakes, parsing, handlers, writing) since it started: the
/// wall time of every poll of the servers' connection and request futures. A poll runs on one thread without
/// waiting, so this is CPU time unless the thread was preempted mid-poll. Every server in the process adds to it
/// (a test process running several daemons sees their sum).
pub fn serving_busy() -> Duration {
    Duration::from_nanos(BUSY_NS.load(Ordering::Relaxed))
}

/// Connections closed because a write waited [`Limits::write_stall`], process-wide.
static STALLED: AtomicU64 = AtomicU64::new(0);
/// Connections closed at accept because the server was at its connection cap, process-wide.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Connections closed because a write to the client waited [`Limits::write_stall`] (a client that stopped
/// reading), since the process started; every server in the process adds to it.
pub fn connections_stalled() -> u64 {
    STALLED.load(Ordering::Relaxed)
}

/// Connections closed at accept because the server was at its connection cap, since the process started.
pub fn connections_refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

pub(crate) fn note_stalled() {
    STALLED.fetch_add(1, Ordering::Relaxed);
}

/// HTTP/2 streams reset because their body waited [`Limits::write_stall`] for the client's flow-control window,
/// process-wide.
static STREAMS_STALLED: AtomicU64 = AtomicU64::new(0);

/// HTTP/2 streams reset because a piece of their answer got no room to send (the client's flow-control window, or
/// the send buffer of a connection whose socket stopped taking bytes) for [`Limits::write_stall`], since the
/// process started.
pub fn streams_stalled() -> u64 {
    STREAMS_STALLED.load(Ordering::Relaxed)
}

pub(crate) fn note_stream_stalled() {
    STREAMS_STALLED.fetch_add(1, Ordering::Relaxed);
}

/// Adds `d` to [`serving_busy`]: serving work done outside the servers' polls (kilnd: a publish writing the
/// answers of the requests that lent it their sockets, [`crate::lend`]).
/// Not added inside such a poll (a request's handler that publishes, kilnd's `DELETE` of a stream ending it), whose
/// own time already counts it.
pub fn add_serving(d: Duration) {
    if POLL_START.get().is_none() {
        BUSY_NS.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A future whose polls are timed into [`serving_busy`]. The future is held inline (not boxed): a spawned
    /// connection is one allocation, its task.
    pub(crate) struct Timed<F> {
        #[pin]
        inner: F,
    }
}

thread_local! {
    /// When the [`Timed`] poll running on this thread started, if one is.
    static POLL_START: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// When the poll of the connection (or HTTP/2 request) running on this thread started, or now outside one: a
/// clock reading that costs no clock read on the request path. A poll does not wait, but it may answer several
/// pipelined requests (up to tokio's budget) or compute an answer in the call, so it is behind the clock by that
/// much. kiln's HTTP/1.1 takes `Date` from it (re-read from the wall clock once the second it shows is over by
/// this reading), kilnd the start of a request's timing.
pub fn poll_started() -> std::time::Instant {
    POLL_START.get().unwrap_or_else(std::time::Instant::now)
}

impl<F> Timed<F> {
    pub(crate) fn new(inner: F) -> Self {
        Timed { inner }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Puts back the outer poll's start when the poll ends, also by a panic (tokio keeps the thread).
        struct Restore(Option<std::time::Instant>);
        impl Drop for Restore {
            fn drop(&mut self) {
                POLL_START.set(self.0);
            }
        }
        let start = std::time::Instant::now();
        let restore = Restore(POLL_START.replace(Some(start)));
        let out = self.project().inner.poll(cx);
        drop(restore);
        BUSY_NS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

/// The server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most (also bounded by the file-descriptor limit, see [`raise_nofile_limit`]).
    pub max_connections: usize,
    /// Time a client has to send a request head (and the keep-alive idle time between requests; over HTTP/2, the
    /// time a connection may have no stream in progress). Above zero: zero closes every connection at once.
    pub header_timeout: Duration,
    /// HTTP/2 ping interval; a peer that does not answer a ping within the same time is dropped.
    pub h2_keepalive: Duration,
    /// How long open connections get to finish after shutdown starts.
    pub drain: Duration,
    /// How long a write may wait before the connection is closed (a client that stops reading, its TCP window at
    /// zero); time between writes does not count (as nginx's `send_timeout`). Over HTTP/2 also how long a piece
    /// of an answer may wait for the stream's flow-control window before the stream is reset. Zero: no limit.
    pub write_stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16_384,
            header_timeout: Duration::from_secs(10),
            h2_keepalive: Duration::from_secs(20),
            drain: Duration::from_secs(10),
            write_stall: Duration::from_secs(30),
        }
    }
}

/// File descriptors kept for everything that is not a client connection (pipelines, files, outgoing requests).
pub const RESERVED_FDS: u64 = 512;

/// Raises the soft limit on open files to the hard limit (a default soft limit of 1,024 would cap the server far
/// below what it can serve) and returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// The connection cap actually used: the configured one, but never more than the open-file limit allows.
pub fn effective_max_connections(configured: usize, nofile: u64) -> usize {
    let by_fds = nofile.saturating_sub(RESERVED_FDS).max(64);
    configured
        .min(usize::try_from(by_fds).unwrap_or(usize::MAX))
        .max(1)
}

/// Serves `app` on `listener` (TLS when `tls` is given) until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let service = TowerToHyperService::new(app);
    serve_service(listener, tls, (service, NoDirect), limits, shutdown).await
}

/// [`serve`] with any hyper service, and the requests `direct` answers from their head alone on kiln's own
/// HTTP/1.1 ([`crate::h1`]; kilnd: plain playback GETs).
pub async fn serve_service<S, B, D>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    (service, direct): (S, D),
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    D: Direct + Clone,
    <D::Body as Body>::Error: Into<BoxError>,
{
    let nofile = raise_nofile_limit();
    let max = effective_max_connections(limits.max_connections, nofile);
    tracing::info!(
        max_connections = max,
        nofile,
        header_timeout_ms = limits.header_timeout.as_millis() as u64,
        "serving"
    );
    let permits = Arc::new(Semaphore::new(max));
    let shared_limits = Arc::new(limits);
    let refused = AtomicU64::new(0);
    let graceful = GracefulShutdown::new();
    // connections still choosing their protocol (no request yet) end at once when the stop begins
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off a moment instead of spinning
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(permit) = admit(&permits, &refused, max) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            service: service.clone(),
            direct: direct.clone(),
            limits: shared_limits.clone(),
            watcher: graceful.watcher(),
            stopping: stopping.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(Timed {
            inner: async move {
                let _permit = permit;
                // a TLS connection's future (the handshake, then rustls's state inside the HTTP connection) is
                // several times a plain one's: boxed, so that a plain connection's task does not carry its size
                let result = match tls {
                    None => conn.plain(tcp).await,
                    Some(acceptor) => Box::pin(conn.tls(tcp, acceptor)).await,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
            },
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    drain(graceful, &permits, max, limits.drain).await;
    Ok(())
}

/// Waits up to `period` for the open connections to end: hyper's (their graceful shutdown), then kiln's own
/// HTTP/1.1 ones (each holds one of `permits` until it ends).
async fn drain(graceful: GracefulShutdown, permits: &Semaphore, max: usize, period: Duration) {
    let drained = async {
        graceful.shutdown().await;
        let _ = permits
            .acquire_many(u32::try_from(max).unwrap_or(u32::MAX))
            .await;
    };
    if tokio::time::timeout(period, drained).await.is_err() {
        tracing::warn!("connections still open after the drain period; closing");
    }
}

/// A place for a new connection under the cap, or `None` (the connection is to be closed); logs the first
/// refusal of each burst and the end of it.
fn admit(
    permits: &Arc<Semaphore>,
    refused: &AtomicU64,
    max: usize,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        REFUSED.fetch_add(1, Ordering::Relaxed);
        if refused.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                max_connections = max,
                "connection limit reached: closing new connections until some end"
            );
        }
        return None;
    };
    if refused.swap(0, Ordering::Relaxed) > 0 {
        tracing::info!("below the connection limit again");
    }
    Some(permit)
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One accepted connection and what it is served with.
struct Conn<S, D> {
    service: S,
    direct: D,
    /// Shared: a connection's future holds its `Conn` in several nested places, each a copy of what is inline.
    limits: Arc<Limits>,
    watcher: hyper_util::server::graceful::Watcher,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl<S, B, D> Conn<S, D>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    D: Direct,
    <D::Body as Body>::Error: Into<BoxError>,
{
    /// Plain TCP: the first bytes (within the header timeout) choose h2c or HTTP/1.1.
    async fn plain(mut self, tcp: TcpStream) -> Result<(), BoxError> {
        let sniff = tokio::time::timeout(self.limits.header_timeout, sniff_h2(&tcp));
        let decided = tokio::select! {
            d = sniff => d,
            _ = self.stopping.wait_for(|s| *s) => return Ok(()),
        };
        match decided {
            Ok(Ok(Some(false))) if D::ENABLED => self.own_h1(tcp).await,
            // boxed: hyper's connection state would otherwise be in every plain connection's task, kiln's own
            // HTTP/1.1 ones (most of them: players) included
            Ok(Ok(Some(h2))) => Box::pin(self.http(tcp, h2)).await,
            Ok(Ok(None)) => Ok(()), // closed before sending anything
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("no request within the header timeout".into()),
        }
    }

    /// TLS: a handshake within the header timeout, then ALPN chooses.
    async fn tls(mut self, tcp: TcpStream, acceptor: TlsAcceptor) -> Result<(), BoxError> {
        let handshake = tokio::time::timeout(self.limits.header_timeout, acceptor.accept(tcp));
        let tls = tokio::select! {
            h = handshake => h.map_err(|_| "TLS handshake timed out")??,
            _ = self.stopping.wait_for(|s| *s) => return Ok(()),
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        self.http(tls, h2).await
    }

    /// HTTP/2 is boxed: its connection state is over twice HTTP/1.1's, and an HTTP/1.1 connection's task (most of
    /// them: a parked blocking request is one) would otherwise carry that size.
    async fn http<I>(self, io: I, h2: bool) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = crate::stall::StallIo::new(io, self.limits.write_stall);
        if h2 {
            Box::pin(self.h2(TokioIo::new(io))).await
        } else {
            self.h1(TokioIo::new(io)).await
        }
    }

    async fn h1<I>(self, io: TokioIo<I>) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .keep_alive(true);
        let conn = b.serve_connection(io, self.service);
        self.watcher.watch(conn).await?;
        Ok(())
    }

    /// kiln's own HTTP/1.1 ([`crate::h1`]): requests `direct` answers, in order, until one it does not (hyper
    /// then takes the connection, with the bytes already read), the client closes, a head does not come within
    /// the header timeout, or the server stops (between requests).
    async fn own_h1(self, tcp: TcpStream) -> Result<(), BoxError> {
        use tokio::io::AsyncReadExt as _;
        use tokio::time::Instant;
        // freed whenever it holds no unparsed bytes: a parked request or an idle connection holds none of it
        let mut buf: Vec<u8> = Vec::new();
        // one wait for the stop and one timer for the connection's life, not one of each per request: the timer
        // is moved to the current deadline only when it goes off before it
        let mut stopping = self.stopping.clone();
        let mut stopped = std::pin::pin!(async move {
            let _ = stopping.wait_for(|s| *s).await;
        });
        let mut timer = std::pin::pin!(tokio::time::sleep(self.limits.header_timeout));
        // the socket, which a request that waits may lend to the producer of its answer
        let mut conn = crate::lend::Lender::new(tcp);
        loop {
            // tokio's clock, as the timer's (it can be paused in tests)
            let deadline = Instant::now() + self.limits.header_timeout;
            let head = loop {
                match h1::scan(&buf) {
                    h1::Scan::Head(head) => break head,
                    h1::Scan::Hyper => return self.handover(buf, conn.into_tcp()).await,
                    h1::Scan::Partial => {}
                }
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(if buf.is_empty() { 1024 } else { buf.len() });
                }
                let read = tokio::select! {
                    r = conn.tcp_mut().read_buf(&mut buf) => r,
                    () = &mut stopped => return Ok(()),
                    () = &mut timer => {
                        if Instant::now() >= deadline {
                            return Err("no request head within the header timeout".into());
                        }
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                };
                match read {
                    Ok(0) => return Ok(()), // closed (a partial head is dropped, as hyper does)
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                }
            };
            // only `close` is kept past this point: the head is not part of the connection's future while
            // the answer waits
            let h1::RequestHead {
                len,
                uri,
                headers,
                close,
            } = head;
            // an answer written on the lent socket closes the connection as this one's would
            let lend = conn
                .lend(close || *self.stopping.borrow())
                .with_stopping(&self.stopping);
            let Some(answer) = self.direct.direct(&Method::GET, &uri, &headers, lend) else {
                return self.handover(buf, conn.into_tcp()).await;
            };
            drop((uri, headers));
            buf.drain(..len);
            if buf.is_empty() {
                buf = Vec::new();
            }
            // the answer's future ends here: its place in the connection's future is free for the reply's
            let reply = {
                let answer = std::pin::pin!(answer);
                answer_unless_gone(answer, conn.tcp(), buf.is_empty()).await
            };
            let Some(mut reply) = reply else {
                return Ok(());
            };
            let close = close || *self.stopping.borrow();
            let mut w = h1::Writer::new(conn.tcp_mut(), self.limits.write_stall);
            if h1::write_reply(&mut w, &mut reply, close).await? {
                return Ok(());
            }
        }
    }

    /// Hands the connection to hyper: `read` (the bytes read from it and not answered) first. Boxed, so that the
    /// connection's task does not carry hyper's state until it needs it.
    async fn handover(self, read: Vec<u8>, tcp: TcpStream) -> Result<(), BoxError> {
        let io = crate::stall::StallIo::new(h1::Rewind::new(read, tcp), self.limits.write_stall);
        Box::pin(self.h1(TokioIo::new(io))).await
    }

    async fn h2<I>(self, io: TokioIo<I>) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        crate::http2::serve(io, self.service, &self.limits, self.stopping, self.watcher).await
    }
}

/// `answer`, or `None` when the client goes away while it waits (a player giving up a blocking reload: the
/// request, its park slot and the connection go at once, as hyper does). With `watch` off (bytes of a next
/// request are already read), or once bytes come, only the answer is awaited. An answer that is ready is given
/// even to a client that half-closed after asking. Polls the socket with `poll_peek` (nothing is consumed, and
/// the wait is the socket's own waker slot, not a future kept in the connection's task).
async fn answer_unless_gone<F, T>(
    mut answer: Pin<&mut F>,
    tcp: &TcpStream,
    mut watch: bool,
) -> Option<T>
where
    F: Future<Output = Result<T, std::convert::Infallible>>,
{
    std::future::poll_fn(|cx| {
        if let Poll::Ready(Ok(res)) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(res));
        }
        if watch {
            let mut byte = [0u8; 1];
            match tcp.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut byte)) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => watch = false,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// Waits for the first bytes of a plain connection: `Some(true)` for the HTTP/2 preface, `Some(false)` for anything
/// else, `None` when the peer closed without sending. Peeks, so the bytes stay for the HTTP parser.
async fn sniff_h2(tcp: &TcpStream) -> std::io::Result<Option<bool>> {
    let mut buf = [0u8; 24];
    let mut pause = Duration::from_millis(10);
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        match preface_decision(&buf[..n]) {
            Some(h2) => return Ok(Some(h2)),
            // a strict prefix of the preface: more bytes are on their way (peek returns at once while bytes wait,
            // so pause instead of spinning), each pause twice the last up to a second: a client that sends a
            // prefix and stops costs a dozen looks until the header timeout, not a hundred a second
            None => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// `Some(true)`: the whole HTTP/2 preface; `Some(false)`: bytes that cannot start it; `None`: a strict prefix of it.
fn preface_decision(bytes: &[u8]) -> Option<bool> {
    if bytes.len() >= H2_PREFACE.len() {
        Some(bytes[..H2_PREFACE.len()] == H2_PREFACE[..])
    } else if H2_PREFACE.starts_with(bytes) {
        None
    } else {
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_decides_and_its_prefixes_wait() {
        assert_eq!(preface_decision(H2_PREFACE), Some(true));
        assert_eq!(preface_decision(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(preface_decision(b"G"), Some(false));
        assert_eq!(preface_decision(b"P"), None);
        assert_eq!(preface_decision(b"PRI * HTTP/2"), None);
        assert_eq!(preface_decision(b"PUT /v1/streams/x"), Some(false));
        let mut almost = *H2_PREFACE;
        almost[23] = b'x';
        assert_eq!(preface_decision(&almost), Some(false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn time_spent_answering_is_counted_as_serving() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // a handler that works 60 ms on its thread
        let app = Router::new().route(
            "/work",
            axum::routing::get(|| async {
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(60) {
                    std::hint::spin_loop();
                }
                "done"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, None, app, Limits::default(), async {
            let _ = stopped.await;
        }));
        let before = serving_busy();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /work HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("done"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        // the poll that ran the handler is counted when it returns, which may be just after the client has read
        // the answer it wrote: there is no event to wait for, so look again for up to a second
        let mut spent = serving_busy() - before;
        for _ in 0..100 {
            if spent >= Duration::from_millis(55) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            spent = serving_busy() - before;
        }
        assert!(spent >= Duration::from_millis(55), "{spent:?}");
    }

    /// Direct answers for `/d/…`: the path itself, or (`/d/stream`) a body of unknown length whose chunks come
    /// from `chunks`, or (`/d/wait`) the path once `release` is notified (`waiting` is notified when it waits,
    /// `dropped` when its answer is dropped, given or not).
    #[derive(Clone)]
    struct Echo {
        chunks: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<axum::body::Bytes>>>>,
        /// `/d/lent`'s loans, for the test to write on.
        loans: Arc<std::sync::Mutex<Vec<crate::lend::Loan>>>,
        waiting: Arc<tokio::sync::Notify>,
        release: Arc<tokio::sync::Notify>,
        dropped: Arc<tokio::sync::Notify>,
    }

    impl Echo {
        fn new() -> Self {
            Echo {
                chunks: Arc::new(std::sync::Mutex::new(None)),
                loans: Arc::new(std::sync::Mutex::new(Vec::new())),
                waiting: Arc::new(tokio::sync::Notify::new()),
                release: Arc::new(tokio::sync::Notify::new()),
                dropped: Arc::new(tokio::sync::Notify::new()),
            }
        }
    }

    /// Notifies when dropped.
    struct OnDrop(Arc<tokio::sync::Notify>);

    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.notify_one();
        }
    }

    /// A body of unknown length: the chunks sent on a channel.
    struct Chunks(tokio::sync::mpsc::Receiver<axum::body::Bytes>);

    impl Body for Chunks {
        type Data = axum::body::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }

    type EchoFuture = Pin<
        Box<
            dyn Future<Output = Result<h1::Reply<axum::body::Body>, std::convert::Infallible>>
                + Send,
        >,
    >;

    impl Direct for Echo {
        type Body = axum::body::Body;
        type Future = EchoFuture;

        fn direct(
            &self,
            _: &Method,
            uri: &axum::http::Uri,
            _: &axum::http::HeaderMap,
            lend: crate::lend::Lend<'_>,
        ) -> Option<EchoFuture> {
            uri.path().strip_prefix("/d/")?;
            let path = uri.path()[1..].to_string();
            let (chunks, release) = (self.chunks.clone(), self.release.clone());
            let waiting = self.waiting.clone();
            let dropped = OnDrop(self.dropped.clone());
            if path == "d/lent" {
                let (lent, loan) = lend.with_lines(b"x-lent: yes\r\n").lend();
                self.loans.lock().unwrap().push(loan);
                return Some(Box::pin(async move {
                    // `dropped` is notified after the loan is taken back (locals drop in reverse order)
                    let _dropped = dropped;
                    let mut lent = lent;
                    waiting.notify_one();
                    Ok(match lent.woken().await {
                        crate::lend::Woken::Written(w) => h1::Reply::Written(w),
                        crate::lend::Woken::LookAgain => {
                            Response::new(axum::body::Body::from("looked again")).into()
                        }
                    })
                }));
            }
            Some(Box::pin(async move {
                let body = match path.as_str() {
                    "d/prepared" | "d/unprepared" => {
                        let p = prepared_echo();
                        return Ok(if path == "d/prepared" {
                            p.into()
                        } else {
                            p.into_response::<axum::body::Body>().into()
                        });
                    }
                    "d/big" => axum::body::Body::from(vec![b'x'; BIG]),
                    "d/stream" => {
                        let rx = chunks.lock().unwrap().take().expect("one stream");
                        axum::body::Body::new(Chunks(rx))
                    }
                    "d/wait" => {
                        let _dropped = dropped;
                        waiting.notify_one();
                        release.notified().await;
                        axum::body::Body::from(path)
                    }
                    _ => axum::body::Body::from(path),
                };
                Ok(Response::new(body).into())
            }))
        }
    }

    /// A server with [`Echo`] as its direct answers and a router for `/r`; returns its address, the sender of
    /// `/d/stream`'s chunks, the [`Echo`] (for `/d/wait`), and the stop.
    async fn echo_server(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::Sender<axum::body::Bytes>,
        Echo,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let app = Router::new()
            .route(
                "/r",
                axum::routing::get(|| async { "routed" }).put(|body: String| async move { body }),
            )
            .route("/r/big", axum::routing::get(|| async { vec![b'x'; BIG] }));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let echo = Echo::new();
        *echo.chunks.lock().unwrap() = Some(rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = (TowerToHyperService::new(app), echo.clone());
        let server = tokio::spawn(serve_service(listener, None, service, limits, async {
            let _ = stopped.await;
        }));
        (addr, tx, echo, stop, server)
    }

    /// The length of `/d/big` and `/r/big`: more than a loopback connection's buffers hold.
    const BIG: usize = 64 << 20;

    /// A prepared answer with every kind of piece: static lines (one of them two lines), a shared one.
    fn prepared_echo() -> h1::Prepared {
        h1::Prepared::new(axum::body::Bytes::from_static(b"the same body"))
            .with(b"content-type: text/plain\r\n")
            .with(b"cache-control: public, max-age=6\r\nvary: accept-encoding\r\n")
            .with_shared(axum::body::Bytes::from_static(b"etag: \"e-1\"\r\n"))
    }

    /// The head of an answer as its status line and its sorted header lines, and its body.
    fn head_lines(answer: &str) -> (Vec<&str>, &str) {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let mut lines: Vec<&str> = head.split("\r\n").collect();
        lines[1..].sort_unstable();
        (lines, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prepared_answer_is_written_as_its_response_would_be() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, _, stop, server) = echo_server(Limits::default()).await;
        let mut answers = Vec::new();
        for path in ["/d/prepared", "/d/unprepared"] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\nGET {path} HTTP/1.1\r\nconnection: close\r\n\r\n");
            c.write_all(req.as_bytes()).await.unwrap();
            answers.push(read_until(&mut c, "never: the server closes").await);
        }
        let [prepared, unprepared] = [&answers[0], &answers[1]];
        // two answers each (the connection kept after the first, closed after the second)
        let split = |all: &str| -> Vec<String> {
            all.split("HTTP/1.1 ")
                .skip(1)
                .map(|a| format!("HTTP/1.1 {a}"))
                .collect()
        };
        let (p, u) = (split(prepared), split(unprepared));
        assert_eq!((p.len(), u.len()), (2, 2), "{prepared}\n{unprepared}");
        for (p, u) in p.iter().zip(&u) {
            let ((mut pl, pb), (mut ul, ub)) = (head_lines(p), head_lines(u));
            // the dates may straddle a second
            pl.retain(|l| !l.starts_with("date: "));
            ul.retain(|l| !l.starts_with("date: "));
            assert_eq!((pl, pb), (ul, ub), "{p}\n{u}");
        }
        assert!(
            p[0].contains("etag: \"e-1\"\r\n") && p[0].contains("vary: accept-encoding\r\n"),
            "{}",
            p[0]
        );
        assert!(
            p[0].contains("date: ") && !p[0].contains("connection: close"),
            "{}",
            p[0]
        );
        assert!(p[1].contains("connection: close\r\n"), "{}", p[1]);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn a_prepared_answer_is_the_response_it_stands_for() {
        let r: Response<axum::body::Body> = prepared_echo().into_response();
        assert_eq!(r.status(), axum::http::StatusCode::OK);
        let h: Vec<(String, &str)> = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            h,
            [
                ("content-type".to_string(), "text/plain"),
                ("cache-control".to_string(), "public, max-age=6"),
                ("vary".to_string(), "accept-encoding"),
                ("etag".to_string(), "\"e-1\""),
            ]
        );
    }

    /// Reads from `c` until `want` has arrived (or the connection ends); returns everything read.
    async fn read_until(c: &mut TcpStream, want: &str) -> String {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains(want) {
            let mut b = [0u8; 4096];
            let n = c.read(&mut b).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn own_http1_answers_pipelined_gets_in_order_and_hands_the_rest_to_hyper() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, _, stop, server) = echo_server(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        // two direct GETs, then a PUT with a body: the last one and everything after it are hyper's
        c.write_all(
            b"GET /d/a HTTP/1.1\r\nhost: x\r\n\r\nGET /d/bb HTTP/1.1\r\nhost: x\r\n\r\n\
              PUT /r HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello\
              GET /d/c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let all = read_until(&mut c, "never: hyper closes").await;
        let bodies: Vec<&str> = all
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|r| r.split("\r\n\r\n").nth(1).unwrap())
            .collect();
        assert_eq!(bodies, ["d/a", "d/bb", "hello", ""], "{all}");
        let first = all.split("HTTP/1.1 200 OK\r\n").nth(1).unwrap();
        assert!(
            first.contains("content-length: 3\r\n") && first.contains("date: "),
            "{first}"
        );
        // hyper answered the last one (it has had the connection since the PUT: its router has no /d/) and
        // closed as asked
        let last = all.rsplit("HTTP/1.1 ").next().unwrap();
        assert!(
            last.starts_with("404 Not Found\r\n") && last.contains("connection: close\r\n"),
            "{last}"
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_of_unknown_length_is_chunked_and_each_chunk_is_sent_as_it_comes() {
        use tokio::io::AsyncWriteExt;
        let (addr, chunks, _, stop, server) = echo_server(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /d/stream HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        chunks.send("first".into()).await.unwrap();
        // the first chunk arrives while the body has not ended
        let head = read_until(&mut c, "5\r\nfirst\r\n").await;
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        chunks.send("second!".into()).await.unwrap();
        drop(chunks);
        let rest = read_until(&mut c, "0\r\n\r\n").await;
        assert_eq!(rest, "7\r\nsecond!\r\n0\r\n\r\n");
        // the connection is kept: a next request is answered
        c.write_all(b"GET /d/next HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_until(&mut c, "d/next")
            .await
            .ends_with("\r\n\r\nd/next"));
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_head_is_closed_and_a_stop_lets_the_request_in_flight_finish() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _, echo, stop, server) = echo_server(limits).await;
        // a head that never ends: closed when the header timeout runs out
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /d/a HTTP/1.1\r\nhost:").await.unwrap();
        let t = std::time::Instant::now();
        assert_eq!(read_until(&mut slow, "never").await, "");
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        // a request waiting for its answer when the stop begins gets it, and the connection is closed after it
        // (with `connection: close` on the answer when the stop was seen before it was written)
        let mut waiting = TcpStream::connect(addr).await.unwrap();
        waiting
            .write_all(b"GET /d/wait HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        let _ = stop.send(());
        echo.release.notify_one();
        let answer = read_until(&mut waiting, "never: closed after the answer").await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\nd/wait"),
            "{answer}"
        );
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_leaves_while_its_answer_waits_lets_it_go_at_once() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, echo, stop, server) = echo_server(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /d/wait HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        drop(c);
        // the waiting answer is dropped, never released (hyper does the same with a request whose client left)
        tokio::time::timeout(Duration::from_secs(5), echo.dropped.notified())
            .await
            .expect("the answer was kept after its client had gone");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// Writes `p` on the one loan `/d/lent` made, waking its connection after; `finished` is notified once the
    /// connection has written what the socket did not take at once.
    fn write_on_loan(
        echo: &Echo,
        p: &h1::Prepared,
        finished: Arc<tokio::sync::Notify>,
    ) -> crate::lend::Wrote {
        let loan = echo.loans.lock().unwrap().pop().expect("a loan");
        let mut after = crate::lend::After::default();
        // (the connection may not have polled its answer yet: then it finds it written when it does)
        let wrote = loan.write(p, &mut after, || Box::new(move || finished.notify_one()));
        after.finish();
        wrote
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lent_socket_gets_the_producer_s_answer_and_the_connection_goes_on() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, echo, stop, server) = echo_server(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /d/lent HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        // written from a thread that is not the connection's, as a publish does
        let p = prepared_echo();
        let finished = Arc::new(tokio::sync::Notify::new());
        let wrote = std::thread::scope(|t| {
            t.spawn(|| write_on_loan(&echo, &p, finished.clone()))
                .join()
                .unwrap()
        });
        assert_eq!(wrote, crate::lend::Wrote::Whole);
        let lent = read_until(&mut c, "the same body").await;
        // byte for byte what kiln's HTTP/1.1 writes for the prepared answer with the service's line added
        // (`Prepared::with`, which puts it after the static lines), but for the date
        let mut expected = Vec::new();
        let with_line = p.clone().with(b"x-lent: yes\r\n");
        let collect = |s: &[std::io::IoSlice<'_>]| {
            s.iter().for_each(|s| expected.extend_from_slice(s));
            Ok(s.iter().map(|s| s.len()).sum())
        };
        assert!(h1::write_prepared(collect, &with_line, b"", false)
            .unwrap()
            .is_empty());
        let no_date = |a: &str| -> String {
            a.split("\r\n")
                .filter(|l| !l.starts_with("date: "))
                .collect::<Vec<_>>()
                .join("\r\n")
        };
        assert_eq!(
            no_date(&lent),
            no_date(std::str::from_utf8(&expected).unwrap())
        );
        assert!(lent.contains("\r\ndate: "), "{lent}");
        let (got, body) = head_lines(&lent);
        assert_eq!(body, "the same body");
        assert_eq!(
            got,
            [
                "HTTP/1.1 200 OK",
                "cache-control: public, max-age=6",
                "content-length: 13",
                "content-type: text/plain",
                got[4],
                "etag: \"e-1\"",
                "vary: accept-encoding",
                "x-lent: yes",
            ]
        );
        // the connection goes on: the next request is read and answered, and closes it as asked
        c.write_all(b"GET /d/next HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let next = read_until(&mut c, "never: the server closes").await;
        assert!(
            next.starts_with("HTTP/1.1 200 OK\r\n") && next.ends_with("d/next"),
            "{next}"
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lent_answer_the_socket_does_not_take_at_once_is_finished_by_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, _, echo, stop, server) = echo_server(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /d/lent HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        // far more than a socket's buffers hold while the client reads nothing
        let body: Vec<u8> = (0..32 << 20).map(|i: u32| (i % 251) as u8).collect();
        let p = h1::Prepared::new(axum::body::Bytes::from(body.clone()));
        let finished = Arc::new(tokio::sync::Notify::new());
        let wrote = write_on_loan(&echo, &p, finished.clone());
        assert_eq!(wrote, crate::lend::Wrote::Part);
        let mut all = vec![0u8; 1 << 20];
        c.read_exact(&mut all).await.unwrap();
        // the connection writes the rest only as the client reads it: not finished yet
        assert!(
            tokio::time::timeout(Duration::from_millis(50), finished.notified())
                .await
                .is_err(),
            "finished before the client had read the answer"
        );
        c.read_to_end(&mut all).await.unwrap();
        finished.notified().await;
        let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = std::str::from_utf8(&all[..head_end]).unwrap();
        assert!(
            head.contains("content-length: 33554432\r\n") && head.contains("connection: close\r\n"),
            "{head}"
        );
        assert!(
            all[head_end..] == body[..],
            "the body came whole and in order"
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A write on the socket of a client that is gone (reset) fails, and says so (a producer does not count it as
    /// an answer served, and its `finished` is not called: no fan-out is observed); the connection ends. On one
    /// thread: the connection does not run between the client's reset and the write.
    #[tokio::test]
    async fn a_lent_write_to_a_client_that_is_gone_fails() {
        use std::sync::atomic::AtomicBool;
        use tokio::io::AsyncWriteExt;
        let (addr, _, echo, stop, server) = echo_server(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /d/lent HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        c.set_zero_linger().unwrap();
        // a reset, not a close; then time for the kernel to take the reset in, should it defer it (blocking the
        // runtime's one thread: the connection still cannot run)
        drop(c);
        std::thread::sleep(Duration::from_millis(20));
        let loan = echo.loans.lock().unwrap().pop().expect("a loan");
        let called = Arc::new(AtomicBool::new(false));
        let mut after = crate::lend::After::default();
        let wrote = loan.write(&prepared_echo(), &mut after, || {
            let called = called.clone();
            Box::new(move || called.store(true, Ordering::Relaxed))
        });
        after.finish();
        assert_eq!(wrote, crate::lend::Wrote::Failed);
        echo.dropped.notified().await;
        assert!(
            !called.load(Ordering::Relaxed),
            "a failed write observed as an answer"
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lent_socket_is_taken_back_when_its_request_ends_and_is_not_written_after() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, echo, stop, server) = echo_server(Limits::default()).await;
        // asked to look again: the request answers by itself, and the loan is over
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /d/lent HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        let loan = echo.loans.lock().unwrap().pop().unwrap();
        assert!(loan.is_open());
        let mut after = crate::lend::After::default();
        loan.look_again(&mut after);
        after.finish();
        let mut after = crate::lend::After::default();
        let answer = read_until(&mut c, "looked again").await;
        assert!(answer.ends_with("looked again"), "{answer}");
        echo.dropped.notified().await;
        assert!(!loan.is_open());
        let never = || -> Box<dyn FnOnce() + Send> { unreachable!("nothing was written") };
        let wrote = loan.write(&prepared_echo(), &mut after, never);
        assert_eq!(wrote, crate::lend::Wrote::Not);
        assert!(after.is_empty());
        // a client that leaves: its answer is dropped, and with it the loan
        c.write_all(b"GET /d/lent HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        let loan = echo.loans.lock().unwrap().pop().unwrap();
        drop(c);
        echo.dropped.notified().await;
        assert!(!loan.is_open());
        let wrote = loan.write(&prepared_echo(), &mut after, never);
        assert_eq!(wrote, crate::lend::Wrote::Not);
        assert!(after.is_empty());
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A client that stops reading (its TCP window at zero) is cut once a write has waited `write_stall`, on kiln's
    /// own HTTP/1.1 (a direct answer) and on a connection hyper serves (a routed one): the connection ends before
    /// the whole answer. Without the limit the server would wait for it forever, holding its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_is_cut_after_the_write_stall_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = Limits {
            write_stall: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _, _, stop, server) = echo_server(limits).await;
        let stalled = connections_stalled();
        for path in ["/d/big", "/r/big"] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            // the stalled client: nothing read for ten times the limit (the stimulus, not a wait for the server)
            tokio::time::sleep(Duration::from_millis(3000)).await;
            let mut all = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut all))
                .await
                .unwrap_or_else(|_| panic!("{path}: the server kept the connection"));
            assert!(
                read.is_err() || all.len() < BIG,
                "{path}: the whole answer came ({} bytes)",
                all.len()
            );
            assert!(all.starts_with(b"HTTP/1.1 200 OK\r\n"), "{path}");
        }
        // (a process-wide count: nextest runs each test in a process of its own)
        assert_eq!(connections_stalled() - stalled, 2, "each cut counted once");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// At the connection cap a new connection is closed at once, without an answer, and counted; the connection
    /// that holds the place is not disturbed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_over_the_cap_is_closed_at_once_and_counted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (addr, _, echo, stop, server) = echo_server(limits).await;
        let refused = connections_refused();
        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET /d/wait HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await; // the one place is taken
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), over.read_to_end(&mut got))
            .await
            .expect("the connection over the cap is closed");
        assert!(read.is_err() || got.is_empty(), "{got:?}");
        // (a process-wide count: nextest runs each test in a process of its own)
        assert_eq!(connections_refused() - refused, 1);
        echo.release.notify_one();
        let answer = read_until(&mut held, "d/wait").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// Serving work added from inside a server's poll (a handler that publishes) is already in that poll's time:
    /// not added twice. Outside one (a publishing thread), it is added.
    #[tokio::test]
    async fn serving_added_inside_a_timed_poll_is_counted_once() {
        let before = serving_busy();
        Timed {
            inner: async { add_serving(Duration::from_secs(100)) },
        }
        .await;
        assert!(serving_busy() - before < Duration::from_secs(100));
        add_serving(Duration::from_secs(100));
        assert!(serving_busy() - before >= Duration::from_secs(100));
    }

    /// An answer a producer writes after the server began to stop says `Connection: close`, as one the connection
    /// writes itself would, and the connection closes after it: a client does not send its next request on a
    /// connection about to close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lent_answer_written_once_the_stop_began_says_the_connection_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, _, echo, stop, server) = echo_server(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /d/lent HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        echo.waiting.notified().await;
        let loan = echo.loans.lock().unwrap().last().unwrap().clone();
        assert!(!loan.closes(), "a keep-alive request, the server running");
        let _ = stop.send(());
        // the flag is set right after the listener closes, in the server's task
        tokio::time::timeout(Duration::from_secs(10), async {
            while !loan.closes() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the stop reaches the loan");
        let finished = Arc::new(tokio::sync::Notify::new());
        let wrote = write_on_loan(&echo, &prepared_echo(), finished);
        assert_eq!(wrote, crate::lend::Wrote::Whole);
        // the server closes the connection after the answer: read to its end
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut all))
            .await
            .expect("the connection closes after the answer")
            .unwrap();
        let all = String::from_utf8(all).unwrap();
        let (lines, body) = head_lines(&all);
        assert!(lines.contains(&"connection: close"), "{all}");
        assert_eq!(body, "the same body");
        server.await.unwrap().unwrap();
    }

    /// A plain connection's task holds kiln's own HTTP/1.1 loop and its answer in progress, not hyper's state
    /// (boxed until a request needs hyper). In a debug build: 2,552 bytes with hyper's HTTP/1.1 connection inline,
    /// 1,616 with it boxed, 1,360 with the `writev` slices built in each poll instead of held in the future, 1,656
    /// with one header timer and one wait for the stop kept for the connection's life (no timer set and cleared
    /// per request), 1,848 with a watch for a client that leaves while its answer waits kept as a `peek` future,
    /// 1,704 with it polled from the socket's own waker slot, 1,656 with the answer passed to the writer by
    /// reference (release: 1,616; in kilnd, where the answer is held inline, that took the task back under a
    /// jemalloc size class: 3.2 → 2.8 KiB per parked request in the origin bench), 1,768 with a reply that is a
    /// response or a prepared answer (1,936 with the prepared one's write a wait of the connection's own, which
    /// took kilnd to 3.2 KiB per parked request: the reply is now held across one wait only, `h1::write_reply`), 1,824
    /// with the socket in a `lend::Lender` and a reply that may be one written on it, 1,872 with a stop flag in
    /// the connection for answers written on the loan (now the stop's receiver, lent with the socket), 1,968 with
    /// `Limits` grown by the write stall limit (inline in the connection's `Conn`, which its future holds in several
    /// nested places), 1,640 with the `Limits` shared (release: 1,784 before the two, 1,608 now).
    #[tokio::test]
    async fn a_plain_connection_s_task_is_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let echo = Echo::new();
        let graceful = GracefulShutdown::new();
        let conn = Conn {
            service: TowerToHyperService::new(Router::new()),
            direct: echo,
            limits: Arc::new(Limits::default()),
            watcher: graceful.watcher(),
            stopping: tokio::sync::watch::channel(false).1,
        };
        let task = conn.plain(tcp);
        let size = std::mem::size_of_val(&task);
        eprintln!("a plain connection's future: {size} bytes");
        assert!(size <= 2048, "{size} bytes");
    }

    #[test]
    fn the_cap_never_exceeds_what_file_descriptors_allow() {
        assert_eq!(effective_max_connections(16_384, 1024), 512);
        assert_eq!(effective_max_connections(16_384, 1_048_576), 16_384);
        assert_eq!(effective_max_connections(100, 1_048_576), 100);
        assert_eq!(
            effective_max_connections(16_384, 10),
            64,
            "a floor, never zero"
        );
    }
}
