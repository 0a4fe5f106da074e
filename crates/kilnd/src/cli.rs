//! The `kilnd` command line: flags → [`crate::Config`] → serve.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kiln_config::Presets;

/// kiln daemon: live encoding to LL-HLS with GPU or CPU pipelines.
#[derive(Debug, Parser)]
#[command(name = "kilnd", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// How many nice levels GStreamer's streaming threads (sources, encoders) run below the HTTP server, so that
    /// a woken encoder does not preempt a viewer's answer (kiln_media::priority); 0: the same priority.
    #[arg(long, global = true, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=19))]
    media_nice: u8,
    /// CPU cost profile (hw-profiles/*.toml, or one written by `kilnd calibrate`).
    #[arg(long, global = true)]
    cpu_profile: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Also start a live test stream with id `demo`.
    #[arg(long)]
    demo: bool,
    /// Preset for the demo stream.
    #[arg(long)]
    demo_preset: Option<String>,
    /// Load presets from this directory instead of the built-in ones.
    #[arg(long)]
    pipelines_dir: Option<PathBuf>,
    /// Complete segments listed per media playlist.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(3..=1000))]
    window_segments: u16,
    /// Directory of static assets for the web page (e.g. hls.min.js).
    #[arg(long)]
    assets_dir: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` on the control API (`/v1/…`), with the token read from this
    /// environment variable (≥ 16 bytes); heartbeats to the scheduler carry it too.
    #[arg(long, value_name = "ENV_VAR")]
    api_token_env: Option<String>,
    /// A web origin (`https://console.example`) allowed to call the control API from a browser; repeat for
    /// several. Without it the control API sends no CORS headers (playback is readable from any origin).
    #[arg(long, value_name = "ORIGIN", value_parser = parse_origin)]
    cors_allow_origin: Vec<axum::http::HeaderValue>,
    /// Open HTTP connections at most (also bounded by the open-file limit, which kilnd raises to its hard limit).
    #[arg(long, default_value_t = kiln_http::server::Limits::default().max_connections)]
    max_connections: usize,
    /// Seconds a client has to send a request head; also the idle time after which a keep-alive connection closes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    header_timeout_secs: u64,
    /// Seconds a write to a client may wait (a viewer that stopped reading) before its connection closes; time
    /// between writes does not count.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    write_stall_secs: u64,
    /// `/metrics` needs the same bearer token as the control API (its series name every stream).
    #[arg(long, requires = "api_token_env")]
    metrics_require_token: bool,
    /// Require signed playback URLs, with the key read from this environment variable (≥ 16 bytes).
    #[arg(long, value_name = "ENV_VAR", global = true)]
    playback_key_env: Option<String>,
    /// Serve HTTPS (ALPN h2, http/1.1) with this PEM certificate chain.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Directory that `file:///…` sources are resolved in (file sources are refused without it).
    #[arg(long)]
    media_dir: Option<PathBuf>,
    /// Ignore the GPUs: every stream encodes on the CPU (NVML telemetry is still reported).
    #[arg(long)]
    no_gpu: bool,
    /// Report to the scheduler at this URL (heartbeats); a comma-separated list for several schedulers.
    #[arg(long, value_delimiter = ',')]
    scheduler: Vec<String>,
    /// The scheduler's join token, read from this environment variable (≥ 16 bytes; the scheduler's
    /// --node-token-env): heartbeats carry it instead of the --api-token-env token.
    #[arg(long, value_name = "ENV_VAR", requires = "scheduler")]
    node_token_env: Option<String>,
    /// This node's id in the fleet (default: the host name, with the port when reporting to a scheduler, so that
    /// several daemons on one host stay distinct).
    #[arg(long)]
    node_id: Option<String>,
    /// URL the scheduler and viewers reach this daemon at (default: from the bound address).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Directory for VOD job state and outputs (jobs survive restarts). Default: `kiln-data` in the working
    /// directory, or in the temporary directory when that cannot be created.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `file://` VOD inputs must be under this directory.
    #[arg(long)]
    vod_input_dir: Option<PathBuf>,
    /// Networks that sources may reach besides public addresses: live `srt`/`rtsp`/`http(s)` sources and `http(s)`
    /// VOD inputs. Comma-separated CIDRs (e.g. `192.168.10.0/24,fd00::/8` for cameras on a private network; `any`
    /// turns the check off). By default loopback, private, link-local (cloud metadata) and every other
    /// special-purpose range are refused, so a client cannot make the daemon connect into the network.
    #[arg(long, value_parser = parse_url_policy, default_value = "")]
    allow_networks: kiln_model::net::UrlPolicy,
    /// Largest `http(s)` VOD input downloaded, in bytes.
    #[arg(long, default_value_t = crate::jobs::DEFAULT_MAX_INPUT_BYTES)]
    vod_max_input_bytes: u64,
    /// Most memory one VOD job may need, in MiB (decoded pictures of its input and ladder, estimated from the
    /// probed size); a job over it fails with the numbers. 8K inputs need about 1,500.
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_JOB_MEMORY_MIB)]
    vod_max_job_memory_mib: u64,
    /// Longest VOD input transcoded, in hours of media (its probed duration); a longer one fails before decoding.
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_DURATION_S / 3600)]
    vod_max_duration_hours: u64,
    /// Delete finished VOD jobs (record and outputs) this many hours after they end (0: keep them).
    #[arg(long, default_value_t = 0)]
    vod_retention_hours: u64,
    /// VOD jobs running at once (each also books its CPU cost).
    #[arg(long, default_value_t = 2)]
    vod_concurrency: usize,
    /// Heartbeat interval in milliseconds (the scheduler may change it).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// With --scheduler, SIGTERM first drains: the node reports `draining`, takes nothing new and waits up to this
    /// many seconds for the scheduler to start its streams elsewhere and stop them here (and for running VOD jobs
    /// to finish), then stops what is left and exits.
    #[arg(long, default_value_t = 120)]
    drain_timeout_s: u64,
    /// Accept RTMP publishers on this address (e.g. `0.0.0.0:1935`) for `publish:` streams; off by default.
    #[arg(long, value_name = "HOST:PORT")]
    rtmp_listen: Option<std::net::SocketAddr>,
    /// Accept RTMPS publishers (RTMP over TLS, with --tls-cert/--tls-key) on this address (e.g. `0.0.0.0:1936`).
    #[arg(long, value_name = "HOST:PORT", requires = "tls_cert")]
    rtmps_listen: Option<std::net::SocketAddr>,
    /// Accept SRT publishers on this UDP address (e.g. `0.0.0.0:9000`), one port for every stream, routed by
    /// stream id; off by default.
    #[arg(long, value_name = "HOST:PORT")]
    srt_listen: Option<std::net::SocketAddr>,
    /// Host name publishers reach the ingest listeners at, in the publish URLs (default: the bound address, or
    /// this node's host name when bound to every address).
    #[arg(long)]
    ingest_public_host: Option<String>,
    /// Widest picture a publisher may send.
    #[arg(long, default_value_t = crate::config::IngestConfig::default().max_width)]
    ingest_max_width: u32,
    /// Tallest picture a publisher may send.
    #[arg(long, default_value_t = crate::config::IngestConfig::default().max_height)]
    ingest_max_height: u32,
    /// Highest input bitrate (mean over 5 s) a publisher may send, in kbit/s.
    #[arg(long, default_value_t = crate::config::IngestConfig::default().max_bitrate_kbps)]
    ingest_max_bitrate_kbps: u64,
    /// For a key or stream id kilnd does not know, POST `{"protocol","name","client_addr"}` here (2 s timeout):
    /// a 2xx `{"stream_id","preset","passphrase"}` creates the stream, a 4xx refuses the publisher.
    #[arg(long, value_name = "URL")]
    publish_auth_url: Option<String>,
    /// SRT receive latency in milliseconds.
    #[arg(long, default_value_t = 120)]
    srt_latency_ms: u64,
    /// Seconds a publisher's bytes may flow before the stream has decoded anything; then it is cut off.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=600))]
    ingest_first_picture_secs: u64,
    /// POST stream and job events here (JSON, signed; at least once, from an outbox under `--data-dir`).
    #[arg(long, value_name = "URL", requires = "webhook_secret_env", value_parser = parse_webhook_url)]
    webhook_url: Option<String>,
    /// The environment variable holding the webhooks' HMAC-SHA256 key (at least 16 bytes).
    #[arg(long, value_name = "ENV_VAR", requires = "webhook_url")]
    webhook_secret_env: Option<String>,
}

