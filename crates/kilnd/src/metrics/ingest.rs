//! Live ingest series (`kiln_ingest_*`): what publishers send, by protocol, and why any were refused or cut off.
//! Listed with the rest in `docs/metrics.md`.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// `protocol` label values.
pub const PROTOCOLS: [&str; 2] = ["rtmp", "srt"];

/// `reason` label values of rejections and disconnections (`Refusal::label`; disconnections also have `left`).
pub const REASONS: [&str; 15] = [
    "unknown_key",
    "unknown_stream",
    "bad_passphrase",
    "no_passphrase",
    "busy",
    "auth_denied",
    "auth_error",
    "codec",
    "too_large",
    "bitrate",
    "protocol",
    "timeout",
    "pipeline",
    "stopping",
    "no_picture",
];

/// The ingest metric handles.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Bytes received from publishers (rate() = input bitrate per protocol).
    pub bytes: IntCounterVec,
    /// Video frames decoded from publishers.
    pub frames: IntCounterVec,
    /// Publishers accepted (their stream started).
    pub connects: IntCounterVec,
    /// Publishers gone, by why (`left`: they ended; any refusal reason: the daemon cut them off).
    pub disconnects: IntCounterVec,
    /// Publishers refused before anything was built, by why.
    pub rejections: IntCounterVec,
    /// Publishers connected now.
    pub publishers: IntGaugeVec,
    /// Per stream: input bitrate of its publisher, mean since it connected (bits/s).
    pub bitrate: IntGaugeVec,
    /// Per publish stream: times its source was lost while it ran (the slate went on, or it ended).
    pub source_losses: IntCounterVec,
    /// Per publish stream: publishers that came back and took over from the slate.
    pub reconnects: IntCounterVec,
    /// Per publish stream: seconds on the slate in all.
    pub slate_seconds: prometheus::CounterVec,
    /// Per publish stream: 1 while the slate is on air.
    pub on_slate: IntGaugeVec,
    /// Per stream with a backup: switches between its source and its backup, by the input that went on air.
    pub failovers: IntCounterVec,
    /// Per resilient stream: 1 for the input on air (`source`, `backup`, `slate`), 0 for the others.
    pub active_input: IntGaugeVec,
}

/// The values of `kiln_stream_active_input`'s `input` label.
const INPUTS: [&str; 3] = ["source", "backup", "slate"];

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are static and valid")
}

impl IngestMetrics {
    // Long by design: one definition per series, then every known label value at 0.
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let m = Self {
            bytes: counter(
                "kiln_ingest_bytes_total",
                "Bytes received from publishers (rate() gives the input bitrate)",
                &["protocol"],
            ),
            frames: counter(
                "kiln_ingest_frames_total",
                "Video frames decoded from publishers",
                &["protocol"],
            ),
            connects: counter(
                "kiln_ingest_connections_total",
                "Publishers accepted (authorized, pipeline started)",
                &["protocol"],
            ),
            disconnects: counter(
                "kiln_ingest_disconnections_total",
                "Publishers gone: reason `left` when they ended, else why the daemon cut them off",
                &["protocol", "reason"],
            ),
            rejections: counter(
                "kiln_ingest_rejections_total",
                "Publishers refused before any pipeline was built",
                &["protocol", "reason"],
            ),
            publishers: gauge(
                "kiln_ingest_publishers",
                "Publishers connected now",
                &["protocol"],
            ),
            bitrate: gauge(
                "kiln_ingest_bitrate_bps",
                "Input bitrate of a stream's publisher, mean since it connected",
                &["stream", "protocol"],
            ),
            source_losses: counter(
                "kiln_stream_source_losses_total",
                "Times a running publish stream lost its source (the slate went on, or the stream ended)",
                &["stream"],
            ),
            reconnects: counter(
                "kiln_stream_reconnects_total",
                "Publishers that came back to a stream on the slate and took over from it",
                &["stream"],
            ),
            slate_seconds: {
                let c = must(prometheus::CounterVec::new(
                    Opts::new(
                        "kiln_stream_slate_seconds_total",
                        "Seconds a publish stream spent on the slate",
                    ),
                    &["stream"],
                ));
                must(registry.register(Box::new(c.clone())));
                c
            },
            on_slate: gauge(
                "kiln_stream_on_slate",
                "1 while a publish stream shows the slate (its source is gone)",
                &["stream"],
            ),
            failovers: counter(
                "kiln_stream_failovers_total",
                "Switches between a stream's source and its backup, by the input that went on air (backup: \
                 failover, source: failback)",
                &["stream", "to"],
            ),
            active_input: gauge(
                "kiln_stream_active_input",
                "1 for the input on air (source, backup or slate), 0 for the others",
                &["stream", "input"],
            ),
        };
        for p in PROTOCOLS {
            m.bytes.with_label_values(&[p]);
            m.frames.with_label_values(&[p]);
            m.connects.with_label_values(&[p]);
            m.publishers.with_label_values(&[p]);
            m.disconnects.with_label_values(&[p, "left"]);
            for r in REASONS {
                m.rejections.with_label_values(&[p, r]);
                m.disconnects.with_label_values(&[p, r]);
            }
        }
        m
    }

    /// A publish stream's resilience series, at 0.
    pub fn init_stream(&self, stream: &str) {
        self.source_losses.with_label_values(&[stream]);
        self.reconnects.with_label_values(&[stream]);
        self.slate_seconds.with_label_values(&[stream]);
        self.on_slate.with_label_values(&[stream]);
        for to in ["backup", "source"] {
            self.failovers.with_label_values(&[stream, to]);
        }
        for input in INPUTS {
            self.active_input.with_label_values(&[stream, input]);
        }
    }

    /// Drops a publish stream's resilience series.
    pub fn forget_stream(&self, stream: &str) {
        let _ = self.source_losses.remove_label_values(&[stream]);
        let _ = self.reconnects.remove_label_values(&[stream]);
        let _ = self.slate_seconds.remove_label_values(&[stream]);
        let _ = self.on_slate.remove_label_values(&[stream]);
        for to in ["backup", "source"] {
            let _ = self.failovers.remove_label_values(&[stream, to]);
        }
        for input in INPUTS {
            let _ = self.active_input.remove_label_values(&[stream, input]);
        }
    }

    /// Sets `kiln_stream_active_input` of `stream` to `on_air` (`None`: nothing on air yet).
    pub fn set_active_input(&self, stream: &str, on_air: Option<&str>) {
        for input in INPUTS {
            self.active_input
                .with_label_values(&[stream, input])
                .set(i64::from(on_air == Some(input)));
        }
    }
}
