//! Prometheus metrics of the daemon. Every series is listed, with unit and labels, in `docs/metrics.md`, and a
//! compliance test scrapes `/metrics` during a live stream to check that each documented series is there.
//!
//! Names follow `kiln_<name>_<unit>[_total]`. Per-stream series are removed when the stream is dropped.

use std::time::Duration;

pub mod ingest;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// `reason` values of `kiln_stream_refusals_total`.
pub const REFUSAL_REASONS: [&str; 15] = [
    "invalid",
    "policy",
    "source_file",
    "source_address",
    "conflict",
    "not_found",
    "pipeline",
    "shutting_down",
    "draining",
    "cpu_millicores",
    "memory_mib",
    "nvenc_fps",
    "nvdec_fps",
    "encoder_sessions",
    "vram_mib",
];
/// `reason` values of `kiln_fallbacks_total`.
pub const FALLBACK_REASONS: [&str; 1] = ["encoder_error"];

/// The daemon's metric handles (one set per process, passed in the app state).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub parts_published: IntCounterVec,
    pub output_bytes: IntCounterVec,
    pub media_seconds: GaugeVec,
    pub part_publish_latency: HistogramVec,
    pub realtime_ratio: GaugeVec,
    pub streams: IntGaugeVec,
    /// 1 per live stream, labelled with where it encodes now (set at scrape time).
    pub stream_backend: IntGaugeVec,
    pub stream_errors: IntCounterVec,
    pub fallbacks: IntCounterVec,
    /// Source frames into the video tee (rate() = input fps).
    pub input_frames: IntCounterVec,
    /// Per rendition: frames handed to the encoder (rate() = output fps), dropped and duplicated by videorate.
    pub encoded_frames: IntCounterVec,
    pub dropped_frames: IntCounterVec,
    pub duplicated_frames: IntCounterVec,
    pub refusals: IntCounterVec,
    /// `kiln_http_requests_total`, `kiln_http_request_duration_seconds`, `kiln_http_response_bytes_total`.
    pub http: RequestMetrics,
    /// Per running stream (set at scrape time): the recent real-time ratio and whether it falls behind.
    pub stream_recent_realtime: GaugeVec,
    pub stream_behind: IntGaugeVec,
    /// `measured` and `reserved` millicores of the serving load (and `calibrated`, with a calibrated profile).
    pub serving: IntGaugeVec,
    /// Requests/s the free CPU could still answer at the calibrated serving costs (0 without calibration).
    pub serving_headroom_rps: IntGauge,
    pub parked_requests: IntGauge,
    /// Playback GETs answered without the router ([`crate::front`]).
    pub direct_answers: prometheus::IntCounter,
    /// Of those, the ones answered on kiln's own HTTP/1.1 (`kiln_http::h1`).
    pub own_http1_answers: prometheus::IntCounter,
    pub capacity: IntGaugeVec,
    /// Per GPU (labels gpu, model): NVML telemetry, set at scrape time.
    pub gpu_nvenc_utilization: GaugeVec,
    pub gpu_nvdec_utilization: GaugeVec,
    pub gpu_encoder_sessions: IntGaugeVec,
    pub gpu_vram_used_bytes: IntGaugeVec,
    /// Per GPU, per dimension: capacity, allocated, free.
    pub gpu_resources: IntGaugeVec,
    /// VOD jobs by state (set at scrape time).
    pub vod_jobs: IntGaugeVec,
    /// Media seconds of input transcoded by finished VOD jobs.
    pub vod_media_seconds: prometheus::Counter,
    /// Wall-clock seconds finished VOD jobs ran.
    pub vod_busy_seconds: prometheus::Counter,
    /// Bytes of `http(s)` VOD inputs downloaded (counted when the job ends).
    pub vod_input_bytes: prometheus::IntCounter,
    /// Live ingest (`kiln_ingest_*`).
    pub ingest: ingest::IngestMetrics,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are static and valid")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Sets `kiln_vod_jobs{state}` from the job list.
    pub fn set_vod_jobs(&self, jobs: &[kiln_model::vod::JobStatus]) {
        use kiln_model::vod::JobState;
        for (state, name) in [
            (JobState::Queued, "queued"),
            (JobState::Running, "running"),
            (JobState::Done, "done"),
            (JobState::Failed, "failed"),
            (JobState::Cancelled, "cancelled"),
        ] {
            self.vod_jobs
                .with_label_values(&[name])
                .set(jobs.iter().filter(|j| j.state == state).count() as i64);
        }
    }

    // Long by design: a declaration list: one registration per exported series, in the order docs/metrics.md lists them.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let parts_published = counter(
            "kiln_parts_published_total",
            "LL-HLS parts published, per rendition",
            &["stream", "rendition"],
        );
        let output_bytes = counter(
            "kiln_output_bytes_total",
            "Encoded CMAF bytes published (rate() gives the output bitrate)",
            &["stream", "rendition"],
        );
        let stream_errors = counter(
            "kiln_stream_errors_total",
            "Pipeline errors, per stream",
            &["stream"],
        );
        let fallbacks = counter(
            "kiln_fallbacks_total",
            "Pipelines rebuilt after an encoder failed mid-stream",
            &["stream", "reason"],
        );
        let input_frames = counter(
            "kiln_input_frames_total",
            "Source frames into the video tee (after decoding); rate() is the input fps",
            &["stream"],
        );
        let encoded_frames = counter(
            "kiln_encoded_frames_total",
            "Frames handed to the rendition's encoder; rate() is the output fps",
            &["stream", "rendition"],
        );
        let dropped_frames = counter(
            "kiln_dropped_frames_total",
            "Source frames dropped for the rendition (rate conversion or late frames)",
            &["stream", "rendition"],
        );
        let duplicated_frames = counter(
            "kiln_duplicated_frames_total",
            "Frames repeated for the rendition to fill gaps in the source",
            &["stream", "rendition"],
        );
        let refusals = counter(
            "kiln_stream_refusals_total",
            "Stream requests refused, by reason",
            &["reason"],
        );
        let requests = counter(
            "kiln_http_requests_total",
            "HTTP requests by kind and status code",
            &["kind", "status"],
        );
        let response_bytes = counter(
            "kiln_http_response_bytes_total",
            "Response body bytes by request kind (bodies of a known length)",
            &["kind"],
        );
        let stream_recent_realtime = must(GaugeVec::new(
            Opts::new(
                "kiln_stream_recent_realtime_ratio",
                "Media seconds of the slowest rendition per wall-clock second over the last 10 s",
            ),
            &["stream"],
        ));
        must(registry.register(Box::new(stream_recent_realtime.clone())));
        let stream_behind = must(IntGaugeVec::new(
            Opts::new(
                "kiln_stream_behind_real_time",
                "1 while a running stream publishes below 0.9 x real time over the last 10 s",
            ),
            &["stream"],
        ));
        must(registry.register(Box::new(stream_behind.clone())));
        let serving = must(IntGaugeVec::new(
            Opts::new(
                "kiln_serving_millicores",
                "Time the HTTP server spends answering (viewers and the control API) per second: measured, and reserved from admission",
            ),
            &["kind"],
        ));
        must(registry.register(Box::new(serving.clone())));
        let serving_headroom_rps = must(IntGauge::new(
            "kiln_serving_headroom_requests_per_second",
            "Requests/s more that the CPU admission has left could answer, at the serving costs `kilnd calibrate` measured on this host (answers of the mean size served now); 0 without a calibrated profile",
        ));
        must(registry.register(Box::new(serving_headroom_rps.clone())));
        let media_seconds = must(GaugeVec::new(
            Opts::new(
                "kiln_media_seconds_total",
                "Seconds of media published (rate() ≥ 1 means real time)",
            ),
            &["stream", "rendition"],
        ));
        must(registry.register(Box::new(media_seconds.clone())));
        let realtime_ratio = must(GaugeVec::new(
            Opts::new(
                "kiln_stream_realtime_ratio",
                "Media seconds published per wall-clock second since the stream's first part (slowest rendition)",
            ),
            &["stream"],
        ));
        must(registry.register(Box::new(realtime_ratio.clone())));
        let part_publish_latency = must(HistogramVec::new(
            HistogramOpts::new(
                "kiln_part_publish_latency_seconds",
                "Time from the muxer handing over a part to its playlist being published",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
            ]),
            &["stream", "rendition"],
        ));
        must(registry.register(Box::new(part_publish_latency.clone())));
        let request_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "kiln_http_request_duration_seconds",
                "HTTP request duration by kind (blocking requests include their wait)",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0,
            ]),
            &["kind"],
        ));
        must(registry.register(Box::new(request_duration.clone())));
        let streams = must(IntGaugeVec::new(
            Opts::new("kiln_streams", "Live streams by state"),
            &["state"],
        ));
        must(registry.register(Box::new(streams.clone())));
        let stream_backend = must(IntGaugeVec::new(
            Opts::new(
                "kiln_stream_backend",
                "1 per stream, labelled with the encoder backend in use (cpu, nvenc), its GPU and its policy",
            ),
            &["stream", "backend", "gpu", "policy"],
        ));
        must(registry.register(Box::new(stream_backend.clone())));
        let parked_requests = must(IntGauge::new(
            "kiln_origin_parked_requests",
            "Requests waiting for a publish (blocking reloads, hinted parts, streamed segments)",
        ));
        must(registry.register(Box::new(parked_requests.clone())));
        let direct_answers = must(prometheus::IntCounter::new(
            "kiln_http_direct_requests_total",
            "Playback GETs taken off the router (plain /live/ paths, answered by the origin directly); a subset of kiln_http_requests_total",
        ));
        must(registry.register(Box::new(direct_answers.clone())));
        let own_http1_answers = must(prometheus::IntCounter::new(
            "kiln_http_own_http1_requests_total",
            "Direct playback GETs answered on kiln's own HTTP/1.1 (plain TCP, not hyper); a subset of kiln_http_direct_requests_total",
        ));
        must(registry.register(Box::new(own_http1_answers.clone())));
        let capacity = must(IntGaugeVec::new(
            Opts::new(
                "kiln_node_resources",
                "Node resources per dimension (units in the dimension name): capacity, allocated (booked by admission), free, measured",
            ),
            &["dimension", "kind"],
        ));
        must(registry.register(Box::new(capacity.clone())));
        let gpu_gauge = |name: &str, help: &str| {
            let g = must(GaugeVec::new(Opts::new(name, help), &["gpu", "model"]));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let gpu_int_gauge = |name: &str, help: &str| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), &["gpu", "model"]));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let gpu_nvenc_utilization = gpu_gauge(
            "kiln_gpu_nvenc_utilization_ratio",
            "NVENC utilisation over NVML's sampling period (0-1)",
        );
        let gpu_nvdec_utilization = gpu_gauge(
            "kiln_gpu_nvdec_utilization_ratio",
            "NVDEC utilisation over NVML's sampling period (0-1)",
        );
        let gpu_encoder_sessions = gpu_int_gauge(
            "kiln_gpu_encoder_sessions",
            "Active NVENC sessions on the GPU (all processes)",
        );
        let gpu_vram_used_bytes = gpu_int_gauge(
            "kiln_gpu_vram_used_bytes",
            "GPU memory in use (all processes)",
        );
        let gpu_resources = must(IntGaugeVec::new(
            Opts::new(
                "kiln_gpu_resources",
                "Per-GPU resources per dimension (nvenc_fps, nvdec_fps, encoder_sessions, vram_mib): capacity, allocated, free",
            ),
            &["gpu", "dimension", "kind"],
        ));
        must(registry.register(Box::new(gpu_resources.clone())));
        let vod_jobs = must(IntGaugeVec::new(
            Opts::new(
                "kiln_vod_jobs",
                "VOD jobs by state (queued, running, done, failed, cancelled)",
            ),
            &["state"],
        ));
        must(registry.register(Box::new(vod_jobs.clone())));
        for s in ["queued", "running", "done", "failed", "cancelled"] {
            vod_jobs.with_label_values(&[s]);
        }
        let vod_media_seconds = must(prometheus::Counter::new(
            "kiln_vod_media_seconds_total",
            "Input media seconds transcoded by finished VOD jobs (rate() over busy seconds = speed)",
        ));
        must(registry.register(Box::new(vod_media_seconds.clone())));
        let vod_busy_seconds = must(prometheus::Counter::new(
            "kiln_vod_busy_seconds_total",
            "Wall-clock seconds spent by finished VOD jobs",
        ));
        must(registry.register(Box::new(vod_busy_seconds.clone())));
        let vod_input_bytes = must(prometheus::IntCounter::new(
            "kiln_vod_input_bytes_total",
            "Bytes of http(s) VOD inputs downloaded (network ingress of VOD), counted when each job ends",
        ));
        must(registry.register(Box::new(vod_input_bytes.clone())));
        must(registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        must(registry.register(Box::new(ConnectionsClosed::new())));
        // Known label values start at 0, so rate() and alerts work before the first event.
        for reason in REFUSAL_REASONS {
            refusals.with_label_values(&[reason]);
        }
        let ingest = ingest::IngestMetrics::new(&registry);
        Self {
            ingest,
            registry,
            parts_published,
            output_bytes,
            media_seconds,
            part_publish_latency,
            realtime_ratio,
            streams,
            stream_backend,
            stream_errors,
            fallbacks,
            input_frames,
            encoded_frames,
            dropped_frames,
            duplicated_frames,
            refusals,
            http: RequestMetrics::new(requests, request_duration, response_bytes),
            stream_recent_realtime,
            stream_behind,
            serving,
            serving_headroom_rps,
            parked_requests,
            direct_answers,
            own_http1_answers,
            vod_jobs,
            vod_media_seconds,
            vod_busy_seconds,
            vod_input_bytes,
            gpu_nvenc_utilization,
            gpu_nvdec_utilization,
            gpu_encoder_sessions,
            gpu_vram_used_bytes,
            gpu_resources,
            capacity,
        }
    }

    /// Records one published part.
    pub fn part(
        &self,
        stream: &str,
        rendition: &str,
        bytes: usize,
        media: Duration,
        latency: Duration,
    ) {
        let l = [stream, rendition];
        self.parts_published.with_label_values(&l).inc();
        self.output_bytes.with_label_values(&l).inc_by(bytes as u64);
        self.media_seconds
            .with_label_values(&l)
            .add(media.as_secs_f64());
        self.part_publish_latency
            .with_label_values(&l)
            .observe(latency.as_secs_f64());
    }

    /// Creates a new stream's counters at 0.
    pub fn init_stream(&self, stream: &str) {
        self.stream_errors.with_label_values(&[stream]);
        for reason in FALLBACK_REASONS {
            self.fallbacks.with_label_values(&[stream, reason]);
        }
    }

    /// Drops a stream's series.
    pub fn forget_stream(&self, stream: &str, renditions: &[String]) {
        for r in renditions {
            let l = [stream, r.as_str()];
            let _ = self.parts_published.remove_label_values(&l);
            let _ = self.output_bytes.remove_label_values(&l);
            let _ = self.media_seconds.remove_label_values(&l);
            let _ = self.part_publish_latency.remove_label_values(&l);
            let _ = self.encoded_frames.remove_label_values(&l);
            let _ = self.dropped_frames.remove_label_values(&l);
            let _ = self.duplicated_frames.remove_label_values(&l);
        }
        let _ = self.input_frames.remove_label_values(&[stream]);
        let _ = self.realtime_ratio.remove_label_values(&[stream]);
        let _ = self.stream_errors.remove_label_values(&[stream]);
        for reason in FALLBACK_REASONS {
            let _ = self.fallbacks.remove_label_values(&[stream, reason]);
        }
    }

    /// Adds a stream's frame counters since the last scrape (`delta`).
    pub fn frames(&self, stream: &str, delta: &kiln_media::FrameStats) {
        self.input_frames
            .with_label_values(&[stream])
            .inc_by(delta.input);
        for r in &delta.renditions {
            let l = [stream, r.name.as_str()];
            self.encoded_frames.with_label_values(&l).inc_by(r.encoded);
            self.dropped_frames.with_label_values(&l).inc_by(r.dropped);
            self.duplicated_frames
                .with_label_values(&l)
                .inc_by(r.duplicated);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// `kiln_http_connections_closed_total{reason}`: connections the HTTP server closed on its own, and
/// `kiln_http_streams_reset_total{reason}`: HTTP/2 streams it reset on its own, from kiln-http's process-wide
/// counts, read at each scrape.
struct ConnectionsClosed {
    counts: IntCounterVec,
    streams: IntCounterVec,
    /// Two scrapes at once would each add the same difference.
    update: parking_lot::Mutex<()>,
}

impl ConnectionsClosed {
    fn new() -> Self {
        let counts = must(IntCounterVec::new(
            Opts::new(
                "kiln_http_connections_closed_total",
                "Connections the HTTP server closed on its own: a write to the client waited --write-stall-secs, or an idle HTTP/2 connection did not close after its GOAWAY with no stream in progress for that time (write_stall); or a new connection came at --max-connections (over_cap)",
            ),
            &["reason"],
        ));
        let streams = must(IntCounterVec::new(
            Opts::new(
                "kiln_http_streams_reset_total",
                "HTTP/2 streams the HTTP server reset on its own: a piece of the answer got no room to send (flow-control window or send buffer) for --write-stall-secs (write_stall)",
            ),
            &["reason"],
        ));
        ConnectionsClosed {
            counts,
            streams,
            update: parking_lot::Mutex::new(()),
        }
    }
}

impl prometheus::core::Collector for ConnectionsClosed {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.counts.desc();
        d.extend(self.streams.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _one = self.update.lock();
        for (reason, n) in [
            ("write_stall", kiln_http::server::connections_stalled()),
            ("over_cap", kiln_http::server::connections_refused()),
        ] {
            let c = self.counts.with_label_values(&[reason]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        let c = self.streams.with_label_values(&["write_stall"]);
        c.inc_by(kiln_http::server::streams_stalled().saturating_sub(c.get()));
        let mut families = self.counts.collect();
        families.extend(self.streams.collect());
        families
    }
}

/// CPU used by this process over the last sampling window (millicores), from /proc/self/stat; 0 elsewhere.
/// The window is the time since the previous call (first call: since process start).
pub fn process_cpu_millicores() -> u64 {
    use parking_lot::Mutex;
    static LAST: Mutex<Option<(std::time::Instant, u64)>> = Mutex::new(None);
    let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // fields after the command: state(0) … utime(11) stime(12), in clock ticks (100 Hz on Linux)
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
    else {
        return 0;
    };
    let now = std::time::Instant::now();
    let mut last = LAST.lock();
    let (t0, k0) = last.unwrap_or((now - std::time::Duration::from_secs(1), 0));
    *last = Some((now, ticks));
    let secs = now.duration_since(t0).as_secs_f64().max(0.001);
    ((ticks.saturating_sub(k0)) as f64 * 10.0 / secs) as u64
}

/// Resident memory of this process in MiB.
pub fn process_rss_mib() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:").map_or(0, |kib| kib / 1024)
}

/// The number after `key` in a `/proc` file of `Key:   value kB` lines (`/proc/meminfo`, `/proc/self/status`).
pub fn proc_kib(file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(file).ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    })
}

/// The `kind` label values of the HTTP series, in [`request_kind_index`]'s order.
pub const REQUEST_KINDS: [&str; 11] = [
    "master",
    "mpd",
    "playlist_blocking",
    "playlist",
    "part",
    "segment",
    "init",
    "other_media",
    "metrics",
    "api",
    "other",
];

/// A request's `kind` label (bounded: never the path itself).
pub fn request_kind(path: &str, query: Option<&str>) -> &'static str {
    REQUEST_KINDS[request_kind_index(path, query)]
}

