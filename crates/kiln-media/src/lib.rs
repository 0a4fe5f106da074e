//! kiln-media: the only crate that links GStreamer.
//!
//! It turns a validated [`kiln_model::StreamPlan`] into a live GStreamer pipeline, built element by element with
//! typed properties (never `parse::launch` on user data), and reports what comes out as typed [`MediaEvent`]s:
//! init segments, CMAF parts (one per LL-HLS part) and bus errors. Everything downstream (packaging, HTTP) is
//! plain Rust that never sees a GStreamer type.
//!
//! Topology of a `test:` stream (decode-once/scale-many; a decoded source would join at the tee):
//! ```text
//! videotestsrc(live) → caps(max size) → clockoverlay → tee
//!   tee → queue → videoconvertscale → videorate → caps(WxH@fps I420) → [keyframe clock] → x264enc → h264parse → caps(avc/au)
//!       → [splitter] → cmafmux(manual-split) → appsink            (one branch per video rendition)
//! audiotestsrc(live) → audioconvert → audioresample → caps → AAC encoder → aacparse → [splitter]
//!       → cmafmux(manual-split) → appsink
//! ```
//! Keyframes are forced on the first frame at/after each segment grid point by a force-key-unit event sent just
//! ahead of that frame into each encoder; the grid is the pipeline's running time, shared by every branch, so
//! every encoder cuts its GOP on the same frame. Each branch's splitter (a pad probe in front of the muxer) sends
//! `FMP4MuxSplitNow` before the first frame of each part and segment, using [`kiln_llhls::plan`] — the same rules
//! for every rendition, so parts align across renditions (DESIGN.md §3; automatic chunking cannot do this).
//!
//! Layout: [`elements`] (finding and configuring elements), [`pipeline`] (building and running a live stream),
//! [`chunks`] (turning muxer output into events), [`vod`] (probing files and transcoding them to a CMAF ladder).

pub mod chunks;
pub mod elements;
pub mod pipeline;
pub mod priority;
pub mod select;
mod slate;
mod source;
pub mod vod;

use std::sync::{Arc, OnceLock};

use gst::prelude::*;

use bytes::Bytes;
pub use kiln_llhls::PartIn;
pub use pipeline::{BuildOptions, FrameStats, LivePipeline, RenditionFrames, Switcher};
pub use source::{input_of, is_backup, ByteFeed, InputKind, SizeLimit};

/// Something the pipeline reports.
#[derive(Debug, Clone)]
pub enum MediaEvent {
    /// The init segment (ftyp+moov) of a rendition, with its RFC 6381 codec string.
    Init {
        rendition: usize,
        bytes: Bytes,
        codec: Option<String>,
    },
    /// The next CMAF chunk (= LL-HLS part) of a rendition, with the instant the muxer handed it over.
    Part {
        rendition: usize,
        part: PartIn,
        at: std::time::Instant,
    },
    /// The pipeline failed; it will produce nothing more.
    Error {
        element: Option<String>,
        message: String,
        debug: Option<String>,
    },
    /// A recoverable problem worth showing in the stream's status.
    Warning {
        element: Option<String>,
        message: String,
    },
    /// Every branch has drained after an EOS.
    Eos,
    /// A publisher's bytes ended (it disconnected). The stream goes on; what feeds it next is the daemon's call
    /// ([`crate::LivePipeline::switch_to_slate`]). `input`: the source's generation (1 for the first; see
    /// [`crate::LivePipeline::switch_to_source`]).
    /// `kind`: the stream's source, or its backup.
    SourceEnded { input: u64, kind: InputKind },
    /// An input took over the stream at its first frame (the slate, a source of that generation, or the backup),
    /// from the input of kind `from` (`from_slate`: from the slate).
    InputSwitched {
        input: u64,
        kind: InputKind,
        from_slate: bool,
        from: InputKind,
    },
}

/// Where a pipeline delivers its events. Called from GStreamer streaming threads: it must not block for long.
pub type EventSink = Arc<dyn Fn(MediaEvent) + Send + Sync>;

