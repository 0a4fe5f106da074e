//! Turning cmafmux output into [`MediaEvent`]s.
//!
//! cmafmux (manual-split) pushes one buffer list per chunk: optionally the init header (`ftyp`+`moov`, flagged
//! `DISCONT|HEADER`), then the chunk header (`[styp]+moof`, `HEADER`; `DELTA_UNIT` too when the chunk does not open
//! a fragment) and the media buffers (`mdat`). The init is recognised by its first box, the segment start by the
//! header's flags, and duration and independence are read from the `moof` itself, so the playlist states exactly
//! what the bytes contain.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kiln_llhls::cmaf::{self, InitInfo};
use kiln_llhls::PartIn;

use crate::{EventSink, MediaEvent};

/// Per-rendition state of the appsink callback.
pub(crate) struct ChunkAssembler {
    rendition: usize,
    init: Option<InitInfo>,
    sink: EventSink,
    /// A stream with a passthrough rendition: its switch points, each marked on the first segment that starts at
    /// or after it.
    marks: Option<Marks>,
}

/// Where a rendition of a stream with a passthrough rendition marks its discontinuities: the stream's switch
/// points, how early a segment may start before one and still be the one it marks (a video rendition keys the
/// frame nearest it, within half a frame of its own rate), and the last one marked (shared by the muxers one
/// rendition goes through, so a new muxer does not mark it again).
#[derive(Clone)]
pub(crate) struct Marks {
    pub keys: Arc<crate::source::SourceKeys>,
    pub tolerance_ns: u64,
    pub switched: Arc<parking_lot::Mutex<Option<u64>>>,
}

impl Marks {
    pub(crate) fn new(keys: Arc<crate::source::SourceKeys>, tolerance_ns: u64) -> Self {
        Self {
            keys,
            tolerance_ns,
            switched: Arc::default(),
        }
    }
}

impl ChunkAssembler {
    pub(crate) fn new(rendition: usize, sink: EventSink, marks: Option<Marks>) -> Self {
        Self {
            rendition,
            init: None,
            sink,
            marks,
        }
    }

    /// Whether the segment starting at `start_ns` is the first at or after a switch point not yet marked: where
    /// the passthrough rendition changes bitstream (and codec parameters), every rendition opens a discontinuity,
    /// so their discontinuity sequence numbers match.
    fn opens_discontinuity(&mut self, start_ns: u64) -> bool {
        let Some(m) = &self.marks else {
            return false;
        };
        let mut switched = m.switched.lock();
        match m.keys.switch_due(*switched, start_ns, m.tolerance_ns) {
            Some(s) => {
                *switched = Some(s);
                true
            }
            None => false,
        }
    }

    /// Handles one appsink sample (a buffer list, or a single buffer).
    pub(crate) fn on_sample(&mut self, sample: &gst::Sample) -> Result<(), String> {
        let buffers: Vec<gst::Buffer> = match (sample.buffer_list(), sample.buffer()) {
            (Some(list), _) => list.iter_owned().collect(),
            (None, Some(b)) => vec![b.to_owned()],
            (None, None) => return Ok(()),
        };
        let segment = sample
            .segment()
            .and_then(|s| s.downcast_ref::<gst::ClockTime>().cloned());
        let mut body = BytesMut::new();
        let mut header: Option<(gst::BufferFlags, Option<gst::ClockTime>)> = None;
        for b in &buffers {
            let map = b.map_readable().map_err(|e| e.to_string())?;
            let data = map.as_slice();
            if data.len() >= 8 && &data[4..8] == b"ftyp" {
                let info = cmaf::parse_init(data).map_err(|e| format!("init segment: {e}"))?;
                let codec = info.codecs();
                self.init = Some(info);
                (self.sink)(MediaEvent::Init {
                    rendition: self.rendition,
                    bytes: Bytes::copy_from_slice(data),
                    codec,
                });
                continue;
            }
            if header.is_none() && b.flags().contains(gst::BufferFlags::HEADER) {
                header = Some((b.flags(), b.pts()));
            }
            body.extend_from_slice(data);
        }
        if body.is_empty() {
            return Ok(());
        }
        let init = self
            .init
            .as_ref()
            .ok_or("a chunk arrived before the init segment")?;
        let info = cmaf::parse_fragment(&body, init).map_err(|e| format!("chunk: {e}"))?;
        let (flags, pts) = header.ok_or("a chunk without a header buffer")?;
        let start_ns = pts
            .and_then(|p| segment.as_ref().and_then(|s| s.to_running_time(p)))
            .map(|t| t.nseconds())
            .unwrap_or_else(|| info.start_ns());
        let starts_segment = !flags.contains(gst::BufferFlags::DELTA_UNIT);
        let discontinuity = starts_segment && self.opens_discontinuity(start_ns);
        (self.sink)(MediaEvent::Part {
            at: std::time::Instant::now(),
            rendition: self.rendition,
            part: PartIn {
                starts_segment,
                independent: info.starts_with_sync,
                start_ns,
                duration_ns: info.duration_ns(),
                bytes: body.freeze(),
                discontinuity,
            },
        });
        Ok(())
    }
}
