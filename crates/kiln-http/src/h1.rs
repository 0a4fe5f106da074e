//! kiln's own HTTP/1.1 connection for the requests a service answers from their head alone (kilnd: playback
//! GETs), on plain TCP. Everything else on such a connection goes to hyper: the first request this does not
//! answer (another method, a body, HTTP/1.0, an upgrade, a malformed or oversized head, a path the service does
//! not take) is handed over with the bytes already read, and hyper serves the rest of the connection.
//!
//! Why not hyper for these too (ARCHITECTURE.md, "Playback on kiln's own HTTP/1.1"): hyper keeps an 8 KiB read
//! buffer and an 8 KiB write buffer per connection for the connection's life, with no setting below, so every
//! idle keep-alive connection of a player, and every parked blocking request on one, holds 16 KiB it does not
//! use; and its per-request dispatch is most of kilnd's own work per playback answer. This reads a request head
//! into a buffer that is freed once the head is parsed (a parked request holds nothing of it), parses it with
//! httparse (hyper's parser), and writes the answer's head and body in one `writev`.
//!
//! What it keeps of HTTP/1.1 for these requests: keep-alive (closed after a response when the request says
//! `Connection: close`, or the server is stopping), pipelining (requests are answered in order), the header
//! timeout (a whole head within [`crate::server::Limits::header_timeout`] of starting to wait for it, which is
//! also the keep-alive idle time), `Date` and `Content-Length` (or chunked encoding for a body of unknown length,
//! streamed as it comes: an LL-DASH segment in progress), no body for 204 and 304.

use std::convert::Infallible;
use std::future::Future;
use std::io::IoSlice;
use std::time::{Duration, Instant, SystemTime};

use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use bytes::{Buf, Bytes};
use http_body_util::BodyExt as _;
use hyper::body::Body;
use tokio::io::AsyncWrite as _;

use crate::stall::Stall;
use tokio::net::TcpStream;

use crate::lend::Lend;

/// A service's answers to requests it takes from their head alone, without hyper.
pub trait Direct: Send + Sync + 'static {
    /// The answers' body.
    type Body: Body<Data = Bytes> + Send + Unpin + 'static;
    /// An answer; it cannot fail (an error is an answer).
    type Future: Future<Output = Result<Reply<Self::Body>, Infallible>> + Send + 'static;
    /// Whether this service answers anything directly; `false`: every connection goes to hyper at once.
    const ENABLED: bool = true;
    /// The answer to a GET of `uri` whose `headers` are those of [`DIRECT_HEADERS`] the request had, or `None`
    /// (hyper and the service's router take the request and the rest of its connection).
    ///
    /// `lend` is the request's socket, which an answer that waits may lend to whatever produces it
    /// ([`crate::lend`]).
    fn direct(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        lend: Lend<'_>,
    ) -> Option<Self::Future>;
}

/// No direct answers: every connection is hyper's.
#[derive(Debug, Clone, Copy)]
pub struct NoDirect;

impl Direct for NoDirect {
    type Body = axum::body::Body;
    type Future = std::future::Ready<Result<Reply<axum::body::Body>, Infallible>>;
    const ENABLED: bool = false;

    fn direct(&self, _: &Method, _: &Uri, _: &HeaderMap, _: Lend<'_>) -> Option<Self::Future> {
        None
    }
}

/// A direct answer: a response, or one whose head was prepared before the request came.
#[derive(Debug)]
pub enum Reply<B> {
    Response(Response<B>),
    Prepared(Prepared),
    /// An answer written on the request's lent socket ([`crate::lend`]); the connection writes what is left of
    /// it.
    Written(crate::lend::Written),
}

impl<B> From<Response<B>> for Reply<B> {
    fn from(r: Response<B>) -> Self {
        Reply::Response(r)
    }
}

impl<B> From<Prepared> for Reply<B> {
    fn from(p: Prepared) -> Self {
        Reply::Prepared(p)
    }
}

