//! kilnd's HTTP service: playback GETs in their plain form go straight to the origin ([`kiln_origin::LiveGet`]),
//! everything else to the router. The two give the same answers: what the router's layers add to a playback
//! answer (request metrics, CORS, `Vary`) is added here with the same values, and a request a layer could answer
//! differently (a playlist the client may take gzipped, HEAD, OPTIONS) is left to the router.
//! `tests/live_skeleton.rs` compares the two paths' answers header by header.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use axum::body::HttpBody;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use kiln_origin::{LiveGet, Origin};
use tower::Service as _;
use tower_http::compression::predicate::Predicate;

use crate::metrics::{request_kind_index, Metrics};

/// The service [`crate::serve_state`] serves.
#[derive(Clone)]
pub struct Front {
    router: Router,
    origin: Arc<Origin>,
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
        Front {
            origin: Arc::new(state.origin.clone()),
            metrics: state.metrics.clone(),
            router: crate::app(state),
        }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let Some(live) = LiveGet::of(req.method(), req.uri(), req.headers()) else {
            let mut router = self.router.clone();
            return Box::pin(async move { router.call(req.map(axum::body::Body::new)).await });
        };
        // the request (its header map, and the read buffer its values point into) is freed here, not held by
        // a request that parks
        drop(req);
        let (origin, metrics) = (self.origin.clone(), self.metrics.clone());
        Box::pin(async move {
            let start = std::time::Instant::now();
            let kind = request_kind_index(live.path(), live.query());
            let mut res = live.answer(&origin).await;
            playback_layers(&mut res);
            let bytes = res.body().size_hint().exact();
            metrics
                .http
                .observe(kind, res.status(), bytes, start.elapsed());
            Ok(res)
        })
    }
}

/// What the router's layers add to a playback GET's answer that the client did not ask to have compressed:
/// CORS (any origin may read playback; with any origin allowed, tower-http's layer sends no `Vary` of its own)
/// and, for an answer the compression layer would compress for a client that asked, `Vary: accept-encoding`.
fn playback_layers(res: &mut Response) {
    static COMPRESSIBLE: LazyLock<crate::Compressible> = LazyLock::new(crate::compressible);
    let compressible = COMPRESSIBLE.should_compress(res);
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("*"),
    );
    if compressible {
        h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}
