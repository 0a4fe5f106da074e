//! kilnd: the per-host daemon.
//!
//! It runs live streams as GStreamer pipelines ([`kiln_media`]), feeds their CMAF parts into the LL-HLS origin
//! ([`kiln_origin`]), runs VOD jobs, and serves the control API, the playback routes and a small web page from one
//! HTTP server (HTTP/1.1 and h2c, or TLS). The binary is thin: `main` parses flags into a [`Config`] and calls
//! [`serve`].
//!
//! Layout, top to bottom (a module imports only from modules below it; this file holds [`AppState`], the router
//! and [`serve`]):
//! - [`cli`] (flags → [`Config`], the `calibrate` and `sign-url` commands), [`calibrate`] (the CPU ramp);
//! - [`api`] (control routes and their JSON errors, VOD file serving, `/metrics`), [`page`] (the `/` page),
//!   [`agent`] (heartbeats to the scheduler, through the [`agent::Node`] trait), [`tls`] (HTTPS with ALPN);
//! - [`jobs`] (the VOD queue: store, dispatcher, runner, thumbnails);
//! - [`supervisor`] (live stream life cycle, admission, the capacity report and the gauges behind `/metrics`);
//! - [`config`] (settings);
//! - leaves: [`fetch`] (source address checks and VOD downloads), [`gpus`] (GPU slots and their bookings),
//!   [`metrics`] (the Prometheus registry).

pub mod agent;
pub mod api;
pub mod calibrate;
pub mod cli;
pub mod config;
pub mod fetch;
pub mod front;
pub mod gpus;
pub mod ingest;
pub mod jobs;
pub mod load;
pub mod metrics;
pub mod page;
pub mod supervisor;
pub mod tls;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use kiln_origin::Origin;
use tokio::net::TcpListener;
use tower_http::compression::predicate::Predicate;
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;
use utoipa_axum::router::OpenApiRouter;

pub use config::{host_capacity, Config, TlsFiles};
pub use supervisor::Supervisor;

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub supervisor: Arc<Supervisor>,
    pub origin: Origin,
    pub config: Arc<Config>,
    pub metrics: Arc<metrics::Metrics>,
    /// NVML telemetry (an empty inventory without a driver).
    pub telemetry: Arc<kiln_gpu::Telemetry>,
    /// The VOD job queue, when enabled.
    pub jobs: Option<Arc<jobs::Jobs>>,
    /// The ingest listeners' sockets, bound by [`AppState::new`] and started by [`serve_state`].
    pub ingest: Arc<parking_lot::Mutex<Option<ingest::Sockets>>>,
}

/// The whole HTTP surface. Layers, outermost first:
/// 1. metrics — every request counted by kind and status, timed (blocking requests include their wait);
/// 2. compression — gzip playlists, JSON and HTML when the client asks; never media (already compressed, and
///    parts must go out whole and fast);
/// 3. CORS, per group of routes: playback (`/live`, `/vod`, `/time`) may be read by players on any origin
///    (GET/HEAD); the control API sends no CORS headers at all unless `--cors-allow-origin` lists origins, so a web
///    page an operator visits cannot drive it from the browser.
pub fn app(state: AppState) -> Router {
    app_with_document(state).0
}

/// What `/v1/openapi.json` begins with.
const DOCUMENT: &str = "kilnd, the per-host daemon: live streams (`/v1/streams`), VOD jobs (`/v1/jobs`), the node's \
capacity, LL-HLS and LL-DASH playback (`/live`, `/vod`), and operations (`/metrics`, `/healthz`, `/readyz`). Errors \
are `{\"error\": {\"code\", \"message\"}}`. Control routes take the fleet token when kilnd has one.";

