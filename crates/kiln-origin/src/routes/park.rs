//! A playback answer, and the wait of a request that has to park for it.
//!
//! Most playback requests are answered at once: their answer is computed before the server polls anything, and
//! [`LiveAnswer::Now`] hands it over without an allocation. A request that has to wait (a blocking playlist
//! reload, a hinted part, a starting stream's documents) gets a boxed future holding only what its own wait
//! needs ([`Park`] and the few values its answer is made from), not the largest state of any route: its size is
//! paid for every parked request (benches/README.md, "Memory of a parked request"), and
//! `the_parked_futures_fit_a_512_byte_allocation` keeps it in jemalloc's 512 B class.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::Reply;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::ParkGuard;

/// What a playback route answers: now, or once the request's wait ends. A future that resolves at once in the
/// first case; polling it again after that panics.
pub struct LiveAnswer(Answer);

enum Answer {
    /// Computed when the request came (`None` once taken).
    Now(Option<Reply>),
    /// Computed when a publish (or the wait's deadline) comes.
    Later(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

impl std::fmt::Debug for LiveAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Answer::Now(_) => "LiveAnswer::Now",
            Answer::Later(_) => "LiveAnswer::Later",
        })
    }
}

impl LiveAnswer {
    pub(super) fn now(r: impl Into<Reply>) -> Self {
        LiveAnswer(Answer::Now(Some(r.into())))
    }

    pub(super) fn later(f: impl Future<Output = Reply> + Send + 'static) -> Self {
        LiveAnswer(Answer::Later(Box::pin(f)))
    }

    /// The size of the future a waiting request holds; `None` for an answer given at once.
    #[cfg(test)]
    pub(super) fn waiting_size(&self) -> Option<usize> {
        match &self.0 {
            Answer::Now(_) => None,
            Answer::Later(f) => Some(std::mem::size_of_val(&**f)),
        }
    }
}

impl Future for LiveAnswer {
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        match &mut self.get_mut().0 {
            Answer::Now(r) => {
                Poll::Ready(r.take().expect("a LiveAnswer polled after it was ready"))
            }
            Answer::Later(f) => f.as_mut().poll(cx),
        }
    }
}

/// A parked request's wait: the publishes it watches, the instant it gives up, and its place under the parking
/// limit (freed when the wait is dropped, answered or not).
pub(super) struct Park<T> {
    rx: watch::Receiver<T>,
    deadline: Instant,
    _place: ParkGuard,
}

/// How a wait for the next publish ended.
pub(super) enum Woken {
    /// Something was published (seen: the next wait waits for the one after).
    Published,
    /// The publisher is gone (the stream ended and was removed).
    Closed,
    /// The deadline passed first.
    TimedOut,
}

impl<T> Park<T> {
    /// A wait of at most `wait` from now on `rx`, whose current value the caller has already looked at.
    pub(super) fn new(rx: watch::Receiver<T>, place: ParkGuard, wait: Duration) -> Self {
        Park {
            rx,
            deadline: Instant::now() + wait,
            _place: place,
        }
    }

    /// Waits for the next publish.
    pub(super) async fn next(&mut self) -> Woken {
        match tokio::time::timeout_at(self.deadline, self.rx.changed()).await {
            Ok(Ok(())) => Woken::Published,
            Ok(Err(_)) => Woken::Closed,
            Err(_) => Woken::TimedOut,
        }
    }

    /// When it gives up.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The value published last.
    pub(super) fn current(&mut self) -> T
    where
        T: Clone,
    {
        self.rx.borrow_and_update().clone()
    }
}
