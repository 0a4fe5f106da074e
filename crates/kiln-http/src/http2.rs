//! HTTP/2 connections: hyper's, with the two limits its HTTP/2 server lacks and HTTP/1.1 gets elsewhere.
//!
//! - **A stream that gets no room to send** ([`crate::server::Limits::write_stall`]). HTTP/2 flow control lets a
//!   client that keeps reading the socket (and answering pings) withhold a stream's window: hyper then waits for
//!   it forever, holding the stream's body and its buffered bytes, up to 200 streams a connection. Every
//!   response body is handed to hyper in pieces of at most [`PIECE`] bytes ([`StallBody`], zero-copy for
//!   `Bytes`), and a stream's task is dropped when its body has yielded a piece that hyper did not take within
//!   the limit (h2 then resets the stream with `CANCEL` and frees what it buffered). hyper takes a piece once
//!   there is room for one byte of it beyond what is buffered: in the stream's and the connection's window, and
//!   in its per-stream send buffer (400 KiB, which fills while the socket is slow). So what is cut is a client
//!   that withholds its window, one that widens it only in batches while it reads slower than a batch per limit
//!   (as nginx's HTTP/2 `send_timeout` would), and the streams of a connection whose socket stopped taking bytes
//!   (the connection is cut too, by its writes' own limit). A body that waits on itself (a live answer not
//!   produced yet) never counts; the time between pieces does not either. The end of an answer is timed too
//!   (hyper ends a stream's task once it has handed over the last piece): a body known to end sends its last
//!   byte as a piece of its own, and a body produced as it goes that ends after its latest piece has the task
//!   wait, timed, until h2 has written that piece out (to the socket; one of a few hundred bytes, into its write
//!   buffer). That wait is stricter than the rest: the piece is last in the stream's queue, so what the stream
//!   has buffered before it (up to h2's 400 KiB send buffer and the piece) must go within the limit, about
//!   15 KB/s at 30 s. Counted in [`crate::server::streams_stalled`].
//! - **An idle connection** ([`crate::server::Limits::header_timeout`], HTTP/1.1's keep-alive idle time): a
//!   connection with no stream's task for that long is closed gracefully (GOAWAY). If it has not closed once it
//!   has had none for a write stall limit since the GOAWAY (a peer that answers nothing, or the last byte of a
//!   finished stream held by a withheld window), it is dropped and counted as a write stall.
//!
//! Why here and not in hyper: hyper's HTTP/2 server has neither an idle timeout nor a send timeout; its
//! executor (every stream's task) and its service (every response body) are the two places a server can add them.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Request, Response};
use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper_util::rt::TokioTimer;
use tokio::time::{Instant, Sleep};

use crate::server::{BoxError, Limits, Timed};

/// The most of a response body hyper gets at a time (and so what one piece can hold h2's buffer with beyond a
/// withheld window before its stream is timed out).
pub(crate) const PIECE: usize = 64 << 10;

/// Serves one HTTP/2 connection with `service`, within `limits`, until it ends; a graceful close when `stopping`
/// turns true. `watcher` is held while the connection lives: the server's drain waits for it.
pub(crate) async fn serve<I, S, B>(
    io: I,
    service: S,
    limits: &Limits,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let streams = Arc::new(Streams::new(limits.write_stall));
    let mut b = hyper::server::conn::http2::Builder::new(StreamExecutor(streams.clone()));
    b.timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.h2_keepalive))
        .keep_alive_timeout(limits.h2_keepalive);
    let conn = b.serve_connection(io, Pieces(service));
    let mut conn = std::pin::pin!(conn);
    let _watched = watcher;
    let idle = limits.header_timeout;
    let stall = limits.write_stall;
    let mut stop = std::pin::pin!(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    let mut timer = std::pin::pin!(tokio::time::sleep(idle));
    let mut phase = Phase::Open;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(BoxError::from));
        }
        if phase != Phase::Stopping && stop.as_mut().poll(cx).is_ready() {
            if phase == Phase::Open {
                conn.as_mut().graceful_shutdown();
                // the graceful close writes its GOAWAY when the connection is polled again
                cx.waker().wake_by_ref();
            }
            // the drain's limit applies from here
            phase = Phase::Stopping;
        }
        if phase == Phase::Stopping {
            return Poll::Pending;
        }
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let since = streams.idle_since(now);
            match phase {
                Phase::Open => match since {
                    Some(since) if now >= since + idle => {
                        conn.as_mut().graceful_shutdown();
                        cx.waker().wake_by_ref();
                        if stall.is_zero() {
                            phase = Phase::Stopping;
                            return Poll::Pending;
                        }
                        phase = Phase::Idle(now);
                        timer.as_mut().reset(now + stall);
                    }
                    Some(since) => timer.as_mut().reset(since + idle),
                    None => timer.as_mut().reset(now + idle),
                },
                // dropped once it has had no stream's task for a write stall limit since its GOAWAY (a request
                // that crossed the GOAWAY is answered first; its own stall limit bounds it)
                Phase::Idle(goaway) => match since {
                    Some(since) if now >= since.max(goaway) + stall => {
                        crate::server::note_stalled();
                        return Poll::Ready(Err(BoxError::from(format!(
                            "an idle HTTP/2 connection did not close within {stall:?} of its GOAWAY"
                        ))));
                    }
                    Some(since) => timer.as_mut().reset(since.max(goaway) + stall),
                    None => timer.as_mut().reset(now + stall),
                },
                Phase::Stopping => unreachable!("returned above"),
            }
        }
        Poll::Pending
    })
    .await
}