/// [`app`], and its OpenAPI document (built from the same route registrations, so the two cannot differ).
pub fn app_with_document(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let metrics = state.metrics.clone();
    let playback = OpenApiRouter::new()
        .merge(api::vod_router())
        .merge(kiln_origin::router().with_state(state.origin.clone()))
        .layer(playback_cors());
    let mut control = api::control_router(state.config.api_token.as_deref());
    if !state.config.control_cors_origins.is_empty() {
        control = control.layer(control_cors(&state.config.control_cors_origins));
    }
    let api = OpenApiRouter::new()
        .merge(control)
        .merge(api::service_router(
            state
                .config
                .metrics_require_token
                .then_some(state.config.api_token.as_deref())
                .flatten(),
        ))
        .merge(playback)
        .merge(page::router(state.config.assets_dir.clone()))
        .with_state(state);
    let (router, document) = kiln_http::openapi::finish(api, "kilnd", DOCUMENT);
    let router = router
        .fallback(kiln_http::no_route)
        .layer(compression())
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let metrics = metrics.clone();
                async move {
                    let kind = metrics::request_kind_index(req.uri().path(), req.uri().query());
                    // a HEAD answer's body is dropped after this layer: no bytes go out
                    let head = req.method() == axum::http::Method::HEAD;
                    let start = std::time::Instant::now();
                    let res = next.run(req).await;
                    let bytes = axum::body::HttpBody::size_hint(res.body())
                        .exact()
                        .map(|n| if head { 0 } else { n });
                    metrics
                        .http
                        .observe(kind, res.status(), bytes, start.elapsed());
                    res
                }
            },
        ));
    (router, document)
}

/// Which answers the compression layer gzips for a client that asks: text of 256 bytes or more (never media:
/// already compressed, and parts must go out whole and fast). [`front`] uses the same layer. A unit type: the
/// layer keeps a copy in every answer in progress.
#[derive(Debug, Clone, Copy)]
struct Compressible;

impl Predicate for Compressible {
    /// tower-http's `SizeAbove::new(256)`, `NotForContentType` "video/mp4" and "audio/mp4" together, reading the
    /// content type once (it is asked of every playback answer; `predicate_tests`).
    fn should_compress<B: axum::body::HttpBody>(&self, res: &axum::http::Response<B>) -> bool {
        let size = res.body().size_hint().exact().or_else(|| {
            res.headers()
                .get(axum::http::header::CONTENT_LENGTH)
                .and_then(|h| h.to_str().ok())
                .and_then(|v| v.parse().ok())
        });
        if size.is_some_and(|n| n < 256) {
            return false;
        }
        let cty = res
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        !(cty.starts_with("video/mp4") || cty.starts_with("audio/mp4"))
    }
}

/// gzip for clients that ask, on what [`Compressible`] allows (the router's layer, and [`front`]'s for the answers
/// it gives without the router).
fn compression() -> CompressionLayer<Compressible> {
    CompressionLayer::new()
        .gzip(true)
        .compress_when(Compressible)
}

/// Players on any origin may GET/HEAD playback (and send `Range`); nothing else.
fn playback_cors() -> CorsLayer {
    use axum::http::Method;
    use tower_http::cors::Any;
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD])
        .allow_headers(Any)
        .expose_headers(Any)
}

/// The control API for the origins an operator listed (`--cors-allow-origin`), with the headers a control client
/// sends (bearer token, JSON, the scheduler's epoch).
fn control_cors(origins: &[axum::http::HeaderValue]) -> CorsLayer {
    use axum::http::{header, HeaderName, Method};
    CorsLayer::new()
        .allow_origin(origins.to_vec())
        .allow_methods([Method::GET, Method::PUT, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static(kiln_model::node::EPOCH_HEADER),
        ])
}

/// Make-before-break on SIGTERM: the node reports `draining` (heartbeats go on), takes nothing new, and waits
/// until the scheduler has started its streams elsewhere and stopped them here, and its running VOD jobs have
/// finished, or until `limit`, or until no scheduler has answered a heartbeat (with any status) for three
/// heartbeat intervals (nobody will move the streams). Queued jobs stay on disk and run when the node is back.
async fn drain_through_scheduler(
    sup: &Arc<Supervisor>,
    jobs: Option<&jobs::Jobs>,
    limit: std::time::Duration,
) {
    sup.start_draining();
    if let Some(j) = jobs {
        j.pause();
    }
    let started = std::time::Instant::now();
    tracing::info!(
        streams = sup.live_streams(),
        running_jobs = jobs.map_or(0, |j| j.load().running),
        limit_s = limit.as_secs(),
        "draining: waiting for the scheduler to move this node's streams and for running jobs"
    );
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tick.tick().await;
        let streams = sup.live_streams();
        let running_jobs = jobs.map_or(0, |j| j.load().running);
        if streams == 0 && running_jobs == 0 {
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "drained: nothing runs here any more"
            );
            return;
        }
        if started.elapsed() >= limit {
            tracing::warn!(
                streams,
                running_jobs,
                "drain timed out: stopping what is left"
            );
            return;
        }
        let (silent, interval) = sup.scheduler_silence();
        if streams > 0 && silent >= (interval * 3).max(std::time::Duration::from_secs(3)) {
            tracing::warn!(
                streams,
                silent_ms = silent.as_millis() as u64,
                "no scheduler answers: nobody will move the streams; stopping them"
            );
            return;
        }
    }
}

