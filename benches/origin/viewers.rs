//! The fan-out's viewers: `n` HTTP/1.1 connections driven from one thread (mio: non-blocking sockets, one
//! epoll), each with one request at a time, kept open from one round to the next as a player keeps its
//! connection. As light as a client can be: on a two-core host the client's work runs on the CPUs the server
//! needs, and real viewers are on other hosts. (reqwest, used before, spent more per answer than the server did:
//! benches/README.md, "Fan-out with a light client".)

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// The viewers' connections, and how many answers the round in progress has had so far.
pub struct Viewers {
    addr: SocketAddr,
    poll: Poll,
    conns: Vec<Conn>,
    pub answered: Arc<AtomicUsize>,
    /// How many requests the server says are parked (the caller keeps it current from the server's own count,
    /// and sets it to `usize::MAX` once it stops looking): new connections are opened while fewer than
    /// [`IN_FLIGHT`] requests are sent and neither parked nor finished, so the server's accept queue never
    /// overflows (a burst of 10,000 connects did: dropped handshakes are retried a second or more later, past
    /// the publish).
    pub parked: Arc<AtomicUsize>,
}

/// Requests sent and not yet parked at most, while connections are opened (below the smallest accept queue here:
/// the write-loop floor's, std's 128).
const IN_FLIGHT: usize = 128;

struct Conn {
    /// `None` once the server closed it (a new one is opened at the next round).
    tcp: Option<TcpStream>,
    /// Connected (a new socket is once its first writable event says so).
    connected: bool,
    /// What is left to send of this round's request.
    unsent: Vec<u8>,
    /// The answer read so far.
    buf: Vec<u8>,
    /// This round's outcome: its status and when its last byte came; `Err` when the connection failed.
    outcome: Option<std::result::Result<(u16, Instant), String>>,
}

