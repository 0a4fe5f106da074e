//! kilnd's HTTP service: playback GETs in their plain form go straight to the origin ([`kiln_origin::LiveGet`]),
//! everything else to the router. The two give the same answers: a direct answer goes through the same
//! compression layer as the router's (same predicate, so the same choice of encoding, `Vary` and 406), and gets
//! the same CORS headers and request metrics as the router's layers give. HEAD, OPTIONS and paths that are not
//! plain go to the router. `tests/live_skeleton.rs` compares the two paths' answers header by header.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::routing::future::RouteFuture;
use axum::Router;
use hyper::body::Incoming;
use kiln_origin::{LiveGet, Origin};
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

/// An answer being computed: the origin's answer future, boxed (its size is the largest wait of any resource).
type Boxed = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// The origin answering a [`LiveGet`] (the request's body), as a service the compression layer wraps. The request
/// carries nothing else but its `Accept-Encoding`, and is dropped before the answer is computed.
#[derive(Clone)]
struct Direct(Arc<Origin>);

impl tower::Service<Request<LiveGet>> for Direct {
    type Response = Response;
    type Error = Infallible;
    type Future = Boxed;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<LiveGet>) -> Boxed {
        let origin = self.0.clone();
        let live = req.into_body();
        Box::pin(async move { Ok(live.answer(&origin).await) })
    }
}

pin_project_lite::pin_project! {
    /// [`Front`]'s answer: the router's, or the origin's through the compression layer, counted like the router's.
    /// Held inline by the server (no box per request beyond the origin's own).
    #[project = AnswerProj]
    pub enum Answer {
        // boxed: the router's future holds a whole request, and every connection's slot for the answer in
        // progress (hyper keeps one per connection) would be that size for a parked direct answer too
        Routed { inner: Pin<Box<RouteFuture<Infallible>>> },
        Direct {
            #[pin]
            inner: ResponseFuture<Boxed, crate::Compressible>,
            kind: usize,
            start: Instant,
            metrics: Arc<Metrics>,
        },
    }
}

impl Future for Answer {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AnswerProj::Routed { inner } => inner.as_mut().poll(cx),
            AnswerProj::Direct {
                inner,
                kind,
                start,
                metrics,
            } => {
                let Ok(res) = ready!(inner.poll(cx));
                let mut res = res.map(Body::new);
                // the playback CORS layer's headers (any origin may read playback; with any origin allowed,
                // tower-http's layer sends no `Vary` of its own)
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
                    .observe(*kind, res.status(), bytes, start.elapsed());
                Poll::Ready(Ok(res))
            }
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let Some(live) = LiveGet::of(req.method(), req.uri(), req.headers()) else {
            let mut router = self.0.router.clone();
            return Answer::Routed {
                inner: Box::pin(router.call(req.map(Body::new))),
            };
        };
        let kind = request_kind_index(live.path(), live.query());
        // what the compression layer reads, and nothing else of the request: its header map, and the read buffer
        // its values point into, are freed before the answer (which may wait) is computed
        let mut direct = Request::new(live);
        for v in req.headers().get_all(header::ACCEPT_ENCODING) {
            direct
                .headers_mut()
                .append(header::ACCEPT_ENCODING, v.clone());
        }
        drop(req);
        Answer::Direct {
            inner: self.0.direct.clone().call(direct),
            kind,
            start: Instant::now(),
            metrics: self.0.metrics.clone(),
        }
    }
}