/// An `http(s)://` URL with a host.
fn parse_webhook_url(s: &str) -> Result<String, String> {
    let u = reqwest::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err("an http:// or https:// URL with a host".into());
    }
    Ok(s.to_string())
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Ramp concurrent streams of a preset until they fall behind real time (or past 80 % CPU) and write a CPU
    /// cost profile that advertises the sustainable count.
    Calibrate {
        #[arg(long, default_value = kiln_config::DEFAULT_PRESET)]
        preset: String,
        /// Where to write the profile.
        #[arg(long, default_value = "host-calibrated.toml")]
        out: PathBuf,
        /// Measurement window per step, in seconds.
        #[arg(long, default_value_t = 10)]
        window_secs: u64,
        /// Stream source for the ramp: a moving test pattern by default; better, a `file:///…` clip of the real
        /// workload (with --media-dir).
        #[arg(long, default_value = crate::calibrate::DEFAULT_SOURCE)]
        source: String,
        /// Skip measuring what serving viewers costs (by default measured after the ramp, two windows, and
        /// written as the profile's `[serving]` table).
        #[arg(long)]
        no_serving: bool,
    },
    /// Print a signed multivariant URL path for a stream (with the key of --playback-key-env) and exit.
    SignUrl {
        /// The stream id.
        stream: String,
        /// Lifetime of the URL, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

/// The binary's whole `main`: parses the process arguments and runs. Test harnesses build their own binaries
/// from it, so integration tests run the same code as the shipped binary.
pub fn main() -> anyhow::Result<()> {
    kiln_http::process::run(run)
}

// Long by design: flags into Config one after another, then the subcommands; each step is a few lines.
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    kiln_media::priority::set_streaming_nice(args.media_nice);
    let cpu_model = match &args.cpu_profile {
        Some(p) => kiln_config::parse_cpu_profile(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => kiln_config::builtin_cpu_profile(),
    };
    let presets = match &args.pipelines_dir {
        Some(dir) => Presets::load_dir(dir, kiln_config::DEFAULT_PRESET)?,
        None => Presets::builtin(),
    };
    if let Some(p) = &args.demo_preset {
        anyhow::ensure!(presets.get(p).is_some(), "unknown --demo-preset `{p}`");
    }
    let api_token = args
        .api_token_env
        .as_deref()
        .map(kiln_http::token_from_env)
        .transpose()?;
    let join_token = args
        .node_token_env
        .as_deref()
        .map(kiln_http::token_from_env)
        .transpose()?;
    let playback_key = match &args.playback_key_env {
        Some(var) => Some(
            std::env::var(var)
                .with_context(|| format!("environment variable {var} (playback key) is not set"))?
                .into_bytes(),
        ),
        None => None,
    };
    if let Some(Cmd::SignUrl { stream, ttl }) = &args.command {
        let key = playback_key
            .as_ref()
            .context("sign-url needs the playback key: --playback-key-env VAR")?;
        let signer = kiln_origin::signing::UrlSigner::new(key)
            .context("the playback key must be at least 16 bytes")?;
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + ttl;
        println!("/live/{stream}/master.m3u8?{}", signer.sign(stream, exp));
        return Ok(());
    }
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::TlsFiles { cert, key }),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(Cmd::Calibrate {
        preset,
        out,
        window_secs,
        source,
        no_serving,
    }) = &args.command
    {
        let config = crate::Config {
            presets,
            cpu_model,
            media_dir: args.media_dir.clone(),
            source_networks: args.allow_networks.clone(),
            ..Default::default()
        };
        let window = std::time::Duration::from_secs(*window_secs);
        let mut cal = crate::calibrate::run(
            config.clone(),
            preset,
            source,
            std::time::Duration::from_secs(3),
            window,
        )
        .await?;
        if !no_serving {
            // the ramp's profile is worth writing without it
            match crate::calibrate::serving(config, window).await {
                Ok(serving) => {
                    cal.model.serving = Some(serving.cost);
                    cal.serving = Some(serving);
                }
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    "serving not measured: the profile has no [serving] table"
                ),
            }
        }
        let text = cal.to_toml();
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        println!("{text}");
        println!(
            "# written to {}: run kilnd with --cpu-profile {}",
            out.display(),
            out.display()
        );
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let scheduler = (!args.scheduler.is_empty()).then(|| crate::agent::AgentConfig {
        schedulers: args
            .scheduler
            .iter()
            .map(|s| s.trim_end_matches('/').to_string())
            .collect(),
        advertise_url: args
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{bound}")),
        interval: std::time::Duration::from_millis(args.heartbeat_ms.max(100)),
        join_token,
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout_s),
    });
    let defaults = crate::Config::default();
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            let here = PathBuf::from("kiln-data");
            if std::fs::create_dir_all(&here).is_ok() {
                here
            } else {
                let tmp = std::env::temp_dir().join("kiln-data");
                tracing::warn!(dir = %tmp.display(), "cannot create ./kiln-data: VOD state goes to the temporary directory (pass --data-dir)");
                tmp
            }
        }
    };
    let webhooks = match (&args.webhook_url, &args.webhook_secret_env) {
        (Some(url), Some(var)) => Some(crate::webhooks::WebhookConfig {
            url: url.clone(),
            secret: kiln_http::token_from_env(var)?.into_bytes(),
            dir: data_dir.join("webhooks"),
        }),
        _ => None,
    };
    let config = crate::Config {
        node_id: args.node_id.clone().unwrap_or_else(|| {
            if args.scheduler.is_empty() {
                defaults.node_id.clone()
            } else {
                let host: String = defaults
                    .node_id
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .take(48)
                    .collect();
                format!("{host}-{}", bound.port())
            }
        }),
        jobs: Some(crate::jobs::JobsConfig {
            data_dir: data_dir.clone(),
            input_dir: args.vod_input_dir.clone(),
            max_concurrent: args.vod_concurrency.max(1),
            url_policy: args.allow_networks.clone(),
            max_input_bytes: args.vod_max_input_bytes,
            max_job_memory_mib: args.vod_max_job_memory_mib,
            max_duration_s: args.vod_max_duration_hours.saturating_mul(3600),
            retention: (args.vod_retention_hours > 0)
                .then(|| std::time::Duration::from_secs(args.vod_retention_hours * 3600)),
        }),
        scheduler,
        cpu_model,
        tls,
        playback_key,
        presets,
        demo: args.demo,
        demo_preset: args.demo_preset,
        window_segments: args.window_segments.into(),
        assets_dir: args.assets_dir,
        media_dir: args.media_dir,
        source_networks: args.allow_networks.clone(),
        api_token,
        control_cors_origins: args.cors_allow_origin.clone(),
        metrics_require_token: args.metrics_require_token,
        http_limits: kiln_http::server::Limits {
            max_connections: args.max_connections,
            header_timeout: std::time::Duration::from_secs(args.header_timeout_secs),
            write_stall: std::time::Duration::from_secs(args.write_stall_secs),
            ..Default::default()
        },
        gpus: args.no_gpu.then(Vec::new),
        ingest: crate::config::IngestConfig {
            rtmp_listen: args.rtmp_listen,
            rtmps_listen: args.rtmps_listen,
            srt_listen: args.srt_listen,
            public_host: args.ingest_public_host.clone(),
            max_width: args.ingest_max_width,
            max_height: args.ingest_max_height,
            max_bitrate_kbps: args.ingest_max_bitrate_kbps,
            auth_url: args.publish_auth_url.clone(),
            srt_latency: std::time::Duration::from_millis(args.srt_latency_ms),
            first_picture_timeout: std::time::Duration::from_secs(args.ingest_first_picture_secs),
            ..Default::default()
        },
        webhooks,
        ..defaults
    };
    let state = crate::AppState::new(config)?;
    if let Some(sockets) = state.ingest.lock().as_ref() {
        if let Some(a) = sockets.rtmp_addr() {
            println!("kilnd rtmp ingest on rtmp://{a}/live");
        }
        if let Some(a) = sockets.rtmps_addr() {
            println!("kilnd rtmps ingest on rtmps://{a}/live");
        }
        if let Some(a) = sockets.srt_addr() {
            println!("kilnd srt ingest on srt://{a}");
        }
    }
    // The contract for scripts and tests: one line on stdout with the bound address (after the ingest lines).
    println!("kilnd listening on {scheme}://{bound}");
    crate::serve_state(state, listener, kiln_http::shutdown_signal()).await
}

/// An origin as browsers send it: `scheme://host[:port]`, http or https, nothing after it.
fn parse_origin(s: &str) -> Result<axum::http::HeaderValue, String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or("an origin starts with http:// or https://")?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '*']) {
        return Err("an origin is scheme://host[:port], with no path, wildcard or space".into());
    }
    axum::http::HeaderValue::from_str(s).map_err(|e| e.to_string())
}

fn parse_url_policy(s: &str) -> Result<kiln_model::net::UrlPolicy, String> {
    kiln_model::net::UrlPolicy::parse(s).map_err(|e| e.to_string())
}