impl Viewers {
    /// `n` viewers of the server at `addr` (no connection is opened before the first round).
    pub fn new(addr: SocketAddr, n: usize) -> Result<Self> {
        Ok(Viewers {
            addr,
            poll: Poll::new()?,
            conns: (0..n)
                .map(|_| Conn {
                    tcp: None,
                    connected: false,
                    unsent: Vec::new(),
                    buf: Vec::new(),
                    outcome: None,
                })
                .collect(),
            answered: Arc::new(AtomicUsize::new(0)),
            parked: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Every viewer sends `GET path` (on its open connection, or a new one) and waits for the whole answer;
    /// returns each one's status and the instant its answer ended, or why it failed. Gives up on what is
    /// unanswered after `limit`.
    pub fn round(
        &mut self,
        path: &str,
        limit: Duration,
    ) -> Result<Vec<std::result::Result<(u16, Instant), String>>> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n", self.addr).into_bytes();
        self.reset_counts();
        // the viewers that need a new connection, opened at the server's pace
        let mut to_open = Vec::new();
        let mut sent = 0;
        for (i, c) in self.conns.iter_mut().enumerate() {
            c.outcome = None;
            c.buf.clear();
            c.unsent.clone_from(&request);
            // a connection the server closed while it was idle (its keep-alive timeout) is opened again
            if let Some(tcp) = &mut c.tcp {
                let mut probe = [0u8; 1];
                if !matches!(tcp.read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock) {
                    let _ = self.poll.registry().deregister(tcp);
                    c.tcp = None;
                }
            }
            if c.tcp.is_none() {
                to_open.push(i);
            } else if c.connected {
                c.send(&self.poll);
                sent += 1;
            }
        }
        to_open.reverse();
        let deadline = Instant::now() + limit;
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; 64 * 1024];
        let mut left = self.conns.iter().filter(|c| c.outcome.is_none()).count();
        while left > 0 {
            // requests sent that are neither parked nor finished: at most IN_FLIGHT
            let finished = self.conns.len() - left;
            let allowed = self
                .parked
                .load(Ordering::SeqCst)
                .saturating_add(finished)
                .saturating_add(IN_FLIGHT);
            while !to_open.is_empty() && sent < allowed {
                let i = to_open.pop().expect("not empty");
                let mut tcp = TcpStream::connect(self.addr)?;
                self.poll.registry().register(
                    &mut tcp,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                let c = &mut self.conns[i];
                c.tcp = Some(tcp);
                c.connected = false;
                sent += 1;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // while connections wait to be opened, look again soon: the parked count moves without an event here
            let wait = if to_open.is_empty() {
                deadline - now
            } else {
                (deadline - now).min(Duration::from_millis(2))
            };
            self.poll.poll(&mut events, Some(wait))?;
            for ev in events.iter() {
                let c = &mut self.conns[ev.token().0];
                if c.outcome.is_some() {
                    continue;
                }
                if !c.connected && c.tcp.is_some() && (ev.is_writable() || ev.is_error()) {
                    let tcp = c.tcp.as_ref().expect("checked");
                    // a refused or failed connect is the socket's error (its address then reads as not connected)
                    match tcp.take_error() {
                        Ok(Some(e)) | Err(e) => c.fail(&self.poll, format!("connect: {e}")),
                        Ok(None) => match tcp.peer_addr() {
                            Ok(_) => c.connected = true,
                            Err(e) if e.kind() == ErrorKind::NotConnected => continue,
                            Err(e) => c.fail(&self.poll, format!("connect: {e}")),
                        },
                    }
                }
                if c.connected && !c.unsent.is_empty() {
                    c.send(&self.poll);
                }
                if ev.is_readable() || ev.is_read_closed() {
                    c.receive(&mut scratch, &self.poll);
                }
                if c.outcome.is_some() {
                    left -= 1;
                    if matches!(c.outcome, Some(Ok(_))) {
                        self.answered.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
        let poll = &self.poll;
        Ok(self
            .conns
            .iter_mut()
            .map(|c| {
                if c.outcome.is_none() {
                    // its request may still be answered: closed, so that answer is not taken for the next round's
                    c.fail(poll, "no answer in time".into());
                }
                c.outcome.take().expect("set")
            })
            .collect())
    }

    /// Zeroes the counts of a round (before it starts: a caller looking at them must not see the last round's).
    pub fn reset_counts(&self) {
        self.answered.store(0, Ordering::SeqCst);
        self.parked.store(0, Ordering::SeqCst);
    }
}

impl Conn {
    fn send(&mut self, poll: &Poll) {
        let Some(tcp) = &mut self.tcp else { return };
        match tcp.write(&self.unsent) {
            Ok(n) => {
                self.unsent.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => self.fail(poll, format!("write: {e}")),
        }
    }

    /// Reads what the socket holds; the outcome is set once the answer is whole or the connection ends.
    fn receive(&mut self, scratch: &mut [u8], poll: &Poll) {
        loop {
            let Some(tcp) = &mut self.tcp else { return };
            match tcp.read(scratch) {
                Ok(0) => {
                    // closed: after a whole answer (a server may close once it has written it), or before
                    let whole = whole_answer(&self.buf);
                    self.fail(poll, "closed before the answer was whole".into());
                    if let Some(status) = whole {
                        self.outcome = Some(Ok((status, Instant::now())));
                        self.buf = Vec::new();
                    }
                    return;
                }
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return self.fail(poll, format!("read: {e}")),
            }
        }
        if let Some(status) = whole_answer(&self.buf) {
            self.outcome = Some(Ok((status, Instant::now())));
            self.buf = Vec::new();
        }
    }

    /// Ends the round for this viewer with `why`; its connection is closed (a new one opens next round).
    fn fail(&mut self, poll: &Poll, why: String) {
        if let Some(mut tcp) = self.tcp.take() {
            let _ = poll.registry().deregister(&mut tcp);
        }
        self.connected = false;
        self.outcome = Some(Err(why));
    }
}

/// The status of the answer in `buf` once it is whole: its head, and as many body bytes as its
/// `Content-Length` says (or a chunked body's last chunk; no body without either).
fn whole_answer(buf: &[u8]) -> Option<u16> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    if chunked {
        return buf.ends_with(b"0\r\n\r\n").then_some(status);
    }
    (buf.len() >= end + len).then_some(status)
}

/// A round's viewers and their outcomes.
pub type Round = (Viewers, Vec<std::result::Result<(u16, Instant), String>>);

/// Starts [`Viewers::round`] on a blocking thread (its counts zeroed now, before the caller looks at them); the
/// viewers come back with the outcomes.
pub fn round_off_runtime(
    mut viewers: Viewers,
    path: String,
    limit: Duration,
) -> tokio::task::JoinHandle<Result<Round>> {
    viewers.reset_counts();
    tokio::task::spawn_blocking(move || {
        let out = viewers.round(&path, limit);
        out.map(|o| (viewers, o))
    })
}
