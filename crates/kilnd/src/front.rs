//! kilnd's HTTP service: playback GETs in their plain form go straight to the origin ([`kiln_origin::LiveGet`]),
//! everything else to the router. The two give the same answers: a direct answer goes through the same
//! compression layer as the router's (same predicate, so the same choice of encoding, `Vary` and 406), or, where
//! the request leaves the layer nothing to negotiate (no `Accept-Encoding`, or one it answers with gzip), gets
//! exactly what the layer would give ([`as_the_layer_would`]); and it gets the same CORS headers and request
//! metrics as the router's layers give. HEAD, OPTIONS and paths that are not
//! plain go to the router. `tests/live_skeleton.rs` compares the two paths' answers header by header.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
use axum::response::Response;
use axum::routing::future::RouteFuture;
use axum::Router;
use hyper::body::Incoming;
use kiln_http::h1::Reply;
use kiln_origin::{LiveAnswer, LiveGet, Origin};
use tower::Service as _;
use tower_http::compression::{Compression, ResponseFuture};

use crate::metrics::{request_kind_index, Metrics};

/// The service [`crate::serve_state`] serves. One pointer: every connection holds a clone, some of them in
/// several places of its future, so its size is paid per parked request.
#[derive(Clone)]
pub struct Front(Arc<Inner>);

struct Inner {
    router: Router,
    /// The origin behind the compression layer the router's answers get ([`crate::Compressible`]).
    direct: Compression<Direct, crate::Compressible>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").finish_non_exhaustive()
    }
}

impl Front {
    /// The daemon's router ([`crate::app`]) behind the direct path to its origin.
    pub fn of(state: crate::AppState) -> Self {
        let direct = tower::Layer::layer(
            &crate::compression(),
            Direct(Arc::new(state.origin.clone())),
        );
        Front(Arc::new(Inner {
            direct,
            metrics: state.metrics.clone(),
            router: crate::app(state),
        }))
    }
}

/// The origin answering a [`LiveGet`] (the request's body), as a service the compression layer wraps. The request
/// carries nothing else but its `Accept-Encoding`, and is dropped before the answer is computed.
#[derive(Clone)]
struct Direct(Arc<Origin>);

impl tower::Service<Request<LiveGet>> for Direct {
    type Response = Response;
    type Error = Infallible;
    type Future = Infallibly;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<LiveGet>) -> Infallibly {
        Infallibly(req.into_body().answer(&self.0))
    }
}

/// The origin's answer as a service's future, and as a response (what the compression layer takes): it cannot
/// fail. Computed in [`Direct::call`] unless the request has to wait; only then is there a (boxed) future to poll.
struct Infallibly(LiveAnswer);

impl Future for Infallibly {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|reply| Ok(reply.into_response()))
    }
}

/// The headers the playback CORS layer gives every answer (see [`counted`]), as the lines of a prepared one.
const CORS_LINES: &[u8] = b"access-control-allow-origin: *\r\naccess-control-expose-headers: *\r\n";

pin_project_lite::pin_project! {
    /// [`Front`]'s answer: the router's, or the origin's through the compression layer or as the layer would give
    /// it, counted like the router's.
    /// Held inline by the server (no box per request beyond the origin's own).
    #[project = AnswerProj]
    pub enum Answer {
        // boxed: the router's future holds a whole request, and every connection's slot for the answer in
        // progress (hyper keeps one per connection) would be that size for a parked direct answer too
        Routed { inner: Pin<Box<RouteFuture<Infallible>>> },
        Direct {
            #[pin]
            inner: ResponseFuture<Infallibly, crate::Compressible>,
            kind: usize,
            start: Instant,
            metrics: Arc<Metrics>,
        },
        // a request whose encoding needs no negotiation: none asked for, or gzip (see `as_the_layer_would`)
        Plain {
            #[pin]
            inner: LiveAnswer,
            gzip: bool,
            kind: usize,
            start: Instant,
            metrics: Arc<Metrics>,
        },
    }
}