/// Where an HTTP/2 connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Closing since it was idle: its GOAWAY went at this time.
    Idle(Instant),
    /// Closing on the server's stop (the drain's limit applies), or idle with no write stall limit.
    Stopping,
}

/// A connection's streams: how many have a task, and when the last one ended.
#[derive(Debug)]
struct Streams {
    open: AtomicUsize,
    /// Microseconds from `epoch` to the end of the latest stream's task (0: the connection's start).
    last_end_us: AtomicU64,
    epoch: Instant,
    /// The write stall limit; zero: none.
    stall: Duration,
    /// Requests of this connection a server has parked ([`connection_waiting`]).
    waiting: Arc<AtomicUsize>,
}

impl Streams {
    fn new(stall: Duration) -> Self {
        Streams {
            open: AtomicUsize::new(0),
            last_end_us: AtomicU64::new(0),
            epoch: Instant::now(),
            stall,
            waiting: Arc::default(),
        }
    }

    /// Since when the connection has had no stream's task, or `None` while one runs.
    fn idle_since(&self, now: Instant) -> Option<Instant> {
        // a task ending stores its end before it counts itself out, so an idle connection's end time is current
        (self.open.load(Ordering::Acquire) == 0).then(|| {
            let since =
                self.epoch + Duration::from_micros(self.last_end_us.load(Ordering::Relaxed));
            since.min(now)
        })
    }

    fn ended(&self) {
        let us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_end_us.fetch_max(us, Ordering::Relaxed);
        self.open.fetch_sub(1, Ordering::Release);
    }
}

/// Spawns hyper's stream tasks, timed into the serving time like the connections, each [`Watched`].
#[derive(Debug, Clone)]
struct StreamExecutor(Arc<Streams>);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(Timed::new(Watched {
            inner: fut,
            progress: Arc::new(Progress::default()),
            timer: None,
            armed: 0,
            open: Open(self.0.clone()),
        }));
    }
}