/// Runs the daemon on `listener` until `shutdown` resolves; then (with a scheduler) drains, stops every stream
/// (EOS, ENDLIST) and drains connections.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_state(AppState::new(config)?, listener, shutdown).await
}

/// The GPUs telemetry sees, with NVENC presence from `kiln-nvenc-probe` when installed.
fn probe_gpus(
    telemetry: &kiln_gpu::Telemetry,
    registry: &kiln_media::select::Registry,
) -> Vec<gpus::GpuSlot> {
    let mut slots: Vec<gpus::GpuSlot> = telemetry
        .snapshot()
        .gpus
        .iter()
        .map(|g| gpus::GpuSlot::new(g, registry))
        .collect();
    if !slots.is_empty() {
        match gpus::run_nvenc_probe() {
            Some(p) => gpus::apply_nvenc_probe(&mut slots, &p),
            None => tracing::info!(
                "kiln-nvenc-probe not installed: NVENC presence from the GStreamer registry only"
            ),
        }
    }
    slots
}

/// The origin measures its own serving (fan-out per publish, parking refusals): exported with the rest.
fn register_origin_metrics(metrics: &metrics::Metrics, origin: &Origin) -> anyhow::Result<()> {
    for c in [
        Box::new(origin.fanout.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(origin.park_refusals.clone()),
    ] {
        metrics
            .registry
            .register(c)
            .map_err(|e| anyhow::anyhow!("registering the origin's metrics: {e}"))?;
    }
    Ok(())
}

impl AppState {
    /// The node's capacity report: the body of `GET /v1/capacity` and of every heartbeat to the scheduler.
    pub fn capacity_report(&self) -> kiln_model::node::CapacityReport {
        self.supervisor
            .capacity_report(&self.telemetry, self.jobs.as_ref().map(|j| j.load()))
    }

    /// The daemon's state before it serves: initialises GStreamer, creates the origin and the supervisor.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        kiln_media::init()?;
        let mut origin = Origin::new();
        if let Some(key) = &config.playback_key {
            let signer = kiln_origin::signing::UrlSigner::new(key)
                .ok_or_else(|| anyhow::anyhow!("the playback key must be at least 16 bytes"))?;
            origin.signer = Some(Arc::new(signer));
        }
        let registry = Arc::new(kiln_media::select::Registry::probe()?);
        let telemetry = Arc::new(kiln_gpu::Telemetry::open());
        let slots = match &config.gpus {
            Some(s) => s.clone(),
            None => probe_gpus(&telemetry, &registry),
        };
        for s in &slots {
            tracing::info!(gpu = s.index, name = %s.name, profile = ?s.profile, nvenc = s.nvenc, nvdec = s.nvdec, "GPU");
        }
        if slots.is_empty() {
            tracing::info!("no GPU: every stream encodes on the CPU");
        }
        let config = Arc::new(config);
        let metrics = Arc::new(metrics::Metrics::new());
        register_origin_metrics(&metrics, &origin)?;
        let supervisor = Arc::new(Supervisor::new(
            config.clone(),
            origin.clone(),
            metrics.clone(),
            registry,
            gpus::GpuPool::new(slots),
        ));
        let jobs = match &config.jobs {
            Some(j) => Some(Arc::new(
                jobs::Jobs::open(j.clone(), config.presets.clone(), config.cpu_model.clone())
                    .map_err(|e| {
                        anyhow::anyhow!("opening the job store in {}: {e}", j.data_dir.display())
                    })?,
            )),
            None => None,
        };
        if let Some(w) = open_webhooks(&config, &metrics)? {
            let _ = supervisor.webhooks.set(w.clone());
            jobs.iter().for_each(|j| drop(j.webhooks.set(w.clone())));
        }
        let sockets = ingest::Sockets::bind(&config.ingest)
            .map_err(|e| anyhow::anyhow!("binding the ingest listeners: {e}"))?;
        let public = |a: SocketAddr| {
            ingest::Sockets::public(
                a,
                config.ingest.public_host.as_deref(),
                Some(&config.node_id),
            )
        };
        let _ = supervisor.ingest_addrs.set(supervisor::IngestAddrs {
            rtmp: sockets.rtmp_addr().map(public),
            rtmps: sockets.rtmps_addr().map(public),
            srt: sockets.srt_addr().map(public),
        });
        Ok(Self {
            supervisor,
            metrics,
            origin,
            config,
            telemetry,
            jobs,
            ingest: Arc::new(parking_lot::Mutex::new(Some(sockets))),
        })
    }
}