/// What kilnd's compression layer makes of `res` when it has negotiated identity (the request had no
/// `Accept-Encoding`; `gzip` false) or gzip (`gzip` true), without its per-request work: an answer it may not
/// compress (media, an answer already encoded, such as a playlist gzipped once per publish, a range, a small
/// one) it passes through as it is; one it may, it marks `Vary: accept-encoding`, and gzips for `gzip` (the layer
/// itself does that: the origin prepares the gzipped form of what viewers ask for most, so this is rare).
/// `tests::the_answers_are_the_layer_s` compares the two (the body's size hint included).
fn as_the_layer_would(mut res: Response, gzip: bool) -> Response {
    let h = res.headers();
    let compressible = !h.contains_key(header::CONTENT_ENCODING)
        && !h.contains_key(header::CONTENT_RANGE)
        && tower_http::compression::predicate::Predicate::should_compress(
            &crate::Compressible,
            &res,
        );
    if !compressible {
        return res;
    }
    if gzip {
        use futures::FutureExt as _;
        use tower::ServiceExt as _;
        let mut res = Some(res);
        let answered = tower::service_fn(move |_: Request<()>| {
            std::future::ready(Ok::<_, Infallible>(res.take().expect("called once")))
        });
        let layer = tower::Layer::layer(&crate::compression(), answered);
        let mut req = Request::new(());
        req.headers_mut()
            .insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let Some(Ok(res)) = layer.oneshot(req).now_or_never() else {
            unreachable!("the layer answers a ready answer at once, and cannot fail")
        };
        return res.map(Body::new);
    }
    let marked = res.headers().get_all(header::VARY).iter().any(|v| {
        v.as_bytes()
            .windows(b"accept-encoding".len())
            .any(|w| w.eq_ignore_ascii_case(b"accept-encoding"))
    });
    if !marked {
        res.headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    res
}

/// The playback CORS layer's headers (any origin may read playback; with any origin allowed, tower-http's layer
/// sends no `Vary` of its own) and the request's metrics.
fn counted(mut res: Response, kind: usize, start: &Instant, metrics: &Metrics) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("*"),
    );
    let bytes = res.body().size_hint().exact();
    metrics
        .http
        .observe(kind, res.status(), bytes, start.elapsed());
    res
}

