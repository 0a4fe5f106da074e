//! kiln-origin: the LL-HLS origin.
//!
//! It keeps each live stream's parts and segments in memory (a bounded window per rendition, held by the pure
//! [`kiln_llhls::Packager`]), publishes every rendition's playlist atomically as an `Arc` snapshot on a
//! `tokio::sync::watch` channel, and serves playback over axum:
//!
//! - `GET /live/{stream}/master.m3u8` — the multivariant playlist (held briefly until every rendition's codec is
//!   known);
//! - `GET /live/{stream}/{rendition}/index.m3u8[?_HLS_msn=M[&_HLS_part=P]]` — media playlists with blocking reload:
//!   the request parks on the watch channel and one publish wakes every parked request;
//! - `GET /live/{stream}/{rendition}/{init.mp4|seg-M.m4s|part-M-P.m4s}` — media; a preload-hinted part is held
//!   until it is complete and then sent whole.
//!
//! Layout: [`store`] (streams, renditions, publication), [`published`] (the playlist bytes each publish answers
//! with, each made once), [`routes`] (HTTP), [`encoding`] (gzip negotiation), [`signing`] (signed playback URLs).

pub mod encoding;
pub mod published;
pub mod routes;
pub mod signing;
pub mod store;

pub use routes::{router, LiveAnswer, LiveGet};
pub use store::{Origin, RenditionInfo, RenditionKind, StreamOrigin};