/// The webhook outbox (`--webhook-url`), with its series registered.
fn open_webhooks(
    config: &Config,
    metrics: &metrics::Metrics,
) -> anyhow::Result<Option<Arc<webhooks::Webhooks>>> {
    let Some(w) = &config.webhooks else {
        return Ok(None);
    };
    let m = webhooks::WebhookMetrics::new(&metrics.registry);
    let opened = webhooks::Webhooks::open(w.clone(), &config.node_id, m)
        .map_err(|e| anyhow::anyhow!("opening the webhook outbox in {}: {e}", w.dir.display()))?;
    Ok(Some(Arc::new(opened)))
}

/// The node agent reports this daemon's state and raises its fence.
impl agent::Node for AppState {
    fn node_id(&self) -> &str {
        &self.config.node_id
    }

    fn api_token(&self) -> Option<&str> {
        self.config.api_token.as_deref()
    }

    fn report(&self) -> kiln_model::node::CapacityReport {
        self.capacity_report()
    }

    fn saw_epoch(&self, epoch: u64) {
        // an older epoch than the fence is simply not raised: the agent only informs
        let _ = self.supervisor.raise_fence(epoch);
    }

    fn scheduler_answered(&self, interval: std::time::Duration) {
        self.supervisor.heard_from_scheduler(interval);
    }
}

/// The demo's `cam` stream: a `publish:` stream (the 360p ladder) waiting for a publisher. Its publish commands
/// go to stdout (the operator's console), with the key: that is what a demo is for; nothing logs them.
async fn demo_publish_stream(supervisor: &Arc<Supervisor>) -> anyhow::Result<()> {
    let req = kiln_model::StreamRequest {
        source: "publish:".into(),
        preset: Some("live-360p-abr".into()),
        ..Default::default()
    };
    let (h, _) = supervisor
        .create("cam", req)
        .await
        .map_err(|e| anyhow::anyhow!("creating the demo publish stream: {e}"))?;
    let Some(info) = supervisor.ingest_info(&h) else {
        return Ok(());
    };
    let x264 =
        "-c:v libx264 -preset veryfast -tune zerolatency -g 60 -pix_fmt yuv420p -c:a aac -b:a 128k";
    let src = "-re -f lavfi -i testsrc2=size=640x360:rate=30 -f lavfi -i sine=frequency=440:sample_rate=48000";
    println!("demo publish stream `cam` is waiting for a publisher (watch it on the page, or /live/cam/master.m3u8):");
    if let Some(u) = &info.rtmp_url {
        println!("  RTMP: ffmpeg {src} {x264} -f flv '{u}'");
        println!(
            "  OBS:  Settings > Stream > Service: Custom, Server: {}, Stream Key: {}",
            u.trim_end_matches(&format!("/{}", info.key)),
            info.key
        );
    }
    if let Some(u) = &info.srt_url {
        println!("  SRT:  ffmpeg {src} {x264} -f mpegts '{u}'");
    }
    Ok(())
}

