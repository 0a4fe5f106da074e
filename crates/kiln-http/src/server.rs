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
//!   pinged ([`Limits::h2_keepalive`]) and closed when the peer stops answering.
//! - **Graceful stop**: when `shutdown` resolves, no new connection is accepted and open ones get
//!   [`Limits::drain`] to finish.
//!
//! - **Serving time**: every poll of a connection's future (and, over HTTP/2, of each request's) is timed into
//!   [`serving_busy`], the CPU that answering requests takes, which kilnd reserves from admission.
//!
//! Why not `axum::serve`: it has no header timeout, no connection cap and no TLS; this is hyper's own connection
//! builders plus the accept loop, not an HTTP implementation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Request, Response};
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

/// Nanoseconds spent polling connection and request futures, process-wide.
static BUSY_NS: AtomicU64 = AtomicU64::new(0);

/// Time this process has spent serving HTTP (TLS handshakes, parsing, handlers, writing) since it started: the
/// wall time of every poll of the servers' connection and request futures. A poll runs on one thread without
/// waiting, so this is CPU time unless the thread was preempted mid-poll. Every server in the process adds to it
/// (a test process running several daemons sees their sum).
pub fn serving_busy() -> Duration {
    Duration::from_nanos(BUSY_NS.load(Ordering::Relaxed))
}

pin_project_lite::pin_project! {
    /// A future whose polls are timed into [`serving_busy`]. The future is held inline (not boxed): a spawned
    /// connection is one allocation, its task.
    struct Timed<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let start = std::time::Instant::now();
        let out = self.project().inner.poll(cx);
        BUSY_NS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

/// Spawns HTTP/2 request futures on tokio, timed like the connections.
#[derive(Debug, Clone, Copy)]
struct TimedExecutor;

impl<F> hyper::rt::Executor<F> for TimedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Timed { inner: fut });
    }
}

/// The server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most (also bounded by the file-descriptor limit, see [`raise_nofile_limit`]).
    pub max_connections: usize,
    /// Time a client has to send a request head (and the keep-alive idle time between requests).
    pub header_timeout: Duration,
    /// HTTP/2 ping interval; a peer that does not answer a ping within the same time is dropped.
    pub h2_keepalive: Duration,
    /// How long open connections get to finish after shutdown starts.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16_384,
            header_timeout: Duration::from_secs(10),
            h2_keepalive: Duration::from_secs(20),
            drain: Duration::from_secs(10),
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
    serve_service(
        listener,
        tls,
        TowerToHyperService::new(app),
        limits,
        shutdown,
    )
    .await
}

/// [`serve`] with any hyper service (kilnd's answers plain playback requests before its router).
pub async fn serve_service<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
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
            limits,
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
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing");
    }
    Ok(())
}

/// A place for a new connection under the cap, or `None` (the connection is to be closed); logs the first
/// refusal of each burst and the end of it.
fn admit(
    permits: &Arc<Semaphore>,
    refused: &AtomicU64,
    max: usize,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let Ok(permit) = permits.clone().try_acquire_owned() else {
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One accepted connection and what it is served with.
struct Conn<S> {
    service: S,
    limits: Limits,
    watcher: hyper_util::server::graceful::Watcher,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl<S, B> Conn<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Plain TCP: the first bytes (within the header timeout) choose h2c or HTTP/1.1.
    async fn plain(mut self, tcp: TcpStream) -> Result<(), BoxError> {
        let sniff = tokio::time::timeout(self.limits.header_timeout, sniff_h2(&tcp));
        let decided = tokio::select! {
            d = sniff => d,
            _ = self.stopping.wait_for(|s| *s) => return Ok(()),
        };
        match decided {
            Ok(Ok(Some(h2))) => self.http(tcp, h2).await,
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

    async fn h2<I>(self, io: TokioIo<I>) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut b = hyper::server::conn::http2::Builder::new(TimedExecutor);
        b.timer(TokioTimer::new())
            .keep_alive_interval(Some(self.limits.h2_keepalive))
            .keep_alive_timeout(self.limits.h2_keepalive);
        let conn = b.serve_connection(io, self.service);
        self.watcher.watch(conn).await?;
        Ok(())
    }
}

/// Waits for the first bytes of a plain connection: `Some(true)` for the HTTP/2 preface, `Some(false)` for anything
/// else, `None` when the peer closed without sending. Peeks, so the bytes stay for the HTTP parser.
async fn sniff_h2(tcp: &TcpStream) -> std::io::Result<Option<bool>> {
    let mut buf = [0u8; 24];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        match preface_decision(&buf[..n]) {
            Some(h2) => return Ok(Some(h2)),
            // a strict prefix of the preface: more bytes are on their way (peek returns at once while bytes wait,
            // so pause instead of spinning)
            None => tokio::time::sleep(Duration::from_millis(10)).await,
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
