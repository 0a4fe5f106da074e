//! kilnd: the per-host daemon.
//!
//! It runs live streams as GStreamer pipelines ([`kiln_media`]), feeds their CMAF parts into the LL-HLS origin
//! ([`kiln_origin`]), and serves the control API, the playback routes and a small web page from one HTTP server
//! (HTTP/1.1 and h2c). The binary is thin: `main` parses flags into a [`Config`] and calls [`serve`].
//!
//! Layout: [`supervisor`] (stream life cycle: build, start, feed the origin, stop with EOS), [`api`] (control
//! routes, JSON errors), [`page`] (the `/` page with an hls.js player).

pub mod agent;
pub mod api;
pub mod calibrate;
pub mod cli;
pub mod fetch;
pub mod gpus;
pub mod jobs;
pub mod metrics;
pub mod page;
pub mod supervisor;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use kiln_config::Presets;
use kiln_origin::Origin;
use tokio::net::TcpListener;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;

pub use supervisor::Supervisor;

/// Daemon settings (validated by construction: presets are already loaded).
#[derive(Debug, Clone)]
pub struct Config {
    pub presets: Presets,
    /// Start a live test stream with id `demo`.
    pub demo: bool,
    /// Preset for the demo stream (default: the presets' default).
    pub demo_preset: Option<String>,
    /// Complete segments listed per media playlist.
    pub window_segments: usize,
    /// Complete segments kept downloadable after leaving the playlist.
    pub retain_segments: usize,
    /// How long a stopped stream stays servable (ENDLIST playlists) before it is dropped.
    pub linger: Duration,
    /// How long a stop waits for the pipeline to drain after EOS.
    pub grace: Duration,
    /// Directory with static assets for the page (e.g. `hls.min.js`).
    pub assets_dir: Option<PathBuf>,
    /// Key for signed playback URLs (≥ 16 bytes); when set, `/live/…` needs a valid `exp`/`sig` token.
    pub playback_key: Option<Vec<u8>>,
    /// Serve HTTPS (ALPN `h2`, then `http/1.1`) with this PEM certificate chain and key instead of plain HTTP.
    pub tls: Option<TlsFiles>,
    /// This node's id in capacity reports (default: the host name).
    pub node_id: String,
    /// Software encoding costs (`hw-profiles/cpu-*.toml`).
    pub cpu_model: kiln_model::capacity::CpuCostModel,
    /// What admission may book on the host: CPU and memory (default: 85 % of the cores, 80 % of memory).
    pub capacity: kiln_model::capacity::Resources,
    /// NVENC/NVDEC stream costs (VRAM per session, host share of a GPU stream).
    pub gpu_model: kiln_model::capacity::GpuCostModel,
    /// The GPUs admission may book; `None` = detect them (NVML inventory + GStreamer registry) at start.
    pub gpus: Option<Vec<gpus::GpuSlot>>,
    /// Directory that `file://` sources are resolved in; `None` refuses file sources.
    pub media_dir: Option<PathBuf>,
    /// Bearer token the control API (`/v1/…`) requires, and that heartbeats to the scheduler carry; `None` leaves
    /// the API open (a trusted network). Playback, `/metrics`, `/healthz` and `/readyz` never need it.
    pub api_token: Option<String>,
    /// Networks live URL sources may reach besides public addresses (`--allow-networks`; VOD inputs use
    /// [`jobs::JobsConfig::url_policy`], filled from the same flag).
    pub source_networks: kiln_model::net::UrlPolicy,
    /// Report to a scheduler (heartbeats); `None` runs stand-alone.
    pub scheduler: Option<agent::AgentConfig>,
    /// VOD jobs (queue on disk, outputs); `None` disables `/v1/jobs`.
    pub jobs: Option<jobs::JobsConfig>,
}