/// [`serve`] with a state the caller built (and may keep a handle to, e.g. a test harness).
pub async fn serve_state(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let supervisor = state.supervisor.clone();
    let config = state.config.clone();
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, gstreamer = %kiln_media::gstreamer_version(), "kilnd listening");
    if config.demo {
        let req = kiln_model::StreamRequest {
            source: "test:".into(),
            preset: config.demo_preset.clone(),
            ..Default::default()
        };
        supervisor
            .create("demo", req)
            .await
            .map_err(|e| anyhow::anyhow!("starting the demo stream: {e}"))?;
        tracing::info!(url = %format!("http://{addr}/"), "demo stream running: open the page, or play http://{addr}/live/demo/master.m3u8");
        if config.ingest.rtmp_listen.is_some() || config.ingest.srt_listen.is_some() {
            demo_publish_stream(&supervisor).await?;
        }
    }
    if let Some(sockets) = state.ingest.lock().take() {
        sockets.spawn(
            supervisor.clone(),
            config.ingest.clone(),
            config.tls.as_ref(),
        )?;
    }
    let agent = config
        .scheduler
        .clone()
        .map(|cfg| tokio::spawn(agent::run(state.clone(), cfg)));
    let _sender = supervisor
        .webhooks
        .get()
        .map(|w| tokio::spawn(w.clone().run()));
    let jobs = state.jobs.clone();
    let dispatcher = state
        .jobs
        .clone()
        .map(|j| tokio::spawn(j.dispatch(supervisor.clone(), state.metrics.clone())));
    let sampler = tokio::spawn(load::run(state.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sup = supervisor.clone();
    let drain = config.scheduler.as_ref().map(|s| s.drain_timeout);
    let draining_jobs = state.jobs.clone();
    tokio::spawn(async move {
        shutdown.await;
        if let (Some(limit), Some(_)) = (drain, &agent) {
            drain_through_scheduler(&sup, draining_jobs.as_deref(), limit).await;
        }
        if let Some(a) = agent {
            a.abort();
        }
        if let Some(d) = dispatcher {
            d.abort();
        }
        sampler.abort();
        if let Some(j) = &jobs {
            j.shutdown();
        }
        tracing::info!("shutting down: stopping streams");
        sup.shutdown().await;
        let _ = stop_tx.send(());
    });
    let stopped = async {
        let _ = stop_rx.await;
    };
    // HTTP/1.1 and h2c (prior knowledge) on one port, or TLS with ALPN
    let acceptor = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let front = front::Front::of(state); // plain playback GETs skip the router
    let service = (front.clone(), front);
    kiln_http::server::serve_service(listener, acceptor, service, config.http_limits, stopped)
        .await?;
    Ok(())
}

#[cfg(test)]
mod predicate_tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{header, Response};
    use tower_http::compression::predicate::{NotForContentType, SizeAbove};

    /// What the predicate was: tower-http's three predicates, each reading the response again.
    fn towers(res: &Response<Body>) -> bool {
        SizeAbove::new(256).should_compress(res)
            && NotForContentType::const_new("video/mp4").should_compress(res)
            && NotForContentType::const_new("audio/mp4").should_compress(res)
    }

    #[test]
    fn the_predicate_is_tower_http_s_three() {
        let types = [
            None,
            Some("video/mp4"),
            Some("audio/mp4"),
            Some("video/mp4; codecs=avc1"),
            Some("video/mp2t"),
            Some("application/vnd.apple.mpegurl"),
            Some("application/json"),
            Some("VIDEO/MP4"),
        ];
        let mut compared = 0;
        for cty in types {
            for size in [0usize, 255, 256, 4096] {
                // a body of known size, and one of unknown size with and without a Content-Length
                for (known, length) in
                    [(true, None), (false, None), (false, Some(size.to_string()))]
                        .into_iter()
                        .chain([(false, Some("x".to_string()))])
                {
                    let body = if known {
                        Body::from(vec![b'#'; size])
                    } else {
                        Body::from_stream(
                            futures::stream::empty::<Result<Vec<u8>, std::io::Error>>(),
                        )
                    };
                    let mut res = Response::new(body);
                    if let Some(cty) = cty {
                        res.headers_mut()
                            .insert(header::CONTENT_TYPE, cty.parse().unwrap());
                    }
                    if let Some(len) = &length {
                        res.headers_mut()
                            .insert(header::CONTENT_LENGTH, len.parse().unwrap());
                    }
                    assert_eq!(
                        Compressible.should_compress(&res),
                        towers(&res),
                        "{cty:?} {size} known={known} length={length:?}"
                    );
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 8 * 4 * 4);
    }
}
