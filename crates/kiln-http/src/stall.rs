//! A write that waits too long fails: a client that stops reading (its TCP window at zero) cannot hold its
//! connection, and its place under the connection cap, forever. The timer runs only while a write waits, and
//! starts again from each write that goes through: time between writes (a parked request, an idle keep-alive
//! connection) never counts. nginx's `send_timeout` works the same way, and has the same limit: Linux wakes a
//! blocked writer only once about a third of the socket's send buffer is free again, so a client that reads, but
//! slower than that third per limit (with a 4 MiB buffer and 30 s, about 46 KB/s, too slow for any video
//! rendition), is cut too. It covers what blocks the socket: an HTTP/2 stream whose peer withholds flow-control
//! credit while it keeps reading never blocks a write; `crate::http2` times those.
//!
//! Callers retry a write that waited until it goes through or fails (hyper's connections and kiln's writer do):
//! the timer restarts only when one does, so a caller that abandoned a waiting write and later wrote something
//! else would inherit the old deadline.
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The timer of one connection's writes. Boxed and made on the first write that waits: most connections never
/// wait to write, and the timer is not part of every connection's future.
#[derive(Debug)]
pub(crate) struct Stall {
    /// The limit in milliseconds (it is in every connection's future while it writes: kept small).
    limit_ms: u32,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last write waited (the timer runs from its first wait).
    waiting: bool,
    /// The limit ran out: every write from then on fails (the connection is closing), counted once.
    cut: bool,
}

impl Stall {
    /// `limit` zero: no limit.
    pub(crate) fn new(limit: Duration) -> Self {
        Stall {
            limit_ms: u32::try_from(limit.as_millis()).unwrap_or(u32::MAX),
            timer: None,
            waiting: false,
            cut: false,
        }
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.limit_ms.into())
    }

    /// Passes a write's poll through, unless it has waited `limit` since the peer last took something: then
    /// `TimedOut`.
    pub(crate) fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if self.cut {
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        if polled.is_ready() || self.limit_ms == 0 {
            self.waiting = false;
            return polled;
        }
        let limit = self.limit();
        let timer = match &mut self.timer {
            Some(t) if self.waiting => t,
            t => {
                let at = tokio::time::Instant::now() + limit;
                let t = match t {
                    Some(t) => {
                        t.as_mut().reset(at);
                        t
                    }
                    None => t.insert(Box::pin(tokio::time::sleep_until(at))),
                };
                self.waiting = true;
                t
            }
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err({
                self.cut = true;
                crate::server::note_stalled();
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client took nothing for {limit:?}"),
                )
            })),
            Poll::Pending => Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// An I/O whose writes (and flushes, and shutdown) fail after waiting [`Stall`]'s limit: the connections
    /// hyper serves (HTTP/2, TLS, HTTP/1.1 handed over) have no write timeout of their own.
    pub(crate) struct StallIo<T> {
        #[pin]
        io: T,
        stall: Stall,
    }
}

impl<T> StallIo<T> {
    pub(crate) fn new(io: T, limit: Duration) -> Self {
        StallIo {
            io,
            stall: Stall::new(limit),
        }
    }
}

impl<T: AsyncRead> AsyncRead for StallIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for StallIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        this.stall.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        this.stall.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        this.stall.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_shutdown(cx);
        this.stall.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A peer that reads nothing: the write fails once it has waited the limit, not before; a peer that reads
    /// slowly, each read within the limit, is never cut however long the whole takes; and time between writes
    /// does not count: after an idle hour, a write that waits gets its whole limit again.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_takes_nothing_of_fails_after_the_limit() {
        let limit = Duration::from_secs(30);
        let big = vec![7u8; 64 * 1024];
        let (a, _b) = tokio::io::duplex(1024);
        let mut a = StallIo::new(a, limit);
        let start = tokio::time::Instant::now();
        let e = tokio::time::timeout(2 * limit, a.write_all(&big))
            .await
            .expect("cut at the limit")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!((limit..limit + Duration::from_secs(1)).contains(&start.elapsed()));
        // a slow reader: 1 KiB every 20 s, 64 times (21 minutes), never 30 s without progress
        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = StallIo::new(a, limit);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while got.len() < 64 * 1024 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let n = b.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            (got, b)
        });
        a.write_all(&big).await.unwrap();
        let (got, mut b) = reader.await.unwrap();
        assert!(got == big);
        // the timer exists now (the writes waited); an idle hour, then a write the reader takes 29 s to read
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600 + 29)).await;
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while n < 2048 {
                n += b.read(&mut buf).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        a.write_all(&[1u8; 2048]).await.unwrap();
        reader.await.unwrap();
        // a limit of zero is no limit: a day without the reader taking anything, and the write still waits
        let (a, _b) = tokio::io::duplex(1024);
        let mut a = StallIo::new(a, Duration::ZERO);
        let day = Duration::from_secs(86_400);
        assert!(tokio::time::timeout(day, a.write_all(&big)).await.is_err());
    }
}
