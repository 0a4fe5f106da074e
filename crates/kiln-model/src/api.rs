//! Control-API documents returned by the daemon (`GET /v1/streams[/{id}]`).

use serde::{Deserialize, Serialize};

/// Life cycle of a live stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamState {
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

/// `GET /v1/streams/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub id: String,
    pub state: StreamState,
    pub source: String,
    /// Multivariant playlist path.
    pub playback: String,
    pub renditions: Vec<RenditionStatus>,
    /// Errors seen by the pipeline, newest last.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Unix milliseconds when the stream was created.
    pub created_unix_ms: u64,
}