/// This host's schedulable resources: 85 % of its cores (the rest is for the daemon, the origin and the OS) and
/// 80 % of its memory. GPU dimensions are per GPU ([`gpus`]).
pub fn host_capacity() -> kiln_model::capacity::Resources {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(1024, |kib| kib / 1024);
    kiln_model::capacity::Resources {
        cpu_millicores: cores * 850,
        memory_mib: mem_mib * 8 / 10,
        ..Default::default()
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kilnd".into())
}

/// PEM files for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            presets: Presets::builtin(),
            demo: false,
            demo_preset: None,
            // 20 s: above the 12 s Skip Boundary, so delta updates have something to skip.
            window_segments: 10,
            retain_segments: 6,
            linger: Duration::from_secs(30),
            grace: Duration::from_secs(5),
            assets_dir: None,
            playback_key: None,
            tls: None,
            node_id: host_name(),
            cpu_model: kiln_config::builtin_cpu_profile(),
            capacity: host_capacity(),
            gpu_model: Default::default(),
            gpus: None,
            media_dir: None,
            source_networks: Default::default(),
            api_token: None,
            scheduler: None,
            jobs: None,
        }
    }
}

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
}

/// The whole HTTP surface. Layers, outermost first:
/// 1. CORS — browser players on other origins may GET playback and read the API;
/// 2. metrics — every request counted by kind and status, timed (blocking requests include their wait);
/// 3. compression — gzip playlists, JSON and HTML when the client asks; never media (already compressed, and
///    parts must go out whole and fast).
pub fn app(state: AppState) -> Router {
    let compress = SizeAbove::new(256)
        .and(NotForContentType::new("video/mp4"))
        .and(NotForContentType::new("audio/mp4"));
    let metrics = state.metrics.clone();
    Router::new()
        .merge(api::router(state.config.api_token.clone()))
        .merge(page::router())
        .merge(kiln_origin::router().with_state(state.origin.clone()))
        .with_state(state)
        .layer(CompressionLayer::new().gzip(true).compress_when(compress))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let metrics = metrics.clone();
                async move {
                    let kind = metrics::request_kind(req.uri().path(), req.uri().query());
                    let start = std::time::Instant::now();
                    let res = next.run(req).await;
                    metrics
                        .requests
                        .with_label_values(&[kind, res.status().as_str()])
                        .inc();
                    metrics
                        .request_duration
                        .with_label_values(&[kind])
                        .observe(start.elapsed().as_secs_f64());
                    res
                }
            },
        ))
        .layer(CorsLayer::permissive())
}

/// Runs the daemon on `listener` until `shutdown` resolves; then stops every stream (EOS, ENDLIST) and drains
/// connections.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_state(AppState::new(config)?, listener, shutdown).await
}

impl AppState {
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
            None => {
                let mut slots: Vec<gpus::GpuSlot> = telemetry
                    .snapshot()
                    .gpus
                    .iter()
                    .map(|g| gpus::GpuSlot::new(g, &registry))
                    .collect();
                if !slots.is_empty() {
                    match gpus::run_nvenc_probe() {
                        Some(p) => gpus::apply_nvenc_probe(&mut slots, &p),
                        None => tracing::info!("kiln-nvenc-probe not installed: NVENC presence from the GStreamer registry only"),
                    }
                }
                slots
            }
        };
        for s in &slots {
            tracing::info!(gpu = s.index, name = %s.name, profile = ?s.profile, nvenc = s.nvenc, nvdec = s.nvdec, "GPU");
        }
        if slots.is_empty() {
            tracing::info!("no GPU: every stream encodes on the CPU");
        }
        let config = Arc::new(config);
        let metrics = Arc::new(metrics::Metrics::new());
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
        Ok(Self {
            supervisor,
            metrics,
            origin,
            config,
            telemetry,
            jobs,
        })
    }
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
    }
    let agent = config
        .scheduler
        .clone()
        .map(|cfg| tokio::spawn(agent::run(state.clone(), cfg)));
    let jobs = state.jobs.clone();
    let dispatcher = state
        .jobs
        .clone()
        .map(|j| tokio::spawn(j.dispatch(supervisor.clone(), state.metrics.clone())));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sup = supervisor.clone();
    tokio::spawn(async move {
        shutdown.await;
        if let Some(a) = agent {
            a.abort();
        }
        if let Some(d) = dispatcher {
            d.abort();
        }
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
    match &config.tls {
        // HTTP/1.1 and h2c (prior knowledge) on one port
        None => {
            axum::serve(listener, app(state))
                .with_graceful_shutdown(stopped)
                .await?
        }
        Some(files) => tls::serve(listener, tls::acceptor(files)?, app(state), stopped).await?,
    }
    Ok(())
}