/// Counts a stream's task out of its connection's when it ends, however it ends.
#[derive(Debug)]
struct Open(Arc<Streams>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// Where a stream's body is: `pieces << 1 | 1` while the last piece it yielded is not taken, `pieces << 1`
/// while it waits on itself (or has none yet, or ended).
#[derive(Debug, Default)]
struct Progress(AtomicU64);

impl Progress {
    fn yielded(&self) {
        let s = self.0.load(Ordering::Relaxed);
        self.0.store(((s >> 1) + 1) << 1 | 1, Ordering::Relaxed);
    }

    fn waits_on_itself(&self) {
        self.0.fetch_and(!1, Ordering::Relaxed);
    }

    /// The state, when a yielded piece is waiting to be taken.
    fn outstanding(&self) -> Option<u64> {
        let s = self.0.load(Ordering::Relaxed);
        (s & 1 == 1).then_some(s)
    }
}

thread_local! {
    /// The [`Progress`] of the stream whose task is being polled on this thread: where its body, made inside
    /// that poll, reports.
    static CURRENT: std::cell::RefCell<Option<Arc<Progress>>> = const { std::cell::RefCell::new(None) };
    /// The waiting count of that stream's connection ([`connection_waiting`]).
    static WAITING: std::cell::RefCell<Option<Arc<AtomicUsize>>> = const { std::cell::RefCell::new(None) };
}

/// The count of requests a server keeps waiting (parked) on the HTTP/2 connection whose stream is being polled
/// on this thread; `None` outside one (an HTTP/1.1 connection has at most one request waiting). A server that
/// parks requests counts them here to bound what one connection can take of a shared limit: a connection may
/// multiplex 200 streams, so a few hundred connections could otherwise hold every place.
pub fn connection_waiting() -> Option<Arc<AtomicUsize>> {
    WAITING.with(|w| w.borrow().clone())
}

pin_project_lite::pin_project! {
    /// A stream's task, dropped (the stream reset) when its body's last piece waited the write stall limit.
    struct Watched<F> {
        #[pin]
        inner: F,
        progress: Arc<Progress>,
        // made on the first wait for a taken piece
        timer: Option<Pin<Box<Sleep>>>,
        // the progress state the timer was set for
        armed: u64,
        open: Open,
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        /// Puts back the outer stream's progress and waiting count when the poll ends, also by a panic (tokio
        /// keeps the thread).
        struct Restore(Option<Arc<Progress>>, Option<Arc<AtomicUsize>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| *c.borrow_mut() = self.0.take());
                WAITING.with(|w| *w.borrow_mut() = self.1.take());
            }
        }
        let this = self.project();
        let restore = Restore(
            CURRENT.with(|c| c.replace(Some(this.progress.clone()))),
            WAITING.with(|w| w.replace(Some(this.open.0.waiting.clone()))),
        );
        let polled = this.inner.poll(cx);
        drop(restore);
        if polled.is_ready() {
            return Poll::Ready(());
        }
        let stall = this.open.0.stall;
        let Some(state) = this.progress.outstanding().filter(|_| !stall.is_zero()) else {
            return Poll::Pending;
        };
        let timer = match this.timer {
            Some(t) if *this.armed == state => t,
            t => {
                let at = Instant::now() + stall;
                *this.armed = state;
                match t {
                    Some(t) => {
                        t.as_mut().reset(at);
                        t
                    }
                    None => t.insert(Box::pin(tokio::time::sleep_until(at))),
                }
            }
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                crate::server::note_stream_stalled();
                tracing::debug!(
                    ?stall,
                    "an HTTP/2 stream's piece was not taken: stream reset"
                );
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The service, with every response body in [`StallBody`] pieces.
#[derive(Debug, Clone)]
struct Pieces<S>(S);

impl<S, B> Service<Request<Incoming>> for Pieces<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Response = Response<StallBody<B>>;
    type Error = S::Error;
    type Future = PiecesFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        PiecesFuture {
            inner: self.0.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    struct PiecesFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for PiecesFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<StallBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_ok(|res| {
            // set while hyper polls the stream's task, where this future runs (without it the body is not timed)
            let progress = CURRENT.with(|c| c.borrow().clone());
            debug_assert!(
                progress.is_some(),
                "an HTTP/2 answer outside its stream's task"
            );
            res.map(|inner| StallBody {
                inner,
                rest: Bytes::new(),
                next: None,
                done: false,
                unsent: None,
                draining: false,
                progress,
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body in pieces of at most [`PIECE`] bytes, reporting to its stream's [`Progress`]. hyper hands a
    /// piece to h2 once the window has room for one byte of it, and ends the stream's task after the last one, so
    /// a last piece would wait in h2 untimed, pinning its answer's buffer. So:
    /// - a body that is known to end with a piece has its last byte sent as a piece of its own (a static byte,
    ///   no allocation), which hyper takes only once the window has room for everything before it;
    /// - a piece whose body might go on (it is produced as it goes, and its next part is not there yet) goes
    ///   whole, tracked: if the body then ends (or sends trailers), the task waits, timed, until h2 has written
    ///   that piece out and dropped it.
    pub(crate) struct StallBody<B: Body> {
        #[pin]
        inner: B,
        // what is left of the inner body's current data frame
        rest: Bytes,
        // a frame the inner body gave while the end of `rest` was looked for
        next: Option<Result<Frame<Bytes>, BoxError>>,
        // the inner body has ended
        done: bool,
        // the last piece handed over while the body's end was not known, until another piece follows it
        unsent: Option<Arc<Sent>>,
        // waiting (timed) for `unsent` to be sent before the end
        draining: bool,
        progress: Option<Arc<Progress>>,
    }
}

fn to_bytes<D: Buf>(mut d: D) -> Bytes {
    // zero-copy for `Bytes`
    d.copy_to_bytes(d.remaining())
}

/// Every byte value, for one-byte pieces that need no allocation.
static BYTE_VALUES: [u8; 256] = {
    let mut all = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        all[i] = i as u8;
        i += 1;
    }
    all
};

/// Whether a tracked piece has been sent (dropped by h2), and the task that waits for it.
#[derive(Debug, Default)]
struct Sent {
    done: std::sync::atomic::AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Sent {
    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// A tracked piece's bytes: dropped by h2 once it has written them (or reset the stream).
struct Tracked {
    bytes: Bytes,
    sent: Arc<Sent>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.sent.done.store(true, Ordering::Release);
        let waker = self
            .sent
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<B: Body> StallBody<B>
where
    B::Error: Into<BoxError>,
{
    /// The next piece of `rest` (not empty).
    fn piece(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Bytes {
        let mut this = self.project();
        let len = this.rest.len();
        if len > PIECE {
            return this.rest.split_to(PIECE);
        }
        // the frame's last piece: does the body end with it?
        let ends = loop {
            break match this.next {
                Some(Ok(f)) => f.is_trailers(),
                Some(Err(_)) => false,
                None if *this.done || this.inner.is_end_stream() => true,
                None => match this.inner.as_mut().poll_frame(cx) {
                    Poll::Ready(None) => {
                        *this.done = true;
                        true
                    }
                    Poll::Ready(Some(next)) => {
                        let next = next.map(|f| f.map_data(to_bytes)).map_err(Into::into);
                        if next
                            .as_ref()
                            .is_ok_and(|f| f.data_ref().is_some_and(Bytes::is_empty))
                        {
                            continue; // carries nothing: look at what follows
                        }
                        let trailers = next.as_ref().is_ok_and(Frame::is_trailers);
                        *this.next = Some(next);
                        trailers
                    }
                    // not known yet (a body produced as it goes): the piece goes whole, tracked
                    Poll::Pending => {
                        let sent = Arc::new(Sent::default());
                        *this.unsent = Some(sent.clone());
                        let bytes = std::mem::take(this.rest);
                        return Bytes::from_owner(Tracked { bytes, sent });
                    }
                },
            };
        };
        if !ends {
            return std::mem::take(this.rest);
        }
        let last = usize::from(this.rest[len - 1]);
        let last = Bytes::from_static(&BYTE_VALUES[last..=last]);
        if len == 1 {
            *this.rest = Bytes::new();
            return last;
        }
        let piece = this.rest.split_to(len - 1);
        *this.rest = last;
        piece
    }

    /// At the body's end: `Pending` (timed) until the last piece handed over untracked-for-end has been sent.
    fn drain(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let Some(sent) = this.unsent.as_ref() else {
            return Poll::Ready(());
        };
        if !sent.is_done() {
            *sent.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            if !sent.is_done() {
                if !*this.draining {
                    *this.draining = true;
                    // a piece waiting for the client: the stream's timer runs from here
                    if let Some(p) = this.progress {
                        p.yielded();
                    }
                }
                return Poll::Pending;
            }
        }
        *this.unsent = None;
        Poll::Ready(())
    }
}

impl<B: Body> Body for StallBody<B>
where
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = loop {
            if !self.rest.is_empty() {
                break Poll::Ready(Some(Ok(Frame::data(self.as_mut().piece(cx)))));
            }
            let this = self.as_mut().project();
            let trailers_next = matches!(this.next, Some(Ok(f)) if f.is_trailers());
            if trailers_next && this.unsent.is_some() {
                // trailers end the stream too: what is still unsent is timed first
                std::task::ready!(self.as_mut().drain(cx));
                continue;
            }
            if let Some(next) = this.next.take() {
                match next.map(Frame::into_data) {
                    Ok(Ok(data)) => {
                        if !data.is_empty() {
                            *this.unsent = None;
                        }
                        *this.rest = data;
                    }
                    Ok(Err(frame)) => break Poll::Ready(Some(Ok(frame))),
                    Err(e) => break Poll::Ready(Some(Err(e))),
                }
                continue;
            }
            if *this.done {
                // (the progress is the drain's while it waits)
                std::task::ready!(self.as_mut().drain(cx));
                break Poll::Ready(None);
            }
            match this.inner.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.map_data(to_bytes).into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            // pieces follow the tracked one: they wait for room for it
                            *this.unsent = None;
                        }
                        *this.rest = data;
                    }
                    // (trailers: through `next`, after the drain)
                    Err(frame) => *this.next = Some(Ok(frame)),
                },
                Poll::Ready(Some(Err(e))) => break Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => *this.done = true,
                Poll::Pending => break Poll::Pending,
            }
        };
        if let Some(p) = &self.progress {
            match &polled {
                Poll::Ready(Some(Ok(f))) if f.is_data() => p.yielded(),
                _ => p.waits_on_itself(),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
            && self.next.is_none()
            && self.unsent.is_none()
            && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let held = self.rest.len() as u64
            + match &self.next {
                Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
                _ => 0,
            };
        if self.done {
            return SizeHint::with_exact(held);
        }
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{connections_stalled, serve, streams_stalled};
    use axum::Router;
    use tokio::net::{TcpListener, TcpStream};

    /// A server on port 0 with `/big` (8 MiB), `/small`
    /// and `/wait` (answers after a second).
    async fn server(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
        Arc<Hooks>,
    ) {
        let hooks = Arc::new(Hooks::default());
        let (waiting, streaming, parking) = (hooks.clone(), hooks.clone(), hooks.clone());
        let app = Router::new()
            .route(
                "/park",
                axum::routing::get(move || async move {
                    // what a server that parks requests does: counts itself into its connection's share
                    let share = connection_waiting();
                    if let Some(s) = &share {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    parking.parked.notify_one();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Some(s) = &share {
                        s.fetch_sub(1, Ordering::SeqCst);
                    }
                    "parked"
                }),
            )
            .route(
                "/count",
                axum::routing::get(|| async {
                    connection_waiting()
                        .map_or("none".to_string(), |c| c.load(Ordering::SeqCst).to_string())
                }),
            )
            .route("/big", axum::routing::get(|| async { vec![b'x'; 8 << 20] }))
            .route("/small", axum::routing::get(|| async { "small" }))
            .route(
                "/wait",
                axum::routing::get(move || async move {
                    waiting.waiting.notify_one();
                    // a parked request (a blocking reload) longer than the idle limit
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    "waited"
                }),
            )
            .route(
                "/stream",
                axum::routing::get(move || async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    streaming.senders.lock().unwrap().push(tx);
                    axum::body::Body::new(Chunks(rx))
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, None, app, limits, async {
            let _ = stopped.await;
        }));
        (addr, stop, server, hooks)
    }

    /// What the test server's routes let a test see and drive.
    #[derive(Default)]
    struct Hooks {
        /// `/wait` has begun to wait.
        waiting: tokio::sync::Notify,
        /// `/park` has counted itself in.
        parked: tokio::sync::Notify,
        /// Each `/stream` answer's chunks: it ends when its sender is dropped.
        senders: std::sync::Mutex<Vec<tokio::sync::mpsc::Sender<Bytes>>>,
    }

    /// A body produced as it goes (a segment streamed while its parts are made): the chunks sent, then its end.
    struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
        }
    }

    /// An h2c client whose streams' windows are `window` bytes and are never widened unless the test releases what
    /// it read; the connection's window is wide. Returns the client and its
    /// connection's task.
    async fn client(
        addr: std::net::SocketAddr,
        window: u32,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(64 << 20)
            .handshake(tcp)
            .await
            .unwrap();
        (send, tokio::spawn(conn))
    }

    async fn get(send: &mut h2::client::SendRequest<Bytes>, path: &str) -> h2::RecvStream {
        let req = Request::get(format!("http://x{path}")).body(()).unwrap();
        let mut ready = send.clone().ready().await.unwrap();
        let (answer, _) = ready.send_request(req, true).unwrap();
        let answer = answer.await.unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        answer.into_body()
    }

    /// Reads a body to its end, releasing what it reads (after `pause` each time): its bytes, or its error.
    async fn read_all(body: &mut h2::RecvStream, pause: Duration) -> Result<usize, h2::Error> {
        let mut n = 0;
        while let Some(data) = body.data().await {
            let data = data?;
            n += data.len();
            tokio::time::sleep(pause).await;
            body.flow_control().release_capacity(data.len()).unwrap();
        }
        Ok(n)
    }

    async fn text(send: &mut h2::client::SendRequest<Bytes>, path: &str) -> String {
        let mut body = get(send, path).await;
        let mut out = Vec::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            body.flow_control().release_capacity(d.len()).unwrap();
            out.extend_from_slice(&d);
        }
        String::from_utf8(out).unwrap()
    }

    /// Each HTTP/2 connection has a count of its own for the requests a handler parks, seen by every stream of
    /// that connection and by no other connection; an HTTP/1.1 request has none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parked_requests_are_counted_per_connection() {
        let (addr, stop, server, hooks) = server(Limits::default()).await;
        let (mut a, a_conn) = client(addr, 1 << 20).await;
        let (mut b, b_conn) = client(addr, 1 << 20).await;
        let parked = hooks.parked.notified();
        let req = Request::get("http://x/park").body(()).unwrap();
        let (held, _) = a
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(req, true)
            .unwrap();
        parked.await;
        assert_eq!(text(&mut a, "/count").await, "1", "the same connection");
        assert_eq!(text(&mut b, "/count").await, "0", "another connection");
        let mut h1 = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut h1,
            b"GET /count HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut h1, &mut answer)
            .await
            .unwrap();
        assert!(answer.ends_with("none"), "HTTP/1.1: {answer}");
        let mut held = held.await.unwrap().into_body();
        assert_eq!(read_all(&mut held, Duration::ZERO).await.unwrap(), 6);
        assert_eq!(text(&mut a, "/count").await, "0", "counted out");
        drop((a, b, held));
        a_conn.await.unwrap().unwrap();
        b_conn.await.unwrap().unwrap();
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    fn limits(ms: u64) -> Limits {
        Limits {
            write_stall: Duration::from_millis(ms),
            header_timeout: Duration::from_millis(ms),
            ..Limits::default()
        }
    }

    /// A client that keeps its connection (answers pings, reads the socket) but withholds a stream's window has
    /// that stream reset (`CANCEL`) once the body waited the write stall limit, counted once; the connection goes
    /// on and answers the next request. Without the limit hyper would hold the stream and its body forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_whose_window_is_withheld_is_reset_and_the_connection_goes_on() {
        let limits = Limits {
            write_stall: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop, server, _) = server(limits).await;
        let before = streams_stalled();
        let (mut send, conn) = client(addr, 65_535).await;
        let mut big = get(&mut send, "/big").await;
        // read what the window lets through, release nothing
        let mut got = 0;
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match big.data().await {
                    Some(Ok(d)) => got += d.len(),
                    Some(Err(e)) => break Some(e),
                    None => break None,
                }
            }
        })
        .await
        .expect("the server kept the stream");
        let e = end.expect("the stream was reset, not ended");
        assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
        assert_eq!(got, 65_535, "the window's worth came, no more");
        // (a process-wide count: nextest runs each test in a process of its own)
        assert_eq!(streams_stalled() - before, 1);
        let mut small = get(&mut send, "/small").await;
        assert_eq!(read_all(&mut small, Duration::ZERO).await.unwrap(), 5);
        drop((send, big, small));
        conn.await.unwrap().unwrap();
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A slow client that keeps taking its stream (a frame every 5 ms against a 300 ms limit, the body's first half
    /// over four limits) is never cut: the limit counts from the last piece taken, not from the start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_client_that_keeps_taking_its_stream_is_not_cut() {
        let (addr, stop, server, _) = server(limits(300)).await;
        let before = streams_stalled();
        let (mut send, conn) = client(addr, 65_535).await;
        let mut big = get(&mut send, "/big").await;
        // 8 MiB in 16 KiB frames at 5 ms each would be 2.6 s: read the first 4 MiB slowly (over four limits), then
        // the rest at once; what is read is released 32 KiB at a time, as a player's buffer drains (releasing each
        // frame's bytes at once collapses the window into one-byte frames, which the limit does cut)
        let (mut n, mut unreleased) = (0, 0);
        let started = Instant::now();
        while let Some(data) = big.data().await {
            let data = data.expect("a slow client's stream was cut");
            n += data.len();
            unreleased += data.len();
            if n < 4 << 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if unreleased >= 32 << 10 || n >= 4 << 20 {
                big.flow_control().release_capacity(unreleased).unwrap();
                unreleased = 0;
            }
        }
        assert_eq!(n, 8 << 20);
        assert!(
            started.elapsed() > Duration::from_millis(900),
            "slower than the limit, several times"
        );
        assert_eq!(streams_stalled(), before);
        drop((send, big));
        conn.await.unwrap().unwrap();
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A connection with no stream for the idle limit is closed gracefully (GOAWAY, then the client's connection
    /// ends without error); a stream whose answer waits longer than that limit keeps it open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_connection_is_closed_and_a_waiting_stream_is_not_idle() {
        let (addr, stop, server, _) = server(limits(300)).await;
        let (mut send, conn) = client(addr, 65_535).await;
        let mut waited = get(&mut send, "/wait").await;
        assert_eq!(read_all(&mut waited, Duration::ZERO).await.unwrap(), 6);
        let answered = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the idle connection was kept")
            .unwrap()
            .expect("a graceful close");
        // (the server's stream ended a little before the client had read its answer)
        let idle = answered.elapsed();
        assert!(
            idle >= Duration::from_millis(200),
            "closed before the idle limit: {idle:?}"
        );
        drop((send, waited));
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A connection that stays idle after its GOAWAY (a peer that answers nothing: no settings or ping
    /// acknowledgement) is dropped a write stall limit later and counted as a stalled connection, well before
    /// the keep-alive (a minute here) would notice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_connection_that_does_not_close_after_its_goaway_is_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = Limits {
            h2_keepalive: Duration::from_secs(60),
            ..limits(300)
        };
        let (addr, stop, server, _) = server(limits).await;
        let before = connections_stalled();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // the preface and an empty SETTINGS frame; then nothing, and nothing acknowledged
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut frames = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut frames))
            .await
            .expect("the connection was kept");
        // the server's GOAWAY (frame type 7) came before the close
        assert!(frames.windows(4).any(|w| w == [0, 0, 8, 7]), "{frames:?}");
        assert_eq!(connections_stalled() - before, 1);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// The last piece of an answer is timed too: a client whose window is one byte (and stays so) gets the first
    /// byte of `/small`, and the stream is then reset, not left finished with its last bytes in h2's buffer
    /// (hyper ends a stream's task once its last piece is handed over).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_piece_of_an_answer_is_timed_too() {
        let limits = Limits {
            write_stall: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop, server, _) = server(limits).await;
        let before = streams_stalled();
        let (mut send, conn) = client(addr, 1).await;
        let mut small = get(&mut send, "/small").await;
        let first = small.data().await.unwrap().unwrap();
        assert_eq!(&first[..], b"s");
        let end = tokio::time::timeout(Duration::from_secs(20), small.data())
            .await
            .expect("the server kept the stream");
        let e = end.expect("reset, not ended").expect_err("no more data");
        assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
        assert_eq!(streams_stalled() - before, 1);
        drop((send, small));
        conn.await.unwrap().unwrap();
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// The server's stop closes an HTTP/2 connection gracefully: the stream in progress is answered, the client
    /// sees the GOAWAY and ends its connection, and the server returns without waiting out its drain limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_lets_the_stream_in_progress_finish_and_closes_the_connection() {
        let (addr, stop, server, hooks) = server(Limits::default()).await;
        let (mut send, conn) = client(addr, 65_535).await;
        let req = Request::get("http://x/wait").body(()).unwrap();
        let (answer, _) = send.send_request(req, true).unwrap();
        hooks.waiting.notified().await; // the stream is in progress
        let stopped = Instant::now();
        let _ = stop.send(());
        let answer = answer.await.unwrap();
        assert_eq!(answer.status(), 200);
        let mut body = answer.into_body();
        assert_eq!(read_all(&mut body, Duration::ZERO).await.unwrap(), 6);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server waited out its drain limit (10 s)")
            .unwrap()
            .unwrap();
        assert!(stopped.elapsed() < Duration::from_secs(5));
        // the client still holds its side: the connection ended because the server closed it
        conn.await.unwrap().expect("a graceful close");
        drop(send);
    }

    /// A body produced as it goes cannot know its end when its latest piece is handed over: that piece goes
    /// whole, and when the body then ends the stream's task waits, timed, until h2 has written it out. A client whose
    /// window is one byte gets the first byte and then a reset, instead of a finished stream whose bytes sit in
    /// h2's buffer; with an open window the same body arrives whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_answer_s_last_piece_is_timed_after_its_end() {
        let limits = Limits {
            write_stall: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop, server, hooks) = server(limits).await;
        let before = streams_stalled();
        for window in [65_535, 1] {
            let (mut send, conn) = client(addr, window).await;
            let mut body = get(&mut send, "/stream").await;
            let tx = hooks
                .senders
                .lock()
                .unwrap()
                .pop()
                .expect("the answer's sender");
            tx.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
            if window == 1 {
                let first = body.data().await.unwrap().unwrap();
                assert_eq!(first.len(), 1);
                drop(tx); // the end, while 999 bytes wait for the window
                let end = tokio::time::timeout(Duration::from_secs(5), body.data())
                    .await
                    .expect("the server kept the stream");
                let e = end.expect("reset, not ended").expect_err("no more data");
                assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
            } else {
                tx.send(Bytes::from(vec![b'y'; 1000])).await.unwrap();
                drop(tx);
                assert_eq!(read_all(&mut body, Duration::ZERO).await.unwrap(), 2000);
            }
            drop((send, body));
            conn.await.unwrap().unwrap();
        }
        assert_eq!(streams_stalled() - before, 1);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A body that gives the frames and `Pending`s it is told to, in order, then ends.
    struct Script(std::collections::VecDeque<Poll<Frame<Bytes>>>);

    impl Body for Script {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.pop_front() {
                Some(p) => p.map(|f| Some(Ok(f))),
                None => Poll::Ready(None),
            }
        }
    }

    fn stall_body(script: Vec<Poll<Frame<Bytes>>>) -> Pin<Box<StallBody<Script>>> {
        Box::pin(StallBody {
            inner: Script(script.into()),
            rest: Bytes::new(),
            next: None,
            done: false,
            unsent: None,
            draining: false,
            progress: Some(Arc::new(Progress::default())),
        })
    }

    fn data(b: &'static [u8]) -> Poll<Frame<Bytes>> {
        Poll::Ready(Frame::data(Bytes::from_static(b)))
    }

    fn next_piece(body: &mut Pin<Box<StallBody<Script>>>) -> Bytes {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => f.into_data().expect("a data frame"),
            other => panic!("{:?}", other.map(|o| o.map(|r| r.map(|f| f.is_data())))),
        }
    }

    /// A body known to end with a frame sends that frame's last byte as a piece of its own (also past an empty
    /// frame); one whose end is not known when its piece goes sends it whole, and at its end (or before its
    /// trailers) waits, timed, until that piece has been dropped.
    #[test]
    fn the_end_of_a_body_is_a_piece_that_waits_for_room() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for script in [vec![data(b"abc")], vec![data(b"abc"), data(b"")]] {
            let mut body = stall_body(script);
            assert_eq!(&next_piece(&mut body)[..], b"ab");
            assert!(!body.is_end_stream());
            assert_eq!(&next_piece(&mut body)[..], b"c");
            assert!(body.is_end_stream());
        }
        let trailers = Poll::Ready(Frame::trailers(axum::http::HeaderMap::new()));
        for script in [
            // (the first `Pending` is the look-ahead's, the second the body's own wait)
            vec![data(b"abc"), Poll::Pending, Poll::Pending],
            vec![data(b"abc"), Poll::Pending, Poll::Pending, trailers],
        ] {
            let mut body = stall_body(script);
            let piece = next_piece(&mut body);
            assert_eq!(&piece[..], b"abc", "the end was not known: whole");
            assert!(!body.is_end_stream());
            assert!(body.as_mut().poll_frame(&mut cx).is_pending()); // the body's own wait
            assert!(body.progress.as_ref().unwrap().outstanding().is_none());
            // the end (or the trailers) came: the piece is still with h2
            assert!(body.as_mut().poll_frame(&mut cx).is_pending());
            assert!(
                body.progress.as_ref().unwrap().outstanding().is_some(),
                "timed"
            );
            drop(piece);
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(None) => {}
                Poll::Ready(Some(Ok(f))) => assert!(f.is_trailers()),
                _ => panic!("not the end"),
            }
        }
    }
}
