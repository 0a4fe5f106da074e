//! Control-API documents returned by the daemon (`GET /v1/streams[/{id}]`).

use serde::{Deserialize, Serialize};

use crate::stream::{Backend, Policy};

/// Life cycle of a live stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamState {
    /// A `publish:` stream with no publisher: nothing is encoding; the next publisher continues the timeline.
    Waiting,
    /// The pipeline is being built or has not produced its first part yet.
    Starting,
    /// Parts are being published.
    Running,
    /// Stopping: EOS sent, waiting for the last parts.
    Stopping,
    /// Ended cleanly (playlists carry ENDLIST).
    Ended,
    /// The pipeline failed; `error` says why.
    Failed,
}

/// One rendition as the status document shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenditionStatus {
    pub name: String,
    /// `video` or `audio`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    pub bitrate_kbps: u32,
    /// RFC 6381 codec string once the init segment is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codecs: Option<String>,
    /// Playlist path relative to the daemon root.
    pub playlist: String,
    /// Media sequence number of the newest segment (open or closed), once one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_msn: Option<u64>,
    /// Index of the newest part in `last_msn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_part: Option<u64>,
    /// Parts published so far.
    pub parts_published: u64,
    /// The source's own bitstream, not re-encoded (its size is the source's, its bitrate the one stated).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

/// `GET /v1/streams/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamStatus {
    pub id: String,
    pub state: StreamState,
    pub source: String,
    /// Multivariant playlist path.
    pub playback: String,
    pub renditions: Vec<RenditionStatus>,
    /// Where the stream may encode.
    pub policy: Policy,
    /// Where it encodes now (changes on a fallback).
    pub backend: Backend,
    /// GPU whose NVDEC decodes an encoded source, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_gpu: Option<u32>,
    /// Pipeline rebuilds after encoder failures, oldest first.
    #[serde(default)]
    pub fallbacks: Vec<Fallback>,
    /// Errors seen by the pipeline, newest last.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Unix milliseconds when the stream was created.
    pub created_unix_ms: u64,
    /// A `publish:` stream's connected publisher (never its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<crate::ingest::PublisherStatus>,
    /// A `publish:` stream's key, passphrase and publish URLs: in the 201 answer that created it, and nowhere
    /// else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<crate::ingest::IngestInfo>,
    /// A `publish:` stream's resilience: what is on air, and how often the source was lost and came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resilience: Option<Resilience>,
    /// What an operator should know that is not an error (a source GOP longer than the segment target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Media seconds published per wall-clock second over the last seconds (the slowest rendition), once the
    /// window is long enough to judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent_realtime_ratio: Option<f64>,
    /// `recent_realtime_ratio` is below 0.9 while the stream runs: it falls behind real time.
    #[serde(default)]
    pub behind_real_time: bool,
}

/// What feeds a running stream and its history of losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resilience {
    /// What is on air: `source`, `slate`, or `none` (no pipeline: waiting for the first publisher).
    pub active_input: String,
    /// Unix milliseconds since when the slate is on (while it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slate_since_unix_ms: Option<u64>,
    /// When the stream ends if no publisher comes back (while the slate is on and the window is not 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at_unix_ms: Option<u64>,
    pub source_losses: u64,
    pub reconnects: u64,
    /// Attempts to pull a lost source (SRT, RTSP, HTTP) again; 0 for a publish stream.
    #[serde(default)]
    pub retries: u64,
    /// Switches to the backup (failovers) and back to the source (failbacks).
    #[serde(default)]
    pub failovers: u64,
    #[serde(default)]
    pub failbacks: u64,
    /// When the source decoding behind the backup takes over, if it goes on decoding (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback_at_unix_ms: Option<u64>,
    /// The backup input, for a stream that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
    /// Seconds on the slate in all, the current stretch included.
    pub slate_seconds: f64,
    pub on_source_loss: crate::stream::SourceLoss,
}

/// A stream's backup input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupStatus {
    pub source: String,
    /// Whether it decodes: a frame within the stream's `source_timeout_ms`.
    pub healthy: bool,
    /// Milliseconds since its last decoded frame (none before its first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_frame_ms_ago: Option<u64>,
    /// Times it was started again after it failed off air (a `publish:` backup: times a backup publisher
    /// connected again after one left).
    pub restarts: u64,
    pub failback_s: u32,
    /// A `publish:` backup's connected publisher (never its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<crate::ingest::PublisherStatus>,
}

/// One rebuild of a stream's pipeline after its encoder failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Fallback {
    pub at_unix_ms: u64,
    pub from: Backend,
    pub to: Backend,
    /// `encoder_error` (the encoder failed) — the label of `kiln_fallbacks_total`.
    pub reason: String,
    /// The error that caused it.
    pub error: String,
}