impl<B: From<Bytes>> Reply<B> {
    /// The answer as a response (for a layer, or hyper).
    pub fn into_response(self) -> Response<B> {
        match self {
            Reply::Response(r) => r,
            Reply::Prepared(p) => p.into_response(),
            // only a request on kiln's HTTP/1.1 lends its socket, and its answer is not made a response
            Reply::Written(_) => {
                debug_assert!(false, "an answer written on a lent socket made a response");
                let mut r = Response::new(B::from(Bytes::new()));
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                r
            }
        }
    }
}

/// Header line pieces a [`Prepared`] answer holds at most (besides its one shared piece).
pub const PREPARED_PIECES: usize = 4;

/// A `200 OK` whose header lines were made before the request came: static pieces (a content type, a lifetime,
/// CORS) and at most one shared piece made once per resource (an `ETag`). Answering it builds, encodes and drops
/// no header map and allocates nothing: it is written as the status line, its pieces, `Date` and
/// `Content-Length` (the body's), then the body, in one `writev`. [`Prepared::into_response`] is the same answer
/// for paths that need a response (hyper, the router, a layer).
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// Each empty or whole header lines (`name: value\r\n`, names in lowercase); the empty ones after the rest.
    pieces: [&'static [u8]; PREPARED_PIECES],
    shared: Bytes,
    body: Bytes,
}

impl Prepared {
    /// A `200 OK` with `body` and no header lines yet.
    pub fn new(body: Bytes) -> Self {
        Prepared {
            body,
            ..Prepared::default()
        }
    }

    /// Adds `lines` (whole header lines) after those it has.
    ///
    /// # Panics
    /// When it has [`PREPARED_PIECES`] pieces already (a programming error: the pieces are fixed by the code that
    /// prepares an answer).
    pub fn with(mut self, lines: &'static [u8]) -> Self {
        debug_assert!(well_formed(lines), "{lines:?}");
        let free = self.pieces.iter().position(|p| p.is_empty());
        self.pieces[free.expect("room for the piece")] = lines;
        self
    }

    /// Sets its shared piece: whole header lines made once for the resource (written after the static pieces).
    pub fn with_shared(mut self, lines: Bytes) -> Self {
        debug_assert!(well_formed(&lines), "{lines:?}");
        self.shared = lines;
        self
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Its header lines, in the order they are written (before `Date` and `Content-Length`).
    fn lines(&self) -> impl Iterator<Item = &[u8]> {
        let statics = self.pieces.iter().copied().take_while(|p| !p.is_empty());
        statics.chain(std::iter::once(&self.shared[..]).filter(|s| !s.is_empty()))
    }

    /// The same answer as a response: its lines in the header map (`Date` and `Content-Length` are the
    /// server's to add, as for any response).
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut headers = HeaderMap::with_capacity(8);
        for piece in self.lines() {
            for line in piece.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|b| *b == b':').expect("a header line");
                let name = HeaderName::from_bytes(&line[..colon]).expect("a header name");
                let value =
                    HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).expect("a value");
                headers.append(name, value);
            }
        }
        let mut r = Response::new(B::from(self.body));
        *r.headers_mut() = headers;
        r
    }
}

/// Whether `lines` is whole header lines: each `name: value\r\n` with a token for a name.
fn well_formed(lines: &[u8]) -> bool {
    let Some(lines) = lines.strip_suffix(b"\r\n") else {
        return false;
    };
    lines.split(|b| *b == b'\n').all(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.iter().position(|b| *b == b':').is_some_and(|colon| {
            HeaderName::from_bytes(&line[..colon])
                .is_ok_and(|n| n.as_str().as_bytes() == &line[..colon])
                && HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).is_ok()
        })
    })
}

/// The request headers a direct answer may read (the origin: conditional and range requests, and gzip); the
/// others are not copied out of the head.
pub const DIRECT_HEADERS: [HeaderName; 3] = [
    header::ACCEPT_ENCODING,
    header::IF_NONE_MATCH,
    header::RANGE,
];

/// The longest request head read here; a longer one is hyper's to refuse (431).
pub const MAX_HEAD: usize = 16 * 1024;

