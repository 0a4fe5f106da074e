//! The daemon's settings: [`Config`] and the settings of its parts (TLS files, the node agent, VOD jobs), filled by
//! `cli` from flags and by tests directly. Every module above it may read it; it imports only [`crate::gpus`] (the
//! GPU slot type) and [`crate::metrics`] (its `/proc` reader).

use std::path::PathBuf;
use std::time::Duration;

use kiln_config::Presets;

use crate::gpus;

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
    /// Web origins (`https://console.example`) allowed to call the control API from a browser (CORS); empty: none,
    /// and the control routes send no CORS headers.
    pub control_cors_origins: Vec<axum::http::HeaderValue>,
    /// `/metrics` needs the bearer token too (its series name every stream); otherwise it is open like `/healthz`.
    pub metrics_require_token: bool,
    /// Connection cap and timeouts of the HTTP server.
    pub http_limits: kiln_http::server::Limits,
    /// Networks live URL sources may reach besides public addresses (`--allow-networks`; VOD inputs use
    /// [`JobsConfig::url_policy`], filled from the same flag).
    pub source_networks: kiln_model::net::UrlPolicy,
    /// Report to a scheduler (heartbeats); `None` runs stand-alone.
    pub scheduler: Option<AgentConfig>,
    /// VOD jobs (queue on disk, outputs); `None` disables `/v1/jobs`.
    pub jobs: Option<JobsConfig>,
    /// Live ingest listeners (RTMP, SRT) and their limits.
    pub ingest: IngestConfig,
    /// Stream and job events to a URL (`--webhook-url`); `None`: none sent.
    pub webhooks: Option<crate::webhooks::WebhookConfig>,
}

/// Live ingest: where publishers connect and what they may send.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// RTMP listener (`--rtmp-listen`); `None`: off.
    pub rtmp_listen: Option<std::net::SocketAddr>,
    /// RTMPS listener (`--rtmps-listen`: RTMP over TLS with the daemon's `--tls-cert/--tls-key`); `None`: off.
    pub rtmps_listen: Option<std::net::SocketAddr>,
    /// SRT listener, one UDP port for every stream (`--srt-listen`); `None`: off.
    pub srt_listen: Option<std::net::SocketAddr>,
    /// Host name or address publishers reach the listeners at, for the publish URLs (default: the bound address,
    /// or the advertise URL's host when bound to every address).
    pub public_host: Option<String>,
    /// Largest picture a publisher may send, on either side (also bounded by each stream's reservation).
    pub max_width: u32,
    pub max_height: u32,
    /// Highest mean input bitrate over a 5 s window, in kbit/s.
    pub max_bitrate_kbps: u64,
    /// How long a connection may stay silent (handshake, publish request, media) before it is closed.
    pub idle_timeout: Duration,
    /// How long a publisher's bytes may flow without the stream publishing its first parts (bytes that never decode:
    /// H.264 without SPS/PPS, a broken mux) before the publisher is cut off.
    pub first_picture_timeout: Duration,
    /// Asked (POST, JSON) about keys and stream ids kilnd does not know (`--publish-auth-url`).
    pub auth_url: Option<String>,
    /// How long the auth URL has to answer.
    pub auth_timeout: Duration,
    /// SRT receive latency.
    pub srt_latency: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            rtmp_listen: None,
            rtmps_listen: None,
            srt_listen: None,
            public_host: None,
            max_width: 3840,
            max_height: 2160,
            max_bitrate_kbps: 50_000,
            idle_timeout: Duration::from_secs(10),
            first_picture_timeout: Duration::from_secs(15),
            auth_url: None,
            auth_timeout: Duration::from_secs(2),
            srt_latency: Duration::from_millis(120),
        }
    }
}

/// This host's schedulable resources: 85 % of its cores (the rest is for the daemon, the origin and the OS) and
/// 80 % of its memory. GPU dimensions are per GPU ([`gpus`]).
pub fn host_capacity() -> kiln_model::capacity::Resources {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mem_mib =
        crate::metrics::proc_kib("/proc/meminfo", "MemTotal:").map_or(1024, |kib| kib / 1024);
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
            control_cors_origins: Vec::new(),
            metrics_require_token: false,
            http_limits: Default::default(),
            scheduler: None,
            jobs: None,
            ingest: IngestConfig::default(),
            webhooks: None,
        }
    }
}

/// Where and how to report.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Scheduler base URLs (`http://host:port`), tried in order.
    pub schedulers: Vec<String>,
    /// This daemon's base URL as the scheduler and viewers reach it.
    pub advertise_url: String,
    /// Heartbeat interval until the scheduler says otherwise.
    pub interval: Duration,
    /// The fleet's join token (`--node-token-env`): heartbeats carry it instead of the API token.
    pub join_token: Option<String>,
    /// On SIGTERM, how long to wait for the scheduler to move this node's streams (and for running VOD jobs)
    /// before stopping what is left.
    pub drain_timeout: Duration,
}

/// Where jobs live and how many run at once.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// State (`jobs/`) and outputs (`vod/`).
    pub data_dir: PathBuf,
    /// `file://` inputs must resolve under it; without it, only http(s) inputs work.
    pub input_dir: Option<PathBuf>,
    pub max_concurrent: usize,
    /// Networks `http(s)` inputs may reach beyond public addresses (`--allow-networks`).
    pub url_policy: kiln_model::net::UrlPolicy,
    /// The largest `http(s)` input downloaded, in bytes.
    pub max_input_bytes: u64,
    /// Finished jobs (record and outputs) are deleted this long after they end; `None` keeps them.
    pub retention: Option<Duration>,
    /// The most memory one job may need ([`kiln_model::vod::JobPlan::memory_mib`] of its probed input), MiB; a
    /// job over it fails with the numbers.
    pub max_job_memory_mib: u64,
    /// The longest input a job transcodes, in seconds of media (its probed duration); a longer one fails before
    /// it is decoded. A small file can declare (and be) hours of video whose ladder fills the data disk.
    pub max_duration_s: u64,
}

/// Default `--vod-max-duration-hours`: 12 h of media (a film, a day's long event); about 50 GB of the default
/// ladder's output.
pub const DEFAULT_MAX_DURATION_S: u64 = 12 * 3600;

/// Default `--vod-max-job-memory-mib`: a 4K source's ladder (about 0.9 GiB) fits, an 8K one (about 1.5 GiB) needs
/// the flag raised.
pub const DEFAULT_MAX_JOB_MEMORY_MIB: u64 = 1024;

/// Default `--vod-max-input-bytes`: 64 GiB (a 4K mezzanine file of a few hours).
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 64 << 30;

impl JobsConfig {
    /// State in `data_dir`, no file inputs, 2 jobs at once, public URLs only, [`DEFAULT_MAX_INPUT_BYTES`],
    /// [`DEFAULT_MAX_JOB_MEMORY_MIB`], [`DEFAULT_MAX_DURATION_S`].
    pub fn new(data_dir: PathBuf) -> JobsConfig {
        JobsConfig {
            data_dir,
            input_dir: None,
            max_concurrent: 2,
            url_policy: kiln_model::net::UrlPolicy::default(),
            max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
            retention: None,
            max_job_memory_mib: DEFAULT_MAX_JOB_MEMORY_MIB,
            max_duration_s: DEFAULT_MAX_DURATION_S,
        }
    }
}
