//! kiln-llhls: the pure LL-HLS packager.
//!
//! CMAF chunks come in (one chunk = one LL-HLS part; a chunk that starts a fragment starts a segment), and out come
//! the per-rendition segment/part index, the media and multivariant playlists, and the answers to blocking
//! playlist requests. No I/O, no GStreamer, no async runtime: the origin wraps this in locks and watch channels,
//! the media crate feeds it, and everything here is tested with synthetic chunks in milliseconds.
//!
//! Layout:
//! - [`cmaf`]: a small ISO-BMFF reader for what packaging needs (timescales, `tfdt`, `trun` durations and sync
//!   flags, RFC 6381 codec strings from `avcC`/`esds`).
//! - [`plan`]: where parts and segments are cut, decided from one clock for every rendition.
//! - [`packager`]: the per-rendition index and media playlist, the sliding window, [`packager::Snapshot`]s.
//! - [`blocking`]: `_HLS_msn`/`_HLS_part` decisions (ready / wait / 400) per draft-pantos-hls-rfc8216bis §6.2.5.2.
//! - [`multivariant`]: the multivariant playlist.
//! - [`dash`]: the LL-DASH MPD over the same segments.
//! - [`vod`]: VOD playlists, the static MPD and the thumbnail WebVTT over finished CMAF tracks.
//! - [`time`]: PROGRAM-DATE-TIME formatting without a date library.
//! - [`pull`]: which variant and segments to fetch when an HLS stream is a source.

pub mod blocking;
pub mod cmaf;
pub mod dash;
pub mod multivariant;
pub mod packager;
pub mod plan;
pub mod pull;
pub mod time;
pub mod vod;

pub use blocking::{BlockRequest, Decision};
pub use packager::{PackError, Packager, PackagerConfig, PartIn, PartPos, Snapshot};