/// The index in [`REQUEST_KINDS`] of a request's kind.
pub fn request_kind_index(path: &str, query: Option<&str>) -> usize {
    let blocking = query.is_some_and(|q| q.contains("_HLS_msn") || q.contains("_HLS_part"));
    if let Some(rest) = path.strip_prefix("/live/") {
        // (a byte search: `rsplit('/')` and `rfind('/')` set up a char searcher, a measurable share of a part's answer)
        let file = rest
            .bytes()
            .rposition(|b| b == b'/')
            .map_or(rest, |i| &rest[i + 1..]);
        return match file {
            "master.m3u8" => 0,
            "manifest.mpd" => 1,
            "index.m3u8" if blocking => 2,
            "index.m3u8" => 3,
            f if f.starts_with("part-") => 4,
            f if f.starts_with("seg-") => 5,
            f if f.starts_with("init") => 6,
            _ => 7,
        };
    }
    match path {
        "/metrics" => 8,
        p if p.starts_with("/v1/") => 9,
        _ => 10,
    }
}

/// The status codes whose request counters are resolved once and kept (any other code is looked up per request).
const COMMON_STATUSES: [u16; 9] = [200, 204, 206, 304, 400, 403, 404, 416, 503];

/// `kiln_http_requests_total` and `kiln_http_request_duration_seconds` for the request path. A labelled series'
/// handle is resolved on its first request and kept: `with_label_values` hashes the labels and takes the
/// vector's lock, on every request, which is a measurable share of answering a part from memory. A series still
/// appears in `/metrics` only once a request has used it.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    bytes: IntCounterVec,
    byte_counters: [std::sync::OnceLock<prometheus::IntCounter>; REQUEST_KINDS.len()],
    /// Every request and every body byte counted, for the serving load ([`crate::load`]).
    total_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    total_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    counters:
        [[std::sync::OnceLock<prometheus::IntCounter>; COMMON_STATUSES.len()]; REQUEST_KINDS.len()],
    timers: [std::sync::OnceLock<prometheus::Histogram>; REQUEST_KINDS.len()],
}

