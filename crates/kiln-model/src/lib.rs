//! kiln-model: the pure vocabulary every kiln crate shares.
//!
//! It holds what a stream *is* (its source, its renditions, its timing) and the JSON wire types of the control
//! API, with no I/O, no GStreamer and no async runtime, so that the daemon, the scheduler, the CLI and the tests
//! agree on one definition.
//!
//! Layout:
//! - [`source`]: typed stream sources parsed from URIs (`test:`, `publish:`, `file://`, `srt://`, `rtsp://`, `http(s)://`), with
//!   the refusal reasons.
//! - [`stream`]: the request a client sends (`StreamRequest`), the resolved plan a pipeline is built from
//!   (`StreamPlan`), timing rules (`Timing`) and validation.
//! - [`api`]: the status documents the daemon returns.
//! - [`capacity`]: resource vectors (CPU, memory, NVENC/NVDEC, sessions, VRAM) and the CPU cost model.
//! - [`vod`]: VOD job requests and status, input rules, the no-upscale ladder.
//! - [`node`]: the capacity report (`GET /v1/capacity`, heartbeats) and the scheduler's fencing header.
//! - [`ingest`]: `publish:` streams: their secrets, publish URLs, publisher status, SRT stream ids, FLV framing
//!   and the publisher-timestamp rule.
//! - [`load`]: load measured while a node runs: serving cost (`host.serving`) and each stream's recent real-time
//!   ratio.
//! - [`net`]: which addresses a URL fetched for a user (a VOD job's input) may reach.

pub mod api;
pub mod capacity;
pub mod ingest;
pub mod load;
pub mod net;
pub mod node;
pub mod source;
pub mod stream;
pub mod vod;

pub use api::{BackupStatus, Fallback, RenditionStatus, Resilience, StreamState, StreamStatus};
pub use source::{
    Host, HttpSource, RtspSource, Source, SourceError, SrtMode, SrtSource, TestPattern, UrlScheme,
};
pub use stream::{
    AudioCodec, AudioRendition, AudioRequest, Backend, Backup, BackupRequest, EncoderSettings,
    Fraction, Passthrough, PlanError, Policy, RenditionSpec, SourceLoss, SourceLossMode,
    StreamPlan, StreamRequest, Timing, VideoCodec, VideoRendition, X264Speed,
};
