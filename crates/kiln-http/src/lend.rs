//! A parked request's socket, lent to whoever produces its answer.
//!
//! A request on kiln's own HTTP/1.1 ([`crate::h1`]) whose answer waits for an event (kilnd: a blocking playlist
//! reload waiting for a part) can lend its socket to that event's producer: the publish then writes the prepared
//! answer itself, from the thread it runs on, and wakes the request's connection only afterwards. Thousands of
//! requests parked for one part are answered by one loop over their sockets, with no task woken (and no future
//! polled) before each answer is on its way: that wake, not the `writev`, is what a task per request adds to the
//! time from publish to the last answer (benches/README.md, "Fan-out with a light client").
//!
//! The parts:
//! - [`Lend`]: what the connection offers a [`crate::h1::Direct`] service with each request (the socket, whether
//!   the answer closes the connection, header lines the service adds to every answer, such as CORS).
//! - [`Lent`]: the request's side, held by its answer's future: it learns that its answer was written (or that it
//!   should look again itself), and takes the socket back when it answers by itself, times out, or is dropped.
//! - [`Loan`]: the producer's side: writes a [`Prepared`] answer if the socket is still lent, or asks the request
//!   to look again.
//!
//! The producer writes on the connection's own descriptor, under the loan's lock, and only while the loan is
//! open: the connection keeps its socket in a [`Lender`], which closes every loan (under the same lock) before it
//! lets the socket go, whether it is dropped or hands the socket to hyper. So a producer can never write on a
//! descriptor that was closed (and maybe reused by another connection). This is the one `unsafe` block here
//! ([`write_lent`]); a duplicate descriptor (`dup`) per parked request would avoid it, but takes a second
//! descriptor per parked connection (10,000 parked connections then need 20,000: a limit of 20,000 refused the
//! last few hundred in the origin bench) and a `close` per answer. Writes are non-blocking; what the socket does
//! not take at once is handed to the connection, which writes it as it writes any answer. TLS and HTTP/2
//! connections lend nothing.

use std::io::{IoSlice, Write as _};
use std::os::fd::{AsRawFd as _, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::h1::{write_prepared, Prepared};

/// A connection's socket that its requests may lend: every loan is closed before the socket is closed or handed
/// on (see the module's doc).
#[derive(Debug)]
pub struct Lender {
    /// `None` only once handed on.
    tcp: Option<TcpStream>,
    /// The loan of the request in progress, if it lent the socket.
    lent: Option<Arc<Shared>>,
}

impl Lender {
    /// `tcp` must be non-blocking, as every socket tokio accepts is (one made with `TcpStream::from_std` is only
    /// if its caller made it so): a producer's write must never wait on a client.
    pub fn new(tcp: TcpStream) -> Self {
        Lender {
            tcp: Some(tcp),
            lent: None,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        self.tcp.as_ref().expect("a socket not handed on")
    }

    /// Not public: a caller could swap the socket out (and close it) while a loan is open.
    pub(crate) fn tcp_mut(&mut self) -> &mut TcpStream {
        self.tcp.as_mut().expect("a socket not handed on")
    }

    /// What the socket offers the answer of its next request; `close`: the answer closes the connection.
    pub fn lend(&mut self, close: bool) -> Lend<'_> {
        Lend {
            lender: self,
            close,
            lines: b"",
            stopping: None,
        }
    }

    /// Closes the loan, if one is open, and hands the socket on.
    pub fn into_tcp(mut self) -> TcpStream {
        self.close_loan();
        self.tcp.take().expect("a socket not handed on")
    }

    fn close_loan(&mut self) {
        if let Some(shared) = self.lent.take() {
            shared.state().fd = None;
        }
    }
}

impl Drop for Lender {
    fn drop(&mut self) {
        // before the socket (a field) is closed
        self.close_loan();
    }
}

/// What a request's connection offers its answer: its socket, to lend if the answer has to wait.
#[derive(Debug)]
pub struct Lend<'a> {
    lender: &'a mut Lender,
    close: bool,
    lines: &'static [u8],
    stopping: Option<&'a tokio::sync::watch::Receiver<bool>>,
}

impl<'a> Lend<'a> {
    /// Adds `lines` (whole header lines, as [`Prepared::with`] takes them) to the answer written on the loan:
    /// the lines the service adds to every prepared answer it gives.
    pub fn with_lines(mut self, lines: &'static [u8]) -> Self {
        self.lines = lines;
        self
    }