/// Headers in a request head at most (hyper's own limit is 100; a head with more goes to hyper).
const MAX_HEADERS: usize = 64;

/// What the bytes read so far on a connection hold.
#[derive(Debug)]
pub(crate) enum Scan {
    /// A whole request head this may answer.
    Head(RequestHead),
    /// The start of one: more bytes are needed.
    Partial,
    /// A request for hyper (see the module's doc).
    Hyper,
}

/// The parts of a GET's head a direct answer reads.
#[derive(Debug)]
pub(crate) struct RequestHead {
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub uri: Uri,
    /// Only [`DIRECT_HEADERS`].
    pub headers: HeaderMap,
    /// `Connection: close`.
    pub close: bool,
}

/// Parses the request head at the start of `buf`.
pub(crate) fn scan(buf: &[u8]) -> Scan {
    // not initialised first: httparse writes the headers it finds (64 empty ones would be 2 KiB set per call)
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Scan::Partial,
        _ => return Scan::Hyper,
    };
    let (Some("GET"), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Scan::Hyper;
    };
    if !path.starts_with('/') {
        return Scan::Hyper;
    }
    let Ok(uri) = Uri::try_from(path) else {
        return Scan::Hyper;
    };
    let mut out = HeaderMap::new();
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return Scan::Hyper;
            }
        } else if ["transfer-encoding", "expect", "upgrade"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            return Scan::Hyper;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Scan::Hyper;
                }
            }
        } else if let Some(known) = DIRECT_HEADERS
            .iter()
            .find(|n| name.eq_ignore_ascii_case(n.as_str()))
        {
            let Ok(value) = HeaderValue::from_bytes(h.value) else {
                return Scan::Hyper;
            };
            out.append(known.clone(), value);
        }
    }
    Scan::Head(RequestHead {
        len,
        uri,
        headers: out,
        close,
    })
}