impl Future for Answer {
    type Output = Result<Reply<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AnswerProj::Routed { inner } => inner.as_mut().poll(cx).map_ok(Reply::Response),
            AnswerProj::Direct {
                inner,
                kind,
                start,
                metrics,
            } => {
                let Ok(res) = ready!(inner.poll(cx));
                let res = counted(res.map(Body::new), *kind, start, metrics);
                Poll::Ready(Ok(Reply::Response(res)))
            }
            AnswerProj::Plain {
                inner,
                gzip,
                kind,
                start,
                metrics,
            } => Poll::Ready(Ok(match ready!(inner.poll(cx)) {
                // the origin prepares an answer as it passes the compression layer (its encoding and `Vary` as
                // the layer gives them; `tests::prepared_answers_pass_the_layer_as_they_are`): only CORS and the
                // metrics are left to add
                Reply::Prepared(p) => {
                    let p = p.with(CORS_LINES);
                    let bytes = Some(p.body().len() as u64);
                    let status = axum::http::StatusCode::OK;
                    metrics.http.observe(*kind, status, bytes, start.elapsed());
                    Reply::Prepared(p)
                }
                Reply::Response(res) => {
                    let res = as_the_layer_would(res, *gzip);
                    Reply::Response(counted(res, *kind, start, metrics))
                }
                // a prepared answer written on the request's lent socket, with the CORS lines: only the metrics
                Reply::Written(w) => {
                    let bytes = Some(w.body_len());
                    let status = axum::http::StatusCode::OK;
                    metrics.http.observe(*kind, status, bytes, start.elapsed());
                    Reply::Written(w)
                }
            })),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Answer`] as hyper takes it: a response.
    pub struct ForHyper {
        #[pin]
        inner: Answer,
    }
}

impl Future for ForHyper {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_ok(Reply::into_response)
    }
}

impl hyper::service::Service<Request<Incoming>> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = ForHyper;

    fn call(&self, req: Request<Incoming>) -> ForHyper {
        let Some(live) = LiveGet::of(req.method(), req.uri(), req.headers()) else {
            let mut router = self.0.router.clone();
            let inner = Answer::Routed {
                inner: Box::pin(router.call(req.map(Body::new))),
            };
            return ForHyper { inner };
        };
        let (parts, _) = req.into_parts();
        ForHyper {
            inner: self.answer(live, &parts.headers, None),
        }
    }
}

/// The same answers on kiln's own HTTP/1.1 (`kiln_http::h1`: plain TCP, from the request head alone).
impl kiln_http::h1::Direct for Front {
    type Body = Body;
    type Future = Answer;

    fn direct(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        lend: kiln_http::lend::Lend<'_>,
    ) -> Option<Answer> {
        let live = LiveGet::of(method, uri, headers)?;
        self.0.metrics.own_http1_answers.inc();
        Some(self.answer(live, headers, Some(lend)))
    }
}

impl Front {
    /// The origin's answer to `live`, through the compression layer or as it would give it, counted like the
    /// router's. `lend`: the request's socket on kiln's HTTP/1.1, which the origin may lend to the publish that
    /// answers it (with the CORS lines every prepared answer gets here); only where the layer has nothing to
    /// negotiate.
    fn answer(
        &self,
        live: LiveGet,
        headers: &HeaderMap,
        lend: Option<kiln_http::lend::Lend<'_>>,
    ) -> Answer {
        let kind = request_kind_index(live.path(), live.query());
        self.0.metrics.direct_answers.inc();
        // taken before the call (the origin computes an answer it can give at once in the call itself): the
        // start of the connection's poll that read the request, which costs no clock read
        let start = kiln_http::server::poll_started();
        let asks = headers.contains_key(header::ACCEPT_ENCODING);
        if !asks || live.gzip() {
            // identity or gzip: no negotiation left for the layer (see `as_the_layer_would`)
            let gzip = asks;
            let lend = lend.map(|l| l.with_lines(CORS_LINES));
            return Answer::Plain {
                inner: live.answer_lending(&self.0.direct.get_ref().0, lend),
                gzip,
                kind,
                start,
                metrics: self.0.metrics.clone(),
            };
        }
        // what the compression layer reads, and nothing else of the request: its header map, and the read buffer
        // its values point into, are freed before the answer (which may wait) is computed
        let mut direct = Request::new(live);
        for v in headers.get_all(header::ACCEPT_ENCODING) {
            direct
                .headers_mut()
                .append(header::ACCEPT_ENCODING, v.clone());
        }
        Answer::Direct {
            inner: self.0.direct.clone().call(direct),
            kind,
            start,
            metrics: self.0.metrics.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tower::ServiceExt as _;

    /// The layer's answer to a request with `accept` for an inner answer `make()`, and `as_the_layer_would`'s
    /// for the same encoding: status, every header and the body's bytes.
    fn both(make: &dyn Fn() -> Response, accept: Option<&'static str>) -> [(String, Vec<u8>); 2] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let show = |res: Response| {
            let hint = res.body().size_hint();
            let head = format!(
                "{} {:?} size {:?} end {}",
                res.status(),
                res.headers(),
                (hint.lower(), hint.upper()),
                res.body().is_end_stream()
            );
            let body = rt
                .block_on(axum::body::to_bytes(res.into_body(), usize::MAX))
                .unwrap();
            (head, body.to_vec())
        };
        let mut inner = Some(make());
        let svc = tower::Layer::layer(
            &crate::compression(),
            tower::service_fn(move |_: Request| {
                std::future::ready(Ok::<_, Infallible>(inner.take().expect("called once")))
            }),
        );
        let mut req = Request::new(Body::empty());
        if let Some(a) = accept {
            req.headers_mut()
                .insert(header::ACCEPT_ENCODING, HeaderValue::from_static(a));
        }
        let layered = rt.block_on(svc.oneshot(req)).unwrap().map(Body::new);
        let plain = as_the_layer_would(make(), accept.is_some());
        [show(layered), show(plain)]
    }

    #[test]
    fn the_answers_are_the_layer_s() {
        let types = [
            "application/vnd.apple.mpegurl",
            "video/mp4",
            "video/mp4; codecs=avc1",
            "application/json",
        ];
        let extras = [
            None,
            Some((header::CONTENT_ENCODING, "gzip")),
            Some((header::CONTENT_RANGE, "bytes 0-99/4096")),
            Some((header::VARY, "Accept-Encoding")),
            Some((header::VARY, "origin")),
            Some((header::VARY, "origin, accept-encoding")),
        ];
        let mut compared = 0;
        for cty in types {
            // `None`: a streamed body of unknown length with a `Content-Length` of 4096
            for size in [Some(100usize), Some(255), Some(256), Some(4096), None] {
                for extra in &extras {
                    for status in [200u16, 206, 304, 404] {
                        let make = || {
                            let mut res = match size {
                                Some(n) => Response::new(Body::from(vec![b'#'; n])),
                                None => {
                                    let chunks = [Ok::<_, std::io::Error>(vec![b'#'; 4096])];
                                    let mut res = Response::new(Body::from_stream(
                                        futures::stream::iter(chunks),
                                    ));
                                    res.headers_mut()
                                        .insert(header::CONTENT_LENGTH, HeaderValue::from(4096));
                                    res
                                }
                            };
                            *res.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                            res.headers_mut()
                                .insert(header::CONTENT_TYPE, HeaderValue::from_static(cty));
                            if let Some((name, value)) = extra {
                                res.headers_mut()
                                    .insert(name.clone(), HeaderValue::from_static(value));
                            }
                            res
                        };
                        // the two encodings this path takes: none asked for (identity), and gzip
                        for accept in [None, Some("gzip")] {
                            let [layered, plain] = both(&make, accept);
                            assert_eq!(
                                plain, layered,
                                "{cty} {size:?} {extra:?} {status} {accept:?}"
                            );
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(compared, 4 * 5 * 6 * 4 * 2);
    }

    /// A published stream (a video and an audio rendition, two segments of six parts) and its origin.
    fn published_origin() -> Origin {
        use kiln_origin::store::{RenditionInfo, RenditionKind, StreamOrigin};
        let video = RenditionKind::Video {
            width: 64,
            height: 64,
            fps: 30.0,
        };
        let renditions =
            [("v", video), ("a", RenditionKind::Audio { channels: 2 })].map(|(name, kind)| {
                RenditionInfo {
                    name: name.into(),
                    kind,
                    bitrate: 100_000,
                }
            });
        let s = StreamOrigin::new(
            "s",
            renditions.to_vec(),
            kiln_llhls::PackagerConfig {
                segment_ns: 2_000_000_000,
                target_duration_s: 2,
                part_target_ms: 334,
                window_segments: 4,
                retain_segments: 2,
                wallclock_origin_unix_ms: 0,
                can_skip_until_s: Some(12),
                first_msn: 0,
            },
        );
        for r in 0..2 {
            s.on_init(
                r,
                bytes::Bytes::from_static(b"init"),
                Some("avc1.64001f".into()),
            );
            for i in 0..13u64 {
                let part = kiln_llhls::PartIn {
                    starts_segment: i % 6 == 0,
                    independent: i % 6 == 0,
                    start_ns: i * 333_333_333,
                    duration_ns: 333_333_333,
                    bytes: bytes::Bytes::from(vec![b'p'; 300 + i as usize]),
                    discontinuity: false,
                };
                s.on_part(r, part).unwrap();
            }
        }
        let o = Origin::new();
        o.insert(s);
        o
    }

    /// Every prepared answer the origin gives passes the compression layer as it is (the direct path adds only
    /// CORS to it): parts, segments, init segments, playlists (plain, blocking, delta, small and large,
    /// gzipped) and the multivariant playlist, asked with no `Accept-Encoding` and with gzip. (The MPD, made
    /// from real media only, is compared by `tests/live_skeleton.rs` on a real stream.)
    #[tokio::test]
    async fn prepared_answers_pass_the_layer_as_they_are() {
        let o = published_origin();
        let paths = [
            "/live/s/v/part-1-0.m4s",
            "/live/s/a/part-0-3.m4s",
            "/live/s/v/seg-0.m4s",
            "/live/s/a/init.mp4",
            "/live/s/v/index.m3u8",
            "/live/s/v/index.m3u8?_HLS_msn=2&_HLS_part=0",
            "/live/s/a/index.m3u8?_HLS_msn=1&_HLS_part=0&_HLS_skip=YES",
            "/live/s/master.m3u8",
        ];
        let mut prepared = 0;
        for path in paths {
            for gzip in [false, true] {
                let mut h = HeaderMap::new();
                if gzip {
                    h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
                }
                let live = LiveGet::of(&Method::GET, &path.parse().unwrap(), &h).unwrap();
                let mut answer = live.answer(&o);
                let waker = futures::task::noop_waker();
                let Poll::Ready(reply) =
                    Pin::new(&mut answer).poll(&mut Context::from_waker(&waker))
                else {
                    panic!("{path}: waits");
                };
                let Reply::Prepared(p) = reply else {
                    panic!("{path} (gzip {gzip}): not prepared");
                };
                let show = |r: &Response| {
                    let mut h: Vec<_> = r
                        .headers()
                        .iter()
                        .map(|(k, v)| format!("{k}: {v:?}"))
                        .collect();
                    h.sort();
                    (r.status(), h, r.body().size_hint().exact())
                };
                let as_is: Response = p.clone().into_response();
                let layered = as_the_layer_would(p.clone().into_response(), gzip);
                assert_eq!(show(&as_is), show(&layered), "{path} (gzip {gzip})");
                // and the CORS lines are what the CORS layer's headers say
                let sent: Response = p.with(CORS_LINES).into_response();
                let mut with_cors = as_is;
                for (k, v) in [
                    (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
                    (header::ACCESS_CONTROL_EXPOSE_HEADERS, "*"),
                ] {
                    with_cors
                        .headers_mut()
                        .insert(k, HeaderValue::from_static(v));
                }
                assert_eq!(show(&sent), show(&with_cors), "{path}");
                prepared += 1;
            }
        }
        assert_eq!(prepared, 2 * paths.len());
    }

    /// Whether kilnd's compression layer gzips a playlist asked for with these `Accept-Encoding` values.
    fn layer_gzips(values: &[String]) -> bool {
        let playlist = tower::service_fn(|_: Request| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/vnd.apple.mpegurl")
                    .body(Body::from("#EXTM3U\n".repeat(64)))
                    .unwrap(),
            )
        });
        let svc = tower::Layer::layer(&crate::compression(), playlist);
        let mut req = Request::new(Body::empty());
        for v in values {
            req.headers_mut()
                .append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let res = rt.block_on(svc.oneshot(req)).unwrap();
        res.headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v == "gzip")
    }

    /// An `Accept-Encoding` value: codings the layer knows and does not, with well- and ill-formed q-values.
    fn accept_encoding() -> impl Strategy<Value = String> {
        let coding = prop::sample::select(vec![
            "gzip", "x-gzip", "GZIP", "identity", "IDENTITY", "*", "br", "deflate", "zstd", "foo",
            "",
        ]);
        let q = prop::sample::select(vec![
            "",
            ";q=0",
            ";q=1",
            ";q=0.5",
            ";q=0.500",
            ";Q=0.001",
            ";q=1.0",
            ";q=1.000",
            ";q=2",
            ";q=0.1234",
            ";q= 0.5",
            "; q=0.5",
            ";q=abc",
            ";q=1.001",
            ";q=0.",
            ";q=0;x=1",
            " ;q=0.9",
        ]);
        prop::collection::vec((coding, q), 1..5).prop_map(|entries| {
            entries
                .iter()
                .map(|(c, q)| format!("{c}{q}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The origin sends a playlist gzipped as prepared exactly when the layer would have gzipped it (the
        /// layer leaves an answer with an encoding alone, so a disagreement would gzip for a client that did
        /// not ask for it).
        #[test]
        fn the_origin_chooses_gzip_exactly_when_the_layer_would(
            values in prop::collection::vec(accept_encoding(), 0..3)
        ) {
            let mut headers = axum::http::HeaderMap::new();
            for v in &values {
                headers.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            prop_assert_eq!(kiln_origin::encoding::wants_gzip(&headers), layer_gzips(&values));
        }
    }
}