    /// The server's stop (`true` once it began): an answer a producer writes from then on says `Connection:
    /// close` (and the connection closes after it), as one the connection writes itself does. Without it only the
    /// `close` given to [`Lender::lend`] counts. Taken by reference: cloned only if the socket is lent.
    pub fn with_stopping(mut self, stopping: &'a tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// Lends the socket: [`Lent`] for the answer's future, [`Loan`] for the producer.
    pub fn lend(self) -> (Lent, Loan) {
        self.lender.close_loan(); // a previous request's (its answer has ended, and closed it already)
        let shared = Arc::new(Shared {
            close: self.close,
            stopping: self.stopping.cloned(),
            lines: self.lines,
            state: Mutex::new(State {
                fd: Some(self.lender.tcp().as_raw_fd()),
                outcome: Outcome::Waiting,
                waker: None,
            }),
        });
        self.lender.lent = Some(shared.clone());
        (Lent(shared.clone()), Loan(shared))
    }
}

/// An answer a producer wrote on a lent socket: what the socket did not take at once (the connection writes it),
/// and how the write went.
pub struct Written {
    rest: Vec<Bytes>,
    body_len: u64,
    error: Option<std::io::Error>,
    close: bool,
    /// For an answer the socket took the start of: called when it is dropped, i.e. once the connection has
    /// written the rest (or given up on it).
    finished: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Written")
            .field("rest", &self.rest.len())
            .field("body_len", &self.body_len)
            .field("error", &self.error)
            .field("close", &self.close)
            .finish_non_exhaustive()
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if let Some(f) = self.finished.take() {
            f();
        }
    }
}

/// What [`Loan::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// Nothing: the socket is no longer lent.
    Not,
    /// The whole answer: the socket took it.
    Whole,
    /// The start of it: the connection has the rest.
    Part,
    /// The write failed (the client is gone): the connection closes.
    Failed,
}

impl Written {
    /// The length of the answer's body.
    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// What is left for the connection (taken): the bytes to write, or the write's error; and whether it closes
    /// after.
    pub(crate) fn take_rest(&mut self) -> (std::io::Result<Vec<Bytes>>, bool) {
        match self.error.take() {
            Some(e) => (Err(e), self.close),
            None => (Ok(std::mem::take(&mut self.rest)), self.close),
        }
    }
}

/// How a lent request's wait ended, as its future sees it.
#[derive(Debug)]
pub enum Woken {
    /// Its answer was written (wholly or in part) by the producer.
    Written(Written),
    /// The producer has an answer for it that it does not write (not a prepared one): the request looks at the
    /// state itself. The socket stays lent.
    LookAgain,
}

struct Shared {
    close: bool,
    /// The server's stop ([`Lend::with_stopping`]).
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    lines: &'static [u8],
    state: Mutex<State>,
}

struct State {
    /// The connection's descriptor, while the socket is lent.
    fd: Option<RawFd>,
    outcome: Outcome,
    /// The request's connection, to wake once something happened.
    waker: Option<Waker>,
}

enum Outcome {
    Waiting,
    LookAgain,
    Written(Written),
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("close", &self.close)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // a panic while holding the lock leaves a consistent state (every field is set in one assignment)
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The request's side of a lent socket. Dropping it takes the socket back.
pub struct Lent(Arc<Shared>);

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lent")
    }
}

impl Lent {
    /// Another producer's side of the same loan (after [`Woken::LookAgain`], to wait again).
    pub fn loan(&self) -> Loan {
        Loan(self.0.clone())
    }