/// The response head for `parts`: status line, the answer's headers, `Date` unless it has one, the length
/// (`Content-Length: len`, or chunked when `len` is `None`) unless the status has no body, and `Connection:
/// close` when `close`.
pub(crate) fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    len: Option<u64>,
    close: bool,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(64 + headers.len() * 48);
    h.extend_from_slice(b"HTTP/1.1 ");
    h.extend_from_slice(status.as_str().as_bytes());
    h.push(b' ');
    h.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    h.extend_from_slice(b"\r\n");
    let mut date = false;
    for (name, value) in headers {
        // the framing is this function's to write
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        date |= name == header::DATE;
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    if !date {
        h.extend_from_slice(b"date: ");
        http_date(|d| h.extend_from_slice(d));
        h.extend_from_slice(b"\r\n");
    }
    if has_body(status) {
        match len {
            Some(n) => {
                h.extend_from_slice(b"content-length: ");
                h.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                h.extend_from_slice(b"\r\n");
            }
            None => h.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
    }
    if close {
        h.extend_from_slice(b"connection: close\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Calls `f` with the current time as an HTTP date (RFC 9110 §5.6.7), formatted once a second per thread. Within
/// a second the wall clock is not read: the date is kept until the monotonic instant its second ends, checked
/// against the time the current poll started ([`crate::server::poll_started`]: no clock read either).
fn http_date(f: impl FnOnce(&[u8])) {
    thread_local! {
        static DATE: std::cell::RefCell<(Option<Instant>, String)> =
            const { std::cell::RefCell::new((None, String::new())) };
    }
    let mono = crate::server::poll_started();
    DATE.with_borrow_mut(|(until, text)| {
        if until.is_none_or(|until| mono >= until) {
            let now = SystemTime::now();
            let into_second = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(Duration::ZERO, |d| {
                    Duration::from_nanos(d.subsec_nanos().into())
                });
            *until = Some(mono + (Duration::from_secs(1) - into_second));
            *text = httpdate::fmt_http_date(now);
        }
        f(text.as_bytes())
    });
}

/// Whether a response with `status` carries a body (RFC 9112 §6.3: not 1xx, 204, 304).
fn has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// A connection's socket as its answers are written, with the timer that gives up on a write that waits too long
/// ([`Stall`]). One pointer for the writers to pass down (their futures nest in the connection's).
pub(crate) struct Writer<'a> {
    pub(crate) tcp: &'a mut TcpStream,
    pub(crate) stall: Stall,
}

impl<'a> Writer<'a> {
    /// Gives up a write that waited `stall`.
    pub(crate) fn new(tcp: &'a mut TcpStream, stall: Duration) -> Self {
        Writer {
            tcp,
            stall: Stall::new(stall),
        }
    }
}

/// Writes `reply` on `w` ([`write_prepared_now`], or [`respond`]). Returns whether the connection must close
/// after it. Takes the reply by reference: the caller's future holds it across this one wait only, where its
/// place is shared with the answer's (an async fn's arguments keep their own slot).
pub(crate) async fn write_reply<B>(
    w: &mut Writer<'_>,
    reply: &mut Reply<B>,
    close: bool,
) -> std::io::Result<bool>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match reply {
        Reply::Prepared(p) => {
            let mut rest = write_prepared_now(w.tcp, p, close)?;
            if !rest.is_empty() {
                write_all(w, &mut Vec::new(), &mut rest).await?;
            }
            Ok(close)
        }
        Reply::Response(res) => respond(w, res, close).await,
        Reply::Written(written) => {
            let (rest, closes) = written.take_rest();
            let mut rest = rest?;
            if !rest.is_empty() {
                write_all(w, &mut Vec::new(), &mut rest).await?;
            }
            Ok(close || closes)
        }
    }
}

/// Writes a response on `w`: its head and, as the body yields them, its bytes, each batch in one `writev`.
/// Returns whether the connection must close after it (`close`, or the answer said so).
pub(crate) async fn respond<B>(
    w: &mut Writer<'_>,
    res: &mut Response<B>,
    close: bool,
) -> std::io::Result<bool>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let close = close
        || res
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let status = res.status();
    let len = res.body().size_hint().exact();
    // the head is written from its own buffer (as `Bytes` it would take a second allocation to share it)
    let mut head = encode_head(status, res.headers(), len, close);
    let mut out = Vec::new();
    if !has_body(status) {
        write_all(w, &mut head, &mut out).await?;
        return Ok(close);
    }
    let mut body = std::pin::Pin::new(res.body_mut());
    let chunked = len.is_none();
    while !body.is_end_stream() {
        let Some(frame) = body.as_mut().frame().await else {
            break;
        };
        let frame = frame.map_err(|e| std::io::Error::other(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not sent over HTTP/1.1 here
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.push(Bytes::from(format!("{:x}\r\n", data.len())));
            out.push(data);
            out.push(Bytes::from_static(b"\r\n"));
        } else {
            out.push(data);
        }
        if !body.is_end_stream() {
            // what there is goes out before waiting for more (a segment in progress, part by part)
            write_all(w, &mut head, &mut out).await?;
        }
    }
    if chunked {
        out.push(Bytes::from_static(b"0\r\n\r\n"));
    }
    write_all(w, &mut head, &mut out).await?;
    Ok(close)
}

/// The status line of every [`Prepared`] answer.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\n";

/// Writes what it can of a prepared answer on `tcp` now, without waiting: the status line, its header lines, then
/// `Date`, `Content-Length` and (when `close`) `Connection: close` from a buffer on the stack, then the body, in
/// one `writev` (a few if the socket takes only part). Returns what is left to write (nothing, allocated, for an
/// answer the socket took whole: the usual case), to write with `writev` as the socket takes it. Not async: nothing of it is part of the
/// connection's future.
pub(crate) fn write_prepared_now(
    tcp: &TcpStream,
    p: &Prepared,
    close: bool,
) -> std::io::Result<Vec<Bytes>> {
    write_prepared(|slices| tcp.try_write_vectored(slices), p, b"", close)
}

/// [`write_prepared_now`] through `write` (a non-blocking `writev`), with `extra` (whole header lines) after the
/// answer's static lines, as [`Prepared::with`] would put them.
pub(crate) fn write_prepared(
    mut write: impl FnMut(&[IoSlice<'_>]) -> std::io::Result<usize>,
    p: &Prepared,
    extra: &'static [u8],
    close: bool,
) -> std::io::Result<Vec<Bytes>> {
    let mut end = [0u8; 96];
    let end_len = prepared_end(&mut end, p.body.len(), close);
    let end = &end[..end_len];
    let statics = || p.pieces.iter().copied().take_while(|l| !l.is_empty());
    let all = || {
        std::iter::once(OK)
            .chain(statics())
            .chain([extra, &p.shared[..], end, &p.body[..]])
            .filter(|s| !s.is_empty())
    };
    let total: usize = all().map(<[u8]>::len).sum();
    let mut done = 0;
    while done < total {
        let mut slices = [IoSlice::new(&[]); PREPARED_PIECES + 5];
        let (mut skip, mut n) = (done, 0);
        for s in all() {
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            slices[n] = IoSlice::new(&s[skip..]);
            skip = 0;
            n += 1;
        }
        match write(&slices[..n]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => done += written,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if done == total {
        return Ok(Vec::new());
    }
    // the rest, as buffers that outlive this call: the static lines and the body shared, the rest copied
    let mut rest = Vec::new();
    let mut skip = done;
    let pieces = std::iter::once(Bytes::from_static(OK))
        .chain(
            p.pieces
                .iter()
                .take_while(|l| !l.is_empty())
                .map(|l| Bytes::from_static(l)),
        )
        .chain([
            Bytes::from_static(extra),
            p.shared.clone(),
            Bytes::copy_from_slice(end),
            p.body.clone(),
        ]);
    for piece in pieces.filter(|b| !b.is_empty()) {
        if skip >= piece.len() {
            skip -= piece.len();
            continue;
        }
        rest.push(piece.slice(skip..));
        skip = 0;
    }
    Ok(rest)
}

/// Writes the end of a prepared answer's head into `buf`: `Date`, `Content-Length: len`, `Connection: close`
/// when `close`, and the blank line. Returns its length.
fn prepared_end(buf: &mut [u8; 96], len: usize, close: bool) -> usize {
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(b"date: ");
    http_date(&mut put);
    put(b"\r\ncontent-length: ");
    put(itoa::Buffer::new().format(len).as_bytes());
    put(b"\r\n");
    if close {
        put(b"connection: close\r\n");
    }
    put(b"\r\n");
    at
}

/// Writes every byte of `head`, then of `bufs`, with `writev` (up to 16 buffers a call), then empties both; fails
/// with `TimedOut` when one waits the writer's stall limit.
async fn write_all(
    w: &mut Writer<'_>,
    head: &mut Vec<u8>,
    bufs: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    while !head.is_empty() || first < bufs.len() {
        // the slices are built in each poll, so they are not part of the connection's future
        let mut written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut n = 0;
            if !head.is_empty() {
                slices[0] = IoSlice::new(head);
                n = 1;
            }
            for b in bufs[first..].iter().take(slices.len() - n) {
                slices[n] = IoSlice::new(b);
                n += 1;
            }
            let polled = std::pin::Pin::new(&mut *w.tcp).poll_write_vectored(cx, &slices[..n]);
            w.stall.check(cx, polled)
        })
        .await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = written.min(head.len());
        if from_head == head.len() {
            *head = Vec::new(); // not kept while a streamed body is written
        } else {
            head.drain(..from_head);
        }
        written -= from_head;
        while written > 0 {
            let b = &mut bufs[first];
            if written >= b.len() {
                written -= b.len();
                first += 1;
            } else {
                b.advance(written);
                written = 0;
            }
        }
    }
    bufs.clear();
    Ok(())
}

pin_project_lite::pin_project! {
    /// A connection handed to hyper: the bytes already read from it first, then the socket.
    pub(crate) struct Rewind {
        prefix: Bytes,
        #[pin]
        io: TcpStream,
    }
}

impl Rewind {
    pub(crate) fn new(prefix: Vec<u8>, io: TcpStream) -> Self {
        Rewind {
            prefix: Bytes::from(prefix),
            io,
        }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // the read buffer it came from is freed, not kept for the connection's life
                *this.prefix = Bytes::new();
            }
            return std::task::Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> RequestHead {
        match scan(s.as_bytes()) {
            Scan::Head(h) => h,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn is_hyper(s: &[u8]) -> bool {
        matches!(scan(s), Scan::Hyper)
    }

    #[test]
    fn a_get_head_is_read_and_only_the_direct_headers_are_kept() {
        let s =
            "GET /live/a/v/index.m3u8?_HLS_msn=3 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\
                 accept-encoding: br\r\nIF-NONE-MATCH: \"e\"\r\nRange: bytes=0-1\r\nCookie: c\r\n\
                 Content-Length: 0\r\n\r\nGET /next";
        let h = head(s);
        assert_eq!(h.len, s.len() - "GET /next".len());
        assert_eq!(h.uri.path(), "/live/a/v/index.m3u8");
        assert_eq!(h.uri.query(), Some("_HLS_msn=3"));
        let enc: Vec<_> = h.headers.get_all(header::ACCEPT_ENCODING).iter().collect();
        assert_eq!(enc, ["gzip", "br"]);
        assert_eq!(h.headers[header::IF_NONE_MATCH], "\"e\"");
        assert_eq!(h.headers[header::RANGE], "bytes=0-1");
        assert_eq!(h.headers.len(), 4, "{:?}", h.headers);
        assert!(!h.close);
        assert!(head("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").close);
    }

    #[test]
    fn a_partial_head_waits_and_everything_else_is_hyper_s() {
        assert!(matches!(scan(b""), Scan::Partial));
        assert!(matches!(scan(b"GET /live/a"), Scan::Partial));
        assert!(matches!(
            scan(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Scan::Partial
        ));
        for s in [
            "PUT /v1/streams/a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            "HEAD /live/a/master.m3u8 HTTP/1.1\r\n\r\n",
            "GET /live/a/master.m3u8 HTTP/1.0\r\n\r\n",
            "GET http://x/live/a/master.m3u8 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(is_hyper(s.as_bytes()), "{s:?}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(is_hyper(many.as_bytes()), "too many headers");
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert!(
            is_hyper(long.as_bytes()),
            "an oversized head that never ends"
        );
    }

    fn head_of(p: &axum::http::response::Parts, len: Option<u64>, close: bool) -> Vec<u8> {
        encode_head(p.status, &p.headers, len, close)
    }

    fn parts(status: u16, headers: &[(&str, &str)]) -> axum::http::response::Parts {
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// A 3 MiB answer through a 4 KiB send buffer: `writev` takes part of the head, then parts of the body, and
    /// every byte arrives once and in order.
    #[tokio::test]
    async fn a_large_answer_is_written_whole_through_partial_writes() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap(); // the accepted socket inherits it
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut c, &mut all)
                .await
                .unwrap();
            all
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let body: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        // a head longer than the send buffer, so that it too is written in pieces
        let long = "v".repeat(48 * 1024);
        let mut res = Response::builder()
            .header("content-type", "video/mp4")
            .header("x-long", &long)
            .body(http_body_util::Full::new(Bytes::from(body.clone())))
            .unwrap();
        let mut w = Writer::new(&mut tcp, Duration::from_secs(30));
        let close = respond(&mut w, &mut res, true).await.unwrap();
        assert!(close);
        drop(tcp);
        let got = client.await.unwrap();
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let text = String::from_utf8_lossy(&got[..end]);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(&format!("x-long: {long}\r\n")), "{text}");
        assert!(text.contains("content-length: 3145728\r\n"), "{text}");
        assert_eq!(got.len() - end, body.len());
        assert!(got[end..] == body[..], "the body arrived altered");
    }

    /// The same through `respond_prepared`: a 3 MiB prepared answer through a 4 KiB send buffer.
    #[tokio::test]
    async fn a_large_prepared_answer_is_written_whole_through_partial_writes() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut c, &mut all)
                .await
                .unwrap();
            all
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let body: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let p = Prepared::new(Bytes::from(body.clone()))
            .with(b"content-type: video/mp4\r\n")
            .with_shared(Bytes::from_static(b"etag: \"x\"\r\n"));
        let mut reply = Reply::<http_body_util::Full<Bytes>>::Prepared(p);
        let mut w = Writer::new(&mut tcp, Duration::from_secs(30));
        assert!(write_reply(&mut w, &mut reply, true).await.unwrap());
        drop(tcp);
        let got = client.await.unwrap();
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let text = String::from_utf8_lossy(&got[..end]);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\netag: \"x\"\r\ndate: "),
            "{text}"
        );
        assert!(
            text.ends_with(" GMT\r\ncontent-length: 3145728\r\nconnection: close\r\n\r\n"),
            "{text}"
        );
        assert_eq!(got.len() - end, body.len());
        assert!(got[end..] == body[..], "the body arrived altered");
    }

    /// An answer the socket takes whole is written in one call and leaves nothing to wait for.
    #[tokio::test]
    async fn a_prepared_answer_the_socket_takes_whole_leaves_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (tcp, _) = accepted.unwrap();
        tcp.writable().await.unwrap();
        let p = Prepared::new(Bytes::from_static(b"#EXTM3U\n"))
            .with(b"content-type: application/vnd.apple.mpegurl\r\n");
        let rest = write_prepared_now(&tcp, &p, false).unwrap();
        assert_eq!((rest.len(), rest.capacity()), (0, 0));
        drop(tcp);
        let mut got = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut client.unwrap(), &mut got)
            .await
            .unwrap();
        assert!(
            got.starts_with(
                "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.apple.mpegurl\r\ndate: "
            ),
            "{got}"
        );
        assert!(
            got.ends_with("\r\ncontent-length: 8\r\n\r\n#EXTM3U\n"),
            "{got}"
        );
    }

    #[test]
    fn only_whole_header_lines_are_pieces() {
        for ok in [
            &b"a: b\r\n"[..],
            b"etag: \"x\"\r\nvary: accept-encoding\r\n",
        ] {
            assert!(well_formed(ok), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"a: b",
            b"a b\r\n",
            b"A: b\r\n",
            b"a: b\r\nc\r\n",
            b"a: \x01\r\n",
        ] {
            assert!(!well_formed(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_response_head_frames_the_body_itself() {
        let h = head_of(
            &parts(
                200,
                &[
                    ("content-type", "video/mp4"),
                    ("content-length", "9"),
                    ("connection", "x"),
                ],
            ),
            Some(4),
            false,
        );
        let h = String::from_utf8(h).unwrap();
        assert!(
            h.starts_with("HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\ndate: "),
            "{h}"
        );
        assert!(h.ends_with(" GMT\r\ncontent-length: 4\r\n\r\n"), "{h}");
        assert!(!h.contains("connection"), "{h}");
        let chunked = String::from_utf8(head_of(&parts(200, &[]), None, true)).unwrap();
        assert!(
            chunked.ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"),
            "{chunked}"
        );
        for status in [204, 304] {
            let h = String::from_utf8(head_of(
                &parts(status, &[("etag", "\"e\"")]),
                Some(0),
                false,
            ))
            .unwrap();
            assert!(
                !h.contains("content-length") && !h.contains("transfer-encoding"),
                "{h}"
            );
            assert!(h.contains("etag: \"e\"\r\n"), "{h}");
        }
        let dated = String::from_utf8(head_of(
            &parts(404, &[("date", "Thu, 01 Jan 1970 00:00:00 GMT")]),
            Some(0),
            false,
        ))
        .unwrap();
        assert_eq!(dated.matches("date: ").count(), 1, "{dated}");
        assert!(dated.starts_with("HTTP/1.1 404 Not Found\r\n"));
    }
}