impl RequestMetrics {
    pub fn new(requests: IntCounterVec, duration: HistogramVec, bytes: IntCounterVec) -> Self {
        RequestMetrics {
            requests,
            duration,
            bytes,
            byte_counters: std::array::from_fn(|_| Default::default()),
            total_requests: Default::default(),
            total_bytes: Default::default(),
            counters: std::array::from_fn(|_| std::array::from_fn(|_| Default::default())),
            timers: std::array::from_fn(|_| Default::default()),
        }
    }

    /// Requests answered and body bytes counted since the start.
    pub fn totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.total_requests.load(Relaxed),
            self.total_bytes.load(Relaxed),
        )
    }

    /// Counts one answered request of kind `kind` (an index in [`REQUEST_KINDS`]) with a body of `body_bytes`
    /// (when known before it is sent) and records its duration.
    pub fn observe(
        &self,
        kind: usize,
        status: axum::http::StatusCode,
        body_bytes: Option<u64>,
        elapsed: Duration,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        self.total_requests.fetch_add(1, Relaxed);
        if let Some(n) = body_bytes {
            self.total_bytes.fetch_add(n, Relaxed);
            self.byte_counters[kind]
                .get_or_init(|| self.bytes.with_label_values(&[REQUEST_KINDS[kind]]))
                .inc_by(n);
        }
        let name = REQUEST_KINDS[kind];
        let code = status.as_u16();
        match COMMON_STATUSES.iter().position(|c| *c == code) {
            Some(i) => self.counters[kind][i]
                .get_or_init(|| self.requests.with_label_values(&[name, status.as_str()]))
                .inc(),
            None => self
                .requests
                .with_label_values(&[name, status.as_str()])
                .inc(),
        }
        self.timers[kind]
            .get_or_init(|| self.duration.with_label_values(&[name]))
            .observe(elapsed.as_secs_f64());
    }
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_bounded() {
        assert_eq!(
            request_kind("/live/a/hi/index.m3u8", Some("_HLS_msn=1")),
            "playlist_blocking"
        );
        assert_eq!(request_kind("/live/a/hi/index.m3u8", None), "playlist");
        assert_eq!(request_kind("/live/a/hi/part-1-2.m4s", None), "part");
        assert_eq!(request_kind("/live/a/master.m3u8", None), "master");
        assert_eq!(request_kind("/v1/streams/x", None), "api");
        assert_eq!(request_kind("/../../etc/passwd", None), "other");
    }

    /// The server's own closes are read from kiln-http at each scrape, both reasons present from the start.
    #[test]
    fn the_server_s_own_closes_are_exported() {
        let m = Metrics::new();
        let text = m.render();
        for (reason, n) in [
            ("write_stall", kiln_http::server::connections_stalled()),
            ("over_cap", kiln_http::server::connections_refused()),
        ] {
            let line = format!("kiln_http_connections_closed_total{{reason=\"{reason}\"}} {n}\n");
            assert!(text.contains(&line), "{line}: {text}");
        }
        let n = kiln_http::server::streams_stalled();
        let line = format!("kiln_http_streams_reset_total{{reason=\"write_stall\"}} {n}\n");
        assert!(text.contains(&line), "{line}: {text}");
    }

    #[test]
    fn parts_are_counted_and_forgotten() {
        let m = Metrics::new();
        m.part(
            "s",
            "hi",
            1000,
            Duration::from_millis(333),
            Duration::from_micros(300),
        );
        let text = m.render();
        assert!(
            text.contains(r#"kiln_parts_published_total{rendition="hi",stream="s"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"kiln_output_bytes_total{rendition="hi",stream="s"} 1000"#));
        m.forget_stream("s", &["hi".into()]);
        assert!(!m.render().contains(r#"stream="s""#));
    }
}