    /// Ready once the producer wrote the answer or asked the request to look again.
    pub fn poll_woken(&mut self, cx: &mut Context<'_>) -> Poll<Woken> {
        let mut s = self.0.state();
        match std::mem::replace(&mut s.outcome, Outcome::Waiting) {
            Outcome::Written(w) => Poll::Ready(Woken::Written(w)),
            Outcome::LookAgain => Poll::Ready(Woken::LookAgain),
            Outcome::Waiting => {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// [`Lent::poll_woken`] as a future.
    pub async fn woken(&mut self) -> Woken {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await
    }

    /// Takes the socket back: from now on no producer writes on it. Returns the answer a producer wrote before
    /// that, if one did (the request must then give that, not its own).
    pub fn withdraw(&mut self) -> Option<Written> {
        let outcome = {
            let mut s = self.0.state();
            s.waker = None;
            s.fd = None;
            std::mem::replace(&mut s.outcome, Outcome::Waiting)
        };
        match outcome {
            Outcome::Written(w) => Some(w),
            Outcome::Waiting | Outcome::LookAgain => None,
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// The producer's side of a lent socket.
#[derive(Clone)]
pub struct Loan(Arc<Shared>);

impl std::fmt::Debug for Loan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Loan")
    }
}

impl Loan {
    /// Whether the socket is still lent (the request has not taken it back).
    pub fn is_open(&self) -> bool {
        self.0.state().fd.is_some()
    }

    /// Writes `p` (with the lines the service adds, `Date` and `Content-Length`) on the socket, as much of it as
    /// the socket takes now, if it is still lent; the rest is the connection's to write, and `finished()` is
    /// called when it has (or has given up on it; never when this write failed). The request's connection is woken by `after` (see [`After`]). The
    /// answer closes the connection if the request's did, or if the server has begun to stop.
    pub fn write(
        &self,
        p: &Prepared,
        after: &mut After,
        finished: impl FnOnce() -> Box<dyn FnOnce() + Send>,
    ) -> Wrote {
        let mut s = self.0.state();
        let Some(fd) = s.fd.take() else {
            return Wrote::Not;
        };
        let close = self.0.close || (self.0.stopping.as_ref()).is_some_and(|s| *s.borrow());
        let (rest, error) =
            match write_prepared(|slices| write_lent(fd, slices, &s), p, self.0.lines, close) {
                Ok(rest) => (rest, None),
                Err(e) => (Vec::new(), Some(e)),
            };
        let failed = error.is_some();
        let whole = !failed && rest.is_empty();
        s.outcome = Outcome::Written(Written {
            rest,
            body_len: p.body().len() as u64,
            close: close || error.is_some(),
            error,
            // a failed write is no answer: nothing to observe
            finished: (!whole && !failed).then(finished),
        });
        after.wake.extend(s.waker.take());
        drop(s);
        if whole {
            Wrote::Whole
        } else if failed {
            Wrote::Failed
        } else {
            Wrote::Part
        }
    }

    /// Whether an answer written now would close the connection.
    #[cfg(test)]
    pub(crate) fn closes(&self) -> bool {
        self.0.close || (self.0.stopping.as_ref()).is_some_and(|s| *s.borrow())
    }

    /// Asks the request to look at the state itself (its answer is not a prepared one), if the socket is still
    /// lent; its connection is woken by `after`.
    pub fn look_again(&self, after: &mut After) {
        let mut s = self.0.state();
        if s.fd.is_some() {
            s.outcome = Outcome::LookAgain;
            after.wake.extend(s.waker.take());
        }
    }
}

/// What a producer leaves until it has written the answers it has to: waking their connections (which would
/// compete with those writes for the CPU). Done by [`After::finish`], or when dropped.
#[derive(Debug, Default)]
pub struct After {
    wake: Vec<Waker>,
}

impl After {
    /// Whether it has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.wake.is_empty()
    }

    /// Wakes the connections.
    pub fn finish(mut self) {
        self.run();
    }

    fn run(&mut self) {
        self.wake.drain(..).for_each(Waker::wake);
    }
}

impl Drop for After {
    fn drop(&mut self) {
        self.run();
    }
}

/// Writes `slices` on the lent descriptor `fd` (non-blocking: it is tokio's). `_held`: the loan's state, locked
/// by the caller, which proves the loan open while this runs.
#[allow(unsafe_code)]
fn write_lent(
    fd: RawFd,
    slices: &[IoSlice<'_>],
    _held: &MutexGuard<'_, State>,
) -> std::io::Result<usize> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `fd` is the descriptor of a socket a `Lender` owns, taken from the loan's state while the loan was
    // open, and the caller holds the lock of that state. A `Lender` closes its loans under this lock before its
    // socket is closed or handed on (its `Drop`, `into_tcp`), so the descriptor stays open, and this
    // connection's, for as long as this runs. `ManuallyDrop`: the stream borrows the descriptor, it never closes it.
    let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    (&*socket).write_vectored(slices)
}