/// Why a pipeline could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("GStreamer could not be initialised: {0}")]
    Init(String),
    #[error("GStreamer element `{0}` is not installed ({1})")]
    MissingElement(&'static str, &'static str),
    #[error("GStreamer element `{0}` chosen for this host could not be made")]
    MissingDynamic(String),
    #[error("building the pipeline failed: {0}")]
    Build(String),
    #[error("the pipeline refused to start: {0}")]
    Start(String),
}

impl From<gst::glib::BoolError> for MediaError {
    fn from(e: gst::glib::BoolError) -> Self {
        MediaError::Build(e.to_string())
    }
}

/// Initialises GStreamer and registers the statically linked `cmafmux`. Idempotent.
pub fn init() -> Result<(), MediaError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        gst::init().map_err(|e| e.to_string())?;
        gstfmp4::plugin_register_static().map_err(|e| e.to_string())?;
        let demoted = keep_hardware_decoders_out_of_autoplugging();
        if !demoted.is_empty() {
            tracing::info!(decoders = %demoted.join(", "), "hardware decoders are chosen explicitly, never autoplugged");
        }
        Ok(())
    })
    .clone()
    .map_err(MediaError::Init)
}

/// Whether an element klass (`Codec/Decoder/Video/Hardware`) is a hardware decoder.
pub fn is_hardware_decoder(klass: &str) -> bool {
    let parts: Vec<&str> = klass.split('/').collect();
    parts.contains(&"Decoder") && parts.contains(&"Hardware")
}

/// Sets every hardware decoder's rank to NONE in this process, so that autoplugging (`uridecodebin` in VOD jobs,
/// the VOD probe's `Discoverer`) never picks one. From GStreamer 1.22 nvcodec registers `nvh264dec`/`nvh265dec`
/// at PRIMARY + 1, above `avdec_*`: on a GPU node a VOD job would otherwise decode on NVDEC without admission
/// having booked any. Live streams choose their decoder by name ([`select`]) and book it, which a rank does not
/// affect. Returns the demoted factory names.
fn keep_hardware_decoders_out_of_autoplugging() -> Vec<String> {
    let mut demoted = Vec::new();
    for f in gst::Registry::get().features(gst::ElementFactory::static_type()) {
        let Ok(ef) = f.downcast::<gst::ElementFactory>() else {
            continue;
        };
        let hw = ef
            .metadata(gst::ELEMENT_METADATA_KLASS)
            .is_some_and(is_hardware_decoder);
        if hw && ef.rank() > gst::Rank::NONE {
            ef.set_rank(gst::Rank::NONE);
            demoted.push(ef.name().to_string());
        }
    }
    demoted
}

/// The GStreamer runtime version, e.g. `1.22.0`.
pub fn gstreamer_version() -> String {
    let (a, b, c, _) = gst::version();
    format!("{a}.{b}.{c}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_decoders_are_recognised_by_klass_and_never_autoplugged() {
        assert!(is_hardware_decoder("Codec/Decoder/Video/Hardware"));
        assert!(!is_hardware_decoder("Codec/Decoder/Video"));
        assert!(!is_hardware_decoder("Codec/Encoder/Video/Hardware"));
        assert!(!is_hardware_decoder("Codec/Decoder/Hardwareish"));
        init().unwrap();
        // on a GPU host this covers nvh264dec & co; on a host without one there may be nothing to check
        for f in gst::Registry::get().features(gst::ElementFactory::static_type()) {
            let ef = f.downcast::<gst::ElementFactory>().unwrap();
            if ef
                .metadata(gst::ELEMENT_METADATA_KLASS)
                .is_some_and(is_hardware_decoder)
            {
                assert_eq!(ef.rank(), gst::Rank::NONE, "{}", ef.name());
            }
        }
        // software decoders keep their rank
        let avdec = gst::ElementFactory::find("avdec_h264").expect("avdec_h264");
        assert!(avdec.rank() >= gst::Rank::PRIMARY);
    }
}
